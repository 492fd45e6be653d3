"""``python -m nbcore.encoders precompute IMAGES OUT --dino DIR --t5 DIR --vae DIR`` / ``nbcore-
encoders``: encode image + caption pairs into contract shards + stats.json; ``stand-ins OUT [--images N]``:
the plumbing stand-in encoders (and shapes images) for trying the real-data path without a download."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nbcore.codec import DTYPES
from nbcore.encoders import ImageSizeError, precompute, tiny_random_encoders
from nbcore.shapes import write_image_folder
from nbcore.utils import bad_arguments


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
    pc.add_argument("--image-size", type=int, default=None, help="square crop side in px; with --buckets the side of "
                    "the square bucket, whose area every bucket matches (default: the largest multiple of 8 latent "
                    "cells (the bucket step), at most 512, that upscales no image)")
    pc.add_argument("--allow-upscale", action="store_true",
                    help="encode at --image-size even where it enlarges an image (refused by default)")
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
    si = sub.add_parser("stand-ins", help="PLUMBING STAND-INS: tiny random DINOv3 / T5 / VAE folders (and shapes images)",
                        description="Write tiny randomly initialised DINOv3 / T5 / VAE models of the real classes to "
                                    "OUT_DIR/{dino,t5,vae} (nbcore.encoders.tiny_random_encoders) and, with --images N, "
                                    "a folder of N shapes-world images + captions at OUT_DIR/images: the real-data "
                                    "path end to end without a download. Their features mean nothing; models trained "
                                    "on them say so in their model card.")
    si.add_argument("out_dir", help="output folder (e.g. outputs/stand-ins)")
    si.add_argument("--seed", type=int, default=0, help="seed of the random weights and the scenes (default 0)")
    si.add_argument("--images", type=int, default=0, help="shapes-world images to write to OUT_DIR/images (default 0)")
    si.add_argument("--image-size", type=int, default=32, help="side of those images in px (default 32)")
    args = ap.parse_args(argv)
    if args.cmd == "stand-ins":
        return _stand_ins(ap, args)
    if (args.image_size is not None and args.image_size < 16) or args.batch_size < 1 or args.shard_size < 1 or args.workers < 0:
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
                             restart=args.restart, allow_upscale=args.allow_upscale)
    except ImageSizeError as e:
        raise bad_arguments("nbcore.encoders precompute", e) from None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    for reason, files in summary["skips"].items():
        print(f"skipped {len(files)} ({reason}): {_names(files)}", file=sys.stderr)
    if summary["caption_fallbacks"]:
        print(f"read {len(summary['caption_fallbacks'])} captions with a fallback encoding: "
              f"{_names(summary['caption_fallbacks'])}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _stand_ins(ap, args) -> int:
    if args.images < 0 or args.image_size < 16:
        ap.error("--images >= 0 and --image-size >= 16 are required")
    try:
        dirs = {k: str(v) for k, v in tiny_random_encoders(args.out_dir, seed=args.seed).items()}
        if args.images:
            dirs["images"] = str(write_image_folder(Path(args.out_dir) / "images", args.images,
                                                    image_size=args.image_size, seed=args.seed, rules="easy"))
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.out_dir}: {e}")
    print(json.dumps({**dirs, "note": "plumbing stand-ins: random weights, features mean nothing"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
