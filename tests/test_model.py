"""NanoDiT contract tests (tiny configs on the CPU)."""
from dataclasses import replace

import pytest
import torch

from nbcore.attention import capture
from nbcore.checks import (CHECK_ARMS, arm_config, make_check_inputs, make_check_model, run_model_checks,
                           with_changed_signal)
from nbcore.model import (PRESETS, ModelConfig, NanoDiT, attend, load_warm_start, patch_cover_weights,
                          prepare_text, preset)

TINY = replace(PRESETS["tiny"], depth=2)


def make_model(cfg=TINY, seed=0, perturb=True):
    """Every parameter perturbed: zero-initialised layers would hide missing paths."""
    return make_check_model(cfg, seed=seed, perturb=perturb)


def make_inputs(cfg=TINY, B=2, H=None, W=None, lengths=None, seed=1):
    return make_check_inputs(cfg, B=B, H=H, W=W, lengths=lengths, seed=seed)


@pytest.fixture(params=[True, False], ids=["patches", "prepatch"])
def cfg(request):
    return replace(TINY, use_dino_patches=request.param)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("H,W", [(32, 32), (24, 40)], ids=["square", "wide"])
def test_forward_shapes(cfg, H, W):
    model = make_model(cfg)
    inp = make_inputs(cfg, B=2, H=H, W=W, lengths=[5, 32])
    v = model(**inp)
    assert v.shape == (2, cfg.in_channels, H, W)
    assert torch.isfinite(v).all()


def test_bad_latent_size_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model(**make_inputs(H=31))


@pytest.mark.slow
def test_production_preset_forward_b1():
    cfg = PRESETS["production"]
    assert cfg.context_len == 709
    torch.manual_seed(0)
    model = NanoDiT(cfg).eval()
    inp = make_inputs(cfg, B=1, lengths=[60])
    inp["text_emb"], inp["text_mask"] = prepare_text(inp["text_emb"], inp["text_mask"])
    with torch.no_grad():
        v = model(**inp)
    assert v.shape == (1, 16, 64, 64)
    assert torch.isfinite(v).all()


def test_presets_and_context_length():
    assert PRESETS["production"].context_len == 512 + 1 + 196
    assert replace(PRESETS["production"], use_dino_patches=False).context_len == 512
    assert PRESETS["tiny"].context_len == 32 + 1 + 64
    assert preset("tiny", depth=1).depth == 1
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="patch_pos_embed"):
        ModelConfig(patch_pos_embed="rope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_output_has_no_rank_bottleneck(name):
    """Each token's velocity (p*p*C values) comes from the hidden state through one linear: more
    outputs than hidden dims caps the prediction's rank (tiny with patch 4, 192 from 96, stalled at a
    loss of 0.74). The shipped presets keep p*p*C <= hidden."""
    cfg = PRESETS[name]
    out = cfg.patch_size ** 2 * cfg.in_channels
    assert out <= cfg.hidden_size, (name, out, cfg.hidden_size)


def test_initial_output_is_zero():
    """adaLN-zero style init: the unperturbed model predicts v = 0 (documented in initialize_weights)."""
    model = make_model(perturb=False)
    assert torch.equal(model(**make_inputs()), torch.zeros(2, 12, 32, 32))


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("pos", ["none", "learned", "sincos"])
def test_gradient_reaches_every_parameter(cfg, pos):
    cfg = replace(cfg, patch_pos_embed=pos)
    model = make_model(cfg).train()
    inp = make_inputs(cfg, B=4, lengths=[3, 32, 10, 7])
    # one sample of each CFG mode, so the nulls are used too
    drop_text = torch.tensor([False, True, False, True])
    drop_dino = torch.tensor([False, False, True, True])
    model(**inp, drop_text=drop_text, drop_dino=drop_dino).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    if cfg.use_dino_patches:
        assert model.dino_patch_proj.weight.grad.abs().sum() > 0
    for block in model.blocks:
        assert block.cross_attn.kv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- attention

def test_attend_fused_equals_explicit():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    k, v = torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    mask = torch.rand(2, 11, generator=g) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        fused = attend(q, k, v, m)
        explicit, w = attend(q, k, v, m, return_weights=True)
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
        # against an independent reference
        s = torch.einsum("bhnd,bhmd->bhnm", q, k) / 8 ** 0.5
        if m is not None:
            s = s + torch.where(m, 0.0, -1e9)[:, None, None]
        ref = torch.einsum("bhnm,bhmd->bhnd", s.softmax(-1), v)
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7))


