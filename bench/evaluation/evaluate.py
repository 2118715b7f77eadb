"""`bench eval`: win rate against the dataset's chosen response and against the reference policy's own
sample, judge and proxy reward-model scores, the KL behind them, response length and preference accuracy.

`eval/kl` is the exact KL of the policy from the reference at the sampling temperature T
(`eval.sampling.temperature`): for each prompt, the sum over the tokens of the policy's own sample of
KL(pi_T || pi_ref_T) between the two models' next-token distributions softmax(logits / T), over the whole
vocabulary (`modules.logps.sequence_kl`); then the mean over prompts. By the chain rule its expectation is the
KL between the tempered distributions of whole responses, and it is never negative. It is the KL of the
tempered, untruncated distributions (top_p < 1 truncates what the sampler draws from; the recipes sample with
top_p 1), and it is undefined (NaN, with a warning) for greedy sampling. The run's tags `eval.kl_kind` and
`eval.kl_temperature` say so; the samples table (eval/samples.json) holds each prompt's `kl`. It is computed with
autocast off, in the models' own dtype (float32), though the samples are drawn under bf16 autocast: bf16 rounds
the two models differently, and the KL read through it was off by 10-50 % (`samples_kl`; tag `eval.kl_autocast`).
Training logs the same quantity as `val/overopt/kl` (scores along training, also with autocast off) and, from
the training step's own forward passes (bf16 under bf16-mixed), as `objective/kl` (online algorithms).

What was cut is counted: `eval/prompts/truncated_ratio`, the share of prompts longer than
`data.max_prompt_length` tokens (the policy sees their end), and `eval/completions/clipped_ratio`, the share of
the policy's responses that reached `max_new_tokens` without ending in EOS; per prompt, `prompt_truncated` and
`response_at_max` (0/1) in the samples table.

Everything that can fail on bad input (the target, N, the judge) is checked before any generation.
"""

import json
import logging
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import NamedTuple

import mlflow
import torch
import yaml
from mlflow.exceptions import MlflowException
from tqdm.auto import tqdm

