"""Reading WebDataset shards of the docs/DESIGN.md data contract, on webdataset's pipeline.

One sample per key; members ``latent.npy`` (C, H, W), ``dinov3.npy`` (Dd,), ``dinov3_patches.npy``
(P, Dd), ``t5.npy`` (L_valid, Dt) real tokens only, ``txt``, optional ``png`` and ``json``. The
legacy padded layout (``t5.npy`` of 512 rows + ``t5_mask.npy``) is read too.

Pipeline of one epoch, per DataLoader worker (``wds.DataPipeline``), webdataset's stages in plain
type, this project's in brackets:

    wds.SimpleShardList(shards, seed)       shard order: a function of (seed, epoch), the same on every rank and worker
    wds.split_by_node, wds.split_by_worker  whole shards per (rank, worker) slot ...
    wds url_opener                          local paths, ``pipe:`` commands and remote URLs (gopen)
    [read_tar]                              members grouped by key; truncation detected (see below)
    [every_nth]                             ... or, with fewer shards than slots, every n-th sample per slot
    wds.shuffle                             a buffer of raw samples
    wds.map(SampleRule, handler)            decode (fast .npy) + the one validation rule; the handler
                                            [SkipOrRaise] counts a skip by reason or raises DataError
    [buckets + collate]                     one latent shape per batch; text padding and mask rebuilt

Even split: every (rank, worker) pair is one of ``world_size * num_workers`` slots. With at least
as many shards as slots each slot reads whole shards; with fewer, every slot reads all shards and
keeps the samples whose running index is its slot modulo the number of slots, so no slot is left
empty. Either way each sample is seen exactly once per epoch across all workers and ranks.
(Shard-level splitting can give ranks unequal sample counts; DDP code should iterate with
``epochs=None`` and count steps, or use shards that divide evenly.)

One rule for a sample (``SampleRule``), shared by ``check_shards`` / ``python -m nbcore.data check``
and the training loader: members present and decodable, finite, shapes consistent, and sizes equal
to a ``SampleSpec`` built from the data's ``stats.json`` (C, Dd, Dt, and P from the row counts) and
the model (``SampleSpec.from_model``: C, Dd, P, Dt, latent sides divisible by the patch size);
sizes neither fixes are fixed by the first good sample. ``stats.json`` itself must be finite with
std > 0.

Bad input: a sample without ``dinov3_patches.npy`` is skipped and counted (``strict=True`` raises).
Any other malformed sample (corrupt npy, wrong shape, NaN/Inf, missing member, truncated tar)
raises ``DataError`` naming shard and key, or, with ``on_error="skip"``, is skipped and counted by
reason. Counts from every worker arrive with the batches and accumulate in ``loader.counts``;
an error in a worker arrives the same way and is raised in the main process as the same DataError.

The tar reading is hand-written (``nbcore.tar_reader.read_tar``: it reports a shard cut anywhere as
``truncated_tar`` with the samples lost; its docstring says why webdataset's reader is not used).

The fast ``.npy`` parse (``_npy_bytes``) is kept instead of webdataset's decoders (np.load): per
member of a tiny-preset sample it takes 10-14 us against np.load's 127-201 us (measured on this
2-core machine), whose header parser (ast.literal_eval) dominates small samples.

Shape legend: B batch, C latent channels, H W latent side, P patches, Dd DINO dim, L text tokens,
Dt text dim, S image side.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import math
import os
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from tqdm.auto import tqdm
from webdataset.tariterators import url_opener

from .stats import MEMBER_OF, DataError, Stats, StatsAccumulator
from .tar_reader import read_tar

__all__ = ["DataError", "SkipCounter", "Stats", "StatsAccumulator", "SampleSpec", "SampleRule",
           "compute_stats", "shard_list", "expand_shards", "read_tar", "shard_samples", "decode_sample",
           "collate", "ShardDataset", "Loader", "make_loader", "check_shards", "shard_records",
           "REQUIRED", "MEMBER_OF"]

REQUIRED = ("latent.npy", "dinov3.npy", "t5.npy", "txt")
COMPLETE = REQUIRED + ("dinov3_patches.npy",)   # a sample with these members looks whole

# --------------------------------------------------------------------------- errors and counts

class _Bad(Exception):
    """Internal: one sample is bad for ``reason``; turned into a DataError naming shard and key."""

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

    def clear(self) -> None:
        self.samples, self.text_truncated = 0, 0
        self.skipped.clear()

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


class SkipOrRaise:
    """A webdataset error handler (``handler=`` of ``wds.map`` and friends): a DataError is counted
    in ``counts`` by reason (``lost`` samples) and the pipeline continues, or it is raised:
    always when ``strict``; for every reason but ``missing_patches`` when ``on_error="raise"``.
    Any other exception is raised as it is."""

    def __init__(self, counts: SkipCounter, on_error: str = "raise", strict: bool = False):
        self.counts, self.on_error, self.strict = counts, on_error, strict

    def __call__(self, exn: Exception) -> bool:
        if not isinstance(exn, DataError):
            raise exn
        if self.strict or (exn.reason != "missing_patches" and self.on_error == "raise"):
            raise exn
        self.counts.skipped[exn.reason] += exn.lost
        return True


# --------------------------------------------------------------------------- the rule for a sample

_SIZES = ("C", "Dd", "P", "Dt")


@dataclass(frozen=True)
class SampleSpec:
    """Sizes every sample must have (None = not fixed): ``C`` latent channels, ``Dd`` DINO dim,
    ``P`` patch rows, ``Dt`` text dim; latent H and W must be multiples of ``multiple``. ``source``
    says, per size, where the requirement comes from (for error messages)."""
    C: int | None = None
    Dd: int | None = None
    P: int | None = None
    Dt: int | None = None
    multiple: int | None = None
    source: tuple = ()           # ((size name, "stats.json" | "model" | ...), ...)

    @classmethod
    def from_stats(cls, stats: "Stats", where: str = "stats.json") -> "SampleSpec":
        """C (latent channels), Dd and Dt from the statistics' dims; P from the row counts (the
        patch rows counted per CLS row) when they divide exactly."""
        e = stats.entries
        got = {"Dd": stats.dim("dinov3"), "Dt": stats.dim("t5")}
        if "latent" in e:
            got["C"] = stats.dim("latent")
        n_cls, n_p = e["dinov3"].get("count"), e["dinov3_patches"].get("count")
        if isinstance(n_cls, int) and isinstance(n_p, int) and n_cls > 0 and n_p % n_cls == 0:
            got["P"] = n_p // n_cls
        return cls(**got, source=tuple((k, where) for k in got))

    @classmethod
    def from_model(cls, cfg) -> "SampleSpec":
        """What a model config needs (a ModelConfig or its ``to_dict()``; read by field name, so
        the data side does not import the model): C = in_channels, Dd = dino_dim, Dt = text_dim,
        P = dino_grid ** 2 when the model reads patches, latent sides divisible by patch_size."""
        d = cfg if isinstance(cfg, Mapping) else cfg.to_dict()
        got = {"C": d["in_channels"], "Dd": d["dino_dim"], "Dt": d["text_dim"], "multiple": d["patch_size"]}
        if d.get("use_dino_patches", True):
            got["P"] = d["dino_grid"] ** 2
        return cls(**got, source=tuple((k, "model") for k in got))

    @classmethod
    def of(cls, expect) -> "SampleSpec":
        """A SampleSpec, a dict of sizes ({"C", "Dd", "P", "Dt", "multiple"}) or None."""
        if expect is None:
            return cls()
        if isinstance(expect, SampleSpec):
            return expect
        unknown = set(expect) - set(_SIZES) - {"multiple"}
        if unknown:
            raise ValueError(f"unknown sample sizes {sorted(unknown)} (known: {_SIZES + ('multiple',)})")
        return cls(**expect, source=tuple((k, "expect") for k, v in expect.items() if v is not None))

    def merge(self, other: "SampleSpec") -> "SampleSpec":
        """Both requirements at once; DataError naming both sources when they disagree."""
        src = dict(self.source)
        out = {}
        for f in ("C", "Dd", "P", "Dt", "multiple"):
            a, b = getattr(self, f), getattr(other, f)
            if a is not None and b is not None and a != b:
                theirs = dict(other.source).get(f, "other")
                raise DataError(f"{src.get(f, 'spec')} has {f}={a} but {theirs} needs {f}={b}")
            out[f] = a if a is not None else b
        return SampleSpec(**out, source=tuple({**dict(other.source), **src}.items()))

    def sizes(self) -> dict:
        return {k: getattr(self, k) for k in _SIZES if getattr(self, k) is not None}


class SampleRule:
    """The one validation rule for a sample, shared by ``check_shards`` and the loader.

    ``rule(raw) -> decoded sample`` (see ``decode_sample``) or DataError (shard, key, reason).
    Sizes the ``spec`` leaves open are fixed by the first good sample; the rest must match it.
    A raw sample marked ``__truncated__`` by ``read_tar`` is a ``truncated_tar`` error standing
    for its ``__lost__`` samples.
    """

    def __init__(self, spec: SampleSpec | dict | None = None):
        self.spec = SampleSpec.of(spec)
        self.learned: dict = {}

    def __call__(self, raw: dict) -> dict:
        try:
            if "__truncated__" in raw:
                raise _Bad("truncated_tar", raw["__truncated__"])
            s = decode_sample(raw, {**self.learned, **self.spec.sizes()}, self.spec.multiple)
        except _Bad as b:
            shard, key = raw.get("__url__"), raw.get("__key__")
            raise DataError(f"{shard}: sample {key!r}: {b.reason}: {b.detail}", shard=shard, key=key,
                            reason=b.reason, lost=int(raw.get("__lost__", 1))) from None
        if len(self.learned) < len(_SIZES):
            for k, v in (("C", s["latent"].shape[0]), ("Dd", s["dinov3"].shape[0]),
                         ("P", s["dinov3_patches"].shape[0]), ("Dt", s["t5"].shape[1])):
                self.learned.setdefault(k, v)
        return s


# --------------------------------------------------------------------------- shard lists

def _is_url(p: str) -> bool:
    """``pipe:CMD`` or ``scheme://...`` (opened by webdataset's gopen; not checked for existence)."""
    return p.startswith("pipe:") or "://" in p