def test_model_fused_equals_explicit(cfg):
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[4, 20])
    fused = model(**inp)
    with capture(model):
        explicit = model(**inp)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_padded_text_has_no_influence(cfg):
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[5, 12])
    v = model(**inp)
    noisy = dict(inp, text_emb=inp["text_emb"].clone())
    noisy["text_emb"][~inp["text_mask"]] = 1e3 * torch.randn(int((~inp["text_mask"]).sum()), cfg.text_dim)
    torch.testing.assert_close(model(**noisy), v, atol=1e-5, rtol=1e-5)


def test_trimmed_equals_padded(cfg):
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[5, 11])
    emb, mask = prepare_text(inp["text_emb"], inp["text_mask"])
    assert emb.shape[1] == 16 and mask.shape == (2, 16)           # longest 11 -> multiple of 8
    torch.testing.assert_close(model(**dict(inp, text_emb=emb, text_mask=mask)), model(**inp),
                               atol=1e-5, rtol=1e-5)


def test_no_mask_when_nothing_is_padded():
    inp = make_inputs(lengths=[16, 16])
    emb, mask = prepare_text(inp["text_emb"], inp["text_mask"])
    assert emb.shape[1] == 16 and mask is None
    model = make_model()
    torch.testing.assert_close(model(**dict(inp, text_emb=emb, text_mask=mask)), model(**inp),
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CFG dropout

@pytest.mark.parametrize("use_patches,what", [(True, "text"), (True, "cls"), (True, "patches"),
                                               (False, "text"), (False, "cls")])
def test_dropped_signal_has_no_influence(use_patches, what):
    cfg = replace(TINY, use_dino_patches=use_patches)
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[7, 20])
    drop = torch.tensor([True, False])
    kw = {"drop_text": drop} if what == "text" else {"drop_dino": drop}
    before = model(**inp, **kw)
    after = model(**with_changed_signal(inp, what), **kw)
    torch.testing.assert_close(after[0], before[0], atol=1e-5, rtol=1e-5)    # dropped: unchanged
    assert (after[1] - before[1]).abs().max() > 1e-3                          # kept: responds


def test_kept_signals_respond_without_dropping(cfg):
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[7, 20])
    v = model(**inp)
    whats = ["text", "cls"] + (["patches"] if cfg.use_dino_patches else [])
    for what in whats:
        assert (model(**with_changed_signal(inp, what)) - v).abs().max() > 1e-3, what


# ----------------------------------------------------------------------------- positions

def test_patch_positions_make_patches_ordered():
    """Without a positional embedding the patches are a set: permuting them changes nothing.
    With learned or sin-cos positions, the order matters."""
    for pos, invariant in [("none", True), ("learned", False), ("sincos", False)]:
        cfg = replace(TINY, patch_pos_embed=pos)
        model = make_model(cfg)
        inp = make_inputs(cfg)
        perm = torch.randperm(cfg.num_patches, generator=torch.Generator().manual_seed(0))
        shuffled = dict(inp, dino_patches=inp["dino_patches"][:, perm])
        diff = (model(**shuffled) - model(**inp)).abs().max()
        assert (diff < 1e-5) == invariant, (pos, float(diff))


# ----------------------------------------------------------------------------- warm start

def test_warm_start_from_prepatch_reports_exactly_the_new_parameters():
    for pos in ("none", "learned"):
        base = make_model(replace(TINY, use_dino_patches=False), seed=3)
        model = NanoDiT(replace(TINY, patch_pos_embed=pos))
        report = load_warm_start(model, base.state_dict())
        assert report["new"] == model.new_parameter_names()
        expected_new = {"dino_patch_proj.weight", "dino_patch_proj.bias", "null_dino_patches"}
        assert set(report["new"]) == expected_new | ({"patch_pos"} if pos == "learned" else set())
        assert report["unexpected"] == [] and report["mismatched"] == []
        assert set(report["loaded"]) == set(base.state_dict())
        own = model.state_dict()
        for name, value in base.state_dict().items():
            assert torch.equal(own[name], value), name


