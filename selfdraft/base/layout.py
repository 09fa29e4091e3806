"""The files of a bundle directory, one name each (see ``bundle.py`` for what they hold): a closed set. bundle.json
may name a file only by the fixed name of its field (``NAMED_BY_FIELD``); copies take only these files."""
import re
from pathlib import Path

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
UPDATE_REPORT = "reports/update_policy.json"
UPDATE_REPORT_MD = "reports/update_policy.md"
DATASTORE_FILE = "datastore.safetensors"  # the suffix draft's earlier outputs, indexed (datastore.py)
DATASTORE_LOG = "datastore.log.jsonl"  # outputs appended since, one line per logged request
FIXED_FILES = (BUNDLE_FILE, EXITS_FILE, SUCCESSORS_FILE, POLICY_FILE, POLICY_WEIGHTS_FILE, REWARDS_FILE,
               TRAJECTORIES_FILE, EXITS_REPORT, COLLECT_REPORT, POLICY_REPORT, UPDATE_REPORT, UPDATE_REPORT_MD,
               DATASTORE_FILE, DATASTORE_LOG)
_REPORT = re.compile(r"^reports/[A-Za-z0-9_.@:+-]+\.(json|md)$")  # the commands' reports (and their Markdown)
# The only file each bundle.json field may name (a crafted name cannot point a write at another file).
NAMED_BY_FIELD = {"arms[].settings.weights": EXITS_FILE, "arms[].settings.table": SUCCESSORS_FILE, "policy": POLICY_FILE,
                  "policy_model.weights": POLICY_WEIGHTS_FILE}


def feature_report(name: str) -> str:
    """The add-exits report of the feature head ``name`` (one per head, so a later add-exits keeps the others')."""
    return f"reports/add_exits_feature_{name}.json"


def bundle_files(root) -> list[str]:
    """The names of the bundle files present under ``root`` (a closed set: what a copy of the bundle takes)."""
    root = Path(root)
    found = [name for name in FIXED_FILES if (root / name).is_file()]
    fixed = set(found)
    reports = root / "reports"
    if reports.is_dir() and not reports.is_symlink():
        names = (f"reports/{p.name}" for p in reports.iterdir() if p.is_file() and not p.is_symlink())
        found += sorted(name for name in names if _REPORT.match(name) and name not in fixed)
    return found
