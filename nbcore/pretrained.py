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

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import checkpoint_data, checkpoint_step, read_model
from .model import ModelConfig, NanoDiT
from .model_folder import FORMAT, STATS, model_card

__all__ = ["save_pretrained", "from_pretrained", "checkpoint_step", "checkpoint_data", "model_card", "FORMAT", "main"]


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbcore.pretrained",
                                 description="Export a training checkpoint as a shareable model folder; read a checkpoint's step.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="CKPT -> OUT_DIR with config.json, model.safetensors, stats.json, README.md",
                        description="Write a model folder (config.json, EMA weights as model.safetensors, the data "
                                    "statistics, a model card) that nbcore.pretrained.from_pretrained loads.")
    ex.add_argument("ckpt", help="a training checkpoint (OUT/ckpt/last.pt or step_XXXXXX.pt)")
    ex.add_argument("out_dir", help="the model folder to write")
    ex.add_argument("--data", default=None, help="the data folder whose stats.json goes with the model "
                    "(default: the checkpoint's training data folder)")
    ex.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA (default) or the raw weights")
    ex.add_argument("--metrics", default=None, help="a JSON file of metrics (e.g. nbcore.validate's metrics.json) for the card")
    ex.add_argument("--card", default=None, help="a Markdown file appended to README.md as notes")
    st = sub.add_parser("step", help="print a checkpoint's step without loading its tensors")
    st.add_argument("ckpt", help="a training checkpoint")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "step":
            print(checkpoint_step(args.ckpt))
            return 0
        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
        stats = None
        if args.data is not None:
            stats = Path(args.data) / STATS
            if not stats.is_file():
                raise FileNotFoundError(f"no {STATS} in --data {args.data}")
        metrics = None
        if args.metrics:
            metrics = json.loads(Path(args.metrics).read_text())
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        card = Path(args.card).read_text() if args.card else None
        out = save_pretrained(args.ckpt, args.out_dir, stats=stats, metrics=metrics, card=card, weights=args.weights)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
