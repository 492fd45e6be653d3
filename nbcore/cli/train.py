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
from nbcore.model import PRESETS
from nbcore.sizes import data_stats
from nbcore.train import NonFiniteLossError, TooManySkipsError, TrainConfig, parse_model_overrides, train
from nbcore.utils import ArgParser, bad_arguments, check_checkpoint_file, check_writable, resolve_device
from nbcore.validate import sample_grid_hook, validation_hook

# One help line per TrainConfig field (tests/test_cli.py checks every flag has one); choices where
# the config accepts a fixed set.
_FLAG_HELP = {
    "preset": "model preset: the architecture (hidden size, depth, heads, patch, text_len); sizes from the data",
    "use_dino_patches": "condition on the DINO patch tokens (--no-use-dino-patches: the pre-patch model)",
    "patch_pos_embed": "position embedding of the patches in the context",
    "model": "JSON object of ModelConfig fields over the preset, e.g. '{\"depth\": 2}'; the sizes (in_channels, "
             "input_size, text_dim, dino_dim, dino_grid) come from the data's stats.json, a pinned one must agree",
    "data": "folder with train-*.tar shards (+ stats.json, which gives the model its sizes)",
    "out": "output folder: ckpt/, log.jsonl, val/, samples/",
    "shuffle": "shuffle buffer of the loader in samples (0 = off)",
    "num_workers": "DataLoader worker processes per rank",
    "steps": "optimiser steps (including skipped ones)",
    "batch_size": "samples per process and micro-batch",
    "grad_accum": "micro-batches per optimiser step",
    "lr": "peak learning rate (AdamW)",
    "warmup": "linear warmup steps",
    "schedule": "learning rate after warmup",
    "lr_min_ratio": "cosine ends at lr * lr_min_ratio",
    "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "max total gradient norm (0 = no clipping; the norm is still logged)",
    "ema_decay": "EMA decay of the averaged weights",
    "p_drop_both": "probability a sample drops text and DINO",
    "p_text_only": "probability a sample keeps only the text (DINO dropped)",
    "p_dino_only": "probability a sample keeps only DINO (text dropped)",
    "timestep_sampling": "distribution of the training timesteps t",
    "logit_mean": "mean of the logit-normal t",
    "logit_std": "std of the logit-normal t",
    "loss_bins": "t-bins of the logged loss by timestep",
    "device": "auto | cpu | cuda | cuda:N",
    "seed": "seed of the init, the data order and the t / noise / dropout draws",
    "compile": "torch.compile the model",
    "progress": "show a progress bar",
    "log_every": "steps between log records",
    "ckpt_every": "steps between OUT/ckpt/last.pt writes (0 = only at the end)",
    "milestone_every": "steps between kept OUT/ckpt/step_XXXXXX.pt copies: model + EMA, no optimiser state (0 = none)",
    "val_every": "steps between validation runs on the val shards (0 = off)",
    "sample_every": "steps between sample grids in OUT/samples (0 = off)",
    "val_n": "samples scored by each validation run",
    "val_sample_steps": "Euler steps of the validation and sample-grid hooks",
    "nan_max_consecutive": "stop after this many non-finite steps in a row",
    "warm_start": "checkpoint to warm-start from (e.g. a pre-patch run)",
    "warm_start_lr_scale": "learning-rate factor when warm-starting",
    "new_param_lr_scale": "extra learning-rate factor of the parameters the pre-patch model lacks",
    "warm_start_weights": "which weights of the warm-start checkpoint",
    "resume": "auto (OUT/ckpt/last.pt if present, else the newest readable milestone, its optimiser restarted), "
              "none, or a checkpoint PATH",
    "max_skips": "bad samples skipped before the run stops: a fraction of the samples read (< 1, rounded up) "
                 "or a count (>= 1)",
    "strict": "stop at the first bad sample instead of skipping and counting it",
}
_FLAG_CHOICES = {
    "preset": sorted(PRESETS), "patch_pos_embed": ["none", "learned", "sincos"],
    "schedule": ["cosine", "constant"], "timestep_sampling": ["logit_normal", "uniform"],
    "warm_start_weights": ["model", "ema"],
}


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
        if typ.startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=f"{text} (default: {'the preset' if default is None else default})")
        else:
            conv = {"int": int, "float": float}.get(typ.split(" ")[0], str)
            shown = "the preset's" if default is None else repr(default)
            p.add_argument(flag, type=conv, default=default, choices=_FLAG_CHOICES.get(f.name),
                           help=f"{text} (default: {shown})")
    return p


def _check_args(cfg: TrainConfig) -> None:
    """Everything that can be checked before a run starts; ValueError with one line."""
    if not cfg.data:
        raise ValueError("--data DIR is required (a folder of train-*.tar shards)")
    if not Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data}: folder does not exist")
    shard_list(cfg.data, "train")                       # FileNotFoundError: no train shards
    cfg.model_config(data_stats(cfg.data))              # sizes from the data; pinned ones must agree
    resolve_device(cfg.device)                          # a typo, or CUDA missing
    if cfg.warm_start:
        check_checkpoint_file(cfg.warm_start, "--warm-start")
    if cfg.resume not in ("", "auto", "none"):
        check_checkpoint_file(cfg.resume, "--resume")
    check_writable(cfg.out, "--out")


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    overrides = args.pop("model_overrides")
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
