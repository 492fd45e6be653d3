"""NanoDiT: a small text-to-image diffusion transformer conditioned on T5 text, the DINOv3 CLS
vector and (optionally) the DINOv3 spatial patch tokens.

Reads top to bottom: embeddings -> attention -> block -> final layer -> model -> presets -> warm start.

Shape legend
    B batch, C latent channels, H W latent height/width, p patch size,
    N = h*w = (H/p)(W/p) image tokens, L text tokens, P DINO patches (g x g grid), M = L + 1 + P context,
    D hidden, nh heads, hd = D / nh head dim, Dt text dim, Dd DINO dim.

Cross-attention context (docs/DESIGN.md): [text (L) | CLS (1) | patches (P)], each projected to D first.
With ``use_dino_patches=False`` the context is the text alone and the CLS acts only through adaLN:
exactly the pre-patch architecture, so its checkpoints warm-start the patch model.

The arms of the experiment (``nbcore.experiment``) are ``ModelConfig`` switches on top of that:
    patch_context  patches in the cross-attention context (the default; docs/DESIGN.md's model)
    patch_tie      spatially tied patches: ``dino_patch_tie(patch)`` added to the image tokens the
                   patch covers, before the first block (zero-initialised: see initialize_weights)
    patch_norm     LayerNorm on the projected context patches before their position (presets: on)
    context_gate   a per-head gain on the non-text keys, 0 at init: a warm start from the pre-patch
                   model is exactly its function at step 0, and the gain can only open
    patch_pos_embed  none | learned | sincos (added to the patch) | rope (rotary, in the attention)
    cls_position   "middle" [text | CLS | patches] (docs/DESIGN.md), "start" [CLS | text | patches], or
                   "none" (CLS only through adaLN, as in the pre-patch model). Start and middle are
                   the same function: text and CLS keys carry no position and attention over keys is
                   order-free, so moving CLS permutes the keys (where to put CLS is
                   moot here; tests/test_model.py checks it, the cpu runs measured it)
Tie only (``patch_context=False``) leaves [text | CLS] (or [CLS | text]) as the context.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model_folder import PretrainedMixin

__all__ = ["ModelConfig", "NanoDiT", "PRESETS", "CONDITION_KEYS", "attend", "prepare_text", "load_warm_start",
           "initialize_weights", "sincos_2d", "patch_cover_weights", "preset"]

# forward's names for a condition: the project's one vocabulary (batches, sampler, validation,
# analysis, demo and benchmark use these keys; nbcore.data.MEMBER_OF maps the on-disk members)
CONDITION_KEYS = ("dino_emb", "dino_patches", "text_emb", "text_mask")


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 16          # latent channels C
    input_size: int = 64           # nominal latent side (any H, W divisible by patch_size work)
    patch_size: int = 2
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    text_dim: int = 4096           # Dt (T5 hidden)
    text_len: int = 512            # maximum L
    dino_dim: int = 1024           # Dd
    dino_grid: int = 14            # patches form a g x g grid, P = g * g
    use_dino_patches: bool = True
    # The fields below shape the DINO paths and apply only with use_dino_patches=True; without it
    # they are ignored (the pre-patch architecture), so replace(cfg, use_dino_patches=False) is the
    # baseline of any arm.
    # Where the patches go (at least one): into the cross-attention context, and/or added to the
    # image tokens they cover (spatially tied).
    patch_context: bool = True
    patch_tie: bool = False
    # Positional embedding of the *context* patch tokens: "none" (patches are a set, like DINOv3's
    # RoPE features), "learned", "sincos" (2D sin-cos evaluated at each patch's centre in
    # latent-token coordinates, i.e. the same frame as the image tokens' embedding, added to the
    # projected patch), or "rope": position-aware cross-attention, 2D rotary embedding of image-token
    # queries and patch keys in the same coordinates (the score of a patch key depends on the offset
    # between the query's token and the patch centre); text and CLS keys are scored unrotated.
    # Tied patches need none: their place is the token they are added to.
    patch_pos_embed: str = "none"
    # LayerNorm (no affine) on the projected context patches, before their position is added. After
    # the data's per-channel normalisation a patch's content norm varies with what it shows (in the
    # shapes world ~1.7 on background, ~15 on a shape edge, up to ~31) while a sin-cos position has a
    # fixed norm (~7 at D = 96): the content of a key drowns its position. The norm gives every patch
    # the same content norm sqrt(D), so the position counts (measured in nbcore.analysis.patch_token_norms).
    # The dataclass default False is the architecture of checkpoints saved before the option existed;
    # the presets switch it on.
    patch_norm: bool = False
    # A warm start that cannot shut the new keys out: per block, the cross-attention weight of every key
    # outside the text (CLS and patches) is multiplied by a gain g = |gate| (one gate per block and head)
    # before normalising, the gate starting at 0. At step 0 the new keys get exactly zero weight, so the model is the pre-patch
    # function; d(out)/d(gate) is not zero there (the new keys' values minus the text's output), and
    # |.| cannot be driven below 0, so the gate opens at the optimiser's pace. Uses the explicit
    # attention path (of ``attend``).
    context_gate: bool = False
    # Where the CLS token sits in the context (where to put CLS): "middle" = [text | CLS |
    # patches] (docs/DESIGN.md), "start" = [CLS | text | patches], "none" = not in the context (CLS only
    # through adaLN, as in the pre-patch model). With the patches out of the context (tie only) CLS
    # stays in by default: the arm then differs from the context arms only in where the patches go.
    cls_position: str = "middle"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by 4 for the 2D sin-cos embedding")
        if self.patch_pos_embed not in ("none", "learned", "sincos", "rope"):
            raise ValueError(f"patch_pos_embed must be none|learned|sincos|rope, got {self.patch_pos_embed!r}")
        if self.patch_pos_embed == "rope" and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"patch_pos_embed='rope' needs a head dim divisible by 4, got "
                             f"{self.hidden_size // self.num_heads}")
        if self.cls_position not in ("middle", "start", "none"):
            raise ValueError(f"cls_position must be middle|start|none, got {self.cls_position!r}")
        if self.use_dino_patches and not (self.patch_context or self.patch_tie):
            raise ValueError("use_dino_patches=True needs patch_context or patch_tie (or both); "
                             "for no patches at all use use_dino_patches=False")
        if self.use_dino_patches and not self.patch_context and self.patch_pos_embed != "none":
            raise ValueError(f"patch_pos_embed={self.patch_pos_embed!r} positions context patches, but "
                             "patch_context=False (tied patches take the position of the tokens they cover)")

    @property
    def num_patches(self) -> int:
        return self.dino_grid * self.dino_grid

    @property
    def context_order(self) -> tuple[str, ...]:
        """The parts of the cross-attention context in order, named as ``nbcore.attention.SOURCES``
        ("text", "cls", "patches"); a part the configuration leaves out is absent."""
        if not self.use_dino_patches:
            return ("text",)
        head = {"middle": ("text", "cls"), "start": ("cls", "text"), "none": ("text",)}[self.cls_position]
        return head + (("patches",) if self.patch_context else ())

    def context_spans(self, n_text: int) -> dict[str, tuple[int, int]]:
        """{source: (start, stop)} positions of text, CLS and patches in a context with ``n_text`` text
        tokens; an absent source has start == stop (an empty span)."""
        sizes = {"text": n_text, "cls": 1, "patches": self.num_patches}
        spans, at = {s: (0, 0) for s in sizes}, 0
        for s in self.context_order:
            spans[s] = (at, at + sizes[s])
            at += sizes[s]
        return spans

    @property
    def context_len(self) -> int:
        """Maximum cross-attention context length M (709 for the production preset)."""
        return max(stop for _, stop in self.context_spans(self.text_len).values())

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- embeddings

def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """2D sin-cos embedding at (possibly fractional) grid coordinates.

    rows, cols: (K,) float -> (K, dim); half of ``dim`` encodes rows, half columns (MAE/DiT recipe).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    out = []
    for pos in (rows, cols):
        ang = pos.double()[:, None] * omega[None]                                     # (K, dim/4)
        out += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(out, dim=1).float()                                              # (K, dim)


