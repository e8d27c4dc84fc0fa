#!/usr/bin/env bash
# The GRL study of docs/results.md, from a clean checkout: rebuild the TREC QA split from ../shared/data,
# fine-tune the three study recipes with two seeds, evaluate everything, write docs/results.md and
# docs/study_curves.png. About an hour on 2 CPU cores. Interrupted? Run it again: it resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python scripts/build_bundled_data.py --source "${SHARED_DATA:-../shared/data}/trecqa"
python scripts/study.py --shared "${SHARED_DATA:-../shared/data}" "$@"
