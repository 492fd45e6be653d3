"""nbcore.pretrained: model folders (config.json, model.safetensors, stats.json, README.md) that
round-trip to identical outputs; EMA weights from checkpoints; the cheap step read; the export CLI."""
from __future__ import annotations

import json

import pytest
import torch

from nbcore.codec import spec_of
from nbcore.data import Stats
from nbcore.model import NanoDiT, preset
from nbcore.cli.pretrained import main
from nbcore.pretrained import checkpoint_step, from_pretrained, save_pretrained
from nbcore.shapes import ShapesWorld
from nbcore.utils import atomic_save

CFG = preset("micro", hidden_size=32, depth=1, num_heads=2, patch_tie=True, patch_pos_embed="learned")


def _stats(cfg, codec_spec=None) -> Stats:
    entries = {name: {"mean": [0.1] * d, "std": [2.0] * d, "count": 3}
               for name, d in (("dinov3", cfg.dino_dim), ("dinov3_patches", cfg.dino_dim), ("t5", cfg.text_dim),
                               ("latent", cfg.in_channels))}
    meta = {"source": "test", "n_train": 3}
    if codec_spec is not None:
        meta["codec"] = codec_spec
    return Stats(entries, meta)


def _batch(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {"x": torch.randn(B, cfg.in_channels, 16, 24, generator=g), "t": torch.rand(B, generator=g),
            "dino_emb": torch.randn(B, cfg.dino_dim, generator=g),
            "dino_patches": torch.randn(B, cfg.num_patches, cfg.dino_dim, generator=g),
            "text_emb": torch.randn(B, 5, cfg.text_dim, generator=g), "text_mask": mask}


def _randomised(cfg, seed):
    torch.manual_seed(seed)
    m = NanoDiT(cfg)
    with torch.no_grad():   # zero-initialised layers too: every tensor must travel
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.eval()


def test_round_trip_identical_outputs(tmp_path):
    model = _randomised(CFG, 0)
    spec = spec_of(ShapesWorld(CFG).codec)
    out = save_pretrained(model, tmp_path / "m", stats=_stats(CFG, spec), metrics={"psnr": 21.5})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "stats.json"]
    loaded, info = from_pretrained(out, device="cpu")
    assert not loaded.training and loaded.cfg == CFG
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    b = _batch(CFG)
    with torch.no_grad():
        assert torch.equal(loaded(**b), model(**b))
    assert info["codec"] == spec and info["weights"] == "model" and info["metrics"] == {"psnr": 21.5}
    assert info["stats"].entries["t5"]["std"] == [2.0] * CFG.text_dim and info["training"] is None
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["model_config"] == CFG.to_dict() and cfg_json["params"] == model.num_params()
    card = (out / "README.md").read_text()
    assert f"{model.num_params():,} parameters" in card and "| psnr | 21.5 |" in card
    assert "the shapes world's pixel codec" in card


