"""The shapes world: the embedded default dataset, made by the project itself.

Images of 1-3 coloured shapes (circle / square / triangle, small / large) on a plain dark
background, captions generated from the same scene ("a large red circle at the top left and a
small blue square at the bottom right"), and per-sample metadata (kind, colour, box, centroid).
The layout is known exactly, so "blobs in the right places" becomes a number.

Everything that plays an encoder here is a **stand-in** with the real encoder's interface, not a
pretrained network:

- ``StandInTextEncoder`` (plays T5): a fixed seeded embedding table over a small word vocabulary,
  then two residual layers of fixed random mixing over neighbouring tokens.
- ``StandInPatchEncoder`` (plays DINOv3): a frozen random per-patch MLP; each patch feature comes
  from that patch's pixels only, so like DINOv3's RoPE features it carries no absolute position.
  CLS is a fixed random projection of the mean-pooled patch features.
- ``PixelCodec`` (plays the VAE): pixel_unshuffle by 2, then a fixed orthonormal map 12 -> C
  channels, scaled to about unit std. decode(encode(x)) == x (up to float rounding) for C >= 12.

The encoders' weights are fixed (their own constant seeds), independent of the world seed: data
made with different world seeds share one embedding space. Sizes (``WorldSizes``) are passed in by
the caller, so the data side does not import the model: ``WorldSizes.of(model_cfg)`` reads them
off a model config, and ``WORLDS`` names the worlds of the model presets (a test keeps the two equal):

    nano        24 px images, 12x12x12 latents, 6x6 patch grid of 4 px patches, Dd 64, Dt 64, L <= 32
    micro       32 px images, 12x16x16 latents, 4x4 patch grid of 8 px patches, Dd 64, Dt 64, L <= 32
    tiny        64 px images, 12x32x32 latents, 8x8 patch grid of 8 px patches, Dd 64, Dt 64, L <= 32
    production  128 px images, 16x64x64 latents, 14x14 grid (a 224 px view, 16 px patches),
                Dd 1024, Dt 4096, L <= 512

Shape legend: B batch, S image side, C latent channels, h = w = S/2 latent side, g patch grid,
P = g*g patches, Dd patch/CLS dim, L tokens, Dt token dim, r mixing rank.

CLI: ``python -m nbcore.shapes make OUT_DIR --n N --seed S [--preset micro|tiny|production]
[--val-fraction F] [--shard-size K]`` writes ``OUT_DIR/{train,val}-NNNNNN.tar`` and
``OUT_DIR/stats.json`` (the docs/DESIGN.md data contract).
"""
from __future__ import annotations

import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from .codec import PixelCodec
from .data import shard_records
from .stats import StatsAccumulator

__all__ = ["COLOURS", "BACKGROUND", "KINDS", "SIZES", "Rules", "RULES", "Shape", "Scene", "ShapesWorld", "WorldSizes", "WORLDS",
           "StandInTextEncoder", "StandInPatchEncoder", "PixelCodec", "colour_mask",
           "shape_mask", "sample_scene", "shuffle_layout", "shift_scene", "shift_extent", "region_of", "make_dataset", "write_image_folder", "encode_sample_members", "VOCAB"]

# Colours are multiples of 1/255 so a PNG round trip is exact. Pairwise RGB distance >= 0.5.
COLOURS: dict[str, tuple[float, float, float]] = {
    name: tuple(v / 255 for v in rgb) for name, rgb in {
        "red": (230, 25, 25),
        "green": (25, 190, 40),
        "blue": (40, 75, 240),
        "yellow": (240, 215, 25),
        "magenta": (215, 40, 215),
        "cyan": (25, 215, 230),
    }.items()
}
BACKGROUND: tuple[float, float, float] = (20 / 255, 20 / 255, 20 / 255)
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.10, "large": 0.17}     # half-extent as a fraction of the image side
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")
_MARGIN = 0.02                             # gap kept between shapes and to the image border

