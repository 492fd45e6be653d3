"""The notebook suite: parameters cells, settings, runner CLI errors, and (slow) the smoke profile
executed end to end through papermill plus the failure path."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from papermill.translators import PythonTranslator

from nbcore import experiment as ex, notebooks as suite, runner

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
COMMON = {"profile", "device", "run_dir", "seed", "fail_check"}


@pytest.mark.parametrize("name", runner.NOTEBOOKS)
def test_parameters_cell_is_first_and_fully_parsed(name):
    book = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    parsed = {p.name for p in PythonTranslator.inspect(code[0])}
    assigned = {ln.split("=")[0].strip() for ln in code[0].source.splitlines() if "=" in ln and not ln.startswith("#")}
    assert parsed == assigned                      # papermill silently skips lines it cannot parse
    assert COMMON <= parsed
    src = "\n".join(c.source for c in code)
    assert f"suite.start({name!r}" in src and "ctx.finish()" in code[-1].source
    assert book.metadata["kernelspec"]["name"] == "python3"


def test_every_profile_field_is_a_notebook_parameter():
    """README: every Profile field (but its name) can be set with -p KEY=VALUE; a field no notebook
    declares is refused by the runner ("declared by none")."""
    import dataclasses
    declared = set()
    for name in runner.NOTEBOOKS:
        code = next(c for c in nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4).cells if c.cell_type == "code")
        declared |= {p.name for p in PythonTranslator.inspect(code)}
    assert {f.name for f in dataclasses.fields(ex.Profile)} - declared == {"name"}


def test_generator_matches_committed_notebooks():
    sys.path.insert(0, str(NB_DIR))
    try:
        import make_notebooks
    finally:
        sys.path.pop(0)
    for name, book in make_notebooks.BOOKS.items():
        committed = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in book.cells], name


def test_profile_fills_none_from_the_profile():
    p = ex.profile("smoke", steps=None, lr=0.5, arms=["baseline", "tied-only"])
    assert p.steps == ex.PROFILES["smoke"].steps
    assert p.lr == 0.5 and p.name == "smoke" and [a.name for a in p.arms] == ["baseline", "tied-only"]
    with pytest.raises(ValueError, match="unknown profile"):
        ex.profile("huge")
    with pytest.raises(ValueError, match="not Profile fields"):
        suite.start("02_checks", profile="smoke", extra="x")


def test_context_fails_after_writing_metrics(tmp_path):
    ctx = suite.start("02_checks", profile="smoke", run_dir=tmp_path, device="cpu")
    ctx.check(True, "fine")
    ctx.check(False, "broken", value=3)
    with pytest.raises(suite.CheckFailed, match="broken"):
        ctx.finish()
    rec = json.loads((tmp_path / "02_checks" / "metrics.json").read_text())
    assert rec["failed_checks"] == ["broken"] and len(rec["checks"]) == 2


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "nbcore.runner", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,msg", [
    (["run", "--profile", "huge"], "invalid choice"),
    (["run", "--profile", "smoke", "--only", "9"], "matches no notebook"),
    (["run", "--profile", "smoke", "-p", "nonsense_knob=1"], "declared by none"),
    (["run", "--profile", "smoke", "-p", "novalue"], "not KEY=VALUE"),
    (["run", "--profile", "smoke", "-p", "profile=cpu"], "not -p"),
    (["run", "--profile", "smoke", "--params-yaml", "/nonexistent.yaml"], "does not exist"),
])
def test_cli_rejects_bad_arguments(args, msg):
    r = _cli(*args, timeout=120)
    assert r.returncode != 0
    assert msg in r.stderr


def test_cli_help():
    r = _cli("run", "--help", timeout=120)
    assert r.returncode == 0 and "--profile" in r.stdout and "--params-yaml" in r.stdout


@pytest.mark.slow
def test_smoke_profile_runs_every_notebook(tmp_path):
    """The whole suite on the smoke profile: every notebook executed, each wrote metrics.json and
    its figures, and the index links them all."""
    yaml_file = tmp_path / "params.yaml"
    yaml_file.write_text("seed: 0\n")
    r = _cli("run", "--profile", "smoke", "--out-root", str(tmp_path), "--name", "smoke",
             "--params-yaml", str(yaml_file), "--device", "cpu", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "smoke"
    index = (run / "index.md").read_text()
    meta = json.loads((run / "run.json").read_text())
    assert meta["meta"]["status"] == "ok"
    for name in runner.NOTEBOOKS:
        assert (run / f"{name}.ipynb").exists()
        rec = json.loads((run / name / "metrics.json").read_text())
        assert rec["failed_checks"] == [] and rec["checks"], name
        assert rec["figures"], name
        for fig in rec["figures"]:
            assert (run / name / fig).stat().st_size > 1000, (name, fig)
        assert meta["notebooks"][name]["status"] == "ok"
        assert f"[{name}]({name}.html)" in index and (run / f"{name}.html").stat().st_size > 1000
        executed = nbformat.read(run / f"{name}.ipynb", as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert errors == [], name
    assert "**Plumbing run**" in index                                  # smoke numbers mean nothing
    assert "**plumbing stand-ins (random encoders)" in next(l for l in index.splitlines() if "[07_real_data]" in l)
    assert "model_card_samples.png" in json.loads((run / "07_real_data" / "metrics.json").read_text())["figures"]
    assert "## The answer (notebook 05)" in index and "What the intervals support" in index
    # the training notebook made checkpoints that later notebooks used
    assert (run / "train" / "baseline" / "ckpt" / "last.pt").exists()
    assert (run / "train" / "patch-sincos" / "ckpt" / "last.pt").exists()      # the warm arm, from the baseline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "train" / "baseline" / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "milestones/recon_layout_error"} <= set(acc.Tags()["scalars"])   # notebook 05's scores too
    demo = json.loads((run / "06_dino_swap_demo" / "metrics.json").read_text())
    assert demo["metrics"]["checkpoint"].startswith(str(run))


@pytest.mark.slow
def test_failing_check_stops_the_run_and_keeps_the_notebook(tmp_path):
    r = _cli("run", "--profile", "smoke", "--only", "2", "3", "--out-root", str(tmp_path), "--name", "bad",
             "-p", "fail_check=true", "--device", "cpu", timeout=600)
    assert r.returncode == 1
    run = tmp_path / "bad"
    executed = nbformat.read(run / "02_checks.ipynb", as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors and "CheckFailed" in errors[0]["ename"]
    rec = json.loads((run / "02_checks" / "metrics.json").read_text())
    assert rec["failed_checks"] == ["deliberate failure (fail_check=True)"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["meta"]["status"] == "failed" and meta["notebooks"]["02_checks"]["status"] == "failed"
    assert "03_training" not in meta["notebooks"] and not (run / "03_training.ipynb").exists()
    assert "failed" in (run / "index.md").read_text()


def _standin_notebooks(folder: Path, names=("01_architecture", "02_checks")) -> None:
    """Stand-in notebooks for runner plumbing: a parameters cell and one cell that writes a
    metrics.json the way the real ones do (through nbcore.notebooks.start / finish)."""
    folder.mkdir()
    for name in names:
        params = nbformat.v4.new_code_cell('profile = "smoke"\ndevice = "auto"\nrun_dir = None\nseed = 0\n'
                                           'fail_check = False\nvalue = 1\n')
        params.metadata["tags"] = ["parameters"]
        body = nbformat.v4.new_code_cell(
            "from nbcore import notebooks as suite\n"
            f"ctx = suite.start({name!r}, profile=profile, run_dir=run_dir, device=device, seed=seed, fail_check=fail_check)\n"
            "ctx.metrics['value'] = value\nctx.check(value > 0, 'value is positive')\nctx.finish()\n")
        book = nbformat.v4.new_notebook(cells=[params, body])
        book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(book, folder / f"{name}.ipynb")


@pytest.mark.slow
def test_runner_plumbing_on_standin_notebooks(tmp_path, capsys):
    """Parameters reach the notebooks, YAML keys no selected notebook declares are dropped, -p keys
    are strict, a failed check stops the run, and the index merges earlier entries."""
    nbs = tmp_path / "nbs"
    _standin_notebooks(nbs)
    out = tmp_path / "runs"
    rc = runner.run_suite("smoke", only=["1"], name="r", params={"value": 7, "unused": 1}, device="cpu",
                         out_root=out, notebooks_dir=nbs, progress=False, lenient=frozenset({"unused"}))
    assert rc == 0
    assert "ignored" in capsys.readouterr().err
    rec = json.loads((out / "r" / "01_architecture" / "metrics.json").read_text())
    assert rec["metrics"]["value"] == 7 and rec["profile"] == "smoke"
    with pytest.raises(SystemExit, match="declared by none"):
        runner.run_suite("smoke", only=["1"], name="r", params={"unused": 1}, out_root=out, notebooks_dir=nbs)
    rc = runner.run_suite("smoke", only=["2"], name="r", params={"value": -1}, device="cpu", out_root=out,
                         notebooks_dir=nbs, progress=False)
    assert rc == 1
    meta = json.loads((out / "r" / "run.json").read_text())
    assert meta["notebooks"]["01_architecture"]["status"] == "ok"          # kept from the first call
    assert meta["notebooks"]["02_checks"]["status"] == "failed"
    assert meta["notebooks"]["02_checks"]["failed_checks"] == ["value is positive"]
    html = (out / "r" / "index.html").read_text()
    assert "01_architecture.ipynb" in html and "02_checks.ipynb" in html
