"""``TrainConfig``: everything a training run needs, one frozen dataclass; each field carries its
help text (``field(metadata={"help": ...})``), from which the command line (``nbcore.cli.train``)
builds one flag per field. Also the model a run trains: ``TrainConfig.model_config`` (the preset's
architecture at the data's sizes, ``nbcore.sizes``) and ``parse_model_overrides`` (the CLI's
``--model-overrides JSON``).

With ``model=None`` (the CLI without ``--model-overrides``) the model is the preset with the sizes
the data's stats.json fixes (``model_config_for_data``: latent channels and side, text dim, DINO dim
and grid); the preset supplies the architecture (hidden size, depth, heads, patch size, text_len,
...). Sizes pinned by ``--model-overrides`` or an explicit ``model`` win, and one that contradicts
the data is a ValueError naming both (``check_fits_data``); so is resuming a checkpoint whose sizes
differ from the data's.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .model import PRESETS, ModelConfig
from .sizes import check_fits_data, check_model_config, model_config_for_data
from .stats import Stats

__all__ = ["TrainConfig", "parse_model_overrides", "skip_allowance", "field_help"]


def _field(default, help: str, choices: tuple | None = None):
    """A TrainConfig field: its default, its help text and the values it accepts (None = any)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def field_help() -> dict[str, str]:
    """Field name -> help text, for every TrainConfig field (the command line's flags)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; stored in every checkpoint as ``train_config`` (``asdict``: plain
    dicts, ``model`` included; ``TrainConfig.from_dict`` rebuilds it)."""
    # model: ``model`` (None = the preset's with the data's sizes), then these two fields over it when set
    preset: str = _field(
        "tiny", "model preset: the architecture (hidden size, depth, heads, patch, text_len); sizes from the data",
        choices=tuple(sorted(PRESETS)))
    model: ModelConfig | None = _field(
        None, "JSON object of ModelConfig fields over the preset, e.g. '{\"depth\": 2}'; the sizes (in_channels, "
        "input_size, text_dim, dino_dim, dino_grid) come from the data's stats.json, a pinned one must "
        "agree")
    use_dino_patches: bool | None = _field(
        None, "condition on the DINO patch tokens (--no-use-dino-patches: the pre-patch model)")
    patch_pos_embed: str | None = _field(
        None, "position of the patches in the context: none, learned or sincos (added to the patch), rope (rotary "
        "queries and patch keys); other ModelConfig fields (patch_norm, context_gate) through --model",
        choices=("none", "learned", "sincos", "rope"))
    # data and output
    data: str = _field("", "folder with train-*.tar shards (+ stats.json, which gives the model its sizes)")
    out: str = _field("outputs/train", "output folder: ckpt/, log.jsonl, val/, samples/")
    shuffle: int = _field(1000, "shuffle buffer of the loader in samples (0 = off)")
    num_workers: int = _field(0, "DataLoader worker processes per rank")
    # bad samples (nbcore.data.SampleRule) are skipped and counted by reason, up to max_skips:
    # below 1 a fraction of the samples read (rounded up, so one bad sample never stops a run),
    # from 1 a count; strict fails on the first one instead
    max_skips: float = _field(
        0.01, "bad samples skipped before the run stops: a fraction of the samples read (< 1, rounded up) or a "
        "count (>= 1)")
    strict: bool = _field(False, "stop at the first bad sample instead of skipping and counting it")
    # optimisation
    steps: int = _field(1000, "optimiser steps (including skipped ones)")
    batch_size: int = _field(32, "samples per process and micro-batch")
    grad_accum: int = _field(1, "micro-batches per optimiser step")
    lr: float = _field(3e-4, "peak learning rate (AdamW)")
    warmup: int = _field(100, "linear warmup steps")
    schedule: str = _field("cosine", "learning rate after warmup", choices=("cosine", "constant"))
    lr_min_ratio: float = _field(0.1, "cosine ends at lr * lr_min_ratio")
    weight_decay: float = _field(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = _field(1.0, "max total gradient norm (0 = no clipping; the norm is still logged)")
    ema_decay: float = _field(0.999, "EMA decay of the averaged weights")
    # per-sample CFG dropout (docs/DESIGN.md): keep = 1 - the three others
    p_drop_both: float = _field(0.10, "probability a sample drops text and DINO")
    p_text_only: float = _field(0.30, "probability a sample keeps only the text (DINO dropped)")
    p_dino_only: float = _field(0.05, "probability a sample keeps only DINO (text dropped)")
    # timesteps
    timestep_sampling: str = _field(
        "logit_normal", "distribution of the training timesteps t",
        choices=("logit_normal", "uniform"))
    logit_mean: float = _field(0.0, "mean of the logit-normal t")
    logit_std: float = _field(1.0, "std of the logit-normal t")
    loss_bins: int = _field(10, "t-bins of the logged loss by timestep")
    # runtime
    device: str = _field("auto", "auto | cpu | cuda | cuda:N")
    seed: int = _field(0, "seed of the init, the data order and the t / noise / dropout draws")
    compile: bool = _field(False, "torch.compile the model")
    progress: bool = _field(True, "show a progress bar")
    tensorboard: bool = _field(False, "also write OUT/tensorboard/ (nbcore.tracking): scalars, validation metrics, "
                               "a fixed-scene sample grid at each milestone")
    # intervals in optimiser steps (0 = off)
    log_every: int = _field(10, "steps between log records")
    ckpt_every: int = _field(500, "steps between OUT/ckpt/last.pt writes (0 = only at the end)")
    milestone_every: int = _field(
        0, "steps between kept OUT/ckpt/step_XXXXXX.pt copies: model + EMA, no optimiser state (0 = none)")
    val_every: int = _field(0, "steps between validation runs on the val shards (0 = off)")
    sample_every: int = _field(0, "steps between sample grids in OUT/samples (0 = off)")
    val_n: int = _field(16, "samples scored by each validation run")
    val_sample_steps: int = _field(10, "Euler steps of the validation and sample-grid hooks")
    nan_max_consecutive: int = _field(5, "stop after this many non-finite steps in a row")
    # warm start / resume
    warm_start: str = _field("", "checkpoint to warm-start from (e.g. a pre-patch run)")
    warm_start_lr_scale: float = _field(0.5, "learning-rate factor when warm-starting")
    # lr multiplier for the parameters the pre-patch architecture lacks (NanoDiT.new_parameter_names:
    # dino_patch_proj, dino_patch_tie, null_dino_patches, patch_pos), on top of the (warm-start scaled) base lr
    new_param_lr_scale: float = _field(
        1.0, "extra learning-rate factor of the parameters the pre-patch model lacks")
    warm_start_weights: str = _field(
        "model", "which weights of the warm-start checkpoint",
        choices=("model", "ema"))
    resume: str = _field(
        "auto", "auto (OUT/ckpt/last.pt if present, else the newest readable milestone, its optimiser restarted),"
        " none, or a checkpoint PATH")

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
