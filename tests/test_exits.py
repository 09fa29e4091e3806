"""Exit heads and exit drafts: greedy equality with HF generate, distribution-exact sampling, add-exits."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.bundle import load_bundle
from ctxdraft.selfdraft.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafts import build_draft
from ctxdraft.selfdraft.exits import (
    ExitDraft,
    ExitHead,
    ExitSettings,
    distill_loss,
    simulate,
    split_rows,
)
from ctxdraft.selfdraft.layers import LayerStack

WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree sun moon and or is was".split()


def tiny_llama(vocab_size: int = 61, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def tiny_gemma3(vocab_size: int = 61, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    # Sliding window 4 < prompt + draft lengths, so rolled-back drafts cross the window.
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                              sliding_window=4, initializer_range=0.2,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return Gemma3ForCausalLM(config).eval().requires_grad_(False)


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def exit_draft(model, exit_layer, kind, draft_len, threshold=0.0, vocab_ids=None) -> ExitDraft:
    head = ExitHead(model, exit_layer, kind, vocab_ids).eval().requires_grad_(False)
    return ExitDraft(f"exit@{exit_layer}", head, ExitSettings(exit_layer, draft_len, threshold, kind))


def run_draft(model, draft, prompt, n, **gen):
    stack = LayerStack(model)
    pre = prefill(stack, prompt)
    return speculative_decode(stack, pre, draft, GenerationConfig(max_new_tokens=n, **gen))


# --------------------------------------------------------------------------------------------------
# Greedy: token-for-token the target's own output
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("kind", ["linear", "layer"])
@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_greedy_exit_draft_matches_generate(arch, kind, draft_len):
    model = MODELS[arch]()
    prompt = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    n = 28
    ref = greedy_reference(model, prompt, n)
    for exit_layer, vocab_ids in [(2, None), (1, torch.arange(0, 61, 2))]:
        out, stats = run_draft(model, exit_draft(model, exit_layer, kind, draft_len, vocab_ids=vocab_ids), prompt, n)
        assert out == ref, (exit_layer, vocab_ids is not None)
        assert stats.drafted_tokens > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_perfect_layer_head_accepts_everything(arch):
    # A layer head at E = L-1 initialised from the last layer IS the rest of the target: every draft token is
    # accepted, so every step ends with a bonus token and the head must catch up on d_K (cache reuse path).
    model = MODELS[arch]()
    prompt = list(range(3, 14))
    ref = greedy_reference(model, prompt, 30)
    out, stats = run_draft(model, exit_draft(model, 3, "layer", 4), prompt, 30)
    assert out == ref
    assert stats.accepted_tokens == stats.drafted_tokens > 20
    assert stats.target_forwards <= 1 + math.ceil(29 / 5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("kind", ["linear", "layer"])
def test_confidence_stop(arch, kind):
    model = MODELS[arch]()
    prompt = list(range(5, 16))
    ref = greedy_reference(model, prompt, 24)
    # Threshold at the median confidence of this head: some drafts stop early, some run to K.
    draft = exit_draft(model, 2, kind, 5)
    stack = LayerStack(model)
    with torch.no_grad():
        hidden = stack.run(stack.embed(torch.tensor([prompt + ref])), 0, 2, stack.new_cache(), torch.arange(len(prompt) + 24))
        conf = torch.softmax(draft.head(hidden)[0], -1).max(-1).values
    threshold = float(conf.median())
    out, stats = run_draft(model, exit_draft(model, 2, kind, 5, threshold), prompt, 24)
    _, plain = run_draft(model, exit_draft(model, 2, kind, 5), prompt, 24)
    assert out == ref
    assert 0 < stats.drafted_tokens < plain.drafted_tokens


def test_exit_hidden_covers_last_token_after_confidence_stop():
    model = tiny_llama()
    prompt = list(range(2, 12))
    stack = LayerStack(model)
    pre = prefill(stack, prompt[:-1])
    draft = exit_draft(model, 2, "linear", 8, threshold=0.999)  # stops at once: nothing drafted
    from ctxdraft.selfdraft.decoding import DecodeState

    state = DecodeState(stack, pre.cache, prompt, 61, 0.0, 1.0, None)
    draft.start(state)
    proposal = draft.propose(state, 8)
    assert proposal.ids == [] and proposal.exit_hidden.shape == (1, 1, 32)
    assert LayerStack.seq_len(pre.cache, 0) == len(prompt) and LayerStack.seq_len(pre.cache, 2) == len(prompt) - 1


# --------------------------------------------------------------------------------------------------
# Sampling: the output is distributed as the target's samples
# --------------------------------------------------------------------------------------------------
def _target_pair_probs(model, prompt, temperature):
    """Exact P(t1, t2) of the target's first two sampled tokens. [V, V]"""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        p2 = torch.softmax(model(seqs).logits[:, -1] / temperature, -1)
    return p1[:, None] * p2


