"""The pool: arm specs, the registry of draft kinds, cost keys shared by arms of one draft, the pool hash."""
from __future__ import annotations

import json

import pytest

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.layout import BUNDLE_FILE
from ctxdraft.selfdraft.drafting.drafts import LookupDraft, ModelDraft, NoneDraft
from ctxdraft.selfdraft.drafting.exit_draft import ExitSettings
from ctxdraft.selfdraft.drafting.feature_draft import FeatureSettings
from ctxdraft.selfdraft.drafting.feature_tree import FeatureTreeSettings
from ctxdraft.selfdraft.drafting.pool import (
    BASE_ARMS,
    DRAFT_KINDS,
    build_draft,
    cost_key,
    exit_arm,
    feature_arm,
    feature_tree_arm,
    lookup_arm,
    lookup_tree_arm,
    merged_arm,
    model_arm,
    none_arm,
    pool_key,
    successor_arm,
    suffix_arm,
    with_draft_len,
)
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import DEFAULT_BUNDLE_DIR


def test_the_registry_reads_every_kind_the_arm_helpers_write():
    """The spec helpers write arms (add-exits, the CLI); the registry reads them back. A kind a helper writes but
    the registry lacks (or spells differently), or a builder no helper reaches, breaks that round trip; the
    shipped bundle's arms must be readable too."""
    written = {none_arm()["kind"], lookup_arm(2)["kind"], model_arm("m")["kind"], exit_arm(ExitSettings(1))["kind"],
               feature_arm(FeatureSettings(layers=[1, 2]))["kind"], lookup_tree_arm(4, 16)["kind"],
               successor_arm(4, 16)["kind"], feature_tree_arm(FeatureTreeSettings(layers=[1, 2]))["kind"],
               merged_arm()["kind"], suffix_arm(8, 16)["kind"]}
    assert written == set(DRAFT_KINDS)
    shipped = json.loads((DEFAULT_BUNDLE_DIR / BUNDLE_FILE).read_text())["arms"]
    assert {a["kind"] for a in shipped} <= set(DRAFT_KINDS)


def test_build_draft_by_kind_and_its_cost_key(tiny_model_dir):
    target = load_target(tiny_model_dir)
    none = build_draft({"name": "none", "kind": "none", "settings": {}}, target)
    lookup = build_draft(lookup_arm(2, name="l2"), target)
    model = build_draft(model_arm(str(tiny_model_dir), 3, name="self"), target)
    assert isinstance(none, NoneDraft) and isinstance(lookup, LookupDraft) and isinstance(model, ModelDraft)
    assert (lookup.name, lookup.draft_len, lookup.cost_key) == ("l2", 2, "lookup")
    assert (model.draft_len, model.cost_key) == (3, f"model:{tiny_model_dir}")
    with pytest.raises(CtxdraftError, match="unknown kind 'x'"):
        build_draft({"name": "a", "kind": "x"}, target)
    with pytest.raises(CtxdraftError, match="needs the bundle directory"):
        build_draft(exit_arm(ExitSettings(1)), target)
    with pytest.raises(CtxdraftError, match="outside 1..3"):
        build_draft(exit_arm(ExitSettings(4)), target, bundle_dir=tiny_model_dir)


def test_cost_keys_ignore_settings_that_leave_one_evaluation_alone():
    assert cost_key(lookup_arm(2)) == cost_key(lookup_arm(8, ngram_sizes=(4, 3))) == "lookup"
    a = exit_arm(ExitSettings(10, draft_len=2, threshold=0.5, draft_vocab=8192))
    b = exit_arm(ExitSettings(10, draft_len=6, threshold=0.0, draft_vocab=8192))
    assert cost_key(a) == cost_key(b) == "exit@10:linear:8192"
    assert cost_key(exit_arm(ExitSettings(10, head="layer"))) != cost_key(a)
    assert cost_key(model_arm("a", 2)) == cost_key(model_arm("a", 5)) != cost_key(model_arm("b", 2))


def test_pool_key_and_draft_length_override():
    arms = with_draft_len(BASE_ARMS, 3)
    assert [a["settings"].get("draft_len") for a in arms] == [None, 3, 3, 3]
    assert BASE_ARMS[1]["settings"]["draft_len"] == 4  # a copy
    assert with_draft_len(BASE_ARMS, None) == BASE_ARMS
    assert pool_key(BASE_ARMS) == pool_key([dict(a) for a in BASE_ARMS]) != pool_key(arms)


@pytest.mark.parametrize("make, message", [
    (lambda: lookup_arm(0), "draft_len"),
    (lambda: model_arm("", 2), "path"),
    (lambda: model_arm("x", 0), "draft_len"),
    (lambda: ExitSettings(0), "exit_layer"),
    (lambda: ExitSettings(3, threshold=1.0), "threshold"),
])
def test_bad_arm_settings(make, message):
    with pytest.raises(CtxdraftError, match=message):
        make()


def test_model_arm_refuses_a_bool_draft_len():
    with pytest.raises(CtxdraftError, match="model draft_len must be an integer, got True"):
        model_arm("some/model", draft_len=True)
