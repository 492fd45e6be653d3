"""From a model folder to images in one call, diffusers-style.

    from nbcore.pipeline import NanoDiTPipeline
    pipe = NanoDiTPipeline.from_pretrained("outputs/model")      # a save_pretrained folder or a checkpoint
    images = pipe("a red circle at the top left", dino_image="cat.jpg", seed=0)   # -> [PIL.Image]

``NanoDiTPipeline`` holds the model, the encoders its data was made with
(``nbcore.encoders.data_encoders``: the shapes world's stand-ins, or DINOv3 / T5 / VAE from the local
folders the data's stats.json recorded, or ``dino=`` / ``t5=`` / ``vae=``) and their codec. A call
encodes the caption and the optional DINO image exactly as a training batch holds them (normalised
with the data's statistics), samples with ``nbcore.sample`` (Euler, nested guidance: text 3 / DINO 2,
12 steps by default, the experiment's protocol) and decodes with the codec. A condition left out is
the learned null: no ``dino_image`` generates from the text alone, ``caption=None`` from DINO alone.

``write_card_samples(folder)`` adds ``samples.png`` (source | text + DINO | text only, on the data's
own images where they can be found, else on shapes-world scenes) to a model folder and links it from
its model card.

CLI (``nbcore-generate``, ``nbcore.cli.generate``)::

    python -m nbcore.pipeline MODEL "a caption" [--dino-image IMG] [--seed S] [--steps N]
                              [--text-scale 3] [--dino-scale 2] [--num-images K] [--out FILE.png]
    python -m nbcore.pipeline MODEL --card          # samples.png + the card's link to it

Shape legend: B images, S image side, C H W latent.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .encoders import DataEncoders, data_encoders, find_pairs
from .model import NanoDiT
from .model_folder import CARD, CONFIG, SAMPLES, model_card, stand_in_kind
from .sample import Guidance, sample
from .shapes import RULES, render, sample_scene
from .utils import resolve_device

__all__ = ["NanoDiTPipeline", "to_pil", "write_card_samples", "DEFAULT_STEPS", "DEFAULT_TEXT_SCALE",
           "DEFAULT_DINO_SCALE"]

# The experiment's protocol (nbcore.experiment.Profile; nbcore.validate's defaults)
DEFAULT_STEPS, DEFAULT_TEXT_SCALE, DEFAULT_DINO_SCALE = 12, 3.0, 2.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, S, S) in [0, 1] -> B RGB PIL images."""
    arr = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]                                           # each (S, S, 3)


class NanoDiTPipeline:
    """A model and the encoders + codec of its data; ``pipe(caption, dino_image=...)`` -> images."""

    def __init__(self, model, encoders: DataEncoders, info: dict | None = None):
        self.model, self.encoders, self.info = model.eval(), encoders, info or {}

    @classmethod
    def from_pretrained(cls, path, dino=None, t5=None, vae=None, device: str = "auto") -> NanoDiTPipeline:
        """From a ``save_pretrained`` folder (or a training checkpoint); encoder folders default to
        the ones the data's stats.json recorded."""
        dev = str(resolve_device(device))
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"model not found: {p} (a save_pretrained folder or a training checkpoint)")
        model, info = NanoDiT.from_pretrained(p, device=dev, output_loading_info=True)   # the one loader
        stats = info.get("stats")
        if stats is None:
            raise ValueError(f"{p} carries no data statistics (stats.json): the pipeline cannot encode conditions "
                             "as the model was trained")
        return cls(model, data_encoders(stats, model.cfg, dino=dino, t5=t5, vae=vae, device=dev), info)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_image(self, image) -> torch.Tensor:
        """A path, PIL image or (3, H, W) tensor in [0, 1] -> (3, S, S) at the data's image size."""
        s = self.encoders.image_size
        if isinstance(image, (str, Path)):
            return self.encoders.load([image])[0]
        if isinstance(image, Image.Image):
            im = ImageOps.fit(image.convert("RGB"), (s, s), Image.BICUBIC)        # cover, centre crop
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)   # (3, S, S)
        if torch.is_tensor(image) and image.dim() == 3:
            return torch.nn.functional.interpolate(image[None].float(), size=(s, s), mode="bilinear",
                                                   antialias=True, align_corners=False)[0]
        raise TypeError(f"dino_image must be a path, a PIL image or a (3, H, W) tensor, got {type(image).__name__}")

    @torch.no_grad()
    def __call__(self, caption: str | None = None, dino_image=None, *, seed: int = 0, steps: int = DEFAULT_STEPS,
                 text_scale: float = DEFAULT_TEXT_SCALE, dino_scale: float = DEFAULT_DINO_SCALE,
                 num_images: int = 1, output_type: str = "pil"):
        """``num_images`` images of ``caption`` (None: text dropped) with the DINO condition of
        ``dino_image`` (None: DINO dropped), seeded (image k uses the k-th noise draw of ``seed``).
        output_type "pil" -> list of PIL images; "pt" -> (B, 3, S, S) tensor in [0, 1]."""
        if caption is None and dino_image is None:
            raise ValueError("give a caption, a dino_image or both")
        if num_images < 1 or steps < 1:
            raise ValueError("num_images and steps must be >= 1")
        B, cond = num_images, {}
        if dino_image is not None:
            img = self.load_image(dino_image)[None].expand(B, -1, -1, -1)              # (B, 3, S, S)
            cls_, patches = self.encoders.dino(img)
            cond.update(dino_emb=cls_, dino_patches=patches)
        if caption is not None:
            emb, mask = self.encoders.text([caption] * B)                               # (B, L, Dt), (B, L)
            cond.update(text_emb=emb, text_mask=mask)
        cond = self.encoders.stats.normalise_condition(cond)
        if not self.model.cfg.use_dino_patches:
            cond.pop("dino_patches", None)
        z = sample(self.model, **cond, steps=steps, seed=seed,
                   guidance=Guidance("nested", text_scale=text_scale, dino_scale=dino_scale))   # (B, C, H, W)
        images = self.encoders.codec.decode(z.cpu()).clamp(0, 1)                        # (B, 3, S, S)
        if output_type == "pt":
            return images
        if output_type != "pil":
            raise ValueError(f"output_type must be pil|pt, got {output_type!r}")
        return to_pil(images)


