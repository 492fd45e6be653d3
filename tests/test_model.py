"""NanoDiT contract tests (tiny configs on the CPU)."""
from dataclasses import replace

import pytest
import torch

from nbcore.attention import capture
from nbcore.checks import make_check_inputs, make_check_model, with_changed_signal
from nbcore.model import (PRESETS, ModelConfig, NanoDiT, attend, load_warm_start, prepare_text,
                          preset)

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
