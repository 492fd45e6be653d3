"""The training data as an endless, resumable stream of batches: ``BatchStream`` over epochs of a
source, and ``shard_source``, the epochs of a data folder's train shards.

Resume determinism: the stream is a sequence of epochs; epoch ``e`` is a fresh loader with shuffle
seed derived from (seed, e) (``drop_last=True`` so every step sees a full batch). A checkpoint
records, per rank, the epoch and the number of batches already taken from it (``position``);
resume rebuilds that epoch and skips those batches (their cost: decoding up to one epoch once).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from .data import SampleSpec, SkipCounter, make_loader, shard_list
from .model import ModelConfig
from .train_config import TrainConfig

__all__ = ["BatchStream", "shard_source"]


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