def expand_shards(shards) -> list[str]:
    """A folder (all ``*.tar``), a brace pattern (``DIR/train-{000000..000003}.tar``), a glob, a
    ``pipe:`` command or URL, or a list of those -> list of shards (order kept; folders and globs
    sorted). Local paths must exist."""
    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    for item in items:
        item = str(item)
        if _is_url(item):
            out += list(braceexpand(item))
            continue
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


def shard_records(folder, nsamples: dict) -> dict:
    """What a writer records of its shards, for ``stats.json``'s ``meta["shards"]``: shard file name
    (in ``folder``) -> {"nsamples": samples written, "filesize": bytes}. Readers compare against it
    to tell a cut shard from a short one (``read_tar``)."""
    folder = Path(folder)
    return {name: {"nsamples": int(n), "filesize": (folder / name).stat().st_size}
            for name, n in sorted(nsamples.items())}


_RECORD_CACHE: dict = {}


def _recorded(url: str) -> dict | None:
    """The writer's record {"nsamples", "filesize"} of a local shard, from ``meta.shards`` of the
    stats.json in its folder; None when there is none (a URL, shards written elsewhere)."""
    if _is_url(url):
        return None
    path = Path(os.path.abspath(url)).parent / "stats.json"
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)    # a dataset rewritten in place is read again
    if key not in _RECORD_CACHE:
        try:
            shards = json.loads(path.read_text()).get("meta", {}).get("shards", {})
        except (OSError, ValueError, AttributeError):
            shards = {}   # unreadable stats: only the count check is lost, the end marker still works
        _RECORD_CACHE[key] = shards if isinstance(shards, dict) else {}
    rec = _RECORD_CACHE[key].get(os.path.basename(url))
    return rec if isinstance(rec, dict) and isinstance(rec.get("nsamples"), int) else None


