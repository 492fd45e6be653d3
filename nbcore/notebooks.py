"""What a notebook of the suite carries: its profile, output folder, checks, metrics and figures.

Every notebook's first code cell is tagged ``parameters`` (``profile``, ``device``, ``run_dir``,
``seed``, ``fail_check`` and the ``Profile`` fields it uses, ``None`` = the profile's value); its
next cell calls ``start(name, ...)``. The experiment itself lives in ``nbcore.experiment``; the
papermill runner in ``nbcore.runner``.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .experiment import Profile, profile as make_profile
from .utils import repo_root, resolve_device, seed_everything, write_json
from .validate import load_val_batch as _load_val_batch
from .viz import save_figure

__all__ = ["NOTEBOOKS", "Context", "start", "CheckFailed", "default_run_dir", "load_val_batch"]

# The suite, in the order the runner executes it (notebooks/NAME.ipynb).
NOTEBOOKS = ("01_architecture", "02_checks", "03_training", "04_attention_routing", "05_milestones",
             "06_dino_swap_demo", "07_real_data")


class CheckFailed(AssertionError):
    """A check a notebook makes failed: the notebook (and the papermill run) fails with this."""


def default_run_dir(profile: str) -> Path:
    return repo_root() / "outputs" / "runs" / profile


class Context:
    """A notebook's resolved ``Profile`` ``p``, output folder ``out``, ``metrics`` (written to
    ``out/metrics.json``), checks and figures.

    ``check(cond, name, **values)`` records a check; ``finish()`` writes metrics.json and raises
    ``CheckFailed`` naming every failed check, so papermill marks the notebook failed after the
    evidence is on disk. ``fail_check=True`` adds a deliberately failing check (tests the failure path).
    """

    def __init__(self, name: str, profile: str, run_dir=None, device: str = "auto", seed: int = 0,
                 fail_check: bool = False, **given):
        self.name = name
        unknown = set(given) - {f.name for f in fields(Profile)}
        if unknown:
            raise ValueError(f"{name}: {sorted(unknown)} are not Profile fields")
        self.p: Profile = make_profile(profile, **given)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(profile)
        self.out = self.run_dir / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = str(resolve_device(device))
        self.seed = int(seed)
        seed_everything(self.seed)
        self.fail_check = bool(fail_check)
        self.metrics: dict = {}
        self.checks: list[dict] = []
        self.figures: list[str] = []
        self.t0 = time.perf_counter()

    def save(self, fig, filename: str) -> Path:
        """Save a matplotlib figure as ``out/filename`` (PNG) and show it inline when in Jupyter."""
        _show(fig)                       # before save_figure closes it
        path = save_figure(fig, self.out / filename)
        self.figures.append(path.name)
        return path

    def keep(self, path, filename: str) -> Path:
        """Copy a PNG written elsewhere (a model card's samples) into ``out/filename`` as one of this
        notebook's figures, and show it inline when in Jupyter."""
        dest = self.out / filename
        shutil.copyfile(path, dest)
        _show(dest)
        self.figures.append(dest.name)
        return dest

    def check(self, cond, name: str, **values) -> bool:
        ok = bool(cond)
        self.checks.append({"check": name, "passed": ok, **values})
        print(("PASS " if ok else "FAIL ") + name + (f"  {values}" if values else ""))
        return ok

    def finish(self) -> dict:
        if self.fail_check:
            self.check(False, "deliberate failure (fail_check=True)")
        failed = [c["check"] for c in self.checks if not c["passed"]]
        record = {"notebook": self.name, "profile": self.p.name, "device": self.device, "seed": self.seed,
                  "settings": asdict(self.p), "time_s": round(time.perf_counter() - self.t0, 2),
                  "checks": self.checks, "failed_checks": failed, "figures": self.figures, "metrics": self.metrics}
        write_json(record, self.out / "metrics.json")
        if failed:
            raise CheckFailed(f"{self.name}: {len(failed)} check(s) failed: {failed}")
        print(f"{self.name}: {len(self.checks)} checks passed; wrote {self.out / 'metrics.json'}")
        return record


def _show(obj) -> None:
    """Display ``obj`` (a figure, or an image file's path) inline when running in Jupyter (a papermill
    kernel included); else nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is not None:
        from IPython.display import Image, display
        display(Image(filename=str(obj)) if isinstance(obj, Path) else obj)


def start(name: str, **params) -> Context:
    """``Context(name, **params)``: the first call of every notebook after its parameters cell."""
    return Context(name, **params)


def load_val_batch(data_dir, n: int, device=None) -> dict:
    """The first ``n`` validation samples of a run's shards, normalised like training
    (``nbcore.validate.load_val_batch``), with tensors moved to ``device`` (png stays on the CPU)."""
    batch = _load_val_batch(data_dir, n)
    if device is not None:
        batch = {k: (v.to(device) if torch.is_tensor(v) and k != "png" else v) for k, v in batch.items()}
    return batch


if __name__ == "__main__":   # docs/DESIGN.md's entry point `python -m nbcore.notebooks run ...`: the runner's CLI
    import sys

    from .runner import main
    sys.exit(main())
