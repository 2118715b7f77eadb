"""`bench label`: gold-label a recipe's preference data with its gold reward model, cached."""

from bench.cli.options import OneLineParser
from bench.core.errors import BenchError


def parser() -> OneLineParser:
    from bench.evaluation.labelling import RULES

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
    return parser


def run(argv: list[str]) -> None:
    from bench.runs import recipes

    args = parser().parse_args(argv)
    recipe_name, loaded = recipes.load(args.recipe)  # before torch loads
    given = {key: value for key, value in (("model", args.gold), ("rule", args.rule), ("temperature", args.temperature),
                                           ("seed", args.seed), ("input_format", args.input_format)) if value is not None}
    if not ((loaded.get("gold") or {}).get("model") or given.get("model")):
        raise BenchError(f"recipe {recipe_name} has no gold model: pass --gold SPEC")
    from bench.experiments import gold
    from bench.experiments.recipe import resolve

    recipe, _ = resolve(args.recipe, world="create", data_path=args.data_path, gold_section=given)
    print(gold.describe_world(recipe.gold_manifest, recipe.data["path"]))
