"""nbcore.viz leaves the user's matplotlib backend alone and still saves figures headless."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys, matplotlib
if sys.argv[1] != "-":
    matplotlib.use(sys.argv[1])
before = matplotlib.get_backend()
import torch
import nbcore.viz as viz
after = matplotlib.get_backend()
fig = viz.image_grid({"a": torch.rand(2, 3, 8, 8), "b": torch.zeros(2, 3, 8, 8)}, titles=["x", "y"])
path = viz.save_figure(fig, sys.argv[2])
print(json.dumps({"before": before, "after": after, "png": open(path, "rb").read(8).hex()}))
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n".hex()


def _probe(backend: str, tmp_path, env_backend: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    if env_backend:
        env["MPLBACKEND"] = env_backend
    out = subprocess.run([sys.executable, "-c", PROBE, backend, str(tmp_path / "fig.png")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _inline_available() -> bool:
    try:
        import matplotlib_inline  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("backend", ["svg", "inline"])
def test_import_keeps_the_users_backend(backend, tmp_path):
    if backend == "inline" and not _inline_available():
        pytest.skip("matplotlib_inline not installed")
    r = _probe(backend, tmp_path)
    assert r["after"] == r["before"]                       # e.g. "inline" stays "inline" (was switched to Agg)
    assert r["before"].lower() != "agg"
    assert r["png"] == PNG_MAGIC                            # save_figure writes a PNG whatever the backend


def test_headless_without_a_backend_saves_png(tmp_path):
    """No display and no backend asked for: matplotlib resolves a headless backend by itself."""
    r = _probe("-", tmp_path)
    assert r["after"].lower() == "agg" and r["png"] == PNG_MAGIC


def test_mplbackend_env_is_respected(tmp_path):
    r = _probe("-", tmp_path, env_backend="svg")
    assert r["before"] == r["after"] == "svg" and r["png"] == PNG_MAGIC
