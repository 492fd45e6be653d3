"""The notebook suite: profiles, the per-notebook context, the shared experiment steps, and the
papermill runner.

    python -m nbcore.notebooks run --profile smoke|cpu|gpu [--only N ...] [--name NAME]
        [--params-yaml FILE] [-p key=value ...] [--device auto]
    python -m nbcore.notebooks list

A run executes ``notebooks/NN_*.ipynb`` in order through papermill into ``outputs/runs/<name>/``:

    outputs/runs/<name>/
        01_architecture.ipynb ...       executed notebooks (the failed one too, with its traceback)
        01_architecture/ ...            each notebook's figures (PNG) and metrics.json
        data/                           shapes-world shards made by the first notebook that needs them
        train/<variant>/                training runs (log.jsonl, ckpt/last.pt, ckpt/step_XXXXXX.pt)
        index.md, index.html, run.json  status, time, key metrics and links per notebook

Every notebook's first code cell is tagged ``parameters``: ``profile``, ``device``, ``run_dir``,
``seed``, ``fail_check`` and its sizes, where ``None`` means "the profile's value" (``PROFILES``
below is the one place the profiles live). The runner passes the profile plus whatever the
command line (``-p``) and a YAML file (``--params-yaml``) set; each notebook records the settings
it resolved in its metrics.json. The runner stops at the first failed notebook with exit 1.

Experiment variants (training runs): ``baseline`` (pre-patch architecture: text-only
cross-attention, CLS through adaLN) and ``patch-<pos>`` for pos in none / learned / sincos
(patch model warm-started from the baseline's last checkpoint, trained for the same number of
steps as each other).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .utils import repo_root  # lives in utils (library modules must not import the runner); kept importable here

__all__ = ["PROFILES", "NOTEBOOKS", "settings", "Context", "start", "CheckFailed", "repo_root",
           "default_run_dir", "ensure_data", "ensure_trained", "variant_dir", "variant_checkpoints",
           "run_suite", "main", "load_val_batch", "load_log", "warm_start_event",
           "validate_milestones", "metric_keys", "rank_variants", "lower_is_better"]

NOTEBOOKS = ("01_architecture", "02_checks", "03_training", "04_attention_routing", "05_milestones",
             "06_dino_swap_demo")

# One place for the profiles. Steps: the baseline and every patch variant train for the same
# number of steps (``train_steps``); the patch variants all warm-start from the baseline's end.
PROFILES: dict[str, dict] = {
    # Plumbing: every notebook end to end on a tiny model in a few minutes (used by the tests).
    "smoke": dict(
        preset="tiny", n_data=256, val_fraction=0.125, batch_size=8, train_steps=16, lr=1e-3, warmup=4,
        milestone_every=8, log_every=4, patch_pos="none", ablation=["learned", "sincos"],
        val_samples=8, sample_steps=3, text_scale=2.0, dino_scale=2.0,
        routing_samples=2, routing_steps=3, demo_steps=3, demo_train_steps=16, demo_grid=2,
        model_overrides={}, new_param_lr_scale=1.0,
    ),
    # The real experiment at CPU scale (tiny preset, 256 image tokens): the whole suite in about 20 minutes on 2 cores.
    "cpu": dict(
        preset="tiny", n_data=4000, val_fraction=0.1, batch_size=32, train_steps=600, lr=1e-3, warmup=50,
        milestone_every=200, log_every=10, patch_pos="none", ablation=["learned", "sincos"],
        val_samples=64, sample_steps=12, text_scale=2.0, dino_scale=2.0,
        routing_samples=8, routing_steps=10, demo_steps=10, demo_train_steps=300, demo_grid=4,
        model_overrides={}, new_param_lr_scale=1.0,
    ),
    # Production sizes of the shapes world (16x64x64 latents, 14x14 patches, T5 512x4096) on one
    # H100/H200, sized for about 8 minutes (4 x 400 steps at batch 32 is the bulk; not measured on
    # a GPU yet). Plumbing-check it on a CPU with notebooks/profiles/gpu-plumbing-on-cpu.yaml.
    "gpu": dict(
        preset="production", n_data=2000, val_fraction=0.05, batch_size=32, train_steps=400, lr=3e-4, warmup=40,
        milestone_every=200, log_every=10, patch_pos="none", ablation=["learned", "sincos"],
        val_samples=32, sample_steps=12, text_scale=2.0, dino_scale=2.0,
        routing_samples=4, routing_steps=8, demo_steps=12, demo_train_steps=200, demo_grid=4,
        model_overrides={}, new_param_lr_scale=1.0,
    ),
}


class CheckFailed(AssertionError):
    """A check a notebook makes failed: the notebook (and the papermill run) fails with this."""


# --------------------------------------------------------------------------- paths

def default_run_dir(profile: str) -> Path:
    return repo_root() / "outputs" / "runs" / profile


def variant_dir(run_dir, variant: str) -> Path:
    """Training folder of a variant: ``RUN/train/<variant>`` (variants: baseline, patch-<pos>)."""
    return Path(run_dir) / "train" / variant


def patch_variant(pos: str) -> str:
    return f"patch-{pos}"


def variant_checkpoints(run_dir, variant: str) -> list[tuple[int, Path]]:
    """Milestone checkpoints ``(step, path)`` of a variant, sorted by step, with ``last.pt`` at the
    end when it is newer than every milestone."""
    ck = variant_dir(run_dir, variant) / "ckpt"
    out = sorted((int(p.stem.split("_")[1]), p) for p in ck.glob("step_*.pt"))
    last = ck / "last.pt"
    if last.exists():
        from .utils import load_checkpoint
        step = int(load_checkpoint(last).get("step", -1))
        if not out or step > out[-1][0]:
            out.append((step, last))
    return out


# --------------------------------------------------------------------------- settings

def settings(profile: str, **given) -> dict:
    """The profile's values with every ``given`` value that is not None on top. Unknown keys of
    ``given`` are kept (notebook-specific parameters)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    out = dict(PROFILES[profile])
    out.update({k: v for k, v in given.items() if v is not None})
    out["profile"] = profile
    return out


