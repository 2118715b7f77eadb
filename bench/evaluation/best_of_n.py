"""Best-of-N: for each evaluation prompt, sample the reference policy N times and keep the sample the proxy
reward model likes best. The baseline of the DPO paper (Fig. 3), AlpacaFarm and Gao et al. 2023.

Samples are drawn once for the largest N and cached; a smaller N takes the first N draws of each prompt, so
every N shares them. Each N is judged like any policy (`bench.evaluation.evaluate.judge_responses`), and its KL to the
reference is bounded by the analytic log N - (N - 1) / N (Beirami et al. 2024: an upper bound, not the KL),
logged as `eval/kl` with the tag `eval.kl_kind` = `bound`. With `pick="gold"` the sample the gold (the judge)
likes best is kept instead: best-of-N by the gold is a ceiling, not an algorithm.
"""

import logging
import math
from dataclasses import asdict

import mlflow
import torch

from bench.core.errors import ConfigError
from bench.core.models import load_causal_lm, load_tokenizer
from bench.core.precision import cache_key_part, inference_autocast
from bench.evaluation.evaluate import (
    EvalSettings,
    Target,
    eval_formatter,
    eval_pairs,
    judge_responses,
    make_judge,
    make_proxy,
    record_eval,
    reference_samples,
)
from bench.runs import tracking
from bench.sampling.generation import JsonCache, decode_responses, model_fingerprint, sample

log = logging.getLogger(__name__)

ALGORITHM = "best-of-n"


PICKS = ("proxy", "gold")


def best_of_n_kl(n: int) -> float:
    """The upper bound log n - (n - 1) / n on KL(best-of-n || reference) (Stiennon et al. 2020; Beirami et al.
    2024 show it is a bound, reached only when no two samples share a reward)."""
    return math.log(n) - (n - 1) / n


def check_ns(ns) -> list[int]:
    if not ns or any(not isinstance(n, int) or n < 1 for n in ns):
        raise ConfigError(f"best_of_n must be a list of integers >= 1, got {ns!r}")
    return sorted(set(ns))


def best_of(scores: torch.Tensor, n: int) -> torch.Tensor:
    """For each prompt (row), the index of the highest-scoring of its first `n` samples (columns)."""
    return scores[:, :n].argmax(dim=1)


def draws(reference, tokenizer, prompt_ids: list[list[int]], settings: EvalSettings, n_max: int) -> list[list[list[int]]]:
    """`n_max` samples of each prompt: [prompt][draw] -> token ids, cached. Draw j of every prompt comes before
    draw j + 1 of any, so that a row's random stream (its position) does not depend on `n_max`."""
    cache = JsonCache("best_of_n")
    key = JsonCache.key({"model": model_fingerprint(reference), "prompts": prompt_ids, "n": n_max,
                         "sampling": asdict(settings.sampling), **cache_key_part(settings.bf16)})
    cached = cache.load(key)
    if cached is not None:
        log.info("best-of-N: reusing %d cached samples of each of %d prompts (%s)", n_max, len(prompt_ids), key)
        return cached["draws"]
    model = load_causal_lm(reference)
    with inference_autocast(model.device, settings.bf16):
        flat = sample(model, tokenizer, [p for _ in range(n_max) for p in prompt_ids], settings.sampling,
                      desc=f"best-of-{n_max} samples")
    by_prompt = [[flat[j * len(prompt_ids) + i] for j in range(n_max)] for i in range(len(prompt_ids))]
    log.info("best-of-N: stored samples at %s", cache.store(key, {"draws": by_prompt}))
    return by_prompt


def stage_name(n: int, pick: str) -> str:
    return f"best-of-{n}" + ("" if pick == "proxy" else f"-{pick}")


def evaluate_best_of_n(reference: str, data: dict, settings: EvalSettings, ns: list[int], experiment: str,
                       tags: dict[str, str] | None = None, pick: str = "proxy") -> dict[int, str]:
    """One MLflow run per N with the `eval/` metrics of a policy; returns {N: run id}. `pick`: which scorer
    chooses among the N samples, the proxy (the method) or the gold judge (a ceiling)."""
    ns = check_ns(ns)
    if pick not in PICKS:
        raise ConfigError(f"best-of-N picks by one of {', '.join(PICKS)}, got {pick!r}")
    if settings.proxy is None:
        raise ConfigError("best-of-N picks by the proxy reward model: eval.proxy must name one")
    pairs = eval_pairs(data, settings.split, settings.n_prompts, settings.prompt_seed)
    judge = make_judge(settings, experiment)
    judge.check_reachable()
    proxy = make_proxy(settings, experiment, judge)
    if proxy is None:
        raise ConfigError(f"best-of-N needs a proxy reward model in experiment {experiment!r} (eval.proxy)")
    tokenizer = load_tokenizer(reference)
    prompt_ids = [eval_formatter(tokenizer, data).generation_prompt_ids(p.prompt) for p in pairs]
    samples = draws(reference, tokenizer, prompt_ids, settings, max(ns))
    texts = [decode_responses(tokenizer, prompt_draws) for prompt_draws in samples]
    prompts = [p.prompt for p in pairs]
    flat_prompts, flat_texts = [p for p, row in zip(prompts, texts) for _ in row], [t for row in texts for t in row]
    scorer = proxy.score if pick == "proxy" else judge.scores
    pick_scores = scorer(flat_prompts, flat_texts)
    if pick_scores is None:
        raise ConfigError(f"best-of-N by the gold needs a judge that scores responses; {judge.describe()} only compares")
    pick_scores = pick_scores.view(len(prompts), max(ns))
    reference_ids = reference_samples(reference, lambda: load_causal_lm(reference), tokenizer, prompt_ids,
                                      settings.sampling, settings.bf16)
    reference_text = decode_responses(tokenizer, reference_ids)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    runs = {}
    for n in ns:
        chosen = best_of(pick_scores, n).tolist()
        policy_text = [row[j] for row, j in zip(texts, chosen)]
        metrics, table = judge_responses(judge, proxy, pairs, policy_text, reference_text, settings.confidence)
        metrics.update({"eval/kl": best_of_n_kl(n),
                        "eval/response_len": sum(len(samples[i][j]) for i, j in enumerate(chosen)) / len(chosen)})
        run = client.create_run(tracking.experiment_id(client, experiment), run_name=stage_name(n, pick),
                                tags={"algorithm": ALGORITHM, "best_of_n": str(n), "best_of_n_pick": pick,
                                      "model": reference, "mlflow.source.name": "bench compare (best-of-N)",
                                      **(tags or {})})
        client.log_param(run.info.run_id, "best_of_n", n)
        record_eval(Target(policy=f"best-of-{n}({reference})", reference=reference, experiment=experiment,
                           data=data, run_id=run.info.run_id), settings, judge, proxy, metrics, table, pairs)
        client.set_tag(run.info.run_id, "eval.kl_kind", "bound")  # after record_eval, which tags exact KLs
        client.set_terminated(run.info.run_id)
        runs[n] = run.info.run_id
        log.info(f"{stage_name(n, pick)}: win rate vs chosen %.3f, proxy %.3f, KL <= %.3f", metrics["eval/win_rate_vs_chosen"],
                 metrics.get("eval/proxy_score", float("nan")), metrics["eval/kl"])
    return runs
