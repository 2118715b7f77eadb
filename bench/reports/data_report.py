"""`bench data`: pairs read, dropped by reason, split sizes and token-length percentiles."""

import numpy as np

from bench.core.models import load_tokenizer
from datamodules.formatting import Formatter
from datamodules.hh_rlhf import SPLITS, load_splits

PERCENTILES = (50, 90, 99, 100)


def describe(
    path: str,
    subsets: list[str] | None = None,
    tokenizer: str = "smollm2-135m-instruct",
    chat_template: bool = True,
    max_length: int = 512,
    max_prompt_length: int = 256,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict:
    splits, report = load_splits(path, subsets, val_fraction, test_fraction)
    formatter = Formatter(load_tokenizer(tokenizer), chat_template, max_length, max_prompt_length)
    pairs = [pair for split in SPLITS for pair in splits[split]]
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    truncated = 0
    for pair in pairs:
        prompt = formatter.prompt_ids(pair.prompt)
        chosen, rejected = formatter.response_ids(pair.chosen), formatter.response_ids(pair.rejected)
        for key, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            lengths[key].append(len(ids))
        truncated += len(prompt) + max(len(chosen), len(rejected)) > max_length
    result = report.as_dict()
    result["tokens"] = {
        "tokenizer": tokenizer,
        "chat_template": formatter.uses_chat_template,
        "percentiles": {
            key: {f"p{q}": int(np.percentile(values, q)) for q in PERCENTILES} for key, values in lengths.items()
        },
        "pairs_truncated": truncated,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }
    return result


def format_report(result: dict) -> str:
    lines = [f"source        {result['source']}"]
    lines += [f"file          {f}" for f in result["files"]]
    lines.append(f"pairs read    {result['pairs_read']:,}")
    for reason, count in result["dropped"].items():
        lines.append(f"dropped       {count:,}  ({reason})")
    lines.append(f"kept          {result['kept']:,}")
    lines.append("splits        " + ", ".join(f"{name} {n:,}" for name, n in result["splits"].items()))
    tokens = result["tokens"]
    template = "chat template" if tokens["chat_template"] else "raw HH text"
    lines.append(f"tokens        {tokens['tokenizer']}, {template}, before truncation")
    lines.append("              " + "".join(f"{'p' + str(q) if q < 100 else 'max':>8}" for q in PERCENTILES))
    for key, row in tokens["percentiles"].items():
        lines.append(f"  {key:<12}" + "".join(f"{v:>8}" for v in row.values()))
    lines.append(
        f"truncated     {tokens['pairs_truncated']:,} pairs exceed max_length {tokens['max_length']} "
        f"(prompt kept to its last {tokens['max_prompt_length']} tokens, then responses cut)"
    )
    return "\n".join(lines)
