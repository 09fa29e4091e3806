"""`ctxdraft collect`, `train-policy`, `export-policy` through CliRunner on a tiny bundle, then `generate --draft auto`."""
from __future__ import annotations

import json

import pytest
from cli_helpers import assert_clean_error
from click.testing import CliRunner
from tiny import char_tokenizer, save_model_dir, tiny_llama

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base.fileio import write_json_atomic
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info

pytest.importorskip("onnxruntime")

PROMPTS = ["abc abc abc", "hello there", "1 2 3 4 1 2 3", "go go go go", "xyz", "the cat sat", "a b a b a b", "q"]
FAST = ["--max-new-tokens", "10"]




def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def draft_model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("draft") / "tiny-draft", tiny_llama(len(char_tokenizer()), seed=1, layers=2,
                                                                                      max_positions=256), char_tokenizer())


@pytest.fixture()
def bundle_dir(tiny_model_dir, draft_model_dir, tmp_path):
    """none, lookup, lookup-k2 and an external draft model."""
    target = load_target(tiny_model_dir)
    info = new_bundle_info(target, str(tiny_model_dir))
    info["arms"] = [a for a in info["arms"] if a["name"] in ("none", "lookup")]
    info["arms"] += [{"name": "lookup-k2", "kind": "lookup", "settings": {"draft_len": 2, "ngram_sizes": [2, 1]}},
                     {"name": "model:draft", "kind": "model", "settings": {"path": str(draft_model_dir), "draft_len": 2}}]
    path = tmp_path / "bundle"
    write_json_atomic(path / "bundle.json", info)
    return path


@pytest.fixture()
def data_path(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "domain": ["qa", "code"][i % 2], "prompt": p}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return path


