"""Model contract checks as data: the checks of ``tests/test_model.py``, computed by one function
and returned as table rows for the notebooks (02_checks shows them; a failed row fails the run).

    rows = run_model_checks(preset("tiny"))
    failed = [r for r in rows if not r["passed"]]

Each row: ``check`` (what), ``variant`` (an arm of ``CHECK_ARMS``: "patches", "prepatch", "tie+context",
..., or a pos-embedding name "pos=..."),
``value`` (the measured number: a max |difference|, a count), ``tolerance`` (what ``value`` is
compared with), ``passed`` (bool), ``detail`` (one line). The models are tiny random networks
whose every parameter is perturbed away from its (partly zero) initialisation, because a
zero-initialised output layer would make every invariance hold trivially.

Shape legend: B batch, C latent channels, H W latent side, L text tokens, P patches, Dd DINO dim, Dt text dim.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from .attention import capture
from .model import PRESETS, ModelConfig, NanoDiT, load_warm_start, prepare_text
from .sample import BRANCHES, Guidance
from .utils import resolve_device

__all__ = ["run_model_checks", "make_check_model", "make_check_inputs", "with_changed_signal", "warm_start_summary",
           "architecture_summary", "cfg_modes", "production_forward", "CHECK_ARMS", "arm_config"]

TOL = 1e-5          # float32 equality tolerance for "no influence" / "equal" checks
RESPONDS = 1e-3     # a kept signal must move the output by at least this much

# The model variants every contract check runs on: ModelConfig overrides on top of a preset
# (the experiment's arms), each setting every DINO-path field but the context patches' position
# (tie-only arms reset it: positions apply to context patches only).
_CTX = dict(use_dino_patches=True, patch_context=True, patch_tie=False, cls_position="middle")
_TIE = dict(use_dino_patches=True, patch_context=False, patch_tie=True, cls_position="middle", patch_pos_embed="none")
CHECK_ARMS: dict[str, dict] = {
    "patches": _CTX,                                                  # context, [text | CLS | patches]
    "cls start": dict(_CTX, cls_position="start"),                   # [CLS | text | patches]
    "tie+context": dict(_CTX, patch_tie=True),
    "tie only": _TIE,                                                 # [text | CLS], patches tied
    "tie only, no CLS": dict(_TIE, cls_position="none"),             # the pre-patch model + the tie
    "prepatch": dict(use_dino_patches=False),
}


def arm_config(cfg: ModelConfig, arm: str) -> ModelConfig:
    """``cfg`` with the overrides of ``CHECK_ARMS[arm]``."""
    return replace(cfg, **CHECK_ARMS[arm])


def make_check_model(cfg: ModelConfig, seed: int = 0, perturb: bool = True) -> NanoDiT:
    """A NanoDiT in eval mode with every parameter perturbed by N(0, 0.05^2) (see module doc)."""
    torch.manual_seed(seed)
    model = NanoDiT(cfg)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_check_inputs(cfg: ModelConfig, B: int = 2, H: int | None = None, W: int | None = None,
                      lengths: list[int] | None = None, seed: int = 1) -> dict:
    """Random model inputs: x (B, C, H, W), t (B,), dino_emb (B, Dd), dino_patches (B, P, Dd),
    text_emb (B, L, Dt) with L = cfg.text_len, text_mask (B, L) with ``lengths`` real tokens."""
    g = torch.Generator().manual_seed(seed)
    H, W, L = H or cfg.input_size, W or cfg.input_size, cfg.text_len
    lengths = lengths or [L] * B
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]                     # (B, L)
    return dict(x=torch.randn(B, cfg.in_channels, H, W, generator=g), t=torch.rand(B, generator=g),
                dino_emb=torch.randn(B, cfg.dino_dim, generator=g),
                dino_patches=torch.randn(B, cfg.num_patches, cfg.dino_dim, generator=g),
                text_emb=torch.randn(B, L, cfg.text_dim, generator=g), text_mask=mask)


def _row(check, variant, value, tolerance, passed, detail=""):
    return {"check": check, "variant": variant, "value": float(value), "tolerance": tolerance,
            "passed": bool(passed), "detail": detail}


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def with_changed_signal(inp: dict, what: str, seed: int = 99) -> dict:
    """A copy of ``inp`` with one signal replaced by fresh noise (text also changes its length)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in inp.items()}
    if what == "text":
        out["text_emb"] = torch.randn(out["text_emb"].shape, generator=g)
        out["text_mask"] = torch.ones_like(out["text_mask"])
    elif what == "cls":
        out["dino_emb"] = torch.randn(out["dino_emb"].shape, generator=g)
    elif what == "patches":
        out["dino_patches"] = torch.randn(out["dino_patches"].shape, generator=g)
    else:
        raise ValueError(f"unknown signal {what!r}")
    return out


