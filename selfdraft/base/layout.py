"""The files of a bundle directory, one name each (see ``bundle.py`` for what they hold)."""

BUNDLE_FILE = "bundle.json"  # target identity, the pool, exits, features, policy, cost profile: the commit point
EXITS_FILE = "exits.safetensors"  # exit-head weights (+ reduced-vocab ids)
SUCCESSORS_FILE = "successors.safetensors"  # the successor table [V, k] a successor / merged arm starts from
POLICY_FILE = "policy.onnx"  # the routing policy, for onnxruntime anywhere
POLICY_WEIGHTS_FILE = "policy.safetensors"  # the same policy's torch weights (export-policy redoes the ONNX file)
REWARDS_FILE = "rewards.jsonl"  # what `train-policy --data` collects into
TRAJECTORIES_FILE = "trajectories.jsonl.gz"  # every arm's trajectory on the policy's prompts: what calibrate retrains from
EXITS_REPORT = "reports/add_exits.json"  # the linear / layer exits' add-exits report
COLLECT_REPORT = "reports/collect.json"
POLICY_REPORT = "reports/train_policy.json"


def feature_report(name: str) -> str:
    """The add-exits report of the feature head ``name`` (one per head, so a later add-exits keeps the others')."""
    return f"reports/add_exits_feature_{name}.json"
