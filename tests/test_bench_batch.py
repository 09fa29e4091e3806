"""`ctxdraft bench --batch B` on a tiny random model: every method timed, rows checked against single requests."""
from __future__ import annotations

import json

import pytest
from cli_helpers import assert_clean_error
from click.testing import CliRunner

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base.fileio import write_json_atomic
from ctxdraft.selfdraft.drafting.ties import Divergence
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info

ROWS = [
    {"id": "p1", "domain": "qa", "prompt": "the cat sat on the mat. the cat sat"},
    {"id": "p2", "domain": "math", "prompt": "1+1=2, 2+2=4, 3+3="},
    {"id": "p3", "domain": "qa", "prompt": "hello world"},
]


@pytest.fixture(scope="module")
def bundle_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_batch") / "bundle"
    path.mkdir()
    write_json_atomic(path / "bundle.json", new_bundle_info(load_target(tiny_model_dir), str(tiny_model_dir)))
    return path


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def invoke(bundle_dir, data_file, out, *args):
    return CliRunner().invoke(main, ["bench", "--bundle", str(bundle_dir), "--data", str(data_file), "--split", "all",
                                     "--out", str(out), "--max-new-tokens", "6", *args])


def test_cli_bench_batch(bundle_dir, data_file, tmp_path):
    """Groups of 2 (the last one smaller): every method, each batch row checked, report and files written."""
    out = tmp_path / "out"
    r = invoke(bundle_dir, data_file, out, "--batch", "2", "--arms", "none,lookup")
    assert r.exit_code == 0, r.output
    for name in ("hf-generate-batch", "none batch", "none one by one", "lookup batch", "lookup one by one"):
        assert f"| {name} |" in r.output
    assert "every batch row equals its single-request output (6 rows" in r.output
    assert {p.name for p in out.iterdir()} == {"bench_batch.json", "bench_batch.md"}
    data = json.loads((out / "bench_batch.json").read_text())
    assert data["ok"] is True and data["mismatches"] == 0 and data["batch"] == 2
    assert sorted((c["prompt_id"], c["arm"]) for c in data["checks"]) == sorted(
        (r["id"], arm) for r in ROWS for arm in ("none", "lookup"))
    methods = {m["name"]: m for m in data["methods"]}
    assert methods["none batch"]["new_tokens"] == methods["none one by one"]["new_tokens"] > 0
    assert methods["none batch"]["vs_one_by_one"] > 0 and methods["hf-generate-batch"]["vs_one_by_one"] is None
    assert data["environment"]["load_average_start"] is not None


def test_cli_bench_batch_exits_1_on_a_mismatch(bundle_dir, data_file, tmp_path, monkeypatch):
    """A batch row that leaves its single-request output (not at a tie) fails the command, naming arm and prompt."""
    import ctxdraft.selfdraft.commands.bench_batch as bench_batch_module

    generate_batch = bench_batch_module.generate_batch

    def off_by_one(self, prompts, **kwargs):
        results = generate_batch(self, prompts, **kwargs)
        if ROWS[1]["prompt"] in prompts:
            row = results[prompts.index(ROWS[1]["prompt"])]
            row.token_ids = [(row.token_ids[0] + 1) % self.target.vocab_size] + row.token_ids[1:]
        return results

    monkeypatch.setattr(bench_batch_module, "generate_batch", off_by_one)
    out = tmp_path / "out"
    r = invoke(bundle_dir, data_file, out, "--batch", "3", "--arms", "none", "--tie-tolerance", "0")
    assert r.exit_code == 1, r.output
    assert "MISMATCH: 1 batch row(s)" in r.output and "none batch on p2 (token 0)" in r.output
    assert json.loads((out / "bench_batch.json").read_text())["ok"] is False  # the report is still written

    monkeypatch.setattr(bench_batch_module, "compare_greedy",
                        lambda stack, ids, a, b, *rest: Divergence("identical") if a == b else Divergence("tie", 0, 1e-4))
    r = invoke(bundle_dir, data_file, out, "--batch", "3", "--arms", "none")
    assert r.exit_code == 0, r.output
    assert "1 diverged at a near-tie" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--batch", "0"], "--batch must be an integer >= 1"),
    (["--batch", "2", "--temperature", "0.5"], "drop --temperature"),
    (["--batch", "2", "--arms", "nope"], "unknown arm 'nope'"),
    (["--batch", "2", "--arms", "auto"], "auto needs a bundle with a policy"),
])
def test_cli_bench_batch_bad_input(bundle_dir, data_file, tmp_path, args, needle):
    r = invoke(bundle_dir, data_file, tmp_path / "out", *args)
    assert_clean_error(r, needle)


@pytest.mark.integration
def test_real_model_bf16_batch_rows_equal_single_requests():
    """SmolLM2 in bfloat16, 4 held-out-like prompts of different lengths decoded together: every row equals its
    single-request output or parts from it at a near-tie (a packing or masking bug gives a MISMATCH)."""
    from ctxdraft.selfdraft import load_bundle
    from ctxdraft.selfdraft.commands.bench_batch import run_batch_bench
    from ctxdraft.selfdraft.commands.bench_runs import BenchConfig

    bundle = load_bundle(dtype="bfloat16", calibrate=False)
    rows = [{"id": str(i), "prompt": p} for i, p in enumerate([
        "Explain recursion to a child.", "Write a Python function that reverses a linked list, with comments.",
        "Translate to French: the cat sat on the mat because it was warm in the sun.", "What is 17*23?"])]
    report = run_batch_bench(bundle, rows, BenchConfig(max_new_tokens=24, arms=["none", "lookup"], warmup=False), 4)
    assert report.ok, report.status_line()
    assert len(report.checks) == 8
