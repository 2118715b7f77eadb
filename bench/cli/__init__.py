"""The `bench` command.

  bench data [PATH] [--json]                         what an HH-RLHF source holds
  bench train ALGO [--recipe NAME|PATH] [overrides]  train with LightningCLI conventions
        [--resume [RUN_DIR]]                         continue a killed run from its last checkpoint
  bench eval RUN_ID|CHECKPOINT [--recipe NAME]       win rates, reward-model scores and KL
  bench sweep ALGO [--recipe NAME] [--n-trials N]    Optuna study over sweeps/ALGO.yaml (validation prompts)
  bench label [--recipe NAME] [--gold SPEC]          gold-label a recipe's pairs with a gold reward model
  bench compare [--recipe NAME] [--dry-run]          every stage of a recipe, one MLflow parent run
        [--seeds 0,1,2]                              every stage under each seed
  bench table --experiment NAME                      results/NAME.md and .csv from the experiment's runs
  bench perf [--steps S] [--json] [--output FILE]    DPO speed against TRL's DPOTrainer (cold/warm cache)
  bench ui [--host H] [--port P]                     the MLflow UI over the store runs log to
"""

import argparse
import gc
import json
import logging
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

import yaml

from bench.core.errors import BenchError

log = logging.getLogger("bench")

