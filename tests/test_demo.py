"""The DINO-swap demo (``nbcore.demo``): sources from shapes-world scenes and from the user's own
image files and typed captions, one conditioning path through ``DataEncoders`` for the shapes world
and the real encoders, the layout metric, the headless grid and the widget.

Models are random (never trained): the tests check plumbing and exact values of the conditioning,
not image quality. The real-encoder tests use the PLUMBING STAND-INS of ``real_encoder_dirs``.
"""
import json
import math
from dataclasses import replace

import pytest
import torch

from nbcore.data import Stats
from nbcore.demo import Demo, Source, WIDGET_LABELS, build_widget, swap_figure, swap_layout, val_scenes
from nbcore.encoders import data_encoders, precompute
from nbcore.metrics import MISS_PENALTY, shape_layout
from nbcore.model import CONDITION_KEYS, ModelConfig, NanoDiT
from nbcore.pretrained import save_pretrained
from nbcore.shapes import ShapesWorld, render
from nbcore.utils import atomic_save

# a random model at the sizes of the tiny_shards world (64 px, 12 x 32 x 32 latents, 8 x 8 patches)
SHAPES_CFG = ModelConfig(in_channels=12, input_size=32, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                         text_dim=64, text_len=32, dino_dim=64, dino_grid=8, patch_pos_embed="sincos")
# a random model at the sizes of the stand-in real encoders on 32 px images (VAE 2x: 4 x 16 x 16
# latents; DINOv3 16 px patches on its 224 px view: 14 x 14 patches of 32; T5 d_model 16)
REAL_CFG = ModelConfig(in_channels=4, input_size=16, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                       text_dim=16, text_len=64, dino_dim=32, dino_grid=14, patch_pos_embed="sincos")


def _model(cfg: ModelConfig) -> NanoDiT:
    torch.manual_seed(0)
    return NanoDiT(cfg).eval()


@pytest.fixture(scope="module")
def shapes_model_dir(tiny_shards, tmp_path_factory):
    return save_pretrained(_model(SHAPES_CFG), tmp_path_factory.mktemp("demo") / "shapes_model",
                           stats=tiny_shards / "stats.json")


