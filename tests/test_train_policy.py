"""Training a bundle's policy: both policies, the split and the report."""
import json

from toy_rewards import ARMS, DOMAINS, toy_rows

from ctxdraft.selfdraft.learning.policy import PolicyConfig
from ctxdraft.selfdraft.learning.policy_report import training_report
from ctxdraft.selfdraft.learning.policy_train import train_policies
from ctxdraft.selfdraft.learning.rewards import rewards_from_rows


def test_train_policies_report_and_markdown():
    data = rewards_from_rows(toy_rows())
    result = train_policies(data, PolicyConfig(epochs=40), eval_frac=0.3)
    report = result.report
    json.dumps(report)  # goes to reports/train_policy.json
    assert set(report["policies"]) == {"reinforce", "supervised"}
    assert report["num_eval"] == len(result.eval_idx) and report["num_train"] == len(result.train_idx)
    assert not set(result.train_idx) & set(result.eval_idx)
    table = training_report(report).to_markdown()
    for name in ["policy (reinforce)", "policy (supervised)", "oracle (per prompt)", *ARMS, *DOMAINS, "overall"]:
        assert name in table
    assert len([line for line in table.splitlines() if line.startswith("|")]) == 2 + 1 + 2 + len(ARMS) + 1


def test_train_policy_collects_first_and_continues_a_matching_rewards_file(tiny_model_dir, tmp_path):
    from ctxdraft.selfdraft.base.fileio import write_json_atomic
    from ctxdraft.selfdraft.commands.collect import CollectConfig
    from ctxdraft.selfdraft.commands.train_policy import train_policy
    from ctxdraft.selfdraft.runtime.target import load_target
    from ctxdraft.selfdraft.serving.bundle import load_bundle
    from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info

    info = new_bundle_info(load_target(tiny_model_dir), str(tiny_model_dir))
    info["arms"] = info["arms"][:2]  # none, lookup
    write_json_atomic(tmp_path / "b" / "bundle.json", info)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "domain": "ab"[i % 2], "prompt": f"abc abc {i} abc"}) + "\n"
                            for i in range(6)))
    config = PolicyConfig(epochs=5)
    first = train_policy(load_bundle(tmp_path / "b"), data=data, collect_config=CollectConfig(max_new_tokens=6, profile_reps=1), config=config)
    assert first.collected["num_new"] == 6 and (tmp_path / "b" / "rewards.jsonl").is_file()
    saved = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert saved["policy"] == "policy.onnx"
    assert set(saved["trained_on"]["train-policy"]) < {f"p{i}" for i in range(6)}  # only its training split
    again = train_policy(load_bundle(tmp_path / "b"), data=data, collect_config=CollectConfig(max_new_tokens=6, profile_reps=1), config=config)
    assert again.collected["num_new"] == 0 and again.collected["num_skipped"] == 6  # continued, nothing redone
    other = train_policy(load_bundle(tmp_path / "b"), data=data, collect_config=CollectConfig(max_new_tokens=5, profile_reps=1), config=config)
    assert other.collected["num_new"] == 6  # other settings: the file starts over


def test_train_policy_needs_exactly_one_source(tiny_model_dir, tmp_path):
    import pytest

    from ctxdraft.selfdraft.base.errors import CtxdraftError
    from ctxdraft.selfdraft.commands.train_policy import train_policy
    from ctxdraft.selfdraft.serving.bundle import Bundle

    bundle = Bundle(tmp_path, {"arms": []})
    with pytest.raises(CtxdraftError, match="either --rewards"):
        train_policy(bundle)
    with pytest.raises(CtxdraftError, match="either --rewards"):
        train_policy(bundle, rewards="a", data="b")