USAGE = __doc__


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument in one line, which main prints, rather than after its whole usage."""

    def error(self, message: str):
        raise BenchError(f"{message}; see `{self.prog} --help`")


def data_command(argv: list[str]) -> None:
    from datamodules.hh_rlhf import HUB_ID

    parser = OneLineParser(prog="bench data", description="Report what an HH-RLHF source holds.")
    parser.add_argument("path", nargs="?", default=os.environ.get("HH_RLHF_PATH") or HUB_ID,
                        help="hub id or local folder <subset>/<split>.jsonl.gz (default: $HH_RLHF_PATH, else the hub)")
    parser.add_argument("--subsets", nargs="*", default=None, help="subset folders (the hub's data_dir)")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct", help="model spec for token lengths")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    from bench.reports.data_report import describe, format_report

    report = describe(
        args.path, args.subsets, args.tokenizer, args.chat_template, args.max_length, args.max_prompt_length,
        args.val_fraction, args.test_fraction,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def _pop_option(argv: list[str], name: str, default: str | None, bare: str | None = None) -> tuple[str | None, list[str]]:
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


def train_command(argv: list[str]) -> None:
    from bench.runs import recipes
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
    recipe_arg, argv = _pop_option(argv, "--recipe", "smol-hh")
    run_eval, argv = _pop_option(argv, "--eval", "auto")
    # `--resume` alone: this algorithm's newest unfinished run in the recipe.
    resume, argv = _pop_option(argv, "--resume", None, bare="latest")
    recipe_name, recipe = recipes.load(recipe_arg)
    # torch and Lightning load here, after the cheap checks: help and argument errors stay fast.
    from bench.evaluation.evaluate import check_evaluation_possible, evaluate_after_training
    from bench.experiments import gold
    from bench.runs.training import train_one

    recipe = gold.gold_world(recipe_name, recipe)  # a gold-labelled recipe trains on its labels
    recipe, argv = split_eval_overrides(recipe, argv)  # train evaluates: --eval.KEY=VALUE is its setting
    if run_eval not in ("auto", "true", "false"):
        raise BenchError(f"--eval takes auto, true or false, got {run_eval!r}")
    if run_eval == "true" and algorithm != "rm":
        check_evaluation_possible(recipe_name, recipe)  # before training, not after it
    if algorithm == "rm" and not any(a.startswith("--model.role") for a in argv):
        if resume:
            raise BenchError("--resume trains one reward model: add --model.role=proxy or --model.role=judge")
        # The default reward-model stage: a proxy and a judge, each on its own half of the train split.
        for role in ("proxy", "judge"):
            train_one(algorithm, recipe_name, recipe, [*argv, f"--model.role={role}"],
                      run_name=f"rm-{role}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")
    else:
        run_id = train_one(algorithm, recipe_name, recipe, argv, resume=resume,
                           bench_args=[] if run_eval == "auto" else ["--eval", run_eval]).run_id
        # The trainer, models and optimizer state form reference cycles; free them before evaluation
        # loads its own models (PPO's training state alone is about 17 GB with SmolLM2 on CPU).
        gc.collect()
        if algorithm != "rm" and run_id is not None and run_eval != "false":
            evaluate_after_training(run_id, recipe_name, recipe, required=run_eval == "true")


def split_eval_overrides(recipe: dict, argv: list[str]) -> tuple[dict, list[str]]:
    """`--eval.n_prompts=8` or `--eval.sampling.max_new_tokens 32` set the recipe's `eval:` section; the
    rest of argv is left for the trainer (LightningCLI overrides such as `--trainer.max_steps=2`)."""
    from bench.runs.recipes import deep_merge

    settings, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--eval."):
            key, has_value, value = arg[2:].partition("=")
            if not has_value:
                if i + 1 >= len(argv):
                    raise BenchError(f"{arg} needs a value")
                value, i = argv[i + 1], i + 1
            node = settings
            *parents, leaf = key.split(".")[1:]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        else:
            rest.append(arg)
        i += 1
    return deep_merge(recipe, {"eval": settings}), rest


def sweep_command(argv: list[str]) -> None:
    parser = OneLineParser(
        prog="bench sweep", description="Optuna study over sweeps/ALGO.yaml; trials are judged on validation prompts.",
        epilog="Other arguments override the recipe: LightningCLI's (--trainer.max_steps=2) and --eval.KEY=VALUE.")
    parser.add_argument("algorithm")
    parser.add_argument("--recipe", default="smol-hh")
    parser.add_argument("--n-trials", type=int, default=10, help="finished trials the study should hold in total")
    parser.add_argument("--study-name", help="default: RECIPE-ALGO; the same name resumes the study")
    parser.add_argument("--storage", help="any SQLAlchemy URL (default: sqlite:///optuna.db in the working directory)")
    parser.add_argument("--sampler", choices=("tpe", "grid", "cmaes"), default="tpe")  # bench.experiments.sweep.SAMPLERS
    parser.add_argument("--objective", action="append", help="an eval/ metric, optionally :max or :min; twice "
                        "for a multi-objective study (default: eval/win_rate_vs_chosen)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--space", help="search-space file (default: sweeps/ALGO.yaml)")
    parser.add_argument("--no-prune", dest="prune", action="store_false", help="turn off median pruning")
    args, rest = parser.parse_known_args(argv)
    from bench.experiments import gold
    from bench.experiments.sweep import sweep
    from bench.runs import recipes

    recipe_name, recipe = recipes.load(args.recipe)
    recipe = gold.gold_world(recipe_name, recipe)
    recipe, overrides = split_eval_overrides(recipe, rest)
    sweep(args.algorithm, recipe_name, recipe, args.n_trials, args.study_name, args.storage, args.sampler,
          args.objective or ["eval/win_rate_vs_chosen"], args.seed, overrides, args.prune, args.space,
          command=shlex.join(["bench", "sweep", *argv]))


def seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def label_command(argv: list[str]) -> None:
    from bench.evaluation.labelling import RULES
    from bench.runs import recipes

    parser = OneLineParser(prog="bench label", description="Label a recipe's preference data with its gold: every "
                           "HH pair relabelled by a gold reward model, or (with the recipe's gold.on_policy) the "
                           "reference policy's own samples labelled by the gold; in the dataset's own layout, cached.")
    parser.add_argument("--recipe", default="smol-gold")
    parser.add_argument("--gold", help="the gold: a registered computable reward (reward:vader), a folder or hub id "
                        "of a one-output sequence classifier, or `train` (the recipe's gold.train; default: the "
                        "recipe's gold.model)")
    parser.add_argument("--rule", choices=RULES)
    parser.add_argument("--temperature", type=float, help="the bradley-terry rule's T")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--input-format", choices=("auto", "transcript", "pair", "chat"))
    parser.add_argument("--data-path", help="HH-RLHF source (default: the recipe's)")
    args = parser.parse_args(argv)
    from bench.experiments import gold

    recipe_name, recipe = recipes.load(args.recipe)
    given = {key: value for key, value in (("model", args.gold), ("rule", args.rule), ("temperature", args.temperature),
                                           ("seed", args.seed), ("input_format", args.input_format)) if value is not None}
    recipe = recipes.deep_merge(recipe, {"gold": given})
    if args.data_path:
        recipe = recipes.deep_merge(recipe, {"data": {"path": args.data_path}})
    if not (recipe.get("gold") or {}).get("model"):
        raise BenchError(f"recipe {recipe_name} has no gold model: pass --gold SPEC")
    world = gold.gold_world(recipe_name, recipe, create=True)
    print(gold.describe_world(world))


def compare_command(argv: list[str]) -> None:
    from bench.runs import recipes

    parser = OneLineParser(
        prog="bench compare", description="Run every stage of a recipe under one MLflow parent run.",
        epilog="Other arguments override every stage: LightningCLI's (--trainer.max_steps=2) and --eval.KEY=VALUE.")
    parser.add_argument("--recipe", default="smol-hh")
    parser.add_argument("--dry-run", action="store_true", help="tiny stand-in models, one step per stage, "
                        "a throwaway MLflow store")
    parser.add_argument("--data-path", help="HH-RLHF source (default: the recipe's; a dry run also reads HH_RLHF_PATH)")
    parser.add_argument("--seeds", type=seed_list, help="comma-separated seeds, each stage under each "
                        "(default: the recipe's compare.seeds, else its seed_everything)")
    args, rest = parser.parse_known_args(argv)
    from bench.experiments.compare import compare, comparison_recipe

    recipe_name, recipe = recipes.load(args.recipe)
    # compare.eval is merged first, so that the command line's --eval.KEY wins over it
    recipe, overrides = split_eval_overrides(comparison_recipe(recipe), rest)
    runs = compare(recipe_name, recipe, overrides, dry_run=args.dry_run, data_path=args.data_path, seeds=args.seeds,
                   command=shlex.join(["bench", "compare", *argv]))
    if not args.dry_run:
        print(f"comparison finished: {json.dumps(runs)}; `bench table --experiment {recipe_name}` writes the table")


def table_command(argv: list[str]) -> None:
    parser = OneLineParser(prog="bench table", description="results/NAME.md and .csv from an experiment",
                                     allow_abbrev=False)  # the Command: line must say --experiment (results ownership)
    parser.add_argument("--experiment", required=True, help="MLflow experiment (a recipe's runs go to its name)")
    parser.add_argument("--output-dir", default="results", help="folder for NAME.md, NAME.csv and the figures "
                        "(default: results/ in the working directory)")
    args = parser.parse_args(argv)
    from bench.core.paths import check_writable_dir
    from bench.reports.table import table

    check_writable_dir(args.output_dir, "--output-dir")  # before reading the experiment's runs
    md_path, csv_path = table(args.experiment, "bench table " + " ".join(argv), Path(args.output_dir))
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so that redirection (and pytest) is respected."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def configure_logging() -> None:
    for name in ("bench", "modules", "datamodules"):  # Lightning configures its own loggers
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def eval_command(argv: list[str]) -> None:
    parser = OneLineParser(prog="bench eval", description="Evaluate a policy: win rates, scores, KL.")
    parser.add_argument("target", help="MLflow run id of a `bench train` run, or a policy folder / model spec")
    parser.add_argument("--recipe", help="recipe whose eval settings to use (default: a run's own recipe; for a "
                        "checkpoint, smol-hh, whose data and experiment it also takes)")
    parser.add_argument("--reference", help="reference policy (default: the run's reference, or the target itself)")
    parser.add_argument("--data-path", help="HH-RLHF source, for a checkpoint (a run id brings its own)")
    parser.add_argument("--n-prompts", type=int)
    parser.add_argument("--judge", help="judge reward-model folder, 'latest', or an OpenAI-compatible base URL")
    parser.add_argument("--judge-model", help="model name for an http(s) judge")
    parser.add_argument("--judge-prompt", help="prompt template file for an http(s) judge (default: the DPO paper's)")
    parser.add_argument("--proxy", help="proxy reward-model folder, 'latest' or 'none'")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--backend", help="sampling backend: harness (default) or hf (model.generate)")
    args = parser.parse_args(argv)
    from bench.evaluation.evaluate import EvalSettings, evaluate, recipe_of_run, resolve_target
    from bench.experiments import gold
    from bench.runs import recipes

    run_recipe = recipe_of_run(args.target)
    if args.recipe and run_recipe and recipes.load(args.recipe)[0] != run_recipe:
        log.warning("run %s was trained with recipe %s; evaluating with %s's eval settings, as --recipe asks",
                    args.target, run_recipe, args.recipe)
    if not args.recipe and run_recipe and run_recipe not in recipes.available():
        raise BenchError(f"run {args.target} was trained with recipe {run_recipe!r}, not one shipped with bench: "
                         f"pass its file with --recipe PATH/{run_recipe}.yaml")
    recipe_name, recipe_config = recipes.load(args.recipe or run_recipe or "smol-hh")
    recipe_config = gold.gold_world(recipe_name, recipe_config)
    eval_config = dict(recipe_config.get("eval") or {})
    for key in ("n_prompts", "judge", "judge_model", "judge_prompt", "proxy"):
        if getattr(args, key) is not None:
            eval_config[key] = None if getattr(args, key) == "none" else getattr(args, key)
    sampling = dict(eval_config.get("sampling", {}))
    for key in ("temperature", "top_p", "max_new_tokens", "batch_size", "seed", "backend"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    eval_config["sampling"] = sampling
    data = dict(recipe_config.get("data", {}))
    if args.data_path:
        data["path"] = args.data_path
    target = resolve_target(args.target, args.reference, data, recipe_name)
    metrics = evaluate(target, EvalSettings.from_dict(eval_config))
    print(json.dumps(metrics, indent=2))


def perf_command(argv: list[str]) -> None:
    from bench.experiments import perf
    from bench.runs import recipes

    defaults = perf.PerfSettings()
    parser = OneLineParser(prog="bench perf", description="DPO pairs/s, tokens/s, MFU and memory: this "
                                     "harness (cold and warm reference cache) against TRL's DPOTrainer")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--max-prompt-length", type=int, default=defaults.max_prompt_length)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--policy", default=defaults.policy)
    parser.add_argument("--data-path", default=recipes.resolve_data_path(defaults.data_path),
                        help="HH-RLHF source (default: $HH_RLHF_PATH, else ../shared/data/hh-rlhf beside the repository)")
    parser.add_argument("--precision", choices=("bf16-mixed", "32-true"),
                        help="default: bf16-mixed where the hardware has bf16 arithmetic, else 32-true")
    parser.add_argument("--variants", nargs="+", choices=perf.VARIANTS, default=list(perf.VARIANTS),
                        help="training variants")
    parser.add_argument("--parts", nargs="+", choices=perf.PARTS, default=list(perf.PARTS))
    generation = perf.GenerationSettings()
    parser.add_argument("--gen-prompts", type=int, default=generation.n_prompts, help="generation: prompts")
    parser.add_argument("--gen-max-new-tokens", type=int, default=generation.max_new_tokens)
    parser.add_argument("--gen-batch-size", type=int, default=generation.batch_size)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--output", help="also write the table here (e.g. results/perf.md)")
    args = parser.parse_args(argv)
    # MLflow and Lightning load after the arguments are parsed: help and argument errors stay fast
    from bench.reports.table import check_not_anothers, result_owner, write_result
    from bench.runs.training import default_precision

    for name in ("steps", "batch_size", "max_length", "max_prompt_length", "gen_prompts", "gen_max_new_tokens",
                 "gen_batch_size"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    command = "bench perf " + " ".join(argv)
    if args.output:  # before the run, not after it
        from bench.core.paths import check_writable_file

        check_writable_file(args.output, "--output")
        check_not_anothers(Path(args.output), result_owner(command))
    settings = perf.PerfSettings(data_path=args.data_path, policy=args.policy, steps=args.steps,
                                 batch_size=args.batch_size, max_length=args.max_length,
                                 max_prompt_length=args.max_prompt_length, lr=args.lr,
                                 precision=args.precision or default_precision())
    generation = perf.GenerationSettings(n_prompts=args.gen_prompts, max_new_tokens=args.gen_max_new_tokens,
                                         batch_size=args.gen_batch_size)
    report = perf.perf(settings, tuple(args.variants) if "training" in args.parts else (),
                       generation if "generation" in args.parts else None)
    table = perf.markdown(report, command)
    print(perf.dumps(report) if args.json else table)
    if args.output:
        write_result(Path(args.output), table + "\n", command)
        print(f"wrote {args.output}")


def ui_command(argv: list[str]) -> None:
    from bench.cli.ui import ui_command as run_ui

    run_ui(argv)


COMMANDS = {"ui": ui_command, "data": data_command, "train": train_command, "eval": eval_command, "sweep": sweep_command,
            "compare": compare_command, "table": table_command, "perf": perf_command, "label": label_command}


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
        print(f"bench: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        if argv[0] in ("train", "eval", "sweep", "compare", "table", "label") and not {"-h", "--help", "--dry-run"} & set(argv):
            from bench.core.paths import cache_dir, check_writable_dir
            from bench.runs.tracking import check_reachable

            check_reachable(create=argv[0] != "table")  # a table reads a store, never makes one
            check_writable_dir(cache_dir(), "the cache folder (BENCH_CACHE)")  # before work that fills it
        command(argv[1:])
    except BenchError as err:
        print(f"bench {argv[0]}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside training (which says how to resume): no traceback
        print(f"bench {argv[0]}: interrupted", file=sys.stderr)
        sys.exit(130)

