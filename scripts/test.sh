#!/usr/bin/env bash
# The test command of README.md and .ci/run: the whole suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
