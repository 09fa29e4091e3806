#!/usr/bin/env python
"""The replay benchmark (``ctxdraft.selfdraft.learning.replay``): regret to the per-prompt oracle against the number of
logged requests, for the frozen offline policy, `update-policy` every N requests and LinUCB. Writes
<out>/<name>.json, <name>.md and <name>.png and prints the Markdown.

    OMP_NUM_THREADS=1 python scripts/replay_bench.py --rewards rewards_all.jsonl --out docs/results
    python scripts/replay_bench.py --synthetic --seeds 1 --requests 100      # a dry run without collected data
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import write_json_atomic, write_text_atomic
from ctxdraft.selfdraft.learning.policy import PolicyConfig
from ctxdraft.selfdraft.learning.replay import ReplayConfig, run_replay, synthetic_rewards
from ctxdraft.selfdraft.learning.replay_report import label, replay_report
from ctxdraft.selfdraft.learning.rewards import load_rewards


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    cps = result["checkpoints"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, title in [(axes[0], "eval", "held-out regret of the current policy"),
                            (axes[1], "online", "regret of the chosen arms so far")]:
        for name, curves in result["learners"].items():
            points = [(t, c["mean"], c["se"] or 0.0) for t, c in zip(cps, curves[kind]) if c["mean"] is not None]
            xs, ys, se = zip(*points)
            ax.plot(xs, ys, marker=".", label=label(name, cfg))
            ax.fill_between(xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)], alpha=0.15)
        if kind == "eval":
            ref = result["full_information_eval_regret"]["mean"]
            ax.axhline(ref, color="grey", linestyle="--", label="offline policy, all domains, full information")
        if cps[-1] >= 200:
            ax.axvline(200, color="black", linewidth=0.5, linestyle=":")
        ax.set_xlabel("logged requests")
        ax.set_ylabel("regret to the per-prompt oracle")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Offline policy trained on {', '.join(cfg['offline_domains'])}; traffic from all "
                 f"{len(result['domains'])} domains ({cfg['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rewards", help="full-information rewards JSONL from `ctxdraft collect` (features.hidden, every arm)")
    source.add_argument("--synthetic", action="store_true", help="six synthetic domains instead of collected rewards")
    parser.add_argument("--out", default="docs/results", help="output directory")
    parser.add_argument("--name", default="replay", help="file name stem")
    parser.add_argument("--offline-domains", help="comma-separated (default: the first three domains in the file)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--update-every", type=int, default=50)
    parser.add_argument("--explore", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--linucb-alpha", default="0.01,0.1,1", help="comma-separated LinUCB exploration weights")
    parser.add_argument("--linucb-dims", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=300, help="REINFORCE epochs (the default policy config's)")
    parser.add_argument("--at", type=int, default=200, help="summarise at this many logged requests")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        data = synthetic_rewards() if args.synthetic else load_rewards(args.rewards)
        config = ReplayConfig(
            offline_domains=args.offline_domains.split(",") if args.offline_domains else None, num_requests=args.requests,
            update_every=args.update_every, explore=args.explore, seeds=args.seeds, folds=args.folds,
            linucb_alphas=[float(a) for a in args.linucb_alpha.split(",")], linucb_dims=args.linucb_dims,
            policy=PolicyConfig(epochs=args.epochs))
        t0 = time.perf_counter()
        result = run_replay(data, config, progress=lambda stage, done, total: print(f"{stage}: {done}/{total}",
                                                                                     file=sys.stderr, flush=True),
                            at=args.at)
        seconds = time.perf_counter() - t0
    except CtxdraftError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    source_name = "synthetic (replay.synthetic_rewards)" if args.synthetic else Path(args.rewards).name
    result["source"], result["seconds"] = source_name, round(seconds, 1)
    write_json_atomic(out / f"{args.name}.json", result)
    text = replay_report(result, source_name, seconds).to_markdown() + f"\n![regret against logged requests]({args.name}.png)\n"
    write_text_atomic(out / f"{args.name}.md", text)
    plot(result, out / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
