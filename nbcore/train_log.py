"""A run's log and its named metrics.

``OUT/log.jsonl`` has one JSON record per line: ``kind`` "train" (per logged step), "val" or
"event" (start, resume, warm_start, samples, nan_stop, end, ...); ``load_train_log`` reads it.

Metrics travel as dicts of named scalars (float) and vectors (list of floats, e.g. the loss by
t-bin). Only ``metrics_to_host`` (the step's one device->host copy) and ``reduce_metrics`` (the one
all_reduce of a log record over DDP ranks) pack them into one tensor, and unpack them back to their
names.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["load_train_log", "truncate_log", "finite_or_none", "metrics_to_host", "reduce_metrics", "add_metrics",
           "bin_means", "new_window", "count_step"]


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


def finite_or_none(x):
    """NaN / Inf -> None so log lines stay strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


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


def add_metrics(total: dict, part: dict) -> dict:
    """``total[k] += part[k]`` for each name of ``part`` (lists elementwise); returns ``total``."""
    for k, v in part.items():
        total[k] = [a + b for a, b in zip(total[k], v)] if isinstance(v, list) else total[k] + v
    return total


def bin_means(bin_sum: list[float], bin_count: list[float]) -> list[float | None]:
    return [a / c if c else None for a, c in zip(bin_sum, bin_count)]


def truncate_log(path, step: int) -> None:
    """Drop the records of ``path`` (a log.jsonl) after ``step``: a killed run logged past its last
    checkpoint, and the run that resumes from it logs those steps again."""
    path = Path(path)
    if not path.exists():
        return
    keep = [json.dumps(r) for r in load_train_log(path, kind=None) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def new_window(loss_bins: int, since: float) -> dict:
    """Sums over the steps of one log record, started at time ``since``: the applied steps' loss,
    count and loss by t-bin; samples; skipped steps."""
    return {"since": since, "loss": 0.0, "applied": 0, "bin_sum": [0.0] * loss_bins,
            "bin_count": [0.0] * loss_bins, "samples": 0.0, "skipped": 0}


def count_step(s: dict, window: dict, recent) -> None:
    """Add a step's metrics ``s`` to the log ``window`` and, when applied, to ``recent`` (a deque:
    the applied steps behind the summary's final loss)."""
    if s["applied"]:
        applied = {"loss": s["loss"], "applied": 1, "bin_sum": s["bin_sum"], "bin_count": s["bin_count"]}
        add_metrics(window, applied)
        recent.append(applied)
    else:
        window["skipped"] += 1
    window["samples"] += s["samples"]