# The stand-in text encoder's vocabulary: every word a caption can hold, plus a few spellings a
# user may type in a demo. Anything else maps to <unk> (no hashing).
VOCAB = (["<pad>", "<unk>", "a", "an", "and", ",", "at", "the", "on", "in", "of", "with",
          "top", "bottom", "left", "right", "centre", "center", "middle", "small", "large", "big"]
         + list(KINDS) + list(COLOURS))
_WORD = re.compile(r"[a-z]+|[^a-z\s]")


def region_of(cx: float, cy: float) -> tuple[str, str]:
    """Which cell of the 3x3 grid of regions holds (cx, cy): (row word, column word)."""
    return _ROWS[min(int(cy * 3), 2)], _COLS[min(int(cx * 3), 2)]


def _where(row: str, col: str) -> str:
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"at the {row} {col}"


# --------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Rules:
    """What a world's scenes may hold: ``colours`` (names in COLOURS), ``sizes`` (size word ->
    half-extent as a fraction of the image side), 1..``max_shapes`` shapes, ``margin`` kept between
    shapes and to the border. ``RULES`` names them; a dataset records its rules in stats.json."""
    colours: tuple = tuple(COLOURS)
    sizes: tuple = tuple(SIZES.items())        # ((word, half-extent), ...)
    max_shapes: int = 3
    margin: float = _MARGIN

    def __post_init__(self):
        bad = [c for c in self.colours if c not in COLOURS]
        if bad or not self.colours:
            raise ValueError(f"colours must be a non-empty subset of {sorted(COLOURS)}, got {list(self.colours)}")
        if not self.sizes or any(w not in ("small", "large") or not 0 < r < 0.5 for w, r in self.sizes):
            raise ValueError(f"sizes must map small/large to half-extents in (0, 0.5), got {self.sizes}")
        if self.max_shapes < 1 or not 0 <= self.margin < 0.5:
            raise ValueError("max_shapes must be >= 1 and margin in [0, 0.5)")

    def to_json(self) -> dict:
        return {"colours": list(self.colours), "sizes": dict(self.sizes), "max_shapes": self.max_shapes,
                "margin": self.margin}


RULES: dict[str, Rules] = {
    # 1-3 shapes of 6 colours, half-extent 0.10 / 0.17: the world of the tiny and production presets
    "standard": Rules(),
    # 1-2 shapes of 4 colours, half-extent 0.14 / 0.20, wider gaps (1.6 px at 32 px): what a small
    # DiT learns to draw and place within the cpu profile's budget (README, research section)
    "easy": Rules(colours=("red", "green", "blue", "yellow"), sizes=(("small", 0.14), ("large", 0.20)),
                  max_shapes=2, margin=0.05),
}


@dataclass(frozen=True)
class Shape:
    """One shape: kind in KINDS, colour in COLOURS, centre (cx, cy) in [0, 1] image coordinates
    (x to the right, y down), size "small" / "large", half-extent ``r`` (None: the standard
    ``SIZES[size]``)."""
    kind: str
    colour: str
    cx: float
    cy: float
    size: str
    r: float | None = None

    @property
    def radius(self) -> float:
        """Half-extent as a fraction of the image side."""
        return SIZES[self.size] if self.r is None else self.r

    @property
    def region(self) -> tuple[str, str]:
        return region_of(self.cx, self.cy)

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in [0, 1]."""
        r = self.radius
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)

    def centroid(self) -> tuple[float, float]:
        """Centre of mass of the drawn shape (x, y): the triangle's sits a third of r below cy."""
        if self.kind == "triangle":
            return (self.cx, self.cy + self.radius / 3)
        return (self.cx, self.cy)

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {_where(*self.region)}"