class Context:
    """What a notebook carries: its resolved settings ``s``, output folder ``out``, ``metrics``
    (written to ``out/metrics.json``), checks, and figures.

    ``check(cond, name, **values)`` records a check; ``finish()`` writes metrics.json and raises
    ``CheckFailed`` naming every failed check, so papermill marks the notebook failed after the
    evidence is on disk. ``fail_check=True`` adds a deliberately failing check (tests the failure path).
    """

    def __init__(self, name: str, profile: str, run_dir=None, device: str = "auto", seed: int = 0,
                 fail_check: bool = False, **given):
        self.name = name
        self.s = settings(profile, **given)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(profile)
        self.out = self.run_dir / name
        self.out.mkdir(parents=True, exist_ok=True)
        from .utils import resolve_device, seed_everything
        self.device = str(resolve_device(device))
        self.seed = int(seed)
        seed_everything(self.seed)
        self.fail_check = bool(fail_check)
        self.metrics: dict = {}
        self.checks: list[dict] = []
        self.figures: list[str] = []
        self.t0 = time.perf_counter()

    def save(self, fig, filename: str) -> Path:
        """Save a matplotlib figure as ``out/filename`` (PNG) and show it inline when in Jupyter."""
        from .viz import save_figure
        try:  # show before save_figure closes it
            from IPython import get_ipython
            if get_ipython() is not None:
                from IPython.display import display
                display(fig)
        except ImportError:
            pass
        path = save_figure(fig, self.out / filename)
        self.figures.append(path.name)
        return path

    def check(self, cond, name: str, **values) -> bool:
        ok = bool(cond)
        self.checks.append({"check": name, "passed": ok, **values})
        print(("PASS " if ok else "FAIL ") + name + (f"  {values}" if values else ""))
        return ok

    def finish(self) -> dict:
        if self.fail_check:
            self.check(False, "deliberate failure (fail_check=True)")
        failed = [c["check"] for c in self.checks if not c["passed"]]
        record = {"notebook": self.name, "profile": self.s["profile"], "device": self.device, "seed": self.seed,
                  "settings": self.s, "time_s": round(time.perf_counter() - self.t0, 2),
                  "checks": self.checks, "failed_checks": failed, "figures": self.figures, "metrics": self.metrics}
        from .utils import write_json
        write_json(record, self.out / "metrics.json")
        if failed:
            raise CheckFailed(f"{self.name}: {len(failed)} check(s) failed: {failed}")
        print(f"{self.name}: {len(self.checks)} checks passed; wrote {self.out / 'metrics.json'}")
        return record


