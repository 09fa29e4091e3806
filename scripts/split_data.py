#!/usr/bin/env python
"""Split a prompt JSONL into a training part and a held-out part, stratified by domain (deterministic).

    python scripts/split_data.py ../shared/data/specbench_dev.jsonl OUT_DIR [--heldout-frac 0.25] [--seed 0]

Writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl. The default bundle's exits and policy are trained on
train.jsonl only, and the README's benchmark runs on heldout.jsonl, so no measured prompt was trained on.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("out_dir")
    ap.add_argument("--heldout-frac", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lines = [line for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    by_domain = defaultdict(list)
    for line in lines:
        by_domain[json.loads(line).get("domain", "all")].append(line)
    rng = random.Random(args.seed)
    train, heldout = [], []
    for domain in sorted(by_domain):
        rows = by_domain[domain][:]
        rng.shuffle(rows)
        n_held = max(1, round(len(rows) * args.heldout_frac))
        heldout += rows[:n_held]
        train += rows[n_held:]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (out / "heldout.jsonl").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    print(f"{len(train)} training prompts -> {out / 'train.jsonl'}; {len(heldout)} held out -> {out / 'heldout.jsonl'}")


if __name__ == "__main__":
    main()
