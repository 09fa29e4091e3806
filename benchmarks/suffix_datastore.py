"""Speed of the suffix draft's datastore: one lookup step (longest match + continuation tree) and one update.

    python benchmarks/suffix_datastore.py [--tokens 1000000] [--vocab 49152] [--steps 2000]

The datastore is filled with synthetic outputs: documents of 200 tokens drawn from a Zipf-like distribution over
the vocabulary, a quarter of them copies (with edits) of earlier ones, so that long matches exist. Prints the
sealed index's build time (paid by ``update-policy`` and bundle builds, not per request), the lookup time per
draft step (median and p99) with the whole store indexed and with a 60k-token unindexed tail, and the time of one
update (the in-memory add plus the locked append to the log file), median and p99. Targets (issue 25): lookup
< 1 ms per step at 10^6 tokens, update < 5 ms per request.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ctxdraft.selfdraft.base.datastore import SuffixStore, append_document, write_datastore
from ctxdraft.selfdraft.base.suffix_index import continuation_tree


def documents(num_tokens: int, vocab: int, rng) -> list[np.ndarray]:
    docs, total = [], 0
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
    weights /= weights.sum()
    while total < num_tokens:
        if docs and rng.random() < 0.25:
            doc = docs[rng.integers(len(docs))].copy()
            edits = rng.integers(0, len(doc), 5)
            doc[edits] = rng.choice(vocab, 5, p=weights)
        else:
            doc = rng.choice(vocab, 200, p=weights).astype(np.int32)
        docs.append(doc)
        total += len(doc) + 1
    return docs


def percentiles(times: list[float]) -> str:
    ms = np.array(times) * 1e3
    return f"median {np.median(ms):.3f} ms, p90 {np.percentile(ms, 90):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms, max {ms.max():.3f} ms"


def time_lookups(store: SuffixStore, contexts, depth: int = 8, max_nodes: int = 16) -> tuple[list[float], float]:
    times, matched = [], 0
    for context in contexts:
        t0 = time.perf_counter()
        length, rows = store.lookup(context, 24, depth)
        continuation_tree(rows, min(max_nodes, length + 1), 0.1)
        times.append(time.perf_counter() - t0)
        matched += length
    return times, matched / len(contexts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    docs = documents(args.tokens, args.vocab, rng)
    store = SuffixStore("bench", args.vocab, max_tokens=args.tokens + 100_000)
    store.tail = docs
    t0 = time.perf_counter()
    store.reindex()
    print(f"datastore: {store.num_tokens} tokens in {len(docs)} documents; sealed index built in "
          f"{time.perf_counter() - t0:.2f} s")
    # contexts: the first 24 tokens of a stored document's window (a match exists), or fresh text (often none)
    contexts = []
    for _ in range(args.steps):
        doc = docs[rng.integers(len(docs))]
        at = int(rng.integers(24, len(doc)))
        contexts.append(doc[at - 24 : at].tolist() if rng.random() < 0.7 else rng.integers(0, args.vocab, 24).tolist())
    times, mean_match = time_lookups(store, contexts)
    print(f"lookup per step, all indexed:      {percentiles(times)} (mean match {mean_match:.1f} tokens)")
    for doc in docs[-300:]:  # 60k tokens in the scanned tail
        store.add(doc)
    times, _ = time_lookups(store, contexts)
    print(f"lookup per step, +{len(store.tail_tokens)}-token tail: {percentiles(times)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "datastore.safetensors"
        small = SuffixStore("bench", args.vocab)
        small.add(docs[0])
        write_datastore(path, small)
        update = []
        for doc in docs[:300]:
            t0 = time.perf_counter()
            store.add(doc)
            append_document(path, doc.tolist(), small.log_id)
            update.append(time.perf_counter() - t0)
        print(f"update per request (add + locked log append): {percentiles(update)} "
              "(the max includes re-indexing when the in-memory tail passes 64k tokens)")


if __name__ == "__main__":
    main()
