"""Resident memory of a bundle while it serves: after loading, and during generation with one arm.

    python benchmarks/memory.py BUNDLE --draft model:0.5b-k3 [--dtype bfloat16] [--max-new-tokens 96] [--json]

Prints /proc/self/status figures (Linux): RssAnon (the process's own memory: weights, caches, activations),
RssFile (file pages mapped in, e.g. checkpoint files while they load; the kernel can drop them), and VmHWM (the
peak of both together). Figures are taken after loading, after the first generation, and at the end.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and two tests."


def status_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--draft", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from ctxdraft.selfdraft import load_bundle

    peak_anon = [0]
    stop = threading.Event()

    def watch() -> None:  # RssAnon's peak (VmHWM also counts mapped checkpoint files)
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], status_kib()["RssAnon"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle, dtype=args.dtype)
    bundle.generate("Hi", draft=args.draft, max_new_tokens=2)  # loads the draft model of a model: arm
    loaded = dict(status_kib(), seconds=round(time.perf_counter() - t0, 1))
    result = bundle.generate(PROMPT, draft=args.draft, max_new_tokens=args.max_new_tokens)
    generated = status_kib()
    stop.set()
    watcher.join()
    gib = 1024 ** 2
    report = {
        "bundle": args.bundle, "draft": args.draft, "arm": result.arm, "dtype": args.dtype,
        "new_tokens": len(result.token_ids),
        "after_load_gib": {k: round(v / gib, 2) for k, v in loaded.items() if k != "seconds"},
        "load_s": loaded["seconds"],
        "after_generate_gib": {k: round(v / gib, 2) for k, v in generated.items()},
        "peak_anon_gib": round(max(peak_anon[0], generated["RssAnon"]) / gib, 2),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.bundle}, arm {result.arm}, dtype {args.dtype}, {report['new_tokens']} new tokens")
    for stage in ("after_load_gib", "after_generate_gib"):
        print(f"  {stage.removesuffix('_gib').replace('_', ' ')}: " + ", ".join(f"{k} {v} GiB" for k, v in report[stage].items()))
    print(f"  peak RssAnon {report['peak_anon_gib']} GiB; VmHWM (anon + mapped files) {report['after_generate_gib']['VmHWM']} GiB")


if __name__ == "__main__":
    main()
