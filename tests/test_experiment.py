"""nbcore.experiment: the schedule gives every arm equal steps and its own seed's baseline, the
plateau test, and the conclusions say only what every seed's interval supports."""
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
            seeded = ex.train_config(p, replace(arm, seed=1), tmp_path)   # its own seed's baseline
            assert seeded.warm_start.endswith(f"baseline-seed1/ckpt/step_{p.warm_from:06d}.pt") and seeded.seed == 1
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


def test_runs_cover_every_arm_and_seed():
    p = replace(ex.PROFILES["cpu"], seeds=3)
    got = [a.run for a in ex.runs(p)]
    assert len(got) == 3 * len(p.arms) and len(set(got)) == len(got)
    assert "baseline" in got and "baseline-seed2" in got and "tied+context-seed1" in got


def test_plateau_test_is_a_paired_difference_that_can_fail():
    res = lambda lo, hi: {"plateau": {"a": {"steps": [2100, 2400], "layout_error": _ci((lo + hi) / 2, lo, hi)}}}
    assert ex.plateau(res(-0.01, 0.01), "a")["plateau"]                      # no paired change: a plateau
    still = ex.plateau(res(-0.03, -0.01), "a")                               # still falling: a floor
    assert not still["plateau"] and still["still_improving"]
    assert not ex.plateau(res(-0.01, 0.01), "b")["plateau"]                  # one milestone: no test


def _res(base_text, arm_diff, seed1_diff=None):
    """A minimal evaluate() result: calibration rows, a baseline and one arm, with two seeds when
    ``seed1_diff`` is given."""
    row = lambda m: {g: {mode: {"layout_error": _ci(m, m - 0.01, m + 0.01)} for mode in ex.MODES} for g in ("off", "on")}
    diff = lambda c: {g: {m: {"layout_error": _ci(*c)} for m in ("recon", "textonly", "dinoonly")} for g in ("off", "on")}
    runs = ["baseline", "arm"] + (["baseline-seed1", "arm-seed1"] if seed1_diff else [])
    rows = {"untrained": row(0.52), "layout_blind": row(0.35), "oracle": row(0.0), **{r: row(base_text) for r in runs}}
    diffs = {"arm": diff(arm_diff), **({"arm-seed1": diff(seed1_diff)} if seed1_diff else {})}
    return {"rows": rows, "diffs": diffs, "settings": {"arms": runs}}


def test_conclusions_gate_on_the_baseline_learning_text_layout():
    out = ex.conclusions(_res(0.30, (-0.1, -0.12, -0.08)))          # 0.31 > 0.6 x 0.35: not learned
    assert len(out) == 1 and out[0].startswith("Not yet answered")


def test_conclusions_follow_the_interval():
    better = ex.conclusions(_res(0.15, (-0.10, -0.12, -0.08)))
    assert "learned text layout" in better[0]
    assert "reconstruction, guidance off: lower in every seed" in better[1]
    unclear = ex.conclusions(_res(0.15, (-0.01, -0.05, 0.03)))
    assert "not established" in unclear[1] and "lower" not in unclear[1]
    worse = ex.conclusions(_res(0.15, (0.05, 0.02, 0.08)))
    assert "higher in every seed" in worse[1]


def test_an_effect_is_stated_only_when_every_seed_agrees():
    both = ex.conclusions(_res(0.15, (-0.10, -0.12, -0.08), (-0.06, -0.09, -0.03)))
    assert "paired, 2 seeds)" in both[1] and "reconstruction, guidance on: lower in every seed" in both[1]
    one = ex.conclusions(_res(0.15, (-0.10, -0.12, -0.08), (-0.01, -0.04, 0.02)))
    assert "reconstruction, guidance on: not established" in one[1] and "lower in every seed" not in one[1]
    assert "-0.100 [-0.120, -0.080]; -0.010 [-0.040, +0.020]" in one[1]    # both seeds shown


def test_unfinished_arm_is_resumed_not_deleted(tmp_path, monkeypatch):
    """A run interrupted mid-training (arm.json without a summary, same settings) is handed to
    train() again with resume="auto" instead of being deleted; other settings start clean."""
    p = replace(ex.PROFILES["smoke"], arms=(ex.BASELINE,), seeds=1, workers=1)
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


def test_unplaced_swap_pairs_scenes_with_as_many_shapes():
    from nbcore.shapes import Scene, Shape
    one = lambda x: Scene([Shape("circle", "red", x, 0.5, "small")])
    two = Scene([Shape("square", "blue", 0.2, 0.2, "large"), Shape("circle", "green", 0.8, 0.8, "small")])
    scenes = [one(0.2), two, one(0.7), two]
    assert ex._same_count_partner(scenes).tolist() == [2, 3, 0, 1]
    assert two.caption(places=False) == "a large blue square and a small green circle"
    assert "top" in two.caption() and "left" in two.caption()
