"""How often proxies order fresh held-out on-policy pairs as the gold does (docs/gold-worlds.md).

For each test prompt of a smol-sentiment labelling, the reference draws 4 new responses (seed 2000, the recipe's
sampling: T 1.0, at most 48 new tokens), VADER scores all 6 pairs of each, and every proxy named is scored on the
pairs the gold does not score equal, and on the labelling's own test pairs.

    .venv/bin/python docs/proxy_agreement.py ~/.cache/bench/gold_labels/<folder> PROXY_FOLDER [PROXY_FOLDER ...]
"""

import sys

from bench.core.models import load_tokenizer
from bench.evaluation.evaluate import eval_formatter
from bench.evaluation.judges import load_scorer
from bench.evaluation.onpolicy import OnPolicySettings, candidate_pairs, order_agreement, reference_responses
from bench.sampling.generation import Sampling
from datamodules.hh_rlhf import load_splits

REFERENCE = "smollm2-135m-instruct"


def agreement(scorer, gold_margin, prompts, first, second) -> float:
    return order_agreement(scorer.score(prompts, first) - scorer.score(prompts, second), gold_margin)


def main(folder: str, proxies: list[str]) -> None:
    data = {"path": folder, "chat_template": True, "max_length": 128, "max_prompt_length": 64}
    test = load_splits(folder, None, 0.05, 0.15)[0]["test"]  # the recipe's fractions
    prompts = sorted({pair.prompt for pair in test})
    settings = OnPolicySettings(responses_per_prompt=4,
                                sampling=Sampling(temperature=1.0, max_new_tokens=48, batch_size=128, seed=2000))
    responses = reference_responses(REFERENCE, eval_formatter(load_tokenizer(REFERENCE), data), prompts, settings)
    fresh = [list(column) for column in zip(*candidate_pairs(prompts, responses, "all"))]
    labelled = [[p.prompt for p in test], [p.chosen for p in test], [p.rejected for p in test]]
    gold = load_scorer("reward:vader", "gold")
    margins = [gold.score(p, a) - gold.score(p, b) for p, a, b in (fresh, labelled)]
    print(f"{int((margins[0] != 0).sum())} fresh pairs and {int((margins[1] != 0).sum())} test pairs the gold decides")
    for spec in proxies:
        proxy = load_scorer(spec, "proxy")
        print(f"{spec}: fresh {agreement(proxy, margins[0], *fresh):.3f}, test {agreement(proxy, margins[1], *labelled):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
