"""What the commands' reports read like as plain text (what ``ctxdraft`` prints without ``--json``).

Each function takes the report a command's library function returns and gives the text, lines joined
with newlines and no trailing newline; printing it is the caller's job.
"""
from __future__ import annotations

from ..base.fileio import display_path
from ..learning.policy_report import training_report


def add_exits_text(report: dict, out_dir) -> str:
    """``add_exits``' report: one row per arm added (agreement, cost, chosen settings, modelled speed-up)."""
    lines = [f"Added {len(report['exits'])} exit(s) to {display_path(out_dir)} in {report['total_s']:.0f} s "
             f"({report['data']['num_train']} training / {report['data']['num_heldout']} held-out prompts).",
             f"{'arm':<16} {'head':<8} {'vocab':>6} {'params':>8} {'agree':>6} {'cost':>5} {'K':>2} {'thr':>4} "
             f"{'accept':>6} {'tok/fwd':>7} {'speed-up':>8}"]
    for e in report["exits"]:
        vocab = e["draft_vocab"] or "full"
        agree = e["agreement"] if e["kind"] == "exit" else e["acceptance_per_position"]["overall"]["prefix"][0]
        kind = e["head"] if e["kind"] == "exit" else "feature"
        lines.append(f"{e['arm']:<16} {kind:<8} {vocab:>6} {e['num_params']:>8} {agree:>6.1%} "
                     f"{e['cost_ratio']:>5.2f} {e['draft_len']:>2} {e['threshold']:>4.1f} {e['acceptance']:>6.1%} "
                     f"{e['tokens_per_forward']:>7.2f} {e['speedup']:>7.2f}x")
        if e["kind"] == "feature":
            acc = e["acceptance_per_position"]["overall"]["conditional"]
            lines.append("  held-out acceptance per draft position (given the earlier ones): "
                         + ", ".join(f"{j + 1}: {a:.0%}" for j, a in enumerate(acc)))
    return "\n".join(lines)


def collect_text(summary: dict) -> str:
    """``collect``'s summary: rows written, the cost profile, the exactness check, the modelled speed-ups per
    domain and the wall-clock check."""
    lines = [f"Collected {summary['num_new']} prompt(s) into {summary['out']} "
             f"({summary['num_skipped']} already there; {summary['num_rows']} rows in all) "
             f"in {summary['seconds']['total']:.0f} s."]
    prof = summary["cost_profile"]
    step = prof["target_step_ms"]
    longest = max(step, key=int)
    lines.append(f"Cost profile at {prof['context_tokens']} context tokens"
                 f"{' (measured now)' if summary['profiled_now'] else ''}: target step {step['1']:.1f} ms for 1 position, "
                 f"{step[longest]:.1f} ms for {longest}.")
    check = summary["exactness_check"]
    if check["arm"]:
        lines.append(f"Simulated trajectories of {check['arm']} equal the real run on {check['exact']}/{check['prompts']} prompts.")
    overall = summary.get("overall")
    if overall:
        domains = summary["domains"]
        names = list(overall["speedup"])
        width = max(len(n) for n in names + ["oracle"]) + 1
        cols = list(domains) + ["overall"]
        lines += ["", "Modelled mean speed-up over plain decoding:",
                  f"{'arm':<{width}}" + "".join(f"{c[:12]:>13}" for c in cols)]
        for name in names + ["oracle"]:
            cells = []
            for c in cols:
                block = overall if c == "overall" else domains[c]
                cells.append(block["oracle"] if name == "oracle" else block["speedup"][name])
            lines.append(f"{name:<{width}}" + "".join(f"{v:>13.3f}" for v in cells))
    wall = summary.get("wallclock")
    if wall and "skipped" not in wall:
        r = wall["pearson_speedup"]
        lines += ["", f"Wall-clock check on {wall['num_prompts']} prompt(s): Pearson r "
                  f"{'n/a' if r is None else f'{r:.3f}'} between modelled and measured speed-ups, mean abs error "
                  f"{wall['mean_abs_error_speedup']:.3f}; trajectories exact {wall['trajectories_exact']}."]
    elif wall:
        lines += ["", f"Wall-clock check skipped: {wall['skipped']}"]
    return "\n".join(lines)


def policy_report_text(report: dict) -> str:
    """``train_policy``'s report: the held-out table (Markdown) and the ONNX check."""
    text = training_report(report).to_markdown().removesuffix("\n")
    onnx = report.get("onnx", {})
    if "max_abs_diff" in onnx:
        text += (f"\n- policy.onnx ({onnx['provider']}): max |onnxruntime - torch| = {onnx['max_abs_diff']:.2e}, "
                 f"one routing decision {onnx['choose_median_ms']:.3f} ms")
    return text
