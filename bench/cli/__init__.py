"""The `bench` command: `bench NAME ...` runs `run(argv)` of bench/cli/NAME.py, a module that declares the
command's options. A command module loads torch, Lightning and MLflow only after its arguments are parsed, so
that `--help` and argument errors are fast; every error is one line on stderr and exit code 2."""

import importlib
import os
import sys
from typing import NamedTuple

from bench.cli.logs import configure_logging
from bench.core.errors import BenchError
from bench.core.signals import sigterm_as_ctrl_c


class Command(NamedTuple):
    usage: str  # the arguments after `bench NAME`
    summary: str  # what it does, in USAGE
    more: tuple[tuple[str, str], ...] = ()  # further (arguments, summary) lines of USAGE
    store: str | None = None  # "create" or "read": the MLflow store is checked (and made) before it runs


COMMANDS = {
    "data": Command("[PATH] [--json]", "what an HH-RLHF source holds"),
    "train": Command("ALGO [--recipe NAME|PATH] [overrides]", "train with LightningCLI conventions",
                     (("[--resume [RUN_DIR]]", "continue a killed run from its last checkpoint"),), store="create"),
    "eval": Command("RUN_ID|CHECKPOINT [--recipe NAME]", "win rates, reward-model scores and KL", store="create"),
    "sweep": Command("ALGO [--recipe NAME] [--n-trials N]", "Optuna study over sweeps/ALGO.yaml (validation prompts)",
                     store="create"),
    "label": Command("[--recipe NAME] [--gold SPEC]", "gold-label a recipe's pairs with a gold reward model",
                     store="create"),
    "compare": Command("[--recipe NAME] [--dry-run]", "every stage of a recipe, one MLflow parent run",
                       (("[--seeds 0,1,2]", "every stage under each seed"),), store="create"),
    "table": Command("--experiment NAME", "results/NAME.md and .csv from the experiment's runs", store="read"),
    "perf": Command("[--steps S] [--json] [--output FILE]", "DPO speed against TRL's DPOTrainer (cold/warm cache)"),
    "ui": Command("[--host H] [--port P]", "the MLflow UI over the store runs log to"),
}


def usage() -> str:
    lines = ["The `bench` command.", ""]
    for name, command in COMMANDS.items():
        lines.append(f"  bench {name} {command.usage}".ljust(53) + command.summary)
        lines += [f"        {more}".ljust(53) + summary for more, summary in command.more]
    return "\n".join(lines) + "\n"


USAGE = usage()


def main(argv: list[str] | None = None) -> None:
    try:
        run_command(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `bench ... | head`: the reader left; nothing to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def run_command(argv: list[str]) -> None:
    configure_logging()
    from bench.core.quiet import quiet_libraries

    quiet_libraries()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"bench: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} (see `bench --help`)",
              file=sys.stderr)
        sys.exit(2)
    try:
        if command.store and not {"-h", "--help", "--dry-run"} & set(argv):
            from bench.core.paths import cache_dir, check_writable_dir
            from bench.runs.tracking import check_reachable

            check_reachable(create=command.store == "create")  # a table reads a store, never makes one
            check_writable_dir(cache_dir(), "the cache folder (BENCH_CACHE)")  # before work that fills it
        with sigterm_as_ctrl_c():  # `kill` or a scheduler stops a command as Ctrl-C does (bench.core.signals)
            importlib.import_module(f"bench.cli.{argv[0]}").run(argv[1:])
    except BenchError as err:
        print(f"bench {argv[0]}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside training (which says how to resume): no traceback
        print(f"bench {argv[0]}: interrupted", file=sys.stderr)
        sys.exit(130)
