"""Normalisation statistics of a dataset: ``stats.json``, its ``Stats`` and the running
``StatsAccumulator`` that computes them; ``DataError``, the one error of malformed data.

``stats.json`` holds, per member (``dinov3``, ``dinov3_patches``, ``t5`` real tokens, and ``latent``
for information), the per-channel ``mean``, ``std`` and row ``count``, plus ``meta`` (how the data
was made: image size, codec, rules, samples per shard). The model's argument names (``dino_emb``,
``dino_patches``, ``text_emb``) map to the member names through ``MEMBER_OF``.

Shape legend: B batch, C latent channels, H W latent side, P patches, Dd DINO dim, L text tokens,
Dt text dim.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .utils import write_json

__all__ = ["DataError", "Stats", "StatsAccumulator", "MEMBER_OF", "NORMALISED"]

NORMALISED = ("dinov3", "dinov3_patches", "t5")
# The one adapter between the two vocabularies: a batch carries the model's argument names
# (NanoDiT.forward: dino_emb, dino_patches, text_emb, text_mask); the on-disk members, decoded
# samples and stats.json keep the member names (dinov3.npy -> "dinov3"). ``collate`` maps them.
MEMBER_OF = {"dino_emb": "dinov3", "dino_patches": "dinov3_patches", "text_emb": "t5"}


class DataError(ValueError):
    """A malformed sample or shard: the message names shard, key and reason. ``lost``: samples this
    error stands for (a truncated shard can lose many)."""

    def __init__(self, message: str, shard: str | None = None, key: str | None = None,
                 reason: str | None = None, lost: int = 1):
        super().__init__(message)
        self.shard, self.key, self.reason, self.lost = shard, key, reason, lost


@dataclass
class Stats:
    """Per-channel mean/std of the conditioning (``dinov3``, ``dinov3_patches``, ``t5`` real tokens
    only) plus latent statistics for information (latents are not normalised: the codec / VAE
    scaling already did that). ``normalise(name, x)`` = (x - mean) / std over the last dim."""
    entries: dict = field(default_factory=dict)    # name -> {"mean": [...], "std": [...], "count": n}
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        """Every entry finite, with mean and std of one length and std > 0: a NaN or a zero std
        here would turn every normalised batch into NaN / Inf."""
        for name, e in self.entries.items():
            try:
                mean = np.asarray(e["mean"], dtype=np.float64)
                std = np.asarray(e["std"], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"statistics {name!r}: needs numeric 'mean' and 'std' lists ({err})") from None
            if mean.ndim != 1 or mean.shape != std.shape or not len(mean):
                raise DataError(f"statistics {name!r}: mean {mean.shape} and std {std.shape} must be equal-length lists")
            bad = int((~np.isfinite(mean)).sum() + (~np.isfinite(std)).sum())
            if bad:
                raise DataError(f"statistics {name!r}: {bad} non-finite values in mean / std")
            if (std <= 0).any():
                raise DataError(f"statistics {name!r}: std <= 0 in {int((std <= 0).sum())} of {len(std)} "
                                "channels (constant data? normalising would divide by zero)")

    @classmethod
    def load(cls, path) -> "Stats":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"stats file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        missing = [k for k in NORMALISED if k not in d] if isinstance(d, dict) else list(NORMALISED)
        if missing:
            raise DataError(f"{path}: missing statistics for {missing}")
        try:
            return cls({k: v for k, v in d.items() if k not in ("meta", "nonfinite")}, d.get("meta", {}))
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def save(self, path) -> Path:
        return write_json({**self.entries, "meta": self.meta}, path)

    def dim(self, name: str) -> int:
        return len(self.entries[name]["mean"])

    def tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_cache", {})
        if name not in cache:
            e = self.entries[name]
            cache[name] = (torch.tensor(e["mean"], dtype=torch.float32), torch.tensor(e["std"], dtype=torch.float32))
        return cache[name]

    def normalise(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.tensors(name)
        return (x - mean.to(x.device)) / std.to(x.device)

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32 numpy arrays (the loader normalises in numpy)."""
        mean, std = self.tensors(name)
        return mean.numpy(), std.numpy()

    def denormalise(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.tensors(name)
        return x * std.to(x.device) + mean.to(x.device)

    def normalise_condition(self, cond: dict) -> dict:
        """``cond`` (model names: dino_emb (B, Dd), dino_patches (B, P, Dd), text_emb (B, L, Dt),
        text_mask (B, L)) normalised as ``collate`` does, text padding rows zero; a new dict, other
        keys passed through."""
        out = dict(cond)
        for k, member in MEMBER_OF.items():
            if cond.get(k) is not None:
                out[k] = self.normalise(member, cond[k])
        if cond.get("text_mask") is not None and cond.get("text_emb") is not None:
            out["text_emb"] = out["text_emb"] * cond["text_mask"][..., None]            # (B, L, Dt)
        return out


class StatsAccumulator:
    """Running float64 sums per channel; ``result()`` -> Stats. Arrays: latent (C, H, W), dinov3
    (Dd,), dinov3_patches (P, Dd), t5 (L_valid, Dt) real tokens."""

    def __init__(self):
        self.s: dict = {}

    def _acc(self, name: str, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64).reshape(-1, rows.shape[-1])                    # (K, D)
        if name not in self.s:
            self.s[name] = [0, np.zeros(rows.shape[1]), np.zeros(rows.shape[1])]
        e = self.s[name]
        if e[1].shape[0] != rows.shape[1]:
            raise DataError(f"statistics: {name} has dim {rows.shape[1]}, earlier samples had {e[1].shape[0]}")
        e[0] += rows.shape[0]
        e[1] += rows.sum(0)
        e[2] += (rows * rows).sum(0)

    def add(self, latent: np.ndarray, dinov3: np.ndarray, dinov3_patches: np.ndarray, t5: np.ndarray) -> None:
        self._acc("latent", np.moveaxis(latent, 0, -1))                               # (H, W, C)
        self._acc("dinov3", dinov3[None])
        self._acc("dinov3_patches", dinov3_patches)
        if len(t5):
            self._acc("t5", t5)

    def result(self, eps: float = 1e-6) -> Stats:
        if "dinov3" not in self.s:
            raise DataError("statistics: no samples")
        out = {}
        for name, (n, s1, s2) in self.s.items():
            mean = s1 / n
            std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
            out[name] = {"mean": mean.tolist(), "std": np.maximum(std, eps).tolist(), "count": int(n)}
        return Stats(out)
