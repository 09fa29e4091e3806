#!/usr/bin/env bash
# The shipped default bundle plus one EAGLE-3-style feature head, with trajectories and a policy over the whole
# pool (docs/feature_heads.md quotes a run of it). Not shipped: the head adds 20 MB of float32 weights.
#
#   scripts/build_feature_bundle.sh ../shared/data/specbench_dev.jsonl OUT_DIR [SPLIT_DIR]
#
#   0. split         as build_default_bundle.sh (75/25 by domain, seed 0)
#   1. add-exits     --head feature on layers 2, 15, 27 (draft vocab 4096, 5 unrolled positions, 400 steps)
#   2. train-policy  collects all seven arms on the 180 training prompts (128 new tokens) and trains the policy
#   3. calibrate     this machine's costs (the collect may have run on a busy machine)
#
# Time on a 2-core AMD EPYC in bfloat16: add-exits ~16 min, collect ~20 min.
set -euo pipefail
data="${1:?usage: $0 DATA.jsonl OUT_DIR [SPLIT_DIR]}"
out="${2:?usage: $0 DATA.jsonl OUT_DIR [SPLIT_DIR]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
split="${3:-$out.split}"
python "$here/scripts/split_data.py" "$data" "$split" --heldout-frac 0.25 --seed 0
rm -rf "$out" && cp -r "$(python -c 'from ctxdraft.selfdraft.bundle import DEFAULT_BUNDLE_DIR; print(DEFAULT_BUNDLE_DIR)')" "$out"
rm -f "$out/trajectories.jsonl.gz"
ctxdraft add-exits --head feature --layers 2,15,27 --draft-vocab 4096 --ttt-steps 5 --steps 400 --lr 2e-3 \
    --self-distill-tokens 96 --seed 0 --dtype bfloat16 --data "$split/train.jsonl" --out "$out"
ctxdraft train-policy "$out" --data "$split/train.jsonl" --max-new-tokens 128 --dtype bfloat16 --features hidden \
    --eval-frac 0.25 --seed 0
rm -rf "$out/rewards.jsonl" "$out/.add_exits_work"
ctxdraft calibrate --bundle "$out" --dtype bfloat16
echo "bundle with a feature head written to $out"
