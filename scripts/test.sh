#!/usr/bin/env bash
# Run the whole test suite on a fresh machine (Python 3.11 and pip are all it needs):
# lint, then pytest against the newest releases and against the endpoint base image's
# diffusers/transformers/accelerate. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv
scripts/setup_env.sh .venv-base constraints/base-image.txt
# Hugging Face's hf-endpoints-emulator needs starlette<0.38, which the local server's FastAPI
# cannot share: its own environment, for tests/test_emulator.py.
scripts/setup_env.sh .venv-emulator "" requirements-emulator.txt

# tests/test_page.py drives the playground page in Debian's Chromium (Playwright's own browser
# download is unreachable from CI); CI runs as root, elsewhere those tests skip without it.
if ! command -v chromium >/dev/null && [ "$(id -u)" -eq 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi

# Tests make small images, where one thread per process is fastest, and the suite runs
# servers beside the test process: more threads than cores would only fight each other.
export SD_NUM_THREADS=${SD_NUM_THREADS:-1}

.venv/bin/ruff check .
.venv/bin/ruff format --check .

run_pytest() {  # pytest exits 5 when it collected nothing: that is a failure here, not a pass
  local python=$1 other=$2; shift 2
  local rc=0
  SD_OTHER_PYTHON="$other" "$python" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; return 1; fi
  return "$rc"
}
echo "== newest releases" >&2
run_pytest .venv/bin/python "$PWD/.venv-base/bin/python" "$@"
echo "== endpoint base image versions" >&2
run_pytest .venv-base/bin/python "$PWD/.venv/bin/python" "$@"
