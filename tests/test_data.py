"""Prompt files: reading JSONL with clear errors, and the train/held-out split the default bundle uses."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ctxdraft.selfdraft.base.data import first_per_domain, read_prompts, rotated, round_robin, stratified_split
from ctxdraft.selfdraft.base.errors import CtxdraftError

SPLIT = Path(__file__).resolve().parents[1] / "scripts" / "split_data.py"


def test_specbench_split_is_stratified_and_disjoint(specbench_path, tmp_path):
    rows = read_prompts(specbench_path)
    subprocess.run([sys.executable, str(SPLIT), str(specbench_path), str(tmp_path)], check=True, capture_output=True)
    train = read_prompts(tmp_path / "train.jsonl")
    held = read_prompts(tmp_path / "heldout.jsonl")
    assert len(train) + len(held) == len(rows)
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    domains = Counter(r["domain"] for r in rows)
    held_domains = Counter(r["domain"] for r in held)
    assert set(held_domains) == set(domains)
    for d, n in domains.items():
        assert held_domains[d] == round(n * 0.25)


@pytest.mark.parametrize(
    "content,needle",
    [("", "is empty"), ("{not json}\n", "line 1: not valid JSON"), ('[1, 2]\n', "expected a JSON object"),
     ('{"id": 1}\n', "needs a non-empty 'prompt'"), ('{"prompt": "  "}\n', "needs a non-empty 'prompt'")],
)
def test_malformed_prompt_files(tmp_path, content, needle):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(CtxdraftError, match=needle):
        read_prompts(path)


def test_text_field_and_defaults(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"prompt": "hi", "id": "x", "domain": "qa"}) + "\n")
    assert read_prompts(path) == [{"id": 0, "domain": "all", "prompt": "hello"}, {"id": "x", "domain": "qa", "prompt": "hi"}]


def test_split_is_stratified_seeded_and_disjoint():
    domains = ["a"] * 10 + ["b"] * 3 + ["c"] * 1
    train_idx, eval_idx = stratified_split(domains, 0.3, seed=5)
    assert sorted(train_idx + eval_idx) == list(range(14))
    assert [domains[i] for i in eval_idx].count("a") == 3
    assert [domains[i] for i in eval_idx].count("b") == 1
    assert 13 in train_idx  # a one-row domain stays in training
    assert stratified_split(domains, 0.3, seed=5) == (train_idx, eval_idx)
    assert stratified_split(domains, 0.3, seed=6) != (train_idx, eval_idx)
    with pytest.raises(CtxdraftError, match="held-out fraction"):
        stratified_split(domains, 1.0)


def test_read_prompts_refuses_duplicate_and_bad_ids(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(CtxdraftError, match="row 2: duplicate id 'a' \\(first in row 1\\)"):
        read_prompts(path)
    path.write_text('{"id": [1], "prompt": "x"}\n')
    with pytest.raises(CtxdraftError, match="'id' must be a string or an integer"):
        read_prompts(path)


def test_first_per_domain_round_robin_and_rotation():
    rows = [{"id": i, "domain": d} for i, d in enumerate("aaabbc")]
    assert [r["id"] for r in first_per_domain(rows, 2)] == [0, 1, 3, 4, 5]
    assert [r["id"] for r in round_robin(rows, 4)] == [0, 3, 5, 1]  # a, b, c, then a again
    assert [r["id"] for r in round_robin(rows, 10)] == [0, 3, 5, 1, 4, 2]
    assert rotated([1, 2, 3], 1) == [2, 3, 1] and rotated([1, 2, 3], 5) == [3, 1, 2] and rotated([], 3) == []
    with pytest.raises(CtxdraftError, match="per-domain"):
        first_per_domain(rows, 0)
