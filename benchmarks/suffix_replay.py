"""The suffix draft's replay benchmark: streams of requests served in order, the datastore growing with each output,
tokens per target forward of ``suffix`` against ``lookup`` (and ``lookup-tree``, and ``suffix`` without the
datastore) as requests accumulate. Two streams, each replayed from the same starting datastore: the held-out split
(each domain's prompts in sequence) and, with ``--template-requests N``, N requests written from a few templates
(code, SQL, JSON records, e-mails with varying fields: the boilerplate-heavy traffic a service sees again and again).

    python benchmarks/suffix_replay.py --train runs/split/train.jsonl --heldout runs/split/heldout.jsonl \
        --train-per-domain 10 --heldout-per-domain 10 --template-requests 120 --max-new-tokens 96 \
        --out docs/results/suffix_replay

Each prompt's greedy continuation is decoded once (cached in ``<out>.continuations.jsonl``) and every arm is replayed
along it exactly (``trajectories.replay``, the same replay collect uses; greedy, so the tokens accepted are the real
run's). The datastore starts from the training prompts' continuations; after each held-out request its output joins
it (what ``generate --log`` does). The stream is the held-out split in file order, each domain's prompts in sequence.
Writes ``<out>.md`` (per request and cumulative tokens per forward) and ``<out>.png`` when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import itertools
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


TEMPLATES = [
    ("code", "Write a Python function named `{0}` that takes a list of {1} and returns {2}. Add a docstring and "
             "one example call.",
     ["summarize", "pick", "clean", "rank"], ["integers", "strings", "dictionaries"],
     ["the largest one", "them sorted", "the number of duplicates", "only the unique ones", "their average length"]),
    ("sql", "Write a SQL query on the table `{0}` that returns {1} for rows where {2}, ordered by {1}.",
     ["orders", "customers", "invoices", "shipments"], ["the total amount", "the newest date", "the row count"],
     ["the status is 'open'", "the country is 'France'", "the amount is above 100", "the year is 2024"]),
    ("json", "Return a JSON object describing the product \"{0}\" with the keys name, price, category, in_stock and "
             "tags. The price is {1} euros and it belongs to the {2} category.",
     ["desk lamp", "coffee mug", "hiking boots", "laptop stand", "water bottle"], ["12", "35", "89"],
     ["home", "outdoor", "office"]),
    ("email", "Write a short, polite e-mail to {0} moving our meeting from {1} to {2}, and ask them to confirm.",
     ["Dr. Smith", "the project team", "Ms. Garcia", "our landlord"], ["Monday", "Tuesday", "Thursday"],
     ["Wednesday afternoon", "Friday morning", "next week"]),
]


def template_requests(n: int) -> list[dict]:
    """``n`` requests cycling over the templates, each filled with the next combination of its fields."""
    fills = [itertools.cycle(itertools.product(*fields)) for _, _, *fields in TEMPLATES]
    return [{"domain": TEMPLATES[i % len(TEMPLATES)][0],
             "prompt": TEMPLATES[i % len(TEMPLATES)][1].format(*next(fills[i % len(TEMPLATES)]))} for i in range(n)]


def replay_stream(rows: list[dict], known: dict, train_outputs: list[list[int]], target, max_new_tokens: int):
    """Serve ``rows`` in order from a datastore of ``train_outputs``, each output joining it: per request and
    cumulative tokens per forward of every arm."""
    store, static = SuffixStore(target.content_hash, target.vocab_size), SuffixStore(target.content_hash, target.vocab_size)
    for new_ids in train_outputs:
        store.add(new_ids)
        static.add(new_ids)
    store.reindex()
    static.reindex()
    narrow, wide = SuffixSettings(factor=1.0, offset=1.0, min_prob=0.1), SuffixSettings()
    arms = {
        "lookup": LookupDraft("lookup", LookupSettings(4, [3, 2, 1])),
        "lookup-tree": LookupTreeDraft("lookup-tree", LookupTreeSettings(5, 16)),
        "suffix (request only)": SuffixDraft("suffix-request", SuffixSettings(use_datastore=False)),
        "suffix (factor 1, offset 1)": SuffixDraft("suffix-narrow", narrow, store),
        "suffix": SuffixDraft("suffix", wide, store),
        "suffix, training datastore only": SuffixDraft("suffix-static", wide, static),
    }
    eos = set(target.eos_ids)
    totals = {name: [0, 0] for name in arms}  # new tokens, target forwards (after the prefill)
    lines = ["| # | domain | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    curve = {name: [] for name in arms}
    for i, row in enumerate(rows):
        entry = known[row["prompt"]]
        # ended on EOS: the EOS, then ids no draft proposes (the loop stops at EOS; a draft may run past it)
        tail = [min(target.eos_ids)] + [-2] * 64 if entry["ended_on_eos"] else []
        seq = entry["prompt_ids"] + entry["new_ids"] + tail
        prompt_len, n = len(entry["prompt_ids"]), len(entry["new_ids"])
        cells = []
        for name, draft in arms.items():
            tp = TeacherPass(seq, prompt_len, n, {})
            traj = replay(draft.teacher_forced(tp, target.vocab_size), seq, prompt_len, max_new_tokens, eos)
            totals[name][0] += traj.new_tokens
            totals[name][1] += traj.target_forwards - 1
            curve[name].append(totals[name][0] / max(1, totals[name][1]))
            cells.append(f"{traj.tokens_per_forward:.2f} ({curve[name][-1]:.2f})")
        store.add(entry["new_ids"])  # served: the output joins the datastore
        lines.append(f"| {i + 1} | {row['domain']} | " + " | ".join(cells) + " |")
    summary = {name: round(t[0] / max(1, t[1]), 3) for name, t in totals.items()}
    return lines, curve, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--train-per-domain", type=int, default=10)
    parser.add_argument("--heldout-per-domain", type=int, default=4)
    parser.add_argument("--template-requests", type=int, default=0,
                        help="Also replay a stream of this many template requests (code, SQL, JSON, e-mail)")
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
    templates = template_requests(args.template_requests)
    cache = Path(str(out) + ".continuations.jsonl")
    print(f"decoding {len(train)} training, {len(heldout)} held-out and {len(templates)} template continuations "
          f"(cache {cache})", flush=True)
    # held-out first, then the training prompts domain by domain in turn: a run stopped early still has every request
    train = round_robin(train, len(train))
    if args.cached_only:
        known = continuations(target, [], args.max_new_tokens, cache)
        train = [r for r in train if r["prompt"] in known]
        heldout = [r for r in heldout if r["prompt"] in known]
        templates = [r for r in templates if r["prompt"] in known]
    else:
        known = continuations(target, heldout + templates + train, args.max_new_tokens, cache)
    train_outputs = [known[row["prompt"]]["new_ids"] for row in train]
    streams = {"held-out": heldout, **({"templates": templates} if templates else {})}
    sections, curves = [], {}
    for stream, rows in streams.items():
        lines, curves[stream], summary = replay_stream(rows, known, train_outputs, target, args.max_new_tokens)
        sections += [f"## Stream: {stream} ({len(rows)} requests)", "", *lines, "",
                     "Overall: " + ", ".join(f"{k} {v}" for k, v in summary.items())
                     + f"; suffix / lookup = {summary['suffix'] / summary['lookup']:.3f}", ""]
    text = "\n".join([
        f"# Suffix replay: datastore from {len(train)} training continuations, growing with each request served",
        "", f"Target {target.name} ({args.dtype}), greedy, max {args.max_new_tokens} new tokens. Tokens per target forward "
        "(decode steps; the prefill is not counted) per request, cumulative in brackets.", "", *sections])
    Path(str(out) + ".md").write_text(text)
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(7 * len(curves), 4), squeeze=False)
    for ax, (stream, curve) in zip(axes[0], curves.items()):
        for name, ys in curve.items():
            ax.plot(range(1, len(ys) + 1), ys, label=name)
        ax.set_title(stream)
        ax.set_xlabel("requests served")
        ax.set_ylabel("cumulative tokens per forward")
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(out) + ".png", dpi=100)


if __name__ == "__main__":
    main()
