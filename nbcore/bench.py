"""Benchmark: one training step of NanoDiT against diffusers' ``PixArtTransformer2DModel``.

    python -m nbcore.bench --json outputs/bench/cpu.json            # tiny preset on a CPU
    python -m nbcore.bench --json outputs/bench/gpu.json --device cuda   # production preset, bf16

What is compared (each case, same process, same batch, same dtype, steps interleaved A B A B ...):

- ``train60`` / ``train120`` / ``train512``: one training step (forward, MSE flow-matching loss,
  backward, AdamW) of NanoDiT and of PixArt at equal hidden size, depth, heads, MLP ratio, latent
  shape, patch size and maximum text length. The number is the real caption length out of 512 T5
  tokens (production). On the ``tiny`` preset (text_len 32) it maps proportionally:
  ceil(n * text_len / 512) real tokens -> 4, 8 and 32 of 32.
  * PixArt receives what it is used with: the full padded text (B, text_len, Dt) plus its key mask,
    and the timestep; it has no DINO input.
  * NanoDiT receives its natural input: the same captions through ``nbcore.model.prepare_text``
    (trimmed to the batch's longest real caption rounded up to 8; mask dropped when nothing is
    padded), plus the DINO CLS vector and P patch tokens, so its context is ``L' + 1 + P`` tokens
    (197 more than the text alone at production sizes).
  * A third model in the same interleaved loop, the *pre-patch* NanoDiT (``use_dino_patches=False``:
    the same trimmed text as context, the CLS vector only through adaLN), separates the
    implementation's speed (the same inputs PixArt gets, plus one CLS vector) from the cost of the
    research feature (the 1 + P extra context tokens). Its figures are the ``prepatch_*`` keys.
  * Caption lengths in a batch: sample 0 has exactly n real tokens, the others are drawn uniformly
    from [ceil(n/2), n] (seeded; ``--caption-spread``), as in real batches; the full case has every
    token real. ``--caption-spread 0`` gives every caption n tokens (NanoDiT then needs no mask when
    n is a multiple of 8: the cost of the mask, measured). Neither model gets CFG dropout in the
    timed step; in ``nbcore.train`` a batch with a dropped caption always carries a key mask.
- ``guidance``: NanoDiT sampling images/s with ``nbcore.sample.sample`` (Euler, ``--sample-steps``),
  four guidance branches per step (the "independent" formula with a patch scale: unconditional,
  text only, CLS only, DINO = CLS + patches) in one batched forward vs four forwards one after
  another ("peer" = sequential).
- ``capture``: NanoDiT inference forward samples/s with the routing capture off vs on
  (``nbcore.attention.capture``; "peer" = capture on).

Timing: ``time.perf_counter`` on CPU, CUDA events on GPU; ``--warmup`` steps, then the median of
``--steps`` timed steps. Flops come from ``torch.utils.flop_counter.FlopCounterMode`` on one eager
step (forward + backward; executed flops, so PixArt's padded keys count as work); MFU (GPU only) divides
the achieved rate by a large matmul in the run's dtype (bf16 by default) measured in the same run. Peak memory is
the step's peak tensor memory of one model: its parameters and optimizer state plus everything the
step allocates (the shared input batch excluded) -- ``torch.cuda.max_memory_allocated`` on GPU,
a dispatch-level tensor tracker on CPU.

diffusers is a benchmark-only dependency: imported here, never by the library.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from nbcore.attention import capture
from nbcore.model import CONDITION_KEYS, NanoDiT, ModelConfig, prepare_text
from nbcore.sample import Guidance, sample
from nbcore.utils import seed_everything

__all__ = ["TRAIN_CASES", "CASES", "real_tokens", "make_batch", "pixart_kwargs", "build_pixart",
           "nanodit_inputs", "pixart_inputs", "TrainStep", "count_flops", "peak_step_memory",
           "bench_guidance"]

REFERENCE_TEXT_LEN = 512                      # caption lengths are named out of 512 T5 tokens
TRAIN_CASES = {"train60": 60, "train120": 120, "train512": 512}
CASES = (*TRAIN_CASES, "guidance", "capture")


def _import_pixart():
    try:
        from diffusers import PixArtTransformer2DModel
    except ImportError as e:  # one line, as every CLI error here
        raise SystemExit(f"nbcore.bench needs diffusers (a benchmark-only extra): pip install diffusers ({e})")
    return PixArtTransformer2DModel


# --------------------------------------------------------------------------- inputs

def real_tokens(n_reference: int, text_len: int) -> int:
    """Real caption tokens for a case named by its length out of 512, mapped to this preset's text_len."""
    return min(text_len, max(1, math.ceil(n_reference * text_len / REFERENCE_TEXT_LEN)))


