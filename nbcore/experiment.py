"""The experiment: profiles, arms, the training schedule, and the calibrated evaluation.

One question (docs/DESIGN.md): do DINOv3 patch tokens put the blobs in the right places while text keeps
control? A ``Profile`` fixes the world, the schedule and the evaluation; an ``Arm`` is one model
design trained under it. Notebooks 03-06 and ``nbcore.runner`` call the functions below.

Schedule: equal optimiser steps for every arm, every arm with ``seeds`` training seeds
    baseline       pre-patch model from scratch, ``steps`` steps, a milestone every ``milestone_every``
    warm arms      start from the same seed's baseline milestone at ``warm_from`` (the design's
                   path) and train ``steps - warm_from`` more: ``steps`` in all, on the baseline's axis
    scratch arms   from step 0 for ``steps`` steps (the fallback: restart from step 0)
    seeds          seed s of every arm (its initialisation, data order and dropout draws; a warm arm
                   also its own baseline), so training noise is measured, not assumed
Runs are independent processes, ``workers`` at a time, one torch thread each (a model this small
does not use a second thread: measured equal steps/s with 1 and 2 threads on 2 cores).

Evaluation (``evaluate``): every arm's EMA weights at its last step on ``final_scenes`` validation
scenes, one shared noise draw, guidance off (v = v_full) and on (the profile's nested scales):
    recon      own text + own DINO (CLS + patches)
    textonly   own text, null DINO: does text still place shapes (text control)?
    dinoonly   null text, own DINO: the patch route alone (its positive control)
    swap       text of scene i, DINO of scene i+1 (guidance on): whose layout does it follow?
    unplaced swap  the DINO swap as the design defines it: scene i's caption *without places* ("a large red circle",
               as real captions read; the world's training captions always name places, so this
               caption is new to every model) with the DINO of scene j, the next scene with as many
               shapes: scored against the hybrid scene (i's shapes -- kind, colour, size -- at j's
               places, in caption order): low = layout from DINO, content from text
               (``swap_unplaced``), and against scene j itself (``swap_unplaced_dino``: low = the
               DINO's content copied too)
Calibration rows go through the same metrics: ``untrained`` (a random-init model through the
same sampler), ``layout_blind`` (each scene redrawn with its shapes at shuffled places: what "no
layout" scores), ``oracle`` (the source through the codec: the ceiling). Means carry 95% bootstrap
intervals over scenes; arm-vs-baseline differences a paired bootstrap over the same scenes, seed s
of an arm against seed s of the baseline. An effect is claimed only where every seed's paired interval
excludes 0 on the same side (``conclusions``). The plateau test (``plateau``): the paired difference
(last milestone - the one before) of reconstruction layout error on the same ``final_scenes`` scenes,
guidance off; an interval wholly below 0 means the arm is still improving and its number is a floor.
Metric definitions: ``nbcore.metrics.shape_layout``.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .codec import codec_from_stats
from .metrics import bootstrap_ci, paired_bootstrap_diff, shape_layout_per_sample, psnr
from .model import NanoDiT, ModelConfig, preset as model_preset
from .preemption import pool_worker_init
from .sample import Guidance, load_model_with_info, sample
from .encoders import data_encoders
from .shapes import Scene, Shape, ShapesWorld, make_dataset, shuffle_layout
from .tracking import TB_DIR, RunTracker
from .train import TrainConfig, load_train_log, train
from .utils import write_json
from .validate import load_val_batch

__all__ = ["Arm", "Profile", "PROFILES", "BASELINE", "HEADLINE_ARMS", "SECONDARY_ARMS", "profile",
           "ensure_data", "arm_dir", "train_arms", "milestones", "evaluate", "curves", "plateau",
           "results_table", "LAYOUT_METRICS"]

LAYOUT_METRICS = ("layout_error", "shape_recall", "placement_error", "mask_iou")
MODES = ("recon", "textonly", "dinoonly", "swap_dino", "swap_text", "swap_unplaced", "swap_unplaced_dino")


# --------------------------------------------------------------------------- arms

@dataclass(frozen=True)
class Arm:
    """One model design: ``model`` = ModelConfig fields over the profile's preset; ``init`` scratch |
    warm (from the baseline's milestone at ``Profile.warm_from``); ``seed`` the training seed."""
    name: str
    model: dict = field(default_factory=dict)
    init: str = "scratch"
    seed: int = 0

    def __post_init__(self):
        if self.init not in ("scratch", "warm"):
            raise ValueError(f"arm {self.name}: init must be scratch|warm, got {self.init!r}")

    @property
    def run(self) -> str:
        """Folder name of this arm's run: the name, plus the seed when it is not 0."""
        return self.name if self.seed == 0 else f"{self.name}-seed{self.seed}"

    @property
    def is_patch(self) -> bool:
        return self.model.get("use_dino_patches", True)


# Every patch arm normalises its projected context patches (the presets' ``patch_norm``); every warm
# arm gates its new keys (``context_gate``: exactly the baseline's function at the branch point).
BASELINE = Arm("baseline", {"use_dino_patches": False})
HEADLINE_ARMS = (
    BASELINE,
    Arm("patch-sincos", {"patch_pos_embed": "sincos", "context_gate": True}, "warm"),   # the warm-start path
    Arm("patch-sincos-scratch", {"patch_pos_embed": "sincos"}, "scratch"),
    Arm("patch-rope-scratch", {"patch_pos_embed": "rope"}, "scratch"),     # position-aware cross-attention
    Arm("tied+context", {"patch_tie": True, "context_gate": True}, "warm"),  # patches also tied to their image tokens
)
SECONDARY_ARMS = (
    Arm("patch-none", {"patch_pos_embed": "none", "context_gate": True}, "warm"),   # patches as they come, no positions
    Arm("patch-learned", {"patch_pos_embed": "learned", "context_gate": True}, "warm"),
    Arm("patch-rope", {"patch_pos_embed": "rope", "context_gate": True}, "warm"),
    Arm("patch-sincos-ungated", {"patch_pos_embed": "sincos"}, "warm"),    # the warm start without the gate
    Arm("patch-sincos-raw-scratch", {"patch_pos_embed": "sincos", "patch_norm": False}, "scratch"),  # no norm
    Arm("tied-only", {"patch_tie": True, "patch_context": False}, "warm"),
    Arm("cls-start", {"patch_pos_embed": "sincos", "cls_position": "start", "context_gate": True}, "warm"),
)


# --------------------------------------------------------------------------- profiles

@dataclass(frozen=True)
class Profile:
    """Everything a suite run fixes. Vary with ``dataclasses.replace`` (``profile(name, **over)``)."""
    name: str
    preset: str = "nano"
    model_overrides: dict = field(default_factory=dict)
    world: str = "easy"                  # shapes-world rules (nbcore.shapes.RULES)
    # data
    n_data: int = 8000
    val_fraction: float = 0.05
    # schedule (module docstring)
    steps: int = 2400
    warm_from: int = 1200
    milestone_every: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995
    arms: tuple = HEADLINE_ARMS
    seeds: int = 2                       # training seeds of every arm (module docstring)
    warm_lr_scale: float = 1.0           # TrainConfig.warm_start_lr_scale of the warm arms (the design suggests 0.5)
    new_param_lr_scale: float = 1.0      # TrainConfig.new_param_lr_scale of the warm arms
    workers: int = 2                     # training processes at a time
    # evaluation
    curve_scenes: int = 64               # per milestone, guidance off
    final_scenes: int = 256
    sample_steps: int = 12
    text_scale: float = 3.0              # the guided protocol: nested, text 3, DINO 2 (README)
    dino_scale: float = 2.0
    patch_scales: tuple = (0.0, 1.0, 2.0, 4.0)   # separate patch guidance scales, on the best arm
    n_boot: int = 1000
    # notebooks 04 and 06
    routing_samples: int = 8
    routing_steps: int = 10
    demo_steps: int = 12
    demo_grid: int = 4
    # notebook 07 (the real-data path): without encoder folders it runs on plumbing stand-ins
    real_images: int = 64                # generated shapes-world images when no image folder is given
    real_image_size: int = 32            # square side the images are encoded at
    real_steps: int = 60                 # training steps of the real-data run

    def __post_init__(self):
        if not 0 < self.warm_from < self.steps:
            raise ValueError(f"warm_from must be in (0, steps={self.steps}), got {self.warm_from}")
        if self.warm_from % self.milestone_every or self.steps % self.milestone_every:
            raise ValueError("warm_from and steps must be multiples of milestone_every")
        if self.arms[0].name != "baseline":
            raise ValueError("the first arm must be the baseline (the warm arms start from it)")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")

    def model_config(self, arm: Arm | None = None) -> ModelConfig:
        return model_preset(self.preset, **{**self.model_overrides, **(arm.model if arm else {})})

    @property
    def guidance(self) -> Guidance:
        return Guidance("nested", text_scale=self.text_scale, dino_scale=self.dino_scale)


PROFILES: dict[str, Profile] = {}
# The experiment on 2 cores: a 3x3 DINO grid of 8 px patches over the 6x6 image tokens of 4 px, so a
# patch covers 2x2 tokens -- the ratio real DINOv3 has to the token grid (14x14 over 32x32).
PROFILES["cpu"] = Profile("cpu", model_overrides={"dino_grid": 3})
# Plumbing: every notebook end to end in a few minutes (the tests run it); numbers mean nothing.
PROFILES["smoke"] = replace(
    PROFILES["cpu"], name="smoke", n_data=160, val_fraction=0.2, steps=8, warm_from=4, milestone_every=4,
    batch_size=8, warmup=2, arms=HEADLINE_ARMS[:3] + HEADLINE_ARMS[4:], seeds=1, curve_scenes=8, final_scenes=16,
    sample_steps=2, patch_scales=(0.0, 2.0), n_boot=50, routing_samples=2, routing_steps=2, demo_steps=2, demo_grid=2,
    real_images=12, real_steps=2)
# The ceiling: the DINO grid equals the token grid (6x6 patches of 4 px), so a tied patch hands its
# token nearly its own pixels (the stand-in encoder maps a patch's pixels through a random MLP).
PROFILES["cpu-fine"] = replace(PROFILES["cpu"], name="cpu-fine", model_overrides={})
# The secondary ablations (positions none / learned, warm RoPE, no gate, no norm, tied only, CLS
# first) beside the headline arms.
PROFILES["cpu-long"] = replace(PROFILES["cpu"], name="cpu-long", arms=HEADLINE_ARMS + SECONDARY_ARMS)
# Production sizes of the shapes world (16x64x64 latents, 14x14 patches, T5 512x4096) on one
# H100/H200, each call under 10 minutes; plumbing-checked on a CPU with
# notebooks/profiles/gpu-plumbing-on-cpu.yaml. Not yet run on a GPU.
PROFILES["gpu"] = replace(
    PROFILES["cpu"], name="gpu", preset="production", model_overrides={}, world="standard", n_data=4000, steps=1200,
    warm_from=600, milestone_every=200, lr=3e-4, warmup=60, workers=1, seeds=1, curve_scenes=64, final_scenes=256)


def profile(name: str, **over) -> Profile:
    """``PROFILES[name]`` with every ``over`` value that is not None replaced."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    over = {k: v for k, v in over.items() if v is not None}
    if "arms" in over:   # names -> Arm objects (a notebook parameter is a list of names)
        known = {a.name: a for a in HEADLINE_ARMS + SECONDARY_ARMS}
        over["arms"] = tuple(a if isinstance(a, Arm) else known[a] for a in over["arms"])
    return replace(PROFILES[name], **over)


# --------------------------------------------------------------------------- data

def ensure_data(p: Profile, run_dir, seed: int = 0) -> Path:
    """The run's shapes-world shards (``RUN/data``), made when missing or made with other sizes."""
    d = Path(run_dir) / "data"
    want = {"preset": p.preset, "model_overrides": p.model_overrides, "world": p.world, "n": p.n_data,
            "seed": seed, "val_fraction": p.val_fraction}
    stamp = d / "made.json"
    if stamp.exists() and json.loads(stamp.read_text()) == want and any(d.glob("train-*.tar")):
        return d
    make_dataset(d, p.n_data, seed=seed, val_fraction=p.val_fraction, cfg=p.model_config(), rules=p.world)
    stamp.write_text(json.dumps(want))
    return d


# --------------------------------------------------------------------------- training

def arm_dir(run_dir, arm: Arm | str) -> Path:
    """Training folder of an arm: ``RUN/train/<arm.run>``."""
    return Path(run_dir) / "train" / (arm if isinstance(arm, str) else arm.run)


def runs(p: Profile) -> list[Arm]:
    """Every training run of the profile: each arm with seeds 0 .. ``p.seeds - 1``, seed-major."""
    return [replace(a, seed=s) for s in range(p.seeds) for a in p.arms]


def train_config(p: Profile, arm: Arm, run_dir, device: str = "auto") -> TrainConfig:
    """The arm's TrainConfig under the profile's schedule (module docstring)."""
    warm = arm.init == "warm"
    base = arm_dir(run_dir, replace(BASELINE, seed=arm.seed))
    return TrainConfig(
        preset=p.preset, model=p.model_config(arm), data=str(Path(run_dir) / "data"),
        out=str(arm_dir(run_dir, arm)),
        steps=p.steps - p.warm_from if warm else p.steps, batch_size=p.batch_size, lr=p.lr,
        warmup=p.warmup, schedule="constant", ema_decay=p.ema_decay, log_every=max(1, p.milestone_every // 10),
        ckpt_every=p.milestone_every, milestone_every=p.milestone_every, device=device, seed=arm.seed,
        warm_start=str(base / "ckpt" / f"step_{p.warm_from:06d}.pt") if warm else "",
        warm_start_lr_scale=p.warm_lr_scale if warm else 1.0,
        new_param_lr_scale=p.new_param_lr_scale if warm else 1.0, resume="auto", progress=False, tensorboard=True)


def _key(cfg: TrainConfig) -> dict:
    """What makes two trainings of an arm the same run, JSON-able (``asdict``: the ModelConfig nested);
    progress, resume, device and TensorBoard logging change no number, so they are left out."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("progress", "resume", "device", "tensorboard")}


def _status(run_dir, arm: Arm, total: int) -> str:
    recs = load_train_log(arm_dir(run_dir, arm)) if (arm_dir(run_dir, arm) / "log.jsonl").exists() else []
    if not recs:
        return f"{arm.run}: starting"
    r = recs[-1]
    return f"{arm.run}: step {r['step']}/{total} loss {r.get('loss_avg', r['loss']):.3f} {r.get('samples_per_s', 0):.0f} samples/s"


class Progress:
    """Progress lines for long work: printed (the notebook) and appended to ``RUN/progress.log``,
    which ``nbcore.runner`` echoes to its terminal while a notebook runs."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "progress.log"

    def __call__(self, line: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def train_arms(p: Profile, run_dir, device: str = "auto", arms=None, poll_s: float = 20.0, seed: int = 0) -> dict:
    """Train every run of the profile (``runs``: each arm with each seed) into ``RUN/train/``, on the
    run's data (``ensure_data``, world ``seed``); reuse finished runs with the same settings, resume
    unfinished ones. A warm run starts when its seed's baseline has finished. Returns {run name: summary}."""
    ensure_data(p, run_dir, seed)
    arms = list(arms or runs(p))
    say = Progress(run_dir)
    done: dict = {}

    def todo(arm: Arm):
        cfg = train_config(p, arm, run_dir, device)
        d = arm_dir(run_dir, arm)
        stamp = d / "arm.json"
        if stamp.exists():
            old = json.loads(stamp.read_text())
            if old["key"] == json.loads(json.dumps(_key(cfg))):
                if old.get("summary"):
                    done[arm.run] = {**old["summary"], "reused": True}
                    return None
                return cfg                            # same settings, unfinished: resume
            shutil.rmtree(d)                          # other settings: start clean
        d.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"key": _key(cfg), "arm": asdict(arm)}, indent=1))
        return cfg

    def finish(arm: Arm, summary: dict):
        stamp = arm_dir(run_dir, arm) / "arm.json"
        rec = json.loads(stamp.read_text())
        rec["summary"] = summary
        stamp.write_text(json.dumps(rec, indent=1))
        done[arm.run] = {**summary, "reused": False}
        loss = summary.get("final_loss")   # None when a resumed run had no step left to take
        say(f"{arm.run}: done, {summary['steps_this_run']} steps this run at {summary['steps_per_s'] or 0:.1f} "
            f"steps/s, final loss {'n/a' if loss is None else f'{loss:.4f}'}")

    def run_all(batch: list[Arm], after: dict[str, list[Arm]]):
        """Run ``batch``; when an arm in ``after`` finishes, its dependants are queued."""
        queue = list(batch)
        with _pool(p, device) as pool:
            running = {}
            while queue or running:
                while queue and len(running) < _workers(p, device):
                    arm = queue.pop(0)
                    cfg = todo(arm)
                    if cfg is None:
                        queue[:0] = after.pop(arm.run, [])
                        continue
                    say(f"{arm.run}: training {cfg.steps} steps ({arm.init})")
                    running[pool.submit(train, cfg)] = (arm, cfg.steps)
                fin, _ = wait(running, timeout=poll_s, return_when=FIRST_COMPLETED)
                for f in fin:
                    arm, _ = running.pop(f)
                    finish(arm, f.result())
                    queue[:0] = after.pop(arm.run, [])
                if not fin and running:
                    say(" | ".join(_status(run_dir, a, n) for a, n in running.values()))

    bases = [a for a in arms if a.name == BASELINE.name]
    scratch = [a for a in arms if a.init == "scratch" and a.name != BASELINE.name]
    after = {b.run: [a for a in arms if a.init == "warm" and a.seed == b.seed] for b in bases}
    run_all(bases + scratch, after)
    return done