def _open_error(exn: Exception) -> bool:
    """url_opener's handler: a shard that cannot be opened is a DataError naming it."""
    url = exn.args[-1] if exn.args else "?"
    raise DataError(f"{url}: cannot open shard ({type(exn).__name__}: {exn.args[0] if exn.args else exn})",
                    shard=str(url), reason="unreadable_shard") from None


def shard_samples(sources):
    """webdataset stage: {"url"} dicts -> raw samples of each shard (``read_tar``), opened with
    webdataset's ``url_opener`` (local paths, ``pipe:`` commands, remote URLs)."""
    for src in url_opener(sources, handler=_open_error):
        try:
            yield from read_tar(src["stream"], src["url"], _recorded(src["url"]), complete=COMPLETE)
        finally:
            close = getattr(src["stream"], "close", None)
            if close is not None:
                close()


def _every_nth(src, slot: int, nslots: int):
    """Keep the samples whose running index is ``slot`` modulo ``nslots`` (the split when there
    are fewer shards than slots)."""
    return itertools.islice(src, slot, None, nslots)


def _split_by_rank(src, rank: int, world_size: int):
    """``wds.split_by_node`` with an explicit rank (make_loader's ``rank=`` / ``world_size=``)."""
    return itertools.islice(src, rank, None, world_size)


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


