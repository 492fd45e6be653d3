"""Real encoders behind the shapes world's stand-in interfaces, loaded from LOCAL folders only
(``local_files_only=True``: no hub access at run time), and the precompute CLI.

- ``DinoV3Encoder(path)``: a DINOv3 ViT via ``transformers.AutoModel`` (``DINOv3ViTModel``; any
  ViT with ``num_register_tokens`` in its config works, e.g. ``Dinov2WithRegistersModel``).
  ``__call__(images (B, 3, Sh, Sw) in [0, 1]) -> (cls (B, Dd), patches (B, P, Dd))``: the image is
  resized to a 224 px view and normalised with the processor's mean/std (ImageNet by default);
  the output is [CLS | registers | patches], CLS first, registers skipped; P = (224/16)^2 = 196.
  A DINOv3 variant without ViT patch tokens (the ConvNeXt models: a feature map, no
  ``patch_size``) is refused with a clear error before its weights load.
- ``T5TextEncoder(path)``: ``T5EncoderModel`` + its tokenizer. ``__call__(captions) ->
  (emb (B, 512, Dt) float32, mask (B, 512) bool)``: 512 tokens (padded / truncated), last hidden
  states with padded rows set to zero; ``padding="longest"`` pads to the batch's longest caption
  instead (same real-token states: padding is masked out of T5's attention).
  ``trimmed(captions) -> [(L_i, Dt)]``: each caption's real tokens only, what a shard stores.
- ``VAECodec(path)``: ``diffusers.AutoencoderKL`` (defined in ``nbcore.codec``, re-exported here).
  ``encode(images in [0, 1]) -> latents (B, C, Sh/f, Sw/f)`` = (posterior mean - shift_factor) *
  scaling_factor; ``decode`` inverts that and returns images clamped to [0, 1].

The DINO view on the latent grid (one mapping, shared with ``nbcore.model``): every image, square or
not, is resized as a whole (no crop, aspect not kept) to the 224 x 224 view, so DINO patch (i, j) of
the g x g grid (g = 224 / patch_size, row-major) sees exactly the image rectangle rows
[i/g, (i+1)/g) x columns [j/g, (j+1)/g) of the image the VAE encoded. The model places patch (i, j)
on that same fraction of its h x w latent token grid (``patch_cover_weights`` for tied patches,
``patch_grid_pos_embed`` for sin-cos positions): both grids span the whole image, for any h, w.
The price on a non-square bucket is an anisotropic DINO view (a 2:1 image is seen squeezed 2x
horizontally); ``--max-aspect`` bounds it. Keeping DINO's view undistorted would need a
non-square patch grid, which the data contract (P = g * g) and the model's fixed P do not allow.

CLI: ``python -m nbcore.encoders precompute IMAGES_DIR OUT_DIR --dino DIR --t5 DIR --vae DIR``
turns ``name.jpg|png|webp`` + ``name.txt`` pairs into shards of the docs/DESIGN.md data contract
(``train-NNNNNN.tar``, optional ``val-NNNNNN.tar``) plus ``stats.json``.

- Images are read as a viewer shows them (``as_rgb``): EXIF orientation applied, every PIL mode
  (16-bit greyscale at its real value, palette, CMYK, alpha composited on white) to 8-bit RGB.
  Captions are UTF-8, else read as cp1252 (else latin-1) and named in the summary
  (``read_caption``). Every file left out is named by reason in the summary's ``skips`` (no
  caption, caption without an image, unreadable caption, unreadable image) and on stderr.

- Size: the short side is resized to ``--image-size`` and the centre cropped to a square (512 -> 64x64
  latents with an 8x VAE). Its default follows the data: the largest multiple of 8 latent cells (64 px
  with an 8x VAE; the bucket step with ``--buckets``), at most 512, that no image is upscaled to; a
  given size that would upscale an image is refused unless ``--allow-upscale`` (a 32 px folder at
  512 px was 1000x the work for no information). ``--buckets``: aspect-ratio buckets of about
  ``image_size^2`` pixels, sides multiples of ``--bucket-step`` px (default 8 latent cells, so
  any model patch size dividing 8 fits), aspect at most ``--max-aspect``; each image goes to the
  bucket closest in log aspect ratio, resized to cover it and centre-cropped (the smallest crop).
  The loader batches one latent shape at a time (``nbcore.data``'s buckets).
- Text: ``t5.npy`` holds the real tokens only, (L_valid, Dt) float16 (no 512-token padding on disk;
  captions longer than 512 tokens are cut and counted); T5 runs on batches padded to their longest.
- Dtypes: ``--dtype`` for all three encoders, ``--dino-dtype`` / ``--t5-dtype`` / ``--vae-dtype`` each.
- Workers: images are decoded, resized and cropped in ``--workers`` DataLoader processes.
- Resume: the plan (which key goes to which shard) is a function of the folder's pairs and the
  settings; each finished shard is written to ``NAME.tar.tmp`` then renamed, and listed with its keys
  in ``OUT_DIR/precompute.json``. A rerun with the same settings keeps the listed shards and
  continues; an unfinished run with other settings is an error unless ``--restart``.
- Scene metadata: a ``name.json`` beside an image is stored as the sample's ``json`` member (the
  shapes world's scene, written by ``nbcore.shapes.write_image_folder``), so the shapes-world layout
  metrics also run on real-encoded shapes images. Its coordinates are the image's: valid for square
  images (any resize), not after a crop of a non-square one.
- ``stats.json`` meta records the codec spec (``nbcore.codec``), the encoder folders and dtypes,
  the image size and the buckets.

Shape legend: B batch, Sh Sw image height/width, C latent channels, f VAE downsampling, g DINO grid,
P = g * g patches, Dd DINO dim, L tokens, Dt T5 dim.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .codec import DTYPES, VAECodec, _local_dir
from .data import compute_stats, shard_list
from .shapes import encode_sample_members
from .utils import resolve_device, write_json

__all__ = ["DinoV3Encoder", "T5TextEncoder", "VAECodec", "dino_view", "as_rgb", "load_image", "read_caption",
           "scan_folder", "find_pairs", "aspect_buckets", "choose_bucket", "image_sizes", "fitting_image_size",
           "upscaled_images", "precompute", "tiny_random_encoders", "DataEncoders", "data_encoders", "MANIFEST",
           "ImageSizeError", "STAND_IN_MARKER"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST = "precompute.json"
_DTYPES = DTYPES


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}: choose from {sorted(DTYPES)}")
    return DTYPES[d]


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def dino_view(images: torch.Tensor, view: int = 224) -> torch.Tensor:
    """(B, 3, Sh, Sw) in [0, 1] -> (B, 3, view, view): the whole image resized, aspect not kept, so
    DINO patch (i, j) sees image rows [i/g, (i+1)/g) x columns [j/g, (j+1)/g) (module docstring)."""
    x = images.float()
    if x.shape[-2:] != (view, view):
        x = F.interpolate(x, size=(view, view), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1)


class DinoV3Encoder:
    """DINOv3 CLS + patch tokens from a local folder (see module docstring for shapes)."""

    def __init__(self, path, device: str = "auto", dtype: torch.dtype | str = torch.float32, view: int = 224):
        p = _local_dir(path, "DINOv3")   # before the (slow) transformers import: a wrong path fails fast
        from transformers import AutoConfig, AutoModel
        cfg = AutoConfig.from_pretrained(p, local_files_only=True)
        patch = getattr(cfg, "patch_size", None)
        if not isinstance(patch, int) or not hasattr(cfg, "hidden_size"):
            raise ValueError(
                f"DINOv3 folder {p} holds a {cfg.model_type!r} model without ViT patch tokens (no patch_size in its "
                "config; the ConvNeXt variants give a feature map): use a DINOv3 ViT, e.g. dinov3-vitl16-pretrain-lvd1689m")
        self.path, self.dtype = str(p.resolve()), _dtype(dtype)
        self.device, self.view = resolve_device(device), view
        self.model = AutoModel.from_pretrained(p, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        self.patch_size = int(patch)
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
        x = dino_view(images, self.view)                                                 # (B, 3, 224, 224)
        x = ((x - self.mean) / self.std).to(self.device, self.dtype)
        h = self.model(pixel_values=x).last_hidden_state.float()                        # (B, 1 + R + P, Dd)
        P = self.grid * self.grid
        if h.shape[1] != 1 + self.num_registers + P:
            raise ValueError(f"DINOv3 returned {h.shape[1]} tokens, expected 1 + {self.num_registers} registers + {P} patches")
        return h[:, 0].cpu(), h[:, 1 + self.num_registers:].cpu()                       # (B, Dd), (B, P, Dd)


class T5TextEncoder:
    """T5 encoder hidden states + mask from a local folder (tokenizer files in the same folder)."""

    def __init__(self, path, device: str = "auto", dtype: torch.dtype | str = torch.float32, max_len: int = 512):
        p = _local_dir(path, "T5")
        from transformers import AutoTokenizer, T5EncoderModel
        self.path, self.dtype = str(p.resolve()), _dtype(dtype)
        self.device, self.max_len = resolve_device(device), max_len
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(p, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        self.dim = int(self.model.config.d_model)

    @torch.no_grad()
    def __call__(self, captions: list[str], padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
        """-> emb (B, L, Dt) float32 with padded rows zero, mask (B, L) bool; L = max_len
        (``padding="max_length"``) or the longest caption (``"longest"``)."""
        tok = self.tokenizer(list(captions), padding=padding, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)                                          # (B, L)
        mask = tok["attention_mask"].to(self.device).bool()                             # (B, L)
        h = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()  # (B, L, Dt)
        h = h * mask[..., None]
        return h.cpu(), mask.cpu()

    def n_tokens(self, captions: list[str]) -> list[int]:
        """Token count of each caption before truncation (to count what ``max_len`` cuts)."""
        return [len(ids) for ids in self.tokenizer(list(captions), truncation=False)["input_ids"]]

    def trimmed(self, captions: list[str]) -> list[torch.Tensor]:
        """Each caption's real-token hidden states: a list of (L_i, Dt) float32."""
        emb, mask = self(captions, padding="longest")                                   # (B, L, Dt), (B, L)
        return [emb[i, : int(n)] for i, n in enumerate(mask.sum(1).tolist())]


