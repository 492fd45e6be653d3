"""Sampler: guidance formulas, degenerate scales, batched = separate branches, determinism, EMA loading."""
import pytest
import torch

from nbcore.model import NanoDiT, preset
from nbcore.sample import (BRANCHES, Guidance, _prepare, branch_velocities, load_model, sample_batch,
                           load_model_with_info, sample)
from nbcore.utils import atomic_save

B = 3


def _model(seed=0, **over):
    """Tiny NanoDiT with every weight random: the zero-initialised output layers of a fresh model
    predict v = 0 for every branch, which would make every equality below trivially true."""
    torch.manual_seed(seed)
    m = NanoDiT(preset("tiny", depth=1, hidden_size=32, num_heads=2, **over))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.15)
    return m.eval()


def _cond(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = 16
    lengths = torch.tensor([16, 5, 9])                      # different caption lengths -> real padding
    mask = torch.arange(L)[None] < lengths[:, None]
    text = torch.randn(B, L, cfg.text_dim, generator=g) * mask[..., None]
    return dict(dino_emb=torch.randn(B, cfg.dino_dim, generator=g),
                dino_patches=torch.randn(B, cfg.num_patches, cfg.dino_dim, generator=g),
                text_emb=text, text_mask=mask)


def _forward(model, c, drop_text, drop_dino, x, t, patches=None):
    """One direct model call for a whole batch with explicit drop flags (the reference)."""
    n = x.shape[0]
    return model(x, t, c["dino_emb"], c["dino_patches"] if patches is None else patches, c["text_emb"], c["text_mask"],
                 drop_text=torch.full((n,), drop_text), drop_dino=torch.full((n,), drop_dino))


def _euler(vfn, noise, steps):
    """Reference Euler integrator from t = 1 to 0 for a velocity function vfn(x, t (B,), t_float)."""
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for i in range(steps):
        t = ts[i]
        x = x + (ts[i + 1] - t) * vfn(x, torch.full((x.shape[0],), t), t)
    return x


def _close(a, b, tol=1e-5):
    """Equal up to float rounding, relative to the tensors' scale (values reach ~10 with random weights)."""
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def _noise(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)


# --------------------------------------------------------------------------- formulas

@pytest.mark.parametrize("formula", ["independent", "nested"])
@pytest.mark.parametrize("patch_scale", [None, 0.5])
def test_coefficients_match_written_formula(formula, patch_scale):
    """The expanded coefficients reproduce the docstring formula on random branch values."""
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(4, generator=g) for k in BRANCHES}
    st, sd = 2.5, 1.7
    sp = sd if patch_scale is None else patch_scale
    if formula == "independent":
        ref = v["uncond"] + st * (v["text"] - v["uncond"]) + sd * (v["cls"] - v["uncond"]) + sp * (v["dino"] - v["cls"])
    else:
        ref = v["uncond"] + sd * (v["cls"] - v["uncond"]) + sp * (v["dino"] - v["cls"]) + st * (v["full"] - v["dino"])
    coeffs = Guidance(formula, st, sd, patch_scale).coefficients(0.5)
    if patch_scale is None:
        assert "cls" not in coeffs                        # no patch scale -> no extra branch
        v_no_patch = (v["uncond"] + st * (v["text"] - v["uncond"]) + sd * (v["dino"] - v["uncond"])
                      if formula == "independent" else
                      v["uncond"] + sd * (v["dino"] - v["uncond"]) + st * (v["full"] - v["dino"]))
        assert _close(ref, v_no_patch)
    got = sum(c * v[b] for b, c in coeffs.items())
    assert _close(got, ref)


