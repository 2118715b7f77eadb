"""`bench compare`: every stage of a recipe under one MLflow parent run, optionally under several seeds."""

import json
import shlex

from bench.cli.options import OneLineParser, seed_list


def parser() -> OneLineParser:
    parser = OneLineParser(
        prog="bench compare", description="Run every stage of a recipe under one MLflow parent run.",
        epilog="Other arguments override every stage: LightningCLI's (--trainer.max_steps=2) and --eval.KEY=VALUE.")
    parser.add_argument("--recipe", default="smol-hh")
    parser.add_argument("--dry-run", action="store_true", help="tiny stand-in models, one step per stage, "
                        "a throwaway MLflow store")
    parser.add_argument("--data-path", help="HH-RLHF source (default: the recipe's; a dry run also reads HH_RLHF_PATH)")
    parser.add_argument("--seeds", type=seed_list, help="comma-separated seeds, each stage under each "
                        "(default: the recipe's compare.seeds, else its seed_everything)")
    return parser


def run(argv: list[str]) -> None:
    from bench.runs import recipes

    args, rest = parser().parse_known_args(argv)
    recipe_name, _ = recipes.load(args.recipe)  # a missing or malformed recipe is said before torch loads
    from bench.experiments.compare import compare, dry_run

    if args.dry_run:
        dry_run(args.recipe, rest, data_path=args.data_path, seeds=args.seeds)
        return
    runs = compare(args.recipe, rest, data_path=args.data_path, seeds=args.seeds,
                   command=shlex.join(["bench", "compare", *argv]))
    print(f"comparison finished: {json.dumps(runs)}; `bench table --experiment {recipe_name}` writes the table")
