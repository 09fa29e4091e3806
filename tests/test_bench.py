"""The bench on tiny random models: every method present, greedy equality checked, mismatches reported, CLI."""
from __future__ import annotations

import itertools
import json
import runpy
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_clean_error
from click.testing import CliRunner

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import write_json_atomic
from ctxdraft.selfdraft.commands.bench import (
    ORACLE,
    REFERENCE,
    BenchConfig,
    Method,
    RunOutput,
    best_exit_layer,
    hf_generate,
    run_bench,
    select_prompts,
)
from ctxdraft.selfdraft.commands.bench_report import bench_markdown, write_bench_outputs
from ctxdraft.selfdraft.drafting.ties import Divergence
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import Bundle, load_bundle
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info

ROWS = [
    {"id": "p1", "domain": "qa", "prompt": "the cat sat on the mat. the cat sat"},
    {"id": "p2", "domain": "math", "prompt": "1+1=2, 2+2=4, 3+3="},
    {"id": "p3", "domain": "qa", "prompt": "hello world"},
]
EXIT_LAYER = 2


def _tokens_policy(bundle_dir, info):
    """A small untrained tokens policy over the bundle's arms, exported to bundle_dir/policy.onnx."""
    pytest.importorskip("onnxruntime")
    from ctxdraft.export import export_policy
    from ctxdraft.selfdraft.learning.policy import PolicyConfig, build_policy, feature_spec
    from ctxdraft.selfdraft.learning.rewards import rewards_from_rows

    rows = [{"id": i, "domain": "all", "prompt_len": 3, "features": {"tokens": [3 + i, 4, 5]},
             "arms": {a["name"]: {"speedup": 1.0 + 0.1 * j * (i % 2)} for j, a in enumerate(info["arms"])}} for i in range(6)]
    data = rewards_from_rows(rows)
    torch.manual_seed(0)
    policy = build_policy(data, list(range(len(rows))), PolicyConfig(feature_kind="tokens", hidden_sizes=(8,))).eval()
    spec = feature_spec(policy)
    export_policy(policy, bundle_dir / "policy.onnx", info["arms"], spec, info["target"], "0.1.0")
    return spec




def greedy_ids(bundle, prompt: str, n: int) -> list[int]:
    """The target's greedy continuation of ``prompt`` by HF generate, cut before its first EOS."""
    ids = torch.tensor([bundle.target.encode(prompt)])
    out = bundle.target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                       eos_token_id=sorted(bundle.target.eos_ids))[0, ids.shape[1]:].tolist()
    return list(itertools.takewhile(lambda t: t not in bundle.target.eos_ids, out))


@pytest.fixture(scope="module")
def bundle_dir(tiny_model_dir, tmp_path_factory):
    """A tiny bundle with the base arms, a recorded exit layer (for HF's early exit) and a policy."""
    path = tmp_path_factory.mktemp("bench") / "bundle"
    path.mkdir()
    info = new_bundle_info(load_target(tiny_model_dir), str(tiny_model_dir))
    info["exits"] = [{"layer": 1, "agreement": 0.9, "speedup": 0.8}, {"layer": EXIT_LAYER, "agreement": 0.5, "speedup": 1.2}]
    info["features"] = _tokens_policy(path, info)
    info["policy"] = "policy.onnx"
    write_json_atomic(path / "bundle.json", info)
    return path


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def greedy_report(bundle):
    return run_bench(bundle, ROWS, BenchConfig(max_new_tokens=12, repeats=2))


def test_greedy_every_method_present_and_identical(greedy_report, bundle):
    report = greedy_report
    names = [m["name"] for m in report.methods]
    assert names == [REFERENCE, "hf-lookup", f"hf-early-exit@{EXIT_LAYER}", *bundle.arms, "auto", ORACLE]
    assert {"none", "lookup"} <= set(bundle.arms)
    assert report.ok and report.mismatches == [] and "identical" in report.status_line()
    assert len(report.results) == len(ROWS) * len(names)
    assert all(r.matches for r in report.results)
    assert all(len(r.seconds_all) == 2 for r in report.results if r.method != ORACLE)
    assert report.domains == ["qa", "math"]
    # Every method produced the reference's tokens, so every method has the same token count per prompt.
    for prompt_id in ("p1", "p2", "p3"):
        counts = {r.new_tokens for r in report.results if r.prompt_id == prompt_id}
        assert len(counts) == 1 and counts.pop() > 0
    auto = [r for r in report.results if r.method == "auto"]
    assert all(r.arm in bundle.arms for r in auto)


