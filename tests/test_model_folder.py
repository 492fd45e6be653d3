"""The one loader: ``NanoDiT.from_pretrained`` reads a model folder or a training checkpoint and
``model.save_pretrained`` writes the folder; encoder folders are stored relative to the model folder,
so a folder moved together with its encoders still finds them."""
from __future__ import annotations

import json
import shutil

import torch

from nbcore.model import NanoDiT, preset
from nbcore.stats import Stats
from nbcore.utils import atomic_save

CFG = preset("micro", hidden_size=32, depth=1, num_heads=2)


def _randomised(seed):
    torch.manual_seed(seed)
    m = NanoDiT(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.eval()


def _stats(meta):
    entries = {name: {"mean": [0.0] * d, "std": [1.0] * d, "count": 2}
               for name, d in (("dinov3", CFG.dino_dim), ("dinov3_patches", CFG.dino_dim), ("t5", CFG.text_dim))}
    return Stats(entries, meta)


def test_checkpoint_and_folder_load_the_same_model(tmp_path):
    raw, ema = _randomised(0), _randomised(1)
    ck = atomic_save({"config": CFG.to_dict(), "model": raw.state_dict(), "ema": ema.state_dict(), "step": 5},
                     tmp_path / "ck.pt")
    model, info = NanoDiT.from_pretrained(ck, output_loading_info=True)
    assert info["format"] == "checkpoint" and info["weights"] == "ema" and info["step"] == 5
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.state_dict().items()) and not model.training
    plain = NanoDiT.from_pretrained(ck, weights="model")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in raw.state_dict().items())
    folder = model.save_pretrained(tmp_path / "m")
    again, info = NanoDiT.from_pretrained(folder, output_loading_info=True)
    assert info["format"] == "pretrained" and again.cfg == CFG
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_encoder_folders_travel_with_the_model_folder(tmp_path):
    site = tmp_path / "site"
    for name in ("vae", "dino", "t5"):
        (site / "encoders" / name).mkdir(parents=True)
    vae = {"kind": "vae", "path": str(site / "encoders" / "vae"), "scaling_factor": 0.5, "shift_factor": 0.0,
           "channels": CFG.in_channels, "downsample": 8, "dtype": "float32"}
    meta = {"source": "nbcore.encoders.precompute", "codec": vae,
            "encoders": {w: {"path": str(site / "encoders" / w), "dtype": "float32"} for w in ("dino", "t5")}}
    _randomised(0).save_pretrained(site / "models" / "m", stats=_stats(meta))
    stored = json.loads((site / "models" / "m" / "config.json").read_text())
    assert stored["codec"]["path"] == "../../encoders/vae"                        # no absolute path in the folder
    assert "/site/" not in (site / "models" / "m" / "stats.json").read_text()
    moved = tmp_path / "elsewhere"
    shutil.move(str(site), str(moved))                                            # another machine's layout
    _, info = NanoDiT.from_pretrained(moved / "models" / "m", output_loading_info=True)
    assert info["codec"]["path"] == str((moved / "encoders" / "vae").resolve())
    assert info["stats"].meta["encoders"]["dino"]["path"] == str((moved / "encoders" / "dino").resolve())
    assert info["stats"].meta["codec"]["path"] == str((moved / "encoders" / "vae").resolve())
