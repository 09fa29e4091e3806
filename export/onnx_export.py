"""Export a trained routing policy to ONNX, so any onnxruntime binding can route without Python.

The file holds (docs/policy.md is the reference for other runtimes):
- input `features` [batch, F] float32 (hidden policies) or `token_ids` [batch, time] int64 padded
  with -1 (tokens policies); the feature normalisation / hashing is inside the graph.
- output `probs` [batch, A] float32: the policy's distribution over arms; route with argmax.
- output `arm_names` [A] string: a constant, the arm of each column of `probs`. It is a graph output
  because not every binding reads `metadata_props` (onnxruntime-node has no API for it).
- metadata_props `ctxdraft.arms`, `ctxdraft.features`, `ctxdraft.target`, `ctxdraft.version` (JSON).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.features import INPUT_NAMES
from ctxdraft.selfdraft.base.fileio import atomic_path

from .router import ARM_NAMES_OUTPUT, PROBS_OUTPUT, decode_metadata


class _ProbsGraph(nn.Module):
    """What the ONNX graph computes: the policy's logits turned into probabilities."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [B, F] or [B, T] -> [B, A]
        return torch.softmax(self.policy(inputs), dim=-1)


def normalise_arms(arms: list) -> list[dict]:
    """Arms as {name, kind, settings}. A bare name's kind is its prefix before '@' or ':'
    ("exit@20" -> "exit", "lookup" -> "lookup"); dicts must carry at least a name."""
    out = []
    for arm in arms:
        if isinstance(arm, str):
            out.append({"name": arm, "kind": arm.split("@")[0].split(":")[0], "settings": {}})
        elif isinstance(arm, dict) and isinstance(arm.get("name"), str):
            out.append({"name": arm["name"], "kind": arm.get("kind", arm["name"].split("@")[0].split(":")[0]),
                        "settings": arm.get("settings", {})})
        else:
            raise CtxdraftError(f"an arm must be a name or a dict with a 'name', got {arm!r}")
    names = [a["name"] for a in out]
    if len(set(names)) != len(names):
        raise CtxdraftError(f"arm names must be unique, got {names}")
    return out


def _example_input(policy: nn.Module) -> torch.Tensor:
    # Sizes other than 0 and 1, so the exporter does not specialise the dynamic dimensions on them.
    if policy.feature_kind == "hidden":
        return torch.zeros(3, policy.feature_dim, dtype=torch.float32)
    token_ids = torch.arange(21, dtype=torch.int64).reshape(3, 7)
    token_ids[0, 5:] = -1
    return token_ids


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs about every optional op library it cannot find (torchvision) and
    raises FutureWarnings from torch internals; none of it concerns a policy MLP."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _to_onnx(policy: nn.Module) -> onnx.ModelProto:
    graph = _ProbsGraph(policy).eval()
    example = _example_input(policy)
    input_name = INPUT_NAMES[policy.feature_kind]
    batch = torch.export.Dim("batch")
    dynamic = {0: batch} if policy.feature_kind == "hidden" else {0: batch, 1: torch.export.Dim("time")}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[input_name],
                                        output_names=[PROBS_OUTPUT], dynamic_shapes={"inputs": dynamic},
                                        verbose=False)
        return program.model_proto
    except Exception as e:  # noqa: BLE001 - any exporter failure: try the TorchScript exporter below
        # The dynamo exporter is the supported path (it needs onnxscript); the TorchScript exporter is
        # deprecated but still exports these small graphs, so a broken dynamo stack does not block export.
        warnings.warn(f"torch.onnx dynamo export failed ({type(e).__name__}: {e}); using dynamo=False")
    import io

    buffer = io.BytesIO()
    dynamic_axes = {input_name: {0: "batch"} if policy.feature_kind == "hidden" else {0: "batch", 1: "time"},
                    PROBS_OUTPUT: {0: "batch"}}
    torch.onnx.export(graph, (example,), buffer, dynamo=False, input_names=[input_name],
                      output_names=[PROBS_OUTPUT], dynamic_axes=dynamic_axes, opset_version=18)
    return onnx.load_from_string(buffer.getvalue())


def export_policy(policy: nn.Module, path: str | os.PathLike, arms: list, feature_spec: dict, target: dict,
                  version: str) -> Path:
    """Write `policy` to `path` as a self-describing ONNX file (atomically) and return the path.

    arms: the pool in the policy's output order, names or {name, kind, settings} dicts.
    feature_spec: `ctxdraft.selfdraft.learning.policy.feature_spec(policy, layer)`; its kind and dim must match.
    target: {"name": ..., "hash": ...} of the target model the features and rewards came from.
    version: the ctxdraft version (or any string identifying the producer).
    """
    arms = normalise_arms(arms)
    kind = getattr(policy, "feature_kind", None)
    if kind not in INPUT_NAMES:
        raise CtxdraftError(f"not a ctxdraft policy network (feature kind {kind!r})")
    if len(arms) != policy.num_arms:
        raise CtxdraftError(f"the policy has {policy.num_arms} outputs but {len(arms)} arms were given")
    if feature_spec.get("kind") != kind:
        raise CtxdraftError(f"feature spec kind {feature_spec.get('kind')!r} does not match the policy's {kind!r}")
    if kind == "hidden" and feature_spec.get("dim") != policy.feature_dim:
        raise CtxdraftError(f"feature spec dim {feature_spec.get('dim')} does not match the policy's "
                            f"{policy.feature_dim}")
    if not isinstance(target, dict) or not target.get("name") or not target.get("hash"):
        raise CtxdraftError(f"target must be a dict with 'name' and 'hash', got {target!r}")

    was_training = policy.training
    policy.eval()
    try:
        model = _to_onnx(policy)
    finally:
        policy.train(was_training)

    # The arm names as a constant string output, for bindings without a metadata API.
    names = np.array([a["name"] for a in arms], dtype=object)
    model.graph.node.append(helper.make_node(
        "Constant", inputs=[], outputs=[ARM_NAMES_OUTPUT],
        value=numpy_helper.from_array(names, name=ARM_NAMES_OUTPUT + "_value")))
    model.graph.output.append(helper.make_tensor_value_info(ARM_NAMES_OUTPUT, onnx.TensorProto.STRING, [len(arms)]))

    metadata = {
        "ctxdraft.arms": json.dumps(arms),
        "ctxdraft.features": json.dumps(feature_spec),
        "ctxdraft.target": json.dumps({"name": target["name"], "hash": target["hash"]}),
        "ctxdraft.version": str(version),
    }
    del model.metadata_props[:]
    for node in model.graph.node:  # the exporter's per-node stack traces name this machine's source paths
        del node.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name = "ctxdraft"
    model.producer_version = str(version)
    model.doc_string = ("ctxdraft routing policy: argmax of output 'probs' indexes output 'arm_names'. "
                        "See metadata_props ctxdraft.* for the feature spec and target.")
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the policy is read by whoever serves the bundle
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The ctxdraft.* metadata of an exported policy, JSON-decoded (version stays a string)."""
    path = Path(path)
    if not path.is_file():
        raise CtxdraftError(f"policy file not found: {path}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise CtxdraftError(f"{path} is not a readable ONNX file ({type(e).__name__}); re-export it") from None
    props = {p.key: p.value for p in model.metadata_props}
    return decode_metadata(props, str(path))