import modules
from bench.core import precision
from bench.core.batches import length_batches
from bench.core.errors import BenchError, ConfigError
from bench.core.models import BUILTIN_SPECS, load_causal_lm, load_tokenizer, read_model_config, resolve
from bench.core.settings import check_values
from bench.evaluation.judges import RewardModelJudge, judge_class
from bench.evaluation.metrics import BootstrapMean, WinRate
from bench.runs import tracking
from bench.sampling.generation import (
    SAMPLING_STATS,
    JsonCache,
    Sampling,
    decode_responses,
    reference_samples_key,
    sample,
)
from datamodules.formatting import Formatter
from datamodules.hh_datamodule import Collator
from datamodules.hh_rlhf import Pair, load_splits
from modules.logps import SequenceLogps, head_computes_logits, sequence_kl, sequence_logps
from modules.reference_cache import compute_logps
from modules.reward_model import load_reward_model

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What `bench eval` measures and how. Recipes set these under `eval:`."""

    n_prompts: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    judge: str = "latest"  # a reward-model folder, "latest" (the recipe's newest judge run) or an http(s) URL
    judge_model: str = "gpt-4"  # for an http(s) judge
    judge_prompt: str | None = None  # a template file with {query}, {response_a}, {response_b}; default DPO's
    proxy: str | None = "latest"  # a reward-model folder, "latest", or None for no proxy score
    judge_format: str = "auto"  # how a reward-model judge reads: transcript, pair, chat, or auto (see modules.reward_model)
    proxy_format: str = "auto"
    # bf16 autocast for generation and scoring; by default where the hardware has bf16 arithmetic (elsewhere
    # it is emulated, about 6x slower than fp32)
    bf16: bool = field(default_factory=lambda: precision.bf16_arithmetic())
    confidence: float = 0.95
    split: str = "test"  # "validation" for sweeps: a study must not select on the prompts the tables report
    prompt_seed: int = 0  # which prompts: fixed while sampling.seed varies, so that seeds share their prompts
    pref_accuracy: bool = True  # eval/pref_accuracy(_untrained): two log-prob passes per model over the held-out pairs

    @classmethod
    def from_dict(cls, values: dict | None) -> "EvalSettings":
        values = dict(values or {})
        sampling = Sampling.of(values.pop("sampling", None), "eval.sampling")
        check_values(cls, values, "eval")
        settings = cls(sampling=sampling, **values)
        if settings.n_prompts < 1:
            raise ConfigError(f"eval.n_prompts must be >= 1, got {settings.n_prompts}")
        if settings.split not in ("validation", "test"):
            raise ConfigError(f"eval.split must be 'validation' or 'test', got {settings.split!r}")
        return settings


# What `evaluate` logs, and which way is better. judge_score needs a reward-model judge, proxy_score a proxy.
EVAL_METRICS = {
    "eval/win_rate_vs_chosen": "maximize",
    "eval/win_rate_vs_ref": "maximize",
    "eval/judge_score": "maximize",
    "eval/proxy_score": "maximize",
    "eval/pref_accuracy": "maximize",
    "eval/kl": "minimize",
    "eval/response_len": "maximize",
}


@dataclass
class Target:
    """The policy to evaluate, its reference, and the data settings it was trained with."""

    policy: str
    reference: str
    experiment: str
    data: dict
    run_id: str | None = None
    # The training run's own evaluation made again with the same settings, into that run, replacing what it
    # logged (a comparison does so when the run's eval/kl was taken the old way: `kl_is_current`).
    again: bool = False


def _check_is_policy(spec: str, what: str) -> None:
    folder = Path(resolve(spec))
    if not (folder / "config.json").exists():
        return  # a hub id: transformers checks when it loads
    architectures = read_model_config(folder, f"{what} {spec}").architectures or []
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise BenchError(f"{what} {spec} is not a policy (a causal LM): its architectures are {architectures}; "
                         "a reward model cannot be evaluated as a policy")


def resolve_target(target: str, reference: str | None, data: dict, experiment: str) -> Target:
    """A run id (of a `bench train` run) or a checkpoint: a folder, hub id or built-in model spec."""
    if Path(target).expanduser().exists() or target in BUILTIN_SPECS or "/" in target:
        _check_is_policy(target, "checkpoint")
        return Target(policy=target, reference=reference or target, experiment=experiment, data=data)
    if tracking.store_is_missing():
        raise BenchError(f"no MLflow run {target!r}: there is no MLflow store at {tracking.configured_uri()} yet, and no "
                         "checkpoint at that path")
    client = mlflow.MlflowClient(tracking.tracking_uri())
    try:
        run = client.get_run(target)
    except MlflowException as err:
        raise BenchError(f"no MLflow run {target!r} in {tracking.tracking_uri()}, and no checkpoint at that path") from err
    tags, params = run.data.tags, run.data.params
    if tags.get("algorithm") in modules.registry() and not modules.trains_policy(tags["algorithm"]):
        raise BenchError(f"run {target} trained a reward model ({tags.get('role')}), not a policy")
    output = tags.get("output_path")
    if not output or not Path(output).exists():
        raise BenchError(f"run {target} has no saved policy (output_path tag {output!r})")
    _check_is_policy(output, f"run {target}'s output")
    data_keys = ("path", "subsets", "chat_template", "max_length", "max_prompt_length", "val_fraction", "test_fraction")
    run_data = {key: _param(params.get(f"data.{key}")) for key in data_keys if f"data.{key}" in params}
    policy_spec = params.get("model.policy")
    reference_spec = _param(params.get("model.reference")) or policy_spec
    experiment_name = client.get_experiment(run.info.experiment_id).name
    return Target(policy=output, reference=reference or reference_spec, experiment=experiment_name,
                  data={**data, **run_data}, run_id=target)


def recipe_of_run(target: str) -> str | None:
    """The recipe a `bench train` run was trained with (its `recipe` tag); None for a checkpoint."""
    if Path(target).expanduser().exists() or target in BUILTIN_SPECS or "/" in target:
        return None
    if tracking.store_is_missing():
        return None  # no run at all: resolve_target says so
    try:
        return mlflow.MlflowClient(tracking.tracking_uri()).get_run(target).data.tags.get("recipe")
    except MlflowException:
        return None  # resolve_target says what is wrong with it


def _param(value: str | None):
    """MLflow stores params as strings; the config values were YAML scalars."""
    if value is None or value == "None":
        return None
    return yaml.safe_load(value)


def make_judge(settings: EvalSettings, experiment: str):
    """The judge `settings.judge` names: the registered judge class that accepts the spec
    (`bench.evaluation.judges.judge_class`), built from the settings; one line when the spec is bad."""
    return judge_class(settings.judge).from_settings(settings.judge, settings, experiment)


def make_proxy(settings: EvalSettings, experiment: str, judge):
    if settings.proxy is None:
        return None
    if settings.proxy == "latest":
        try:
            path = tracking.find_reward_model(experiment, "proxy")
        except BenchError as err:
            log.warning("%s; proxy_score is not measured", err)
            return None
    else:
        path = settings.proxy
    if isinstance(judge, RewardModelJudge) and Path(path).resolve() == Path(judge.path).resolve():
        return judge.module
    return load_reward_model(path, role="proxy", input_format=settings.proxy_format)


@torch.no_grad()
def response_logps(model, rows: list[dict], pad_id: int, batch_size: int, desc: str) -> SequenceLogps:
    """Each row's summed completion log-prob and its token count, in batches of similar length (the reference
    cache's `compute_logps`, one loop for both)."""
    fast = head_computes_logits(model)
    sequences = [(row["prompt_ids"], row["completion_ids"]) for row in rows]
    totals = compute_logps(model, sequences, pad_id, batch_size, partial(sequence_logps, head_on_responses=fast),
                           nullcontext, desc=desc)
    return SequenceLogps(torch.tensor([totals[i] for i in range(len(rows))]),
                         torch.tensor([len(completion) for _, completion in sequences]))


