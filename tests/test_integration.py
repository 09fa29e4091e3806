"""The real embedded default target (SmolLM2-135M-Instruct): speculative output equals HF greedy."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from ctxdraft.selfdraft import load_bundle
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.runtime.target import checkpoint_hash

pytestmark = pytest.mark.integration

PROMPTS = [
    "List the first ten prime numbers, separated by commas, then list them again in reverse order.",
    "Summarize in two sentences: The town council met on Tuesday to discuss the new bridge. The bridge will "
    "connect the old market to the train station. Construction starts in May and should take two years. "
    "The council said the bridge will cost four million euros.",
    "Write a Python function that returns the factorial of n.",
]


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


def hf_greedy(model, ids, n, eos):
    inp = torch.tensor([ids])
    out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[:i]
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_none_and_lookup_equal_hf_greedy(bundle, prompt):
    target = bundle.target
    ids = target.encode(prompt)
    expected = hf_greedy(target.model, ids, 48, target.eos_ids)
    for arm in ("none", "lookup"):
        result = bundle.generate(prompt, draft=arm, max_new_tokens=48)
        assert result.prompt_ids == ids
        assert result.token_ids == expected, f"arm {arm} diverged from HF greedy"
        assert result.text == target.tokenizer.decode(expected, skip_special_tokens=True)


def test_the_shipped_feature_head_drafts_losslessly():
    """The shipped bundle's EAGLE-3-style head (stored in bfloat16) loads into a float32 target, gets drafts
    accepted, and leaves the greedy output exactly HF's."""
    b = load_bundle(dtype="float32", calibrate=False)
    assert b.arm_spec("feature")["kind"] == "feature"
    accepted = 0
    for prompt in PROMPTS:
        ids = b.target.encode(prompt)
        result = b.generate(prompt, draft="feature", max_new_tokens=48)
        assert result.token_ids == hf_greedy(b.target.model, ids, 48, b.target.eos_ids)
        accepted += result.stats.accepted_tokens
    assert accepted > 10  # a broken head (wrong layers, a bad cast) gets next to nothing accepted


def test_default_bundle_matches_the_embedded_target(bundle):
    # The hash bundle.json records is the hash of the stored checkpoint, recomputed here from its files (not read
    # from the cache's stored hash, which load_bundle trusts): a change to checkpoint_hash or a stale stored hash
    # would make every shipped bundle refuse its own target.
    assert checkpoint_hash(bundle.target.path) == bundle.info["target"]["hash"] == bundle.target.content_hash
    with pytest.raises(CtxdraftError, match="was made for target smollm2-135m-instruct"):
        bundle.check_target(dataclasses.replace(bundle.target, content_hash="0" * 16))
    assert bundle.target.num_layers == 30 and bundle.target.vocab_size == 49152


def test_public_api_shape(bundle):
    assert bundle.path.is_dir() and "none" in bundle.arms and "lookup" in bundle.arms
    assert bundle.target.name == "smollm2-135m-instruct"
    t0 = time.perf_counter()
    r = bundle.generate("Say hello.", draft="auto", max_new_tokens=8)
    elapsed = time.perf_counter() - t0
    assert r.routed and r.arm in bundle.arms and r.prompt_ids == bundle.target.encode("Say hello.")
    assert 0 < len(r.token_ids) <= 8 and r.text == bundle.target.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    s = r.stats
    assert s.new_tokens == len(r.token_ids) <= 1 + s.accepted_tokens + (s.target_forwards - 1)
    assert 0 <= s.accepted_tokens <= s.drafted_tokens and sum(s.accepted_per_position) == s.accepted_tokens
    # The times are seconds of this call, measured around it here: not ms, not counting the load before it.
    assert 0 < s.route_s < s.wall_s <= elapsed and s.tokens_per_s >= s.new_tokens / elapsed


def test_calibrating_the_shipped_bundle(tmp_path, monkeypatch):
    """The shipped bundle carries its trajectories: calibrate measures this machine, retrains from every stored
    row, stores the result under the calibration directory (never in the package) and routing then uses it."""
    from ctxdraft.selfdraft.learning.rewards import read_trajectories
    from ctxdraft.selfdraft.serving.calibration import calibrate, find_calibration

    monkeypatch.setenv("CTXDRAFT_CALIBRATIONS", str(tmp_path))
    b = load_bundle(calibrate=True)
    shipped = {p.name: p.read_bytes() for p in b.path.iterdir() if p.is_file()}
    assert find_calibration(b) is None
    calibration = calibrate(b, reps=2, epochs=20)
    assert calibration.path.parent == tmp_path
    rows = len(read_trajectories(b.path))
    assert rows >= 100 and calibration.report["rows"] == calibration.report["num_train"] + calibration.report["num_eval"] == rows
    longest = max(a["settings"].get("draft_len", 0) for a in b.info["arms"])
    steps = calibration.profile.target_step_s
    # measured seconds: positive and finite (no upper bound: a loaded CI machine is slow, not wrong)
    assert set(range(1, longest + 2)) <= set(steps) and all(0 < s < math.inf for s in steps.values())
    assert calibration.machine["dtype"] == str(b.target.dtype).removeprefix("torch.")
    assert {p.name: p.read_bytes() for p in b.path.iterdir() if p.is_file()} == shipped
    assert find_calibration(b).path == calibration.path
    r = b.generate("Say hello.", draft="auto", max_new_tokens=8)
    assert r.routed and r.arm in b.arms
    assert b.router().path == calibration.policy_path
