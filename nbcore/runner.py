"""The papermill runner of the notebook suite, and its index.

    python -m nbcore.runner run --profile smoke|cpu|cpu-fine|cpu-long|gpu [--only N ...] [--name NAME]
        [--params-yaml FILE] [-p key=value ...] [--device auto]
    python -m nbcore.runner list

A run executes ``notebooks/NN_*.ipynb`` in order through papermill into ``outputs/runs/<name>/``:

    outputs/runs/<name>/
        01_architecture.ipynb ...       executed notebooks (the failed one too, with its traceback)
        01_architecture.html ...        the same, as HTML a browser shows (linked from the index)
        01_architecture/ ...            each notebook's figures (PNG) and metrics.json
        data/                           shapes-world shards made by the first notebook that needs them
        train/<arm>/                    training runs (log.jsonl, ckpt/step_XXXXXX.pt, arm.json)
        eval.json, progress.log         the final evaluation; progress lines of long work
        index.md, index.html, run.json  status, time, key metrics and links per notebook

Every notebook's first code cell is tagged ``parameters``: ``profile``, ``device``, ``run_dir``,
``seed``, ``fail_check`` and the profile fields it uses, where ``None`` means "the profile's
value" (``nbcore.experiment.PROFILES`` is the one place the profiles live). The runner passes the
profile plus whatever the command line (``-p``) and a YAML file (``--params-yaml``) set. Lines the
notebooks append to ``RUN/progress.log`` (training and evaluation progress) are echoed to this
terminal while a notebook runs. The runner stops at the first failed notebook with exit 1.

One runner per run folder: ``RUN/.runner.lock`` (``RunLock``) holds the pid, start time and command
of the runner using it; a second runner on that name stops in one line naming it (exit 2), and the
lock of a runner that died (killed, the machine restarted) is taken over with a note. Bad
arguments exit 2 in one line before any folder is made. Ctrl-C ends the run in one line with exit
130, the index (``run.json``, ``index.md``) saying what finished and which notebook was interrupted.
The notebooks' training workers die with their kernel (``nbcore.experiment._pool``), and the kernel
with the runner, so a killed runner leaves no training process behind.
"""
from __future__ import annotations

import argparse
import errno
import html
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mistune
import nbformat
import papermill as pm
import yaml
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:   # Windows: no advisory locks; runs are not guarded there
    fcntl = None

from . import report
from .compare import compare_runs
from .experiment import PROFILES
from .notebooks import NOTEBOOKS
from .utils import BadArguments, repo_root, write_json

__all__ = ["NOTEBOOKS", "RunLock", "run_suite", "main"]

class RunLock:
    """One runner per run folder: an exclusive ``flock`` on ``RUN/.runner.lock``, which records the
    holder (pid, start time, command). The OS drops the lock when its process ends however it
    ends, so a file still naming a holder while nobody holds the lock is a runner that died: taken
    over, with a note. ``release`` empties the file (a clean end leaves nothing to take over)."""

    NAME = ".runner.lock"

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``BadArguments`` (exit 2) naming the runner that holds it."""
        if fcntl is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            h = self._holder()
            raise BadArguments(f"nbcore.runner: run folder {self.run_dir} is in use by runner pid {h.get('pid', '?')} "
                               f"started {h.get('started', '?')} ({h.get('command', '?')}): wait for it to end, or "
                               "choose another --name") from None
        old = self._holder()
        if old:
            print(f"[nbcore.runner] note: took over the lock of runner pid {old.get('pid', '?')} started "
                  f"{old.get('started', '?')}, which is no longer running", file=sys.stderr)
        rec = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(rec).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)      # closing drops the flock
            self.fd = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}


class _Echo(threading.Thread):
    """Copies new lines of ``RUN/progress.log`` to stderr every ``every`` seconds until stopped."""

    def __init__(self, path: Path, every: float = 2.0):
        super().__init__(daemon=True)
        self.path, self.every = path, every
        self.pos = path.stat().st_size if path.exists() else 0
        self.stop = threading.Event()

    def _flush(self) -> None:
        if self.path.exists() and self.path.stat().st_size > self.pos:
            with open(self.path) as f:
                f.seek(self.pos)
                text = f.read()
                self.pos = f.tell()
            for line in text.splitlines():
                print(f"[nbcore.runner]   {line}", file=sys.stderr, flush=True)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self._flush()
        self._flush()


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (from /proc: Linux; elsewhere none are found)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parent_of.items() if p == parent]
        out += kids
        todo += kids
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_kernels(grace_s: float = 60.0) -> None:
    """Ctrl-C: SIGTERM to each notebook kernel this runner started (a child in its own session) and
    its process group, its training workers included, which write a checkpoint at the step reached
    (``nbcore.train``); wait up to ``grace_s`` for them to end. Then papermill finds a dead kernel
    instead of trading messages with a dying one (tracebacks on the terminal)."""
    kernels = [k for k in _descendants(os.getpid()) if _session(k) == k]
    procs = kernels + [p for k in kernels for p in _descendants(k)]
    for k in kernels:
        try:
            os.killpg(k, signal.SIGTERM)
        except OSError:
            pass
    end = time.time() + grace_s
    while time.time() < end and any(_running(p) for p in procs):
        time.sleep(0.1)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _ctrl_c(signum, frame) -> None:
    """SIGINT handler while notebooks run: stop the kernels cleanly, then KeyboardInterrupt (a second
    Ctrl-C meanwhile interrupts the wait)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _stop_kernels()
    raise KeyboardInterrupt