@pytest.mark.parametrize("vocab_ids", [None, torch.tensor([0, 2, 3, 5])])
def test_sampling_keeps_target_distribution(vocab_ids):
    V = 6
    model = tiny_llama(vocab_size=V, seed=3)
    prompt = [1, 4, 2, 0, 5]
    temperature = 1.3
    exact = _target_pair_probs(model, prompt, temperature)
    draft = exit_draft(model, 1, "linear", 2, vocab_ids=vocab_ids)  # its q differs from the target's p
    num = 1500
    counts = torch.zeros(V, V)
    drafted = 0
    stack = LayerStack(model)
    for seed in range(num):
        pre = prefill(stack, prompt)
        out, stats = speculative_decode(stack, pre, draft, GenerationConfig(max_new_tokens=3, temperature=temperature, seed=seed))
        counts[out[0], out[1]] += 1
        drafted += stats.drafted_tokens
    assert drafted == num  # budget 1 per generation: the second token always went through draft + verify
    expected = exact * num
    keep = expected >= 5
    chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
    dof = int(keep.sum()) - 1
    # chi-square upper tail: P(chi2 > dof + 5 sqrt(2 dof)) is far below 1e-4.
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
    assert counts[~keep].sum() <= 5 * max(1, int((~keep).sum()))


# --------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------
def test_distill_loss_zero_when_exit_equals_teacher():
    logits = torch.randn(5, 40)
    logp = logits.log_softmax(-1)
    top_logp, top_ids = logp.topk(8, -1)
    assert distill_loss(logits, top_ids, top_logp).abs() < 1e-5
    assert distill_loss(torch.zeros(5, 40), top_ids, top_logp) > 0.01
    keep = torch.arange(0, 40, 2)
    local_of = torch.full((40,), -1)
    local_of[keep] = torch.arange(20)
    sub = logits[:, keep]
    # The reduced loss is zero when the exit matches the teacher renormalised on the kept ids.
    assert distill_loss(sub, top_ids, top_logp, local_of).abs() < 1e-5 or not (local_of[top_ids] >= 0).all()


def test_simulate_counts_accepted_runs():
    traces = [{"domain": "x", "match": [True, True, False, True, False, False], "conf": [0.9] * 6}]
    r = simulate(traces, 2, 0.0, 0.0, {0: 1.0, 1: 1.0, 2: 1.0})
    # steps: accept 2 (+1) -> t=3: accept 1 (+1) -> t=5: accept 0 (+1) -> done: 6 tokens in 3 steps
    assert r["speedup"] == pytest.approx(2.0)
    assert r["acceptance"] == pytest.approx(3 / 5)
    stopped = simulate(traces, 2, 0.95, 0.5, {0: 1.0, 1: 1.0, 2: 1.0})
    assert stopped["acceptance"] == 0 and stopped["speedup"] < 1