def test_collect_train_export_generate(bundle_dir, data_path, tmp_path):
    rewards = tmp_path / "rewards.jsonl"
    r = invoke("collect", bundle_dir, "--data", data_path, "--out", rewards, *FAST, "--wallclock-sample", "1", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["num_rows"] == len(PROMPTS) and summary["exactness_check"]["exact"] == len(PROMPTS)
    assert set(summary["overall"]["speedup"]) == {"none", "lookup", "lookup-k2", "model:draft"}
    wall = summary["wallclock"]
    assert wall["num_prompts"] == 1 and wall["trajectories_exact"] == "4/4"
    assert (bundle_dir / "reports" / "collect.json").is_file()

    r = invoke("collect", bundle_dir, "--data", data_path, "--out", rewards, *FAST, "--resume")
    assert r.exit_code == 0, r.output
    assert "Collected 0 prompt(s)" in r.output and "Modelled mean speed-up" in r.output

    r = invoke("train-policy", bundle_dir, "--rewards", rewards, "--epochs", "20", "--eval-frac", "0.5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    report = out["report"]
    assert set(report["policies"]) == {"reinforce", "supervised"} and report["num_eval"] == 4
    assert report["onnx"]["max_abs_diff"] < 1e-5
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["policy"] == "policy.onnx" and info["features"]["kind"] == "hidden"
    assert info["policy_model"]["arms"] == ["none", "lookup", "lookup-k2", "model:draft"]
    for name in ("policy.onnx", "policy.safetensors", "reports/train_policy.json", "reports/train_policy.md"):
        assert (bundle_dir / name).is_file(), name

    # generate --draft auto routes with the policy, from the prefill's features.
    r = invoke("generate", "abc abc", "--bundle", bundle_dir, "--max-new-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["routed"] and result["arm"] in info["policy_model"]["arms"]
    assert 0 < result["stats"]["route_s"] < result["stats"]["wall_s"]

    # export-policy redoes the ONNX file from the saved weights: same routing.
    before = (bundle_dir / "policy.onnx").stat().st_mtime_ns
    r = invoke("export-policy", bundle_dir, "--json")
    assert r.exit_code == 0, r.output
    assert [a["name"] for a in json.loads(r.output)["arms"]] == info["policy_model"]["arms"]
    assert (bundle_dir / "policy.onnx").stat().st_mtime_ns != before
    r2 = invoke("generate", "abc abc", "--bundle", bundle_dir, "--max-new-tokens", "8", "--json")
    assert json.loads(r2.output)["arm"] == result["arm"]


def test_train_policy_with_data_collects_first_and_tokens_features(bundle_dir, data_path):
    r = invoke("train-policy", bundle_dir, "--data", data_path, *FAST, "--features", "tokens", "--epochs", "10")
    assert r.exit_code == 0, r.output
    assert "Collected 8 prompt(s)" in r.output and "policy (reinforce)" in r.output and "oracle" in r.output
    assert len((bundle_dir / "rewards.jsonl").read_text().splitlines()) == len(PROMPTS)
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["features"]["kind"] == "tokens"
    # A second run reuses the collected rows.
    r = invoke("train-policy", bundle_dir, "--data", data_path, *FAST, "--epochs", "10")
    assert r.exit_code == 0, r.output
    assert "Collected 0 prompt(s)" in r.output
    r = invoke("generate", "hello", "--bundle", bundle_dir, "--max-new-tokens", "4")
    assert r.exit_code == 0 and "chosen by the policy" in r.output


def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failing_onnx_check_writes_nothing(bundle_dir, data_path, monkeypatch):
    """The ONNX file is checked against torch before the bundle is saved: over the tolerance, the command fails
    and the bundle (its earlier policy included) is left byte for byte as it was, with no temporary file."""
    import ctxdraft.selfdraft.learning.policy_train as policy_train

    r = invoke("train-policy", bundle_dir, "--data", data_path, *FAST, "--features", "tokens", "--epochs", "5")
    assert r.exit_code == 0, r.output
    before = _files(bundle_dir)
    check = policy_train.onnx_check

    def off_by_a_little_more(*args):
        return dict(check(*args), max_abs_diff=2 * policy_train.ONNX_TOLERANCE)

    monkeypatch.setattr(policy_train, "onnx_check", off_by_a_little_more)
    r = invoke("train-policy", bundle_dir, "--rewards", bundle_dir / "rewards.jsonl", "--features", "tokens",
               "--epochs", "5", "--seed", "1")
    assert_clean_error(r, "the exported policy disagrees with the trained network")
    assert _files(bundle_dir) == before


def test_cli_errors(bundle_dir, data_path, tmp_path):
    assert_clean_error(invoke("train-policy", bundle_dir), "either --rewards")
    assert_clean_error(invoke("train-policy", bundle_dir, "--rewards", "x", "--data", data_path), "either --rewards")
    assert_clean_error(invoke("export-policy", bundle_dir), "no trained policy")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    assert_clean_error(invoke("collect", bundle_dir, "--data", bad, "--out", tmp_path / "r.jsonl"), "non-empty 'prompt'")
    bad.write_text("not json\n")
    assert_clean_error(invoke("collect", bundle_dir, "--data", bad, "--out", tmp_path / "r.jsonl"), "not valid JSON")
    assert_clean_error(invoke("collect", bundle_dir, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "r.jsonl"),
                       "not found")
    assert_clean_error(invoke("collect", tmp_path / "nobundle", "--data", data_path, "--out", tmp_path / "r.jsonl"),
                       "bundle not found")
    assert_clean_error(invoke("collect", bundle_dir, "--data", data_path, "--out", tmp_path / "r.jsonl",
                              "--max-new-tokens", "0"), "--max-new-tokens")
    rewards = tmp_path / "rewards.jsonl"
    rewards.write_text('{"id": 1, "arms": {"none": {"speedup": 1.0}}, "features": {}, "prompt_len": 3}\n')
    assert_clean_error(invoke("train-policy", bundle_dir, "--rewards", rewards), "arms")
    assert_clean_error(invoke("train-policy", bundle_dir, "--rewards", tmp_path / "nope.jsonl"), "not found")
    # Rows collected with another draft length cannot train this pool.
    r = invoke("collect", bundle_dir, "--data", data_path, "--out", rewards, *FAST, "--draft-len", "3")
    assert r.exit_code == 0, r.output
    assert_clean_error(invoke("train-policy", bundle_dir, "--rewards", rewards), "another pool")
