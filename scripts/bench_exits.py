"""Wall-clock check of exit arms against plain decoding, per domain, on add-exits' held-out prompts.

    OMP_NUM_THREADS=1 python scripts/bench_exits.py BUNDLE DATA.jsonl [--per-domain 4] [--max-new-tokens 64]

Every prompt runs every method before the next prompt starts and the order rotates from prompt to prompt,
so load from other jobs hits every method alike. Greedy: each exit arm's output is checked against `none`.
Prints per domain the median tokens/s of each method and the exit arms' acceptance (accepted / drafted).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ctxdraft.selfdraft.bundle import load_bundle
from ctxdraft.selfdraft.fileio import read_json, read_prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("data")
    ap.add_argument("--per-domain", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--arms", default=None, help="comma-separated; default: none + every exit arm")
    ap.add_argument("--out", default=None, help="write the per-prompt rows and the summary here (JSON)")
    args = ap.parse_args(argv)

    bundle = load_bundle(args.bundle)
    report = read_json(Path(args.bundle) / "reports" / "add_exits.json", "add-exits report")
    held = {str(i) for i in report["data"]["heldout_ids"]}
    rows = [r for r in read_prompts(args.data) if str(r["id"]) in held]
    picked, seen = [], {}
    for r in rows:
        if seen.get(r["domain"], 0) < args.per_domain:
            seen[r["domain"]] = seen.get(r["domain"], 0) + 1
            picked.append(r)
    arms = args.arms.split(",") if args.arms else ["none"] + [a for a in bundle.arms if a.startswith("exit@")]
    bundle.generate("Hello", draft="none", max_new_tokens=8)  # warm-up
    for arm in arms:
        bundle.draft(arm)

    results = []
    for n, row in enumerate(picked):
        order = arms[n % len(arms):] + arms[: n % len(arms)]
        outs = {}
        for arm in order:
            res = bundle.generate(row["prompt"], draft=arm, max_new_tokens=args.max_new_tokens)
            outs[arm] = res
        ref = outs["none"].token_ids if "none" in outs else None
        for arm, res in outs.items():
            s = res.stats
            results.append({"id": row["id"], "domain": row["domain"], "arm": arm, "tokens_per_s": s.tokens_per_s,
                            "drafted": s.drafted_tokens, "accepted": s.accepted_tokens, "new_tokens": s.new_tokens,
                            "same_as_none": ref is None or res.token_ids == ref})
        print(f"[{n + 1}/{len(picked)}] {row['domain']}: " + "  ".join(
            f"{a} {outs[a].stats.tokens_per_s:.1f}" for a in arms), file=sys.stderr, flush=True)

    summary = {}
    domains = sorted({r["domain"] for r in results})
    for domain in domains + ["overall"]:
        mine = [r for r in results if domain == "overall" or r["domain"] == domain]
        summary[domain] = {}
        for arm in arms:
            rs = [r for r in mine if r["arm"] == arm]
            drafted = sum(r["drafted"] for r in rs)
            summary[domain][arm] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "acceptance": sum(r["accepted"] for r in rs) / drafted if drafted else None,
                "prompts": len(rs),
            }
    mismatches = [r for r in results if not r["same_as_none"]]
    header = f"{'domain':<16}" + "".join(f"{a:>18}" for a in arms)
    print(header)
    for domain, by_arm in summary.items():
        cells = []
        for arm in arms:
            s = by_arm[arm]
            acc = f" ({s['acceptance']:.0%})" if s["acceptance"] is not None else ""
            cells.append(f"{s['tokens_per_s']:.1f} tok/s{acc}".rjust(18))
        print(f"{domain:<16}" + "".join(cells))
    print(f"greedy outputs identical to none: {len(results) - len(mismatches)}/{len(results)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": results, "mismatches": len(mismatches)}, indent=2))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