# --------------------------------------------------------------------------- the encoders of a dataset

@dataclass
class DataEncoders:
    """What turns images and captions into a model's conditions, as the data was made: the shapes
    world's stand-ins (``kind="shapes"``) or the real DINOv3 / T5 / VAE (``kind="real"``).

    ``dino(images (B, 3, Sh, Sw) in [0, 1]) -> (cls (B, Dd), patches (B, P, Dd))``;
    ``text(captions) -> (emb (B, L, Dt), mask (B, L) bool)``, L = the longest caption;
    ``codec``: ``nbcore.codec.Codec`` (images <-> latents); ``stats``: the data's ``Stats``;
    ``image_size``: the square side the data's images were made at (``load`` crops a file to it).
    ``condition(images, captions)`` gives the normalised conditioning a batch of the data would hold.
    """
    kind: str
    dino: Callable
    text: Callable
    codec: object
    stats: object
    image_size: int

    def load(self, paths) -> torch.Tensor:
        """Image files -> (B, 3, S, S) in [0, 1], short side resized and centre-cropped to ``image_size``."""
        return torch.stack([load_image(p, self.image_size) for p in paths])

    @torch.no_grad()
    def condition(self, images: torch.Tensor, captions: list[str]) -> dict:
        """-> dino_emb (B, Dd), dino_patches (B, P, Dd), text_emb (B, L, Dt), text_mask (B, L), all
        normalised with ``stats`` as the loader does, plus png (the images) and txt."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        cls, patches = self.dino(images)
        emb, mask = self.text(list(captions))
        cond = self.stats.normalise_condition({"dino_emb": cls, "dino_patches": patches, "text_emb": emb,
                                               "text_mask": mask})
        return {**cond, "png": images, "txt": list(captions)}


def _recorded(meta: dict, what: str, given) -> str:
    """The encoder folder to load: ``given`` (a CLI flag) or the one stats.json recorded; a clear error when neither exists."""
    if given is not None:
        return given
    path = ((meta.get("encoders") or {}).get(what) or {}).get("path")
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"the data was encoded with the {what} at {path!r}, which is not a folder on this "
                                f"machine: pass --{what} DIR ({what}=DIR), a local folder of that model")
    return path


def data_encoders(stats, model_cfg=None, dino=None, t5=None, vae=None, device: str = "cpu") -> DataEncoders:
    """The encoders the data behind ``stats`` (Stats or a stats.json path) was made with.

    Shapes-world data (stats meta ``source`` from ``nbcore.shapes``): the world's stand-in encoders
    at ``model_cfg``'s sizes (else the recorded preset's) and its pixel codec. Real data
    (``nbcore.encoders.precompute``): DINOv3 / T5 / VAE from the given folders, else from the folders
    stats.json recorded (an error naming the flag when they are not on this machine; T5 is found and
    loaded at the first caption encoded)."""
    from .codec import codec_from_stats
    from .data import Stats
    from .shapes import WORLDS, ShapesWorld, WorldSizes

    st = stats if isinstance(stats, Stats) else Stats.load(stats)
    meta = st.meta or {}
    if str(meta.get("source", "")).startswith("nbcore.shapes"):
        sizes = WorldSizes.of(model_cfg) if model_cfg is not None else WORLDS[meta.get("preset", "tiny")]
        world = ShapesWorld(sizes, rules=meta.get("rules", "standard"))
        text = lambda caps: world.text_encoder(list(caps))
        return DataEncoders("shapes", world.patch_encoder, text, codec_from_stats(st), st, sizes.image_size)
    if meta.get("source") != "nbcore.encoders.precompute":
        raise ValueError(f"stats.json does not say how its data was made (meta source {meta.get('source')!r}): "
                         "expected shapes-world data (nbcore.shapes) or nbcore.encoders.precompute output")
    enc = meta.get("encoders") or {}
    d = DinoV3Encoder(_recorded(meta, "dino", dino), device, (enc.get("dino") or {}).get("dtype") or "float32")
    codec = codec_from_stats(st, vae_dir=vae, device=device)
    return DataEncoders("real", d, _LazyText(meta, t5, device), codec, st, int(meta.get("image_size") or 512))


class _LazyText:
    """captions -> (emb (B, L, Dt), mask (B, L)), L = the longest caption, from a T5 found and
    loaded at the first call: a full-size T5 is tens of GB, and work that reads its text from the
    shards (validation) never encodes a caption, so it needs no T5 folder."""

    def __init__(self, meta: dict, given, device):
        self.meta, self.given, self.device, self.encoder = meta, given, device, None

    def __call__(self, captions):
        if self.encoder is None:
            rec = (self.meta.get("encoders") or {}).get("t5") or {}
            self.encoder = T5TextEncoder(_recorded(self.meta, "t5", self.given), self.device,
                                         rec.get("dtype") or "float32", max_len=rec.get("max_len") or 512)
        return self.encoder(list(captions), padding="longest")


# --------------------------------------------------------------------------- images

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


def as_rgb(im) -> Image.Image:
    """A PIL image as a viewer shows it, in 8-bit RGB: EXIF orientation applied; 16-bit greyscale
    (``I;16*``, and ``I``, the mode older Pillow gives 16-bit PNGs) scaled by 255/65535 to its real
    8-bit value (``convert`` would clip it: 30000 of 65535 to white); float ``F`` taken as 0..255
    (Pillow's own convention); palette, CMYK, 1-bit, YCbCr through Pillow's conversions; alpha (and
    a palette's or greyscale's transparency) composited on white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)                                            # (H, W)
        a = a / 257.0 if im.mode in _SIXTEEN_BIT else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in _ALPHA or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _fit(im, size: tuple[int, int]):
    """PIL RGB image -> resized to cover (H, W) = size, centre-cropped to it (the smallest crop)."""
    H, W = size
    w, h = im.size
    s = max(W / w, H / h)
    im = im.resize((max(W, round(w * s)), max(H, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - W) // 2, (h - H) // 2
    return im.crop((left, top, left + W, top + H))


def _to_tensor_u8(im) -> torch.Tensor:
    arr = np.asarray(im, dtype=np.uint8)                                                # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)                                # (3, H, W) uint8


def load_image(path, size: int | tuple[int, int]) -> torch.Tensor:
    """An image file as a viewer shows it (``as_rgb``) -> resized to cover ``size`` (a side: square;
    or (H, W)) and centre-cropped: (3, H, W) float32 in [0, 1]."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    with Image.open(path) as im:
        return _to_tensor_u8(_fit(as_rgb(im), hw)).float() / 255                       # (3, H, W)


def aspect_buckets(image_size: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Pixel sizes (H, W) of about ``image_size^2`` pixels (never more), sides multiples of ``step``,
    aspect max(H/W, W/H) <= ``max_aspect``; sorted by W/H (portrait first). Always holds the square."""
    if step < 1 or image_size % step:
        raise ValueError(f"image size {image_size} is not a multiple of the bucket step {step}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = image_size * image_size
    out = {(image_size, image_size)}
    w = step
    while w <= image_size * max_aspect:
        h = (area // w) // step * step
        if h >= step and max(h / w, w / h) <= max_aspect + 1e-9:
            out.add((h, w))
            out.add((w, h))
        w += step
    return sorted(out, key=lambda hw: (hw[1] / hw[0], hw[0]))


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (H, W) closest to the image's aspect in log ratio (the first of equals)."""
    r = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - r))


class _ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, image (3, H, W) uint8 | None, error | None): decoded, bucketed, resized and
    cropped in a DataLoader worker. An unreadable file gives None and the reason (counted)."""

    def __init__(self, paths: list[Path], image_size: int, buckets: list[tuple[int, int]] | None):
        self.paths, self.image_size, self.buckets = paths, image_size, buckets

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                im = as_rgb(im)
                size = (self.image_size, self.image_size) if self.buckets is None else choose_bucket(*im.size, self.buckets)
                return i, _to_tensor_u8(_fit(im, size)), None
        except Exception as e:  # PIL raises many types for broken files
            return i, None, f"{type(e).__name__}: {e}"


def _identity(x):
    return x


CAPTION_FALLBACK = "cp1252"   # then latin-1, which reads any byte


def read_caption(path) -> tuple[str, str | None]:
    """A caption file -> (text stripped, note): UTF-8 (a BOM dropped), else the file is read as
    cp1252 (Windows' Western encoding, the usual non-UTF-8 caption), else as latin-1; the note
    says which fallback was used (None for UTF-8)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError:
        pass
    for enc in (CAPTION_FALLBACK, "latin-1"):
        try:
            return raw.decode(enc).strip(), f"not UTF-8, read as {enc}"
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte")


@dataclass
class ImageFolder:
    """What ``scan_folder`` found: ``pairs`` (key, image path, caption) sorted by name, and what it
    left out or read differently, by file name: ``no_caption`` (images), ``orphan_captions``
    (``.txt`` without an image), ``caption_unreadable`` ("name.txt: reason"), ``caption_fallbacks``
    ("name.txt: not UTF-8, read as cp1252")."""
    pairs: list
    no_caption: list
    orphan_captions: list
    caption_unreadable: list
    caption_fallbacks: list


def scan_folder(images_dir) -> ImageFolder:
    """Every image with a ``.txt`` caption beside it (``read_caption``: a caption in another encoding
    is read with a stated fallback), and every file left out, named. Keys are file stems with dots
    replaced (WebDataset splits keys at the first dot)."""
    d = Path(images_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"images folder not found: {d}")
    found = ImageFolder([], [], [], [], [])
    seen: dict = {}
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    stems = {p.with_suffix("") for p in images}
    found.orphan_captions = sorted(p.name for p in d.glob("*.txt") if p.with_suffix("") not in stems)
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.exists():
            found.no_caption.append(img)
            continue
        key = img.stem.replace(".", "_")
        if key in seen:
            raise ValueError(f"two images share the key {key!r}: {seen[key].name} and {img.name}")
        seen[key] = img
        try:
            caption, note = read_caption(txt)
        except OSError as e:
            found.caption_unreadable.append(f"{txt.name}: {e.strerror or e}")
            continue
        if note:
            found.caption_fallbacks.append(f"{txt.name}: {note}")
        found.pairs.append((key, img, caption))
    return found


def find_pairs(images_dir) -> tuple[list[tuple[str, Path, str]], list[Path]]:
    """(key, image path, caption) for every image with a ``.txt`` beside it, sorted by name; plus
    the images that lack a caption (``scan_folder`` has the rest of what was left out)."""
    found = scan_folder(images_dir)
    return found.pairs, found.no_caption


# --------------------------------------------------------------------------- plumbing stand-ins

def tiny_random_encoders(root, seed: int = 0, vocab=None) -> dict:
    """PLUMBING STAND-INS, not encoders: tiny randomly initialised models of the real classes
    (``DINOv3ViTModel`` hidden 32, 16 px patches, 2 registers; ``T5EncoderModel`` d_model 16 with a
    word-level fast tokenizer; ``AutoencoderKL`` with 4 latent channels and 2x downsampling) saved
    under ``root/{dino,t5,vae}``, for tests and the headless run of notebook 07. Their features mean
    nothing; they exercise every real-data code path without a download. ``vocab``: the tokenizer's
    words (default: the shapes world's, plus ``</s>``). Returns {"dino", "t5", "vae"}: folder paths.
    Rewrites nothing that is already there with the same seed (``root/tiny.json``)."""
    import transformers
    import diffusers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from .shapes import VOCAB

    root = Path(root)
    dirs = {k: root / k for k in ("dino", "t5", "vae")}
    stamp = root / "tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"seed": seed} and all(d.is_dir() for d in dirs.values()):
        _mark_stand_ins(dirs, seed)
        return dirs
    words = list(vocab) if vocab is not None else [w for w in VOCAB if w not in ("<pad>", "<unk>")]
    words = ["<pad>", "</s>", "<unk>"] + [w for w in words if w not in ("<pad>", "</s>", "<unk>")]
    torch.manual_seed(seed)
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
        image_size=224, num_register_tokens=2)).eval().save_pretrained(dirs["dino"])
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval().save_pretrained(dirs["t5"])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(dirs["t5"])
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.5,
        shift_factor=0.1).eval().save_pretrained(dirs["vae"])
    _mark_stand_ins(dirs, seed)
    write_json({"seed": seed}, stamp)
    return dirs