def test_coefficients_fold_missing_conditions_and_interval():
    g = Guidance("nested", text_scale=3.0, dino_scale=2.0, interval=(0.2, 0.8))
    assert g.coefficients(0.5) == {"uncond": -1.0, "dino": -1.0, "full": 3.0}
    assert g.coefficients(0.5, has_dino=False) == {"uncond": -2.0, "text": 3.0}    # plain text CFG
    assert g.coefficients(0.5, has_text=False) == {"uncond": -1.0, "dino": 2.0}    # plain DINO CFG
    assert g.coefficients(0.9) == {"full": 1.0}                                     # outside the interval
    assert g.coefficients(0.1, has_text=False) == {"dino": 1.0}
    assert Guidance("independent", 0.0, 1.0).coefficients(0.5) == {"dino": 1.0}
    assert Guidance.off().coefficients(0.5) == {"full": 1.0}
    with pytest.raises(ValueError, match="formula"):
        Guidance("bogus")
    with pytest.raises(ValueError, match="interval"):
        Guidance(interval=(0.7, 0.3))


# --------------------------------------------------------------------------- branches

@pytest.mark.parametrize("branches", [["uncond", "text", "dino", "full"], ["uncond", "text", "dino", "full", "cls"]])
def test_batched_branches_equal_separate_forwards(branches):
    """One forward of K*B rows == K direct model calls with the corresponding drop flags (padded text)."""
    model = _model()
    cfg = model.cfg
    c = _cond(cfg)
    x, t = _noise(cfg), torch.tensor([0.9, 0.5, 0.1])
    cond, _ = _prepare(model, None, c["dino_emb"], c["dino_patches"], c["text_emb"], c["text_mask"], torch.device("cpu"))
    got = branch_velocities(model, x, t, cond, branches, batched=True)
    null_p = model.null_dino_patches.detach().expand(B, -1, -1)
    with torch.no_grad():
        ref = {"uncond": _forward(model, c, True, True, x, t), "text": _forward(model, c, False, True, x, t),
               "dino": _forward(model, c, True, False, x, t), "full": _forward(model, c, False, False, x, t),
               "cls": _forward(model, c, True, False, x, t, patches=null_p)}
    for name in branches:
        assert _close(got[name], ref[name]), name
    assert not torch.allclose(ref["full"], ref["dino"], atol=1e-3)      # the branches really differ
    assert not torch.allclose(ref["cls"], ref["dino"], atol=1e-3)
    seq = branch_velocities(model, x, t, cond, branches, batched=False)
    for name in branches:
        assert _close(seq[name], ref[name]), name


def test_cls_branch_ignores_real_patches_but_not_cls():
    model = _model()
    c = _cond(model.cfg)
    x, t = _noise(model.cfg), torch.full((B,), 0.5)
    cond, _ = _prepare(model, None, c["dino_emb"], c["dino_patches"], c["text_emb"], c["text_mask"], torch.device("cpu"))
    v1 = branch_velocities(model, x, t, cond, ["cls"])["cls"]
    cond.dino_patches = cond.dino_patches + 5.0
    assert _close(branch_velocities(model, x, t, cond, ["cls"])["cls"], v1, 1e-6)
    cond.dino_emb = cond.dino_emb + 1.0
    assert not torch.allclose(branch_velocities(model, x, t, cond, ["cls"])["cls"], v1, atol=1e-3)


# --------------------------------------------------------------------------- sampler

STEPS = 4


@pytest.mark.parametrize("guidance,flags", [
    (Guidance("independent", text_scale=0.0, dino_scale=1.0), (True, False)),   # DINO-only branch
    (Guidance("independent", text_scale=1.0, dino_scale=0.0), (False, True)),   # text-only branch
    (Guidance("nested", text_scale=1.0, dino_scale=1.0), (False, False)),       # full branch
    (Guidance("nested", text_scale=0.0, dino_scale=0.0), (True, True)),         # unconditional
])
def test_degenerate_scales_equal_single_branch(guidance, flags):
    model = _model()
    c, noise = _cond(model.cfg), _noise(model.cfg)
    got = sample(model, **c, guidance=guidance, steps=STEPS, noise=noise)
    with torch.no_grad():
        ref = _euler(lambda x, t, _: _forward(model, c, *flags, x, t), noise, STEPS)
    assert _close(got, ref)


