"""On-policy preference data: the reference policy's own samples, labelled by a gold reward (Gao et al. 2023;
Coste et al. 2024; AlpacaFarm). A gold world whose pairs are written by another model gives the proxy nothing
about this policy's samples to learn; this one does.

For every prompt of the source (a registered prompt source, `bench.evaluation.prompt_sources`: by default the first
human turn of each HH dialogue, deduplicated, kept when its formatted prompt is at most `max_prompt_tokens`), the reference samples `responses_per_prompt` (k)
responses; disjoint consecutive pairs of them, (1, 2), (3, 4), ..., or with `pairs: all` every pair of them
(k(k-1)/2: the DPO paper's 6 pairs of 4 completions), are scored by the gold and labelled by
the rule of `bench.experiments.gold.label_pairs` (Bradley-Terry with a temperature and a seed: annotator noise). Pairs the
gold scores equal carry no preference and are dropped (counted). The pairs are written in the dataset's own
layout, `onpolicy/train.jsonl.gz` (one source split, which the loader carves into train/validation/test by
prompt hash as for any single-split source), each record with its two gold scores, beside `manifest.json`.
The folder is cached under `cache_dir()/gold_labels/<key>`, keyed by the reference, the gold, the sampling,
the rule and the source; the samples themselves are cached apart, so another rule or seed relabels without
sampling again. A folder whose manifest does not match the settings asked for is refused.
"""

import gzip
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.core.errors import ConfigError
from bench.core.models import cache_dir, load_causal_lm, load_tokenizer
from bench.core.precision import inference_autocast, inference_key_part
from bench.core.settings import check_values
from bench.evaluation import labelling
from bench.evaluation.judges import load_scorer, scorer_fingerprint
from bench.evaluation.labelling import label_pairs
from bench.evaluation.prompt_sources import DEFAULT as DEFAULT_PROMPTS
from bench.evaluation.prompt_sources import make_prompt_source
from bench.sampling.generation import JsonCache, Sampling, decode_responses, model_fingerprint, sample
from datamodules.formatting import Formatter
from datamodules.hh_rlhf import load_splits

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SUBSET = "onpolicy"

PAIRINGS = {  # which pairs of one prompt's k responses are labelled
    "disjoint": lambda drawn: zip(drawn[0::2], drawn[1::2]),  # (1, 2), (3, 4), ...: k // 2 independent pairs
    "all": lambda drawn: itertools.combinations(drawn, 2),  # every pair, k (k - 1) / 2 of them, sharing responses
}


@dataclass(frozen=True)
class OnPolicySettings:
    """How the reference samples the pairs. Recipes set these under `gold.on_policy`."""

    prompts: str = DEFAULT_PROMPTS  # a registered prompt source (bench.evaluation.prompt_sources)
    responses_per_prompt: int = 2
    max_prompt_tokens: int = 64
    max_prompts: int | None = None  # the first N prompts (in source order) that fit; None: all of them
    pairs: str = "disjoint"  # which pairs of a prompt's responses are labelled: "disjoint" (1-2, 3-4, ...) or "all"
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, max_new_tokens=48, batch_size=128))

    @classmethod
    def from_dict(cls, values: dict | None) -> "OnPolicySettings":
        values = dict(values or {})
        sampling = Sampling.of(values.pop("sampling", None), "gold.on_policy.sampling", **asdict(cls().sampling))
        check_values(cls, values, "gold.on_policy")
        settings = cls(sampling=sampling, **values)
        make_prompt_source(settings.prompts)  # an unknown name fails here, before anything is sampled
        if settings.responses_per_prompt < 2:
            raise ConfigError(f"gold.on_policy.responses_per_prompt must be >= 2, got {settings.responses_per_prompt}")
        if settings.max_prompt_tokens < 1:
            raise ConfigError(f"gold.on_policy.max_prompt_tokens must be >= 1, got {settings.max_prompt_tokens}")
        if sampling.greedy:
            raise ConfigError("gold.on_policy.sampling.temperature must be > 0: greedy responses to one prompt are equal")
        if settings.pairs not in PAIRINGS:
            raise ConfigError(f"gold.on_policy.pairs must be one of {', '.join(PAIRINGS)}, got {settings.pairs!r}")
        return settings


def source_prompts(settings: OnPolicySettings, data: dict, formatter: Formatter) -> list[str]:
    """The prompts the reference answers: the settings' prompt source, kept where the formatted prompt fits."""
    return make_prompt_source(settings.prompts).prompts(
        data, formatter.tokenizer, settings.max_prompt_tokens, settings.max_prompts, seed=settings.sampling.seed,
        fits=lambda prompt: len(formatter.prompt_ids(prompt)) <= settings.max_prompt_tokens)


