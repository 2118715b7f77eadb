"""What the commands share to read their arguments: a parser whose errors are one line, and the option
helpers of commands that pass the rest of their arguments on (`bench.experiments.recipe.resolve` takes the
recipe's `--eval.*` from them, LightningCLI the rest)."""

import argparse

from bench.core.errors import BenchError


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument in one line, which main prints, rather than after its whole usage."""

    def error(self, message: str):
        raise BenchError(f"{message}; see `{self.prog} --help`")


def pop_option(argv: list[str], name: str, default: str | None, bare: str | None = None) -> tuple[str | None, list[str]]:
    """`name VALUE` or `name=VALUE` taken out of argv; with `bare`, `name` alone means that value."""
    rest, value, i = [], default, 0
    while i < len(argv):
        given_alone = i + 1 == len(argv) or argv[i + 1].startswith("-")
        if argv[i] == name and bare is not None and given_alone:
            value, i = bare, i + 1
        elif argv[i] == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(name + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return value, rest


def seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def int_in_range(low: int, high: int):
    """An argparse type: an integer from low to high, else a one-line error naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}")
        return value

    return parse
