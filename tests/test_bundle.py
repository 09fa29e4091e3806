"""Bundles as files: opening, creating, the recorded training ids, adding arms, refusing what does not fit."""
from __future__ import annotations

import json

import pytest
from tiny import char_tokenizer, save_model_dir, tiny_llama

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import write_json_atomic
from ctxdraft.selfdraft.drafting.pool import BASE_ARMS, lookup_arm, lookup_tree_arm, successor_arm
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import Bundle, add_arm, load_bundle, open_or_create_bundle
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info, record_training_ids, trained_ids, validate_info


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return load_target(tiny_model_dir)


@pytest.fixture()
def bundle_dir(target, tiny_model_dir, tmp_path):
    path = tmp_path / "bundle"
    write_json_atomic(path / "bundle.json", new_bundle_info(target, str(tiny_model_dir)))
    return path


def test_new_bundle_has_the_base_arms_and_the_target_identity(target):
    info = new_bundle_info(target, "spec")
    assert info["arms"] == BASE_ARMS and info["arms"] is not BASE_ARMS
    assert info["target"] == {"spec": "spec", "name": target.name, "hash": target.content_hash}
    info["arms"][0]["settings"]["x"] = 1
    assert BASE_ARMS[0]["settings"] == {}  # a copy: editing one bundle never edits the defaults


def _info(**changes):
    info = {"format": "ctxdraft-bundle", "version": 1, "target": {"spec": "t", "name": "t", "hash": "h"},
            "arms": [{"name": "none", "kind": "none", "settings": {}},
                     {"name": "lookup", "kind": "lookup", "settings": {"draft_len": 4, "ngram_sizes": [3, 2, 1]}}]}
    info.update(changes)
    return info


@pytest.mark.parametrize("info, message", [
    ([1, 2], "is not a ctxdraft bundle"),
    ({"arms": []}, "is not a ctxdraft bundle"),
    (_info(version=99), "version 99; this ctxdraft reads up to 1"),
    (_info(version="2"), "version: '2' is not of type 'integer'"),
    (_info(target="x"), "target: 'x' is not of type 'object'"),
    (_info(arms=[1, 2]), "is not of type 'object'"),
    (_info(arms=[]), "arms: [] should be non-empty"),
    (_info(arms=[{"name": "a", "kind": "none"}, {"name": "a", "kind": "none"}]), "arm names must be unique"),
    (_info(arms=[{"name": "", "kind": "none"}]), "arms[0].name: '' should be non-empty"),
    (_info(arms=[{"name": "x", "kind": "telepathy"}]), "arms[0].kind: 'telepathy' is not one of"),
    (_info(arms=[{"name": "l", "kind": "lookup", "settings": {"draft_len": "4"}}]), "arms[0].settings.draft_len: '4' is not of type 'integer'"),
    (_info(arms=[{"name": "e", "kind": "exit", "settings": {"exit_layer": 2, "weights": "../../etc/passwd"}}]),
     "arms[0].settings.weights: '../../etc/passwd' must be a file inside the bundle directory"),
    (_info(policy=5), "policy: 5 is neither null nor"),
    (_info(policy="/etc/passwd"), "policy: '/etc/passwd' must be a file inside the bundle directory"),
    (_info(features=[1]), "features: [1] is neither null nor"),
    (_info(exits="x"), "exits: 'x' is not of type 'array', 'null'"),
    (_info(exits=[{"layer": 3, "agreement": "high"}]), "exits[0].agreement: 'high' is not of type 'number', 'null'"),
    (_info(default_arm="zzz"), "default_arm 'zzz' is not one of the arms"),
    (_info(arms=[{"name": "t", "kind": "lookup-tree", "settings": {"max_nodes": "many"}}]), "arms[0].settings.max_nodes"),
    (_info(arms=[{"name": "t", "kind": "lookup-tree", "settings": {"max_nodes": 0}}]), "arms[0].settings.max_nodes"),
    (_info(arms=[{"name": "t", "kind": "successor", "settings": {"max_nodes": 2000}}]), "arms[0].settings.max_nodes"),
    (_info(arms=[{"name": "t", "kind": "successor", "settings": {"draft_len": 65}}]), "arms[0].settings.draft_len"),
    (_info(arms=[{"name": "t", "kind": "successor", "settings": {"top_k": 0}}]), "arms[0].settings.top_k"),
    (_info(arms=[{"name": "t", "kind": "successor", "settings": {"ngram_sizes": [2]}}]), "Additional properties"),
    (_info(policy="policy.onnx", policy_model={"feature_kind": "hidden", "arms": ["none", "gone"], "config": {}}),
     "policy_model.arms names arms the bundle does not have: ['gone']"),
])
def test_validate_info_names_the_field(info, message):
    with pytest.raises(CtxdraftError) as error:
        validate_info(info, "bundle.json")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_validate_info_accepts_tree_arms():
    arms = [lookup_tree_arm(), lookup_tree_arm(max_nodes="auto"), successor_arm(), successor_arm(max_nodes="auto")]
    info = _info(arms=arms)
    assert validate_info(info, "bundle.json") is info


def test_validate_info_accepts_the_shipped_bundle():
    from ctxdraft.selfdraft.serving.bundle import DEFAULT_BUNDLE_DIR

    info = json.loads((DEFAULT_BUNDLE_DIR / "bundle.json").read_text())
    assert validate_info(info, "shipped") is info


