"""The one place that picks Triton or the torch reference, the input checks every verify entry point shares,
the result types' derived fields and the launch shapes."""
from __future__ import annotations

import importlib

import pytest
import torch

from ctxdraft.triton_kernels import dispatch
from ctxdraft.triton_kernels.dispatch import (
    MAX_BLOCK_V,
    TreeVerifyResult,
    VerifyResult,
    check_tree_inputs,
    check_verify_inputs,
    launch_shape,
    target_argmax,
    use_triton,
)

# The package exports the function under the module's name, so reach the module itself through importlib.
verify_greedy_module = importlib.import_module("ctxdraft.triton_kernels.verify_greedy")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_auto_is_the_reference_on_cpu_and_triton_on_cuda():
    assert not use_triton("auto", CPU)
    assert use_triton("auto", CUDA) == (dispatch.triton is not None)
    assert not use_triton("torch", CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_target_argmax_is_torchs_argmax_with_first_index_ties(dtype):
    logits = torch.randn(2, 5, 3000, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, 1, [7, 9, 2000]] = 50.0  # a three-way tie at the top: the first index wins
    logits[1, 2, [11, 12]] = -torch.finfo(dtype).max  # a row's top is unaffected by the floor values
    logits[1, 3] = 1.0  # a flat position: index 0
    ids = target_argmax(logits)
    assert ids.dtype == torch.long and ids.shape == (2, 5)
    assert torch.equal(ids, logits.argmax(dim=-1))
    assert ids[0, 1] == 7 and ids[1, 3] == 0


def test_auto_on_cpu_really_runs_the_reference(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the Triton path ran on CPU tensors")

    monkeypatch.setattr(verify_greedy_module, "verify_greedy_triton", no_kernel)
    logits = torch.zeros(1, 3, 5)
    logits[0, :, 4] = 1.0  # the target's argmax is 4 everywhere
    result = verify_greedy_module.verify_greedy(logits, torch.tensor([[4, 1]]), torch.tensor([2]), impl="auto")
    assert result.out_ids.tolist() == [[4, 4, -1]] and result.num_accepted.tolist() == [1]


@pytest.mark.parametrize("impl", ["cuda", "Triton", "", "reference"])
def test_an_unknown_impl_is_a_value_error(impl):
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'torch', 'triton'\)"):
        use_triton(impl, CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if dispatch.triton is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert use_triton("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|needs the triton package"):
        use_triton("triton", CPU)


def test_triton_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton", None)
    assert not use_triton("auto", CUDA)  # auto falls back to the reference
    with pytest.raises(RuntimeError, match="needs the triton package"):
        use_triton("triton", CUDA)


def inputs(B=2, K=3, V=7):
    return torch.randn(B, K + 1, V), torch.zeros(B, K, dtype=torch.long), torch.full((B,), K)


def test_good_inputs_pass():
    check_verify_inputs(*inputs())
    check_verify_inputs(*inputs(K=0))  # an empty draft
    check_verify_inputs(*inputs(V=1))
    logits, ids, num = inputs()
    check_verify_inputs(logits.bfloat16(), ids.int(), num.int())


def replace(index, value):
    args = list(inputs())
    args[index] = value
    return args


@pytest.mark.parametrize("args, error, message", [
    (replace(0, torch.randn(2, 4)), ValueError, r"target_logits must be \[B, K\+1, V\], got shape \(2, 4\)"),
    (replace(0, torch.randn(2, 4, 0)), ValueError, "at least one token"),
    (replace(0, torch.zeros(2, 4, 7, dtype=torch.long)), TypeError, "floating point, got torch.int64"),
    (replace(1, torch.zeros(2, 4, dtype=torch.long)), ValueError,
     r"draft_ids must be \[B, K\] = \(2, 3\), got \(2, 4\)"),
    (replace(1, torch.zeros(3, 3, dtype=torch.long)), ValueError, "draft_ids must be"),
    (replace(2, torch.full((2, 1), 3)), ValueError, r"num_draft must be \[B\] = \(2,\), got \(2, 1\)"),
    (replace(1, torch.zeros(2, 3)), TypeError, "must be integer tensors"),
    (replace(2, torch.full((2,), 3.0)), TypeError, "must be integer tensors"),
    (replace(1, torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "on one device"),
    (replace(0, torch.randn(2, 4, 7, device="meta")), ValueError, "on one device"),
])
def test_bad_inputs_raise_naming_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        check_verify_inputs(*args)


def test_tree_checks_name_the_tree_arguments():
    logits = torch.randn(2, 5, 7)
    ids, parents, num = torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -1), torch.tensor([4, 2])
    check_tree_inputs(logits, ids, parents, num)
    with pytest.raises(ValueError, match=r"tree_ids must be \[B, N\]"):
        check_tree_inputs(logits, ids[:, :3], parents[:, :3], num)
    with pytest.raises(ValueError, match=r"num_nodes must be \[B\]"):
        check_tree_inputs(logits, ids, parents, num[:1])
    with pytest.raises(ValueError, match=r"parents must be \[B, N\] = \(2, 4\)"):
        check_tree_inputs(logits, ids, parents[:, :3], num)
    with pytest.raises(TypeError, match="parents must be an integer tensor"):
        check_tree_inputs(logits, ids, parents.float(), num)
    with pytest.raises(ValueError, match="on one device"):
        check_tree_inputs(logits, ids, parents.to("meta"), num)


def test_result_fields_derived_from_the_accepted_counts():
    result = VerifyResult(torch.tensor([[5, -1, -1, -1], [3, 4, 9, -1], [1, 2, 3, 8]]), torch.tensor([0, 2, 3]))
    assert result.accepted_mask.tolist() == [[False] * 3, [True, True, False], [True] * 3]
    assert result.num_emitted.tolist() == [1, 3, 4]  # accepted + one correction or bonus token
    empty = VerifyResult(torch.tensor([[7]]), torch.tensor([0]))  # K = 0
    assert empty.accepted_mask.shape == (1, 0) and empty.num_emitted.tolist() == [1]
    tree = TreeVerifyResult(torch.tensor([[4, 6, -1]]), torch.tensor([[0, -1]]), torch.tensor([1]))
    assert tree.num_emitted.tolist() == [2]


@pytest.mark.skipif(dispatch.triton is None, reason="launch shapes use triton.next_power_of_2")
@pytest.mark.parametrize("num_rows, V, device, expected", [
    (3, 100, CPU, (4, 128, 4)),  # a power of two covering V; rows up to the next power of two
    (1, 1, CPU, (1, 1, 4)),
    (100, 100, CUDA, (32, 128, 8)),  # a GPU program holds 4096 values
    (2, 49152, CUDA, (1, MAX_BLOCK_V, 8)),  # a real vocabulary is tiled
    (2, MAX_BLOCK_V + 1, CPU, (2, MAX_BLOCK_V, 8)),
    (1000, 61, CPU, (1024, 64, 8)),  # the interpreter takes up to 2**18 values per program
])
def test_launch_shapes(num_rows, V, device, expected):
    BLOCK_R, BLOCK_V, num_warps = launch_shape(num_rows, V, device)
    assert (BLOCK_R, BLOCK_V, num_warps) == expected
    assert BLOCK_R * BLOCK_V <= (4096 if device.type == "cuda" else 2**18)
