"""Plumbing tests of ``nbcore.bench``: the CLI writes what it promises, the two models are built at
equal sizes, flops and memory are counted. No timing assertions (speed is the benchmark's output)."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from nbcore import bench
from nbcore.model import NanoDiT, preset

REQUIRED = {"case", "device", "nbcore_samples_per_s", "peer_samples_per_s", "ratio"}
TRAIN_KEYS = {"nbcore_peak_mem_mb", "peer_peak_mem_mb", "nbcore_gflop_per_step", "peer_gflop_per_step",
              "nbcore_tflops", "peer_tflops", "nbcore_mfu", "peer_mfu", "nbcore_params", "peer_params",
              "nbcore_context", "peer_context", "real_tokens"}


@pytest.mark.slow
def test_plumbing_cli_writes_json_and_markdown(tmp_path):
    out = tmp_path / "b" / "bench.json"
    bench.main(["--json", str(out), "--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                "--batch", "2", "--sample-steps", "1", "--sample-repeats", "2"])
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == list(bench.CASES)
    cfg = preset("tiny")
    for r in rows:
        assert REQUIRED <= set(r), r["case"]
        assert r["device"] == "cpu"
        assert r["nbcore_samples_per_s"] > 0 and r["peer_samples_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["nbcore_samples_per_s"] / r["peer_samples_per_s"])
    train = [r for r in rows if r["case"] in bench.TRAIN_CASES]
    for r in train:
        assert TRAIN_KEYS <= set(r)
        assert r["peer_context"] == cfg.text_len
        assert r["nbcore_context"] == r["nbcore_text_tokens"] + 1 + cfg.num_patches
        assert r["nbcore_peak_mem_mb"] > 0 and r["peer_peak_mem_mb"] > 0
    assert [r["real_tokens"] for r in train] == [4, 8, 32]     # 60, 120, 512 of 512 -> of 32
    md = out.with_suffix(".md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| train")]
    assert len(table) == 3 and all(line.count("|") == 14 for line in table)
    assert "| guidance |" in md and "| capture |" in md and "PixArt" in md


def test_plumbing_configs_match():
    for name in ("tiny", "production"):
        cfg = preset(name)
        kw = bench.pixart_kwargs(cfg)
        assert kw["num_attention_heads"] * kw["attention_head_dim"] == cfg.hidden_size
        assert kw["num_attention_heads"] == cfg.num_heads
        assert kw["num_layers"] == cfg.depth
        assert kw["patch_size"] == cfg.patch_size
        assert kw["sample_size"] == cfg.input_size
        assert kw["in_channels"] == kw["out_channels"] == cfg.in_channels
        assert kw["caption_channels"] == cfg.text_dim and kw["cross_attention_dim"] == cfg.hidden_size
    # The built models (tiny) agree, and both map the same latent batch to a velocity of its shape.
    cfg = preset("tiny")
    peer = bench.build_pixart(cfg)
    assert peer.inner_dim == cfg.hidden_size and len(peer.transformer_blocks) == cfg.depth
    assert peer.transformer_blocks[0].attn1.heads == cfg.num_heads
    b = bench.make_batch(cfg, 2, bench.real_tokens(120, cfg.text_len))
    dev = torch.device("cpu")
    with torch.no_grad():
        v_peer = peer(**bench.pixart_inputs(b, dev))[0]
        v_ours = NanoDiT(cfg)(**bench.nanodit_inputs(b, dev))
    assert v_peer.shape == v_ours.shape == b["x_t"].shape == (2, cfg.in_channels, cfg.input_size, cfg.input_size)


def test_plumbing_make_batch_caption_lengths():
    cfg = preset("tiny")
    b = bench.make_batch(cfg, 6, 8)
    lengths = b["mask"].sum(1)
    assert lengths[0] == 8 and bool(((lengths >= 4) & (lengths <= 8)).all())
    assert bool((b["text"][~b["mask"]] == 0).all())                   # padding is zero
    ours = bench.nanodit_inputs(b, torch.device("cpu"))
    assert ours["text_emb"].shape[1] == 8                             # trimmed to the longest, rounded to 8
    full = bench.make_batch(cfg, 3, cfg.text_len)
    assert bool(full["mask"].all()) and bench.nanodit_inputs(full, torch.device("cpu"))["text_mask"] is None


def _nano_step(cfg, n_ref, batch=2):
    b = bench.make_batch(cfg, batch, bench.real_tokens(n_ref, cfg.text_len))
    dev = torch.device("cpu")
    torch.manual_seed(0)
    return bench.TrainStep(NanoDiT(cfg), lambda m: (lambda **kw: m(**kw)), bench.nanodit_inputs(b, dev),
                           b["target"], dev, "fp32")


def test_plumbing_flops_positive_and_trimmed_fewer():
    cfg = preset("tiny")
    trimmed = bench.count_flops(_nano_step(cfg, 60))
    full = bench.count_flops(_nano_step(cfg, 512))
    assert 0 < trimmed < full


def test_cpu_attention_flops_counted():
    """The CPU flash-attention op (missing from torch's registry) is counted like the CUDA ones:
    forward 2 matmuls, backward 5 (torch's convention)."""
    B, H, N, M, d = 2, 3, 16, 24, 8
    q = torch.randn(B, H, N, d, requires_grad=True)
    k = torch.randn(B, H, M, d, requires_grad=True)
    v = torch.randn(B, H, M, d, requires_grad=True)
    fwd = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert fwd == 4 * B * H * N * M * d
    both = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert both == (4 + 10) * B * H * N * M * d


def test_cpu_memory_tracker_counts_live_storages():
    tracker = bench._LiveTensorBytes()
    with tracker.mode:
        a = torch.empty(2 ** 18)                 # 1 MiB float32
        view = a[:10]                            # a view is not new memory
        del a, view
        b = torch.empty(2 ** 17)                 # 0.5 MiB once the first is gone
        b.add_(1)                                # in place: not new memory
    assert tracker.peak == 2 ** 20
    assert tracker.now == 2 ** 19


def test_stand_in_guidance_batched_equals_sequential():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = NanoDiT(cfg).eval()
    with torch.no_grad():                       # leave the zero init so every branch differs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = bench.make_batch(cfg, 3, 8)
    inputs = bench.nanodit_inputs(b, torch.device("cpu"))
    with torch.no_grad():
        x, t = torch.randn_like(inputs["x"]), torch.full((3,), 0.7)
        vb = bench.guided_velocity_local(model, x, t, inputs, batched=True)
        vs = bench.guided_velocity_local(model, x, t, inputs, batched=False)
        v_full = model(x, t, **{k: inputs[k] for k in ("dino_emb", "dino_patches", "text_emb", "text_mask")})
        xb = bench.guided_sample_local(model, inputs, steps=2, batched=True)
        xs = bench.guided_sample_local(model, inputs, steps=2, batched=False)
    torch.testing.assert_close(vb, vs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xb, xs, rtol=1e-4, atol=1e-5)
    assert (vb - v_full).abs().max() > 1e-3      # guidance changed the velocity


def test_missing_diffusers_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(SystemExit, match="diffusers"):
        bench._import_pixart()


@pytest.mark.parametrize("argv", [["--cases", "nope"], ["--steps", "0"], ["--json", "out.txt"]])
def test_bad_arguments_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code != 0
