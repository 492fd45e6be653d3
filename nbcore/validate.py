"""Validation suite: turn "blobs in the right places" into numbers for one or more checkpoints.

For ``n`` validation samples of a shapes-world dataset (``DIR/val-*.tar`` + ``DIR/stats.json``) it
samples four sets of images with one shared noise draw (seeded) and scores them:

    reconstruction  own text + own DINO (CLS + patches), with guidance  -> PSNR, LPIPS, layout, encoder similarity
    no guidance     the same conditions, v = v_full (guidance off)      -> PSNR, LPIPS, layout, encoder similarity
    text only       own text, null DINO, text guidance                  -> layout against the caption's own scene
    DINO swap       text of sample i, DINO of sample (i + 1) mod n      -> whose layout / colours it follows (rates)

Layout metrics are ``nbcore.metrics.shape_layout``'s (shapes found as connected components:
``layout_error`` with a missed shape at the miss penalty, ``shape_recall``, ``placement_error``,
``mask_iou``, also reported as ``layout_iou``); they need the shards' ``json`` scene metadata, so
they are shapes-world only. Source images are the shards' ``png`` members (the codec's decoding of the stored latents when a
shard has none); the scene colours come from the ``json`` members (layout and swap metrics are
``None``, with a reason, without them). Generated latents are decoded with the shapes world's
pixel codec at the model's sizes (``ShapesWorld(model.cfg)``; its stand-in encoders do not depend
on the world seed). Metric definitions and conventions: ``nbcore.metrics``. Sampler and guidance
formulas: ``nbcore.sample``.

Library: ``validate_checkpoint(model_or_path, data_dir, out_dir=..., ...) -> dict`` (flat: every
metric a float / int / str / None) writes ``OUT/metrics.json`` and ``OUT/grid.png``
(source | reconstruction | text only | DINO swap | no guidance).

CLI::

    python -m nbcore.validate CKPT [CKPT ...] --data DIR --out DIR [--n N --steps S --seed K --device D]

writes ``OUT/metrics.json`` (settings, LPIPS status, and every metric per checkpoint) and
``OUT/<tag>/grid.png`` + ``OUT/<tag>/metrics.json`` per checkpoint, with a progress bar.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import make_loader, shard_list
from .metrics import (PSNR_CAP_DB, LPIPSMetric, encoder_similarity, psnr, shape_layout, swap_follow)
from .model import CONDITION_KEYS, NanoDiT
from .sample import Guidance, load_model_with_info, sample
from .shapes import ShapesWorld, colour_mask
from .utils import (ArgParser, HookUnavailable, bad_arguments, check_checkpoint_file, check_writable, resolve_device,
                    write_json)
from .viz import image_grid, save_figure

__all__ = ["validate_checkpoint", "load_val_batch", "sample_grid", "DEFAULT_GUIDANCE", "main"]

# Defaults of the suite: nested guidance (InstructPix2Pix-style), text 2, DINO 2, on every step.
DEFAULT_GUIDANCE = Guidance("nested", text_scale=2.0, dino_scale=2.0)
PHASES = ("reconstruction", "no guidance", "text only", "DINO swap", "metrics")


# --------------------------------------------------------------------------- data

def load_val_batch(data_dir: str | os.PathLike, n: int, split: str = "val", stats: str | None = "auto") -> dict:
    """The first ``n`` samples of one latent shape of ``DATA_DIR/{split}-*.tar`` (shard order, no
    shuffle) as one batch, conditioning normalised with ``stats`` ("auto" = ``DATA_DIR/stats.json``
    when it exists, as the trainer does; None = raw). Fewer samples than ``n`` -> all of them.

    Aspect-ratio buckets put several latent shapes in a split; a batch holds one: the first shape to
    reach ``n`` samples in shard order, or, when none does, the split's most common shape.
    ``batch["selection"]`` (a line of text) says what was taken and what was left out."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shards = shard_list(data_dir, split)
    if stats == "auto":
        p = Path(data_dir) / "stats.json"
        stats = str(p) if p.exists() else None
    groups: dict[tuple, list[dict]] = {}                    # latent shape -> its samples (batches of 1)
    for b in make_loader(shards, 1, stats=stats, shuffle=0, epochs=1):     # one at a time: shard order
        shape = tuple(b["latent"].shape[1:])
        groups.setdefault(shape, []).append(b)
        if len(groups[shape]) >= n:
            break
    counts = {shape: len(parts) for shape, parts in groups.items()}
    if not groups:
        raise ValueError(f"no usable samples in {data_dir} ({split} split)")
    shape = max(counts, key=counts.get)                     # the one that reached n, else the most common
    batch = _cat_batches(groups[shape], n)
    batch["selection"] = _selection(split, n, shape, counts)
    return batch


