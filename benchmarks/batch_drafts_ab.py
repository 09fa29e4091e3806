"""Batch draft lengths, A/B: the same B prompts decoded by ``generate_batch`` with the draft lengths the cost model
chooses per batch width (``Bundle.batch_decoder``) and with every row drafting its arm's full length, interleaved
round by round on one loaded model; aggregate tokens/s of each and their ratio (medians over rounds).

    python benchmarks/batch_drafts_ab.py --data held8.jsonl --batch 8 --rounds 3 [--bundle B] [--draft auto]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ctxdraft.selfdraft.drafting.batch_decoding import BatchDecoder
from ctxdraft.selfdraft.serving.batch import generate_batch
from ctxdraft.selfdraft.serving.bundle import load_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="JSONL with a 'prompt' field per line")
    p.add_argument("--bundle")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--draft", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    prompts = [json.loads(line)["prompt"] for line in Path(args.data).read_text().splitlines() if line.strip()]
    prompts = prompts[: args.batch]
    bundle = load_bundle(args.bundle, dtype=args.dtype)
    costed = bundle.batch_decoder

    def full(max_batch: int) -> BatchDecoder:
        return BatchDecoder(bundle.stack, max_batch=max_batch, max_context=bundle.target.max_context)

    ways = {"cost model": costed, "full length": full}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    drafted: dict[str, float] = {}
    generate_batch(bundle, prompts[:2], draft=args.draft, max_new_tokens=8, max_batch=args.batch)  # warm-up
    for round_ in range(args.rounds):
        for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            bundle.batch_decoder = ways[name]
            t0 = time.perf_counter()
            results = generate_batch(bundle, prompts, draft=args.draft, max_new_tokens=args.max_new_tokens,
                                     max_batch=args.batch)
            seconds = time.perf_counter() - t0
            rates[name].append(sum(len(r.token_ids) for r in results) / seconds)
            drafted[name] = (sum(r.stats.nodes_verified for r in results)
                             / max(1, sum(r.stats.target_forwards for r in results)))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(json.dumps({"batch": args.batch, "prompts": len(prompts), "draft": args.draft, "rounds": args.rounds,
                      "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                      "median_tokens_per_s": {k: round(v, 1) for k, v in medians.items()},
                      "drafted_per_row_step": {k: round(v, 2) for k, v in drafted.items()},
                      "cost_model_over_full": round(medians["cost model"] / medians["full length"], 3)}, indent=2))


if __name__ == "__main__":
    main()