def test_checkpoint_exports_the_ema_weights(tmp_path):
    raw, ema = _randomised(CFG, 1), _randomised(CFG, 2)
    ck = {"config": CFG.to_dict(), "model": raw.state_dict(), "ema": ema.state_dict(), "step": 7, "n_updates": 6,
          "train_config": {"preset": "micro", "data": str(tmp_path / "nodata"), "steps": 10, "batch_size": 4, "lr": 1e-3}}
    path = atomic_save(ck, tmp_path / "ckpt" / "last.pt")
    assert checkpoint_step(path) == 7
    out = save_pretrained(path, tmp_path / "m", stats=_stats(CFG))
    loaded, info = from_pretrained(out)
    b = _batch(CFG, seed=1)
    with torch.no_grad():
        y = loaded(**b)
        assert torch.equal(y, ema(**b)) and not torch.allclose(y, raw(**b))
    assert info["weights"] == "ema" and info["codec"] is None
    assert info["training"] == {"step": 7, "n_updates": 6, "preset": "micro", "data": str(tmp_path / "nodata"),
                                "steps": 10, "batch_size": 4, "lr": 1e-3}
    assert info["stats"].meta == {"source": "test", "n_train": 3}
    # the raw weights on request
    loaded_raw, info_raw = from_pretrained(save_pretrained(ck, tmp_path / "raw", weights="model"))
    with torch.no_grad():
        assert torch.equal(loaded_raw(**b), raw(**b))
    assert info_raw["stats"] is None   # none given and the data folder has none


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    other = preset("micro", hidden_size=64, depth=1, num_heads=2)
    ck = {"config": CFG.to_dict(), "ema": NanoDiT(other).state_dict(), "step": 1}
    with pytest.raises(RuntimeError, match="size mismatch"):
        save_pretrained(ck, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(KeyError, match="no 'ema' weights"):
        save_pretrained({"config": CFG.to_dict(), "model": {}}, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        from_pretrained(tmp_path)
    out = save_pretrained(NanoDiT(CFG), tmp_path / "ok")
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json["model_config"]["warp_drive"] = True
    (out / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match=r"does not know: \['warp_drive'\]"):
        from_pretrained(out)


def test_checkpoint_step_maps_instead_of_reading(tmp_path, monkeypatch):
    path = atomic_save({"step": 123, "ema": {"w": torch.zeros(1000)}}, tmp_path / "a.pt")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    assert checkpoint_step(path) == 123
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    atomic_save({"ema": {}}, tmp_path / "b.pt")
    with pytest.raises(KeyError, match="no 'step' entry"):
        checkpoint_step(tmp_path / "b.pt")
    with pytest.raises(FileNotFoundError):
        checkpoint_step(tmp_path / "c.pt")


def test_cli_export_and_step(tmp_path, capsys):
    ema = _randomised(CFG, 3)
    data = tmp_path / "data"
    data.mkdir()
    _stats(CFG).save(data / "stats.json")
    ck = atomic_save({"config": CFG.to_dict(), "model": ema.state_dict(), "ema": ema.state_dict(), "step": 5,
                      "train_config": {"data": str(data), "steps": 5}}, tmp_path / "last.pt")
    (tmp_path / "metrics.json").write_text(json.dumps({"layout_iou": 0.5, "per_case": [1, 2]}))
    assert main(["export", str(ck), str(tmp_path / "m"), "--metrics", str(tmp_path / "metrics.json")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["files"] == ["README.md", "config.json", "model.safetensors", "stats.json"]
    _, info = from_pretrained(tmp_path / "m")
    assert info["metrics"] == {"layout_iou": 0.5}                       # lists are left out of the card
    assert info["stats"].meta == {"source": "test", "n_train": 3}      # the checkpoint's data folder's stats
    assert main(["step", str(ck)]) == 0 and capsys.readouterr().out.strip() == "5"
    for argv, msg in ((["export", str(tmp_path / "nope.pt"), str(tmp_path / "x")], "checkpoint not found"),
                      (["export", str(ck), str(tmp_path / "x"), "--data", str(tmp_path)], "no stats.json in --data")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert msg in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "EMA (default)" in capsys.readouterr().out


def test_checkpoint_carried_stats_and_codec_win_over_the_data_folder(tmp_path):
    ema = _randomised(CFG, 4)
    data = tmp_path / "data"
    data.mkdir()
    _stats(CFG).save(data / "stats.json")                                # the folder's: no codec, meta source "test"
    own = _stats(CFG)
    own.meta = {"source": "carried"}
    spec = {"kind": "vae", "path": "/models/vae", "scaling_factor": 0.13, "shift_factor": 0.0, "channels": 12,
            "downsample": 8, "dtype": "float32"}
    ck = {"config": CFG.to_dict(), "ema": ema.state_dict(), "step": 3, "train_config": {"data": str(data)},
          "stats": {**own.entries, "meta": own.meta}, "codec": spec}
    _, info = from_pretrained(save_pretrained(ck, tmp_path / "m"))
    assert info["stats"].meta == {"source": "carried"} and info["codec"] == spec
    assert "from /models/vae (scaling 0.13" in (tmp_path / "m" / "README.md").read_text()
    # explicit arguments win over both
    other = ShapesWorld(CFG).codec
    _, info = from_pretrained(save_pretrained(ck, tmp_path / "m2", stats=data / "stats.json", codec=other))
    assert info["stats"].meta == {"source": "test", "n_train": 3} and info["codec"] == spec_of(other)
