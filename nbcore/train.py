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

Flow matching (DESIGN.md): ``x_t = (1 - t) x0 + t noise``, target ``v = noise - x0``, loss = MSE of the
predicted velocity, averaged per sample then over the batch. ``t`` is logit-normal (default) or
uniform. Each sample draws one of four conditioning cases (``sample_dropout``): both dropped,
text only (DINO dropped), DINO only (text dropped), both kept; the model replaces a dropped signal
with its learned null (``drop_text`` / ``drop_dino``).

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
- EMA. An explicit fp32 copy of the model updated with ``lerp`` after each applied update, decay
  ``min(ema_decay, (1 + n) / (10 + n))`` (n = applied updates) so early EMA weights are not
  dominated by the random init. Warm start initialises the EMA from the warm-started weights.
- Resume determinism. The data stream is a sequence of epochs; epoch ``e`` is a fresh loader with
  shuffle seed derived from (seed, e) (``drop_last=True`` so every step sees a full batch). A
  checkpoint records, per rank, the epoch and the number of batches already taken from it; resume
  rebuilds that epoch and skips those batches (their cost: decoding up to one epoch once). The
  generator that draws t, noise and dropout is a dedicated ``torch.Generator`` per rank whose state
  is saved, as are the global torch / numpy / python / CUDA RNG states. With the same world size,
  on a deterministic CPU, the step after a resume computes the same loss as an uninterrupted run
  (tests/test_train.py checks this with a SIGKILL). Changing the world size on resume still
  loads weights and optimiser state but restarts each rank's data at its recorded epoch start.
- DDP. ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; we init nccl on CUDA and gloo on CPU, wrap
  the model in DistributedDataParallel (``no_sync`` on non-final accumulation micro-batches), and
  let the loader split shards by rank itself. ``batch_size`` is per process and micro-batch; the
  global batch is ``batch_size * world_size * grad_accum``. Rank 0 alone writes logs, checkpoints,
  validation metrics and sample grids.
- Warm start (``warm_start=CKPT``, seed Phase 7.1): loads the checkpoint's ``model`` weights by
  default (the raw trained weights, as the seed's loader reads ``checkpoint['model']``;
  ``warm_start_weights="ema"`` takes the EMA instead) through ``nbcore.model.load_warm_start``,
  prints and logs its report, refuses shape mismatches, initialises the EMA from the result and
  scales the learning rate by ``warm_start_lr_scale`` (0.5). Optimiser state is not carried over.
  ``new_param_lr_scale`` multiplies the lr of the parameters the pre-patch model lacks.
  A run that resumes ignores ``warm_start`` (its own checkpoint already holds the weights).
- Checkpoints (``nbcore.utils.atomic_save``, loadable with ``weights_only=True``: plain dicts,
  lists, numbers, strings and tensors). OUT/ckpt/last.pt, every ``ckpt_every`` steps and at the end,
  is the resumable one; keys ``config`` (ModelConfig dict: the model trained), ``train_config``
  (``asdict(TrainConfig)``, its ``model`` a dict too or None for the preset with the data's sizes;
  ``TrainConfig.from_dict`` rebuilds it, older ``model_overrides`` JSON included), ``model``,
  ``ema``, ``optimizer``, ``scheduler``, ``step``, ``n_updates``, ``skipped``, ``streak``, ``rng``
  (torch, numpy, python as plain lists/tensors, cuda, and ``train``: each rank's generator state),
  ``data_state`` (world size and each rank's epoch / index), ``data_counts`` (each rank's samples
  read and skipped by reason in finished epochs), ``stats`` (the data's stats.json as
  ``Stats.save`` writes it: entries + ``meta``; None without one) and ``codec`` (the codec spec the
  latents were made with, ``nbcore.codec.codec_spec_from_stats``, or None), so a checkpoint alone
  says how to normalise its conditions and decode its latents (``nbcore.pretrained`` exports both).
  OUT/ckpt/step_XXXXXX.pt, every ``milestone_every``, is lean: everything but ``optimizer`` and
  ``scheduler`` (AdamW's two moments would double its size; milestones are for curves, warm starts
  and exports, which read ``model`` / ``ema``). ``resume="auto"`` (the default) continues from
  OUT/ckpt/last.pt when it exists, or, when it cannot be read, from the newest readable milestone
  (said on stderr and logged as a ``resume_fallback`` event). Resuming from a milestone restores the
  weights, EMA, step, RNG and data position, and restarts the optimiser: fresh AdamW moments, the lr
  schedule at the milestone's ``n_updates`` (said on stderr, ``"optimizer": "restarted"`` in the
  event), so the step after it computes the uninterrupted run's loss but the updates then differ.
  Under DDP, OUT must be on a filesystem every rank sees.
