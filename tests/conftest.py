"""Shared fixtures.

``tiny_shards``: a shapes-world dataset at the tiny preset (64 train samples in 4 shards of 16,
16 val samples in 1 shard, seed 0) plus stats.json, written once per test session. Returns the
folder; use ``nbcore.data.shard_list(folder, "train")`` for the shard paths.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    from nbcore.shapes import make_dataset
    out = tmp_path_factory.mktemp("tiny_shards")
    return make_dataset(out, n=80, seed=0, preset="tiny", val_fraction=0.2, shard_size=16, progress=False)