def image_pos_embed(dim: int, h: int, w: int) -> torch.Tensor:
    """Sin-cos embedding of an h x w token grid at integer coordinates -> (h*w, dim), row-major."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return sincos_2d(dim, r.flatten(), c.flatten())


def patch_cover_weights(g: int, h: int, w: int) -> torch.Tensor:
    """(h*w, g*g): the share of each image token's cell covered by each DINO patch, both grids
    spanning the whole image, both row-major; each row sums to 1 (area / box resampling of the
    g x g patch grid onto the h x w token grid). Where g divides h and w each row is one-hot."""
    def overlap(n: int) -> torch.Tensor:
        tok, pat = torch.arange(n, dtype=torch.float64), torch.arange(g, dtype=torch.float64)
        lo = torch.maximum(tok[:, None] / n, pat[None] / g)                           # (n, g)
        hi = torch.minimum((tok[:, None] + 1) / n, (pat[None] + 1) / g)               # (n, g)
        return (hi - lo).clamp_min(0) * n                                             # (n, g) rows sum to 1
    return torch.kron(overlap(h), overlap(w)).float()                                  # (h*w, g*g)


def patch_grid_pos_embed(dim: int, g: int, h: int, w: int) -> torch.Tensor:
    """Sin-cos embedding of a g x g DINO patch grid placed over an h x w image-token grid: patch
    (i, j) sits at its centre in image-token coordinates, so it shares the image tokens' frame."""
    centre = lambda n: (torch.arange(g, dtype=torch.float64) + 0.5) * n / g - 0.5
    r, c = torch.meshgrid(centre(h), centre(w), indexing="ij")
    return sincos_2d(dim, r.flatten(), c.flatten())                                   # (g*g, dim)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D): sinusoidal features of 1000 t, then an MLP (DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        ang = 1000 * t.float()[:, None] * freqs[None]                                    # (B, half)
        emb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)                           # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))                                 # (B, D)


