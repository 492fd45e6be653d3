"""Analyses behind notebooks 04 (attention routing) and 05 (milestones): reductions of a routing
capture, patch-map locality, CLS use over training, and the project's success criteria answered in
words built from the measured numbers.

Shape legend: F forwards (sampling steps), depth blocks, B samples, nh heads, N = h*w image tokens,
P = g*g patches, 3 sources [text, CLS, patches].
"""
from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import torch

from .attention import SOURCES, capture
from .sample import load_model, sample

__all__ = ["criteria_figure", "criteria_markdown", "capture_sampling", "routing_tables", "colocated_patch", "patch_locality", "cls_use", "cls_use_answer",
           "mass_at_t", "query_tokens", "success_criteria", "fmt"]


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


@torch.no_grad()
def capture_sampling(model, cond: dict, steps: int, seed: int = 0):
    """Run the Euler sampler (no guidance: the full-conditional branch) with routing capture on.
    cond: dino_emb (B, Dd), dino_patches (B, P, Dd), text_emb (B, L, Dt), text_mask (B, L), on the model's
    device. Returns (latents (B, C, H, W), recorder with F = steps forwards)."""
    with capture(model) as rec:
        z = sample(model, dino_emb=cond["dino_emb"], dino_patches=cond.get("dino_patches"),
                   text_emb=cond["text_emb"], text_mask=cond.get("text_mask"), steps=steps, seed=seed)
    return z, rec


def routing_tables(rec) -> dict:
    """Reductions of ``rec.mass`` (F, depth, B, nh, N, 3): ``per_block_head`` (depth, nh, 3),
    ``per_block`` (depth, 3), ``per_t`` (F, 3) with ``t`` (F,), ``overall`` {source: mass},
    ``max_head`` {source: (mass, block, head)} (the head that uses each source most)."""
    m = rec.mass.float()
    bh = m.mean(dim=(0, 2, 4))                                                          # (depth, nh, 3)
    per_t = m.mean(dim=(1, 2, 3, 4))                                                    # (F, 3)
    out = {"per_block_head": bh.numpy(), "per_block": bh.mean(1).numpy(), "per_t": per_t.numpy(),
           "t": rec.t.float().mean(1).numpy(),
           "overall": {s: float(bh[..., i].mean()) for i, s in enumerate(SOURCES)}, "max_head": {}}
    for i, s in enumerate(SOURCES):
        flat = int(bh[..., i].argmax())
        b, h = divmod(flat, bh.shape[1])
        out["max_head"][s] = (float(bh[b, h, i]), b, h)
    return out


def colocated_patch(h: int, w: int, g: int) -> torch.Tensor:
    """(N,) index of the DINO patch whose cell holds each image token's centre (h x w tokens over a
    g x g patch grid, both covering the whole image, row-major)."""
    r = ((torch.arange(h) + 0.5) * g / h).long().clamp(max=g - 1)
    c = ((torch.arange(w) + 0.5) * g / w).long().clamp(max=g - 1)
    return (r[:, None] * g + c[None, :]).flatten()                                      # (N,)


def patch_locality(maps: torch.Tensor, grid: tuple[int, int], g: int) -> dict:
    """How local is each image token's attention over the patches?

    maps (..., N, P): attention over the patches (any leading dims). ``colocated_share``: mean over
    tokens of (attention on the co-located patch) / (attention on all patches); ``uniform_share``
    = 1 / P (what position-blind attention gives on average); ``ratio`` = their quotient (1 = no
    locality). ``mean_distance``: attention-weighted distance between each token's centre and the
    patch centres, in fractions of the image side, against ``uniform_distance`` for uniform
    attention."""
    h, w = grid
    P = g * g
    m = maps.float().reshape(-1, h * w, P)                                              # (K, N, P)
    m = m / m.sum(-1, keepdim=True).clamp_min(1e-12)
    co = colocated_patch(h, w, g)                                                      # (N,)
    share = m.gather(-1, co.view(1, -1, 1).expand(m.shape[0], -1, 1)).mean()
    ty = ((torch.arange(h) + 0.5) / h).repeat_interleave(w)                             # (N,)
    tx = ((torch.arange(w) + 0.5) / w).repeat(h)
    py = ((torch.arange(g) + 0.5) / g).repeat_interleave(g)                             # (P,)
    px = ((torch.arange(g) + 0.5) / g).repeat(g)
    dist = ((ty[:, None] - py[None]) ** 2 + (tx[:, None] - px[None]) ** 2).sqrt()       # (N, P)
    return {"colocated_share": float(share), "uniform_share": 1.0 / P, "ratio": float(share) * P,
            "mean_distance": float((m * dist).sum(-1).mean()), "uniform_distance": float(dist.mean())}


