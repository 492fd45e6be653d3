"""Euler sampler for NanoDiT with multi-branch classifier-free guidance.

Flow matching (docs/DESIGN.md): ``x_t = (1 - t) x0 + t noise``, the model predicts ``v = noise - x0``,
so ``dx/dt = v`` and sampling integrates from t = 1 (pure noise) to t = 0 with Euler steps
``x <- x + (t_next - t) v`` on a uniform grid of ``steps`` intervals.

Shape legend: B samples, K branches, C H W latent, L text tokens, Dt text dim, P patches, Dd DINO dim.

Branches (each a full model forward; names used throughout the API)
    ``uncond``  null text, null DINO (CLS and patches)         v_u
    ``text``    real text, null DINO                           v_text
    ``dino``    null text, real CLS + real patches             v_dino
    ``full``    real text, real CLS + real patches             v_full
    ``cls``     null text, real CLS, *null patches*            v_cls   (only with a patch scale)

The model's ``drop_text`` / ``drop_dino`` flags make the first four. The model has no flag that
nulls the patches but keeps the CLS, yet its learned null lives in the raw input space
(``drop_dino`` swaps ``dino_patches`` for ``model.null_dino_patches`` before projection), so the
``cls`` branch is made exactly by *passing* ``model.null_dino_patches`` as the patches with
``drop_dino=False``: the network then sees precisely the tokens it sees for dropped patches, with
the real CLS. Caveat (whether a separate patch guidance scale helps): the default training dropout drops CLS and
patches together, so (real CLS, null patches) is a combination the model never saw in training;
the patch direction ``v_dino - v_cls`` is therefore meaningful only for a model trained with a
separate patch-drop probability. The feature computes that branch correctly; whether it helps is
an experiment.

Guidance formulas (``Guidance.formula``; s_t = ``text_scale``, s_d = ``dino_scale``,
s_p = ``patch_scale``, which defaults to s_d and then adds no branch)

    "independent" (separate text and DINO directions, both measured from the unconditional):
        v = v_u + s_t (v_text - v_u) + s_d (v_dino - v_u)
      with a patch scale, the DINO direction splits into its CLS part and its patch part:
        v = v_u + s_t (v_text - v_u) + s_d (v_cls - v_u) + s_p (v_dino - v_cls)

    "nested" (InstructPix2Pix-style: DINO first, then text on top of the DINO-conditioned branch):
        v = v_u + s_d (v_dino - v_u) + s_t (v_full - v_dino)
      with a patch scale:
        v = v_u + s_d (v_cls - v_u) + s_p (v_dino - v_cls) + s_t (v_full - v_dino)

Both are evaluated in their expanded, linear-combination form ``v = sum_b c_b v_b`` (algebraically
identical; see ``Guidance.coefficients``). A branch whose coefficient is exactly 0 is not computed,
so e.g. independent (s_t=0, s_d=1) runs only the DINO-only branch and nested (s_t=1, s_d=1) runs only
the full branch (= no guidance), bit-for-bit equal to that single forward.

Missing conditions (any subset): without text, a text branch equals its text-free twin
(text -> uncond, full -> dino); without DINO, a DINO branch equals its DINO-free twin
(dino, cls -> uncond; full -> text). The coefficients are folded accordingly before any forward,
so e.g. text-only sampling with either formula is the standard ``v_u + s_t (v_text - v_u)``.

Guidance interval ``(t_lo, t_hi)``: guidance is applied at steps whose evaluation time t satisfies
t_lo <= t <= t_hi; at every other step the sampler uses the full-conditional branch alone
(v = v_full, folded for missing conditions), which costs one branch instead of four.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .model import NanoDiT, prepare_text
from .utils import resolve_device

__all__ = ["Guidance", "BRANCHES", "sample", "sample_batch", "branch_velocities", "load_model",
           "load_model_with_info"]

# branch name -> (uses text, DINO mode: "null" | "cls" (real CLS, null patches) | "full")
BRANCHES: dict[str, tuple[bool, str]] = {
    "uncond": (False, "null"),
    "text": (True, "null"),
    "dino": (False, "full"),
    "full": (True, "full"),
    "cls": (False, "cls"),
}
_BY_SPEC = {spec: name for name, spec in BRANCHES.items()}
FORMULAS = ("independent", "nested")


@dataclass(frozen=True)
class Guidance:
    """Guidance settings; the formulas are in the module docstring.

    formula: "independent" | "nested"; text_scale s_t; dino_scale s_d; patch_scale s_p (None = same
    as s_d, no extra branch); interval (t_lo, t_hi): guide only for t in [t_lo, t_hi].
    ``Guidance.off()`` (nested, s_t = s_d = 1) is plain conditional sampling: v = v_full.
    """
    formula: str = "nested"
    text_scale: float = 1.0
    dino_scale: float = 1.0
    patch_scale: float | None = None
    interval: tuple[float, float] = field(default=(0.0, 1.0))

    def __post_init__(self):
        if self.formula not in FORMULAS:
            raise ValueError(f"guidance formula must be one of {FORMULAS}, got {self.formula!r}")
        lo, hi = self.interval
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {self.interval}")
        object.__setattr__(self, "interval", (float(lo), float(hi)))

    @classmethod
    def off(cls) -> "Guidance":
        return cls("nested", 1.0, 1.0)

    def guided_coefficients(self) -> dict[str, float]:
        """Expanded form ``v = sum_b c_b v_b`` of the formula with all conditions present."""
        st, sd = float(self.text_scale), float(self.dino_scale)
        sp = sd if self.patch_scale is None else float(self.patch_scale)
        if self.formula == "independent":
            # v_u + st (v_text - v_u) + sd (v_cls - v_u) + sp (v_dino - v_cls)
            c = {"uncond": 1.0 - st - sd, "text": st, "cls": sd - sp, "dino": sp}
        else:
            # v_u + sd (v_cls - v_u) + sp (v_dino - v_cls) + st (v_full - v_dino)
            c = {"uncond": 1.0 - sd, "cls": sd - sp, "dino": sp - st, "full": st}
        return c

    def coefficients(self, t: float, has_text: bool = True, has_dino: bool = True) -> dict[str, float]:
        """Branch -> coefficient at evaluation time t, folded for missing conditions; branches with
        coefficient exactly 0 are left out (they are never computed)."""
        lo, hi = self.interval
        raw = self.guided_coefficients() if lo <= t <= hi else {"full": 1.0}
        out: dict[str, float] = {}
        for name, c in raw.items():
            use_text, dino = BRANCHES[name]
            eff = _BY_SPEC[(use_text and has_text, dino if has_dino else "null")]
            out[eff] = out.get(eff, 0.0) + c
        return {b: c for b, c in out.items() if c != 0.0}


# --------------------------------------------------------------------------- checkpoints

def load_model_with_info(ckpt_path: str | os.PathLike, use_ema: bool = True,
                         device: str | torch.device = "auto") -> tuple[NanoDiT, dict]:
    """``NanoDiT.from_pretrained`` of a checkpoint (or a model folder): the EMA weights when ``use_ema``
    and the checkpoint has them. Returns (model in eval mode on ``device``, info ``{"path", "weights":
    "ema" | "model", "step"}``)."""
    model, info = NanoDiT.from_pretrained(ckpt_path, device=device, weights="ema" if use_ema else "model",
                                          output_loading_info=True)
    return model, {"path": str(ckpt_path), "weights": info["weights"], "step": info["step"]}


def load_model(ckpt_path: str | os.PathLike, use_ema: bool = True,
               device: str | torch.device = "auto") -> NanoDiT:
    """``load_model_with_info`` without the info: the model (EMA weights when present), eval mode."""
    return load_model_with_info(ckpt_path, use_ema, device)[0]


# --------------------------------------------------------------------------- branches

@dataclass
class _Cond:
    """Conditioning on the model's device with placeholders for absent signals (their rows are
    always dropped, so the placeholder values never reach the output)."""
    dino_emb: torch.Tensor            # (B, Dd)
    dino_patches: torch.Tensor | None  # (B, P, Dd) or None for a model without patches
    text_emb: torch.Tensor            # (B, L, Dt)
    text_mask: torch.Tensor | None    # (B, L) or None (no padding)
    has_text: bool
    has_dino: bool


def _prepare(model: NanoDiT, B: int | None, dino_emb, dino_patches, text_emb, text_mask, device) -> tuple[_Cond, int]:
    cfg = model.cfg
    sizes = {n: x.shape[0] for n, x in (("dino_emb", dino_emb), ("dino_patches", dino_patches),
                                        ("text_emb", text_emb)) if x is not None}
    if B is not None:
        sizes["batch_size"] = B
    if not sizes:
        raise ValueError("no condition given: pass batch_size for unconditional sampling")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch sizes disagree: {sizes}")
    B = next(iter(sizes.values()))
    has_dino, has_text = dino_emb is not None, text_emb is not None
    if dino_patches is not None and dino_emb is None:
        raise ValueError("dino_patches given without dino_emb: the DINO condition is CLS and patches together")
    if has_dino:
        if dino_emb.shape != (B, cfg.dino_dim):
            raise ValueError(f"dino_emb must be (B, {cfg.dino_dim}), got {tuple(dino_emb.shape)}")
        if cfg.use_dino_patches:
            want = (B, cfg.num_patches, cfg.dino_dim)
            if dino_patches is None or tuple(dino_patches.shape) != want:
                got = None if dino_patches is None else tuple(dino_patches.shape)
                raise ValueError(f"this model uses DINO patches: dino_patches must be {want}, got {got}")
    if has_text:
        if text_emb.dim() != 3 or text_emb.shape[2] != cfg.text_dim:
            raise ValueError(f"text_emb must be (B, L, {cfg.text_dim}), got {tuple(text_emb.shape)}")
        if text_mask is not None:
            if text_mask.shape != text_emb.shape[:2]:
                raise ValueError(f"text_mask {tuple(text_mask.shape)} does not match text_emb {tuple(text_emb.shape[:2])}")
            empty = (~text_mask.bool().any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"caption(s) {empty} have no real token in text_mask")
        # host-side trim of padding shared by every caption (masked keys add nothing)
        text_emb, text_mask = prepare_text(text_emb.float().cpu(), None if text_mask is None else text_mask.bool().cpu())
    else:
        text_emb, text_mask = torch.zeros(B, 1, cfg.text_dim), None
    if not has_dino:
        dino_emb = torch.zeros(B, cfg.dino_dim)
        dino_patches = torch.zeros(B, cfg.num_patches, cfg.dino_dim) if cfg.use_dino_patches else None
    if not cfg.use_dino_patches:
        dino_patches = None
    f32 = dict(device=device, dtype=torch.float32)
    cond = _Cond(dino_emb.to(**f32), None if dino_patches is None else dino_patches.to(**f32),
                 text_emb.to(**f32), None if text_mask is None else text_mask.to(device),
                 has_text, has_dino)
    return cond, B


def _branch_inputs(model: NanoDiT, cond: _Cond, name: str):
    """Inputs of one branch: (dino_emb, dino_patches, text_emb, text_mask, drop_text, drop_dino)."""
    use_text, dino = BRANCHES[name]
    B = cond.dino_emb.shape[0]
    dev = cond.dino_emb.device
    patches = cond.dino_patches
    if dino == "cls":
        if patches is None:
            raise ValueError("the 'cls' branch (separate patch scale) needs a model with use_dino_patches=True")
        # real CLS, patches = the learned null exactly as drop_dino would substitute it
        patches = model.null_dino_patches.detach().to(patches.dtype).expand(B, -1, -1)   # (B, P, Dd)
    drop_text = torch.full((B,), not (use_text and cond.has_text), dtype=torch.bool, device=dev)
    drop_dino = torch.full((B,), dino == "null" or not cond.has_dino, dtype=torch.bool, device=dev)
    return cond.dino_emb, patches, cond.text_emb, cond.text_mask, drop_text, drop_dino


@torch.no_grad()
def branch_velocities(model: NanoDiT, x: torch.Tensor, t: torch.Tensor, cond: _Cond,
                      branches: list[str], batched: bool = True) -> dict[str, torch.Tensor]:
    """Velocity of each named branch at (x (B, C, H, W), t (B,)) -> {branch: (B, C, H, W)}.

    batched=True stacks the K branches along the batch and runs ONE forward of K*B rows;
    batched=False runs one forward per branch (the benchmark's sequential reference).
    """
    if not batched or len(branches) == 1:
        out = {}
        for name in branches:
            e, p, te, tm, dt, dd = _branch_inputs(model, cond, name)
            # a branch that keeps its text passes no drop flag (known on the host): the model then
            # needs no key mask when nothing is padded, and the fused kernel may use flash attention
            keeps_text = BRANCHES[name][0] and cond.has_text
            out[name] = model(x, t, e, p, te, tm, drop_text=None if keeps_text else dt, drop_dino=dd)
        return out
    K, B = len(branches), x.shape[0]
    parts = [_branch_inputs(model, cond, name) for name in branches]
    cat = lambda i: None if parts[0][i] is None else torch.cat([q[i] for q in parts], dim=0)
    v = model(x.repeat(K, 1, 1, 1),                         # (K*B, C, H, W), branch-major
              t.repeat(K),                                  # (K*B,)
              cat(0), cat(1), cat(2), cat(3),               # (K*B, Dd), (K*B, P, Dd), (K*B, L, Dt), (K*B, L)
              drop_text=cat(4), drop_dino=cat(5))
    return dict(zip(branches, v.chunk(K, dim=0)))            # K x (B, C, H, W)


# --------------------------------------------------------------------------- sampler

@torch.no_grad()
def sample(model: NanoDiT, *, dino_emb: torch.Tensor | None = None, dino_patches: torch.Tensor | None = None,
           text_emb: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
           batch_size: int | None = None, guidance: Guidance | None = None, steps: int = 30,
           seed: int | None = 0, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           guidance_batched: bool = True, device: str | torch.device | None = None,
           progress: bool = False) -> torch.Tensor:
    """Sample latents (B, C, H, W) with the Euler sampler from t = 1 to 0.

    Conditions (any subset; an absent one is the learned null): ``dino_emb`` (B, Dd) with
    ``dino_patches`` (B, P, Dd) (patches required by a patch model; CLS and patches are one
    condition), ``text_emb`` (B, L, Dt) with ``text_mask`` (B, L) bool (True = real token, real
    tokens first) or None. ``batch_size`` only when no condition is given.
    guidance: a ``Guidance`` (default ``Guidance.off()``: v = v_full). steps: Euler steps.
    Noise: ``noise`` (B, C, H, W) if given, else drawn on the CPU from ``generator`` or, when None,
    from a fresh ``torch.Generator`` seeded with ``seed`` (the same latents on every device).
    device: None = the model's device; otherwise moved there (``"auto"`` resolved) -- the model must
    already be on it. guidance_batched: all branches of a step in one forward (True) or one forward
    per branch (False). The model is used as is (call ``.eval()`` first; ``load_model`` does).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    guidance = guidance or Guidance.off()
    mdev = next(model.parameters()).device
    dev = mdev if device is None else (resolve_device(device) if isinstance(device, str) else torch.device(device))
    if dev != mdev and not (dev.type == mdev.type and dev.index is None):
        raise ValueError(f"model is on {mdev} but sampling was asked on {dev}: move the model first")
    cfg = model.cfg
    if guidance.patch_scale is not None and not cfg.use_dino_patches:
        raise ValueError("patch_scale needs a model with use_dino_patches=True")
    cond, B = _prepare(model, batch_size, dino_emb, dino_patches, text_emb, text_mask, mdev)
    shape = (B, cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is None:
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    elif noise.shape[0] != B or noise.shape[1] != cfg.in_channels:
        raise ValueError(f"noise must be (B={B}, C={cfg.in_channels}, H, W), got {tuple(noise.shape)}")
    x = noise.to(device=mdev, dtype=torch.float32)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t, t_next = ts[i], ts[i + 1]
        coeffs = guidance.coefficients(t, cond.has_text, cond.has_dino)
        vs = branch_velocities(model, x, torch.full((B,), t, device=mdev), cond, list(coeffs), guidance_batched)
        v = None
        for name, c in coeffs.items():
            term = vs[name] if c == 1.0 else c * vs[name]
            v = term if v is None else v + term
        x = x + (t_next - t) * v                                                       # Euler step, dt < 0
    return x


def sample_batch(model: NanoDiT, batch: dict, *, use_text: bool = True, use_dino: bool = True,
                 dino_from: dict | None = None, **kw) -> torch.Tensor:
    """``sample`` on a batch (keys ``dino_emb``, ``dino_patches``, ``text_emb``, ``text_mask``, as the
    loader and ``ShapesWorld.encode`` give them; other keys are ignored).

    use_text / use_dino choose the conditions (False = null); ``dino_from`` takes the DINO condition
    (CLS + patches) from another batch of the same size (the DINO swap). Returns latents (B, C, H, W).
    """
    dino = batch if dino_from is None else dino_from
    cond = {"dino_emb": dino["dino_emb"], "dino_patches": dino.get("dino_patches")} if use_dino else {}
    if use_text:
        cond.update(text_emb=batch["text_emb"], text_mask=batch.get("text_mask"))
    return sample(model, **cond, **kw)
