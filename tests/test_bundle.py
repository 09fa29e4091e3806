"""Bundles as files: opening, creating, the recorded training ids, adding arms, refusing what does not fit."""
from __future__ import annotations

import json

import pytest

from ctxdraft.selfdraft.bundle import Bundle, add_arm, load_bundle, open_or_create_bundle
from ctxdraft.selfdraft.bundle_info import new_bundle_info, record_training_ids, trained_ids, validate_info
from ctxdraft.selfdraft.errors import CtxdraftError
from ctxdraft.selfdraft.fileio import write_json_atomic
from ctxdraft.selfdraft.pool import BASE_ARMS, lookup_arm
from ctxdraft.selfdraft.target import load_target
from tiny import char_tokenizer, save_model_dir, tiny_llama


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


@pytest.mark.parametrize("info, message", [
    ([1, 2], "not a ctxdraft bundle"),
    ({"format": "ctxdraft-bundle", "arms": [], "target": "x"}, "not a ctxdraft bundle"),
    ({"format": "ctxdraft-bundle", "arms": [], "target": {}, "version": 99}, "version 99"),
    ({"format": "ctxdraft-bundle", "arms": [{"name": "a"}, {"name": "a"}], "target": {}}, "unique"),
    ({"format": "ctxdraft-bundle", "arms": [{"name": ""}], "target": {}}, "unique non-empty"),
])
def test_validate_info_refuses_what_is_not_a_bundle(info, message):
    with pytest.raises(CtxdraftError, match=message):
        validate_info(info, "bundle.json")


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