# Rows per forward pass of the KL on a CPU: 256 rows of ~100 tokens in one pass took 1.6x as long as in batches of
# 32 rows of similar length (SmolLM2-135M, float32; larger activations leave the caches).
KL_ROWS_PER_CPU_FORWARD = 32


@torch.no_grad()
def samples_kl(policy, reference, rows: list[dict], collate, batch_size: int, temperature: float,
               desc: str = "KL") -> torch.Tensor:
    """Per row (prompt_ids, completion_ids: a sample of the policy), the exact KL of the policy from the
    reference summed over the sample's tokens at the sampling `temperature` (`sequence_kl`), in rows of similar
    length. Autocast is turned off: the forward runs in the models' own dtype (float32 as loaded and as trained
    with bf16-mixed), since bfloat16 rounds the two models differently: under bf16 autocast the KL of
    SmolLM2-135M from a copy with weights perturbed by 1e-3 read 0.371 instead of 0.244 (64 rows of 48 tokens).
    NaN for greedy sampling, which has no distribution to take a KL of."""
    if temperature == 0:
        log.warning("the KL is undefined for greedy sampling (temperature 0): it is reported as NaN")
        return torch.full((len(rows),), float("nan"))
    if reference is policy:  # the policy is its own reference: exactly 0, with no forward pass
        return torch.zeros(len(rows))
    fast = (head_computes_logits(policy), head_computes_logits(reference))
    device = policy.device
    rows_per_forward = min(batch_size, KL_ROWS_PER_CPU_FORWARD) if device.type == "cpu" else batch_size
    batches = length_batches([len(row["prompt_ids"]) + len(row["completion_ids"]) for row in rows], rows_per_forward)
    kls = torch.zeros(len(rows))
    with torch.autocast(device.type, enabled=False):
        for batch_rows in tqdm(batches, desc=desc, unit="batch"):
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in batch_rows]).items()}
            kls[batch_rows] = sequence_kl(policy, reference, batch, temperature, fast).float().cpu()
    return kls


