"""The suffix draft's replay benchmark: a stream of held-out requests served in order, the datastore growing with
each output, tokens per target forward of ``suffix`` against ``lookup`` (and ``lookup-tree``, and ``suffix`` without
the datastore) as requests accumulate.

    python benchmarks/suffix_replay.py --train runs/split/train.jsonl --heldout runs/split/heldout.jsonl \
        --train-per-domain 10 --heldout-per-domain 4 --max-new-tokens 96 --out docs/results/suffix_replay

Each prompt's greedy continuation is decoded once (cached in ``<out>.continuations.jsonl``) and every arm is replayed
along it exactly (``trajectories.replay``, the same replay collect uses; greedy, so the tokens accepted are the real
run's). The datastore starts from the training prompts' continuations; after each held-out request its output joins
it (what ``generate --log`` does). The stream is the held-out split in file order, each domain's prompts in sequence.
Writes ``<out>.md`` (per request and cumulative tokens per forward) and ``<out>.png`` when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ctxdraft.selfdraft.base.data import first_per_domain, read_prompts, round_robin
from ctxdraft.selfdraft.base.datastore import SuffixStore
from ctxdraft.selfdraft.drafting.draft import TeacherPass
from ctxdraft.selfdraft.drafting.drafts import LookupDraft, LookupSettings
from ctxdraft.selfdraft.drafting.suffix_draft import SuffixDraft, SuffixSettings
from ctxdraft.selfdraft.drafting.tree_drafts import LookupTreeDraft, LookupTreeSettings
from ctxdraft.selfdraft.learning.trajectories import greedy_continuation, replay
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.runtime.target import load_target


def continuations(target, rows, max_new_tokens: int, cache: Path) -> dict[str, dict]:
    """prompt text -> {"prompt_ids", "new_ids"}, decoded once and cached."""
    known = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            if row["max_new_tokens"] == max_new_tokens:
                known[row["prompt"]] = row
    stack = LayerStack(target.model)
    with open(cache, "a") as f:
        for i, row in enumerate(rows):
            if row["prompt"] in known:
                continue
            t0 = time.perf_counter()
            prompt_ids = target.encode(row["prompt"], chat=True)
            run = greedy_continuation(stack, prompt_ids, max_new_tokens, target.eos_ids)
            entry = {"prompt": row["prompt"], "max_new_tokens": max_new_tokens, "prompt_ids": prompt_ids,
                     "new_ids": run.new_ids, "ended_on_eos": run.ended_on_eos}
            known[row["prompt"]] = entry
            f.write(json.dumps(entry) + "\n")
            f.flush()
            print(f"  decoded {i + 1}/{len(rows)} ({len(run.new_ids)} tokens, {time.perf_counter() - t0:.1f} s)", flush=True)
    return known


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--train-per-domain", type=int, default=10)
    parser.add_argument("--heldout-per-domain", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--target", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="suffix_replay")
    parser.add_argument("--cached-only", action="store_true", help="replay with the continuations already cached "
                        "(training prompts not decoded yet are left out of the datastore)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = load_target(args.target, dtype=args.dtype)
    train = first_per_domain(read_prompts(args.train), args.train_per_domain)
    heldout = first_per_domain(read_prompts(args.heldout), args.heldout_per_domain)
    domains = list(dict.fromkeys(r["domain"] for r in heldout))
    heldout.sort(key=lambda r: domains.index(r["domain"]))  # each domain's prompts in sequence (a stable sort)
    cache = Path(str(out) + ".continuations.jsonl")
    print(f"decoding {len(train)} training and {len(heldout)} held-out continuations (cache {cache})", flush=True)
    # held-out first, then the training prompts domain by domain in turn: a run stopped early still has every request
    train = round_robin(train, len(train))
    if args.cached_only:
        known = continuations(target, [], args.max_new_tokens, cache)
        train = [r for r in train if r["prompt"] in known]
        heldout = [r for r in heldout if r["prompt"] in known]
    else:
        known = continuations(target, heldout + train, args.max_new_tokens, cache)
    store = SuffixStore(target.content_hash, target.vocab_size)
    for row in train:
        store.add(known[row["prompt"]]["new_ids"])
    store.reindex()
    arms = {
        "lookup": LookupDraft("lookup", LookupSettings(4, [3, 2, 1])),
        "lookup-tree": LookupTreeDraft("lookup-tree", LookupTreeSettings(5, 16)),
        "suffix (request only)": SuffixDraft("suffix-request", SuffixSettings(use_datastore=False)),
        "suffix": SuffixDraft("suffix", SuffixSettings(), store),
        "suffix (factor 4, offset 4)": SuffixDraft("suffix-wide", SuffixSettings(factor=4.0, offset=4.0, min_prob=0.05), store),
    }
    eos = set(target.eos_ids)
    totals = {name: [0, 0] for name in arms}  # new tokens, target forwards (after the prefill)
    lines = ["| # | domain | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    curve = {name: [] for name in arms}
    for i, row in enumerate(heldout):
        entry = known[row["prompt"]]
        # ended on EOS: the EOS, then ids no draft proposes (the loop stops at EOS; a draft may run past it)
        tail = [min(target.eos_ids)] + [-2] * 64 if entry["ended_on_eos"] else []
        seq = entry["prompt_ids"] + entry["new_ids"] + tail
        prompt_len, n = len(entry["prompt_ids"]), len(entry["new_ids"])
        cells = []
        for name, draft in arms.items():
            tp = TeacherPass(seq, prompt_len, n, {})
            traj = replay(draft.teacher_forced(tp, target.vocab_size), seq, prompt_len, args.max_new_tokens, eos)
            totals[name][0] += traj.new_tokens
            totals[name][1] += traj.target_forwards - 1
            curve[name].append(totals[name][0] / max(1, totals[name][1]))
            cells.append(f"{traj.tokens_per_forward:.2f} ({curve[name][-1]:.2f})")
        store.add(entry["new_ids"])  # served: the output joins the datastore
        lines.append(f"| {i + 1} | {row['domain']} | " + " | ".join(cells) + " |")
    summary = {name: round(t[0] / max(1, t[1]), 3) for name, t in totals.items()}
    text = "\n".join([
        f"# Suffix replay: {len(heldout)} held-out requests, datastore from {len(train)} training continuations",
        "", f"Target {target.name} ({args.dtype}), greedy, max {args.max_new_tokens} new tokens. Tokens per target forward "
        "(decode steps; the prefill is not counted) per request, cumulative in brackets.", "", *lines, "",
        "Overall: " + ", ".join(f"{k} {v}" for k, v in summary.items())
        + f"; suffix / lookup = {summary['suffix'] / summary['lookup']:.3f}", ""])
    Path(str(out) + ".md").write_text(text)
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curve.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("requests served")
    ax.set_ylabel("cumulative tokens per forward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(out) + ".png", dpi=100)


if __name__ == "__main__":
    main()
