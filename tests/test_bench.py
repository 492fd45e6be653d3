"""Plumbing tests of ``nbcore.bench``: the CLI writes what it promises, the two models are built at
equal sizes, flops and memory are counted. No timing assertions (speed is the benchmark's output)."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from nbcore import bench
from nbcore.cli import bench as bench_cli
from nbcore.model import NanoDiT, preset

REQUIRED = {"case", "device", "nbcore_samples_per_s", "peer_samples_per_s", "ratio"}
TRAIN_KEYS = {"nbcore_peak_mem_mb", "peer_peak_mem_mb", "nbcore_gflop_per_step", "peer_gflop_per_step",
              "nbcore_tflops", "peer_tflops", "nbcore_mfu", "peer_mfu", "nbcore_params", "peer_params",
              "nbcore_context", "peer_context", "real_tokens"}


@pytest.fixture
def one_thread():
    """One intra-op thread for the CLI test: on the shared 2-core machine, two spinning threads per
    process are what makes small steps slow; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_plumbing_cli_writes_json_and_markdown(tmp_path, one_thread):
    pytest.importorskip("diffusers", reason="diffusers is the benchmark-only extra")
    out = tmp_path / "b" / "bench.json"
    bench_cli.main(["--json", str(out), "--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1",
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
        assert r["nbcore_gflop_per_step"] > 0 and r["peer_gflop_per_step"] > 0
        assert r["nbcore_mfu"] is None and r["peer_mfu"] is None       # MFU is reported on GPU only
        # the pre-patch model gets PixArt's inputs (trimmed) plus CLS: its context is the text alone,
        # and it does strictly less work than the patch model on the same batch
        assert r["prepatch_context"] == r["nbcore_text_tokens"]
        assert r["prepatch_ratio"] == pytest.approx(r["prepatch_samples_per_s"] / r["peer_samples_per_s"])
        assert 0 < r["prepatch_gflop_per_step"] < r["nbcore_gflop_per_step"]
        assert r["prepatch_params"] < r["nbcore_params"] and r["prepatch_peak_mem_mb"] > 0
    assert [r["real_tokens"] for r in train] == [4, 8, 32]     # 60, 120, 512 of 512 -> of 32
    md = out.with_suffix(".md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| train")]
    assert len(table) == 3 and all(line.count("|") == 15 for line in table)
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
    pytest.importorskip("diffusers", reason="diffusers is the benchmark-only extra")
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
    lengths = b["text_mask"].sum(1)
    assert lengths[0] == 8 and bool(((lengths >= 4) & (lengths <= 8)).all())
    assert bool((b["text_emb"][~b["text_mask"]] == 0).all())                   # padding is zero
    ours = bench.nanodit_inputs(b, torch.device("cpu"))
    assert ours["text_emb"].shape[1] == 8                             # trimmed to the longest, rounded to 8
    same = bench.make_batch(cfg, 5, 8, spread=0.0)                   # every caption exactly 8 tokens
    assert bool((same["text_mask"].sum(1) == 8).all())
    assert bench.nanodit_inputs(same, torch.device("cpu"))["text_mask"] is None
    full = bench.make_batch(cfg, 3, cfg.text_len)
    assert bool(full["text_mask"].all()) and bench.nanodit_inputs(full, torch.device("cpu"))["text_mask"] is None


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


def test_plumbing_guidance_case_runs_four_distinct_branches():
    g = bench.bench_guidance()
    coeffs = g.coefficients(0.5)
    assert len(coeffs) == 4 and all(c != 0 for c in coeffs.values())
    assert g.interval == (0.0, 1.0)                  # every Euler step is guided: four branches each


def test_missing_diffusers_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(SystemExit, match="diffusers"):
        bench._import_pixart()


@pytest.mark.parametrize("argv", [["--cases", "nope"], ["--steps", "0"], ["--json", "out.txt"],
                                  ["--device", "nonsense"], ["--caption-spread", "1.5"]])
def test_bad_arguments_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_cli.parse_args(argv)
    assert e.value.code != 0


def test_plumbing_matmul_peak_positive():
    assert bench.measure_peak_tflops(torch.device("cpu"), "fp32") > 0
