"""Metrics for the validation suite: pixel (PSNR, LPIPS), layout on the shapes world (shapes found as
connected components: recall, placement, size, mask IoU; and the older colour-mask centroids),
bootstrap confidence intervals, constructed calibration images, DINO-swap following, and a layout
score in the DINO encoder's space that needs no scene metadata (real data too).

Shape legend: B images, S image side, P patches, Dd encoder dim. Images are (B, 3, S, S) float in [0, 1].

Documented conventions
- PSNR is capped at ``PSNR_CAP_DB`` = 100 dB: an image compared with itself (MSE = 0) returns the
  cap, never inf, so means over a batch stay finite.
- Layout: centroids are in normalised image coordinates ((x + 0.5) / S, (y + 0.5) / S) in [0, 1], so
  distances are fractions of the image side. Shapes of one scene that share a colour are measured as
  one colour mask (the mask cannot tell them apart). A colour is *present* in an image when its mask
  has at least ``min_pixels`` pixels. A colour present in the source but absent from the generated
  image gets the maximum penalty: distance ``MAX_CENTROID_DIST`` = sqrt(2) (the image diagonal, the
  largest possible distance) and IoU 0. A colour absent from the source itself (e.g. fully occluded)
  is skipped and counted. Nothing returns NaN.
- Shape layout (``shape_layout``; the colour-centroid ``layout_error`` above is the older metric,
  kept for existing callers). It scores each *captioned shape* of a scene (its pixels as drawn, in
  painter's order) against the generated image:
  * candidates: the connected components (4-connectivity by default) of each palette colour's mask
    (``shapes.colour_mask``) in the generated image. A component can stand for a shape only if its
    area is at least ``MIN_AREA_FRACTION`` = 0.3 of that shape's true pixel area: a blob a third the
    size is still a (badly sized) shape, specks are not. At 32 px a small triangle covers about
    20 px, so the bar is about 6 px; a 2x2 speck (4 px) never passes.
  * matching: shapes and candidates of the same colour are matched one to one, greedily by
    centre distance (smallest first). Where greedy leaves a shape unmatched that had a candidate
    (another shape took it, e.g. a small shape took the only blob big enough for a large one), that
    sample is matched exactly: most matches first, then the smallest total distance. Distances are
    between pixel centroids, in fractions of the image side.
  * ``shape_recall``: matched shapes / captioned shapes. ``placement_error``: mean centre distance of
    the matched shapes (undefined without a match). ``size_error``: mean |log(component area / true
    area)| of the matched shapes. ``extra_shapes``: candidate components of any palette colour (as
    large as ``MIN_AREA_FRACTION`` of the scene's smallest shape) left unmatched.
  * ``mask_iou``: per colour of the scene, the IoU of the generated image's whole colour mask
    (specks included) with the ground-truth mask of that colour (the scene drawn at the generated
    image's size); the sample's value is the mean over its colours.
  * ``layout_error`` (the headline): the mean over captioned shapes of min(centre distance,
    ``MISS_PENALTY``) for a matched shape and ``MISS_PENALTY`` for a missed one. ``MISS_PENALTY`` =
    (2 + sqrt 2 + 5 ln(1 + sqrt 2)) / 15 = 0.5214, the expected distance between two independent
    uniform points of the unit square: a missing shape costs what a shape dropped at a random place
    costs, and the cap makes dropping a shape never cheaper than drawing it, however far off. So a
    compact shape at the right place scores 0, shifted shapes their shift, the right shapes at
    random places (the world's own placement rule, which keeps shapes away from the border) about
    0.35, and specks or an empty image 0.52.
  * Per-sample values are means over the sample's shapes (or colours); summaries are means over the
    samples where a metric is defined (``valid``), which is what ``bootstrap_ci`` resamples. A
    captioned shape with no visible pixel in its own scene is skipped and counted. Nothing is NaN.
- DINO-space layout (``layout_corr``, any data): generated and source images are re-encoded by the
  encoder the data was made with (the real DINOv3, or the shapes world's stand-in patch encoder),
  features normalised with the data's stats (``dino_features``), and their patch maps compared
  position by position as a correlation: each map centred on its own mean patch, then the cosine of
  the two centred maps (all P x Dd values). 1 = the same map, 0 = a featureless image. Why not the
  mean over patches of the per-patch cosine: background patches dominate it, so an empty
  shapes-world image scored 0.72 there, above the right shapes in the wrong places (0.49); centring
  takes out what every position shares and puts both at about 0. Calibration
  (``layout_corr_calibration``), computed from the sources alone: the map against itself rolled by
  half the grid ("right content, wrong places") and against another image of the data. On the tiny
  shapes world (64 px, 8 x 8 stand-in grid, 16 val scenes): rolled -0.06, other image -0.02, an
  empty image 0.00, the source shifted by 2 / 4 / 8 / 16 px 0.63 / 0.41 / 0.11 / -0.04.
- Confidence intervals: ``bootstrap_ci`` (percentile bootstrap of the mean over samples) and
  ``paired_bootstrap_diff`` (two arms on the same scenes, scene indices resampled jointly).
- LPIPS uses the ``lpips`` package with the AlexNet trunk. The trunk's ImageNet weights
  (``alexnet-owt-7be5be79.pth``) are never downloaded here: they are looked up in an explicit path,
  ``$NBCORE_ALEXNET_WEIGHTS``, or the torch hub cache ``$TORCH_HOME/hub/checkpoints/`` (default
  ``~/.cache/torch/hub/checkpoints/``). Without them the metric reports
  ``LPIPS unavailable: <reason>; <how to provide the weights>`` and every other metric goes on.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .shapes import (COLOURS, Scene, colour_mask, render, shape_mask, shift_extent, shift_scene,
                     shuffle_layout)

__all__ = ["PSNR_CAP_DB", "MAX_CENTROID_DIST", "ALEXNET_FILE", "MIN_AREA_FRACTION", "MISS_PENALTY",
           "SHAPE_LAYOUT_METRICS", "CONSTRUCTED_ROWS", "psnr", "LPIPSMetric", "layout_error",
           "layout_per_sample", "swap_follow", "dino_features", "layout_corr", "roll_patch_grid",
           "layout_corr_calibration", "dino_similarity", "present_colours",
           "connected_components", "component_stats", "shape_layout", "shape_layout_per_sample",
           "bootstrap_ci", "paired_bootstrap_diff", "constructed_scenes", "constructed_rows", "speck_image"]

PSNR_CAP_DB = 100.0
MAX_CENTROID_DIST = math.sqrt(2.0)
MIN_AREA_FRACTION = 0.3
# expected distance between two independent uniform points in the unit square (see the docstring)
MISS_PENALTY = (2 + math.sqrt(2) + 5 * math.log(1 + math.sqrt(2))) / 15
COLOUR_NAMES = tuple(COLOURS)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"

MaskFn = Callable[[torch.Tensor, str], torch.Tensor]    # (B, 3, S, S), colour -> (B, S, S) bool


def _check_images(*imgs: torch.Tensor) -> None:
    for x in imgs:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(x.shape)}")
    if len({tuple(x.shape) for x in imgs}) != 1:
        raise ValueError(f"image batches differ in shape: {[tuple(x.shape) for x in imgs]}")


# --------------------------------------------------------------------------- PSNR

def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, cap: float = PSNR_CAP_DB) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, capped at ``cap`` (identical images -> cap).

    a, b (B, 3, S, S) in [0, max_val] -> (B,) float32.
    """
    _check_images(a, b)
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)                           # (B,)
    # mse = 0 gives +inf in log space; the clamp turns it (and anything above the cap) into the cap
    val = 10.0 * torch.log10(max_val ** 2 / mse.clamp_min(1e-30))
    return val.clamp(max=cap)