def test_warm_start_reports_unexpected_and_mismatched():
    model = NanoDiT(TINY)
    sd = {k: v.clone() for k, v in make_model(seed=4).state_dict().items()}
    sd["extra.weight"] = torch.zeros(3)
    sd["text_proj.weight"] = torch.zeros(5, 5)
    before = model.text_proj.weight.clone()
    report = load_warm_start(model, sd)
    assert report["unexpected"] == ["extra.weight"]
    assert report["mismatched"] == ["text_proj.weight"]
    assert torch.equal(model.text_proj.weight, before)


def test_warm_start_through_checkpoint_file(tmp_path):
    from nbcore.utils import atomic_save, load_checkpoint
    base = make_model(replace(TINY, use_dino_patches=False))
    path = atomic_save({"config": base.cfg.to_dict(), "model": base.state_dict()}, tmp_path / "base.pt")
    ckpt = load_checkpoint(path)
    model = NanoDiT(ModelConfig(**dict(ckpt["config"], use_dino_patches=True)))
    assert load_warm_start(model, ckpt["model"])["new"] == model.new_parameter_names()


# ----------------------------------------------------------------------------- routing capture

def test_routing_capture(cfg):
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[5, 32])
    drop_text = torch.tensor([False, True])
    v_off = model(**inp, drop_text=drop_text)
    with capture(model) as rec:
        v_on = model(**inp, drop_text=drop_text)
        model(**inp, drop_text=drop_text)
    assert model._recorder is None
    torch.testing.assert_close(v_on, v_off, atol=1e-5, rtol=1e-5)
    N = (cfg.input_size // cfg.patch_size) ** 2
    assert rec.mass.shape == (2, cfg.depth, 2, cfg.num_heads, N, 3)
    torch.testing.assert_close(rec.mass.sum(-1), torch.ones(2, cfg.depth, 2, cfg.num_heads, N))
    if cfg.use_dino_patches:
        assert rec.patch_maps.shape == (2, cfg.depth, 2, N, cfg.num_patches)
        # the patch map holds exactly the patch mass (head-averaged)
        torch.testing.assert_close(rec.patch_maps.sum(-1), rec.mass[..., 2].mean(3))
        assert (rec.mass[..., 1:] > 0).all()
    else:
        torch.testing.assert_close(rec.mass[..., 0], torch.ones_like(rec.mass[..., 0]))
        assert (rec.mass[..., 1:] == 0).all()
    assert rec.t.shape == (2, 2)
    s = rec.summary()
    assert abs(sum(s["overall"].values()) - 1) < 1e-5


def test_padding_gets_zero_attention():
    model = make_model()
    inp = make_inputs(lengths=[5, 32])
    weights = []
    with capture(model) as rec:
        rec_hook = rec.hook

        def spy(i):
            inner = rec_hook(i)

            def record(w):
                weights.append(w)
                inner(w)
            return record
        rec.hook = spy
        model(**inp)
    w = weights[0]                                                                      # (B, nh, N, M)
    assert w[0, ..., 5:32].abs().max() == 0          # sample 0's padding (tokens 5..31) gets nothing
    assert w[0, ..., :5].sum() > 0


# ----------------------------------------------------------------------------- arms (the experiment's model variants)
# CHECK_ARMS: context only (docs/DESIGN.md), CLS first, tie + context, tie only (CLS kept), tie only
# without CLS (the pre-patch model plus the tie), and the pre-patch model.

ARMS = sorted(CHECK_ARMS)
PATCH_ARMS = [a for a in ARMS if a != "prepatch"]


@pytest.fixture(params=ARMS)
def arm(request):
    return request.param


@pytest.mark.parametrize("base", [TINY, preset("micro", patch_tie=True, patch_context=False, cls_position="start")],
                         ids=["tiny", "micro-tie-only-cls-start"])
def test_every_model_check_passes_on_every_arm(base):
    """nbcore.checks (notebook 02's table) on every arm: no failed row, and the rows the arms add;
    the arms are the same whatever arm the base configuration is (notebook 02 passes the run's)."""
    rows = run_model_checks(base)
    failed = [(r["check"], r["variant"], r["detail"]) for r in rows if not r["passed"]]
    assert failed == []
    have = {(r["check"], r["variant"]) for r in rows}
    for a in ARMS:
        assert ("dropped cls has no influence", a) in have and ("gradient reaches every parameter", a) in have
    for a in PATCH_ARMS:
        assert ("dropped patches has no influence", a) in have and ("warm start from pre-patch", a) in have
    for a in ("tie+context", "tie only", "tie only, no CLS"):
        assert ("tied patch reaches only its tokens", a) in have
    assert ("warm start = pre-patch function at step 0", "tie only, no CLS") in have
    assert ("adding the tie keeps the context arm's function", "tie+context") in have


def test_arm_config_fields_and_context():
    """context_order / context_spans / context_len by hand for every arm (L = 32, P = 64)."""
    want = {"patches": (("text", "cls", "patches"), {"text": (0, 32), "cls": (32, 33), "patches": (33, 97)}),
            "cls start": (("cls", "text", "patches"), {"text": (1, 33), "cls": (0, 1), "patches": (33, 97)}),
            "tie+context": (("text", "cls", "patches"), {"text": (0, 32), "cls": (32, 33), "patches": (33, 97)}),
            "tie only": (("text", "cls"), {"text": (0, 32), "cls": (32, 33), "patches": (0, 0)}),
            "tie only, no CLS": (("text",), {"text": (0, 32), "cls": (0, 0), "patches": (0, 0)}),
            "prepatch": (("text",), {"text": (0, 32), "cls": (0, 0), "patches": (0, 0)})}
    lens = {"patches": 97, "cls start": 97, "tie+context": 97, "tie only": 33, "tie only, no CLS": 32, "prepatch": 32}
    for a, (order, spans) in want.items():
        c = arm_config(TINY, a)
        assert c.context_order == order, a
        assert c.context_spans(32) == spans, a
        assert c.context_len == lens[a], a
    assert replace(PRESETS["production"], patch_tie=True, patch_context=False).context_len == 513
    assert replace(PRESETS["production"], cls_position="start").context_len == 709
    # old checkpoints' config dicts (no new fields) load as the context arm with CLS in the middle
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("patch_tie", "patch_context", "cls_position")}
    assert ModelConfig(**old).context_order == ("text", "cls", "patches") and not ModelConfig(**old).patch_tie