def start(name: str, **params) -> Context:
    """``Context(name, **params)``: the first call of every notebook after its parameters cell."""
    return Context(name, **params)


# --------------------------------------------------------------------------- shared experiment steps

def ensure_data(ctx: Context) -> Path:
    """The run's shapes-world shards (``RUN/data``), made when missing or made with other sizes."""
    from .shapes import make_dataset
    d = ctx.run_dir / "data"
    s = ctx.s
    want = {"preset": s["preset"], "n": int(s["n_data"]), "seed": ctx.seed, "val_fraction": float(s["val_fraction"]),
            "model_overrides": dict(s.get("model_overrides") or {})}   # sizes (grid, dims) shape the shards
    stamp = d / "made.json"
    if stamp.exists() and json.loads(stamp.read_text()) == want and any(d.glob("train-*.tar")):
        return d
    make_dataset(d, want["n"], seed=want["seed"], preset=want["preset"], val_fraction=want["val_fraction"],
                 cfg=model_config(ctx))
    stamp.write_text(json.dumps(want))
    return d


def model_config(ctx: Context, **over):
    """The run's ModelConfig: the preset with ``model_overrides`` and ``over`` applied."""
    from .model import preset
    return preset(ctx.s["preset"], **{**dict(ctx.s.get("model_overrides") or {}), **over})


def _train_config(ctx: Context, variant: str, data: Path):
    from .train import TrainConfig
    s = ctx.s
    base = variant == "baseline"
    warm = "" if base else str(variant_dir(ctx.run_dir, "baseline") / "ckpt" / "last.pt")
    return TrainConfig(
        preset=s["preset"], use_dino_patches=not base,
        patch_pos_embed=None if base else variant.split("-", 1)[1],
        model_overrides=json.dumps(s.get("model_overrides") or {}), data=str(data),
        out=str(variant_dir(ctx.run_dir, variant)), steps=int(s["train_steps"]), batch_size=int(s["batch_size"]),
        lr=float(s["lr"]), warmup=int(s["warmup"]), log_every=int(s["log_every"]),
        new_param_lr_scale=float(s["new_param_lr_scale"]),
        ckpt_every=int(s["train_steps"]), milestone_every=int(s["milestone_every"]),
        device=ctx.device, seed=ctx.seed, warm_start=warm, resume="none", progress=True)


def ensure_trained(ctx: Context, variant: str, force: bool = False) -> dict:
    """Train ``variant`` (baseline | patch-<pos>) into ``RUN/train/<variant>`` unless a finished run
    with the same settings is there. The patch variants warm-start from the baseline (trained
    first when missing). Returns the training summary (``nbcore.train.train``'s, plus ``reused``)."""
    from .train import train
    vdir = variant_dir(ctx.run_dir, variant)
    if variant != "baseline":
        ensure_trained(ctx, "baseline")
    cfg = _train_config(ctx, variant, ensure_data(ctx))
    stamp = vdir / "summary.json"
    key = json.loads(json.dumps(_train_key(cfg)))
    if not force and stamp.exists():
        old = json.loads(stamp.read_text())
        if old.get("key") == key and Path(old["summary"]["checkpoint"]).exists():
            return {**old["summary"], "reused": True}
    if vdir.exists():  # stale or unfinished: start clean so logs and milestones belong to one run
        import shutil
        shutil.rmtree(vdir)
    summary = train(cfg)
    vdir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": key, "summary": summary}, indent=1))
    return {**summary, "reused": False}


def _train_key(cfg) -> dict:
    from dataclasses import asdict
    d = asdict(cfg)
    d.pop("progress", None)
    return d