STAND_IN_MARKER = "nbcore-stand-in.json"


def _mark_stand_ins(dirs: dict, seed: int) -> None:
    """A marker in each stand-in folder: precompute records it (``stand_in`` in stats.json's encoders),
    so a model trained on their features says so (the model card's banner)."""
    for d in dirs.values():
        write_json({"made_by": "nbcore.encoders.tiny_random_encoders", "seed": seed,
                    "meaning": "plumbing stand-in: random weights, features mean nothing"}, Path(d) / STAND_IN_MARKER)


# --------------------------------------------------------------------------- precompute

def _sidecar_meta(image_path: Path) -> dict | None:
    """``name.json`` beside an image (a shapes-world scene, ``nbcore.shapes.write_image_folder``),
    stored as the sample's ``json`` member as it is; None when there is none."""
    p = image_path.with_suffix(".json")
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def _encoder_info(enc, what: str) -> dict:
    """What identifies an encoder in the manifest and stats meta: its folder and dtype."""
    path = getattr(enc, "path", None) or type(enc).__name__
    dtype = getattr(enc, "dtype", None)
    info = {"path": str(path), "dtype": _dtype_name(dtype) if isinstance(dtype, torch.dtype) else None}
    if (Path(str(path)) / STAND_IN_MARKER).is_file():
        info["stand_in"] = True                     # nbcore.encoders.tiny_random_encoders: random weights
    if what == "dino":
        info.update(view=getattr(enc, "view", None), patch_size=getattr(enc, "patch_size", None),
                    registers=getattr(enc, "num_registers", None))
    elif what == "t5":
        info.update(max_len=getattr(enc, "max_len", None))
    return info


