"""Time the Triton verify kernels against the torch reference on a CUDA GPU.

For every (mode, B, K, V) it draws fresh random inputs, checks that both paths return equal ids
(torch.equal, on shared noise), and times each with triton.testing.do_bench (median, ms). Bandwidth is
the bytes of target logits the step must read, B * (K+1) * V * itemsize, divided by the time; the
exponentials [B, V] and draft probabilities are extra traffic not counted in it. Noise is drawn once,
outside the timed call, so both paths time verification alone. The tree modes verify token trees of
K = N nodes (--tree-nodes) with verify_tree_greedy / verify_tree_sampling.

Example:
    python benchmarks/verify_gpu.py                       # the issue's grid, bf16 logits, Markdown table
    python benchmarks/verify_gpu.py --modes sampling_q --batch 64 --vocab 151936 --json
    python benchmarks/verify_gpu.py --modes tree_greedy tree_sampling --tree-nodes 16 32 64
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import NamedTuple

import torch

from ctxdraft.triton_kernels import draw_noise, verify_greedy, verify_sampling, verify_tree_greedy, verify_tree_sampling

# sampling: lookup drafts (one-hot q); sampling_q: drafts with probs; tree_*: token trees of N nodes
MODES = ("greedy", "sampling", "sampling_q", "tree_greedy", "tree_sampling")
TREE_MODES = ("tree_greedy", "tree_sampling")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM bandwidth by device name, GB/s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes B")
    parser.add_argument("--draft-len", type=int, nargs="+", default=[4, 8], help="draft lengths K")
    parser.add_argument("--tree-nodes", type=int, nargs="+", default=[16, 32, 64],
                        help="nodes per tree N (the K of the tree modes)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936], help="vocabulary sizes V")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["greedy", "sampling", *TREE_MODES])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the target logits")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="HBM bandwidth for the %% of peak column (default: from the device name, if known)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a Markdown table")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Case(NamedTuple):
    logits: torch.Tensor  # [B, K+1, V]
    draft_ids: torch.Tensor  # [B, K], the node tokens of a tree
    num_draft: torch.Tensor  # [B]
    draft_probs: torch.Tensor | None  # [B, K, V] (sampling_q only)
    temperature: torch.Tensor  # [B]
    noise: object  # SamplingNoise
    parents: torch.Tensor | None  # [B, K] (tree modes only)


def make_case(mode: str, B: int, K: int, V: int, dtype: torch.dtype, generator: torch.Generator) -> Case:
    """Random inputs with full-length drafts that mostly agree with the target (realistic acceptance)."""
    device = generator.device
    logits = (torch.randn(B, K + 1, V, device=device, generator=generator) * 3).to(dtype)
    target_ids = logits.argmax(-1)[:, :K]
    guesses = torch.randint(0, V, (B, K), device=device, generator=generator)
    agree = torch.rand(B, K, device=device, generator=generator) < 0.8
    draft_ids = torch.where(agree, target_ids, guesses)
    num_draft = torch.full((B,), K, device=device, dtype=torch.long)
    draft_probs = parents = None
    if mode == "sampling_q":
        draft_noise = torch.randn(B, K, V, device=device, generator=generator)
        draft_probs = torch.softmax(logits[:, :K].float() + draft_noise, -1)
    elif mode in TREE_MODES:
        draft_ids, parents = random_tree(logits, generator)
    temperature = torch.full((B,), 0.8, device=device)
    noise = draw_noise(B, K, V, device, generator)
    return Case(logits, draft_ids, num_draft, draft_probs, temperature, noise, parents)


def random_tree(logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tree_ids, parents) [B, N]: half the nodes extend the previous node, half branch from an earlier one; most
    carry the target's argmax at their parent, so paths several nodes deep are accepted."""
    B, N1, V = logits.shape
    device = logits.device
    target_ids = logits.argmax(-1)
    parents = torch.empty(B, N1 - 1, dtype=torch.long, device=device)
    tree_ids = torch.empty_like(parents)
    for node in range(N1 - 1):
        earlier = torch.randint(-1, node, (B,), device=device, generator=generator)
        extend = torch.rand(B, device=device, generator=generator) < 0.5
        parents[:, node] = torch.where(extend, node - 1, earlier)
        guess = torch.randint(0, V, (B,), device=device, generator=generator)
        agree = torch.rand(B, device=device, generator=generator) < 0.8
        tree_ids[:, node] = torch.where(agree, target_ids.gather(1, parents[:, node, None] + 1)[:, 0], guess)
    return tree_ids, parents


