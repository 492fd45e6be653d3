"""The training checkpoint format, in one place: writing, reading, resuming, the RNG state.

A checkpoint is a ``torch.save`` dict written atomically (``nbcore.utils.atomic_save``) and
loadable with ``weights_only=True``: plain dicts, lists, numbers, strings and tensors.

OUT/ckpt/last.pt, written every ``ckpt_every`` steps and at the end, is the resumable one; keys
``config`` (ModelConfig dict: the model trained), ``train_config`` (``asdict(TrainConfig)``, its
``model`` a dict too or None for the preset with the data's sizes; ``TrainConfig.from_dict``
rebuilds it, older ``model_overrides`` JSON included), ``model``, ``ema``, ``optimizer``,
``scheduler``, ``step``, ``n_updates``, ``skipped``, ``streak``, ``rng`` (torch, numpy, python as
plain lists/tensors, cuda, and ``train``: each rank's generator state), ``data_state`` (world size
and each rank's epoch / index), ``data_counts`` (each rank's samples read and skipped by reason in
finished epochs), ``stats`` (the data's stats.json as ``Stats.save`` writes it: entries + ``meta``;
None without one) and ``codec`` (the codec spec the latents were made with,
``nbcore.codec.codec_spec_from_stats``, or None), so a checkpoint alone says how to normalise its
conditions and decode its latents (``nbcore.pretrained`` exports both).

OUT/ckpt/step_XXXXXX.pt, every ``milestone_every``, is lean: everything but ``optimizer`` and
``scheduler`` (``RESUME_ONLY``: AdamW's two moments would double its size; milestones are for
curves, warm starts and exports, which read ``model`` / ``ema``).

Resume (``find_resume``): ``resume="auto"`` continues from OUT/ckpt/last.pt when it exists, or,
when it cannot be read, from the newest readable milestone (said on stderr and logged as a
``resume_fallback`` event). Resuming from a milestone restores the weights, EMA, step, RNG and data
position, and restarts the optimiser (fresh AdamW moments, the lr schedule at the milestone's
``n_updates``), so the step after it computes the uninterrupted run's loss but the updates then
differ. Under DDP, OUT must be on a filesystem every rank sees.

Readers of a model (``read_model``: config + weights; ``read_weights``: a warm start's weights;
``checkpoint_data``: stats + codec; ``training_summary``; ``checkpoint_step``) go through this module,
which imports no model (``nbcore.model_folder`` builds models from what it reads); older checkpoints
without ``stats`` / ``codec`` / ``data_counts`` still load.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .codec import codec_spec_from_stats
from .stats import Stats
from .utils import CheckpointError, atomic_save, load_checkpoint, repo_root

__all__ = ["TRAIN_KEYS", "RESUME_ONLY", "training_checkpoint", "save_training_checkpoint", "restore_training",
           "read_config",
           "read_training_checkpoint", "find_resume", "rng_state", "set_rng_state", "read_model",
           "read_weights", "step_of", "training_summary", "SUMMARY_KEYS", "checkpoint_step", "checkpoint_data",
           "differences"]

STATS_JSON = "stats.json"


def training_checkpoint(trainer, positions: list[dict], generators: list, done: list[dict]) -> dict:
    """The checkpoint dict of a ``nbcore.train.Trainer`` at its current step (the keys above);
    ``positions``, ``generators``, ``done``: each rank's data position, generator state and
    finished-epoch counts (gathered by the trainer)."""
    rng = rng_state()
    rng["train"] = generators
    st = trainer.data_stats
    return {"config": trainer.model_cfg.to_dict(), "train_config": asdict(trainer.cfg),
            "model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "step": trainer.step, "n_updates": trainer.n_updates, "skipped": trainer.skipped,
            "streak": trainer.streak, "rng": rng,
            "data_state": {"world_size": trainer.world, "ranks": positions},
            "data_counts": done,   # per rank: samples / skips of the finished epochs
            "stats": None if st is None else {**st.entries, "meta": st.meta},   # stats.json's layout
            "codec": None if st is None else codec_spec_from_stats(st)}


def save_training_checkpoint(obj: dict, ckpt_dir, milestone: bool = False) -> Path:
    """Write ``obj`` atomically to CKPT_DIR/last.pt and, when ``milestone``, its lean copy (no
    ``RESUME_ONLY`` keys) to CKPT_DIR/step_XXXXXX.pt; returns last.pt's path."""
    path = Path(ckpt_dir) / "last.pt"
    atomic_save(obj, path)
    if milestone:
        lean = {k: v for k, v in obj.items() if k not in RESUME_ONLY}
        atomic_save(lean, Path(ckpt_dir) / f"step_{obj['step']:06d}.pt")
    return path