# --------------------------------------------------------------------------- LPIPS

def _alexnet_candidates(weights: str | os.PathLike | None) -> list[Path]:
    if weights is not None:
        return [Path(weights)]
    out = []
    if os.environ.get("NBCORE_ALEXNET_WEIGHTS"):
        out.append(Path(os.environ["NBCORE_ALEXNET_WEIGHTS"]))
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE)
    return out


class LPIPSMetric:
    """LPIPS (AlexNet trunk, v0.1 linear heads shipped inside the ``lpips`` package).

    ``LPIPSMetric(weights=None, device="cpu")``: finds the AlexNet ImageNet weights locally (see the
    module docstring) and never downloads. ``.available`` says whether distances can be computed;
    ``.status`` is ``"ok: ..."``, ``"LPIPS unavailable: <reason>; <how to provide the weights>"``, or
    for ``random_backbone=True`` a plumbing-test label (random trunk: exercises the code path, the
    numbers are not a perceptual score). Call ``metric(a, b)`` with (B, 3, S, S) in [0, 1] -> (B,).
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 random_backbone: bool = False):
        self.net = None
        self.available = False
        self.plumbing_only = random_backbone
        try:
            import lpips  # noqa: F401
        except Exception as e:  # the package is a declared dependency; report instead of crashing
            self.status = f"LPIPS unavailable: cannot import lpips ({type(e).__name__}: {e}); install the 'lpips' package"
            return
        if random_backbone:
            self.net = self._build(None, device)
            self.available = True
            self.status = "plumbing test: random AlexNet trunk (pnet_rand=True), numbers are not an LPIPS score"
            return
        candidates = _alexnet_candidates(weights)
        found = next((p for p in candidates if p.is_file()), None)
        how = (f"put {ALEXNET_FILE} (torchvision's AlexNet ImageNet weights) in "
               f"{Path(torch.hub.get_dir()) / 'checkpoints'} ($TORCH_HOME/hub/checkpoints/), "
               f"or set NBCORE_ALEXNET_WEIGHTS / pass --lpips-weights PATH")
        if found is None:
            self.status = (f"LPIPS unavailable: AlexNet backbone weights not found locally "
                           f"(looked in {', '.join(map(str, candidates))}) and this machine cannot download them; {how}")
            return
        try:
            self.net = self._build(found, device)
        except Exception as e:
            self.status = f"LPIPS unavailable: could not load {found} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {how}"
            self.net = None
            return
        self.available = True
        self.status = f"ok: AlexNet trunk from {found}"

    @staticmethod
    def _build(alexnet_path: Path | None, device):
        import lpips  # optional heavy package: only when LPIPS is asked for
        with warnings.catch_warnings():
            # lpips passes torchvision's deprecated `pretrained=` argument; harmless, silenced
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: lpips builds the trunk without touching the network; the linear heads
            # (pretrained=True) come from the weights shipped inside the lpips package.
            net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        if alexnet_path is not None:
            sd = torch.load(alexnet_path, map_location="cpu", weights_only=True)
            # lpips' trunk slices keep torchvision's layer indices: net.sliceK.<i>.* = features.<i>.*
            own = net.net.state_dict()
            mapped = {}
            for name in own:
                _, idx, leaf = name.split(".", 2)                                     # sliceK, i, weight|bias
                key = f"features.{idx}.{leaf}"
                if key not in sd:
                    raise KeyError(f"{key} missing: not torchvision AlexNet weights")
                mapped[name] = sd[key]
            net.net.load_state_dict(mapped, strict=True)
        for p in net.parameters():
            p.requires_grad_(False)
        return net.eval().to(device)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.available:
            raise RuntimeError(self.status)
        _check_images(a, b)
        dev = next(self.net.parameters()).device
        d = self.net(a.float().to(dev), b.float().to(dev), normalize=True)            # (B, 1, 1, 1)
        return d.flatten().cpu()                                                       # (B,)


# --------------------------------------------------------------------------- layout

def _default_mask_fn() -> MaskFn:
    return colour_mask


def _centroids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, S, S) bool -> (centroid (B, 2) as (x, y) in [0, 1], pixel count (B,))."""
    B, S, _ = mask.shape
    m = mask.float()
    n = m.flatten(1).sum(1)                                                            # (B,)
    coords = (torch.arange(S, dtype=torch.float32, device=mask.device) + 0.5) / S      # (S,)
    cx = (m.sum(1) * coords).sum(1) / n.clamp_min(1)                                   # (B,) columns -> x
    cy = (m.sum(2) * coords).sum(1) / n.clamp_min(1)                                   # (B,) rows -> y
    return torch.stack([cx, cy], 1), n


