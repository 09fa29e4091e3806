"""torchrun: collect and add-exits on 2 ranks (gloo) give the outputs of one process; a failing rank fails the run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_word_target, write_word_prompts

from ctxdraft.selfdraft.runtime.distributed import Group

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
TIMING = ("generate_s", "simulate_s")


def ctxdraft(*args, ranks: bool = False, check: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ([*TORCHRUN, "ctxdraft"] if ranks else [sys.executable, "-m", "ctxdraft.cli.main"]) + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_a_group_of_one_shards_nothing():
    group = Group.single()
    assert not group.active and group.main
    assert group.shard([1, 2, 3]) == [1, 2, 3] and group.broadcast(5) == 5 and group.gather(7) == [7]
    assert group.run(lambda: 3) == 3


def test_shards_are_deterministic_and_cover_everything():
    items = list(range(11))
    shards = [Group(3, r).shard(items) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shards, [])) == items


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, save_word_target(root / "model"), write_word_prompts(root / "data.jsonl", n=8)


def rows_without_timing(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_two_rank_collect_equals_one_process(setup):
    root, model, data = setup
    one = root / "one"
    ctxdraft("add-arm", one, "--target", model, "--kind", "lookup", "--draft-len", "3")
    ctxdraft("collect", one, "--data", data, "--out", one / "rewards.jsonl", "--max-new-tokens", "10")
    two = root / "two"
    shutil.copytree(one, two)  # the same bundle and its stored cost profile
    (two / "rewards.jsonl").unlink()
    proc = ctxdraft("collect", two, "--data", data, "--out", two / "rewards.jsonl", "--max-new-tokens", "10", "--json",
                    ranks=True)
    summary = json.loads(proc.stdout)  # only rank 0 prints
    assert summary["ranks"] == 2 and summary["num_new"] == 8 and not summary["profiled_now"]
    assert rows_without_timing(two / "rewards.jsonl") == rows_without_timing(one / "rewards.jsonl")
    assert not list(two.glob("rewards.jsonl.rank*"))  # the shards were merged and removed


def test_two_rank_add_exits_equals_one_process(setup):
    root, model, data = setup
    args = ["--layers", "1,2", "--data", data, "--steps", "6", "--self-distill-tokens", "6", "--eval-frac", "0.25", "--json"]
    one = json.loads(ctxdraft("add-exits", model, "--out", root / "exits-one", *args).stdout)
    two = json.loads(ctxdraft("add-exits", model, "--out", root / "exits-two", *args, ranks=True).stdout)
    assert one["data"] == {**two["data"], "build_s": one["data"]["build_s"]}
    for a, b in zip(one["exits"], two["exits"]):
        assert (a["layer"], a["agreement"], a["num_params"]) == (b["layer"], b["agreement"], b["num_params"])
        assert a["train"]["steps"] == b["train"]["steps"] == 6
    w1, w2 = load_file(root / "exits-one" / "exits.safetensors"), load_file(root / "exits-two" / "exits.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5)
    assert not (root / "exits-two" / ".add_exits_work").exists()


def test_a_failing_rank_fails_the_run_with_its_error(setup):
    root, model, data = setup
    bad = root / "bad.jsonl"
    bad.write_text(data.read_text() + json.dumps({"id": "long", "domain": "a", "prompt": "the " * 400}) + "\n")
    proc = ctxdraft("collect", root / "one", "--data", bad, "--out", root / "never.jsonl", "--max-new-tokens", "10",
                    ranks=True, check=False)
    assert proc.returncode != 0 and "exceeds the model's context" in proc.stderr
    assert not (root / "never.jsonl").exists()
