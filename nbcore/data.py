"""WebDataset pipeline over the DESIGN.md data contract.

One sample per key; members ``latent.npy`` (C, H, W), ``dinov3.npy`` (Dd,), ``dinov3_patches.npy``
(P, Dd), ``t5.npy`` (L_valid, Dt) real tokens only, ``txt``, optional ``png`` and ``json``. The
legacy padded layout (``t5.npy`` of 512 rows + ``t5_mask.npy``) is read too.

Pipeline (per DataLoader worker): shard list (brace patterns, globs, folders) -> per-epoch shard
order (seeded, identical on every rank and worker) -> split by rank and worker -> stream each tar
(members grouped by key) -> shuffle buffer of raw samples -> decode + validate -> normalise with
``stats.json`` -> aspect-ratio buckets (one latent shape per batch) -> collate (text padding and
mask rebuilt here) -> batch dict.

Splitting: every (rank, worker) pair is one of ``world_size * num_workers`` slots. With at least
as many shards as slots each slot reads whole shards (shard i -> slot i % slots); with fewer, every
slot reads all shards and keeps the samples whose running index is its slot modulo the number of
slots. Either way each sample is seen exactly once per epoch across all workers and ranks.
(Shard-level splitting can give ranks unequal sample counts; DDP code should iterate with
``epochs=None`` and count steps, or use shards that divide evenly.)

Bad input: a sample without ``dinov3_patches.npy`` is skipped and counted (``strict=True`` raises).
Any other malformed sample (corrupt npy, wrong shape, NaN/Inf, missing member, truncated tar)
raises ``DataError`` naming shard and key, or, with ``on_error="skip"``, is skipped and counted.
Counts from every worker arrive with the batches and accumulate in ``loader.counts``.

Shape legend: B batch, C latent channels, H W latent side, P patches, Dd DINO dim, L text tokens,
Dt text dim, S image side.
"""
from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import math
import os
import random
import re
import sys
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "SkipCounter", "Stats", "StatsAccumulator", "compute_stats", "shard_list",
           "expand_shards", "iter_raw_samples", "decode_sample", "collate", "ShardDataset",
           "Loader", "make_loader", "check_shards", "REQUIRED", "MEMBER_OF"]

REQUIRED = ("latent.npy", "dinov3.npy", "t5.npy", "txt")
NORMALISED = ("dinov3", "dinov3_patches", "t5")
# The one adapter between the two vocabularies: a batch carries the model's argument names
# (NanoDiT.forward: dino_emb, dino_patches, text_emb, text_mask); the on-disk members, decoded
# samples and stats.json keep the member names (dinov3.npy -> "dinov3"). ``collate`` maps them.
MEMBER_OF = {"dino_emb": "dinov3", "dino_patches": "dinov3_patches", "text_emb": "t5"}


# --------------------------------------------------------------------------- errors and counts