def _shape_str(shape: tuple) -> str:
    return "x".join(map(str, shape))


def _selection(split: str, n: int, shape: tuple, counts: dict) -> str:
    """One line: which samples a validation batch holds."""
    k = min(n, counts[shape])
    line = f"{'the first' if counts[shape] >= n else 'all'} {k} samples of latent shape {_shape_str(shape)} " \
           f"of the {split} split"
    others = {s: c for s, c in counts.items() if s != shape}
    if others:
        line += "; left out (other shapes, among the samples read): " + \
                ", ".join(f"{_shape_str(s)}: {c}" for s, c in others.items())
    return line


def _cat_batches(parts: list[dict], n: int) -> dict:
    """Concatenate loader batches of one latent shape (text padded to the longest); keep the first n."""
    L = max(b["text_emb"].shape[1] for b in parts)
    out: dict = {}
    for k in parts[0]:
        vals = [b[k] for b in parts if k in b]
        if len(vals) != len(parts):
            continue                         # a member only some batches have is dropped
        if k in ("text_emb", "text_mask"):
            vals = [torch.nn.functional.pad(v, (0, 0, 0, L - v.shape[1]) if k == "text_emb" else (0, L - v.shape[1]))
                    for v in vals]           # (b, L, Dt) / (b, L)
        out[k] = torch.cat(vals)[:n] if torch.is_tensor(vals[0]) else sum(vals, [])[:n]
    return out


