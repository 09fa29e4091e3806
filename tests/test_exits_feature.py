"""Feature heads (EAGLE-3 style): lossless drafting from the target's captured states (Llama, Gemma 3 and Qwen2,
full and reduced vocabularies, K = 1/3/6), exact sampling, a teacher-forced replay equal to real runs, the training-time-
test forward equal to incremental drafting."""
from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, assert_follows, tiny_random

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.feature_draft import FeatureDraft, FeatureSettings
from ctxdraft.selfdraft.drafting.feature_head import FeatureCache, FeatureHead
from ctxdraft.selfdraft.learning.trajectories import replay, teacher_pass
from ctxdraft.selfdraft.runtime.layers import LayerStack

PROMPT = [5, 9, 2, 33, 7, 7, 18, 40, 3, 11, 5, 9, 2, 33]


def feature_draft(model, layers=(1, 2, 4), draft_len=3, threshold=0.0, vocab_ids=None, seed=0):
    torch.manual_seed(seed)
    head = FeatureHead(model, list(layers), vocab_ids).eval().requires_grad_(False)
    with torch.no_grad():  # an untrained head that still agrees with the target now and then
        head.fc.weight.add_(0.01 * torch.randn_like(head.fc.weight))
    return FeatureDraft("feature", head, FeatureSettings("general", list(layers), draft_len, threshold))


def greedy_reference(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(prompt):].tolist()


def run(model, draft, prompt, n, capture=True, **gen):
    stack = LayerStack(model)
    pre = prefill(stack, prompt, capture=draft.state_layers if capture else ())
    return speculative_decode(stack, pre, draft, GenerationConfig(max_new_tokens=n, **gen))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_greedy_feature_draft_matches_generate(arch, draft_len):
    model = tiny_random(arch)
    ref = greedy_reference(model, PROMPT, 26)
    for vocab_ids in (None, torch.arange(0, 61, 2)):
        out, stats = run(model, feature_draft(model, draft_len=draft_len, vocab_ids=vocab_ids), PROMPT, 26)
        assert out == ref and stats.drafted_tokens > 0
    # A prefill that did not keep the head's layers (the arm was picked after it): the draft runs the prompt again.
    out, _ = run(model, feature_draft(model, draft_len=draft_len), PROMPT, 26, capture=False)
    assert out == ref


def test_the_training_forward_equals_incremental_drafting():
    model = tiny_random("llama")
    head = feature_draft(model).head
    stack = LayerStack(model)
    tokens = PROMPT + greedy_reference(model, PROMPT, 6)
    captured = dict.fromkeys(head.layers)
    stack.run(stack.embed(torch.tensor([tokens])), 0, 4, stack.new_cache(), torch.arange(len(tokens)), captured)
    states = torch.cat([captured[l][0] for l in head.layers], dim=-1)
    base = len(PROMPT) - 1
    with torch.no_grad():
        batched = head(states, torch.tensor(tokens), torch.tensor([base]), 3)  # draft positions 1..3 from base
        cache = FeatureCache()
        fed = head.feed(cache, states[: base + 1], torch.tensor(tokens[1 : base + 2]), torch.arange(base + 1))
        s = fed[-1:]
        incremental = [head.logits(s)]
        for j in range(2, 4):
            s = head.step(cache, s, tokens[base + j], base + j)
            incremental.append(head.logits(s))
    for a, b in zip(batched, incremental):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_teacher_forced_replay_equals_real_runs(threshold):
    model = tiny_random("llama", seed=3)
    stack = LayerStack(model)
    draft = feature_draft(model, draft_len=4, threshold=threshold)
    for max_new in (1, 2, 20):
        new_ids, stats = run(model, draft, PROMPT, max_new)
        tp = teacher_pass(stack, PROMPT, new_ids, set(), ended_on_eos=False, layers=draft.state_layers, extend=8)
        traj = replay(draft.teacher_forced(tp, 61), tp.token_ids, len(PROMPT), max_new, set())
        assert (traj.target_forwards, traj.accepted_tokens, traj.new_tokens) == (
            stats.target_forwards, stats.accepted_tokens, stats.new_tokens)
        if threshold == 0:
            assert traj.drafted_tokens == stats.drafted_tokens


