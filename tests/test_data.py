"""Prompt files: reading JSONL with clear errors, and the train/held-out split the default bundle uses."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ctxdraft.selfdraft.errors import CtxdraftError
from ctxdraft.selfdraft.fileio import read_prompts

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