def _export_html(nb_path: Path) -> Path | None:
    """The executed notebook as standalone HTML (nbconvert), beside it; None when that fails."""
    try:
        from nbconvert import HTMLExporter
        body, _ = HTMLExporter().from_notebook_node(nbformat.read(nb_path, as_version=4))
    except Exception as e:  # an index without HTML beats a failed run; say why
        print(f"[nbcore.runner] note: no HTML for {nb_path.name} ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    out = nb_path.with_suffix(".html")
    out.write_text(body)
    return out

def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _select(only: list[str] | None) -> list[str]:
    if not only:
        return list(NOTEBOOKS)
    picked = []
    for o in only:
        hits = [n for n in NOTEBOOKS if n == o or n.split("_")[0] == o.zfill(2) or n.split("_", 1)[1] == o]
        if not hits:
            raise BadArguments(f"nbcore.runner: --only {o!r} matches no notebook (choose from {', '.join(NOTEBOOKS)})")
        picked += hits
    return [n for n in NOTEBOOKS if n in picked]


def _declared(nb_path: Path) -> dict:
    return pm.inspect_notebook(str(nb_path))


def _scalar(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, str)) and not (isinstance(v, str) and len(v) > 60)


def _key_metrics(rec: dict) -> dict:
    """Every scalar metric of a notebook's metrics.json for the index, and the scalars one level down
    (``precompute.train``); lists and deeper tables stay in metrics.json."""
    out = {}
    for k, v in (rec.get("metrics") or {}).items():
        if _scalar(v):
            out[k] = round(v, 4) if isinstance(v, float) else v
        elif isinstance(v, dict):
            out.update({f"{k}.{kk}": round(vv, 4) if isinstance(vv, float) else vv
                        for kk, vv in v.items() if _scalar(vv)})
    return out


PLUMBING = {"smoke": "profile `smoke` checks that every notebook runs on tiny sizes"}


def _answer(run_dir: Path, entries: dict) -> list[str]:
    """Notebook 05's answer (``report.answer``: paired differences, plateau test, the sentences the
    intervals support) when this run's 05 finished; else nothing."""
    path = run_dir / "eval.json"
    if entries.get("05_milestones", {}).get("status") != "ok" or not path.exists():
        return []
    res = json.loads(path.read_text())
    return ["", "## The answer (notebook 05)", ""] + report.answer(res)


def _index(entries: dict, meta: dict, answer: list[str], figure) -> str:
    """The index in markdown, ``answer`` (``_answer``'s lines) below the table; ``figure(notebook, file)``
    writes one figure's cell entry."""
    head = (f"profile `{meta['profile']}`, device `{meta['device']}`, started {meta['started']}, "
            f"status **{meta['status']}**, wall time {meta.get('wall_s', 0):.0f} s")
    if meta["profile"] in PLUMBING:
        head += f"\n\n**Plumbing run**: {PLUMBING[meta['profile']]}; its numbers mean nothing."
    lines = [f"# nbcore notebook run `{meta['name']}`", "", head, "",
             "| notebook | status | time (s) | key metrics | figures |", "|---|---|---|---|---|"]
    for name in NOTEBOOKS:
        e = entries.get(name)
        if e is None:
            continue
        km = ", ".join(f"{k}={v}" for k, v in e.get("key_metrics", {}).items())
        if e.get("plumbing"):
            km = "**plumbing stand-ins (random encoders): numbers mean nothing**; " + km
        links = f"[{name}]({e.get('html', f'{name}.ipynb')}) [.ipynb]({name}.ipynb) [metrics.json]({name}/metrics.json)"
        lines.append(f"| {links} | {e['status']} | {e.get('time_s', 0):.1f} | {km} | "
                     + " ".join(figure(name, f) for f in e.get("figures", [])) + " |")
        if e.get("error"):
            lines.append(f"|  | error: {e['error'].splitlines()[0][:200]} | | | |")
    return "\n".join(lines + answer) + "\n"