def reference_responses(policy: str, formatter: Formatter, prompts: list[str], settings: OnPolicySettings) -> list[list[str]]:
    """k responses of the reference to each prompt, [prompt][draw] -> text, cached by everything that fixes them.
    Draw j of every prompt is sampled before draw j + 1 of any (as best-of-N draws)."""
    k = settings.responses_per_prompt
    prompt_ids = [formatter.generation_prompt_ids(p) for p in prompts]
    cache = JsonCache("onpolicy_samples")
    key = JsonCache.key({"model": model_fingerprint(policy), "prompts": prompt_ids, "k": k,
                         "sampling": asdict(settings.sampling), **inference_key_part()})
    cached = cache.load(key)
    if cached is not None:
        log.info("on-policy data: reusing %d x %d cached reference samples (%s)", len(prompts), k, key)
        return cached["responses"]
    model = load_causal_lm(policy)
    with inference_autocast(model.device):  # as evaluation samples
        flat = sample(model, formatter.tokenizer, [ids for _ in range(k) for ids in prompt_ids], settings.sampling,
                      desc=f"on-policy data: {k} samples of {len(prompts)} prompts")
    texts = decode_responses(formatter.tokenizer, flat)
    responses = [[texts[j * len(prompts) + i] for j in range(k)] for i in range(len(prompts))]
    log.info("on-policy data: stored samples at %s", cache.store(key, {"responses": responses}))
    return responses


def candidate_pairs(prompts: list[str], responses: list[list[str]], pairs: str = "disjoint") -> list[tuple[str, str, str]]:
    """(prompt, a, b) for the pairs (`PAIRINGS`) of each prompt's responses; pairs with an empty response are skipped."""
    return [(prompt, a, b) for prompt, drawn in zip(prompts, responses) for a, b in PAIRINGS[pairs](drawn)
            if a.strip() and b.strip()]


def expected_manifest(gold_spec: str, policy: str, settings: OnPolicySettings, label: dict, data: dict) -> dict:
    """What a cached folder must say of itself to be reused for these settings (and its cache key)."""
    on_policy = json.loads(json.dumps(asdict(settings)))
    if on_policy["pairs"] == "disjoint":  # the default is left out, so folders made before `pairs` existed keep their key
        del on_policy["pairs"]
    return {"kind": "on-policy", "gold": gold_spec, "gold_fingerprint": scorer_fingerprint(gold_spec),
            "reference": policy, "reference_fingerprint": model_fingerprint(policy),
            "on_policy": on_policy, **label, **inference_key_part(),
            "chat_template": data.get("chat_template", True)}


def check_manifest(folder: Path, expected: dict) -> dict:
    return labelling.check_manifest(folder / MANIFEST, expected,
                                    "make the data again with `bench label` instead of reusing this folder")


def labelled_folder(expected: dict, data: dict) -> Path:
    sources = make_prompt_source(expected["on_policy"]["prompts"]).fingerprint(data)
    return cache_dir() / "gold_labels" / JsonCache.key({**expected, "sources": sources})


def label(pairs: list[tuple[str, str, str]], scorer, rule: dict) -> tuple[list[dict], dict]:
    """Records in the HH layout (chosen and rejected whole dialogues, with their gold scores) and the counts."""
    prompts = [p for p, _, _ in pairs]
    first = scorer.score(prompts, [a for _, a, _ in pairs]).double().numpy()
    second = scorer.score(prompts, [b for _, _, b in pairs]).double().numpy()
    decided = first != second  # a tie carries no preference
    keep_first = label_pairs(first[decided], second[decided], rule["rule"], rule["temperature"] or 1.0, rule["seed"])
    gold_agrees = (first[decided] > second[decided]) == keep_first
    records = []
    for (prompt, a, b), ga, gb, first_wins in zip([p for p, d in zip(pairs, decided) if d], first[decided],
                                                  second[decided], keep_first):
        (chosen, g_chosen), (rejected, g_rejected) = ((a, ga), (b, gb)) if first_wins else ((b, gb), (a, ga))
        records.append({"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}",
                        "gold_chosen": float(g_chosen), "gold_rejected": float(g_rejected)})
    counts = {"pairs_sampled": len(pairs), "ties_dropped": int((~decided).sum()), "pairs": len(records),
              "flipped": int((~gold_agrees).sum()), "flip_rate": float(1 - gold_agrees.mean()) if len(records) else None,
              "gold_mean": float(np.concatenate([first, second]).mean()),
              "gold_sd": float(np.concatenate([first, second]).std())}
    return records, counts


