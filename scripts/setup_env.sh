#!/usr/bin/env bash
# Create (or reuse) a virtual environment with everything the repo needs.
#   scripts/setup_env.sh VENV_DIR [CONSTRAINTS_FILE] [REQUIREMENTS_FILE]
# torch is installed first at the pinned CPU build, so nothing else can pull a multi-GB CUDA
# build into the test path. A stamp of the inputs makes a second run instant.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
constraints=${2:-}
requirements=${3:-requirements-dev.txt}
# torch comes from the constraints file where it pins one (the base image's own), else the CPU
# build of the newest release the suite is measured with.
pinned_torch=$( [ -n "$constraints" ] && grep -E '^torch==' "$constraints" || true)
torch_spec=${SD_TORCH_SPEC:-${pinned_torch:-torch==2.13.0}}

stamp_of() { cat "$requirements" requirements*.txt ${constraints:+"$constraints"} | sha256sum | cut -c1-16; echo "$torch_spec"; }
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$(stamp_of)" ]; then
  exit 0
fi
echo "setting up $venv${constraints:+ (constraints: $constraints)}" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$torch_spec"
"$venv/bin/python" -m pip install --quiet -r "$requirements" ${constraints:+-c "$constraints"} "$torch_spec"
if [ "$requirements" = requirements-dev.txt ]; then  # module-only test references, see the file
  "$venv/bin/python" -m pip install --quiet --no-deps -r requirements-dev-nodeps.txt
fi
stamp_of > "$venv/.stamp"