def layout_per_sample(generated: torch.Tensor, source: torch.Tensor, colours: Sequence[Sequence[str]],
                      mask_fn: MaskFn | None = None, min_pixels: int = 4) -> dict:
    """Per-sample layout error of ``generated`` against ``source`` for each sample's scene colours.

    generated, source (B, 3, S, S) in [0, 1]; colours: per sample, the colour names of its scene's
    shapes (duplicates count once). Returns tensors (B,): ``centroid_error`` (mean over the sample's
    evaluated colours of the normalised centroid distance), ``iou`` (mean colour-mask IoU), ``valid``
    (bool: at least one colour evaluated; invalid samples hold 0, not NaN), and int counts
    ``evaluated``, ``absent_in_generated`` (max penalty applied), ``absent_in_source`` (skipped).
    """
    _check_images(generated, source)
    if len(colours) != generated.shape[0]:
        raise ValueError(f"{len(colours)} colour lists for {generated.shape[0]} images")
    mask_fn = mask_fn or _default_mask_fn()
    B = generated.shape[0]
    err_sum, iou_sum, cnt = torch.zeros(B), torch.zeros(B), torch.zeros(B)
    absent_gen = absent_src = 0
    for name in sorted({c for cs in colours for c in cs}):
        rows = torch.tensor([name in cs for cs in colours])                            # (B,) samples with this colour
        mg, ms = mask_fn(generated, name).cpu().bool(), mask_fn(source, name).cpu().bool()  # (B, S, S)
        cg, ng = _centroids(mg)
        cs_, ns = _centroids(ms)
        in_src = rows & (ns >= min_pixels)
        in_gen = ng >= min_pixels
        dist = torch.where(in_gen, (cg - cs_).norm(dim=1), torch.full((B,), MAX_CENTROID_DIST))
        inter = (mg & ms).flatten(1).sum(1).float()
        union = (mg | ms).flatten(1).sum(1).float()
        iou = torch.where(in_gen, inter / union.clamp_min(1), torch.zeros(B))
        err_sum += torch.where(in_src, dist, torch.zeros(B))
        iou_sum += torch.where(in_src, iou, torch.zeros(B))
        cnt += in_src.float()
        absent_src += int((rows & ~in_src).sum())
        absent_gen += int((in_src & ~in_gen).sum())
    valid = cnt > 0
    return {"centroid_error": err_sum / cnt.clamp_min(1), "iou": iou_sum / cnt.clamp_min(1), "valid": valid,
            "evaluated": int(cnt.sum()), "absent_in_generated": absent_gen, "absent_in_source": absent_src}


def layout_error(generated: torch.Tensor, source: torch.Tensor, colours: Sequence[Sequence[str]],
                 mask_fn: MaskFn | None = None, min_pixels: int = 4) -> dict:
    """Batch summary of ``layout_per_sample``: means over valid samples of ``centroid_error``
    (normalised distance, 0 = same place, max sqrt(2)) and ``iou``, plus the counts and
    ``skipped_samples`` (no colour of the scene visible in its own source). Plain floats/ints."""
    r = layout_per_sample(generated, source, colours, mask_fn, min_pixels)
    v = r["valid"]
    n = int(v.sum())
    return {"centroid_error": float(r["centroid_error"][v].mean()) if n else None,
            "iou": float(r["iou"][v].mean()) if n else None,
            "samples": n, "skipped_samples": int((~v).sum()), "colours_evaluated": r["evaluated"],
            "absent_in_generated": r["absent_in_generated"], "absent_in_source": r["absent_in_source"]}


def present_colours(images: torch.Tensor, names: Sequence[str], mask_fn: MaskFn | None = None,
                    min_pixels: int = 4) -> list[set[str]]:
    """For each image (B, 3, S, S), the subset of ``names`` whose colour mask has >= min_pixels."""
    mask_fn = mask_fn or _default_mask_fn()
    present: list[set[str]] = [set() for _ in range(images.shape[0])]
    for name in names:
        n = mask_fn(images, name).flatten(1).sum(1)                                     # (B,)
        for i in (n >= min_pixels).nonzero().flatten().tolist():
            present[i].add(name)
    return present


