"""The one cost model: what a speculative loop step costs on this machine, and what a trajectory is worth.

A *cost profile* (hardware- and dtype-dependent, measured here, medians of interleaved repetitions at one
context length) holds:
- ``target_step_s[m]``: one loop step's target forward over m = K + 1 positions + verification + cache crop of a
  chain of K drafted tokens; measured at every m up to 17 and at a few larger sizes above (``profile_sizes``),
  linearly interpolated in between (``step_seconds``);
- ``tree_step_s[m]``: the same for a token tree of m - 1 nodes (a tree attention mask instead of the causal one,
  tree verification, the accepted path's K/V rows moved into place): measured at the same sizes when the pool
  has a tree draft (``Draft.proposes_trees``), since on a CPU a tree step costs more than a chain step over as many
  positions (measured 1.1-1.4x here) and a chain-shaped profile over-values big trees;
- ``batch_step_s``: a calibration also times batched steps (``BatchDecoder``, B rows of k drafted tokens each, B in
  ``BATCH_WIDTHS``, k in ``BATCH_DRAFTS``) and ``batch_curve`` fits ``seconds = a + b * rows + c * positions`` to
  them: a batch's step pays per row (its own attention, cache and verification) as well as per position, so one
  row's curve under-prices a batch's base and over-prices its drafts;
- per draft (keyed by ``Draft.cost_key``, so arms that differ only in draft length or threshold share one
  measurement): ``evaluation_s``, one draft evaluation (a chain draft: ``Draft.propose`` of one token + roll-back;
  a tree draft: one whole proposal at its full depth divided by the evaluations it reports, since its per-step
  work, the trie, merge and budget, grows with the tree and not only with its head calls), and for
  exit drafts ``verify_s[k]`` / ``verify_stopped_s[k]``, the step's verification with k drafted tokens reusing
  the layer-E states the draft computed (without / with a confidence stop: then [0, E) already ran for all
  k + 1 positions).

A *trajectory* (``trajectories.py``, hardware-independent) is a list of loop steps. Its modelled time is

    seconds = sum over steps of  evaluations * evaluation_s + verify(nodes verified)

and an arm's *reward* on a prompt is its speed-up over plain decoding of the same tokens,
``plain_seconds / seconds`` with plain decoding = one single-position target step per step (the prefill is
common to all arms and left out). add-exits picks an exit's draft length and threshold with these numbers,
collect writes them as the policy's rewards, and calibrate recomputes them for another machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ctxdraft.triton_kernels import verify_greedy, verify_tree_greedy

from ..base.errors import CtxdraftError
from ..drafting.batch_decoding import BatchDecoder, BatchRequest
from ..drafting.decoding import GenerationConfig, target_forward
from ..drafting.draft import DecodeState, Draft, DraftOutput
from ..runtime.layers import LayerStack
from ..runtime.machine import machine_fingerprint
from .trajectories import Step, Trajectory

PROFILE_VERSION = 2
# The widest step a calibration times: a batch's forward covers every row's pending token and draft (8 rows of
# 8-token chains: 72 positions); past it ``step_seconds(..., extrapolate=True)`` continues the last line.
BATCH_POSITIONS = 97
BATCH_WIDTHS = (2, 4, 8, 16)  # batch steps a calibration times: rows ...
BATCH_DRAFTS = (0, 1, 2, 4)  # ... times drafted tokens per row


@dataclass
class CostProfile:
    context_tokens: int
    target_step_s: dict[int, float]  # m positions -> seconds (a chain)
    drafts: dict[str, dict] = field(default_factory=dict)  # cost key -> {"evaluation_s", ["verify_s", "verify_stopped_s"]}
    target_hash: str | None = None
    machine: dict = field(default_factory=dict)
    reps: int = 0
    measured_at: str = ""
    version: int = PROFILE_VERSION
    tree_step_s: dict[int, float] = field(default_factory=dict)  # m positions -> seconds (a tree of m - 1 nodes)
    batch_step_s: list[list[float]] = field(default_factory=list)  # [rows, positions, seconds] of batched steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_step_s"] = {str(m): s for m, s in self.target_step_s.items()}
        d["tree_step_s"] = {str(m): s for m, s in self.tree_step_s.items()}
        for entry in d["drafts"].values():
            for key in ("verify_s", "verify_stopped_s"):
                if key in entry:
                    entry[key] = {str(k): s for k, s in entry[key].items()}
        return d

    @classmethod
    def from_dict(cls, d) -> "CostProfile | None":
        """The profile stored in ``d``, or None when ``d`` is missing or from another version of this model."""
        if not isinstance(d, dict) or d.get("version") != PROFILE_VERSION:
            return None
        try:
            drafts = {}
            for key, entry in d["drafts"].items():
                drafts[key] = {"evaluation_s": float(entry["evaluation_s"])}
                if entry.get("tree"):
                    drafts[key]["tree"] = True
                for name in ("verify_s", "verify_stopped_s"):
                    if name in entry:
                        drafts[key][name] = {int(k): float(s) for k, s in entry[name].items()}
            return cls(int(d["context_tokens"]), {int(m): float(s) for m, s in d["target_step_s"].items()}, drafts,
                       d.get("target_hash"), dict(d.get("machine") or {}), int(d.get("reps", 0)), str(d.get("measured_at", "")),
                       tree_step_s={int(m): float(s) for m, s in (d.get("tree_step_s") or {}).items()},
                       batch_step_s=[[int(b), int(m), float(s)] for b, m, s in (d.get("batch_step_s") or [])])
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def fits(self, drafts: dict[str, Draft], target_hash: str | None) -> bool:
        """Whether this profile has every timing ``drafts`` (arm name -> Draft) need, for this target."""
        if target_hash is not None and self.target_hash != target_hash:
            return False
        if max(self.target_step_s, default=0) < max_positions(drafts) or 1 not in self.target_step_s:
            return False
        trees = [d for d in drafts.values() if d.proposes_trees]
        if trees and max(self.tree_step_s, default=0) < max(d.max_verified() for d in trees) + 1:
            return False  # a profile from before tree steps were timed as trees
        for draft in drafts.values():
            entry = self.drafts.get(draft.cost_key)
            if entry is None or bool(entry.get("tree")) != draft.proposes_trees:
                return False
            if draft.kind == "exit" and any(k not in entry.get(name, {}) for k in range(draft.draft_len + 1)
                                            for name in ("verify_s", "verify_stopped_s")):
                return False
        return True

    def step_seconds(self, num_positions: int, tree: bool = False, extrapolate: bool = False) -> float | None:
        """One loop step over ``num_positions`` positions (``tree``: a token tree of ``num_positions - 1`` nodes; one
        position is a plain step either way; a profile measured before tree steps were timed has the chain's only):
        measured, or interpolated linearly between the nearest measured sizes; past the largest None, or with
        ``extrapolate`` the line through the two largest (a batch's steps: a forward that wide is compute-bound,
        its cost linear in positions)."""
        steps = self.tree_step_s if tree and num_positions > 1 and self.tree_step_s else self.target_step_s
        if num_positions in steps:
            return steps[num_positions]
        below = max((m for m in steps if m < num_positions), default=None)
        above = min((m for m in steps if m > num_positions), default=None)
        if above is None and extrapolate and len(steps) >= 2:
            below, above = sorted(steps)[-2:]  # the line through the two largest, past the largest
        if below is None or above is None:
            return None
        low, high = steps[below], steps[above]
        return low + (high - low) * (num_positions - below) / (above - below)

    def step_curve(self, max_positions: int, tree: bool = False, extrapolate: bool = False) -> list[float]:
        """``[m] -> step_seconds(m, tree, extrapolate)`` for m = 1..max_positions (index 0 unused): what a tree
        draft's node budget reads (``Draft.set_costs``) and a batch decoder's draft lengths."""
        curve = [0.0] + [self.step_seconds(m, tree, extrapolate) for m in range(1, max_positions + 1)]
        if any(s is None for s in curve):
            raise CtxdraftError(f"the cost profile has no timing for steps of up to {max_positions} positions; "
                                "measure it again (collect --reprofile, or ctxdraft calibrate)")
        return curve

    def batch_curve(self, rows: int, max_positions: int) -> list[float]:
        """``[m]`` -> seconds of one step of ``rows`` rows over m positions in all (m = 1..max_positions, index 0
        unused): the least-squares fit ``a + b * rows + c * m`` of the timed batch steps, or one row's curve
        (extrapolated past its end) for a profile without them."""
        if len(self.batch_step_s) < 3:
            return self.step_curve(max_positions, extrapolate=True)
        X = torch.tensor([[1.0, b, m] for b, m, _ in self.batch_step_s], dtype=torch.float64)
        y = torch.tensor([[s] for _, _, s in self.batch_step_s], dtype=torch.float64)
        a, b, c = torch.linalg.lstsq(X, y).solution[:, 0].tolist()
        floor = min(s for _, _, s in self.batch_step_s) / 4  # a fit is never trusted below a quarter of any timing
        return [0.0] + [max(a + b * rows + c * m, floor) for m in range(1, max_positions + 1)]

    def verify_seconds(self, cost_key: str, nodes: int, stopped: bool) -> float:
        """One step's target work when it verifies ``nodes`` draft positions (a chain's drafted tokens, a tree's nodes)."""
        entry = self.drafts[cost_key]
        if "verify_s" in entry:  # an exit draft: verification reuses the layer-E states the draft computed
            value = entry["verify_stopped_s" if stopped else "verify_s"].get(nodes)
        else:
            value = self.step_seconds(nodes + 1, tree=bool(entry.get("tree")))
        if value is None:
            raise CtxdraftError(f"the cost profile has no timing for verifying {nodes} drafted token(s) of {cost_key!r}; "
                                "measure it again (collect --reprofile, or ctxdraft calibrate)")
        return value

    def seconds(self, traj: Trajectory, cost_key: str) -> float:
        """Modelled decoding time of a trajectory of the draft measured under ``cost_key`` (prefill excluded)."""
        if cost_key not in self.drafts:
            raise CtxdraftError(f"the cost profile has no timings for draft {cost_key!r}; measure it again "
                                "(collect --reprofile, or ctxdraft calibrate)")
        evaluation_s = self.drafts[cost_key]["evaluation_s"]
        return sum(s.evaluations * evaluation_s + self.verify_seconds(cost_key, s.nodes, s.stopped) for s in traj.steps)

    def plain_seconds(self, plain: Trajectory) -> float:
        """Modelled time of plain decoding (one single-position target step per loop step)."""
        return len(plain.steps) * self.target_step_s[1]

    def speedup(self, traj: Trajectory, plain: Trajectory, cost_key: str) -> float:
        """The reward: modelled speed-up of this trajectory over plain decoding of the same tokens."""
        seconds = self.seconds(traj, cost_key)
        return self.plain_seconds(plain) / seconds if seconds > 0 else 1.0


def plain_steps(new_tokens: int, max_new_tokens: int, ended_early: bool) -> int:
    """Loop steps of plain decoding for ``new_tokens`` tokens (as ``trajectories.replay`` of the ``none`` arm): the
    first token comes from the prefill; a generation that ended on EOS also spent a step on the EOS."""
    return new_tokens if ended_early and new_tokens < max_new_tokens else max(new_tokens - 1, 0)


def plain_trajectory(num_plain_steps: int, new_tokens: int) -> Trajectory:
    """Plain decoding as a trajectory: ``num_plain_steps`` single-position target steps, nothing drafted."""
    return Trajectory([Step(0, 0, 0)] * num_plain_steps, new_tokens)


def reward(profile: CostProfile, cost_key: str, traj: Trajectory, num_plain_steps: int) -> float:
    """The reward of ``traj`` (of the draft measured under ``cost_key``) under ``profile``: its modelled speed-up
    over plain decoding of the same tokens in ``num_plain_steps`` steps. Offline rows, recomputed rows and served
    requests all get their rewards here."""
    return profile.speedup(traj, plain_trajectory(num_plain_steps, traj.new_tokens), cost_key)


def max_positions(drafts: dict[str, Draft]) -> int:
    """The most positions one verification step of these drafts covers (K + 1; a tree: its node cap + 1)."""
    return max([d.max_verified() for d in drafts.values()] + [0]) + 1


def max_depth(drafts: dict[str, Draft]) -> int:
    """The most tokens one step of these drafts can accept, plus the bonus token (how far a teacher pass must
    extend past EOS)."""
    return max([d.draft_len for d in drafts.values()] + [0]) + 1


def profile_sizes(max_positions: int) -> list[int]:
    """The step sizes a profile measures: every size up to 17 positions (chains), then 25, 33, 49, 65, 97, ... and
    ``max_positions`` (trees; ``step_seconds`` interpolates between them)."""
    sizes = list(range(1, min(max_positions, 17) + 1))
    m = 25
    while m < max_positions:
        sizes.append(m)
        m = m + 8 if m < 33 else m + (m - 1) // 2
    return sizes + ([max_positions] if max_positions > 17 else [])


def set_costs(drafts: dict[str, Draft], profile: "CostProfile") -> None:
    """Hand every draft the profile's step costs (a tree draft sizes its trees with them)."""
    for draft in drafts.values():
        draft.set_costs(profile.step_curve(draft.max_verified() + 1, draft.proposes_trees))


def context_ids(token_lists: list[list[int]], max_new_tokens: int, max_context: int, positions: int) -> list[int]:
    """The context a profile is measured at: as long as a typical decoding step sees (the median prompt plus
    half the new tokens), filled with real prompt tokens."""
    lengths = sorted(len(t) for t in token_lists) or [64]
    length = min(lengths[len(lengths) // 2] + max_new_tokens // 2, max_context - positions - 2)
    source = [t for tokens in token_lists for t in tokens] or [0]
    return (source * (length // len(source) + 1))[: max(2, length)]


def median_times(jobs: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median seconds of each job, timed interleaved (a noisy neighbour slows all of them alike)."""
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(reps):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine_info(dtype: torch.dtype) -> dict:
    """Where a profile was measured: ``machine.machine_fingerprint`` (device, CPU model, threads, dtype, torch)
    plus the platform and core count."""
    return {**machine_fingerprint(dtype), "platform": platform.platform(), "cpus": os.cpu_count()}


class _Repeat(Draft):
    """Proposes ``draft_len`` copies of one token: a batch step's cost, whatever greedy verification makes of them."""

    kind = "repeat"

    def __init__(self, draft_len: int, token: int):
        super().__init__("repeat")
        self.draft_len, self.token = draft_len, token

    def propose(self, state: DecodeState, max_len: int) -> DraftOutput:
        return DraftOutput([self.token] * min(self.draft_len, max_len), evaluations=0, stopped=False)


@torch.inference_mode()
def measure_profile(stack: LayerStack, drafts: dict[str, Draft], context: list[int], vocab_size: int, reps: int = 7,
                    target_hash: str | None = None, widest: int = 0, batch: bool = False) -> CostProfile:
    """Measure the profile ``drafts`` (arm name -> Draft) need at a context of ``len(context)`` tokens, steps of up to
    ``widest`` positions, and with ``batch`` the batched steps (``BATCH_WIDTHS`` x ``BATCH_DRAFTS``)."""
    if reps < 1:
        raise CtxdraftError(f"profile repetitions must be >= 1, got {reps}")
    D = stack.config.hidden_size
    n = len(context)
    cache = stack.new_cache()
    stack.run(stack.embed(torch.tensor([context[:-1]])), 0, stack.num_layers, cache, torch.arange(n - 1))
    token = context[-1]

    def verify_job(num_positions: int, exit_layer: int = 0, stopped: bool = False):
        k = num_positions - 1
        early = torch.zeros(1, num_positions if stopped else k, D, dtype=stack.model.dtype) \
            if exit_layer and (k or stopped) else None
        out = DraftOutput([token] * k, exit_hidden=early, exit_layer=exit_layer)
        draft_ids = torch.tensor([out.ids], dtype=torch.long).reshape(1, k)
        num_draft = torch.tensor([k])

        def run():
            logits = target_forward(stack, cache, [token] * num_positions, n - 1, out)
            int(verify_greedy(logits, draft_ids, num_draft).num_accepted[0])
            stack.crop(cache, n - 1)

        return run

    def tree_job(num_positions: int):
        # A binary tree of num_positions - 1 nodes under the pending token, as bushy as the merged arm's; nothing
        # matches, so the accepted path is empty and keep_rows moves nothing, which costs what a short path does.
        nodes = num_positions - 1
        out = DraftOutput([token] * nodes, parents=[-1 if i < 2 else (i - 2) // 2 for i in range(nodes)])
        tree_ids = torch.tensor([out.ids], dtype=torch.long)
        parents = torch.tensor([out.parents], dtype=torch.long)
        num_nodes = torch.tensor([nodes])

        def run():
            logits = target_forward(stack, cache, [token] * num_positions, n - 1, out)
            result = verify_tree_greedy(logits, tree_ids, parents, num_nodes)
            path = result.path_nodes[0, : int(result.num_accepted[0])].tolist()
            stack.keep_rows(cache, n - 1, [0] + [1 + node for node in path])
            stack.crop(cache, n - 1)

        return run

    def batch_jobs(rows: int) -> dict[str, Callable[[], None]]:
        """One batch of ``rows`` rows, prefilled once, timed at every ``BATCH_DRAFTS`` length."""
        decoder = BatchDecoder(stack, max_batch=rows)
        drafts = [_Repeat(0, token) for _ in range(rows)]
        # Room for every timed step (warm-up, reps, each length) to accept all it drafts: reserved up front.
        config = GenerationConfig(max_new_tokens=(reps + 3) * sum(k + 1 for k in BATCH_DRAFTS) + 1)
        for draft in drafts:
            decoder.add(BatchRequest(context, draft, config))
        decoder.step()  # admits (prefills) every row

        def job(drafted: int) -> Callable[[], None]:
            def run():
                for draft in drafts:
                    draft.draft_len = drafted
                decoder.step()
            return run

        return {f"batch:{rows}:{k}": job(k) for k in BATCH_DRAFTS}

    def evaluation_job(draft: Draft) -> tuple[Callable[[], None], list[int]]:
        """A job timing one proposal (see the module docstring) and the evaluations each run reported."""
        state = DecodeState(stack, cache, list(context), vocab_size, 0.0, 1.0, None)
        depth = max(draft.draft_len, 1) if draft.proposes_trees else 1
        evaluations = []

        def run():
            out = draft.propose(state, depth)
            evaluations.append(out.evaluations if out.evaluations is not None else 1)
            stack.crop(cache, n - 1)  # an exit draft wrote the pending token into layers [0, E)
            draft.accept(state, n - 1)

        draft.start(state)
        run()  # catch up on the context (a draft model, a layer exit head): later runs feed one token
        return run, evaluations

    sizes = profile_sizes(max(max_positions(drafts), widest))
    jobs = {f"verify:{m}": verify_job(m) for m in sizes}
    tree_sizes = [m for m in sizes if m > 1] if any(d.proposes_trees for d in drafts.values()) else []
    jobs.update({f"tree:{m}": tree_job(m) for m in tree_sizes})
    if batch:
        for rows in BATCH_WIDTHS:
            jobs.update(batch_jobs(rows))
    by_key: dict[str, Draft] = {}
    longest: dict[str, int] = {}
    for draft in drafts.values():
        by_key.setdefault(draft.cost_key, draft)
        longest[draft.cost_key] = max(longest.get(draft.cost_key, 0), draft.draft_len)
    evaluations: dict[str, list[int]] = {}  # evaluations each run of a draft's job reported
    for key, draft in by_key.items():
        if draft.kind == "none":
            continue
        jobs[f"draft:{key}"], evaluations[key] = evaluation_job(draft)
        if draft.kind == "exit":
            E = draft.head.exit_layer
            for k in range(longest[key] + 1):
                jobs[f"exit:{key}:{k}"] = verify_job(k + 1, E)
                jobs[f"exit-stopped:{key}:{k}"] = verify_job(k + 1, E, stopped=True)
    medians = median_times(jobs, reps)
    profile = CostProfile(
        context_tokens=n,
        target_step_s={m: medians[f"verify:{m}"] for m in sizes},
        tree_step_s={m: medians[f"tree:{m}"] for m in tree_sizes},
        batch_step_s=[[b, b * (k + 1), medians[f"batch:{b}:{k}"]]
                      for b in (BATCH_WIDTHS if batch else ()) for k in BATCH_DRAFTS],
        target_hash=target_hash, machine=machine_info(stack.model.dtype), reps=reps,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    for key, draft in by_key.items():
        per_run = max(evaluations[key][-1], 1) if evaluations.get(key) else 1  # the last timed run's count
        entry = {"evaluation_s": medians.get(f"draft:{key}", 0.0) / per_run, **({"tree": True} if draft.proposes_trees else {})}
        if draft.kind == "exit":
            entry["verify_s"] = {k: medians[f"exit:{key}:{k}"] for k in range(longest[key] + 1)}
            entry["verify_stopped_s"] = {k: medians[f"exit-stopped:{key}:{k}"] for k in range(longest[key] + 1)}
        profile.drafts[key] = entry
    return profile