def _write_index(run_dir: Path, entries: dict, meta: dict) -> None:
    """run.json, index.md and index.html (the same index, figures as thumbnails)."""
    write_json({"meta": meta, "notebooks": entries}, run_dir / "run.json")
    answer = _answer(run_dir, entries)
    (run_dir / "index.md").write_text(_index(entries, meta, answer, lambda nb, f: f"[{f}]({nb}/{f})"))
    thumb = lambda nb, f: f"<a href='{nb}/{f}'><img src='{nb}/{f}' height='90' title='{html.escape(f)}'></a>"
    body = mistune.create_markdown(escape=False, plugins=["table"])(_index(entries, meta, answer, thumb))
    (run_dir / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>nbcore run " + html.escape(meta["name"]) + "</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td{vertical-align:top;padding:4px;border-bottom:1px solid #ccc}</style>\n" + body)


def run_suite(profile: str, only: list[str] | None = None, name: str | None = None,
              params: dict | None = None, device: str = "auto", out_root: str | os.PathLike | None = None,
              notebooks_dir: str | os.PathLike | None = None, kernel: str = "python3",
              cell_timeout: int | None = None, progress: bool = True, lenient=frozenset()) -> int:
    """Execute the notebooks in order; returns 0, or 1 at the first failure (later ones not run).
    The run folder keeps everything that ran, the failed notebook's executed copy included.
    A parameter no selected notebook declares is an error, unless its name is in ``lenient``
    (the YAML file's keys: it may serve a fuller run), then it is dropped with a note."""

    if profile not in PROFILES:
        raise BadArguments(f"nbcore.runner: unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    root = repo_root(Path(__file__).parent)
    nb_dir = Path(notebooks_dir) if notebooks_dir else root / "notebooks"
    run_dir = (Path(out_root) if out_root else root / "outputs" / "runs") / (name or profile)
    params = dict(params or {})
    selected = _select(only)
    declared = {}
    for nb in selected:
        path = nb_dir / f"{nb}.ipynb"
        if not path.exists():
            raise SystemExit(f"nbcore.runner: notebook {path} is missing")
        declared[nb] = _declared(path)
    unknown = [k for k in params if not any(k in d for d in declared.values())]
    dropped = [k for k in unknown if k in lenient]
    if dropped:  # a YAML file may hold parameters of notebooks this run does not select
        print(f"[nbcore.runner] note: {dropped} (from the YAML file) are declared by none of {selected}: ignored",
              file=sys.stderr)
        params = {k: v for k, v in params.items() if k not in dropped}
        unknown = [k for k in unknown if k not in dropped]
    if unknown:
        raise BadArguments(f"nbcore.runner: parameter(s) {unknown} are declared by none of {selected}")
    reserved = {"profile", "run_dir", "device"} & set(params)
    if reserved:
        raise BadArguments(f"nbcore.runner: set {sorted(reserved)} with --profile / --name / --device, not -p")

    lock = RunLock(run_dir)          # the arguments are good: make the folder and hold it
    lock.acquire()
    try:
        return _run_locked(run_dir, profile, selected, declared, params, name, device, nb_dir, kernel, cell_timeout,
                           progress)
    finally:
        lock.release()


def _run_locked(run_dir: Path, profile: str, selected: list, declared: dict, params: dict, name, device, nb_dir: Path,
                kernel: str, cell_timeout, progress: bool) -> int:
    """``run_suite`` once the arguments are checked and the run folder is locked."""
    old = {}
    if (run_dir / "run.json").exists():
        try:
            old = json.loads((run_dir / "run.json").read_text()).get("notebooks", {})
        except (json.JSONDecodeError, OSError):
            old = {}
    entries = {k: v for k, v in old.items() if k not in selected}
    meta = {"name": name or profile, "profile": profile, "device": device, "params": params,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "running", "notebooks": selected,
            **report.provenance(repo_root(Path(__file__).parent))}
    t_run = time.perf_counter()
    status = 0
    bar = tqdm(selected, desc=f"notebooks ({profile})", unit="nb", disable=not progress)
    nb, t0 = None, time.perf_counter()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _ctrl_c) if main_thread else None
    try:
        for nb in bar:
            bar.set_postfix_str(nb)
            given = {"profile": profile, "device": device, "run_dir": str(run_dir.resolve()), **params}
            inject = {k: v for k, v in given.items() if k in declared[nb]}
            out_nb = run_dir / f"{nb}.ipynb"
            print(f"[nbcore.runner] {nb}: running ({', '.join(f'{k}={v}' for k, v in inject.items() if k != 'run_dir')})",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            entry = {"status": "running"}
            echo = _Echo(run_dir / "progress.log")
            echo.start()
            try:
                pm.execute_notebook(str(nb_dir / f"{nb}.ipynb"), str(out_nb), parameters=inject, kernel_name=kernel,
                                    cwd=str(nb_dir), progress_bar=False, log_output=False,
                                    request_save_on_cell_execute=True, execution_timeout=cell_timeout)
                entry["status"] = "ok"
            except Exception as e:  # PapermillExecutionError and kernel failures alike: record, stop
                entry["status"] = "failed"
                ename = getattr(e, "ename", type(e).__name__)
                evalue = getattr(e, "evalue", str(e))
                entry["error"] = f"{ename}: {evalue}"
                status = 1
            finally:
                echo.stop.set()
                echo.join()
            entry["time_s"] = round(time.perf_counter() - t0, 2)
            if out_nb.exists() and _export_html(out_nb) is not None:
                entry["html"] = f"{nb}.html"
            mpath = run_dir / nb / "metrics.json"
            if mpath.exists():
                rec = json.loads(mpath.read_text())
                entry.update(figures=rec.get("figures", []), key_metrics=_key_metrics(rec),
                             failed_checks=rec.get("failed_checks", []),
                             plumbing=bool((rec.get("metrics") or {}).get("plumbing")))
            entries[nb] = entry
            meta.update(wall_s=time.perf_counter() - t_run, status="running")
            _write_index(run_dir, entries, meta)
            print(f"[nbcore.runner] {nb}: {entry['status']} in {entry['time_s']:.1f} s"
                  + (f" -- {entry['error'].splitlines()[0][:300]}" if status else ""), file=sys.stderr, flush=True)
            if status:
                break
    except KeyboardInterrupt:   # Ctrl-C: one line and an index of what finished, no traceback
        return _interrupted(run_dir, entries, meta, nb, t0, t_run, bar)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    bar.close()
    meta.update(wall_s=time.perf_counter() - t_run, status="failed" if status else "ok")
    _write_index(run_dir, entries, meta)
    print(f"[nbcore.runner] run {meta['name']}: {meta['status']} in {meta['wall_s']:.0f} s -> "
          f"{run_dir / 'index.md'}", file=sys.stderr, flush=True)
    return status


def _interrupted(run_dir: Path, entries: dict, meta: dict, nb, t0: float, t_run: float, bar) -> int:
    """Ctrl-C during a run: the notebook it was in marked interrupted, the index written, one line; 130."""
    bar.close()
    if nb is not None and entries.get(nb, {}).get("status") in (None, "running"):
        entries[nb] = {"status": "interrupted", "time_s": round(time.perf_counter() - t0, 2)}
    meta.update(wall_s=time.perf_counter() - t_run, status="interrupted")
    _write_index(run_dir, entries, meta)
    done = ", ".join(f"{k} {e['status']}" for k, e in entries.items() if k != nb) or "nothing"
    print(f"[nbcore.runner] run {meta['name']}: interrupted (Ctrl-C) in {nb} after {meta['wall_s']:.0f} s; "
          f"finished: {done} -> {run_dir / 'index.md'}", file=sys.stderr, flush=True)
    return 130


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbcore.runner",
                                 description="Run the nbcore notebook suite through papermill.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the notebooks in order into outputs/runs/<name>/")
    r.add_argument("--profile", required=True, choices=sorted(PROFILES),
                   help="parameter profile: smoke (plumbing), cpu (README command 1: 3x3 DINO grid over 6x6 tokens), cpu-fine (6x6 over 6x6: the ceiling), cpu-long (+ secondary arms), gpu")
    r.add_argument("--only", nargs="+", metavar="N", help="notebook numbers or names (e.g. 3 4 or 03_training)")
    r.add_argument("--name", help="run folder name under outputs/runs (default: the profile)")
    r.add_argument("--params-yaml", metavar="FILE", help="YAML mapping of notebook parameters")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter (value parsed as YAML: 3, true, [a, b], {depth: 1}); repeatable")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    r.add_argument("--out-root", help="folder holding run folders (default outputs/runs)")
    r.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    r.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default: none)")
    sub.add_parser("list", help="list the notebooks and the profiles' parameters")
    rp = sub.add_parser("report", help="copy a finished run's results into docs/results/<name> and write README's "
                                       "research section from them")
    rp.add_argument("run", help="the run folder (outputs/runs/<name>), holding eval.json and run.json")
    rp.add_argument("--to", help="results folder to write (default docs/results/<run folder name>)")
    rp.add_argument("--readme", default=None, help="README to update (default the repository's README.md; "
                                                   "'-' prints the section instead)")
    b = sub.add_parser("bench-report", help="write README's benchmark section from a committed "
                                            "python -m nbcore.bench JSON")
    b.add_argument("json", help="the benchmark results (e.g. docs/results/bench-cpu/cpu-tiny.json)")
    b.add_argument("--readme", default=None, help="README to update (default the repository's README.md; "
                                                  "'-' prints the section instead)")
    c = sub.add_parser("compare", help="two runs side by side: one table and one figure of paired differences "
                       "(nbcore.compare), written beside the runs")
    c.add_argument("runs", nargs=2, metavar="RUN", help="run folders (or names under outputs/runs), each with eval.json")
    c.add_argument("--metric", default="layout_error", help="eval.json metric (default layout_error)")
    c.add_argument("--out", default=None, help="output folder (default: <parent of the first run>/compare/A_vs_B)")
    return ap


def _bench_report(args) -> int:
    path = Path(args.json)
    if not path.is_file():
        raise BadArguments(f"nbcore.runner bench-report: {path} is not a file (python -m nbcore.bench --json {path} makes it)")
    root = repo_root(Path(__file__).parent).resolve()
    link = path.resolve().relative_to(root).as_posix() if path.resolve().is_relative_to(root) else path.as_posix()
    return _to_readme(report.bench_section(path, link=link), args.readme, (report.BENCH_BEGIN, report.BENCH_END),
                      "nbcore.runner bench-report:")


def _to_readme(section: str, readme, markers: tuple[str, str], said: str) -> int:
    """Print ``section`` (``readme`` '-') or put it between ``markers`` of README (default the repository's)."""
    if readme == "-":
        print(section)
        return 0
    readme = Path(readme) if readme else repo_root(Path(__file__).parent) / "README.md"
    changed = report.update_readme(readme, section, markers)
    print(f"{said} {readme} {'updated' if changed else 'already up to date'}")
    return 0


def _report(args) -> int:
    run = Path(args.run)
    missing = [f for f in ("eval.json", "run.json") if not (run / f).is_file()]
    if missing:
        raise BadArguments(f"nbcore.runner report: {run} lacks {', '.join(missing)} (run the suite through notebook 05 first)")
    root = repo_root(Path(__file__).parent).resolve()
    dest = (Path(args.to) if args.to else root / "docs" / "results" / run.name).resolve()
    report.collect(run, dest)
    link = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else dest.as_posix()
    return _to_readme(report.research_section(dest, link=link), args.readme, (report.BEGIN, report.END),
                      f"nbcore.runner report: {dest} written;")


def main(argv=None) -> int:
    """The CLI: a bad argument or a busy run folder is one line on stderr and exit 2."""
    try:
        return _main(argv)
    except BadArguments as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "report":
        return _report(args)
    if args.cmd == "bench-report":
        return _bench_report(args)
    if args.cmd == "compare":
        return _compare_main(args)
    if args.cmd == "list":
        for nb in NOTEBOOKS:
            print(nb)
        for name, prof in PROFILES.items():
            print(name, prof)
        return 0
    params: dict = {}
    from_yaml: set = set()
    if args.params_yaml:
        p = Path(args.params_yaml)
        if not p.is_file():
            raise BadArguments(f"nbcore.runner: --params-yaml {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise BadArguments(f"nbcore.runner: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise BadArguments(f"nbcore.runner: {p} must hold a mapping of parameter: value")
        params.update(loaded)
        from_yaml = set(loaded)
    for item in args.param:
        if "=" not in item:
            raise BadArguments(f"nbcore.runner: -p {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        if not k.isidentifier():
            raise BadArguments(f"nbcore.runner: -p {item!r}: {k!r} is not a parameter name")
        params[k] = _parse_value(v)
        from_yaml.discard(k)
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise BadArguments(f"nbcore.runner: --name {args.name!r} must be a plain folder name")
    return run_suite(args.profile, only=args.only, name=args.name, params=params, device=args.device,
                     out_root=args.out_root, kernel=args.kernel, cell_timeout=args.cell_timeout,
                     lenient=frozenset(from_yaml))


def _compare_main(args) -> int:
    runs = [Path(r) if Path(r).is_dir() else Path("outputs/runs") / r for r in args.runs]
    try:
        res = compare_runs(*runs, metric=args.metric, out_dir=args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nbcore.runner compare: {e}") from None
    print(res["table"])
    print(f"wrote {res['markdown']} and {res['figure']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