def swap_follow(generated: torch.Tensor, text_source: torch.Tensor, text_colours: Sequence[Sequence[str]],
                dino_source: torch.Tensor, dino_colours: Sequence[Sequence[str]],
                mask_fn: MaskFn | None = None, min_pixels: int = 4, margin: float = 0.0) -> dict:
    """DINO swap: images generated from the text of A and the DINO (CLS + patches) of B -- whose
    layout and colours do they follow?

    generated, text_source (A), dino_source (B): (B, 3, S, S). Layout: the layout error
    (``layout_per_sample``, absent colours at max penalty, so colours count too) against A and
    against B; a sample follows the side whose error is smaller by more than ``margin``, else it is
    a tie. Colours: Jaccard similarity of the colours present in the generated image (among A's and
    B's) with A's and with B's colour set. Returns layout rates over the samples where both layout
    errors are defined (``pairs``), ``skipped`` pairs, the mean errors, and colour rates over every
    sample (colour presence is defined for all of them).
    """
    ea = layout_per_sample(generated, text_source, text_colours, mask_fn, min_pixels)
    eb = layout_per_sample(generated, dino_source, dino_colours, mask_fn, min_pixels)
    ok = ea["valid"] & eb["valid"]
    n = int(ok.sum())
    a, b = ea["centroid_error"][ok], eb["centroid_error"][ok]
    names = sorted({c for cs in list(text_colours) + list(dino_colours) for c in cs})
    present = present_colours(generated, names, mask_fn, min_pixels)
    jac = lambda p, s: len(p & s) / max(1, len(p | s))
    ja = torch.tensor([jac(present[i], set(text_colours[i])) for i in range(len(present))])
    jb = torch.tensor([jac(present[i], set(dino_colours[i])) for i in range(len(present))])
    rate = lambda m: int(m.sum()) / n if n else None                                   # exact fractions
    return {
        "pairs": n, "skipped": int((~ok).sum()),
        "follows_dino_rate": rate(b < a - margin),
        "follows_text_rate": rate(a < b - margin),
        "tie_rate": rate((a - b).abs() <= margin),
        "error_vs_text_source": float(a.mean()) if n else None,
        "error_vs_dino_source": float(b.mean()) if n else None,
        "colour_follows_dino_rate": int((jb > ja).sum()) / len(present) if len(present) else None,
        "colour_follows_text_rate": int((ja > jb).sum()) / len(present) if len(present) else None,
    }


# --------------------------------------------------------------------------- shape layout

