"""Training text for exit heads from a tiny model: each example is the target's own greedy continuation with its
states, LM head input and top-k teacher, checked against the HF model run here; work files resume; the reduced
vocabulary keeps the special tokens and the most frequent ids."""
from __future__ import annotations

import itertools

import pytest
import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.learning import head_data
from ctxdraft.selfdraft.learning.head_data import build_examples, encode_prompt, reduced_vocab
from ctxdraft.selfdraft.learning.trajectories import teacher_pass, teacher_passes
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.runtime.target import load_target

ROWS = [{"id": i, "domain": "d", "prompt": p} for i, p in enumerate(["abc abc abc", "hello there", "1 2 3 1 2"])]
LAYERS = [1, 3]
OPTIONS = dict(max_prompt_tokens=64, new_tokens=6, topk=5, extend=0)


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return load_target(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(target):
    return build_examples(target, ROWS, LAYERS, **OPTIONS)


def test_each_example_is_the_targets_greedy_text_with_its_states_and_teacher(target, examples):
    assert [ex.row for ex in examples] == ROWS
    for ex in examples:
        prompt_ids = target.encode(ex.row["prompt"], chat=True)
        ids = torch.tensor([prompt_ids])
        generated = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                          eos_token_id=sorted(target.eos_ids))[0, len(prompt_ids):].tolist()
        continuation = list(itertools.takewhile(lambda t: t not in target.eos_ids, generated))
        seq = ex.tp.token_ids[: ex.num_positions]
        assert seq == prompt_ids + continuation and ex.tp.prompt_len == len(prompt_ids)
        with torch.no_grad():
            out = target.model(torch.tensor([seq]), output_hidden_states=True)
        T = len(seq)
        for E in LAYERS:
            assert ex.states(E).shape == (T, 32)
            torch.testing.assert_close(ex.states(E), out.hidden_states[E][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ex.lm_input, out.hidden_states[-1][0], rtol=1e-4, atol=1e-4)  # after the norm
        logp, top = out.logits[0].float().log_softmax(-1).topk(5, -1)
        assert torch.equal(ex.teacher_ids.long(), top)
        torch.testing.assert_close(ex.teacher_logp, logp, rtol=1e-4, atol=1e-4)


def test_work_files_are_read_back_instead_of_recomputed(target, examples, tmp_path, monkeypatch):
    first = build_examples(target, ROWS, LAYERS, work=tmp_path, **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"example_{i}.safetensors" for i in range(len(ROWS))]
    def no_teacher(*args, **kwargs):
        raise AssertionError("a saved example was computed again")

    monkeypatch.setattr(head_data, "teacher_pass", no_teacher)
    monkeypatch.setattr(head_data, "teacher_passes", no_teacher)
    resumed = build_examples(target, ROWS, LAYERS, work=tmp_path, **OPTIONS)
    for a, b, c in zip(examples, first, resumed):
        assert a.tp.token_ids == b.tp.token_ids == c.tp.token_ids and a.num_positions == c.num_positions
        for E in LAYERS:
            assert torch.equal(b.states(E), c.states(E))
        assert torch.equal(b.teacher_ids, c.teacher_ids) and torch.equal(b.teacher_logp, c.teacher_logp)
        assert torch.equal(b.lm_input, c.lm_input)


def test_a_damaged_work_file_is_a_clear_error(target, tmp_path):
    build_examples(target, ROWS[:1], LAYERS, work=tmp_path, **OPTIONS)
    saved = tmp_path / "example_0.safetensors"
    saved.write_bytes(saved.read_bytes()[:-50])
    with pytest.raises(CtxdraftError, match="work file .*example_0.safetensors is damaged.*without --resume"):
        build_examples(target, ROWS[:1], LAYERS, work=tmp_path, **OPTIONS)


def test_prompts_are_cut_before_the_chat_template(target):
    long = "abcdefghij" * 5
    assert encode_prompt(target, long, 8) == target.encode("abcdefgh", chat=True)
    assert encode_prompt(target, "abc", 8) == target.encode("abc", chat=True)


def test_the_reduced_vocabulary_keeps_specials_and_the_most_frequent_ids(target, examples):
    special = {i for i in set(target.tokenizer.all_special_ids) | set(target.eos_ids) if 0 <= i < target.vocab_size}
    counts = torch.zeros(target.vocab_size, dtype=torch.long)
    for ex in examples:
        for t in ex.tp.token_ids[: ex.num_positions + 1] + ex.teacher_ids[:, 0].tolist():
            counts[t] += 1
    size = len(special) + 4
    vocab = reduced_vocab(target, examples, size)
    assert vocab.tolist() == sorted(set(vocab.tolist())) and len(vocab) == size
    assert special <= set(vocab.tolist())
    others = [t for t in vocab.tolist() if t not in special]
    least_kept = min(int(counts[t]) for t in others)
    assert all(int(counts[t]) <= least_kept for t in range(target.vocab_size) if t not in vocab.tolist())
    # More ids than the text uses: filled up with unused ids, still unique and in range.
    everything = reduced_vocab(target, examples, target.vocab_size)
    assert everything.tolist() == list(range(target.vocab_size))


def test_batched_teacher_passes_equal_one_pass_per_sequence(target):
    """Right-padded batches of different lengths, ended and not, and an ended sequence whose target picks the other
    of two EOS ids (passed again alone): the same tokens, and states and teacher within float32 rounding."""
    stack = LayerStack(target.model)
    gen = torch.Generator().manual_seed(0)
    items = [(torch.randint(3, 60, (n,), generator=gen).tolist(), torch.randint(3, 60, (k,), generator=gen).tolist(), e)
             for n, k, e in [(7, 5, False), (30, 9, True), (12, 40, False), (50, 3, True), (9, 0, False)]]
    prompt, new, _ = items[3]
    with torch.no_grad():
        choice = int(target.model(torch.tensor([prompt + new])).logits[0, -1].argmax())
    eos_ids = {0, choice} if choice else {0, 1}
    options = dict(layers=[1, 3], topk=5, lm_input=True)
    batched = teacher_passes(stack, items, eos_ids, max_batch_tokens=64, **options)  # several batches
    for got, (prompt, new, ended) in zip(batched, items):
        want = teacher_pass(stack, prompt, new, eos_ids, ended_on_eos=ended, **options)
        assert got.token_ids == want.token_ids and got.num_new == want.num_new and got.prompt_len == len(prompt)
        for E in (1, 3):
            torch.testing.assert_close(got.states[E], want.states[E], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.lm_input, want.lm_input, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.topk_ids, want.topk_ids)
        torch.testing.assert_close(got.topk_logp, want.topk_logp, rtol=1e-5, atol=1e-5)
    assert batched[3].token_ids[-1] == (choice if choice else 0)


def test_examples_stay_in_their_work_files_and_a_cut_chunk_is_made_again_exactly(target, tmp_path):
    """With a work directory the examples hold token ids only; a chunk whose last file is missing (a killed run)
    is computed again as one, so the resumed examples equal the first run's bit for bit."""
    first = build_examples(target, ROWS, LAYERS, work=tmp_path, **OPTIONS)
    assert all(isinstance(ex, head_data.StoredExample) for ex in first)
    assert not any(isinstance(v, torch.Tensor) for ex in first for v in vars(ex).values())
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / f"example_{len(ROWS) - 1}.safetensors").unlink()  # killed before the chunk's last file
    (tmp_path / "example_0.safetensors").write_bytes(b"stale")  # rewritten, not read: the chunk is made again
    resumed = build_examples(target, ROWS, LAYERS, work=tmp_path, **OPTIONS)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved
    for a, b in zip(first, resumed):
        assert a.token_ids == b.token_ids and a.prompt_len == b.prompt_len and a.num_positions == b.num_positions
        for E in LAYERS:
            assert torch.equal(a.states(E), b.states(E))
        assert torch.equal(a.teacher_logp, b.teacher_logp)


def test_examples_without_a_teacher_are_saved_and_read_back(target, tmp_path):
    """Evaluation text needs states only (topk 0): its work files hold no teacher and still read back."""
    made = build_examples(target, ROWS[:1], LAYERS, work=tmp_path, **dict(OPTIONS, topk=0))
    read = build_examples(target, ROWS[:1], LAYERS, work=tmp_path, **dict(OPTIONS, topk=0))
    assert made[0].tp.topk_ids is None and read[0].tp.topk_logp is None
    assert torch.equal(made[0].states(3), read[0].states(3)) and read[0].token_ids == made[0].token_ids
