"""``python -m nbcore.data`` / ``nbcore-data``: shard tools. ``check`` counts samples, patches and
bad samples per shard with the training loader's rule (optionally against a preset or a
checkpoint's sizes); ``stats`` computes the normalisation statistics -> stats.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from nbcore.checkpoint import read_config
from nbcore.data import SampleSpec, check_shards, compute_stats, default_stats, expand_shards
from nbcore.model import PRESETS
from nbcore.sizes import model_config_for_data
from nbcore.stats import DataError, Stats
from nbcore.utils import ArgParser


def _model_spec(preset_name: str | None, checkpoint: str | None, stats=None) -> SampleSpec | None:
    """The CLI's ``--preset`` / ``--checkpoint``: the model config to check against. A preset is
    taken as training takes it: its architecture at the sizes ``stats`` (a path, or None) records
    (``nbcore.sizes.model_config_for_data``)."""
    if checkpoint:
        return SampleSpec.from_model(read_config(checkpoint))
    if preset_name:
        if preset_name not in PRESETS:
            raise ValueError(f"--preset {preset_name!r}: not a model preset; choose from {sorted(PRESETS)}")
        cfg = PRESETS[preset_name]
        return SampleSpec.from_model(model_config_for_data(cfg, Stats.load(stats)) if stats else cfg)
    return None


def main(argv=None) -> int:
    ap = ArgParser(prog="python -m nbcore.data", description="WebDataset shard tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("check", help="count samples, patches and bad samples per shard, with the training "
                                      "loader's rule (last line: JSON)")
    ck.add_argument("shards", help="folder, brace pattern or glob, quoted: 'DIR/train-{000000..000009}.tar'")
    ck.add_argument("--strict", action="store_true", help="exit non-zero at the first bad sample")
    ck.add_argument("--stats", default="auto",
                    help="stats.json to check sizes against: auto (beside the shards, as training), none, or a PATH")
    model = ck.add_mutually_exclusive_group()
    model.add_argument("--preset", default=None, metavar="NAME",
                       help="also check against this model preset (nbcore.model.PRESETS: tiny, production, ...) at the data's "
                            "sizes, as training builds it")
    model.add_argument("--checkpoint", default=None, help="also check against this checkpoint's model sizes")
    st = sub.add_parser("stats", help="compute normalisation statistics -> stats.json")
    st.add_argument("shards", help="folder, brace pattern or glob of the shards to average over (quoted)")
    st.add_argument("--out", required=True, help="where to write stats.json")
    args = ap.parse_args(argv)
    try:
        expand_shards(args.shards)
    except FileNotFoundError as e:                  # a pattern that matches nothing: a bad argument
        ap.error(str(e))
    try:
        if args.cmd == "check":
            if args.checkpoint and not Path(args.checkpoint).is_file():
                ap.error(f"--checkpoint {args.checkpoint}: no such file")
            if args.stats not in ("auto", "none") and not Path(args.stats).is_file():
                ap.error(f"--stats {args.stats}: no such file")
            stats = None if args.stats == "none" else args.stats
            stats_path = default_stats(expand_shards(args.shards)) if stats == "auto" else stats
            try:
                expect = _model_spec(args.preset, args.checkpoint, stats_path)
            except ValueError as e:    # an unknown preset, an unreadable checkpoint: bad arguments
                ap.error(str(e).splitlines()[0])
            res = check_shards(args.shards, strict=args.strict, stats=stats, expect=expect)
            for shard, c in res["per_shard"].items():
                print(f"{shard}: {c['samples']} samples, {c['with_patches']} with patches, "
                      f"{c['good']} good, skipped {c['skipped'] or 0}")
            summary = {k: v for k, v in res.items() if k != "per_shard"}
            print(json.dumps(summary))
        else:
            stats = compute_stats(args.shards, progress=True)
            stats.save(args.out)
            print(f"wrote {args.out} ({stats.meta['samples']} samples, skipped {stats.meta['skipped']})")
    except (DataError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {str(e).splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
