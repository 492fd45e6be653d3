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


def test_milestone_scores_reach_the_arms_tensorboard(tmp_path):
    """notebook 05's milestone scores (experiment.milestones) land beside the arm's training scalars,
    on total optimiser steps; an arm trained without tracking gets no TensorBoard folder."""
    pytest.importorskip("tensorboard")
    from nbcore.experiment import _milestones_to_tensorboard
    from nbcore.tracking import TB_DIR
    ci = lambda m: {"mean": m, "lo": m - 0.1, "hi": m + 0.1, "n": 8}
    recs = [{"step": s, "recon": {"layout_error": ci(0.5 / s)}, "textonly": {"layout_error": ci(1.0 / s),
                                                                             "mask_iou": {"mean": None}}}
            for s in (300, 600)]
    _milestones_to_tensorboard(tmp_path / "untracked", recs)
    assert not (tmp_path / "untracked" / TB_DIR).exists()
    (tmp_path / "arm" / TB_DIR).mkdir(parents=True)
    _milestones_to_tensorboard(tmp_path / "arm", recs)
    acc = _events(tmp_path / "arm" / TB_DIR)
    assert set(acc.Tags()["scalars"]) == {"milestones/recon_layout_error", "milestones/textonly_layout_error"}
    got = [(e.step, round(e.value, 6)) for e in acc.Scalars("milestones/textonly_layout_error")]
    assert got == [(300, round(1 / 300, 6)), (600, round(1 / 600, 6))]
