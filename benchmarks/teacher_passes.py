"""Teacher passes over a corpus: one forward per sequence (``teacher_pass``) against right-padded batches
(``teacher_passes``, what add-exits runs on training text), interleaved rounds on the same rows.

    python benchmarks/teacher_passes.py --data corpus.jsonl --rows 64 --rounds 3 --dtype bfloat16 --threads 1

Each row is prompt (chat template) + its ``text`` answer cut to ``--answer-tokens``; the passes keep the states of
``--layers``, the LM head input and the top-64 teacher, as add-exits does. Prints positions per second of each way
per round, their medians and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctxdraft.selfdraft.base.data import read_prompts
from ctxdraft.selfdraft.learning.head_data import encode_prompt
from ctxdraft.selfdraft.learning.trajectories import teacher_pass, teacher_passes
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.runtime.target import DEFAULT_TARGET, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="make-data rows (prompt + text)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--layers", default="2,15,27")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target, dtype=args.dtype)
    stack = LayerStack(target.model)
    rows = [r for r in read_prompts(args.data) if isinstance(r.get("answer"), str)][: args.rows]
    items = []
    for row in rows:
        answer = target.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        ended = bool(row.get("answer_ended")) and len(answer) < args.answer_tokens  # as add-exits reads a row
        items.append((encode_prompt(target, row["prompt"], 192), answer[: args.answer_tokens], ended))
    positions = sum(len(p) + len(a) + e for p, a, e in items)
    options = dict(layers=[int(x) for x in args.layers.split(",")], topk=64, lm_input=True)
    ways = {
        "one pass per sequence": lambda: [teacher_pass(stack, p, a, target.eos_ids, ended_on_eos=e, **options)
                                          for p, a, e in items],
        "batched": lambda: teacher_passes(stack, items, target.eos_ids, max_batch_tokens=args.max_batch_tokens, **options),
    }
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name, run in ways.items():
            t0 = time.perf_counter()
            run()
            rates[name].append(positions / (time.perf_counter() - t0))
            print(f"round {r + 1}: {name}: {rates[name][-1]:.0f} positions/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print(f"{len(items)} rows, {positions} positions, torch threads {torch.get_num_threads()}, {args.dtype}")
    for name, m in medians.items():
        print(f"  {name}: median {m:.0f} positions/s")
    print(f"  batched / one per sequence: {medians['batched'] / medians['one pass per sequence']:.2f}x")


if __name__ == "__main__":
    main()
