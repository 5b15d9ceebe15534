#!/usr/bin/env bash
# The one prepared GPU check (model_tools/gpu_check.py): GPU-marked tests, then full-size SD 1.5
# (512x512, 25 steps) and SDXL base (1024x1024, 30 steps) in float16, stock diffusers vs the
# handler's settings, and an out-of-memory check; everything in one JSON file. A deadline
# (--minutes, default 9) skips what would not fit, saying so.
#   scripts/gpu_check.sh --download     # here, once: wheels for a GPU machine into .gpu-wheels/
#   scripts/gpu_check.sh [OUT_DIR]      # there: needs CUDA torch, transformers, accelerate
# A GPU machine without diffusers, pydantic or peft (for the shipped LoRA) gets them from
# .gpu-wheels/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ "${1:-}" = "--download" ]; then
  # Python 3.12 wheels (the GPU image's Python), without dependencies: that image has the rest.
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu-wheels diffusers==0.42.1 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 importlib-metadata==10.2.0 \
    peft==0.21.2
  exit 0
fi
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
if ! "$python" -c "import diffusers, pydantic, peft" 2>/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .gpu-wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$python" -m model_tools.gpu_check --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
