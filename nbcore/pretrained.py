"""Model folders by function: ``save_pretrained(ckpt_or_model, DIR)`` and ``from_pretrained(DIR)``,
thin wrappers of the one loader ``NanoDiT.from_pretrained`` / ``model.save_pretrained``
(``nbcore.model_folder``, where the folder's format is described), and a cheap checkpoint step read.

``from_pretrained(DIR, device) -> (NanoDiT in eval mode, info)``: ``NanoDiT.from_pretrained(DIR,
device, output_loading_info=True)``.

``checkpoint_step(CKPT)`` reads a training checkpoint's ``step`` without reading its tensors
(``nbcore.checkpoint.checkpoint_step``).

CLI:
    python -m nbcore.pretrained export CKPT OUT_DIR [--data DIR] [--weights ema|model] [--metrics JSON]
    python -m nbcore.pretrained step CKPT
"""
from __future__ import annotations

import sys
from pathlib import Path

from .checkpoint import checkpoint_data, checkpoint_step, read_model
from .model import ModelConfig, NanoDiT
from .model_folder import FORMAT, model_card

__all__ = ["save_pretrained", "from_pretrained", "checkpoint_step", "checkpoint_data", "model_card", "FORMAT"]


def save_pretrained(src, out_dir, stats=None, metrics: dict | None = None, card: str | None = None,
                    codec=None, weights: str = "ema") -> Path:
    """Write a model folder (``nbcore.model_folder``) and return its path.

    src: a training checkpoint path, a loaded checkpoint dict (``weights`` picks "ema" or "model")
    or a NanoDiT. stats, codec, metrics, card: ``NanoDiT.save_pretrained``'s. Weights that do not fit
    the checkpoint's config are refused before anything is written."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be ema|model, got {weights!r}")
    if isinstance(src, NanoDiT):
        return src.save_pretrained(out_dir, stats=stats, metrics=metrics, card=card, codec=codec)
    cfg, state, which, ck = read_model(src, weights)
    model = NanoDiT(ModelConfig(**cfg))
    model.load_state_dict(state)   # refuses weights that do not fit the config, before anything is written
    return model.save_pretrained(out_dir, stats=stats, metrics=metrics, card=card, codec=codec, checkpoint=ck,
                                 weights=which)


def from_pretrained(path, device: str = "cpu") -> tuple[NanoDiT, dict]:
    """(NanoDiT in eval mode on ``device``, info) from a model folder (or a training checkpoint):
    ``NanoDiT.from_pretrained(path, device, output_loading_info=True)``."""
    return NanoDiT.from_pretrained(path, device=device, output_loading_info=True)


if __name__ == "__main__":   # python -m nbcore.pretrained: the command line is nbcore.cli.pretrained's
    from nbcore.cli.pretrained import main as _main
    sys.exit(_main())
