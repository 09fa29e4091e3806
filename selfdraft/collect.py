"""Offline bandit data for the routing policy: every arm's exact greedy trajectory, its cost and its reward.

Under greedy decoding every accepted draft token equals a target token, so once the target's own greedy
continuation is known, whether a draft token is accepted depends only on what the draft predicts *along
the target's sequence* (teacher forcing). One pass per draft over prompt + continuation therefore gives
the whole speculative trajectory of that arm, without running it:

- ``lookup``: the n-gram index over the true prefix (prompt lookup reads committed tokens only);
- ``exit@E``: the exit head on the layer-E states of ONE target pass over prompt + continuation;
- ``model``: one forward of the draft model over prompt + continuation;
- ``none``: nothing.

``replay`` then runs the decoding loop's own bookkeeping (``decoding.speculative_decode``: the budget
``max_new_tokens - len(new) - 1``, the arm's draft length, an exit arm's confidence stop, EOS) on those
predictions. Target forwards, accepted tokens and new tokens are exact. Drafted tokens are exact too,
except for exit arms with a confidence threshold: after the first rejected token the real draft continues
from its own (wrong) token, whose confidence teacher forcing does not see, so the number of rejected
tokens drafted after it is estimated from the teacher-forced confidences.

Cost model (``profile_costs``, stored in bundle.json ``cost_profile``, measured again when the pool changes): the time of one
loop step = ``draft_steps * draft_step_s[arm] + verify_s[arm][K]``, where ``verify_s`` is the measured
time of the target forward + verification + cache crop over K + 1 positions (exit arms: with the layer-E
states the draft already computed, as ``decoding.target_forward`` reuses them). The reward of an arm on a
prompt is its modelled speed-up over ``none``: modelled time of plain decoding of the same tokens divided
by the modelled time of the arm's trajectory (the prefill is common to all arms and left out).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ctxdraft.triton_kernels import verify_greedy

from .decoding import DecodeState, GenerationConfig, prefill, speculative_decode, target_forward
from .drafts import Draft, DraftOutput, LookupDraft, LookupSettings, NgramIndex
from .errors import CtxdraftError
from .features import hidden_features, hidden_spec
from .fileio import write_json_atomic

REPORT_FILE = "reports/collect.json"
PROFILE_VERSION = 1
Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class CollectConfig:
    max_new_tokens: int = 128
    draft_len: int | None = None  # override every drafting arm's draft length (recorded in the rows' pool hash)
    feature_layer: int | None = None  # None: the bundle's hidden-feature layer, else round(L / 3)
    resume: bool = False  # skip ids already in the output file
    wallclock_sample: int = 0  # prompts to also run for real with every arm, to check the cost model
    reprofile: bool = False  # measure the costs again even when the bundle has a fitting profile
    profile_reps: int = 7

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise CtxdraftError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.draft_len is not None and self.draft_len < 1:
            raise CtxdraftError(f"--draft-len must be >= 1, got {self.draft_len}")
        if self.wallclock_sample < 0:
            raise CtxdraftError(f"--wallclock-sample must be >= 0, got {self.wallclock_sample}")
        if self.profile_reps < 1:
            raise CtxdraftError("profile_reps must be >= 1")


# ----------------------------------------------------------------------------------------------
# Teacher-forced drafts


@dataclass
class Proposal:
    """What an arm's draft proposes at one step, read off the teacher-forced pass."""

    ids: list[int]  # drafted tokens; exact up to (and including) the first rejected one
    draft_steps: int  # draft evaluations (lookups, draft-model forwards, exit-head evaluations)
    covered: bool = False  # an exit draft stopped on low confidence: it already ran [0, E) for one more position


class TeacherForced:
    """The ``none`` arm: proposes nothing."""

    kind = "none"
    draft_len = 0

    def propose(self, seq: list[int], pending: int, max_len: int) -> Proposal:
        return Proposal([], 0)


class LookupTeacherForced(TeacherForced):
    """Prompt lookup over the true prefix, with the same incremental index as ``drafts.LookupDraft``."""

    kind = "lookup"

    def __init__(self, settings: LookupSettings):
        self.draft_len = settings.draft_len
        self.index = NgramIndex(settings.ngram_sizes)

    def propose(self, seq, pending, max_len):
        tokens = seq[: pending + 1]
        self.index.update(tokens)
        return Proposal(self.index.lookup(tokens, min(max_len, self.draft_len)), 1)