- Model sizes from the data. With ``model=None`` (the CLI without ``--model-overrides``) the model is
  the preset with the sizes the data's stats.json fixes (``model_config_for_data``: latent channels
  and side, text dim, DINO dim and grid); the preset supplies the architecture (hidden size, depth,
  heads, patch size, text_len, ...). Sizes pinned by ``--model-overrides`` or an explicit ``model``
  win, and one that contradicts the data is a ValueError naming both (``check_fits_data``); so is
  resuming a checkpoint whose sizes differ from the data's.
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

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from nbcore.codec import codec_spec_from_stats
from nbcore.data import SampleSpec, SkipCounter, make_loader, shard_list
from nbcore.model import PRESETS, ModelConfig, NanoDiT, load_warm_start, prepare_text
from nbcore.sizes import (DATA_SIZES, check_fits_data, check_model_config, data_sizes, data_stats,
                          model_config_for_data)
from nbcore.stats import Stats
from nbcore.utils import (CheckpointError, HookUnavailable, atomic_save, load_checkpoint, resolve_device,
                          seed_everything)

__all__ = ["TrainConfig", "Trainer", "train", "flow_matching_loss", "sample_dropout", "sample_timesteps",
           "batch_to_device", "load_train_log", "NonFiniteLossError", "TooManySkipsError", "DROPOUT_CASES",
           "check_model_config", "parse_model_overrides", "skip_allowance", "reduce_metrics", "metrics_to_host",
           "DATA_SIZES", "data_stats", "data_sizes", "model_config_for_data", "check_fits_data"]

# The four per-sample conditioning cases, in the order of ``sample_dropout``'s probabilities.
DROPOUT_CASES = ("both_dropped", "text_only", "dino_only", "both_kept")


class NonFiniteLossError(RuntimeError):
    """Raised when ``nan_max_consecutive`` optimiser steps in a row had a non-finite loss or gradient."""


