"""Shared fixtures.

``tiny_shards``: a shapes-world dataset at the tiny preset (64 train samples in 4 shards of 16,
16 val samples in 1 shard, seed 0) plus stats.json, written once per test session. Returns the
folder; use ``nbcore.data.shard_list(folder, "train")`` for the shard paths.

``real_encoder_dirs``: PLUMBING STAND-INS of the real encoders (``nbcore.encoders.tiny_random_encoders``:
tiny randomly initialised DINOv3 ViT, T5 encoder + tokenizer, AutoencoderKL saved to local folders),
built once per session: {"dino", "t5", "vae"} -> folder. Building them takes seconds: tests using
them are marked slow.

``shapes_image_folder``: 24 easy-rule shapes-world scenes at 32 px as ``scene_NNNNNN.png`` + ``.txt``
caption + ``.json`` scene (``nbcore.shapes.write_image_folder``), once per session.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    from nbcore.shapes import make_dataset
    out = tmp_path_factory.mktemp("tiny_shards")
    return make_dataset(out, n=80, seed=0, preset="tiny", val_fraction=0.2, shard_size=16, progress=False)


@pytest.fixture(scope="session")
def real_encoder_dirs(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from nbcore.encoders import tiny_random_encoders
    return tiny_random_encoders(tmp_path_factory.mktemp("real_encoders"))


@pytest.fixture(scope="session")
def shapes_image_folder(tmp_path_factory):
    from nbcore.shapes import write_image_folder
    return write_image_folder(tmp_path_factory.mktemp("shapes_images") / "imgs", 24, image_size=32, rules="easy")
