"""Validation suite: turn "blobs in the right places" into numbers for one or more checkpoints.

For ``n`` validation samples of a dataset (``DIR/val-*.tar`` + ``DIR/stats.json``: the shapes world or
real images precomputed by ``nbcore.encoders``) it samples four sets of images with one shared noise
draw (seeded), decodes them with the codec the data was made with (``nbcore.codec.codec_from_stats``:
the shapes world's pixel codec, or the VAE; ``vae=DIR`` / ``--vae DIR`` where the recorded folder
moved) and scores them:

    reconstruction  own text + own DINO (CLS + patches), with guidance  -> PSNR, LPIPS, DINO layout, shape layout
    no guidance     the same conditions, v = v_full (guidance off)      -> PSNR, LPIPS, DINO layout, shape layout
    text only       own text, null DINO, text guidance                  -> DINO layout, shape layout
    DINO swap       text of sample i, DINO of sample (i + 1) mod n      -> whose layout it follows

Sources: the shards' ``png`` members, or, in shards without them, the codec's decoding of the stored
latents (``source_images`` says which). Metrics on any data:

- ``{run}_psnr``, ``{run}_lpips`` against the source (``nbcore.metrics.LPIPSMetric``: None with
  ``lpips_status`` saying why when the AlexNet weights are absent); ``codec_roundtrip_psnr``: the
  codec's own decoding of the stored latents against the source, the ceiling of reconstruction.
- DINO-space layout (``nbcore.metrics.layout_corr``): generated and source images re-encoded by the
  encoder the data was made with (the real DINOv3, ``dino=DIR`` / ``--dino DIR`` where the recorded
  folder moved; the stand-in patch encoder on the shapes world), features normalised with the data's
  stats; ``{run}_dino_layout_corr`` is the position-by-position correlation of the patch maps (1 = the
  source's map), ``{run}_dino_cls_cos`` the CLS cosine (global content). Where chance lies, from the
  sources alone: ``dino_layout_corr_rolled`` (each source against its own patch grid rolled by half:
  the right content in the wrong places) and ``dino_layout_corr_other_image`` (each source against
  the next one); ``dino_layout_corr_codec_roundtrip`` is the ceiling the codec allows. The swap:
  ``swap_dino_layout_corr_to_dino_source`` / ``..._to_text_source``.

Shapes-world only (listed in ``shapes_world_only``; None with ``layout_status`` "unavailable:
shapes-world only (...)" on data without scene metadata): ``nbcore.metrics.shape_layout``'s
``{run}_layout_error``, ``shape_recall``, ``placement_error``, ``mask_iou`` (also as
``layout_iou``) against the ``json`` scenes, and the swap's colour-centroid following
(``nbcore.metrics.swap_follow``). Real-encoded shapes images keep their scenes as ``json`` members,
so both layout measures run there side by side.

Aspect-ratio buckets put several latent shapes in one split: one shape is validated
(``load_val_batch``; ``latent_shape`` and ``selection`` say which and what was left out).

Library: ``validate_checkpoint(model_or_path, data_dir, out_dir=..., ...) -> dict`` (every metric a
float / int / str / None; ``shapes_world_only`` a list of key names) writes ``OUT/metrics.json``
and ``OUT/grid.png`` (source | reconstruction | text only | DINO swap | no guidance).

CLI::

    python -m nbcore.validate CKPT [CKPT ...] --data DIR --out DIR [--vae DIR --dino DIR]
                              [--n N --steps S --seed K --device D]

writes ``OUT/metrics.json`` (settings, LPIPS status, and every metric per checkpoint) and
``OUT/<tag>/grid.png`` + ``OUT/<tag>/metrics.json`` per checkpoint, with a progress bar. Metric
definitions and their calibration: ``nbcore.metrics``. Sampler and guidance formulas: ``nbcore.sample``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .codec import codec_from_stats
from .data import make_loader, shard_list
from .encoders import DataEncoders, data_encoders
from .metrics import (PSNR_CAP_DB, LPIPSMetric, dino_features, layout_corr, layout_corr_calibration, psnr,
                      shape_layout, swap_follow)
from .model import CONDITION_KEYS, NanoDiT
from .sample import Guidance, load_model_with_info, sample
from .shapes import colour_mask
from .utils import HookUnavailable, resolve_device, write_json
from .viz import image_grid, save_figure

__all__ = ["validate_checkpoint", "load_val_batch", "sample_grid", "DEFAULT_GUIDANCE", "DEFAULT_STEPS",
           "SHAPES_WORLD_ONLY"]

# Defaults: the experiment's protocol (nbcore.experiment.Profile: nested guidance, InstructPix2Pix-style,
# text 3, DINO 2, on every step; 12 Euler steps), so a validation number compares with the suite's
# (tests/test_preflight.py checks they agree).
DEFAULT_GUIDANCE = Guidance("nested", text_scale=3.0, dino_scale=2.0)
DEFAULT_STEPS = 12
PHASES = ("reconstruction", "no guidance", "text only", "DINO swap", "metrics")
LAYOUT_RUNS = ("recon", "noguid", "textonly")
SHAPE_KEYS = ("layout_error", "shape_recall", "placement_error", "mask_iou", "layout_iou")
SWAP_KEYS = ("follows_dino_rate", "follows_text_rate", "tie_rate", "colour_follows_dino_rate",
             "colour_follows_text_rate", "error_vs_text_source", "error_vs_dino_source", "pairs")
# the metrics that need the shapes world's json scenes (None on other data)
SHAPES_WORLD_ONLY = (tuple(f"{run}_{k}" for run in LAYOUT_RUNS for k in SHAPE_KEYS)
                     + tuple(f"swap_{k}" for k in SWAP_KEYS)
                     + ("swap_layout_error_vs_dino_scene", "swap_layout_error_vs_text_scene"))
NO_SCENES = "unavailable: shapes-world only (no json scene metadata)"


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


# --------------------------------------------------------------------------- the data's encoders

def _stats_path(data_dir) -> Path:
    p = Path(data_dir) / "stats.json"
    if not p.is_file():
        raise FileNotFoundError(f"{data_dir} has no stats.json: validation needs it (the codec and encoders the data "
                                "was made with, and the normalisation)")
    return p


def _describe(enc: DataEncoders) -> tuple[str, str]:
    """(codec, DINO encoder) in words, for the result."""
    spec = enc.codec.spec()
    codec = f"VAE at {spec['path']}" if spec["kind"] == "vae" else "shapes-world pixel codec"
    dino = f"DINOv3 at {enc.dino.path}" if enc.kind == "real" else "shapes-world stand-in patch encoder"
    return codec, dino


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


def _check_latents(lat: torch.Tensor, cfg) -> None:
    C, H, W = lat.shape[1:]
    if C != cfg.in_channels or H % cfg.patch_size or W % cfg.patch_size:
        raise ValueError(f"data latents ({C}, {H}, {W}) do not fit the model ({cfg.in_channels} channels, patch "
                         f"size {cfg.patch_size}): wrong preset or dataset")


def _sample_chunks(model, noise, chunk, **cond_and_kw) -> torch.Tensor:
    """``sample`` over the batch in chunks of ``chunk`` (same result as one call: noise is given)."""
    outs = []
    n = noise.shape[0]
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        kw = {k: (v[sl] if torch.is_tensor(v) else v) for k, v in cond_and_kw.items()}
        outs.append(sample(model, noise=noise[sl], **kw).cpu())
    return torch.cat(outs)


def _generate(model, batch: dict, decode, noise, guidance: Guidance, perm, chunk: int, bar, **common) -> dict:
    """The four runs of the module docstring, decoded: run -> (n, 3, Sh, Sw); no swap for n < 2."""
    full = {k: batch[k] for k in CONDITION_KEYS}
    run = lambda g, **cond: decode(_sample_chunks(model, noise, chunk, guidance=g, **cond, **common))
    gen = {"recon": run(guidance, **full)}
    bar.update(1)
    gen["noguid"] = run(Guidance.off(), **full)
    bar.update(1)
    gen["textonly"] = run(guidance, text_emb=batch["text_emb"], text_mask=batch["text_mask"])
    bar.update(1)
    if len(perm) >= 2:
        swapped = dict(full, dino_emb=batch["dino_emb"][perm], dino_patches=batch["dino_patches"][perm])
        gen["swap"] = run(guidance, **swapped)
    bar.update(1)
    return gen


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean())


def _pixel_metrics(gen: dict, source, roundtrip, lp: LPIPSMetric) -> dict:
    res = {}
    for run in ("recon", "noguid"):
        res[f"{run}_psnr"] = _mean(psnr(gen[run], source))
        res[f"{run}_lpips"] = _mean(lp(gen[run], source)) if lp.available else None
    res["codec_roundtrip_psnr"] = _mean(psnr(roundtrip, source))     # the ceiling the codec allows
    return res


def _dino_metrics(enc: DataEncoders, gen: dict, source, roundtrip, perm) -> dict:
    """DINO-space layout and CLS similarity of every run against its source, and the calibration."""
    feats = lambda x: dino_features(enc.dino, x, enc.stats)                            # (n, Dd), (n, P, Dd)
    s_cls, s_p = feats(source)
    res = {}
    for run in LAYOUT_RUNS:
        g_cls, g_p = feats(gen[run])
        res[f"{run}_dino_layout_corr"] = _mean(layout_corr(g_p, s_p))
        res[f"{run}_dino_cls_cos"] = _mean(F.cosine_similarity(g_cls, s_cls, dim=-1))
    calib = layout_corr_calibration(s_p)
    res["dino_layout_corr_rolled"] = _mean(calib["rolled"])
    res["dino_layout_corr_other_image"] = _mean(calib["other_image"]) if calib["other_image"] is not None else None
    res["dino_layout_corr_codec_roundtrip"] = _mean(layout_corr(feats(roundtrip)[1], s_p))
    res.update(dict.fromkeys(("swap_dino_layout_corr_to_dino_source", "swap_dino_layout_corr_to_text_source",
                              "swap_dino_cls_cos_to_dino_source")))              # None without a swap
    if "swap" in gen:
        g_cls, g_p = feats(gen["swap"])
        res["swap_dino_layout_corr_to_dino_source"] = _mean(layout_corr(g_p, s_p[perm]))
        res["swap_dino_layout_corr_to_text_source"] = _mean(layout_corr(g_p, s_p))
        res["swap_dino_cls_cos_to_dino_source"] = _mean(F.cosine_similarity(g_cls, s_cls[perm], dim=-1))
    return res


def _shapes_world_metrics(gen: dict, source, scenes: list | None, perm) -> dict:
    """The metrics of ``SHAPES_WORLD_ONLY`` against the json scenes, and ``layout_status``; every
    one None without scenes."""
    res: dict = dict.fromkeys(SHAPES_WORLD_ONLY)
    colours = _scene_colours(scenes)
    if colours is None:
        res["layout_status"] = NO_SCENES if scenes is None else \
            "unavailable: shapes-world only (the json members hold no shapes-world scenes)"
        return res
    res["layout_status"] = "ok"
    for run in LAYOUT_RUNS:
        lay = shape_layout(gen[run], scenes)
        res.update({f"{run}_{k}": lay["mask_iou" if k == "layout_iou" else k] for k in SHAPE_KEYS})
    if "swap" in gen:
        p = perm.tolist()
        sw = swap_follow(gen["swap"], source, colours, source[perm], [colours[i] for i in p], colour_mask)
        res.update({f"swap_{k}": sw[k] for k in SWAP_KEYS})
        res["swap_layout_error_vs_dino_scene"] = shape_layout(gen["swap"], [scenes[i] for i in p])["layout_error"]
        res["swap_layout_error_vs_text_scene"] = shape_layout(gen["swap"], scenes)["layout_error"]
    return res


def validate_checkpoint(model, data_dir: str | os.PathLike | None = None, *, out_dir: str | os.PathLike | None = None,
                        n: int = 16, steps: int = DEFAULT_STEPS, seed: int = 0, guidance: Guidance | None = None,
                        device: str | None = None, use_ema: bool = True, batch_size: int = 64,
                        guidance_batched: bool = True, lpips: LPIPSMetric | None = None,
                        lpips_weights: str | None = None, figure_rows: int = 8, progress: bool = True,
                        bar=None, data: str | None = None, out: str | None = None,
                        encoders: DataEncoders | None = None, vae: str | None = None, dino: str | None = None,
                        split: str = "val") -> dict:
    """Run the suite (module docstring) for one model and return a flat dict of metrics.

    model: a ``NanoDiT`` (used as is, put back in its train/eval mode afterwards) or a checkpoint path
    (loaded with ``load_model``; EMA weights unless ``use_ema=False``). data_dir: dataset folder
    (``data`` is an alias, as the trainer's hook calls it); ``split``: "val" (default) or "train" for a
    folder without a val split (an optimistic score: the model saw those samples); out_dir (alias ``out``): where
    ``metrics.json`` and ``grid.png`` go (None = write nothing). n samples, ``steps`` Euler steps,
    ``seed`` for the shared noise, ``guidance`` for the guided runs (default ``DEFAULT_GUIDANCE``),
    ``batch_size`` samples per sampler call. lpips: a prepared ``LPIPSMetric`` (else built from
    ``lpips_weights``, local files only). ``bar``: an outer tqdm to advance once per phase.
    encoders: the data's ``DataEncoders`` (else ``nbcore.encoders.data_encoders`` of DATA/stats.json, with
    ``vae`` / ``dino`` folders where the recorded ones moved).

    Keys: ``{run}_{metric}`` for run in recon, noguid, textonly, swap (e.g. ``recon_psnr``,
    ``recon_lpips``, ``recon_dino_layout_corr``, ``recon_layout_error``, ``textonly_layout_error``,
    ``swap_follows_dino_rate``, ...), the calibration ``dino_layout_corr_rolled`` /
    ``_other_image`` / ``_codec_roundtrip``, ``codec_roundtrip_psnr``, plus ``shapes_world_only``,
    ``lpips_status``, ``layout_status``, ``swap_status``, ``source_images``, ``codec``,
    ``dino_encoder``, ``latent_shape``, ``selection``, ``n`` (samples scored), ``n_asked``, ``steps``, ``seed``, ``guidance``,
    ``checkpoint``, ``weights``, ``step``, ``figure``, ``seconds``. A metric that cannot be computed
    is None and its status key says why.
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
        batch = load_val_batch(data_dir, n, split=split)
        lat = batch["latent"]                                                          # (n, C, h, w)
        _check_latents(lat, model.cfg)
        enc = encoders or data_encoders(_stats_path(data_dir), model.cfg, dino=dino, vae=vae,
                                              device=str(next(model.parameters()).device))
        n_got = len(batch["txt"])
        roundtrip = enc.codec.decode(lat)                                              # (n, 3, Sh, Sw)
        source = batch["png"] if "png" in batch else roundtrip
        perm = torch.roll(torch.arange(n_got), -1)                                     # DINO of sample i + 1
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(int(seed)))  # shared by every run
        gen = _generate(model, batch, enc.codec.decode, noise, guidance, perm, batch_size, bar, steps=steps,
                        guidance_batched=guidance_batched)

        # ---- metrics
        lp = lpips if lpips is not None else LPIPSMetric(weights=lpips_weights)
        codec_str, dino_str = _describe(enc)
        res: dict = {"checkpoint": info["checkpoint"], "weights": info["weights"], "step": info["step"],
                     "n": n_got, "n_asked": n, "steps": steps, "seed": int(seed), "guidance": _guidance_str(guidance),
                     "latent_shape": _shape_str(tuple(lat.shape[1:])), "selection": batch["selection"],
                     "codec": codec_str, "dino_encoder": dino_str,
                     "source_images": "png members" if "png" in batch else
                     "the codec's decoding of the stored latents (the shards have no png member)",
                     "lpips_status": lp.status, "swap_status": "ok" if n_got >= 2 else
                     "unavailable: the DINO swap needs n >= 2", "psnr_cap_db": PSNR_CAP_DB,
                     "shapes_world_only": list(SHAPES_WORLD_ONLY)}
        res.update(_pixel_metrics(gen, source, roundtrip, lp))
        res.update(_dino_metrics(enc, gen, source, roundtrip, perm))
        res.update(_shapes_world_metrics(gen, source, batch.get("json"), perm))

        # ---- figure + files
        res["figure"] = None
        if out_dir is not None:
            k = min(figure_rows, n_got)
            res["figure"] = str(_grid_figure(source[:k], gen, batch["txt"][:k], Path(out_dir) / "grid.png"))
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


