#!/usr/bin/env bash
# Rebuild the exit heads of the shipped default bundle (SmolLM2-135M-Instruct) from a prompt file.
#
#   scripts/rebuild_default_exits.sh ../shared/data/specbench_dev.jsonl [BUNDLE_DIR]
#
# Adds (or replaces) the arms exit@10, exit@16, exit@20, exit@24 of BUNDLE_DIR (default: the package's
# selfdraft/default_bundle). One BLAS thread: on a shared 2-core machine two threads fight other jobs and
# run several times slower. ~15-25 min on 2 busy cores for the 240 Spec-Bench dev prompts.
set -euo pipefail
data="${1:?usage: $0 DATA.jsonl [BUNDLE_DIR]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
bundle="${2:-$here/selfdraft/default_bundle}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec ctxdraft add-exits smollm2-135m-instruct --layers 10,16,20,24 --head linear --draft-vocab 8192 \
    --steps 200 --self-distill-tokens 64 --eval-frac 0.2 --seed 0 --data "$data" --out "$bundle"
