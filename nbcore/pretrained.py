"""A shareable model folder: ``save_pretrained`` / ``from_pretrained``, and a cheap checkpoint step read.

A folder written by ``save_pretrained(ckpt_or_model, DIR)`` holds

    config.json        {"format": "nbcore.pretrained", "format_version": 1, "model_config": ModelConfig
                        fields, "weights": "ema" | "model", "codec": codec spec (nbcore.codec) or null,
                        "training": step, preset, data, batch size, lr, ... or null, "data": the data's
                        stats meta (source, sizes) or null, "metrics": {...} or null, "params": int}
    model.safetensors  the weights (a training checkpoint's EMA by default), float32
    stats.json         the data statistics the conditioning is normalised with (nbcore.data.Stats)
    README.md          a short model card: what it was trained on, steps, metrics, how to load it

``from_pretrained(DIR, device) -> (NanoDiT in eval mode, info)`` with info {"config" (ModelConfig),
"codec" (spec or None; ``nbcore.codec.codec_from_spec`` builds it), "stats" (Stats or None),
"training", "data", "metrics", "weights", "path"}.

``checkpoint_step(CKPT)`` reads a training checkpoint's ``step`` without reading its tensors
(``torch.load(mmap=True, weights_only=True)``: storages are mapped, not read).

CLI:
    python -m nbcore.pretrained export CKPT OUT_DIR [--data DIR] [--weights ema|model] [--metrics JSON]
    python -m nbcore.pretrained step CKPT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


from .checkpoint import checkpoint_data, checkpoint_step, read_model
from .codec import codec_spec_from_stats, spec_of
from .model import ModelConfig, NanoDiT
from .stats import Stats
from .utils import resolve_device, write_json

__all__ = ["save_pretrained", "from_pretrained", "checkpoint_step", "checkpoint_data", "model_card", "stand_in_kind",
           "FORMAT", "main"]

FORMAT, FORMAT_VERSION = "nbcore.pretrained", 1
CONFIG, WEIGHTS, STATS, CARD = "config.json", "model.safetensors", "stats.json", "README.md"
SAMPLES = "samples.png"   # the card's sample grid (written by nbcore.pipeline.write_card_samples)
# What of a run's TrainConfig a reader of the card needs (the rest stays in the checkpoint).
_TRAIN_KEYS = ("preset", "data", "steps", "batch_size", "grad_accum", "lr", "schedule", "warmup", "ema_decay",
               "seed", "p_drop_both", "p_text_only", "p_dino_only", "timestep_sampling", "warm_start")


def _as_stats(stats) -> Stats | None:
    if stats is None or isinstance(stats, Stats):
        return stats
    return Stats.load(stats)


def _source(src, weights: str) -> tuple[ModelConfig, dict, dict | None]:
    """(config, state dict, checkpoint dict or None) of a checkpoint path, a loaded checkpoint or a model."""
    if isinstance(src, NanoDiT):
        return src.cfg, src.state_dict(), None
    return read_model(src, weights)


def stand_in_kind(data: dict | None) -> str | None:
    """"plumbing" when the data's stats meta records encoders made by
    ``nbcore.encoders.tiny_random_encoders`` (random weights: nothing the model learned means anything),
    "shapes" for the shapes world's stand-in encoders, None for real encoders (or unknown data)."""
    data = data or {}
    if any(isinstance(e, dict) and e.get("stand_in") for e in (data.get("encoders") or {}).values()):
        return "plumbing"
    return "shapes" if str(data.get("source", "")).startswith("nbcore.shapes") else None


_BANNERS = {
    "plumbing": "> **Plumbing stand-ins.** This model was trained on features of tiny *randomly initialised* "
                "DINOv3 / T5 / VAE models (`nbcore.encoders.tiny_random_encoders`), made to exercise the "
                "real-data code path without a download. Its images and metrics mean nothing.",
    "shapes": "> **Shapes world.** This model was trained on nbcore's toy world of coloured shapes, encoded by "
              "stand-in encoders (a deterministic text encoder, a random patch encoder, a pixel codec), "
              "not by DINOv3 / T5 / a VAE. It generates shapes-world scenes only.",
}


def _yaml_block(config: dict, params: int, kind: str | None) -> list[str]:
    """Hugging Face-style metadata (YAML front matter; values JSON-quoted, which YAML reads)."""
    tr, data, metrics = config.get("training") or {}, config.get("data") or {}, config.get("metrics") or {}
    tags = ["nanodit", "flow-matching", "dinov3-conditioning", "text-to-image"]
    tags += {"plumbing": ["plumbing-stand-in"], "shapes": ["shapes-world", "toy"]}.get(kind, [])
    lines = ["---", "library_name: nbcore", "pipeline_tag: text-to-image", "tags:"] + [f"- {t}" for t in tags]
    lines += [f"parameters: {params}", f"weights: {json.dumps(config.get('weights'))}",
              f"training_steps: {json.dumps(tr.get('step'))}", f"preset: {json.dumps(tr.get('preset'))}",
              f"data_source: {json.dumps(data.get('source'))}", f"stand_in_encoders: {json.dumps(kind)}"]
    num = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if num:
        lines += ["metrics:"] + [f"  {k}: {json.dumps(v)}" for k, v in num.items()]
    return lines + ["---", ""]


