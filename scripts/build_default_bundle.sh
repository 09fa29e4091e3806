#!/usr/bin/env bash
# Rebuild the default bundle shipped inside the package (selfdraft/default_bundle) with the project's own
# commands, from a prompt file:
#
#   scripts/build_default_bundle.sh ../shared/data/specbench_dev.jsonl [OUT_DIR] [SPLIT_DIR] [CORPUS]
#
#   0. split       75% of the prompts for training, 25% held out (stratified by domain, seed 0), written to
#                  SPLIT_DIR (default: a temporary directory) so `ctxdraft bench --data SPLIT_DIR/heldout.jsonl`
#                  measures on prompts no part of the bundle saw
#   1. add-exits   exit heads at layers 10 and 24 (linear, reduced 8192-token draft vocab) next to the base
#                  arms (none, lookup, lookup-k2, lookup-k8)
#   2. make-data   a corpus the target writes itself (docs/make_data.md): 1,900 rows of Magpie-style queries and
#                  the target's own greedy answers (<= 128 tokens), seed 0, to CORPUS (default: WORK/corpus.jsonl;
#                  an existing CORPUS is continued with --resume, so a killed build loses no rows)
#   3. add-exits   --head feature: one EAGLE-3-style feature head on layers 2, 15, 27 (arm `feature`,
#                  docs/feature_heads.md; 4096-token draft vocab, 5 unrolled draft positions) trained on the corpus
#                  alone for 720k tokens (~2.5 epochs), in bfloat16
#   4. scripts/add_tree_arms.sh  the token-tree arms (lookup-tree, successor, feature-tree, merged-n12,
#                  merged-auto, merged-ls, suffix; docs/trees.md), then every arm's exact greedy trajectory on every
#                  training prompt (128 new tokens each; the successor table and the suffix datastore cross-fitted
#                  over two halves of the training prompts, the feature head needs none: it never saw a benchmark
#                  prompt) and train-policy on those rows: stores them in trajectories.jsonl.gz (what `ctxdraft
#                  calibrate` retrains from on another machine), trains the REINFORCE policy (with its own 25% held
#                  out for the report) and exports policy.onnx
#
# Everything runs in bfloat16 (--dtype; use float32 on a CPU without native bf16). The costs the policy is trained
# with are this machine's; on another machine the bundle recalibrates itself on first use (docs/calibrate.md).
# The shipped bundle: exits from step 1 (2026-11-28, Intel Xeon, float32); the feature head from steps 2-3
# (2026-12-03, AMD EPYC, 2 cores, avx512_bf16, bfloat16); the tree arms, rows and policy from step 4 (2026-12-07,
# Intel Xeon with AMX, 2 cores, bfloat16). Time on those 2-core CPUs: step 1 ~10 min, step 2 ~55 min (one thread,
# ~35 rows/min), step 3 ~50 min, step 4 ~35 min.
#
# The bundle is built in a temporary directory and only then replaces OUT_DIR (the old one is moved aside to
# OUT_DIR.old until the new one is in place), so an interrupted run leaves the shipped bundle as it was. Rewards
# files (derived from the prompts), the corpus and add-exits' work directory are not shipped.
set -euo pipefail
data="${1:?usage: $0 DATA.jsonl [OUT_DIR] [SPLIT_DIR] [CORPUS]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${2:-$here/selfdraft/default_bundle}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
split="${3:-$work/split}"
corpus="${4:-$work/corpus.jsonl}"
bundle="$work/bundle"

python "$here/scripts/split_data.py" "$data" "$split" --heldout-frac 0.25 --seed 0
ctxdraft add-exits smollm2-135m-instruct --layers 10,24 --head linear --draft-vocab 8192 \
    --steps 200 --self-distill-tokens 64 --eval-frac 0.2 --seed 0 --data "$split/train.jsonl" --dtype bfloat16 --out "$bundle"

resume=()
[ -s "$corpus" ] && resume=(--resume)
ctxdraft make-data --out "$corpus" --rows 1900 --batch-size 32 --max-query-tokens 64 --max-answer-tokens 128 \
    --seed 0 --dtype bfloat16 "${resume[@]}"
ctxdraft add-exits --head feature --layers 2,15,27 --draft-vocab 4096 --ttt-steps 5 --lr 2e-3 \
    --self-distill-tokens 128 --use-answers --train-tokens 720000 --eval-frac 0.05 --draft-lens 1,2,3 \
    --thresholds 0 --seed 0 --dtype bfloat16 --data "$corpus" --out "$bundle"

CTXDRAFT_DTYPE=bfloat16 bash "$here/scripts/add_tree_arms.sh" "$bundle" "$split/train.jsonl" "$work/trees"

rm -rf "$bundle/rewards.jsonl" "$bundle/.add_exits_work"
rm -rf "$out.new" "$out.old" && cp -r "$bundle" "$out.new"
if [ -e "$out" ]; then mv "$out" "$out.old"; fi
mv "$out.new" "$out" && rm -rf "$out.old"
echo "default bundle written to $out"