def test_full_guidance_matches_reference_and_batched_equals_sequential():
    model = _model()
    c, noise = _cond(model.cfg), _noise(model.cfg)
    st, sd = 2.0, 1.5
    g = Guidance("nested", text_scale=st, dino_scale=sd, interval=(0.3, 0.8))

    def vfn(x, t, tf):
        full = _forward(model, c, False, False, x, t)
        if not (0.3 <= tf <= 0.8):
            return full
        u, d = _forward(model, c, True, True, x, t), _forward(model, c, True, False, x, t)
        return u + sd * (d - u) + st * (full - d)

    with torch.no_grad():
        ref = _euler(vfn, noise, 6)
    got_b = sample(model, **c, guidance=g, steps=6, noise=noise, guidance_batched=True)
    got_s = sample(model, **c, guidance=g, steps=6, noise=noise, guidance_batched=False)
    assert _close(got_b, ref, 1e-4)
    assert _close(got_b, got_s)
    # guidance changes the result (the test above is not vacuous)
    assert not torch.allclose(got_b, sample(model, **c, steps=6, noise=noise), atol=1e-3)


def test_text_only_and_dino_only_conditions():
    """Absent conditions are nulls: text-only sampling == the reference text CFG with DINO dropped."""
    model = _model()
    c, noise = _cond(model.cfg), _noise(model.cfg)
    s = 3.0
    got = sample(model, text_emb=c["text_emb"], text_mask=c["text_mask"],
                 guidance=Guidance("independent", text_scale=s, dino_scale=2.0), steps=STEPS, noise=noise)

    def vfn(x, t, _):
        u, tx = _forward(model, c, True, True, x, t), _forward(model, c, False, True, x, t)
        return u + s * (tx - u)
    with torch.no_grad():
        assert _close(got, _euler(vfn, noise, STEPS), 1e-4)
        # DINO only, no guidance -> the DINO-only branch
        got_d = sample(model, dino_emb=c["dino_emb"], dino_patches=c["dino_patches"], steps=STEPS, noise=noise)
        assert _close(got_d, _euler(lambda x, t, _: _forward(model, c, True, False, x, t), noise, STEPS))
        # nothing at all: unconditional
        got_u = sample(model, batch_size=B, steps=STEPS, noise=noise)
        assert _close(got_u, _euler(lambda x, t, _: _forward(model, c, True, True, x, t), noise, STEPS))


def test_patch_scale_equal_to_dino_scale_is_a_no_op_and_otherwise_changes_result():
    model = _model()
    c, noise = _cond(model.cfg), _noise(model.cfg)
    base = sample(model, **c, guidance=Guidance("independent", 2.0, 1.5), steps=STEPS, noise=noise)
    same = sample(model, **c, guidance=Guidance("independent", 2.0, 1.5, patch_scale=1.5), steps=STEPS, noise=noise)
    other = sample(model, **c, guidance=Guidance("independent", 2.0, 1.5, patch_scale=3.0), steps=STEPS, noise=noise)
    assert _close(base, same)
    assert not torch.allclose(base, other, atol=1e-3)
    no_patch_model = _model(use_dino_patches=False)
    with pytest.raises(ValueError, match="patch"):
        sample(no_patch_model, **c, guidance=Guidance(patch_scale=2.0), steps=1)


def test_sampler_is_deterministic_for_a_seed():
    model = _model()
    c = _cond(model.cfg)
    g = Guidance("nested", 2.0, 2.0)
    a = sample(model, **c, guidance=g, steps=3, seed=7)
    b = sample(model, **c, guidance=g, steps=3, seed=7)
    d = sample(model, **c, guidance=g, steps=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, d)
    e = sample(model, **c, guidance=g, steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, e)
    assert a.shape == (B, 12, 32, 32)


