"""The papermill runner of the notebook suite, and its index.

    python -m nbcore.runner run --profile smoke|cpu|cpu-coarse|cpu-long|gpu [--only N ...] [--name NAME]
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
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
import threading
import time
from pathlib import Path

import nbformat
import papermill as pm
import yaml
from tqdm.auto import tqdm

from .compare import compare_runs
from .experiment import PROFILES
from .utils import repo_root, write_json

__all__ = ["NOTEBOOKS", "run_suite", "main"]

NOTEBOOKS = ("01_architecture", "02_checks", "03_training", "04_attention_routing", "05_milestones",
             "06_dino_swap_demo", "07_real_data")


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
            raise SystemExit(f"nbcore.runner: --only {o!r} matches no notebook (choose from {', '.join(NOTEBOOKS)})")
        picked += hits
    return [n for n in NOTEBOOKS if n in picked]


def _declared(nb_path: Path) -> dict:
    return pm.inspect_notebook(str(nb_path))


def _key_metrics(rec: dict, limit: int = 8) -> dict:
    """Scalar top-level metrics of a notebook's metrics.json for the index."""
    out = {}
    for k, v in (rec.get("metrics") or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        if isinstance(v, str) and len(v) > 60:
            continue
        out[k] = round(v, 4) if isinstance(v, float) else v
        if len(out) >= limit:
            break
    return out


def _write_index(run_dir: Path, entries: dict, meta: dict) -> None:
    write_json({"meta": meta, "notebooks": entries}, run_dir / "run.json")
    lines = [f"# nbcore notebook run `{meta['name']}`", "",
             f"profile `{meta['profile']}`, device `{meta['device']}`, started {meta['started']}, "
             f"status **{meta['status']}**, wall time {meta.get('wall_s', 0):.0f} s", "",
             "| notebook | status | time (s) | key metrics | figures |", "|---|---|---|---|---|"]
    rows_html = []
    for name in NOTEBOOKS:
        e = entries.get(name)
        if e is None:
            continue
        figs = e.get("figures", [])
        km = ", ".join(f"{k}={v}" for k, v in e.get("key_metrics", {}).items())
        page = e.get("html", f"{name}.ipynb")
        lines.append(f"| [{name}]({page}) | {e['status']} | {e.get('time_s', 0):.1f} | {km} | "
                     + " ".join(f"[{f}]({name}/{f})" for f in figs) + " |")
        rows_html.append(
            f"<tr><td><a href='{page}'>{name}</a><br><a href='{name}.ipynb'>.ipynb</a> "
            f"<a href='{name}/metrics.json'>metrics.json</a></td>"
            f"<td class='{e['status']}'>{e['status']}</td><td>{e.get('time_s', 0):.1f}</td>"
            f"<td>{html.escape(km)}</td><td>"
            + " ".join(f"<a href='{name}/{f}'><img src='{name}/{f}' height='90' title='{html.escape(f)}'></a>" for f in figs)
            + (f"<pre>{html.escape(e.get('error', ''))}</pre>" if e.get("error") else "") + "</td></tr>")
        if e.get("error"):
            lines.append(f"|  | error: {e['error'].splitlines()[0][:200]} | | | |")
    (run_dir / "index.md").write_text("\n".join(lines) + "\n")
    (run_dir / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>nbcore run " + html.escape(meta["name"]) + "</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px;border-bottom:1px solid #ccc}"
        ".ok{color:green}.failed{color:red}</style>"
        f"<h1>nbcore notebook run {html.escape(meta['name'])}</h1><p>profile {meta['profile']}, device "
        f"{meta['device']}, started {meta['started']}, status <b>{meta['status']}</b>, wall time "
        f"{meta.get('wall_s', 0):.0f} s</p><table><tr><th>notebook</th><th>status</th><th>time (s)</th>"
        "<th>key metrics</th><th>figures</th></tr>" + "".join(rows_html) + "</table>\n")


def run_suite(profile: str, only: list[str] | None = None, name: str | None = None,
              params: dict | None = None, device: str = "auto", out_root: str | os.PathLike | None = None,
              notebooks_dir: str | os.PathLike | None = None, kernel: str = "python3",
              cell_timeout: int | None = None, progress: bool = True, lenient=frozenset()) -> int:
    """Execute the notebooks in order; returns 0, or 1 at the first failure (later ones not run).
    The run folder keeps everything that ran, the failed notebook's executed copy included.
    A parameter no selected notebook declares is an error, unless its name is in ``lenient``
    (the YAML file's keys: it may serve a fuller run), then it is dropped with a note."""

    if profile not in PROFILES:
        raise SystemExit(f"nbcore.runner: unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    root = repo_root(Path(__file__).parent)
    nb_dir = Path(notebooks_dir) if notebooks_dir else root / "notebooks"
    run_dir = (Path(out_root) if out_root else root / "outputs" / "runs") / (name or profile)
    run_dir.mkdir(parents=True, exist_ok=True)
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
        raise SystemExit(f"nbcore.runner: parameter(s) {unknown} are declared by none of {selected}")
    reserved = {"profile", "run_dir", "device"} & set(params)
    if reserved:
        raise SystemExit(f"nbcore.runner: set {sorted(reserved)} with --profile / --name / --device, not -p")

    old = {}
    if (run_dir / "run.json").exists():
        try:
            old = json.loads((run_dir / "run.json").read_text()).get("notebooks", {})
        except (json.JSONDecodeError, OSError):
            old = {}
    entries = {k: v for k, v in old.items() if k not in selected}
    meta = {"name": name or profile, "profile": profile, "device": device, "params": params,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "running", "notebooks": selected}
    t_run = time.perf_counter()
    status = 0
    bar = tqdm(selected, desc=f"notebooks ({profile})", unit="nb", disable=not progress)
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
                         failed_checks=rec.get("failed_checks", []))
        entries[nb] = entry
        meta.update(wall_s=time.perf_counter() - t_run, status="running")
        _write_index(run_dir, entries, meta)
        print(f"[nbcore.runner] {nb}: {entry['status']} in {entry['time_s']:.1f} s"
              + (f" -- {entry['error'].splitlines()[0][:300]}" if status else ""), file=sys.stderr, flush=True)
        if status:
            break
    bar.close()
    meta.update(wall_s=time.perf_counter() - t_run, status="failed" if status else "ok")
    _write_index(run_dir, entries, meta)
    print(f"[nbcore.runner] run {meta['name']}: {meta['status']} in {meta['wall_s']:.0f} s -> "
          f"{run_dir / 'index.md'}", file=sys.stderr, flush=True)
    return status


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbcore.runner",
                                 description="Run the nbcore notebook suite through papermill.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the notebooks in order into outputs/runs/<name>/")
    r.add_argument("--profile", required=True, choices=sorted(PROFILES),
                   help="parameter profile: smoke (plumbing), cpu (README command 1), cpu-coarse (3x3 DINO grid), cpu-long (+ secondary arms), gpu")
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
    c = sub.add_parser("compare", help="two runs side by side: one table and one figure of paired differences "
                       "(nbcore.compare), written beside the runs")
    c.add_argument("runs", nargs=2, metavar="RUN", help="run folders (or names under outputs/runs), each with eval.json")
    c.add_argument("--metric", default="layout_error", help="eval.json metric (default layout_error)")
    c.add_argument("--out", default=None, help="output folder (default: <parent of the first run>/compare/A_vs_B)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
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
            raise SystemExit(f"nbcore.runner: --params-yaml {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"nbcore.runner: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"nbcore.runner: {p} must hold a mapping of parameter: value")
        params.update(loaded)
        from_yaml = set(loaded)
    for item in args.param:
        if "=" not in item:
            raise SystemExit(f"nbcore.runner: -p {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        if not k.isidentifier():
            raise SystemExit(f"nbcore.runner: -p {item!r}: {k!r} is not a parameter name")
        params[k] = _parse_value(v)
        from_yaml.discard(k)
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise SystemExit(f"nbcore.runner: --name {args.name!r} must be a plain folder name")
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