def _scene_colours(meta: list[dict] | None) -> list[list[str]] | None:
    if meta is None:
        return None
    try:
        return [[s["colour"] for s in m["shapes"]] for m in meta]
    except (KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- the suite

def _resolve_model(model_or_path, device, use_ema: bool):
    """-> (model, info, restore) where restore() puts a passed-in module back in its mode."""
    if isinstance(model_or_path, NanoDiT):
        model = model_or_path
        was_training = model.training
        if device is not None:
            dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
            if next(model.parameters()).device.type != dev.type:
                raise ValueError(f"model is on {next(model.parameters()).device}, validation asked for {dev}")
        model.eval()
        return model, {"checkpoint": None, "weights": "given module", "step": None}, lambda: model.train(was_training)
    path = Path(model_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    model, info = load_model_with_info(path, use_ema=use_ema, device=device or "auto")
    return model, {"checkpoint": str(path), "weights": info["weights"], "step": info["step"]}, lambda: None


def _sample_chunks(model, noise, chunk, **cond_and_kw) -> torch.Tensor:
    """``sample`` over the batch in chunks of ``chunk`` (same result as one call: noise is given)."""
    outs = []
    n = noise.shape[0]
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        kw = {k: (v[sl] if torch.is_tensor(v) else v) for k, v in cond_and_kw.items()}
        outs.append(sample(model, noise=noise[sl], **kw).cpu())
    return torch.cat(outs)


def validate_checkpoint(model, data_dir: str | os.PathLike | None = None, *, out_dir: str | os.PathLike | None = None,
                        n: int = 16, steps: int = 20, seed: int = 0, guidance: Guidance | None = None,
                        device: str | None = None, use_ema: bool = True, batch_size: int = 64,
                        guidance_batched: bool = True, lpips: LPIPSMetric | None = None,
                        lpips_weights: str | None = None, figure_rows: int = 8, progress: bool = True,
                        bar=None, data: str | None = None, out: str | None = None) -> dict:
    """Run the suite (module docstring) for one model and return a flat dict of metrics.

    model: a ``NanoDiT`` (used as is, put back in its train/eval mode afterwards) or a checkpoint path
    (loaded with ``load_model``; EMA weights unless ``use_ema=False``). data_dir: dataset folder
    (``data`` is an alias, as the trainer's hook calls it); out_dir (alias ``out``): where
    ``metrics.json`` and ``grid.png`` go (None = write nothing). n samples, ``steps`` Euler steps,
    ``seed`` for the shared noise, ``guidance`` for the guided runs (default ``DEFAULT_GUIDANCE``),
    ``batch_size`` samples per sampler call. lpips: a prepared ``LPIPSMetric`` (else built from
    ``lpips_weights``, local files only). ``bar``: an outer tqdm to advance once per phase.

    Keys: ``{run}_{metric}`` for run in recon, noguid, textonly, swap (e.g. ``recon_psnr``,
    ``recon_lpips``, ``recon_layout_error``, ``recon_layout_iou``, ``recon_cls_cos``,
    ``recon_patch_cos``, ``textonly_layout_error``, ``swap_follows_dino_rate``, ...), plus
    ``lpips_status``, ``layout_status``, ``n``, ``steps``, ``seed``, ``guidance``, ``checkpoint``,
    ``weights``, ``step``, ``figure``, ``seconds``. A metric that cannot be computed is None and
    its status key says why.
    """
    data_dir = data_dir if data_dir is not None else data
    out_dir = out_dir if out_dir is not None else out
    if data_dir is None:
        raise ValueError("validate_checkpoint needs data_dir (the dataset folder)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t0 = time.time()
    guidance = guidance or DEFAULT_GUIDANCE
    own_bar = bar is None
    bar = bar if bar is not None else tqdm(total=len(PHASES), desc="validate", disable=not progress)
    model, info, restore = _resolve_model(model, device, use_ema)
    try:
        cfg = model.cfg
        batch = load_val_batch(data_dir, n)
        n_got = len(batch["txt"])
        world = ShapesWorld(cfg)
        lat = batch["latent"]
        if tuple(lat.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"data latents {tuple(lat.shape[1:])} do not match the model "
                             f"({cfg.in_channels}, {cfg.input_size}, {cfg.input_size}): wrong preset or dataset")
        source = batch["png"] if "png" in batch else world.codec.decode(lat)          # (n, 3, S, S)
        colours = _scene_colours(batch.get("json"))
        layout_status = "ok" if colours is not None else "unavailable: shards have no json scene metadata"

        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(lat.shape, generator=g)                                   # (n, C, H, W), shared by every run
        common = dict(steps=steps, guidance_batched=guidance_batched)
        full_cond = {k: batch[k] for k in CONDITION_KEYS}
        decode = lambda z: world.codec.decode(z)                                        # (n, 3, S, S)

        gen = {}
        gen["recon"] = decode(_sample_chunks(model, noise, batch_size, guidance=guidance, **full_cond, **common))
        bar.update(1)
        gen["noguid"] = decode(_sample_chunks(model, noise, batch_size, guidance=Guidance.off(), **full_cond, **common))
        bar.update(1)
        gen["textonly"] = decode(_sample_chunks(model, noise, batch_size, guidance=guidance, text_emb=batch["text_emb"],
                                                text_mask=batch["text_mask"], **common))
        bar.update(1)
        perm = torch.roll(torch.arange(n_got), -1)                                     # DINO of sample i + 1
        swap_status = "ok" if n_got >= 2 else "unavailable: the DINO swap needs n >= 2"
        if n_got >= 2:
            gen["swap"] = decode(_sample_chunks(model, noise, batch_size, guidance=guidance,
                                                **dict(full_cond, dino_emb=batch["dino_emb"][perm],
                                                       dino_patches=batch["dino_patches"][perm]), **common))
        bar.update(1)

        # ---- metrics
        lp = lpips if lpips is not None else LPIPSMetric(weights=lpips_weights)
        res: dict = {"checkpoint": info["checkpoint"], "weights": info["weights"], "step": info["step"],
                     "n": n_got, "steps": steps, "seed": int(seed), "guidance": _guidance_str(guidance),
                     "lpips_status": lp.status, "layout_status": layout_status, "swap_status": swap_status,
                     "psnr_cap_db": PSNR_CAP_DB}
        mean = lambda x: float(x.float().mean())
        for run in ("recon", "noguid"):
            res[f"{run}_psnr"] = mean(psnr(gen[run], source))
            res[f"{run}_lpips"] = mean(lp(gen[run], source)) if lp.available else None
        for run in ("recon", "noguid", "textonly"):
            sim = encoder_similarity(world.patch_encoder, gen[run], source)
            res[f"{run}_cls_cos"], res[f"{run}_patch_cos"] = mean(sim["cls_cos"]), mean(sim["patch_cos"])
            lay = shape_layout(gen[run], batch["json"]) if colours is not None else {}
            for k in ("layout_error", "shape_recall", "placement_error", "mask_iou"):
                res[f"{run}_{k}"] = lay.get(k)
            res[f"{run}_layout_iou"] = lay.get("mask_iou")
        # the reference: the source scored against itself (layout 0, IoU 1) is implied; the data's
        # own codec round trip bounds what reconstruction can reach
        res["codec_roundtrip_psnr"] = mean(psnr(world.codec.decode(lat), source))
        swap_keys = ("follows_dino_rate", "follows_text_rate", "tie_rate", "colour_follows_dino_rate",
                     "colour_follows_text_rate", "error_vs_text_source", "error_vs_dino_source", "pairs")
        if "swap" in gen and colours is not None:
            sw = swap_follow(gen["swap"], source, colours, source[perm], [colours[i] for i in perm.tolist()], colour_mask)
            res.update({f"swap_{k}": sw[k] for k in swap_keys})
            res["swap_layout_error_vs_dino_scene"] = shape_layout(gen["swap"], [batch["json"][i] for i in perm.tolist()])["layout_error"]
            res["swap_layout_error_vs_text_scene"] = shape_layout(gen["swap"], batch["json"])["layout_error"]
            sim = encoder_similarity(world.patch_encoder, gen["swap"], source[perm])
            res["swap_cls_cos_to_dino_source"] = mean(sim["cls_cos"])
            res["swap_patch_cos_to_dino_source"] = mean(sim["patch_cos"])
        else:
            res.update({f"swap_{k}": None for k in swap_keys})
            res["swap_cls_cos_to_dino_source"] = res["swap_patch_cos_to_dino_source"] = None
            res["swap_layout_error_vs_dino_scene"] = res["swap_layout_error_vs_text_scene"] = None

        # ---- figure + files
        res["figure"] = None
        if out_dir is not None:
            out_dir = Path(out_dir)
            k = min(figure_rows, n_got)
            fig_path = _grid_figure(source[:k], gen, perm[:k], batch["txt"][:k], out_dir / "grid.png")
            res["figure"] = str(fig_path)
        bar.update(1)
        res["seconds"] = round(time.time() - t0, 2)
        if out_dir is not None:
            write_json(res, Path(out_dir) / "metrics.json")
        return res
    finally:
        restore()
        if own_bar:
            bar.close()


def _guidance_str(g: Guidance) -> str:
    s = f"{g.formula}(text={g.text_scale}, dino={g.dino_scale}"
    if g.patch_scale is not None:
        s += f", patch={g.patch_scale}"
    if g.interval != (0.0, 1.0):
        s += f", interval={list(g.interval)}"
    return s + ")"


def _grid_figure(source, gen: dict, perm, captions, path: Path) -> Path:
    k = source.shape[0]
    blank = torch.zeros_like(source)
    rows = {"source": source, "reconstruction": gen["recon"][:k], "text only": gen["textonly"][:k],
            "DINO swap\n(DINO of next row)": gen["swap"][:k] if "swap" in gen else blank,
            "no guidance": gen["noguid"][:k]}
    titles = [c if len(c) <= 48 else c[:45] + "..." for c in captions]
    return save_figure(image_grid(rows, titles=titles), path)


def sample_grid(model: NanoDiT, data: str | os.PathLike, n: int = 4, steps: int = 20, seed: int = 0,
                guidance: Guidance | None = None, device: str | None = None):
    """A quick figure for the trainer's sample hook: n validation scenes (train ones when the folder
    has no val split), source | text + DINO sample (guided) | no guidance. The model stays on its
    device (``device`` only checks it). Returns a matplotlib Figure (``nbcore.viz.image_grid``)."""
    try:
        batch = load_val_batch(data, n)
    except FileNotFoundError:
        batch = load_val_batch(data, n, split="train")
    model_was_training = model.training
    model.eval()
    try:
        world = ShapesWorld(model.cfg)
        noise = torch.randn(batch["latent"].shape, generator=torch.Generator().manual_seed(seed))
        cond = dict({k: batch[k] for k in CONDITION_KEYS}, steps=steps, noise=noise, device=device)
        guided = world.codec.decode(sample(model, guidance=guidance or DEFAULT_GUIDANCE, **cond).cpu())
        plain = world.codec.decode(sample(model, guidance=Guidance.off(), **cond).cpu())
    finally:
        model.train(model_was_training)
    source = batch["png"] if "png" in batch else world.codec.decode(batch["latent"])
    return image_grid({"source": source, "sample (guided)": guided, "no guidance": plain},
                      titles=[c[:45] for c in batch["txt"]])


# --------------------------------------------------------------------------- training hooks

def validation_hook(trainer, ckpt_path: Path) -> dict:
    """``nbcore.train`` val hook (``train(cfg, val_fn=validation_hook)``; the training CLI wires it):
    ``validate_checkpoint`` of the just-written checkpoint (its EMA weights) on the run's val shards
    with tiny settings (``val_n`` samples, ``val_sample_steps`` Euler steps); writes
    OUT/val/step_XXXXXX/. Returns the scalar metrics (logged as a ``val`` record)."""
    if not trainer.cfg.data:
        raise HookUnavailable("no --data folder to validate on")
    out = trainer.out / "val" / f"step_{trainer.step:06d}"
    metrics = validate_checkpoint(str(ckpt_path), data=trainer.cfg.data, out=str(out), n=trainer.cfg.val_n,
                                  steps=trainer.cfg.val_sample_steps,
                                  device=str(trainer.device), progress=False)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}


def sample_grid_hook(trainer, ckpt_path: Path) -> dict:
    """``nbcore.train`` sample hook (``train(cfg, sample_fn=sample_grid_hook)``): ``sample_grid`` of
    the EMA model (4 val scenes, ``val_sample_steps``) saved as OUT/samples/step_XXXXXX.png."""
    if not trainer.cfg.data:
        raise HookUnavailable("no --data folder to draw conditions from")
    fig = sample_grid(trainer.ema.module, trainer.cfg.data, n=4, steps=trainer.cfg.val_sample_steps,
                      device=str(trainer.device))
    path = save_figure(fig, trainer.out / "samples" / f"step_{trainer.step:06d}.png")
    return {"path": str(path)}


# --------------------------------------------------------------------------- CLI

def _tag(i: int, path: str) -> str:
    """Output sub-folder name of the i-th checkpoint: index + two parent folders + stem
    (the trainer's OUT/ckpt/last.pt -> 00_OUT_ckpt_last), so runs stay recognisable."""
    p = Path(path).resolve()
    raw = "_".join([f"{i:02d}"] + [x for x in (p.parent.parent.name, p.parent.name, p.stem) if x])
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)


def _parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="python -m nbcore.validate",
                   description="Validation suite (reconstruction, layout, DINO swap, text only) "
                               "for NanoDiT checkpoints on a shapes-world dataset.")
    ap.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (nbcore format)")
    ap.add_argument("--data", required=True, help="dataset folder with val-*.tar (+ stats.json)")
    ap.add_argument("--out", default="outputs/validate", help="output folder (default outputs/validate)")
    ap.add_argument("--n", type=int, default=16, help="validation samples (default 16)")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    ap.add_argument("--formula", default=DEFAULT_GUIDANCE.formula, choices=["independent", "nested"],
                    help="guidance formula (see nbcore.sample)")
    ap.add_argument("--text-scale", type=float, default=DEFAULT_GUIDANCE.text_scale,
                    help=f"guidance scale s_t of the text (default {DEFAULT_GUIDANCE.text_scale:g})")
    ap.add_argument("--dino-scale", type=float, default=DEFAULT_GUIDANCE.dino_scale,
                    help=f"guidance scale s_d of DINO (default {DEFAULT_GUIDANCE.dino_scale:g})")
    ap.add_argument("--patch-scale", type=float, default=None,
                    help="separate patch scale (adds the CLS-only branch; see nbcore.sample)")
    ap.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
                    help="apply guidance only for t in [T_LO, T_HI]")
    ap.add_argument("--batch-size", type=int, default=64, help="samples per sampler call")
    ap.add_argument("--sequential", action="store_true", help="one forward per guidance branch (default: batched)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even when the checkpoint has EMA")
    ap.add_argument("--lpips-weights", default=None,
                    help="path to torchvision's alexnet-owt-7be5be79.pth (else $TORCH_HOME/hub/checkpoints)")
    return ap