def new_parameter_names(ctx: Context, variant: str) -> list[str]:
    """The parameters a warm start of ``variant`` initialises (``NanoDiT.new_parameter_names``)."""
    from .model import NanoDiT
    pos = variant.split("-", 1)[1]
    return NanoDiT(model_config(ctx, use_dino_patches=True, patch_pos_embed=pos)).new_parameter_names()


def load_log(ctx: Context, variant: str) -> list[dict]:
    """The ``kind == "train"`` records of a variant's log.jsonl."""
    from .train import load_train_log
    return load_train_log(variant_dir(ctx.run_dir, variant))


def warm_start_event(ctx: Context, variant: str) -> dict | None:
    """The warm-start record of a variant's log (``new``, ``unexpected``, ``mismatched``, ``n_loaded``)."""
    from .train import load_train_log
    ev = [r for r in load_train_log(variant_dir(ctx.run_dir, variant), kind="event") if r.get("event") == "warm_start"]
    return ev[-1] if ev else None


def shift_steps(logs: dict, offsets: dict) -> dict:
    """Logs with ``step`` shifted per run (a warm-started run continues from its parent's steps)."""
    return {k: [dict(r, step=r["step"] + offsets.get(k, 0)) for r in recs] for k, recs in logs.items()}


def load_val_batch(data_dir, n: int, device=None) -> dict:
    """The first ``n`` validation samples of a run's shards, normalised like training
    (``nbcore.validate.load_val_batch``), with tensors moved to ``device`` (png stays on the CPU)."""
    import torch
    from .validate import load_val_batch as _load
    batch = _load(data_dir, n)
    if device is not None:
        batch = {k: (v.to(device) if torch.is_tensor(v) and k != "png" else v) for k, v in batch.items()}
    return batch


def validate_milestones(ctx: Context, variants: list[str]) -> dict:
    """``nbcore.validate.validate_checkpoint`` on every milestone checkpoint of each variant, with
    the run's guidance (nested, ``text_scale`` / ``dino_scale``), ``val_samples`` samples and
    ``sample_steps`` steps; cached as ``RUN/train/<variant>/val/step_XXXXXX.json``. Returns
    variant -> [{"step", metric: value}] (flat scalars)."""
    from .metrics import LPIPSMetric
    from .sample import Guidance
    from .validate import validate_checkpoint
    from tqdm.auto import tqdm
    s = ctx.s
    data = ctx.run_dir / "data"
    guidance = Guidance("nested", float(s["text_scale"]), float(s["dino_scale"]))
    lp = None
    todo = [(v, step, path) for v in variants for step, path in variant_checkpoints(ctx.run_dir, v)]
    out: dict = {v: [] for v in variants}
    for v, step, path in tqdm(todo, desc="validate milestones", unit="ckpt"):
        cache = variant_dir(ctx.run_dir, v) / "val" / f"step_{step:06d}.json"
        key = {"ckpt": str(path), "mtime": path.stat().st_mtime, "n": s["val_samples"], "steps": s["sample_steps"],
               "guidance": str(guidance), "seed": ctx.seed}
        if cache.exists() and json.loads(cache.read_text()).get("key") == key:
            m = json.loads(cache.read_text())["metrics"]
        else:
            lp = lp or LPIPSMetric(device=ctx.device)
            m = validate_checkpoint(str(path), str(data), out_dir=str(cache.parent / f"step_{step:06d}"),
                                    n=int(s["val_samples"]), steps=int(s["sample_steps"]), seed=ctx.seed,
                                    guidance=guidance, device=ctx.device, lpips=lp, progress=False)
            m = _flatten(m)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "metrics": m}, indent=1, default=str))
        out[v].append({**m, "step": int(step)})
    return out


def _flatten(m: dict, prefix: str = "") -> dict:
    """Nested metrics -> {"a_b": scalar}; numbers, None and short strings only."""
    out = {}
    for k, v in m.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "_"))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, (int, float)) or v is None:
            out[name] = v
        elif isinstance(v, str) and len(v) <= 600:
            out[name] = v
    return out