def warm_start_summary(report: dict) -> dict:
    """Counts of a ``load_warm_start`` report plus the names of the new parameters."""
    return {"loaded": len(report["loaded"]), "new": report["new"],
            "unexpected": report["unexpected"], "mismatched": report["mismatched"]}


@torch.no_grad()
def _forward_checks(cfg: ModelConfig, variant: str) -> list[dict]:
    rows = []
    model = make_check_model(cfg)
    L = cfg.text_len
    # shapes: square and a non-square latent, with padded captions
    for H, W in [(cfg.input_size, cfg.input_size),
                 (cfg.input_size - 2 * cfg.patch_size, cfg.input_size + 2 * cfg.patch_size)]:
        inp = make_check_inputs(cfg, H=H, W=W, lengths=[max(1, L // 6), L])
        v = model(**inp)
        want = (2, cfg.in_channels, H, W)
        ok = tuple(v.shape) == want and bool(torch.isfinite(v).all())
        rows.append(_row(f"forward shape {H}x{W}", variant, 0 if ok else 1, 0, ok,
                         f"v {tuple(v.shape)}, expected {want}, finite={bool(torch.isfinite(v).all())}"))
    inp = make_check_inputs(cfg, lengths=[max(1, L // 8), max(2, (2 * L) // 3)])
    v = model(**inp)
    # fused SDPA == explicit attention (the routing-capture path)
    with capture(model):
        explicit = model(**inp)
    d = _maxdiff(v, explicit)
    rows.append(_row("fused == explicit attention", variant, d, TOL, d <= TOL, "model output, capture on vs off"))
    # padding has no influence
    noisy = dict(inp, text_emb=inp["text_emb"].clone())
    pad = ~inp["text_mask"]
    noisy["text_emb"][pad] = 1e3 * torch.randn(int(pad.sum()), cfg.text_dim, generator=torch.Generator().manual_seed(5))
    d = _maxdiff(model(**noisy), v)
    rows.append(_row("padded text has no influence", variant, d, TOL, d <= TOL, "padding replaced by 1e3-scale noise"))
    # trimmed == padded
    emb, mask = prepare_text(inp["text_emb"], inp["text_mask"])
    d = _maxdiff(model(**dict(inp, text_emb=emb, text_mask=mask)), v)
    rows.append(_row("trimmed text == padded", variant, d, TOL, d <= TOL, f"L {L} -> {emb.shape[1]}"))
    # dropped signal has no influence; kept one responds
    drop = torch.tensor([True, False])
    for what in ["text", "cls"] + (["patches"] if cfg.use_dino_patches else []):
        kw = {"drop_text": drop} if what == "text" else {"drop_dino": drop}
        before, after = model(**inp, **kw), model(**with_changed_signal(inp, what), **kw)
        d_drop, d_kept = _maxdiff(after[0], before[0]), _maxdiff(after[1], before[1])
        ok = d_drop <= TOL and d_kept > RESPONDS
        rows.append(_row(f"dropped {what} has no influence", variant, d_drop, TOL, ok,
                         f"dropped sample moves {d_drop:.2e}; kept sample moves {d_kept:.2e} (> {RESPONDS})"))
    # adaLN-zero init: the unperturbed model predicts exactly v = 0
    zero = make_check_model(cfg, perturb=False)
    d = float(zero(**inp).abs().max())
    rows.append(_row("initial output is zero", variant, d, 0.0, d == 0.0, "unperturbed init, max |v|"))
    return rows


def _gradient_check(cfg: ModelConfig, variant: str) -> dict:
    model = make_check_model(cfg).train()
    L = cfg.text_len
    inp = make_check_inputs(cfg, B=4, lengths=[3, L, max(1, L // 3), max(1, L // 4)])
    drop_text = torch.tensor([False, True, False, True])      # one sample per CFG mode
    drop_dino = torch.tensor([False, False, True, True])
    model(**inp, drop_text=drop_text, drop_dino=drop_dino).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    n = sum(1 for _ in model.parameters())
    return _row("gradient reaches every parameter", variant, len(missing), 0, not missing,
                f"{n - len(missing)}/{n} tensors" + (f"; missing {missing[:4]}" if missing else ""))


@torch.no_grad()
def _order_check(cfg: ModelConfig, pos: str) -> dict:
    """Without positions the patches are a set (permuting them changes nothing); with learned or
    sin-cos positions the order matters."""
    c = replace(cfg, **_CTX, patch_pos_embed=pos)
    model = make_check_model(c)
    inp = make_check_inputs(c)
    perm = torch.randperm(c.num_patches, generator=torch.Generator().manual_seed(0))
    d = _maxdiff(model(**dict(inp, dino_patches=inp["dino_patches"][:, perm])), model(**inp))
    invariant = pos == "none"
    ok = (d <= TOL) == invariant
    return _row("patch order " + ("ignored (a set)" if invariant else "matters"), f"pos={pos}", d, TOL, ok,
                "max |v(permuted) - v|" + (" <= tol" if invariant else " > tol"))


@torch.no_grad()
def _tie_locality_check(cfg: ModelConfig, variant: str) -> dict:
    """Tied patches are local: swapping two patches changes the residual stream entering the first
    block at exactly the image tokens those two patches cover, and nowhere else."""
    model = make_check_model(cfg)
    inp = make_check_inputs(cfg, B=1)
    g, p = cfg.dino_grid, cfg.patch_size
    h = w = cfg.input_size // p
    if h % g:
        return _row("tied patch reaches only its tokens", variant, 0, 0, True, f"skipped: g={g} does not divide h={h}")
    a, b = 0, cfg.num_patches - 1                       # opposite corners
    swapped = inp["dino_patches"].clone()
    swapped[:, [a, b]] = swapped[:, [b, a]]
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(**inp)
        model(**dict(inp, dino_patches=swapped))
    finally:
        handle.remove()
    change = (seen[1] - seen[0]).abs().amax(-1)[0].view(h, w)                          # (h, w)
    covered = torch.zeros(g, g, dtype=torch.bool)
    covered.view(-1)[[a, b]] = True
    covered = covered.repeat_interleave(h // g, 0).repeat_interleave(w // g, 1)        # (h, w)
    outside, inside = float(change[~covered].max()), float(change[covered].min())
    ok = outside == 0.0 and inside > RESPONDS
    return _row("tied patch reaches only its tokens", variant, outside, 0.0, ok,
                f"swap patches {a}<->{b}: block-0 input moves {inside:.2e} (min) on their tokens, {outside:.2e} elsewhere")


def _warm_start_check(cfg: ModelConfig, variant: str = "patches") -> list[dict]:
    """Warm start of ``cfg`` (a patch arm) from a pre-patch model: the report names exactly the new
    parameters and every old tensor is copied. Where the arm adds no context keys (tie only, no
    CLS) its step-0 output must equal the pre-patch model's exactly; a tie added to a context arm
    must leave that arm's output exactly unchanged."""
    rows = []
    base = make_check_model(replace(cfg, use_dino_patches=False), seed=3)
    model = NanoDiT(cfg).eval()
    report = load_warm_start(model, base.state_dict())
    own = model.state_dict()
    copied = all(torch.equal(own[k], v) for k, v in base.state_dict().items())
    ok = (report["new"] == model.new_parameter_names() and not report["unexpected"]
          and not report["mismatched"] and set(report["loaded"]) == set(base.state_dict()) and copied)
    rows.append(_row("warm start from pre-patch", variant, len(report["new"]), len(model.new_parameter_names()), ok,
                     f"loaded {len(report['loaded'])}, new {report['new']}, unexpected {len(report['unexpected'])}, "
                     f"mismatched {len(report['mismatched'])}"))
    inp = make_check_inputs(cfg, lengths=[3, cfg.text_len])
    if cfg.patch_tie and cfg.context_order == ("text",):
        with torch.no_grad():
            d = _maxdiff(model(**inp), base(**inp))
        rows.append(_row("warm start = pre-patch function at step 0", variant, d, 0.0, d == 0.0,
                         "max |v(warm-started) - v(pre-patch)| (zero-initialised dino_patch_tie)"))
    if cfg.patch_tie and cfg.patch_context:
        ctx_arm = make_check_model(replace(cfg, patch_tie=False), seed=4)
        model = NanoDiT(cfg).eval()
        report = load_warm_start(model, ctx_arm.state_dict())
        with torch.no_grad():
            d = _maxdiff(model(**inp), ctx_arm(**inp))
        ok = d == 0.0 and report["new"] == ["dino_patch_tie.bias", "dino_patch_tie.weight"]
        rows.append(_row("adding the tie keeps the context arm's function", variant, d, 0.0, ok,
                         f"new {report['new']}; max |v(tie+context) - v(context)| at step 0"))
    return rows


def run_model_checks(cfg: ModelConfig, pos_variants=("none", "learned", "sincos"), arms=tuple(CHECK_ARMS)) -> list[dict]:
    """Run every model contract check on ``cfg`` (use a tiny preset: dozens of forwards per arm) for
    each arm of ``CHECK_ARMS`` (the patch model, the pre-patch architecture, CLS first, tied
    patches with and without context). Returns the rows described in the module doc."""
    rows: list[dict] = []
    for arm in arms:
        c = arm_config(cfg, arm)
        rows += _forward_checks(c, arm)
        rows.append(_gradient_check(c, arm))
        if c.use_dino_patches and c.patch_tie:
            rows.append(_tie_locality_check(c, arm))
        if c.use_dino_patches:
            rows += _warm_start_check(c, arm)
    for pos in pos_variants:
        rows.append(_gradient_check(replace(cfg, **_CTX, patch_pos_embed=pos), f"pos={pos}"))
        rows.append(_order_check(cfg, pos))
    return rows


# --------------------------------------------------------------------------- architecture (notebook 01)

def architecture_summary(cfg: ModelConfig) -> dict:
    """Build ``cfg`` (on the meta device) as the patch model and as the pre-patch architecture and describe them:
    ``context`` {text, cls, patches} token counts, ``context_len``, ``image_tokens``, parameter
    counts ``params_patch`` / ``params_prepatch`` / ``params_new``, ``new_names`` and
    ``new_table`` (rows: name, shape, params, init)."""
    patch_cfg = replace(cfg, use_dino_patches=True)
    with torch.device("meta"):  # structure and counts need no memory (a production model is 160M params)
        patch = NanoDiT(patch_cfg)
        pre = NanoDiT(replace(cfg, use_dino_patches=False))
    names = patch.new_parameter_names()
    params = dict(patch.named_parameters())
    init = {"dino_patch_proj.weight": "Xavier uniform", "dino_patch_proj.bias": "zeros",
            "null_dino_patches": "zeros (learned null)", "patch_pos": "N(0, 0.02)",
            "dino_patch_tie.weight": "zeros (tie adds 0 at start)", "dino_patch_tie.bias": "zeros"}
    n_new = sum(params[n].numel() for n in names)
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    spans = patch_cfg.context_spans(cfg.text_len)
    return {"context": {s: b - a for s, (a, b) in spans.items()},
            "context_len": patch_cfg.context_len, "image_tokens": tokens,
            "params_patch": patch.num_params(), "params_prepatch": pre.num_params(), "params_new": n_new,
            "new_names": names,
            "new_table": [{"preset cfg": f"D={cfg.hidden_size} Dd={cfg.dino_dim}", "name": n,
                           "shape": "x".join(map(str, params[n].shape)), "params": params[n].numel(),
                           "init": init.get(n, "")} for n in names]}


@torch.no_grad()
def cfg_modes(cfg: ModelConfig, text_scale: float = 2.0, dino_scale: float = 2.0, seed: int = 0) -> dict:
    """The four CFG modes on a perturbed tiny patch model: for each, which inputs it sees, whether
    the dropped inputs have no influence (changing them leaves the output unchanged), and the
    sampler's guidance coefficients per branch for both formulas. Returns ``table`` rows,
    ``coefficients`` rows and ``distinct`` (the four outputs differ pairwise)."""
    c = replace(cfg, use_dino_patches=True)
    model = make_check_model(c, seed=seed)
    inp = make_check_inputs(c, B=1, lengths=[max(1, c.text_len // 2)])
    modes = {"uncond": (True, True), "text": (False, True), "dino": (True, False), "full": (False, False)}
    outs, table = {}, []
    for name, (dt, dd) in modes.items():
        kw = dict(drop_text=torch.tensor([dt]), drop_dino=torch.tensor([dd]))
        v = model(**inp, **kw)
        changed = dict(inp)
        if dt:
            changed = with_changed_signal(changed, "text")
        if dd:
            changed = with_changed_signal(with_changed_signal(changed, "cls"), "patches")
        d = _maxdiff(model(**changed, **kw), v) if (dt or dd) else 0.0
        outs[name] = v
        uses_text, dino = BRANCHES[name]
        table.append({"mode": name, "text": "real" if uses_text else "null", "CLS": "null" if dino == "null" else "real",
                      "patches": "null" if dino == "null" else "real", "drop_text": dt, "drop_dino": dd,
                      "dropped input has no influence": d <= TOL})
    names = list(outs)
    distinct = all(_maxdiff(outs[a], outs[b]) > RESPONDS for i, a in enumerate(names) for b in names[i + 1:])
    coeff = []
    for formula in ("independent", "nested"):
        co = Guidance(formula, text_scale, dino_scale).guided_coefficients()
        coeff.append({"formula": formula, **{b: round(co.get(b, 0.0), 3) for b in names}})
    return {"table": table, "coefficients": coeff, "distinct": distinct}


@torch.no_grad()
def production_forward(device: str = "auto", seed: int = 0) -> dict:
    """One B=1 forward of the production preset (709-token context) on ``device``: output
    ``shape``, ``finite``, ``seconds`` (after one warm-up forward)."""
    dev = resolve_device(device)
    cfg = PRESETS["production"]
    torch.manual_seed(seed)
    model = NanoDiT(cfg).to(dev).eval()
    inp = {k: v.to(dev) for k, v in make_check_inputs(cfg, B=1, lengths=[60]).items()}
    inp["text_emb"], inp["text_mask"] = prepare_text(inp["text_emb"], inp["text_mask"])
    model(**inp)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    v = model(**inp)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"shape": list(v.shape), "finite": bool(torch.isfinite(v).all()), "seconds": time.perf_counter() - t0}
