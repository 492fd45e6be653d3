"""Metrics: PSNR cap, layout error (0 for the source, monotone under shifts, max penalty), swap
following, encoder similarity, and the LPIPS code path (plumbing test with a random trunk)."""
import math

import pytest
import torch

from nbcore.metrics import (MAX_CENTROID_DIST, PSNR_CAP_DB, LPIPSMetric, encoder_similarity,
                            layout_error, layout_per_sample, psnr, swap_follow)
from nbcore.shapes import BACKGROUND, COLOURS, Scene, Shape, colour_mask, render

S = 64


def _img(*shapes):
    """A rendered shapes-world image (3, S, S) with the given shapes."""
    return render(Scene(list(shapes)), S)


def _shift(img, dx):
    """Move the content dx pixels right, filling with the background (no wrap-around)."""
    out = torch.empty_like(img)
    out[:] = torch.tensor(BACKGROUND)[:, None, None]
    out[:, :, dx:] = img[:, :, : S - dx]
    return out


SCENE_A = (Shape("square", "red", 0.25, 0.3, "small"), Shape("circle", "blue", 0.7, 0.6, "large"))
SCENE_B = (Shape("circle", "red", 0.7, 0.75, "large"), Shape("triangle", "blue", 0.3, 0.25, "small"))


# --------------------------------------------------------------------------- PSNR

def test_psnr_of_identical_images_is_the_cap_and_known_value_otherwise():
    a = torch.rand(2, 3, 16, 16)
    assert torch.equal(psnr(a, a), torch.full((2,), PSNR_CAP_DB))
    b = a.clone()
    b[0] = a[0] * 0 + 0.5
    b[1] = a[1] + 0.01                                       # MSE = 1e-4 -> 40 dB
    got = psnr(a, b)
    mse0 = float((a[0] - 0.5).pow(2).mean())
    assert math.isclose(float(got[0]), 10 * math.log10(1 / mse0), rel_tol=1e-4)
    assert math.isclose(float(got[1]), 40.0, rel_tol=1e-3)
    with pytest.raises(ValueError, match="differ"):
        psnr(a, a[:, :, :8])


# --------------------------------------------------------------------------- layout

def test_layout_error_zero_for_source_and_monotone_in_shift():
    src = _img(*SCENE_A)[None]
    colours = [["red", "blue"]]
    r0 = layout_error(src, src, colours, colour_mask)
    assert r0["centroid_error"] == 0.0 and r0["iou"] == 1.0 and r0["colours_evaluated"] == 2
    errs, ious = [], []
    for dx in (1, 3, 5, 8):
        r = layout_error(_shift(src[0], dx)[None], src, colours, colour_mask)
        errs.append(r["centroid_error"])
        ious.append(r["iou"])
        # nothing is clipped by the border at these shifts: the error is exactly the shift
        assert math.isclose(r["centroid_error"], dx / S, rel_tol=1e-5)
    assert all(a < b for a, b in zip(errs, errs[1:]))
    assert all(a > b for a, b in zip(ious, ious[1:]))


def test_layout_absent_colour_gets_max_penalty_and_never_nan():
    src = _img(*SCENE_A)[None]
    only_red = _img(SCENE_A[0])[None]                        # the blue circle is missing
    r = layout_per_sample(only_red, src, [["red", "blue"]], colour_mask)
    assert r["absent_in_generated"] == 1
    assert math.isclose(float(r["centroid_error"][0]), MAX_CENTROID_DIST / 2, rel_tol=1e-5)  # (0 + sqrt 2) / 2
    assert math.isclose(float(r["iou"][0]), 0.5, rel_tol=1e-5)
    # a colour the source does not show is skipped and counted; a sample with nothing left is
    # invalid (value 0, not NaN) and the summary says so
    blank = torch.empty(1, 3, S, S)
    blank[:] = torch.tensor(BACKGROUND)[:, None, None]
    r = layout_error(src, blank, [["green"]], colour_mask)
    assert r["centroid_error"] is None and r["skipped_samples"] == 1 and r["absent_in_source"] == 1
    per = layout_per_sample(src, blank, [["green"]], colour_mask)
    assert not per["valid"][0] and torch.isfinite(per["centroid_error"]).all()
    with pytest.raises(ValueError, match="colour lists"):
        layout_error(src, src, [["red"], ["blue"]], colour_mask)


