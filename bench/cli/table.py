"""`bench table --experiment NAME`: results/NAME.md and .csv (and figures) from an experiment's runs."""

from pathlib import Path

from bench.cli.options import OneLineParser


def parser() -> OneLineParser:
    parser = OneLineParser(prog="bench table", description="results/NAME.md and .csv from an experiment",
                           allow_abbrev=False)  # the Command: line must say --experiment (results ownership)
    parser.add_argument("--experiment", required=True, help="MLflow experiment (a recipe's runs go to its name)")
    parser.add_argument("--output-dir", default="results", help="folder for NAME.md, NAME.csv and the figures "
                        "(default: results/ in the working directory)")
    return parser


def run(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    from bench.core.paths import check_writable_dir
    from bench.reports.table import table

    check_writable_dir(args.output_dir, "--output-dir")  # before reading the experiment's runs
    md_path, csv_path = table(args.experiment, "bench table " + " ".join(argv), Path(args.output_dir))
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")
