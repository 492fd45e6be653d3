"""``nbcore.analysis``: the routing numbers notebook 04 reports, against hand-built attention maps."""
import pytest
import torch

from nbcore import analysis


def test_colocated_patch_maps_tokens_onto_the_patch_grid():
    # 16 x 16 image tokens over an 8 x 8 patch grid: each patch covers a 2 x 2 block of tokens
    co = analysis.colocated_patch(16, 16, 8).view(16, 16)
    assert co[0, 0] == co[1, 1] == 0 and co[0, 2] == 1 and co[2, 0] == 8 and co[15, 15] == 63
    assert torch.equal(analysis.colocated_patch(8, 8, 8), torch.arange(64))     # same grid: identity


def test_patch_locality_uniform_vs_local_attention():
    h = w = 16
    g = 8
    P = g * g
    uniform = torch.full((2, h * w, P), 1.0 / P)
    loc = analysis.patch_locality(uniform, (h, w), g)
    assert loc["ratio"] == pytest.approx(1.0) and loc["uniform_share"] == pytest.approx(1 / P)
    assert loc["mean_distance"] == pytest.approx(loc["uniform_distance"])
    local = torch.zeros(h * w, P)
    local[torch.arange(h * w), analysis.colocated_patch(h, w, g)] = 3.0          # unnormalised on purpose
    loc = analysis.patch_locality(local, (h, w), g)
    assert loc["colocated_share"] == pytest.approx(1.0) and loc["ratio"] == pytest.approx(P)
    # a token's centre is a quarter of a patch from its patch's centre: (1/32) * sqrt(2) of the side
    assert loc["mean_distance"] == pytest.approx((1 / 32) * 2 ** 0.5, rel=1e-5)


def test_cls_use_answer_reports_the_share_against_uniform():
    over = [{"step": 200, "text": 0.3, "cls": 0.02, "patches": 0.68},
            {"step": 400, "text": 0.3, "cls": 0.05, "patches": 0.65}]
    tables = {"overall": {"text": 0.3, "cls": 0.04, "patches": 0.66}, "max_head": {"cls": (0.09, 1, 2)}}
    text, share = analysis.cls_use_answer(over, tables, {"ratio": 1.01}, mean_context=80.0)
    assert share == pytest.approx(4.0)                      # 0.05 of the mass vs 1/80 for a uniform token
    assert "over 2 checkpoints" in text and "0.02 -> 0.05" in text and "4x its uniform share" in text
    assert "block 1 head 2" in text and "1.01x the uniform share" in text
