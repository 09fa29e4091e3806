"""What a ``ctxdraft bench`` run produced (per prompt and method, summarised per domain) and what it writes:
bench.json, a Markdown report and a chart. Terms (Spec-Bench's): *tokens/s* = new tokens / seconds;
*speed-up* = a method's tokens/s over ``hf-generate``'s; *tokens per forward* = new tokens per target forward
after the prefill (mean accepted draft tokens + 1); *oracle* = per prompt, the fastest ctxdraft arm."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..base.errors import CtxdraftError
from ..base.fileio import atomic_path, write_json_atomic, write_text_atomic

REFERENCE = "hf-generate"
ORACLE = "oracle"
OVERALL = "overall"


@dataclass
class PromptResult:
    """One method on one prompt: the median over repeats of the time, the tokens of the first run."""

    prompt_id: object
    domain: str
    method: str
    new_tokens: int
    seconds: float
    seconds_all: list[float]
    target_forwards: int | None
    arm: str | None
    matches: bool | None  # greedy: every repeat equals hf-generate's output; sampling: None
    nodes_verified: int | None = None  # draft positions the target verified (a chain's tokens, a tree's nodes)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Mismatch:
    """A greedy output that differs from hf-generate's: a ``tie`` (both tokens' logits at the divergence are
    within the dtype's rounding tolerance of the target's best: legitimate in bf16/fp16, see ``ties.py``) or a
    ``mismatch``."""

    prompt_id: object
    domain: str
    method: str
    repeat: int
    first_diff: int  # first differing position (the shorter length when one output is a prefix of the other)
    expected_tokens: int
    got_tokens: int
    kind: str = "mismatch"  # "tie" or "mismatch"
    gap: float | None = None  # the target's best logit minus the lower of the two tokens' at first_diff


@dataclass
class MethodSummary:
    method: str
    family: str
    num_prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float  # total tokens / total seconds
    median_tokens_per_s: float  # median over prompts
    speedup: float | None  # tokens_per_s / hf-generate's tokens_per_s
    median_speedup: float | None  # median over prompts of the per-prompt speed-up
    tokens_per_forward: float | None  # total tokens / total target forwards after the prefill
    mismatches: int
    nodes_per_step: float | None = None  # total nodes verified / total target forwards after the prefill
    arms_chosen: dict[str, int] = field(default_factory=dict)  # auto and oracle: how often each arm


@dataclass
class BenchReport:
    config: dict
    prompts: list[dict]  # id, domain, prompt_tokens
    methods: list[dict]  # name, family
    domains: list[str]
    results: list[PromptResult]  # oracle included
    summary: dict[str, list[MethodSummary]]  # domain (and "overall") -> one summary per method
    mismatches: list[Mismatch]
    notes: list[str]
    environment: dict
    total_s: float

    @property
    def ok(self) -> bool:
        """No real mismatch (ties at the dtype's rounding are legitimate)."""
        return not self.real_mismatches

    @property
    def real_mismatches(self) -> list[Mismatch]:
        return [m for m in self.mismatches if m.kind == "mismatch"]

    @property
    def ties(self) -> list[Mismatch]:
        return [m for m in self.mismatches if m.kind == "tie"]

    def overall(self, method: str) -> MethodSummary:
        return next(s for s in self.summary[OVERALL] if s.method == method)

    def to_dict(self) -> dict:
        return {
            "format": "ctxdraft-bench",
            "version": 1,
            "ok": self.ok,
            "num_identical": self.num_compared - len(self.mismatches),
            "num_ties": len(self.ties),
            "num_mismatches": len(self.real_mismatches),
            "mismatches": [asdict(m) for m in self.mismatches],
            "config": self.config,
            "environment": self.environment,
            "notes": self.notes,
            "methods": self.methods,
            "domains": self.domains,
            "summary": {d: [asdict(s) for s in rows] for d, rows in self.summary.items()},
            "prompts": self.prompts,
            "results": [dict(asdict(r), tokens_per_s=r.tokens_per_s) for r in self.results],
            "total_s": round(self.total_s, 1),
        }

    @property
    def num_compared(self) -> int:
        return sum(len(r.seconds_all) for r in self.results if r.method != ORACLE)

    def status_line(self) -> str:
        if not self.config["greedy"]:
            return "Sampling run: outputs are not compared (they differ by design); speed and acceptance only."
        n = self.num_compared
        ties = self.ties
        tie_note = (f"; {len(ties)} diverged at a near-tie of the target's best logits (gap <= {max(m.gap for m in ties):.3g}, "
                    f"legitimate in {self.environment.get('dtype', 'this dtype')})") if ties else ""
        if self.ok:
            if not ties:
                return f"All {n} greedy outputs are identical to HF generate's."
            return f"{n - len(ties)} of {n} greedy outputs are identical to HF generate's{tie_note}; no mismatch."
        bad = self.real_mismatches
        where = ", ".join(f"{m.method} on {m.prompt_id}" for m in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        return f"MISMATCH: {len(bad)} greedy outputs differ from HF generate ({where}{more}){tie_note}."




def oracle_results(results: list[PromptResult], arm_methods: list[str]) -> list[PromptResult]:
    """Per prompt, the ctxdraft arm with the highest tokens/s (ties: the first arm)."""
    by_prompt: dict[object, list[PromptResult]] = {}
    for r in results:
        if r.method in arm_methods:
            by_prompt.setdefault((r.domain, r.prompt_id), []).append(r)
    out = []
    for rs in by_prompt.values():
        best = max(rs, key=lambda r: r.tokens_per_s)
        out.append(PromptResult(best.prompt_id, best.domain, ORACLE, best.new_tokens, best.seconds, best.seconds_all,
                                best.target_forwards, best.method, best.matches, best.nodes_verified))
    return out


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summaries(results: list[PromptResult], method_rows: list[dict], mismatches: list[Mismatch], domain: str | None) -> list[MethodSummary]:
    scoped = [r for r in results if domain is None or r.domain == domain]
    reference = {(r.domain, r.prompt_id): r for r in scoped if r.method == REFERENCE}
    ref_tps = _total_rate(reference.values())
    out = []
    for row in method_rows:
        rs = [r for r in scoped if r.method == row["name"]]
        tokens = sum(r.new_tokens for r in rs)
        seconds = sum(r.seconds for r in rs)
        speedups = [r.tokens_per_s / reference[(r.domain, r.prompt_id)].tokens_per_s for r in rs
                    if reference[(r.domain, r.prompt_id)].tokens_per_s > 0 and r.tokens_per_s > 0]
        forwards = [r for r in rs if r.target_forwards is not None]
        steps = sum(r.target_forwards - 1 for r in forwards)
        tps = tokens / seconds if seconds > 0 else 0.0
        arms_chosen: dict[str, int] = {}
        if row["name"] in ("auto", ORACLE):
            for r in rs:
                arms_chosen[r.arm] = arms_chosen.get(r.arm, 0) + 1
        out.append(MethodSummary(
            method=row["name"],
            family=row["family"],
            num_prompts=len(rs),
            new_tokens=tokens,
            seconds=seconds,
            tokens_per_s=tps,
            median_tokens_per_s=_median_or_none([r.tokens_per_s for r in rs]) or 0.0,
            speedup=tps / ref_tps if ref_tps > 0 else None,
            median_speedup=_median_or_none(speedups),
            tokens_per_forward=(sum(r.new_tokens for r in forwards) / steps) if forwards and len(forwards) == len(rs) and steps > 0 else None,
            mismatches=sum(1 for m in mismatches if m.kind == "mismatch" and m.method == row["name"]
                           and (domain is None or m.domain == domain)),
            arms_chosen=dict(sorted(arms_chosen.items(), key=lambda kv: -kv[1])),
            nodes_per_step=(sum(r.nodes_verified for r in forwards) / steps)
            if forwards and len(forwards) == len(rs) and steps > 0 and all(r.nodes_verified is not None for r in forwards) else None,
        ))
    return out


def _total_rate(rs) -> float:
    rs = list(rs)
    seconds = sum(r.seconds for r in rs)
    return sum(r.new_tokens for r in rs) / seconds if seconds > 0 else 0.0



def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def bench_markdown(report: BenchReport) -> str:
    cfg, env = report.config, report.environment
    load = env.get("load_average_start")
    mode = "greedy" if cfg["greedy"] else f"sampling at temperature {cfg['temperature']} (seed {cfg['seed']})"
    lines = [
        "# ctxdraft bench",
        "",
        f"{env['date']} on {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
        + (f", load average {load[0]:.2f} at start" if load else "") + f"); target {env['target']['name']} in "
        f"{env.get('dtype', 'float32')} (the HF baselines run the same model in the same dtype)"
        + (f"; bundle `{env['bundle']}`" if env.get("bundle") else "")
        + (f"; auto routed with {env['routing_policy']}" if env.get("routing_policy") else "") + ".",
        f"{cfg['num_prompts']} prompts, {mode}, max_new_tokens {cfg['max_new_tokens']}, {cfg['repeats']} repeat(s) "
        "(median time), methods interleaved prompt by prompt.",
        "",
        f"**{report.status_line()}**",
        "",
        "| method | tok/s | median tok/s | speed-up | median speed-up | tokens/forward | nodes/step | mismatches |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report.summary[OVERALL]:
        lines.append(f"| {s.method} | {s.tokens_per_s:.1f} | {s.median_tokens_per_s:.1f} | {_fmt(s.speedup, '.2f', 'x')} | "
                     f"{_fmt(s.median_speedup, '.2f', 'x')} | {_fmt(s.tokens_per_forward)} | {_fmt(s.nodes_per_step)} | "
                     f"{s.mismatches if cfg['greedy'] else ''} |")
    columns = report.domains + [OVERALL]
    for title, attr in (("Speed-up over hf-generate (tokens/s ratio) per domain", "speedup"),
                        ("Tokens per target forward per domain", "tokens_per_forward"),
                        ("Draft nodes verified per target forward per domain", "nodes_per_step")):
        lines += ["", f"### {title}", "", "| method | " + " | ".join(columns) + " |",
                  "| --- |" + " ---: |" * len(columns)]
        for i, row in enumerate(report.methods):
            cells = [getattr(report.summary[c][i], attr) for c in columns]
            lines.append(f"| {row['name']} | " + " | ".join(_fmt(v, '.2f', 'x' if attr == 'speedup' else '') for v in cells) + " |")
    chosen = [s for s in report.summary[OVERALL] if s.arms_chosen]
    if chosen or report.notes or report.mismatches:
        lines += ["", "### Notes", ""]
    for s in chosen:
        lines.append(f"- {s.method} chose: " + ", ".join(f"{arm} x{n}" for arm, n in s.arms_chosen.items()))
    for m in report.mismatches:
        label = "MISMATCH" if m.kind == "mismatch" else "tie"
        gap = f", logit gap to the target's best {m.gap:.3g}" if m.gap is not None else ""
        lines.append(f"- {label}: {m.method} on prompt {m.prompt_id} ({m.domain}), repeat {m.repeat}: first differs at "
                     f"token {m.first_diff} ({m.got_tokens} tokens vs {m.expected_tokens} from hf-generate{gap})")
    lines += [f"- {n}" for n in report.notes]
    lines += ["", "tok/s: new tokens / wall seconds (prefill included), total and median over prompts. Speed-up: over "
              "hf-generate, total tokens/s ratio and median of per-prompt ratios. Tokens/forward: new tokens per target "
              "forward after the prefill (mean accepted draft tokens + 1). oracle: the fastest ctxdraft arm per prompt.", ""]
    return "\n".join(lines)


def write_bench_chart(report: BenchReport, path: Path) -> bool:
    """A grouped bar chart of the speed-ups per domain; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = report.domains + [OVERALL]
    names = [m["name"] for m in report.methods]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(min(14, max(8, 1.2 * len(columns) + 0.15 * len(names) * len(columns))), 5))
    for i, name in enumerate(names):
        values = [report.summary[c][i].speedup or 0.0 for c in columns]
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(columns))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(columns)), columns, rotation=20)
    ax.set_ylabel("speed-up over hf-generate (tokens/s)")
    mode = "greedy" if report.config["greedy"] else f"T={report.config['temperature']}"
    ax.set_title(f"ctxdraft bench: {report.environment['target']['name']}, {report.config['num_prompts']} prompts, {mode}"
                 + ("" if report.ok else " - MISMATCH"))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def write_bench_outputs(report: BenchReport, out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png (when matplotlib is installed) atomically; returns what was written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CtxdraftError(f"--out {out_dir} is a file, not a directory")
    written = {}
    if not write_bench_chart(report, out_dir / "bench.png"):
        report.notes.append("bench.png not written: matplotlib is not installed (pip install 'ctxdraft[plot]')")
    else:
        written["png"] = out_dir / "bench.png"
    write_json_atomic(out_dir / "bench.json", report.to_dict())
    write_text_atomic(out_dir / "bench.md", bench_markdown(report))
    written = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", **written}
    return written