class TooManySkipsError(RuntimeError):
    """Raised when the loader skipped more bad samples than ``max_skips`` allows."""


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; stored in every checkpoint as ``train_config`` (``asdict``: plain
    dicts, ``model`` included; ``TrainConfig.from_dict`` rebuilds it)."""
    # model: ``model`` (None = the preset's with the data's sizes), then these two fields over it when set
    preset: str = "tiny"
    model: ModelConfig | None = None     # the CLI builds it from --preset, the data and --model-overrides JSON
    use_dino_patches: bool | None = None
    patch_pos_embed: str | None = None
    # data and output
    data: str = ""                       # folder with train-*.tar shards (+ stats.json)
    out: str = "outputs/train"
    shuffle: int = 1000                  # shuffle buffer of the loader (0 = off)
    num_workers: int = 0
    # bad samples (nbcore.data.SampleRule) are skipped and counted by reason, up to max_skips:
    # below 1 a fraction of the samples read (rounded up, so one bad sample never stops a run),
    # from 1 a count; strict fails on the first one instead
    max_skips: float = 0.01
    strict: bool = False
    # optimisation
    steps: int = 1000                    # optimiser steps (including skipped ones)
    batch_size: int = 32                 # per process and micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 100                    # linear warmup steps
    schedule: str = "cosine"             # cosine | constant (after warmup)
    lr_min_ratio: float = 0.1            # cosine ends at lr * lr_min_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0               # max total grad norm (0 = no clipping, norm still logged)
    ema_decay: float = 0.999
    # per-sample CFG dropout (DESIGN.md): keep = 1 - the three others
    p_drop_both: float = 0.10
    p_text_only: float = 0.30            # DINO dropped
    p_dino_only: float = 0.05            # text dropped
    # timesteps
    timestep_sampling: str = "logit_normal"   # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_bins: int = 10
    # runtime
    device: str = "auto"
    seed: int = 0
    compile: bool = False
    progress: bool = True
    # intervals in optimiser steps (0 = off)
    log_every: int = 10
    ckpt_every: int = 500                # OUT/ckpt/last.pt (always written at the end too)
    milestone_every: int = 0             # OUT/ckpt/step_XXXXXX.pt kept copies
    val_every: int = 0
    sample_every: int = 0
    val_n: int = 16                      # validation hook: samples scored
    val_sample_steps: int = 10           # Euler steps of the validation / sample-grid hooks
    nan_max_consecutive: int = 5         # K: stop after K skipped steps in a row
    # warm start / resume
    warm_start: str = ""                 # checkpoint of a pre-patch (or any) run
    warm_start_lr_scale: float = 0.5
    # lr multiplier for the parameters the pre-patch architecture lacks (NanoDiT.new_parameter_names:
    # dino_patch_proj, dino_patch_tie, null_dino_patches, patch_pos), on top of the (warm-start scaled) base lr
    new_param_lr_scale: float = 1.0
    warm_start_weights: str = "model"    # model | ema: which weights of the warm-start checkpoint
    resume: str = "auto"                 # auto (OUT/ckpt/last.pt if present) | none | PATH

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.schedule in ("cosine", "constant"), f"schedule must be cosine|constant, got {self.schedule!r}")
        need(0 <= self.lr_min_ratio <= 1, f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        probs = self.dropout_probs
        need(all(p >= 0 for p in probs[:3]) and probs[3] >= -1e-9,
             f"dropout probabilities must be >= 0 and sum to <= 1, got both/text_only/dino_only = {probs[:3]}")
        need(self.timestep_sampling in ("logit_normal", "uniform"),
             f"timestep_sampling must be logit_normal|uniform, got {self.timestep_sampling!r}")
        need(self.logit_std > 0, f"logit_std must be > 0, got {self.logit_std}")
        need(self.loss_bins >= 1, f"loss_bins must be >= 1, got {self.loss_bins}")
        for name in ("log_every", "ckpt_every", "milestone_every", "val_every", "sample_every", "num_workers", "shuffle"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.log_every >= 1, "log_every must be >= 1")
        need(self.val_n >= 1 and self.val_sample_steps >= 1, "val_n and val_sample_steps must be >= 1")
        need(self.nan_max_consecutive >= 1, f"nan_max_consecutive must be >= 1, got {self.nan_max_consecutive}")
        need(math.isfinite(self.max_skips) and self.max_skips >= 0 and (self.max_skips < 1 or self.max_skips == int(self.max_skips)),
             f"max_skips must be a fraction in [0, 1) or a whole count >= 1, got {self.max_skips}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "lr_min_ratio", "logit_mean", "logit_std",
                     "warm_start_lr_scale", "new_param_lr_scale", "p_drop_both", "p_text_only", "p_dino_only"):
            need(math.isfinite(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)}")
        need(self.warm_start_lr_scale > 0, f"warm_start_lr_scale must be > 0, got {self.warm_start_lr_scale}")
        need(self.new_param_lr_scale > 0, f"new_param_lr_scale must be > 0, got {self.new_param_lr_scale}")
        need(self.warm_start_weights in ("model", "ema"),
             f"warm_start_weights must be model|ema, got {self.warm_start_weights!r}")
        need(self.model is None or isinstance(self.model, ModelConfig),
             f"model must be a ModelConfig or None, got {type(self.model).__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild from a checkpoint's ``train_config`` (``asdict`` of one). ``model`` comes back as a
        ModelConfig; an older checkpoint's ``model_overrides`` JSON string (over ``preset``) too."""
        d = dict(d)
        if "model_overrides" in d:
            d["model"] = parse_model_overrides(d.get("preset", cls.preset), d.pop("model_overrides") or "",
                                               **{k: d.get(k) for k in ("use_dino_patches", "patch_pos_embed")})
        elif d.get("model") is not None:
            d["model"] = ModelConfig(**d["model"])
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"train_config has fields this version lacks: {sorted(unknown)}")
        return cls(**d)

    @property
    def dropout_probs(self) -> tuple[float, float, float, float]:
        """(both dropped, text only, DINO only, both kept)."""
        keep = 1.0 - self.p_drop_both - self.p_text_only - self.p_dino_only
        return (self.p_drop_both, self.p_text_only, self.p_dino_only, max(keep, 0.0) if keep > -1e-9 else keep)

    def model_config(self, stats: Stats | None = None) -> ModelConfig:
        """The ModelConfig this run trains: ``model``, or with None the ``preset``'s with the sizes of
        ``stats`` (the data's, ``model_config_for_data``) over it; then ``use_dino_patches`` and
        ``patch_pos_embed`` when set (checked by ``check_model_config``). An explicit ``model`` that
        contradicts ``stats`` is a ValueError naming both sizes (``check_fits_data``), one line."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        base = self.model if self.model is not None else PRESETS[self.preset]
        if self.model is None and stats is not None:
            base = model_config_for_data(base, stats)
        ov = {k: getattr(self, k) for k in ("use_dino_patches", "patch_pos_embed") if getattr(self, k) is not None}
        cfg = check_model_config(base, ov)
        if stats is not None:
            check_fits_data(cfg, stats, "TrainConfig.model" if self.model is not None else f"preset {self.preset}",
                            where=str(Path(self.data) / "stats.json") if self.data else "stats.json")
        return cfg


def parse_model_overrides(preset_name: str, text: str, stats: Stats | None = None, where: str = "stats.json",
                          **fields) -> ModelConfig | None:
    """``--model-overrides JSON``: a JSON object of ModelConfig fields over the preset -> the
    ModelConfig (checked by ``check_model_config``), or None for an empty string (the preset's, to
    which the trainer gives the data's sizes). ``stats`` (the data's, read from ``where``): the
    preset takes the data's sizes first (``model_config_for_data``), so the JSON need only name
    architecture; a size it pins that contradicts the data is a ValueError naming both
    (``check_fits_data``). ``fields`` (None = unset) join the JSON's, so that the CLI's
    ``--use-dino-patches`` and ``--patch-pos-embed`` are checked together with it (a pair valid only
    together stays valid). ValueError with one line for bad JSON, a non-object, or a field
    ``check_model_config`` refuses."""
    if not text:
        return None
    try:
        ov = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"model_overrides is not valid JSON: {e}") from None
    if not isinstance(ov, dict):
        raise ValueError("model_overrides must be a JSON object")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[preset_name] if stats is None else model_config_for_data(PRESETS[preset_name], stats)
    cfg = check_model_config(base, {**ov, **{k: v for k, v in fields.items() if v is not None}})
    if stats is not None:
        check_fits_data(cfg, stats, "--model-overrides", where)
    return cfg


def skip_allowance(max_skips: float, read: int) -> int:
    """Bad samples allowed after ``read`` samples (good + skipped): ``max_skips`` itself when it
    is a count (>= 1), else ``ceil(max_skips * read)``."""
    return int(max_skips) if max_skips >= 1 else math.ceil(max_skips * read)


# --------------------------------------------------------------------------- flow matching pieces

def sample_dropout(B: int, probs: Sequence[float] = (0.10, 0.30, 0.05, 0.55),
                   generator: torch.Generator | None = None, device=None):
    """One categorical draw per sample over ``DROPOUT_CASES``.

    probs: (both dropped, text only, DINO only, both kept), summing to 1.
    Returns ``(drop_text (B,) bool, drop_dino (B,) bool)``: text is dropped in cases both_dropped and
    dino_only, DINO in both_dropped and text_only.
    """
    probs = [float(p) for p in probs]
    if len(probs) != 4 or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"dropout probs must be 4 non-negative numbers summing to 1, got {probs}")
    if device is None and generator is not None:
        device = generator.device
    u = torch.rand(B, generator=generator, device=device)                                # (B,)
    edges = torch.tensor(np.cumsum(probs[:3]), dtype=u.dtype, device=u.device)          # (3,)
    case = torch.bucketize(u, edges, right=True)                                          # (B,) in 0..3
    drop_text = (case == 0) | (case == 2)
    drop_dino = (case == 0) | (case == 1)
    return drop_text, drop_dino


def sample_timesteps(B: int, mode: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t (B,) in (0, 1): ``sigmoid(N(mean, std))`` (logit-normal, SD3) or uniform."""
    if device is None and generator is not None:
        device = generator.device
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(B, generator=generator, device=device))
    if mode == "uniform":
        return torch.rand(B, generator=generator, device=device)
    raise ValueError(f"timestep sampling must be logit_normal|uniform, got {mode!r}")


