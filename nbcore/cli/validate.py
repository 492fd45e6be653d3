"""``python -m nbcore.validate CKPT [CKPT ...] --data DIR --out DIR`` / ``nbcore-validate``: score
checkpoints on the validation split (metrics.json, sample grids)."""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from tqdm.auto import tqdm

from nbcore.data import Stats, shard_list
from nbcore.encoders import DataEncoders, data_encoders
from nbcore.metrics import LPIPSMetric
from nbcore.sample import Guidance
from nbcore.utils import (ArgParser, bad_arguments, check_checkpoint_file, check_writable, resolve_device,
                          write_json)
from nbcore.validate import DEFAULT_GUIDANCE, DEFAULT_STEPS, PHASES, _guidance_str, _stats_path, validate_checkpoint


def _tag(i: int, path: str) -> str:
    """Output sub-folder name of the i-th checkpoint: index + two parent folders + stem
    (the trainer's OUT/ckpt/last.pt -> 00_OUT_ckpt_last), so runs stay recognisable."""
    p = Path(path).resolve()
    raw = "_".join([f"{i:02d}"] + [x for x in (p.parent.parent.name, p.parent.name, p.stem) if x])
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)


def _parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="python -m nbcore.validate",
                   description="Validation suite (reconstruction, layout, DINO swap, text only) "
                               "for NanoDiT checkpoints on a shapes-world or precomputed real dataset.")
    ap.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (nbcore format)")
    ap.add_argument("--data", required=True, help="dataset folder with val-*.tar and stats.json")
    ap.add_argument("--vae", default=None,
                    help="real data: the VAE folder the latents were made with, where the recorded one moved")
    ap.add_argument("--dino", default=None,
                    help="real data: the DINOv3 folder the data was encoded with (for the DINO-space layout "
                         "score), where the recorded one moved")
    ap.add_argument("--out", default="outputs/validate", help="output folder (default outputs/validate)")
    ap.add_argument("--n", type=int, default=16, help="validation samples (default 16)")
    ap.add_argument("--split", default="val", choices=["val", "train"],
                    help="shards scored: val (default), or train for a folder without a val split (optimistic: seen in training)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Euler steps (default {DEFAULT_STEPS}, the experiment's)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    ap.add_argument("--formula", default=DEFAULT_GUIDANCE.formula, choices=["independent", "nested"],
                    help="guidance formula (see nbcore.sample)")
    ap.add_argument("--text-scale", type=float, default=DEFAULT_GUIDANCE.text_scale,
                    help=f"guidance scale s_t of the text (default {DEFAULT_GUIDANCE.text_scale:g})")
    ap.add_argument("--dino-scale", type=float, default=DEFAULT_GUIDANCE.dino_scale,
                    help=f"guidance scale s_d of DINO (default {DEFAULT_GUIDANCE.dino_scale:g})")
    ap.add_argument("--patch-scale", type=float, default=None,
                    help="separate patch scale (adds the CLS-only branch; see nbcore.sample)")
    ap.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
                    help="apply guidance only for t in [T_LO, T_HI]")
    ap.add_argument("--batch-size", type=int, default=64, help="samples per sampler call")
    ap.add_argument("--sequential", action="store_true", help="one forward per guidance branch (default: batched)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even when the checkpoint has EMA")
    ap.add_argument("--lpips-weights", default=None,
                    help="path to torchvision's alexnet-owt-7be5be79.pth (else $TORCH_HOME/hub/checkpoints)")
    return ap


