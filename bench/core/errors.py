"""Errors that mean "your input is wrong", which the CLI prints as one line instead of a traceback."""


class BenchError(ValueError):
    pass


class ConfigError(BenchError):
    """A config value out of range; the message names the field."""


class DataError(BenchError):
    """Bad input data; the message names the file and line (or hub row) at fault."""


class ModelSpecError(BenchError):
    """A model spec that names no loadable model."""


def first_line(err: BaseException) -> str:
    """An exception's first line for a one-line message (its type when it says nothing)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
