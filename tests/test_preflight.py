"""Checks before long work: each refuses (one line, exit 2) or says what it did before the work starts.

- precompute: the default image size follows the images; a size that would upscale them is refused
  unless --allow-upscale (a 32 px folder at the old 512 px default took 2 min 39 s instead of 0.17 s);
- training: a batch larger than the data (stats.json's count) and a warm-up longer than the run are
  refused before start-up (before: "epoch 0 ... yielded no batch" after start-up, exit 1; the
  learning rate silently peaking at a fraction of --lr);
- validation: says how many samples it scored of how many asked, and defaults to the experiment's
  guidance protocol (nested, text 3 / DINO 2, 12 steps).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbcore.encoders import fitting_image_size


def test_fitting_image_size_follows_the_smallest_image():
    sizes = {Path("a.png"): (32, 32), Path("b.png"): (640, 480)}
    assert fitting_image_size(sizes, 16) == 32
    assert fitting_image_size({Path("b.png"): (640, 480)}, 64) == 448          # multiple of 64 below 480
    assert fitting_image_size({Path("c.png"): (4000, 3000)}, 64) == 512        # capped
    assert fitting_image_size({Path("d.png"): (12, 12)}, 16) is None


def test_fitting_image_size_with_buckets_never_upscales():
    from nbcore.encoders import aspect_buckets, upscaled_images
    sizes = {Path("land.png"): (64, 36), Path("port.png"): (30, 56), Path("sq.png"): (40, 40)}
    fn = lambda s: aspect_buckets(s, 8, 2.0)
    s = fitting_image_size(sizes, 8, fn)
    assert s is not None and not upscaled_images(sizes, s, fn(s)) and upscaled_images(sizes, s + 8, fn(s + 8))


@pytest.mark.slow
def test_precompute_default_size_follows_the_data_and_refuses_to_upscale(real_encoder_dirs, shapes_image_folder,
                                                                         tmp_path, capsys):
    from nbcore.cli.encoders import main
    d = real_encoder_dirs
    enc = ["--dino", str(d["dino"]), "--t5", str(d["t5"]), "--vae", str(d["vae"]), "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(["precompute", str(shapes_image_folder), str(tmp_path / "big"), "--image-size", "512", *enc])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--image-size 512 would upscale 24 of 24 images" in line and "--image-size 32" in line
    assert not (tmp_path / "big" / "stats.json").exists()
    assert main(["precompute", str(shapes_image_folder), str(tmp_path / "fit"), *enc]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["image_size"] == 32 and summary["buckets"] == {"32x32": 24}


def _train_main(argv):
    from nbcore.cli.train import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value


def test_train_refuses_a_batch_larger_than_the_data(tiny_shards, tmp_path, capsys):
    out = tmp_path / "o"
    e = _train_main(["--data", str(tiny_shards), "--out", str(out), "--steps", "20", "--batch-size", "65", "--no-progress"])
    assert e.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 65 is larger than the data: 64 training samples" in err[0]
    assert not (out / "log.jsonl").exists()


def test_train_refuses_a_warmup_longer_than_the_run(tiny_shards, tmp_path, capsys):
    e = _train_main(["--data", str(tiny_shards), "--out", str(tmp_path / "o"), "--steps", "20", "--warmup", "100",
                     "--lr", "3e-4", "--no-progress"])
    assert e.code == 2
    err = capsys.readouterr().err.strip()
    assert "--warmup 100 is longer than the run (--steps 20)" in err and "peak at 6e-05" in err


def test_train_default_warmup_fits_a_short_run(tiny_shards):
    from nbcore.cli.train import _parser, check_schedule_fits_data
    from nbcore.sizes import data_stats
    from nbcore.train_config import TrainConfig
    args = vars(_parser().parse_args(["--data", str(tiny_shards), "--steps", "20"]))
    assert args["warmup"] is None            # main fills it: min(100, steps // 10)
    cfg = TrainConfig(data=str(tiny_shards), steps=20, warmup=min(TrainConfig.warmup, 20 // 10), batch_size=64)
    check_schedule_fits_data(cfg, data_stats(tiny_shards))  # 64 samples, batch 64: fits


def test_validation_says_how_many_it_scored_and_uses_the_experiment_protocol(tiny_shards):
    from nbcore.experiment import PROFILES
    from nbcore.model import NanoDiT, preset
    from nbcore.cli.validate import _parser
    from nbcore.validate import DEFAULT_GUIDANCE, DEFAULT_STEPS, validate_checkpoint
    cpu = PROFILES["cpu"]
    assert DEFAULT_GUIDANCE == cpu.guidance and DEFAULT_STEPS == cpu.sample_steps
    a = _parser().parse_args(["x.pt", "--data", "d"])
    assert (a.formula, a.text_scale, a.dino_scale, a.steps) == ("nested", 3.0, 2.0, 12)
    res = validate_checkpoint(NanoDiT(preset("tiny")), tiny_shards, n=20, steps=1, progress=False, device="cpu")
    assert (res["n"], res["n_asked"]) == (16, 20)
    assert res["guidance"] == "nested(text=3.0, dino=2.0)"
