"""``python -m nbcore.pretrained export CKPT OUT_DIR`` / ``step CKPT``: export a training checkpoint as
a model folder; read a checkpoint's step."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nbcore.checkpoint import checkpoint_step
from nbcore.model_folder import STATS
from nbcore.pretrained import save_pretrained


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