def kl_tags(sampling: Sampling) -> dict[str, str]:
    """What eval/kl is (see the module docstring), for the run's tags."""
    return {"eval.kl_kind": "exact" if sampling.temperature > 0 else "undefined (greedy sampling)",
            "eval.kl_temperature": str(sampling.temperature), "eval.kl_autocast": "off"}


def kl_is_current(tags: dict[str, str]) -> bool:
    """Whether an evaluated run's eval/kl was computed as `samples_kl` computes it now: exact, with autocast off.
    Runs evaluated before (no `eval.kl_autocast` tag) took it under bf16 autocast, which rounds the two models
    differently (0.494 for 0.547 on a DPO policy's 256 samples), or, before `eval.kl_kind`, from log-ratios."""
    return tags.get("eval.kl_autocast") == "off" or tags.get("eval.kl_kind", "").startswith("undefined")


def truncated_prompts(formatter: Formatter, prompts: list[str], prompt_ids: list[list[int]]) -> list[int]:
    """1 for each prompt whose formatted tokens were cut to `max_prompt_length` (the `prompt_ids` the policy
    was given, from `generation_prompt_ids`, are shorter than the whole formatted prompt), else 0."""
    return [int(len(ids) < len(formatter.prompt_ids(prompt))) for prompt, ids in zip(prompts, prompt_ids)]