@pytest.fixture(scope="module")
def real_shards(real_encoder_dirs, shapes_image_folder, tmp_path_factory):
    d = real_encoder_dirs
    out = tmp_path_factory.mktemp("demo") / "real_shards"
    precompute(shapes_image_folder, out, d["dino"], d["t5"], d["vae"], image_size=32, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def real_model_dir(real_shards, tmp_path_factory):
    return save_pretrained(_model(REAL_CFG), tmp_path_factory.mktemp("demo") / "real_model",
                           stats=real_shards / "stats.json")


# --------------------------------------------------------------------------- the metric

def test_swap_layout_scores_each_side_against_its_scene():
    """A swap image that is the DINO source's scene follows the DINO (error 0 against it); a pair
    whose side has no scene is not scored there, and the result says why."""
    a, b = val_scenes(2, seed=3, rules="easy")
    imgs = torch.stack([render(b, 32), render(a, 32)])                                 # pair 0 = B, pair 1 = A
    m = swap_layout(imgs, [a, a], [b, b])
    assert m["layout_error_vs_dino_scene"] == pytest.approx(
        (0.0 + shape_layout(imgs[1:], [b])["layout_error"]) / 2, abs=1e-6)
    assert m["pairs"] == 2 and m["follows_dino_rate"] == 0.5 and m["follows_text_rate"] == 0.5
    assert m["tie_rate"] == 0.0 and m["unscored"] is None
    m = swap_layout(imgs, [None, a], [b, None])
    assert m["pairs"] == 0 and m["follows_dino_rate"] is None and m["tie_rate"] is None
    assert m["layout_error_vs_dino_scene"] == 0.0 and m["layout_error_vs_text_scene"] == 0.0
    assert m["unscored"] == ("layout is scored against shapes-world scenes only: text: 1 of 2 captions describe "
                             "no known scene; DINO: 1 of 2 images show no known scene")
    m = swap_layout(imgs, [None, None], [None, None])
    assert m["layout_error_vs_text_scene"] is None and m["shape_recall_vs_dino_scene"] is None
    with pytest.raises(ValueError, match="1 text and 2 DINO scenes for 2 images"):
        swap_layout(imgs, [a], [a, b])


def test_val_scenes_are_the_worlds_val_stream():
    world = ShapesWorld(SHAPES_CFG, seed=5, rules="easy")
    assert [s.to_json() for s in val_scenes(4, 5, "easy")] == [world.scene(i, "val").to_json() for i in range(4)]


def test_source_needs_something_and_reads_a_scene_dict():
    with pytest.raises(ValueError, match="needs an image, a caption, or both"):
        Source(caption="  ")
    s = Source(caption="x", scene=val_scenes(1)[0].to_json())
    assert s.scene.to_json() == val_scenes(1)[0].to_json() and s.label == "x"
    assert Source(image="dir/cat.png").label == "cat.png" == Source(image="dir/cat.png").image_label
    assert Source(image="dir/cat.png", caption="a cat").label == "cat.png: a cat"
    assert Source(caption="a cat").image_label is None
    scene = val_scenes(1)[0]
    own = Source(image="a.png", caption=scene.caption(), scene=scene)
    assert own.text_scene() is scene and own.image_scene() is scene
    typed = Source(image="a.png", caption="a cat", scene=scene)                       # typed text over a scene image
    assert typed.text_scene() is None and typed.image_scene() is scene
    assert Source(caption=scene.caption(), scene=scene).image_scene() is None


# --------------------------------------------------------------------------- the shapes world (default)

@pytest.mark.slow
def test_shapes_world_swap_from_a_model_folder(shapes_model_dir, tiny_shards):
    """The default world from a save_pretrained folder: scene sources drawn by the data's rules,
    conditions = the world's encoders + the data's stats, images in [0, 1], the layout metric on
    both scenes, a seed that repeats its images."""
    demo = Demo.load(shapes_model_dir, device="cpu", n_scenes=4, world_seed=0)
    assert demo.encoders.kind == "shapes" and demo.info["format"] == "pretrained" and len(demo.sources) == 4
    world = ShapesWorld(SHAPES_CFG, seed=0, rules=demo.stats.meta.get("rules", "standard"))
    scenes = [world.scene(i, "val") for i in range(4)]
    assert [s.scene.to_json() for s in demo.sources] == [s.to_json() for s in scenes]
    res = demo.swap([0, 2], [1, 3], steps=2, seed=1)
    ref = world.encode(world.render_batch([scenes[1], scenes[3]]), [scenes[0].caption(), scenes[2].caption()])
    ref = Stats.load(tiny_shards / "stats.json").normalise_condition({k: ref[k] for k in CONDITION_KEYS})
    for k in CONDITION_KEYS:
        torch.testing.assert_close(res["condition"][k].cpu(), ref[k], atol=1e-6, rtol=1e-6)
    for name in ("text_source", "dino_source", "swap", "text_only", "dino_only"):
        x = res["images"][name]
        assert x.shape == (2, 3, 64, 64) and 0 <= x.min() and x.max() <= 1, name
    torch.testing.assert_close(res["images"]["text_source"], world.render_batch([scenes[0], scenes[2]]))
    m = res["metrics"]
    assert m["unscored"] is None and m["pairs"] == 2
    for side in ("text", "dino"):                                                      # float32 sums: 1e-6
        assert 0 <= m[f"layout_error_vs_{side}_scene"] <= MISS_PENALTY + 1e-6
    assert m["follows_dino_rate"] + m["follows_text_rate"] + m["tie_rate"] == pytest.approx(1.0)
    again = demo.swap([0, 2], [1, 3], steps=2, seed=1)
    assert all(torch.equal(res["images"][k], again["images"][k]) for k in res["images"])
    other = demo.swap([0, 2], [1, 3], steps=2, seed=2, references=False)
    assert not torch.equal(other["images"]["swap"], res["images"]["swap"]) and "text_only" not in other["images"]
    assert demo.grid_pairs(2) == ([0, 1], [2, 3])
    with pytest.raises(ValueError, match="needs 6 scenes, the demo has 4"):
        demo.grid_pairs(3)
    with pytest.raises(ValueError, match="text source 9 out of range: the demo has 4 sources"):
        demo.swap(9, 0)
    with pytest.raises(ValueError, match="2 text sources but 1 DINO sources"):
        demo.swap([0, 1], 2)


@pytest.mark.slow
def test_training_checkpoint_stats_preferred_over_its_data_folder(tmp_path, tiny_shards):
    """A training checkpoint's own ``stats`` entry is used when present; else its data folder's."""
    model = _model(SHAPES_CFG)
    sd = model.state_dict()
    st = json.loads((tiny_shards / "stats.json").read_text())
    carried = {**st, "t5": {**st["t5"], "mean": [v + 1.0 for v in st["t5"]["mean"]]}}
    base = {"config": SHAPES_CFG.to_dict(), "model": sd, "ema": sd, "step": 3,
            "train_config": {"data": str(tiny_shards)}}
    atomic_save({**base, "stats": carried}, tmp_path / "carries.pt")
    atomic_save(base, tmp_path / "folder.pt")
    a = Demo.load(tmp_path / "carries.pt", device="cpu", n_scenes=2)
    b = Demo.load(tmp_path / "folder.pt", device="cpu", n_scenes=2)
    assert a.info["format"] == "checkpoint" and a.info["step"] == 3
    assert a.stats.entries["t5"]["mean"] == carried["t5"]["mean"] and b.stats.entries["t5"] == st["t5"]
    atomic_save({**base, "train_config": {"data": str(tmp_path / "gone")}}, tmp_path / "lost.pt")
    with pytest.raises(FileNotFoundError, match="its training data stats .* are missing"):
        Demo.load(tmp_path / "lost.pt", device="cpu")


@pytest.mark.slow
def test_widget_renders_and_takes_a_typed_caption(shapes_model_dir, tmp_path):
    pytest.importorskip("ipywidgets")
    demo = Demo.load(shapes_model_dir, device="cpu", n_scenes=2)
    panel = build_widget(demo, steps=1)
    assert tuple(panel.controls) == WIDGET_LABELS
    first = panel.image.value
    assert len(first) > 1000 and "layout error vs text scene" in panel.status.value
    panel.controls["typed caption"].value = "a large red circle at the top left"     # re-renders
    assert panel.image.value != first and "text: 1 of 1 captions describe no known scene" in panel.status.value
    panel.controls["DINO image file"].value = str(tmp_path / "missing.png")
    assert "error: FileNotFoundError: source image not found" in panel.status.value


# --------------------------------------------------------------------------- the user's material, real encoders

@pytest.mark.slow
def test_real_encoders_swap_from_two_image_files_and_a_typed_caption(real_model_dir, real_shards,
                                                                      shapes_image_folder):
    """A model folder whose data was precomputed with the real encoders: the demo loads the
    recorded DINOv3 / T5 / VAE folders, swaps from image files and a typed caption, and its
    conditions equal re-encoding the same files through ``DataEncoders``."""
    demo = Demo.load(real_model_dir, device="cpu", n_scenes=0)
    assert demo.encoders.kind == "real" and demo.sources == []
    files = sorted(shapes_image_folder.glob("*.png"))[:2]
    caption = files[0].with_suffix(".txt").read_text()
    i = demo.add_source(files[0], caption)
    j = demo.add_source(files[1])
    assert (i, j) == (0, 1) and demo.sources[j].scene is not None                      # its scene_NNNNNN.json
    typed = "a large green square at the bottom right"
    res = demo.swap([Source(caption=typed), i], [j, j], steps=2, seed=0)

    enc = data_encoders(real_shards / "stats.json", device="cpu")
    images = enc.load([files[1], files[1]])                                            # (2, 3, 32, 32)
    ref = enc.condition(images, [typed, caption])
    for k in CONDITION_KEYS:
        torch.testing.assert_close(res["condition"][k].cpu(), ref[k], atol=1e-6, rtol=1e-6)
    for name, x in res["images"].items():
        assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1, name
    assert torch.equal(res["images"]["text_source"][0], torch.ones(3, 32, 32))         # a typed caption: no image
    torch.testing.assert_close(res["images"]["text_source"][1], enc.load([files[0]])[0])
    assert res["text"] == [typed, caption] and res["dino_image"] == [files[1].name] * 2
    m = res["metrics"]
    assert m["pairs"] == 1 and m["unscored"].endswith("text: 1 of 2 captions describe no known scene")
    assert 0 <= m["layout_error_vs_dino_scene"] <= MISS_PENALTY + 1e-6
    again = demo.swap([Source(caption=typed), i], [j, j], steps=2, seed=0)
    assert all(torch.equal(res["images"][k], again["images"][k]) for k in res["images"])
    assert demo.grid_pairs(4) == ([0, 0], [1, 0])                                        # text 0 with images 1, 0
    assert math.isfinite(swap_figure(res).get_size_inches()[0])
    with pytest.raises(ValueError, match="DINO source 'a large green square .*' has no image"):
        demo.swap(i, Source(caption=typed))
    with pytest.raises(ValueError, match=r"text source 'scene_000001.png' has no caption"):
        demo.swap(j, j)


@pytest.mark.slow
def test_real_encoders_from_given_folders_and_refusals(real_model_dir, real_encoder_dirs, tmp_path, shapes_image_folder):
    """Folders given explicitly win over the recorded ones; encoders of other sizes than the model's,
    a bad image file and a tensor of the wrong size are refused in one line."""
    d = real_encoder_dirs
    st = Stats.load(real_model_dir / "stats.json")
    st.meta["encoders"]["dino"]["path"] = str(tmp_path / "gone")                     # the recorded folder moved
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in real_model_dir.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    st.save(moved / "stats.json")
    with pytest.raises(FileNotFoundError, match="pass --dino DIR"):
        Demo.load(moved, device="cpu", n_scenes=0)
    demo = Demo.load(moved, device="cpu", n_scenes=2, dino=d["dino"], t5=d["t5"], vae=d["vae"])
    assert len(demo.sources) == 2 and demo.sources[0].image.shape == (3, 32, 32)    # scenes at the data's size
    wide = save_pretrained(_model(replace(REAL_CFG, dino_dim=64)), tmp_path / "wide", stats=moved / "stats.json")
    with pytest.raises(ValueError, match=r"the real encoders do not fit the model: dino_dim 32 \(model: 64\); pass"):
        Demo.load(wide, device="cpu", n_scenes=0, dino=d["dino"])
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        demo.add_source(bad, "x")
    with pytest.raises(ValueError, match=r"must be \(3, 32, 32\)"):
        demo.add_source(torch.zeros(3, 8, 8))
    idx = demo.add_material([sorted(shapes_image_folder.glob("*.png"))[0]], ["a caption", "typed only"])
    assert idx == [2, 3] and demo.sources[3].image is None
    assert demo.grid_pairs(1) == ([2], [2])
