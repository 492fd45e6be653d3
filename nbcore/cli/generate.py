"""``nbcore-generate MODEL "a caption" [--dino-image IMG] ...`` / ``python -m nbcore.pipeline``: images
from a model folder (or a training checkpoint) in one call (``nbcore.pipeline.NanoDiTPipeline``);
``--card`` adds a sample grid to the model folder's card."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nbcore.pipeline import (DEFAULT_DINO_SCALE, DEFAULT_STEPS, DEFAULT_TEXT_SCALE, NanoDiTPipeline,
                             write_card_samples)
from nbcore.utils import ArgParser, bad_arguments


def _parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="nbcore-generate", description="Generate images from a model folder (or a training "
                   "checkpoint) and a caption, optionally with a DINO image: the encoders and codec of the "
                   "model's data, nested guidance.")
    ap.add_argument("model", help="a save_pretrained folder (python -m nbcore.pretrained export) or a checkpoint")
    ap.add_argument("caption", nargs="?", default=None, help="the caption (omit with --dino-image: DINO only)")
    ap.add_argument("--dino-image", default=None, help="image file whose DINO CLS + patches condition the sample")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Euler steps (default {DEFAULT_STEPS})")
    ap.add_argument("--text-scale", type=float, default=DEFAULT_TEXT_SCALE,
                    help=f"text guidance scale (default {DEFAULT_TEXT_SCALE:g})")
    ap.add_argument("--dino-scale", type=float, default=DEFAULT_DINO_SCALE,
                    help=f"DINO guidance scale (default {DEFAULT_DINO_SCALE:g})")
    ap.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    ap.add_argument("--out", default="generated.png", help="output PNG; several images get _0, _1, ... (default generated.png)")
    ap.add_argument("--card", action="store_true", help="instead: write MODEL/samples.png and link it from MODEL/README.md")
    for name in ("dino", "t5", "vae"):
        ap.add_argument(f"--{name}", default=None, help=f"local {name} folder where the recorded one moved")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        if a.steps < 1 or a.num_images < 1:
            raise ValueError("--steps and --num-images must be >= 1")
        if a.card:
            if not Path(a.model).is_dir():
                raise ValueError(f"--card needs a model folder, got {a.model}")
            print(json.dumps({"samples": str(write_card_samples(a.model, device=a.device))}))
            return 0
        if a.caption is None and a.dino_image is None:
            raise ValueError("give a caption, --dino-image or both")
        if a.dino_image is not None and not Path(a.dino_image).is_file():
            raise FileNotFoundError(f"--dino-image {a.dino_image}: no such file")
        pipe = NanoDiTPipeline.from_pretrained(a.model, dino=a.dino, t5=a.t5, vae=a.vae, device=a.device)
    except (ValueError, FileNotFoundError) as e:
        raise bad_arguments(ap.prog, e) from None
    images = pipe(a.caption, a.dino_image, seed=a.seed, steps=a.steps, text_scale=a.text_scale,
                  dino_scale=a.dino_scale, num_images=a.num_images)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(len(images))]
    for im, p in zip(images, paths):
        im.save(p)
    print(json.dumps({"images": [str(p) for p in paths], "caption": a.caption, "dino_image": a.dino_image,
                      "seed": a.seed, "steps": a.steps, "guidance": f"nested(text={a.text_scale}, dino={a.dino_scale})"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
