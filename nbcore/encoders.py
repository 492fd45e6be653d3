"""Real encoders behind the shapes world's stand-in interfaces, loaded from LOCAL folders only
(``local_files_only=True``: no hub access at run time), and the precompute CLI.

- ``DinoV3Encoder(path)``: a DINOv3 ViT via ``transformers.AutoModel`` (``DINOv3ViTModel``; any
  ViT with ``num_register_tokens`` in its config works, e.g. ``Dinov2WithRegistersModel``).
  ``__call__(images (B, 3, S, S) in [0, 1]) -> (cls (B, Dd), patches (B, P, Dd))``: the image is
  resized to a 224 px view and normalised with the processor's mean/std (ImageNet by default);
  the output is [CLS | registers | patches], CLS first, registers skipped; P = (224/16)^2 = 196.
- ``T5TextEncoder(path)``: ``T5EncoderModel`` + its tokenizer. ``__call__(captions) ->
  (emb (B, 512, Dt) float32, mask (B, 512) bool)``: 512 tokens (padded / truncated), last hidden
  states with padded rows set to zero.
- ``VAECodec(path)``: ``diffusers.AutoencoderKL``. ``encode(images in [0, 1]) -> latents
  (B, C, S/f, S/f)`` = (posterior mean - shift_factor) * scaling_factor; ``decode`` inverts that
  and returns images clamped to [0, 1].

CLI: ``python -m nbcore.encoders precompute IMAGES_DIR OUT_DIR --dino DIR --t5 DIR --vae DIR``
turns ``name.jpg|png`` + ``name.txt`` pairs into shards of the DESIGN.md data contract
(``train-NNNNNN.tar``, optional ``val-NNNNNN.tar``) plus ``stats.json``. Images are resized on
the short side and centre-cropped to a square ``--image-size`` (default 512 -> 64x64 latents
with an 8x VAE).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from .data import compute_stats, shard_list
from .shapes import encode_sample_members
from .utils import resolve_device

__all__ = ["DinoV3Encoder", "T5TextEncoder", "VAECodec", "load_image", "find_pairs", "precompute", "main"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _local_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: local model folder not found: {p} (no hub downloads: pass a folder)")
    return p


class DinoV3Encoder:
    """DINOv3 CLS + patch tokens from a local folder (see module docstring for shapes)."""

    def __init__(self, path, device: str = "auto", dtype: torch.dtype = torch.float32, view: int = 224):
        from transformers import AutoModel
        p = _local_dir(path, "DINOv3")
        self.device, self.dtype, self.view = resolve_device(device), dtype, view
        self.model = AutoModel.from_pretrained(p, local_files_only=True, dtype=dtype).to(self.device).eval()
        cfg = self.model.config
        self.patch_size = int(cfg.patch_size)
        if view % self.patch_size:
            raise ValueError(f"DINOv3 view {view} px is not a multiple of patch size {self.patch_size}")
        self.grid = view // self.patch_size
        self.num_registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        proc = p / "preprocessor_config.json"
        if proc.exists():
            d = json.loads(proc.read_text())
            mean, std = d.get("image_mean", mean), d.get("image_std", std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.dim = int(cfg.hidden_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[-2:] != (self.view, self.view):
            x = F.interpolate(x, size=(self.view, self.view), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.device, self.dtype)        # (B, 3, 224, 224)
        h = self.model(pixel_values=x).last_hidden_state.float()                        # (B, 1 + R + P, Dd)
        P = self.grid * self.grid
        if h.shape[1] != 1 + self.num_registers + P:
            raise ValueError(f"DINOv3 returned {h.shape[1]} tokens, expected 1 + {self.num_registers} registers + {P} patches")
        return h[:, 0].cpu(), h[:, 1 + self.num_registers:].cpu()                       # (B, Dd), (B, P, Dd)


class T5TextEncoder:
    """T5 encoder hidden states + mask from a local folder (tokenizer files in the same folder)."""

    def __init__(self, path, device: str = "auto", dtype: torch.dtype = torch.float32, max_len: int = 512):
        from transformers import AutoTokenizer, T5EncoderModel
        p = _local_dir(path, "T5")
        self.device, self.max_len = resolve_device(device), max_len
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(p, local_files_only=True, dtype=dtype).to(self.device).eval()
        self.dim = int(self.model.config.d_model)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)                                          # (B, 512)
        mask = tok["attention_mask"].to(self.device).bool()                             # (B, 512)
        h = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()  # (B, 512, Dt)
        h = h * mask[..., None]
        return h.cpu(), mask.cpu()


class VAECodec:
    """AutoencoderKL from a local folder; latents scaled like the diffusion model sees them."""

    def __init__(self, path, device: str = "auto", dtype: torch.dtype = torch.float32, sample: bool = False):
        from diffusers import AutoencoderKL
        p = _local_dir(path, "VAE")
        self.device, self.dtype, self.sample = resolve_device(device), dtype, sample
        self.vae = AutoencoderKL.from_pretrained(p, local_files_only=True, torch_dtype=dtype).to(self.device).eval()
        cfg = self.vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() * 2 - 1).to(self.device, self.dtype)                       # [0, 1] -> [-1, 1]
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.sample else dist.mean                                 # (B, C, S/f, S/f)
        return ((z.float() - self.shift_factor) * self.scaling_factor).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() / self.scaling_factor + self.shift_factor
        x = self.vae.decode(z.to(self.device, self.dtype)).sample.float()               # (B, 3, S, S) in ~[-1, 1]
        return ((x + 1) / 2).clamp(0, 1).cpu()


# --------------------------------------------------------------------------- precompute

def load_image(path, size: int) -> torch.Tensor:
    """RGB image -> short side resized to ``size``, centre-cropped: (3, size, size) float32 in [0, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)                                            # (size, size, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255                  # (3, size, size)