# The metrics that rank variants, with their direction (True = lower is better), headline first.
RANKED: dict[str, bool] = {
    "recon_layout_error": True, "recon_layout_iou": False, "textonly_layout_error": True,
    "swap_follows_dino_rate": False, "recon_psnr": False, "recon_lpips": True, "noguid_layout_error": True,
    "noguid_layout_iou": False, "textonly_layout_iou": False, "recon_patch_cos": False, "noguid_psnr": False,
    "swap_colour_follows_dino_rate": False, "noguid_lpips": True,
}
_LOWER = ("error", "lpips", "loss", "mse", "distance")


def lower_is_better(key: str) -> bool:
    if key in RANKED:
        return RANKED[key]
    return any(w in key.lower() for w in _LOWER)


def metric_keys(final: dict) -> list[str]:
    """Numeric metric names present (not None) in every variant's final metrics: the ranked
    headline metrics (``RANKED``) first, then the rest; bookkeeping (counts, times) left out."""
    skip = ("samples", "count", "skipped", "time", "seconds", "pairs", "evaluated", "absent", "cap", "codec_roundtrip")
    exact = {"n", "step", "steps", "seed"}
    common = None
    for m in final.values():
        ks = {k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        common = ks if common is None else common & ks
    common = common or set()
    head = [k for k in RANKED if k in common]
    rest = [k for k in sorted(common) if k not in RANKED and k not in exact and not any(w in k.lower() for w in skip)]
    return head + rest


def rank_variants(final: dict, keys: list[str], tie: float = 0.01) -> dict:
    """Which variant is best on each ranked metric (``RANKED``: direction known), calling a
    relative margin below ``tie`` over the runner-up a tie, and a sentence built from the values.
    Returns {"best": variant | None, "wins": {variant: n}, "per_metric": {...}, "ties": [...], "text"}."""
    wins = {v: 0 for v in final}
    per, ties = {}, []
    for k in [k for k in keys if k in RANKED]:
        vals = {v: m.get(k) for v, m in final.items() if isinstance(m.get(k), (int, float))}
        if len(vals) < 2:
            continue
        order = sorted(vals, key=vals.get, reverse=not RANKED[k])
        best, second = order[0], order[1]
        margin = abs(vals[best] - vals[second]) / max(abs(vals[second]), 1e-9)
        if margin < tie:
            ties.append(k)
            continue
        wins[best] += 1
        per[k] = {"best": best, "margin": margin, **vals}
    if not per:
        text = (f"No variant is ahead by {100 * tie:.0f}% or more on any ranked metric "
                f"({', '.join(ties) or 'none available'}): at these steps the positional embedding makes no measurable difference.")
        return {"best": None, "wins": wins, "per_metric": per, "ties": ties, "text": text}
    top = max(wins.values())
    leaders = [v for v, n in wins.items() if n == top]
    best = leaders[0] if len(leaders) == 1 else None
    detail = "; ".join(f"{k} ({'lower' if RANKED[k] else 'higher'} is better): best {p['best']} (" + ", ".join(
        f"{v} {p[v]:.4g}" for v in final if v in p) + ")" for k, p in per.items())
    lead = (f"{best} is ahead on {top} of {len(per) + len(ties)} ranked metrics" if best else
            f"{' and '.join(leaders)} share the lead ({top} metrics each of {len(per) + len(ties)})")
    text = (f"At equal steps, {lead} (wins: {', '.join(f'{v} {n}' for v, n in wins.items())}; "
            f"{len(ties)} within {100 * tie:.0f}%, called ties). {detail}.")
    return {"best": best, "wins": wins, "per_metric": per, "ties": ties, "text": text}


# --------------------------------------------------------------------------- runner

def _parse_value(text: str):
    import yaml
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
            raise SystemExit(f"nbcore.notebooks: --only {o!r} matches no notebook (choose from {', '.join(NOTEBOOKS)})")
        picked += hits
    return [n for n in NOTEBOOKS if n in picked]


def _declared(nb_path: Path) -> dict:
    import papermill as pm
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
    from .utils import write_json
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
        lines.append(f"| [{name}]({name}.ipynb) | {e['status']} | {e.get('time_s', 0):.1f} | {km} | "
                     + " ".join(f"[{f}]({name}/{f})" for f in figs) + " |")
        rows_html.append(
            f"<tr><td><a href='{name}.ipynb'>{name}</a><br><a href='{name}/metrics.json'>metrics.json</a></td>"
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
    import papermill as pm
    from tqdm.auto import tqdm

    if profile not in PROFILES:
        raise SystemExit(f"nbcore.notebooks: unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
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
            raise SystemExit(f"nbcore.notebooks: notebook {path} is missing")
        declared[nb] = _declared(path)
    unknown = [k for k in params if not any(k in d for d in declared.values())]
    dropped = [k for k in unknown if k in lenient]
    if dropped:  # a YAML file may hold parameters of notebooks this run does not select
        print(f"[nbcore.notebooks] note: {dropped} (from the YAML file) are declared by none of {selected}: ignored",
              file=sys.stderr)
        params = {k: v for k, v in params.items() if k not in dropped}
        unknown = [k for k in unknown if k not in dropped]
    if unknown:
        raise SystemExit(f"nbcore.notebooks: parameter(s) {unknown} are declared by none of {selected}")
    reserved = {"profile", "run_dir", "device"} & set(params)
    if reserved:
        raise SystemExit(f"nbcore.notebooks: set {sorted(reserved)} with --profile / --name / --device, not -p")

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
        print(f"[nbcore.notebooks] {nb}: running ({', '.join(f'{k}={v}' for k, v in inject.items() if k != 'run_dir')})",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        entry = {"status": "running"}
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
        entry["time_s"] = round(time.perf_counter() - t0, 2)
        mpath = run_dir / nb / "metrics.json"
        if mpath.exists():
            rec = json.loads(mpath.read_text())
            entry.update(figures=rec.get("figures", []), key_metrics=_key_metrics(rec),
                         failed_checks=rec.get("failed_checks", []))
        entries[nb] = entry
        meta.update(wall_s=time.perf_counter() - t_run, status="running")
        _write_index(run_dir, entries, meta)
        print(f"[nbcore.notebooks] {nb}: {entry['status']} in {entry['time_s']:.1f} s"
              + (f" -- {entry['error'].splitlines()[0][:300]}" if status else ""), file=sys.stderr, flush=True)
        if status:
            break
    bar.close()
    meta.update(wall_s=time.perf_counter() - t_run, status="failed" if status else "ok")
    _write_index(run_dir, entries, meta)
    print(f"[nbcore.notebooks] run {meta['name']}: {meta['status']} in {meta['wall_s']:.0f} s -> "
          f"{run_dir / 'index.md'}", file=sys.stderr, flush=True)
    return status


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbcore.notebooks",
                                 description="Run the nbcore notebook suite through papermill.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the notebooks in order into outputs/runs/<name>/")
    r.add_argument("--profile", required=True, choices=sorted(PROFILES), help="parameter profile: smoke (plumbing), cpu, gpu")
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
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        for nb in NOTEBOOKS:
            print(nb)
        print(json.dumps(PROFILES, indent=1))
        return 0
    params: dict = {}
    from_yaml: set = set()
    if args.params_yaml:
        import yaml
        p = Path(args.params_yaml)
        if not p.is_file():
            raise SystemExit(f"nbcore.notebooks: --params-yaml {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"nbcore.notebooks: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"nbcore.notebooks: {p} must hold a mapping of parameter: value")
        params.update(loaded)
        from_yaml = set(loaded)
    for item in args.param:
        if "=" not in item:
            raise SystemExit(f"nbcore.notebooks: -p {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        if not k.isidentifier():
            raise SystemExit(f"nbcore.notebooks: -p {item!r}: {k!r} is not a parameter name")
        params[k] = _parse_value(v)
        from_yaml.discard(k)
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise SystemExit(f"nbcore.notebooks: --name {args.name!r} must be a plain folder name")
    return run_suite(args.profile, only=args.only, name=args.name, params=params, device=args.device,
                     out_root=args.out_root, kernel=args.kernel, cell_timeout=args.cell_timeout,
                     lenient=frozenset(from_yaml))


if __name__ == "__main__":
    sys.exit(main())
