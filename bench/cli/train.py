"""`bench train ALGO`: train one algorithm with a recipe under LightningCLI's conventions, then evaluate it.

Its options are read by hand, not by argparse: everything bench does not take is LightningCLI's."""

import gc
import os
from datetime import datetime

from bench.cli.options import pop_option
from bench.core.errors import BenchError

TRAIN_HELP = """usage: bench train ALGO [--recipe NAME|PATH] [--eval auto|true|false] [--resume [RUN_DIR]] [overrides]

Train one algorithm with a recipe, log the run to MLflow, then evaluate it.

ALGO: {algorithms}

bench's own options:
  --recipe NAME|PATH    a recipe in bench/recipes ({recipes}) or a YAML file (default: smol-hh,
                        SmolLM2 on HH: about 20 minutes with its evaluation; `tiny` runs in seconds)
  --eval auto|true|false
                        evaluate the policy after training: auto (default) when the recipe's experiment has
                        a judge reward model, true to insist, false to skip
  --resume [RUN_DIR]    continue a killed run from its last checkpoint; alone: this algorithm's newest
                        unfinished run of the recipe
  --print_config        print the resolved config as YAML and stop

Overrides are LightningCLI's: --trainer.max_steps=50, --model.beta=0.3, --data.batch_size=4, --config FILE.
{more}"""


def train_help(algorithm: str | None) -> str:
    from bench.runs import recipes
    from modules import declared_names

    more = (f"LightningCLI's options of {algorithm} follow." if algorithm else
            "`bench train ALGO --help` lists every option of ALGO (its model, data and trainer settings).")
    return TRAIN_HELP.format(algorithms=", ".join(declared_names()), recipes=", ".join(recipes.available()), more=more)


def run(argv: list[str]) -> None:
    from modules import declared_names

    algorithms = declared_names()  # not the registry: it loads torch, and help and argument errors stay fast
    wants_help = bool({"-h", "--help"} & set(argv))
    if wants_help and (not argv or argv[0] not in algorithms):
        print(train_help(None))
        return
    if not argv or argv[0] not in algorithms:
        given = f"unknown algorithm {argv[0]!r}" if argv else "no algorithm given"
        raise BenchError(f"{given}; choose one of {', '.join(algorithms)} (see `bench train --help`)")
    algorithm, argv = argv[0], argv[1:]
    if wants_help:  # bench's own options first, then LightningCLI's
        print(train_help(algorithm) + "\n")
    recipe_arg, argv = pop_option(argv, "--recipe", "smol-hh")
    run_eval, argv = pop_option(argv, "--eval", "auto")
    if run_eval not in ("auto", "true", "false"):
        raise BenchError(f"--eval takes auto, true or false, got {run_eval!r}")
    # `--resume` alone: this algorithm's newest unfinished run in the recipe.
    resume, argv = pop_option(argv, "--resume", None, bare="latest")
    train(algorithm, recipe_arg, run_eval, resume, argv)


def train(algorithm: str, recipe_arg: str, run_eval: str, resume: str | None, argv: list[str]) -> None:
    from bench.runs import recipes

    recipes.load(recipe_arg)  # a missing or malformed recipe is said before torch loads
    # torch and Lightning load here, after the cheap checks: help and argument errors stay fast.
    import mlflow

    import modules
    from bench.evaluation.evaluate import check_evaluation_possible, evaluate_after_training
    from bench.experiments.recipe import resolve
    from bench.reports import figures
    from bench.runs import tracking
    from bench.runs.training import train_one

    # A gold-labelled recipe trains on its labels; train evaluates, so --eval.KEY=VALUE is its setting.
    recipe, argv = resolve(recipe_arg, argv)
    roles = modules.module_class(algorithm).trained_roles
    if run_eval == "true" and modules.trains_policy(algorithm):
        check_evaluation_possible(recipe.name, recipe.eval)  # before training, not after it
    if roles and not any(a.startswith("--model.role") for a in argv):
        if resume:
            either = " or ".join(f"--model.role={role}" for role in roles)
            raise BenchError(f"--resume trains one {algorithm} model: add {either}")
        # The default reward-model stage: a proxy and a judge, each on its own half of the train split.
        for role in roles:
            train_one(algorithm, recipe.name, recipe.config(algorithm), [*argv, f"--model.role={role}"],
                      run_name=f"{algorithm}-{role}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")
    else:
        run_id = train_one(algorithm, recipe.name, recipe.config(algorithm), argv, resume=resume,
                           bench_args=[] if run_eval == "auto" else ["--eval", run_eval]).run_id
        # The trainer, models and optimizer state form reference cycles; free them before evaluation
        # loads its own models (PPO's training state alone is about 17 GB with SmolLM2 on CPU).
        gc.collect()
        if modules.trains_policy(algorithm) and run_id is not None and run_eval != "false":
            evaluated = evaluate_after_training(run_id, recipe.name, recipe.eval, required=run_eval == "true")
            if evaluated is not None:
                figures.log_win_rates(mlflow.MlflowClient(tracking.tracking_uri()), evaluated.run_id)
