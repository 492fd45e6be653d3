"""The DINO-swap demo: generate from the *text* of one shapes-world scene and the *DINO* (CLS +
patches) of another, and see whose layout and colours the image follows.

One function, ``swap``, serves both the headless run (a default grid, papermill) and the
ipywidgets demo (``build_widget``), so what the widgets show is what the batch run measures.

    demo = Demo.load(ckpt=None)                # newest patch-model checkpoint under outputs/runs/,
                                               # else a quick tiny model trained for the demo
    out = demo.swap(text_index=0, dino_index=1, text_scale=2.0, dino_scale=2.0, steps=10, seed=0)
    out["images"]["swap"]                      # (B, 3, S, S) in [0, 1]
    build_widget(demo)                         # widgets: text source, DINO source, text scale,
                                               # DINO scale, steps, seed (+ guidance formula)

Conditioning follows the training pipeline exactly: a scene is rendered, encoded by the world's
stand-in encoders (``ShapesWorld.encode``) and normalised with the training data's stats.json.

Shape legend: B pairs, S image side, C H W latent, L text tokens, Dt text dim, P patches, Dd DINO dim.
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .data import Stats
from .metrics import swap_follow
from .model import CONDITION_KEYS
from .sample import Guidance, load_model_with_info, sample
from .shapes import ShapesWorld, make_dataset
from .train import TrainConfig, train
from .utils import load_checkpoint, repo_root, resolve_device
from .viz import image_grid

__all__ = ["Demo", "find_patch_checkpoint", "get_demo_model", "swap_figure", "build_widget", "WIDGET_LABELS"]

WIDGET_LABELS = ("text source", "DINO source", "text scale", "DINO scale", "steps", "seed", "guidance")


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
    """(model in eval mode, info) for the demo. ``ckpt``: a checkpoint path; None = the newest
    patch-model checkpoint of a notebook run (``run_dir`` first), else train a tiny patch model
    for ``train_steps`` steps on ``n_data`` samples (None: 32 per step, 256..1500) under
    ``outputs/demo/`` (info["trained_now"] = True). ``variant``
    (e.g. "patch-none") picks that run of ``run_dir`` first."""
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
    model, info = load_model_with_info(ckpt, use_ema=True, device=device)
    if not model.cfg.use_dino_patches:
        raise ValueError(f"{ckpt} is a pre-patch model (use_dino_patches=False): the DINO swap needs patches")
    info["trained_now"] = trained
    return model, info


def _stats_for(ckpt_path: Path):
    """The normalisation stats the checkpoint was trained with (its train_config's data/stats.json)."""
    ck = load_checkpoint(ckpt_path)
    data = (ck.get("train_config") or {}).get("data", "")
    data = Path(data) if data else None
    if data is not None and not data.is_absolute():  # a relative --data means the repo root, not the cwd
        data = repo_root() / data
    path = data / "stats.json" if data is not None else None
    if path is None or not path.exists():
        raise FileNotFoundError(f"{ckpt_path}: its training data stats ({path}) are missing; the demo must "
                                "normalise conditioning exactly as training did")
    return Stats.load(path)


# --------------------------------------------------------------------------- the demo

@dataclass
class Demo:
    """A model, its shapes world and stats, and a fixed list of source scenes (val split)."""
    model: torch.nn.Module
    info: dict
    world: object
    stats: object
    scenes: list = field(default_factory=list)

    @classmethod
    def load(cls, ckpt=None, run_dir=None, device: str = "auto", n_scenes: int = 8, world_seed: int = 0,
             **kw) -> "Demo":
        model, info = get_demo_model(ckpt, run_dir=run_dir, device=device, **kw)
        stats = _stats_for(Path(info["path"]))
        # scenes drawn by the rules the model was trained on (recorded in its data's stats.json)
        world = ShapesWorld(model.cfg, seed=world_seed, rules=stats.meta.get("rules", "standard"))
        scenes = [world.scene(i, "val") for i in range(n_scenes)]
        return cls(model, info, world, stats, scenes)

    @property
    def captions(self) -> list[str]:
        return [s.caption() for s in self.scenes]

    @torch.no_grad()
    def condition(self, indices: list[int]) -> dict:
        """Rendered images and normalised conditioning of scenes ``indices``: png (B, 3, S, S),
        dino_emb (B, Dd), dino_patches (B, P, Dd), text_emb (B, L, Dt) (padding rows zero), text_mask (B, L)."""
        scenes = [self.scenes[i] for i in indices]
        images = self.world.render_batch(scenes)                                       # (B, 3, S, S)
        b = self.world.encode(images, [s.caption() for s in scenes])
        cond = self.stats.normalise_condition({k: b[k] for k in CONDITION_KEYS})
        return {"png": images, "txt": b["txt"], "colours": [[sh.colour for sh in s.shapes] for s in scenes], **cond}

    @torch.no_grad()
    def swap(self, text_index, dino_index, text_scale: float = 2.0, dino_scale: float = 2.0, steps: int = 10,
             seed: int = 0, formula: str = "independent", references: bool = True) -> dict:
        """Generate from the text of scenes ``text_index`` and the DINO of scenes ``dino_index``
        (ints or equal-length lists). Returns ``images``: text_source, dino_source, swap (B, 3, S, S),
        and with ``references`` also text_only and dino_only samples from the same noise;
        ``metrics``: ``nbcore.metrics.swap_follow`` of the swap (whose layout / colours it follows)."""
        ti = [text_index] if isinstance(text_index, int) else list(text_index)
        di = [dino_index] if isinstance(dino_index, int) else list(dino_index)
        if len(ti) != len(di):
            raise ValueError(f"{len(ti)} text sources but {len(di)} DINO sources")
        bad = [i for i in ti + di if not 0 <= i < len(self.scenes)]
        if bad:
            raise ValueError(f"scene index {bad} out of range 0..{len(self.scenes) - 1}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        A, B = self.condition(ti), self.condition(di)
        dev = next(self.model.parameters()).device
        g = Guidance(formula, float(text_scale), float(dino_scale))
        common = dict(steps=int(steps), seed=int(seed), guidance=g)
        decode = lambda z: self.world.codec.decode(z.float().cpu())                   # (B, 3, S, S)
        text = {k: A[k].to(dev) for k in ("text_emb", "text_mask")}
        dino = {k: B[k].to(dev) for k in ("dino_emb", "dino_patches")}
        z = sample(self.model, **text, **dino, **common)
        images = {"text_source": A["png"], "dino_source": B["png"], "swap": decode(z)}
        if references:
            images["text_only"] = decode(sample(self.model, **text, **common))
            images["dino_only"] = decode(sample(self.model, **dino, **common))
        follow = swap_follow(images["swap"], A["png"], A["colours"], B["png"], B["colours"])
        return {"images": images, "text": A["txt"], "dino_text": B["txt"], "metrics": follow,
                "settings": {"text_scale": float(text_scale), "dino_scale": float(dino_scale), "steps": int(steps),
                             "seed": int(seed), "formula": formula}}


def swap_figure(result: dict):
    """``viz.image_grid`` of a ``Demo.swap`` result: one row per pair, titled 'text <- DINO'."""
    titles = [f"T: {a}\nD: {b}" for a, b in zip(result["text"], result["dino_text"])]
    names = {"text_source": "text source", "dino_source": "DINO source", "swap": "swap (text + DINO)",
             "text_only": "text only", "dino_only": "DINO only"}
    return image_grid({names[k]: v for k, v in result["images"].items()}, titles=titles, size=1.6)


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def build_widget(demo: Demo, text_index: int = 0, dino_index: int = 1, text_scale: float = 2.0,
                 dino_scale: float = 2.0, steps: int = 10, seed: int = 0, formula: str = "independent"):
    """An ipywidgets panel over ``demo.swap``: dropdowns 'text source' and 'DINO source' (scene
    captions), sliders 'text scale', 'DINO scale', 'steps', an int box 'seed', a dropdown
    'guidance'; any change re-renders the ``widgets.Image`` (and a metrics line). Returns the VBox;
    ``panel.image``, ``panel.controls`` and ``panel.render()`` are attached for tests."""
    import ipywidgets as W
    opts = [(f"{i}: {c}", i) for i, c in enumerate(demo.captions)]
    style = {"description_width": "90px"}
    lay = W.Layout(width="520px")
    controls = {
        "text source": W.Dropdown(options=opts, value=text_index, description="text source", style=style, layout=lay),
        "DINO source": W.Dropdown(options=opts, value=dino_index, description="DINO source", style=style, layout=lay),
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
        status.value = "<i>sampling...</i>"
        res = demo.swap(c["text source"], c["DINO source"], c["text scale"], c["DINO scale"], c["steps"],
                        c["seed"], c["guidance"])
        image.value = _png_bytes(swap_figure(res))
        m = res["metrics"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        status.value = (f"layout error vs text source {fmt(m['error_vs_text_source'])}, vs DINO source "
                        f"{fmt(m['error_vs_dino_source'])} (fraction of the image side)")
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
    panel.image, panel.controls, panel.render = image, controls, render
    return panel
