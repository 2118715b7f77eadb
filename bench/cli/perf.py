"""`bench perf`: DPO speed (pairs/s, tokens/s, MFU, memory) of this harness against TRL's DPOTrainer."""

from pathlib import Path

from bench.cli.options import OneLineParser
from bench.core.errors import BenchError

POSITIVE = ("steps", "batch_size", "max_length", "max_prompt_length", "gen_prompts", "gen_max_new_tokens",
            "gen_batch_size")


def parser() -> OneLineParser:
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
    return parser


def run(argv: list[str]) -> None:
    from bench.experiments import perf

    args = parser().parse_args(argv)
    # MLflow and Lightning load after the arguments are parsed: help and argument errors stay fast
    from bench.reports.table import check_not_anothers, result_owner, write_result
    from bench.runs.training import default_precision

    for name in POSITIVE:
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