def best_patch_arm(p: Profile, run_dir, arms=None, device: str = "cpu", context_only: bool = False) -> Arm | None:
    """The patch arm with the lowest reconstruction layout error (guidance off, ``curve_scenes``
    scenes) at its last step, among the seed-0 runs: the one probed by notebooks 05-06;
    ``context_only``: among arms whose patches reach the image only through the cross-attention
    (no tie), the arm whose routing notebook 04 measures."""
    scores = {}
    for arm in arms or p.arms:
        cfg = p.model_config(arm)
        if context_only and (not cfg.patch_context or cfg.patch_tie):
            continue
        if arm.is_patch and arm.seed == 0:
            ms = milestones(p, run_dir, arm, device)
            if ms:
                scores[arm.name] = (ms[-1]["recon"]["layout_error"]["mean"], arm)
    if not scores:
        return None
    return min(scores.values(), key=lambda x: x[0])[1]


# --------------------------------------------------------------------------- evaluation

def checkpoints(run_dir, arm: Arm) -> list[tuple[int, Path]]:
    """(total step, path) of an arm's milestones, on the shared axis (a warm arm's steps are offset
    by the step it started from)."""
    d = arm_dir(run_dir, arm)
    offset = 0
    stamp = d / "arm.json"
    if stamp.exists():
        key = json.loads(stamp.read_text())["key"]
        if key.get("warm_start"):
            offset = int(Path(key["warm_start"]).stem.split("_")[1])
    return sorted((int(q.stem.split("_")[1]) + offset, q) for q in (d / "ckpt").glob("step_*.pt"))


