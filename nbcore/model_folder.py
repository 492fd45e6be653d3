"""The one way to load a model: ``NanoDiT.from_pretrained(folder_or_checkpoint)`` and
``model.save_pretrained(folder)``, as in diffusers (``PretrainedMixin``, which ``NanoDiT`` inherits).

A model folder holds

    config.json        {"format": "nbcore.pretrained", "format_version": 1, "model_config": ModelConfig
                        fields, "weights": "ema" | "model", "codec": codec spec (nbcore.codec) or null,
                        "training": step, preset, data, batch size, lr, ... or null, "data": the data's
                        stats meta (source, sizes) or null, "metrics": {...} or null, "params": int}
    model.safetensors  the weights, float32
    stats.json         the data statistics the conditioning is normalised with (nbcore.stats.Stats)
    README.md          a short model card: what it was trained on, steps, metrics, how to load it

Encoder folders recorded in it (the VAE of the codec spec, the DINOv3 / T5 / VAE folders in the
statistics' meta) are stored relative to the model folder ("./..." or "../..."), so a folder moved
together with its encoders still finds them; ``from_pretrained`` gives them back absolute. Folders
that moved apart are passed explicitly (``codec_from_spec(..., vae_dir=)``, the demo's ``dino=`` /
``t5=`` / ``vae=``).

``from_pretrained(path, device, weights, output_loading_info)`` also reads a training checkpoint
(``nbcore.checkpoint``: its ``ema`` weights by default, the raw ``model`` weights when it has no EMA
or with ``weights="model"``). With ``output_loading_info=True`` it returns ``(model, info)``, info
{"path", "format" ("pretrained" | "checkpoint"), "weights", "step", "config", "codec" (spec or
None; ``nbcore.codec.codec_from_spec`` builds it), "stats" (Stats or None), "training", "data",
"metrics"}.

A folder cannot change silently: model.safetensors' metadata records the ``model_config`` it was
saved with, and ``from_pretrained`` refuses a config.json that disagrees with it (an edit of the
heads keeps every shape and would load, with other outputs), non-finite weights (also refused by
``save_pretrained``), and a malformed config.json (not JSON, no ``model_config``, a field of the
wrong type): each one ``ValueError`` line naming the file and the field (``read_config``).
Folders written before the metadata recorded the config load as before.

This module imports no model: the class that inherits the mixin names its config class
(``config_class``), so the dependency points down (model -> model_folder -> checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .checkpoint import checkpoint_data, read_model, step_of, training_summary
from .codec import codec_spec_from_stats, spec_of
from .stats import Stats
from .utils import resolve_device, write_json

__all__ = ["PretrainedMixin", "model_card", "read_config", "stand_in_kind", "FORMAT", "FORMAT_VERSION", "CONFIG",
           "WEIGHTS", "STATS", "CARD", "SAMPLES"]

FORMAT, FORMAT_VERSION = "nbcore.pretrained", 1
CONFIG, WEIGHTS, STATS, CARD = "config.json", "model.safetensors", "stats.json", "README.md"
SAMPLES = "samples.png"   # the card's sample grid (written by nbcore.pipeline.write_card_samples)


# --------------------------------------------------------------------------- encoder paths

def _map_paths(d: dict | None, fn) -> dict | None:
    """A copy of a codec spec or a stats meta with ``fn`` applied to every encoder folder it records:
    a VAE spec's ``path``, meta ``codec.path`` and ``encoders.{dino,t5,vae}.path``."""
    if not isinstance(d, dict):
        return d
    out = dict(d)
    if out.get("kind") == "vae" and isinstance(out.get("path"), str):
        out["path"] = fn(out["path"])
    if isinstance(out.get("codec"), dict):
        out["codec"] = _map_paths(out["codec"], fn)
    if isinstance(out.get("encoders"), dict):
        out["encoders"] = {k: ({**v, "path": fn(v["path"])} if isinstance(v, dict) and isinstance(v.get("path"), str)
                               else v) for k, v in out["encoders"].items()}
    return out


def _relative_to(folder: Path):
    """Absolute path -> "./x" or "../x" relative to ``folder``; anything else (a stand-in's name) as is."""
    def fn(p: str) -> str:
        if not os.path.isabs(p):
            return p
        rel = os.path.relpath(Path(p).resolve(), Path(folder).resolve())
        return rel if rel.startswith("..") else os.path.join(".", rel)
    return fn


def _absolute_from(folder: Path):
    """"./x" or "../x" -> the absolute path from ``folder``; anything else as is."""
    def fn(p: str) -> str:
        return str((Path(folder).resolve() / p).resolve()) if p.startswith(("./", "../")) else p
    return fn


