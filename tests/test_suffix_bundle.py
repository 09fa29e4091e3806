"""The suffix arm in a bundle: add-arm --data builds the datastore, logged requests grow it, collect and
train-policy cover the arm, update-policy merges the log (tiny model)."""
from __future__ import annotations

import json

from click.testing import CliRunner
from test_traffic import PROMPTS

from ctxdraft.cli.main import main as cli
from ctxdraft.selfdraft.base.datastore import log_path, read_datastore
from ctxdraft.selfdraft.base.layout import DATASTORE_FILE
from ctxdraft.selfdraft.commands.collect import CollectConfig
from ctxdraft.selfdraft.commands.train_policy import train_policy
from ctxdraft.selfdraft.commands.update_policy import update_policy_at
from ctxdraft.selfdraft.learning.policy import PolicyConfig
from ctxdraft.selfdraft.serving.bundle import load_bundle


def documents(bundle_dir):
    bundle = load_bundle(bundle_dir)
    t = bundle.target
    return [d.tolist() for d in read_datastore(bundle_dir / DATASTORE_FILE, t.content_hash, t.vocab_size).documents()]


def test_suffix_arm_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "domain": "ab"[i % 2], "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // 8)})
                            + "\n" for i in range(8)))
    path = tmp_path / "bundle"
    runner = CliRunner()
    for args in (["--kind", "none"], ["--kind", "lookup", "--draft-len", "3"],
                 ["--kind", "suffix", "--name", "suffix", "--draft-len", "6", "--data", str(data), "--max-new-tokens", "10"]):
        result = runner.invoke(cli, ["add-arm", str(path), "--target", str(tiny_model_dir), *args])
        assert result.exit_code == 0, result.output
    assert "datastore:" in result.output
    built = documents(path)
    assert len(built) == 8 and all(0 < len(d) <= 10 for d in built)

    # --data without --kind suffix, and a corrupt datastore: one clear error each
    result = runner.invoke(cli, ["add-arm", str(path), "--kind", "lookup", "--data", str(data)])
    assert result.exit_code == 2 and "Error:" in result.output and "--kind suffix" in result.output

    # collect and train-policy cover the arm (its replay is checked against its trajectory's cost key)
    train_policy(load_bundle(path, calibrate=False), data=data,
                 collect_config=CollectConfig(max_new_tokens=8, profile_reps=1), config=PolicyConfig(epochs=2))
    rows = [json.loads(line) for line in (path / "rewards.jsonl").read_text().splitlines()]
    assert all("suffix" in row["arms"] for row in rows)
    assert any(row["arms"]["suffix"]["accepted_tokens"] > 0 for row in rows)  # the datastore holds these continuations

    # logged requests: outputs join the datastore in memory (the next request sees them) and in its log
    traffic = tmp_path / "traffic.jsonl"
    bundle = load_bundle(path, calibrate=False, log=traffic, explore=1.0)
    plain = bundle.generate("a brand new prompt", draft="none", max_new_tokens=12).token_ids
    again = bundle.generate("a brand new prompt", draft="suffix", max_new_tokens=12)
    assert again.token_ids == plain and again.stats.accepted_tokens >= 8  # the earlier identical output was drafted
    assert bundle.draft("suffix").hits.get("datastore", 0) > 0
    for p in PROMPTS[:4]:
        bundle.generate(p, max_new_tokens=6)
    logged = log_path(path / DATASTORE_FILE).read_text().splitlines()
    assert len(logged) == 1 + 6
    assert len(documents(path)) == 8 + 6  # sealed file + its log
    rows = [json.loads(line) for line in traffic.read_text().splitlines()]
    assert any("suffix_hits" in r["measurement"] for r in rows) or all(r["arm"] != "suffix" for r in rows)

    # update-policy folds the log into the sealed file and starts a new log
    result = update_policy_at(path, [traffic], force=True)
    assert result.report["datastore"]["documents"] == 14
    assert len(log_path(path / DATASTORE_FILE).read_text().splitlines()) == 1
    assert len(documents(path)) == 14

    # a corrupt datastore: one clear error, before any generating
    (path / DATASTORE_FILE).write_bytes(b"garbage")
    result = runner.invoke(cli, ["generate", "--bundle", str(path), "--draft", "suffix", "hello"])
    assert result.exit_code == 2 and "datastore" in result.output and "Traceback" not in result.output
