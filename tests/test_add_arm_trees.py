"""``ctxdraft add-arm`` for the tree arms: lookup-tree, successor (seeded table), feature-tree and merged arms are
added and decode exactly as plain decoding; bad sizes, a tree wider than its budget and a successor table for another
vocabulary are one error line with nothing written."""
from __future__ import annotations

import json

import pytest
from test_cli import assert_clean_error, invoke, tiny_bundle  # noqa: F401 (the fixture)
from test_tree_builders import LAYERS, noisy_head

from ctxdraft.selfdraft.base.layout import BUNDLE_FILE, EXITS_FILE, SUCCESSORS_FILE
from ctxdraft.selfdraft.drafting.feature_draft import FeatureSettings, feature_arm
from ctxdraft.selfdraft.drafting.feature_head import save_feature_head
from ctxdraft.selfdraft.drafting.successor_table import empty_table, read_successor_table, save_successor_table
from ctxdraft.selfdraft.serving.bundle import load_bundle


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["abc abc abc", "hello world"])))
    return path


def with_feature_head(bundle):
    """The tiny bundle with a (random, noisy) feature head arm, as add-exits --feature leaves it."""
    target = load_bundle(bundle).target
    save_feature_head(bundle / EXITS_FILE, "general", noisy_head(target.model))
    info = json.loads((bundle / BUNDLE_FILE).read_text())
    info["arms"].append(feature_arm(FeatureSettings("general", [layer for layer in LAYERS if layer <= target.num_layers])))
    (bundle / BUNDLE_FILE).write_text(json.dumps(info))


