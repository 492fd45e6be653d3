"""``python -m nbcore.bench --json PATH`` / ``nbcore-bench``: time NanoDiT against the PixArt peer
(training and sampling steps) and write the cases as JSON."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nbcore.bench import (CASES, TRAIN_CASES, _capture_case, _guidance_case, _import_pixart, _train_case, markdown,
                          measure_peak_tflops)
from nbcore.model import preset
from nbcore.report import provenance
from nbcore.utils import repo_root, resolve_device, write_json


def run(args) -> list[dict]:
    """Run the selected cases; returns the list written to ``args.json``."""
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.preset == "auto":
        args.preset = "production" if device.type == "cuda" else "tiny"
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    cfg = preset(args.preset)
    if any(c in TRAIN_CASES for c in args.cases):
        _import_pixart()
    # MFU only on GPU: a shared CPU's measured matmul rate moves with the neighbours' load.
    peak = (measure_peak_tflops(device, args.dtype)
            if device.type == "cuda" and any(c in TRAIN_CASES for c in args.cases) else None)
    results = []
    for name in tqdm(args.cases, desc="bench cases", file=sys.stderr):
        if name in TRAIN_CASES:
            results.append(_train_case(name, cfg, args, device, peak))
        elif name == "guidance":
            results.append(_guidance_case(cfg, args, device))
        else:
            results.append(_capture_case(cfg, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    made = {"command": getattr(args, "command", "python -m nbcore.bench"),
            "commit": provenance(repo_root(Path(__file__).parent))["commit"]}
    results = [{**r, **made} for r in results]
    out = Path(args.json)
    write_json(results, out)
    out.with_suffix(".md").write_text(markdown(results, cfg))
    return results


def _positive(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _spread(s):
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nbcore.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="output JSON (a .md table is written beside it); "
                    "default outputs/bench/bench-<device>.json")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--preset", default="auto", choices=["auto", "tiny", "production"],
                    help="model sizes; auto = production on CUDA, tiny on CPU")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto = bf16 autocast on CUDA, fp32 on CPU (same for both models)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                    help=f"subset of {', '.join(CASES)} (default: all)")
    ap.add_argument("--steps", type=_positive, default=50, help="timed steps per model (median reported)")
    ap.add_argument("--warmup", type=_nonneg, default=10, help="untimed steps first")
    ap.add_argument("--batch", type=_positive, default=32, help="samples per step (default 32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (training cases)")
    ap.add_argument("--peer-fuse-qkv", action="store_true", help="PixArt with diffusers' fuse_qkv_projections()")
    ap.add_argument("--sample-steps", type=_positive, default=10, help="Euler steps per image in the guidance case")
    ap.add_argument("--sample-repeats", type=_positive, default=5, help="timed sampling runs per variant")
    ap.add_argument("--caption-spread", type=_spread, default=0.5,
                    help="captions in a batch have n(1-spread)..n real tokens (0 = all n)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic batches and the init (default 0)")
    args = ap.parse_args(argv)
    try:
        resolve_device(args.device)
    except (RuntimeError, ValueError) as e:
        ap.error(f"--device {args.device!r}: {e}")
    if args.json is None:
        args.json = f"outputs/bench/bench-{resolve_device(args.device).type}.json"
    if not str(args.json).endswith(".json"):
        ap.error(f"--json must name a .json file, got {args.json!r}")
    return args


def main(argv=None) -> int:
    """The CLI (``python -m nbcore.bench``, ``nbcore-bench``): run the cases, write the JSON and the table."""
    args = parse_args(argv)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    args.command = threads + "python -m nbcore.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = run(args)
    for r in results:
        print(f"{r['case']:>9}: NanoDiT {r['nbcore_samples_per_s']:.1f}/s, other {r['peer_samples_per_s']:.1f}/s, "
              f"ratio {r['ratio']:.2f}x")
    print(f"wrote {args.json} and {Path(args.json).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
