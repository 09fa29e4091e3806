"""Route queries with an exported policy (`policy.onnx`) through onnxruntime; no torch needed.

The router checks the file against the bundle it will serve (same target, same arms, same features)
so a policy trained for another model or pool fails loudly instead of routing on garbage.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.features import INPUT_NAMES, PADDING_ID

METADATA_KEYS = ("ctxdraft.arms", "ctxdraft.features", "ctxdraft.target", "ctxdraft.version")
PROBS_OUTPUT = "probs"
ARM_NAMES_OUTPUT = "arm_names"


def decode_metadata(props: dict, where: str) -> dict:
    """ctxdraft.* metadata_props (strings) -> {"arms", "features", "target", "version"}."""
    missing = [k for k in METADATA_KEYS if k not in props]
    if missing:
        raise CtxdraftError(f"{where} is not a ctxdraft policy (metadata {', '.join(missing)} missing); "
                            "re-export it with `ctxdraft export-policy`")
    try:
        return {
            "arms": json.loads(props["ctxdraft.arms"]),
            "features": json.loads(props["ctxdraft.features"]),
            "target": json.loads(props["ctxdraft.target"]),
            "version": props["ctxdraft.version"],
        }
    except json.JSONDecodeError as e:
        raise CtxdraftError(f"{where}: ctxdraft metadata is not valid JSON ({e.msg}); re-export the policy") from None


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise CtxdraftError(
            "routing with policy.onnx needs onnxruntime: pip install 'ctxdraft[cpu]' (onnxruntime), or "
            "'ctxdraft[gpu]' (onnxruntime-gpu) in an environment without the CPU wheel"
        ) from None
    return onnxruntime


def _arm_name(arm) -> str:
    return arm["name"] if isinstance(arm, dict) else str(arm)


class OnnxRouter:
    """An exported policy, ready to route one query (`choose`) or score a batch (`probs`).

    expected: what the caller will serve, as in bundle.json:
      {"target": {"name", "hash"}, "arms": [names or {name, ...}], "features": {"kind", "dim", "layer"}}.
      Any key may be left out; the ones given must match the file's metadata.
    device: "auto" (CUDA when onnxruntime offers it and the session really gets it, else CPU) or "cpu".
    """

    def __init__(self, path: str | os.PathLike, expected: dict | None = None, device: str = "auto"):
        if device not in ("auto", "cpu"):
            raise CtxdraftError(f"router device must be 'auto' or 'cpu', got {device!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise CtxdraftError(f"policy file not found: {self.path}; run `ctxdraft train-policy` to create it")
        ort = _import_onnxruntime()
        self._session = self._open_session(ort, device)
        meta = decode_metadata(self._session.get_modelmeta().custom_metadata_map, str(self.path))
        self.arms: list[str] = [_arm_name(a) for a in meta["arms"]]
        self.arm_specs: list[dict] = meta["arms"]
        self.features: dict = meta["features"]
        self.target: dict = meta["target"]
        self.version: str = meta["version"]
        self.provider: str = self._session.get_providers()[0]

        kind = self.features.get("kind")
        if kind not in INPUT_NAMES:
            raise CtxdraftError(f"{self.path}: unknown feature kind {kind!r} in ctxdraft.features")
        self.feature_kind: str = kind
        self._input_name = INPUT_NAMES[kind]
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [self._input_name] or PROBS_OUTPUT not in outputs or ARM_NAMES_OUTPUT not in outputs:
            raise CtxdraftError(f"{self.path}: graph inputs {inputs} / outputs {outputs} are not a ctxdraft "
                                f"{kind} policy's ({self._input_name!r} -> 'probs', 'arm_names'); re-export it")
        if kind == "hidden":
            dim = self.features.get("dim")
            graph_dim = self._session.get_inputs()[0].shape[-1]
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1 or (isinstance(graph_dim, int) and graph_dim != dim):
                raise CtxdraftError(f"{self.path}: its metadata says {dim!r} features but the graph takes {graph_dim}; "
                                    "the file was edited or damaged, re-export it with `ctxdraft export-policy`")
        # One run warms the session up and checks the graph's arm names against the metadata.
        empty = [[]] if kind == "tokens" else np.zeros((1, self.features["dim"]), dtype=np.float32)
        probs, graph_arms = self._run(self._as_batch(empty))
        if [str(a) for a in graph_arms] != self.arms or probs.shape != (1, len(self.arms)):
            raise CtxdraftError(f"{self.path}: output arm_names {list(graph_arms)} disagree with metadata "
                                f"{self.arms}; the file was edited or damaged, re-export it")
        if expected:
            self.check(expected)

    def _open_session(self, ort, device: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a few-kFLOP MLP: threads only add wake-up latency
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        want_cuda = device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
            if want_cuda and "CUDAExecutionProvider" not in session.get_providers():
                # Offered but not usable (no driver, wrong CUDA): make the CPU choice explicit.
                session = ort.InferenceSession(str(self.path), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for damaged files
            raise CtxdraftError(f"cannot load policy {self.path}: {type(e).__name__}: {str(e).strip()[:200]}; "
                                "the file is damaged or not ONNX, re-run `ctxdraft export-policy`") from None
        return session

    def check(self, expected: dict) -> None:
        """Raise CtxdraftError when the file does not fit `expected` (see the class docstring)."""
        target = expected.get("target")
        if target and target.get("hash") and target["hash"] != self.target.get("hash"):
            raise CtxdraftError(
                f"{self.path} was trained for target {self.target.get('name')!r} (hash {self.target.get('hash')}), "
                f"not this bundle's {target.get('name')!r} (hash {target['hash']}); re-run `ctxdraft train-policy`"
            )
        arms = expected.get("arms")
        if arms is not None:
            names = [_arm_name(a) for a in arms]
            if set(names) != set(self.arms):
                raise CtxdraftError(
                    f"{self.path} routes between arms {self.arms} but the bundle's pool is {names} "
                    f"(missing {sorted(set(self.arms) - set(names))}, new {sorted(set(names) - set(self.arms))}); "
                    "re-run `ctxdraft train-policy` after changing the pool"
                )
        features = expected.get("features")
        if features:
            for key in ("kind", "dim", "layer"):
                if key in features and features[key] != self.features.get(key):
                    raise CtxdraftError(
                        f"{self.path} expects features with {key}={self.features.get(key)!r} but the bundle "
                        f"gives {key}={features[key]!r}; re-run `ctxdraft train-policy` with the bundle's features"
                    )

    def _as_batch(self, batch) -> np.ndarray:
        if self.feature_kind == "tokens":
            rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in batch]
            if not rows:
                raise CtxdraftError("empty batch: give at least one token id list")
            token_ids = np.full((len(rows), max([len(r) for r in rows] + [1])), PADDING_ID, dtype=np.int64)
            for i, r in enumerate(rows):
                if (r < 0).any():
                    raise CtxdraftError("token ids must be non-negative")
                token_ids[i, : len(r)] = r
            return token_ids
        features = np.asarray(batch, dtype=np.float32)
        dim = self.features["dim"]
        if features.ndim != 2 or features.shape[1] != dim or features.shape[0] == 0:
            raise CtxdraftError(f"hidden features must have shape [batch, {dim}], got {list(features.shape)}")
        return np.ascontiguousarray(features)

    def _run(self, inputs: np.ndarray):
        try:
            probs, arm_names = self._session.run([PROBS_OUTPUT, ARM_NAMES_OUTPUT], {self._input_name: inputs})
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a graph that does not fit
            raise CtxdraftError(f"{self.path} cannot route these features ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:160]}); re-export it with `ctxdraft export-policy`") from None
        return probs, arm_names

    def probs(self, batch) -> np.ndarray:
        """[B, A] float32 arm probabilities. batch: [B, F] floats (hidden) or B token id lists (tokens)."""
        return self._run(self._as_batch(batch))[0]

    def choose(self, features) -> str:
        """The arm for one query. features: a 1-D float array of length dim (hidden) or token ids (tokens)."""
        if self.feature_kind == "hidden":
            features = np.asarray(features, dtype=np.float32)
            if features.ndim != 1:
                raise CtxdraftError(f"choose() takes one query's 1-D features, got shape {list(features.shape)}")
        return self.arms[int(self.probs([features])[0].argmax())]