def test_sampling_keeps_the_target_distribution():
    V = 6
    model = tiny_random(vocab_size=V, seed=3)
    prompt = [1, 4, 2, 0, 5]
    temperature = 1.3
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        p2 = torch.softmax(model(torch.tensor([prompt + [t] for t in range(V)])).logits[:, -1] / temperature, -1)
    exact = p1[:, None] * p2
    draft = feature_draft(model, draft_len=2, vocab_ids=torch.tensor([0, 2, 3, 5]))
    num, counts, drafted = 1500, torch.zeros(V, V), 0
    for seed in range(num):
        out, stats = run(model, draft, prompt, 3, temperature=temperature, seed=seed)
        counts[out[0], out[1]] += 1
        drafted += stats.drafted_tokens
    assert drafted == num  # budget 1 per generation: the second token always went through draft + verify
    assert_follows(counts, exact, num)


@pytest.mark.parametrize("layers", [[], [2, 2], [3, 1], [0, 2], [2, 9]])
def test_bad_layers_are_refused(layers):
    with pytest.raises(CtxdraftError, match="feature layers"):
        FeatureHead(tiny_random("llama"), layers)


def test_a_bfloat16_head_is_stored_in_bfloat16_and_loads_into_any_dtype(tmp_path):
    from safetensors import safe_open

    from ctxdraft.selfdraft.drafting.feature_head import load_feature_head, save_feature_head

    model = tiny_random("llama")
    head = feature_draft(model, vocab_ids=torch.arange(0, 61, 2)).head.to(torch.bfloat16)
    path = tmp_path / "exits.safetensors"
    save_feature_head(path, "general", head)
    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if not k.endswith("vocab_ids")}
    assert dtypes == {torch.bfloat16}
    want = {k: v.float() for k, v in head.state_dict().items()}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_feature_head(model.to(dtype), path, "general", [1, 2, 4])
        got = loaded.state_dict()
        assert all(got[k].dtype == dtype and torch.equal(got[k].float(), want[k]) for k in want)
        assert torch.equal(loaded.vocab_ids, head.vocab_ids)


