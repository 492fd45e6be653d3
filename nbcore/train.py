"""Training: flow matching with 4-way CFG dropout, EMA, safe checkpoints, monitoring and DDP.

    from nbcore.train import TrainConfig, train
    summary = train(TrainConfig(preset="tiny", data="outputs/shapes", out="outputs/run", steps=600))

    python -m nbcore.train --preset tiny --data DIR --out DIR [--steps N ...]      # one process
    torchrun --nproc_per_node=2 -m nbcore.train --preset tiny --data DIR --out DIR  # DDP

Reading order (nanoGPT's): ``Trainer.run`` is the loop — checkpoint / validation / samples when the
step just reached is due -> ``train_step`` -> log; ``Trainer.train_step`` is one optimiser step — lr
(scheduler) -> forward/backward over ``grad_accum`` micro-batches -> clip -> NaN/Inf guard -> AdamW
step -> EMA. Metrics travel as dicts of named scalars and vectors; ``metrics_to_host`` (the step's one
device->host copy) and ``reduce_metrics`` (the sum over DDP ranks) alone pack them into a tensor.

Flow matching (``nbcore.flow``, docs/DESIGN.md): ``x_t = (1 - t) x0 + t noise``, target ``v = noise - x0``,
4-way per-sample CFG dropout. Configuration: ``nbcore.train_config.TrainConfig``; the command line:
``nbcore.cli.train``.

Design notes (why, not what):
- Host-device syncs. Text is trimmed on the host (``prepare_text``) before the copy. Everything
  monitored for a step (loss, loss per t-bin, velocity RMS, gradient norms, the finite flag) is
  packed into one small tensor and copied to the host once per optimiser step. That one sync is
  the price of the NaN guard: deciding whether to apply the update needs the answer on the host
  (a sync-free alternative, masking the update on the device as GradScaler does, would also have
  to mask the scheduler, the EMA and the step count, and could only raise K steps late). After
  backward the device queue is nearly drained anyway, so the cost is one launch latency per step.
- NaN/Inf guard. A step is skipped (no optimiser, scheduler or EMA update; gradients dropped) when
  the loss or the total gradient norm is not finite; in DDP the decision is all-reduced (MIN) so
  every rank skips together. ``step`` still advances (the data was consumed); the scheduler
  follows the number of applied updates. K skips in a row raise ``NonFiniteLossError``.
- EMA (``nbcore.ema``). Warm start initialises the EMA from the warm-started weights.
- Resume determinism. The data stream (``nbcore.stream``) is a sequence of epochs whose position a
  checkpoint records; the generator that draws t, noise and dropout is a dedicated
  ``torch.Generator`` per rank whose state is saved, as are the global torch / numpy / python / CUDA
  RNG states (``nbcore.checkpoint``). With the same world size, on a deterministic CPU, the step
  after a resume computes the same loss as an uninterrupted run (tests/test_train.py checks this
  with a SIGKILL). Changing the world size on resume still loads weights and optimiser state but
  restarts each rank's data at its recorded epoch start.
- Preemption (``nbcore.preemption``). SIGTERM or SIGINT during ``run`` writes last.pt at the step
  reached, prints one line and raises ``Stopped`` (exit 143 / 130); ``--resume`` continues
  bit-exactly (tests/test_robustness.py).
- DDP. ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; we init nccl on CUDA and gloo on CPU, wrap
  the model in DistributedDataParallel (``no_sync`` on non-final accumulation micro-batches), and
  let the loader split shards by rank itself. ``batch_size`` is per process and micro-batch; the
  global batch is ``batch_size * world_size * grad_accum``. Rank 0 alone writes logs, checkpoints,
  validation metrics and sample grids.
- Warm start (``warm_start=CKPT``): loads the checkpoint's ``model`` weights by
  default (the raw trained weights, the ones a resumed run continues from;
  ``warm_start_weights="ema"`` takes the EMA instead) through ``nbcore.model.load_warm_start``,
  prints and logs its report, refuses shape mismatches, initialises the EMA from the result and
  scales the learning rate by ``warm_start_lr_scale`` (0.5). Optimiser state is not carried over.
  ``new_param_lr_scale`` multiplies the lr of the parameters the pre-patch model lacks.
  A run that resumes ignores ``warm_start`` (its own checkpoint already holds the weights).
- Checkpoints: the format, resume and its fallback to a milestone are ``nbcore.checkpoint``'s.
- Model sizes from the data: ``TrainConfig.model_config`` (``nbcore.train_config``, ``nbcore.sizes``).
- Bad samples. The loader checks every sample with ``nbcore.data.SampleRule`` against stats.json
  and this model's sizes (the rule ``python -m nbcore.data check DIR --preset P`` applies), skips a
  bad one and counts it by reason; the counts, summed over ranks, are in every ``train`` log
  record (``data_samples``, ``data_skipped``) and the summary. More skips than ``max_skips`` (a
  fraction of the samples read, or a count) stop the run with ``TooManySkipsError``; ``strict``
  stops at the first bad sample with its DataError (shard, key, reason).
- Weight decay applies to matrices only (Linear / conv weights), not to biases, learned nulls or
  the learned patch-position table: decaying a null embedding would pull "no signal" towards 0.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from nbcore.checkpoint import (checkpoint_step, differences, find_resume, read_training_checkpoint, save_training_checkpoint,
                               read_weights, restore_training, training_checkpoint)
from nbcore.data import SkipCounter
from nbcore.distributed import gather_objects, init_distributed
from nbcore.ema import EMA
from nbcore.flow import DROPOUT_CASES, batch_to_device, flow_matching_loss, sample_dropout, sample_timesteps
from nbcore.model import NanoDiT, load_warm_start
from nbcore.preemption import StopSignals, Stopped
from nbcore.sizes import DATA_SIZES, check_fits_data, data_sizes, data_stats, model_config_for_data
from nbcore.stream import BatchStream, shard_source
from nbcore.tracking import RunTracker
from nbcore.train_config import TrainConfig, check_model_config, parse_model_overrides, skip_allowance
from nbcore.train_log import (add_metrics, bin_means, count_step, finite_or_none, load_train_log, metrics_to_host,
                              new_window, reduce_metrics, truncate_log)
from nbcore.utils import HookUnavailable, seed_everything

# names importable from here as before the split (tests, notebooks, other branches)
__all__ = ["TrainConfig", "Trainer", "train", "flow_matching_loss", "sample_dropout", "sample_timesteps",
           "batch_to_device", "load_train_log", "NonFiniteLossError", "TooManySkipsError", "DROPOUT_CASES",
           "check_model_config", "parse_model_overrides", "skip_allowance", "reduce_metrics", "metrics_to_host",
           "DATA_SIZES", "data_stats", "data_sizes", "model_config_for_data", "check_fits_data",
           "BatchStream", "shard_source", "EMA", "read_training_checkpoint"]


class NonFiniteLossError(RuntimeError):
    """Raised when ``nan_max_consecutive`` optimiser steps in a row had a non-finite loss or gradient."""


class TooManySkipsError(RuntimeError):
    """Raised when the loader skipped more bad samples than ``max_skips`` allows."""


# --------------------------------------------------------------------------- optimiser

def _param_groups(model: NanoDiT, cfg: TrainConfig, base_lr: float) -> list[dict]:
    """AdamW groups: weight decay on matrices except the learned nulls and patch positions; the
    new (patch) parameters at ``base_lr * new_param_lr_scale`` when that scale is not 1 (else two
    groups, the layout older checkpoints' optimiser state has)."""
    new = set(model.new_parameter_names()) if cfg.new_param_lr_scale != 1 else set()
    groups = []
    for decays in (True, False):
        for is_new in (False, True):
            params = [p for n, p in model.named_parameters()
                      if (p.ndim >= 2 and not n.startswith(("null_", "patch_pos"))) == decays and (n in new) == is_new]
            if params:
                groups.append({"params": params, "weight_decay": cfg.weight_decay if decays else 0.0,
                               "lr": base_lr * (cfg.new_param_lr_scale if is_new else 1.0)})
    return groups


def _lr_lambda(cfg: TrainConfig):
    def f(n: int) -> float:
        if cfg.warmup and n < cfg.warmup:
            return (n + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup)
        frac = min(1.0, (n - cfg.warmup) / span)
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def _warm_start(model: NanoDiT, path, weights: str, model_cfg) -> dict:
    """Load the ``weights`` ("model" or "ema") of the checkpoint at ``path`` into ``model`` by name
    (``nbcore.model.load_warm_start``) and return its report; ValueError naming the differing sizes
    when tensors are shape-mismatched, or when none matched; KeyError without those weights."""
    state, config = read_weights(path, weights)
    report = load_warm_start(model, state)
    if report["mismatched"]:
        sizes = [k for k in DATA_SIZES if k != "input_size"]   # no tensor depends on the latent side
        theirs, ours = differences(config, model_cfg.to_dict(), sizes) if config is not None else ("", "")
        why = f"the checkpoint has {theirs}, this model {ours}" if theirs else "different preset or sizes?"
        raise ValueError(f"warm start from {path}: shape-mismatched tensors {report['mismatched']} ({why})")
    if not report["loaded"]:
        raise ValueError(f"warm start from {path}: no tensor matched this model")
    return report


# --------------------------------------------------------------------------- trainer

class Trainer:
    """One training run. ``Trainer(cfg).run()`` is ``train(cfg)``; the object keeps ``model``, ``ema``,
    ``optimizer``, ``step`` for tests and notebooks.

    data: optional ``source(epoch, rank, world_size) -> iterable of batches`` replacing the shard
    loader (stand-in batches for tests). val_fn / sample_fn: ``fn(trainer, ckpt_path) -> dict | None``
    hooks run on rank 0 every ``val_every`` / ``sample_every`` steps, given by the caller (None = none;
    the CLI passes ``nbcore.validate.validation_hook`` / ``sample_grid_hook``); a hook raising
    ``nbcore.utils.HookUnavailable`` is turned off with its reason printed.
    """

    def __init__(self, cfg: TrainConfig, data: Callable[[int, int, int], Iterable[dict]] | None = None,
                 val_fn: Callable | None = None, sample_fn: Callable | None = None):
        self.cfg = cfg
        # the data's stats.json (None with the caller's batches): the model's sizes; carried in checkpoints
        self.data_stats = data_stats(cfg.data) if data is None else None
        self.model_cfg = cfg.model_config(self.data_stats)
        self.world, self.rank, self.local_rank, self.device, self._own_pg = init_distributed(cfg.device)
        self.is_main = self.rank == 0
        try:
            self._build(data, val_fn, sample_fn)
        except BaseException:
            self.close()  # a process group we opened must not outlive a failed setup
            raise

    def _build(self, data, val_fn, sample_fn):
        cfg = self.cfg
        self.out, self.ckpt_dir, self.log_path = Path(cfg.out), Path(cfg.out) / "ckpt", Path(cfg.out) / "log.jsonl"
        src = self._data_source(data)      # checks the data folder before anything is written
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)          # same init on every rank (DDP also broadcasts rank 0's weights)
        self.model = NanoDiT(self.model_cfg).to(self.device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg.seed * 1_000_003 + 7919 * self.rank)
        resume = find_resume(self.ckpt_dir, cfg.resume, self.is_main)   # (path, checkpoint, fallback) or None
        self.warm_report = self._warm_start(cfg.warm_start) if cfg.warm_start and resume is None else None
        self.ema = EMA(self.model, cfg.ema_decay)
        self.optimizer, self.scheduler = self._optimizer()
        self.step = self.n_updates = self.skipped = self.streak = 0
        self.optimizer_restarted = False   # a resume from a lean milestone sets it
        self.resumed_from, self.resume_fallback = (resume[0], resume[2]) if resume else (None, None)
        position = self._resume(resume[0], resume[1]) if resume else self._fresh_start()
        self.stream = BatchStream(src, **position)
        self.fwd = self._forward_module()
        self.val_fn, self.sample_fn = val_fn, sample_fn   # the caller's (the CLI wires nbcore.validate's)
        for every, fn, name in ((cfg.val_every, val_fn, "val_fn"), (cfg.sample_every, sample_fn, "sample_fn")):
            if every and fn is None and self.is_main:
                print(f"no {name} given: the hook every {every} steps only writes the checkpoint", file=sys.stderr)
        # the applied steps' metrics behind the summary's final_loss / loss_by_bin
        self._recent: deque = deque(maxlen=max(1, min(100, cfg.steps // 5)))
        # TensorBoard beside log.jsonl (rank 0): every record, and a fixed-scene grid at each milestone
        # on total optimiser steps: a warm-started run continues its source's axis
        self.tracker = RunTracker.for_data(self.out, cfg.data if data is None else "", self.data_stats,
                                           cfg.val_sample_steps,
                                           step_offset=checkpoint_step(cfg.warm_start) if cfg.warm_start else 0
                                           ) if cfg.tensorboard and self.is_main else None

    # -- setup helpers
    def _data_source(self, data) -> Callable[[int], Iterable[dict]]:
        """Epoch -> this rank's batches: the caller's ``data(epoch, rank, world)``, else the shards."""
        if data is not None:
            return lambda epoch: data(epoch, self.rank, self.world)
        return shard_source(self.cfg, self.model_cfg)

    def _optimizer(self):
        """AdamW over ``_param_groups`` and its LambdaLR schedule; a warm-started run (or its resume)
        trains at ``lr * warm_start_lr_scale``."""
        cfg = self.cfg
        base_lr = cfg.lr * cfg.warm_start_lr_scale if cfg.warm_start else cfg.lr
        kw = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(_param_groups(self.model, cfg, base_lr), lr=base_lr, betas=(0.9, 0.999), **kw)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    def _fresh_start(self) -> dict:
        """Data position of a run that does not resume; a previous log in OUT is moved aside."""
        if self.is_main and self.log_path.exists():
            old = self.log_path.with_name(f"log.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(self.log_path, old)  # a fresh run starts a fresh log; the old one is kept aside
            print(f"fresh run in {self.out}: previous log moved to {old.name}", file=sys.stderr)
        return {"epoch": 0, "index": 0}

    def _forward_module(self) -> nn.Module:
        """The module the loss calls: the model, compiled when asked, wrapped in DDP with several ranks."""
        fwd = torch.compile(self.model) if self.cfg.compile else self.model
        if self.world > 1:
            fwd = DDP(fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return fwd

    def _warm_start(self, path) -> dict:
        """Load the warm-start checkpoint's weights into the model (``nbcore.checkpoint.warm_start``)."""
        report = _warm_start(self.model, path, self.cfg.warm_start_weights, self.model_cfg)
        if self.is_main:
            print(f"warm start from {path} ({self.cfg.warm_start_weights} weights, lr x{self.cfg.warm_start_lr_scale}): "
                  f"loaded {len(report['loaded'])}, new {report['new']}, unexpected {report['unexpected']}, "
                  f"mismatched {report['mismatched']}", file=sys.stderr)
        return report

    def _resume(self, path, ck: dict) -> dict:
        """Load a checkpoint's state into this run (``nbcore.checkpoint.restore_training``); returns the
        data position to continue from. A lean milestone (no optimiser state) restarts AdamW's moments,
        the schedule at its n_updates."""
        position = restore_training(self, path, ck)
        if self.optimizer_restarted:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg),
                                                               last_epoch=self.n_updates - 1)  # lands at n_updates
        if self.is_main:
            print(f"resumed from {path} at step {self.step}" + (
                f"; optimiser state restarted (fresh AdamW moments, lr schedule at update {self.n_updates})"
                if self.optimizer_restarted else ""), file=sys.stderr)
            truncate_log(self.log_path, self.step)
            for tmp in self.ckpt_dir.glob("*.tmp"):  # a write torn by a kill
                tmp.unlink()
        return position

    # -- logging / checkpoints
    def _log(self, rec: dict):
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(finite_or_none(rec)) + "\n")
            if getattr(self, "tracker", None) is not None:
                self.tracker.record(finite_or_none(rec))

    def checkpoint(self, milestone: bool = False) -> Path:
        """Write OUT/ckpt/last.pt (and the lean step_XXXXXX.pt, without optimiser and scheduler, when
        ``milestone``) atomically; collective in DDP. Keys: ``nbcore.checkpoint``'s."""
        pos, gen, done = self.stream.position(), self.gen.get_state(), self.stream.done.to_dict()
        gathered = gather_objects((pos, gen, done), self.world)
        positions, gens, dones = [g[0] for g in gathered], [g[1] for g in gathered], [g[2] for g in gathered]
        path = self.ckpt_dir / "last.pt"
        if self.is_main:
            save_training_checkpoint(training_checkpoint(self, positions, gens, dones), self.ckpt_dir, milestone)
        self._ckpt_step = self.step
        if self.world > 1:
            dist.barrier()
        return path

    def _checkpoint_once(self) -> Path:
        """last.pt at the current step, written unless this step's checkpoint already exists."""
        if getattr(self, "_ckpt_step", None) != self.step:
            self.checkpoint()
        return self.ckpt_dir / "last.pt"

    # -- one optimiser step
    def train_step(self) -> dict:
        """One optimiser step in nanoGPT's order: lr -> forward/backward over ``grad_accum``
        micro-batches -> clip -> NaN/Inf guard -> AdamW step -> EMA. Returns the step's metrics on the
        host (one device->host copy): ``applied``, ``loss``, ``v_pred_rms``, ``v_target_rms`` (means
        over the micro-batches), ``samples``, ``bin_sum``, ``bin_count`` (loss_bins,), ``grad_norm``,
        ``grad_norm_patch_proj`` (None without patches), ``lr``."""
        lr = self.scheduler.get_last_lr()[0]
        sums = self._forward_backward()
        norms = self._clip_gradients()
        ok = self._finite(sums["loss"], norms["grad_norm"])
        host = metrics_to_host({"ok": ok, **norms, **sums})                     # the one sync
        applied = host["ok"] > 0.5
        if applied:
            self._update()
        else:
            self.skipped += 1
            self.streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        k = self.cfg.grad_accum
        stats = {"applied": applied, "grad_norm": host["grad_norm"],
                 "grad_norm_patch_proj": host["grad_norm_patch_proj"] if self.model_cfg.use_dino_patches else None,
                 "loss": host["loss"] / k, "v_pred_rms": host["v_pred_rms"] / k,
                 "v_target_rms": host["v_target_rms"] / k,
                 "samples": host["samples"], "bin_sum": host["bin_sum"], "bin_count": host["bin_count"], "lr": lr}
        if not applied and self.streak >= self.cfg.nan_max_consecutive:
            self._stop_non_finite(stats)
        return stats

    def _forward_backward(self) -> dict[str, torch.Tensor]:
        """Loss and backward of each micro-batch (gradients summed, scaled by 1 / grad_accum; DDP
        all-reduces them on the last micro-batch only). Returns device sums over the micro-batches
        (no sync): ``loss``, ``v_pred_rms``, ``v_target_rms``, ``samples`` scalars, ``bin_sum``,
        ``bin_count`` (loss_bins,)."""
        cfg = self.cfg
        self.model.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        sums = dict.fromkeys(("loss", "v_pred_rms", "v_target_rms", "samples", "bin_sum", "bin_count"), 0)
        for micro in range(cfg.grad_accum):
            batch = batch_to_device(next(self.stream), self.device, self.model_cfg.use_dino_patches)
            no_sync = self.world > 1 and micro < cfg.grad_accum - 1
            with (self.fwd.no_sync() if no_sync else nullcontext()):
                with autocast:
                    loss, aux = flow_matching_loss(
                        self.fwd, batch, generator=self.gen, probs=cfg.dropout_probs,
                        timestep_sampling=cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                        logit_std=cfg.logit_std, loss_bins=cfg.loss_bins)
                (loss / cfg.grad_accum).backward()
            add_metrics(sums, {"loss": loss.detach(), "v_pred_rms": aux["v_pred_rms"], "v_target_rms": aux["v_target_rms"],
                        "samples": aux["bin_count"].sum(), "bin_sum": aux["bin_sum"], "bin_count": aux["bin_count"]})
        return sums

    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        """Clip the total gradient norm to ``grad_clip`` (0: no clipping). Returns device scalars:
        ``grad_norm`` (before clipping) and ``grad_norm_patch_proj``, the norm of the patch
        projections' gradients (context ``dino_patch_proj`` and tie ``dino_patch_tie``; 0 without)."""
        patch_norm = torch.zeros((), device=self.device)
        if self.model_cfg.use_dino_patches:
            g = [p.grad for n, p in self.model.named_parameters()
                 if n.startswith(("dino_patch_proj.", "dino_patch_tie.")) and p.grad is not None]
            if g:
                patch_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.float()) for x in g]))
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return {"grad_norm": torch.nn.utils.clip_grad_norm_(params, clip), "grad_norm_patch_proj": patch_norm}

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """1.0 when the loss and the gradient norm are finite on every rank (all-reduced MIN, so all
        ranks skip together), else 0.0; a device scalar."""
        ok = (torch.isfinite(loss) & torch.isfinite(grad_norm)).float()
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok

    def _update(self) -> None:
        """Apply the step: AdamW, the lr schedule (it counts applied updates), then the EMA."""
        self.optimizer.step()
        self.scheduler.step()
        self.n_updates += 1
        self.ema.update(self.model, self.n_updates)
        self.streak = 0

    def _stop_non_finite(self, stats: dict) -> None:
        msg = (f"non-finite loss or gradient in {self.streak} steps in a row (up to step {self.step}, "
               f"{self.skipped} skipped in all; last loss {stats['loss']}, grad norm {stats['grad_norm']}): "
               "stopping. Check the data (nbcore.data check), lower the lr, or raise grad clipping.")
        self._log({"kind": "event", "step": self.step, "event": "nan_stop", "message": msg})
        raise NonFiniteLossError(msg)

    def _data_counts(self) -> SkipCounter:
        """Samples read and skipped by reason so far, summed over ranks (collective in DDP)."""
        mine = self.stream.counts()
        if self.world == 1:
            return mine
        total = SkipCounter()
        for g in gather_objects(mine.to_dict(), self.world):
            total.add(g)
        return total

    def _check_skips(self, data: SkipCounter) -> None:
        """TooManySkipsError (after a log event) when the skips exceed ``max_skips``; every rank
        decides on the same reduced counts."""
        skipped = data.total_skipped
        read = data.samples + skipped
        allowed = skip_allowance(self.cfg.max_skips, read)
        if skipped <= allowed:
            return
        what = ", ".join(f"{k} {v}" for k, v in sorted(data.skipped.items()))
        msg = (f"{skipped} bad samples skipped of {read} read ({what}): more than --max-skips {self.cfg.max_skips:g} "
               f"allows ({allowed}); see which with: python -m nbcore.data check {self.cfg.data} --preset "
               f"{self.cfg.preset} (or raise --max-skips)")
        self._log({"kind": "event", "step": self.step, "event": "data_skip_limit", "message": msg,
                   "data_samples": data.samples, "data_skipped": dict(data.skipped)})
        raise TooManySkipsError(msg)

    # -- the loop
    def run(self) -> dict:
        """Train to ``cfg.steps``. Each pass: checkpoint / validation / samples when the step just
        reached is due -> ``train_step`` (lr -> forward/backward -> clip -> step -> EMA) -> log.
        Returns the summary (``train``'s docstring)."""
        cfg = self.cfg
        self._log_start()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (self.is_main and cfg.progress),
                   dynamic_ncols=True)
        start_step, t0 = self.step, time.perf_counter()
        window = new_window(cfg.loss_bins, t0)
        try:
            with StopSignals() as stop:          # SIGTERM / SIGINT: a checkpoint at the step reached, then Stopped
                while True:
                    if self.step > start_step:
                        self._checkpoint_and_hooks()
                    if self.step >= cfg.steps:
                        break
                    s = self.train_step()
                    count_step(s, window, self._recent)
                    bar.set_postfix(loss=f"{s['loss']:.4f}", refresh=False)
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        window = new_window(cfg.loss_bins, self._log_train(s, window, t0))
                    signum = self._stop_signal(stop)
                    if signum:
                        bar.close()
                        self._stop(signum)
                data = self._data_counts()
                self._check_skips(data)
                last_ckpt = self._checkpoint_once()
        finally:
            bar.close()
        summary = self._summary(start_step, time.perf_counter() - t0, data, last_ckpt)
        self._log({"kind": "event", "step": self.step, "event": "end", **summary})
        return summary

    def _stop_signal(self, stop: StopSignals) -> int:
        """The signal that asked this run to stop (0: none); in DDP the largest over the ranks, so
        every rank stops at the same step (the checkpoint is collective)."""
        signum = stop.signum
        if self.world > 1:
            t = torch.tensor([signum], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        return signum

    def _stop(self, signum: int) -> None:
        """Write last.pt at the step reached, log and say so in one line, raise ``Stopped``."""
        path = self._checkpoint_once()
        name = signal.Signals(signum).name
        self._log({"kind": "event", "step": self.step, "event": "stopped", "signal": name, "checkpoint": str(path)})
        msg = f"nbcore.train: {name} at step {self.step}/{self.cfg.steps}: checkpoint written to {path}; resume with --resume"
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)
        raise Stopped(signum, msg)

    def _log_start(self) -> None:
        """Events of how this run starts: warm start, resume fallback, resume, start."""
        cfg = self.cfg
        if self.warm_report is not None:
            self._log({"kind": "event", "step": self.step, "event": "warm_start", "path": cfg.warm_start,
                       "weights": cfg.warm_start_weights, "lr_scale": cfg.warm_start_lr_scale,
                       **{k: v for k, v in self.warm_report.items() if k != "loaded"},
                       "n_loaded": len(self.warm_report["loaded"])})
        if self.resume_fallback is not None:
            self._log({"kind": "event", "step": self.step, "event": "resume_fallback", **self.resume_fallback})
        if self.resumed_from is not None:
            self._log({"kind": "event", "step": self.step, "event": "resume", "path": str(self.resumed_from),
                       "optimizer": "restarted" if self.optimizer_restarted else "restored"})
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log({"kind": "event", "step": self.step, "event": "start", "world_size": self.world,
                       "device": str(self.device), "params": self.model.num_params(),
                       "train_config": asdict(cfg), "model_config": self.model_cfg.to_dict()})

    def _checkpoint_and_hooks(self) -> None:
        """What is due at the step just reached: last.pt (and a milestone), validation, sample grid."""
        cfg, step = self.cfg, self.step
        milestone = bool(cfg.milestone_every) and step % cfg.milestone_every == 0
        if milestone or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            self.checkpoint(milestone=milestone)
        if milestone and self.tracker is not None:
            self.tracker.milestone(step, self.ema.module)
        if cfg.val_every and step % cfg.val_every == 0:
            self._hook("val", self.val_fn)
        if cfg.sample_every and step % cfg.sample_every == 0:
            self._hook("samples", self.sample_fn)

    def _log_train(self, s: dict, window: dict, t0: float) -> float:
        """Write a ``train`` record: step ``s``'s metrics and the window's, summed over ranks (the
        step's means divided by the world size); TooManySkipsError past ``max_skips``. Returns the time."""
        now, w = time.perf_counter(), self.world
        red = reduce_metrics({"loss": s["loss"], "v_pred_rms": s["v_pred_rms"], "v_target_rms": s["v_target_rms"],
                              "window_loss": window["loss"], "window_applied": float(window["applied"]),
                              "samples": window["samples"], "bin_sum": window["bin_sum"],
                              "bin_count": window["bin_count"]}, w, self.device)
        rec = {"kind": "train", "step": self.step, "loss": red["loss"] / w,
               "loss_avg": red["window_loss"] / red["window_applied"] if red["window_applied"] else None,
               "loss_bins": bin_means(red["bin_sum"], red["bin_count"]),
               "v_pred_rms": red["v_pred_rms"] / w, "v_target_rms": red["v_target_rms"] / w,
               "grad_norm": s["grad_norm"], "grad_norm_patch_proj": s["grad_norm_patch_proj"],
               "lr": s["lr"], "samples_per_s": red["samples"] / max(now - window["since"], 1e-9),
               "skipped": self.skipped, "skipped_window": window["skipped"], "applied": s["applied"],
               "epoch": self.stream.epoch, "time_s": now - t0}
        data = self._data_counts()
        rec.update(data_samples=data.samples, data_skipped=dict(data.skipped))
        self._log(rec)
        self._check_skips(data)
        return now

    def _summary(self, start_step: int, elapsed: float, data: SkipCounter, last_ckpt: Path) -> dict:
        """``train``'s summary; final_loss and loss_by_bin over the recent applied steps of every rank."""
        nb = self.cfg.loss_bins
        recent = {"loss": 0.0, "applied": 0.0, "bin_sum": [0.0] * nb, "bin_count": [0.0] * nb}
        for r in self._recent:
            add_metrics(recent, r)
        red = reduce_metrics(recent, self.world, self.device)
        return {"steps": self.step, "steps_this_run": self.step - start_step, "time_s": elapsed,
                "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9),
                "final_loss": red["loss"] / red["applied"] if red["applied"] else None,
                "final_loss_window": len(self._recent),
                "loss_by_bin": bin_means(red["bin_sum"], red["bin_count"]),
                "skipped": self.skipped, "data_samples": data.samples, "data_skipped": dict(data.skipped),
                "checkpoint": str(last_ckpt), "log": str(self.log_path),
                "params": self.model.num_params(), "world_size": self.world, "device": str(self.device),
                "warm_start": self.warm_report is not None}

    def _hook(self, name: str, fn: Callable):
        """Run a periodic hook on rank 0 (after a checkpoint, which it may read); log what it returns."""
        path = self._checkpoint_once()  # collective in DDP: every rank calls it, hook or not
        if self.is_main and fn is not None:
            try:
                result = fn(self, path)
            except HookUnavailable as e:
                print(f"{name} hook off: {e}", file=sys.stderr)
                if name == "val":
                    self.val_fn = None
                else:
                    self.sample_fn = None
                result = None
            if result:
                self._log({"kind": "val" if name == "val" else "event", "step": self.step,
                           **({"event": "samples"} if name != "val" else {}), **result})
        if self.world > 1:
            dist.barrier()

    def close(self):
        if getattr(self, "tracker", None) is not None:
            self.tracker.close()
        if getattr(self, "_own_pg", False) and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, data=None, val_fn=None, sample_fn=None) -> dict:
    """Train per ``cfg`` and return the summary: ``steps``, ``time_s``, ``steps_per_s``, ``final_loss``
    (mean of the last <= 100 applied steps), ``loss_by_bin`` (same window), ``skipped``, ``checkpoint``
    (OUT/ckpt/last.pt), ``log`` (OUT/log.jsonl), ``params``, ``world_size``, ``device``."""
    trainer = Trainer(cfg, data=data, val_fn=val_fn, sample_fn=sample_fn)
    try:
        return trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":   # python -m nbcore.train: the command line is nbcore.cli.train's
    from nbcore.cli.train import main as _main
    sys.exit(_main())