def find_pairs(images_dir) -> tuple[list[tuple[str, Path, str]], list[Path]]:
    """(key, image path, caption) for every image with a ``.txt`` beside it, sorted by name; plus
    the images that lack a caption. Keys are file stems with dots replaced (WebDataset splits keys
    at the first dot)."""
    d = Path(images_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"images folder not found: {d}")
    pairs, missing, seen = [], [], {}
    for img in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        txt = img.with_suffix(".txt")
        if not txt.exists():
            missing.append(img)
            continue
        key = img.stem.replace(".", "_")
        if key in seen:
            raise ValueError(f"two images share the key {key!r}: {seen[key].name} and {img.name}")
        seen[key] = img
        pairs.append((key, img, txt.read_text(encoding="utf-8").strip()))
    return pairs, missing


def precompute(images_dir, out_dir, dino, t5, vae, image_size: int = 512, batch_size: int = 8,
               shard_size: int = 1000, val_fraction: float = 0.0, seed: int = 0, device: str = "auto",
               dtype: str = "float32", write_png: bool = True, progress: bool = True) -> dict:
    """Encode image/caption pairs with the real encoders into contract shards + stats.json.
    ``dino``, ``t5``, ``vae`` are local folders or already built encoder objects. Returns a summary
    {"train", "val", "skipped_no_caption", "latent_shape", "dino_patches", "text_dim"}."""
    pairs, missing = find_pairs(images_dir)
    if not pairs:
        raise ValueError(f"no image + .txt caption pairs in {images_dir}")
    dt = _DTYPES[dtype]
    dino = dino if not isinstance(dino, (str, Path)) else DinoV3Encoder(dino, device, dt)
    t5 = t5 if not isinstance(t5, (str, Path)) else T5TextEncoder(t5, device, dt)
    vae = vae if not isinstance(vae, (str, Path)) else VAECodec(vae, device, dt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train-*.tar")) + list(out.glob("val-*.tar")):
        old.unlink()
    n_val = int(round(len(pairs) * val_fraction))
    val_idx = set(np.random.default_rng(seed).permutation(len(pairs))[:n_val].tolist())
    splits = {"train": [p for i, p in enumerate(pairs) if i not in val_idx],
              "val": [p for i, p in enumerate(pairs) if i in val_idx]}
    summary = {"train": len(splits["train"]), "val": len(splits["val"]), "skipped_no_caption": len(missing)}
    bar = tqdm(total=len(pairs), desc="precompute", unit="image", disable=not progress)
    for split, items in splits.items():
        if not items:
            continue
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0, encoder=False,
                             mtime=0) as sink:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                images = torch.stack([load_image(p, image_size) for _, p, _ in chunk])      # (B, 3, S, S)
                caps = [c for _, _, c in chunk]
                cls, patches = dino(images)
                emb, mask = t5(caps)
                lat = vae.encode(images)
                lens = mask.sum(1).tolist()
                for j, (key, _, cap) in enumerate(chunk):
                    sink.write({"__key__": key, **encode_sample_members(
                        lat[j], cls[j], patches[j], emb[j, : lens[j]], cap, images[j] if write_png else None)})
                summary.update(latent_shape=list(lat.shape[1:]), dino_patches=list(patches.shape[1:]),
                               text_dim=int(emb.shape[-1]))
                bar.update(len(chunk))
    bar.close()
    if splits["train"]:
        stats = compute_stats(shard_list(out, "train"))
        stats.meta.update(source="nbcore.encoders.precompute", images_dir=str(images_dir), image_size=image_size)
        stats.save(out / "stats.json")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbcore.encoders",
                                 description="Precompute DINOv3 / T5 / VAE features into WebDataset shards (local weights only)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("precompute", help="folder of name.jpg|png + name.txt -> shards + stats.json")
    pc.add_argument("images_dir", help="folder of name.jpg|png images, each with a name.txt caption")
    pc.add_argument("out_dir", help="output folder for {train,val}-NNNNNN.tar and stats.json")
    pc.add_argument("--dino", required=True, help="local DINOv3 folder (transformers)")
    pc.add_argument("--t5", required=True, help="local T5 encoder + tokenizer folder (transformers)")
    pc.add_argument("--vae", required=True, help="local AutoencoderKL folder (diffusers)")
    pc.add_argument("--image-size", type=int, default=512, help="square crop side in px (default 512)")
    pc.add_argument("--batch-size", type=int, default=8, help="images encoded together (default 8)")
    pc.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    pc.add_argument("--val-fraction", type=float, default=0.0, help="share of samples in the val split (default 0)")
    pc.add_argument("--seed", type=int, default=0, help="seeds the train/val assignment")
    pc.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    pc.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="encoder dtype (default float32)")
    pc.add_argument("--no-png", action="store_true", help="do not store the source image")
    args = ap.parse_args(argv)
    if args.image_size < 16 or args.batch_size < 1 or args.shard_size < 1:
        ap.error("--image-size >= 16, --batch-size >= 1 and --shard-size >= 1 are required")
    if not 0 <= args.val_fraction < 1:
        ap.error("--val-fraction must be in [0, 1)")
    try:
        summary = precompute(args.images_dir, args.out_dir, args.dino, args.t5, args.vae, args.image_size,
                             args.batch_size, args.shard_size, args.val_fraction, args.seed, args.device,
                             args.dtype, not args.no_png)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if summary["skipped_no_caption"]:
        print(f"skipped {summary['skipped_no_caption']} images without a .txt caption", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