def test_model_without_patches_samples():
    model = _model(use_dino_patches=False)
    c = _cond(model.cfg)
    out = sample(model, dino_emb=c["dino_emb"], text_emb=c["text_emb"], text_mask=c["text_mask"],
                 guidance=Guidance("nested", 2.0, 2.0), steps=2)
    assert out.shape == (B, 12, 32, 32) and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    model = _model()
    c = _cond(model.cfg)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        sample(model, dino_emb=c["dino_emb"][:2], dino_patches=c["dino_patches"][:2], text_emb=c["text_emb"], steps=1)
    with pytest.raises(ValueError, match="dino_patches"):
        sample(model, dino_emb=c["dino_emb"], steps=1)
    with pytest.raises(ValueError, match="no real token"):
        mask = c["text_mask"].clone()
        mask[1] = False
        sample(model, text_emb=c["text_emb"], text_mask=mask, steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        sample(model, steps=1)
    with pytest.raises(ValueError, match="steps"):
        sample(model, batch_size=1, steps=0)


# --------------------------------------------------------------------------- checkpoints

def test_load_model_prefers_ema(tmp_path):
    model, ema = _model(0), _model(1)
    path = atomic_save({"config": model.cfg.to_dict(), "model": model.state_dict(), "ema": ema.state_dict(),
                        "step": 12}, tmp_path / "ckpt.pt")
    m, info = load_model_with_info(path, device="cpu")
    assert info == {"path": str(path), "weights": "ema", "step": 12}
    for k, v in ema.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    assert not m.training
    m2 = load_model(path, use_ema=False, device="cpu")
    assert torch.equal(m2.null_dino, model.null_dino)
    atomic_save({"config": model.cfg.to_dict(), "model": model.state_dict(), "ema": None}, tmp_path / "noema.pt")
    _, info = load_model_with_info(tmp_path / "noema.pt", device="cpu")
    assert info["weights"] == "model"
    atomic_save({"model": model.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an nbcore checkpoint"):
        load_model(tmp_path / "bad.pt", device="cpu")
    bad_cfg = dict(model.cfg.to_dict(), hidden_size=128)
    atomic_save({"config": bad_cfg, "model": model.state_dict(), "ema": None}, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "mismatch.pt", device="cpu")


def test_sample_batch_and_dino_swap_match_explicit_conditions():
    model = _model()
    c, noise = _cond(model.cfg), _noise(model.cfg)
    batch = {"dino_emb": c["dino_emb"], "dino_patches": c["dino_patches"], "text_emb": c["text_emb"], "text_mask": c["text_mask"]}
    other = {"dino_emb": c["dino_emb"].flip(0), "dino_patches": c["dino_patches"].flip(0)}
    g = Guidance("nested", 2.0, 1.5)
    swap = sample_batch(model, batch, dino_from=other, guidance=g, steps=2, noise=noise)
    ref = sample(model, dino_emb=other["dino_emb"], dino_patches=other["dino_patches"], text_emb=c["text_emb"],
                 text_mask=c["text_mask"], guidance=g, steps=2, noise=noise)
    assert torch.equal(swap, ref)
    text_only = sample_batch(model, batch, use_dino=False, guidance=g, steps=2, noise=noise)
    assert torch.equal(text_only, sample(model, text_emb=c["text_emb"], text_mask=c["text_mask"], guidance=g,
                                         steps=2, noise=noise))


@pytest.mark.parametrize("guidance,has_text,rows_per_step", [
    (Guidance.off(), True, [B]),                                           # full branch only
    (Guidance("independent", 0.0, 1.0), True, [B]),                        # DINO-only branch only
    (Guidance("independent", 2.0, 1.5), True, [3 * B]),                    # uncond, text, dino (full unused)
    (Guidance("nested", 2.0, 1.5), True, [3 * B]),                         # uncond, dino, full
    (Guidance("nested", 2.0, 1.0), True, [2 * B]),                         # s_d = 1: uncond drops out
    (Guidance("nested", 2.0, 1.5, patch_scale=3.0), True, [4 * B]),        # + the CLS-only branch
    (Guidance("nested", 2.0, 1.5), False, [2 * B]),                        # no text: uncond, dino
    (Guidance("nested", 2.0, 1.5, interval=(0.0, 0.6)), True, [B, 3 * B]),  # t = 1: full only; t = 0.5: guided
])
def test_only_needed_branches_are_computed_in_one_forward(guidance, has_text, rows_per_step):
    model = _model()
    c = _cond(model.cfg)
    if not has_text:
        c = {"dino_emb": c["dino_emb"], "dino_patches": c["dino_patches"]}
    rows = []
    h = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        sample(model, **c, guidance=guidance, steps=2)
    finally:
        h.remove()
    assert rows == rows_per_step if len(rows_per_step) == 2 else rows == rows_per_step * 2