def test_damaged_bundle_files_are_one_clear_error(target, tiny_model_dir, bundle_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    from ctxdraft.selfdraft.drafting.exit_draft import ExitSettings
    from ctxdraft.selfdraft.drafting.exit_head import ExitHead, save_heads
    from ctxdraft.selfdraft.drafting.pool import exit_arm

    info = json.loads((bundle_dir / "bundle.json").read_text())
    info["arms"].append(exit_arm(ExitSettings(2)))
    write_json_atomic(bundle_dir / "bundle.json", info)
    weights = bundle_dir / "exits.safetensors"
    for damage, message in [(b"", "are damaged"), (b"\x07" * 40, "are damaged"), (None, "self-draft weights not found")]:
        weights.unlink(missing_ok=True)
        if damage is not None:
            weights.write_bytes(damage)
        with pytest.raises(CtxdraftError, match=message):
            load_bundle(bundle_dir)
    save_heads(weights, [ExitHead(target.model, 1, "linear")])  # a file without the layer-2 exit
    with pytest.raises(CtxdraftError, match="has no weights for the exit at layer 2"):
        load_bundle(bundle_dir)
    head = ExitHead(target.model, 2, "linear", torch.tensor([0, 5, 10]))
    tensors = {f"exit2.{k}": v.contiguous() for k, v in head.state_dict().items()}
    tensors["exit2.vocab_ids"] = torch.tensor([0, 5, 10_000])
    save_file(tensors, str(weights))
    bundle = load_bundle(bundle_dir, target=str(tiny_model_dir))  # the header is fine ...
    with pytest.raises(CtxdraftError, match="holds ids outside"):  # ... the ids are not, for this target
        bundle.draft("exit@2")
    info["policy"] = "policy.onnx"
    write_json_atomic(bundle_dir / "bundle.json", info)
    save_heads(weights, [ExitHead(target.model, 2, "linear")])
    with pytest.raises(CtxdraftError, match="the policy bundle.json names, is missing"):
        load_bundle(bundle_dir)


def test_open_or_create(target, tiny_model_dir, bundle_dir, tmp_path):
    fresh = open_or_create_bundle(tmp_path / "new", target, "spec")
    assert fresh.path == tmp_path / "new" and not fresh.path.exists()  # nothing written yet
    existing = open_or_create_bundle(bundle_dir, target, "spec")
    assert existing.info["target"]["spec"] == str(tiny_model_dir)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(CtxdraftError, match="non-empty directory"):
        open_or_create_bundle(tmp_path / "junk", target, "spec")
    (tmp_path / "work-only" / ".work").mkdir(parents=True)
    assert open_or_create_bundle(tmp_path / "work-only", target, "spec", ignore=(".work",)).info["arms"] == BASE_ARMS
    tok = char_tokenizer()
    other = load_target(save_model_dir(tmp_path / "other", tiny_llama(len(tok), seed=9), tok))
    with pytest.raises(CtxdraftError, match="was made for target"):
        open_or_create_bundle(bundle_dir, other, "spec")


def test_training_ids_are_recorded_per_command():
    info = {}
    assert trained_ids(info) is None
    record_training_ids(info, "add-exits", [1, "b"])
    record_training_ids(info, "train-policy", [2])
    record_training_ids(info, "add-exits", [3])  # a rerun replaces its own record
    assert trained_ids(info) == {"3", "2"}


def test_add_arm_is_checked_before_writing_and_drops_a_stale_policy(bundle_dir, tmp_path):
    info = json.loads((bundle_dir / "bundle.json").read_text())
    info["policy"] = "policy.onnx"
    write_json_atomic(bundle_dir / "bundle.json", info)
    (bundle_dir / "policy.onnx").write_bytes(b"a stale policy")
    bundle = add_arm(bundle_dir, lookup_arm(6))
    assert bundle.arms[-1] == "lookup-k6" and bundle.info["policy"] is None
    assert json.loads((bundle_dir / "bundle.json").read_text())["arms"][-1]["name"] == "lookup-k6"
    before = (bundle_dir / "bundle.json").read_bytes()
    with pytest.raises(CtxdraftError, match="unknown kind"):
        add_arm(bundle_dir, {"name": "x", "kind": "telepathy", "settings": {}})
    with pytest.raises(CtxdraftError, match="other than 'auto'"):
        add_arm(bundle_dir, {"name": "auto", "kind": "none", "settings": {}})
    with pytest.raises(CtxdraftError, match="bad settings"):
        add_arm(bundle_dir, {"name": "l", "kind": "lookup", "settings": {"window": 3}})
    assert (bundle_dir / "bundle.json").read_bytes() == before


def test_generate_refuses_an_unknown_arm_before_loading_the_target(tmp_path):
    info = {"format": "ctxdraft-bundle", "version": 1, "target": {"spec": str(tmp_path / "no-such-model")},
            "arms": [{"name": "none", "kind": "none", "settings": {}}]}
    bundle = Bundle(tmp_path, info)
    with pytest.raises(CtxdraftError, match="unknown arm 'lookup'"):
        bundle.generate("hi", draft="lookup")
    with pytest.raises(CtxdraftError, match="cannot load target"):
        bundle.generate("hi", draft="none")


def test_load_bundle_with_a_target_checks_it(bundle_dir, tiny_model_dir, tmp_path):
    assert load_bundle(bundle_dir, target=str(tiny_model_dir)).target.path == tiny_model_dir
    with pytest.raises(CtxdraftError, match="bundle not found"):
        load_bundle(tmp_path / "nowhere")