def test_swap_metric_picks_the_right_source():
    a = torch.stack([_img(*SCENE_A), _img(*SCENE_B)])         # text sources
    b = torch.stack([_img(*SCENE_B), _img(*SCENE_A)])         # DINO sources (the other scene)
    ca = [["red", "blue"], ["red", "blue"]]
    cb = [["red", "blue"], ["red", "blue"]]
    follows_b = swap_follow(b.clone(), a, ca, b, cb, colour_mask)
    assert follows_b["follows_dino_rate"] == 1.0 and follows_b["follows_text_rate"] == 0.0
    assert follows_b["pairs"] == 2 and follows_b["error_vs_dino_source"] == 0.0
    follows_a = swap_follow(a.clone(), a, ca, b, cb, colour_mask)
    assert follows_a["follows_text_rate"] == 1.0 and follows_a["follows_dino_rate"] == 0.0
    # mixed: first sample follows DINO, second follows text -> rates of one half
    mixed = torch.stack([b[0], a[1]])
    r = swap_follow(mixed, a, ca, b, cb, colour_mask)
    assert r["follows_dino_rate"] == 0.5 and r["follows_text_rate"] == 0.5
    # colours: A is red+blue, B' is green+yellow at A's places; an image with B's colours follows B
    scene_c = [Shape(s.kind, c, s.cx, s.cy, s.size) for s, c in zip(SCENE_A, ("green", "yellow"))]
    c_img = _img(*scene_c)[None]
    r = swap_follow(c_img, a[:1], ca[:1], c_img, [["green", "yellow"]], colour_mask)
    assert r["colour_follows_dino_rate"] == 1.0 and r["follows_dino_rate"] == 1.0


def test_encoder_similarity_is_one_for_identical_images():
    from nbcore.model import preset
    from nbcore.shapes import ShapesWorld
    world = ShapesWorld(preset("tiny"))
    x = torch.stack([_img(*SCENE_A), _img(*SCENE_B)])
    same = encoder_similarity(world.patch_encoder, x, x)
    assert torch.allclose(same["cls_cos"], torch.ones(2), atol=1e-5)
    assert torch.allclose(same["patch_cos"], torch.ones(2), atol=1e-5)
    other = encoder_similarity(world.patch_encoder, x, x.flip(0))
    assert (other["patch_cos"] < 0.999).all()


# --------------------------------------------------------------------------- LPIPS

@pytest.mark.slow
def test_lpips_plumbing_with_random_backbone():
    """PLUMBING TEST, not a score: lpips' AlexNet trunk with random weights (pnet_rand=True) so the
    code path (input scaling, per-image output, identical images -> 0) runs without the ImageNet
    weights, which cannot be downloaded here."""
    m = LPIPSMetric(random_backbone=True)
    assert m.available and m.status.startswith("plumbing test")
    x = torch.rand(3, 3, S, S)
    y = torch.rand(3, 3, S, S)
    d_same, d_diff = m(x, x), m(x, y)
    assert d_same.shape == (3,) and torch.allclose(d_same, torch.zeros(3), atol=1e-6)
    assert (d_diff > 0).all() and torch.isfinite(d_diff).all()


def test_lpips_reports_missing_weights_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("NBCORE_ALEXNET_WEIGHTS", raising=False)

    def no_download(*a, **k):
        raise AssertionError("LPIPSMetric must never try to download")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    m = LPIPSMetric()
    assert not m.available
    assert m.status.startswith("LPIPS unavailable: ")
    assert "alexnet-owt-7be5be79.pth" in m.status and "hub/checkpoints" in m.status
    with pytest.raises(RuntimeError, match="LPIPS unavailable"):
        m(torch.rand(1, 3, S, S), torch.rand(1, 3, S, S))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    m = LPIPSMetric(weights=bad)
    assert not m.available and "could not load" in m.status


def test_lpips_loads_local_alexnet_file(tmp_path, monkeypatch):
    """A weights file in torchvision's AlexNet format is found in $TORCH_HOME/hub/checkpoints and
    loaded into lpips' trunk (random values here: checks the key mapping, not a score)."""
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("NBCORE_ALEXNET_WEIGHTS", raising=False)
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(alex.state_dict(), tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    m = LPIPSMetric()
    assert m.available and m.status.startswith("ok")
    assert torch.equal(getattr(m.net.net.slice1, "0").weight, alex.features[0].weight)
    assert torch.equal(getattr(m.net.net.slice5, "10").weight, alex.features[10].weight)