def make_batch(cfg: ModelConfig, batch: int, n_real: int, seed: int = 0, spread: float = 0.5) -> dict:
    """A synthetic training batch on the host (CPU, float32), shared by both models.

    Returns latent x0 (B, C, S, S), noise (B, C, S, S), x_t (B, C, S, S), t (B,), target v (B, C, S, S),
    dino_emb (B, Dd), dino_patches (B, P, Dd), text_emb (B, text_len, Dt) zero past each caption,
    text_mask (B, text_len) bool (real tokens first). Sample 0 has ``n_real`` tokens; the others uniform in
    [ceil(n (1 - spread)), n] (spread 0: all exactly n); every token is real when n_real == text_len.
    """
    if not 1 <= n_real <= cfg.text_len:
        raise ValueError(f"n_real must be in [1, {cfg.text_len}], got {n_real}")
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"spread must be in [0, 1), got {spread}")
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.input_size, cfg.text_len
    x0 = torch.randn(batch, cfg.in_channels, S, S, generator=g)
    noise = torch.randn(batch, cfg.in_channels, S, S, generator=g)
    t = torch.rand(batch, generator=g)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    if n_real == L:
        lengths = torch.full((batch,), L)
    else:
        lengths = torch.randint(max(1, math.ceil(n_real * (1 - spread))), n_real + 1, (batch,), generator=g)
        lengths[0] = n_real
    mask = torch.arange(L)[None] < lengths[:, None]                                    # (B, L)
    text = torch.randn(batch, L, cfg.text_dim, generator=g) * mask[..., None]           # (B, L, Dt)
    return {
        "x0": x0, "noise": noise, "x_t": x_t, "t": t, "target": noise - x0,
        "dino_emb": torch.randn(batch, cfg.dino_dim, generator=g),
        "dino_patches": torch.randn(batch, cfg.num_patches, cfg.dino_dim, generator=g),
        "text_emb": text, "text_mask": mask,
    }


def nanodit_inputs(b: dict, device) -> dict:
    """NanoDiT's keyword inputs: text trimmed on the host by ``prepare_text``, then moved once."""
    text, mask = prepare_text(b["text_emb"], b["text_mask"])                            # (B, L', Dt), (B, L') | None
    kw = {"x": b["x_t"], "t": b["t"], "dino_emb": b["dino_emb"], "dino_patches": b["dino_patches"],
          "text_emb": text, "text_mask": mask}
    return {k: (None if v is None else v.to(device)) for k, v in kw.items()}


def pixart_inputs(b: dict, device) -> dict:
    """PixArt's keyword inputs, as its pipeline passes them: the full padded text with its mask,
    the timestep on PixArt's 0..1000 scale, no additional conditions."""
    return {"hidden_states": b["x_t"].to(device), "encoder_hidden_states": b["text_emb"].to(device),
            "encoder_attention_mask": b["text_mask"].to(device), "timestep": (b["t"] * 1000).to(device),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}


# --------------------------------------------------------------------------- the peer

def pixart_kwargs(cfg: ModelConfig) -> dict:
    """PixArtTransformer2DModel arguments matching ``cfg``: same hidden size (heads x head dim), depth,
    heads, MLP ratio 4 (diffusers' FeedForward default), tanh-GELU, latent channels in = out (no
    learned sigma), patch size, latent side, cross-attention over ``text_dim`` captions projected to
    the hidden size, PixArt's shared adaLN ("ada_norm_single") without resolution conditions."""
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"PixArt's feed-forward is fixed at 4x; this config has mlp_ratio {cfg.mlp_ratio}")
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=cfg.in_channels, num_layers=cfg.depth,
                patch_size=cfg.patch_size, sample_size=cfg.input_size, cross_attention_dim=cfg.hidden_size,
                caption_channels=cfg.text_dim, norm_type="ada_norm_single", use_additional_conditions=False,
                activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False,
                norm_eps=1e-6, dropout=0.0)


