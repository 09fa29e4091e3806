"""Property-based fuzzing (hypothesis): whatever a user's bundle.json or API arguments hold, the only exception
that escapes is the project's own CtxdraftError, with a one-line message."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import load_bundle
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def paths(obj, prefix=()):
    """Every path into a JSON object (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from paths(value, prefix + (i,))


def mutate(info, path, value, delete):
    info = json.loads(json.dumps(info))
    if not path:
        return value
    parent = info
    for part in path[:-1]:
        parent = parent[part]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return info


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    info = new_bundle_info(load_target(tiny_model_dir), str(tiny_model_dir))
    info["exits"] = [{"layer": 1, "arm": "exit@1", "head": "linear", "agreement": 0.5, "speedup": 1.1}]
    info["features"] = {"kind": "hidden", "layer": 1, "dim": 33}
    return info


def one_line(error: CtxdraftError) -> bool:
    return "\n" not in str(error) and 0 < len(str(error)) < 600


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_bundle_json_loads_or_fails_with_one_clear_line(base, tmp_path_factory, data):
    all_paths = list(paths(base))
    path = data.draw(st.sampled_from(all_paths))
    info = mutate(base, path, data.draw(json_values), delete=data.draw(st.booleans()))
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "bundle.json").write_text(json.dumps(info))  # NaN and Infinity included, as json writes them
    try:
        bundle = load_bundle(directory)
        if data.draw(st.booleans()):  # sometimes go on to generate with an arm of the mutated pool
            bundle.generate("abc abc", draft=data.draw(st.sampled_from(bundle.arms)), max_new_tokens=3, chat=False)
    except CtxdraftError as e:
        assert one_line(e), str(e)


api_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=6), st.lists(st.one_of(st.none(), st.text(max_size=4), st.integers()), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["prompt", "draft", "max_new_tokens", "temperature", "top_p", "seed", "chat", "stop"]),
       value=api_values)
def test_any_api_argument_gives_a_result_or_one_clear_line(tiny_model_dir, name, value):
    bundle = _bundle(tiny_model_dir)
    kwargs = {"prompt": "abc abc", "draft": "lookup", "max_new_tokens": 3, "chat": False, name: value}
    try:
        result = bundle.generate(**kwargs)
    except CtxdraftError as e:
        assert one_line(e), str(e)
        return
    assert 0 < len(result.token_ids) <= kwargs["max_new_tokens"] and isinstance(result.text, str)
    if name == "temperature":
        assert math.isfinite(value) and value >= 0


_bundles = {}


def _bundle(model_dir):
    if model_dir not in _bundles:
        _bundles[model_dir] = load_bundle(target=str(model_dir))
    return _bundles[model_dir]
