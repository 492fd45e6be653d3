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


def save_figure(fig, path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _img(x) -> np.ndarray:
    """(3, S, S) tensor/array in [0, 1] -> (S, S, 3) numpy for imshow."""
    x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return np.clip(x.transpose(1, 2, 0), 0, 1)


def image_grid(rows: dict, titles: list[str] | None = None, size: float = 1.4):
    """Columns are the entries of ``rows`` (name -> (B, 3, S, S) images in [0, 1]); one row per sample.

    e.g. ``image_grid({"source": src, "reconstruction": rec, "text only": txt})``; ``titles`` label
    the rows (e.g. captions)."""
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
    fig.tight_layout()
    return fig


def plot_curves(logs: dict[str, list[dict]], keys: list[str], x: str = "step", smooth: int = 1, logy=None):
    """One panel per key; one line per run (``logs``: run name -> list of JSONL records)."""
    logy = set(logy or [])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (run, recs) in enumerate(logs.items()):  # colour by run, not by drawing order
            pts = [(r[x], r[key]) for r in recs if r.get(key) is not None]
            if not pts:
                continue
            xs, ys = map(np.asarray, zip(*pts))
            if smooth > 1 and len(ys) >= smooth:
                ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
                xs = xs[smooth - 1:]
            ax.plot(xs, ys, label=run, lw=1.2, color=f"C{i}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x)
        if key in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_ci_curves(curves: dict[str, list[dict]], mode: str, metric: str, title: str = ""):
    """A metric against step with its 95% band, one line per run (``curves``: run -> milestone
    records ``{"step", mode: {metric: {"mean", "lo", "hi"}}}``, as ``nbcore.experiment.milestones``)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for i, (run, recs) in enumerate(curves.items()):
        pts = [(r["step"], r[mode][metric]) for r in recs if mode in r and r[mode][metric]["mean"] is not None]
        if not pts:
            continue
        xs = np.array([s for s, _ in pts])
        mean, lo, hi = (np.array([c[k] for _, c in pts]) for k in ("mean", "lo", "hi"))
        ax.plot(xs, mean, marker="o", ms=3, lw=1.2, color=f"C{i}", label=run)
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
    ax.set_xlabel("total optimiser steps")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{mode}: {metric}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_ci_bars(res: dict, metric: str, modes=("recon", "textonly")):
    """Final means with 95% intervals per row (calibration rows and arms), guidance off and on, one
    panel per mode (``res``: ``nbcore.experiment.evaluate``'s result)."""
    rows = list(res["rows"])
    fig, axes = plt.subplots(1, len(modes), figsize=(5.0 * len(modes), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for j, g in enumerate(("off", "on")):
            c = [res["rows"][r][g][mode][metric] for r in rows]
            mean = np.array([x["mean"] if x["mean"] is not None else np.nan for x in c])
            err = np.array([[m - x["lo"], x["hi"] - m] if x["mean"] is not None else [0, 0] for m, x in zip(mean, c)]).T
            ax.bar(np.arange(len(rows)) + (j - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=2,
                   label=f"guidance {g}", color=f"C{j}")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{mode}: {metric} (95% interval)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_loss_by_bin(bins: dict[str, list[float]]):
    """Loss per timestep bin (run name -> list of per-bin losses over t in [0, 1])."""
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    for run, vals in bins.items():
        n = len(vals)
        centres = (np.arange(n) + 0.5) / n
        ax.plot(centres, vals, marker="o", ms=3, label=run)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("loss")
    ax.set_title("loss by timestep bin", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def bar_table(table: dict[str, dict[str, float]], title: str = "", lower_is_better: set | None = None):
    """Grouped bars: ``table`` metric -> {run -> value}; one panel per metric."""
    metrics = list(table)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        runs = list(table[metric])
        vals = [table[metric][r] if table[metric][r] is not None else np.nan for r in runs]
        ax.bar(range(len(runs)), vals, color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(runs, rotation=35, ha="right", fontsize=7)
        arrow = " (lower better)" if lower_is_better and metric in lower_is_better else ""
        ax.set_title(metric + arrow, fontsize=8)
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
    axes[0, 0].set_ylabel("mass")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_mass_over_t(t: np.ndarray, mass: np.ndarray, title: str = "routing over the sampling trajectory"):
    """``t`` (F,), ``mass`` (F, 3): mass on each source per forward along t."""
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    for i, src in enumerate(SOURCE_COLOURS):
        ax.plot(t, mass[:, i], marker="o", ms=3, color=SOURCE_COLOURS[src], label=src)
    ax.set_xlabel("t")
    ax.set_ylabel("mass")
    ax.invert_xaxis()
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_patch_maps(image, maps: np.ndarray, grid: tuple[int, int], queries: list[int], patch_grid: int):
    """For a few image tokens (``queries``, indices into the h x w token grid), show where on the
    g x g patch grid their attention goes, beside the image with the query token marked.

    image (3, S, S); maps (N, P) attention of each image token over the patches."""
    h, w = grid
    S = _img(image).shape[0]
    fig, axes = plt.subplots(2, len(queries), figsize=(1.8 * len(queries), 3.6), squeeze=False)
    for j, q in enumerate(queries):
        r, c = divmod(q, w)
        axes[0, j].imshow(_img(image), interpolation="nearest")
        axes[0, j].add_patch(plt.Rectangle((c * S / w, r * S / h), S / w, S / h, fill=False, ec="yellow", lw=2))
        axes[0, j].set_title(f"token ({r},{c})", fontsize=7)
        axes[1, j].imshow(np.asarray(maps[q]).reshape(patch_grid, patch_grid), cmap="magma")
        axes[1, j].plot((c + 0.5) * patch_grid / w - 0.5, (r + 0.5) * patch_grid / h - 0.5, "c+", ms=8)
        for ax in axes[:, j]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[1, 0].set_ylabel("attention\nover patches", fontsize=7)
    fig.tight_layout()
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