# What every training checkpoint holds; last.pt adds RESUME_ONLY (milestones are lean).
TRAIN_KEYS = ("config", "model", "ema", "step", "n_updates", "skipped", "streak", "rng", "data_state")
RESUME_ONLY = ("optimizer", "scheduler")


def read_training_checkpoint(path) -> dict:
    """A checkpoint this trainer wrote (last.pt or a lean milestone: every key of ``TRAIN_KEYS``),
    or CheckpointError."""
    ck = load_checkpoint(path)
    missing = [k for k in TRAIN_KEYS if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: not an nbcore training checkpoint (missing {missing})")
    return ck


def restore_training(trainer, path, ck: dict) -> dict:
    """Load a training checkpoint ``ck`` (read from ``path``) into a ``nbcore.train.Trainer``: model,
    EMA, optimiser and scheduler (a lean milestone has none: ``trainer.optimizer_restarted`` is set
    and the trainer restarts its schedule), step and counters, the global RNG states and this rank's
    generator. Returns the data position to continue from (the epoch start when the world size
    changed). ValueError naming both when the checkpoint's model is not the run's."""
    if ck["config"] != trainer.model_cfg.to_dict():
        theirs, ours = differences(ck["config"], trainer.model_cfg.to_dict())
        src = (f" (sizes from {Path(trainer.cfg.data) / 'stats.json'})"
               if trainer.data_stats is not None and trainer.cfg.model is None else "")
        raise ValueError(f"cannot resume from {path}: the checkpoint has {theirs}, this run {ours}{src}")
    trainer.model.load_state_dict(ck["model"])
    trainer.ema.load_state_dict(ck["ema"])
    trainer.step, trainer.n_updates = int(ck["step"]), int(ck["n_updates"])
    trainer.optimizer_restarted = "optimizer" not in ck
    if not trainer.optimizer_restarted:
        trainer.optimizer.load_state_dict(ck["optimizer"])
        trainer.scheduler.load_state_dict(ck["scheduler"])
    trainer.skipped, trainer.streak = int(ck["skipped"]), int(ck["streak"])
    set_rng_state(ck["rng"])
    ds = ck["data_state"]
    if ds["world_size"] == trainer.world:
        trainer.gen.set_state(ck["rng"]["train"][trainer.rank])
        position = dict(ds["ranks"][trainer.rank])
        counts = ck.get("data_counts")   # older checkpoints have none
        if counts:
            position["done"] = counts[trainer.rank]
    else:
        print(f"warning: resuming with world size {trainer.world} (checkpoint {ds['world_size']}): "
              "data order and noise are not the uninterrupted run's", file=sys.stderr)
        position = {"epoch": ds["ranks"][0]["epoch"], "index": 0}
    return position


def read_config(src) -> dict:
    """The ModelConfig dict of a checkpoint (any nbcore checkpoint: ``config``); ValueError when it has none."""
    ck = load_checkpoint(src)
    if not isinstance(ck, dict) or "config" not in ck:
        raise ValueError(f"{src}: not an nbcore checkpoint (no 'config')")
    return dict(ck["config"])


def find_resume(ckpt_dir, resume: str, verbose: bool = True) -> tuple[Path, dict, dict | None] | None:
    """The checkpoint to resume from, read: ``(path, checkpoint, fallback)`` or None (fresh run).

    ``resume="auto"``: OUT/ckpt/last.pt when it exists; when it cannot be read (a disk fault, a
    copy cut short), the newest readable milestone OUT/ckpt/step_XXXXXX.pt instead, said on
    stderr (``verbose``) and returned as ``fallback`` {"unreadable", "reason", "path", "optimizer"}
    (the trainer logs it).
    An explicit PATH that cannot be read is a CheckpointError naming it (one line)."""
    r, ckpt_dir = resume, Path(ckpt_dir)
    if r in ("", "none"):
        return None
    if r != "auto":
        if not Path(r).exists():
            raise FileNotFoundError(f"resume checkpoint {r!r} does not exist")
        return Path(r), read_training_checkpoint(r), None
    last = ckpt_dir / "last.pt"
    milestones = sorted(ckpt_dir.glob("step_*.pt"), reverse=True)   # zero-padded: newest first
    if not last.exists():
        return None
    try:
        return last, read_training_checkpoint(last), None
    except CheckpointError as e:
        problem = str(e)
    for m in milestones:
        try:
            ck = read_training_checkpoint(m)
        except CheckpointError:
            continue
        restarted = "optimizer" not in ck     # a lean milestone: weights, EMA and position only
        if verbose:
            print(f"resume: {problem}; falling back to the newest readable milestone {m} (step {ck['step']})"
                  + ("; optimiser state restarted" if restarted else ""), file=sys.stderr)
        return m, ck, {"unreadable": str(last), "reason": problem, "path": str(m),
                       "optimizer": "restarted" if restarted else "restored"}
    raise CheckpointError(f"cannot resume: {problem}; and no readable milestone step_*.pt beside it "
                          "(start fresh with --no-resume)")


def rng_state() -> dict:
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


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in s and torch.cuda.is_available():
        states = s["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def differences(a: dict, b: dict, keys: Sequence[str] | None = None) -> tuple[str, str]:
    """The fields (of ``keys``, default all of ``b``) where two config dicts differ, as two texts
    ("dino_dim 1024, text_dim 4096", "dino_dim 32, text_dim 16"; a field one lacks shows None);
    empty texts when none differ."""
    diff = [k for k in (keys or b) if a.get(k) != b.get(k)]
    return ", ".join(f"{k} {a.get(k)}" for k in diff), ", ".join(f"{k} {b.get(k)}" for k in diff)


def read_model(src, weights: str = "ema", strict: bool = True) -> tuple[dict, dict, str, dict]:
    """``(config dict, state dict, which weights, checkpoint dict)`` of a checkpoint path or a loaded
    checkpoint dict; ``weights``: "ema" or "model". ``strict``: KeyError when the checkpoint lacks
    those weights; else "ema" falls back to the raw "model" weights when there is no EMA. ValueError
    when it is not an nbcore checkpoint."""
    name = str(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__
    ck = load_checkpoint(src) if isinstance(src, (str, os.PathLike)) else src
    if not isinstance(ck, dict) or "config" not in ck or (not strict and "model" not in ck):
        raise ValueError(f"{name}: not an nbcore checkpoint (needs keys 'config' and 'model')")
    which = weights if strict or ck.get(weights) is not None else "model"
    if which not in ck:
        raise KeyError(f"checkpoint has no {which!r} weights (keys: {sorted(ck)})")
    return dict(ck["config"]), ck[which], which, ck


def read_weights(path, weights: str) -> tuple[dict, dict | None]:
    """``(state dict, config dict or None)`` of the ``weights`` ("model" or "ema") of any checkpoint
    holding them (a warm start's source need not be a full training checkpoint); KeyError naming the
    keys it has when it lacks them."""
    ck = load_checkpoint(path)
    if weights not in ck:
        raise KeyError(f"warm-start checkpoint {path} has no {weights!r} weights (keys: {sorted(ck)})")
    return ck[weights], ck.get("config")


# What of a run's TrainConfig a model card needs (the rest stays in the checkpoint).
SUMMARY_KEYS = ("preset", "data", "steps", "batch_size", "grad_accum", "lr", "schedule", "warmup", "ema_decay",
                "seed", "p_drop_both", "p_text_only", "p_dino_only", "timestep_sampling", "warm_start")


def step_of(ck: dict) -> int | None:
    """A loaded checkpoint's ``step``, None when it records none."""
    step = ck.get("step")
    return int(step) if isinstance(step, (int, float)) else None


def training_summary(ck: dict) -> dict | None:
    """What a model folder records of the run behind a checkpoint: step, n_updates and the
    ``SUMMARY_KEYS`` of its train_config; None for an empty dict (a model, not a checkpoint)."""
    if not ck:
        return None
    tc = ck.get("train_config") or {}
    return {"step": int(ck.get("step", 0)), "n_updates": int(ck.get("n_updates", ck.get("step", 0))),
            **{k: tc[k] for k in SUMMARY_KEYS if k in tc}}


def checkpoint_step(path) -> int:
    """The ``step`` of a training checkpoint, its tensors memory-mapped and never read (a
    multi-gigabyte checkpoint costs milliseconds, not a full load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "step" not in ck:
        raise KeyError(f"{path} has no 'step' entry (keys: {sorted(ck)}): not an nbcore training checkpoint")
    return int(ck["step"])


def checkpoint_data(ck: dict) -> tuple[Stats | None, dict | None]:
    """(the data statistics, the codec spec) a loaded training checkpoint was trained with: its own
    ``stats`` (stats.json's layout) and ``codec`` entries when it carries them; else the stats.json
    of its train_config's data folder (a relative folder is tried from the cwd, then from the
    repository root) and no codec (the stats record theirs). None where nothing says."""
    codec = dict(ck["codec"]) if isinstance(ck.get("codec"), dict) else None
    if isinstance(ck.get("stats"), dict):
        entries = {k: v for k, v in ck["stats"].items() if k not in ("meta", "nonfinite")}
        return Stats(entries, dict(ck["stats"].get("meta") or {})), codec
    data = (ck.get("train_config") or {}).get("data") or ""
    for folder in ([Path(data)] + ([repo_root() / data] if not Path(data).is_absolute() else [])) if data else []:
        if (folder / STATS_JSON).is_file():
            return Stats.load(folder / STATS_JSON), codec
    return None, codec

