"""nbcore.experiment: the schedule gives every arm equal steps, the plateau rule, and the
conclusions say only what the intervals support."""
import json
from dataclasses import replace

import pytest

from nbcore import experiment as ex


@pytest.mark.parametrize("name", sorted(ex.PROFILES))
def test_every_arm_gets_the_same_optimiser_steps(name, tmp_path):
    p = ex.PROFILES[name]
    for arm in p.arms + ex.SECONDARY_ARMS:
        cfg = ex.train_config(p, arm, tmp_path)
        total = cfg.steps + (p.warm_from if arm.init == "warm" else 0)
        assert total == p.steps, arm
        if arm.init == "warm":
            assert cfg.warm_start.endswith(f"baseline/ckpt/step_{p.warm_from:06d}.pt")
            assert cfg.warm_start_lr_scale == 1.0 and cfg.schedule == "constant"
        else:
            assert cfg.warm_start == ""
        mc = cfg.model_config()
        assert mc == p.model_config(arm)                    # the overrides round-trip through TrainConfig
        assert mc.use_dino_patches == arm.is_patch


def test_profile_rejects_a_broken_schedule():
    with pytest.raises(ValueError, match="warm_from"):
        replace(ex.PROFILES["cpu"], warm_from=0)
    with pytest.raises(ValueError, match="multiples"):
        replace(ex.PROFILES["cpu"], warm_from=ex.PROFILES["cpu"].milestone_every + 1)
    with pytest.raises(ValueError, match="baseline"):
        replace(ex.PROFILES["cpu"], arms=ex.HEADLINE_ARMS[1:])


def _ci(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi, "n": 64}


def test_plateau_is_interval_overlap():
    rec = lambda step, m, lo, hi: {"step": step, "recon": {"layout_error": _ci(m, lo, hi)}}
    assert ex.plateau([rec(1, 0.30, 0.25, 0.35), rec(2, 0.28, 0.22, 0.33)])["plateau"]
    assert not ex.plateau([rec(1, 0.40, 0.36, 0.44), rec(2, 0.28, 0.22, 0.33)])["plateau"]
    assert not ex.plateau([rec(1, 0.40, 0.36, 0.44)])["plateau"]


def _res(base_text, arm_diff):
    """A minimal evaluate() result: calibration rows, a baseline and one arm."""
    row = lambda m: {g: {mode: {"layout_error": _ci(m, m - 0.01, m + 0.01)} for mode in ex.MODES} for g in ("off", "on")}
    rows = {"untrained": row(0.52), "layout_blind": row(0.35), "oracle": row(0.0), "baseline": row(base_text),
            "arm": row(base_text)}
    d = {g: {m: {"layout_error": _ci(*arm_diff)} for m in ("recon", "textonly")} for g in ("off", "on")}
    return {"rows": rows, "diffs": {"arm": d}}


def test_conclusions_gate_on_the_baseline_learning_text_layout():
    out = ex.conclusions(_res(0.30, (-0.1, -0.12, -0.08)))          # 0.31 > 0.6 x 0.35: not learned
    assert len(out) == 1 and out[0].startswith("Not yet answered")


def test_conclusions_follow_the_interval():
    better = ex.conclusions(_res(0.15, (-0.10, -0.12, -0.08)))
    assert "learned text layout" in better[0]
    assert "reconstruction lower (better), guidance off" in better[1]
    unclear = ex.conclusions(_res(0.15, (-0.01, -0.05, 0.03)))
    assert "not distinguishable" in unclear[1] and "better" not in unclear[1]
    worse = ex.conclusions(_res(0.15, (0.05, 0.02, 0.08)))
    assert "higher (worse)" in worse[1]


def test_unfinished_arm_is_resumed_not_deleted(tmp_path, monkeypatch):
    """A run interrupted mid-training (arm.json without a summary, same settings) is handed to
    train() again with resume="auto" instead of being deleted; other settings start clean."""
    p = replace(ex.PROFILES["smoke"], arms=(ex.BASELINE,), repeat_seeds=1, workers=1)
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        (ex.arm_dir(tmp_path, ex.BASELINE) / "marker").write_text("kept")
        return {"steps": cfg.steps, "steps_this_run": cfg.steps, "steps_per_s": 1.0, "final_loss": 0.5,
                "skipped": 0}

    monkeypatch.setattr(ex, "train", fake_train)
    monkeypatch.setattr(ex, "_pool", lambda p, device: _InlineExecutor())
    d = ex.arm_dir(tmp_path, ex.BASELINE)
    d.mkdir(parents=True)
    cfg = ex.train_config(p, ex.BASELINE, tmp_path, "cpu")
    (d / "arm.json").write_text(json.dumps({"key": ex._key(cfg)}))
    (d / "partial.txt").write_text("half a run")
    ex.train_arms(p, tmp_path, "cpu")
    assert len(seen) == 1 and seen[0].resume == "auto" and (d / "partial.txt").exists()
    assert json.loads((d / "arm.json").read_text())["summary"]["final_loss"] == 0.5
    ex.train_arms(p, tmp_path, "cpu")                     # finished: reused, not trained again
    assert len(seen) == 1
    ex.train_arms(replace(p, lr=p.lr * 2), tmp_path, "cpu")   # other settings: start clean
    assert len(seen) == 2 and not (d / "partial.txt").exists()


class _InlineExecutor:
    """ProcessPoolExecutor stand-in running each job at submit time (for the scheduling test)."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future
        f = Future()
        f.set_result(fn(*args))
        return f
