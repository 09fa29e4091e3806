#!/usr/bin/env bash
# Rebuild the default bundle shipped inside the package (selfdraft/default_bundle) with the project's own
# commands, from a prompt file:
#
#   scripts/build_default_bundle.sh ../shared/data/specbench_dev.jsonl [OUT_DIR] [SPLIT_DIR]
#
#   0. split       75% of the prompts for training, 25% held out (stratified by domain, seed 0), written to
#                  SPLIT_DIR (default: a temporary directory) so `ctxdraft bench --data SPLIT_DIR/heldout.jsonl`
#                  measures on prompts neither the exits nor the policy saw
#   1. add-exits   exit heads at layers 10 and 24 (linear, reduced 8192-token draft vocab) next to the base
#                  arms (none, lookup, lookup-k2, lookup-k8)
#   2. train-policy  collects every arm's trajectory on every training prompt (128 new tokens), stores them in
#                  trajectories.jsonl.gz (what `ctxdraft calibrate` retrains from on another machine), trains the
#                  REINFORCE policy (with its own 25% held out for the report) and exports policy.onnx
#
# Everything runs in bfloat16 (--dtype; use float32 on a CPU without native bf16). The costs the policy is trained
# with are this machine's; on another machine the bundle recalibrates itself on first use (docs/calibrate.md).
# The shipped bundle: exits from this add-exits command (2026-11-28, Intel Xeon, float32); trajectories and policy
# from a bfloat16 collect on an AMD EPYC (2 cores, avx512_bf16) on 2026-11-29, rows of the 180 training prompts.
# Time on that 2-core CPU: add-exits ~10 min, collect ~20 min.
#
# The bundle is built in a temporary directory and only then replaces OUT_DIR, so an interrupted run leaves the
# shipped bundle as it was. rewards.jsonl (derived from the prompts) is not shipped.
set -euo pipefail
data="${1:?usage: $0 DATA.jsonl [OUT_DIR] [SPLIT_DIR]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${2:-$here/selfdraft/default_bundle}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
split="${3:-$work/split}"

python "$here/scripts/split_data.py" "$data" "$split" --heldout-frac 0.25 --seed 0
ctxdraft add-exits smollm2-135m-instruct --layers 10,24 --head linear --draft-vocab 8192 \
    --steps 200 --self-distill-tokens 64 --eval-frac 0.2 --seed 0 --data "$split/train.jsonl" --dtype bfloat16 --out "$work/bundle"
ctxdraft train-policy "$work/bundle" --data "$split/train.jsonl" --max-new-tokens 128 --features hidden \
    --eval-frac 0.25 --seed 0 --wallclock-sample 4 --dtype bfloat16

rm -rf "$work/bundle/rewards.jsonl" "$work/bundle/.add_exits_work"
rm -rf "$out.new" && cp -r "$work/bundle" "$out.new"
rm -rf "$out" && mv "$out.new" "$out"
echo "default bundle written to $out"