def test_summary_numbers(greedy_report, bundle):
    report = greedy_report
    overall = {s.method: s for s in report.summary["overall"]}
    assert overall[REFERENCE].speedup == pytest.approx(1.0) and overall[REFERENCE].median_speedup == pytest.approx(1.0)
    # Every method's tokens are the target's own greedy continuations, counted here with HF generate directly;
    # its time is the sum over prompts of the median over repeats; tokens/s is total tokens over total time.
    expected_tokens = sum(len(greedy_ids(bundle, row["prompt"], 12)) for row in ROWS)
    for s in overall.values():
        assert s.num_prompts == len(ROWS) and s.tokens_per_s > 0 and s.mismatches == 0
        seconds = sum(statistics.median(r.seconds_all) for r in report.results if r.method == s.method)
        assert s.new_tokens == expected_tokens and s.seconds == pytest.approx(seconds)
        assert s.tokens_per_s == pytest.approx(expected_tokens / seconds)
    # Target forwards are counted for HF methods too; `none` and plain generate take one forward per token.
    assert overall[REFERENCE].tokens_per_forward == pytest.approx(overall["none"].tokens_per_forward)
    assert overall["lookup"].tokens_per_forward >= 1.0 and overall["hf-lookup"].tokens_per_forward >= 1.0
    # The oracle is, prompt by prompt, the fastest of the arms (auto excluded).
    for prompt_id in ("p1", "p2", "p3"):
        arms = [r for r in report.results if r.prompt_id == prompt_id and r.method in bundle.arms]
        oracle = next(r for r in report.results if r.prompt_id == prompt_id and r.method == ORACLE)
        assert len(arms) == len(bundle.arms)
        assert oracle.tokens_per_s == max(r.tokens_per_s for r in arms) and oracle.arm in bundle.arms
    assert sum(overall[ORACLE].arms_chosen.values()) == len(ROWS)
    assert set(report.summary) == {"qa", "math", "overall"}
    assert {s.num_prompts for s in report.summary["qa"]} == {2}


