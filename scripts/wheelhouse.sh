#!/usr/bin/env bash
# Build .whl/ in the repository root: the wheels a notebook run needs on an offline GPU host
# (Python 3.12, x86_64) whose image has torch, torchvision, numpy, matplotlib, pillow, pyyaml, tqdm,
# requests, jinja2, attrs, psutil, pygments, ... but lacks papermill, ipykernel, nbclient,
# webdataset, lpips, ipywidgets, safetensors, tensorboard, mistune and their dependencies.
# Usage, on a machine with pip access:   bash scripts/wheelhouse.sh [EXTRA_PACKAGE ...]
#   e.g. bash scripts/wheelhouse.sh diffusers importlib_metadata    (for the PixArt peer of nbcore.bench)
# Then copy the tree with .whl/ to the host and run bash scripts/gpu_host.sh there (README, "On a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
if [ -d .git ] || [ -f .git ]; then
    exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
    grep -qxF "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >> "$exclude"
fi
pkgs=(papermill mistune ipykernel nbclient nbformat webdataset braceexpand lpips ipywidgets widgetsnbextension
      jupyterlab_widgets comm debugpy ipython ipython_pygments_lexers jedi parso matplotlib_inline
      prompt_toolkit wcwidth pexpect ptyprocess stack_data asttokens executing pure_eval traitlets
      jupyter_client jupyter_core pyzmq tornado nest_asyncio2 platformdirs fastjsonschema jsonschema
      jsonschema_specifications referencing rpds_py tenacity entrypoints safetensors
      tensorboard tensorboard_data_server protobuf absl_py markdown werkzeug grpcio "$@")
plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_26_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_35_x86_64 any; do plat+=(--platform "$p"); done
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$dest" "${pkgs[@]}" 2>&1 | grep -v 'is ignored' || true
ls "$dest" | wc -l | xargs echo "wheels:"
du -sh "$dest"