def _check_args(a) -> tuple[Guidance, str]:
    """Every argument checked before any work: ValueError with one line. Returns the guidance and
    the resolved device."""
    for name in ("n", "steps", "batch_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("text_scale", "dino_scale", "patch_scale"):
        v = getattr(a, name)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if not all(math.isfinite(t) for t in a.interval):
        raise ValueError(f"--interval must be two finite numbers, got {list(a.interval)}")
    if len(set(a.checkpoints)) != len(a.checkpoints):
        raise ValueError("a checkpoint is given twice")
    for c in a.checkpoints:
        check_checkpoint_file(c, "checkpoint")
    if not Path(a.data).is_dir():
        raise ValueError(f"--data {a.data}: not a folder")
    try:
        shard_list(a.data, a.split)
    except FileNotFoundError as e:                      # no shards of that split
        hint = " (precompute with --val-fraction, or score training samples with --split train)" if a.split == "val" else ""
        raise FileNotFoundError(f"{e}{hint}") from None
    _stats_path(a.data)
    for flag in ("vae", "dino"):
        if getattr(a, flag) is not None and not Path(getattr(a, flag)).is_dir():
            raise ValueError(f"--{flag} {getattr(a, flag)}: not a folder")
    guidance = Guidance(a.formula, a.text_scale, a.dino_scale, a.patch_scale, tuple(a.interval))
    device = str(resolve_device(a.device))              # a typo, or CUDA missing
    check_writable(a.out, "--out")
    return guidance, device


def _cli_encoders(a, device: str) -> DataEncoders | None:
    """Precomputed real data: its DINO and codec, loaded once for every checkpoint (a missing folder
    is a bad argument). Shapes world: None (cheap stand-ins at each checkpoint's sizes)."""
    stats = Stats.load(_stats_path(a.data))
    if (stats.meta or {}).get("source") != "nbcore.encoders.precompute":
        return None
    return data_encoders(stats, dino=a.dino, vae=a.vae, device=device)


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        guidance, device = _check_args(a)
        encoders = _cli_encoders(a, device)
    except (ValueError, FileNotFoundError) as e:
        raise bad_arguments(ap.prog, e) from None
    out = Path(a.out)
    lp = LPIPSMetric(weights=a.lpips_weights, device=device)
    if not lp.available:
        print(lp.status, file=sys.stderr)
    results: dict = {}
    bar = tqdm(total=len(PHASES) * len(a.checkpoints), desc="validate", unit="phase")
    try:
        for i, ckpt in enumerate(a.checkpoints):
            bar.set_postfix_str(Path(ckpt).name)
            try:
                results[ckpt] = validate_checkpoint(
                    ckpt, a.data, out_dir=out / _tag(i, ckpt), n=a.n, steps=a.steps, seed=a.seed,
                    guidance=guidance, device=device, use_ema=not a.no_ema, batch_size=a.batch_size,
                    guidance_batched=not a.sequential, lpips=lp, bar=bar, encoders=encoders, split=a.split)
            except (ValueError, FileNotFoundError) as e:
                msg = str(e).splitlines()[0]   # a CheckpointError already names the file
                raise SystemExit(f"validate: {msg if str(ckpt) in msg else f'{ckpt}: {msg}'}") from None
    finally:
        bar.close()
    summary = {"settings": {"data": str(a.data), "split": a.split, "vae": a.vae, "dino": a.dino, "n": a.n, "steps": a.steps,
                            "seed": a.seed, "device": device, "guidance": _guidance_str(guidance),
                            "guidance_batched": not a.sequential, "use_ema": not a.no_ema},
               "lpips_status": lp.status, "checkpoints": results}
    path = write_json(summary, out / "metrics.json")
    for ckpt, r in results.items():
        print(f"{ckpt}: scored {r['n']} of {r['n_asked']} samples asked ({r['selection']}); guidance {r['guidance']}, "
              f"{r['steps']} steps")
        print(f"{ckpt}: recon PSNR {r['recon_psnr']:.2f} dB, LPIPS {_fmt(r['recon_lpips'])}, "
              f"DINO layout corr {_fmt(r['recon_dino_layout_corr'])} (rolled {_fmt(r['dino_layout_corr_rolled'])}, "
              f"other image {_fmt(r['dino_layout_corr_other_image'])}), layout {_fmt(r['recon_layout_error'])}, "
              f"text-only layout {_fmt(r['textonly_layout_error'])}, "
              f"swap follows DINO {_fmt(r['swap_follows_dino_rate'])}; figure {r['figure']}")
    print(f"wrote {path}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
