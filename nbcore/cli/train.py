"""``python -m nbcore.train`` / ``nbcore-train``: the training command line. One flag per
``TrainConfig`` field; ``main`` wires the validation and sample-grid hooks of ``nbcore.validate``
into ``nbcore.train.train``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from nbcore.data import shard_list
from nbcore.sizes import data_stats
from nbcore.stats import Stats
from nbcore.train import NonFiniteLossError, TooManySkipsError, train
from nbcore.train_config import TrainConfig, field_help, parse_model_overrides
from nbcore.utils import ArgParser, bad_arguments, check_checkpoint_file, check_writable, resolve_device
from nbcore.validate import sample_grid_hook, validation_hook

# One help line per TrainConfig field, from the field's metadata (tests/test_cli.py checks every flag
# has one); choices where the config accepts a fixed set.
_FLAG_HELP = field_help()
_FLAG_CHOICES = {f.name: list(f.metadata["choices"]) for f in dataclasses.fields(TrainConfig) if f.metadata["choices"]}


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m nbcore.train",
                  description="Train NanoDiT with flow matching (one process, or DDP under torchrun).")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        typ = str(f.type)
        text = _FLAG_HELP[f.name]
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default=default, help=f"{text} (default: auto)")
            p.add_argument("--no-resume", dest="resume", action="store_const", const="none", help="start fresh")
            continue
        if f.name == "model":   # a ModelConfig: on the command line, JSON fields over the preset
            p.add_argument("--model-overrides", dest="model_overrides", default="", metavar="JSON",
                           help=f"{text} (default: none: the preset with the data's sizes)")
            continue
        if f.name == "data":
            p.add_argument(flag, required=True, metavar="DIR", help=text)
            continue
        if f.name == "max_skips":
            p.add_argument(flag, type=float, default=default, help=f"{text} (default: {default})")
            continue
        if f.name == "warmup":   # None: main fills it in from --steps
            p.add_argument(flag, type=int, default=None,
                           help=f"{text} (default: {default}, or a tenth of --steps when that is fewer)")
            continue
        if typ.startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=f"{text} (default: {'the preset' if default is None else default})")
        else:
            conv = {"int": int, "float": float}.get(typ.split(" ")[0], str)
            shown = "the preset's" if default is None else repr(default)
            p.add_argument(flag, type=conv, default=default, choices=_FLAG_CHOICES.get(f.name),
                           help=f"{text} (default: {shown})")
    return p


def train_samples(stats: Stats | None) -> int | None:
    """The training split's sample count a dataset's statistics record (``meta``: ``n_train`` of the
    writers, else the train shards' ``nsamples``, else the ``samples`` counted), None when unknown."""
    meta = (stats.meta or {}) if stats is not None else {}
    if isinstance(meta.get("n_train"), int):
        return meta["n_train"]
    shards = {k: v for k, v in (meta.get("shards") or {}).items() if str(k).startswith("train-")}
    if shards and all(isinstance(v, dict) and isinstance(v.get("nsamples"), int) for v in shards.values()):
        return sum(v["nsamples"] for v in shards.values())
    return meta["samples"] if isinstance(meta.get("samples"), int) else None


def check_schedule_fits_data(cfg: TrainConfig, stats: Stats | None, world_size: int = 1,
                             where: str = "stats.json") -> None:
    """ValueError, one line, for a run that would fail or mislead late: a batch larger than the
    training data (one epoch would yield no batch, after start-up) or a warm-up longer than the run
    (the learning rate would never reach ``lr``)."""
    if cfg.warmup > cfg.steps:
        raise ValueError(f"--warmup {cfg.warmup} is longer than the run (--steps {cfg.steps}): the learning rate "
                         f"would peak at {cfg.lr * cfg.steps / cfg.warmup:.2g}, not --lr {cfg.lr:g}; "
                         f"pass --warmup {cfg.steps // 10} or fewer")
    n = train_samples(stats)
    if n is not None and cfg.batch_size * world_size > n:
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"--batch-size {cfg.batch_size}{per} is larger than the data: {n} training samples "
                         f"({where}); pass --batch-size {max(1, n // world_size)} or less")


def _check_args(cfg: TrainConfig) -> None:
    """Everything that can be checked before a run starts; ValueError with one line."""
    if not cfg.data:
        raise ValueError("--data DIR is required (a folder of train-*.tar shards)")
    if not Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data}: folder does not exist")
    shard_list(cfg.data, "train")                       # FileNotFoundError: no train shards
    cfg.model_config(data_stats(cfg.data))              # sizes from the data; pinned ones must agree
    check_schedule_fits_data(cfg, data_stats(cfg.data), int(os.environ.get("WORLD_SIZE", "1")),
                             str(Path(cfg.data) / "stats.json"))
    resolve_device(cfg.device)                          # a typo, or CUDA missing
    if cfg.warm_start:
        check_checkpoint_file(cfg.warm_start, "--warm-start")
    if cfg.resume not in ("", "auto", "none"):
        check_checkpoint_file(cfg.resume, "--resume")
    check_writable(cfg.out, "--out")


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    overrides = args.pop("model_overrides")
    if args["warmup"] is None:
        args["warmup"] = min(TrainConfig.warmup, args["steps"] // 10)
    try:
        model = parse_model_overrides(args["preset"], overrides, stats=data_stats(args["data"]),
                                      where=str(Path(args["data"]) / "stats.json"),
                                      use_dino_patches=args["use_dino_patches"], patch_pos_embed=args["patch_pos_embed"])
        cfg = TrainConfig(**args, model=model)
        _check_args(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise bad_arguments("nbcore.train", e) from None
    try:
        summary = train(cfg, val_fn=validation_hook, sample_fn=sample_grid_hook)
    except (ValueError, FileNotFoundError, KeyError, OSError, NonFiniteLossError, TooManySkipsError) as e:
        # DataError, CheckpointError are ValueErrors: one line naming the file and what is wrong
        raise SystemExit(f"nbcore.train: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
