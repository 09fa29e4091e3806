"""ONNX export of the routing policy and the onnxruntime router.

`OnnxRouter` needs only numpy and onnxruntime; `export_policy` needs torch and onnx, so it is imported
on first use and a routing-only runtime never loads torch.
"""
import importlib

from .router import OnnxRouter

__all__ = ["OnnxRouter", "export_policy", "read_metadata"]


def __getattr__(name):
    if name in ("export_policy", "read_metadata"):
        return getattr(importlib.import_module(f"{__name__}.onnx_export"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