def connected_components(masks: torch.Tensor, connectivity: int = 4) -> torch.Tensor:
    """Label the connected components of each boolean image in a stack.

    masks (N, H, W) bool -> labels (N, H, W) int64: -1 on background; on a component, the flat
    index (row * W + col, within its own image) of the component's first pixel in raster order.
    ``connectivity`` 4 (edge neighbours) or 8 (edges and corners).

    Label propagation with pointer jumping, vectorised over the stack: each foreground pixel starts
    with its own index; every round takes the minimum over its neighbourhood, then follows each label
    to the label of the pixel it names, twice (a label always names a pixel of the same component,
    so jumps stay inside it and shorten the remaining path). An image leaves the loop when a round
    changes nothing, which is exactly when each of its components holds one label, its smallest
    index. Images without foreground never enter it.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(masks.shape)}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    N, H, W = masks.shape
    HW = H * W
    masks = masks.bool()
    out = torch.full((N, HW), -1, dtype=torch.long, device=masks.device)
    active = masks.view(N, HW).any(1).nonzero().flatten()                             # (n,) images with foreground
    fg = masks.view(N, HW)[active]                                                     # (n, HW)
    big = HW                                                                           # background: above any index
    # labels plus a sentinel column at index HW that always holds `big`: background labels point
    # at it, so pointer jumping needs no masking
    lab = torch.where(fg, torch.arange(HW, device=masks.device), big)                  # (n, HW)
    lab = F.pad(lab, (0, 1), value=big)                                                # (n, HW + 1)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    while active.numel():
        n = active.numel()
        p = F.pad(lab[:, :HW].reshape(n, H, W), (1, 1, 1, 1), value=big)               # (n, H+2, W+2)
        nb = p[:, 1: 1 + H, 1: 1 + W]
        for dy, dx in offsets:                         # each offset and its opposite
            nb = torch.minimum(nb, p[:, 1 + dy: 1 + dy + H, 1 + dx: 1 + dx + W])
            nb = torch.minimum(nb, p[:, 1 - dy: 1 - dy + H, 1 - dx: 1 - dx + W])
        new = lab.clone()
        new[:, :HW] = nb.reshape(n, HW).masked_fill_(~fg, big)                         # (n, HW + 1)
        for _ in range(2):                             # pointer jumping: label <- label of the pixel it names
            new = new.gather(1, new)
        changed = (new != lab).any(1)                                                  # (n,)
        done = ~changed
        out[active[done]] = new[done, :HW].masked_fill(~fg[done], -1)
        active, fg, lab = active[changed], fg[changed], new[changed]
    return out.view(N, H, W)


def component_stats(masks: torch.Tensor, connectivity: int = 4) -> dict:
    """Every connected component of a stack of boolean images, as flat tensors (K components).

    masks (N, S, S) bool -> ``image`` (K,) int64 (which of the N images), ``area`` (K,) int64
    (pixels), ``centre`` (K, 2) float32 (x, y) pixel centroid in [0, 1] image fractions
    ((col + 0.5) / S, (row + 0.5) / S). Components are ordered by image, then by first pixel.
    """
    N, H, W = masks.shape
    lab = connected_components(masks, connectivity).view(N, H * W)                    # (N, HW)
    fg = lab >= 0
    gid = (torch.arange(N, device=lab.device)[:, None] * (H * W) + lab)[fg]          # (F,) global component id
    uniq, inv, area = torch.unique(gid, return_inverse=True, return_counts=True)     # (K,), (F,), (K,)
    pix = torch.arange(H * W, device=lab.device).expand(N, H * W)[fg]                  # (F,) flat pixel index
    xs = ((pix % W).float() + 0.5) / W
    ys = ((pix // W).float() + 0.5) / H
    K = uniq.numel()
    cx = torch.zeros(K, device=lab.device).index_add_(0, inv, xs) / area
    cy = torch.zeros(K, device=lab.device).index_add_(0, inv, ys) / area
    return {"image": uniq // (H * W), "area": area, "centre": torch.stack([cx, cy], 1)}


def _as_scene(s) -> Scene:
    if isinstance(s, Scene):
        return s
    if isinstance(s, dict) and "shapes" in s:
        return Scene.from_json(s)
    raise TypeError(f"a scene must be a shapes.Scene or its to_json() dict, got {type(s).__name__}")


def _truth(scenes: list[Scene], S: int):
    """Ground truth drawn at S px, painter's order like ``render``: per captioned shape its visible
    pixels' area and centroid; per palette colour the union of its shapes' visible pixels.

    -> colour (B, M) int64 (index into COLOUR_NAMES, -1 = padding), area (B, M) float32 (0 = not
    visible), centre (B, M, 2) float32, colour_masks (B, 6, S, S) bool; M = most shapes in a scene.
    """
    B, M = len(scenes), max([1] + [len(s.shapes) for s in scenes])
    colour = np.full((B, M), -1, dtype=np.int64)
    area = np.zeros((B, M), dtype=np.float32)
    centre = np.zeros((B, M, 2), dtype=np.float32)
    cmask = np.zeros((B, len(COLOUR_NAMES), S, S), dtype=bool)
    coords = (np.arange(S, dtype=np.float32) + 0.5) / S
    for b, sc in enumerate(scenes):
        masks = [shape_mask(s, S) for s in sc.shapes]
        covered = np.zeros((S, S), dtype=bool)
        for j in range(len(masks) - 1, -1, -1):         # later shapes are drawn on top
            vis = masks[j] & ~covered
            covered |= masks[j]
            if sc.shapes[j].colour not in COLOURS:
                raise ValueError(f"scene {b}: unknown colour {sc.shapes[j].colour!r}; choose from {sorted(COLOURS)}")
            c = COLOUR_NAMES.index(sc.shapes[j].colour)
            colour[b, j] = c
            n = int(vis.sum())
            area[b, j] = n
            if n:
                centre[b, j] = ((vis.sum(0) * coords).sum() / n, (vis.sum(1) * coords).sum() / n)
                cmask[b, c] |= vis
    return (torch.from_numpy(colour), torch.from_numpy(area), torch.from_numpy(centre),
            torch.from_numpy(cmask))


def _best_assignment(d: np.ndarray, keep: int = 6) -> list[int]:
    """Exact matching for one sample: d (M, K) distances, inf = not allowed. Maximises the number of
    matched rows, then minimises their total distance (each row considers its ``keep`` nearest
    allowed columns, plenty for the world's <= 3 shapes). -> per row the column or -1."""
    M = d.shape[0]
    opts = [[int(k) for k in np.argsort(d[m])[:keep] if np.isfinite(d[m, k])] + [-1] for m in range(M)]
    best: tuple = (-1, math.inf, [])

    def go(m: int, used: set, n: int, tot: float, pick: list) -> None:
        nonlocal best
        if m == M:
            if n > best[0] or (n == best[0] and tot < best[1]):
                best = (n, tot, list(pick))
            return
        for k in opts[m]:
            if k >= 0 and k in used:
                continue
            go(m + 1, used | {k} if k >= 0 else used, n + (k >= 0), tot + (d[m, k] if k >= 0 else 0.0), pick + [k])

    go(0, set(), 0, 0.0, [])
    return best[2]


def _match(dist: torch.Tensor) -> torch.Tensor:
    """One-to-one matching per batch row of dist (B, M, K) (inf = not allowed) -> (B, M) int64
    column or -1. Greedy first, vectorised: repeatedly take the smallest finite entry and strike
    its row and column. Where that leaves a row unmatched although it had an allowed column (greedy
    gave that column to another row), the sample is solved exactly (``_best_assignment``)."""
    B, M, K = dist.shape
    d = dist.clone()
    match = torch.full((B, M), -1, dtype=torch.long)
    rows = torch.arange(B)
    for _ in range(min(M, K)):
        best, flat = d.view(B, M * K).min(1)                                           # (B,)
        ok = torch.isfinite(best)
        m, k = flat // K, flat % K
        match[rows[ok], m[ok]] = k[ok]
        d[rows[ok], m[ok], :] = math.inf
        d[rows[ok], :, k[ok]] = math.inf
    lost = ((match < 0) & torch.isfinite(dist).any(2)).any(1)                          # (B,)
    for b in lost.nonzero().flatten().tolist():
        match[b] = torch.tensor(_best_assignment(dist[b].numpy()), dtype=torch.long)
    return match


def shape_layout_per_sample(generated: torch.Tensor, scenes: Sequence, mask_fn: MaskFn | None = None,
                            min_area_fraction: float = MIN_AREA_FRACTION, miss_penalty: float = MISS_PENALTY,
                            connectivity: int = 4) -> dict:
    """Per-sample shape layout of generated images against their scenes (definitions: module
    docstring, "Shape layout").

    generated (B, 3, S, S) in [0, 1]; scenes: B ``shapes.Scene`` or ``Scene.to_json()`` dicts (the
    shards' ``json`` member). Returns float tensors (B,) ``layout_error``, ``shape_recall``,
    ``placement_error``, ``size_error``, ``mask_iou``; int tensors (B,) ``n_shapes`` (captioned
    shapes visible in the scene's own rendering), ``n_matched``, ``extra_shapes``; ``valid``: a dict
    metric -> (B,) bool saying where each metric is defined (``placement_error`` and ``size_error``
    need a matched shape, the rest a visible captioned shape). Undefined entries hold 0, never NaN.
    Also ``skipped_shapes`` (int): captioned shapes with no visible pixel in the scene (not scored).
    """
    _check_images(generated)
    B, _, S, _ = generated.shape
    if len(scenes) != B:
        raise ValueError(f"{len(scenes)} scenes for {B} images")
    if not 0 < min_area_fraction <= 1:
        raise ValueError(f"min_area_fraction must be in (0, 1], got {min_area_fraction}")
    mask_fn = mask_fn or colour_mask
    scenes = [_as_scene(s) for s in scenes]
    t_col, t_area, t_ctr, t_mask = _truth(scenes, S)                                   # (B, M), (B, M), (B, M, 2), (B, 6, S, S)
    t_ok = t_area > 0                                                                  # (B, M) scored shapes
    gen = generated.detach().float().cpu()
    g_mask = torch.stack([mask_fn(gen, c).cpu().bool() for c in COLOUR_NAMES], 1)    # (B, 6, S, S)
    n_col = len(COLOUR_NAMES)

    # components of every palette colour; big enough to be a shape of this scene = at least
    # min_area_fraction of its smallest captioned shape (candidates; each shape re-checks its own area)
    comp = component_stats(g_mask.view(B * n_col, S, S), connectivity)
    c_b, c_col = comp["image"] // n_col, comp["image"] % n_col                          # (K,), (K,)
    smallest = torch.where(t_ok, t_area, math.inf).min(1).values                       # (B,)
    keep = comp["area"].float() >= min_area_fraction * smallest[c_b]
    c_b, c_col = c_b[keep], c_col[keep]
    c_area, c_ctr = comp["area"][keep].float(), comp["centre"][keep]
    n_cand = torch.bincount(c_b, minlength=B)                                          # (B,)
    Kc = max(1, int(n_cand.max()) if len(n_cand) else 1)
    first = torch.cumsum(n_cand, 0) - n_cand                                           # (B,) start of each sample's run
    slot = torch.arange(c_b.numel()) - first[c_b]                                      # (Kc',) position in its sample
    d_col = torch.full((B, Kc), -1, dtype=torch.long)
    d_area = torch.zeros(B, Kc)
    d_ctr = torch.zeros(B, Kc, 2)
    d_col[c_b, slot], d_area[c_b, slot], d_ctr[c_b, slot] = c_col, c_area, c_ctr      # (B, Kc) padded candidates

    dist = (t_ctr[:, :, None, :] - d_ctr[:, None, :, :]).norm(dim=-1)                 # (B, M, Kc)
    allowed = (t_ok[:, :, None] & (t_col[:, :, None] == d_col[:, None, :])
               & (d_area[:, None, :] >= min_area_fraction * t_area[:, :, None]))
    match = _match(torch.where(allowed, dist, math.inf))                               # (B, M)
    found = match >= 0
    k = match.clamp_min(0)
    m_dist = dist.gather(2, k[:, :, None])[:, :, 0]                                    # (B, M)
    m_area = d_area.gather(1, k)                                                       # (B, M)

    n_shapes = t_ok.sum(1)                                                             # (B,)
    n_matched = found.sum(1)
    per_shape = torch.where(found, m_dist.clamp(max=miss_penalty), torch.full_like(m_dist, miss_penalty))
    div = n_shapes.clamp_min(1).float()
    layout = torch.where(t_ok, per_shape, 0).sum(1) / div
    recall = n_matched.float() / div
    mdiv = n_matched.clamp_min(1).float()
    placement = torch.where(found, m_dist, 0).sum(1) / mdiv
    size = torch.where(found, (m_area / t_area.clamp_min(1)).log().abs(), 0).sum(1) / mdiv

    # mask IoU per colour of the scene, then the mean over the scene's colours
    in_scene = t_mask.flatten(2).any(2)                                                # (B, 6)
    inter = (g_mask & t_mask).flatten(2).sum(2).float()
    union = (g_mask | t_mask).flatten(2).sum(2).float()
    iou = torch.where(in_scene, inter / union.clamp_min(1), 0).sum(1) / in_scene.sum(1).clamp_min(1)

    has = n_shapes > 0
    return {"layout_error": layout, "shape_recall": recall, "placement_error": placement,
            "size_error": size, "mask_iou": iou, "n_shapes": n_shapes, "n_matched": n_matched,
            "extra_shapes": n_cand - n_matched,
            "valid": {"layout_error": has, "shape_recall": has, "mask_iou": has,
                      "placement_error": n_matched > 0, "size_error": n_matched > 0},
            "skipped_shapes": int(((t_col >= 0) & ~t_ok).sum())}


SHAPE_LAYOUT_METRICS = ("layout_error", "shape_recall", "placement_error", "size_error", "mask_iou")


def shape_layout(generated: torch.Tensor, scenes: Sequence, mask_fn: MaskFn | None = None,
                 min_area_fraction: float = MIN_AREA_FRACTION, miss_penalty: float = MISS_PENALTY,
                 connectivity: int = 4, n_boot: int = 0, seed: int = 0, level: float = 0.95) -> dict:
    """Batch summary of ``shape_layout_per_sample`` (definitions: module docstring, "Shape layout").

    For each metric in ``SHAPE_LAYOUT_METRICS`` the mean over the samples where it is defined (a
    float, or None when no sample is), plus counts: ``samples``, ``shapes``, ``matched``,
    ``extra_shapes``, ``skipped_shapes``. With ``n_boot > 0``, ``ci``: metric -> ``bootstrap_ci``
    dict (mean, lo, hi, n) over samples. ``per_sample``: the per-sample dict, for bootstrapping
    and paired comparisons by the caller.
    """
    per = shape_layout_per_sample(generated, scenes, mask_fn, min_area_fraction, miss_penalty, connectivity)
    out: dict = {}
    for m in SHAPE_LAYOUT_METRICS:
        v = per["valid"][m]
        out[m] = float(per[m][v].mean()) if bool(v.any()) else None
    out.update(samples=int(per["valid"]["layout_error"].sum()), shapes=int(per["n_shapes"].sum()),
               matched=int(per["n_matched"].sum()), extra_shapes=int(per["extra_shapes"].sum()),
               skipped_shapes=per["skipped_shapes"])
    if n_boot > 0:
        out["ci"] = {m: bootstrap_ci(per[m], per["valid"][m], n_boot, seed, level) for m in SHAPE_LAYOUT_METRICS}
    out["per_sample"] = per
    return out


# --------------------------------------------------------------------------- bootstrap

def _as_1d(values, name: str) -> np.ndarray:
    v = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per sample), got shape {v.shape}")
    return v


