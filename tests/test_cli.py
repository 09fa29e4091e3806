"""The CLI through click's CliRunner, on tiny models in tmp dirs; bad inputs fail with one clear line."""
from __future__ import annotations

import json

import pytest
from cli_helpers import assert_clean_error
from click.testing import CliRunner

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base.fileio import write_json_atomic
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import load_bundle
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info


def invoke(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture()
def tiny_bundle(tiny_model_dir, tmp_path):
    target = load_target(tiny_model_dir)
    bundle = tmp_path / "bundle"
    info = new_bundle_info(target, str(tiny_model_dir))
    write_json_atomic(bundle / "bundle.json", info)
    return bundle


def test_generate_json_with_target(tiny_model_dir):
    r = invoke("generate", "abc abc abc", "--target", str(tiny_model_dir), "--draft", "lookup", "--max-new-tokens", "12", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["arm"] == "lookup" and len(out["token_ids"]) <= 12
    assert {"target_forwards", "drafted_tokens", "accepted_tokens", "accepted_per_position", "route_s", "wall_s", "tokens_per_s"} <= set(out["stats"])


def test_generate_arms_agree_and_stdin(tiny_bundle):
    outs = {}
    for arm in ("none", "lookup"):
        r = invoke("generate", "-", "--bundle", str(tiny_bundle), "--draft", arm, "--max-new-tokens", "20", "--json", "--no-chat", input="hello hello hello")
        assert r.exit_code == 0, r.output
        outs[arm] = json.loads(r.output)["token_ids"]
    assert outs["none"] == outs["lookup"]


def test_generate_auto_without_policy_uses_default_arm(tiny_bundle):
    r = invoke("generate", "xyz", "--bundle", str(tiny_bundle), "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert "default arm" in r.output


def test_stream_prints_the_same_text(tiny_bundle):
    plain = invoke("generate", "hi there", "--bundle", str(tiny_bundle), "--draft", "none", "--max-new-tokens", "10", "--json")
    streamed = invoke("generate", "hi there", "--bundle", str(tiny_bundle), "--draft", "none", "--max-new-tokens", "10", "--stream")
    assert streamed.exit_code == 0
    assert json.loads(plain.output)["text"] in streamed.output


def test_info(tiny_bundle):
    r = invoke("info", "--bundle", str(tiny_bundle), "--json")
    assert r.exit_code == 0, r.output
    assert [a["name"] for a in json.loads(r.output)["arms"]] == ["none", "lookup", "lookup-k2", "lookup-k8"]


@pytest.mark.parametrize(
    "args,input,needle",
    [
        (["", "--draft", "none"], None, "prompt is empty"),
        (["hi", "--max-new-tokens", "0"], None, "max_new_tokens must be >= 1"),
        (["hi", "--draft", "nope"], None, "unknown arm 'nope'"),
        (["hi", "--top-p", "0"], None, "top_p"),
        (["-"], b"\xff\xfe\xfa", "not UTF-8"),
        (["x" * 400, "--no-chat"], None, "exceeds the model's context"),
    ],
)
def test_generate_bad_input(tiny_bundle, args, input, needle):
    r = invoke("generate", *args, "--bundle", str(tiny_bundle), input=input)
    assert_clean_error(r, needle)


def test_missing_and_corrupt_bundles(tmp_path, tiny_bundle):
    assert_clean_error(invoke("generate", "hi", "--bundle", str(tmp_path / "nope")), "bundle not found")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bundle.json").write_text("{not json")
    assert_clean_error(invoke("generate", "hi", "--bundle", str(tmp_path / "bad")), "not valid JSON")
    (tmp_path / "bad" / "bundle.json").write_text('{"hello": 1}')
    assert_clean_error(invoke("info", "--bundle", str(tmp_path / "bad")), "not a ctxdraft bundle")


def test_bundle_for_another_target(tiny_bundle, tmp_path):
    from tiny import char_tokenizer, save_model_dir, tiny_llama

    tok = char_tokenizer()
    other = save_model_dir(tmp_path / "other", tiny_llama(len(tok), seed=5), tok)
    assert_clean_error(invoke("generate", "hi", "--bundle", str(tiny_bundle), "--target", str(other)), "was made for target")


def test_corrupt_checkpoint(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{")
    assert_clean_error(invoke("generate", "hi", "--target", str(d)), "no *.safetensors weights")
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    assert_clean_error(invoke("generate", "hi", "--target", str(d)), "config.json is not valid JSON")
    assert_clean_error(invoke("generate", "hi", "--target", str(tmp_path / "missing")), "cannot load target")


def test_draft_model_with_other_vocabulary(tiny_bundle, tmp_path):
    from tiny import char_tokenizer, save_model_dir, tiny_llama

    tok = char_tokenizer(extra=["<extra>"])
    other = save_model_dir(tmp_path / "other-vocab", tiny_llama(len(tok), seed=2, layers=1), tok)
    info = json.loads((tiny_bundle / "bundle.json").read_text())
    info["arms"].append({"name": "model:other", "kind": "model", "settings": {"path": str(other), "draft_len": 3}})
    (tiny_bundle / "bundle.json").write_text(json.dumps(info))
    assert_clean_error(invoke("generate", "hi", "--bundle", str(tiny_bundle), "--draft", "model:other"), "another vocabulary")


def test_model_draft_arm_from_bundle_is_lossless(tiny_bundle, tiny_model_dir):
    info = json.loads((tiny_bundle / "bundle.json").read_text())
    info["arms"].append({"name": "model:self", "kind": "model", "settings": {"path": str(tiny_model_dir), "draft_len": 3}})
    (tiny_bundle / "bundle.json").write_text(json.dumps(info))
    b = load_bundle(tiny_bundle)
    a = b.generate("the cat", draft="none", max_new_tokens=15)
    m = b.generate("the cat", draft="model:self", max_new_tokens=15)
    assert a.token_ids == m.token_ids
    assert m.stats.accepted_tokens == m.stats.drafted_tokens > 0


def test_add_arm_model_and_lookup(tiny_bundle, tiny_model_dir, tmp_path):
    from tiny import char_tokenizer, save_model_dir, tiny_llama

    before = (tiny_bundle / "bundle.json").read_text()
    tok = char_tokenizer(extra=["<extra>"])
    other = save_model_dir(tmp_path / "other-vocab", tiny_llama(len(tok), seed=2, layers=1), tok)
    r = invoke("add-arm", str(tiny_bundle), "--kind", "model", "--path", str(other))
    assert_clean_error(r, "another vocabulary")
    assert (tiny_bundle / "bundle.json").read_text() == before  # nothing half-written

    r = invoke("add-arm", str(tiny_bundle), "--kind", "model", "--path", str(tiny_model_dir), "--draft-len", "3", "--json")
    assert r.exit_code == 0, r.output
    r = invoke("add-arm", str(tiny_bundle), "--kind", "lookup", "--draft-len", "6", "--ngram-sizes", "2,1")
    assert r.exit_code == 0, r.output
    b = load_bundle(tiny_bundle)
    assert b.arms[-2:] == ["model:tiny-llama", "lookup-k6"]
    plain = b.generate("abc abc", draft="none", max_new_tokens=12)
    for arm in ("model:tiny-llama", "lookup-k6"):
        assert b.generate("abc abc", draft=arm, max_new_tokens=12).token_ids == plain.token_ids
    assert_clean_error(invoke("add-arm", str(tiny_bundle), "--kind", "model"), "needs --path")
    assert_clean_error(invoke("add-arm", str(tiny_bundle), "--kind", "lookup", "--draft-len", "0"), "--draft-len")


def test_arm_spec_from_options(tmp_path, monkeypatch):
    from ctxdraft.selfdraft.base.errors import CtxdraftError
    from ctxdraft.selfdraft.commands.add_arm import arm_spec

    assert arm_spec("lookup", 6, ngram_sizes=[2, 1]) == {"name": "lookup-k6", "kind": "lookup",
                                                        "settings": {"draft_len": 6, "ngram_sizes": [2, 1]}}
    assert arm_spec("none", 1) == {"name": "none", "kind": "none", "settings": {}}
    # A model path that exists is stored absolute (the bundle is read from other directories); a name is kept.
    (tmp_path / "draft").mkdir()
    monkeypatch.chdir(tmp_path)
    assert arm_spec("model", 2, "draft")["settings"]["path"] == str((tmp_path / "draft").resolve())
    assert arm_spec("model", 2, "smollm2-135m-instruct")["settings"]["path"] == "smollm2-135m-instruct"
    with pytest.raises(CtxdraftError, match="--draft-len must be >= 1, got 0"):
        arm_spec("lookup", 0)
    with pytest.raises(CtxdraftError, match="arm kind must be one of model, lookup, none"):
        arm_spec("exit", 2)


def test_duplicate_arm_names_are_refused(tiny_bundle):
    info = json.loads((tiny_bundle / "bundle.json").read_text())
    info["arms"].append(dict(info["arms"][1]))
    (tiny_bundle / "bundle.json").write_text(json.dumps(info))
    assert_clean_error(invoke("info", "--bundle", str(tiny_bundle)), "unique")


def test_an_external_draft_model_on_the_spot(tiny_model_dir):
    base = ["generate", "abc abc", "--target", str(tiny_model_dir), "--max-new-tokens", "12", "--json", "--no-chat"]
    plain = json.loads(invoke(*base, "--draft", "none").output)
    r = invoke(*base, "--draft", f"model:{tiny_model_dir}")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["arm"] == f"model:{tiny_model_dir}" and out["token_ids"] == plain["token_ids"]
    assert out["stats"]["accepted_tokens"] == out["stats"]["drafted_tokens"] > 0  # the target drafting for itself
    assert_clean_error(invoke(*base, "--draft", "model:/no/such/model"), "cannot load target")