def test_tree_arms_are_added_and_decode_exactly(tiny_bundle, data):  # noqa: F811
    with_feature_head(tiny_bundle)
    r = invoke("add-arm", str(tiny_bundle), "--kind", "merged", "--draft-len", "4", "--max-nodes", "10", "--top-k", "2",
               "--data", str(data), "--max-new-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    added = json.loads(r.output)
    assert added["seeded_table"] and set(added["added"]["settings"]["sources"]) == {"lookup", "successor", "feature"}
    assert added["added"]["settings"]["sources"]["successor"]["table"] == SUCCESSORS_FILE
    table = read_successor_table(tiny_bundle / SUCCESSORS_FILE)
    assert table.shape[1] == 2 and int((table >= 0).sum()) > 0  # learned from the prompts' logits
    for args in (["--kind", "lookup-tree", "--max-nodes", "auto"], ["--kind", "successor", "--max-nodes", "8"],
                 ["--kind", "feature-tree", "--draft-len", "3", "--max-nodes", "6", "--top-k", "2"],
                 ["--kind", "merged", "--name", "merged-ls", "--max-nodes", "6", "--sources", "lookup, successor"],
                 ["--kind", "merged", "--name", "merged-auto", "--max-nodes", "auto"]):
        r = invoke("add-arm", str(tiny_bundle), *args)
        assert r.exit_code == 0, r.output
    b = load_bundle(tiny_bundle)
    assert b.arm_spec("successor-n8")["settings"]["table"] == SUCCESSORS_FILE  # the bundle's table, once it has one
    plain = b.generate("abc abc", draft="none", max_new_tokens=16)
    assert set(b.arm_spec("merged-ls")["settings"]["sources"]) == {"lookup", "successor"}  # the feature head left out
    assert b.arm_spec("merged-auto")["settings"]["max_nodes"] == "auto"
    for arm in ("merged-n10", "lookup-tree-auto", "successor-n8", "feature-tree", "merged-ls", "merged-auto"):
        assert b.generate("abc abc", draft=arm, max_new_tokens=16).token_ids == plain.token_ids, arm


@pytest.mark.parametrize("args, message", [
    (["--kind", "successor", "--max-nodes", "0"], "max_nodes"),
    (["--kind", "successor", "--max-nodes", "2000"], "max_nodes"),
    (["--kind", "lookup-tree", "--max-nodes", "many"], "--max-nodes"),
    (["--kind", "successor", "--top-k", "0"], "top_k"),
    (["--kind", "successor", "--top-k", "65", "--max-nodes", "100"], "top_k"),
    (["--kind", "lookup-tree", "--draft-len", "65"], "1..64"),
    (["--kind", "successor", "--top-k", "8", "--max-nodes", "4"], "wider than its budget"),
    (["--kind", "merged", "--top-k", "8", "--max-nodes", "4"], "needs a successor table"),
    (["--kind", "feature-tree", "--max-nodes", "auto"], "integer --max-nodes"),
    (["--kind", "feature-tree"], "needs a feature head"),
    (["--kind", "merged", "--sources", "lookup,bogus"], "merged sources must be some of"),
    (["--kind", "merged", "--sources", ""], "merged sources must be some of"),
    (["--kind", "merged", "--sources", "lookup,feature"], "merged source feature needs a feature head"),
    (["--kind", "merged", "--sources", "lookup,model"], "merged source model needs a model arm"),
    (["--kind", "lookup", "--sources", "lookup"], "--sources chooses a merged arm's sources"),
    (["--kind", "lookup-tree", "--data", "x.jsonl"], "or fills the suffix datastore (--kind suffix), not --kind lookup-tree"),
])
def test_bad_tree_options_are_one_error_and_nothing_written(tiny_bundle, args, message):  # noqa: F811
    before = (tiny_bundle / BUNDLE_FILE).read_text()
    assert_clean_error(invoke("add-arm", str(tiny_bundle), *args), message)
    assert (tiny_bundle / BUNDLE_FILE).read_text() == before and not (tiny_bundle / SUCCESSORS_FILE).exists()


def test_feature_tree_wider_than_budget(tiny_bundle):  # noqa: F811
    with_feature_head(tiny_bundle)
    before = (tiny_bundle / BUNDLE_FILE).read_text()
    assert_clean_error(invoke("add-arm", str(tiny_bundle), "--kind", "feature-tree", "--top-k", "8", "--max-nodes", "4"),
                       "wider than its budget")
    assert (tiny_bundle / BUNDLE_FILE).read_text() == before


def test_successor_table_of_another_vocabulary(tiny_bundle, data):  # noqa: F811
    save_successor_table(tiny_bundle / SUCCESSORS_FILE, empty_table(7, 4))
    before = (tiny_bundle / BUNDLE_FILE).read_text()
    for kind in ("successor", "merged"):
        assert_clean_error(invoke("add-arm", str(tiny_bundle), "--kind", kind), "vocabulary of 7 tokens")
    assert (tiny_bundle / BUNDLE_FILE).read_text() == before
    # --data rebuilds the table for this target; a refused arm puts the old table back
    stored = (tiny_bundle / SUCCESSORS_FILE).read_bytes()
    assert_clean_error(invoke("add-arm", str(tiny_bundle), "--kind", "merged", "--name", "auto", "--data", str(data),
                              "--max-new-tokens", "0"), "other than 'auto'")
    assert (tiny_bundle / SUCCESSORS_FILE).read_bytes() == stored and (tiny_bundle / BUNDLE_FILE).read_text() == before


def test_a_damaged_table_named_by_an_arm_fails_the_bundle_load(tiny_bundle):  # noqa: F811
    info = json.loads((tiny_bundle / BUNDLE_FILE).read_text())
    info["arms"].append({"name": "s", "kind": "successor", "settings": {"table": SUCCESSORS_FILE}})
    (tiny_bundle / BUNDLE_FILE).write_text(json.dumps(info))
    assert_clean_error(invoke("info", "--bundle", str(tiny_bundle)), "successor table not found")
    (tiny_bundle / SUCCESSORS_FILE).write_bytes(b"not safetensors")
    assert_clean_error(invoke("info", "--bundle", str(tiny_bundle)), SUCCESSORS_FILE)
    info["arms"][-1]["settings"]["table"] = "../elsewhere.safetensors"  # a field names only its fixed file
    (tiny_bundle / BUNDLE_FILE).write_text(json.dumps(info))
    assert_clean_error(invoke("info", "--bundle", str(tiny_bundle)), "fixed names")