def _plan(pairs, val_fraction: float, seed: int, shard_size: int) -> list[dict]:
    """Shards in write order: {"name", "split", "items"}; a function of the pairs and settings only."""
    n_val = int(round(len(pairs) * val_fraction))
    val_idx = set(np.random.default_rng(seed).permutation(len(pairs))[:n_val].tolist())
    splits = {"train": [p for i, p in enumerate(pairs) if i not in val_idx],
              "val": [p for i, p in enumerate(pairs) if i in val_idx]}
    plan = []
    for split, items in splits.items():
        for k, start in enumerate(range(0, len(items), shard_size)):
            plan.append({"name": f"{split}-{k:06d}.tar", "split": split, "items": items[start:start + shard_size]})
    return plan


def _load_manifest(out: Path, settings: dict, restart: bool) -> dict:
    """The manifest to continue from (finished shards kept) or a fresh one (old shards removed)."""
    path = out / MANIFEST
    old = None
    if path.exists() and not restart:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
    if old is not None and old.get("settings") != settings:
        if not old.get("complete"):
            diff = sorted(k for k in set(settings) | set(old.get("settings", {}))
                          if settings.get(k) != old.get("settings", {}).get(k))
            raise ValueError(f"{out} holds an unfinished precompute with other settings ({', '.join(diff)} differ): "
                             "rerun with the same settings to continue it, or pass --restart to start over")
        old = None   # a finished run with other settings: replaced, as a fresh run would
    kept = {}
    if old is not None:
        for name, rec in old.get("shards", {}).items():
            f = out / name
            if f.exists() and f.stat().st_size == rec.get("bytes"):
                kept[name] = rec
    for f in list(out.glob("train-*.tar")) + list(out.glob("val-*.tar")) + list(out.glob("*.tar.tmp")):
        if f.name not in kept:
            f.unlink()   # stale shards of an older run, or the shard a crash tore
    manifest = {"settings": settings, "shards": kept, "info": (old or {}).get("info", {}), "complete": False}
    write_json(manifest, path)
    return manifest