def build_pixart(cfg: ModelConfig, fuse_qkv: bool = False) -> nn.Module:
    """diffusers' PixArt transformer at ``cfg``'s sizes (stock attention processor unless ``fuse_qkv``)."""
    model = _import_pixart()(**pixart_kwargs(cfg))
    if fuse_qkv:
        model.fuse_qkv_projections()
    return model


def _pixart_forward(model):
    return lambda **kw: model(**kw)[0]


def _nanodit_forward(model):
    return lambda **kw: model(**kw)


# --------------------------------------------------------------------------- one training step

def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class TrainStep:
    """One step: forward under the run's autocast, MSE to the flow-matching target, backward, AdamW,
    grads set to None. No host-device synchronisation inside."""

    def __init__(self, model: nn.Module, forward, inputs: dict, target: torch.Tensor, device: torch.device,
                 dtype: str, compile: bool = False):
        self.model, self.inputs, self.target = model, inputs, target
        self.device, self.dtype = device, dtype
        self.forward = forward(torch.compile(model) if compile else model)
        self.eager_forward = forward(model)            # flop counting and the CPU memory tracker
        # Fused AdamW (one kernel over all parameters) on CUDA and CPU, the same for both models.
        fused = device.type in ("cuda", "cpu")
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                                     fused=fused or None, foreach=None if fused else True)

    def __call__(self, eager: bool = False):
        fwd = self.eager_forward if eager else self.forward
        with _autocast(self.device, self.dtype):
            v = fwd(**self.inputs)
        loss = F.mse_loss(v.float(), self.target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Bytes of parameters and optimizer state (what lives between steps)."""
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for st in self.opt.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return n


# --------------------------------------------------------------------------- flops

def _cpu_sdpa_fwd_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, n, d = q
    m, dv = k[2], v[3]
    return 2 * b * h * n * m * (d + dv)                   # QK^T and PV


def _cpu_sdpa_bwd_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, n, d = q
    m, dv = k[2], v[3]
    return 2 * b * h * n * m * (3 * d + 2 * dv)           # recompute QK^T; dP, dV (dv); dQ, dK (d): torch's count


def _flop_mapping() -> dict:
    """torch's flop registry lacks the CPU flash-attention ops; count them like the CUDA ones."""
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_fwd_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_bwd_flops
    return out


def count_flops(fn) -> int:
    """Total flops torch's flop counter sees while ``fn()`` runs (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- peak memory

class _LiveTensorBytes:
    """Peak bytes of tensor storages allocated while active (CPU stand-in for CUDA's allocator stats).

    A dispatch mode sees every op's outputs; outputs aliasing an input (views, in-place ops) are not
    new memory; a fresh storage is counted until its weak reference expires."""

    def __init__(self):
        tracker = self
        self.live: dict = {}
        self.now = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if any(r.alias_info is not None for r in func._schema.returns):
                    return out
                for ref in [r for r in tracker.live if r.expired()]:
                    tracker.now -= tracker.live.pop(ref)
                for x in tree_leaves(out):
                    if isinstance(x, torch.Tensor):
                        st = x.untyped_storage()
                        ref = StorageWeakRef(st)
                        if ref not in tracker.live:
                            tracker.live[ref] = st.nbytes()
                            tracker.now += st.nbytes()
                tracker.peak = max(tracker.peak, tracker.now)
                return out

        self.mode = Mode()


def peak_step_memory(step: TrainStep, fn=None) -> int | None:
    """Peak bytes of one step of ``step``'s model: its parameters and optimizer state plus the step's
    own allocations (the input batch, shared by both models, excluded). None where not measurable
    (a compiled model on CPU)."""
    fn = fn or step
    dev = step.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base + step.state_bytes()
    tracker = _LiveTensorBytes()
    with tracker.mode:
        fn()
    return tracker.peak + step.state_bytes()


# --------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: list, steps: int, warmup: int, device: torch.device, desc: str = "") -> list[list[float]]:
    """Run ``fns`` in turn (A B A B ...) so drift on a shared machine hits all alike: ``warmup``
    rounds untimed, then ``steps`` timed rounds. Returns per-fn lists of seconds per call.
    perf_counter on CPU; CUDA events on GPU (read once at the end, no sync between calls)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    cuda = device.type == "cuda"
    marks: list[list] = [[] for _ in fns]
    for _ in tqdm(range(steps), desc=desc, leave=False, file=sys.stderr):
        for i, fn in enumerate(fns):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                marks[i].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                marks[i].append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        return [[s.elapsed_time(e) / 1000 for s, e in m] for m in marks]
    return marks


def _stats(seconds: list[float]) -> dict:
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return {"median_s": statistics.median(seconds), "p25_s": q[0], "p75_s": q[2], "n": len(seconds)}


def measure_peak_tflops(device: torch.device, dtype: str) -> float:
    """Best TFLOP/s of a large square matmul in the run's dtype (n = 8192 on GPU, 1024 elsewhere)."""
    n = 8192 if device.type == "cuda" else 1024
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    times = time_interleaved([lambda: a @ b], steps=10 if device.type == "cuda" else 5, warmup=2, device=device,
                             desc="matmul peak")[0]
    return 2 * n ** 3 / min(times) / 1e12


# --------------------------------------------------------------------------- guidance

def bench_guidance():
    """The guidance the sampling case uses: ``nbcore.sample``'s "independent" formula with a separate
    patch scale, so every Euler step evaluates four branches (uncond, text, cls, dino)."""
    return Guidance("independent", text_scale=4.0, dino_scale=2.0, patch_scale=3.0)


# --------------------------------------------------------------------------- cases

def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {platform.machine()})"


def _rate(batch: int, st: dict) -> float:
    return batch / st["median_s"]


def _train_case(name: str, cfg: ModelConfig, args, device, peak_tflops) -> dict:
    n_ref = TRAIN_CASES[name]
    n_real = real_tokens(n_ref, cfg.text_len)
    seed_everything(args.seed)
    b = make_batch(cfg, args.batch, n_real, seed=args.seed, spread=args.caption_spread)
    ours_in, peer_in = nanodit_inputs(b, device), pixart_inputs(b, device)
    target = b["target"].to(device)
    nano = NanoDiT(cfg).to(device)
    pre = NanoDiT(replace(cfg, use_dino_patches=False)).to(device)     # same text; CLS via adaLN only
    peer = build_pixart(cfg, fuse_qkv=args.peer_fuse_qkv).to(device)
    ours = TrainStep(nano, _nanodit_forward, ours_in, target, device, args.dtype, args.compile)
    prepatch = TrainStep(pre, _nanodit_forward, ours_in, target, device, args.dtype, args.compile)
    theirs = TrainStep(peer, _pixart_forward, peer_in, target, device, args.dtype, args.compile)
    times = time_interleaved([ours, prepatch, theirs], args.steps, args.warmup, device, desc=name)
    s_ours, s_pre, s_peer = (_stats(t) for t in times)
    # Flops and memory after timing (optimizer state exists), each on the eager model.
    f_ours, f_pre, f_peer = (count_flops(lambda st=st: st(eager=True)) for st in (ours, prepatch, theirs))
    cpu_compiled = args.compile and device.type != "cuda"   # the tracker cannot follow compiled code
    m_ours, m_pre, m_peer = (None if cpu_compiled else peak_step_memory(st) for st in (ours, prepatch, theirs))
    L_ours = ours_in["text_emb"].shape[1]
    r = {
        "case": name, "kind": "train_step", "preset": args.preset, "device": device.type,
        "machine": _machine(device), "torch": torch.__version__, "diffusers": _diffusers_version(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "compile": args.compile, "peer_fuse_qkv": args.peer_fuse_qkv, "caption_spread": args.caption_spread,
        "real_tokens": n_real, "real_tokens_reference": f"{n_ref} of {REFERENCE_TEXT_LEN}",
        "text_len": cfg.text_len, "caption_lengths": [int(x) for x in b["text_mask"].sum(1)],
        "nbcore_text_tokens": L_ours, "nbcore_mask": ours_in["text_mask"] is not None,
        "nbcore_context": L_ours + (1 + cfg.num_patches if cfg.use_dino_patches else 0),
        "peer_context": cfg.text_len, "image_tokens": (cfg.input_size // cfg.patch_size) ** 2,
        "nbcore_params": nano.num_params(), "peer_params": sum(p.numel() for p in peer.parameters()),
        "nbcore_samples_per_s": _rate(args.batch, s_ours), "peer_samples_per_s": _rate(args.batch, s_peer),
        "nbcore_step_ms": 1e3 * s_ours["median_s"], "peer_step_ms": 1e3 * s_peer["median_s"],
        "nbcore_step_ms_iqr": [1e3 * s_ours["p25_s"], 1e3 * s_ours["p75_s"]],
        "peer_step_ms_iqr": [1e3 * s_peer["p25_s"], 1e3 * s_peer["p75_s"]],
        "nbcore_peak_mem_mb": None if m_ours is None else m_ours / 2 ** 20,
        "peer_peak_mem_mb": None if m_peer is None else m_peer / 2 ** 20,
        "nbcore_gflop_per_step": f_ours / 1e9, "peer_gflop_per_step": f_peer / 1e9,
        "prepatch_context": L_ours, "prepatch_params": pre.num_params(),
        "prepatch_samples_per_s": _rate(args.batch, s_pre), "prepatch_step_ms": 1e3 * s_pre["median_s"],
        "prepatch_step_ms_iqr": [1e3 * s_pre["p25_s"], 1e3 * s_pre["p75_s"]],
        "prepatch_peak_mem_mb": None if m_pre is None else m_pre / 2 ** 20, "prepatch_gflop_per_step": f_pre / 1e9,
    }
    r["ratio"] = r["nbcore_samples_per_s"] / r["peer_samples_per_s"]
    r["prepatch_ratio"] = r["prepatch_samples_per_s"] / r["peer_samples_per_s"]
    for who, f, s in (("nbcore", f_ours, s_ours), ("prepatch", f_pre, s_pre), ("peer", f_peer, s_peer)):
        r[f"{who}_tflops"] = f / s["median_s"] / 1e12
        r[f"{who}_mfu"] = r[f"{who}_tflops"] / peak_tflops if peak_tflops else None
    r["peak_tflops_measured"] = peak_tflops
    del ours, prepatch, theirs, nano, pre, peer
    return r


def _guidance_case(cfg: ModelConfig, args, device) -> dict:
    """Sampling images/s with ``nbcore.sample.sample``, four guidance branches per Euler step: one
    batched forward (``guidance_batched=True``) vs one forward per branch."""
    n_real = real_tokens(120, cfg.text_len)
    b = make_batch(cfg, args.batch, n_real, seed=args.seed)
    seed_everything(args.seed)
    model = NanoDiT(cfg).to(device).eval()
    guidance = bench_guidance()
    branches = list(guidance.coefficients(0.5))
    # Host tensors, as a caller passes them; the sampler trims the text and moves them itself.
    cond = {k: b[k] for k in CONDITION_KEYS}

    def go(batched):
        def f():
            with torch.inference_mode(), _autocast(device, args.dtype):
                sample(model, **cond, guidance=guidance, steps=args.sample_steps, guidance_batched=batched,
                       seed=args.seed)
        return f
    times = time_interleaved([go(True), go(False)], max(2, args.sample_repeats), 1, device, desc="guidance")
    r = _side_case("guidance", args, device, f"images/s, {len(branches)} branches in one batched forward",
                   f"images/s, {len(branches)} branches one after another", _stats(times[0]), _stats(times[1]))
    r.update(sample_steps=args.sample_steps, branches=branches, real_tokens=n_real, nbcore_params=model.num_params(),
             sampler=f"nbcore.sample.sample (Guidance {guidance.formula}, s_t {guidance.text_scale:g}, "
                     f"s_d {guidance.dino_scale:g}, s_p {guidance.patch_scale:g})")
    return r


def _capture_case(cfg: ModelConfig, args, device) -> dict:
    n_real = real_tokens(120, cfg.text_len)
    b = make_batch(cfg, args.batch, n_real, seed=args.seed)
    inputs = nanodit_inputs(b, device)
    seed_everything(args.seed)
    model = NanoDiT(cfg).to(device).eval()

    def off():
        with torch.inference_mode(), _autocast(device, args.dtype):
            model(**inputs)

    def on():
        with torch.inference_mode(), _autocast(device, args.dtype), capture(model):
            model(**inputs)
    times = time_interleaved([off, on], args.steps, args.warmup, device, desc="capture")
    r = _side_case("capture", args, device, "forward samples/s, routing capture off",
                   "forward samples/s, routing capture on", _stats(times[0]), _stats(times[1]))
    r.update(real_tokens=n_real, nbcore_params=model.num_params())
    return r


def _side_case(name, args, device, ours_what, peer_what, s_ours, s_peer) -> dict:
    r = {"case": name, "kind": name, "preset": args.preset, "device": device.type, "machine": _machine(device),
         "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype, "batch": args.batch,
         "nbcore_measures": ours_what, "peer_measures": peer_what,
         "nbcore_samples_per_s": _rate(args.batch, s_ours), "peer_samples_per_s": _rate(args.batch, s_peer),
         "nbcore_step_ms": 1e3 * s_ours["median_s"], "peer_step_ms": 1e3 * s_peer["median_s"],
         "nbcore_step_ms_iqr": [1e3 * s_ours["p25_s"], 1e3 * s_ours["p75_s"]],
         "peer_step_ms_iqr": [1e3 * s_peer["p25_s"], 1e3 * s_peer["p75_s"]]}
    r["ratio"] = r["nbcore_samples_per_s"] / r["peer_samples_per_s"]
    return r


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__


# --------------------------------------------------------------------------- report

def _fmt(x, spec=".1f"):
    return "–" if x is None else format(x, spec)


def markdown(results: list[dict], cfg: ModelConfig) -> str:
    """The results as a markdown page: what is compared, then one table per kind of case."""
    train = [r for r in results if r["kind"] == "train_step"]
    side = [r for r in results if r["kind"] != "train_step"]
    head = results[0]
    lines = [f"# nbcore benchmark: NanoDiT vs diffusers PixArtTransformer2DModel", "",
             f"Machine: {head['machine']}; device `{head['device']}`"
             + (f" ({head['threads']} intra-op thread{'s' * (head['threads'] != 1)})" if head["device"] == "cpu" else "")
             + f"; torch {head['torch']}"
             + (f"; diffusers {train[0]['diffusers']}" if train else "")
             + f"; preset `{head['preset']}`; dtype {head['dtype']}"
             + (" (bf16 autocast, fp32 master weights)" if head["dtype"] == "bf16" else "")
             + f"; batch {head['batch']}.", ""]
    if train:
        r0 = train[0]
        D, nh, p = cfg.hidden_size, cfg.num_heads, cfg.patch_size
        lines += [
            f"**Sizes (both models):** hidden {D}, depth {cfg.depth}, {nh} heads, MLP x{cfg.mlp_ratio:g}, "
            f"latents {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, patch {p} "
            f"({r0['image_tokens']} image tokens), text up to {cfg.text_len} x {cfg.text_dim}. "
            f"Params: NanoDiT {r0['nbcore_params'] / 1e6:.2f} M, PixArt {r0['peer_params'] / 1e6:.2f} M.", "",
            f"**What each receives.** PixArt: the full {cfg.text_len}-token padded text with its key mask "
            "(as its pipeline uses it) and the timestep; no DINO input. NanoDiT: the same captions through "
            "`nbcore.model.prepare_text` (trimmed to the batch's longest real caption rounded up to 8, no mask "
            f"when nothing is padded) plus the DINO CLS vector and {cfg.num_patches} patch tokens, so its "
            f"cross-attention context is text + {1 + cfg.num_patches} tokens "
            f"({1 + cfg.num_patches} more than PixArt's at equal text length). "
            "**Pre-patch**: NanoDiT without patches (`use_dino_patches=False`) on the same trimmed text, "
            "the CLS vector through adaLN only: PixArt's inputs plus one vector, timed in the same "
            "interleaved loop; its ratio is against PixArt. "
            f"Captions: sample 0 has the case's real length n, the rest uniform in [n(1 - {r0['caption_spread']:g}), n]; "
            "train512 = every token real. No CFG dropout in the timed step (in `nbcore.train` a batch "
            "with a dropped caption always carries a key mask)."
            + (f" Tiny maps the 60/120/512-of-512 lengths proportionally to its {cfg.text_len}-token text: "
               + "/".join(str(r["real_tokens"]) for r in train) + f" of {cfg.text_len}." if cfg.text_len != 512 else ""),
            "",
            "**Step:** forward, MSE flow-matching loss, backward, AdamW"
            + " (fused)"
            + (", both under torch.compile" if r0["compile"] else "")
            + (", PixArt with diffusers' fused QKV" if r0["peer_fuse_qkv"] else ", PixArt with its stock attention processor")
            + f"; {r0['warmup']} warm-up steps, median of {r0['steps']} timed steps, the two models interleaved. "
            "GFLOP: torch's flop counter on one step (forward + backward, executed work including padding). "
            "Peak memory: parameters + optimizer state + the step's allocations, inputs excluded.", "",
            "| case | real tokens | NanoDiT ctx (text+1+P) | PixArt ctx | NanoDiT samples/s | PixArt samples/s "
            "| ratio | pre-patch samples/s (ratio) | NanoDiT ms (IQR) | PixArt ms (IQR) | GFLOP/step N / pre / P "
            "| TFLOP/s N / P | MFU N / P | peak MiB N / pre / P |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in train:
            mfu = ("–" if r["nbcore_mfu"] is None
                   else f"{100 * r['nbcore_mfu']:.0f}% / {100 * r['peer_mfu']:.0f}%")
            lines.append(
                f"| {r['case']} | {r['real_tokens']} of {r['text_len']} ({r['real_tokens_reference']}) "
                f"| {r['nbcore_context']} ({r['nbcore_text_tokens']}{' masked' if r['nbcore_mask'] else ''}+1+{cfg.num_patches}) "
                f"| {r['peer_context']} masked | {r['nbcore_samples_per_s']:.1f} | {r['peer_samples_per_s']:.1f} "
                f"| **{r['ratio']:.2f}x** | {r['prepatch_samples_per_s']:.1f} ({r['prepatch_ratio']:.2f}x) "
                f"| {r['nbcore_step_ms']:.1f} ({r['nbcore_step_ms_iqr'][0]:.1f}–{r['nbcore_step_ms_iqr'][1]:.1f}) "
                f"| {r['peer_step_ms']:.1f} ({r['peer_step_ms_iqr'][0]:.1f}–{r['peer_step_ms_iqr'][1]:.1f}) "
                f"| {r['nbcore_gflop_per_step']:.2f} / {r['prepatch_gflop_per_step']:.2f} / {r['peer_gflop_per_step']:.2f} "
                f"| {r['nbcore_tflops']:.3f} / {r['peer_tflops']:.3f} | {mfu} "
                f"| {_fmt(r['nbcore_peak_mem_mb'], '.0f')} / {_fmt(r['prepatch_peak_mem_mb'], '.0f')} "
                f"/ {_fmt(r['peer_peak_mem_mb'], '.0f')} |")
        pk = train[0]["peak_tflops_measured"]
        lines += ["", (f"Measured matmul peak for MFU: {pk:.1f} TFLOP/s ({head['dtype']} 8192^3 matmul, same run)."
                       if pk else "MFU: GPU only (a shared CPU has no stable peak)."), ""]
    if side:
        lines += ["| case | NanoDiT variant | samples/s | other variant | samples/s | ratio | notes |",
                  "|---|---|---|---|---|---|---|"]
        for r in side:
            note = (f"{r['sample_steps']} Euler steps, branches {'/'.join(r['branches'])}, {r['sampler']}"
                    if r["kind"] == "guidance"
                    else "one inference forward per call")
            lines.append(f"| {r['case']} | {r['nbcore_measures']} | {r['nbcore_samples_per_s']:.1f} "
                         f"| {r['peer_measures']} | {r['peer_samples_per_s']:.1f} | **{r['ratio']:.2f}x** | {note} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":   # python -m nbcore.bench: the command line is nbcore.cli.bench's
    from nbcore.cli.bench import main as _main
    sys.exit(_main())