@dataclass
class Scene:
    """A list of non-overlapping shapes on the plain background."""
    shapes: list[Shape] = field(default_factory=list)

    def caption(self) -> str:
        """'a large red circle at the top left and a small blue square at the bottom right'."""
        parts = [s.phrase() for s in self.shapes]
        if len(parts) <= 2:
            return " and ".join(parts)
        return ", ".join(parts[:-1]) + " and " + parts[-1]

    def to_json(self) -> dict:
        """Metadata per shape: kind, colour, size, cx, cy, region, box, centroid (image fractions)."""
        return {"shapes": [{
            "kind": s.kind, "colour": s.colour, "size": s.size, "cx": s.cx, "cy": s.cy,
            "radius": s.radius, "region": list(s.region), "box": [round(v, 6) for v in s.box()],
            "centroid": [round(v, 6) for v in s.centroid()]} for s in self.shapes]}

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        def r(s):   # a half-extent other than the standard one travels with the shape
            v = float(s.get("radius", SIZES[s["size"]]))
            return None if abs(v - SIZES[s["size"]]) < 1e-9 else v
        return cls([Shape(s["kind"], s["colour"], float(s["cx"]), float(s["cy"]), s["size"], r(s))
                    for s in d["shapes"]])


def _overlaps(a: Shape, b: Shape, margin: float = _MARGIN) -> bool:
    gap = a.radius + b.radius + margin
    return abs(a.cx - b.cx) < gap and abs(a.cy - b.cy) < gap


def _random_centre(rng: np.random.Generator, radius: float, margin: float = _MARGIN) -> tuple[float, float]:
    """The world's placement rule: a centre drawn uniformly where the whole shape plus ``margin``
    stays inside the image, rounded to 4 decimals (one ``rng.uniform(size=2)`` draw)."""
    r = radius + margin
    cx, cy = (round(float(v), 4) for v in rng.uniform(r, 1 - r, size=2))
    return cx, cy


def _fits(cand: Shape, placed: list[Shape], margin: float = _MARGIN) -> bool:
    return not any(_overlaps(cand, s, margin) for s in placed)


def sample_scene(rng: np.random.Generator, max_shapes: int | None = None, rules: Rules | None = None) -> Scene:
    """1..max_shapes shapes with random kind, colour, size and position, boxes not overlapping
    (``rules``: the standard world's when None; ``max_shapes`` overrides its count)."""
    std = rules is None or rules == RULES["standard"]
    rules = rules or RULES["standard"]
    n = int(rng.integers(1, (max_shapes or rules.max_shapes) + 1))
    sizes = dict(rules.sizes)
    shapes: list[Shape] = []
    for _ in range(n):
        for _try in range(50):
            size = str(rng.choice(list(sizes)))
            cx, cy = _random_centre(rng, sizes[size], rules.margin)
            cand = Shape(str(rng.choice(KINDS)), str(rng.choice(list(rules.colours))), cx, cy, size,
                         None if std else sizes[size])
            if _fits(cand, shapes, rules.margin):
                shapes.append(cand)
                break
    return Scene(shapes)


def shuffle_layout(scene: Scene, rng: np.random.Generator, tries: int = 200, margin: float = _MARGIN) -> Scene:
    """The same shapes (kind, colour, size, in caption order) at new random positions drawn by the
    world's own placement rule (``_random_centre``, boxes not overlapping): right content, wrong
    places -- what "no layout" looks like. Each attempt places the shapes one by one (50 draws
    each, like ``sample_scene``); an attempt that cannot fit a shape starts over, and after
    ``tries`` attempts a ``RuntimeError`` says so (never reached for the world's 1-3 shapes)."""
    for _attempt in range(tries):
        placed: list[Shape] = []
        for s in scene.shapes:
            for _try in range(50):
                cand = Shape(s.kind, s.colour, *_random_centre(rng, s.radius, margin), s.size, s.r)
                if _fits(cand, placed, margin):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == len(scene.shapes):
            return Scene(placed)
    raise RuntimeError(f"could not place {len(scene.shapes)} shapes without overlap in {tries} attempts")


