"""The versions a bundle records it was built with (ctxdraft, torch, transformers)."""
from __future__ import annotations

import importlib.metadata


def versions() -> dict:
    def v(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: v(name) for name in ("ctxdraft", "torch", "transformers")}
