"""One codec interface between images and the latents the diffusion model works in.

``Codec``: ``encode(images (B, 3, Sh, Sw) in [0, 1]) -> latents (B, C, Sh/f, Sw/f)``;
``decode(latents) -> images (B, 3, Sh, Sw)`` clamped to [0, 1]; ``spec() -> dict``, a small
JSON-able description from which ``codec_from_spec`` rebuilds an equivalent codec. ``channels`` (C)
and ``downsample`` (f) describe the latent grid. Two implementations:

- ``ShapesPixelCodec``: the shapes world's ``PixelCodec`` (defined here, made by ``nbcore.shapes``;
  f = 2, no learned compression) behind this interface.
  spec ``{"kind": "pixel", "channels", "shift": [r, g, b], "scale", "seed"}``.
- ``VAECodec``: a diffusers ``AutoencoderKL`` from a LOCAL folder (``local_files_only``). Latents are
  ``(posterior mean - shift_factor) * scaling_factor``, the scaled latents the model sees.
  spec ``{"kind": "vae", "path", "scaling_factor", "shift_factor", "channels", "downsample", "dtype"}``.

Which codec made a dataset is recorded in its ``stats.json`` (``meta["codec"]``, written by
``record_codec`` / ``nbcore.encoders.precompute``) and travels into checkpoints exported by
``nbcore.pretrained``; ``codec_from_stats`` rebuilds it. A VAE is found at the recorded path or at
the folder the user passes (``vae_dir``, the CLIs' ``--vae DIR``); neither reachable is a clear error.

Shape legend: B batch, Sh Sw image height/width, C latent channels, f downsampling factor.
"""
from __future__ import annotations

import abc
import inspect
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .stats import Stats
from .utils import resolve_device