class Evaluator:
    """Samples and scores images for one validation batch with one shared noise draw."""

    def __init__(self, p: Profile, run_dir, n: int, device: str = "cpu"):
        self.p, self.device = p, device
        self.batch = load_val_batch(Path(run_dir) / "data", n)
        self.n = len(self.batch["txt"])
        self.scenes = [Scene.from_json(m) for m in self.batch["json"]]
        cfg = p.model_config()
        self.world = ShapesWorld(cfg, rules=p.world)                                    # scenes of the layout-blind row
        self.codec = codec_from_stats(Path(run_dir) / "data" / "stats.json")            # the data's own codec
        self.noise = torch.randn(self.batch["latent"].shape, generator=torch.Generator().manual_seed(0))
        self.source = self.batch["png"]
        self.perm = torch.roll(torch.arange(self.n), -1)                               # DINO of scene i + 1
        self.run_dir = Path(run_dir)
        self.pair = _same_count_partner(self.scenes)                                   # DINO of scene j(i)
        self.hybrid = [Scene([Shape(a.kind, a.colour, b.cx, b.cy, a.size, a.r)
                              for a, b in zip(self.scenes[i].shapes, self.scenes[j].shapes)])
                       for i, j in enumerate(self.pair.tolist())]                      # i's shapes at j's places
        self._unplaced = None

    def unplaced_text(self) -> dict:
        """text_emb, text_mask of every scene's caption without places, encoded and normalised as
        the data's captions are (the data's own text encoder)."""
        if self._unplaced is None:
            enc = data_encoders(self.run_dir / "data" / "stats.json", self.p.model_config())
            cond = enc.condition(self.source, [s.caption(places=False) for s in self.scenes])
            self._unplaced = {"text_emb": cond["text_emb"], "text_mask": cond["text_mask"]}
        return self._unplaced

    def generate(self, model: NanoDiT, mode: str, guidance: Guidance) -> torch.Tensor:
        """Images (n, 3, S, S) for ``mode`` recon | textonly | dinoonly | swap | swap_unplaced."""
        b = self.batch
        cond = {} if mode == "dinoonly" else dict(text_emb=b["text_emb"], text_mask=b["text_mask"])
        if mode == "swap_unplaced":
            cond = dict(self.unplaced_text())
        if mode in ("recon", "swap", "dinoonly", "swap_unplaced"):
            idx = {"swap": self.perm, "swap_unplaced": self.pair}.get(mode, torch.arange(self.n))
            cond.update(dino_emb=b["dino_emb"][idx],
                        dino_patches=b["dino_patches"][idx] if model.cfg.use_dino_patches else None)
        z = sample(model, noise=self.noise, steps=self.p.sample_steps, guidance=guidance, device=self.device,
                   **{k: (v.to(self.device) if v is not None else None) for k, v in cond.items()})
        return self.codec.decode(z.cpu())

    def score(self, images: torch.Tensor, scenes=None) -> dict:
        """Per-scene tensors (n,) of the layout metrics and PSNR against the source, with validity."""
        r = shape_layout_per_sample(images, scenes or self.scenes)
        out = {k: (r[k].float().numpy(), r["valid"][k].numpy()) for k in LAYOUT_METRICS}
        out["psnr"] = (psnr(images, self.source).numpy(), np.ones(self.n, bool))
        return out

    def score_modes(self, model: NanoDiT, guidance: Guidance, swap: bool = True) -> dict:
        """{mode: scores} for recon, textonly, dinoonly, and (``swap``) the swap scored against the
        DINO source's scene (``swap_dino``: low = the layout follows the DINO) and against the
        text's (``swap_text``)."""
        out = {m: self.score(self.generate(model, m, guidance)) for m in ("recon", "textonly", "dinoonly")}
        if not swap:
            return out
        swap = self.generate(model, "swap", guidance)
        out["swap_dino"] = self.score(swap, [self.scenes[i] for i in self.perm.tolist()])
        out["swap_text"] = self.score(swap)
        unplaced = self.generate(model, "swap_unplaced", guidance)
        out["swap_unplaced"] = self.score(unplaced, self.hybrid)
        out["swap_unplaced_dino"] = self.score(unplaced, [self.scenes[j] for j in self.pair.tolist()])
        return out

    def rows(self) -> dict:
        """The calibration rows' scores {row: {mode: scores}} (the same for guidance off and on):
        the same images for every mode scored against the mode's target scenes; the unplaced swap's
        layout-blind and oracle rows are the hybrid scenes drawn at shuffled and at their own places."""
        cfg = self.p.model_config()
        torch.manual_seed(0)
        untrained = NanoDiT(replace(cfg, use_dino_patches=False)).eval()
        rng = np.random.default_rng(0)
        margin = self.world.rules.margin
        blind = self.world.render_batch([shuffle_layout(s, rng, margin=margin) for s in self.scenes])
        hybrid_blind = self.world.render_batch([shuffle_layout(s, rng, margin=margin) for s in self.hybrid])
        codec = lambda x: self.codec.decode(self.codec.encode(x))
        untrained_images = self.generate(untrained, "textonly", Guidance.off())
        images = {"untrained": (untrained_images, untrained_images), "layout_blind": (codec(blind), codec(hybrid_blind)),
                  "oracle": (codec(self.source), codec(self.world.render_batch(self.hybrid)))}
        out = {}
        for row, (own, hyb) in images.items():
            same = self.score(own)
            out[row] = {m: same for m in MODES}
            out[row]["swap_unplaced"] = self.score(hyb, self.hybrid)
        return out


