"""nbcore.runner under the things that happen to long runs: bad arguments (exit 2, nothing left
behind), a second runner on a busy run folder (refused, naming the running one), a lock left by a
killed runner (taken over), Ctrl-C (one line, an index of what finished), and a killed runner or
kernel (its training workers die with it: ``nbcore.experiment._pool``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from nbcore import runner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _wait_gone(pids, seconds: float) -> list[int]:
    end = time.time() + seconds
    while time.time() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _notebooks(folder: Path, body: str, names=("01_architecture", "02_checks")) -> Path:
    folder.mkdir()
    for name in names:
        params = nbformat.v4.new_code_cell('profile = "smoke"\ndevice = "auto"\nrun_dir = None\nseed = 0\nvalue = 1\n')
        params.metadata["tags"] = ["parameters"]
        book = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)])
        book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(book, folder / f"{name}.ipynb")
    return folder


@pytest.mark.parametrize("args, needle", [
    (["-p", "nonsense_knob=1"], "declared by none"),
    (["-p", "novalue"], "not KEY=VALUE"),
    (["-p", "profile=cpu"], "not -p"),
    (["--only", "9"], "matches no notebook"),
    (["--params-yaml", "/nonexistent.yaml"], "does not exist"),
])
def test_bad_arguments_exit_2_and_leave_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        runner.main(["run", "--profile", "smoke", "--name", "r", "--out-root", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not out.exists()                                          # no empty run folder left behind


# A runner holding RUN's lock, as RunLock leaves it (without importing nbcore: fast)
_HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "started": "2026-01-01 00:00:00", "command": "runner run"}).encode())
print("held", flush=True)
time.sleep(60)
"""