__all__ = ["Codec", "PixelCodec", "ShapesPixelCodec", "VAECodec", "as_codec", "spec_of", "codec_from_spec",
           "codec_spec_from_stats", "codec_from_stats", "record_codec", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- the shapes world's pixel codec

class PixelCodec:
    """Stand-in for the VAE (no learned compression): pixel_unshuffle by 2 -> 12 channels per
    2x2 cell, shift by the world's mean colour, scale to about unit std, then a fixed orthonormal
    map 12 -> C (C >= 12; orthonormal columns, so ``decode(encode(x)) == x`` up to float rounding).

    ``encode(images (B, 3, S, S) in [0, 1]) -> latents (B, C, S/2, S/2)``;
    ``decode(latents) -> images (B, 3, S, S)`` clamped to [0, 1].
    """

    def __init__(self, channels: int, shift=(0.0, 0.0, 0.0), scale: float = 1.0, seed: int = 777):
        if channels < 12:
            raise ValueError(f"the pixel codec needs >= 12 latent channels to be invertible, got {channels}")
        self.channels, self.scale = channels, float(scale)
        self.shift = torch.tensor(shift, dtype=torch.float32).repeat_interleave(4)     # (12,) unshuffle order c*4 + k
        q, _ = torch.linalg.qr(torch.randn(channels, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        self.weight = q.float().contiguous()                                           # (C, 12), W^T W = I

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(images.float(), 2)                                       # (B, 12, h, w)
        x = (x - self.shift.to(x.device)[None, :, None, None]) * self.scale
        return torch.einsum("ck,bkhw->bchw", self.weight.to(x.device), x)             # (B, C, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("ck,bchw->bkhw", self.weight.to(latents.device), latents.float())  # (B, 12, h, w)
        x = x / self.scale + self.shift.to(x.device)[None, :, None, None]
        return F.pixel_shuffle(x, 2).clamp(0, 1)                                       # (B, 3, S, S)


# PixelCodec's own default seed (its weights are a function of it), read from its signature so the
# two cannot drift apart.
_PIXEL_SEED = inspect.signature(PixelCodec.__init__).parameters["seed"].default


def _local_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: local model folder not found: {p} (no hub downloads: pass a folder)")
    return p


class Codec(abc.ABC):
    """images (B, 3, Sh, Sw) in [0, 1] <-> latents (B, C, Sh/f, Sw/f); ``spec()`` rebuilds it."""

    channels: int       # C
    downsample: int     # f: image side / latent side

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, Sh, Sw) in [0, 1] -> (B, C, Sh/f, Sw/f) float32 latents."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, h*f, w*f) float32 images clamped to [0, 1]."""

    @abc.abstractmethod
    def spec(self) -> dict:
        """A small JSON-able dict with ``kind``; ``codec_from_spec(spec)`` rebuilds the codec."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


# --------------------------------------------------------------------------- the shapes world's codec

class ShapesPixelCodec(Codec):
    """The shapes world's ``PixelCodec`` (pixel_unshuffle by 2, shift, scale, fixed orthonormal
    12 -> C map) as a ``Codec``. Build from its parameters, or wrap an existing one with
    ``ShapesPixelCodec.wrap(pixel_codec, seed)``."""

    downsample = 2

    def __init__(self, channels: int, shift=(0.0, 0.0, 0.0), scale: float = 1.0, seed: int = _PIXEL_SEED):
        self.seed = int(seed)
        self.inner = PixelCodec(int(channels), shift=tuple(float(v) for v in shift), scale=float(scale), seed=self.seed)
        self.channels = self.inner.channels

    @classmethod
    def wrap(cls, codec: PixelCodec, seed: int = _PIXEL_SEED) -> "ShapesPixelCodec":
        """Wrap ``codec``; ``seed`` is the one it was built with (PixelCodec does not keep it). The
        rebuilt map is compared with the codec's: a wrong seed is an error, not a silent other codec."""
        shift = [float(v) for v in codec.shift[::4]]          # (12,) in unshuffle order c*4 + k -> (3,)
        out = cls(codec.channels, shift, codec.scale, seed)
        if not torch.equal(out.inner.weight, codec.weight):
            raise ValueError(f"this PixelCodec was not built with seed {seed}: pass the seed it was made with")
        out.inner = codec
        return out

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(images)                       # (B, C, S/2, S/2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents)                      # (B, 3, S, S), clamped by PixelCodec

    def spec(self) -> dict:
        return {"kind": "pixel", "channels": int(self.channels),
                "shift": [float(v) for v in self.inner.shift[::4]], "scale": float(self.inner.scale),
                "seed": self.seed}


# --------------------------------------------------------------------------- a diffusers VAE

class VAECodec(Codec):
    """AutoencoderKL from a local folder; latents scaled like the diffusion model sees them.

    ``scaling_factor`` / ``shift_factor`` default to the folder's config (1.0 / 0.0 when it has
    none); a recorded spec passes the values its latents were made with. ``sample=True`` draws from
    the posterior instead of taking its mean.
    """

    def __init__(self, path, device: str = "auto", dtype: torch.dtype | str = torch.float32, sample: bool = False,
                 scaling_factor: float | None = None, shift_factor: float | None = None):
        p = _local_dir(path, "VAE")   # before the (slow) diffusers import: a wrong path fails fast
        from diffusers import AutoencoderKL
        self.path = str(p.resolve())
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.device, self.sample = resolve_device(device), sample
        self.vae = AutoencoderKL.from_pretrained(p, local_files_only=True, torch_dtype=self.dtype).to(self.device).eval()
        cfg = self.vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(shift_factor if shift_factor is not None
                                  else getattr(cfg, "shift_factor", None) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() * 2 - 1).to(self.device, self.dtype)                       # [0, 1] -> [-1, 1]
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.sample else dist.mean                                 # (B, C, Sh/f, Sw/f)
        return ((z.float() - self.shift_factor) * self.scaling_factor).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() / self.scaling_factor + self.shift_factor
        x = self.vae.decode(z.to(self.device, self.dtype)).sample.float()               # (B, 3, Sh, Sw) in ~[-1, 1]
        return ((x + 1) / 2).clamp(0, 1).cpu()

    def spec(self) -> dict:
        return {"kind": "vae", "path": self.path, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "channels": self.channels, "downsample": self.downsample,
                "dtype": str(self.dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------- specs

def as_codec(codec) -> Codec:
    """A ``Codec`` as is; a shapes ``PixelCodec`` wrapped (built with its default seed)."""
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, PixelCodec):
        return ShapesPixelCodec.wrap(codec)
    raise TypeError(f"not a codec: {type(codec).__name__} (want nbcore.codec.Codec or nbcore.shapes.PixelCodec)")


def spec_of(codec) -> dict:
    """The spec of a ``Codec`` or of a shapes ``PixelCodec``."""
    return as_codec(codec).spec()


def codec_from_spec(spec: dict, vae_dir=None, device: str = "auto", dtype: str | None = None) -> Codec:
    """Rebuild the codec a spec describes. A VAE is loaded from ``vae_dir`` when given, else from the
    recorded ``path``; ``dtype`` (None = the recorded one) is the VAE's compute dtype."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "pixel":
        return ShapesPixelCodec(spec["channels"], spec["shift"], spec["scale"], spec.get("seed", _PIXEL_SEED))
    if kind == "vae":
        recorded = spec.get("path")
        if vae_dir is None:
            if not recorded or not os.path.isdir(recorded):
                raise FileNotFoundError(
                    f"the latents were made with the VAE at {recorded!r}, which is not a folder on this machine: "
                    "pass --vae DIR (vae_dir=DIR), a local diffusers AutoencoderKL folder of that VAE")
            vae_dir = recorded
        codec = VAECodec(vae_dir, device=device, dtype=dtype or spec.get("dtype", "float32"),
                         scaling_factor=spec.get("scaling_factor"), shift_factor=spec.get("shift_factor"))
        for key in ("channels", "downsample"):
            if key in spec and int(spec[key]) != getattr(codec, key):
                raise ValueError(f"the VAE in {vae_dir} has {key}={getattr(codec, key)}, but the data was "
                                 f"encoded with {key}={spec[key]} (VAE {recorded}): pass the VAE the data was made with")
        return codec
    raise ValueError(f"unknown codec spec {spec!r}: want kind 'pixel' or 'vae'")


def codec_spec_from_stats(stats) -> dict | None:
    """The codec spec a dataset records: ``meta["codec"]``; for shapes-world data written before
    codecs were recorded, the pixel codec rebuilt from ``codec_shift`` / ``codec_scale`` and the
    latent channel count; None when the stats do not say (older precomputed real data)."""
    st = stats if isinstance(stats, Stats) else Stats.load(stats)
    meta = st.meta or {}
    if isinstance(meta.get("codec"), dict):
        return dict(meta["codec"])
    if "codec_shift" in meta and "codec_scale" in meta and "latent" in st.entries:
        return {"kind": "pixel", "channels": st.dim("latent"), "shift": [float(v) for v in meta["codec_shift"]],
                "scale": float(meta["codec_scale"]), "seed": _PIXEL_SEED}
    return None


def codec_from_stats(stats, vae_dir=None, device: str = "auto", dtype: str | None = None) -> Codec:
    """The codec a dataset was made with (``stats``: Stats or a stats.json path). Without a recorded
    codec, ``vae_dir`` is taken as the VAE (its own config's factors); without either, an error."""
    spec = codec_spec_from_stats(stats)
    if spec is None:
        if vae_dir is None:
            raise ValueError(f"{stats if not hasattr(stats, 'meta') else 'stats.json'} does not record the codec "
                             "its latents were made with: pass --vae DIR (the AutoencoderKL folder used to precompute)")
        return VAECodec(vae_dir, device=device, dtype=dtype or "float32")
    return codec_from_spec(spec, vae_dir=vae_dir, device=device, dtype=dtype)


def record_codec(stats_path, codec) -> dict:
    """Write ``codec``'s spec (a Codec, a shapes PixelCodec or a spec dict) into the ``meta`` of the
    stats.json at ``stats_path``; returns the spec."""
    spec = dict(codec) if isinstance(codec, dict) else spec_of(codec)
    if spec.get("kind") not in ("pixel", "vae"):
        raise ValueError(f"unknown codec spec {spec!r}: want kind 'pixel' or 'vae'")
    st = Stats.load(stats_path)
    st.meta["codec"] = spec
    st.save(stats_path)
    return spec
