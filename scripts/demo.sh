#!/usr/bin/env bash
# Set up the environment, then merge + serve + query a small default (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CHANNELMERGE_VENV:-.venv}/bin/python" scripts/demo.py "$@"
