"""Two suite runs side by side, from their ``eval.json`` (``python -m nbcore.runner compare RUN_A RUN_B``).

For every row both runs scored (calibration rows and arms), guidance on and off, reconstruction and
text only, one metric (layout error by default):

- each run's mean [95% interval] over its scenes;
- each run's **paired** difference arm - baseline over the same scenes (``eval.json`` ``diffs``:
  per-scene values paired inside one run), which is what the runs' conclusions rest on;
- B - A between the runs. ``eval.json`` keeps means and intervals, not per-scene values, so this one is
  **not paired**: its interval combines the two half-widths as if independent,
  ``sqrt(hw_A^2 + hw_B^2)``. With the same scenes in both runs (same world seed and count) the true
  paired interval is narrower; the table says so.

Written beside the runs, in ``<parent of RUN_A>/compare/<A>_vs_<B>/``: ``compare.md`` (one table,
markdown, with the settings of both runs) and ``compare.png`` (the paired differences arm - baseline,
arm by arm, both runs side by side, with intervals and a zero line).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt

from .viz import save_figure

__all__ = ["load_eval", "compare_rows", "compare_table", "compare_figure", "compare_runs"]

GUIDANCE = {"on": "guided", "off": "guidance off"}
MODES = {"recon": "recon", "textonly": "text only"}


def load_eval(run_dir) -> dict:
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the suite to notebook 05 first (python -m nbcore.runner run)")
    return json.loads(path.read_text())


def _ci(c: dict | None) -> tuple[float, float, float] | None:
    if not c or c.get("mean") is None:
        return None
    return c["mean"], c.get("lo", c["mean"]), c.get("hi", c["mean"])


def _cell(c) -> str:
    return "—" if c is None else f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"


def _dcell(c) -> str:
    return "—" if c is None else f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}]"


def compare_rows(a: dict, b: dict, metric: str = "layout_error") -> list[dict]:
    """One record per (row, guidance, mode) both runs have: ``a``, ``b`` (mean, lo, hi), ``b_minus_a``
    (difference, lo, hi; unpaired), ``a_vs_base``, ``b_vs_base`` (paired within a run; None for rows
    without a paired difference)."""
    out = []
    for row in [r for r in a["rows"] if r in b["rows"]]:
        for g in ("on", "off"):
            for m in MODES:
                ca = _ci(((a["rows"][row].get(g) or {}).get(m) or {}).get(metric))
                cb = _ci(((b["rows"][row].get(g) or {}).get(m) or {}).get(metric))
                if ca is None or cb is None:
                    continue
                hw = math.hypot((ca[2] - ca[1]) / 2, (cb[2] - cb[1]) / 2)
                d = cb[0] - ca[0]
                paired = [_ci(((((run.get("diffs") or {}).get(row) or {}).get(g) or {}).get(m) or {}).get(metric))
                          for run in (a, b)]
                out.append({"row": row, "guidance": g, "mode": m, "a": ca, "b": cb, "b_minus_a": (d, d - hw, d + hw),
                            "a_vs_base": paired[0], "b_vs_base": paired[1]})
    return out


def compare_table(recs: list[dict], name_a: str, name_b: str, metric: str = "layout_error") -> str:
    """The markdown table (one line per row and setting)."""
    head = (f"| row | setting | {name_a} | {name_b} | {name_b} − {name_a} (unpaired) | "
            f"{name_a}: arm − baseline (paired) | {name_b}: arm − baseline (paired) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['row']} | {MODES[r['mode']]}, {GUIDANCE[r['guidance']]} | {_cell(r['a'])} | {_cell(r['b'])} | "
                     f"{_dcell(r['b_minus_a'])} | {_dcell(r['a_vs_base'])} | {_dcell(r['b_vs_base'])} |")
    return "\n".join(lines)


def compare_figure(recs: list[dict], name_a: str, name_b: str, metric: str = "layout_error"):
    """Paired differences arm − baseline (within each run), arm by arm: one panel per (mode, guidance),
    run A and run B side by side with 95% intervals; a zero line (no difference). (Kept here, not in
    nbcore.viz, because the figure belongs to this comparison only.)"""
    panels = [(m, g) for m in MODES for g in ("on", "off")
              if any(r["mode"] == m and r["guidance"] == g and (r["a_vs_base"] or r["b_vs_base"]) for r in recs)]
    n = max(1, len(panels))
    ncol = min(2, n)
    nrow = (n + ncol - 1) // ncol
    n_arms = max(1, len({r["row"] for r in recs if r["a_vs_base"] or r["b_vs_base"]}))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, (0.45 * n_arms + 1.4) * nrow), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (m, g) in zip(axes.flat, panels):
        rows = [r for r in recs if r["mode"] == m and r["guidance"] == g and (r["a_vs_base"] or r["b_vs_base"])]
        for k, (key, name, colour, dy) in enumerate((("a_vs_base", name_a, "#1f77b4", -0.15),
                                                     ("b_vs_base", name_b, "#d62728", 0.15))):
            ys, xs, lo, hi = [], [], [], []
            for i, r in enumerate(rows):
                if r[key] is not None:
                    ys.append(i + dy)
                    xs.append(r[key][0])
                    lo.append(r[key][0] - r[key][1])
                    hi.append(r[key][2] - r[key][0])
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", color=colour, capsize=3, label=name)
        ax.axvline(0, color="0.4", lw=1, ls="--")
        ax.set_yticks(range(len(rows)), [r["row"] for r in rows], fontsize=8)
        ax.set_xlabel(f"{metric.replace('_', ' ')}: arm − baseline\n(paired, 95% interval; lower is better)", fontsize=8)
        ax.set_title(f"{MODES[m]}, {GUIDANCE[g]}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].invert_yaxis()                    # shared: the first arm on top, once
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{name_a} vs {name_b}: paired differences from each run's baseline", fontsize=10)
    fig.tight_layout()
    return fig


def _settings_line(name: str, ev: dict) -> str:
    s = ev.get("settings") or {}
    g = s.get("guidance") or []
    return (f"- **{name}**: {s.get('n')} scenes, {s.get('steps')} Euler steps, guided = nested text "
            f"{g[0] if g else '?'} / DINO {g[1] if len(g) > 1 else '?'}; arms {', '.join(s.get('arms') or [])}")


def compare_runs(run_a, run_b, metric: str = "layout_error", out_dir=None) -> dict:
    """Write compare.md and compare.png (module docstring); return {"markdown", "figure", "table", "rows"}."""
    run_a, run_b = Path(run_a), Path(run_b)
    a, b = load_eval(run_a), load_eval(run_b)
    na, nb = run_a.name, run_b.name
    recs = compare_rows(a, b, metric)
    if not recs:
        raise ValueError(f"{na} and {nb} share no scored row with {metric!r}")
    out = Path(out_dir) if out_dir else run_a.parent / "compare" / f"{na}_vs_{nb}"
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(recs, na, nb, metric)
    same = (a.get("settings") or {}).get("n") == (b.get("settings") or {}).get("n")
    text = "\n".join([
        f"# {na} vs {nb}: {metric.replace('_', ' ')} (lower is better)", "",
        _settings_line(na, a), _settings_line(nb, b), "",
        "Means with 95% bootstrap intervals over each run's scenes. The arm − baseline columns are paired "
        "differences over the same scenes within each run (eval.json `diffs`). The "
        f"{nb} − {na} column is **not paired**: eval.json stores means and intervals, not per-scene values, so "
        "its interval combines the two half-widths as if independent" +
        (" (both runs scored the same number of scenes; with the same world seed they are the same scenes, and a "
         "paired interval would be narrower)." if same else "."), "",
        table, "", f"![paired differences arm − baseline, both runs](compare.png)", ""])
    md = out / "compare.md"
    md.write_text(text, encoding="utf-8")
    fig = compare_figure(recs, na, nb, metric)
    png = save_figure(fig, out / "compare.png")
    return {"markdown": str(md), "figure": str(png), "table": table, "rows": recs}