def write_folder(folder: Path, records: list[dict], manifest: dict) -> None:
    """The records and manifest, atomically: a folder renamed into place (a reader sees all of it or none)."""
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / SUBSET).mkdir(parents=True)
    with gzip.open(partial / SUBSET / "train.jsonl.gz", "wt", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    labelling.publish(partial, folder, manifest, MANIFEST)


def on_policy_source(gold_spec: str, policy: str, settings: OnPolicySettings, rule: dict, data: dict,
                     create: bool) -> tuple[Path, dict]:
    """The cached on-policy folder for these settings and its manifest: made now (sampled, scored, labelled)
    when missing and `create` allows. `rule` holds the label rule, its temperature and seed."""
    expected = expected_manifest(gold_spec, policy, settings, rule, data)
    folder = labelled_folder(expected, data)
    if (folder / MANIFEST).exists():
        manifest = check_manifest(folder, expected)
        log.info("on-policy data: reusing %s (%s)", folder, manifest["counts"])
        return folder, manifest
    if not create:
        raise ConfigError(f"the on-policy data of this recipe is not made yet: run `bench label --recipe NAME` "
                          f"(it samples the reference and labels the pairs once, into {folder})")
    started = time.perf_counter()
    tokenizer = load_tokenizer(policy)
    formatter = Formatter(tokenizer, data.get("chat_template", True), data.get("max_length", 512),
                          data.get("max_prompt_length", 256))
    prompts = source_prompts(settings, data, formatter)
    responses = reference_responses(policy, formatter, prompts, settings)
    records, counts = label(candidate_pairs(prompts, responses, settings.pairs), load_scorer(gold_spec, "gold"), rule)
    counts["prompts"] = len(prompts)
    manifest = {**expected, "counts": counts, "source": str(data["path"]), "seconds": round(time.perf_counter() - started, 1),
                "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_folder(folder, records, manifest)
    log.info("on-policy data: %d pairs of %d prompts (%d ties dropped, %.1f%% flipped against the gold) in %s",
             counts["pairs"], len(prompts), counts["ties_dropped"], 100 * (counts["flip_rate"] or 0), folder)
    return folder, manifest


def describe(manifest: dict, folder: str) -> str:
    """`bench label`'s report of an on-policy folder."""
    counts = manifest["counts"]
    sampling = manifest["on_policy"]["sampling"]
    rule = manifest["rule"] + (f", T {manifest['temperature']}" if manifest.get("temperature") is not None else "")
    return "\n".join([
        f"reference     {manifest['reference']} (fingerprint {manifest['reference_fingerprint'][:12]})",
        f"gold          {manifest['gold']}",
        f"prompts       {counts['prompts']:,} ({manifest['on_policy']['prompts']}) of <= "
        f"{manifest['on_policy']['max_prompt_tokens']} tokens",
        f"samples       {manifest['on_policy']['responses_per_prompt']} per prompt at T {sampling['temperature']}, "
        f"<= {sampling['max_new_tokens']} new tokens",
        f"pairs         {counts['pairs']:,} labelled ({manifest['on_policy'].get('pairs', 'disjoint')} pairs of each "
        f"prompt's samples; {counts['ties_dropped']} gold ties dropped); gold mean "
        f"{counts['gold_mean']:+.3f}, sd {counts['gold_sd']:.3f}",
        f"rule          {rule}, seed {manifest['seed']}: {counts['flipped']:,} labels disagree with the gold "
        f"({(counts['flip_rate'] or 0):.1%})",
        f"labelled copy {folder}",
    ])


@torch.no_grad()
def proxy_gold_agreement(proxy_spec: str, gold_spec: str, data: dict, split: str = "test") -> dict[str, float]:
    """How often the proxy orders the two responses of a held-out pair as the gold does (pairs the gold scores
    equal left out), beside how often the pairs' labels do (the annotator noise the proxy learnt through)."""
    splits, _ = load_splits(data["path"], data.get("subsets"), data.get("val_fraction", 0.1),
                            data.get("test_fraction", 0.1))
    pairs = splits[split]
    prompts, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    gold, proxy = load_scorer(gold_spec, "gold"), load_scorer(proxy_spec, "proxy")
    gold_margin = (gold.score(prompts, chosen) - gold.score(prompts, rejected)).double()
    proxy_margin = (proxy.score(prompts, chosen) - proxy.score(prompts, rejected)).double()
    decided = gold_margin != 0
    return {"eval/proxy_gold_agreement": order_agreement(proxy_margin, gold_margin),
            "eval/label_gold_agreement": (gold_margin[decided] > 0).float().mean().item(),
            "eval/proxy_gold_agreement_pairs": int(decided.sum())}


def order_agreement(margin: torch.Tensor, gold_margin: torch.Tensor) -> float:
    """The share of pairs that a scorer's `margin` (first minus second response) orders as `gold_margin` does,
    of the pairs the gold does not score equal."""
    decided = gold_margin != 0
    return ((margin > 0) == (gold_margin > 0))[decided].float().mean().item()