def _same_count_partner(scenes: list[Scene]) -> torch.Tensor:
    """(n,) for each scene i the next scene j != i (cyclically) with as many shapes, else i + 1."""
    n = len(scenes)
    out = []
    for i in range(n):
        js = [(i + k) % n for k in range(1, n)]
        out.append(next((j for j in js if len(scenes[j].shapes) == len(scenes[i].shapes)), (i + 1) % n))
    return torch.tensor(out)


def _summary(scores: dict, n_boot: int) -> dict:
    return {k: bootstrap_ci(v, valid, n_boot=n_boot) for k, (v, valid) in scores.items()}


def milestones(p: Profile, run_dir, arm: Arm, device: str = "cpu") -> list[dict]:
    """Reconstruction and text-only layout metrics (guidance off, ``curve_scenes`` scenes, EMA
    weights) at every milestone of an arm, cached in ``RUN/train/<arm>/curve.json``."""
    d = arm_dir(run_dir, arm)
    cache = d / "curve.json"
    ck = checkpoints(run_dir, arm)
    old = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{p.curve_scenes}:{p.sample_steps}"
    rows = old.get(key, {})
    ev, new = None, []
    for step, path in ck:
        if str(step) in rows:
            continue
        ev = ev or Evaluator(p, run_dir, p.curve_scenes, device)
        model, info = load_model_with_info(path, device=device)
        rec = {"step": step, "weights": info["weights"]}
        for mode in ("recon", "textonly") if arm.is_patch else ("textonly",):
            rec[mode] = _summary(ev.score(ev.generate(model, mode, Guidance.off())), p.n_boot)
        if not arm.is_patch:            # the baseline's recon sees text + CLS only: report it too
            rec["recon"] = _summary(ev.score(ev.generate(model, "recon", Guidance.off())), p.n_boot)
        rows[str(step)] = rec
        new.append(rec)
    if ev is not None:
        old[key] = rows
        write_json(old, cache)
        _milestones_to_tensorboard(d, new)
    return [rows[str(s)] for s, _ in ck if str(s) in rows]


