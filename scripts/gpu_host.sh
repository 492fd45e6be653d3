#!/usr/bin/env bash
# Run the gpu notebook profile and the benchmark on an offline GPU host (README, "On a GPU").
# Prepare on a machine with pip access, from the project root:
#     bash scripts/wheelhouse.sh diffusers importlib_metadata      # -> .whl/ (git-ignored)
# copy the tree with .whl/ to the host, then there:
#     bash scripts/gpu_host.sh [OUT_DIR] [all|suite|bench]           # default outputs/gpu, all
# Everything lands in OUT_DIR: the executed suite (runs/gpu/...), bench JSON + markdown, logs.
# `suite` / `bench` run one half (a device lease that limits each command to 10 minutes can run
# them as two calls).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu}
what=${2:-all}
case "$what" in all|suite|bench) ;; *) echo "gpu_host.sh: second argument must be all, suite or bench, got '$what'" >&2; exit 2;; esac
mkdir -p "$out"
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_host.sh: no wheels in .whl/: run bash scripts/wheelhouse.sh on a machine with pip access first" >&2; exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
status=0
if [[ $what != bench ]]; then
    ( time python3 -m nbcore.runner run --profile gpu --out-root "$out/runs" ) 2>&1 | tee "$out/suite.log" || status=1
fi
if [[ $what != suite ]]; then
    python3 -m nbcore.bench --json "$out/bench-production.json" --device cuda --steps 50 --warmup 10 --batch 32 \
        2>&1 | tee "$out/bench.log" || status=1
fi
exit $status