class DataError(ValueError):
    """A malformed sample or shard: the message names shard, key and reason."""

    def __init__(self, message: str, shard: str | None = None, key: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.shard, self.key, self.reason = shard, key, reason


class _Bad(Exception):
    """Internal: one sample is bad for ``reason``; turned into DataError or a counted skip."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class SkipCounter:
    """What the loader yielded and skipped: ``samples`` (good samples yielded), ``skipped``
    (reason -> count), ``text_truncated`` (captions cut to a fixed ``text_len``)."""
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    text_truncated: int = 0

    def add(self, other: dict) -> None:
        self.samples += other.get("samples", 0)
        self.text_truncated += other.get("text_truncated", 0)
        self.skipped.update(other.get("skipped", {}))

    def to_dict(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped), "text_truncated": self.text_truncated}

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


# --------------------------------------------------------------------------- statistics

@dataclass
class Stats:
    """Per-channel mean/std of the conditioning (``dinov3``, ``dinov3_patches``, ``t5`` real tokens
    only) plus latent statistics for information (latents are not normalised: the codec / VAE
    scaling already did that). ``normalise(name, x)`` = (x - mean) / std over the last dim."""
    entries: dict = field(default_factory=dict)    # name -> {"mean": [...], "std": [...], "count": n}
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> "Stats":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"stats file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        missing = [k for k in NORMALISED if k not in d]
        if missing:
            raise DataError(f"{path}: missing statistics for {missing}")
        return cls({k: v for k, v in d.items() if k != "meta"}, d.get("meta", {}))

    def save(self, path) -> Path:
        from .utils import write_json
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


def compute_stats(shards, on_error: str = "skip", progress: bool = False) -> Stats:
    """Statistics over every good sample of ``shards`` (a pattern, folder or list), unnormalised."""
    acc = StatsAccumulator()
    counts = SkipCounter()
    for raw in iter_raw_samples(expand_shards(shards), counts, on_error=on_error, progress=progress):
        try:
            s = decode_sample(raw)
        except _Bad as b:
            _handle(b, raw, counts, on_error)
            continue
        acc.add(s["latent"], s["dinov3"], s["dinov3_patches"], s["t5"])
        counts.samples += 1
    st = acc.result()
    st.meta = {"source": "nbcore.data.compute_stats", "samples": counts.samples, "skipped": dict(counts.skipped)}
    return st


def _as_stats(stats) -> Stats | None:
    if stats is None or isinstance(stats, Stats):
        return stats
    return Stats.load(stats)


# --------------------------------------------------------------------------- shard lists

def expand_shards(shards) -> list[str]:
    """A folder (all ``*.tar``), a brace pattern (``DIR/train-{000000..000003}.tar``), a glob, or a
    list of those -> list of existing shard paths (order kept; folders and globs sorted)."""
    from braceexpand import braceexpand
    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no .tar shards in folder {item}")
            out += found
            continue
        for p in braceexpand(item):
            if glob.has_magic(p):
                found = sorted(glob.glob(p))
                if not found:
                    raise FileNotFoundError(f"no shards match {p}")
                out += found
            elif not os.path.exists(p):
                raise FileNotFoundError(f"shard not found: {p}")
            else:
                out.append(p)
    if not out:
        raise FileNotFoundError(f"no shards in {shards!r}")
    return out


def shard_list(folder, split: str = "train") -> list[str]:
    """Sorted ``{split}-*.tar`` shard paths in ``folder``; FileNotFoundError ("no {split}-*.tar
    shards in FOLDER") when there are none."""
    found = sorted(glob.glob(os.path.join(str(folder), f"{split}-*.tar")))
    if not found:
        raise FileNotFoundError(f"no {split}-*.tar shards in {folder}")
    return found


# --------------------------------------------------------------------------- reading

def _split_name(name: str) -> tuple[str | None, str | None]:
    """WebDataset convention: key = path up to the first dot of the basename, member = the rest."""
    d, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _stream_shard(shard: str):
    """Yield raw samples {"__key__", "__shard__", member: bytes} of one tar, in order.

    A truncated or unreadable tar yields every complete sample read so far, then one sample
    marked ``__truncated__`` carrying the error: the sample whose member was being read, or, when
    the tar breaks between members, a placeholder after the last complete sample.
    """
    cur: dict | None = None
    reading = None        # key of the member whose data is being read
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, member = _split_name(info.name)
                if key is None:
                    continue
                reading = key
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"{member}: {len(data)} of {info.size} bytes")
                reading = None
                if cur is not None and cur["__key__"] != key:
                    yield cur
                    cur = None
                if cur is None:
                    cur = {"__key__": key, "__shard__": shard}
                if member in cur:
                    raise tarfile.ReadError(f"duplicate member {member} for key {key}")
                cur[member] = data
                tar.members = []    # streaming: do not keep every TarInfo
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        err = f"{type(e).__name__}: {e}"
        if cur is not None and reading is not None and reading != cur["__key__"]:
            yield cur                              # complete: the next sample's member broke
            cur = None
        elif cur is not None and reading is None and all(m in cur for m in REQUIRED + ("dinov3_patches.npy",)):
            yield cur                              # broke between members after a complete-looking sample
            cur = None
        if cur is None:
            cur = {"__key__": reading or "<after the last complete sample>", "__shard__": shard}
        cur["__truncated__"] = err
        yield cur
        return
    if cur is not None:
        yield cur


def _handle(b: _Bad, raw: dict, counts: SkipCounter, on_error: str, strict: bool = False) -> None:
    """Raise DataError or count the skip. Missing patches: skip unless strict; others: on_error."""
    shard, key = raw.get("__shard__"), raw.get("__key__")
    if strict or (b.reason != "missing_patches" and on_error == "raise"):
        raise DataError(f"{shard}: sample {key!r}: {b.reason}: {b.detail}", shard=shard, key=key, reason=b.reason)
    counts.skipped[b.reason] += 1


def iter_raw_samples(shards: list[str], counts: SkipCounter, on_error: str = "raise",
                     strict: bool = False, progress: bool = False):
    """Raw samples of every shard in order; truncated tars handled via ``_handle``."""
    it = shards
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(shards, desc="shards", unit="shard")
    for shard in it:
        for raw in _stream_shard(shard):
            if "__truncated__" in raw:
                _handle(_Bad("truncated_tar", raw["__truncated__"]), raw, counts, on_error, strict)
                continue
            yield raw


_NPY_HEADER = re.compile(r"""\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': False, 'shape': \(([\d, ]*)\), *\}""")


def _npy_bytes(buf: bytes) -> np.ndarray:
    """Parse .npy bytes. The common header (what np.save writes for C-order arrays) is read with a
    regex instead of ``ast.literal_eval`` (np.load's header parser dominates small samples);
    anything else goes through np.load. A size mismatch raises ValueError, like np.load."""
    if buf[:6] == b"\x93NUMPY" and len(buf) > 10:
        major = buf[6]
        hl_size = 2 if major == 1 else 4
        hlen = int.from_bytes(buf[8:8 + hl_size], "little")
        start = 8 + hl_size
        m = _NPY_HEADER.match(buf[start:start + hlen].decode("latin1"))
        if m and major in (1, 2, 3):
            dtype = np.dtype(m.group(1))
            shape = tuple(int(v) for v in m.group(2).replace(" ", "").split(",") if v)
            count = math.prod(shape)
            offset = start + hlen
            if len(buf) - offset != count * dtype.itemsize:
                raise ValueError(f"npy data has {len(buf) - offset} bytes, shape {shape} {dtype} needs {count * dtype.itemsize}")
            return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
    return np.load(io.BytesIO(buf), allow_pickle=False)


def _load_npy(raw: dict, member: str) -> np.ndarray:
    try:
        arr = _npy_bytes(raw[member])
    except Exception as e:  # numpy raises ValueError / EOFError / OSError for broken bytes
        raise _Bad("corrupt_npy", f"{member}: {type(e).__name__}: {e}") from None
    if arr.dtype.kind not in "fiub":
        raise _Bad("wrong_dtype", f"{member}: dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise _Bad("nonfinite", f"{member}: {int((~np.isfinite(arr)).sum())} NaN/Inf values")
    return arr


def decode_sample(raw: dict, expect: dict | None = None) -> dict:
    """Raw members -> numpy arrays + text, validated. Raises ``_Bad(reason, detail)``.

    Returns {"key", "latent" (C, H, W), "dinov3" (Dd,), "dinov3_patches" (P, Dd), "t5" (L, Dt)
    real tokens only, "txt", optional "png" (3, S, S) float32 in [0, 1], "json" dict}. ``expect``
    maps "C", "Dd", "P", "Dt" to required sizes (missing = any).
    """
    if "dinov3_patches.npy" not in raw:
        raise _Bad("missing_patches", "no dinov3_patches.npy")
    missing = [m for m in REQUIRED if m not in raw]
    if missing:
        raise _Bad("missing_member", f"missing {missing}")
    latent = _load_npy(raw, "latent.npy")
    cls = _load_npy(raw, "dinov3.npy")
    patches = _load_npy(raw, "dinov3_patches.npy")
    t5 = _load_npy(raw, "t5.npy")
    if latent.ndim != 3:
        raise _Bad("wrong_shape", f"latent.npy has shape {latent.shape}, want (C, H, W)")
    if cls.ndim != 1:
        raise _Bad("wrong_shape", f"dinov3.npy has shape {cls.shape}, want (Dd,)")
    if patches.ndim != 2 or patches.shape[1] != cls.shape[0]:
        raise _Bad("wrong_shape", f"dinov3_patches.npy has shape {patches.shape}, want (P, {cls.shape[0]})")
    if math.isqrt(patches.shape[0]) ** 2 != patches.shape[0]:
        raise _Bad("wrong_shape", f"dinov3_patches.npy has {patches.shape[0]} rows, not a square grid")
    if t5.ndim != 2:
        raise _Bad("wrong_shape", f"t5.npy has shape {t5.shape}, want (L, Dt)")
    if "t5_mask.npy" in raw:   # legacy padded layout: keep the real rows only
        mask = _load_npy(raw, "t5_mask.npy")
        if mask.shape != (t5.shape[0],):
            raise _Bad("wrong_shape", f"t5_mask.npy has shape {mask.shape}, t5.npy has {t5.shape[0]} rows")
        t5 = t5[mask.astype(bool)]
    if t5.shape[0] == 0:  # no key at all for the text part of the cross-attention
        raise _Bad("empty_text", "t5.npy has no real token")
    if expect:
        got = {"C": latent.shape[0], "Dd": cls.shape[0], "P": patches.shape[0], "Dt": t5.shape[1]}
        bad = {k: (got[k], v) for k, v in expect.items() if v is not None and got[k] != v}
        if bad:
            raise _Bad("wrong_shape", ", ".join(f"{k}={g} (want {w})" for k, (g, w) in bad.items()))
    try:
        txt = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("bad_text", f"txt is not utf-8 ({e})") from None
    out = {"key": raw["__key__"], "latent": latent, "dinov3": cls, "dinov3_patches": patches, "t5": t5, "txt": txt}
    if "png" in raw:
        try:
            from PIL import Image
            img = np.array(Image.open(io.BytesIO(raw["png"])).convert("RGB"))        # (S, S, 3) uint8
        except Exception as e:
            raise _Bad("corrupt_png", f"png: {type(e).__name__}: {e}") from None
        out["png"] = img
    if "json" in raw:
        try:
            out["json"] = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Bad("corrupt_json", f"json: {e}") from None
    return out


def collate(samples: list[dict], stats: Stats | None = None, text_len: int | None = None,
            counts: SkipCounter | None = None, multiple: int = 8) -> dict:
    """Decoded samples (one latent shape, member names) -> the batch dict (the model's names).

    latent (B, C, H, W) float32; dino_emb (B, Dd); dino_patches (B, P, Dd); text_emb (B, L, Dt) with
    zero rows after each caption's real tokens and text_mask (B, L) bool, L = ``text_len`` or the
    longest caption rounded up to ``multiple``; txt, key lists; png (B, 3, S, S) in [0, 1] and json
    list when present. Conditioning is normalised with ``stats`` (real text tokens only).
    """
    B = len(samples)
    # Stack in the stored dtype (float16), convert once per batch and normalise in place, all in
    # numpy: single-threaded, so no OpenMP thread pool spinning on a busy CPU (at production
    # shapes the conversion and normalisation are the loader's main cost).
    def stack32(name, arrs):
        x = np.stack(arrs).astype(np.float32)
        if stats is not None:
            mean, std = stats.arrays(name)
            x -= mean
            x *= 1.0 / std
        return x
    latent = torch.from_numpy(np.stack([s["latent"] for s in samples]).astype(np.float32))  # (B, C, H, W)
    cls = torch.from_numpy(stack32("dinov3", [s["dinov3"] for s in samples]))          # (B, Dd)
    patches = torch.from_numpy(stack32("dinov3_patches", [s["dinov3_patches"] for s in samples]))  # (B, P, Dd)
    lens = [s["t5"].shape[0] for s in samples]
    Dt = samples[0]["t5"].shape[1]
    if text_len is None:
        L = max(multiple, -(-max(lens) // multiple) * multiple)
    else:
        L = text_len
    t5 = np.zeros((B, L, Dt), dtype=np.float32)
    mask = np.zeros((B, L), dtype=bool)
    for b, s in enumerate(samples):
        n = min(lens[b], L)
        if n < lens[b] and counts is not None:
            counts.text_truncated += 1
        t5[b, :n] = s["t5"][:n]
        mask[b, :n] = True
    if stats is not None:
        mean, std = stats.arrays("t5")
        t5 -= mean
        t5 *= 1.0 / std
        t5[~mask] = 0                                                                  # padding stays zero
    t5, mask = torch.from_numpy(t5), torch.from_numpy(mask)                            # (B, L, Dt), (B, L)
    # member names -> the model's names (MEMBER_OF), the one place a batch gets its keys
    batch = {"latent": latent, "dino_emb": cls, "dino_patches": patches, "text_emb": t5, "text_mask": mask,
             "txt": [s["txt"] for s in samples], "key": [s["key"] for s in samples]}
    if all("png" in s for s in samples):
        png = np.stack([s["png"] for s in samples]).transpose(0, 3, 1, 2)               # (B, 3, S, S) uint8
        batch["png"] = torch.from_numpy(np.ascontiguousarray(png, dtype=np.float32) / np.float32(255))
    if all("json" in s for s in samples):
        batch["json"] = [s["json"] for s in samples]
    return batch


# --------------------------------------------------------------------------- dataset

def _rank_world(rank, world_size) -> tuple[int, int]:
    """Explicit arguments > an initialised torch.distributed group > RANK / WORLD_SIZE env > (0, 1)."""
    if rank is not None or world_size is not None:
        r, w = int(rank or 0), int(world_size or 1)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= r < w:
        raise ValueError(f"rank {r} not in [0, world_size={w})")
    return r, w


class ShardDataset(torch.utils.data.IterableDataset):
    """Yields collated batches (and, at epoch ends, count-only dicts) for one rank; DataLoader
    workers split the rank's share further. Use through ``make_loader``."""

    def __init__(self, shards: list[str], batch_size: int, stats: Stats | None, shuffle: int, seed: int,
                 epochs: int | None, text_len: int | None, strict: bool, on_error: str, drop_last: bool,
                 rank: int, world_size: int, split: str = "auto", expect: dict | None = None):
        self.shards, self.batch_size, self.stats = shards, batch_size, stats
        self.shuffle, self.seed, self.epochs, self.text_len = shuffle, seed, epochs, text_len
        self.strict, self.on_error, self.drop_last = strict, on_error, drop_last
        self.rank, self.world_size, self.split, self.expect = rank, world_size, split, dict(expect or {})

    def _slot(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _raw_for_slot(self, epoch: int, slot: int, nslots: int):
        order = list(self.shards)
        if self.shuffle:   # same order on every slot: a function of (seed, epoch) only
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        by_shard = self.split == "shard" or (self.split == "auto" and len(order) >= nslots)
        if by_shard:
            mine = order[slot::nslots]
            for shard in mine:
                for raw in _stream_shard(shard):
                    yield raw
        else:   # fewer shards than slots: split by running sample index over the global order
            for i, raw in enumerate(r for shard in order for r in _stream_shard(shard)):
                if i % nslots == slot:
                    yield raw

    def _decoded(self, epoch: int, slot: int, nslots: int, counts: SkipCounter):
        raws = self._raw_for_slot(epoch, slot, nslots)
        if self.shuffle > 1:
            raws = _shuffled(raws, self.shuffle, random.Random(self.seed * 1_000_003 + epoch * 1009 + slot))
        for raw in raws:
            try:
                if "__truncated__" in raw:
                    raise _Bad("truncated_tar", raw["__truncated__"])
                s = decode_sample(raw, self.expect)
            except _Bad as b:
                _handle(b, raw, counts, self.on_error, self.strict)
                continue
            if len(self.expect) < 4:   # the first good sample fixes the sizes the rest must match
                for k, v in (("C", s["latent"].shape[0]), ("Dd", s["dinov3"].shape[0]),
                             ("P", s["dinov3_patches"].shape[0]), ("Dt", s["t5"].shape[1])):
                    self.expect.setdefault(k, v)
            yield s

    def __iter__(self):
        slot, nslots = self._slot()
        counts = SkipCounter()

        def emit(samples):
            batch = collate(samples, self.stats, self.text_len, counts)
            counts.samples += len(samples)
            batch["__counts__"] = counts.to_dict()
            counts.samples, counts.text_truncated = 0, 0
            counts.skipped.clear()
            return batch

        epochs = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            buckets: dict = defaultdict(list)
            for s in self._decoded(epoch, slot, nslots, counts):
                shape_key = (s["latent"].shape, s["png"].shape if "png" in s else None)
                bucket = buckets[shape_key]
                bucket.append(s)
                if len(bucket) == self.batch_size:
                    yield emit(bucket)
                    buckets[shape_key] = []
            for bucket in buckets.values():
                if bucket and not self.drop_last:
                    yield emit(bucket)
            yield {"__counts__": counts.to_dict()}   # skips after the last batch of this epoch
            counts.samples, counts.text_truncated = 0, 0
            counts.skipped.clear()


def _shuffled(it, size: int, rng: random.Random):
    """A shuffle buffer of ``size`` items: fill, then emit a random item per new one."""
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _identity(x):
    """Batches are collated by the dataset; the DataLoader only passes them on (no default_convert)."""
    return x


class Loader:
    """Iterable of batch dicts (see ``collate``) with ``counts`` (SkipCounter) accumulating over
    every worker: good samples yielded, skips by reason, truncated captions."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 0):
        self.dataset, self.num_workers = dataset, num_workers
        self.counts = SkipCounter()

    def __iter__(self):
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                         persistent_workers=False, collate_fn=_identity)
        try:
            for item in dl:
                self.counts.add(item.pop("__counts__"))
                if "latent" in item:
                    yield item
        except DataError as e:
            if "Original Traceback" not in str(e):
                raise
            # from a worker process: keep the one-line reason and its shard / key / reason fields
            line = str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]
            m = re.match(r"^(.*): sample '(.*)': (\w+): ", line)
            raise DataError(line, *(m.groups() if m else ())) from None


def make_loader(shards, batch_size: int, *, stats=None, shuffle: int = 1000, seed: int = 0,
                epochs: int | None = 1, num_workers: int = 0, text_len: int | None = None,
                strict: bool = False, drop_last: bool = False, on_error: str = "raise",
                rank: int | None = None, world_size: int | None = None, split: str = "auto",
                expect: dict | None = None) -> Loader:
    """A loader over WebDataset shards (see the module docstring).

    shards: folder, brace pattern, glob or list; stats: None | path to stats.json | Stats;
    shuffle: buffer size in samples, per worker (0 = off, also keeps shard order; the buffer holds
    raw samples, about 1 MB each at production shapes, so 1000 is about 1 GB per worker); epochs: None = forever; text_len:
    None = pad to the batch's longest caption rounded up to 8, else a fixed length (longer
    captions are cut and counted in ``counts.text_truncated``); strict: raise on every bad sample
    (missing patches included); on_error: "raise" | "skip" for malformed samples; rank /
    world_size: override torch.distributed / env; split: "auto" | "shard" | "sample"; expect:
    required sizes {"C", "Dd", "P", "Dt"} (default: the stats' dims, then the first good sample).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if split not in ("auto", "shard", "sample"):
        raise ValueError(f"split must be auto|shard|sample, got {split!r}")
    st = _as_stats(stats)
    exp = dict(expect or {})
    if st is not None:
        exp.setdefault("Dd", st.dim("dinov3"))
        exp.setdefault("Dt", st.dim("t5"))
    r, w = _rank_world(rank, world_size)
    ds = ShardDataset(expand_shards(shards), batch_size, st, shuffle, seed, epochs, text_len, strict,
                      on_error, drop_last, r, w, split, exp)
    return Loader(ds, num_workers)


# --------------------------------------------------------------------------- check

def check_shards(shards, strict: bool = False, progress: bool = True) -> dict:
    """Scan shards: per shard samples, with_patches, good, skipped (reason -> count). Returns
    {"samples", "with_patches", "good", "skipped", "shards", "per_shard"}. ``strict`` raises
    DataError at the first bad sample (missing patches included)."""
    paths = expand_shards(shards)
    per_shard = {}
    total = SkipCounter()
    n_all = n_patch = 0
    it = paths
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(paths, desc="check", unit="shard", file=sys.stderr)
    for shard in it:
        c = SkipCounter()
        n = n_p = 0
        for raw in _stream_shard(shard):
            n += 1
            n_p += "dinov3_patches.npy" in raw
            try:
                if "__truncated__" in raw:
                    raise _Bad("truncated_tar", raw["__truncated__"])
                decode_sample(raw)
                c.samples += 1
            except _Bad as b:
                _handle(b, raw, c, "skip", strict)
        per_shard[shard] = {"samples": n, "with_patches": n_p, "good": c.samples, "skipped": dict(c.skipped)}
        total.add(c.to_dict())
        n_all += n
        n_patch += n_p
    return {"samples": n_all, "with_patches": n_patch, "good": total.samples,
            "skipped": dict(total.skipped), "shards": len(paths), "per_shard": per_shard}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbcore.data", description="WebDataset shard tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("check", help="count samples, patches and bad samples per shard (last line: JSON)")
    ck.add_argument("shards", help="folder, brace pattern or glob, quoted: 'DIR/train-{000000..000009}.tar'")
    ck.add_argument("--strict", action="store_true", help="exit non-zero at the first bad sample")
    st = sub.add_parser("stats", help="compute normalisation statistics -> stats.json")
    st.add_argument("shards", help="folder, brace pattern or glob of the shards to average over (quoted)")
    st.add_argument("--out", required=True, help="where to write stats.json")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            res = check_shards(args.shards, strict=args.strict)
            for shard, c in res["per_shard"].items():
                print(f"{shard}: {c['samples']} samples, {c['with_patches']} with patches, "
                      f"{c['good']} good, skipped {c['skipped'] or 0}")
            summary = {k: v for k, v in res.items() if k != "per_shard"}
            print(json.dumps(summary))
        else:
            stats = compute_stats(args.shards, progress=True)
            stats.save(args.out)
            print(f"wrote {args.out} ({stats.meta['samples']} samples, skipped {stats.meta['skipped']})")
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