def _milestones_to_tensorboard(d: Path, recs: list[dict]) -> None:
    """Milestone scores (means, guidance off) as ``milestones/<mode>_<metric>`` scalars in the arm's
    TensorBoard folder, beside its training scalars, when the arm was trained with tracking on."""
    if not (d / TB_DIR).is_dir():
        return
    tracker = RunTracker(d)
    for rec in recs:
        tracker.add_metrics(rec["step"], {f"{mode}_{m}": c["mean"] for mode in ("recon", "textonly")
                                          for m, c in rec[mode].items() if c.get("mean") is not None},
                            prefix="milestones")
    tracker.close()


def plateau(res: dict, run: str) -> dict:
    """The plateau test of one run from ``evaluate``'s result: the paired 95% interval of (last
    milestone - the one before) reconstruction layout error, guidance off, ``final_scenes`` scenes.
    ``still_improving`` when the interval lies wholly below 0: the run's number is then a floor."""
    d = res.get("plateau", {}).get(run)
    if d is None:
        return {"plateau": False, "still_improving": None, "why": "fewer than two milestones"}
    c = d["layout_error"]
    return {"plateau": not c["hi"] < 0, "still_improving": c["hi"] < 0, "steps": d["steps"], "diff": c}


def _workers(p: Profile, device: str) -> int:
    """Processes at a time: ``p.workers`` on a CPU (one thread each), one on a GPU."""
    return max(1, p.workers if str(device) == "cpu" or not torch.cuda.is_available() else 1)