class PredictionTeacherForced(TeacherForced):
    """A model or exit draft: its greedy token (and confidence) after every prefix of the sequence.

    ``predictions[i]`` is the draft's greedy token after ``seq[: i + 1]``; ``confidence[i]`` its top
    probability (exit arms with a threshold stop drafting below it, like ``exits.ExitDraft``).
    """

    def __init__(self, kind: str, predictions: list[int], draft_len: int, confidence: list[float] | None = None,
                 threshold: float = 0.0):
        self.kind = kind
        self.predictions = predictions
        self.confidence = confidence
        self.draft_len = draft_len
        self.threshold = threshold

    def propose(self, seq, pending, max_len):
        K = min(max_len, self.draft_len)
        ids: list[int] = []
        for j in range(max(K, 0)):
            i = pending + j
            if self.threshold > 0 and self.confidence[i] < self.threshold:
                return Proposal(ids, j + 1, covered=True)
            ids.append(self.predictions[i])
        return Proposal(ids, K if K > 0 else 0)


@dataclass
class TeacherPass:
    """The target's sequence for one prompt, and its layer-E states where exit arms need them."""

    token_ids: list[int]  # prompt + greedy continuation (+ EOS + the target's greedy tokens past it)
    prompt_len: int
    exit_states: dict[int, torch.Tensor] = field(default_factory=dict)  # E -> [T, D] residual after layer E-1


@torch.inference_mode()
def teacher_pass(stack, prompt_ids: list[int], new_ids: list[int], exit_layers: list[int], eos_ids,
                 ended_on_eos: bool, extend: int) -> TeacherPass:
    """One target pass over prompt + continuation, keeping the layer-E states of ``exit_layers``.

    When the continuation ended on EOS, a draft may still propose tokens past it, and the target verifies
    them like any others; so the sequence is extended by the EOS the target chose and then ``extend`` more
    greedy target tokens (one single-token forward each).
    """
    seq = list(prompt_ids) + list(new_ids)
    need_pass = bool(exit_layers) or ended_on_eos
    if not need_pass:
        return TeacherPass(seq, len(prompt_ids))
    layers = sorted(set(exit_layers))
    L = stack.num_layers
    cache = stack.new_cache()
    states: dict[int, list[torch.Tensor]] = {E: [] for E in layers}

    def forward(ids: list[int], start: int) -> torch.Tensor:  # -> [1, T, V] logits of the last position
        positions = torch.arange(start, start + len(ids))
        hidden = stack.embed(torch.tensor([ids]))
        done = 0
        for E in layers:
            hidden = stack.run(hidden, done, E, cache, positions)
            states[E].append(hidden[0])
            done = E
        hidden = stack.run(hidden, done, L, cache, positions)
        return stack.logits(hidden[:, -1:])

    logits = forward(seq, 0)
    if ended_on_eos:
        eos = int(logits[0, -1].argmax())
        if eos not in eos_ids:  # the one-pass numerics disagree with the incremental run on a near tie
            eos = min(eos_ids)
        pending = [eos]
        for _ in range(extend + 1):
            seq.append(pending[0])
            logits = forward(pending, len(seq) - 1)
            pending = [int(logits[0, -1].argmax())]
    return TeacherPass(seq, len(prompt_ids), {E: torch.cat(s) for E, s in states.items()})


@torch.inference_mode()
def model_predictions(draft, token_ids: list[int], vocab_size: int, chunk: int = 256) -> list[int]:
    """A ``drafts.ModelDraft``'s greedy token after every prefix: one forward of the draft model."""
    stack = draft.stack
    cache = stack.new_cache()
    out: list[int] = []
    for start in range(0, len(token_ids), chunk):
        ids = token_ids[start : start + chunk]
        hidden = stack.run(stack.embed(torch.tensor([ids])), 0, stack.num_layers, cache, torch.arange(start, start + len(ids)))
        out += stack.logits(hidden)[0, :, :vocab_size].argmax(-1).tolist()
    return out


@torch.inference_mode()
def exit_predictions(head, exit_states: torch.Tensor, chunk: int = 256) -> tuple[list[int], list[float]]:
    """An exit head's greedy token and top probability after every prefix, from the layer-E states
    [T, D] of the target's pass (``exits.ExitHead``: ``head(hidden, cache, positions)``, ``to_full_ids``)."""
    cache = head.new_cache()  # the layer head attends over the sequence; the linear head has no cache
    predictions: list[int] = []
    confidence: list[float] = []
    T = exit_states.shape[0]
    for start in range(0, T, chunk):
        hidden = exit_states[None, start : start + chunk]
        logits = head(hidden, cache, torch.arange(start, start + hidden.shape[1]))[0]  # [t, N]
        top_p, top_local = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        predictions += head.to_full_ids(top_local).tolist()
        confidence += top_p.tolist()
    return predictions, confidence