def batch_to_device(batch: dict, device, use_patches: bool = True) -> dict:
    """Move a loader batch to ``device``; the text is trimmed on the host first (``prepare_text``), so
    the mask may become None (no padding left). Returns a dict with ``latent (B,C,H,W)``, ``dino_emb
    (B,Dd)``, ``dino_patches (B,P,Dd)`` or None, ``text_emb (B,L',Dt)``, ``text_mask (B,L')`` or None."""
    need = ["latent", "dino_emb", "text_emb", "text_mask"] + (["dino_patches"] if use_patches else [])
    missing = [k for k in need if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)})")
    text, mask = prepare_text(batch["text_emb"], batch["text_mask"])
    nb = torch.device(device).type == "cuda"
    out = {"latent": batch["latent"].to(device, torch.float32, non_blocking=nb),
           "dino_emb": batch["dino_emb"].to(device, torch.float32, non_blocking=nb),
           "text_emb": text.to(device, torch.float32, non_blocking=nb),
           "text_mask": None if mask is None else mask.to(device, non_blocking=nb),
           "dino_patches": None}
    if use_patches:
        out["dino_patches"] = batch["dino_patches"].to(device, torch.float32, non_blocking=nb)
    return out


def flow_matching_loss(model: nn.Module, batch: dict, *, generator: torch.Generator | None = None,
                       probs: Sequence[float] = (0.10, 0.30, 0.05, 0.55), timestep_sampling: str = "logit_normal",
                       logit_mean: float = 0.0, logit_std: float = 1.0, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, drop_text: torch.Tensor | None = None,
                       drop_dino: torch.Tensor | None = None, loss_bins: int = 10):
    """Flow-matching loss of ``model`` on a device batch (``batch_to_device``'s output).

    Draws (unless given) t (B,), noise like the latents, and the per-sample dropout, all from
    ``generator``; ``x_t = (1 - t) x0 + t noise``, target ``v = noise - x0``; the model's output is
    compared in fp32. Returns ``(loss scalar, aux)`` with aux tensors on the device (no sync):
    ``per_sample (B,)``, ``t (B,)``, ``drop_text``, ``drop_dino`` (B,) bool, ``v_pred_rms``,
    ``v_target_rms`` scalars, ``bin_sum``, ``bin_count`` (loss_bins,) (loss summed / counted per
    t-bin, bin i = [i / nb, (i + 1) / nb)).
    """
    x0 = batch["latent"]
    B, dev = x0.shape[0], x0.device
    if t is None:
        t = sample_timesteps(B, timestep_sampling, logit_mean, logit_std, generator, dev)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    if drop_text is None or drop_dino is None:
        dt, dd = sample_dropout(B, probs, generator, dev)
        drop_text = dt if drop_text is None else drop_text
        drop_dino = dd if drop_dino is None else drop_dino
    tb = t.view(B, 1, 1, 1).to(x0.dtype)
    x_t = (1 - tb) * x0 + tb * noise                                                     # (B, C, H, W)
    target = noise - x0                                                                  # (B, C, H, W)
    v = model(x_t, t, batch["dino_emb"], batch.get("dino_patches"), batch["text_emb"], batch.get("text_mask"),
              drop_text=drop_text, drop_dino=drop_dino).float()
    per_sample = (v - target).square().flatten(1).mean(1)                                # (B,)
    loss = per_sample.mean()
    with torch.no_grad():
        bins = (t.detach() * loss_bins).long().clamp_(0, loss_bins - 1)                  # (B,)
        bin_sum = torch.zeros(loss_bins, device=dev).scatter_add_(0, bins, per_sample.detach())
        bin_count = torch.bincount(bins, minlength=loss_bins).float()
        aux = {"per_sample": per_sample.detach(), "t": t, "drop_text": drop_text, "drop_dino": drop_dino,
               "v_pred_rms": v.detach().square().mean().sqrt(), "v_target_rms": target.square().mean().sqrt(),
               "bin_sum": bin_sum, "bin_count": bin_count}
    return loss, aux