def model_card(config: dict, params: int, samples: str | None = None) -> str:
    """README.md text for a model folder from its config.json contents: a YAML metadata block, a
    banner when the encoders were stand-ins, the table, intended use and limitations, ``samples``
    (a PNG beside the card) when given, metrics and how to load it."""
    mc, tr, data, metrics = config["model_config"], config.get("training"), config.get("data"), config.get("metrics")
    kind = stand_in_kind(data)
    codec = config.get("codec")
    if mc["use_dino_patches"]:
        where = " + ".join(w for w, on in (("context", mc["patch_context"]), ("tied to image tokens", mc["patch_tie"])) if on)
        dino = f"DINOv3 CLS + {mc['dino_grid']}x{mc['dino_grid']} patch tokens ({where}; position embedding {mc['patch_pos_embed']})"
    else:
        dino = "DINOv3 CLS only (pre-patch architecture)"
    rows = [("architecture", f"NanoDiT, hidden {mc['hidden_size']}, depth {mc['depth']}, {mc['num_heads']} heads, "
                             f"patch {mc['patch_size']}, {params:,} parameters"),
            ("latents", f"{mc['in_channels']} channels, nominal {mc['input_size']}x{mc['input_size']}"),
            ("conditioning", f"T5 text (dim {mc['text_dim']}, <= {mc['text_len']} tokens); {dino}; dim {mc['dino_dim']}"),
            ("weights", "EMA" if config["weights"] == "ema" else "raw (not EMA)")]
    if codec is not None:
        what = (f"diffusers AutoencoderKL from {codec.get('path')} (scaling {codec.get('scaling_factor')}, "
                f"shift {codec.get('shift_factor')})" if codec["kind"] == "vae" else "the shapes world's pixel codec")
        rows.append(("codec", what))
    if data:
        src = data.get("source", "?")
        extra = f", images from {data['images_dir']}" if data.get("images_dir") else ""
        n = data.get("n_train", data.get("samples"))
        rows.append(("trained on", f"{src}{extra}" + (f", {n} training samples" if n is not None else "")))
    if tr:
        rows.append(("training", f"step {tr.get('step')} of {tr.get('steps')}, batch {tr.get('batch_size')} x "
                                 f"{tr.get('grad_accum', 1)}, lr {tr.get('lr')}, data {tr.get('data') or '?'}"))
    lines = _yaml_block(config, params, kind) + ["# NanoDiT (nbcore)", ""]
    if kind:
        lines += [_BANNERS[kind], ""]
    lines += ["A small text-to-image diffusion transformer (flow matching) conditioned on T5 text and DINOv3 "
              "features, exported by `nbcore.pretrained`.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Intended use", "",
              "Research on layout control: how text, the DINOv3 CLS vector and DINOv3 patch tokens steer where a "
              "small diffusion transformer puts things (the nbcore experiment). Generate with the encoders its "
              "data was made with (`nbcore.pipeline.NanoDiTPipeline`), e.g. a caption plus the DINO features of "
              "another image (a DINO swap).", "",
              "## Limitations", "",
              "- Small and briefly trained: images are low resolution and follow only the captions and layouts "
              "of its training data; it is not a general text-to-image model.",
              "- It needs the exact encoders and statistics it was trained with (`stats.json`, the codec in "
              "`config.json`); other encoders give meaningless conditions.",
              "- Its metrics are the nbcore validation suite's on its own data split; they say nothing about "
              "other images." + (" With plumbing stand-ins they mean nothing at all." if kind == "plumbing" else ""),
              "- No safety filtering: do not deploy it to generate images for people."]
    if samples:
        lines += ["", "## Samples", "", f"![samples: source | text + DINO | text only]({samples})"]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Use", "", "```python", "from nbcore.pipeline import NanoDiTPipeline",
              'pipe = NanoDiTPipeline.from_pretrained("THIS_FOLDER")', 'images = pipe("a caption", dino_image="image.png", '
              'seed=0)   # -> [PIL.Image]', "```", "", "or `nbcore-generate THIS_FOLDER \"a caption\" --dino-image image.png`. "
              "The model alone:", "", "```python", "from nbcore.pretrained import from_pretrained",
              "from nbcore.codec import codec_from_spec", "", 'model, info = from_pretrained("THIS_FOLDER", device="cpu")',
              'codec = codec_from_spec(info["codec"])   # a VAE spec: pass vae_dir=... if its folder moved',
              "# conditions are normalised with info[\"stats\"] (nbcore.data.Stats), as in training", "```", ""]
    return "\n".join(lines)


