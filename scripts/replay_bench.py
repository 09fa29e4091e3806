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
from ctxdraft.selfdraft.learning.rewards import load_rewards

LABELS = {"frozen": "offline policy, frozen", "updated": "update-policy every {n} requests (explore {eps:g})"}


def label(name: str, config: dict) -> str:
    if name in LABELS:
        return LABELS[name].format(n=config["update_every"], eps=config["explore"])
    return f"LinUCB, alpha {name.split('-', 1)[1]}" if name.startswith("linucb-") else name


def _half_width(updates: list[dict]) -> float:
    widths = [(u["gain"]["high"] - u["gain"]["low"]) / 2 for u in updates if u["gain"]["low"] is not None]
    return sum(widths) / len(widths) if widths else float("nan")


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    se = f" ± {stat['se']:.3f}" if stat["se"] is not None else ""
    return f"{stat['mean']:.3f}{se}"


def markdown(result: dict, source: str, seconds: float) -> str:
    cfg = result["config"]
    cps = result["checkpoints"]
    shown = [k for k, t in enumerate(cps) if t % 50 == 0 or t == cps[-1]]
    lines = [
        "## Replay benchmark: learning from logged traffic",
        "",
        f"Rewards: {source} ({result['num_rows']} prompts, domains {', '.join(result['domains'])}; arms "
        f"{', '.join(result['arms'])}). Offline policy trained on the pool rows of {', '.join(cfg['offline_domains'])} "
        f"only; traffic drawn uniformly from the pool rows of all domains; {cfg['seeds']} seed(s) (split, traffic, "
        f"exploration), mean ± standard error over seeds. Held-out evaluation: {cfg['eval_frac']:.0%} of each domain.",
        "",
        "Regret to the per-prompt oracle of each learner's current greedy policy on the held-out prompts:",
        "",
        "| learner | " + " | ".join(f"{cps[k]} req." for k in shown) + " |",
        "| --- | " + " | ".join("---" for _ in shown) + " |",
    ]
    for name, curves in result["learners"].items():
        lines.append(f"| {label(name, cfg)} | " + " | ".join(_cell(curves["eval"][k]) for k in shown) + " |")
    lines.append("| (reference) offline policy trained on all domains, full information | "
                 + " | ".join(_cell(result["full_information_eval_regret"]) for _ in shown) + " |")
    lines += ["", "Regret of the arms each learner actually chose on the requests so far (exploration included):", "",
              "| learner | " + " | ".join(f"{cps[k]} req." for k in shown[1:]) + " |",
              "| --- | " + " | ".join("---" for _ in shown[1:]) + " |"]
    for name, curves in result["learners"].items():
        lines.append(f"| {label(name, cfg)} | " + " | ".join(_cell(curves["online"][k]) for k in shown[1:]) + " |")
    updates = [u for run in result["runs"] for u in run["updates"]]
    if updates:
        est = [u["gain"]["value"] for u in updates]
        true = [u["true_gain"] for u in updates]
        agree = sum((e >= 0) == (t >= 0) for e, t in zip(est, true))
        lines += ["", f"update-policy runs: {len(updates)}, of which {sum(u['replaced'] for u in updates)} replaced the "
                  "policy (the others kept it: the policy in use was estimated better on the logs so far). The off-policy "
                  f"estimate of the gain (new minus in use, mean speed-up on the logged requests) averaged "
                  f"{sum(est) / len(est):+.4f} (95% interval half-width {_half_width(updates):.4f} on average); the true "
                  f"gain, known here from the full-information rewards, averaged {sum(true) / len(true):+.4f}; the "
                  f"estimate had the right sign in {agree} of {len(updates)} updates."]
    s = result["summary"]
    if s:
        frozen, updated = s["frozen"]["eval_regret"]["mean"], s["updated"]["eval_regret"]["mean"]
        best = s["best_bandit"]
        lines += ["", f"**At {s['requests']} logged requests**: frozen {frozen:.3f}, updated {updated:.3f}"
                  + (f", best LinUCB ({label(best, cfg)}) {s[best]['eval_regret']['mean']:.3f}" if best else "") + ". "
                  f"Target 'updated <= half of frozen': {'met' if s['target_half_of_frozen'] else 'NOT met'}; "
                  f"'updated <= bandit': {'met' if s['target_no_worse_than_bandit'] else 'NOT met'}."]
    lines += ["", f"Settings: {cfg['num_requests']} requests, update every {cfg['update_every']}, explore {cfg['explore']}, "
              f"{cfg['folds']}-fold cross-fitted estimates, LinUCB on {cfg['linucb_dims']} principal components, policy "
              f"epochs {cfg['policy']['epochs']}; {seconds:.0f} s with {torch.get_num_threads()} torch thread(s).", ""]
    return "\n".join(lines)


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
    text = markdown(result, source_name, seconds) + f"\n![regret against logged requests]({args.name}.png)\n"
    write_text_atomic(out / f"{args.name}.md", text)
    plot(result, out / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
