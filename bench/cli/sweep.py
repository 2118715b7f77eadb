"""`bench sweep ALGO`: an Optuna study over sweeps/ALGO.yaml, its trials judged on validation prompts."""

import shlex

from bench.cli.options import OneLineParser


def parser() -> OneLineParser:
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
    return parser


def run(argv: list[str]) -> None:
    args, rest = parser().parse_known_args(argv)
    from bench.experiments.recipe import resolve
    from bench.experiments.sweep import sweep

    recipe, overrides = resolve(args.recipe, rest)
    sweep(args.algorithm, recipe, args.n_trials, args.study_name, args.storage, args.sampler,
          args.objective or ["eval/win_rate_vs_chosen"], args.seed, overrides, args.prune, args.space,
          command=shlex.join(["bench", "sweep", *argv]))