# --------------------------------------------------------------------------- data stream

class BatchStream:
    """Endless per-rank batch stream over epochs of ``source(epoch)``; the position
    ``(epoch, index)`` (index = batches already taken from that epoch) is all a checkpoint needs:
    resume rebuilds ``source(epoch)`` and skips ``index`` batches.

    ``counts()``: samples read and skipped by reason so far (``done``: the finished epochs', saved
    in checkpoints; plus the current epoch's loader ``counts``, which a resume rebuilds by reading
    the skipped batches again). Sources without ``counts`` (stand-in batches) count nothing."""

    def __init__(self, source: Callable[[int], Iterable[dict]], epoch: int = 0, index: int = 0,
                 done: dict | None = None):
        self.source, self.epoch, self.index = source, epoch, index
        self.done = SkipCounter()
        self.done.add(done or {})
        self._it = None
        self._epoch_src = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def counts(self) -> SkipCounter:
        total = SkipCounter()
        total.add(self.done.to_dict())
        current = getattr(self._epoch_src, "counts", None)
        if current is not None:
            total.add(current.to_dict())
        return total

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._epoch_src = self.source(self.epoch)
                self._it = iter(self._epoch_src)
                for k in range(self.index):  # resume: skip what the checkpointed run had consumed
                    try:
                        next(self._it)
                    except StopIteration:
                        raise RuntimeError(f"cannot resume: epoch {self.epoch} has only {k} batches, "
                                           f"the checkpoint recorded {self.index} taken") from None
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    raise RuntimeError(f"epoch {self.epoch} of the training data yielded no batch "
                                       "(fewer samples than batch_size on this rank?)") from None
                self.done = self.counts()
                self.epoch, self.index, self._it, self._epoch_src = self.epoch + 1, 0, None, None
                continue
            self.index += 1
            return batch

    def __iter__(self):
        return self


def shard_source(cfg: TrainConfig, model_cfg: ModelConfig | None = None) -> Callable[[int], Iterable[dict]]:
    """Epoch -> loader over ``cfg.data``'s train shards (normalised with its stats.json when present).
    The shuffle seed depends on (seed, epoch), so an epoch can be rebuilt exactly on resume; the
    loader splits shards by rank itself under DDP. Samples are checked against stats.json and
    ``model_cfg``'s sizes (``nbcore.data.SampleRule``, the rule of ``nbcore.data check``); bad ones
    are skipped and counted, or raise with ``cfg.strict``."""
    if not cfg.data:
        raise ValueError("no training data: pass --data DIR (a folder of train-*.tar shards)")
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"data folder {cfg.data!r} does not exist")
    shards = shard_list(cfg.data, "train")
    if not shards:
        raise FileNotFoundError(f"no train shards in {cfg.data!r} (expected train-XXXXXX.tar)")
    stats = Path(cfg.data) / "stats.json"
    stats = str(stats) if stats.exists() else None
    spec = SampleSpec.from_model(model_cfg) if model_cfg is not None else None
    make_loader(shards, cfg.batch_size, stats=stats, expect=spec)   # stats.json readable, agrees with the model

    def source(epoch: int):
        return make_loader(shards, cfg.batch_size, stats=stats, shuffle=cfg.shuffle,
                           seed=cfg.seed * 100_003 + epoch, epochs=1, num_workers=cfg.num_workers,
                           drop_last=True, strict=cfg.strict, on_error="raise" if cfg.strict else "skip",
                           expect=spec)
    return source


