#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CHANNELMERGE_VENV:-.venv}/bin/python" -m pytest -q -rs --durations=25 "$@"
