#!/usr/bin/env bash
# The studies of docs/results.md, from a clean checkout. Each writes its own section of docs/results.md;
# interrupted? Run it again: finished fine-tunes and evaluations are reused, an interrupted fine-tune resumes.
#   bash scripts/reproduce.sh            both studies
#   bash scripts/reproduce.sh first      the GRL study on TREC QA (about an hour on 2 AMX CPU cores)
#   bash scripts/reproduce.sh multitask  the multi-task study with ablations and intervals (issue 15;
#                                        about 4-5 hours on 2 CPU cores without fast bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SHARED="${SHARED_DATA:-../shared/data}"
which="${1:-all}"
[ $# -gt 0 ] && shift
if [ "$which" = all ] || [ "$which" = first ]; then
  python scripts/build_bundled_data.py --source "$SHARED/trecqa"
  python scripts/study.py --shared "$SHARED"
fi
if [ "$which" = all ] || [ "$which" = multitask ]; then
  [ -f study-data/train.jsonl ] || python scripts/build_study_data.py --shared "$SHARED" -o study-data
  python scripts/multitask_study.py --shared "$SHARED" "$@"
fi