# --------------------------------------------------------------------------- EMA

class EMA:
    """fp32 exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int) -> None:
        d = min(self.decay, (1 + n_updates) / (10 + n_updates))
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach().float() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, sd):
        self.module.load_state_dict(sd)


# --------------------------------------------------------------------------- RNG state as plain types

def _rng_state() -> dict:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
           "python": {"version": version, "state": list(pystate), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in s and torch.cuda.is_available():
        states = s["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# --------------------------------------------------------------------------- logs

def load_train_log(path, kind: str | None = "train") -> list[dict]:
    """Records of a run's ``log.jsonl`` (a file or the run folder). ``kind``: "train" (per logged step),
    "val", "event", or None for all. A torn last line (killed run) is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out


def _finite_or_none(x):
    """NaN / Inf -> None so log lines stay strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


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


# --------------------------------------------------------------------------- named metrics
# Metrics travel as dicts of named scalars (float) and vectors (list of floats, e.g. the loss by
# t-bin). Only the two functions below pack them into one tensor, for the one device->host copy
# of a step and for the one all_reduce of a log record, and unpack them back to their names.

def _unpack(flat: list[float], sizes: dict[str, int | None]) -> dict:
    """Values concatenated in ``sizes``' order -> {name: float (size None) or list of ``size`` floats}."""
    out, at = {}, 0
    for name, n in sizes.items():
        out[name] = flat[at] if n is None else flat[at:at + n]
        at += 1 if n is None else n
    return out


def metrics_to_host(metrics: dict[str, torch.Tensor]) -> dict:
    """Named device tensors (0-d: a scalar, 1-d: a vector) -> host floats and lists of floats, with
    one device->host copy of them all (packed into one float32 tensor)."""
    sizes = {k: None if t.ndim == 0 else t.numel() for k, t in metrics.items()}
    flat = torch.cat([t.detach().float().reshape(-1) for t in metrics.values()])    # (sum of sizes,)
    return _unpack(flat.tolist(), sizes)


