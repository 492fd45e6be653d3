"""The DINO-swap demo: generate from the *text* of one source and the *DINO* (CLS + patches) of
another, and see whose layout the image follows.

A source is a shapes-world scene (the default: ``n_scenes`` val scenes the model's data rules
draw) or the user's own material: an image file and / or a typed caption. A text source needs only
a caption, a DINO source only an image. Conditioning goes through ``nbcore.encoders.DataEncoders``,
the encoders the model's data was made with, in both worlds: the shapes world's stand-ins, or the
real DINOv3 / T5 / VAE from local folders (those the data's stats.json records, or given). One call
``encoders.condition(DINO images, text captions)`` gives the swap's normalised conditions, exactly
as a training batch holds them; ``encoders.codec`` decodes the samples.

    demo = Demo.load(ckpt=None)          # newest patch-model checkpoint under outputs/runs/, else a
                                         # quick tiny model trained for the demo (shapes world)
    demo = Demo.load("models/nano", dino=DIR, t5=DIR, vae=DIR)   # a save_pretrained folder (or a
                                         # training checkpoint); folders default to the recorded ones
    cat = demo.add_source("cat.jpg", "a cat on a sofa")           # -> its index in demo.sources
    out = demo.swap(Source(caption="a red circle at the top left"), cat, text_scale=2.0,
                    dino_scale=2.0, steps=10, seed=0)
    out["images"]["swap"]                # (B, 3, S, S) in [0, 1]
    build_widget(demo)                   # widgets: text source, DINO source, typed caption, DINO
                                         # image file, text scale, DINO scale, steps, seed, guidance

One function, ``Demo.swap``, serves the headless run (a grid, papermill) and the widgets, so what
the widgets show is what the batch run measures. Its metric is ``nbcore.metrics.shape_layout`` of
the swap against the scene the text source's caption describes and the scene the DINO source's
image shows, where they are known (the default scenes; a user image with a shapes-world
``name.json`` beside it, as ``nbcore.shapes.write_image_folder`` writes, and that scene's own
caption). Other typed text or a photo has no known scene: its side is not scored, and the result
says why.

Shape legend: B pairs, S image side, C H W latent, L text tokens, Dt text dim, P patches, Dd DINO dim.
"""
from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from .codec import codec_from_spec, codec_spec_from_stats
from .data import Stats
from .encoders import DataEncoders, data_encoders
from .metrics import shape_layout
from .model import NanoDiT
from .sample import Guidance, sample
from .shapes import RULES, Scene, make_dataset, render, sample_scene
from .train import TrainConfig, train
from .utils import repo_root, resolve_device
from .viz import image_grid

__all__ = ["Demo", "Source", "find_patch_checkpoint", "get_demo_model", "val_scenes", "swap_layout", "swap_figure",
           "build_widget", "WIDGET_LABELS"]

WIDGET_LABELS = ("text source", "DINO source", "typed caption", "DINO image file", "text scale", "DINO scale",
                 "steps", "seed", "guidance")


# --------------------------------------------------------------------------- model