# --------------------------------------------------------------------------- the mixin

class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for an ``nn.Module`` built as ``cls(config)``, with
    ``config_class`` (a dataclass with ``to_dict``), ``cfg`` and ``num_params()``."""

    config_class: type

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", weights: str = "ema",
                        output_loading_info: bool = False):
        """The model in eval mode on ``device`` from a model folder (``save_pretrained``) or a training
        checkpoint (a path, or a loaded checkpoint dict); ``(model, info)`` with ``output_loading_info``
        (the module docstring's info)."""
        if weights not in ("ema", "model"):
            raise ValueError(f"weights must be ema|model, got {weights!r}")
        if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
            model, info = cls._from_folder(Path(path))
        else:
            model, info = cls._from_checkpoint(path, weights)
        model = model.to(resolve_device(device) if isinstance(device, str) else device).eval()
        return (model, info) if output_loading_info else model

    @classmethod
    def _from_folder(cls, d: Path):
        if not (d / CONFIG).is_file():
            raise FileNotFoundError(f"{d / CONFIG} not found: not a model folder written by save_pretrained")
        config = read_config(d / CONFIG, cls.config_class)
        cfg = cls.config_class(**config["model_config"])
        if not (d / WEIGHTS).is_file():
            raise FileNotFoundError(f"{d / WEIGHTS} not found")
        model = cls(cfg)
        try:
            model.load_state_dict(_read_weights(d / WEIGHTS, cfg, d / CONFIG))
        except RuntimeError as e:   # torch lists every mismatch on its own line: the first says enough
            detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [str(e).splitlines()[0]]
            raise ValueError(f"{d / WEIGHTS} does not fit {d / CONFIG}: {detail[0]}") from None
        absolute = _absolute_from(d)
        stats = Stats.load(d / STATS) if (d / STATS).is_file() else None
        if stats is not None:
            stats.meta = _map_paths(stats.meta, absolute)
        training = config.get("training")
        info = {"path": str(d), "format": "pretrained", "weights": config.get("weights"),
                "step": (training or {}).get("step"), "config": cfg,
                "codec": _map_paths(config.get("codec"), absolute), "stats": stats, "training": training,
                "data": _map_paths(config.get("data"), absolute), "metrics": config.get("metrics")}
        return model, info

    @classmethod
    def _from_checkpoint(cls, src, weights: str):
        name = str(src) if isinstance(src, (str, os.PathLike)) else "checkpoint"
        cfg_dict, state, which, ck = read_model(src, weights, strict=False)
        try:
            cfg = cls.config_class(**cfg_dict)
        except TypeError as e:
            raise ValueError(f"{name}: config does not match {cls.config_class.__name__}: {e}") from None
        model = cls(cfg)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"{name}: {which} weights do not fit the stored config: {first}") from None
        stats, codec = checkpoint_data(ck)
        info = {"path": name, "format": "checkpoint", "weights": which, "step": step_of(ck), "config": cfg,
                "codec": codec, "stats": stats, "training": training_summary(ck),
                "data": dict(stats.meta) if stats is not None else None, "metrics": None}
        return model, info

    def save_pretrained(self, out_dir, stats=None, metrics: dict | None = None, card: str | None = None,
                        codec=None, checkpoint: dict | None = None, weights: str = "model") -> Path:
        """Write this model as a model folder (the module docstring) and return its path.

        stats: Stats or a stats.json path; None = the ``checkpoint``'s (its own ``stats`` entry, else
        its data folder's stats.json). codec: a Codec, PixelCodec or spec; None = the checkpoint's
        ``codec`` entry, else the one the stats record. checkpoint: the training checkpoint these
        weights come from (its step and run settings go into config.json and the card); ``weights``
        says which of its weights they are. metrics: a flat dict for the card and config. card: extra
        Markdown appended to README.md."""
        from safetensors.torch import save_file

        ck = checkpoint or {}
        ck_stats, ck_codec = checkpoint_data(ck)
        st = (stats if isinstance(stats, Stats) else Stats.load(stats)) if stats is not None else ck_stats
        if codec is not None:
            spec = codec if isinstance(codec, dict) else spec_of(codec)
        elif ck_codec is not None:                                   # a checkpoint that records its codec
            spec = ck_codec
        else:
            spec = codec_spec_from_stats(st) if st is not None else None
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        _check_finite(tensors, "the weights to save")   # before anything is written
        out = Path(out_dir)
        relative = _relative_to(out)
        params = self.num_params()
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": self.cfg.to_dict(),
                  "weights": weights if ck else "model", "codec": spec, "training": training_summary(ck),
                  "data": dict(st.meta) if st is not None else None, "metrics": dict(metrics) if metrics else None,
                  "params": params}
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "nbcore": FORMAT,
                                                         "model_config": json.dumps(self.cfg.to_dict(), sort_keys=True)})
        write_json({**config, "codec": _map_paths(spec, relative), "data": _map_paths(config["data"], relative)},
                   out / CONFIG)
        if st is not None:
            Stats(st.entries, _map_paths(st.meta, relative)).save(out / STATS)
        elif (out / STATS).exists():
            (out / STATS).unlink()   # a stale file from an earlier export must not pass for this model's
        text = model_card(config, params, samples=SAMPLES if (out / SAMPLES).is_file() else None)   # encoders: absolute
        if card:
            text += "\n## Notes\n\n" + card.strip() + "\n"
        (out / CARD).write_text(text, encoding="utf-8")
        return out