def shift_scene(scene: Scene, dx: float, dy: float) -> Scene:
    """The whole scene translated rigidly by (dx, dy) (image fractions, x right, y down). The
    translation is clamped per axis so that every shape stays entirely inside the image; shapes keep
    their relative positions, so they never start to overlap. ``shift_extent(scene)`` gives the
    room available in each direction."""
    (left, right), (up, down) = shift_extent(scene)
    dx, dy = min(max(dx, -left), right), min(max(dy, -up), down)
    return Scene([Shape(s.kind, s.colour, round(s.cx + dx, 6), round(s.cy + dy, 6), s.size, s.r) for s in scene.shapes])


def shift_extent(scene: Scene) -> tuple[tuple[float, float], tuple[float, float]]:
    """How far the scene can move rigidly and stay inside the image: ((left, right), (up, down)),
    each >= 0 (image fractions)."""
    if not scene.shapes:
        return (0.0, 0.0), (0.0, 0.0)
    left = max(0.0, min(s.cx - s.radius for s in scene.shapes))
    right = max(0.0, min(1 - s.cx - s.radius for s in scene.shapes))
    up = max(0.0, min(s.cy - s.radius for s in scene.shapes))
    down = max(0.0, min(1 - s.cy - s.radius for s in scene.shapes))
    return (left, right), (up, down)


