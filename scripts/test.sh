#!/usr/bin/env bash
# The test command of README.md and .ci/run: the whole suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two test workers on the 2 cores, one thread each (the tests' tiny models gain nothing from threads, and
# two processes that each start 2 OpenMP threads on 2 cores slow each other down about 10x).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -n "${ULLME_TEST_WORKERS:-2}" --durations=30 "$@"