def test_arm_config_validation():
    with pytest.raises(ValueError, match="patch_context or patch_tie"):
        replace(TINY, patch_context=False)
    with pytest.raises(ValueError, match="positions context patches"):
        replace(TINY, patch_tie=True, patch_context=False, patch_pos_embed="sincos")
    with pytest.raises(ValueError, match="cls_position"):
        replace(TINY, cls_position="end")
    # without patches the DINO-path fields are ignored: any arm's baseline is replace(..., use_dino_patches=False)
    base = replace(arm_config(TINY, "tie only, no CLS"), use_dino_patches=False)
    assert base.context_order == ("text",)
    assert NanoDiT(base).state_dict().keys() == NanoDiT(replace(TINY, use_dino_patches=False)).state_dict().keys()


def test_new_parameter_names_per_arm():
    ctx, tie = {"dino_patch_proj.bias", "dino_patch_proj.weight"}, {"dino_patch_tie.bias", "dino_patch_tie.weight"}
    want = {"patches": ctx, "cls start": ctx, "tie+context": ctx | tie, "tie only": tie,
            "tie only, no CLS": tie, "prepatch": None}
    for a, names in want.items():
        model = NanoDiT(arm_config(TINY, a))
        expect = [] if names is None else sorted(names | {"null_dino_patches"})
        assert model.new_parameter_names() == expect, a
        assert set(expect) <= dict(model.named_parameters()).keys()
        pre = set(NanoDiT(replace(TINY, use_dino_patches=False)).state_dict())
        assert set(model.state_dict()) - pre == set(expect), a


