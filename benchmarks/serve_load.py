"""Load a running `ctxdraft serve` with N streamed requests at concurrency C (127.0.0.1 only) and report
throughput, p50/p95 latency, time to first token and errors.

    ctxdraft serve --dtype bfloat16 &
    python benchmarks/serve_load.py --requests 64 --concurrency 8 --max-tokens 128 [--data prompts.jsonl]
    python benchmarks/serve_load.py --draft none ...   # the same load with every request on plain decoding
    python benchmarks/serve_load.py --rounds 3 --server-pid $(pgrep -f 'ctxdraft serve')   # memory across rounds
    python benchmarks/serve_load.py --out served.jsonl ...; python benchmarks/serve_check.py served.jsonl  # outputs

Every request is bounded by --timeout; the run by --requests. Prompts: the "prompt" field of a JSONL file
(cycled), or a few built-in ones. Greedy (temperature 0) unless --temperature says otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Summarize the plot of Hamlet in two sentences.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three uses of a paperclip.",
    "Explain what a hash table is to a ten-year-old.",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return PROMPTS
    prompts = [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return prompts


async def one(client: httpx.AsyncClient, url: str, prompt: str, args) -> dict:
    body = {"model": "ctxdraft", "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
            "draft": args.draft, "return_token_ids": True}
    t0 = time.perf_counter()
    first, tokens, text, error, arm, token_ids = None, 0, [], None, None, None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=args.timeout) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("ctxdraft"):
                    arm, token_ids = chunk["ctxdraft"]["arm"], chunk["ctxdraft"].get("token_ids")
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if error:
        return {"error": error}
    end = time.perf_counter()
    return {"latency_s": end - t0, "ttft_s": (first or end) - t0, "tokens": tokens, "text": "".join(text), "arm": arm,
            "prompt": prompt, "token_ids": token_ids}


async def run(args) -> tuple[dict, list[dict]]:
    prompts = read_prompts(args.data)
    semaphore = asyncio.Semaphore(args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=args.concurrency)) as client:
        async def bounded(i: int) -> dict:
            async with semaphore:
                return await one(client, args.url, prompts[i % len(prompts)], args)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    latencies = sorted(r["latency_s"] for r in ok)
    ttfts = sorted(r["ttft_s"] for r in ok)

    def pct(values, q):
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    arms: dict[str, int] = {}
    for r in ok:
        arms[r["arm"]] = arms.get(r["arm"], 0) + 1
    return {
        "url": args.url, "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "draft": args.draft, "ok": len(ok), "errors": len(errors), "first_errors": errors[:3],
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "latency_p50_s": pct(latencies, 0.5), "latency_p95_s": pct(latencies, 0.95),
        "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
        "ttft_mean_s": round(statistics.fmean(ttfts), 3) if ttfts else None, "arms": arms,
    }, ok


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of the server process (Linux /proc), for leaks across rounds."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--draft", default="auto")
    p.add_argument("--data", help="JSONL with a 'prompt' field per line")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take")
    p.add_argument("--api-key")
    p.add_argument("--rounds", type=int, default=1, help="Run the same load this many times (a report each)")
    p.add_argument("--server-pid", type=int, help="Report this process's resident memory after each round")
    p.add_argument("--out", help="Write every finished request (prompt, text, arm, round) to this JSONL file, "
                                 "for benchmarks/serve_check.py")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if urlparse(args.url).hostname not in LOCAL_HOSTS:
        raise SystemExit(f"serve_load only loads a server on this machine (127.0.0.1), not {args.url}")
    if not (1 <= args.concurrency <= args.requests <= 100_000):
        raise SystemExit("need 1 <= --concurrency <= --requests <= 100000")
    if not 1 <= args.rounds <= 100:
        raise SystemExit("need 1 <= --rounds <= 100")
    errors, served = 0, []
    for round_ in range(1, args.rounds + 1):
        summary, ok = asyncio.run(run(args))
        served += [{"round": round_, "prompt": r["prompt"], "text": r["text"], "token_ids": r["token_ids"],
                    "arm": r["arm"], "max_tokens": args.max_tokens} for r in ok]
        report = {"round": round_, **summary, "server_rss_mib": rss_mib(args.server_pid)}
        errors += report["errors"]
        if args.json:
            print(json.dumps(report, indent=2), flush=True)
        else:
            for key, value in report.items():
                print(f"{key:>16}: {value}", flush=True)
    if args.out:
        tmp = Path(f"{args.out}.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in served))
        tmp.replace(args.out)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
