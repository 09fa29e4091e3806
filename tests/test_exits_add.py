"""`ctxdraft add-exits` end to end on a tiny target: builds and extends bundles, refuses bad input, resumes."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny import save_word_target, write_word_prompts

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.commands.add_exits import rows_of_domains
from ctxdraft.selfdraft.drafting.pool import build_draft
from ctxdraft.selfdraft.serving.bundle import load_bundle

FAST = ["--steps", "3", "--self-distill-tokens", "6", "--eval-frac", "0.25"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    model_dir = save_word_target(root / "model")
    data = write_word_prompts(root / "data.jsonl")
    return root, model_dir, data


def test_add_exits_cli_builds_and_extends_a_bundle(tiny_setup):
    root, model_dir, data = tiny_setup
    out = root / "bundle"
    runner = CliRunner()
    result = runner.invoke(main, ["add-exits", str(model_dir), "--layers", "1,2", "--data", str(data), "--out", str(out), "--json", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [e["layer"] for e in report["exits"]] == [1, 2]
    for e in report["exits"]:
        assert e["num_params"] == 32 * 32 + 32
        assert 0 <= e["agreement"] <= 1 and e["cost_ratio"] > 0 and e["speedup"] > 0 and e["draft_len"] >= 1
    assert (out / "exits.safetensors").is_file() and (out / "reports" / "add_exits.json").is_file()
    assert not (out / ".add_exits_work").exists()

    # Adding another exit keeps the first ones; the new head kind and reduced vocab are recorded.
    result = runner.invoke(main, ["add-exits", str(model_dir), "--layers", "3", "--head", "layer", "--draft-vocab", "12",
                                  "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "exit@3" in result.output
    bundle = load_bundle(out, target=str(model_dir))
    assert [a for a in bundle.arms if a.startswith("exit@")] == ["exit@1", "exit@2", "exit@3"]
    assert "none" in bundle.arms  # the base arms stay
    assert [(e["layer"], e["head"], e["draft_vocab"]) for e in bundle.info["exits"]] == [(1, "linear", None), (2, "linear", None), (3, "layer", 12)]

    # The exit arms generate exactly what plain decoding does.
    plain = bundle.generate("the cat sat on the mat", draft="none", max_new_tokens=20, chat=False)
    for arm in ("exit@1", "exit@3"):
        assert bundle.generate("the cat sat on the mat", draft=arm, max_new_tokens=20, chat=False).token_ids == plain.token_ids
    draft = build_draft(bundle.arm_spec("exit@3"), bundle.target, out)
    assert draft.head.draft_vocab == 12


def test_add_exits_fixed_draft_len_and_threshold_become_the_arms(tiny_setup, tmp_path):
    # one candidate each: the arm gets exactly these, whatever the modelled speed-ups would have picked
    root, model_dir, data = tiny_setup
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--layers", "2", "--data", str(data), "--out", str(out),
                                       "--draft-lens", "5", "--thresholds", "0.35", "--json", *FAST])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)["exits"]
    assert [(o["draft_len"], o["threshold"]) for o in entry["all_settings"]] == [(5, 0.35)]
    settings = load_bundle(out, target=str(model_dir)).arm_spec("exit@2")["settings"]
    assert (settings["draft_len"], settings["threshold"]) == (5, 0.35)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "0"], "out of range"),
        (["--layers", "4"], "out of range"),
        (["--layers", "1,1"], "duplicates"),
        (["--layers", "x"], "comma-separated"),
        (["--layers", "1", "--eval-frac", "1.5"], "eval-frac"),
        (["--layers", "1", "--draft-lens", "0,2"], "--draft-lens"),
        (["--layers", "1", "--draft-lens", "2.5"], "comma-separated integers"),
        (["--layers", "1", "--thresholds", "0,1.5"], "--thresholds"),
        (["--layers", "1", "--thresholds", "nan"], "--thresholds"),
        (["--layers", "1", "--thresholds", "high"], "comma-separated numbers"),
    ],
)
def test_add_exits_bad_layers(tiny_setup, args, message):
    root, model_dir, data = tiny_setup
    out = root / "never"
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--data", str(data), "--out", str(out), *args])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [("", "empty"), ("{not json\n", "not valid JSON"), ('{"id": 1, "question": "hi"}\n', "prompt"), ('{"prompt": "one"}\n', "at least 2")],
)
def test_add_exits_bad_data(tiny_setup, tmp_path, content, message):
    root, model_dir, _ = tiny_setup
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


def test_rows_of_domains():
    rows = [{"id": i, "domain": d, "prompt": "p"} for i, d in enumerate(["qa", "code", "qa", "math"])]
    assert rows_of_domains(rows, None) == rows and rows_of_domains(rows, "") == rows
    assert [r["id"] for r in rows_of_domains(rows, "qa")] == [0, 2]
    assert [r["id"] for r in rows_of_domains(rows, " math, code ,")] == [1, 3]
    with pytest.raises(CtxdraftError, match="--domain chat: no prompt of the data file has that domain"):
        rows_of_domains(rows, "chat")


def test_add_exits_unknown_domain_is_a_clean_error(tiny_setup, tmp_path):
    root, model_dir, data = tiny_setup
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out),
                                       "--domain", "no-such-domain", *FAST])
    assert result.exit_code == 2 and "--domain no-such-domain: no prompt" in result.output
    assert not out.exists()


def test_add_exits_refuses_a_bundle_of_another_target(tiny_setup, tmp_path):
    root, model_dir, data = tiny_setup
    out = tmp_path / "bundle"
    runner = CliRunner()
    assert runner.invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out), *FAST]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = save_word_target(tmp_path / "other", seed=7)
    result = runner.invoke(main, ["add-exits", str(other), "--layers", "2", "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 2 and "was made for target" in result.output
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_add_exits_resume_needs_matching_checkpoint(tiny_setup, tmp_path):
    root, model_dir, data = tiny_setup
    out = tmp_path / "bundle"
    work = out / ".add_exits_work"
    work.mkdir(parents=True)
    (work / "key.json").write_text('{"key": "something-else"}')
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out), "--resume", *FAST])
    assert result.exit_code == 2 and "other data or settings" in result.output
    assert not (out / "bundle.json").exists()


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage", ["pickle", "truncated", "empty"])
def test_resume_never_unpickles_and_damaged_work_files_are_clean_errors(tiny_setup, tmp_path, damage):
    from ctxdraft.selfdraft.base.data import read_prompts
    from ctxdraft.selfdraft.commands.add_exits import WORK_DIR, add_exits
    from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig
    from ctxdraft.selfdraft.runtime.target import load_target

    root, model_dir, data = tiny_setup
    out = tmp_path / "bundle"
    config = ExitTrainConfig(layers=[1], steps=3, self_distill_tokens=6, eval_frac=0.25)

    class Stop(Exception):
        pass

    def stop_in_training(stage, done, total):
        if stage.startswith("train"):
            raise Stop

    with pytest.raises(Stop):  # killed after the data was built: the work directory holds example files
        add_exits(load_target(model_dir), str(model_dir), read_prompts(data), out, config, progress=stop_in_training)
    example = out / WORK_DIR / "train_0.safetensors"
    assert example.is_file()
    marker = tmp_path / "pwned"
    if damage == "pickle":
        torch.save({"x": _Payload(marker)}, example)
    elif damage == "truncated":
        example.write_bytes(example.read_bytes()[:50])
    else:
        example.write_bytes(b"")
    result = CliRunner().invoke(main, ["add-exits", str(model_dir), "--layers", "1", "--data", str(data), "--out", str(out),
                                       "--resume", *FAST])
    assert result.exit_code == 2 and "damaged" in result.output, result.output
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert not (out / "bundle.json").exists()