def verify_fn(mode: str, impl: str, case: Case):
    logits, draft_ids, num_draft, draft_probs, temperature, noise, parents = case
    if mode == "greedy":
        return lambda: verify_greedy(logits, draft_ids, num_draft, impl=impl)
    if mode == "tree_greedy":
        return lambda: verify_tree_greedy(logits, draft_ids, parents, num_draft, impl=impl)
    if mode == "tree_sampling":
        return lambda: verify_tree_sampling(logits, draft_ids, parents, num_draft, temperature, impl=impl,
                                            noise=noise)
    return lambda: verify_sampling(logits, draft_ids, num_draft, draft_probs, temperature, impl=impl, noise=noise)


def bench_one(mode: str, B: int, K: int, V: int, dtype: torch.dtype, generator, peak_gbps) -> dict:
    from triton.testing import do_bench

    case = make_case(mode, B, K, V, dtype, generator)
    expected, result = verify_fn(mode, "torch", case)(), verify_fn(mode, "triton", case)()
    mismatched_rows = int((expected.out_ids != result.out_ids).any(dim=1).sum())  # out_ids also spells the path
    mismatched_rows += int((expected.num_accepted != result.num_accepted).sum())
    torch_ms = do_bench(verify_fn(mode, "torch", case), return_mode="median")
    triton_ms = do_bench(verify_fn(mode, "triton", case), return_mode="median")
    logits_bytes = B * (K + 1) * V * case.logits.element_size()
    triton_gbps = logits_bytes / (triton_ms * 1e-3) / 1e9
    return {
        "mode": mode, "B": B, "K": K, "V": V, "dtype": str(dtype).removeprefix("torch."),
        "equal": mismatched_rows == 0, "mismatched_rows": mismatched_rows,
        "torch_ms": torch_ms, "triton_ms": triton_ms, "speedup": torch_ms / triton_ms,
        "torch_gbps": logits_bytes / (torch_ms * 1e-3) / 1e9, "triton_gbps": triton_gbps,
        "triton_pct_peak": None if peak_gbps is None else 100.0 * triton_gbps / peak_gbps,
    }


def markdown_table(rows: list[dict], device_name: str, peak_gbps) -> str:
    peak = f", peak {peak_gbps:.0f} GB/s" if peak_gbps else ""
    lines = [
        f"{device_name}, {rows[0]['dtype']} logits{peak}; bandwidth = bytes of logits read / median time",
        "",
        "| mode | B | K (N) | V | equal | torch ms | triton ms | speedup | torch GB/s | triton GB/s | % peak |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pct = "-" if r["triton_pct_peak"] is None else f"{r['triton_pct_peak']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['B']} | {r['K']} | {r['V']} | {'yes' if r['equal'] else 'NO'} "
            f"| {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.1f}x "
            f"| {r['torch_gbps']:.0f} | {r['triton_gbps']:.0f} | {pct} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("verify_gpu: no CUDA device found; this benchmark times GPU kernels and needs one "
              "(the CPU tests cover correctness: pytest tests/test_verify_*.py).", file=sys.stderr)
        return 1
    try:
        import triton  # noqa: F401
    except ImportError:
        print("verify_gpu: the triton package is not installed (pip install triton).", file=sys.stderr)
        return 1

    device_name = torch.cuda.get_device_name()
    peak_gbps = args.peak_gbps
    if peak_gbps is None:
        peak_gbps = next((gbps for name, gbps in PEAK_GBPS.items() if name in device_name), None)
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = [
        bench_one(mode, B, K, V, DTYPES[args.dtype], generator, peak_gbps)
        for mode in args.modes for V in args.vocab
        for K in (args.tree_nodes if mode in TREE_MODES else args.draft_len) for B in args.batch
    ]
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows, device_name, peak_gbps))
    if not all(r["equal"] for r in rows):
        print("verify_gpu: the Triton path disagreed with the reference (see mismatched_rows)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