def test_split_rows_is_deterministic_and_covers_domains():
    rows = [{"prompt": f"p{i}", "domain": "ab"[i % 2]} for i in range(20)]
    train, held = split_rows(rows, 0.2, 0)
    assert split_rows(rows, 0.2, 0) == (train, held)
    assert not set(train) & set(held) and len(train) + len(held) == 20
    assert {rows[i]["domain"] for i in held} == {"a", "b"}


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------
def _save_tiny_target(path, seed=0):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    model = tiny_llama(vocab_size=len(vocab), seed=seed)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _write_prompts(path, n=8):
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6 + i,), generator=rng)]
        lines.append(json.dumps({"id": i, "domain": "ab"[i % 2], "prompt": " ".join(words)}))
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = ["--steps", "3", "--self-distill-tokens", "6", "--eval-frac", "0.25"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    model_dir = _save_tiny_target(root / "model")
    data = _write_prompts(root / "data.jsonl")
    return root, model_dir, data


def test_add_exits_cli_builds_and_extends_a_bundle(tiny_setup):
    root, model_dir, data = tiny_setup
    out = root / "bundle"
    runner = CliRunner()
    result = runner.invoke(main, ["add-exits", str(model_dir), "--layers", "1,2", "--data", str(data), "--out", str(out), "--json", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [e["layer"] for e in report["exits"]] == [1, 2]
    for e in report["exits"]:
        assert e["num_params"] == 32 * 32 + 32
        assert 0 <= e["agreement"] <= 1 and e["cost_ratio"] > 0 and e["speedup"] > 0 and e["draft_len"] >= 1
    assert (out / "exits.safetensors").is_file() and (out / "reports" / "add_exits.json").is_file()
    assert not (out / ".add_exits_work").exists()

    # Adding another exit keeps the first ones; the new head kind and reduced vocab are recorded.
    result = runner.invoke(main, ["add-exits", str(model_dir), "--layers", "3", "--head", "layer", "--draft-vocab", "12",
                                  "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "exit@3" in result.output
    bundle = load_bundle(out, target=str(model_dir))
    assert [a for a in bundle.arms if a.startswith("exit@")] == ["exit@1", "exit@2", "exit@3"]
    assert "none" in bundle.arms  # the base arms stay
    assert [(e["layer"], e["head"], e["draft_vocab"]) for e in bundle.info["exits"]] == [(1, "linear", None), (2, "linear", None), (3, "layer", 12)]

    # The exit arms generate exactly what plain decoding does.
    plain = bundle.generate("the cat sat on the mat", draft="none", max_new_tokens=20, chat=False)
    for arm in ("exit@1", "exit@3"):
        assert bundle.generate("the cat sat on the mat", draft=arm, max_new_tokens=20, chat=False).token_ids == plain.token_ids
    draft = build_draft(bundle.arm_spec("exit@3"), bundle.target, out)
    assert draft.head.draft_vocab == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "0"], "out of range"),
        (["--layers", "4"], "out of range"),
        (["--layers", "1,1"], "duplicates"),
        (["--layers", "x"], "comma-separated"),
        (["--layers", "1", "--eval-frac", "1.5"], "eval-frac"),
    ],
)
def test_add_exits_bad_layers(tiny_setup, args, message):
    root, model_dir, data = tiny_setup
    out = root / "never"
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--data", str(data), "--out", str(out), *args])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [("", "empty"), ("{not json\n", "not valid JSON"), ('{"id": 1, "question": "hi"}\n', "prompt"), ('{"prompt": "one"}\n', "at least 2")],
)
def test_add_exits_bad_data(tiny_setup, tmp_path, content, message):
    root, model_dir, _ = tiny_setup
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


def test_add_exits_refuses_a_bundle_of_another_target(tiny_setup, tmp_path):
    root, model_dir, data = tiny_setup
    out = tmp_path / "bundle"
    runner = CliRunner()
    assert runner.invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out), *FAST]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = _save_tiny_target(tmp_path / "other", seed=7)
    result = runner.invoke(main, ["add-exits", str(other), "--layers", "2", "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 2 and "was made for target" in result.output
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_add_exits_resume_needs_matching_checkpoint(tiny_setup, tmp_path):
    root, model_dir, data = tiny_setup
    out = tmp_path / "bundle"
    work = out / ".add_exits_work"
    work.mkdir(parents=True)
    (work / "key.json").write_text('{"key": "something-else"}')
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out), "--resume", *FAST])
    assert result.exit_code == 2 and "other data or settings" in result.output
    assert not (out / "bundle.json").exists()