def test_parameter_order_of_the_context_arm_is_unchanged():
    """Optimiser state is saved by parameter index: the context arm keeps the order it had before the
    tie existed (resuming older runs), and a tie arm has the tie right after the patch projection."""
    names = [n for n, _ in NanoDiT(replace(TINY, patch_pos_embed="learned")).named_parameters()]
    assert names[:4] == ["null_text", "null_dino", "null_dino_patches", "patch_pos"]
    assert names[12:17] == ["dino_proj.weight", "dino_proj.bias", "dino_patch_proj.weight", "dino_patch_proj.bias",
                            "blocks.0.attn.qkv.weight"]
    tied = [n for n, _ in NanoDiT(replace(TINY, patch_pos_embed="learned", patch_tie=True)).named_parameters()]
    assert tied == names[:16] + ["dino_patch_tie.weight", "dino_patch_tie.bias"] + names[16:]


def test_new_param_lr_scale_covers_the_tie():
    from nbcore.train import TrainConfig, _param_groups
    model = NanoDiT(arm_config(TINY, "tie+context"))
    groups = _param_groups(model, TrainConfig(new_param_lr_scale=3.0), base_lr=1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = 3e-3 if name in model.new_parameter_names() else 1e-3
        assert lr_of[id(p)] == pytest.approx(want), name
    assert lr_of[id(model.dino_patch_tie.weight)] == pytest.approx(3e-3)


@pytest.mark.parametrize("H,W", [(32, 32), (24, 40)], ids=["square", "wide"])
def test_forward_shapes_every_arm(arm, H, W):
    """wide: 12x20 tokens over an 8x8 patch grid, the tie's area-resampling path."""
    cfg = arm_config(TINY, arm)
    v = make_model(cfg)(**make_inputs(cfg, H=H, W=W, lengths=[5, 32]))
    assert v.shape == (2, 12, H, W) and torch.isfinite(v).all()


def test_micro_preset_forward_every_arm(arm):
    cfg = arm_config(preset("micro"), arm)
    assert (cfg.input_size, cfg.patch_size, cfg.dino_grid, cfg.hidden_size) == (16, 2, 4, 96)
    assert cfg.patch_size ** 2 * cfg.in_channels == 48
    v = make_model(cfg)(**make_inputs(cfg, lengths=[5, 32]))
    assert v.shape == (2, 12, 16, 16) and torch.isfinite(v).all()
    assert PRESETS["micro"].context_len == 32 + 1 + 16


def test_fused_equals_explicit_every_arm(arm):
    cfg = arm_config(TINY, arm)
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[4, 20])
    fused = model(**inp, drop_text=torch.tensor([False, True]))
    with capture(model):
        explicit = model(**inp, drop_text=torch.tensor([False, True]))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arm,what", [(a, w) for a in ARMS for w in ("text", "cls", "patches")
                                      if not (a == "prepatch" and w == "patches")])
def test_dropped_signal_has_no_influence_every_arm(arm, what):
    """Dropping DINO swaps the patches for null_dino_patches before both paths (context and tie)."""
    cfg = arm_config(TINY, arm)
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[7, 20])
    drop = torch.tensor([True, False])
    kw = {"drop_text": drop} if what == "text" else {"drop_dino": drop}
    before, after = model(**inp, **kw), model(**with_changed_signal(inp, what), **kw)
    assert torch.equal(after[0], before[0])                                   # dropped: bit-identical
    assert (after[1] - before[1]).abs().max() > 1e-3                          # kept: responds


def test_gradient_reaches_every_parameter_every_arm(arm):
    cfg = arm_config(TINY, arm)
    model = make_model(cfg).train()
    inp = make_inputs(cfg, B=4, lengths=[3, 32, 10, 7])
    model(**inp, drop_text=torch.tensor([False, True, False, True]),
          drop_dino=torch.tensor([False, False, True, True])).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    if cfg.use_dino_patches and cfg.patch_tie:
        assert model.dino_patch_tie.weight.grad.abs().sum() > 0 and model.dino_patch_tie.bias.grad.abs().sum() > 0
    assert hasattr(model, "dino_patch_proj") == (cfg.use_dino_patches and cfg.patch_context)


