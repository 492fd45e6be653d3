"""Figures for notebooks and CLIs. Every function returns a matplotlib Figure; ``save_figure`` writes
a PNG.

The backend is the user's: importing this module never calls ``matplotlib.use`` (it once switched a
live ``%matplotlib inline`` kernel to Agg, whose backend matplotlib >= 3.9 names "inline", and the
user's own plots stopped showing). Headless runs need nothing either: matplotlib picks Agg itself
when there is no display, and ``savefig`` renders a PNG with any backend.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

SOURCE_COLOURS = {"text": "#4C72B0", "cls": "#DD8452", "patches": "#55A868"}
# What a plotted number is, with its unit and direction (axis labels; a figure never shows a raw key).
AXIS_LABELS = {
    "loss": "flow-matching loss (MSE of v, lower is better)",
    "loss_avg": "flow-matching loss, window mean (lower is better)",
    "grad_norm": "gradient norm (L2, before clipping)",
    "lr": "learning rate",
    "layout_error": "layout error (fraction of the image side, lower is better)",
    "shape_recall": "shape recall (fraction of captioned shapes found, higher is better)",
    "placement_error": "placement error of found shapes (fraction of the side, lower is better)",
    "mask_iou": "mask IoU (0-1, higher is better)",
    "mass": "attention mass (share of the context, 0-1)",
    "ratio": "co-located patch share / uniform share (1 = uniform, higher = more local)",
    "params": "parameters (count, log scale)",
}
# What each evaluation mode feeds the model (panel titles; a figure never shows a raw mode key).
MODE_TITLES = {
    "recon": "reconstruction (own text + own DINO)",
    "textonly": "text only (DINO dropped)",
    "dinoonly": "DINO only (text dropped)",
    "swap_dino": "swap: text of i + DINO of i+1, vs the DINO source",
    "swap_text": "swap: text of i + DINO of i+1, vs the text source",
    "swap_unplaced": "unplaced swap: vs the text's shapes at the DINO's places",
    "swap_unplaced_dino": "unplaced swap: vs the DINO source",
}
# Arm families share a hue (baseline blues, context patch arms greens, tied arms reds, from-scratch
# purple, CLS position orange); seed repeats take a lighter shade of their arm's colour.
ARM_FAMILIES = (("tied", ("#c0392b", "#e6786b", "#f2b1a9")), ("scratch", ("#7b3fa0", "#b48ad0")),
                ("cls", ("#d98c1f", "#f0c27a")), ("patch", ("#1e8449", "#52be80", "#82e0aa", "#a9dfbf")),
                ("baseline", ("#1f4e9c", "#6a9be0", "#a9c5ee")))


def save_figure(fig, path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _label(key: str, width: int | None = None) -> str:
    text = AXIS_LABELS.get(key, key.replace("_", " "))
    return textwrap.fill(text, width) if width else text


def _run_colour(run: str, i: int) -> str:
    """Colour of a run by its arm family (ARM_FAMILIES); seed repeats ("-seed1") a lighter shade;
    runs of no known family keep matplotlib's cycle."""
    name = run.lower()
    seed = int(name.rsplit("seed", 1)[1]) if "-seed" in name and name.rsplit("seed", 1)[1].isdigit() else 0
    for fam, shades in ARM_FAMILIES:
        if fam in name:
            if fam == "patch":      # the context patch arms: one shade per position embedding
                k = next((j for j, pe in enumerate(("none", "learned", "sincos")) if pe in name), 3)
                return shades[min(k + seed, len(shades) - 1)]
            return shades[min(seed, len(shades) - 1)]
    return f"C{i}"


def _img(x) -> np.ndarray:
    """(3, S, S) tensor/array in [0, 1] -> (S, S, 3) numpy for imshow."""
    x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return np.clip(x.transpose(1, 2, 0), 0, 1)


def image_grid(rows: dict, titles: list[str] | None = None, size: float = 1.4, title: str | None = None):
    """Columns are the entries of ``rows`` (name -> (B, 3, S, S) images in [0, 1]); one row per sample.

    e.g. ``image_grid({"source": src, "reconstruction": rec, "text only": txt})``; ``titles`` label
    the rows (e.g. captions); ``title`` (what made the images: model, guidance, steps) on top."""
    names = list(rows)
    B = len(rows[names[0]])
    fig, axes = plt.subplots(B, len(names), figsize=(size * len(names), size * B), squeeze=False)
    for j, name in enumerate(names):
        for i in range(B):
            ax = axes[i, j]
            ax.imshow(_img(rows[name][i]), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize=6, rotation=0, ha="right", va="center", wrap=True)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()                   # makes room for the suptitle too
    return fig