def teacher_forced(draft: Draft, tp: TeacherPass, vocab_size: int) -> TeacherForced:
    """The teacher-forced view of an arm's draft on one sequence."""
    kind = draft.kind
    if kind == "none":
        return TeacherForced()
    if kind == "lookup":
        return LookupTeacherForced(draft.settings)
    if kind == "model":
        return PredictionTeacherForced("model", model_predictions(draft, tp.token_ids, vocab_size), draft.settings.draft_len)
    if kind == "exit":
        E = draft.head.exit_layer
        predictions, confidence = exit_predictions(draft.head, tp.exit_states[E])
        return PredictionTeacherForced("exit", predictions, draft.settings.draft_len, confidence, draft.settings.threshold)
    raise CtxdraftError(f"arm {draft.name!r}: cannot simulate drafts of kind {kind!r} (known: none, lookup, model, exit)")


# ----------------------------------------------------------------------------------------------
# Replaying the decoding loop


@dataclass
class Step:
    draft_steps: int
    drafted: int
    accepted: int
    covered: bool = False


@dataclass
class Trajectory:
    """What ``speculative_decode`` would do with this arm on this prompt (greedy)."""

    steps: list[Step]
    new_tokens: int  # returned tokens (EOS excluded), as GenerationStats.new_tokens

    @property
    def target_forwards(self) -> int:  # including the prefill, as GenerationStats
        return 1 + len(self.steps)

    @property
    def drafted_tokens(self) -> int:
        return sum(s.drafted for s in self.steps)

    @property
    def accepted_tokens(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def draft_steps(self) -> int:
        return sum(s.draft_steps for s in self.steps)

    @property
    def tokens_per_forward(self) -> float:  # as GenerationStats.tokens_per_forward
        return self.new_tokens / len(self.steps) if self.steps else float(self.new_tokens)


def replay(tf: TeacherForced, token_ids: list[int], prompt_len: int, max_new_tokens: int, eos_ids) -> Trajectory:
    """Run ``speculative_decode``'s bookkeeping with the teacher-forced draft ``tf`` (greedy).

    ``token_ids``: prompt + the target's greedy tokens, including EOS and the target's tokens past it when
    generation ended on EOS (drafts may propose past it; see ``teacher_pass``).
    """
    eos_at = next((i for i in range(prompt_len, len(token_ids)) if token_ids[i] in eos_ids), len(token_ids))
    pending = prompt_len  # the first new token comes from the prefill; it is not in the target cache yet
    steps: list[Step] = []
    while pending < eos_at and pending + 1 - prompt_len < max_new_tokens:
        budget = max_new_tokens - (pending + 1 - prompt_len) - 1  # the verify step always adds one more token
        proposal = tf.propose(token_ids, pending, budget) if budget > 0 else Proposal([], 0)
        accepted = 0
        for token in proposal.ids:
            if pending + 1 + accepted >= len(token_ids) or token != token_ids[pending + 1 + accepted]:
                break
            accepted += 1
        if pending + 1 + accepted >= len(token_ids):
            raise CtxdraftError("internal: the trajectory ran past the known target tokens; extend the teacher pass")
        steps.append(Step(proposal.draft_steps, len(proposal.ids), accepted, proposal.covered))
        pending += accepted + 1
    new_tokens = min(eos_at - prompt_len, max_new_tokens, pending + 1 - prompt_len)
    return Trajectory(steps, new_tokens)


# ----------------------------------------------------------------------------------------------
# Cost profile


def _median_times(jobs: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
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


def _pool_key(arms: list[dict]) -> str:
    return hashlib.sha256(json.dumps(arms, sort_keys=True).encode()).hexdigest()[:12]


def profile_fits(profile: dict | None, bundle, key: str) -> bool:
    """Whether a stored profile was measured for this target and this pool (arms and their settings)."""
    return bool(profile) and profile.get("version") == PROFILE_VERSION and profile.get("pool") == key \
        and profile.get("target_hash") == bundle.info["target"].get("hash")


@torch.inference_mode()
def profile_costs(bundle, arm_names: list[str], drafts: dict[str, Draft], context_ids: list[int], max_positions: int,
                  reps: int = 7, key: str | None = None) -> dict:
    """Measure, at a context of ``len(context_ids)`` tokens on this machine: one loop step's target forward +
    verification + crop for 1..max_positions positions, each drafting arm's draft step, and exit arms'
    verification with their saved layer-E states. Medians of interleaved repetitions."""
    stack = bundle.stack
    D = stack.config.hidden_size
    n = len(context_ids)
    cache = stack.new_cache()
    stack.run(stack.embed(torch.tensor([context_ids[:-1]])), 0, stack.num_layers, cache, torch.arange(n - 1))
    token = context_ids[-1]

    def verify_job(num_positions: int, exit_layer: int = 0, covered: bool = False):
        k = num_positions - 1
        early = torch.zeros(1, num_positions if covered else k, D) if exit_layer and (k or covered) else None
        out = DraftOutput([token] * k, exit_hidden=early, exit_layer=exit_layer)
        draft_ids = torch.tensor([out.ids], dtype=torch.long).reshape(1, k)
        num_draft = torch.tensor([k])

        def run():
            logits = target_forward(stack, cache, [token] * num_positions, n - 1, out)
            int(verify_greedy(logits, draft_ids, num_draft).num_accepted[0])
            stack.crop(cache, n - 1)

        return run

    def draft_job(draft: Draft):
        state = DecodeState(stack, cache, list(context_ids), logits_dim(bundle), 0.0, 1.0, None)

        def run():
            draft.propose(state, 1)
            stack.crop(cache, n - 1)  # an exit draft wrote the pending token into layers [0, E)
            draft.accept(state, n - 1)

        draft.start(state)
        run()  # catch up on the context (a draft model, a layer exit head): later runs feed one token
        return run

    jobs = {f"verify{m}": verify_job(m) for m in range(1, max_positions + 1)}
    for name in arm_names:
        draft = drafts[name]
        if draft.kind == "none":
            continue
        jobs[f"draft:{name}"] = draft_job(draft)
        if draft.kind == "exit":
            E = draft.head.exit_layer
            for m in range(1, draft.settings.draft_len + 2):
                jobs[f"exit:{name}:{m}"] = verify_job(m, E)
                jobs[f"exitc:{name}:{m}"] = verify_job(m, E, covered=True)
    medians = _median_times(jobs, reps)
    profile = {
        "version": PROFILE_VERSION,
        "target_hash": bundle.info["target"].get("hash"),
        "pool": key,
        "context_tokens": n,
        "reps": reps,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # Seconds of one loop step's target forward + verification + crop, by number of positions (K + 1).
        "target_forward_s": {str(m): medians[f"verify{m}"] for m in range(1, max_positions + 1)},
        "arms": {},
    }
    for name in arm_names:
        draft = drafts[name]
        entry = {"kind": draft.kind, "draft_step_s": medians.get(f"draft:{name}", 0.0)}
        if draft.kind == "exit":
            K = draft.settings.draft_len
            entry["verify_s"] = {str(k): medians[f"exit:{name}:{k + 1}"] for k in range(K + 1)}
            entry["verify_covered_s"] = {str(k): medians[f"exitc:{name}:{k + 1}"] for k in range(K + 1)}
        profile["arms"][name] = entry
    return profile


def logits_dim(bundle) -> int:
    return bundle.target.model.get_output_embeddings().weight.shape[0]


def trajectory_seconds(traj: Trajectory, profile: dict, arm: str) -> float:
    """Modelled decoding time of a trajectory (prefill excluded)."""
    forward_s = profile["target_forward_s"]
    entry = profile["arms"][arm]
    total = 0.0
    for s in traj.steps:
        if "verify_s" in entry:
            verify = (entry["verify_covered_s"] if s.covered else entry["verify_s"]).get(str(s.drafted))
        else:
            verify = forward_s.get(str(s.drafted + 1))
        if verify is None:
            raise CtxdraftError(f"the cost profile has no timing for {s.drafted} draft tokens of arm {arm!r}; "
                                "re-run collect with --reprofile")
        total += s.draft_steps * entry["draft_step_s"] + verify
    return total


# ----------------------------------------------------------------------------------------------
# Collection


def pool_arms(bundle, draft_len: int | None) -> list[dict]:
    """The bundle's arms with the collection's draft-length override applied."""
    arms = json.loads(json.dumps(bundle.info["arms"]))
    if draft_len is not None:
        for arm in arms:
            if arm["kind"] != "none":
                arm.setdefault("settings", {})["draft_len"] = draft_len
    return arms


def pool_key(bundle, draft_len: int | None = None) -> str:
    """A short hash of the arms and their settings; rows collected for another pool cannot train this one."""
    return _pool_key(pool_arms(bundle, draft_len))


def default_feature_layer(num_layers: int) -> int:
    return max(1, min(num_layers, round(num_layers / 3)))


def _prompt_sha(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def _round(x: float) -> float:
    return float(f"{x:.7g}")


def read_rows_for_resume(path: Path) -> list[dict]:
    """Rows already collected; a half-written last line (an interrupted run) is cut off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows = []
    good_bytes = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            if lineno >= len(lines) - 1 and not raw.endswith(b"\n"):
                with open(path, "r+b") as f:  # the interrupted last row: drop it, it will be collected again
                    f.truncate(good_bytes)
                break
            raise CtxdraftError(f"rewards file {path}, line {lineno}: not a JSON object; fix or delete the file") from None
        rows.append(row)
        good_bytes += len(line) + 1
    return rows


def _check_resume(rows: list[dict], path: Path, key: str, config: CollectConfig, prompts: dict) -> None:
    for i, row in enumerate(rows):
        where = f"{path}, row {i + 1}"
        if row.get("pool") != key:
            raise CtxdraftError(f"{where} was collected for another pool of arms (or --draft-len); "
                                "run without --resume to start over, or write to another --out")
        if row.get("max_new_tokens") != config.max_new_tokens:
            raise CtxdraftError(f"{where} was collected with --max-new-tokens {row.get('max_new_tokens')}, not "
                                f"{config.max_new_tokens}; use the same value or start over without --resume")
        sha = prompts.get(row.get("id"))
        if sha is not None and sha != row.get("prompt_sha"):
            raise CtxdraftError(f"{where}: id {row.get('id')!r} has another prompt in the data file; "
                                "ids must identify prompts (start over without --resume)")


def _check_rows(rows: list[dict]) -> None:
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
            raise CtxdraftError(f"data row {i + 1}: 'id' must be a string or an integer, got {row.get('id')!r}")
        if row["id"] in seen:
            raise CtxdraftError(f"data row {i + 1}: duplicate id {row['id']!r}; ids must be unique")
        seen.add(row["id"])


def simulate_prompt(bundle, drafts: dict[str, Draft], prompt_ids: list[int], config: CollectConfig,
                    feature_layer: int | None, check_arm: str | None) -> dict:
    """Everything collect needs for one prompt: the target's greedy continuation (decoded for real with a
    lookup arm), the features, and every arm's replayed trajectory (not yet costed)."""
    stack = bundle.stack
    target = bundle.target
    t0 = time.perf_counter()
    pre = prefill(stack, prompt_ids, feature_layer)
    hidden = hidden_features(pre.pooled_hidden, len(prompt_ids)) if pre.pooled_hidden is not None else None
    runner = drafts[check_arm] if check_arm is not None else LookupDraft("lookup")
    gen = GenerationConfig(max_new_tokens=config.max_new_tokens)
    new_ids, stats = speculative_decode(stack, pre, runner, gen, target.eos_ids)
    generate_s = time.perf_counter() - t0
    ended_on_eos = len(new_ids) < config.max_new_tokens
    exit_layers = [d.head.exit_layer for d in drafts.values() if d.kind == "exit"]
    max_k = max([tf_draft_len(d) for d in drafts.values()] + [1])
    tp = teacher_pass(stack, prompt_ids, new_ids, exit_layers, target.eos_ids, ended_on_eos, max_k)
    V = logits_dim(bundle)
    trajectories = {name: replay(teacher_forced(d, tp, V), tp.token_ids, len(prompt_ids), config.max_new_tokens, target.eos_ids)
                    for name, d in drafts.items()}
    plain = replay(TeacherForced(), tp.token_ids, len(prompt_ids), config.max_new_tokens, target.eos_ids)
    checked = None
    if check_arm is not None:
        t = trajectories[check_arm]
        checked = (t.target_forwards, t.drafted_tokens, t.accepted_tokens, t.new_tokens) == (
            stats.target_forwards, stats.drafted_tokens, stats.accepted_tokens, stats.new_tokens)
    return {"new_ids": new_ids, "hidden": hidden, "trajectories": trajectories, "plain": plain, "ended_on_eos": ended_on_eos,
            "generate_s": generate_s, "simulate_s": time.perf_counter() - t0 - generate_s, "checked": checked}


def tf_draft_len(draft: Draft) -> int:
    settings = getattr(draft, "settings", None)
    return int(getattr(settings, "draft_len", 0) or 0)


def arm_record(traj: Trajectory, seconds: float, plain_s: float) -> dict:
    return {
        "speedup": _round(plain_s / seconds) if seconds > 0 else 1.0,
        "target_forwards": traj.target_forwards,
        "drafted_tokens": traj.drafted_tokens,
        "accepted_tokens": traj.accepted_tokens,
        "draft_steps": traj.draft_steps,
        "tokens_per_forward": _round(traj.tokens_per_forward),
        "modelled_s": _round(seconds),
    }


def build_drafts(bundle, arms: list[dict]) -> dict[str, Draft]:
    from .drafts import build_draft

    drafts = {}
    for spec in arms:
        drafts[spec["name"]] = build_draft(spec, bundle.target, bundle.path)
    return drafts


def collect(bundle, rows: list[dict], out_path: str | os.PathLike, config: CollectConfig | None = None,
            progress: Progress | None = None) -> dict:
    """Log every arm's reward for every prompt of ``rows`` (``fileio.read_prompts`` rows) into ``out_path``.

    One JSON row per prompt, appended and flushed as it is done (``policy.load_rewards`` reads them)::

        {"id", "domain", "prompt_sha", "prompt_len", "max_new_tokens", "new_tokens", "stop": "eos"|"length",
         "pool": <hash of the arms' settings>,
         "features": {"hidden": [D + 1 floats], "hidden_layer": f, "tokens": [prompt ids]},
         "arms": {name: {"speedup", "target_forwards", "drafted_tokens", "accepted_tokens", "draft_steps",
                         "tokens_per_forward", "modelled_s"}},
         "plain_s": modelled seconds of plain decoding, "generate_s": seconds this prompt's real run took}

    Profiles the costs once per bundle (saved in bundle.json ``cost_profile``) and sets bundle.json
    ``features`` when the bundle has no policy yet. Returns a summary (also in ``reports/collect.json``).
    """
    config = config or CollectConfig()
    config.validate()
    if not rows:
        raise CtxdraftError("no prompts to collect")
    _check_rows(rows)
    t_start = time.perf_counter()
    out_path = Path(out_path)
    target = bundle.target
    L = target.num_layers
    arms = pool_arms(bundle, config.draft_len)
    key = _pool_key(arms)
    arm_names = [a["name"] for a in arms]
    drafts = build_drafts(bundle, arms)

    features_info = bundle.info.get("features") or {}
    feature_layer = config.feature_layer or (features_info.get("layer") if features_info.get("kind") == "hidden" else None) \
        or default_feature_layer(L)
    if not 0 < feature_layer <= L:
        raise CtxdraftError(f"feature layer {feature_layer} is outside 1..{L}")

    prompts = {r["id"]: _prompt_sha(r["prompt"]) for r in rows}
    done_rows = read_rows_for_resume(out_path) if config.resume else []
    _check_resume(done_rows, out_path, key, config, prompts)
    done_ids = {r.get("id") for r in done_rows}
    todo = [r for r in rows if r["id"] not in done_ids]

    encoded = {}
    for r in todo:
        ids = target.encode(r["prompt"], chat=True)
        if len(ids) + config.max_new_tokens > target.max_context:
            raise CtxdraftError(f"prompt {r['id']!r} ({len(ids)} tokens) + --max-new-tokens {config.max_new_tokens} "
                                f"exceeds the model's context of {target.max_context} tokens")
        encoded[r["id"]] = ids

    # Cost profile: once per bundle, at a context typical of this data (median prompt + half the new tokens).
    max_positions = max([tf_draft_len(d) for d in drafts.values()] + [0]) + 1
    profile = bundle.info.get("cost_profile")
    profiled = False
    if config.reprofile or not profile_fits(profile, bundle, key):
        lengths = sorted(len(v) for v in encoded.values()) or [64]
        context_len = min(lengths[len(lengths) // 2] + config.max_new_tokens // 2, target.max_context - max_positions - 2)
        source = [t for v in encoded.values() for t in v] or target.encode(rows[0]["prompt"])
        context = (source * (context_len // max(1, len(source)) + 1))[:max(2, context_len)]
        profile = profile_costs(bundle, arm_names, drafts, context, max_positions, config.profile_reps, key)
        bundle.info["cost_profile"] = profile
        profiled = True
    # The routing features: the hidden state at the collection's layer, unless a trained policy already fixed them.
    spec = hidden_spec(feature_layer, target.model.config.hidden_size)
    features_changed = not bundle.info.get("policy") and bundle.info.get("features") != spec
    if features_changed:
        bundle.info["features"] = spec
    if (profiled or features_changed) and bundle.path is not None:
        bundle.save()

    check_arm = next((a["name"] for a in arms if a["kind"] == "lookup"), None)
    num_checked = num_exact = 0
    generate_s = simulate_s = 0.0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if config.resume else "w"
    with open(out_path, mode, encoding="utf-8") as f:
        if mode == "a" and out_path.stat().st_size and not out_path.read_bytes().endswith(b"\n"):
            f.write("\n")
        for i, r in enumerate(todo):
            prompt_ids = encoded[r["id"]]
            sim = simulate_prompt(bundle, drafts, prompt_ids, config, feature_layer, check_arm)
            generate_s += sim["generate_s"]
            simulate_s += sim["simulate_s"]
            if sim["checked"] is not None:
                num_checked += 1
                num_exact += bool(sim["checked"])
            seconds = {name: trajectory_seconds(t, profile, name) for name, t in sim["trajectories"].items()}
            plain_s = plain_seconds(sim["plain"], profile)
            row = {
                "id": r["id"], "domain": r.get("domain", "all"), "prompt_sha": prompts[r["id"]],
                "prompt_len": len(prompt_ids), "max_new_tokens": config.max_new_tokens,
                "new_tokens": len(sim["new_ids"]), "stop": "eos" if sim["ended_on_eos"] else "length", "pool": key,
                "features": {"hidden": [_round(x) for x in sim["hidden"].tolist()], "hidden_layer": feature_layer,
                             "tokens": list(prompt_ids)},
                "arms": {name: arm_record(t, seconds[name], plain_s) for name, t in sim["trajectories"].items()},
                "plain_s": _round(plain_s), "generate_s": round(sim["generate_s"], 4),
            }
            f.write(json.dumps(row) + "\n")
            f.flush()
            if progress is not None:
                progress(i + 1, len(todo))

    all_rows = read_rows_for_resume(out_path)
    summary = summarize(all_rows, arm_names)
    summary.update({
        "out": str(out_path),
        "num_new": len(todo),
        "num_skipped": len(rows) - len(todo),
        "max_new_tokens": config.max_new_tokens,
        "feature_layer": feature_layer,
        "pool": key,
        "profiled_now": profiled,
        "cost_profile": {"context_tokens": profile["context_tokens"],
                         "target_forward_ms": {k: round(v * 1e3, 3) for k, v in profile["target_forward_s"].items()},
                         "draft_step_ms": {a: round(e["draft_step_s"] * 1e3, 4) for a, e in profile["arms"].items()
                                           if a in arm_names}},
        "exactness_check": {"arm": check_arm, "prompts": num_checked, "exact": num_exact},
        "seconds": {"total": round(time.perf_counter() - t_start, 1), "generate": round(generate_s, 1),
                    "simulate": round(simulate_s, 1)},
    })
    if config.wallclock_sample:
        summary["wallclock"] = wallclock_check(bundle, rows, all_rows, arm_names, config)
    if bundle.path is not None:
        write_json_atomic(bundle.path / REPORT_FILE, summary)
    return summary


def plain_seconds(plain: Trajectory, profile: dict) -> float:
    """Modelled time of plain decoding (one single-position target forward per step)."""
    return len(plain.steps) * profile["target_forward_s"]["1"]


def summarize(rows: list[dict], arm_names: list[str]) -> dict:
    """Mean speed-up per arm, of the per-prompt oracle, and which arm is best how often, overall and per domain."""

    def block(subset: list[dict]) -> dict:
        speedups = {a: statistics.fmean(r["arms"][a]["speedup"] for r in subset) for a in arm_names}
        tpf = {a: statistics.fmean(r["arms"][a]["tokens_per_forward"] for r in subset) for a in arm_names}
        best_counts = {a: 0 for a in arm_names}
        for r in subset:
            best_counts[max(arm_names, key=lambda a: r["arms"][a]["speedup"])] += 1
        best = max(speedups, key=speedups.get)
        return {"num_prompts": len(subset), "speedup": speedups, "tokens_per_forward": tpf,
                "oracle": statistics.fmean(max(r["arms"][a]["speedup"] for a in arm_names) for r in subset),
                "best_single_arm": best, "oracle_choices": best_counts}

    rows = [r for r in rows if all(a in r.get("arms", {}) for a in arm_names)]
    if not rows:
        return {"num_rows": 0}
    domains = sorted({str(r.get("domain", "all")) for r in rows})
    return {"num_rows": len(rows), "overall": block(rows),
            "domains": {d: block([r for r in rows if str(r.get("domain", "all")) == d]) for d in domains}}


# ----------------------------------------------------------------------------------------------
# Wall-clock check of the cost model


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def spread_sample(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows taken round-robin over the domains, in data order."""
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(str(r.get("domain", "all")), []).append(r)
    out: list[dict] = []
    queues = list(by_domain.values())
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def wallclock_check(bundle, rows: list[dict], collected: list[dict], arm_names: list[str], config: CollectConfig) -> dict:
    """Run a sample of prompts for real with every arm (``Bundle.generate``) and compare the measured
    decoding speed-ups over ``none`` with the modelled ones. Arms run in a rotating order per prompt."""
    if config.draft_len is not None:
        return {"skipped": "--draft-len overrides the bundle's arms; Bundle.generate runs the bundle's own settings"}
    by_id = {r["id"]: r for r in collected}
    sample = [r for r in spread_sample(rows, config.wallclock_sample) if r["id"] in by_id]
    pairs = []
    exact = total = 0
    for i, r in enumerate(sample):
        decode_s = {}
        order = arm_names[i % len(arm_names):] + arm_names[: i % len(arm_names)]
        for arm in order:
            result = bundle.generate(r["prompt"], draft=arm, max_new_tokens=config.max_new_tokens)
            s = result.stats
            decode_s[arm] = s.wall_s - s.prefill_s - s.route_s
            logged = by_id[r["id"]]["arms"][arm]
            total += 1
            exact += (s.target_forwards, s.drafted_tokens, s.accepted_tokens) == (
                logged["target_forwards"], logged["drafted_tokens"], logged["accepted_tokens"])
        for arm in arm_names:
            logged = by_id[r["id"]]["arms"][arm]
            pairs.append({"id": r["id"], "arm": arm, "modelled": logged["speedup"],
                          "measured": decode_s["none"] / decode_s[arm] if "none" in decode_s else None,
                          "modelled_s": logged["modelled_s"], "measured_s": decode_s[arm]})
    scored = [p for p in pairs if p["arm"] != "none" and p["measured"] is not None]
    modelled = [p["modelled"] for p in scored]
    measured = [p["measured"] for p in scored]
    return {
        "num_prompts": len(sample),
        "pearson_speedup": _pearson(modelled, measured),
        "mean_abs_error_speedup": statistics.fmean(abs(a - b) for a, b in zip(modelled, measured)) if scored else None,
        "mean_modelled_speedup": statistics.fmean(modelled) if scored else None,
        "mean_measured_speedup": statistics.fmean(measured) if scored else None,
        # Absolute calibration: measured / modelled decoding seconds (1.0 = the profile's machine state).
        "time_ratio_measured_over_modelled": statistics.fmean(p["measured_s"] / p["modelled_s"] for p in pairs
                                                              if p["modelled_s"] > 0) if pairs else None,
        "trajectories_exact": f"{exact}/{total}",
        "pairs": pairs,
    }


def load_collected(path: str | os.PathLike) -> list[dict]:
    """Rows of a rewards file as written by ``collect`` (strict: any bad line is an error)."""
    from .fileio import read_jsonl

    return read_jsonl(path, what="rewards file")


__all__ = [
    "CollectConfig", "Proposal", "TeacherForced", "LookupTeacherForced", "PredictionTeacherForced", "TeacherPass",
    "teacher_pass", "model_predictions", "exit_predictions", "teacher_forced", "Step", "Trajectory", "replay",
    "profile_costs", "profile_fits", "trajectory_seconds", "plain_seconds", "pool_arms", "pool_key", "default_feature_layer",
    "collect", "simulate_prompt", "summarize", "wallclock_check", "spread_sample", "load_collected",
]