# --------------------------------------------------------------------------- the model card's samples

def _card_sources(pipe: NanoDiTPipeline, n: int) -> list[tuple[torch.Tensor, str]]:
    """(image (3, S, S), caption) of the data's own first images when its image folder is on this
    machine; else shapes-world scenes of the data's rules (the stand-in world's own val scenes)."""
    meta = pipe.encoders.stats.meta or {}
    folder = meta.get("images_dir")
    if folder and Path(folder).is_dir():
        pairs, _ = find_pairs(folder)
        if pairs:
            return [(pipe.load_image(p), cap) for _, p, cap in pairs[:n]]
    rules = meta.get("rules", "easy") if meta.get("rules") in RULES else "easy"
    scenes = [sample_scene(np.random.default_rng([0, 1, i]), rules=RULES[rules]) for i in range(n)]
    return [(render(sc, pipe.encoders.image_size), sc.caption()) for sc in scenes]          # (3, S, S) each


def write_card_samples(folder, n: int = 4, seed: int = 0, steps: int = DEFAULT_STEPS, device: str = "cpu") -> Path:
    """Write FOLDER/samples.png (rows: source | text + DINO | text only, nested guidance text 3 / DINO
    2) and rewrite FOLDER/README.md with it linked. Returns the PNG's path."""
    from .viz import image_grid, save_figure

    folder = Path(folder)
    pipe = NanoDiTPipeline.from_pretrained(folder, device=device)
    srcs = _card_sources(pipe, n)
    both, text = [], []
    for img, cap in srcs:
        both.append(pipe(cap, img, seed=seed, steps=steps, output_type="pt")[0])
        text.append(pipe(cap, None, seed=seed, steps=steps, output_type="pt")[0])
    source = torch.stack([img for img, _ in srcs])
    config = json.loads((folder / CONFIG).read_text())
    plumbing = stand_in_kind(config.get("data")) == "plumbing"
    title = (f"samples: nested guidance text {DEFAULT_TEXT_SCALE:g} / DINO {DEFAULT_DINO_SCALE:g}, {steps} Euler steps, "
             f"seed {seed}" + ("\nPLUMBING STAND-INS (random encoders): these images mean nothing" if plumbing else ""))
    fig = image_grid({"source (DINO image)": source, "text + DINO": torch.stack(both), "text only": torch.stack(text)},
                     titles=[cap for _, cap in srcs], title=title)
    path = save_figure(fig, folder / SAMPLES)
    card = folder / CARD
    notes = card.read_text(encoding="utf-8").split("\n## Notes\n", 1)
    text_out = model_card(config, config.get("params", 0), samples=SAMPLES)
    if len(notes) == 2:
        text_out += "\n## Notes\n" + notes[1]
    card.write_text(text_out, encoding="utf-8")
    return path


if __name__ == "__main__":   # python -m nbcore.pipeline: the command line is nbcore.cli.generate's
    from nbcore.cli.generate import main as _main
    sys.exit(_main())
