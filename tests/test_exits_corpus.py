"""add-exits on a make-data corpus: the corpus's own answers as the continuations, a token budget for training."""
from __future__ import annotations

import json
import math

import pytest
from cli_helpers import assert_clean_error
from click.testing import CliRunner

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base.data import read_prompts
from ctxdraft.selfdraft.commands.make_data import MakeDataConfig, make_data
from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig, steps_for_budget
from ctxdraft.selfdraft.learning.head_data import build_examples, encode_prompt
from ctxdraft.selfdraft.runtime.target import load_target


@pytest.fixture(scope="module")
def corpus(tiny_model_dir, tmp_path_factory):
    target = load_target(str(tiny_model_dir))
    out = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    make_data(target, target, out, MakeDataConfig(rows=8, batch_size=8, max_query_tokens=12, max_answer_tokens=10,
                                                  domains=["chat", "qa"], min_query_words=1, answer_temperature=1.0))
    return target, out


def test_the_corpus_answers_are_the_continuations(corpus):
    """Sampled answers (temperature 1) differ from the target's greedy ones, so only reading them gives these ids."""
    target, out = corpus
    rows = read_prompts(out)
    assert all(isinstance(r["answer"], str) for r in rows)
    examples = build_examples(target, rows, [1, 2], max_prompt_tokens=64, new_tokens=10, topk=4, extend=2,
                              use_answers=True)
    for row, ex in zip(rows, examples):
        prompt_ids = encode_prompt(target, row["prompt"], 64)
        answer_ids = target.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        assert ex.tp.token_ids[: len(prompt_ids) + len(answer_ids)] == prompt_ids + answer_ids
    generated = build_examples(target, rows, [1, 2], max_prompt_tokens=64, new_tokens=10, topk=4, extend=2)
    assert any(g.tp.token_ids != e.tp.token_ids for g, e in zip(generated, examples))


def test_steps_for_budget():
    class Ex:
        def __init__(self, n):
            self.num_positions = n
    examples = [Ex(10), Ex(30)]
    feature = ExitTrainConfig(layers=[1], head="feature", seqs_per_step=4, train_tokens=1000)
    assert steps_for_budget(feature, examples) == math.ceil(1000 / (4 * 20))
    linear = ExitTrainConfig(layers=[1], batch_size=256, train_tokens=1000)
    assert steps_for_budget(linear, examples) == 4


def test_add_exits_trains_a_feature_head_for_a_token_budget_on_the_corpus(corpus, tiny_model_dir, tmp_path):
    _, data = corpus
    out = tmp_path / "bundle"
    args = ["add-exits", str(tiny_model_dir), "--head", "feature", "--layers", "1,2,4", "--data", str(data), "--out",
            str(out), "--use-answers", "--train-tokens", "300", "--self-distill-tokens", "10", "--eval-frac", "0.25",
            "--ttt-steps", "2", "--draft-lens", "1,2", "--thresholds", "0", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    (entry,) = report["exits"]
    mean_len = report["data"]["train_positions"] / report["data"]["num_train_texts"]
    assert entry["train"]["steps"] == math.ceil(300 / (4 * mean_len))  # the budget, not the default 200 steps
    assert report["data"]["train_tokens_budget"] == 300 and report["config"]["use_answers"]


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_a_zero_budget_is_refused(corpus, tiny_model_dir, tmp_path, budget):
    _, data = corpus
    r = CliRunner().invoke(main, ["add-exits", str(tiny_model_dir), "--head", "feature", "--layers", "1,2", "--data",
                                  str(data), "--out", str(tmp_path / "b"), "--train-tokens", budget])
    assert r.exit_code == 2
    assert_clean_error(r, "--train-tokens must be >= 1")
    assert not (tmp_path / "b").exists()


def test_short_answers_end_or_are_continued(corpus):
    """An answer that ended on EOS ends the example there; one cut short by its writer is continued greedily up to
    the requested length (otherwise add-exits' replays run past the known tokens)."""
    target, out = corpus
    row = dict(read_prompts(out)[0])
    answer_ids = target.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
    cut = dict(row, answer_ended=False)
    ended = dict(row, answer_ended=True)
    ex_cut, ex_ended = build_examples(target, [cut, ended], [1], max_prompt_tokens=64, new_tokens=len(answer_ids) + 6,
                                      topk=4, extend=2, use_answers=True)
    prompt_len = ex_ended.tp.prompt_len
    assert ex_ended.num_positions == prompt_len + len(answer_ids)
    assert ex_cut.tp.token_ids[prompt_len: prompt_len + len(answer_ids)] == answer_ids
    assert ex_cut.num_positions > ex_ended.num_positions or ex_cut.tp.num_new > len(answer_ids)