def test_second_runner_on_a_busy_folder_is_refused(tmp_path, capsys):
    """A runner holds RUN's lock; another on the same name stops in one line naming it (pid and
    start time) and touches nothing: the first's arm folders stay."""
    run_dir = tmp_path / "runs" / "busy"
    (run_dir / "train" / "baseline").mkdir(parents=True)
    (run_dir / "train" / "baseline" / "last.pt").write_text("the first runner's")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir / runner.RunLock.NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            runner.main(["run", "--profile", "smoke", "--only", "1", "--name", "busy", "--out-root", str(tmp_path / "runs")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "started" in err[0] and "busy" in err[0]
        assert (run_dir / "train" / "baseline" / "last.pt").read_text() == "the first runner's"
        assert not (run_dir / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_runner_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", _HOLD.replace('print("held", flush=True)', "os.kill(os.getpid(), 9)"),
                             str(tmp_path / "r" / runner.RunLock.NAME)])
    dead.wait()
    assert dead.returncode == -9
    lock = runner.RunLock(run_dir)
    lock.acquire()
    assert f"pid {dead.pid}" in capsys.readouterr().err                # says whose lock it took over
    assert json.loads((run_dir / runner.RunLock.NAME).read_text())["pid"] == os.getpid()
    lock.release()
    lock.acquire()                                                     # released cleanly: nothing to take over
    assert "took over" not in capsys.readouterr().err
    lock.release()


def test_ctrl_c_ends_in_one_line_with_an_index_of_what_finished(tmp_path, capsys, monkeypatch):
    nbs = _notebooks(tmp_path / "nbs", "x = 1\n")
    calls = []

    def execute(src, dst, **kw):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        Path(dst).write_text(Path(src).read_text())

    monkeypatch.setattr(runner.pm, "execute_notebook", execute)
    monkeypatch.setattr(runner, "_export_html", lambda p: None)
    rc = runner.run_suite("smoke", only=["1", "2"], name="r", out_root=tmp_path / "runs", notebooks_dir=nbs,
                          progress=False)
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "interrupted" in err[-1] and "02_checks" in err[-1] and "01_architecture" in err[-1]
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["meta"]["status"] == "interrupted"
    assert meta["notebooks"]["01_architecture"]["status"] == "ok"
    assert meta["notebooks"]["02_checks"]["status"] == "interrupted"
    assert "interrupted" in (tmp_path / "runs" / "r" / "index.md").read_text()
    assert not json.loads((tmp_path / "runs" / "r" / runner.RunLock.NAME).read_text() or "{}")   # released


_POOL_PARENT = """
import sys, time
from nbcore import experiment as ex
pool = ex._pool(ex.PROFILES["smoke"], "cpu")
futures = [pool.submit(time.sleep, 120) for _ in range(2)]
time.sleep(1.0)
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_workers_die_with_their_parent(tmp_path):
    """kill -9 of the process that owns the pool (the notebook kernel under the runner): its
    workers, busy in a job, end within seconds instead of running on as orphans."""
    parent = subprocess.Popen([sys.executable, "-c", _POOL_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(pids, 30) == []
    finally:
        parent.kill()


@pytest.mark.slow
def test_killed_runner_leaves_no_training_process(tmp_path):
    """kill -9 of the runner while a notebook's pool workers are busy: the kernel and the workers end."""
    pids = tmp_path / "pids.txt"
    body = ("import os, time\nfrom nbcore import experiment as ex\npool = ex._pool(ex.PROFILES['smoke'], 'cpu')\n"
            "fs = [pool.submit(time.sleep, 300) for _ in range(2)]\ntime.sleep(1.0)\n"
            f"open({str(pids)!r}, 'w').write(' '.join(map(str, [os.getpid(), *pool._processes])))\n"
            "fs[0].result()\n")
    nbs = _notebooks(tmp_path / "nbs", body, names=("01_architecture",))
    script = ("import sys; from nbcore import runner; sys.exit(runner.run_suite('smoke', only=['1'], name='r', "
              f"out_root={str(tmp_path / 'runs')!r}, notebooks_dir={str(nbs)!r}, progress=False))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 120
        while time.time() < end and not (pids.exists() and len(pids.read_text().split()) == 3):
            time.sleep(0.5)
        procs = [int(p) for p in pids.read_text().split()]
        assert all(_alive(p) for p in procs)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _wait_gone(procs, 40) == []
    finally:
        proc.kill()
        for p in (int(x) for x in (pids.read_text().split() if pids.exists() else [])):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_ctrl_c_of_a_real_runner(tmp_path):
    """SIGINT to a runner whose notebook is busy in its kernel: exit 130, no traceback, the index says
    what finished and what was interrupted, and the kernel does not outlive the runner."""
    pids = tmp_path / "kernel.pid"
    body = f"import os, time\nopen({str(pids)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)\n"
    nbs = _notebooks(tmp_path / "nbs", "x = 1\n", names=("01_architecture",))
    _notebooks(tmp_path / "nbs2", body, names=("02_checks",))
    (tmp_path / "nbs2" / "02_checks.ipynb").rename(nbs / "02_checks.ipynb")
    script = ("import sys; from nbcore import runner; sys.exit(runner.run_suite('smoke', only=['1', '2'], name='r', "
              f"out_root={str(tmp_path / 'runs')!r}, notebooks_dir={str(nbs)!r}, progress=False))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 120
        while time.time() < end and not (pids.exists() and pids.read_text()):
            time.sleep(0.2)
        kernel = int(pids.read_text())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert "interrupted" in last and "02_checks" in last and "01_architecture ok" in last
        meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
        assert meta["meta"]["status"] == "interrupted" and meta["notebooks"]["02_checks"]["status"] == "interrupted"
        assert _wait_gone([kernel], 20) == []
    finally:
        proc.kill()


_TRAINING_PARENT = """
import sys, time
from nbcore import experiment as ex
from nbcore.train import TrainConfig, parse_model_overrides, train
if __name__ == "__main__":
    data, out = sys.argv[1], sys.argv[2]
    cfg = TrainConfig(preset="tiny", model=parse_model_overrides("tiny", '{"depth": 1, "hidden_size": 32, "num_heads": 2}'),
                      data=data, out=out, steps=100000, batch_size=4, log_every=1, ckpt_every=100000,
                      milestone_every=0, device="cpu", progress=False)
    pool = ex._pool(ex.PROFILES["smoke"], "cpu")
    f = pool.submit(train, cfg)
    time.sleep(0.5)
    print(" ".join(str(p) for p in pool._processes), flush=True)
    f.result()
"""


@pytest.mark.slow
def test_orphaned_training_worker_checkpoints_and_ends(tmp_path, tiny_shards):
    """The pool's parent killed while a worker trains: the worker writes last.pt at the step it reached
    (SIGTERM from its watchdog, ``nbcore.train``'s handler) and ends, instead of training on."""
    from nbcore.train import load_train_log
    from nbcore.utils import load_checkpoint
    script = tmp_path / "parent.py"
    script.write_text(_TRAINING_PARENT)
    out = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, str(script), str(tiny_shards), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        end = time.time() + 120
        while time.time() < end and not ((out / "log.jsonl").exists() and load_train_log(out)):
            time.sleep(0.1)
        assert load_train_log(out), "training did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(pids, 60) == []
        k = load_checkpoint(out / "ckpt" / "last.pt")["step"]
        assert k >= 1 and k == max(r["step"] for r in load_train_log(out))
    finally:
        parent.kill()


def test_index_carries_every_metric_the_answer_and_plumbing_marks(tmp_path):
    """The run index lists every scalar metric (one level down too), marks plumbing notebooks and
    plumbing profiles, and carries notebook 05's answer (report.answer) from the run's eval.json;
    index.html is the same index with figures as thumbnails."""
    from nbcore import report
    from nbcore.experiment import conclusions
    res = json.loads((Path(__file__).parents[1] / "docs" / "results" / "cpu" / "eval.json").read_text())
    (tmp_path / "eval.json").write_text(json.dumps(res))
    rec03 = {"metrics": {f"run{k}_final_loss": 0.1 + k for k in range(10)}}
    rec07 = {"metrics": {"plumbing": True, "train": {"steps": 60, "final_loss": 0.25, "log": [1, 2]}, "curves": [1]}}
    assert runner._key_metrics(rec03) == {f"run{k}_final_loss": round(0.1 + k, 4) for k in range(10)}
    assert runner._key_metrics(rec07) == {"train.steps": 60, "train.final_loss": 0.25}
    entries = {"03_training": {"status": "ok", "time_s": 1.0, "key_metrics": runner._key_metrics(rec03),
                               "figures": ["curves_loss.png"]},
               "05_milestones": {"status": "ok", "time_s": 2.0, "key_metrics": {}, "figures": []},
               "07_real_data": {"status": "ok", "time_s": 3.0, "key_metrics": runner._key_metrics(rec07),
                                "figures": [], "plumbing": True}}
    meta = {"name": "r", "profile": "cpu", "device": "cpu", "started": "now", "status": "ok", "wall_s": 6.0}
    runner._write_index(tmp_path, entries, meta)
    md, page = (tmp_path / "index.md").read_text(), (tmp_path / "index.html").read_text()
    assert "run9_final_loss=9.1" in md and "Plumbing run" not in md
    row07 = next(l for l in md.splitlines() if "[07_real_data]" in l)
    assert "plumbing stand-ins" in row07 and "train.final_loss=0.25" in row07
    assert "\n".join(report.answer(res)) in md
    first = conclusions(res)[0]
    assert first in md and first.split(":")[0] in page
    assert "<img src='03_training/curves_loss.png'" in page and "<table>" in page
    runner._write_index(tmp_path, entries, {**meta, "profile": "smoke"})
    assert "**Plumbing run**" in (tmp_path / "index.md").read_text()
    (tmp_path / "eval.json").unlink()
    runner._write_index(tmp_path, entries, meta)
    assert "The answer" not in (tmp_path / "index.md").read_text()