def plot_curves(logs: dict[str, list[dict]], keys: list[str], x: str = "step", smooth: int = 1, logy=None,
                title: str | None = None, refs: dict | None = None, xlabel: str | None = None):
    """One panel per key; one line per run (``logs``: run name -> list of JSONL records), coloured by
    arm family. Axes say what each number is (``AXIS_LABELS``); ``title`` (e.g. the arm, the run) on
    top; ``refs``: key -> [(value, label)] horizontal reference lines (e.g. uniform attention 1.0)."""
    logy = set(logy or [])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (run, recs) in enumerate(logs.items()):  # colour by run, not by drawing order
            pts = [(r[x], r[key]) for r in recs if r.get(key) is not None]
            if not pts:
                continue
            xs, ys = map(np.asarray, zip(*pts))
            if smooth > 1 and len(ys) >= smooth:
                ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
                xs = xs[smooth - 1:]
            ax.plot(xs, ys, label=run, lw=1.2, color=_run_colour(run, i))
        for value, label in (refs or {}).get(key, []):
            ax.axhline(value, color="0.35", ls="--", lw=1)
            ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=6, color="0.3",
                        va="bottom")
        ax.set_title(_label(key).split(" (")[0] + (f" (smoothed over {smooth})" if smooth > 1 else ""), fontsize=9)
        ax.set_ylabel(_label(key, 40), fontsize=7)
        ax.set_xlabel(xlabel or ("optimiser steps" if x == "step" else x.replace("_", " ")), fontsize=8)
        if key in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_ci_curves(curves: dict[str, list[dict]], mode: str, metric: str, title: str = "",
                   refs: list | None = None, vlines: list | None = None):
    """A metric against total optimiser steps with its 95% band, one line per run coloured by arm
    family (``curves``: run -> milestone records ``{"step", mode: {metric: {"mean", "lo", "hi"}}}``,
    as ``nbcore.experiment.milestones``). ``refs``: [(value, label)] horizontal reference lines (e.g.
    the layout-blind row); ``vlines``: [(step, label)] (e.g. the warm-start branch point)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for i, (run, recs) in enumerate(curves.items()):
        pts = [(r["step"], r[mode][metric]) for r in recs if mode in r and r[mode][metric]["mean"] is not None]
        if not pts:
            continue
        xs = np.array([s for s, _ in pts])
        mean, lo, hi = (np.array([c[k] for _, c in pts]) for k in ("mean", "lo", "hi"))
        colour = _run_colour(run, i)
        ax.plot(xs, mean, marker="o", ms=3, lw=1.2, color=colour, label=run)
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.15)
    for value, label in refs or []:
        ax.axhline(value, color="0.35", ls="--", lw=1)
        ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=6, color="0.3", va="bottom")
    for step, label in vlines or []:
        ax.axvline(step, color="0.5", ls=":", lw=1)
        ax.annotate(label, (step, 0.98), xycoords=("data", "axes fraction"), fontsize=6, color="0.3",
                    rotation=90, va="top", ha="right")
    ax.set_xlabel("total optimiser steps")
    ax.set_ylabel(_label(metric, 40) + "\nmean, 95% band", fontsize=7)
    ax.set_title(title or f"{MODE_TITLES.get(mode, mode)}: {_label(metric).split(' (')[0]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_ci_bars(res: dict, metric: str, modes=("recon", "textonly"), title: str | None = None,
                 refs: list | None = None, guidance: str = "guided = nested, text 3 / DINO 2"):
    """Final means with 95% intervals per row (calibration rows and arms), guidance off and on, one
    panel per mode (``res``: ``nbcore.experiment.evaluate``'s result). ``refs``: [(value, label)]
    reference lines; ``guidance`` says what "on" means (legend); ``title`` on top."""
    rows = list(res["rows"])
    fig, axes = plt.subplots(1, len(modes), figsize=(5.0 * len(modes), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for j, g in enumerate(("off", "on")):
            c = [res["rows"][r][g][mode][metric] for r in rows]
            mean = np.array([x["mean"] if x["mean"] is not None else np.nan for x in c])
            err = np.array([[m - x["lo"], x["hi"] - m] if x["mean"] is not None else [0, 0] for m, x in zip(mean, c)]).T
            ax.bar(np.arange(len(rows)) + (j - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=2,
                   label="guidance off" if g == "off" else f"guidance on ({guidance})", color=f"C{j}")
        for value, label in refs or []:
            ax.axhline(value, color="0.35", ls="--", lw=1)
            ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=6, color="0.3", va="bottom")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel(_label(metric, 40) + "\nmean, 95% interval", fontsize=7)
        ax.set_title(MODE_TITLES.get(mode, mode), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94) if title else None)
    return fig


def plot_loss_by_bin(bins: dict[str, list[float]]):
    """Loss per timestep bin (run name -> list of per-bin losses over t in [0, 1])."""
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    for run, vals in bins.items():
        n = len(vals)
        centres = (np.arange(n) + 0.5) / n
        ax.plot(centres, vals, marker="o", ms=3, label=run)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel(_label("loss"), fontsize=7)
    ax.set_title("loss by timestep bin", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def bar_table(table: dict[str, dict[str, float]], title: str = "", lower_is_better: set | None = None,
              logy: bool | set = False, higher_is_better: set | None = None, units: dict | None = None):
    """Grouped bars: ``table`` metric -> {run -> value}; one panel per metric. ``logy``: True (every
    panel) or a set of metrics on a log axis (sizes that span orders of magnitude); ``units``: metric ->
    the y-axis label; the title says "lower/higher is better" where the caller says so."""
    metrics = list(table)
    width = max(2.6, 0.5 * max(len(table[m]) for m in metrics))          # room for every bar's label
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 3.0), squeeze=False)
    short = lambda v: ("n/a" if not np.isfinite(v) else f"{v / 1e6:.3g}M" if abs(v) >= 1e6 else
                       f"{v / 1e3:.3g}k" if abs(v) >= 1e4 else f"{v:.3g}")
    for ax, metric in zip(axes[0], metrics):
        runs = list(table[metric])
        vals = [table[metric][r] if table[metric][r] is not None else np.nan for r in runs]
        bars = ax.bar(range(len(runs)), vals, color=[f"C{i}" for i in range(len(runs))])
        if logy is True or (logy and metric in logy):
            ax.set_yscale("log")
        ax.bar_label(bars, labels=[short(float(v)) for v in vals], fontsize=6)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(runs, rotation=35, ha="right", fontsize=7)
        arrow = (" (lower is better)" if lower_is_better and metric in lower_is_better else
                 " (higher is better)" if higher_is_better and metric in higher_is_better else "")
        ax.set_title(metric + arrow, fontsize=8)
        ax.set_ylabel((units or {}).get(metric, _label(metric, 40)), fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_context_layout(n_text: int, n_cls: int, n_patches: int, n_real_text: int | None = None):
    """The cross-attention context as a bar: [text | CLS | patches] with token counts."""
    fig, ax = plt.subplots(figsize=(8, 1.3))
    start = 0
    parts = [("text", n_text, SOURCE_COLOURS["text"]), ("CLS", n_cls, SOURCE_COLOURS["cls"]),
             ("patches", n_patches, SOURCE_COLOURS["patches"])]
    for name, n, colour in parts:
        if n == 0:
            continue
        ax.barh(0, n, left=start, color=colour, edgecolor="k")
        ax.text(start + n / 2, 0, f"{name}\n{n}", ha="center", va="center", fontsize=8)
        start += n
    if n_real_text is not None and n_real_text < n_text:
        ax.barh(0, n_text - n_real_text, left=n_real_text, color="white", hatch="//", edgecolor="k", alpha=0.6)
    ax.set_xlim(0, start)
    ax.set_yticks([])
    ax.set_xlabel("context token index")
    ax.set_title(f"cross-attention context: {start} tokens", fontsize=9)
    fig.tight_layout()
    return fig


def plot_routing_mass(mass: np.ndarray, title: str = "attention mass per block"):
    """``mass`` (depth, 3) or (depth, heads, 3) over [text, CLS, patches] -> stacked bars per block
    (and per head when given)."""
    mass = np.asarray(mass)
    if mass.ndim == 2:
        mass = mass[:, None]
    depth, heads, _ = mass.shape
    fig, axes = plt.subplots(1, depth, figsize=(max(2.2, 0.35 * heads + 1) * depth, 2.8), squeeze=False, sharey=True)
    for b, ax in enumerate(axes[0]):
        bottom = np.zeros(heads)
        for i, src in enumerate(SOURCE_COLOURS):
            ax.bar(range(heads), mass[b, :, i], bottom=bottom, color=SOURCE_COLOURS[src], label=src)
            bottom += mass[b, :, i]
        ax.set_title(f"block {b}", fontsize=8)
        ax.set_xlabel("head" if heads > 1 else "")
        ax.set_xticks(range(heads))
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel(_label("mass"), fontsize=7)
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_mass_over_t(t: np.ndarray, mass: np.ndarray, title: str = "routing over the sampling trajectory"):
    """``t`` (F,), ``mass`` (F, 3): mass on each source per forward along t."""
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    for i, src in enumerate(SOURCE_COLOURS):
        ax.plot(t, mass[:, i], marker="o", ms=3, color=SOURCE_COLOURS[src], label=src)
    ax.set_xlabel("t (1 = noise, sampling runs to 0 = data)")
    ax.set_ylabel(_label("mass"), fontsize=7)
    ax.invert_xaxis()
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_patch_maps(image, maps: np.ndarray, grid: tuple[int, int], queries: list[int], patch_grid: int,
                    title: str | None = None):
    """For a few image tokens (``queries``, indices into the h x w token grid), where on the image their
    attention over the g x g patches goes: the map laid over the image (each patch on the image
    rectangle it sees), the query token outlined, one colour scale for all panels with its colourbar.

    image (3, S, S); maps (N, P) attention of each image token over the patches (each row sums to its
    mass on the patches). ``title`` (e.g. the arm, its step, t) on top."""
    h, w = grid
    img = _img(image)
    S = img.shape[0]
    sel = np.stack([np.asarray(maps[q]).reshape(patch_grid, patch_grid) for q in queries])      # (Q, g, g)
    vmax = float(sel.max()) if sel.size and sel.max() > 0 else 1.0
    fig, axes = plt.subplots(1, len(queries), figsize=(2.1 * len(queries) + 0.8, 2.5), squeeze=False)
    im = None
    for j, q in enumerate(queries):
        r, c = divmod(q, w)
        ax = axes[0, j]
        ax.imshow(img, interpolation="nearest", extent=(0, S, S, 0))
        im = ax.imshow(sel[j], cmap="magma", alpha=0.6, vmin=0, vmax=vmax, interpolation="nearest",
                       extent=(0, S, S, 0))                                             # patch (i, j) over its rectangle
        ax.add_patch(plt.Rectangle((c * S / w, r * S / h), S / w, S / h, fill=False, ec="cyan", lw=2))
        ax.set_title(f"query token ({r},{c})", fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
    cb = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.04, pad=0.02)
    cb.set_label("attention weight on the patch\n(share of the context)", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    fig.suptitle(title or "where an image token's attention over the DINO patches goes (cyan: the token)", fontsize=8)
    return fig


def plot_table(rows: list[dict], title: str = ""):
    """A list of dicts rendered as a table figure (for check tables in notebooks); long text is
    wrapped, columns are as wide as their longest line."""
    cols = list(rows[0])
    fmt = lambda v: ("%.4g" % v) if isinstance(v, float) else textwrap.fill(str(v), 48)
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    heights = [max(cell.count("\n") + 1 for cell in row) for row in cells]       # lines per row
    widths = [max(len(line) for cell in [c, *(row[j] for row in cells)] for line in cell.split("\n")) + 2
              for j, c in enumerate(cols)]
    fig, ax = plt.subplots(figsize=(min(16, 0.075 * sum(widths)), 0.2 * (sum(heights) + 1) + 0.6))
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=cols, loc="center", cellLoc="left",
                   colWidths=[w / sum(widths) for w in widths])
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    unit = 1.0 / (sum(heights) + 1)
    for (r, c), cell in tab.get_celld().items():
        cell.set_height(unit * (1 if r == 0 else heights[r - 1]))
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- experiment figures

def plot_head_heatmap(values, title: str, label: str, reference: float | None = 1.0):
    """values (depth, nh) per block and head, e.g. the co-located patch share / uniform; the colour
    scale starts at ``reference`` (uniform attention) when given, so "no locality" is the palest."""
    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * v.shape[1], 0.9 + 0.6 * v.shape[0]))
    im = ax.imshow(v, cmap="viridis", vmin=reference if reference is not None else v.min(), aspect="auto")
    for (i, j), x in np.ndenumerate(v):
        ax.text(j, i, f"{x:.1f}", ha="center", va="center", color="w" if x < v.max() * 0.6 else "k", fontsize=8)
    ax.set_xticks(range(v.shape[1]), [f"head {j}" for j in range(v.shape[1])])
    ax.set_yticks(range(v.shape[0]), [f"block {i}" for i in range(v.shape[0])])
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def sample_grid(images: dict[str, torch.Tensor], sources: torch.Tensor, captions: list[str], title: str,
                size: float = 1.1):
    """Rows: the source images, then one row per model (name -> images (n, 3, S, S)), the same
    scenes in the same columns (shared noise); column titles are the captions."""
    rows = {"source": sources, **images}
    n = sources.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n + 1.6, size * len(rows) + 0.8), squeeze=False)
    for i, (name, ims) in enumerate(rows.items()):
        for j in range(n):
            ax = axes[i, j]
            ax.imshow(_img(ims[j]))
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if i == 0:
                ax.set_title(textwrap.fill(captions[j], 18), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
