"""RRHF's ranked candidates: for each prompt, the dataset's chosen and rejected responses plus
k - 2 samples from the initial policy, every one scored by the proxy reward model.

Sampling and scoring are the slow part, so both are cached on disk, keyed by the policy's and the
proxy's weights, the prompts and responses, and the sampling settings. Sweep trials and reruns reuse them.
"""

import logging
from collections.abc import Callable
from dataclasses import asdict

from bench.core.errors import ConfigError
from bench.core.models import load_causal_lm
from bench.core.precision import inference_autocast, inference_key_part
from bench.sampling.generation import JsonCache, Sampling, decode_responses, model_fingerprint, sample
from datamodules.formatting import Formatter
from datamodules.hh_rlhf import Pair

log = logging.getLogger(__name__)


def check_num_candidates(num_candidates: int) -> None:
    if num_candidates < 2:
        raise ConfigError(f"data.num_candidates (RRHF's k) must be >= 2: chosen and rejected at least, got "
                          f"{num_candidates}")


def ranked_rows(
    pairs: list[Pair],
    formatter: Formatter,
    policy: str,
    proxy: str,
    num_candidates: int,
    sampling: Sampling,
    load_proxy: Callable[[str, bool], object],
    allow_judge_as_proxy: bool = False,
    split: str = "train",
) -> list[dict]:
    """Rows of prompt_ids, k candidate_ids, their proxy rewards, and which candidates are valid
    (a sample that decodes to empty text is not a response, so it is masked out, and counted). `load_proxy(proxy,
    allow_judge_as_proxy)` gives the scorer (`modules.reward_model.load_proxy`): passed in, so that the data layer
    does not import the modules above it."""
    check_num_candidates(num_candidates)
    samples_per_prompt = num_candidates - 2
    prompt_ids = [formatter.generation_prompt_ids(p.prompt) for p in pairs]
    cache = JsonCache("rrhf_candidates")
    key = JsonCache.key({
        "policy": model_fingerprint(policy),
        "proxy": model_fingerprint(proxy),
        "prompts": prompt_ids,
        "responses": [[p.chosen, p.rejected] for p in pairs],
        "samples_per_prompt": samples_per_prompt,
        "sampling": asdict(sampling),
        **inference_key_part(),  # the precision the policy samples and the proxy scores in
    })
    cached = cache.load(key)
    if cached is not None and len(cached.get("rewards", [])) == len(pairs):
        log.info("RRHF %s: reusing cached candidates and proxy scores %s (%d prompts, k=%d)",
                 split, cache.path(key), len(pairs), num_candidates)
    else:
        cached = score_candidates(pairs, prompt_ids, formatter, policy, load_proxy(proxy, allow_judge_as_proxy),
                                  samples_per_prompt, sampling, split)
        log.info("RRHF %s: stored candidates and proxy scores at %s", split, cache.store(key, cached))
    rows, invalid = [], 0
    eos = [formatter.tokenizer.eos_token_id]
    for i, pair in enumerate(pairs):
        dataset_responses = [formatter.response_ids(pair.chosen), formatter.response_ids(pair.rejected)]
        prompt, candidates = formatter.truncate(prompt_ids[i], dataset_responses + (cached["samples"][i] or []))
        valid = [True, True] + [bool(text) for text in cached["texts"][i]]
        invalid += valid.count(False)
        # An empty completion still needs one token to have a log-prob; it is masked out anyway.
        rows.append({"prompt_ids": prompt, "candidate_ids": [c or eos for c in candidates],
                     "rewards": cached["rewards"][i], "candidate_valid": valid})
    if invalid:
        log.warning("RRHF %s: %d of %d sampled candidates decoded to empty text and are masked out",
                    split, invalid, len(pairs) * samples_per_prompt)
    return rows


def score_candidates(
    pairs: list[Pair],
    prompt_ids: list[list[int]],
    formatter: Formatter,
    policy: str,
    reward_model,
    samples_per_prompt: int,
    sampling: Sampling,
    split: str,
) -> dict:
    """Sample from the policy and score chosen, rejected and every sample with the proxy (`reward_model`, loaded
    first: a bad proxy fails before any sampling)."""
    samples: list[list[list[int]]] = [[] for _ in pairs]
    texts: list[list[str]] = [[] for _ in pairs]
    if samples_per_prompt:
        model = load_causal_lm(policy)
        with inference_autocast(model.device):
            generated = sample(model, formatter.tokenizer, [p for p in prompt_ids for _ in range(samples_per_prompt)],
                               sampling, desc=f"RRHF {split} candidates")
        decoded = decode_responses(formatter.tokenizer, generated)
        for n, (ids, text) in enumerate(zip(generated, decoded)):
            samples[n // samples_per_prompt].append(ids)
            texts[n // samples_per_prompt].append(text)
        del model
    prompts = [p.prompt for p in pairs]
    responses = [[p.chosen, p.rejected, *t] for p, t in zip(pairs, texts)]
    k = 2 + samples_per_prompt
    flat_scores = reward_model.score([p for p in prompts for _ in range(k)], [r for rs in responses for r in rs])
    rewards = flat_scores.view(len(pairs), k).tolist()
    return {"samples": samples, "texts": texts, "rewards": rewards}