@lru_cache(maxsize=8)
def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(S, dtype=np.float32) + 0.5) / S    # pixel centres in [0, 1]
    return c[None, :], c[:, None]                     # x (1, S), y (S, 1)


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
    """The pixels a shape covers when drawn alone: (S, S) bool, hard edges (pixel centres inside)."""
    x, y = _grid(image_size)
    r = shape.radius
    if shape.kind == "circle":
        return (x - shape.cx) ** 2 + (y - shape.cy) ** 2 <= r * r
    if shape.kind == "square":
        return (np.abs(x - shape.cx) <= r) & (np.abs(y - shape.cy) <= r)
    if shape.kind == "triangle":    # apex up at (cx, cy - r), base from cx - r to cx + r at cy + r
        top = shape.cy - r
        return (y >= top) & (y <= shape.cy + r) & (np.abs(x - shape.cx) <= (y - top) * 0.5)
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(scene: Scene, image_size: int) -> torch.Tensor:
    """Draw the scene: (3, S, S) float32 in [0, 1], hard edges, later shapes on top."""
    S = image_size
    img = np.empty((S, S, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for s in scene.shapes:
        img[shape_mask(s, S)] = COLOURS[s.colour]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()                       # (3, S, S)


def colour_mask(images: torch.Tensor, colour_name: str, tol: float = 0.25) -> torch.Tensor:
    """Pixels within RGB distance ``tol`` of a palette colour: images (B, 3, S, S) -> (B, S, S) bool."""
    if colour_name not in COLOURS:
        raise ValueError(f"unknown colour {colour_name!r}; choose from {sorted(COLOURS)}")
    ref = torch.tensor(COLOURS[colour_name], dtype=images.dtype, device=images.device)
    return ((images - ref[None, :, None, None]) ** 2).sum(1) <= tol * tol


# --------------------------------------------------------------------------- stand-in encoders

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class StandInTextEncoder:
    """Stand-in for T5 (not a language model): word tokens -> fixed random vectors, then two
    residual layers of fixed random mixing over a 5-token neighbourhood (through a rank-r
    bottleneck, cheap at Dt = 4096), so a token's vector depends a little on its neighbours.

    ``__call__(captions) -> (emb (B, L, Dt) float32, mask (B, L) bool)``, L = the longest caption
    (at most ``max_len``; longer captions are truncated like a tokenizer's max_length). Padded
    positions are zero and do not influence real ones.
    """

    def __init__(self, dim: int, max_len: int, rank: int = 32, layers: int = 2, seed: int = 1234):
        self.dim, self.max_len = dim, max_len
        self.vocab = {w: i for i, w in enumerate(VOCAB)}
        g = _gen(seed)
        self.table = torch.randn(len(VOCAB), dim, generator=g)                        # (V, Dt)
        self.table[0] = 0                                                              # <pad>
        self.down = torch.randn(layers, dim, rank, generator=g) / math.sqrt(dim)      # (layers, Dt, r)
        self.mix = torch.randn(layers, rank, rank, 5, generator=g) / math.sqrt(5 * rank)  # conv1d weights
        self.up = torch.randn(layers, rank, dim, generator=g)                          # (layers, r, Dt)

    def tokenize(self, caption: str) -> list[int]:
        unk = self.vocab["<unk>"]
        return [self.vocab.get(w, unk) for w in _WORD.findall(caption.lower())][: self.max_len]

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.tokenize(c) for c in captions]
        L = max(1, max(len(i) for i in ids))
        tok = torch.zeros(len(ids), L, dtype=torch.long)
        for b, i in enumerate(ids):
            tok[b, : len(i)] = torch.tensor(i, dtype=torch.long)
        mask = tok != 0                                                                # (B, L)
        m = mask[..., None].float()                                                    # (B, L, 1)
        h = self.table[tok] * m                                                        # (B, L, Dt)
        for k in range(self.down.shape[0]):
            z = (h @ self.down[k]).transpose(1, 2)                                     # (B, r, L)
            z = torch.tanh(F.conv1d(z, self.mix[k], padding=2)).transpose(1, 2)        # (B, L, r)
            h = (h + 0.5 * (z @ self.up[k])) * m                                       # (B, L, Dt)
        return h, mask


class StandInPatchEncoder:
    """Stand-in for DINOv3 (not a trained ViT): a frozen random MLP applied to each patch's own
    pixels, so a patch feature carries no absolute position (moving content to another patch moves
    its feature there). CLS = a fixed random projection of the mean of the patch features.

    ``__call__(images (B, 3, S, S) in [0, 1]) -> (cls (B, Dd), patches (B, P, Dd))``, P = g*g in
    row-major order. If S is not a multiple of g the image is resized to a (16 g) px view first,
    like DINOv3's 224 px view with 16 px patches.
    """

    def __init__(self, image_size: int, grid: int, dim: int, seed: int = 4321):
        self.grid, self.dim = grid, dim
        self.view = image_size if image_size % grid == 0 else 16 * grid
        self.ps = self.view // grid
        d_in = 3 * self.ps * self.ps
        g = _gen(seed)
        self.w1 = torch.randn(d_in, dim, generator=g) * (2.0 / math.sqrt(d_in))      # (3 ps ps, Dd)
        self.b1 = torch.randn(dim, generator=g) * 0.5
        self.w2 = torch.randn(dim, dim, generator=g) / math.sqrt(dim)                  # (Dd, Dd)
        self.wc = torch.randn(dim, dim, generator=g) / math.sqrt(dim)                  # (Dd, Dd)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[-1] != self.view or x.shape[-2] != self.view:
            x = F.interpolate(x, size=(self.view, self.view), mode="bilinear", antialias=True, align_corners=False)
        B, g, ps = x.shape[0], self.grid, self.ps
        x = x.reshape(B, 3, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5)                  # (B, g, g, 3, ps, ps)
        x = x.reshape(B, g * g, 3 * ps * ps)                                           # (B, P, 3 ps ps)
        patches = F.gelu((x - 0.5) @ self.w1 + self.b1) @ self.w2                      # (B, P, Dd)
        cls = patches.mean(1) @ self.wc                                                # (B, Dd)
        return cls, patches


@lru_cache(maxsize=8)
def _pixel_stats(image_size: int) -> tuple[tuple[float, float, float], float]:
    """Per-RGB mean and overall std of world images (a fixed seed, independent of any world seed):
    the codec's shift and scale, like a VAE's shift/scaling factor."""
    rng = np.random.default_rng(2024)
    imgs = torch.stack([render(sample_scene(rng), image_size) for _ in range(256)])  # (256, 3, S, S)
    mean = imgs.mean(dim=(0, 2, 3))
    std = (imgs - mean[None, :, None, None]).std()
    return tuple(round(float(v), 6) for v in mean), round(float(std), 6)


# --------------------------------------------------------------------------- the world

@dataclass(frozen=True)
class WorldSizes:
    """What the world emits: images (3, S, S) with S = ``image_size``, latents
    (``latent_channels``, S/2, S/2) (the codec halves the side), a ``dino_grid`` x ``dino_grid``
    patch grid of ``dino_dim`` features plus a CLS of the same dim, text of ``text_dim`` with at
    most ``text_len`` tokens."""
    image_size: int
    latent_channels: int
    dino_grid: int
    dino_dim: int
    text_dim: int
    text_len: int

    def __post_init__(self):
        if self.image_size < 2 or self.image_size % 2:
            raise ValueError(f"image_size must be even and >= 2 (the codec halves it), got {self.image_size}")
        bad = [k for k in ("latent_channels", "dino_grid", "dino_dim", "text_dim", "text_len") if getattr(self, k) < 1]
        if bad:
            raise ValueError(f"world sizes must be >= 1: {bad}")

    @classmethod
    def of(cls, cfg) -> "WorldSizes":
        """The world that feeds a model config: any object with ModelConfig's ``input_size`` (latent
        side), ``in_channels``, ``dino_grid``, ``dino_dim``, ``text_dim``, ``text_len`` (read, not
        imported: the data side does not depend on the model)."""
        return cls(image_size=2 * cfg.input_size, latent_channels=cfg.in_channels, dino_grid=cfg.dino_grid,
                   dino_dim=cfg.dino_dim, text_dim=cfg.text_dim, text_len=cfg.text_len)


# The worlds of the model presets by name (``make_dataset(preset=...)``, the CLI's --preset);
# tests/test_shapes.py checks each equals WorldSizes.of(nbcore.model.PRESETS[name]).
WORLDS: dict[str, WorldSizes] = {
    "nano": WorldSizes(image_size=24, latent_channels=12, dino_grid=6, dino_dim=64, text_dim=64, text_len=32),
    "micro": WorldSizes(image_size=32, latent_channels=12, dino_grid=4, dino_dim=64, text_dim=64, text_len=32),
    "tiny": WorldSizes(image_size=64, latent_channels=12, dino_grid=8, dino_dim=64, text_dim=64, text_len=32),
    "production": WorldSizes(image_size=128, latent_channels=16, dino_grid=14, dino_dim=1024, text_dim=4096,
                             text_len=512),
}


class ShapesWorld:
    """The shapes world at given sizes.

    ``ShapesWorld(sizes, seed)``: ``sizes`` a ``WorldSizes``, or a model config (``WorldSizes.of``
    reads its sizes, so ``ShapesWorld(model.cfg)`` gives the world that model was trained on).
    ``seed`` drives the scenes (``scene(i, split)``), never the stand-in encoders' weights;
    ``rules`` (a ``Rules`` or a name in ``RULES``) what they may hold.
    """

    def __init__(self, sizes, seed: int = 0, rules: Rules | str = "standard"):
        self.sizes = sizes if isinstance(sizes, WorldSizes) else WorldSizes.of(sizes)
        self.rules = RULES[rules] if isinstance(rules, str) else rules
        self.seed = seed
        self.image_size = self.sizes.image_size
        shift, std = _pixel_stats(self.image_size)
        self.codec = PixelCodec(self.sizes.latent_channels, shift=shift, scale=1.0 / std)
        self.patch_encoder = StandInPatchEncoder(self.image_size, self.sizes.dino_grid, self.sizes.dino_dim)
        self.text_encoder = StandInTextEncoder(self.sizes.text_dim, self.sizes.text_len)

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        return sample_scene(rng, rules=self.rules)

    def scene(self, index: int, split: str = "train") -> Scene:
        """The index-th scene of a split: its own random stream (seed, split, index), so splits are
        reproducible one sample at a time and train / val never share a stream."""
        code = {"train": 0, "val": 1, "test": 2}[split]
        return sample_scene(np.random.default_rng([self.seed, code, index]), rules=self.rules)

    def render(self, scene: Scene) -> torch.Tensor:
        """(3, S, S) float32 in [0, 1]."""
        return render(scene, self.image_size)

    def render_batch(self, scenes: list[Scene]) -> torch.Tensor:
        return torch.stack([self.render(s) for s in scenes])                          # (B, 3, S, S)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: list[str]) -> dict:
        """images (B, 3, S, S) in [0, 1] + captions -> the loader's batch keys, unnormalised:
        latent (B, C, S/2, S/2), dino_emb (B, Dd), dino_patches (B, P, Dd), text_emb (B, L, Dt),
        text_mask (B, L) bool (L = longest caption), txt, png (the images)."""
        cls, patches = self.patch_encoder(images)
        emb, mask = self.text_encoder(list(captions))
        return {"latent": self.codec.encode(images), "dino_emb": cls, "dino_patches": patches,
                "text_emb": emb, "text_mask": mask, "txt": list(captions), "png": images}


# --------------------------------------------------------------------------- shards

def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _to_u8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [0, 1] -> (B, S, S, 3) uint8 (one vectorised op for a whole batch)."""
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _png(image) -> bytes:
    """A (3, S, S) float tensor in [0, 1] or an (S, S, 3) uint8 array -> PNG bytes."""
    arr = image if isinstance(image, np.ndarray) else _to_u8(image[None])[0]          # (S, S, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_sample_members(latent, dinov3, dinov3_patches, t5, txt: str, png=None,
                          meta: dict | None = None) -> dict:
    """One sample's members per the data contract (bytes; arguments named after the members):
    latent.npy (C, H, W) float16, dinov3.npy (Dd,) float32, dinov3_patches.npy (P, Dd) float16,
    t5.npy (L_valid, Dt) float16 (the real tokens only), txt utf-8, optional png and json."""
    f16 = lambda t: t.detach().cpu().numpy().astype(np.float16) if torch.is_tensor(t) else np.asarray(t, np.float16)
    f32 = lambda t: t.detach().cpu().numpy().astype(np.float32) if torch.is_tensor(t) else np.asarray(t, np.float32)
    out = {"latent.npy": _npy(f16(latent)), "dinov3.npy": _npy(f32(dinov3)),
           "dinov3_patches.npy": _npy(f16(dinov3_patches)), "t5.npy": _npy(f16(t5)),
           "txt": txt.encode("utf-8")}
    if png is not None:
        out["png"] = _png(png)
    if meta is not None:
        out["json"] = json.dumps(meta).encode("utf-8")
    return out


def make_dataset(out_dir, n: int, seed: int = 0, preset: str = "tiny", val_fraction: float = 0.1,
                 shard_size: int = 1000, batch_size: int = 256, progress: bool = True,
                 cfg=None, rules: str = "standard") -> Path:
    """Write ``n`` shapes-world samples as WebDataset shards plus ``stats.json`` (train split
    statistics) under ``out_dir``: ``train-000000.tar ...`` and ``val-000000.tar ...``.
    ``round(n * val_fraction)`` samples go to val. Sizes: ``cfg`` (a ``WorldSizes`` or a model
    config) when given, else ``WORLDS[preset]``; ``preset`` is recorded in stats.json. Returns the folder."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if cfg is None and preset not in WORLDS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(WORLDS)} or pass cfg")
    if rules not in RULES:
        raise ValueError(f"unknown rules {rules!r}; choose from {sorted(RULES)}")
    world = ShapesWorld(WORLDS[preset] if cfg is None else cfg, seed=seed, rules=rules)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train-*.tar")) + list(out.glob("val-*.tar")):
        old.unlink()   # a rerun must not leave stale shards beside the new ones
    n_val = int(round(n * val_fraction))
    counts = {"train": n - n_val, "val": n_val}
    acc = StatsAccumulator()
    bar = tqdm(total=n, desc=f"shapes world -> {out}", unit="sample", disable=not progress)
    written: dict = {}   # shard file name -> samples, recorded so readers can tell a cut shard
    for split, count in counts.items():
        if count == 0:
            continue
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0,
                             encoder=False, mtime=0) as sink:   # int mtime: no PAX headers
            for start in range(0, count, batch_size):
                idx = range(start, min(count, start + batch_size))
                scenes = [world.scene(i, split) for i in idx]
                images = world.render_batch(scenes)                                   # (B, 3, S, S)
                b = world.encode(images, [s.caption() for s in scenes])
                lens = b["text_mask"].sum(1).tolist()
                u8 = _to_u8(images)                                                   # (B, S, S, 3)
                lat16 = b["latent"].half()
                patches16, t516 = b["dino_patches"].half(), b["text_emb"].half()
                for j, i in enumerate(idx):
                    members = encode_sample_members(lat16[j], b["dino_emb"][j], patches16[j],
                                                    t516[j, : lens[j]], b["txt"][j], u8[j],
                                                    scenes[j].to_json())
                    sink.write({"__key__": f"{split}-{i:06d}", **members})
                    name = Path(sink.fname).name
                    written[name] = written.get(name, 0) + 1
                    if split == "train":
                        acc.add(latent=lat16[j].float().numpy(), dinov3=b["dino_emb"][j].numpy(),
                                dinov3_patches=patches16[j].float().numpy(),
                                t5=t516[j, : lens[j]].float().numpy())
                bar.update(len(idx))
    bar.close()
    stats = acc.result()
    stats.meta = {"source": "nbcore.shapes (stand-in encoders)", "preset": preset, "seed": seed,
                  "n_train": counts["train"], "n_val": counts["val"], "image_size": world.image_size,
                  "rules": rules, "rules_spec": world.rules.to_json(),
                  "codec_shift": [float(v) for v in world.codec.shift[::4]], "codec_scale": world.codec.scale,
                  # the codec the latents were made with (nbcore.codec.codec_from_stats rebuilds it)
                  "codec": {"kind": "pixel", "channels": world.codec.channels,
                            "shift": [float(v) for v in world.codec.shift[::4]], "scale": world.codec.scale,
                            "seed": 777},
                  "shards": shard_records(out, written)}   # samples per shard: readers tell a cut shard
    stats.save(out / "stats.json")
    return out


