"""Validation suite: the CLI end to end on a tiny untrained checkpoint and the tiny_shards fixture,
the library entry point as the trainer's hook calls it, bad input, a split of mixed latent shapes,
and real-encoded shards (the plumbing stand-in encoders) with and without scene metadata."""
import io
import json
import math
import shutil
import tarfile

import pytest
import torch

from nbcore.model import NanoDiT, preset
from nbcore.utils import atomic_save

KEYS = ("recon_psnr", "recon_lpips", "recon_layout_error", "recon_layout_iou", "recon_dino_cls_cos",
        "recon_dino_layout_corr", "dino_layout_corr_rolled", "dino_layout_corr_other_image", "shapes_world_only",
        "noguid_psnr", "noguid_layout_error", "textonly_layout_error", "textonly_layout_iou",
        "swap_follows_dino_rate", "swap_follows_text_rate", "swap_tie_rate", "swap_colour_follows_dino_rate",
        "lpips_status", "layout_status", "figure", "n", "steps", "guidance", "weights")


def _ckpt(path, ema=True, seed=0):
    """A tiny untrained checkpoint in the trainer's format (EMA present: the loader must use it)."""
    torch.manual_seed(seed)
    m = NanoDiT(preset("tiny", depth=1))
    e = NanoDiT(preset("tiny", depth=1))
    return atomic_save({"config": m.cfg.to_dict(), "model": m.state_dict(), "ema": e.state_dict() if ema else None,
                        "step": 0}, path)


def test_load_val_batch(tiny_shards):
    from nbcore.validate import load_val_batch
    b = load_val_batch(tiny_shards, 5)
    assert len(b["txt"]) == 5 and b["png"].shape == (5, 3, 64, 64) and len(b["json"]) == 5
    assert b["text_emb"].shape[:2] == b["text_mask"].shape
    assert all(k.startswith("val-") for k in b["key"])
    assert b["selection"] == "the first 5 samples of latent shape 12x32x32 of the val split"
    assert len(load_val_batch(tiny_shards, 1000)["txt"]) == 16           # the whole val split
    with pytest.raises(ValueError, match="n must be"):
        load_val_batch(tiny_shards, 0)


