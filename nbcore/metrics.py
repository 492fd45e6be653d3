"""Metrics for the validation suite: pixel (PSNR, LPIPS), layout on the shapes world (colour-mask
centroids and IoU), DINO-swap following, and similarity in the image encoder's space.

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
- LPIPS uses the ``lpips`` package with the AlexNet trunk. The trunk's ImageNet weights
  (``alexnet-owt-7be5be79.pth``) are never downloaded here: they are looked up in an explicit path,
  ``$NBCORE_ALEXNET_WEIGHTS``, or the torch hub cache ``$TORCH_HOME/hub/checkpoints/`` (default
  ``~/.cache/torch/hub/checkpoints/``). Without them the metric reports
  ``LPIPS unavailable: <reason>; <how to provide the weights>`` and every other metric goes on.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["PSNR_CAP_DB", "MAX_CENTROID_DIST", "ALEXNET_FILE", "psnr", "LPIPSMetric", "layout_error",
           "layout_per_sample", "swap_follow", "encoder_similarity", "present_colours"]

PSNR_CAP_DB = 100.0
MAX_CENTROID_DIST = math.sqrt(2.0)
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
        import warnings

        import lpips
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
    from .shapes import colour_mask
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


# --------------------------------------------------------------------------- encoder space

@torch.no_grad()
def encoder_similarity(patch_encoder: Callable, generated: torch.Tensor, source: torch.Tensor) -> dict:
    """Similarity of generated and source images in the image encoder's space.

    patch_encoder(images (B, 3, S, S)) -> (cls (B, Dd), patches (B, P, Dd)). Returns tensors (B,):
    ``cls_cos`` (cosine of the CLS vectors) and ``patch_cos`` (mean over the P grid positions of the
    cosine of corresponding patch tokens).
    """
    _check_images(generated, source)
    cg, pg = patch_encoder(generated)
    cs, ps = patch_encoder(source)
    cls_cos = F.cosine_similarity(cg.float(), cs.float(), dim=-1)                       # (B,)
    patch_cos = F.cosine_similarity(pg.float(), ps.float(), dim=-1).mean(1)             # (B, P) -> (B,)
    return {"cls_cos": cls_cos.cpu(), "patch_cos": patch_cos.cpu()}
