"""Attention-routing capture: where does each image token's cross-attention go — text, CLS or patches?

    with capture(model) as rec:
        model(x, t, ...)                      # any number of forwards (e.g. a whole sampling run)
    rec.mass          # (F, depth, B, nh, N, 3) mass on [text, CLS, patches] per forward, block, head, token
    rec.patch_maps    # (F, depth, B, N, P) head-averaged attention of each image token over the patches
                      # (F, depth, B, nh, N, P) per head with capture(model, per_head=True)
    rec.t             # (F, B) timestep of each forward

F forwards, N image tokens, P patches. The masses of a token sum to 1 (padding gets 0, so text mass
is the mass on real tokens). The sources are found by name in the model's context layout
(``ModelConfig.context_spans``), whatever their order (CLS in the middle or at the start); a source
the context lacks gets mass 0 (the pre-patch model: CLS and patches; tied-only patches: patches, and
then ``patch_maps`` is empty). Reduction happens inside the forward, on the device: a production-size
capture keeps (nh * N * 3 + N * P) numbers per block and sample, never the full (nh, N, M) weights.
While capturing, cross-attention takes the explicit path of ``nbcore.model.attend`` (same maths as
the fused kernel); outside the context manager nothing of the normal path changes.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

SOURCES = ("text", "cls", "patches")


class RoutingRecorder:
    def __init__(self, keep_maps: bool = True, dtype=torch.float32, per_head: bool = False):
        self.keep_maps = keep_maps
        self.per_head = per_head
        self.dtype = dtype
        self._mass: list[list[torch.Tensor]] = []      # per forward: per block (B, nh, N, 3)
        self._maps: list[list[torch.Tensor]] = []      # per forward: per block (B, N, P)
        self._t: list[torch.Tensor] = []
        self.grid: tuple[int, int] | None = None
        self.spans: dict[str, tuple[int, int]] = {}

    # -- called by NanoDiT.forward
    def begin(self, t, spans, key_mask, grid):
        """spans {source: (start, stop)} in the context (``ModelConfig.context_spans``; an absent
        source has start == stop)."""
        self._t.append(t.detach().float().cpu())
        self._mass.append([])
        self._maps.append([])
        self.spans, self.grid = dict(spans), grid

    def hook(self, block_index: int):
        def record(weights: torch.Tensor):                                            # (B, nh, N, M)
            w = weights.detach().float()
            mass = [w[..., a:b].sum(-1) for a, b in (self.spans[s] for s in SOURCES)]   # 3 x (B, nh, N)
            self._mass[-1].append(torch.stack(mass, -1).to(self.dtype).cpu())          # (B, nh, N, 3)
            a, b = self.spans["patches"]
            if self.keep_maps and b > a:
                maps = w[..., a:b] if self.per_head else w[..., a:b].mean(1)            # (B, nh, N, P) | (B, N, P)
                self._maps[-1].append(maps.to(self.dtype).cpu())
        return record

    # -- results
    @property
    def mass(self) -> torch.Tensor:
        """(F, depth, B, nh, N, 3): attention mass on [text, CLS, patches]."""
        return torch.stack([torch.stack(m) for m in self._mass])

    @property
    def patch_maps(self) -> torch.Tensor:
        """(F, depth, B, N, P): head-averaged attention over the patches, (F, depth, B, nh, N, P) with
        ``per_head`` (empty without patches)."""
        if not self._maps or not self._maps[0]:
            return torch.empty(0)
        return torch.stack([torch.stack(m) for m in self._maps])

    @property
    def t(self) -> torch.Tensor:
        return torch.stack(self._t)                                                    # (F, B)

    def summary(self) -> dict:
        """Mean mass per source, per block and per head (averaged over forwards, samples, tokens)."""
        m = self.mass.mean(dim=(0, 2, 4))                                              # (depth, nh, 3)
        return {
            "per_block": {s: m[..., i].mean(1).tolist() for i, s in enumerate(SOURCES)},
            "per_head": {s: m[..., i].tolist() for i, s in enumerate(SOURCES)},
            "overall": {s: float(m[..., i].mean()) for i, s in enumerate(SOURCES)},
        }


@contextmanager
def capture(model, keep_maps: bool = True, per_head: bool = False):
    """Record attention routing of ``model`` (a NanoDiT) for every forward inside the block;
    ``per_head`` keeps the patch maps of every head instead of their mean."""
    if getattr(model, "_recorder", None) is not None:
        raise RuntimeError("a routing capture is already active on this model")
    rec = RoutingRecorder(keep_maps=keep_maps, per_head=per_head)
    model._recorder = rec
    try:
        yield rec
    finally:
        model._recorder = None