# --------------------------------------------------------------------------- attention

def attend(q, k, v, key_mask=None, return_weights: bool = False, key_gain=None, scale=None):
    """The one attention function.

    q (B, nh, N, E); k (B, nh, M, E); v (B, nh, M, hd); key_mask (B, M) bool, True = a real key, or
    None; ``scale`` the score scale (default E ** -0.5); ``key_gain`` (nh, M) >= 0 or None: each
    key's unnormalised weight exp(score) is multiplied by its gain before normalising (a gain of 0
    removes the key exactly, with a gradient with respect to the gain; ``ModelConfig.context_gate``).
    Fused ``scaled_dot_product_attention`` by default (flash-eligible when key_mask is None);
    ``return_weights=True`` or a ``key_gain`` takes the explicit path; ``return_weights`` returns
    (out, weights (B, nh, N, M)).
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]                   # (B, 1, 1, M)
    if not return_weights and key_gain is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)    # (B, nh, N, hd)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, nh, N, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if key_gain is None:
        weights = scores.float().softmax(dim=-1).to(q.dtype)                          # (B, nh, N, M)
    else:
        e = (scores.float() - scores.float().amax(-1, keepdim=True)).exp()            # (B, nh, N, M)
        e = e * key_gain[:, None, :].float()                                            # gain per head and key
        weights = (e / e.sum(-1, keepdim=True)).to(q.dtype)                           # (B, nh, N, M)
    out = weights @ v                                                                  # (B, nh, N, hd)
    return (out, weights) if return_weights else out


def rope_2d(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """2D rotary embedding: x (..., T, E) at grid coordinates rows, cols (T,) -> (..., T, E).
    The first half of E rotates with the row, the second with the column (pairs of channels, RoPE's
    frequencies base ** (-2k / (E / 2))); a small base because the grids are small (6..32 tokens).
    (R_a q) . (R_b k) depends on a and b only through b - a."""
    E = x.shape[-1]
    half = E // 2
    freqs = base ** (-torch.arange(0, half, 2, dtype=torch.float64, device=x.device) / half)   # (E/4,)
    out = []
    for part, pos in ((x[..., :half], rows), (x[..., half:], cols)):
        ang = pos.double().to(x.device)[:, None] * freqs[None]                         # (T, E/4)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        a, b = part[..., 0::2], part[..., 1::2]                                         # (..., T, E/4) each
        out.append(torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2))  # (..., T, E/2)
    return torch.cat(out, -1)                                                          # (..., T, E)


def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, nh, D // nh).transpose(1, 2)                                   # (B, nh, T, hd)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, nh, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hd)                                   # (B, T, D)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.nh = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)      # fused q, k, v projection
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                              # x (B, N, D)
        q, k, v = (_heads(z, self.nh) for z in self.qkv(x).chunk(3, dim=-1))           # (B, nh, N, hd) each
        return self.proj(_merge(attend(q, k, v)))                                      # (B, N, D)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, gate: bool = False):
        super().__init__()
        self.nh = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)       # fused k, v projection of the context
        self.proj = nn.Linear(dim, dim)
        if gate:                                # ModelConfig.context_gate: one gate per head, 0 at init
            self.gate = nn.Parameter(torch.zeros(num_heads))

    def forward(self, x, ctx, key_mask, record=None, rope=None, gated=None):
        """x (B, N, D), ctx (B, M, D), key_mask (B, M) or None; ``record(weights)`` when capturing;
        ``rope`` = (token rows, cols (N,), patch rows, cols (P,), patch span (a, b)) for rotary
        patch keys; ``gated`` (M,) bool: the keys the gate scales (all but text)."""
        q = _heads(self.q(x), self.nh)                                                  # (B, nh, N, hd)
        k, v = (_heads(z, self.nh) for z in self.kv(ctx).chunk(2, dim=-1))             # (B, nh, M, hd)
        scale = None
        if rope is not None:
            # Patch keys scored against rotated queries, text and CLS keys against plain ones: one
            # attention over [q | R q] . [k | 0] (text, CLS) and [0 | R k] (patches).
            tr, tc, pr, pc, (a, b) = rope
            scale = q.shape[-1] ** -0.5
            is_patch = torch.zeros(k.shape[2], 1, dtype=k.dtype, device=k.device)
            is_patch[a:b] = 1
            k_rot = torch.zeros_like(k)
            k_rot[:, :, a:b] = rope_2d(k[:, :, a:b], pr, pc)                            # (B, nh, P, hd)
            q = torch.cat([q, rope_2d(q, tr, tc)], -1)                                 # (B, nh, N, 2hd)
            k = torch.cat([k * (1 - is_patch), k_rot], -1)                             # (B, nh, M, 2hd)
        gain = None
        if gated is not None and hasattr(self, "gate"):
            g = torch.where(self.gate >= 0, self.gate, -self.gate)                      # |gate|, d/dgate = 1 at 0
            gain = torch.where(gated[None, :], g[:, None], torch.ones_like(g)[:, None])  # (nh, M)
        if record is None:
            out = attend(q, k, v, key_mask, key_gain=gain, scale=scale)
        else:
            out, weights = attend(q, k, v, key_mask, return_weights=True, key_gain=gain, scale=scale)
            record(weights)
        return self.proj(_merge(out))                                                  # (B, N, D)


# --------------------------------------------------------------------------- block

def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention -> one cross-attention over the context ([text | CLS | patches]) -> MLP, each pre-normed and
    modulated by adaLN with 6 parameters (shift/scale for each of the three) from CLS + t."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, gate: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, gate)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, ctx, key_mask, record=None, rope=None, gated=None):
        """x (B, N, D); c (B, D) = dino_proj(CLS) + t_emb; ctx (B, M, D); key_mask (B, M) or None;
        ``rope``, ``gated``: see CrossAttention.forward."""
        sh_sa, sc_sa, sh_ca, sc_ca, sh_mlp, sc_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        x = x + self.attn(modulate(self.norm1(x), sh_sa, sc_sa))
        x = x + self.cross_attn(modulate(self.norm2(x), sh_ca, sc_ca), ctx, key_mask, record, rope, gated)
        x = x + self.mlp(modulate(self.norm3(x), sh_mlp, sc_mlp))
        return x                                                                       # (B, N, D)


# --------------------------------------------------------------------------- final layer

class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))                       # (B, N, p*p*C)


# --------------------------------------------------------------------------- model

class NanoDiT(PretrainedMixin, nn.Module):
    config_class = ModelConfig   # what from_pretrained builds (nbcore.model_folder: from_pretrained, save_pretrained)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D)
        self.text_proj = nn.Linear(cfg.text_dim, D)
        self.dino_proj = nn.Linear(cfg.dino_dim, D)
        # Learned nulls live in the raw input space, so a dropped signal takes the same path as a real one.
        self.null_text = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))    # one token; the rest is masked
        self.null_dino = nn.Parameter(torch.zeros(1, cfg.dino_dim))
        # Registration order is kept as before the tie existed: optimiser state is saved by index.
        if cfg.use_dino_patches:
            if cfg.patch_context:
                self.dino_patch_proj = nn.Linear(cfg.dino_dim, D)
            # one null for both paths: a dropped DINO reaches neither the context nor the tie
            self.null_dino_patches = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dino_dim))
            if cfg.patch_context and cfg.patch_pos_embed == "learned":
                self.patch_pos = nn.Parameter(torch.zeros(1, cfg.num_patches, D))
            if cfg.patch_tie:
                self.dino_patch_tie = nn.Linear(cfg.dino_dim, D)    # its own projection, zero at init
        gate = cfg.use_dino_patches and cfg.context_gate
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, gate) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, cfg.in_channels)
        self._pos_cache: dict = {}
        self._recorder = None          # set by nbcore.attention.capture; None = fused path
        initialize_weights(self)

    # -- fixed tables, computed once per latent grid and device
    def _pos(self, kind: str, h: int, w: int, device) -> torch.Tensor:
        """kind "image" -> (1, N, D), "patch" -> (1, P, D) sin-cos tables; "cover" -> (1, N, P) the
        share of each image token's cell covered by each patch (``patch_cover_weights``)."""
        key = (kind, h, w, str(device))
        if key not in self._pos_cache:
            D, g = self.cfg.hidden_size, self.cfg.dino_grid
            table = {"image": lambda: image_pos_embed(D, h, w), "patch": lambda: patch_grid_pos_embed(D, g, h, w),
                     "cover": lambda: patch_cover_weights(g, h, w)}[kind]()
            self._pos_cache[key] = table.to(device)[None]                              # (1, K, D) or (1, N, P)
        return self._pos_cache[key]

    def _tie(self, dino_patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Spatially tied patches: dino_patches (B, P, Dd) -> (B, N, D), ``dino_patch_tie`` of the patch
        that covers each image token of the h x w grid (row-major, both grids spanning the image).
        Where g divides h and w every token lies inside one patch, which is repeated over its
        (h/g) x (w/g) tokens (nearest); otherwise each token takes the area-weighted mean of the
        patches its cell overlaps (box / area resampling; g > h averages several patches)."""
        B, g = dino_patches.shape[0], self.cfg.dino_grid
        tie = self.dino_patch_tie(dino_patches)                                        # (B, P, D)
        D = tie.shape[-1]
        if h % g == 0 and w % g == 0:
            tie = tie.view(B, g, 1, g, 1, D).expand(B, g, h // g, g, w // g, D)        # (B, g, h/g, g, w/g, D)
            return tie.reshape(B, h * w, D)                                            # (B, N, D)
        return self._pos("cover", h, w, tie.device).to(tie.dtype) @ tie                # (1, N, P) @ (B, P, D) -> (B, N, D)

    def _grid_coords(self, h: int, w: int, device):
        """Rotary coordinates in image-token units: token rows, cols (N,) and patch-centre rows,
        cols (P,) of the g x g grid over the h x w tokens (the frame of ``patch_grid_pos_embed``)."""
        g = self.cfg.dino_grid
        tr, tc = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
        centre = lambda n: (torch.arange(g, dtype=torch.float64) + 0.5) * n / g - 0.5
        pr, pc = torch.meshgrid(centre(h), centre(w), indexing="ij")
        return tuple(z.flatten().to(device) for z in (tr, tc, pr, pc))

    def forward(self, x, t, dino_emb, dino_patches, text_emb, text_mask,
                drop_text=None, drop_dino=None):
        """Predict the flow-matching velocity v = noise - x0.

        x (B, C, H, W); t (B,) in [0, 1]; dino_emb (B, Dd); dino_patches (B, P, Dd), row-major g x g
        (ignored, may be None, when use_dino_patches=False); text_emb (B, L, Dt); text_mask (B, L) bool, True = real
        token, or None when nothing is padded (lets the fused kernel use flash attention);
        drop_text / drop_dino (B,) bool: replace that sample's signal by the learned null, so the
        dropped input has no influence on its output (a dropped caption needs a key mask, so any
        ``drop_text`` builds one; pass None when no sample drops text). Returns v (B, C, H, W).
        """
        cfg = self.cfg
        B, C, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent {H}x{W} is not divisible by patch size {p}")
        h, w = H // p, W // p
        L = text_emb.shape[1]

        if drop_dino is not None:
            dino_emb = torch.where(drop_dino[:, None], self.null_dino.to(dino_emb.dtype), dino_emb)
        if drop_text is not None:
            # A dropped caption becomes one null token with every other position masked, so neither
            # its values nor its length reach the output.
            text_emb = torch.where(drop_text[:, None, None], self.null_text.to(text_emb.dtype), text_emb)
            first = torch.arange(L, device=x.device) == 0                              # (L,)
            keep = text_mask if text_mask is not None else torch.ones(B, L, dtype=torch.bool, device=x.device)
            text_mask = torch.where(drop_text[:, None], first[None], keep)            # (B, L)

        # contiguous: otherwise the residual stream keeps the transposed layout through every
        # `x + branch`, and each LayerNorm / Linear copies its input (7-13% of a CPU step)
        x = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous()                # (B, N, D)
        x = x + self._pos("image", h, w, x.device).to(x.dtype)
        cls = self.dino_proj(dino_emb)                                                 # (B, D)
        c = cls + self.t_embedder(t).to(cls.dtype)                                     # (B, D) adaLN input
        parts = {"text": self.text_proj(text_emb), "cls": cls[:, None]}                # (B, L, D), (B, 1, D)
        if cfg.use_dino_patches:
            if dino_patches is None or dino_patches.shape[1:] != (cfg.num_patches, cfg.dino_dim):
                got = None if dino_patches is None else tuple(dino_patches.shape)
                raise ValueError(f"use_dino_patches=True needs dino_patches (B, {cfg.num_patches}, {cfg.dino_dim}), got {got}")
            if drop_dino is not None:  # before both paths: a dropped DINO reaches neither
                dino_patches = torch.where(drop_dino[:, None, None],
                                           self.null_dino_patches.to(dino_patches.dtype), dino_patches)
            if cfg.patch_tie:
                x = x + self._tie(dino_patches, h, w).to(x.dtype)                     # (B, N, D)
            if cfg.patch_context:
                patches = self.dino_patch_proj(dino_patches)                           # (B, P, D)
                if cfg.patch_norm:
                    patches = F.layer_norm(patches, patches.shape[-1:], eps=1e-6)
                if cfg.patch_pos_embed == "learned":
                    patches = patches + self.patch_pos.to(patches.dtype)
                elif cfg.patch_pos_embed == "sincos":
                    patches = patches + self._pos("patch", h, w, x.device).to(patches.dtype)
                parts["patches"] = patches
        order = cfg.context_order
        ctx = torch.cat([parts[s] for s in order], dim=1)                              # (B, M, D) in context_order
        key_mask = text_mask
        if key_mask is not None and len(order) > 1:  # CLS and patches are always valid
            key_mask = torch.cat([key_mask if s == "text" else key_mask.new_ones(B, parts[s].shape[1])
                                  for s in order], dim=1)                              # (B, M)

        spans = cfg.context_spans(L)
        rope = gated = None
        if cfg.use_dino_patches and cfg.patch_context and cfg.patch_pos_embed == "rope":
            rope = (*self._grid_coords(h, w, x.device), spans["patches"])
        if cfg.use_dino_patches and cfg.context_gate:
            gated = torch.ones(ctx.shape[1], dtype=torch.bool, device=x.device)
            gated[slice(*spans["text"])] = False                                       # (M,) all but text
        rec = self._recorder
        if rec is not None:
            rec.begin(t=t, spans=spans, key_mask=key_mask, grid=(h, w))
        for i, block in enumerate(self.blocks):
            x = block(x, c, ctx, key_mask, None if rec is None else rec.hook(i), rope, gated)
        x = self.final_layer(x, c)                                                     # (B, N, p*p*C)
        x = x.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)                         # (B, C, h, p, w, p)
        return x.reshape(B, C, H, W)                                                   # (B, C, H, W)

    def num_params(self, trainable_only: bool = True) -> int:
        return sum(q.numel() for q in self.parameters() if q.requires_grad or not trainable_only)

    def new_parameter_names(self) -> list[str]:
        """Parameters that the pre-patch architecture lacks (what a warm start from it initialises,
        and what ``TrainConfig.new_param_lr_scale`` scales), sorted."""
        cfg = self.cfg
        if not cfg.use_dino_patches:
            return []
        names = ["null_dino_patches"]
        if cfg.patch_context:
            names += ["dino_patch_proj.bias", "dino_patch_proj.weight"]
            names += ["patch_pos"] if cfg.patch_pos_embed == "learned" else []
        if cfg.patch_tie:
            names += ["dino_patch_tie.bias", "dino_patch_tie.weight"]
        if cfg.context_gate:
            names += [f"blocks.{i}.cross_attn.gate" for i in range(cfg.depth)]
        return sorted(names)


def initialize_weights(model: NanoDiT) -> None:
    """The one init function (DiT's recipe, adapted).

    - Every Linear: Xavier-uniform weights, zero bias; the patch embedding like a Linear.
    - Timestep MLP: N(0, 0.02), as DiT.
    - Zero at start, so each block is the identity and the model predicts v = 0 until it learns:
      every adaLN modulation (shift = scale = 0 -> plain LayerNorm), the output projections of
      self-attention, cross-attention and MLP (residual branches add nothing), the final linear.
      This makes a model trained from scratch start as the identity. A warm-started patch model
      does change at step 0: its trained cross-attention now shares the softmax between the text
      keys and the 1 + P new CLS / patch keys (an honest cost of concatenated cross-attention).
    - The tied-patch projection ``dino_patch_tie`` (weight and bias) starts at zero, so the tie adds
      exactly 0 to the image tokens: a warm start from a pre-patch checkpoint with ``patch_tie`` and
      no new context keys (``patch_context=False, cls_position="none"``) is exactly the pre-patch
      function at step 0, and adding the tie to a trained context arm leaves that arm's function
      unchanged. (With CLS or patches in the context, the new keys change it as said above.)
    - Learned nulls start at zero; a learned patch position table at N(0, 0.02).
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        for layer in (block.adaLN_modulation[-1], block.attn.proj, block.cross_attn.proj, block.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    for name in ("null_text", "null_dino", "null_dino_patches"):
        if hasattr(model, name):
            nn.init.zeros_(getattr(model, name))
    if hasattr(model, "dino_patch_tie"):
        nn.init.zeros_(model.dino_patch_tie.weight)
        nn.init.zeros_(model.dino_patch_tie.bias)
    if hasattr(model, "patch_pos"):
        nn.init.normal_(model.patch_pos, std=0.02)


# --------------------------------------------------------------------------- text trimming

def prepare_text(text_emb: torch.Tensor, text_mask: torch.Tensor | None, multiple: int = 8):
    """Trim a padded text batch to its longest real caption, rounded up to ``multiple``.

    text_emb (B, L, Dt), text_mask (B, L) -> (B, L', Dt), mask (B, L') or None when no token of the
    trimmed batch is padding (the fused kernel may then use flash attention). Call it on the host
    side (CPU tensors) to keep the device step free of synchronisation. Real tokens must come first.
    """
    if text_mask is None:
        return text_emb, None
    L = text_emb.shape[1]
    longest = int(text_mask.sum(1).max())
    Lt = min(L, max(multiple, -(-longest // multiple) * multiple))
    text_emb, text_mask = text_emb[:, :Lt], text_mask[:, :Lt]                          # (B, L', Dt), (B, L')
    return text_emb, (None if bool(text_mask.all()) else text_mask)


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, ModelConfig] = {
    # The full-size model: 16x64x64 latents, patch 2 (1024 image tokens), T5 512x4096,
    # DINOv3 1024-d with a 14x14 patch grid -> context 512 + 1 + 196 = 709.
    "production": ModelConfig(patch_norm=True),
    # The shapes world on a 2-core CPU: 64 px images -> 12x32x32 latents (pixel codec), patch 2
    # (16x16 = 256 image tokens of 2*2*12 = 48 values each), captions <= 32 tokens, an 8x8 DINO
    # patch grid (context 32 + 1 + 64 = 97). Patch 4 (64 tokens of 192 values) was the first
    # choice: its final linear predicts 192 outputs from 96 dims, a rank bottleneck that kept the
    # loss near 0.74 where patch 2 reaches 0.14 in the same 1000 steps (README, research section).
    "tiny": ModelConfig(in_channels=12, input_size=32, patch_size=2, hidden_size=96, depth=3,
                        num_heads=4, text_dim=64, text_len=32, dino_dim=64, dino_grid=8, patch_norm=True),
    # A cheaper CPU world (cheaper steps, not shorter training): 32 px images -> 12x16x16
    # latents, patch 2 (8x8 = 64 image tokens of 48 values), a 4x4 DINO grid of 8 px patches
    # (context 32 + 1 + 16 = 49); each patch covers 2x2 image tokens.
    "micro": ModelConfig(in_channels=12, input_size=16, patch_size=2, hidden_size=96, depth=3,
                         num_heads=4, text_dim=64, text_len=32, dino_dim=64, dino_grid=4, patch_norm=True),
    # The cpu profile's world: 24 px images -> 12x12x12 latents, patch 2 (6x6 = 36 image tokens of
    # 48 values), a 6x6 DINO grid of 4 px patches (one patch per image token; context 32 + 1 + 36).
    # A step costs 0.6x micro's and learns about as much per step (README, research section).
    "nano": ModelConfig(in_channels=12, input_size=12, patch_size=2, hidden_size=96, depth=3,
                        num_heads=4, text_dim=64, text_len=32, dino_dim=64, dino_grid=6, patch_norm=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# --------------------------------------------------------------------------- warm start

def load_warm_start(model: nn.Module, state_dict: dict) -> dict:
    """Load every tensor of ``state_dict`` whose name and shape match ``model``; the rest of the
    model keeps its initialisation (``initialize_weights``). Returns the report
    ``{"loaded": [...], "new": [...], "unexpected": [...], "mismatched": [...]}`` (sorted names)."""
    own = model.state_dict()
    loaded, mismatched = [], []
    with torch.no_grad():
        for name, value in state_dict.items():
            if name in own:
                if own[name].shape == value.shape:
                    own[name].copy_(value)
                    loaded.append(name)
                else:
                    mismatched.append(name)
    return {
        "loaded": sorted(loaded),
        "new": sorted(set(own) - set(state_dict)),
        "unexpected": sorted(set(state_dict) - set(own)),
        "mismatched": sorted(mismatched),
    }
