"""Check a server's greedy outputs against plain decoding: each served text is compared with the target's own greedy
output for the same prompt (``Bundle.generate(draft="none")``, what ``ctxdraft generate`` must equal), and a
difference is classified as ``drafting/ties.py`` does for `ctxdraft bench`: a tie (both tokens within the dtype's
rounding of the target's best logit where they part) or a real MISMATCH.

    python benchmarks/serve_load.py --out served.jsonl --requests 64 --concurrency 8 --max-tokens 128 --data held.jsonl
    python benchmarks/serve_check.py served.jsonl [--bundle B] [--dtype bfloat16] [--json]

serve_load.py asks for the completions' token ids (``return_token_ids``), so outputs are compared token for token;
the served prompts are chat prompts (one user turn), as serve_load.py sends them. Exit status 1 on any real
mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ctxdraft.selfdraft.drafting.ties import compare_greedy
from ctxdraft.selfdraft.serving.bundle import load_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("served", nargs="+", help="JSONL file(s) written by serve_load.py --out")
    p.add_argument("--bundle", help="The bundle the server ran (default: the shipped one)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [{**json.loads(line), "file": path} for path in args.served
            for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{' '.join(args.served)} hold no served requests")
    bundle = load_bundle(args.bundle, dtype=args.dtype)
    target = bundle.target
    plain: dict[tuple[str, int], object] = {}
    counts = {path: {"identical": 0, "tie": 0, "mismatch": 0} for path in args.served}
    bad = []
    for row in rows:
        key = (row["prompt"], row["max_tokens"])
        if key not in plain:
            plain[key] = bundle.generate(row["prompt"], draft="none", max_new_tokens=row["max_tokens"])
        expected = plain[key]
        if row.get("token_ids") is None:
            raise SystemExit(f"{row['file']}: a served row without token_ids; load the server with serve_load.py")
        d = compare_greedy(bundle.stack, expected.prompt_ids, expected.token_ids, row["token_ids"], target.eos_ids)
        counts[row["file"]][d.kind] += 1
        if d.kind == "mismatch":
            bad.append({"file": row["file"], "prompt": row["prompt"][:60], "arm": row["arm"], "position": d.position})
    report = {"served": len(rows), "prompts": len(plain), **counts, "first_mismatches": bad[:5]}
    mismatches = sum(c["mismatch"] for c in counts.values())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>16}: {value}")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