def save_pretrained(src, out_dir, stats=None, metrics: dict | None = None, card: str | None = None,
                    codec=None, weights: str = "ema") -> Path:
    """Write a model folder (see the module docstring) and return its path.

    src: a training checkpoint path, a loaded checkpoint dict (``weights`` picks "ema" or "model")
    or a NanoDiT. stats: Stats or a stats.json path; None = the checkpoint's own ``stats`` entry
    (a dict in stats.json's layout) when it has one, else its data folder's stats.json when it
    exists. codec: a Codec, PixelCodec or spec; None = the checkpoint's ``codec`` entry, else the
    one the stats record.
    metrics: a flat dict for the card and config. card: extra Markdown appended to README.md.
    """
    from safetensors.torch import save_file

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be ema|model, got {weights!r}")
    cfg, sd, ck = _source(src, weights)
    if isinstance(src, NanoDiT):
        weights = "model"
    ck = ck or {}
    tc = ck.get("train_config") or {}
    ck_stats, ck_codec = checkpoint_data(ck)
    st = _as_stats(stats) if stats is not None else ck_stats
    if codec is not None:
        spec = codec if isinstance(codec, dict) else spec_of(codec)
    elif ck_codec is not None:                                   # a checkpoint that records its codec
        spec = ck_codec
    else:
        spec = codec_spec_from_stats(st) if st is not None else None
    training = None
    if ck:
        training = {"step": int(ck.get("step", 0)), "n_updates": int(ck.get("n_updates", ck.get("step", 0))),
                    **{k: tc[k] for k in _TRAIN_KEYS if k in tc}}
    model = NanoDiT(cfg)
    model.load_state_dict(sd)   # refuses weights that do not fit the config, before anything is written
    params = model.num_params()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": cfg.to_dict(), "weights": weights,
              "codec": spec, "training": training, "data": dict(st.meta) if st is not None else None,
              "metrics": dict(metrics) if metrics else None, "params": params}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "nbcore": FORMAT})
    write_json(config, out / CONFIG)
    if st is not None:
        st.save(out / STATS)
    elif (out / STATS).exists():
        (out / STATS).unlink()   # a stale file from an earlier export must not pass for this model's
    text = model_card(config, params, samples=SAMPLES if (out / SAMPLES).is_file() else None)
    if card:
        text += "\n## Notes\n\n" + card.strip() + "\n"
    (out / CARD).write_text(text, encoding="utf-8")
    return out


def from_pretrained(path, device: str = "cpu") -> tuple[NanoDiT, dict]:
    """(NanoDiT in eval mode on ``device``, info) from a folder written by ``save_pretrained``."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / CONFIG).is_file():
        raise FileNotFoundError(f"{d / CONFIG} not found: not a model folder written by nbcore.pretrained.save_pretrained")
    config = json.loads((d / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{d / CONFIG} is not an nbcore.pretrained config (format {config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{d} has format version {config['format_version']}; this nbcore reads <= {FORMAT_VERSION}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(config["model_config"]) - known
    if unknown:
        raise ValueError(f"{d / CONFIG}: ModelConfig fields this nbcore does not know: {sorted(unknown)} (newer nbcore?)")
    cfg = ModelConfig(**config["model_config"])
    if not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d / WEIGHTS} not found")
    dev = resolve_device(device)
    model = NanoDiT(cfg)
    model.load_state_dict(load_file(str(d / WEIGHTS), device="cpu"))
    model = model.to(dev).eval()
    stats = Stats.load(d / STATS) if (d / STATS).is_file() else None
    info = {"config": cfg, "codec": config.get("codec"), "stats": stats, "training": config.get("training"),
            "data": config.get("data"), "metrics": config.get("metrics"), "weights": config.get("weights"),
            "path": str(d)}
    return model, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbcore.pretrained",
                                 description="Export a training checkpoint as a shareable model folder; read a checkpoint's step.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="CKPT -> OUT_DIR with config.json, model.safetensors, stats.json, README.md",
                        description="Write a model folder (config.json, EMA weights as model.safetensors, the data "
                                    "statistics, a model card) that nbcore.pretrained.from_pretrained loads.")
    ex.add_argument("ckpt", help="a training checkpoint (OUT/ckpt/last.pt or step_XXXXXX.pt)")
    ex.add_argument("out_dir", help="the model folder to write")
    ex.add_argument("--data", default=None, help="the data folder whose stats.json goes with the model "
                    "(default: the checkpoint's training data folder)")
    ex.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA (default) or the raw weights")
    ex.add_argument("--metrics", default=None, help="a JSON file of metrics (e.g. nbcore.validate's metrics.json) for the card")
    ex.add_argument("--card", default=None, help="a Markdown file appended to README.md as notes")
    st = sub.add_parser("step", help="print a checkpoint's step without loading its tensors")
    st.add_argument("ckpt", help="a training checkpoint")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "step":
            print(checkpoint_step(args.ckpt))
            return 0
        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
        stats = None
        if args.data is not None:
            stats = Path(args.data) / STATS
            if not stats.is_file():
                raise FileNotFoundError(f"no {STATS} in --data {args.data}")
        metrics = None
        if args.metrics:
            metrics = json.loads(Path(args.metrics).read_text())
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        card = Path(args.card).read_text() if args.card else None
        out = save_pretrained(args.ckpt, args.out_dir, stats=stats, metrics=metrics, card=card, weights=args.weights)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