def find_patch_checkpoint(search_root=None, prefer_run_dir=None, variant: str | None = None) -> Path | None:
    """A patch-model checkpoint for the demo: ``prefer_run_dir/train/<variant>/ckpt/last.pt`` when
    given and present, else the newest ``train/patch-*/ckpt/last.pt`` under ``prefer_run_dir``, then
    anywhere under ``search_root`` (default: the repository's outputs/runs), then a previous demo
    model under outputs/demo. None when there is none."""
    if prefer_run_dir and variant:
        p = Path(prefer_run_dir) / "train" / variant / "ckpt" / "last.pt"
        if p.exists():
            return p
    roots = []
    if prefer_run_dir:
        roots.append(Path(prefer_run_dir))
    roots.append(Path(search_root) if search_root else repo_root() / "outputs" / "runs")
    for i, root in enumerate(roots):
        pattern = "train/patch-*/ckpt/last.pt" if i == 0 and prefer_run_dir else "*/train/patch-*/ckpt/last.pt"
        found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    demo = (Path(search_root).parent if search_root else repo_root() / "outputs") / "demo" / "train"
    found = sorted(demo.glob("patch-*/ckpt/last.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _train_demo_model(out_root: Path, preset: str, steps: int, n_data: int, device: str, seed: int) -> Path:
    """A quick patch model (sin-cos patch positions, from scratch) for a demo that found no run."""
    data = out_root / "data"
    if not any(data.glob("train-*.tar")):
        make_dataset(data, n_data, seed=seed, preset=preset, val_fraction=0.1)
    cfg = TrainConfig(preset=preset, use_dino_patches=True, patch_pos_embed="sincos", data=str(data),
                      out=str(out_root / "train" / "patch-sincos"), steps=steps, batch_size=32, lr=1e-3,
                      warmup=min(50, steps // 5), ckpt_every=steps, log_every=max(1, steps // 20),
                      device=device, seed=seed, resume="none")
    return Path(train(cfg)["checkpoint"])


def get_demo_model(ckpt=None, run_dir=None, device: str = "auto", train_steps: int = 400,
                   n_data: int | None = None, preset: str = "tiny", seed: int = 0, variant: str | None = None):
    """(model in eval mode, info) for the demo.

    ``ckpt``: a training checkpoint, or a model folder written by ``nbcore.pretrained.save_pretrained``;
    None = the newest patch-model checkpoint of a notebook run (``run_dir`` first; ``variant``, e.g.
    "patch-none", picks that run of ``run_dir`` first), else a tiny patch model trained now for
    ``train_steps`` steps on ``n_data`` samples (None: 32 per step, 256..1500) under ``outputs/demo/``.
    info: "path", "format" ("checkpoint" | "pretrained"), "weights", "step", "trained_now", "stats"
    (the data's ``Stats``: conditions are normalised with them) and "codec" (the codec spec the model
    records, or None: the one its stats record)."""
    trained = False
    if ckpt in (None, "", "auto"):
        ckpt = find_patch_checkpoint(prefer_run_dir=run_dir, variant=variant)
        if ckpt is None:
            n_data = n_data or min(1500, max(256, 32 * train_steps))   # about one pass at batch 32, capped
            ckpt = _train_demo_model(repo_root() / "outputs" / "demo", preset, train_steps, n_data,
                                     str(resolve_device(device)), seed)
            trained = True
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"demo checkpoint {ckpt} does not exist")
    model, info = NanoDiT.from_pretrained(ckpt, device=device, output_loading_info=True)
    if info["stats"] is None and info["format"] == "pretrained":
        raise FileNotFoundError(f"{ckpt} holds no stats.json: the demo must normalise conditioning exactly as "
                                "training did (export the model with its data's stats)")
    if info["stats"] is None:
        data = (info["training"] or {}).get("data") or "?"
        raise FileNotFoundError(f"{ckpt}: its training data stats (in the checkpoint, or {data}/stats.json) are "
                                "missing; the demo must normalise conditioning exactly as training did")
    if not model.cfg.use_dino_patches:
        raise ValueError(f"{ckpt} is a pre-patch model (use_dino_patches=False): the DINO swap needs patches")
    info["trained_now"] = trained
    return model, info


def _check_fits(cfg, enc: DataEncoders) -> None:
    """The encoders give what the model takes: a wrong folder fails here, in one line, not in a forward."""
    S = enc.image_size
    cls, patches = enc.dino(torch.zeros(1, 3, S, S))                                  # (1, Dd), (1, P, Dd)
    emb, _ = enc.text(["a"])                                                          # (1, L, Dt)
    got = {"dino_dim": cls.shape[-1], "patches": patches.shape[1], "text_dim": emb.shape[-1],
           "latent channels": enc.codec.channels}
    want = {"dino_dim": cfg.dino_dim, "patches": cfg.num_patches, "text_dim": cfg.text_dim,
            "latent channels": cfg.in_channels}
    bad = [f"{k} {got[k]} (model: {want[k]})" for k in got if got[k] != want[k]]
    if bad:
        raise ValueError(f"the {enc.kind} encoders do not fit the model: {', '.join(bad)}; pass the folders its "
                         "data was made with")


# --------------------------------------------------------------------------- sources

@dataclass(eq=False)
class Source:
    """One side of a swap. ``image``: a file path, or a (3, S, S) tensor in [0, 1] at the data's image
    size; ``caption``: typed text; ``scene``: the shapes-world scene the source shows (a ``Scene`` or
    its json), when known, for the layout metric; ``name``: a label (default: from the file name and
    the caption). A text source needs only a caption, a DINO source only an image."""
    image: str | Path | torch.Tensor | None = None
    caption: str | None = None
    scene: Scene | dict | None = None
    name: str | None = None

    def __post_init__(self):
        if self.image is None and not (self.caption or "").strip():
            raise ValueError("a source needs an image, a caption, or both")
        if isinstance(self.scene, dict):
            self.scene = Scene.from_json(self.scene)

    def text_scene(self) -> Scene | None:
        """The scene the caption describes: ``scene`` when the caption is that scene's own caption
        (other typed text over a scene's image describes no known scene)."""
        ok = self.scene is not None and (self.caption or "").strip() == self.scene.caption()
        return self.scene if ok else None

    def image_scene(self) -> Scene | None:
        """The scene the image shows: ``scene`` when the source has an image."""
        return self.scene if self.image is not None else None

    @property
    def image_label(self) -> str | None:
        """What names the image: ``name``, else the file name ("image" for a tensor); None without one."""
        if self.image is None:
            return None
        return self.name or (Path(self.image).name if isinstance(self.image, (str, Path)) else "image")

    @property
    def label(self) -> str:
        """``name``, else "file.png: caption", the file name or the caption."""
        parts = [self.image_label, (self.caption or "").strip()]
        return self.name or ": ".join(p for p in parts if p)


def val_scenes(n: int, seed: int = 0, rules: str = "standard") -> list[Scene]:
    """The first ``n`` val scenes of the shapes world with ``seed`` and ``rules``: the stream of
    ``ShapesWorld(sizes, seed, rules).scene(i, "val")`` (scenes do not depend on the sizes)."""
    return [sample_scene(np.random.default_rng([seed, 1, i]), rules=RULES[rules]) for i in range(n)]


def _sidecar_scene(path: Path) -> Scene | None:
    """The shapes-world scene in ``name.json`` beside an image (``nbcore.shapes.write_image_folder``);
    None when there is no such file or it holds no scene. Its coordinates are the image's: valid for
    a square image (a non-square one is centre-cropped on load)."""
    p = path.with_suffix(".json")
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not (isinstance(d, dict) and isinstance(d.get("shapes"), list)):
        return None
    try:
        return Scene.from_json(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{p}: not a shapes-world scene ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- the swap metric

def swap_layout(swap: torch.Tensor, text_scenes: list, dino_scenes: list) -> dict:
    """Whose layout the swap images (B, 3, S, S) follow: ``nbcore.metrics.shape_layout`` against the
    scenes the text sources' captions describe and the scenes the DINO sources' images show (B each;
    None for a source with no known scene).

    Returns ``layout_error_vs_text_scene``, ``layout_error_vs_dino_scene``, ``shape_recall_vs_text_scene``,
    ``shape_recall_vs_dino_scene``: means over the pairs whose side has a scene (None when none has);
    ``follows_dino_rate``, ``follows_text_rate``, ``tie_rate`` over the ``pairs`` scored on both sides (a
    pair follows the side it has the smaller layout error against); ``unscored``: None when every pair
    was scored on both sides, else the reason (typed text or a user image has no known scene)."""
    B = swap.shape[0]
    if len(text_scenes) != B or len(dino_scenes) != B:
        raise ValueError(f"{len(text_scenes)} text and {len(dino_scenes)} DINO scenes for {B} images")
    out, err, ok = {}, {}, {}
    for side, scenes in (("text", text_scenes), ("dino", dino_scenes)):
        idx = [i for i, s in enumerate(scenes) if s is not None]
        lay = shape_layout(swap[idx], [scenes[i] for i in idx]) if idx else None
        out[f"layout_error_vs_{side}_scene"] = lay["layout_error"] if lay else None
        out[f"shape_recall_vs_{side}_scene"] = lay["shape_recall"] if lay else None
        err[side], ok[side] = torch.zeros(B), torch.zeros(B, dtype=torch.bool)                # (B,)
        if lay:
            err[side][idx] = lay["per_sample"]["layout_error"]
            ok[side][idx] = lay["per_sample"]["valid"]["layout_error"]
    both = ok["text"] & ok["dino"]
    n = int(both.sum())
    a, b = err["text"][both], err["dino"][both]
    rate = lambda m: int(m.sum()) / n if n else None                                   # exact fractions
    out.update(pairs=n, follows_dino_rate=rate(b < a), follows_text_rate=rate(a < b), tie_rate=rate(a == b))
    missing = {"text": sum(s is None for s in text_scenes), "DINO": sum(s is None for s in dino_scenes)}
    what = {"text": "captions describe no known scene", "DINO": "images show no known scene"}
    why = [f"{side}: {k} of {B} {what[side]}" for side, k in missing.items() if k]
    out["unscored"] = ("layout is scored against shapes-world scenes only: " + "; ".join(why)) if why else None
    return out


# --------------------------------------------------------------------------- the demo

@dataclass
class Demo:
    """A model, the encoders its data was made with, and the sources a swap takes its text and its
    DINO from: ``n_scenes`` shapes-world val scenes first (rendered at the data's image size, under
    the data's rules), then the user's material (``add_source``)."""
    model: torch.nn.Module
    info: dict
    encoders: DataEncoders
    sources: list = field(default_factory=list)
    n_scenes: int = 0

    @classmethod
    def load(cls, ckpt=None, run_dir=None, device: str = "auto", n_scenes: int = 8, world_seed: int = 0,
             dino=None, t5=None, vae=None, **kw) -> "Demo":
        """The model of ``ckpt`` (``get_demo_model``: a training checkpoint, a ``save_pretrained``
        folder, or None to find / train one; ``kw`` go there) with its data's encoders: the shapes
        world's stand-ins, or the real DINOv3 / T5 / VAE from the folders ``dino``, ``t5``, ``vae``
        (None: those the data's stats.json records)."""
        model, info = get_demo_model(ckpt, run_dir=run_dir, device=device, **kw)
        dev = str(next(model.parameters()).device)
        enc = data_encoders(info["stats"], model.cfg, dino=dino, t5=t5, vae=vae, device=dev)
        if info["codec"] is not None and info["codec"] != codec_spec_from_stats(enc.stats):
            enc = replace(enc, codec=codec_from_spec(info["codec"], vae_dir=vae, device=dev))  # the model's own record
        _check_fits(model.cfg, enc)
        scenes = val_scenes(n_scenes, world_seed, enc.stats.meta.get("rules", "standard"))
        sources = [Source(render(s, enc.image_size), s.caption(), s, name=f"scene {i}: {s.caption()}")
                   for i, s in enumerate(scenes)]
        return cls(model, info, enc, sources, n_scenes)

    @property
    def stats(self) -> Stats:
        return self.encoders.stats

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]

    def add_source(self, image=None, caption: str | None = None, scene=None) -> int:
        """Add the user's material as a source; returns its index in ``sources``. ``image``: a file
        path (read now, so a bad file fails here) or a (3, S, S) tensor; ``caption``: typed text.
        A shapes-world ``name.json`` beside an image file is its scene, unless ``scene`` is given."""
        src = Source(image, caption, scene)
        self.image_of(src)
        if src.scene is None and isinstance(image, (str, Path)):
            src.scene = _sidecar_scene(Path(image))
        self.sources.append(src)
        return len(self.sources) - 1

    def add_material(self, images=(), captions=()) -> list[int]:
        """``add_source`` for each image path with the caption at the same position (either may run
        out: an image alone is a DINO source, a caption alone a text source); returns the indices."""
        return [self.add_source(img, cap) for img, cap in zip_longest(list(images), list(captions))]

    def image_of(self, src: Source) -> torch.Tensor | None:
        """A source's image as the data's images are: (3, S, S) in [0, 1], S = ``encoders.image_size``
        (a file is resized and centre-cropped by ``encoders.load``); None for a caption alone."""
        if src.image is None:
            return None
        S = self.encoders.image_size
        if torch.is_tensor(src.image):
            if tuple(src.image.shape) != (3, S, S):
                raise ValueError(f"a source image tensor must be (3, {S}, {S}) in [0, 1] (the data's image size), got "
                                 f"{tuple(src.image.shape)}: pass a file path to have it resized and cropped")
            return src.image.float().clamp(0, 1)
        path = Path(src.image)
        if not path.is_file():
            raise FileNotFoundError(f"source image not found: {path}")
        try:
            return self.encoders.load([path])[0]                                      # (3, S, S)
        except OSError as e:   # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{path}: not a readable image ({e})") from None

    def grid_pairs(self, n: int) -> tuple[list[int], list[int]]:
        """(text indices, DINO indices) of the headless grid. Without user material: scene i's text
        with scene i + n's DINO (different scenes). With it: the user's captions as text sources
        and the user's images as DINO sources (scenes stand in for a side the user gave nothing
        for), pair j taking text j and image j + 1, so a pair mixes two of the user's sources; at
        most n pairs, at least one per user source of the larger side up to n."""
        if n < 1:
            raise ValueError(f"the grid needs n >= 1 pairs, got {n}")
        user = range(self.n_scenes, len(self.sources))
        texts = [i for i in user if (self.sources[i].caption or "").strip()]
        images = [i for i in user if self.sources[i].image is not None]
        if not texts and not images:
            if self.n_scenes < 2 * n:
                raise ValueError(f"a grid of {n} pairs needs {2 * n} scenes, the demo has {self.n_scenes}")
            return list(range(n)), list(range(n, 2 * n))
        texts, images = texts or list(range(self.n_scenes)), images or list(range(self.n_scenes))
        if not texts or not images:
            raise ValueError("the grid needs a caption and an image: add both, or load the demo with scenes")
        k = min(n, max(len(texts), len(images)))
        shift = 1 if len(images) > 1 else 0
        return [texts[j % len(texts)] for j in range(k)], [images[(j + shift) % len(images)] for j in range(k)]

    def _resolve(self, which, role: str) -> list[Source]:
        """Sources given as indices into ``sources`` and / or ``Source`` objects, one or a list."""
        out = []
        for x in which if isinstance(which, (list, tuple)) else [which]:
            if isinstance(x, Source):
                out.append(x)
            elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                if not 0 <= x < len(self.sources):
                    raise ValueError(f"{role} source {x} out of range: the demo has {len(self.sources)} sources")
                out.append(self.sources[int(x)])
            else:
                raise TypeError(f"a {role} source is an index into demo.sources or a Source, got {type(x).__name__}")
        return out

    @torch.no_grad()
    def condition(self, text_sources: list[Source], dino_sources: list[Source]) -> dict:
        """The swap's normalised conditions, as a training batch holds them: one
        ``encoders.condition(DINO sources' images, text sources' captions)`` -> dino_emb (B, Dd),
        dino_patches (B, P, Dd), text_emb (B, L, Dt), text_mask (B, L), png (the DINO images), txt."""
        no_text = [s.label for s in text_sources if not (s.caption or "").strip()]
        if no_text:
            raise ValueError(f"text source {no_text[0]!r} has no caption: a text source needs typed text")
        images = [self.image_of(s) for s in dino_sources]
        no_image = [s.label for s, im in zip(dino_sources, images) if im is None]
        if no_image:
            raise ValueError(f"DINO source {no_image[0]!r} has no image: a DINO source needs an image")
        return self.encoders.condition(torch.stack(images), [s.caption for s in text_sources])    # png (B, 3, S, S)

    @torch.no_grad()
    def swap(self, text_source, dino_source, text_scale: float = 2.0, dino_scale: float = 2.0, steps: int = 10,
             seed: int = 0, formula: str = "independent", references: bool = True) -> dict:
        """Generate from the captions of ``text_source`` and the images' DINO of ``dino_source``: an
        index into ``sources``, a ``Source``, or equal-length lists of them.

        Returns ``images``: text_source (a blank tile for a typed caption), dino_source, swap
        (B, 3, S, S) in [0, 1], and with ``references`` also text_only and dino_only samples from
        the same noise (the same ``seed`` gives the same images); ``condition``: the normalised
        conditions sampled from (``condition``); ``text``: the captions sampled from; ``dino_image``:
        what names each DINO image (``Source.image_label``);
        ``metrics``: ``swap_layout`` (whose layout the swap follows; None where a side has no scene)."""
        A, B = self._resolve(text_source, "text"), self._resolve(dino_source, "DINO")
        if len(A) != len(B):
            raise ValueError(f"{len(A)} text sources but {len(B)} DINO sources")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cond = self.condition(A, B)
        dev = next(self.model.parameters()).device
        common = dict(steps=int(steps), seed=int(seed), guidance=Guidance(formula, float(text_scale), float(dino_scale)))
        decode = lambda z: self.encoders.codec.decode(z.float().cpu())                 # (B, 3, S, S)
        text = {k: cond[k].to(dev) for k in ("text_emb", "text_mask")}
        dino = {k: cond[k].to(dev) for k in ("dino_emb", "dino_patches")}
        images = {"text_source": self._text_images(A), "dino_source": cond["png"],
                  "swap": decode(sample(self.model, **text, **dino, **common))}
        if references:
            images["text_only"] = decode(sample(self.model, **text, **common))
            images["dino_only"] = decode(sample(self.model, **dino, **common))
        return {"images": images, "condition": {**text, **dino}, "text": [s.caption for s in A],
                "dino_image": [s.image_label for s in B],
                "metrics": swap_layout(images["swap"], [s.text_scene() for s in A], [s.image_scene() for s in B]),
                "settings": {"text_scale": float(text_scale), "dino_scale": float(dino_scale), "steps": int(steps),
                             "seed": int(seed), "formula": formula}}

    def _text_images(self, sources: list[Source]) -> torch.Tensor:
        """(B, 3, S, S): each text source's image, a white tile for a typed caption (it has none)."""
        S = self.encoders.image_size
        return torch.stack([im if im is not None else torch.ones(3, S, S) for im in map(self.image_of, sources)])


def swap_figure(result: dict, title: str | None = None):
    """``viz.image_grid`` of a ``Demo.swap`` result: one row per pair, labelled with the source of its
    text and the source of its DINO; ``title`` (e.g. the arm, its step and the guidance) on top."""
    titles = [f"text from: {a}\nDINO from: {b}" for a, b in zip(result["text"], result["dino_image"])]
    names = {"text_source": "text source", "dino_source": "DINO source", "swap": "swap (text + DINO)",
             "text_only": "text only", "dino_only": "DINO only"}
    return image_grid({names[k]: v for k, v in result["images"].items()}, titles=titles, size=1.6, title=title)


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def status_line(metrics: dict) -> str:
    """The widget's HTML line for ``swap_layout`` metrics."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    line = (f"layout error vs text scene {fmt(metrics['layout_error_vs_text_scene'])}, vs DINO scene "
            f"{fmt(metrics['layout_error_vs_dino_scene'])} (fraction of the image side; lower = closer)")
    if metrics["unscored"]:
        line += f"<br><i>{html.escape(metrics['unscored'])}</i>"
    return line


def build_widget(demo: Demo, text_index: int = 0, dino_index: int = 1, text_scale: float = 2.0,
                 dino_scale: float = 2.0, steps: int = 10, seed: int = 0, formula: str = "independent",
                 caption: str = "", image_file: str = ""):
    """An ipywidgets panel over ``demo.swap``: dropdowns 'text source' (sources with a caption) and
    'DINO source' (sources with an image); text boxes 'typed caption' and 'DINO image file' that,
    when not empty, replace the text source and the DINO source (a typed caption, an image path);
    sliders 'text scale', 'DINO scale', 'steps', an int box 'seed', a dropdown 'guidance'. Any change
    re-renders the ``widgets.Image`` and a metrics line (errors, e.g. a missing file, show there).
    Returns the VBox; ``panel.image``, ``panel.status``, ``panel.controls`` and ``panel.render()``
    are attached for tests."""
    import ipywidgets as W
    texts = [(s.label, i) for i, s in enumerate(demo.sources) if (s.caption or "").strip()]
    images = [(s.label, i) for i, s in enumerate(demo.sources) if s.image is not None]
    if not texts or not images:
        raise ValueError("the widget needs a source with a caption and one with an image: demo.add_source(path, caption)")
    pick = lambda opts, i: i if i in [v for _, v in opts] else opts[0][1]
    style = {"description_width": "110px"}
    lay = W.Layout(width="560px")
    controls = {
        "text source": W.Dropdown(options=texts, value=pick(texts, text_index), description="text source",
                                  style=style, layout=lay),
        "DINO source": W.Dropdown(options=images, value=pick(images, dino_index), description="DINO source",
                                  style=style, layout=lay),
        "typed caption": W.Text(value=caption, placeholder="type a caption to use instead of the text source",
                                description="typed caption", continuous_update=False, style=style, layout=lay),
        "DINO image file": W.Text(value=image_file, placeholder="an image path to use instead of the DINO source",
                                  description="DINO image file", continuous_update=False, style=style, layout=lay),
        "text scale": W.FloatSlider(value=text_scale, min=0.0, max=6.0, step=0.5, description="text scale",
                                    continuous_update=False, style=style),
        "DINO scale": W.FloatSlider(value=dino_scale, min=0.0, max=6.0, step=0.5, description="DINO scale",
                                    continuous_update=False, style=style),
        "steps": W.IntSlider(value=steps, min=1, max=50, step=1, description="steps", continuous_update=False,
                             style=style),
        "seed": W.IntText(value=seed, description="seed", style=style),
        "guidance": W.Dropdown(options=["independent", "nested"], value=formula, description="guidance", style=style),
    }
    image = W.Image(format="png")
    status = W.HTML()

    def render(*_):
        c = {k: w.value for k, w in controls.items()}
        typed, path = c["typed caption"].strip(), c["DINO image file"].strip()
        status.value = "<i>sampling...</i>"
        res = demo.swap(Source(caption=typed) if typed else c["text source"],
                        Source(image=path) if path else c["DINO source"],
                        c["text scale"], c["DINO scale"], c["steps"], c["seed"], c["guidance"])
        image.value = _png_bytes(swap_figure(res))
        status.value = status_line(res["metrics"])
        return res

    def on_change(change):
        # A widget callback's exception only reaches JupyterLab's log console: show it in the panel.
        try:
            render()
        except Exception as e:  # noqa: BLE001 - shown to the user, then the panel stays usable
            status.value = f"<b style='color:#b00'>error: {type(e).__name__}: {html.escape(str(e))}</b>"

    for w in controls.values():
        w.observe(on_change, names="value")
    render()
    panel = W.VBox([*controls.values(), status, image])
    panel.image, panel.status, panel.controls, panel.render = image, status, controls, render
    return panel