# --------------------------------------------------------------------------- checks of a folder

def _kind(default) -> tuple[tuple[type, ...], str]:
    """The JSON types a config field with this default accepts, and their name for a message."""
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, int):
        return (int,), "an integer"
    if isinstance(default, float):
        return (int, float), "a number"
    return (type(default),), f"a {type(default).__name__}"


def read_config(path, config_class) -> dict:
    """A model folder's config.json, checked: JSON, an nbcore.pretrained object of a version this
    nbcore reads, a ``model_config`` object whose fields ``config_class`` knows, each of its type
    and together a valid config. ValueError with one line naming the file and the field."""
    f = Path(path)
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not valid JSON (not UTF-8: byte {e.start})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{f}: not a JSON object (a {type(config).__name__}): not an nbcore.pretrained config")
    if config.get("format") != FORMAT:
        raise ValueError(f"{f} is not an nbcore.pretrained config (format {config.get('format')!r})")
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{f}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{f.parent} has format version {version}; this nbcore reads <= {FORMAT_VERSION}")
    mc = config.get("model_config")
    if mc is None:
        raise ValueError(f"{f}: no 'model_config' field (the model's sizes): not a complete model folder")
    if not isinstance(mc, dict):
        raise ValueError(f"{f}: 'model_config' must be an object of {config_class.__name__} fields, got "
                         f"{type(mc).__name__}")
    fields = {fd.name: fd.default for fd in dataclasses.fields(config_class)}
    unknown = set(mc) - set(fields)
    if unknown:
        raise ValueError(f"{f}: {config_class.__name__} fields this nbcore does not know: {sorted(unknown)} (newer nbcore?)")
    for name, value in mc.items():
        types, what = _kind(fields[name])
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ValueError(f"{f}: model_config.{name} must be {what}, got {value!r}")
    try:
        config_class(**mc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: model_config: {e}") from None
    return config


def _check_finite(tensors: dict, where) -> None:
    """ValueError naming the first tensor holding NaN or Inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name} holds non-finite values ({bad} NaN/Inf of {t.numel()}); refused")


def _read_weights(path: Path, cfg, config_path: Path) -> dict:
    """model.safetensors as a state dict: readable, saved with ``cfg`` (its metadata's
    model_config, when it records one), every tensor finite."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if "model_config" in meta:
        try:
            saved = type(cfg)(**json.loads(meta["model_config"])).to_dict()
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: its metadata's model_config is unreadable ({e})") from None
        now = cfg.to_dict()
        diff = [f"{k} {now[k]!r} ({config_path.name}) vs {saved[k]!r} ({path.name})" for k in now if now[k] != saved[k]]
        if diff:
            raise ValueError(f"{config_path} disagrees with the config {path.name} was saved with: {'; '.join(diff)}; "
                             "config.json was edited after export: restore it, or export the model again")
    _check_finite(sd, path)
    return sd


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
              "features, exported by `save_pretrained`.", "", "| | |", "|---|---|"]
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
              "The model alone:", "", "```python", "from nbcore.model import NanoDiT",
              "from nbcore.codec import codec_from_spec", "",
              'model, info = NanoDiT.from_pretrained("THIS_FOLDER", device="cpu", output_loading_info=True)',
              'codec = codec_from_spec(info["codec"])   # a VAE spec: pass vae_dir=... if its folder moved',
              "# conditions are normalised with info[\"stats\"] (nbcore.stats.Stats), as in training", "```", ""]
    return "\n".join(lines)
