#!/usr/bin/env bash
# collect with 1 process x 2 threads, then torchrun 2 ranks x 1 thread, on the same prompts; prints both timings
# and whether the merged trajectories are identical (docs/distributed.md quotes a run of it):
#
#   scripts/torchrun_bench.sh TRAIN.jsonl [PER_DOMAIN=4] [MAX_NEW_TOKENS=64] [DTYPE=bfloat16]
set -euo pipefail
data="${1:?usage: $0 TRAIN.jsonl [PER_DOMAIN] [MAX_NEW_TOKENS] [DTYPE]}"
per_domain="${2:-4}"; max_new="${3:-64}"; dtype="${4:-bfloat16}"
bundle="$(python -c 'from ctxdraft.selfdraft.serving.bundle import DEFAULT_BUNDLE_DIR; print(DEFAULT_BUNDLE_DIR)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
python - "$data" "$per_domain" <<'PY'
import json, sys
from ctxdraft.selfdraft.base.data import first_per_domain, read_prompts
rows = first_per_domain(read_prompts(sys.argv[1]), int(sys.argv[2]))
open("prompts.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
print(f"{len(rows)} prompts", file=sys.stderr)
PY
cp -r "$bundle" b1; cp -r "$bundle" b2
t0=$(date +%s.%N)
OMP_NUM_THREADS=2 ctxdraft collect b1 --data prompts.jsonl --out r1.jsonl --max-new-tokens "$max_new" --dtype "$dtype" > /dev/null
t1=$(date +%s.%N)
OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 --no-python \
    ctxdraft collect b2 --data prompts.jsonl --out r2.jsonl --max-new-tokens "$max_new" --dtype "$dtype" > /dev/null
t2=$(date +%s.%N)
python - "$t0" "$t1" "$t2" <<'PY'
import json, sys
t0, t1, t2 = map(float, sys.argv[1:])
a = [json.loads(l) for l in open("r1.jsonl")]
b = [json.loads(l) for l in open("r2.jsonl")]
same = [x["id"] for x in a] == [y["id"] for y in b] and all(
    {k: v["trajectory"] for k, v in x["arms"].items()} == {k: v["trajectory"] for k, v in y["arms"].items()}
    for x, y in zip(a, b))
print(json.dumps({"one_process_2_threads_s": round(t1 - t0, 1), "torchrun_2x1_s": round(t2 - t1, 1),
                  "speedup": round((t1 - t0) / (t2 - t1), 2), "rows": [len(a), len(b)], "identical_trajectories": same}))
PY
