"""nbcore.report: README's research section is generated from committed results, and README holds
exactly what the committed results give."""
import json
from pathlib import Path

import pytest

from nbcore import experiment as ex, report
from nbcore.utils import repo_root

ROOT = repo_root(Path(report.__file__).parent)
RESULTS = ROOT / "docs" / "results" / "cpu"


def _ci(m, lo, hi):
    return {"mean": m, "lo": lo, "hi": hi, "n": 256}


def _fake_run(tmp_path: Path) -> Path:
    """A finished run folder as the runner and notebook 05 leave it (numbers invented for the test)."""
    row = lambda m: {g: {mode: {"layout_error": _ci(m, m - 0.01, m + 0.01)} for mode in ex.MODES} for g in ("off", "on")}
    diff = lambda c: {g: {m: {"layout_error": _ci(*c)} for m in ("recon", "textonly", "dinoonly")} for g in ("off", "on")}
    runs = ["baseline", "patch-sincos", "baseline-seed1", "patch-sincos-seed1"]
    res = {"settings": {"n": 256, "steps": 12, "guidance": [3.0, 2.0], "arms": runs},
           "rows": {"untrained": row(0.52), "layout_blind": row(0.30), "oracle": row(0.0),
                    **{r: row(0.15) for r in runs}},
           "diffs": {"patch-sincos": diff((-0.05, -0.07, -0.03)), "patch-sincos-seed1": diff((-0.01, -0.03, 0.01))},
           "plateau": {r: {"steps": [2100, 2400], "layout_error": _ci(-0.02, -0.03, -0.01) if r == "patch-sincos-seed1"
                           else _ci(0.0, -0.01, 0.01)} for r in runs}}
    run = tmp_path / "run"
    (run / "05_milestones").mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps(res))
    (run / "05_milestones" / "metrics.json").write_text(json.dumps({"metrics": {"best_patch_arm": "patch-sincos"}}))
    (run / "05_milestones" / "worst_scenes.png").write_bytes(b"png")
    meta = {"meta": {"name": "cpu", "profile": "cpu", "params": {}, "started": "2026-12-06 11:00:00", "wall_s": 1234.5,
                     "commit": "abc123", "machine": {"description": "2 cores"}},
            "notebooks": {"05_milestones": {"status": "ok", "time_s": 300.0, "figures": []}}}
    (run / "run.json").write_text(json.dumps(meta))
    return run


def test_section_is_made_from_the_results_folder_alone(tmp_path):
    dest = report.collect(_fake_run(tmp_path), tmp_path / "results")
    assert sorted(p.name for p in dest.iterdir()) == ["eval.json", "run.json", "worst_scenes.png"]
    text = report.research_section(dest, link="docs/results/cpu")
    assert text.startswith(report.BEGIN) and text.endswith(report.END)
    assert "commit `abc123` on 2 cores" in text and "**1234 s** wall time" in text
    assert "| patch, sin-cos, warm + gate (the warm-start path), seed 1 |" in text
    assert "**-0.050 [-0.070, -0.030]**" in text and "-0.010 [-0.030, +0.010] |" in text   # bold only when 0 is out
    assert "reconstruction, guidance on: not established" in text                         # the seeds disagree
    assert "(still improving)" in text and "floors on what they reach: patch-sincos-seed1" in text
    assert "![the best patch arm's worst-scoring scenes beside their sources](docs/results/cpu/worst_scenes.png)" in text


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    assert report.update_readme(readme, f"{report.BEGIN}\nnew\n{report.END}")
    assert readme.read_text() == f"# title\n\nbefore\n{report.BEGIN}\nnew\n{report.END}\nafter\n"
    assert not report.update_readme(readme, f"{report.BEGIN}\nnew\n{report.END}")        # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, "x")


def test_readme_research_section_is_what_the_committed_results_give():
    """README's tables and sentences are generated: rerun `python -m nbcore.runner report
    outputs/runs/cpu` after a run; a hand edit or a stale table fails here."""
    want = report.research_section(RESULTS, link="docs/results/cpu")
    assert report.readme_section(ROOT / "README.md") == want
    res = json.loads((RESULTS / "eval.json").read_text())
    meta = json.loads((RESULTS / "run.json").read_text())
    assert meta["meta"]["profile"] == "cpu" and meta["meta"]["status"] == "ok"
    assert set(ex.seed_groups(res)) == {a.name for a in ex.PROFILES["cpu"].arms}              # every headline arm
    assert all(len(seeds) >= 2 for seeds in ex.seed_groups(res).values())                  # with >= 2 seeds


BENCH = ROOT / "docs" / "results" / "bench-cpu" / "cpu-tiny.json"


def test_readme_benchmark_is_what_the_committed_benchmark_gives():
    """README's benchmark tables are generated from the committed bench JSON: rerun the command the
    section names, then `python -m nbcore.runner bench-report docs/results/bench-cpu/cpu-tiny.json`."""
    want = report.bench_section(BENCH, link="docs/results/bench-cpu/cpu-tiny.json")
    assert report.readme_section(ROOT / "README.md", (report.BENCH_BEGIN, report.BENCH_END)) == want
    results = json.loads(BENCH.read_text())
    assert {r["case"] for r in results} >= {"train60", "train120", "train512", "guidance", "capture"}
    assert all(r["command"].startswith("OMP_NUM_THREADS=1 python -m nbcore.bench") for r in results)


def test_bench_report_cli_prints_or_refuses(tmp_path, capsys):
    from nbcore import runner
    assert runner.main(["bench-report", str(BENCH), "--readme", "-"]) == 0
    assert capsys.readouterr().out.strip() == report.bench_section(BENCH, link="docs/results/bench-cpu/cpu-tiny.json")
    with pytest.raises(SystemExit) as e:
        runner.main(["bench-report", str(tmp_path / "missing.json")])
    assert e.value.code == 2


def test_a_results_folder_names_the_command_that_made_it():
    from nbcore.notebooks import NOTEBOOKS
    assert report._run_command({"profile": "cpu", "name": "cpu", "notebooks": list(NOTEBOOKS), "params": {}}) \
        == "python -m nbcore.runner run --profile cpu"
    m = {"profile": "cpu", "name": "cpu-warm-lr-half", "notebooks": ["03_training", "05_milestones"],
         "params": {"arms": ["baseline", "patch-sincos"], "warm_lr_scale": 0.5}}
    assert report._run_command(m) == ('python -m nbcore.runner run --profile cpu --name cpu-warm-lr-half --only 3 5 '
                                      '-p "arms=[baseline, patch-sincos]" -p warm_lr_scale=0.5')
