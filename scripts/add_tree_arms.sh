#!/usr/bin/env bash
# Give a bundle the token-tree arms and a policy trained with them, with the project's own commands:
#
#   scripts/add_tree_arms.sh BUNDLE_DIR TRAIN.jsonl [WORK_DIR]
#
#   1. add-arm     lookup-tree (depth 5, nodes from the machine's costs), successor (depth 6, auto, top-4),
#                  feature-tree (the bundle's feature head as an EAGLE-2 tree: depth 5, 16 nodes, top-4),
#                  merged-n12 / merged-auto (lookup + successor table + feature head, one tree per step; 12
#                  nodes, or as many as this machine's costs pay for), merged-ls (lookup + successor table only,
#                  nodes from the costs: no model work to draft) and suffix (request + datastore); the successor
#                  table and the suffix datastore are built from the target's greedy continuations of TRAIN's
#                  prompts (32 tokens each)
#   2. cross-fit   the successor table and the datastore remember the prompts they were built from, so a copy
#                  built from half A of TRAIN collects every arm's trajectories on half B and one built from B
#                  collects on A (128 new tokens each); a datastore that holds a prompt's own answer would make
#                  `suffix` look perfect on it. The feature head (trained on all of TRAIN by add-exits) is not
#                  cross-fitted here: feature-tree and merged rows are optimistic on TRAIN (docs/trees.md).
#                  Each copy measures its cost profile alone, with every thread (the first rows of its collection),
#                  before the parallel collection: `--max-nodes auto` arms size their trees with that profile, and
#                  one timed while three jobs share two cores is noise (steps over 4 positions timed cheaper than
#                  one), so the rows would hold trees no served bundle would build.
#   3. train-policy  on the cross-fitted rows of all of TRAIN (stored in trajectories.jsonl.gz).
#
# Runs in bfloat16 (CTXDRAFT_DTYPE / --dtype). The bundle is changed in place only at the end (add-arm and
# train-policy write atomically); an interrupted run leaves WORK_DIR to inspect.
set -euo pipefail
bundle="${1:?usage: $0 BUNDLE_DIR TRAIN.jsonl [WORK_DIR]}"
train="${2:?usage: $0 BUNDLE_DIR TRAIN.jsonl [WORK_DIR]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${3:-$(mktemp -d)}"
mkdir -p "$work"
dtype="${CTXDRAFT_DTYPE:-bfloat16}"

add_tree_arms() {  # add_tree_arms BUNDLE PROMPTS: the tree arms, table and datastore built from PROMPTS
    local b="$1" data="$2"
    ctxdraft add-arm "$b" --kind lookup-tree --name lookup-tree --draft-len 5 --max-nodes auto
    ctxdraft add-arm "$b" --kind successor --name successor --draft-len 6 --max-nodes auto --top-k 4 \
        --data "$data" --max-new-tokens 32
    ctxdraft add-arm "$b" --kind feature-tree --name feature-tree --draft-len 5 --max-nodes 16 --top-k 4
    ctxdraft add-arm "$b" --kind merged --name merged-n12 --draft-len 5 --max-nodes 12 --top-k 4
    ctxdraft add-arm "$b" --kind merged --name merged-auto --draft-len 6 --max-nodes auto --top-k 4
    ctxdraft add-arm "$b" --kind merged --name merged-ls --draft-len 6 --max-nodes auto --top-k 4 --sources lookup,successor
    ctxdraft add-arm "$b" --kind suffix --name suffix --draft-len 8 --data "$data" --max-new-tokens 32
}

python "$here/scripts/split_data.py" "$train" "$work/halves" --heldout-frac 0.5 --seed 0
for half in A B; do
    other=$([ "$half" = A ] && echo B || echo A)
    file=$([ "$half" = A ] && echo train || echo heldout)
    cp "$work/halves/$file.jsonl" "$work/$half.jsonl"
done
build_half() {  # build_half A|B: a copy with the table and datastore built from that half
    local half="$1"
    [ -e "$work/from_$half.done" ] && return 0
    rm -rf "$work/from_$half" && cp -r "$bundle" "$work/from_$half"
    add_tree_arms "$work/from_$half" "$work/$half.jsonl" > "$work/from_$half.log" 2>&1
    touch "$work/from_$half.done"
}
collect_half() {  # collect_half A|B [COLLECT OPTIONS]: the copy built from that half collects on the other
    local half="$1" other
    other=$([ "$half" = A ] && echo B || echo A)
    shift
    [ -e "$work/rewards_$other.done" ] && return 0
    ctxdraft collect "$work/from_$half" --out "$work/rewards_$other.jsonl" --max-new-tokens 128 --dtype "$dtype" \
        --resume "$@" >> "$work/from_$half.log" 2>&1
}
final_bundle() {  # the bundle itself: table and datastore from all of TRAIN
    [ -e "$work/final.done" ] && return 0
    rm -rf "$work/final" && cp -r "$bundle" "$work/final"
    add_tree_arms "$work/final" "$train" > "$work/final.log" 2>&1
    touch "$work/final.done"
}
# Three single-threaded jobs at once: on a small CPU one thread per job wastes less than two threads spin-waiting.
threads="${OMP_NUM_THREADS:-}"
export OMP_NUM_THREADS=1
build_half A & a=$!
build_half B & b=$!
final_bundle & f=$!
wait $a && wait $b && wait $f
# The cost profiles, one job at a time with the machine's threads: every 8th prompt of the other half, so the
# profile's context length is a typical one.
for half in A B; do
    other=$([ "$half" = A ] && echo B || echo A)
    [ -e "$work/profile_$other.done" ] && continue
    awk 'NR % 8 == 1' "$work/$other.jsonl" > "$work/profile_$other.jsonl"
    rm -f "$work/rewards_$other.jsonl"
    (if [ -n "$threads" ]; then export OMP_NUM_THREADS="$threads"; else unset OMP_NUM_THREADS; fi
     collect_half "$half" --data "$work/profile_$other.jsonl" --reprofile)
    touch "$work/profile_$other.done"
done
pids=()
for half in A B; do
    other=$([ "$half" = A ] && echo B || echo A)
    collect_half "$half" --data "$work/$other.jsonl" & pids+=($!)
done
wait "${pids[0]}" && wait "${pids[1]}"
touch "$work/rewards_A.done" "$work/rewards_B.done"
cat "$work/rewards_A.jsonl" "$work/rewards_B.jsonl" > "$work/rewards.jsonl"
ctxdraft train-policy "$work/final" --rewards "$work/rewards.jsonl" --features hidden --eval-frac 0.25 --seed 0 \
    --dtype "$dtype"
rm -rf "$work/final/rewards.jsonl"
rm -rf "$bundle.new" && cp -r "$work/final" "$bundle.new" && rm -rf "$bundle.old" && mv "$bundle" "$bundle.old" \
    && mv "$bundle.new" "$bundle" && rm -rf "$bundle.old"
echo "tree arms and their policy written to $bundle"
