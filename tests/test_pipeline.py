"""nbcore.pipeline: a model folder to images in one call; the model card; the stand-ins CLI."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def shapes_model_folder(tiny_shards, tmp_path_factory):
    """A save_pretrained folder of a tiny model with random weights (none zero, so every condition
    reaches the output) and the tiny shards' statistics."""
    from nbcore.model import NanoDiT, preset
    from nbcore.pretrained import save_pretrained
    torch.manual_seed(0)
    model = NanoDiT(preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_pretrained(model, tmp_path_factory.mktemp("model"), stats=tiny_shards / "stats.json")


def test_pipeline_from_folder_to_images(shapes_model_folder):
    from PIL import Image
    from nbcore.pipeline import NanoDiTPipeline
    from nbcore.shapes import render, sample_scene, RULES
    import numpy as np
    pipe = NanoDiTPipeline.from_pretrained(shapes_model_folder, device="cpu")
    scene = sample_scene(np.random.default_rng(0), rules=RULES["easy"])
    src = render(scene, pipe.encoders.image_size)                                       # (3, S, S)
    images = pipe("a large red circle in the centre", dino_image=src, seed=0, steps=2, num_images=2)
    assert len(images) == 2 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].size == (pipe.encoders.image_size,) * 2
    a = pipe("a large red circle in the centre", seed=3, steps=2, output_type="pt")   # text only
    b = pipe("a large red circle in the centre", seed=3, steps=2, output_type="pt")
    assert torch.equal(a, b)                                                            # seeded
    c = pipe(None, dino_image=src, seed=3, steps=2, output_type="pt")                   # DINO only
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="caption, a dino_image or both"):
        pipe(None)


def test_generate_cli_and_card(shapes_model_folder, tmp_path, capsys):
    from nbcore.cli.generate import main
    out = tmp_path / "g.png"
    assert main([str(shapes_model_folder), "a small blue square", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["images"] == [str(out)] and out.is_file() and rec["guidance"] == "nested(text=3.0, dino=2.0)"
    with pytest.raises(SystemExit) as e:
        main([str(shapes_model_folder), "--steps", "2"])
    assert e.value.code == 2


@pytest.mark.slow
def test_card_has_metadata_limitations_samples_and_a_shapes_banner(shapes_model_folder):
    import yaml
    from nbcore.pipeline import write_card_samples
    path = write_card_samples(shapes_model_folder, n=2, steps=2)
    card = (shapes_model_folder / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "nbcore" and meta["stand_in_encoders"] == "shapes" and "shapes-world" in meta["tags"]
    assert "> **Shapes world.**" in card and "## Intended use" in card and "## Limitations" in card
    assert path.name == "samples.png" and "](samples.png)" in card


def test_plumbing_stand_ins_are_marked_and_bannered(tmp_path):
    from nbcore.model_folder import model_card, stand_in_kind
    data = {"source": "nbcore.encoders.precompute", "encoders": {"dino": {"path": "x", "stand_in": True}}}
    assert stand_in_kind(data) == "plumbing" and stand_in_kind({"source": "nbcore.encoders.precompute"}) is None
    from nbcore.model import preset
    cfg = {"model_config": preset("tiny").to_dict(), "weights": "ema", "data": data, "training": {"step": 2}}
    card = model_card(cfg, 10)
    assert "> **Plumbing stand-ins.**" in card and "- plumbing-stand-in" in card


@pytest.mark.slow
def test_stand_ins_cli_writes_marked_encoders_and_images(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from nbcore.cli.encoders import main
    from nbcore.encoders import STAND_IN_MARKER
    assert main(["stand-ins", str(tmp_path / "si"), "--images", "3"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("dino", "t5", "vae"):
        assert (tmp_path / "si" / k / STAND_IN_MARKER).is_file()
    assert len(list((tmp_path / "si" / "images").glob("*.png"))) == 3 and "plumbing" in rec["note"]
