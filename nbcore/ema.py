"""EMA: an explicit fp32 copy of the model, updated with ``lerp`` after each applied optimiser
update, decay ``min(ema_decay, (1 + n) / (10 + n))`` (n = applied updates) so that early EMA
weights are not dominated by the random init. Checkpoints carry it as ``ema``; samplers and
exports use it by default."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA:
    """fp32 exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int) -> None:
        d = min(self.decay, (1 + n_updates) / (10 + n_updates))
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach().float() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, sd):
        self.module.load_state_dict(sd)