def responses_at_max(generated: list[list[int]], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """1 for each response that reached `max_new_tokens` without ending in EOS (TRL's clipped completions)."""
    return [int(len(ids) >= max_new_tokens and (not ids or ids[-1] != eos_token_id)) for ids in generated]


def truncation(formatter: Formatter, pairs: list[Pair], prompt_ids: list[list[int]], generated: list[list[int]],
               max_new_tokens: int, eos_token_id: int) -> tuple[dict[str, float], dict[str, list[int]]]:
    """What was cut, as shares (metrics) and per prompt (columns of the samples table)."""
    columns = {"prompt_truncated": truncated_prompts(formatter, [p.prompt for p in pairs], prompt_ids),
               "response_at_max": responses_at_max(generated, max_new_tokens, eos_token_id)}
    ratios = {"eval/prompts/truncated_ratio": sum(columns["prompt_truncated"]) / len(pairs),
              "eval/completions/clipped_ratio": sum(columns["response_at_max"]) / len(pairs)}
    return ratios, columns


def eval_pairs(data: dict, split: str, n_prompts: int, seed: int) -> list[Pair]:
    """The `n_prompts` pairs of `split` that evaluation uses: a seeded sample, in the split's order."""
    splits, _ = load_splits(data["path"], data.get("subsets"), data.get("val_fraction", 0.1),
                            data.get("test_fraction", 0.1))
    prompt_pairs = splits[split]
    if n_prompts > len(prompt_pairs):
        raise ConfigError(f"eval.n_prompts {n_prompts} is larger than the {split} split "
                          f"({len(prompt_pairs)} pairs in {data['path']})")
    return [prompt_pairs[i] for i in sorted(random.Random(seed).sample(range(len(prompt_pairs)), n_prompts))]


class Evaluated(NamedTuple):
    """An evaluation: the run its metrics are logged in (the training run's first, else its own: `eval_run`), and
    the `eval/` metrics. Its figure is `bench.reports.figures.log_win_rates`'s, drawn by the command."""

    run_id: str
    metrics: dict


def evaluate(target: Target, settings: EvalSettings) -> Evaluated:
    """Measure, log to MLflow, and return the `eval/` metrics with the run they are logged in."""
    data = target.data
    pairs = eval_pairs(data, settings.split, settings.n_prompts, settings.prompt_seed)
    judge = make_judge(settings, target.experiment)
    judge.check_reachable()
    proxy = make_proxy(settings, target.experiment, judge)

    tokenizer = load_tokenizer(target.policy)
    formatter = eval_formatter(tokenizer, data)
    prompt_ids = [formatter.generation_prompt_ids(p.prompt) for p in pairs]

    policy = load_causal_lm(target.policy)
    reference = policy if target.reference == target.policy else load_causal_lm(target.reference)
    device = policy.device
    before = replace(SAMPLING_STATS)
    with precision.inference_autocast(device, settings.bf16):
        policy_ids = sample(policy, tokenizer, prompt_ids, settings.sampling, desc="policy samples")
        reference_ids = reference_samples(target.reference, lambda: reference, tokenizer, prompt_ids, settings.sampling,
                                          settings.bf16)
        sampling_seconds = SAMPLING_STATS.since(before).seconds

        # The exact KL(policy || reference) at the sampling temperature, on the policy's own samples.
        sample_rows = [{"prompt_ids": p, "completion_ids": g} for p, g in zip(prompt_ids, policy_ids)]
        collate_sft = Collator("sft", tokenizer.pad_token_id)
        batch_size = settings.sampling.batch_size
        kl = samples_kl(policy, reference, sample_rows, collate_sft, batch_size, settings.sampling.temperature)

        pair_metrics = (preference_accuracies(policy, reference, [formatter.pair(p) for p in pairs],
                                              tokenizer.pad_token_id, batch_size) if settings.pref_accuracy else {})

    policy_text = decode_responses(tokenizer, policy_ids)
    metrics, table = judge_responses(judge, proxy, pairs, policy_text, decode_responses(tokenizer, reference_ids),
                                     settings.confidence)
    ratios, truncation_columns = truncation(formatter, pairs, prompt_ids, policy_ids, settings.sampling.max_new_tokens,
                                            tokenizer.eos_token_id)
    table.update(kl=kl.tolist(), **truncation_columns)
    metrics.update({
        "eval/kl": kl.mean().item(),
        "eval/response_len": sum(len(g) for g in policy_ids) / len(policy_ids),
        "eval/sampling_seconds": sampling_seconds,
        **ratios,
        **pair_metrics,
    })
    return Evaluated(record_eval(target, settings, judge, proxy, metrics, table, pairs), metrics)


def preference_accuracies(policy, reference, pair_rows: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """How often held-out pairs are ranked right by the implicit reward (log-ratio to the reference), and by
    the untrained policy's length-normalised log-probs (the RRHF paper's Table 5 measurement)."""
    n = len(pair_rows)
    # All chosen rows, then all rejected rows.
    response_rows = [{"prompt_ids": r["prompt_ids"], "completion_ids": r[k]}
                     for k in ("chosen_ids", "rejected_ids") for r in pair_rows]
    policy_pairs = response_logps(policy, response_rows, pad_id, batch_size, "pairs: policy")
    reference_pairs = response_logps(reference, response_rows, pad_id, batch_size, "pairs: reference")
    logratios = policy_pairs.total - reference_pairs.total
    untrained = reference_pairs.mean
    return {"eval/pref_accuracy": (logratios[:n] > logratios[n:]).float().mean().item(),
            "eval/pref_accuracy_untrained": (untrained[:n] > untrained[n:]).float().mean().item()}


def eval_formatter(tokenizer, data: dict) -> Formatter:
    return Formatter(tokenizer, data.get("chat_template", True), data.get("max_length", 512),
                     data.get("max_prompt_length", 256))


def reference_samples(reference_spec: str, load_reference, tokenizer, prompt_ids: list[list[int]],
                      sampling: Sampling, autocast: bool) -> list[list[int]]:
    """The reference policy's samples of the prompts, cached on disk and shared by every policy evaluated
    against the same reference, drawn under bf16 autocast where `autocast`, else in fp32 (and keyed by it).
    They draw with seed + 1: evaluating the reference itself then compares two independent samples, not one
    sample with itself. `load_reference()` gives the model on a cache miss."""
    cache = JsonCache("reference_samples")
    reference_sampling = Sampling(**{**asdict(sampling), "seed": sampling.seed + 1})
    key = reference_samples_key(reference_spec, prompt_ids, reference_sampling, autocast)
    cached = cache.load(key)
    if cached is not None:
        log.info("reusing cached reference samples %s (%d prompts)", key, len(cached["generated"]))
        return cached["generated"]
    log.info("generating reference samples (%s, %d prompts); cache key %s", reference_spec, len(prompt_ids), key)
    model = load_reference()
    with precision.inference_autocast(model.device, autocast):
        generated = sample(model, tokenizer, prompt_ids, reference_sampling, desc="reference samples")
    log.info("stored reference samples at %s", cache.store(key, {"generated": generated}))
    return generated


def judge_responses(judge, proxy, pairs: list[Pair], policy_text: list[str], reference_text: list[str],
                    confidence: float) -> tuple[dict[str, float], dict[str, list]]:
    """Win rates against the dataset's chosen responses and the reference's samples, with bootstrap CIs; the
    judge's and the proxy's mean scores; and the per-prompt table that `bench table` pairs runs on."""
    prompts = [p.prompt for p in pairs]
    chosen_text = [p.chosen.strip() for p in pairs]
    metrics: dict[str, float] = {}
    table = {"prompt": prompts, "policy": policy_text, "chosen": chosen_text, "reference": reference_text}

    def add_with_ci(name: str, metric) -> None:
        result = metric.compute()
        metrics[f"eval/{name}"] = result["value"]
        metrics[f"eval/{name}_ci_low"], metrics[f"eval/{name}_ci_high"] = result["ci_low"], result["ci_high"]

    for name, baseline in (("win_rate_vs_chosen", chosen_text), ("win_rate_vs_ref", reference_text)):
        win_rate = WinRate(confidence=confidence)
        outcomes = judge.compare(prompts, policy_text, baseline)
        table[name] = outcomes.tolist()  # per prompt, for paired comparisons between runs (`bench table`)
        win_rate.update(outcomes=outcomes)
        add_with_ci(name, win_rate)
    judge_policy = judge.scores(prompts, policy_text)
    if judge_policy is not None:
        table["judge_policy"] = judge_policy.tolist()
        table["judge_chosen"] = judge.scores(prompts, chosen_text).tolist()
        table["judge_reference"] = judge.scores(prompts, reference_text).tolist()
        score = BootstrapMean(confidence=confidence)
        score.update(judge_policy)
        add_with_ci("judge_score", score)
    if proxy is not None:
        proxy_scores = proxy.score(prompts, policy_text)
        table["proxy_policy"] = proxy_scores.tolist()
        score = BootstrapMean(confidence=confidence)
        score.update(proxy_scores)
        add_with_ci("proxy_score", score)
    return metrics, table


def eval_run(client, target: Target) -> tuple[str, bool]:
    """(the run an evaluation logs into, whether it was made for it). The training run's first evaluation goes
    into that run, and so does that evaluation made `again`; a later one is a run of its own nested under it (tag
    `eval_of`), so the run's `eval/` metrics, params and samples stay one evaluation's and a comparison's table
    keeps reading the evaluation it made."""
    if target.run_id is not None:
        trained = client.get_run(target.run_id)
        if target.again or not any(key.startswith("eval/") for key in trained.data.metrics):
            return target.run_id, False
        run_id = client.create_run(trained.info.experiment_id, run_name=f"{trained.info.run_name}-eval-{datetime.now():%Y%m%d-%H%M%S}",
                                   tags={"mlflow.parentRunId": target.run_id, "eval_of": target.run_id,
                                         "algorithm": "eval", "model": target.policy}).info.run_id
        earlier = trained.data.tags.get("reevaluated_in")
        client.set_tag(target.run_id, "reevaluated_in", f"{earlier},{run_id}" if earlier else run_id)
        log.info("run %s was evaluated before: this evaluation is run %s, nested under it", target.run_id, run_id)
        return run_id, True
    return client.create_run(tracking.experiment_id(client, target.experiment), run_name=f"eval-{Path(target.policy).name}",
                             tags={"algorithm": "eval", "model": target.policy}).info.run_id, True


def run_artifacts(client, run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client.get_run(run_id).info.artifact_uri)


def record_eval(target: Target, settings: EvalSettings, judge, proxy, metrics: dict, table: dict,
                pairs: list[Pair]) -> str:
    """Log into the training run's first evaluation, else into a run of the evaluation's own (`eval_run`)."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run_id, own_run = eval_run(client, target)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    judge_info = judge.describe()
    tags = {f"eval.judge.{k}": v for k, v in judge_info.items()}
    tags["eval.reference"] = target.reference
    tags["eval.proxy"] = getattr(getattr(proxy, "hparams", None), "backbone", "none") if proxy is not None else "none"
    tags.update(kl_tags(settings.sampling))
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    if "eval_skipped" in client.get_run(run_id).data.tags:  # left by a `bench train` that had no judge yet
        client.delete_tag(run_id, "eval_skipped")
    params = {"eval.n_prompts": settings.n_prompts, "eval.confidence": settings.confidence, "eval.split": settings.split,
              "eval.prompt_seed": settings.prompt_seed,
              **{f"eval.sampling.{k}": v for k, v in asdict(settings.sampling).items()}}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    if target.again:  # log_table appends to a table the run already has: this evaluation replaces it
        run_artifacts(client, run_id).delete_artifacts("eval/samples.json")
    client.log_table(run_id, data=table, artifact_file="eval/samples.json")
    tracking.log_datasets(client, run_id, target.data["path"], target.data.get("subsets"), {settings.split: pairs},
                          {settings.split: "evaluation"})
    log.info("eval metrics logged to run %s: %s", run_id, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if own_run:
        client.set_terminated(run_id)
    return run_id


def check_evaluation_possible(recipe_name: str, settings: EvalSettings, why: str = "--eval true",
                              needs_proxy: bool = False) -> None:
    """An evaluation that must happen (`why`) needs a judge: the recipe's, or the experiment's newest judge reward
    model; with `needs_proxy` (a study that selects on the proxy's score), a proxy too."""
    for role, spec, needed in (("judge", settings.judge, True), ("proxy", settings.proxy, needs_proxy)):
        if needed and spec is None:
            raise BenchError(f"{why}: eval.{role} is off (--eval.{role}=PATH)")
        if needed and spec == "latest":
            try:
                tracking.find_reward_model(recipe_name, role)
            except BenchError as err:
                raise BenchError(f"{why}: {err} (--eval.{role}=PATH)") from None


def evaluate_after_training(run_id: str, recipe_name: str, settings: EvalSettings, required: bool) -> Evaluated | None:
    """`bench eval` on the run just trained. Without a judge reward model in the recipe's experiment
    this warns and skips, unless `--eval true` asked for it."""
    if settings.judge == "latest" and not required:
        try:
            tracking.find_reward_model(recipe_name, "judge")
        except BenchError as err:
            log.warning("evaluation skipped: %s. Run `bench eval %s --recipe %s` after training the judge.",
                        err, run_id, recipe_name)
            mlflow.MlflowClient(tracking.tracking_uri()).set_tag(run_id, "eval_skipped", str(err))
            return None
    return evaluate(resolve_target(run_id, None, {}, recipe_name), settings)