def test_tie_starts_at_zero_and_gets_a_gradient_from_a_trained_model():
    """Zero-initialised dino_patch_tie adds nothing, yet learns: after a warm start from a (perturbed)
    pre-patch model its gradient is non-zero, so training moves it."""
    cfg = arm_config(TINY, "tie only, no CLS")
    model = NanoDiT(cfg)
    assert model.dino_patch_tie.weight.abs().max() == 0 and model.dino_patch_tie.bias.abs().max() == 0
    load_warm_start(model, make_model(replace(TINY, use_dino_patches=False), seed=3).state_dict())
    model(**make_inputs(cfg, lengths=[5, 32])).square().mean().backward()
    assert model.dino_patch_tie.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- tie resampling

def _cover_by_supersampling(g, h, w, k=16):
    """Independent reference of patch_cover_weights: k x k sample points per token cell, each
    assigned to the patch it falls in; the share of points per patch."""
    ys = (torch.arange(h * k, dtype=torch.float64) + 0.5) / (h * k)                    # (h k,)
    xs = (torch.arange(w * k, dtype=torch.float64) + 0.5) / (w * k)
    pr, pc = (ys * g).long(), (xs * g).long()
    out = torch.zeros(h, w, g * g, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            r = pr[i * k:(i + 1) * k][:, None].expand(k, k)
            c = pc[j * k:(j + 1) * k][None].expand(k, k)
            out[i, j] = torch.bincount((r * g + c).flatten(), minlength=g * g).double() / (k * k)
    return out.view(h * w, g * g)


@pytest.mark.parametrize("g,h,w", [(8, 16, 16), (4, 8, 8), (8, 12, 20), (14, 32, 32), (8, 4, 4), (3, 4, 5)])
def test_patch_cover_weights(g, h, w):
    m = patch_cover_weights(g, h, w)
    assert m.shape == (h * w, g * g)
    torch.testing.assert_close(m.sum(1), torch.ones(h * w))
    # exact for cell edges on the 1/16-subdivision (all but g=14 / g=3); else within 1/16 per axis
    tol = 1e-6 if all((16 * n) % g == 0 for n in (h, w)) else 2 / 16
    torch.testing.assert_close(m.double(), _cover_by_supersampling(g, h, w), atol=tol, rtol=0)
    if h % g == 0 and w % g == 0:    # one-hot: the patch the token lies in
        r = torch.arange(h) * g // h
        c = torch.arange(w) * g // w
        want = (r[:, None] * g + c[None]).flatten()
        assert torch.equal(m.argmax(1), want) and torch.equal(m.max(1).values, torch.ones(h * w))


@pytest.mark.parametrize("H,W", [(32, 32), (24, 40)], ids=["repeat", "area"])
def test_tie_adds_each_patch_to_the_tokens_it_covers(H, W):
    """model._tie against a hand loop: token (i, j) gets dino_patch_tie of the patches covering it,
    weighted by covered area (one patch, weight 1, when g divides the token grid)."""
    cfg = arm_config(TINY, "tie only")
    model = make_model(cfg)
    h, w, g = H // 2, W // 2, cfg.dino_grid
    patches = make_inputs(cfg)["dino_patches"]                                         # (B, P, Dd)
    with torch.no_grad():
        got = model._tie(patches, h, w)                                                # (B, N, D)
        proj = model.dino_patch_tie(patches)                                           # (B, P, D)
    cover = _cover_by_supersampling(g, h, w, k=8).float()                              # exact: 8 h, 8 w divisible by g=8
    want = torch.einsum("np,bpd->bnd", cover, proj)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if H == 32:
        i, j = 5, 11                                                   # token (5, 11) lies in patch (2, 5)
        torch.testing.assert_close(got[:, i * w + j], proj[:, 2 * g + 5], atol=0, rtol=0)


# ----------------------------------------------------------------------------- warm start of the arms

def test_tie_only_warm_start_is_exactly_the_prepatch_function():
    """Tie zero-initialised + no new context keys: at step 0 the warm-started model IS the pre-patch
    model, for any patches (real or dropped), padded captions and dropped text."""
    base = make_model(replace(TINY, use_dino_patches=False), seed=3)
    model = NanoDiT(arm_config(TINY, "tie only, no CLS")).eval()
    report = load_warm_start(model, base.state_dict())
    assert report["new"] == ["dino_patch_tie.bias", "dino_patch_tie.weight", "null_dino_patches"]
    assert report["unexpected"] == [] and report["mismatched"] == []
    for seed in (1, 2):
        inp = make_inputs(model.cfg, B=3, lengths=[3, 32, 9], seed=seed)
        kw = dict(drop_text=torch.tensor([False, True, False]), drop_dino=torch.tensor([False, False, True]))
        with torch.no_grad():
            assert torch.equal(model(**inp, **kw), base(**inp, **kw))


def test_tie_only_with_cls_kept_changes_the_function_at_step_0():
    """The documented cost of keeping CLS in a tie-only context: one new key shares the softmax."""
    base = make_model(replace(TINY, use_dino_patches=False), seed=3)
    model = NanoDiT(arm_config(TINY, "tie only")).eval()
    load_warm_start(model, base.state_dict())
    inp = make_inputs(model.cfg, lengths=[3, 32])
    with torch.no_grad():
        assert (model(**inp) - base(**inp)).abs().max() > 1e-4


def test_cls_position_is_a_permutation_of_the_context_keys():
    """CLS at the start or in the middle of the context, answered by construction:
    text and CLS keys carry no position, and attention over keys is a softmax-weighted sum, so
    moving CLS permutes the keys and leaves the output unchanged (to float summation order)."""
    for base in (TINY, replace(TINY, patch_pos_embed="sincos")):
        middle = make_model(base, seed=7)
        start = NanoDiT(replace(base, cls_position="start")).eval()
        start.load_state_dict(middle.state_dict())
        inp = make_inputs(base, lengths=[3, 32])
        other = make_model(base, seed=8)                                  # a different model is not
        with torch.no_grad():
            torch.testing.assert_close(start(**inp), middle(**inp), atol=1e-5, rtol=1e-5)
            assert (start(**inp) - other(**inp)).abs().max() > 1e-3


def test_adding_the_tie_to_a_context_arm_keeps_its_function():
    for cls_position in ("middle", "start"):
        ctx = make_model(replace(TINY, cls_position=cls_position), seed=5)
        model = NanoDiT(replace(ctx.cfg, patch_tie=True)).eval()
        assert load_warm_start(model, ctx.state_dict())["new"] == ["dino_patch_tie.bias", "dino_patch_tie.weight"]
        inp = make_inputs(model.cfg, lengths=[3, 32])
        with torch.no_grad():
            assert torch.equal(model(**inp), ctx(**inp))


# ----------------------------------------------------------------------------- moved patches

def test_tied_patches_are_local():
    """Tie only, no blocks (depth 0): each output token depends on its own input token only, so
    swapping two patches changes exactly the tokens they cover (2x2 latent tokens -> 4x4 latent
    pixels each) and leaves every other output value bit-identical."""
    cfg = replace(arm_config(TINY, "tie only"), depth=0)
    model = make_model(cfg)
    inp = make_inputs(cfg)
    g = cfg.dino_grid
    a, b = 1 * g + 2, 6 * g + 5                                    # patches (1, 2) and (6, 5)
    swapped = inp["dino_patches"].clone()
    swapped[:, [a, b]] = swapped[:, [b, a]]
    with torch.no_grad():
        change = (model(**dict(inp, dino_patches=swapped)) - model(**inp)).abs().amax(dim=(0, 1))  # (H, W)
    covered = torch.zeros(32, 32, dtype=torch.bool)
    covered[4:8, 8:12] = True                                      # patch (1, 2): latent rows 4..7, cols 8..11
    covered[24:28, 20:24] = True                                   # patch (6, 5)
    assert change[~covered].max() == 0
    assert change.view(8, 4, 8, 4).amax(dim=(1, 3))[[1, 6], [2, 5]].min() > 1e-3
    assert (change.view(8, 4, 8, 4).amax(dim=(1, 3)) > 0).sum() == 2


@pytest.mark.parametrize("arm_name,invariant", [("patches", True), ("cls start", True),
                                                ("tie+context", False), ("tie only", False)])
def test_permuted_patches(arm_name, invariant):
    """Context patches without positions are a set (permutation: same output, up to float
    summation order); tied patches carry their place (permutation: the output changes)."""
    cfg = arm_config(TINY, arm_name)
    assert cfg.patch_pos_embed == "none"
    model = make_model(cfg)
    inp = make_inputs(cfg, lengths=[6, 32])
    perm = torch.randperm(cfg.num_patches, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(**dict(inp, dino_patches=inp["dino_patches"][:, perm])) - model(**inp)).abs().max()
    if invariant:
        assert diff < 1e-5
    else:
        assert diff > 1e-2


# ----------------------------------------------------------------------------- routing by arm

@pytest.mark.parametrize("arm_name", ["patches", "cls start", "tie+context", "tie only", "tie only, no CLS", "prepatch"])
def test_routing_masses_against_a_hand_computed_reference(arm_name):
    """Per arm, recompute each block's cross-attention by hand from the block's inputs (q from the
    image tokens, k from a context whose layout is written out here, masked softmax) and compare
    the recorder's masses on text / CLS / patches and its patch maps."""
    cfg = replace(arm_config(TINY, arm_name), depth=2)
    model = make_model(cfg)
    L, P, nh = cfg.text_len, cfg.num_patches, cfg.num_heads
    inp = make_inputs(cfg, lengths=[5, 32])
    # the context layout, by hand
    idx = {"patches": dict(text=range(0, L), cls=[L], patches=range(L + 1, L + 1 + P)),
           "cls start": dict(text=range(1, L + 1), cls=[0], patches=range(L + 1, L + 1 + P)),
           "tie+context": dict(text=range(0, L), cls=[L], patches=range(L + 1, L + 1 + P)),
           "tie only": dict(text=range(0, L), cls=[L], patches=[]),
           "tie only, no CLS": dict(text=range(0, L), cls=[], patches=[]),
           "prepatch": dict(text=range(0, L), cls=[], patches=[])}[arm_name]
    seen = []
    hooks = [b.cross_attn.register_forward_hook(lambda m, args, out: seen.append((m, args[0], args[1], args[2])))
             for b in model.blocks]
    with torch.no_grad(), capture(model) as rec:
        model(**inp)
    for h in hooks:
        h.remove()
    ref_mass, ref_maps = [], []
    for m, x, ctx, key_mask in seen:
        B, M, D = ctx.shape
        assert M == sum(len(v) for v in idx.values())
        with torch.no_grad():   # the context holds what the layout says, where it says
            torch.testing.assert_close(ctx[:, list(idx["text"])], model.text_proj(inp["text_emb"]))
            if idx["cls"]:
                torch.testing.assert_close(ctx[:, idx["cls"][0]], model.dino_proj(inp["dino_emb"]))
            if idx["patches"]:
                torch.testing.assert_close(ctx[:, list(idx["patches"])], model.dino_patch_proj(inp["dino_patches"]))
            valid = torch.ones(B, M, dtype=torch.bool)
            valid[:, list(idx["text"])] = inp["text_mask"]
            q = m.q(x).view(B, -1, nh, D // nh).permute(0, 2, 1, 3)                     # (B, nh, N, hd)
            k = m.kv(ctx)[..., :D].view(B, M, nh, D // nh).permute(0, 2, 1, 3)         # (B, nh, M, hd)
            s = torch.einsum("bhnd,bhmd->bhnm", q, k) / (D // nh) ** 0.5
            wts = torch.where(valid[:, None, None], s, torch.tensor(-1e9)).softmax(-1)  # (B, nh, N, M)
        ref_mass.append(torch.stack([wts[..., list(idx[s])].sum(-1) for s in ("text", "cls", "patches")], -1))
        if idx["patches"]:
            ref_maps.append(wts[..., list(idx["patches"])].mean(1))
    torch.testing.assert_close(rec.mass[0], torch.stack(ref_mass), atol=1e-5, rtol=1e-4)
    if idx["patches"]:
        torch.testing.assert_close(rec.patch_maps[0], torch.stack(ref_maps), atol=1e-5, rtol=1e-4)
    else:
        assert rec.patch_maps.numel() == 0 and (rec.mass[..., 2] == 0).all()
    if not idx["cls"]:
        assert (rec.mass[..., 1] == 0).all()
    else:
        assert (rec.mass[..., 1] > 0).all()