def decode_sample(raw: dict, expect: dict | None = None, multiple: int | None = None) -> dict:
    """Raw members -> numpy arrays + text, validated. Raises ``_Bad(reason, detail)``; use it
    through ``SampleRule``, which names shard and key.

    Returns {"key", "latent" (C, H, W), "dinov3" (Dd,), "dinov3_patches" (P, Dd), "t5" (L, Dt)
    real tokens only, "txt", optional "png" (S, S, 3) uint8, "json" dict}. ``expect`` maps "C",
    "Dd", "P", "Dt" to required sizes (missing = any); ``multiple``: latent H and W must divide by it.
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
    if multiple and (latent.shape[1] % multiple or latent.shape[2] % multiple):
        raise _Bad("wrong_shape", f"latent {latent.shape[1]}x{latent.shape[2]} not divisible by the patch size {multiple}")
    try:
        txt = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("bad_text", f"txt is not utf-8 ({e})") from None
    out = {"key": raw["__key__"], "latent": latent, "dinov3": cls, "dinov3_patches": patches, "t5": t5, "txt": txt}
    if "png" in raw:
        try:
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

def _rank_world(rank, world_size) -> tuple[int | None, int | None]:
    """Explicit arguments (checked) or (None, None): webdataset's ``pytorch_worker_info`` decides
    inside the worker (RANK / WORLD_SIZE env, else an initialised torch.distributed group)."""
    if rank is None and world_size is None:
        return None, None
    r, w = int(rank or 0), int(world_size or 1)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} not in [0, world_size={w})")
    return r, w


class ShardDataset(torch.utils.data.IterableDataset):
    """Yields collated batches (and, at epoch ends, count-only dicts; on a DataError, an error
    record) for one rank; DataLoader workers split the rank's share further. Each epoch is a
    ``wds.DataPipeline`` (see the module docstring). Use through ``make_loader``."""

    def __init__(self, shards: list[str], batch_size: int, stats: Stats | None, shuffle: int, seed: int,
                 epochs: int | None, text_len: int | None, strict: bool, on_error: str, drop_last: bool,
                 rank: int | None, world_size: int | None, split: str = "auto", spec: SampleSpec | None = None):
        self.shards, self.batch_size, self.stats = shards, batch_size, stats
        self.shuffle, self.seed, self.epochs, self.text_len = shuffle, seed, epochs, text_len
        self.strict, self.on_error, self.drop_last = strict, on_error, drop_last
        self.rank, self.world_size, self.split, self.spec = rank, world_size, split, spec or SampleSpec()

    def pipeline(self, epoch: int, rule: SampleRule, counts: SkipCounter) -> wds.DataPipeline:
        """The decoded, validated samples of this worker's share of ``epoch``."""
        rank, world, worker, nw = wds.utils.pytorch_worker_info()
        explicit = self.rank is not None
        if explicit:
            rank, world = self.rank, self.world_size
        slot, nslots = rank * nw + worker, world * nw
        by_shard = self.split == "shard" or (self.split == "auto" and len(self.shards) >= nslots)
        # shard order: random.Random(seed').shuffle, the same on every slot
        stages = [wds.SimpleShardList(self.shards, seed=self.seed * 1_000_003 + epoch if self.shuffle else None)]
        if by_shard:
            stages += [partial(_split_by_rank, rank=rank, world_size=world) if explicit else wds.split_by_node,
                       wds.split_by_worker]
        stages.append(shard_samples)
        if not by_shard:
            stages.append(partial(_every_nth, slot=slot, nslots=nslots))
        if self.shuffle > 1:
            stages.append(wds.shuffle(self.shuffle, initial=self.shuffle,
                                      rng=random.Random(self.seed * 1_000_003 + epoch * 1009 + slot)))
        stages.append(wds.map(rule, handler=SkipOrRaise(counts, self.on_error, self.strict)))
        return wds.DataPipeline(*stages)

    def __iter__(self):
        counts = SkipCounter()
        rule = SampleRule(self.spec)   # one per worker: it learns open sizes from the first good sample

        def emit(samples):
            batch = collate(samples, self.stats, self.text_len, counts)
            counts.samples += len(samples)
            batch["__counts__"] = counts.to_dict()
            counts.clear()
            return batch

        epochs = itertools.count() if self.epochs is None else range(self.epochs)
        try:
            for epoch in epochs:
                buckets: dict = defaultdict(list)
                for s in self.pipeline(epoch, rule, counts):
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
                counts.clear()
        except DataError as e:
            # travels to the main process as data (a DataLoader worker would wrap the exception
            # in a traceback string); Loader raises it there as the same DataError
            yield {"__counts__": counts.to_dict(),
                   "__error__": {"message": str(e), "shard": e.shard, "key": e.key, "reason": e.reason, "lost": e.lost}}


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
        for item in dl:
            self.counts.add(item.pop("__counts__"))
            if "__error__" in item:
                e = item["__error__"]
                raise DataError(e.pop("message"), **e)
            if "latent" in item:
                yield item


