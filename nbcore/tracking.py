"""Live view of a training run in TensorBoard, beside ``log.jsonl`` (``TrainConfig.tensorboard``).

``RunTracker(out_dir, fixed_batch, codec)`` writes ``OUT/tensorboard/`` with PyTorch's
``SummaryWriter``:

- on one axis, total optimiser steps (a warm-started run continues from its source checkpoint's step,
  as the suite's figures do);
- every ``train`` record's numbers as scalars under ``train/`` (loss, window loss, lr, grad norm,
  samples/s, skipped steps, v rms; ``loss_bin/<k>`` the loss by t-bin);
- every ``val`` record's numbers under ``val/`` (the milestone metrics a validation hook returns);
- the suite's milestone scores (layout error, recall, placement, mask IoU; reconstruction and text
  only, guidance off) under ``milestones/``, written by ``nbcore.experiment.milestones`` when notebook
  05 scores the arm's checkpoints (``add_metrics``);
- at each milestone a sample grid of the same fixed scenes (the first ``n`` of the val split, else of
  the training data), from the EMA weights with one fixed noise draw: rows source | guided (nested,
  text 3 / DINO 2) | guidance off, as ``samples/fixed_scenes`` (one image per milestone step: the
  slider shows the scenes over training).

Open it with ``tensorboard --logdir outputs/runs/cpu/train`` (every arm of a suite run side by side)
or ``--logdir OUT/tensorboard`` for one run. ``tensorboard`` is imported only when a run asks for it;
where it is not installed (an offline GPU image) ``RunTracker.for_data`` says so once and returns
None: the run goes on with log.jsonl alone.

Shape legend: B scenes, S image side, C H W latent.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .codec import codec_from_stats
from .data import make_loader, shard_list
from .model import CONDITION_KEYS
from .sample import Guidance, sample

__all__ = ["RunTracker", "fixed_batch", "TB_DIR"]

TB_DIR = "tensorboard"
GUIDED = Guidance("nested", text_scale=3.0, dino_scale=2.0)   # the experiment's protocol
_TRAIN_SCALARS = ("loss", "loss_avg", "lr", "grad_norm", "grad_norm_patch_proj", "samples_per_s", "skipped",
                  "v_pred_rms", "v_target_rms")


def fixed_batch(data_dir, n: int = 4, stats=None) -> dict | None:
    """The first ``n`` samples of DATA/val-*.tar (else train-*.tar), unshuffled: the scenes every
    milestone's grid shows. None when the folder has no shards."""
    for split in ("val", "train"):
        try:
            shards = shard_list(data_dir, split)
        except FileNotFoundError:
            continue
        for batch in make_loader(shards, n, stats=stats, shuffle=0, epochs=1):
            if "latent" in batch:
                return batch
    return None


class RunTracker:
    """TensorBoard writer of one run (rank 0 only). ``record(rec)`` takes every log.jsonl record;
    ``milestone(step, model)`` adds the fixed-scene grid; ``close()`` flushes."""

    def __init__(self, out_dir, batch: dict | None = None, codec=None, steps: int = 10, step_offset: int = 0):
        from torch.utils.tensorboard import SummaryWriter     # optional heavy package: only when asked

        self.dir = Path(out_dir) / TB_DIR
        self.writer = SummaryWriter(str(self.dir))
        self.batch, self.codec, self.steps = batch, codec, steps
        self.offset = step_offset          # TensorBoard's axis: total optimiser steps (a warm start's source's + this run's)

    @classmethod
    def for_data(cls, out_dir, data_dir, stats, steps: int = 10, n: int = 4, step_offset: int = 0) -> RunTracker | None:
        """A tracker whose grid shows the first ``n`` scenes of ``data_dir`` (decoded with the data's
        codec); None, with one line on stderr, when tensorboard is not installed."""
        try:
            import tensorboard  # noqa: F401  (SummaryWriter needs it)
        except ImportError as e:
            print(f"tensorboard off: {e} (pip install tensorboard); training goes on with log.jsonl", file=sys.stderr)
            return None
        batch = fixed_batch(data_dir, n, stats=stats) if data_dir else None
        codec = codec_from_stats(stats) if (batch is not None and stats is not None) else None
        return cls(out_dir, batch, codec, steps, step_offset)

    def record(self, rec: dict) -> None:
        if rec.get("step") is None:
            return
        step = rec["step"] + self.offset
        if rec.get("kind") == "train":
            for k in _TRAIN_SCALARS:
                if isinstance(rec.get(k), (int, float)):
                    self.writer.add_scalar(f"train/{k}", rec[k], step)
            for i, v in enumerate(rec.get("loss_bins") or []):
                if v is not None:
                    self.writer.add_scalar(f"loss_bin/{i:02d}", v, step)
        elif rec.get("kind") == "val":
            for k, v in rec.items():
                if k not in ("step", "seconds") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"val/{k}", v, step)

    def add_metrics(self, step: int, metrics: dict, prefix: str = "metrics") -> None:
        """Named numbers (e.g. a milestone's layout error) as scalars ``prefix/name``."""
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step + self.offset)

    @torch.no_grad()
    def milestone(self, step: int, model) -> None:
        """The fixed scenes' grid at ``step``: source | guided | guidance off (columns), one row per scene."""
        if self.batch is None or self.codec is None:
            return
        dev = next(model.parameters()).device
        cond = {k: self.batch[k] for k in CONDITION_KEYS if k in self.batch}
        if not model.cfg.use_dino_patches:
            cond.pop("dino_patches", None)
        noise = torch.randn(self.batch["latent"].shape, generator=torch.Generator().manual_seed(0))   # (B, C, H, W)
        was_training = model.training
        model.eval()
        try:
            rows = [self.codec.decode(self.batch["latent"])]                                 # (B, 3, S, S)
            for g in (GUIDED, Guidance.off()):
                z = sample(model, **{k: v.to(dev) for k, v in cond.items() if v is not None}, noise=noise,
                           steps=self.steps, guidance=g)
                rows.append(self.codec.decode(z.cpu()))
        finally:
            model.train(was_training)
        grid = torch.cat([torch.cat(list(r.clamp(0, 1)), dim=2) for r in rows], dim=1)    # (3, 3*S, B*S)
        self.writer.add_image("samples/fixed_scenes (rows: source | guided t3 d2 | off)", grid, step + self.offset)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