def _valid(valid, n: int) -> np.ndarray:
    if valid is None:
        return np.ones(n, dtype=bool)
    v = _as_1d(valid, "valid").astype(bool)
    if v.shape[0] != n:
        raise ValueError(f"valid has {v.shape[0]} entries for {n} values")
    return v


def bootstrap_ci(values, valid=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the mean over samples.

    values (n,) tensor / array / list; valid (n,) bool or None (all). Only valid entries are used;
    they must be finite. Resamples them with replacement ``n_boot`` times (numpy Generator(seed):
    deterministic) and returns ``{"mean", "lo", "hi", "n"}``: the sample mean, the (1 - level) / 2 and
    (1 + level) / 2 quantiles of the resampled means, and the number of valid samples. With no valid
    sample every number is None (n = 0); with one, lo = hi = mean.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = _as_1d(values, "values").astype(np.float64)
    v = v[_valid(valid, v.shape[0])]
    n = int(v.shape[0])
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    if not np.isfinite(v).all():
        raise ValueError("values hold NaN or inf among the valid entries; mark them invalid instead")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)                      # bounds memory at about 16 MB of indices
    means = np.concatenate([v[rng.integers(0, n, size=(min(chunk, n_boot - i), n))].mean(1)
                            for i in range(0, n_boot, chunk)])                          # (n_boot,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    mean = float(v.mean())
    # the resampled means of identical values can differ from the mean by float rounding only
    return {"mean": mean, "lo": float(min(lo, mean)), "hi": float(max(hi, mean)), "n": n}


