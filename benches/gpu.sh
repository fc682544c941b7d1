#!/usr/bin/env bash
# benches/gpu.sh: rooms per GPU at a p95 latency budget, per encoder, through the libtorch
# backend (benches/gpu.rs), as one command on a machine with one GPU and PyTorch 2.11 (what
# tch 0.24 links; the GPU machines this project is checked on carry it). Finishes within
# 8 minutes on an H200 (build about 3-4 min on 16 cores, then about 1-2 min per model).
#
# For: the GPU sizing figures in docs. Not for: CPU figures (benches/encoders.rs), or
#   machines without the build's system packages (scripts/setup) and the models
#   (scripts/models, then scripts/torch for the TorchScript exports, or those folders
#   copied from a machine that ran them).
# Settings: ONAIR_GPU_BUDGET_MS (250), ONAIR_GPU_SECS (10 s per load), ONAIR_GPU_FPS (1),
#   ONAIR_GPU_CPS (5), ONAIR_GPU_START_ROOMS (4), ONAIR_GPU_MAX_BATCH (64); PYTHON picks
#   the Python whose torch to build against.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

py="${PYTHON:-python3}"
if ! libtorch="$("$py" -c 'import os, torch; assert torch.__version__.startswith("2.11"), torch.__version__; print(os.path.dirname(torch.__file__))' 2>/dev/null)"; then
  # No PyTorch 2.11 in Python: the slim CPU one scripts/torch installs.
  libtorch="$(bash scripts/torch | sed -n 's/^LIBTORCH=//p')"
fi
for f in models/image/1/model.pt models/text/1/model.pt models/text/1/tokenizer.json; do
  [[ -f "$f" ]] || { echo "gpu.sh: $f is missing: run scripts/models and scripts/torch" >&2; exit 1; }
done
export LIBTORCH="$libtorch"
# Torch's own CUDA libraries (the nvidia-* packages) sit beside it; the binary has an rpath
# to torch/lib, and these cover what libtorch_cuda loads from the nvidia folders.
nvidia="$(dirname "$libtorch")/nvidia"
if [[ -d "$nvidia" ]]; then
  LD_LIBRARY_PATH="$(find "$nvidia" -maxdepth 3 -name lib -type d | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 470 cargo bench --features torch --bench gpu
