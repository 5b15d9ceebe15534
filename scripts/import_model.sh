#!/usr/bin/env bash
# Import a Stable Diffusion 1.x, 2.x or XL model into this repository (or --out DIR):
#   bash scripts/import_model.sh model.safetensors            # single-file checkpoint
#   bash scripts/import_model.sh path/to/diffusers-folder     # e.g. a clone of a Hub repo
#   bash scripts/import_model.sh owner/name                   # a Hub repo, when online
#   bash scripts/import_model.sh --add-lora style.safetensors [--name NAME] [--allow-pickle]
#                                                             # a LoRA into loras/, checked
# Every option goes to python -m model_tools.importer (see --help), or with --add-lora to
# python -m model_tools.lora_files. Sets up .venv on first use
# (scripts/setup_env.sh; minutes, once): the same environment as scripts/test.sh and
# scripts/imagine.sh, whose requirements include requirements-import.txt (peft, for --lora).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

"$repo/scripts/setup_env.sh" "$repo/.venv" >&2
module=model_tools.importer
for argument in "$@"; do
  if [ "$argument" = "--add-lora" ]; then module=model_tools.lora_files; fi
done
# Paths in the arguments stay relative to the caller's folder; the package comes from the repo.
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$repo/.venv/bin/python" -m "$module" "$@"