@torch.no_grad()
def mass_at_t(model, cond: dict, t_values=(0.25, 0.5, 0.75), seed: int = 0) -> dict:
    """Mean routing mass {source: mass} of ``model`` on noised latents of ``cond["latent"]``
    (B, C, H, W) at fixed timesteps (x_t = (1 - t) x0 + t noise, real conditions)."""
    x0 = cond["latent"]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    with capture(model, keep_maps=False) as rec:
        for t in t_values:
            tt = torch.full((x0.shape[0],), float(t), device=x0.device)
            model((1 - t) * x0 + t * noise, tt, cond["dino_emb"], cond.get("dino_patches"), cond["text_emb"],
                  cond.get("text_mask"))
    m = rec.mass.float().mean(dim=(0, 1, 2, 3, 4))                                      # (3,)
    return {s: float(m[i]) for i, s in enumerate(SOURCES)}


def cls_use(checkpoints: list, cond: dict, device, t_values=(0.25, 0.5, 0.75)) -> list[dict]:
    """Routing mass per source over training: ``checkpoints`` [(step, path)] -> records
    {step, text, cls, patches} (EMA weights; fixed batch and timesteps)."""
    out = []
    for step, path in checkpoints:
        model = load_model(path, use_ema=True, device=device)
        c = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}
        out.append({"step": int(step), **mass_at_t(model, c, t_values)})
    return out


def locality_over_training(checkpoints: list, cond: dict, steps: int, device, seed: int = 0) -> list[dict]:
    """Does an image token attend to its co-located patch, and since when? For each milestone
    ``(step, path)``: ``patch_locality`` of the patch maps captured along a sampling trajectory
    (EMA weights, the same batch and noise for every milestone) -> records {step, ratio,
    colocated_share, mean_distance, ...} (ratio 1 = position-blind)."""
    out = []
    for step, path in checkpoints:
        model = load_model(path, use_ema=True, device=device)
        c = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}
        _, rec = capture_sampling(model, c, steps=steps, seed=seed)
        h = model.cfg.input_size // model.cfg.patch_size
        out.append({"step": int(step), **patch_locality(rec.patch_maps, (h, h), model.cfg.dino_grid)})
    return out


def cls_use_answer(over: list[dict], tables: dict, locality: dict, mean_context: float) -> tuple[str, float]:
    """Whether CLS is attended, in one sentence, from ``cls_use`` records ``over``, the
    ``routing_tables`` of the sampling capture, ``patch_locality``'s result and the mean context
    length M (real text + 1 + P). Returns (sentence, CLS share / uniform share 1/M at the last record)."""
    share = over[-1]["cls"] * mean_context
    mass, block, head = tables["max_head"]["cls"]
    text = (f"CLS use (is CLS attended?): over {len(over)} checkpoints CLS received "
            f"{fmt(over[0]['cls'])} -> {fmt(over[-1]['cls'])} of the cross-attention mass; one token of "
            f"about {mean_context:.0f} would get {1 / mean_context:.3g} under uniform attention, so CLS gets "
            f"{share:.2g}x its uniform share. The head using CLS most is block {block} head {head} with "
            f"{fmt(mass)}. Patches: {fmt(tables['overall']['patches'])}, text: {fmt(tables['overall']['text'])}. "
            f"Patch maps: the co-located patch gets {fmt(locality['ratio'])}x the uniform share (1 = position-blind).")
    return text, share


