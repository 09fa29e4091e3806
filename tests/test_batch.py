"""``batch.generate_batch`` and ``ctxdraft generate --batch``: one result per prompt, equal to its own request,
bad rows failing alone with their error."""
from __future__ import annotations

import json

from cli_helpers import assert_clean_error
from click.testing import CliRunner

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.serving.batch import generate_batch
from ctxdraft.selfdraft.serving.bundle import load_bundle

PROMPTS = ["the cat sat on the mat, the cat sat", "hi", {"prompt": "abc abc abc abc", "draft": "none", "max_new_tokens": 9},
           {"prompt": "one two one two one two", "draft": "lookup-k2", "temperature": 0.7, "seed": 3},
           {"prompt": "stop here please, stop", "stop": ["p"]}]


def test_each_result_equals_its_own_generate(tiny_model_dir):
    """Catches a row routed, configured or decoded as another row, a stop string not applied, results out of order."""
    bundle = load_bundle(target=str(tiny_model_dir))
    results = generate_batch(bundle, PROMPTS, draft="lookup", max_new_tokens=14, max_batch=3)
    assert len(results) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, results):
        settings = {"draft": "lookup", "max_new_tokens": 14} | ({"prompt": prompt} if isinstance(prompt, str) else prompt)
        alone = bundle.generate(settings.pop("prompt"), **settings)
        assert result.error is None
        assert (result.token_ids, result.text, result.arm) == (alone.token_ids, alone.text, alone.arm)
        assert result.stats.new_tokens == len(result.token_ids)
    assert generate_batch(bundle, []) == []


def test_bad_rows_fail_alone(tiny_model_dir):
    bundle = load_bundle(target=str(tiny_model_dir))
    prompts = ["abc abc", {"prompt": "abc", "draft": "nope"}, "x" * 300, {"prompt": "abc", "temperature": -1},
               {"text": "no prompt key"}, 7, "abd abd"]
    results = generate_batch(bundle, prompts, draft="lookup", max_new_tokens=10)
    errors = [r.error for r in results]
    assert errors[0] is None and errors[-1] is None
    assert "unknown arm 'nope'" in errors[1]
    assert "exceeds the model's context" in errors[2]
    assert "temperature" in errors[3]
    assert "\"prompt\" key" in errors[4] and "\"prompt\" key" in errors[5]
    assert results[0].token_ids == bundle.generate("abc abc", draft="lookup", max_new_tokens=10).token_ids
    assert results[-1].token_ids == bundle.generate("abd abd", draft="lookup", max_new_tokens=10).token_ids
    assert results[1].to_dict()["error"] == errors[1]


def test_cli_batch_writes_one_json_line_per_prompt(tiny_model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"id": "a", "prompt": "the cat the cat"}, {"id": "b", "prompt": "x", "draft": "nope"}, {"prompt": "hello"}]) + "\n")
    r = CliRunner().invoke(main, ["generate", "--batch", str(path), "--target", str(tiny_model_dir), "--draft", "lookup",
                                  "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert [line.get("id") for line in lines] == ["a", "b", None]
    assert "unknown arm" in lines[1]["error"] and "error" not in lines[0] and len(lines[2]["token_ids"]) == 8
    assert_clean_error(CliRunner().invoke(main, ["generate", "hi", "--batch", str(path), "--target", str(tiny_model_dir)]),
                       "--batch FILE takes its prompts from the file")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert_clean_error(CliRunner().invoke(main, ["generate", "--batch", str(tmp_path / "empty.jsonl"), "--target",
                                                 str(tiny_model_dir)]), "is empty")
