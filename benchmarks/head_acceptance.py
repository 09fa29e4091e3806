"""Held-out acceptance of feature heads, several bundles on the same prompts: the data-scaling curve (issue 22).

    python benchmarks/head_acceptance.py --data runs/split/heldout.jsonl --dtype bfloat16 \
        --head shipped=selfdraft/default_bundle --head 100k=runs/scale/b100k --head 300k=runs/scale/b300k \
        --out docs/results/feature_scaling

Each prompt's greedy continuation (``--max-new-tokens``) and the target's states are computed once (one teacher
pass per prompt, ``head_data.build_examples``, cached under ``<out>.work/``), then every head drafts along it
teacher-forced (``FeatureDraft.teacher_forced``) and ``feature_train.acceptance_per_position`` gives, per domain,
the share of drafting positions whose first j draft tokens are all the target's (``prefix j``): what add-exits
reports for its own held-out rows, here on a file no head trained on. A head is ``LABEL=BUNDLE`` (its ``feature``
arm) or ``LABEL=BUNDLE:NAME`` (arm ``feature:NAME``); its training tokens are read from the bundle's add-exits
report. Writes ``<out>.json``, ``<out>.md`` and, with matplotlib, ``<out>.png`` (acceptance against training text).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from ctxdraft.selfdraft.base.data import first_per_domain, read_prompts
from ctxdraft.selfdraft.base.fileio import display_path, read_json, write_json_atomic
from ctxdraft.selfdraft.base.layout import feature_report
from ctxdraft.selfdraft.drafting.pool import build_draft
from ctxdraft.selfdraft.learning.feature_train import acceptance_per_position
from ctxdraft.selfdraft.learning.head_data import build_examples
from ctxdraft.selfdraft.runtime.target import DEFAULT_TARGET, load_target
from ctxdraft.selfdraft.serving.bundle import load_bundle


def parse_head(text: str) -> tuple[str, Path, str]:
    label, _, rest = text.partition("=")
    if not label or not rest:
        raise SystemExit(f"--head {text!r}: expected LABEL=BUNDLE or LABEL=BUNDLE:NAME")
    path, _, name = rest.partition(":")
    return label, Path(path), name or "general"


def head_of(bundle_dir: Path, name: str, target, depth: int):
    """The bundle's feature arm of head ``name`` (built on ``target``) and what its add-exits report says."""
    bundle = load_bundle(bundle_dir, calibrate=False)
    bundle.check_target(target)
    arms = [a for a in bundle.info["arms"] if a["kind"] == "feature" and a["settings"].get("name", "general") == name]
    if not arms:
        raise SystemExit(f"{display_path(bundle_dir)} has no feature head named {name!r}")
    report_path = bundle_dir / feature_report(name)
    report = read_json(report_path, "add-exits report") if report_path.is_file() else {}
    spec = dict(arms[0], settings=dict(arms[0]["settings"], draft_len=depth))  # score every position
    return build_draft(spec, target, bundle_dir), report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="held-out prompts (JSONL)")
    ap.add_argument("--head", action="append", required=True, help="LABEL=BUNDLE[:NAME], repeatable")
    ap.add_argument("--per-domain", type=int, default=0, help="the first N prompts of each domain (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4, help="draft positions scored")
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--baseline", action="append", default=[], help="a --head LABEL drawn as a marker of its own "
                    "instead of a point of the curve (a head trained on other data or otherwise), repeatable")
    ap.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.md, <out>.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_prompts(args.data)
    if args.per_domain:
        rows = first_per_domain(rows, args.per_domain)
    target = load_target(args.target, dtype=args.dtype)
    heads = {label: head_of(path, name, target, args.depth) for label, path, name in map(parse_head, args.head)}
    layers = sorted({layer for draft, _ in heads.values() for layer in draft.state_layers})
    key = hashlib.sha256(json.dumps([target.content_hash, [r["prompt"] for r in rows], layers, args.max_new_tokens,
                                     args.max_prompt_tokens, args.depth]).encode()).hexdigest()[:12]
    work = Path(f"{args.out}.work") / key
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    examples = build_examples(target, rows, layers, max_prompt_tokens=args.max_prompt_tokens,
                              new_tokens=args.max_new_tokens, topk=0, extend=args.depth, work=work)
    print(f"{len(examples)} held-out prompts, {sum(ex.num_positions for ex in examples)} positions "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {}
    for label, (draft, report) in heads.items():
        chains = [draft.teacher_forced(ex.tp, target.vocab_size) for ex in examples]
        data = report.get("data", {})
        results[label] = {"train_positions": data.get("train_positions"), "train_texts": data.get("num_train_texts"),
                          "train_steps": report.get("exits", [{}])[0].get("train", {}).get("steps") if report else None,
                          "acceptance": acceptance_per_position(chains, examples, args.depth)}
        overall = results[label]["acceptance"]["overall"]["prefix"]
        print(f"{label}: prefix 1..{args.depth} = " + ", ".join(f"{x:.1%}" for x in overall), flush=True)
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"data": Path(args.data).name, "prompts": len(rows), "dtype": args.dtype,
                                                 "max_new_tokens": args.max_new_tokens, "heads": results})
    out.with_suffix(".md").write_text(markdown(results, args.depth))
    plot(results, set(args.baseline), out.with_suffix(".png"))


def markdown(results: dict, depth: int) -> str:
    domains = sorted(d for d in next(iter(results.values()))["acceptance"] if d != "overall")
    lines = ["| head | training positions | " + " | ".join(f"prefix {j}" for j in range(1, depth + 1)) + " | "
             + " | ".join(f"{d} (prefix 1)" for d in domains) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in range(depth + len(domains))) + " |"]
    for label, r in results.items():
        acc = r["acceptance"]
        lines.append(f"| {label} | {r['train_positions'] or '?'} | "
                     + " | ".join(f"{x:.1%}" for x in acc["overall"]["prefix"]) + " | "
                     + " | ".join(f"{acc[d]['prefix'][0]:.1%}" for d in domains) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, baselines: set[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    points = sorted((r["train_positions"], r["acceptance"]["overall"]["prefix"]) for label, r in results.items()
                    if r["train_positions"] and label not in baselines)
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    others = [label for label in results if label in baselines and results[label]["train_positions"]]
    shapes = dict(zip(others, "*Ds^vP"))
    for j in range(min(3, len(points[0][1]))):
        line, = ax.plot([x for x, _ in points], [p[j] for _, p in points], marker="o",
                        label=f"first {j + 1} draft token{'s' if j else ''} right")
        for label in others:
            r = results[label]
            ax.scatter([r["train_positions"]], [r["acceptance"]["overall"]["prefix"][j]], marker=shapes[label], s=80,
                       color=line.get_color(), edgecolors="black", zorder=3)
    for label in others:  # one legend entry per head drawn apart
        ax.scatter([], [], marker=shapes[label], s=80, color="lightgrey", edgecolors="black", label=label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training positions (prompt + the target's answer)")
    ax.set_ylabel("held-out acceptance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