def reduce_metrics(metrics: dict, world: int, device) -> dict:
    """Sum named host values (floats, lists of floats) over the ``world`` DDP ranks: one all_reduce
    of them packed into one tensor (float64 on CPU), unpacked back to their names. One process:
    ``metrics`` unchanged. Collective: every rank calls it with the same names and sizes."""
    if world == 1:
        return metrics
    sizes = {k: len(v) if isinstance(v, (list, tuple)) else None for k, v in metrics.items()}
    flat = [x for v in metrics.values() for x in (v if isinstance(v, (list, tuple)) else [v])]
    t = torch.tensor(flat, device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    dist.all_reduce(t)
    return _unpack(t.tolist(), sizes)


def _add(total: dict, part: dict) -> dict:
    """``total[k] += part[k]`` for each name of ``part`` (lists elementwise); returns ``total``."""
    for k, v in part.items():
        total[k] = [a + b for a, b in zip(total[k], v)] if isinstance(v, list) else total[k] + v
    return total


def _bin_means(bin_sum: list[float], bin_count: list[float]) -> list[float | None]:
    return [a / c if c else None for a, c in zip(bin_sum, bin_count)]


def _differences(a: dict, b: dict, keys: Sequence[str] | None = None) -> tuple[str, str]:
    """The fields (of ``keys``, default all of ``b``) where two config dicts differ, as two texts
    ("dino_dim 1024, text_dim 4096", "dino_dim 32, text_dim 16"; a field one lacks shows None);
    empty texts when none differ."""
    diff = [k for k in (keys or b) if a.get(k) != b.get(k)]
    return ", ".join(f"{k} {a.get(k)}" for k in diff), ", ".join(f"{k} {b.get(k)}" for k in diff)


# What every checkpoint ``Trainer.checkpoint`` writes holds; last.pt adds these two (milestones are lean).
_TRAIN_KEYS = ("config", "model", "ema", "step", "n_updates", "skipped", "streak", "rng", "data_state")
_RESUME_ONLY = ("optimizer", "scheduler")


def _training_checkpoint(path) -> dict:
    """A checkpoint this trainer wrote (last.pt or a lean milestone: every key of ``_TRAIN_KEYS``),
    or CheckpointError."""
    ck = load_checkpoint(path)
    missing = [k for k in _TRAIN_KEYS if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: not an nbcore training checkpoint (missing {missing})")
    return ck


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
        self._init_dist()
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
        resume = self._find_resume()       # (path, checkpoint dict, fallback note) or None
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

    def _init_dist(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        device = resolve_device(self.cfg.device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._own_pg = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self._own_pg = True

    def _find_resume(self) -> tuple[Path, dict, dict | None] | None:
        """The checkpoint to resume from, read: ``(path, checkpoint, fallback)`` or None (fresh run).

        ``resume="auto"``: OUT/ckpt/last.pt when it exists; when it cannot be read (a disk fault, a
        copy cut short), the newest readable milestone OUT/ckpt/step_XXXXXX.pt instead, said on
        stderr and returned as ``fallback`` {"unreadable", "reason", "path"} (logged by ``run``).
        An explicit PATH that cannot be read is a CheckpointError naming it (one line)."""
        r = self.cfg.resume
        if r in ("", "none"):
            return None
        if r != "auto":
            if not Path(r).exists():
                raise FileNotFoundError(f"resume checkpoint {r!r} does not exist")
            return Path(r), _training_checkpoint(r), None
        last = self.ckpt_dir / "last.pt"
        milestones = sorted(self.ckpt_dir.glob("step_*.pt"), reverse=True)   # zero-padded: newest first
        if not last.exists():
            return None
        try:
            return last, _training_checkpoint(last), None
        except CheckpointError as e:
            problem = str(e)
        for m in milestones:
            try:
                ck = _training_checkpoint(m)
            except CheckpointError:
                continue
            restarted = "optimizer" not in ck     # a lean milestone: weights, EMA and position only
            if self.is_main:
                print(f"resume: {problem}; falling back to the newest readable milestone {m} (step {ck['step']})"
                      + ("; optimiser state restarted" if restarted else ""), file=sys.stderr)
            return m, ck, {"unreadable": str(last), "reason": problem, "path": str(m),
                           "optimizer": "restarted" if restarted else "restored"}
        raise CheckpointError(f"cannot resume: {problem}; and no readable milestone step_*.pt beside it "
                              "(start fresh with --no-resume)")

    def _warm_start(self, path) -> dict:
        ck = load_checkpoint(path)
        key = self.cfg.warm_start_weights
        if key not in ck:
            raise KeyError(f"warm-start checkpoint {path} has no {key!r} weights (keys: {sorted(ck)})")
        report = load_warm_start(self.model, ck[key])
        if report["mismatched"]:
            sizes = [k for k in DATA_SIZES if k != "input_size"]   # no tensor depends on the latent side
            theirs, ours = _differences(ck["config"], self.model_cfg.to_dict(), sizes) if "config" in ck else ("", "")
            why = f"the checkpoint has {theirs}, this model {ours}" if theirs else "different preset or sizes?"
            raise ValueError(f"warm start from {path}: shape-mismatched tensors {report['mismatched']} ({why})")
        if not report["loaded"]:
            raise ValueError(f"warm start from {path}: no tensor matched this model")
        if self.is_main:
            print(f"warm start from {path} ({key} weights, lr x{self.cfg.warm_start_lr_scale}): "
                  f"loaded {len(report['loaded'])}, new {report['new']}, unexpected {report['unexpected']}, "
                  f"mismatched {report['mismatched']}", file=sys.stderr)
        return report

    def _resume(self, path, ck: dict) -> dict:
        """Load a checkpoint's state into this run; returns the data position to continue from. A
        lean milestone (no optimiser state) restarts AdamW's moments, the schedule at its n_updates."""
        if ck["config"] != self.model_cfg.to_dict():
            theirs, ours = _differences(ck["config"], self.model_cfg.to_dict())
            src = (f" (sizes from {Path(self.cfg.data) / 'stats.json'})"
                   if self.data_stats is not None and self.cfg.model is None else "")
            raise ValueError(f"cannot resume from {path}: the checkpoint has {theirs}, this run {ours}{src}")
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.step, self.n_updates = int(ck["step"]), int(ck["n_updates"])
        self.optimizer_restarted = "optimizer" not in ck
        if self.optimizer_restarted:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg),
                                                               last_epoch=self.n_updates - 1)  # lands at n_updates
        else:
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
        self.skipped, self.streak = int(ck["skipped"]), int(ck["streak"])
        _set_rng_state(ck["rng"])
        ds = ck["data_state"]
        if ds["world_size"] == self.world:
            self.gen.set_state(ck["rng"]["train"][self.rank])
            position = dict(ds["ranks"][self.rank])
            counts = ck.get("data_counts")   # older checkpoints have none
            if counts:
                position["done"] = counts[self.rank]
        else:
            print(f"warning: resuming with world size {self.world} (checkpoint {ds['world_size']}): "
                  "data order and noise are not the uninterrupted run's", file=sys.stderr)
            position = {"epoch": ds["ranks"][0]["epoch"], "index": 0}
        if self.is_main:
            print(f"resumed from {path} at step {self.step}" + (
                f"; optimiser state restarted (fresh AdamW moments, lr schedule at update {self.n_updates})"
                if self.optimizer_restarted else ""), file=sys.stderr)
            self._truncate_log(self.step)
            for tmp in self.ckpt_dir.glob("*.tmp"):  # a write torn by a kill
                tmp.unlink()
        return position

    def _truncate_log(self, step: int):
        """Drop log records after the resumed step (a killed run logged past its last checkpoint)."""
        if not self.log_path.exists():
            return
        keep = [json.dumps(r) for r in load_train_log(self.log_path, kind=None) if r.get("step", 0) <= step]
        tmp = self.log_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.log_path)

    # -- logging / checkpoints
    def _log(self, rec: dict):
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(_finite_or_none(rec)) + "\n")

    def checkpoint(self, milestone: bool = False) -> Path:
        """Write OUT/ckpt/last.pt (and the lean step_XXXXXX.pt, without optimiser and scheduler, when
        ``milestone``) atomically; collective in DDP. Keys: the module docstring's."""
        pos, gen, done = self.stream.position(), self.gen.get_state(), self.stream.done.to_dict()
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (pos, gen, done))
            positions, gens, dones = [g[0] for g in gathered], [g[1] for g in gathered], [g[2] for g in gathered]
        else:
            positions, gens, dones = [pos], [gen], [done]
        path = self.ckpt_dir / "last.pt"
        if self.is_main:
            rng = _rng_state()
            rng["train"] = gens
            st = self.data_stats
            obj = {"config": self.model_cfg.to_dict(), "train_config": asdict(self.cfg),
                   "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "step": self.step, "n_updates": self.n_updates, "skipped": self.skipped, "streak": self.streak,
                   "rng": rng, "data_state": {"world_size": self.world, "ranks": positions},
                   "data_counts": dones,   # per rank: samples / skips of the finished epochs
                   "stats": None if st is None else {**st.entries, "meta": st.meta},   # stats.json's layout
                   "codec": None if st is None else codec_spec_from_stats(st)}
            atomic_save(obj, path)
            if milestone:
                lean = {k: v for k, v in obj.items() if k not in _RESUME_ONLY}
                atomic_save(lean, self.ckpt_dir / f"step_{self.step:06d}.pt")
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
            _add(sums, {"loss": loss.detach(), "v_pred_rms": aux["v_pred_rms"], "v_target_rms": aux["v_target_rms"],
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
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine.to_dict())
        total = SkipCounter()
        for g in gathered:
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
        window = self._new_window(t0)
        try:
            while True:
                if self.step > start_step:
                    self._checkpoint_and_hooks()
                if self.step >= cfg.steps:
                    break
                s = self.train_step()
                self._count(s, window)
                bar.set_postfix(loss=f"{s['loss']:.4f}", refresh=False)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    window = self._new_window(self._log_train(s, window, t0))
            data = self._data_counts()
            self._check_skips(data)
            last_ckpt = self._checkpoint_once()
        finally:
            bar.close()
        summary = self._summary(start_step, time.perf_counter() - t0, data, last_ckpt)
        self._log({"kind": "event", "step": self.step, "event": "end", **summary})
        return summary

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
        if cfg.val_every and step % cfg.val_every == 0:
            self._hook("val", self.val_fn)
        if cfg.sample_every and step % cfg.sample_every == 0:
            self._hook("samples", self.sample_fn)

    def _new_window(self, since: float) -> dict:
        """Sums over the steps of one log record, started at time ``since``: the applied steps' loss,
        count and loss by t-bin; samples; skipped steps."""
        nb = self.cfg.loss_bins
        return {"since": since, "loss": 0.0, "applied": 0, "bin_sum": [0.0] * nb, "bin_count": [0.0] * nb,
                "samples": 0.0, "skipped": 0}

    def _count(self, s: dict, window: dict) -> None:
        """Add a step's metrics to the log window and, when applied, to the summary's recent steps."""
        if s["applied"]:
            applied = {"loss": s["loss"], "applied": 1, "bin_sum": s["bin_sum"], "bin_count": s["bin_count"]}
            _add(window, applied)
            self._recent.append(applied)
        else:
            window["skipped"] += 1
        window["samples"] += s["samples"]

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
               "loss_bins": _bin_means(red["bin_sum"], red["bin_count"]),
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
            _add(recent, r)
        red = reduce_metrics(recent, self.world, self.device)
        return {"steps": self.step, "steps_this_run": self.step - start_step, "time_s": elapsed,
                "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9),
                "final_loss": red["loss"] / red["applied"] if red["applied"] else None,
                "final_loss_window": len(self._recent),
                "loss_by_bin": _bin_means(red["bin_sum"], red["bin_count"]),
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
