"""`bench eval RUN_ID|CHECKPOINT`: a policy's win rates, reward-model scores and KL."""

import json
import logging

from bench.cli.options import OneLineParser
from bench.core.errors import BenchError

log = logging.getLogger("bench")


def parser() -> OneLineParser:
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
    parser.epilog = ("Each flag is one of the recipe's eval settings (--n-prompts is --eval.n_prompts, --backend "
                     "--eval.sampling.backend); any of them can be given as --eval.KEY=VALUE, as in train, compare "
                     "and sweep.")
    return parser


SETTINGS = ("n_prompts", "judge", "judge_model", "judge_prompt", "proxy")  # each flag is eval.<its name>
SAMPLING = ("temperature", "top_p", "max_new_tokens", "batch_size", "seed", "backend")  # eval.sampling.<its name>


def flag_settings(args) -> dict:
    """The flags given, as the recipe's `eval:` settings they set (`--n-prompts` is `--eval.n_prompts`)."""
    settings = {key: None if getattr(args, key) == "none" else getattr(args, key)
                for key in SETTINGS if getattr(args, key) is not None}
    sampling = {key: getattr(args, key) for key in SAMPLING if getattr(args, key) is not None}
    return {**settings, "sampling": sampling} if sampling else settings


def run(argv: list[str]) -> None:
    args, rest = parser().parse_known_args(argv)
    unknown = [arg for arg in rest if not arg.startswith("--eval.")]
    if unknown:
        raise BenchError(f"unrecognized arguments: {' '.join(unknown)}; see `bench eval --help`")
    import mlflow

    from bench.evaluation.evaluate import evaluate, recipe_of_run, resolve_target
    from bench.experiments.recipe import resolve
    from bench.reports import figures
    from bench.runs import recipes, tracking

    run_recipe = recipe_of_run(args.target)
    if args.recipe and run_recipe and recipes.load(args.recipe)[0] != run_recipe:
        log.warning("run %s was trained with recipe %s; evaluating with %s's eval settings, as --recipe asks",
                    args.target, run_recipe, args.recipe)
    if not args.recipe and run_recipe and run_recipe not in recipes.available():
        raise BenchError(f"run {args.target} was trained with recipe {run_recipe!r}, not one shipped with bench: "
                         f"pass its file with --recipe PATH/{run_recipe}.yaml")
    recipe, _ = resolve(args.recipe or run_recipe or "smol-hh", rest, data_path=args.data_path,
                        eval_settings=flag_settings(args))
    target = resolve_target(args.target, args.reference, recipe.data, recipe.name)
    evaluated = evaluate(target, recipe.eval)
    figures.log_win_rates(mlflow.MlflowClient(tracking.tracking_uri()), evaluated.run_id)
    print(json.dumps(evaluated.metrics, indent=2))
