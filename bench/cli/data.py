"""`bench data`: what an HH-RLHF source holds."""

import json
import os

from bench.cli.options import OneLineParser


def parser() -> OneLineParser:
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
    return parser


def run(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    from bench.reports.data_report import describe, format_report

    report = describe(
        args.path, args.subsets, args.tokenizer, args.chat_template, args.max_length, args.max_prompt_length,
        args.val_fraction, args.test_fraction,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