def _pool(p: Profile, device: str):
    """Worker processes for independent jobs (training arms, scoring arms): ``_workers`` spawned
    one-thread processes that end when their parent dies (``pool_worker_init``)."""
    return ProcessPoolExecutor(_workers(p, device), mp_context=mp.get_context("spawn"),
                               initializer=pool_worker_init, initargs=(1,))


def _score_arm(p: Profile, run_dir, arm: Arm, device: str) -> dict:
    """Per-scene scores of an arm's last checkpoint: guidance off (recon, text-only, DINO-only) and on
    (the same and the swap), and the milestone before it (recon, guidance off: the plateau test), on
    ``final_scenes`` scenes (a worker-process job of ``evaluate``)."""
    ev = Evaluator(p, run_dir, p.final_scenes, device)
    ck = checkpoints(run_dir, arm)
    model, info = load_model_with_info(ck[-1][1], device=device)
    out = {"off": ev.score_modes(model, Guidance.off(), swap=False), "on": ev.score_modes(model, p.guidance),
           "weights": info["weights"], "steps": [s for s, _ in ck[-2:]]}
    if len(ck) > 1:
        before, _ = load_model_with_info(ck[-2][1], device=device)
        out["before"] = ev.score(ev.generate(before, "recon", Guidance.off()))
    return out


def _score_rows(p: Profile, run_dir, device: str) -> dict:
    return Evaluator(p, run_dir, p.final_scenes, device).rows()


def evaluate(p: Profile, run_dir, arms: list[Arm], device: str = "cpu") -> dict:
    """Final evaluation (module docstring), arms scored in parallel worker processes, cached in
    ``RUN/eval.json``. Returns {"rows": {row: {"off" | "on": {mode: {metric: ci}}}}, "diffs":
    {arm: paired (arm - baseline) intervals}, "weights": {arm: which weights}, "settings"}. The
    unguided swap is not sampled (the swap is a guided probe): its row entries are None."""
    cache = Path(run_dir) / "eval.json"
    settings = {"format": 4, "n": p.final_scenes, "steps": p.sample_steps, "guidance": [p.text_scale, p.dino_scale],
                "arms": [a.run for a in arms], "ckpts": {a.run: str(checkpoints(run_dir, a)[-1][1]) for a in arms}}
    if cache.exists():
        old = json.loads(cache.read_text())
        if old.get("settings") == settings:
            return old
    say = Progress(run_dir)
    say(f"evaluating {len(arms)} arms and the calibration rows on {p.final_scenes} scenes")
    t0 = time.time()
    with _pool(p, device) as pool:
        rows_job = pool.submit(_score_rows, p, run_dir, device)
        jobs = {a.run: pool.submit(_score_arm, p, run_dir, a, device) for a in arms}
        # a calibration row is the same for both guidance settings
        per_scene: dict = {row: {g: sc for g in ("off", "on")} for row, sc in rows_job.result().items()}
        for run, job in jobs.items():
            per_scene[run] = job.result()
            say(f"evaluated {run} ({time.time() - t0:.0f} s)")
    res = {"settings": settings, "rows": {}, "diffs": {}, "weights": {}}
    for row, sc in per_scene.items():
        res["rows"][row] = {g: {m: _summary(sc[g][m], p.n_boot) if m in sc[g] else None for m in MODES}
                            for g in ("off", "on")}
        res["weights"][row] = sc.get("weights", "n/a")
    paired = lambda a, b, k: paired_bootstrap_diff(a[k][0], b[k][0], a[k][1], b[k][1], n_boot=p.n_boot)
    res["plateau"] = {}
    for arm in arms:
        sc = per_scene[arm.run]
        if "before" in sc:   # last milestone - the one before, same scenes and noise
            res["plateau"][arm.run] = {"steps": sc["steps"], "layout_error": paired(sc["off"]["recon"], sc["before"],
                                                                                    "layout_error")}
        base = per_scene.get(replace(BASELINE, seed=arm.seed).run)
        if arm.name == BASELINE.name or base is None:
            continue
        res["diffs"][arm.run] = {g: {m: {k: paired(sc[g][m], base[g][m], k) for k in LAYOUT_METRICS}
                                     for m in ("recon", "textonly", "dinoonly")} for g in ("off", "on")}
    write_json(res, cache)
    return res


