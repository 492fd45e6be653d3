"""``python -m nbcore.shapes make OUT_DIR --n N`` / ``nbcore-shapes``: write a shapes-world dataset
(shards + stats.json) at a preset's sizes."""
from __future__ import annotations

import argparse
import sys

from nbcore.shapes import RULES, WORLDS, make_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbcore.shapes",
                                 description="The shapes world: the embedded default dataset, made by the project itself.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write shapes-world shards + stats.json")
    mk.add_argument("out_dir", help="output folder (e.g. outputs/data/shapes)")
    mk.add_argument("--n", type=int, required=True, help="total samples (train + val)")
    mk.add_argument("--seed", type=int, default=0, help="world seed: the scenes (default 0)")
    mk.add_argument("--preset", default="tiny", choices=sorted(WORLDS), help="sizes of this model preset (default tiny)")
    mk.add_argument("--rules", default="standard", choices=sorted(RULES),
                    help="what scenes hold: standard (1-3 shapes, 6 colours) or easy (1-2 larger shapes, 4 colours)")
    mk.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in the val split (default 0.1)")
    mk.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    mk.add_argument("--batch-size", type=int, default=256, help="samples encoded together")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    if not 0 <= args.val_fraction < 1:
        ap.error("--val-fraction must be in [0, 1)")
    if args.shard_size < 1 or args.batch_size < 1:
        ap.error("--shard-size and --batch-size must be >= 1")
    try:
        out = make_dataset(args.out_dir, args.n, args.seed, args.preset, args.val_fraction,
                           args.shard_size, args.batch_size, rules=args.rules)
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.out_dir}: {e}")
    print(f"wrote {args.n} samples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