def test_add_exits_trains_a_feature_head_and_its_arm_drafts_losslessly(tmp_path):
    import json as _json

    from click.testing import CliRunner
    from tiny import save_word_target, write_word_prompts

    from ctxdraft.cli.main import main
    from ctxdraft.selfdraft.serving.bundle import load_bundle

    model_dir = save_word_target(tmp_path / "model")
    data = write_word_prompts(tmp_path / "data.jsonl", n=8)
    out = tmp_path / "bundle"
    args = ["add-exits", str(model_dir), "--head", "feature", "--layers", "1,2,4", "--data", str(data), "--out", str(out),
            "--steps", "4", "--self-distill-tokens", "8", "--eval-frac", "0.25", "--ttt-steps", "3", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = _json.loads(r.output)
    (entry,) = report["exits"]
    assert entry["kind"] == "feature" and entry["arm"] == "feature" and entry["layers"] == [1, 2, 4]
    acc = entry["acceptance_per_position"]["overall"]
    assert len(acc["prefix"]) == 6 and all(a >= b for a, b in zip(acc["prefix"], acc["prefix"][1:]))
    assert entry["train"]["steps"] == 4 and entry["cost_ratio"] > 0
    bundle = load_bundle(out, target=str(model_dir))
    assert "feature" in bundle.arms and bundle.info["feature_heads"][0]["name"] == "general"
    prompt = "is was and or"
    plain = bundle.generate(prompt, draft="none", max_new_tokens=16, chat=False)
    drafted = bundle.generate(prompt, draft="feature", max_new_tokens=16, chat=False)
    assert len(plain.token_ids) == 16 and drafted.token_ids == plain.token_ids and drafted.stats.drafted_tokens > 0
    # A second, domain-specialised head joins the pool beside the first.
    r = CliRunner().invoke(main, args[:-1] + ["--name", "a", "--domain", "a", "--samples", "1"])
    assert r.exit_code == 0, r.output
    bundle = load_bundle(out, target=str(model_dir))
    assert {"feature", "feature:a"} <= set(bundle.arms)
    assert _json.loads((out / "reports" / "add_exits_feature_general.json").read_text())["exits"][0]["name"] == "general"
    report = _json.loads((out / "reports" / "add_exits_feature_a.json").read_text())
    assert report["data"]["num_train_texts"] == 2 * report["data"]["num_train"]  # greedy + one sampled each
    assert bundle.generate(prompt, draft="feature:a", max_new_tokens=16, chat=False).token_ids == plain.token_ids
    assert bundle.generate(prompt, draft="auto", max_new_tokens=16, chat=False).token_ids == plain.token_ids
    # `info` names both heads, their layers and the held-out acceptance add-exits measured
    r = CliRunner().invoke(main, ["info", "--bundle", str(out)])
    assert r.exit_code == 0, r.output
    assert "feature  general (arm feature) layers 1,2,4" in r.output and "feature  a (arm feature:a)" in r.output
    r = CliRunner().invoke(main, ["info", "--bundle", str(out), "--json"])
    assert [h["name"] for h in _json.loads(r.output)["feature_heads"]] == ["general", "a"]


def test_resumed_feature_training_equals_uninterrupted(tiny_model_dir, tmp_path):
    from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig
    from ctxdraft.selfdraft.learning.feature_train import train_feature_head
    from ctxdraft.selfdraft.learning.head_data import build_examples
    from ctxdraft.selfdraft.runtime.target import load_target

    target = load_target(tiny_model_dir)
    rows = [{"id": i, "domain": "d", "prompt": p} for i, p in enumerate(["abc abc abc", "hello there", "1 2 3 1 2"])]
    exs = build_examples(target, rows, [1, 2, 4], max_prompt_tokens=64, new_tokens=8, topk=8, extend=2)
    config = ExitTrainConfig(layers=[1, 2, 4], head="feature", steps=30, ttt_steps=3, seqs_per_step=2)

    def fresh():
        torch.manual_seed(0)
        return FeatureHead(target.model, [1, 2, 4]).float()

    whole = fresh()
    train_feature_head(whole, exs, config, tmp_path / "whole.safetensors")

    class Stop(Exception):
        pass

    def stop_at_28(stage, done, total):
        if done == 28:
            raise Stop

    with pytest.raises(Stop):
        train_feature_head(fresh(), exs, config, tmp_path / "cut.safetensors", progress=stop_at_28)  # saved at 25
    resumed = fresh()
    config.resume = True
    assert train_feature_head(resumed, exs, config, tmp_path / "cut.safetensors")["steps"] == 30
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert not torch.equal(whole.state_dict()["fc.weight"], fresh().state_dict()["fc.weight"])  # it trained


def test_the_aligned_loss_counts_position_j_only_after_right_drafts(tiny_model_dir, monkeypatch):
    """--aligned-loss: draft position j's loss covers only the bases whose positions 1..j-1 the head drafted right
    (a chain stops at its first miss); without it every valid base counts. A stand-in forward returns logits right
    on a fixed pattern of (base, position)."""
    from ctxdraft.selfdraft.learning import feature_train
    from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig
    from ctxdraft.selfdraft.learning.head_data import build_examples
    from ctxdraft.selfdraft.runtime.target import load_target

    target = load_target(tiny_model_dir)
    rows = [{"id": 0, "domain": "d", "prompt": "abc abc abc"}]
    ex = build_examples(target, rows, [1, 2, 4], max_prompt_tokens=64, new_tokens=12, topk=8, extend=0)[0]
    head = FeatureHead(target.model, [1, 2, 4]).float()
    tokens = ex.token_ids
    T = min(len(tokens), ex.num_positions + 1)
    right = lambda b, j: (b * 7 + j) % 3 != 0  # noqa: E731

    def forward(states, token_ids, bases, steps):
        out = []
        for j in range(1, steps + 1):
            lg = torch.zeros(len(bases), target.vocab_size)
            for r, b in enumerate(bases.tolist()):
                true = tokens[min(b + j + 1, T - 1)]
                lg[r, true if right(b, j) else (true + 1) % target.vocab_size] = 1.0
            out.append(lg.requires_grad_())
        return out

    counted = []
    monkeypatch.setattr(feature_train, "distill_loss", lambda lg, ids, logp, local: counted.append(lg.shape[0]) or lg.sum())
    for aligned in (False, True):
        config = ExitTrainConfig(layers=[1, 2, 4], head="feature", ttt_steps=3, prompt_bases=0, aligned_loss=aligned)
        counted.clear()
        total, _ = feature_train.sequence_loss(forward, head, ex, config, None, torch.Generator().manual_seed(0))
        bases = range(ex.prompt_len - 1, T - 1)
        valid = [sum(1 for b in bases if b + j <= T - 2) for j in (1, 2, 3)]
        want = [sum(1 for b in bases if b + j <= T - 2 and (not aligned or all(right(b, i) for i in range(1, j))))
                for j in (1, 2, 3)]
        assert counted == [n for n in want if n], (aligned, counted, want)
        # each position's loss is a mean over its valid bases, the misaligned ones counting 0 (stand-in loss: rows)
        expected = sum(0.8 ** (j - 1) * n * (n / v) for j, (n, v) in enumerate(zip(want, valid), start=1))
        assert float(total.detach()) == pytest.approx(expected)
    assert want[2] < want[1] < want[0]