def paired_bootstrap_diff(a, b, valid_a=None, valid_b=None, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Mean difference a - b of two arms scored on the same scenes, with a paired percentile
    bootstrap interval: scene indices are resampled jointly, so the scene-to-scene spread both arms
    share cancels. a, b (n,); valid_a, valid_b (n,) bool or None. Scenes valid in both arms are used.
    Returns ``{"mean", "lo", "hi", "n", "mean_a", "mean_b"}`` (None with no common scene).
    """
    va, vb = _as_1d(a, "a").astype(np.float64), _as_1d(b, "b").astype(np.float64)
    if va.shape != vb.shape:
        raise ValueError(f"paired arms need one value per scene each, got {va.shape} and {vb.shape}")
    ok = _valid(valid_a, va.shape[0]) & _valid(valid_b, vb.shape[0])
    r = bootstrap_ci(va - vb, ok, n_boot, seed, level)
    r["mean_a"] = float(va[ok].mean()) if r["n"] else None
    r["mean_b"] = float(vb[ok].mean()) if r["n"] else None
    return r


# --------------------------------------------------------------------------- constructed rows

CONSTRUCTED_ROWS = ("source", "shifted", "layout_blind", "specks", "empty")


def constructed_scenes(scenes: Sequence, rng: np.random.Generator, shift: float = 0.1) -> dict:
    """The scenes behind the constructed rows that have them: ``source`` (as given), ``shifted``
    (each scene moved rigidly by ``shift`` along x and along y, towards the side with more room,
    clamped inside the image by ``shapes.shift_scene``), ``layout_blind`` (``shapes.shuffle_layout``:
    same shapes at new random places). -> dict name -> list of Scene."""
    src = [_as_scene(s) for s in scenes]
    shifted = []
    for s in src:
        (left, right), (up, down) = shift_extent(s)
        shifted.append(shift_scene(s, shift if right >= left else -shift, shift if down >= up else -shift))
    return {"source": src, "shifted": shifted, "layout_blind": [shuffle_layout(s, rng) for s in src]}


def speck_image(scene: Scene, image_size: int, rng: np.random.Generator, speck: int = 2, gap: int = 1) -> torch.Tensor:
    """The scene's colours as scattered specks: about as many pixels of each colour as the scene
    shows, as ``speck`` x ``speck`` squares on a grid with ``gap`` background pixels between them (no
    two specks touch, not even at corners), at random cells. (3, S, S) in [0, 1]. When the scene has
    more pixels than the grid holds, every cell is used (colours in proportion)."""
    S, stride = image_size, speck + gap
    img = render(Scene([]), S)
    src = render(scene, S)
    counts = {c: int(colour_mask(src[None], c)[0].sum()) for c in dict.fromkeys(s.colour for s in scene.shapes)}
    cells_per_side = (S - speck) // stride + 1
    n_cells = cells_per_side ** 2
    want = {c: max(1, round(n / speck ** 2)) for c, n in counts.items() if n}
    total = sum(want.values())
    if total > n_cells:
        want = {c: max(1, n * n_cells // total) for c, n in want.items()}
    cells = rng.permutation(n_cells)
    at = 0
    for c, n in want.items():
        for cell in cells[at: at + n]:
            y, x = divmod(int(cell), cells_per_side)
            img[:, y * stride: y * stride + speck, x * stride: x * stride + speck] = torch.tensor(COLOURS[c])[:, None, None]
        at += n
    return img


def constructed_rows(scenes: Sequence, image_size: int, rng: np.random.Generator, shift: float = 0.1) -> dict:
    """Constructed image batches for calibrating and testing the layout metrics, one per name in
    ``CONSTRUCTED_ROWS``, each (B, 3, S, S) in [0, 1]: ``source`` (the scenes rendered: the best
    possible score), ``shifted`` (the scenes moved by ``shift`` along both axes, see
    ``constructed_scenes``), ``layout_blind`` (same shapes at random places: "no layout"),
    ``specks`` (the scenes' colours as scattered specks, ``speck_image``: no shape), ``empty``
    (background only)."""
    sc = constructed_scenes(scenes, rng, shift)
    ren = lambda ss: torch.stack([render(s, image_size) for s in ss])                 # (B, 3, S, S)
    src = ren(sc["source"])
    return {"source": src, "shifted": ren(sc["shifted"]), "layout_blind": ren(sc["layout_blind"]),
            "specks": torch.stack([speck_image(s, image_size, rng) for s in sc["source"]]),
            "empty": ren([Scene([]) for _ in sc["source"]])}


# --------------------------------------------------------------------------- DINO space

@torch.no_grad()
def dino_features(dino: Callable, images: torch.Tensor, stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``dino(images (B, 3, Sh, Sw))`` -> (cls (B, Dd), patches (B, P, Dd)) float32 on the CPU,
    normalised with ``stats`` (a ``nbcore.data.Stats``, as the loader normalises the conditions) when
    given, so every feature dimension weighs about the same."""
    cls, patches = dino(images)
    cls, patches = cls.float().cpu(), patches.float().cpu()
    if stats is not None:
        z = stats.normalise_condition({"dino_emb": cls, "dino_patches": patches})
        cls, patches = z["dino_emb"], z["dino_patches"]
    return cls, patches


def layout_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DINO-space layout score: how well two patch-feature maps agree position by position.

    a, b (B, P, Dd) -> (B,) in [-1, 1]: the correlation of the two maps, sum_i <a_i - a_mean, b_i - b_mean>
    / (|a - a_mean| |b - b_mean|), a_mean the image's mean patch feature (norms over all P x Dd values).
    Centring on the image's own mean removes what every position shares (the background), so the
    score rates where the content is: the same map scores 1, a featureless (constant) map 0 (its
    centred norm below 1e-5 of its norm), and the same content at unrelated positions about 0
    (calibration rows: ``layout_corr_calibration``).
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"patch maps must be two (B, P, Dd) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.float(), b.float()
    ca, cb = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)                 # (B, P, Dd)
    na, nb = ca.flatten(1).norm(dim=1), cb.flatten(1).norm(dim=1)                      # (B,)
    # a constant map centres to rounding noise, not to exact zeros: below 1e-5 of its norm it is featureless
    flat = (na <= 1e-5 * a.flatten(1).norm(dim=1)) | (nb <= 1e-5 * b.flatten(1).norm(dim=1))
    corr = (ca * cb).flatten(1).sum(1) / (na * nb).clamp_min(1e-30)                    # (B,)
    return torch.where(flat, torch.zeros_like(corr), corr)


def roll_patch_grid(patches: torch.Tensor) -> torch.Tensor:
    """(B, P, Dd) row-major g x g grid -> the same grid rolled by half its side along both axes
    (patch (i, j) moves to ((i + g/2) mod g, (j + g/2) mod g)): the right content in the wrong places."""
    B, P, D = patches.shape
    g = math.isqrt(P)
    if g * g != P:
        raise ValueError(f"{P} patches do not form a square grid")
    grid = patches.reshape(B, g, g, D)                                                 # (B, g, g, Dd)
    return grid.roll((g // 2, g // 2), dims=(1, 2)).reshape(B, P, D)                    # (B, P, Dd)


def layout_corr_calibration(source_patches: torch.Tensor) -> dict:
    """Where chance lies for ``layout_corr`` on these images, from their own patch maps (no encoder
    call): ``rolled`` (B,): each map against itself rolled by half the grid (``roll_patch_grid``: the
    same content, displaced); ``other_image`` (B,): each map against the next image's
    ((i + 1) mod B: another scene of the same data), None for B = 1. A generated image's score means
    layout only as far as it rises above these."""
    other = layout_corr(source_patches.roll(-1, dims=0), source_patches) if source_patches.shape[0] > 1 else None
    return {"rolled": layout_corr(roll_patch_grid(source_patches), source_patches), "other_image": other}


def dino_similarity(dino: Callable, generated: torch.Tensor, source: torch.Tensor, stats=None) -> dict:
    """Generated vs source images in the DINO encoder's space (``dino_features``, normalised with
    ``stats`` when given). generated, source (B, 3, S, S) -> tensors (B,): ``cls_cos`` (cosine of the
    CLS vectors: global content) and ``layout_corr`` (``layout_corr`` of the patch maps: placement)."""
    _check_images(generated, source)
    cg, pg = dino_features(dino, generated, stats)
    cs, ps = dino_features(dino, source, stats)
    return {"cls_cos": F.cosine_similarity(cg, cs, dim=-1), "layout_corr": layout_corr(pg, ps)}
