#!/usr/bin/env bash
# Rebuild the default bundle shipped inside the package (selfdraft/default_bundle) with the project's own
# commands, from a prompt file:
#
#   scripts/build_default_bundle.sh ../shared/data/specbench_dev.jsonl [OUT_DIR] [SPLIT_DIR]
#
#   0. split       75% of the prompts for training, 25% held out (stratified by domain, seed 0), written to
#                  SPLIT_DIR (default: a temporary directory) so `ctxdraft bench --data SPLIT_DIR/heldout.jsonl`
#                  measures on prompts no part of the bundle saw
#   1. add-exits   exit heads at layers 10 and 24 (linear, reduced 8192-token draft vocab) next to the base
#                  arms (none, lookup, lookup-k2, lookup-k8)
#   2. add-exits   --head feature: one EAGLE-3-style feature head on layers 2, 15, 27 (arm `feature`,
#                  docs/feature_heads.md; 4096-token draft vocab, 400 steps, 5 unrolled draft positions), trained
#                  and stored in bfloat16
#   3. cross-fit   the training prompts in two halves A and B; a copy of the bundle whose feature head is
#                  trained the same way on A only (scored with step 2's draft length and stop) collects every
#                  arm's trajectory on B (128 new tokens each, plus a wall-clock check on 2 prompts), and one
#                  trained on B collects on A. A head's trajectories on its own training prompts overstate it
#                  (1.49 tokens per forward there, 1.26 on held-out prompts), and a policy trained on them
#                  over-routes to it. The other arms' trajectories do not depend on it.
#   4. train-policy  on the cross-fitted rows of all training prompts (128 new tokens each): stores them in
#                  trajectories.jsonl.gz (what `ctxdraft calibrate` retrains from on another machine), trains the
#                  REINFORCE policy (with its own 25% held out for the report) and exports policy.onnx
#
# Everything runs in bfloat16 (--dtype; use float32 on a CPU without native bf16). The costs the policy is trained
# with are this machine's; on another machine the bundle recalibrates itself on first use (docs/calibrate.md).
# The shipped bundle: exits from step 1 (2026-11-28, Intel Xeon, float32), the feature head from step 2 and the
# rows and policy from steps 3-4 (2026-11-29, AMD EPYC, 2 cores, avx512_bf16, bfloat16).
# Time on that 2-core CPU: step 1 ~10 min, step 2 ~16 min, step 3 ~45 min (each half: add-exits ~12 min,
# collect ~10 min).
#
# The bundle is built in a temporary directory and only then replaces OUT_DIR (the old one is moved aside to
# OUT_DIR.old until the new one is in place), so an interrupted run leaves the shipped bundle as it was. Rewards
# files (derived from the prompts) and add-exits' work directory are not shipped.
set -euo pipefail
data="${1:?usage: $0 DATA.jsonl [OUT_DIR] [SPLIT_DIR]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${2:-$here/selfdraft/default_bundle}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
split="${3:-$work/split}"
bundle="$work/bundle"
feature_flags=(--head feature --layers 2,15,27 --draft-vocab 4096 --ttt-steps 5 --steps 400 --lr 2e-3
               --self-distill-tokens 96 --seed 0 --dtype bfloat16)
feature_setting() {  # feature_setting BUNDLE_DIR FIELD: a setting of the bundle's `feature` arm
    python -c 'import json, sys; arms = {a["name"]: a for a in json.load(open(sys.argv[1] + "/bundle.json"))["arms"]}
print(arms["feature"]["settings"][sys.argv[2]])' "$1" "$2"
}

python "$here/scripts/split_data.py" "$data" "$split" --heldout-frac 0.25 --seed 0
ctxdraft add-exits smollm2-135m-instruct --layers 10,24 --head linear --draft-vocab 8192 \
    --steps 200 --self-distill-tokens 64 --eval-frac 0.2 --seed 0 --data "$split/train.jsonl" --dtype bfloat16 --out "$bundle"
ctxdraft add-exits "${feature_flags[@]}" --data "$split/train.jsonl" --out "$bundle"

python "$here/scripts/split_data.py" "$split/train.jsonl" "$work/halves" --heldout-frac 0.5 --seed 0
mv "$work/halves/train.jsonl" "$work/A.jsonl" && mv "$work/halves/heldout.jsonl" "$work/B.jsonl"
for half in A B; do
    other=$([ "$half" = A ] && echo B || echo A)
    cp -r "$bundle" "$work/head_$half"
    ctxdraft add-exits "${feature_flags[@]}" --draft-lens "$(feature_setting "$bundle" draft_len)" \
        --thresholds "$(feature_setting "$bundle" threshold)" --data "$work/$half.jsonl" --out "$work/head_$half"
    ctxdraft collect "$work/head_$half" --data "$work/$other.jsonl" --out "$work/rewards_$other.jsonl" \
        --max-new-tokens 128 --wallclock-sample 2 --dtype bfloat16
done
cat "$work/rewards_A.jsonl" "$work/rewards_B.jsonl" > "$work/rewards.jsonl"
ctxdraft train-policy "$bundle" --rewards "$work/rewards.jsonl" --features hidden --eval-frac 0.25 --seed 0 --dtype bfloat16

rm -rf "$bundle/rewards.jsonl" "$bundle/.add_exits_work"
rm -rf "$out.new" "$out.old" && cp -r "$bundle" "$out.new"
if [ -e "$out" ]; then mv "$out" "$out.old"; fi
mv "$out.new" "$out" && rm -rf "$out.old"
echo "default bundle written to $out"
