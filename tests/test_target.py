"""target.py: dtype at load, a content hash of the stored checkpoint (the same in every dtype), no pickle."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.runtime import machine
from ctxdraft.selfdraft.runtime.cache import cache_dir, is_checkpoint
from ctxdraft.selfdraft.runtime.target import checkpoint_hash, load_target

EPYC_FLAGS = "model name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16\n"
NO_BF16_FLAGS = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f\n"


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    """A private copy of the tiny model directory (tests below edit its files)."""
    return shutil.copytree(tiny_model_dir, tmp_path / "tiny")


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the CPU flag source at a file the test writes."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(machine, "CPUINFO", path)
    return path


def _edit_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_float32_and_bfloat16_loads_share_one_content_hash(checkpoint, one_thread):
    fp32 = load_target(checkpoint, dtype="float32")
    bf16 = load_target(checkpoint, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert fp32.content_hash == bf16.content_hash == checkpoint_hash(checkpoint)
    # the bf16 weights are the fp32 ones rounded, not something else
    w32 = fp32.model.model.layers[0].mlp.up_proj.weight
    w16 = bf16.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w32.to(torch.bfloat16), w16)


def test_changing_one_stored_weight_changes_the_hash(checkpoint):
    before = checkpoint_hash(checkpoint)
    _edit_weights(checkpoint, lambda w: w["model.layers.2.self_attn.o_proj.weight"][0, 0].add_(1e-3))
    assert checkpoint_hash(checkpoint) != before


def test_storing_the_weights_in_another_dtype_changes_the_hash(checkpoint):
    before = checkpoint_hash(checkpoint)
    _edit_weights(checkpoint, lambda w: w.update({k: v.to(torch.bfloat16) for k, v in w.items()}))
    assert checkpoint_hash(checkpoint) != before


def test_the_hash_sees_config_changes_but_not_who_wrote_the_config(checkpoint):
    before = checkpoint_hash(checkpoint)
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["transformers_version"] = "0.0.1"
    config["_name_or_path"] = "/somewhere/else"
    config_path.write_text(json.dumps(config))
    assert checkpoint_hash(checkpoint) == before
    config["rope_theta"] = 1234.0
    config_path.write_text(json.dumps(config))
    assert checkpoint_hash(checkpoint) != before


def test_the_hash_does_not_depend_on_how_the_weights_are_sharded(checkpoint, tmp_path):
    weights = load_file(checkpoint / "model.safetensors")
    names = sorted(weights)
    sharded = shutil.copytree(checkpoint, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    # names interleaved across the files, so a per-file order would differ from the by-name order
    save_file({n: weights[n] for n in names[1::2]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: weights[n] for n in names[0::2]}, sharded / "model-00002-of-00002.safetensors")
    assert checkpoint_hash(sharded) == checkpoint_hash(checkpoint)


def test_a_directory_with_only_pickled_weights_is_refused_without_unpickling(checkpoint, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model.embed_tokens.weight": Payload()}, checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CtxdraftError, match="no \\*.safetensors weights; ctxdraft never loads pickled"):
        load_target(checkpoint)
    assert not marker.exists()


def test_a_damaged_weight_file_is_one_clear_error(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CtxdraftError, match="cannot read the weights in"):
        load_target(checkpoint)


def test_auto_follows_the_cpu_flags(checkpoint, cpuinfo, one_thread, monkeypatch):
    monkeypatch.delenv("CTXDRAFT_DTYPE", raising=False)  # the test suite pins float32 with it
    cpuinfo.write_text(EPYC_FLAGS)
    assert load_target(checkpoint, dtype="auto").dtype == torch.bfloat16
    cpuinfo.write_text(NO_BF16_FLAGS)
    assert load_target(checkpoint, dtype="auto").dtype == torch.float32


def test_float16_on_a_cpu_without_fp16_and_unknown_dtypes_are_refused_before_loading(cpuinfo, tmp_path):
    cpuinfo.write_text(EPYC_FLAGS)
    missing = tmp_path / "never-read"  # the dtype is checked first: no model is touched
    with pytest.raises(CtxdraftError, match="float16 needs a CPU with native fp16"):
        load_target(missing, dtype="float16")
    with pytest.raises(CtxdraftError, match="unknown dtype 'half'; choose one of: auto, bfloat16, float16, float32"):
        load_target(missing, dtype="half")


def test_an_unknown_spec_names_the_registered_targets(tmp_path):
    with pytest.raises(CtxdraftError, match="not a registered name \\(.*smollm2-135m-instruct.*\\)"):
        load_target(tmp_path / "nothing-here")


QWEN_TARGET, QWEN_DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def _require_cached(*names):
    """Run only where the real Qwen checkpoints are already cached: never download 1.6 GB in a test run."""
    missing = [n for n in names if not is_checkpoint(cache_dir() / "checkpoints" / n)]
    if missing:
        pytest.skip(f"not in the cache {cache_dir()}: {', '.join(missing)} (fetch once with load_target(name))")


@pytest.mark.qwen
def test_the_qwen_pair_shares_one_tokenizer_vocabulary():
    from transformers import AutoTokenizer

    _require_cached(QWEN_TARGET, QWEN_DRAFT)
    target_vocab, draft_vocab = (AutoTokenizer.from_pretrained(cache_dir() / "checkpoints" / n).get_vocab() for n in (QWEN_TARGET, QWEN_DRAFT))
    assert len(target_vocab) > 150_000
    assert target_vocab == draft_vocab


@pytest.mark.qwen
def test_the_qwen_target_writes_code_greedily_in_bfloat16(one_thread):
    _require_cached(QWEN_TARGET)
    target = load_target(QWEN_TARGET, dtype="bfloat16")
    assert (target.num_layers, target.vocab_size, target.dtype) == (28, 151936, torch.bfloat16)
    ids = target.encode("Write a Python function square(x) that returns x squared. Reply with code only.")
    with torch.no_grad():
        out = target.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    text = target.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "def square(x" in text


@pytest.mark.qwen
def test_the_qwen_target_drafted_by_its_small_sibling_is_lossless():
    """generate --target qwen2.5-coder-1.5b-instruct --draft model:qwen2.5-coder-0.5b-instruct, through the API:
    the same tokens as plain decoding (or a divergence at a bf16 tie of the target's best logits), and the small
    model's drafts mostly accepted."""
    from ctxdraft.selfdraft.drafting.ties import compare_greedy
    from ctxdraft.selfdraft.serving.bundle import load_bundle

    _require_cached(QWEN_TARGET, QWEN_DRAFT)
    bundle = load_bundle(target=QWEN_TARGET, dtype="bfloat16")
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    plain = bundle.generate(prompt, draft="none", max_new_tokens=24)
    drafted = bundle.generate(prompt, draft=f"model:{QWEN_DRAFT}", max_new_tokens=24)
    kind = compare_greedy(bundle.stack, plain.prompt_ids, plain.token_ids, drafted.token_ids, bundle.target.eos_ids).kind
    assert kind in ("identical", "tie")
    s = drafted.stats
    assert s.drafted_tokens > 0 and s.accepted_tokens >= 0.5 * s.drafted_tokens
    assert s.target_forwards < plain.stats.target_forwards