def _grid_figure(source, gen: dict, captions, path: Path) -> Path:
    k = source.shape[0]
    blank = torch.zeros_like(source)
    rows = {"source": source, "reconstruction": gen["recon"][:k], "text only": gen["textonly"][:k],
            "DINO swap\n(DINO of next row)": gen["swap"][:k] if "swap" in gen else blank,
            "no guidance": gen["noguid"][:k]}
    titles = [c if len(c) <= 48 else c[:45] + "..." for c in captions]
    return save_figure(image_grid(rows, titles=titles), path)


def sample_grid(model: NanoDiT, data: str | os.PathLike, n: int = 4, steps: int = 20, seed: int = 0,
                guidance: Guidance | None = None, device: str | None = None, vae: str | None = None):
    """A quick figure for the trainer's sample hook: n validation scenes (train ones when the folder
    has no val split), source | text + DINO sample (guided) | no guidance, decoded with the data's
    codec (``vae``: the VAE folder where the recorded one moved). The model stays on its device
    (``device`` only checks it). Returns a matplotlib Figure (``nbcore.viz.image_grid``)."""
    try:
        batch = load_val_batch(data, n)
    except FileNotFoundError:
        batch = load_val_batch(data, n, split="train")
    codec = codec_from_stats(_stats_path(data), vae_dir=vae, device=str(next(model.parameters()).device))
    model_was_training = model.training
    model.eval()
    try:
        noise = torch.randn(batch["latent"].shape, generator=torch.Generator().manual_seed(seed))
        cond = dict({k: batch[k] for k in CONDITION_KEYS}, steps=steps, noise=noise, device=device)
        guided = codec.decode(sample(model, guidance=guidance or DEFAULT_GUIDANCE, **cond).cpu())
        plain = codec.decode(sample(model, guidance=Guidance.off(), **cond).cpu())
    finally:
        model.train(model_was_training)
    source = batch["png"] if "png" in batch else codec.decode(batch["latent"])
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


if __name__ == "__main__":   # python -m nbcore.validate: the command line is nbcore.cli.validate's
    from nbcore.cli.validate import main as _main
    sys.exit(_main())
