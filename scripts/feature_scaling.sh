#!/usr/bin/env bash
# The feature head's data-scaling curve (docs/feature_heads.md, issue 22): a corpus the models write themselves
# (`ctxdraft make-data`), nested prefixes of it, one feature head per prefix trained for the SAME token budget,
# and every head's acceptance on held-out prompts none of them saw (benchmarks/head_acceptance.py):
#
#   scripts/feature_scaling.sh HELDOUT.jsonl WORK_DIR [ROWS ...]
#
#   HELDOUT.jsonl  the prompts to score on (e.g. the held-out split of scripts/split_data.py); never trained on
#   WORK_DIR       corpus, bundles and results go here; a second run reuses the corpus (make-data --resume)
#   ROWS           corpus rows per head (default: 96 320 950 1900, about 14k, 46k, 140k and 290k training
#                  positions of SmolLM2-135M-Instruct's own answers)
#
# Every step runs in bfloat16 with one torch thread per process (two processes share a 2-core machine well).
# Time on a 2-core AMD EPYC: make-data ~50 rows per minute; each head ~11-20 min (240k training tokens).
set -euo pipefail
heldout="${1:?usage: $0 HELDOUT.jsonl WORK_DIR [ROWS ...]}"
work="${2:?usage: $0 HELDOUT.jsonl WORK_DIR [ROWS ...]}"
shift 2
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(96 320 950 1900)
here="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$work"
export OMP_NUM_THREADS=1
largest=$(printf '%s\n' "${sizes[@]}" | sort -n | tail -1)
resume=()
[ -s "$work/corpus.jsonl" ] && resume=(--resume)
ctxdraft make-data --out "$work/corpus.jsonl" --rows "$largest" --batch-size 32 --max-query-tokens 64 \
    --max-answer-tokens 128 --threads 1 --dtype bfloat16 --seed 0 "${resume[@]}" --json
heads=()
for rows in "${sizes[@]}"; do
    head -n "$rows" "$work/corpus.jsonl" > "$work/c$rows.jsonl"
    ctxdraft add-exits --head feature --layers 2,15,27 --draft-vocab 4096 --ttt-steps 5 --lr 2e-3 \
        --self-distill-tokens 128 --use-answers --train-tokens 240000 --eval-frac 0.05 --draft-lens 1,2,3 \
        --thresholds 0 --dtype bfloat16 --data "$work/c$rows.jsonl" --out "$work/b$rows" --json > "$work/b$rows.json"
    heads+=(--head "rows$rows=$work/b$rows")
done
python "$here/benchmarks/head_acceptance.py" --data "$heldout" --threads 1 --dtype bfloat16 \
    --head "shipped=$here/selfdraft/default_bundle" --baseline shipped "${heads[@]}" --out "$work/feature_scaling"
echo "curve: $work/feature_scaling.md, $work/feature_scaling.png"