def write_image_folder(out_dir, n: int, image_size: int = 64, seed: int = 0, rules: str = "standard",
                       split: str = "train") -> Path:
    """``n`` shapes-world scenes as a folder a user would bring: ``scene_NNNNNN.png`` (``image_size``
    px, square), its caption ``scene_NNNNNN.txt`` and its scene ``scene_NNNNNN.json`` (which
    ``nbcore.encoders.precompute`` stores as the ``json`` member, so layout ground truth survives
    the real encoders). The input of the real-data path's tests and of notebook 07's headless run."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if rules not in RULES:
        raise ValueError(f"unknown rules {rules!r}; choose from {sorted(RULES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = {"train": 0, "val": 1, "test": 2}[split]
    for i in range(n):   # the stream of ShapesWorld(seed=seed).scene(i, split): the same scenes
        scene = sample_scene(np.random.default_rng([seed, code, i]), rules=RULES[rules])
        stem = out / f"scene_{i:06d}"
        (stem.with_suffix(".png")).write_bytes(_png(render(scene, image_size)))
        stem.with_suffix(".txt").write_text(scene.caption(), encoding="utf-8")
        stem.with_suffix(".json").write_text(json.dumps(scene.to_json()), encoding="utf-8")
    return out


if __name__ == "__main__":   # python -m nbcore.shapes: the command line is nbcore.cli.shapes's
    from nbcore.cli.shapes import main as _main
    sys.exit(_main())
