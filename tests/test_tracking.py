"""TensorBoard beside log.jsonl: scalars from every train record, a fixed-scene grid per milestone."""
from __future__ import annotations

import pytest


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_training_writes_tensorboard_scalars_and_milestone_grids(tiny_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from nbcore.train import TrainConfig, train
    from nbcore.tracking import TB_DIR
    out = tmp_path / "run"
    cfg = TrainConfig(preset="tiny", data=str(tiny_shards), out=str(out), steps=4, batch_size=4, warmup=1,
                      log_every=1, milestone_every=2, ckpt_every=2, val_sample_steps=1, device="cpu",
                      progress=False, tensorboard=True)
    train(cfg)
    acc = _events(out / TB_DIR)
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    (img_tag,) = tags["images"]
    assert [e.step for e in acc.Images(img_tag)] == [2, 4]       # one grid per milestone
    assert (out / "log.jsonl").is_file()


def test_tensorboard_is_off_by_default(tiny_shards, tmp_path):
    from nbcore.train import TrainConfig, train
    from nbcore.tracking import TB_DIR
    train(TrainConfig(preset="tiny", data=str(tiny_shards), out=str(tmp_path / "r"), steps=1, batch_size=4,
                      warmup=0, device="cpu", progress=False))
    assert not (tmp_path / "r" / TB_DIR).exists()


def test_the_suite_turns_tensorboard_on_for_its_arms(tmp_path):
    from nbcore.experiment import BASELINE, PROFILES, train_config
    assert train_config(PROFILES["smoke"], BASELINE, tmp_path).tensorboard


@pytest.mark.slow
def test_a_warm_started_run_continues_its_source_steps(tiny_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from nbcore.train import TrainConfig, train
    from nbcore.tracking import TB_DIR
    kw = dict(preset="tiny", data=str(tiny_shards), batch_size=4, warmup=0, log_every=1, device="cpu", progress=False)
    src = train(TrainConfig(out=str(tmp_path / "a"), steps=3, **kw))["checkpoint"]
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, warm_start=src, tensorboard=True, **kw))
    assert [e.step for e in _events(tmp_path / "b" / TB_DIR).Scalars("train/loss")] == [4, 5]
