"""Flow matching, the training objective, in the few functions a reader needs first.

``x_t = (1 - t) x0 + t noise`` (t = 0 is the data, t = 1 the noise), target velocity
``v = noise - x0``, loss = MSE of the predicted velocity, averaged per sample then over the batch
(docs/DESIGN.md). ``t`` is logit-normal (SD3; default) or uniform (``sample_timesteps``). Each
sample draws one of four conditioning cases (``sample_dropout``, ``DROPOUT_CASES``): both dropped,
text only (DINO dropped), DINO only (text dropped), both kept; the model replaces a dropped signal
with its learned null (``drop_text`` / ``drop_dino``). The loss is also returned binned by ``t``
(minRF's diagnostic). The sampler that integrates the learned velocity is ``nbcore.sample``.

Shape legend: B batch, C latent channels, H W latent side, P patches, Dd DINO dim, L text tokens,
Dt text dim.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .model import prepare_text

__all__ = ["DROPOUT_CASES", "sample_dropout", "sample_timesteps", "batch_to_device", "flow_matching_loss"]

# The four per-sample conditioning cases, in the order of ``sample_dropout``'s probabilities.
DROPOUT_CASES = ("both_dropped", "text_only", "dino_only", "both_kept")


def sample_dropout(B: int, probs: Sequence[float] = (0.10, 0.30, 0.05, 0.55),
                   generator: torch.Generator | None = None, device=None):
    """One categorical draw per sample over ``DROPOUT_CASES``.

    probs: (both dropped, text only, DINO only, both kept), summing to 1.
    Returns ``(drop_text (B,) bool, drop_dino (B,) bool)``: text is dropped in cases both_dropped and
    dino_only, DINO in both_dropped and text_only.
    """
    probs = [float(p) for p in probs]
    if len(probs) != 4 or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"dropout probs must be 4 non-negative numbers summing to 1, got {probs}")
    if device is None and generator is not None:
        device = generator.device
    u = torch.rand(B, generator=generator, device=device)                                # (B,)
    edges = torch.tensor(np.cumsum(probs[:3]), dtype=u.dtype, device=u.device)          # (3,)
    case = torch.bucketize(u, edges, right=True)                                          # (B,) in 0..3
    drop_text = (case == 0) | (case == 2)
    drop_dino = (case == 0) | (case == 1)
    return drop_text, drop_dino


def sample_timesteps(B: int, mode: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t (B,) in (0, 1): ``sigmoid(N(mean, std))`` (logit-normal, SD3) or uniform."""
    if device is None and generator is not None:
        device = generator.device
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(B, generator=generator, device=device))
    if mode == "uniform":
        return torch.rand(B, generator=generator, device=device)
    raise ValueError(f"timestep sampling must be logit_normal|uniform, got {mode!r}")


def batch_to_device(batch: dict, device, use_patches: bool = True) -> dict:
    """Move a loader batch to ``device``; the text is trimmed on the host first (``prepare_text``), so
    the mask may become None (no padding left). Returns a dict with ``latent (B,C,H,W)``, ``dino_emb
    (B,Dd)``, ``dino_patches (B,P,Dd)`` or None, ``text_emb (B,L',Dt)``, ``text_mask (B,L')`` or None."""
    need = ["latent", "dino_emb", "text_emb", "text_mask"] + (["dino_patches"] if use_patches else [])
    missing = [k for k in need if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)})")
    text, mask = prepare_text(batch["text_emb"], batch["text_mask"])
    nb = torch.device(device).type == "cuda"
    out = {"latent": batch["latent"].to(device, torch.float32, non_blocking=nb),
           "dino_emb": batch["dino_emb"].to(device, torch.float32, non_blocking=nb),
           "text_emb": text.to(device, torch.float32, non_blocking=nb),
           "text_mask": None if mask is None else mask.to(device, non_blocking=nb),
           "dino_patches": None}
    if use_patches:
        out["dino_patches"] = batch["dino_patches"].to(device, torch.float32, non_blocking=nb)
    return out


def flow_matching_loss(model: nn.Module, batch: dict, *, generator: torch.Generator | None = None,
                       probs: Sequence[float] = (0.10, 0.30, 0.05, 0.55), timestep_sampling: str = "logit_normal",
                       logit_mean: float = 0.0, logit_std: float = 1.0, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, drop_text: torch.Tensor | None = None,
                       drop_dino: torch.Tensor | None = None, loss_bins: int = 10):
    """Flow-matching loss of ``model`` on a device batch (``batch_to_device``'s output).

    Draws (unless given) t (B,), noise like the latents, and the per-sample dropout, all from
    ``generator``; ``x_t = (1 - t) x0 + t noise``, target ``v = noise - x0``; the model's output is
    compared in fp32. Returns ``(loss scalar, aux)`` with aux tensors on the device (no sync):
    ``per_sample (B,)``, ``t (B,)``, ``drop_text``, ``drop_dino`` (B,) bool, ``v_pred_rms``,
    ``v_target_rms`` scalars, ``bin_sum``, ``bin_count`` (loss_bins,) (loss summed / counted per
    t-bin, bin i = [i / nb, (i + 1) / nb)).
    """
    x0 = batch["latent"]
    B, dev = x0.shape[0], x0.device
    if t is None:
        t = sample_timesteps(B, timestep_sampling, logit_mean, logit_std, generator, dev)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    if drop_text is None or drop_dino is None:
        dt, dd = sample_dropout(B, probs, generator, dev)
        drop_text = dt if drop_text is None else drop_text
        drop_dino = dd if drop_dino is None else drop_dino
    tb = t.view(B, 1, 1, 1).to(x0.dtype)
    x_t = (1 - tb) * x0 + tb * noise                                                     # (B, C, H, W)
    target = noise - x0                                                                  # (B, C, H, W)
    v = model(x_t, t, batch["dino_emb"], batch.get("dino_patches"), batch["text_emb"], batch.get("text_mask"),
              drop_text=drop_text, drop_dino=drop_dino).float()
    per_sample = (v - target).square().flatten(1).mean(1)                                # (B,)
    loss = per_sample.mean()
    with torch.no_grad():
        bins = (t.detach() * loss_bins).long().clamp_(0, loss_bins - 1)                  # (B,)
        bin_sum = torch.zeros(loss_bins, device=dev).scatter_add_(0, bins, per_sample.detach())
        bin_count = torch.bincount(bins, minlength=loss_bins).float()
        aux = {"per_sample": per_sample.detach(), "t": t, "drop_text": drop_text, "drop_dino": drop_dino,
               "v_pred_rms": v.detach().square().mean().sqrt(), "v_target_rms": target.square().mean().sqrt(),
               "bin_sum": bin_sum, "bin_count": bin_count}
    return loss, aux
