"""A stand-in widget notebook for the browser harness (plumbing test, not the demo).

It has the demo's shape in miniature: a 'text scale' slider and a 'DINO source' dropdown that
redraw a matplotlib image inside an ``ipywidgets.Output``. ``tests/test_browser.py`` drives it to
check the JupyterLab/Chromium harness on its own, independent of the real DINO-swap notebook.
"""
from __future__ import annotations

from pathlib import Path

import nbformat

_IMPORTS = """\
import numpy as np
import matplotlib.pyplot as plt
import ipywidgets as W
from IPython.display import display"""

_DEMO = """\
scale = W.FloatSlider(value=1.0, min=0.0, max=5.0, step=0.5, description='text scale')
source = W.Dropdown(options=['circle', 'square'], value='circle', description='DINO source')
out = W.Output()

def redraw(*_):
    xs = np.linspace(0, 1, 64)
    freq = 3 if source.value == 'circle' else 9
    img = np.outer(np.sin(xs * (scale.value + 0.5) * 6), np.cos(xs * freq))  # (64, 64)
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(img, cmap='viridis')
    ax.set_title(f'stand-in: {source.value}, scale={scale.value}')
    with out:
        out.clear_output(wait=True)
        display(fig)
    plt.close(fig)

scale.observe(redraw, 'value')
source.observe(redraw, 'value')
redraw()
display(W.VBox([W.HBox([scale, source]), out]))"""


def write_standin(path: Path) -> Path:
    """Write the stand-in notebook to ``path`` (kernel ``python3``) and return the path."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Stand-in widget notebook (browser harness plumbing test)"),
        nbformat.v4.new_code_cell(_IMPORTS),
        nbformat.v4.new_code_cell(_DEMO),
    ]
    nbformat.write(nb, path)
    return path