def query_tokens(scene_json: dict | None, h: int, w: int, n: int = 4) -> list[int]:
    """Image-token indices to show patch maps for: the token under each shape's centre (from the
    shapes-world metadata), then corners, up to ``n``."""
    out = []
    for sh in (scene_json or {}).get("shapes", []):
        r = min(h - 1, int(sh["cy"] * h))
        c = min(w - 1, int(sh["cx"] * w))
        out.append(r * w + c)
    for r, c in [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0), (h // 2, w // 2)]:
        out.append(r * w + c)
    seen, uniq = set(), []
    for q in out:
        if q not in seen:
            seen.add(q)
            uniq.append(q)
    return uniq[:n]


# --------------------------------------------------------------------------- success criteria

def _pct(change: float) -> str:
    """A relative change as words: 0.07 -> '7.0% higher', -0.1 -> '10.0% lower'."""
    return f"{100 * abs(change):.1f}% {'higher' if change > 0 else 'lower'}"


def _rel(new, old):
    """Relative improvement of a lower-is-better number: (old - new) / old."""
    if new is None or old is None or old == 0:
        return None
    return (old - new) / abs(old)


def success_criteria(summaries: dict, metrics: dict, baseline: str, patch: str, steps: int,
                     lpips_key: str = "recon_lpips", layout_key: str = "recon_layout_error",
                     text_key: str = "textonly_layout_error", swap_key: str = "swap_follows_dino_rate") -> list[dict]:
    """The project's success criteria (MVP, Good, Excellent), each answered from the numbers.

    summaries: variant -> training summary (``final_loss``, ``skipped``, ``steps``); metrics:
    variant -> validation metrics at the final step (lower-is-better errors, rates in [0, 1]).
    Returns rows {level, criterion, verdict ("met" | "not met" | "not measurable"), evidence}: the
    evidence sentence is built from the values, never pre-written.
    """
    rows = []
    sb, sp = summaries.get(baseline, {}), summaries.get(patch, {})
    mb, mp = metrics.get(baseline, {}), metrics.get(patch, {})

    def add(level, criterion, ok, evidence):
        verdict = "not measurable" if ok is None else ("met" if ok else "not met")
        rows.append({"level": level, "criterion": criterion, "verdict": verdict, "evidence": evidence})

    ran = sp.get("steps")
    finite = sp.get("final_loss") is not None and math.isfinite(sp.get("final_loss"))
    add("MVP", f"training runs without errors ({steps} steps here, 10k planned)",
        None if ran is None else (ran >= steps and finite and sp.get("skipped", 0) == 0),
        f"the patch model ran {ran} steps, {sp.get('skipped')} skipped, final loss {fmt(sp.get('final_loss'))}")
    lb, lp = sb.get("final_loss"), sp.get("final_loss")
    ratio = None if lb in (None, 0) or lp is None else lp / lb
    add("MVP", "loss trajectory similar to the baseline (final loss within 10%)",
        None if ratio is None else ratio <= 1.10,
        f"final loss {fmt(lp)} (patch) vs {fmt(lb)} (baseline): ratio {fmt(ratio)}")
    vb, vp = mb.get(lpips_key), mp.get(lpips_key)
    imp = _rel(vp, vb)
    add("Good", "reconstruction LPIPS improves by more than 10% vs baseline",
        None if imp is None else imp > 0.10,
        f"LPIPS {fmt(vp)} (patch) vs {fmt(vb)} (baseline)" + ("" if imp is None else f": {_pct(-imp)} for the patch model")
        + ("" if vb is not None else f" ({mb.get('lpips_status') or mp.get('lpips_status') or 'LPIPS not computed'})"))
    eb, ep = mb.get(layout_key), mp.get(layout_key)
    imp = _rel(ep, eb)
    add("Good", "spatial layout better: blobs in the right places (reconstruction centroid error >10% lower)",
        None if imp is None else imp > 0.10,
        f"centroid error {fmt(ep)} (patch) vs {fmt(eb)} (baseline), fraction of the image side"
        + ("" if imp is None else f": {_pct(-imp)} for the patch model"))
    tb, tp = mb.get(text_key), mp.get(text_key)
    worse = None if tb is None or tp is None else (tp - tb) / max(abs(tb), 1e-9)
    add("Good", "text conditioning remains strong (text-only layout error no more than 10% worse)",
        None if worse is None else worse <= 0.10,
        f"text-only centroid error {fmt(tp)} (patch) vs {fmt(tb)} (baseline)"
        + ("" if worse is None else f": {_pct(worse)} for the patch model"))
    add("Excellent", "reconstruction LPIPS < 0.4 (planned: by 50k steps)", None if vp is None else vp < 0.4,
        f"LPIPS {fmt(vp)} at {ran} steps")
    add("Excellent", "generation from pure text shows reasonable layout (text-only centroid error < 0.15)",
        None if tp is None else tp < 0.15, f"text-only centroid error {fmt(tp)}")
    fr = mp.get(swap_key)
    add("Excellent", "DINO swap transfers spatial structure (swap follows the DINO source's layout in > 50%)",
        None if fr is None else fr > 0.5, f"follows-DINO rate {fmt(fr)} (baseline {fmt(mb.get(swap_key))})")
    return rows


def criteria_markdown(rows: list[dict]) -> str:
    """``success_criteria`` rows as a Markdown table (for ``IPython.display.Markdown``)."""
    out = ["| level | criterion | verdict | evidence |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['level']} | {r['criterion']} | **{r['verdict']}** | {r['evidence'].replace('|', '/')} |")
    return "\n".join(out)


def criteria_figure(rows: list[dict], title: str = "success criteria"):
    """``success_criteria`` rows as a figure of wrapped text, verdicts coloured (met green, not met
    red, not measurable grey)."""
    colours = {"met": "#2a9d3a", "not met": "#c0392b", "not measurable": "#7f7f7f"}
    blocks = [(r, textwrap.wrap(r["criterion"], 60), textwrap.wrap(r["evidence"], 70)) for r in rows]
    height = sum(max(len(c), len(e)) for _, c, e in blocks) * 0.17 + 0.4 * len(rows) + 0.6
    fig, ax = plt.subplots(figsize=(11, height))
    ax.axis("off")
    y = 1.0
    step = 1.0 / (sum(max(len(c), len(e)) for _, c, e in blocks) + 1.6 * len(rows) + 1)
    ax.text(0.0, y, title, fontsize=10, weight="bold", va="top")
    y -= 1.8 * step
    for r, crit, ev in blocks:
        n = max(len(crit), len(ev))
        ax.text(0.0, y, r["level"], fontsize=8, va="top", weight="bold")
        ax.text(0.09, y, "\n".join(crit), fontsize=8, va="top")
        ax.text(0.50, y, r["verdict"], fontsize=8, va="top", color=colours.get(r["verdict"], "k"), weight="bold")
        ax.text(0.62, y, "\n".join(ev), fontsize=7.5, va="top")
        y -= (n + 1.6) * step
    return fig