def results_table(res: dict, metric: str = "layout_error") -> list[dict]:
    """One row per calibration row / run: mean [95% interval] of ``metric`` for recon, text-only and DINO-only,
    guidance off and on (strings), for figures and the README."""
    out = []
    for row, r in res["rows"].items():
        rec = {"row": row}
        for m in ("recon", "textonly", "dinoonly"):
            for g in ("off", "on"):
                c = r[g][m][metric]
                rec[f"{m} {g}"] = "n/a" if c["mean"] is None else f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"
        out.append(rec)
    return out


def curves(p: Profile, run_dir, arms, device: str = "cpu") -> dict:
    """{arm run: milestone records} for every arm (``milestones``, arms in parallel worker processes)."""
    with _pool(p, device) as pool:
        jobs = {a.run: pool.submit(milestones, p, run_dir, a, device) for a in arms}
        return {run: job.result() for run, job in jobs.items()}


def loss_curves(p: Profile, run_dir, arms) -> dict:
    """{arm run: training log records} with ``step`` on the shared axis of total optimiser steps."""
    out = {}
    for arm in arms:
        offset = p.warm_from if arm.init == "warm" else 0
        out[arm.run] = [dict(r, step=r["step"] + offset) for r in load_train_log(arm_dir(run_dir, arm))]
    return out


def patch_scale_sweep(p: Profile, run_dir, arm: Arm, device: str = "cpu") -> list[dict]:
    """Does a separate patch guidance scale help? On one arm: reconstruction layout metrics with nested guidance at the
    profile's text / DINO scales and each separate patch scale of ``p.patch_scales``
    (``Guidance.patch_scale``; its caveat: the CLS-without-patches branch is a combination the
    default dropout never trains). ``final_scenes`` scenes, cached in ``RUN/sweep.json``."""
    cache = Path(run_dir) / "sweep.json"
    key = {"arm": arm.run, "scales": list(p.patch_scales), "n": p.final_scenes, "steps": p.sample_steps,
           "guidance": [p.text_scale, p.dino_scale]}
    if cache.exists():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old["rows"]
    ev = Evaluator(p, run_dir, p.final_scenes, device)
    model, _ = load_model_with_info(checkpoints(run_dir, arm)[-1][1], device=device)
    rows = []
    for s in p.patch_scales:
        g = Guidance("nested", text_scale=p.text_scale, dino_scale=p.dino_scale, patch_scale=float(s))
        rows.append({"patch_scale": float(s), **_summary(ev.score(ev.generate(model, "recon", g)), p.n_boot)})
    write_json({"key": key, "rows": rows}, cache)
    return rows


def _ci(c: dict) -> str:
    return f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def _verdict(c: dict) -> str:
    return "lower" if c["hi"] < 0 else "higher" if c["lo"] > 0 else "spans 0"


def _d(c: dict) -> str:
    return f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"


def seed_groups(res: dict) -> dict[str, list[str]]:
    """{arm name: [run of seed 0, seed 1, ...]} in the order of ``evaluate``'s settings."""
    out: dict[str, list[str]] = {}
    for run in res["settings"]["arms"]:
        out.setdefault(run.split("-seed")[0], []).append(run)
    return out


