import logging
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: CPU tests run the kernels interpreted
# Tests compare tokens exactly: "auto" means float32 here, whatever the CPU (tests of bf16 ask for it by name),
# and nothing calibrates itself on first use unless a test asks for it.
os.environ["CTXDRAFT_DTYPE"] = "float32"
os.environ["CTXDRAFT_NO_CALIBRATE"] = "1"

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "specbench_dev.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a character tokenizer and a chat template, saved as an HF directory."""
    from tiny import char_tokenizer, save_model_dir, tiny_llama

    tok = char_tokenizer()
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama", tiny_llama(len(tok), seed=0, max_positions=256), tok)


@pytest.fixture(scope="session")
def trained_tiny_bundle(tiny_model_dir, tmp_path_factory):
    """A tiny bundle with a trained policy and its trajectories (16 prompts), built once; copy it before changing it."""
    from test_traffic import train_tiny_bundle

    return train_tiny_bundle(tiny_model_dir, tmp_path_factory.mktemp("trained") / "bundle", num_prompts=16)


@pytest.fixture(scope="module")
def trained_bundle(tiny_model_dir, tmp_path_factory):
    """The server tests' tiny bundle with a trained policy, one per module; ``bundle_dir`` for a copy to change."""
    from test_traffic import train_tiny_bundle

    return train_tiny_bundle(tiny_model_dir, tmp_path_factory.mktemp("serve") / "bundle")


@pytest.fixture()
def bundle_dir(trained_bundle, tmp_path):
    return shutil.copytree(trained_bundle, tmp_path / "bundle")


@pytest.fixture(scope="session")
def specbench_path():
    if not SHARED_DATA.is_file():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture()
def warnings(caplog, monkeypatch):
    """The library's warnings, captured: the CLI tests give the ``ctxdraft`` logger its own handler and stop it
    propagating, so caplog alone would see nothing after them."""
    monkeypatch.setattr(logging.getLogger("ctxdraft"), "propagate", True)
    caplog.set_level(logging.WARNING)
    return caplog


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models run on one thread: intra-op threads only add synchronisation, and on a busy 2-core machine
    they spin-wait (30x slower seen here). Integration tests with the real model keep torch's setting."""
    import torch

    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
