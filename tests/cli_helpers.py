"""Assertions shared by the CLI tests."""


def assert_clean_error(result, needle: str) -> None:
    """A bad input must fail with one clear message, a non-zero exit and no traceback."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert needle in result.output, result.output