@pytest.mark.slow
def test_validate_cli_end_to_end(tiny_shards, tmp_path, capsys):
    from nbcore.cli.validate import main
    ck1 = _ckpt(tmp_path / "run_a" / "last.pt")
    ck2 = _ckpt(tmp_path / "run_b" / "last.pt", ema=False, seed=1)
    out = tmp_path / "val"
    assert main([str(ck1), str(ck2), "--data", str(tiny_shards), "--out", str(out), "--n", "3", "--steps", "2",
                 "--device", "cpu", "--patch-scale", "1.5"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["settings"]["n"] == 3 and "patch=1.5" in summary["settings"]["guidance"]
    assert summary["lpips_status"].startswith(("ok", "LPIPS unavailable: "))
    r1, r2 = summary["checkpoints"][str(ck1)], summary["checkpoints"][str(ck2)]
    for k in KEYS:
        assert k in r1, k
    assert r1["weights"] == "ema" and r2["weights"] == "model"
    assert r1["n"] == 3 and r1["layout_status"] == "ok"
    for k, v in r1.items():                                  # no NaN/inf anywhere
        if isinstance(v, float):
            assert math.isfinite(v), k
    assert 0 <= r1["recon_psnr"] <= 100 and 0 <= r1["recon_layout_error"] <= math.sqrt(2)
    assert r1["swap_pairs"] == 3
    rates = r1["swap_follows_dino_rate"] + r1["swap_follows_text_rate"] + r1["swap_tie_rate"]
    assert math.isclose(rates, 1.0)
    assert (r1["recon_lpips"] is None) == summary["lpips_status"].startswith("LPIPS unavailable")
    # one figure per checkpoint, a real PNG
    for r in (r1, r2):
        with open(r["figure"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert r1["figure"] != r2["figure"]
    # an untrained model (zero-initialised output) predicts v = 0: every run returns the decoded noise,
    # so the guided and unguided reconstructions agree
    assert r1["recon_psnr"] == r1["noguid_psnr"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_validate_checkpoint_library_call_like_the_trainer_hook(tiny_shards, tmp_path):
    """The trainer calls validate_checkpoint(path, data=..., out=..., n=..., steps=..., device=...)
    and logs the scalar values; a passed-in module is put back in its training mode."""
    from nbcore.validate import validate_checkpoint
    ck = _ckpt(tmp_path / "last.pt")
    res = validate_checkpoint(str(ck), data=str(tiny_shards), out=str(tmp_path / "v"), n=2, steps=1,
                              device="cpu", progress=False)
    assert all(isinstance(v, (int, float, str, type(None))) for k, v in res.items() if k != "shapes_world_only")
    assert all(k in res and isinstance(k, str) for k in res["shapes_world_only"])
    assert (tmp_path / "v" / "metrics.json").exists() and (tmp_path / "v" / "grid.png").exists()
    model = NanoDiT(preset("tiny", depth=1)).train()
    res2 = validate_checkpoint(model, tiny_shards, n=2, steps=1, progress=False)   # no out_dir: writes nothing
    assert model.training and res2["figure"] is None and res2["weights"] == "given module"
    # n = 1: no swap partner -> swap metrics None with a reason, everything else computed
    res3 = validate_checkpoint(model, tiny_shards, n=1, steps=1, progress=False)
    assert res3["swap_follows_dino_rate"] is None and res3["swap_status"].startswith("unavailable")
    assert res3["recon_psnr"] is not None


@pytest.mark.slow
def test_sample_grid_for_the_trainer_hook(tiny_shards):
    from matplotlib.figure import Figure

    from nbcore.validate import sample_grid
    fig = sample_grid(NanoDiT(preset("tiny", depth=1)), data=str(tiny_shards), n=2, steps=1, device="cpu")
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 3


def _oracle(ref: dict, shift: tuple[int, int] = (0, 0), noise_scale: float = 0.0):
    """A sampler that returns the stored latents of the scene whose DINO it is given (or, with null
    DINO, whose text), found in the batch ``ref``; optionally rolled along the latent width by
    ``shift`` cells (with DINO, without) and with ``noise_scale`` times the given noise added."""
    def oracle(model, *, noise, dino_emb=None, text_emb=None, **kw):
        key, table = (dino_emb, ref["dino_emb"]) if dino_emb is not None else (text_emb, ref["text_emb"])
        idx = [next(j for j in range(len(table)) if torch.equal(table[j, : k.shape[0]], k)) for k in key]
        return torch.roll(ref["latent"][idx], shift[dino_emb is None], dims=-1) + noise_scale * noise
    return oracle


@pytest.mark.slow
def test_suite_wiring_with_an_oracle_sampler(tiny_shards, monkeypatch):
    """Replace the sampler by an oracle that returns the stored latents of the scene whose DINO it
    is given (or, with null DINO, whose text): reconstruction and text-only must then score layout
    error 0 / IoU 1, the PSNR of the codec round trip, and the DINO swap must follow DINO every time
    -- which checks the pairing and the metric directions end to end."""
    import nbcore.validate as V
    monkeypatch.setattr(V, "sample", _oracle(V.load_val_batch(tiny_shards, 4)))
    r = V.validate_checkpoint(NanoDiT(preset("tiny", depth=1)), tiny_shards, n=4, steps=1, progress=False)
    for run in ("recon", "noguid", "textonly"):
        assert r[f"{run}_layout_error"] < 1e-6 and r[f"{run}_layout_iou"] > 0.999, run
        assert r[f"{run}_dino_cls_cos"] > 0.999 and r[f"{run}_dino_layout_corr"] > 0.999, run
    assert math.isclose(r["recon_psnr"], r["codec_roundtrip_psnr"], rel_tol=1e-6)
    assert r["swap_follows_dino_rate"] == 1.0 and r["swap_follows_text_rate"] == 0.0
    assert r["swap_error_vs_dino_source"] < 1e-6 and r["swap_dino_cls_cos_to_dino_source"] > 0.999
    assert r["swap_dino_layout_corr_to_dino_source"] > 0.999 > 0.2 > r["swap_dino_layout_corr_to_text_source"]
    assert abs(r["dino_layout_corr_rolled"]) < 0.2 and abs(r["dino_layout_corr_other_image"]) < 0.2


@pytest.mark.slow
def test_shapes_world_numbers_as_before_the_data_codec(tiny_shards, monkeypatch):
    """Decoding with the data's codec (from stats.json) instead of ShapesWorld(model.cfg)'s gives the
    shapes world the numbers it had: an oracle that shifts each scene (4 px with DINO, 10 px text
    only) and adds noise scores what the suite scored before the change (values recorded then). The
    DINO-space layout score ranks the two shifts the same way, well above its calibration rows."""
    import nbcore.validate as V
    monkeypatch.setattr(V, "sample", _oracle(V.load_val_batch(tiny_shards, 8), shift=(2, 5), noise_scale=0.3))
    r = V.validate_checkpoint(NanoDiT(preset("tiny", depth=1)), tiny_shards, n=8, steps=1, progress=False)
    before = {"recon_psnr": 17.024818, "recon_layout_error": 0.0618490, "recon_layout_iou": 0.4942796,
              "textonly_layout_error": 0.1509456, "textonly_layout_iou": 0.1509491, "codec_roundtrip_psnr": 88.313110,
              "swap_follows_dino_rate": 1.0, "swap_colour_follows_dino_rate": 0.875,
              "swap_error_vs_dino_source": 0.0610795, "swap_layout_error_vs_text_scene": 0.5054055}
    assert {k: r[k] for k in before} == pytest.approx(before, rel=1e-5)
    assert r["recon_dino_layout_corr"] == pytest.approx(0.525, abs=0.01)
    assert r["textonly_dino_layout_corr"] == pytest.approx(0.185, abs=0.01)
    assert r["dino_layout_corr_rolled"] == pytest.approx(-0.045, abs=0.01)
    assert r["dino_layout_corr_other_image"] == pytest.approx(0.003, abs=0.01)
    assert r["dino_layout_corr_codec_roundtrip"] == pytest.approx(1.0, abs=1e-4)


def test_cli_bad_input_exits_with_a_reason(tiny_shards, tmp_path):
    from nbcore.cli.validate import main
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main([str(tmp_path / "nope.pt"), "--data", str(tiny_shards), "--out", str(tmp_path)])
    ck = _ckpt(tmp_path / "last.pt")
    with pytest.raises(SystemExit, match="not a folder"):
        main([str(ck), "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no val-"):
        main([str(ck), "--data", str(empty), "--out", str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="interval"):
        main([str(ck), "--data", str(tiny_shards), "--interval", "0.8", "0.2"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            main([str(ck), "--data", str(tiny_shards), "--device", "cuda"])
    with pytest.raises(SystemExit) as e:
        main([str(ck), "--data", str(tiny_shards), "--n", "0"])
    assert e.value.code == 2                                  # argparse error
    bad = atomic_save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="not an nbcore checkpoint"):
        main([str(bad), "--data", str(tiny_shards), "--out", str(tmp_path / "o2"), "--device", "cpu"])


# --------------------------------------------------------------------------- mixed latent shapes

def _write_mixed_split(folder, shapes):
    """val-000000.tar with one sample per entry of ``shapes`` ((h, w) latent sides), keys k0, k1, ..."""
    from nbcore.shapes import encode_sample_members
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    with tarfile.open(folder / "val-000000.tar", "w") as tar:
        for i, (h, w) in enumerate(shapes):
            members = encode_sample_members(torch.randn(4, h, w, generator=g), torch.randn(8, generator=g),
                                            torch.randn(4, 8, generator=g), torch.randn(3, 6, generator=g), f"c{i}")
            for name, data in members.items():
                info = tarfile.TarInfo(f"k{i}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def test_load_val_batch_takes_one_latent_shape_of_a_mixed_split(tmp_path):
    """Aspect-ratio buckets: the batch holds the first shape to reach n in shard order, else the
    most common one, and says what it left out."""
    from nbcore.validate import load_val_batch
    A, B = (4, 4), (4, 8)
    data = _write_mixed_split(tmp_path / "mixed", [A, A, B, A, B, B, B, B])
    b = load_val_batch(data, 3)                                 # A reaches 3 at k3, B has 1 by then
    assert b["key"] == ["k0", "k1", "k3"] and b["latent"].shape == (3, 4, 4, 4)
    assert b["selection"] == "the first 3 samples of latent shape 4x4x4 of the val split; " \
                             "left out (other shapes, among the samples read): 4x4x8: 1"
    b = load_val_batch(data, 4)                                 # B reaches 4 at k6
    assert b["key"] == ["k2", "k4", "k5", "k6"] and b["latent"].shape == (4, 4, 4, 8)
    assert b["selection"].endswith("4x4x4: 3")
    b = load_val_batch(data, 10)                                # none reaches 10: the most common
    assert b["key"] == ["k2", "k4", "k5", "k6", "k7"]
    assert b["selection"] == "all 5 samples of latent shape 4x4x8 of the val split; " \
                             "left out (other shapes, among the samples read): 4x4x4: 3"


# --------------------------------------------------------------------------- real-encoded shards

# a NanoDiT sized for the stand-in real encoders' shards (4 x 16 x 16 latents, DINO 32 x 14 x 14, T5 16)
REAL_SIZES = dict(in_channels=4, input_size=16, patch_size=2, hidden_size=32, depth=1, num_heads=2, text_dim=16,
                  text_len=64, dino_dim=32, dino_grid=14, patch_tie=True)


@pytest.fixture(scope="module")
def real_shards(real_encoder_dirs, shapes_image_folder, tmp_path_factory):
    """Shards precomputed from the shapes image folder with the stand-in real encoders, twice: with
    the scenes (json members) and png members, and from a copy without the .json sidecars and
    without png members. The VAE is then moved, so its recorded folder is gone."""
    from nbcore.encoders import precompute
    d = real_encoder_dirs
    root = tmp_path_factory.mktemp("real_val")
    bare = root / "images_without_scenes"
    bare.mkdir()
    for f in shapes_image_folder.iterdir():
        if f.suffix in (".png", ".txt"):
            shutil.copy(f, bare / f.name)
    vae = root / "vae"
    shutil.copytree(d["vae"], vae)
    out = {"scenes": root / "with_scenes", "bare": root / "bare"}
    for key, images, png in (("scenes", shapes_image_folder, True), ("bare", bare, False)):
        precompute(images, out[key], d["dino"], d["t5"], vae, image_size=32, progress=False, device="cpu",
                   val_fraction=0.34, write_png=png)
    moved = root / "vae_moved"
    vae.rename(moved)
    return {**out, "vae": moved, "dino": d["dino"]}


def _real_ckpt(path):
    """An untrained tiny NanoDiT at the real shards' sizes, its zero-initialised output layer given
    small random weights so that samples differ from the noise."""
    torch.manual_seed(0)
    m = NanoDiT(preset("tiny", **REAL_SIZES))
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return atomic_save({"config": m.cfg.to_dict(), "model": m.state_dict(), "ema": None, "step": 0}, path)


@pytest.mark.slow
def test_validate_cli_on_real_encoded_shards(real_shards, tmp_path, capsys, monkeypatch):
    """Real-encoded shapes images via the CLI with --vae (the recorded VAE folder moved): decoded with
    the data's VAE, scored in the data's DINO space with its calibration, and -- the json members
    being shapes-world scenes -- the shape layout metrics too; without json members those are None
    with the shapes-world status, without png members the source is the codec's decoding."""
    from nbcore.cli.validate import main
    from nbcore.validate import SHAPES_WORLD_ONLY
    ck = _real_ckpt(tmp_path / "real.pt")
    with pytest.raises(SystemExit, match="pass --vae DIR"):
        main([str(ck), "--data", str(real_shards["scenes"]), "--out", str(tmp_path / "x"), "--device", "cpu"])
    res = {}
    for key in ("scenes", "bare"):
        out = tmp_path / key
        assert main([str(ck), "--data", str(real_shards[key]), "--vae", str(real_shards["vae"]), "--out", str(out),
                     "--n", "6", "--steps", "2", "--device", "cpu"]) == 0
        summary = json.loads((out / "metrics.json").read_text())
        assert summary["settings"]["vae"] == str(real_shards["vae"])
        res[key] = summary["checkpoints"][str(ck)]
    r, bare = res["scenes"], res["bare"]
    assert r["codec"] == f"VAE at {real_shards['vae'].resolve()}"
    assert r["dino_encoder"] == f"DINOv3 at {real_shards['dino'].resolve()}"
    assert r["latent_shape"] == "4x16x16" and r["n"] == 6 and r["source_images"] == "png members"
    assert r["selection"] == "the first 6 samples of latent shape 4x16x16 of the val split"
    assert 0 < r["recon_psnr"] < 100 and 0 < r["codec_roundtrip_psnr"] < 100   # a random VAE: no ceiling
    for k in ("recon_dino_layout_corr", "textonly_dino_layout_corr", "dino_layout_corr_other_image",
              "dino_layout_corr_codec_roundtrip", "swap_dino_layout_corr_to_dino_source"):
        assert -1 <= r[k] <= 1, k
    assert -0.3 < r["dino_layout_corr_rolled"] < 0.3                 # the right content in the wrong places
    assert r["dino_layout_corr_codec_roundtrip"] < 0.9               # a random VAE does not reconstruct
    assert r["layout_status"] == "ok" and r["swap_pairs"] == 6
    assert all(r[k] is not None for k in SHAPES_WORLD_ONLY if not k.endswith("placement_error"))  # no match: None
    # no json: the shapes-world metrics are None, with the reason; the rest is computed
    assert bare["layout_status"] == "unavailable: shapes-world only (no json scene metadata)"
    assert bare["shapes_world_only"] == list(SHAPES_WORLD_ONLY)
    assert all(bare[k] is None for k in SHAPES_WORLD_ONLY)
    assert bare["source_images"] == "the codec's decoding of the stored latents (the shards have no png member)"
    assert bare["codec_roundtrip_psnr"] == 100.0 and bare["dino_layout_corr_codec_roundtrip"] == pytest.approx(1.0)
    computed = ("recon_psnr", "recon_dino_layout_corr", "textonly_dino_layout_corr", "dino_layout_corr_rolled",
                "swap_dino_layout_corr_to_text_source")
    assert all(isinstance(bare[k], float) for k in computed)
    assert "DINO layout corr" in capsys.readouterr().out
    # an oracle sampler on the json-less, png-less shards (source = the VAE's decoding of the stored
    # latents): every reconstruction is its source, in pixels and in the real DINO's space
    import nbcore.validate as V
    monkeypatch.setattr(V, "sample", _oracle(V.load_val_batch(real_shards["bare"], 4)))
    o = V.validate_checkpoint(NanoDiT(preset("tiny", **REAL_SIZES)), real_shards["bare"], n=4, steps=1,
                              vae=str(real_shards["vae"]), progress=False)
    assert o["recon_psnr"] == o["codec_roundtrip_psnr"] == 100.0
    for run in ("recon", "noguid", "textonly"):
        assert o[f"{run}_dino_layout_corr"] == pytest.approx(1.0, abs=1e-5), run
    assert o["swap_dino_layout_corr_to_dino_source"] == pytest.approx(1.0, abs=1e-5)
    assert o["swap_dino_layout_corr_to_text_source"] < 0.9 and o["recon_layout_error"] is None
