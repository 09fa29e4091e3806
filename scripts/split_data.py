#!/usr/bin/env python
"""Split a prompt JSONL into a training part and a held-out part, stratified by domain (deterministic).

    python scripts/split_data.py ../shared/data/specbench_dev.jsonl OUT_DIR [--heldout-frac 0.25] [--seed 0]

Writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl (the rows as they were). The default bundle's exits and
policy are trained on train.jsonl only, and the README's benchmark runs on heldout.jsonl, so no measured
prompt was trained on. The split is ``ctxdraft.selfdraft.base.data.stratified_split``, the one add-exits and
train-policy use.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ctxdraft.selfdraft.base.data import stratified_split
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import read_jsonl, write_text_atomic


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("out_dir")
    ap.add_argument("--heldout-frac", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        rows = read_jsonl(args.data)
        train_idx, held_idx = stratified_split([str(r.get("domain", "all")) for r in rows], args.heldout_frac, args.seed)
    except CtxdraftError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    for name, idx in (("train.jsonl", train_idx), ("heldout.jsonl", held_idx)):
        write_text_atomic(out / name, "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in idx))
    print(f"{len(train_idx)} training prompts -> {out / 'train.jsonl'}; {len(held_idx)} held out -> {out / 'heldout.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
