"""Model sizes: the ModelConfig fields a dataset fixes, read from its statistics, and the checks
that a model fits its data.

A dataset fixes five sizes, named by their ``ModelConfig`` fields (``DATA_SIZES``): ``in_channels``
(latent channels C), ``input_size`` (the latent side), ``text_dim`` (Dt), ``dino_dim`` (Dd) and
``dino_grid`` (sqrt of the patch count P). A preset supplies the architecture (hidden size, depth,
heads, patch size, text_len, ...); ``model_config_for_data`` puts the data's sizes into it, and
``check_fits_data`` refuses, in one line naming both, a model whose sizes contradict the data's.
Used by training, by ``nbcore.data check --preset`` and by the shapes world's presets.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .codec import ShapesPixelCodec, codec_spec_from_stats
from .data import SampleSpec
from .model import ModelConfig
from .stats import Stats

__all__ = ["DATA_SIZES", "data_stats", "data_sizes", "model_config_for_data", "check_fits_data",
           "check_model_config"]


def check_model_config(base: ModelConfig, overrides: dict) -> ModelConfig:
    """``base`` with ``overrides`` applied, refusing (ValueError, one line) an unknown field, a value
    of the wrong type (``"depth": "3"``), a size below 1 (``"depth": 0`` would train nothing),
    and sizes that do not divide (hidden by heads, input by patch)."""
    types = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - set(types)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) in overrides: {sorted(unknown)}")
    for k, v in overrides.items():
        want = types[k]
        ok = (isinstance(v, bool) if want is bool else
              (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) if want is float else
              (isinstance(v, int) and not isinstance(v, bool)) if want is int else isinstance(v, want))
        if not ok:
            raise ValueError(f"model override {k}={v!r}: must be {want.__name__}")
        if want in (int, float) and not v > 0:
            raise ValueError(f"model override {k}={v!r}: must be > 0")
    cfg = dataclasses.replace(base, **overrides)  # ModelConfig checks heads | hidden and the pos-embed name
    if cfg.input_size % cfg.patch_size:
        raise ValueError(f"input_size {cfg.input_size} not divisible by patch_size {cfg.patch_size}")
    return cfg


# The ModelConfig sizes a dataset fixes (``data_sizes``); the preset supplies the rest.
DATA_SIZES = ("in_channels", "input_size", "text_dim", "dino_dim", "dino_grid")


def data_stats(folder) -> Stats | None:
    """The statistics of a data folder (FOLDER/stats.json, ``Stats.load``'s checks), or None when
    the folder has none (or ``folder`` is empty)."""
    path = Path(folder) / "stats.json" if folder else None
    return Stats.load(path) if path is not None and path.is_file() else None


def data_sizes(stats: Stats) -> dict[str, int]:
    """The model sizes a dataset's statistics fix, by ModelConfig field (DATA_SIZES order):
    ``in_channels`` = C (the ``latent`` entry's length), ``input_size`` = meta ``image_size`` // the
    codec's downsampling (the square bucket's latent side; the pixel codec's is 2), ``text_dim`` =
    Dt (``t5``), ``dino_dim`` = Dd (``dinov3``), ``dino_grid`` = sqrt(P), P the patch rows per CLS row
    in the entries' counts (``SampleSpec.from_stats``). A size the statistics do not record (older
    data: no latent entry, no image size or codec; P not a square) is left out."""
    spec = SampleSpec.from_stats(stats).sizes()                      # C, Dd, Dt; P from the counts
    grid = math.isqrt(spec.get("P", 0))
    meta = stats.meta or {}
    codec = codec_spec_from_stats(stats) or {}
    down = codec.get("downsample", ShapesPixelCodec.downsample if codec.get("kind") == "pixel" else None)
    side = meta["image_size"] // int(down) if isinstance(meta.get("image_size"), int) and down else None
    got = {"in_channels": spec.get("C"), "input_size": side, "text_dim": spec["Dt"], "dino_dim": spec["Dd"],
           "dino_grid": grid if grid and grid * grid == spec.get("P") else None}
    return {k: v for k, v in got.items() if v is not None}


def model_config_for_data(base: ModelConfig, stats: Stats) -> ModelConfig:
    """``base`` (a preset: the architecture) with the sizes the data fixes (``data_sizes``); checked
    by ``check_model_config`` (ValueError, one line, e.g. a latent side the patch size does not
    divide). Shapes-world data made at a preset gives exactly that preset."""
    return check_model_config(base, data_sizes(stats))


def check_fits_data(cfg: ModelConfig, stats: Stats, what: str, where: str = "stats.json") -> None:
    """ValueError, one line naming both, when ``cfg`` (from ``what``: "--model-overrides", a preset,
    a checkpoint) has a size other than the data's (``data_sizes``, from ``where``); the DINO grid
    counts only for a model that reads the patches."""
    data = data_sizes(stats)
    bad = [k for k, v in data.items() if getattr(cfg, k) != v and (k != "dino_grid" or cfg.use_dino_patches)]
    if bad:
        raise ValueError(f"data has {', '.join(f'{k} {data[k]}' for k in bad)} ({where}), "
                         f"the model {', '.join(f'{k} {getattr(cfg, k)}' for k in bad)} ({what})")