# --------------------------------------------------------------------------- image size

MAX_DEFAULT_IMAGE_SIZE = 512


class ImageSizeError(ValueError):
    """The image size does not suit the images (the CLI exits 2: a bad argument)."""


def image_sizes(paths) -> dict[Path, tuple[int, int]]:
    """(width, height) of each readable image as it will be seen (EXIF rotation applied), read from
    the file headers only; unreadable files are left out (precompute counts them later)."""
    out = {}
    for path in paths:
        try:
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(0x0112) in (5, 6, 7, 8):   # EXIF orientation: rotated by 90 degrees
                    w, h = h, w
            out[Path(path)] = (w, h)
        except Exception:  # PIL raises many types for broken files
            continue
    return out


def upscaled_images(sizes: dict, image_size: int, buckets: list[tuple[int, int]] | None) -> list[tuple[Path, float]]:
    """The images ``image_size`` (and its buckets) would enlarge, with their factor, largest first."""
    out = []
    for path, (w, h) in sizes.items():
        H, W = (image_size, image_size) if buckets is None else choose_bucket(w, h, buckets)
        factor = max(W / w, H / h)
        if factor > 1 + 1e-9:
            out.append((path, factor))
    return sorted(out, key=lambda pf: -pf[1])


def fitting_image_size(sizes: dict, step: int, bucket_fn: Callable[[int], list] | None = None,
                       cap: int = MAX_DEFAULT_IMAGE_SIZE) -> int | None:
    """The largest multiple of ``step`` px, at most ``cap``, that upscales no image (``bucket_fn``:
    image size -> its buckets, for ``--buckets``); None when even ``step`` would."""
    if not sizes:
        return None
    # no square crop (or bucket of that area) can avoid upscaling above the smallest side (area)
    bound = min(min(w, h) for w, h in sizes.values()) if bucket_fn is None else \
        math.isqrt(min(w * h for w, h in sizes.values()))
    for s in range(min(cap, bound) // step * step, 0, -step):
        if not upscaled_images(sizes, s, bucket_fn(s) if bucket_fn else None):
            return s
    return None


def precompute(images_dir, out_dir, dino, t5, vae, image_size: int | None = None, batch_size: int = 8,
               shard_size: int = 1000, val_fraction: float = 0.0, seed: int = 0, device: str = "auto",
               dtype: str = "float32", write_png: bool = True, progress: bool = True, *,
               dino_dtype: str | None = None, t5_dtype: str | None = None, vae_dtype: str | None = None,
               workers: int = 0, buckets: bool = False, bucket_step: int | None = None,
               max_aspect: float = 2.0, restart: bool = False, allow_upscale: bool = False) -> dict:
    """Encode image/caption pairs with the real encoders into contract shards + stats.json (see the
    module docstring). ``dino``, ``t5``, ``vae`` are local folders or already built encoder objects.
    ``image_size`` None: the largest that upscales no image (``fitting_image_size``); a given size
    that would upscale an image is a ValueError unless ``allow_upscale``.

    Returns a summary {"train", "val" (samples written), "skipped_no_caption", "unreadable" (count;
    "unreadable_files" names up to 10), "skips" (reason -> every file left out: "no caption",
    "caption without an image", "unreadable caption", "unreadable image"), "caption_fallbacks"
    (captions not in UTF-8, read as cp1252 or latin-1, ``read_caption``), "captions_truncated", "latent_shape" (C, S/f, S/f of the
    square), "buckets" ("HxW" px -> count), "dino_patches" (P, Dd), "text_dim", "shards_kept" (from
    an interrupted run), "shards_written", "images", "seconds", "images_per_s"}.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    found = scan_folder(images_dir)
    pairs, missing = found.pairs, found.no_caption
    if not pairs:
        raise ValueError(f"no image + .txt caption pairs in {images_dir}")
    dino = DinoV3Encoder(dino, device, dino_dtype or dtype) if isinstance(dino, (str, Path)) else dino
    t5 = T5TextEncoder(t5, device, t5_dtype or dtype) if isinstance(t5, (str, Path)) else t5
    vae = VAECodec(vae, device, vae_dtype or dtype) if isinstance(vae, (str, Path)) else vae
    step = bucket_step or 8 * vae.downsample
    if buckets and step % vae.downsample:
        raise ValueError(f"bucket step {step} px is not a multiple of the VAE's downsampling {vae.downsample}")
    image_size = _choose_image_size([p for _, p, _ in pairs], image_size, step, buckets, max_aspect, allow_upscale)
    bucket_list = aspect_buckets(image_size, step, max_aspect) if buckets else None
    if not buckets and image_size % vae.downsample:
        raise ValueError(f"image size {image_size} is not a multiple of the VAE's downsampling {vae.downsample}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"images_dir": str(Path(images_dir).resolve()), "pairs": len(pairs), "pairs_sha1": _pairs_digest(pairs),
                "image_size": image_size, "buckets": bucket_list and [list(b) for b in bucket_list],
                "seed": seed, "val_fraction": val_fraction, "shard_size": shard_size, "write_png": write_png,
                "dino": _encoder_info(dino, "dino"), "t5": _encoder_info(t5, "t5"), "vae": vae.spec()}
    manifest = _load_manifest(out, settings, restart)
    plan = _plan(pairs, val_fraction, seed, shard_size)
    todo = [s for s in plan if s["name"] not in manifest["shards"]]
    flat = [(s["name"], item) for s in todo for item in s["items"]]                      # (shard name, pair)

    bar = tqdm(total=len(pairs), initial=len(pairs) - len(flat), desc="precompute", unit="img", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    writer = _ShardWriter(out, manifest, (dino, t5, vae), batch_size, write_png, bar)
    paths = [item[1] for _, item in flat]
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, image_size, bucket_list), batch_size=None,
                                         num_workers=workers, collate_fn=_identity)
    try:
        for i, img, err in loader:                  # images arrive decoded, in plan order
            name, item = flat[i]
            if name != writer.name:
                writer.finish()
                writer.start(name)
            writer.add(item, img, err)
        writer.finish()
    finally:
        bar.close()
        writer.close()                              # a crash: the torn shard stays a .tmp, removed on resume
    seconds = time.perf_counter() - t0
    manifest["complete"] = True
    write_json(manifest, out / MANIFEST)
    totals = _totals(manifest)
    info = manifest["info"]
    skips = {"no caption": [p.name for p in missing], "caption without an image": found.orphan_captions,
             "unreadable caption": found.caption_unreadable, "unreadable image": totals["unreadable"]}
    summary = {"train": totals["train"], "val": totals["val"], "skipped_no_caption": len(missing),
               "skips": {reason: files for reason, files in skips.items() if files},
               "caption_fallbacks": found.caption_fallbacks,
               "unreadable": len(totals["unreadable"]), "unreadable_files": totals["unreadable"][:10],
               "captions_truncated": totals["captions_truncated"],
               "image_size": image_size,
               "latent_shape": [info.get("latent_channels"), image_size // vae.downsample, image_size // vae.downsample],
               "buckets": totals["buckets"], "dino_patches": info.get("dino_patches"), "text_dim": info.get("text_dim"),
               "shards_kept": len(plan) - len(todo), "shards_written": len(todo), "images": len(flat),
               "seconds": seconds, "images_per_s": len(flat) / max(seconds, 1e-9)}
    if totals["train"]:
        stats = compute_stats(shard_list(out, "train"))
        stats.meta.update(source="nbcore.encoders.precompute", images_dir=settings["images_dir"], image_size=image_size,
                          buckets=settings["buckets"], codec=vae.spec(), encoders={"dino": settings["dino"], "t5": settings["t5"],
                                                                                 "vae": _encoder_info(vae, "vae")},
                          n_train=totals["train"], n_val=totals["val"])
        stats.save(out / "stats.json")
    return summary


def _choose_image_size(paths, image_size: int | None, step: int, buckets: bool, max_aspect: float,
                       allow_upscale: bool) -> int:
    """``image_size`` checked against the images (ValueError, one line, when it would upscale one and
    ``allow_upscale`` is off), or the largest that fits them when None."""
    sizes = image_sizes(paths)
    bucket_fn = (lambda s: aspect_buckets(s, step, max_aspect)) if buckets else None
    if image_size is None:
        fit = fitting_image_size(sizes, step, bucket_fn)
        if fit is not None:
            return fit
        w, h = min(sizes.values(), key=lambda wh: min(wh)) if sizes else (0, 0)
        raise ImageSizeError(f"the smallest image ({w}x{h} px) is below the {step} px size step: pass --image-size "
                         f"and --allow-upscale to enlarge it")
    if not allow_upscale:
        up = upscaled_images(sizes, image_size, bucket_fn(image_size) if bucket_fn else None)
        if up:
            (path, factor), fit = up[0], fitting_image_size(sizes, step, bucket_fn)
            w, h = sizes[path]
            raise ImageSizeError(f"--image-size {image_size} would upscale {len(up)} of {len(sizes)} images (e.g. "
                             f"{path.name}, {w}x{h} px, {factor:.1f}x): pass --image-size {fit or step} (the largest "
                             f"that fits every image; the default) or --allow-upscale")
    return image_size


def _pairs_digest(pairs) -> str:
    """SHA-1 of the (key, file name, caption) list: a changed folder is a different plan."""
    digest = hashlib.sha1()
    for key, path, cap in pairs:
        digest.update(f"{key}\0{path.name}\0{cap}\n".encode("utf-8"))
    return digest.hexdigest()


def _totals(manifest: dict) -> dict:
    """Samples per split, bucket counts, unreadable files and truncated captions over every
    finished shard (kept from an interrupted run or written now)."""
    out = {"train": 0, "val": 0, "buckets": {}, "unreadable": [], "captions_truncated": 0}
    for name, rec in sorted(manifest["shards"].items()):
        out[name.split("-")[0]] += len(rec["keys"])
        for hw, n in rec["buckets"].items():
            out["buckets"][hw] = out["buckets"].get(hw, 0) + n
        out["unreadable"] += rec["unreadable"]
        out["captions_truncated"] += rec["captions_truncated"]
    return out


class _ShardWriter:
    """One shard at a time: ``start(name)`` opens NAME.tar.tmp; ``add(pair, image, error)`` queues
    an image by its size and encodes a full batch of one size; ``finish()`` encodes what is queued,
    renames the .tmp to NAME.tar and records it (keys, buckets, unreadable files, truncated
    captions, bytes) in the manifest, which is written at once (what a resume keeps)."""

    def __init__(self, out: Path, manifest: dict, encoders, batch_size: int, write_png: bool, bar):
        self.out, self.manifest, self.batch_size, self.write_png, self.bar = out, manifest, batch_size, write_png, bar
        self.dino, self.t5, self.vae = encoders
        self.name = self.tar = self.rec = None
        self.pending: dict = defaultdict(list)      # (H, W) -> [(pair, image (3, H, W) uint8)]

    def start(self, name: str) -> None:
        self.name = name
        self.rec = {"keys": [], "buckets": {}, "unreadable": [], "captions_truncated": 0}
        self.tar = wds.TarWriter(str(self.out / (name + ".tmp")), encoder=False, mtime=0)

    def add(self, pair, image, error) -> None:
        if image is None:                           # unreadable: counted in the shard's record
            self.rec["unreadable"].append(f"{pair[1].name}: {error}")
            self.bar.update(1)
            return
        queue = self.pending[tuple(image.shape[1:])]
        queue.append((pair, image))
        if len(queue) == self.batch_size:
            self._encode(self.pending.pop(tuple(image.shape[1:])))

    def finish(self) -> None:
        if self.name is None:
            return
        for size in list(self.pending):
            self._encode(self.pending.pop(size))
        self.tar.close()
        final = self.out / self.name
        os.replace(self.out / (self.name + ".tmp"), final)
        self.manifest["shards"][self.name] = {**self.rec, "bytes": final.stat().st_size}
        write_json(self.manifest, self.out / MANIFEST)
        self.name = self.tar = self.rec = None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def _encode(self, chunk) -> None:
        """Encode one batch of a single image size and write its samples."""
        images = torch.stack([img for _, img in chunk]).float() / 255                 # (B, 3, H, W)
        pairs = [pair for pair, _ in chunk]
        caps = [cap for _, _, cap in pairs]
        cls, patches = self.dino(images)                                                # (B, Dd), (B, P, Dd)
        texts = self.t5.trimmed(caps)                                                   # [(L_i, Dt)]
        lat = self.vae.encode(images)                                                   # (B, C, H/f, W/f)
        if hasattr(self.t5, "n_tokens"):
            self.rec["captions_truncated"] += sum(n > self.t5.max_len for n in self.t5.n_tokens(caps))
        for j, (key, path, cap) in enumerate(pairs):
            self.tar.write({"__key__": key, **encode_sample_members(
                lat[j], cls[j], patches[j], texts[j], cap, images[j] if self.write_png else None, _sidecar_meta(path))})
            self.rec["keys"].append(key)
        hw = f"{images.shape[2]}x{images.shape[3]}"
        self.rec["buckets"][hw] = self.rec["buckets"].get(hw, 0) + len(pairs)
        self.manifest["info"].update(latent_channels=int(lat.shape[1]), dino_patches=list(patches.shape[1:]),
                                     text_dim=int(texts[0].shape[-1]))
        self.bar.update(len(pairs))


if __name__ == "__main__":   # python -m nbcore.encoders: the command line is nbcore.cli.encoders's
    from nbcore.cli.encoders import main as _main
    sys.exit(_main())
