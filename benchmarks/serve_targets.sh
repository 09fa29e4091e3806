#!/usr/bin/env bash
# The serving issue's targets, measured in one go against one server on 127.0.0.1:
#   1-2. 64 held-out requests x 128 tokens, greedy, at concurrency 8: three rounds, each `--draft none` (plain batched
#        decoding) then `auto`, interleaved so that a machine that drifts slows both alike (server resident memory
#        after each round, outputs kept);
#   3. the same load with `auto` at concurrency 1;
#   4. every served text against plain decoding (benchmarks/serve_check.py: identical, tie or MISMATCH);
#   5. the served log -> `ctxdraft update-policy --force` (on a copy of the bundle) -> SIGHUP -> the reload
#      counter and the bundle hash of the next logged requests show the new policy routing.
# Usage: benchmarks/serve_targets.sh HELDOUT.jsonl OUT_DIR [BUNDLE]   (default bundle: the shipped one)
set -euo pipefail
data=${1:?usage: serve_targets.sh HELDOUT.jsonl OUT_DIR [BUNDLE]}
out=${2:?usage: serve_targets.sh HELDOUT.jsonl OUT_DIR [BUNDLE]}
src=${3:-$(python -c 'from selfdraft.serving.bundle import DEFAULT_BUNDLE_DIR; print(DEFAULT_BUNDLE_DIR)')}
port=${PORT:-8765}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
rm -rf "$out/bundle" && cp -r "$src" "$out/bundle"
rm -f "$out/traffic.jsonl"

ctxdraft serve --bundle "$out/bundle" --port "$port" --dtype bfloat16 --max-batch 8 --max-queue 128 \
    --log "$out/traffic.jsonl" >"$out/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
until curl -sf "127.0.0.1:$port/health" >/dev/null; do
    kill -0 $server 2>/dev/null || { cat "$out/server.log"; exit 1; }
    sleep 2
done
load() { python "$here/serve_load.py" --url "http://127.0.0.1:$port" --data "$data" --requests 64 \
             --max-tokens 128 --server-pid $server --json "$@"; }

for round in 1 2 3; do
    load --concurrency 8 --draft none --out "$out/served_none_$round.jsonl" >"$out/c8_none_$round.json"
    load --concurrency 8 --draft auto --out "$out/served_auto_$round.jsonl" >"$out/c8_auto_$round.json"
done
load --concurrency 1 --draft auto >"$out/c1_auto.json"

lines_before=$(wc -l <"$out/traffic.jsonl")
ctxdraft update-policy "$out/bundle" --logs "$out/traffic.jsonl" --force --json >"$out/update_policy.json"
kill -HUP $server
sleep 3
python "$here/serve_load.py" --url "http://127.0.0.1:$port" --data "$data" --requests 4 --concurrency 4 \
    --max-tokens 16 --json >"$out/after_reload.json"
curl -s "127.0.0.1:$port/metrics" | grep -E '^ctxdraft_policy_reloads' >"$out/reloads.txt"
python - "$out/traffic.jsonl" "$lines_before" >"$out/reload_check.json" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
before = {l["bundle"] for l in lines[:int(sys.argv[2])]}
after = {l["bundle"] for l in lines[int(sys.argv[2]):]}
print(json.dumps({"bundle_hashes_before": sorted(before), "bundle_hashes_after": sorted(after),
                  "routes_with_new_policy": bool(after) and not (after & before)}))
EOF
kill -TERM $server; wait $server || true
trap - EXIT
python "$here/serve_check.py" "$out"/served_auto_*.jsonl "$out"/served_none_*.jsonl --bundle "$src" \
    --dtype bfloat16 --json >"$out/check.json" || true
echo "done: $out"