def _as_stats(stats) -> Stats | None:
    if stats is None or isinstance(stats, Stats):
        return stats
    return Stats.load(stats)


def make_loader(shards, batch_size: int, *, stats=None, shuffle: int = 1000, seed: int = 0,
                epochs: int | None = 1, num_workers: int = 0, text_len: int | None = None,
                strict: bool = False, drop_last: bool = False, on_error: str = "raise",
                rank: int | None = None, world_size: int | None = None, split: str = "auto",
                expect: SampleSpec | dict | None = None) -> Loader:
    """A loader over WebDataset shards (see the module docstring).

    shards: folder, brace pattern, glob, ``pipe:`` / URL, or a list; stats: None | path to
    stats.json | Stats; shuffle: buffer size in samples, per worker (0 = off, also keeps shard
    order; the buffer holds raw samples, about 1 MB each at production shapes, so 1000 is about
    1 GB per worker); epochs: None = forever; text_len: None = pad to the batch's longest caption
    rounded up to 8, else a fixed length (longer captions are cut and counted in
    ``counts.text_truncated``); strict: raise on every bad sample (missing patches included);
    on_error: "raise" | "skip" for malformed samples; rank / world_size: override
    torch.distributed / env; split: "auto" | "shard" | "sample"; expect: a SampleSpec or a dict
    of required sizes {"C", "Dd", "P", "Dt", "multiple"}, merged with the stats' sizes (a
    disagreement is a DataError); sizes neither fixes come from the first good sample.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if split not in ("auto", "shard", "sample"):
        raise ValueError(f"split must be auto|shard|sample, got {split!r}")
    st = _as_stats(stats)
    spec = SampleSpec.of(expect)
    if st is not None:
        spec = SampleSpec.from_stats(st, str(stats) if isinstance(stats, (str, os.PathLike)) else "stats").merge(spec)
    r, w = _rank_world(rank, world_size)
    ds = ShardDataset(expand_shards(shards), batch_size, st, shuffle, seed, epochs, text_len, strict,
                      on_error, drop_last, r, w, split, spec)
    return Loader(ds, num_workers)


# --------------------------------------------------------------------------- statistics over shards

def compute_stats(shards, on_error: str = "skip", progress: bool = False) -> Stats:
    """Statistics over every good sample of ``shards`` (a pattern, folder or list), unnormalised."""
    acc = StatsAccumulator()
    counts = SkipCounter()
    paths = expand_shards(shards)
    if progress:
        paths = tqdm(paths, desc="shards", unit="shard")
    samples = wds.map(SampleRule(), handler=SkipOrRaise(counts, on_error))(shard_samples({"url": p} for p in paths))
    for s in samples:
        acc.add(s["latent"], s["dinov3"], s["dinov3_patches"], s["t5"])
        counts.samples += 1
    st = acc.result()
    st.meta = {"source": "nbcore.data.compute_stats", "samples": counts.samples, "skipped": dict(counts.skipped)}
    return st


# --------------------------------------------------------------------------- check

def default_stats(shards) -> Path | None:
    """``stats.json`` beside the first local shard (where the trainer looks), or None."""
    first = expand_shards(shards)[0]
    if _is_url(first):
        return None
    p = Path(first).parent / "stats.json"
    return p if p.exists() else None


def check_shards(shards, strict: bool = False, progress: bool = True, stats="auto",
                 expect: SampleSpec | dict | None = None) -> dict:
    """Scan shards with the training loader's rule (``SampleRule``): per shard samples,
    with_patches, good, skipped (reason -> count). ``stats``: "auto" (stats.json beside the shards,
    as training uses), None, a path or Stats; ``expect``: the model's needs
    (``SampleSpec.from_model``) or a dict of sizes. Returns {"samples", "with_patches", "good",
    "skipped", "shards", "per_shard", "spec"}; samples = good + skipped (a truncated shard's lost
    samples included). ``strict`` raises DataError at the first bad sample (missing patches
    included)."""
    paths = expand_shards(shards)
    if stats == "auto":
        stats = default_stats(paths)
    st = _as_stats(stats)
    spec = SampleSpec.of(expect)
    if st is not None:
        spec = SampleSpec.from_stats(st, str(stats)).merge(spec)
    rule = SampleRule(spec)                       # one rule over all shards, like one training worker
    per_shard = {}
    total = SkipCounter()
    n_all = n_patch = 0
    it = tqdm(paths, desc="check", unit="shard", file=sys.stderr) if progress else paths
    for shard in it:
        c = SkipCounter()
        seen = {"n": 0, "patches": 0}

        def raws(shard=shard, seen=seen):
            for raw in shard_samples([{"url": shard}]):
                seen["n"] += int(raw.get("__lost__", 1))
                seen["patches"] += "dinov3_patches.npy" in raw
                yield raw
        for _ in wds.map(rule, handler=SkipOrRaise(c, "skip", strict))(raws()):
            c.samples += 1
        per_shard[shard] = {"samples": seen["n"], "with_patches": seen["patches"], "good": c.samples,
                            "skipped": dict(c.skipped)}
        total.add(c.to_dict())
        n_all += seen["n"]
        n_patch += seen["patches"]
    return {"samples": n_all, "with_patches": n_patch, "good": total.samples,
            "skipped": dict(total.skipped), "shards": len(paths), "per_shard": per_shard,
            "spec": {**spec.sizes(), **({"multiple": spec.multiple} if spec.multiple else {})}}


if __name__ == "__main__":   # python -m nbcore.data: the command line is nbcore.cli.data's
    from nbcore.cli.data import main as _main
    sys.exit(_main())
