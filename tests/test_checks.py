"""Arguments are checked in one place for the API and the CLI: every bad value is one CtxdraftError naming it."""
from __future__ import annotations

import math

import pytest
from cli_helpers import assert_clean_error
from click.testing import CliRunner

from ctxdraft.cli.main import main
from ctxdraft.selfdraft.base import checks
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.decoding import GenerationConfig
from ctxdraft.selfdraft.serving.bundle import load_bundle


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer, got '5'"),
    (dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
    (dict(max_new_tokens=5.5), "max_new_tokens must be an integer, got 5.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature="0.5"), "temperature must be a number, got '0.5'"),
    (dict(temperature=None), "temperature must be a number"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=-0.1), "temperature must be >= 0.0"),
    (dict(top_p="0.9"), "top_p must be a number"),
    (dict(top_p=0), "top_p must be > 0.0"),
    (dict(top_p=1.5), "top_p must be <= 1.0"),
    (dict(top_p=math.nan), "top_p must be a finite number"),
    (dict(seed="1"), "seed must be an integer, got '1'"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(seed=2**70), "seed must be <= 18446744073709551615"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(stop=[None]), "stop must hold strings, got None"),
    (dict(stop=[""]), "stop must not hold an empty string"),
    (dict(stop=""), "stop must not hold an empty string"),
    (dict(stop=5), "stop must be a string or a list of strings"),
])
def test_generation_config_refuses_bad_values(kwargs, message):
    with pytest.raises(CtxdraftError) as info:
        GenerationConfig(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_generation_config_normalises_what_is_fine():
    config = GenerationConfig(max_new_tokens=3, temperature=1, top_p=1, seed=2**64 - 1, stop="Paris.")
    assert (config.temperature, config.top_p, config.stop) == (1.0, 1.0, ["Paris."])  # one stop string, not 6 chars
    assert GenerationConfig(stop=None).stop == [] and GenerationConfig(stop=("a", "b")).stop == ["a", "b"]


@pytest.fixture(scope="module")
def bundle(tiny_model_dir):
    return load_bundle(target=str(tiny_model_dir))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=123), "prompt must be a string, got int"),
    (dict(prompt="   "), "the prompt is empty"),
    (dict(draft=5), "draft must be a string"),
    (dict(chat="yes"), "chat must be True or False"),
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(stop=[None]), "stop must hold strings"),
])
def test_bundle_generate_refuses_bad_arguments(bundle, kwargs, message):
    with pytest.raises(CtxdraftError, match=message):
        bundle.generate(**{"prompt": "abc abc", **kwargs})


def test_a_stop_string_is_one_stop_string(bundle):
    plain = bundle.generate("abc abc abc", draft="lookup", max_new_tokens=20, chat=False)
    assert len(plain.text) > 4
    cut = plain.text[2:4]
    as_string = bundle.generate("abc abc abc", draft="lookup", max_new_tokens=20, chat=False, stop=cut)
    as_list = bundle.generate("abc abc abc", draft="lookup", max_new_tokens=20, chat=False, stop=[cut])
    assert as_string.text == as_list.text == plain.text[: plain.text.index(cut)]


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--stop", ""], "stop must not hold an empty string"),
    (["--seed", str(2**70)], "seed must be <= 18446744073709551615"),
])
def test_cli_refuses_the_same_values(tiny_model_dir, args, message):
    r = CliRunner().invoke(main, ["generate", "abc", "--target", str(tiny_model_dir), "--draft", "lookup", *args])
    assert_clean_error(r, message)


def test_integer_and_number_bounds():
    assert checks.integer("n", 3, 1, 3) == 3
    with pytest.raises(CtxdraftError, match="n must be <= 3"):
        checks.integer("n", 4, 1, 3)
    assert checks.number("x", 2, minimum=2) == 2.0
    with pytest.raises(CtxdraftError, match="x must be > 2"):
        checks.number("x", 2, above=2)
    with pytest.raises(CtxdraftError, match="x must be < 1"):
        checks.number("x", 1, below=1)
    assert checks.choice("c", "a", ("a", "b")) == "a"
    with pytest.raises(CtxdraftError, match="c must be one of 'a', 'b', got 'z'"):
        checks.choice("c", "z", ("a", "b"))
