#!/usr/bin/env bash
# Create .venv with everything the suite needs, once; later calls are a quick no-op.
#   bash scripts/setup.sh            the Python environment (.venv) + a Jupyter kernel
#   bash scripts/setup.sh --browser  also Debian's chromium (for the JupyterLab widget test)
# torch 2.14.1 + torchvision 0.29.1: lpips imports torchvision, and PyPI's torchvision does not
# import beside the 2.13 CPU wheel, so the pair is pinned here (pip finds both on this machine's disk).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null; then
  echo "setup: installing Debian's chromium for the browser test"
  export DEBIAN_FRONTEND=noninteractive
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq chromium >/dev/null
fi
py=${PYTHON:-python3}
stamp=.venv/.nbcore-setup
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[encoders,bench,test]"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$stamp"
echo "setup: .venv ready"
