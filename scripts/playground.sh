#!/usr/bin/env bash
# The playground page: set up .venv on first use, then serve this repo on loopback and print
# the page's URL (open it in a browser; Ctrl-C stops the server):
#   bash scripts/playground.sh [--port 8000] [other python -m sd_endpoint.server options]
# No token is needed on loopback; with SD_API_TOKEN set, the page asks for it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup_env.sh" "$repo/.venv" >&2
cd "$repo"
exec "$repo/.venv/bin/python" -m sd_endpoint.server "$@"
