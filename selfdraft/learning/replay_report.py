"""The replay benchmark's report (``replay.run_replay``'s result as a ``base.report.Report``)."""
from __future__ import annotations

import torch

from ..base.report import Report, Table

LABELS = {"frozen": "offline policy, frozen", "updated": "update-policy every {n} requests (explore {eps:g})"}


def label(name: str, config: dict) -> str:
    """A learner's name in words."""
    if name in LABELS:
        return LABELS[name].format(n=config["update_every"], eps=config["explore"])
    return f"LinUCB, alpha {name.split('-', 1)[1]}" if name.startswith("linucb-") else name


def _half_width(updates: list[dict]) -> float:
    widths = [(u["gain"]["high"] - u["gain"]["low"]) / 2 for u in updates if u["gain"]["low"] is not None]
    return sum(widths) / len(widths) if widths else float("nan")


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    se = f" ± {stat['se']:.3f}" if stat["se"] is not None else ""
    return f"{stat['mean']:.3f}{se}"


def replay_report(result: dict, source: str, seconds: float) -> Report:
    """Regret curves of every learner (held-out and online), the update-policy estimates against the truth, the
    summary at the chosen number of requests and the settings."""
    cfg = result["config"]
    cps = result["checkpoints"]
    shown = [k for k, t in enumerate(cps) if t % 50 == 0 or t == cps[-1]]
    report = Report("Replay benchmark: learning from logged traffic", [
        f"Rewards: {source} ({result['num_rows']} prompts, domains {', '.join(result['domains'])}; arms "
        f"{', '.join(result['arms'])}). Offline policy trained on the pool rows of {', '.join(cfg['offline_domains'])} "
        f"only; traffic drawn uniformly from the pool rows of all domains; {cfg['seeds']} seed(s) (split, traffic, "
        f"exploration), mean ± standard error over seeds. Held-out evaluation: {cfg['eval_frac']:.0%} of each domain.",
        "Regret to the per-prompt oracle of each learner's current greedy policy on the held-out prompts:",
    ])
    held_out = Table(["learner", *(f"{cps[k]} req." for k in shown)])
    for name, curves in result["learners"].items():
        held_out.rows.append([label(name, cfg), *(_cell(curves["eval"][k]) for k in shown)])
    held_out.rows.append(["(reference) offline policy trained on all domains, full information",
                          *(_cell(result["full_information_eval_regret"]) for _ in shown)])
    report.add(held_out)
    report.add("Regret of the arms each learner actually chose on the requests so far (exploration included):")
    online = Table(["learner", *(f"{cps[k]} req." for k in shown[1:])])
    for name, curves in result["learners"].items():
        online.rows.append([label(name, cfg), *(_cell(curves["online"][k]) for k in shown[1:])])
    report.add(online)
    updates = [u for run in result["runs"] for u in run["updates"]]
    if updates:
        est = [u["gain"]["value"] for u in updates]
        true = [u["true_gain"] for u in updates]
        agree = sum((e >= 0) == (t >= 0) for e, t in zip(est, true))
        report.add(f"update-policy runs: {len(updates)}, of which {sum(u['replaced'] for u in updates)} replaced the "
                   "policy (the others kept it: the policy in use was estimated better on the logs so far). The off-policy "
                   f"estimate of the gain (new minus in use, mean speed-up on the logged requests) averaged "
                   f"{sum(est) / len(est):+.4f} (95% interval half-width {_half_width(updates):.4f} on average); the true "
                   f"gain, known here from the full-information rewards, averaged {sum(true) / len(true):+.4f}; the "
                   f"estimate had the right sign in {agree} of {len(updates)} updates.")
    s = result["summary"]
    if s:
        frozen, updated = s["frozen"]["eval_regret"]["mean"], s["updated"]["eval_regret"]["mean"]
        best = s["best_bandit"]
        report.add(f"**At {s['requests']} logged requests**: frozen {frozen:.3f}, updated {updated:.3f}"
                   + (f", best LinUCB ({label(best, cfg)}) {s[best]['eval_regret']['mean']:.3f}" if best else "") + ". "
                   f"Target 'updated <= half of frozen': {'met' if s['target_half_of_frozen'] else 'NOT met'}; "
                   f"'updated <= bandit': {'met' if s['target_no_worse_than_bandit'] else 'NOT met'}.")
    report.add(f"Settings: {cfg['num_requests']} requests, update every {cfg['update_every']}, explore {cfg['explore']}, "
               f"{cfg['folds']}-fold cross-fitted estimates, LinUCB on {cfg['linucb_dims']} principal components, policy "
               f"epochs {cfg['policy']['epochs']}; {seconds:.0f} s with {torch.get_num_threads()} torch thread(s).")
    return report
