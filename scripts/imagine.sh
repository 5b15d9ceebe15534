#!/usr/bin/env bash
# Prompt in, image out, through the same path a deployed endpoint takes:
#   bash scripts/imagine.sh "a red circle on a white background" -o out.png [client options]
# Sets up .venv on first use (scripts/setup_env.sh; minutes, once), starts the local server
# (python -m sd_endpoint.server) on a free loopback port with a one-off bearer token, waits
# until /health says the model is loaded, runs the client (python -m sd_endpoint.client, which
# takes every request field as an option: see --help), then stops the server.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python="$repo/.venv/bin/python"

# The same environment as scripts/test.sh, so neither reinstalls after the other.
"$repo/scripts/setup_env.sh" "$repo/.venv" >&2

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m sd_endpoint.client --help
fi

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
log=$(mktemp "${TMPDIR:-/tmp}/sd-server.XXXXXX.log")
SD_API_TOKEN=${SD_API_TOKEN:-$("$python" -c 'import secrets; print(secrets.token_urlsafe(24))')}
export SD_API_TOKEN  # read by both the server and the client, never on a command line

echo "starting the local server on $url (log: $log)" >&2
(cd "$repo" && exec "$python" -m sd_endpoint.server --port "$port") >"$log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
}
trap stop_server EXIT

echo "loading the model..." >&2
until "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$url/health" 2>/dev/null; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server stopped while starting; its log ($log):" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done

# The client runs from the caller's folder, so `-o out.png` lands where the caller expects.
status=0
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m sd_endpoint.client --url "$url" "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "the server's log is in $log" >&2
else
  rm -f "$log"
fi
exit "$status"