def _check_args(a) -> tuple[Guidance, str]:
    """Every argument checked before any work: ValueError with one line. Returns the guidance and
    the resolved device."""
    for name in ("n", "steps", "batch_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("text_scale", "dino_scale", "patch_scale"):
        v = getattr(a, name)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if not all(math.isfinite(t) for t in a.interval):
        raise ValueError(f"--interval must be two finite numbers, got {list(a.interval)}")
    if len(set(a.checkpoints)) != len(a.checkpoints):
        raise ValueError("a checkpoint is given twice")
    for c in a.checkpoints:
        check_checkpoint_file(c, "checkpoint")
    if not Path(a.data).is_dir():
        raise ValueError(f"--data {a.data}: not a folder")
    shard_list(a.data, "val")                           # FileNotFoundError: no val shards
    guidance = Guidance(a.formula, a.text_scale, a.dino_scale, a.patch_scale, tuple(a.interval))
    device = str(resolve_device(a.device))              # a typo, or CUDA missing
    check_writable(a.out, "--out")
    return guidance, device


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        guidance, device = _check_args(a)
    except (ValueError, FileNotFoundError) as e:
        raise bad_arguments(ap.prog, e) from None
    out = Path(a.out)
    lp = LPIPSMetric(weights=a.lpips_weights, device=device)
    if not lp.available:
        print(lp.status, file=sys.stderr)
    results: dict = {}
    bar = tqdm(total=len(PHASES) * len(a.checkpoints), desc="validate", unit="phase")
    try:
        for i, ckpt in enumerate(a.checkpoints):
            bar.set_postfix_str(Path(ckpt).name)
            try:
                results[ckpt] = validate_checkpoint(
                    ckpt, a.data, out_dir=out / _tag(i, ckpt), n=a.n, steps=a.steps, seed=a.seed,
                    guidance=guidance, device=device, use_ema=not a.no_ema, batch_size=a.batch_size,
                    guidance_batched=not a.sequential, lpips=lp, bar=bar)
            except (ValueError, FileNotFoundError) as e:
                msg = str(e).splitlines()[0]   # a CheckpointError already names the file
                raise SystemExit(f"validate: {msg if str(ckpt) in msg else f'{ckpt}: {msg}'}") from None
    finally:
        bar.close()
    summary = {"settings": {"data": str(a.data), "n": a.n, "steps": a.steps, "seed": a.seed, "device": device,
                            "guidance": _guidance_str(guidance), "guidance_batched": not a.sequential,
                            "use_ema": not a.no_ema},
               "lpips_status": lp.status, "checkpoints": results}
    path = write_json(summary, out / "metrics.json")
    for ckpt, r in results.items():
        print(f"{ckpt}: recon PSNR {r['recon_psnr']:.2f} dB, LPIPS {_fmt(r['recon_lpips'])}, "
              f"layout {_fmt(r['recon_layout_error'])}, text-only layout {_fmt(r['textonly_layout_error'])}, "
              f"swap follows DINO {_fmt(r['swap_follows_dino_rate'])}; figure {r['figure']}")
    print(f"wrote {path}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
