"""The exit head and its weights file: save/load round trips (full and reduced vocabulary, linear and layer),
the file keeps other layers' heads and never the shared LM head, and bad files are one clear error."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import tiny_random

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.exit_head import ExitHead, load_head, save_heads

V = 61
VOCAB_IDS = torch.tensor([0, 3, 7, 8, 20, 33, 60])


@pytest.fixture(scope="module")
def model():
    return tiny_random(vocab_size=V)


def trained(model, exit_layer, kind, vocab_ids=None, seed=0) -> ExitHead:
    """A head whose weights differ from a fresh one's, so that a load that silently kept the init is caught."""
    head = ExitHead(model, exit_layer, kind, vocab_ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return head.eval()


def hidden(seed=1, T=6):
    return torch.randn(1, T, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["linear", "layer"])
@pytest.mark.parametrize("vocab_ids", [None, VOCAB_IDS], ids=["full", "reduced"])
def test_save_load_round_trip(model, tmp_path, kind, vocab_ids):
    head = trained(model, 2, kind, vocab_ids)
    path = tmp_path / "exits.safetensors"
    save_heads(path, [head])
    loaded = load_head(model, path, 2, kind)
    assert loaded.draft_vocab == (None if vocab_ids is None else len(VOCAB_IDS))
    if vocab_ids is not None:
        assert torch.equal(loaded.vocab_ids, VOCAB_IDS)
        assert torch.equal(loaded.to_full_ids(torch.tensor([0, 6])), torch.tensor([0, 60]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden()), head(hidden()), rtol=0, atol=0)
        assert not torch.allclose(loaded(hidden()), ExitHead(model, 2, kind, vocab_ids)(hidden()))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("kind", ["linear", "layer"])
def test_a_reduced_head_is_the_full_head_restricted_to_its_ids(model, kind):
    full = trained(model, 1, kind)
    reduced = ExitHead(model, 1, kind, VOCAB_IDS)
    reduced.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reduced(hidden()), full(hidden())[..., VOCAB_IDS])


def test_the_file_holds_each_layer_once_and_never_the_lm_head(model, tmp_path):
    path = tmp_path / "exits.safetensors"
    save_heads(path, [trained(model, 1, "linear", seed=1)])
    newer_at_1 = trained(model, 1, "linear", seed=2)
    at_3 = trained(model, 3, "layer", VOCAB_IDS, seed=3)
    save_heads(path, [newer_at_1, at_3])  # extends the file; the head at layer 1 is replaced
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys if not k.endswith("vocab_ids")}
    assert {k.split(".")[0] for k in keys} == {"exit1", "exit3"}
    assert not any("lm_weight" in k or "embed" in k for k in keys)  # the target's LM head is shared, not copied
    assert dtypes == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(load_head(model, path, 1, "linear")(hidden()), newer_at_1(hidden()), rtol=0, atol=0)
        torch.testing.assert_close(load_head(model, path, 3, "layer")(hidden()), at_3(hidden()), rtol=0, atol=0)


def test_a_bfloat16_head_is_saved_in_float32_and_loads(model, tmp_path):
    head = trained(model, 2, "linear").to(torch.bfloat16)
    path = tmp_path / "exits.safetensors"
    save_heads(path, [head])
    loaded = load_head(model, path, 2, "linear")
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.adapter.weight, head.adapter.weight.float(), rtol=0, atol=0)


def test_bad_files_and_kinds_are_clear_errors(model, tmp_path):
    path = tmp_path / "exits.safetensors"
    with pytest.raises(CtxdraftError, match="self-draft weights not found"):
        load_head(model, path, 2, "linear")
    save_heads(path, [trained(model, 2, "linear")])
    with pytest.raises(CtxdraftError, match="has no weights for the exit at layer 3"):
        load_head(model, path, 3, "linear")
    with pytest.raises(CtxdraftError, match="the exit at layer 2 does not fit this target"):
        load_head(model, path, 2, "layer")  # a linear head's tensors are not a layer head's
    with pytest.raises(CtxdraftError, match="does not fit this target"):
        load_head(wider_target(), path, 2, "linear")
    with pytest.raises(CtxdraftError, match="unknown exit head kind 'mlp'"):
        ExitHead(model, 2, "mlp")
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CtxdraftError, match="are damaged"):
        load_head(model, path, 2, "linear")


def wider_target():
    """A target of another width: the saved D x D adapter does not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("bad_ids", [torch.tensor([0, V]), torch.tensor([-1, 3]), torch.tensor([[1, 2]]),
                                     torch.tensor([0.0, 1.0]), torch.tensor([], dtype=torch.long)])
def test_a_draft_vocabulary_outside_the_target_is_refused(model, tmp_path, bad_ids):
    path = tmp_path / "exits.safetensors"
    save_heads(path, [trained(model, 2, "linear", VOCAB_IDS)])
    tensors = load_file(str(path))
    tensors["exit2.vocab_ids"] = bad_ids
    save_file(tensors, str(path))
    with pytest.raises(CtxdraftError, match="draft vocabulary of the exit at layer 2 holds ids outside 0..60"):
        load_head(model, path, 2, "linear")
