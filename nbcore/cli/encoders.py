"""``python -m nbcore.encoders precompute IMAGES OUT --dino DIR --t5 DIR --vae DIR`` / ``nbcore-
encoders``: encode image + caption pairs into contract shards + stats.json."""
from __future__ import annotations

import argparse
import json
import sys

from nbcore.codec import DTYPES
from nbcore.encoders import precompute


def _names(files: list, limit: int = 10) -> str:
    """Up to ``limit`` file names for a terminal line; the JSON summary lists them all."""
    more = f" and {len(files) - limit} more (all in the JSON summary)" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbcore.encoders",
                                 description="Precompute DINOv3 / T5 / VAE features into WebDataset shards (local weights only)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("precompute", help="folder of name.jpg|png|webp + name.txt -> shards + stats.json",
                        description="Encode image + caption pairs into contract shards + stats.json. Resumable: rerun "
                                    "the same command after a crash and the finished shards are kept.")
    pc.add_argument("images_dir", help="folder of name.jpg|png|webp images, each with a name.txt caption")
    pc.add_argument("out_dir", help="output folder for train-NNNNNN.tar / val-NNNNNN.tar, stats.json, precompute.json")
    pc.add_argument("--dino", required=True, help="local DINOv3 ViT folder (transformers)")
    pc.add_argument("--t5", required=True, help="local T5 encoder + tokenizer folder (transformers)")
    pc.add_argument("--vae", required=True, help="local AutoencoderKL folder (diffusers)")
    pc.add_argument("--image-size", type=int, default=512, help="square crop side in px; with --buckets the side of "
                    "the square bucket, whose area every bucket matches (default 512)")
    pc.add_argument("--buckets", action="store_true", help="aspect-ratio buckets instead of a square centre crop")
    pc.add_argument("--bucket-step", type=int, default=None,
                    help="bucket sides are multiples of this many px (default 8 latent cells: 64 px for an 8x VAE)")
    pc.add_argument("--max-aspect", type=float, default=2.0, help="widest bucket aspect ratio (default 2.0)")
    pc.add_argument("--batch-size", type=int, default=8, help="images encoded together (per bucket)")
    pc.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    pc.add_argument("--val-fraction", type=float, default=0.0, help="share of pairs written to val-*.tar")
    pc.add_argument("--seed", type=int, default=0, help="seeds the train/val assignment")
    pc.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images (default 0: in process)")
    pc.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    pc.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype of all three encoders")
    for name in ("dino", "t5", "vae"):
        pc.add_argument(f"--{name}-dtype", default=None, choices=sorted(DTYPES), help=f"{name} dtype (default: --dtype)")
    pc.add_argument("--no-png", action="store_true", help="do not store the source image")
    pc.add_argument("--restart", action="store_true", help="discard an unfinished run in OUT_DIR instead of continuing it")
    pc.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.image_size < 16 or args.batch_size < 1 or args.shard_size < 1 or args.workers < 0:
        ap.error("--image-size >= 16, --batch-size >= 1, --shard-size >= 1 and --workers >= 0 are required")
    if not 0 <= args.val_fraction < 1:
        ap.error("--val-fraction must be in [0, 1)")
    if args.max_aspect < 1:
        ap.error("--max-aspect must be >= 1")
    try:
        summary = precompute(args.images_dir, args.out_dir, args.dino, args.t5, args.vae, args.image_size,
                             args.batch_size, args.shard_size, args.val_fraction, args.seed, args.device,
                             args.dtype, not args.no_png, not args.no_progress, dino_dtype=args.dino_dtype,
                             t5_dtype=args.t5_dtype, vae_dtype=args.vae_dtype, workers=args.workers,
                             buckets=args.buckets, bucket_step=args.bucket_step, max_aspect=args.max_aspect,
                             restart=args.restart)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    for reason, files in summary["skips"].items():
        print(f"skipped {len(files)} ({reason}): {_names(files)}", file=sys.stderr)
    if summary["caption_fallbacks"]:
        print(f"read {len(summary['caption_fallbacks'])} captions with a fallback encoding: "
              f"{_names(summary['caption_fallbacks'])}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