def conclusions(res: dict, baseline: str = "baseline", metric: str = "layout_error", ratio: float = 0.6) -> list[str]:
    """Sentences the numbers support, and only those (``evaluate``'s result in, plain text out).

    First the validity gate: every seed of the baseline must learn text layout, its text-only
    ``metric`` (guidance on) at most ``ratio`` x the layout-blind row's; otherwise the answer is "not
    yet answered" and nothing is said about the arms. Then, per patch arm, guidance setting and mode,
    the paired 95% interval of (arm - baseline) of each seed against the same seed's baseline: an
    effect is stated ("lower" / "higher") only when every seed's interval excludes 0 on the same side;
    otherwise "not established" with each seed's interval. Runs the plateau test finds still improving
    are named: their numbers are floors."""
    rows, diffs = res["rows"], res["diffs"]
    groups = seed_groups(res)
    blind = rows["layout_blind"]["on"]["recon"][metric]["mean"]
    out = []
    bases = [rows[r]["on"]["textonly"][metric] for r in groups.get(baseline, [])]
    if not bases or any(b["mean"] is None or b["hi"] > ratio * blind for b in bases):
        shown = ", ".join(_ci(b) for b in bases if b["mean"] is not None) or "n/a"
        out.append(f"Not yet answered: the baseline has not clearly learned text layout in every seed (text-only "
                   f"{metric} {shown} vs {ratio} x the layout-blind row's {blind:.3f} = {ratio * blind:.3f}); the "
                   f"world or the schedule must change before the arms can be compared.")
        return out
    out.append(f"The baseline learned text layout in every seed: text-only {metric} (guided) "
               f"{', '.join(_ci(b) for b in bases)}, below {ratio} x the layout-blind row ({ratio * blind:.3f}); "
               f"oracle {rows['oracle']['on']['recon'][metric]['mean']:.3f}, untrained "
               f"{rows['untrained']['on']['recon'][metric]['mean']:.3f}.")
    what = {"recon": "reconstruction", "textonly": "text only", "dinoonly": "DINO only"}
    for arm, seeds in groups.items():
        if arm == baseline or not all(r in diffs for r in seeds):
            continue
        parts = []
        for mode in ("recon", "textonly", "dinoonly"):
            for g in ("on", "off"):
                cs = [diffs[r][g][mode][metric] for r in seeds]
                v = {_verdict(c) for c in cs}
                verdict = (f"{v.pop()} in every seed" if len(v) == 1 and "spans 0" not in v
                           else "not established")
                parts.append(f"{what[mode]}, guidance {g}: {verdict} ({'; '.join(_d(c) for c in cs)})")
        out.append(f"{arm} - {baseline} ({metric}, paired, {len(seeds)} seed{'s' * (len(seeds) > 1)}): "
                   + "; ".join(parts) + ".")
    hyb_blind = rows["layout_blind"]["on"].get("swap_unplaced")
    if hyb_blind is not None:
        follow, partly = [], []
        for arm, seeds in groups.items():
            cs = [rows[r]["on"]["swap_unplaced"][metric] for r in seeds]
            if all(c["hi"] < hyb_blind[metric]["mean"] for c in cs):
                follow.append(f"{arm} ({', '.join(_ci(c) for c in cs)})")
            elif any(c["hi"] < hyb_blind[metric]["mean"] for c in cs):
                partly.append(arm)
        out.append("Unplaced swap (caption without places + another scene's DINO), below the layout-blind row's "
                   f"{hyb_blind[metric]['mean']:.3f} in every seed -- the layout follows the DINO and the content the "
                   f"text: {'; '.join(follow) if follow else 'no arm'}"
                   + (f"; in some seeds only: {', '.join(partly)}" if partly else "") + ".")
    floors = [run for run in res.get("plateau", {}) if plateau(res, run)["still_improving"]]
    if floors:
        out.append("Still improving at the last milestone (paired interval of the last step's change below 0), "
                   f"so their numbers are floors on what they reach: {', '.join(floors)}.")
    elif res.get("plateau"):
        out.append("Every run passes the plateau test (no paired improvement between its last two milestones).")
    return out


# --------------------------------------------------------------------------- pictures

def pictures(p: Profile, run_dir, arms: list[Arm], n: int = 8, device: str = "cpu", mode: str = "recon") -> dict:
    """What each arm draws: the first ``n`` validation scenes, one shared noise draw, guidance on,
    ``mode`` (recon | textonly | dinoonly) at each run's last milestone. Returns {"source" (n, 3, S, S),
    "captions", "rows": {run: images (n, 3, S, S)}}."""
    ev = Evaluator(p, run_dir, n, device)
    rows = {}
    for arm in arms:
        model, _ = load_model_with_info(checkpoints(run_dir, arm)[-1][1], device=device)
        rows[arm.run] = ev.generate(model, mode, p.guidance)
    return {"source": ev.source, "captions": list(ev.batch["txt"]), "rows": rows}


def pictures_over_training(p: Profile, run_dir, arm: Arm, n: int = 8, device: str = "cpu") -> dict:
    """The same scenes and noise as ``pictures`` at every milestone of one run (guidance on, recon):
    {"source", "captions", "rows": {"step S": images}} on the shared axis of total optimiser steps."""
    ev = Evaluator(p, run_dir, n, device)
    rows = {}
    for step, path in checkpoints(run_dir, arm):
        model, _ = load_model_with_info(path, device=device)
        rows[f"step {step}"] = ev.generate(model, "recon", p.guidance)
    return {"source": ev.source, "captions": list(ev.batch["txt"]), "rows": rows}


def worst_scenes(p: Profile, run_dir, arm: Arm, k: int = 8, device: str = "cpu") -> dict:
    """The ``k`` scenes of ``final_scenes`` where ``arm`` (last milestone, recon, guidance on) has
    its highest layout error, beside their sources: {"source", "captions", "rows": {run: images},
    "errors": [...]} (highest first)."""
    ev = Evaluator(p, run_dir, p.final_scenes, device)
    model, _ = load_model_with_info(checkpoints(run_dir, arm)[-1][1], device=device)
    images = ev.generate(model, "recon", p.guidance)
    err, valid = ev.score(images)["layout_error"]
    err = np.where(valid, err, -np.inf)
    idx = np.argsort(-err, kind="stable")[:k]
    return {"source": ev.source[idx], "captions": [f"{ev.batch['txt'][i]} (error {err[i]:.2f})" for i in idx],
            "rows": {arm.run: images[idx]}, "errors": err[idx].tolist()}
