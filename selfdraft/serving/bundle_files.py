"""What ``load_bundle`` checks of a bundle's files besides bundle.json, without loading the model: each one an arm
or the policy names is there and is what it claims to be (one error line each)."""
from __future__ import annotations

from pathlib import Path

from ..base.errors import CtxdraftError
from ..base.fileio import display_path
from ..drafting.exit_draft import ExitSettings
from ..drafting.exit_head import read_head_tensors, read_tensors
from ..drafting.feature_draft import FeatureSettings
from ..drafting.pool import arm_feature_layers, arm_table
from ..drafting.successor_table import read_successor_table

_HEAD_FIELDS = ("name", "layers", "draft_vocab", "weights")


def _head_settings(arm: dict) -> dict:
    settings = arm.get("settings", {})
    return settings.get("sources", {}).get("feature", {}) if arm["kind"] == "merged" else settings


def check_files(path: Path, info: dict) -> None:
    """What can be checked of the bundle's other files without the model: every exit arm's weights are readable
    and hold that exit (every feature head's, its head), every successor table is one, and the policy bundle.json
    names exists. Each failure is one error line."""
    for arm in info["arms"]:
        if arm["kind"] == "exit":
            settings = ExitSettings(**arm.get("settings", {}))
            read_head_tensors(path / settings.weights, settings.exit_layer)
        elif arm_feature_layers(arm):
            settings = FeatureSettings(**{k: v for k, v in _head_settings(arm).items() if k in _HEAD_FIELDS})
            read_tensors(path / settings.weights, f"feature-{settings.name}.", f"the feature head {settings.name!r}")
        if arm_table(arm) is not None:
            read_successor_table(path / arm_table(arm))
    if info.get("policy") and not (path / info["policy"]).is_file():
        raise CtxdraftError(f"{display_path(path / info['policy'])}, the policy bundle.json names, is missing; "
                            "run `ctxdraft export-policy` (or `train-policy`) again")