def test_outputs_written(greedy_report, tmp_path):
    written = write_bench_outputs(greedy_report, tmp_path / "out")
    assert set(written) == {"json", "md", "png"}
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["ok"] is True and data["num_mismatches"] == 0
    assert {m["name"] for m in data["methods"]} >= {REFERENCE, "auto", ORACLE}
    assert data["environment"]["cpu_count"] >= 1 and data["config"]["max_new_tokens"] == 12
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| hf-lookup |" in md and "| oracle |" in md and "MISMATCH" not in md
    assert (tmp_path / "out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_broken_method_is_reported(bundle):
    def off_by_one(prompt, config):
        out = hf_generate(bundle, prompt, config)
        if prompt.id == "p2" and out.token_ids:
            out.token_ids[-1] = (out.token_ids[-1] + 1) % bundle.target.vocab_size
        return RunOutput(out.token_ids, out.seconds)

    report = run_bench(bundle, ROWS, BenchConfig(max_new_tokens=8, arms=["lookup"], baselines="none"),
                       extra_methods=[Method("broken", "hf", off_by_one)])
    assert [m["name"] for m in report.methods] == [REFERENCE, "lookup", "broken", ORACLE]
    assert not report.ok
    assert [(m.method, m.prompt_id, m.first_diff) for m in report.mismatches] == [("broken", "p2", 7)]
    assert report.status_line().startswith("MISMATCH: 1 greedy output")
    assert "broken on p2" in report.status_line()
    broken = next(s for s in report.summary["overall"] if s.method == "broken")
    assert broken.mismatches == 1 and broken.tokens_per_forward is None
    assert "MISMATCH: broken on prompt p2" in bench_markdown(report)
    assert report.to_dict()["mismatches"][0]["method"] == "broken"


def test_sampling_runs_without_equality_check(bundle):
    report = run_bench(bundle, ROWS[:2], BenchConfig(max_new_tokens=8, temperature=0.8, seed=3, arms=["lookup", "auto"]))
    assert report.config["greedy"] is False and report.ok
    assert all(r.matches is None for r in report.results)
    assert "not compared" in report.status_line()
    # Seeded: a second run samples the same tokens.
    again = run_bench(bundle, ROWS[:2], BenchConfig(max_new_tokens=8, temperature=0.8, seed=3, arms=["lookup", "auto"]))
    assert [r.new_tokens for r in report.results] == [r.new_tokens for r in again.results]


def test_duplicate_prompt_ids_are_refused(bundle):
    with pytest.raises(CtxdraftError, match="prompt ids must be unique"):
        run_bench(bundle, [ROWS[0], dict(ROWS[1], id="p1")], BenchConfig(max_new_tokens=4))


def test_best_exit_layer():
    assert best_exit_layer({"exits": []}) is None
    assert best_exit_layer({}) is None
    assert best_exit_layer({"exits": [{"layer": 4, "speedup": 1.1}, {"layer": 9, "speedup": 1.4}, {"layer": 12, "speedup": 1.3}]}) == 9
    assert best_exit_layer({"exits": [{"layer": 4, "agreement": 0.3}, {"layer": 9, "agreement": 0.6}]}) == 9


def _rows(domains):
    return [{"id": i, "domain": d, "prompt": f"prompt {i}"} for i, d in enumerate(domains)]


def test_select_prompts_split_and_per_domain():
    rows = _rows(["a", "a", "a", "b", "b", "c"])
    bundle = Bundle(None, {"arms": []})
    kept, notes = select_prompts(rows, bundle, "eval", 2)
    assert [r["id"] for r in kept] == [0, 1, 3, 4, 5]
    assert "records no training prompts" in notes[0]
    # Ids trained on by any command are left out, whether stored as str or int.
    bundle.info["trained_on"] = {"add-exits": ["0", 3], "train-policy": [0]}
    kept, notes = select_prompts(rows, bundle, "eval", 1)
    assert [r["id"] for r in kept] == [1, 4, 5] and "4 of 6 prompts the bundle did not train on" in notes[0]
    kept, _ = select_prompts(rows, bundle, "all", None)
    assert len(kept) == 6
    bundle.info["trained_on"] = {"train-policy": [0, 1, 2, 3, 4, 5]}
    with pytest.raises(CtxdraftError, match="every prompt of the data file was used to train"):
        select_prompts(rows, bundle, "eval")
    with pytest.raises(CtxdraftError, match="per-domain must be >= 1"):
        select_prompts(rows, bundle, "all", 0)

# -- CLI ------------------------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(main, ["bench", *args])


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_cli_bench(bundle_dir, data_file, tmp_path):
    out = tmp_path / "out"
    r = invoke("--bundle", str(bundle_dir), "--data", str(data_file), "--per-domain", "1", "--max-new-tokens", "6",
               "--arms", "none,lookup", "--baselines", "none", "--split", "all", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "identical to HF generate" in r.output and "| lookup |" in r.output and "| auto |" not in r.output
    assert "first 1 prompts of each domain" in r.output
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    data = json.loads((out / "bench.json").read_text())
    assert [p["id"] for p in data["prompts"]] == ["p1", "p2"]

    r = invoke("--bundle", str(bundle_dir), "--data", str(data_file), "--max-new-tokens", "4", "--arms", "lookup",
               "--baselines", "none", "--out", str(out), "--threads", "2", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["ok"] is True and [m["name"] for m in data["methods"]] == [REFERENCE, "lookup", ORACLE]
    assert any("records no training prompts" in n for n in data["notes"])
    assert data["environment"]["torch_threads"] == 2 and torch.get_num_threads() == 1  # set for the bench only


def test_bench_bundles_runs_the_other_bundles_arms_beside_the_first(bundle_dir, data_file, tmp_path, monkeypatch):
    """benchmarks/bench_bundles.py: B's arm is one more method on every prompt, checked for equality like the rest,
    and kept out of the oracle over A's arms (a B arm dropped, run on A, or counted as A's would fail this)."""
    other = tmp_path / "other"
    shutil.copytree(bundle_dir, other)
    out = tmp_path / "two"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_bundles.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--bundle", str(bundle_dir), "--other", str(other), "--other-arms",
                                      "lookup", "--data", str(data_file), "--per-domain", "1", "--arms", "none",
                                      "--baselines", "none", "--max-new-tokens", "4", "--dtype", "float32",
                                      "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    data = json.loads((out / "bench.json").read_text())
    assert [(m["name"], m["family"]) for m in data["methods"]] == [
        (REFERENCE, "hf"), ("none", "ctxdraft"), ("B:lookup", "other"), (ORACLE, "oracle")]
    per_method = {}
    for r in data["results"]:
        per_method.setdefault(r["method"], []).append(r)
    assert len(per_method["B:lookup"]) == len(per_method["none"]) == 2 and data["ok"] is True
    assert all(r["arm"] == "lookup" for r in per_method["B:lookup"])
    assert [r["arm"] for r in per_method[ORACLE]] == ["none", "none"]

    argv = sys.argv[:]
    for flag, value, needle in [("--other", str(tmp_path / "nope"), "nope"), ("--other-arms", "nope", "nope")]:
        monkeypatch.setattr(sys, "argv", argv[:argv.index(flag) + 1] + [value] + argv[argv.index(flag) + 2:])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
        assert str(exit_info.value.code).startswith("error: ") and needle in str(exit_info.value.code)


def test_cli_bench_exits_1_on_a_mismatch(bundle_dir, data_file, tmp_path, monkeypatch):
    """A greedy output that differs from hf-generate's (not a tie) fails the command, naming the method and prompt."""
    import ctxdraft.selfdraft.commands.bench as bench_module

    build = bench_module.build_methods

    def with_broken_method(bundle, config):
        methods, notes = build(bundle, config)

        def wrong_tokens(prompt, c):
            out = hf_generate(bundle, prompt, c)
            if prompt.id == "p2":
                out.token_ids[0] = (out.token_ids[0] + 1) % bundle.target.vocab_size
            return RunOutput(out.token_ids, out.seconds)

        return methods + [Method("broken", "hf", wrong_tokens)], notes

    monkeypatch.setattr(bench_module, "build_methods", with_broken_method)
    out = tmp_path / "out"
    args = ["--bundle", str(bundle_dir), "--data", str(data_file), "--max-new-tokens", "4", "--arms", "lookup",
            "--baselines", "none", "--split", "all", "--out", str(out)]
    r = invoke(*args, "--tie-tolerance", "0")
    assert r.exit_code == 1, r.output
    assert "MISMATCH: 1 greedy output" in r.output and "broken on p2" in r.output
    assert json.loads((out / "bench.json").read_text())["ok"] is False  # the report is still written

    # The same divergence judged a near-tie of the target's best logits is legitimate: exit code 0.
    monkeypatch.setattr(bench_module, "compare_greedy", lambda *a: Divergence("tie", 0, 1e-4, 1, 2))
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "1 diverged at a near-tie" in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data", "MISSING"], "data file not found"),
        (["--per-domain", "0"], "--per-domain must be >= 1"),
        (["--arms", "lookup,nope"], "unknown arm 'nope'"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--repeats", "0"], "repeats must be >= 1"),
        (["--threads", "0"], "threads must be >= 1"),
    ],
)
def test_cli_bad_input(bundle_dir, data_file, tmp_path, args, needle):
    base = ["--bundle", str(bundle_dir), "--out", str(tmp_path / "out")]
    if "--data" not in args:
        base += ["--data", str(data_file)]
    else:
        args = ["--data", str(tmp_path / "missing.jsonl")]
    r = invoke(*base, *args)
    assert_clean_error(r, needle)
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out").exists()


def test_hf_assisted_generation_is_the_peer_of_a_model_arm(tiny_model_dir, tmp_path):
    from ctxdraft.selfdraft.drafting.pool import model_arm

    info = new_bundle_info(load_target(tiny_model_dir), str(tiny_model_dir))
    info["arms"] = info["arms"][:1] + [model_arm(str(tiny_model_dir), 3, name="model:self-k3")]
    info["default_arm"] = "none"
    write_json_atomic(tmp_path / "b" / "bundle.json", info)
    bundle = load_bundle(tmp_path / "b")
    report = run_bench(bundle, ROWS[:2], BenchConfig(max_new_tokens=8))
    names = [m["name"] for m in report.methods]
    assert "hf-assisted" in names and report.ok  # the target as its own assistant: identical greedy output
    assisted = [r for r in report.results if r.method == "hf-assisted"]
    assert all(r.matches for r in assisted)
    assert any("hf-assisted: HF assisted generation with the draft model of model:self-k3" in n for n in report.notes)


def test_lookup_baselines_leave_out_hf_early_exit(bundle):
    from ctxdraft.selfdraft.commands.bench import build_methods

    names = [m.name for m in build_methods(bundle, BenchConfig(max_new_tokens=4, baselines="lookup"))[0]]
    assert names[:2] == [REFERENCE, "hf-lookup"] and not any(n.startswith("hf-early-exit") for n in names)
    assert [m.name for m in build_methods(bundle, BenchConfig(max_new_tokens=4, baselines="none"))[0]][:2] == [REFERENCE, "none"]
