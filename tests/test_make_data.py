"""`ctxdraft make-data` on a tiny random chat model: rows written, exact resume after a kill, filters, bad input."""
from __future__ import annotations

import json

import pytest
from cli_helpers import assert_clean_error
from click.testing import CliRunner

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base.data import read_prompts
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.text_filters import NearDuplicates, degenerate
from ctxdraft.selfdraft.commands.make_data import MakeDataConfig, make_data, pre_query_prefix
from ctxdraft.selfdraft.runtime.target import load_target


def small(**kw) -> MakeDataConfig:
    base = dict(rows=12, batch_size=8, max_query_tokens=16, max_answer_tokens=8, domains=["chat", "math", "qa"],
                min_query_words=1)
    return MakeDataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_target(str(tiny_model_dir))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run: 12 rows, batches of 8."""
    out = tmp_path_factory.mktemp("md") / "ref.jsonl"
    summary = make_data(tiny, tiny, out, small(batch_size=8))
    return out, summary


def test_rows_are_written_as_add_exits_reads_them(reference):
    out, summary = reference
    rows = read_prompts(out)  # what add-exits reads
    assert len(rows) == summary["rows"] == 12
    assert len({r["id"] for r in rows}) == 12
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["prompt"].strip() and r["text"].strip() and r["answer_tokens"] >= 1 for r in raw)
    assert {r["domain"] for r in raw} <= {"chat", "math", "qa"} and len({r["domain"] for r in raw}) > 1
    assert summary["answer_tokens"] >= sum(r["answer_tokens"] for r in raw) and summary["tokens_per_s"] > 0
    assert set(summary["filtered"]) == {"short_query", "repetitive_query", "duplicate_query", "empty_answer",
                                        "repetitive_answer"}


def test_resume_after_a_kill_gives_the_rows_of_an_uninterrupted_run(tiny, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "killed.jsonl"

    def kill_after_one_batch(stage, done, total):
        kill_after_one_batch.calls += 1
        if kill_after_one_batch.calls == 1:
            raise KeyboardInterrupt
    kill_after_one_batch.calls = 0
    with pytest.raises(KeyboardInterrupt):
        make_data(tiny, tiny, out, small(batch_size=8), progress=kill_after_one_batch)
    partial = out.read_text()
    assert 0 < len(partial.splitlines()) < 12
    with open(out, "a") as f:  # a torn write of the next batch: cut off mid-line
        f.write('{"id":"md-2-0","batch":2,"pro')
    with pytest.raises(CtxdraftError, match="--resume"):  # not without --resume: nothing is overwritten
        make_data(tiny, tiny, out, small(batch_size=8))
    summary = make_data(tiny, tiny, out, small(batch_size=8, resume=True))
    assert out.read_text() == ref.read_text()  # no duplicate, no lost row, same order
    assert summary["resumed_rows"] == len(partial.splitlines()) and summary["rows"] == 12
    again = make_data(tiny, tiny, out, small(batch_size=8, resume=True))  # a finished file: nothing to do
    assert again["new_rows"] == 0 and out.read_text() == ref.read_text()


def test_resume_refuses_other_settings_and_a_damaged_corpus(tiny, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "c.jsonl"
    out.write_text(ref.read_text())
    (tmp_path / ".c.jsonl.make_data.json").write_text((ref.parent / ".ref.jsonl.make_data.json").read_text())
    with pytest.raises(CtxdraftError, match="other models or settings"):
        make_data(tiny, tiny, out, small(batch_size=8, seed=1, rows=20, resume=True))
    lines = ref.read_text().splitlines()
    damaged = "\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n"
    out.write_text(damaged)
    with pytest.raises(CtxdraftError, match="line 4"):
        make_data(tiny, tiny, out, small(batch_size=8, rows=20, resume=True))
    assert out.read_text() == damaged  # nothing lost


def test_degenerate_repetition():
    assert degenerate([5, 6, 7] * 12)
    assert degenerate(list(range(30)) + [9] * 24)  # a looping tail
    assert not degenerate(list(range(40)))
    assert not degenerate([1, 1, 1])  # too short to judge


def test_near_duplicates():
    seen = NearDuplicates(0.7)
    assert not seen.check_add("How do I bake a loaf of sourdough bread at home without a starter?")
    assert seen.check_add("how do I bake a loaf of sourdough bread at home without a starter")  # case, punctuation
    assert seen.check_add("How do I bake a loaf of sourdough bread at home without a starter please?")
    assert not seen.check_add("What is the capital city of Australia and why was it chosen?")
    assert seen.check_add("?!")  # no words


def test_duplicate_queries_are_dropped(tiny, tmp_path):
    """Greedy queries from one domain repeat whenever the seed words do: only distinct queries are kept."""
    config = small(rows=4, batch_size=16, domains=["math"], query_temperature=0.0, dedup_threshold=0.9)
    summary = make_data(tiny, tiny, tmp_path / "d.jsonl", config)
    kept = [json.loads(line)["prompt"] for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(kept) == 4 and len(set(kept)) == 4
    assert summary["filtered"]["duplicate_query"] >= 16 - 6  # six seed words: at most six distinct queries


def test_pre_query_prefix(tiny):
    before, after = pre_query_prefix(tiny.tokenizer, "tiny", "Be brief.")
    assert before == "<s>system: Be brief.\n<s>user: " and after == "\n"

    class NoTemplate:
        chat_template = None
    with pytest.raises(CtxdraftError, match="no chat template"):
        pre_query_prefix(NoTemplate(), "plain-model", "x")


@pytest.mark.parametrize("args,needle", [
    (["--rows", "0"], "--rows must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--domains", "chat,poetry"], "unknown domain(s) poetry"),
    (["--time-limit", "0"], "--time-limit must be > 0"),
])
def test_cli_bad_options(args, needle, tmp_path):
    result = CliRunner().invoke(main, ["make-data", "--out", str(tmp_path / "x.jsonl"), *args])
    assert result.exit_code == 2
    assert_clean_error(result, needle)


def test_cli_unknown_model_and_existing_file(tiny_model_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["make-data", "no-such-model", "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2
    assert_clean_error(result, "cannot load target 'no-such-model'")
    out = tmp_path / "exists.jsonl"
    out.write_text('{"prompt": "mine"}\n')
    result = runner.invoke(main, ["make-data", str(tiny_model_dir), "--out", str(out), "--rows", "2"])
    assert result.exit_code == 2
    assert_clean_error(result, "give --resume")
    assert out.read_text() == '{"prompt": "mine"}\n'


def test_cli_json_summary(tiny_model_dir, tmp_path):
    out = tmp_path / "cli.jsonl"
    args = ["make-data", str(tiny_model_dir), "--out", str(out), "--rows", "4", "--batch-size", "16",
            "--max-query-tokens", "16", "--max-answer-tokens", "8", "--min-query-words", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rows"] == 4 == len(out.read_text().splitlines()) and summary["complete"]
