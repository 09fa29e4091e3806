"""Two bundles in one bench: ``ctxdraft bench`` of bundle A (its arms, HF baselines, the oracle over A's arms) with
arms of a second bundle B run as extra methods named ``shipped:ARM`` (``B:ARM`` for a bundle directory), interleaved with the rest on every prompt, so a
candidate bundle's ``auto`` meets the shipped one's on the same prompts, machine state and HF reference. Writes
bench.json, bench.md and bench.png into --out like ``ctxdraft bench``.

    python benchmarks/bench_bundles.py --bundle tree_bundle --other shipped --other-arms auto \\
        --data split/heldout.jsonl --per-domain 3 --arms none,lookup,merged-auto,auto --out bench_two

``--other shipped`` (the default) is the bundle inside the package. Both bundles calibrate to this machine first
when their policy needs it, as ``ctxdraft bench`` does for one.
"""
from __future__ import annotations

import argparse
import sys

from ctxdraft.selfdraft.base.data import read_prompts
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.commands.bench import Method, ctxdraft_generate, run_bench, select_prompts
from ctxdraft.selfdraft.commands.bench_report import write_bench_outputs
from ctxdraft.selfdraft.commands.bench_runs import BenchConfig
from ctxdraft.selfdraft.serving.bundle import load_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle A: its arms, the HF baselines and the oracle")
    p.add_argument("--other", default="shipped", help="bundle B ('shipped': the bundle inside the package)")
    p.add_argument("--other-arms", default="auto", help="comma-separated arms of B to run beside A's")
    p.add_argument("--data", required=True, help="JSONL prompts: 'prompt', optional 'id', 'domain'")
    p.add_argument("--per-domain", type=int, default=3)
    p.add_argument("--arms", help="comma-separated arms of A (default: all and auto)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--baselines", default="lookup", choices=["none", "lookup", "hf"])
    p.add_argument("--out", default="bench_two")
    args = p.parse_args()
    try:
        run(args)
    except CtxdraftError as e:  # bad input (a missing bundle, an unknown arm, a damaged prompt file): one line
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle, dtype=args.dtype)
    other = load_bundle(None if args.other == "shipped" else args.other, dtype=args.dtype)
    other_name = "shipped" if args.other == "shipped" else "B"
    config = BenchConfig(max_new_tokens=args.max_new_tokens, baselines=args.baselines,
                         arms=args.arms.split(",") if args.arms else None)
    rows, notes = select_prompts(read_prompts(args.data), bundle, "all", args.per_domain)
    extra = []
    for arm in args.other_arms.split(","):
        if arm != "auto":
            other.arm_spec(arm)  # an unknown arm: one clear error before any model work
        extra.append(Method(f"{other_name}:{arm}", "other",
                            lambda prompt, c, arm=arm: ctxdraft_generate(other, prompt, c, arm)))
    report = run_bench(bundle, rows, config, extra_methods=extra)
    report.notes[:0] = notes + [f"{other_name}: {args.other} ({other.calibration_note()})"]
    written = write_bench_outputs(report, args.out)
    print(report.status_line())
    print("\n".join(str(path) for path in written.values()))


if __name__ == "__main__":
    main()
