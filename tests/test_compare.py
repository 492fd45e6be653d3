"""python -m nbcore.runner compare RUN_A RUN_B: one table and one figure, written beside the runs."""
from __future__ import annotations

import json


def _ci(mean, hw=0.01):
    return {"mean": mean, "lo": mean - hw, "hi": mean + hw}


def _eval(run_dir, base, tied, diff):
    rows = {}
    for row, m in (("layout_blind", 0.298), ("baseline", base), ("tied+context", tied)):
        rows[row] = {g: {"recon": {"layout_error": _ci(m)}, "textonly": {"layout_error": _ci(m + 0.01)},
                         "swap_dino": None} for g in ("off", "on")}
    diffs = {"tied+context": {g: {mo: {"layout_error": _ci(diff, 0.005)} for mo in ("recon", "textonly")}
                              for g in ("off", "on")}}
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps({"settings": {"n": 256, "steps": 12, "guidance": [3.0, 2.0],
                                                                 "arms": ["baseline", "tied+context"]},
                                                    "rows": rows, "diffs": diffs}))
    return run_dir


def test_compare_writes_table_and_figure_beside_the_runs(tmp_path, capsys):
    from nbcore.runner import main
    a = _eval(tmp_path / "runs" / "cpu", 0.163, 0.002, -0.162)
    b = _eval(tmp_path / "runs" / "cpu-coarse", 0.163, 0.111, -0.052)
    assert main(["compare", str(a), str(b)]) == 0
    out = tmp_path / "runs" / "compare" / "cpu_vs_cpu-coarse"
    md = (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 1000
    line = next(l for l in md.splitlines() if l.startswith("| tied+context | recon, guided"))
    assert "0.002 [-0.008, 0.012]" in line and "0.111 [0.101, 0.121]" in line
    assert "+0.109 [+0.095, +0.123]" in line                     # unpaired: hypot of the half-widths
    assert "-0.162 [-0.167, -0.157]" in line and "-0.052 [-0.057, -0.047]" in line
    assert "**not paired**" in md and "lower is better" in md
    assert "| tied+context |" in capsys.readouterr().out


def test_compare_says_what_is_missing(tmp_path):
    import pytest
    from nbcore.runner import main
    a = _eval(tmp_path / "a", 0.1, 0.1, 0.0)
    with pytest.raises(SystemExit, match="eval.json not found"):
        main(["compare", str(a), str(tmp_path / "nothing")])
