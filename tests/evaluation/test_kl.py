"""The exact KL at the sampling temperature (`modules.logps.token_kl`, `sequence_kl`) that `eval/kl`,
`val/overopt/kl` and the online modules' `objective/kl` report: the chain rule against brute-force enumeration
of every response on a tiny model, the sign error of the old estimator, `bench eval`'s metric, tags and samples
table, the truncation counts, and `objective/kl` of PPO, RLOO, GRPO and online DPO against the models' logits."""

import copy
import itertools
import json
import logging
from types import SimpleNamespace

import mlflow
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bench.evaluation.evaluate
import bench.sampling.generation
from bench.core.batches import IGNORE_INDEX
from bench.core.models import load_causal_lm, load_tokenizer
from bench.evaluation.evaluate import (
    EvalSettings,
    Target,
    eval_formatter,
    eval_pairs,
    responses_at_max,
    truncated_prompts,
)
from bench.runs import tracking
from bench.sampling.generation import Sampling
from datamodules.formatting import Formatter
from datamodules.hh_datamodule import Collator, HHRLHFDataModule
from modules import logps
from modules.grpo import GRPO
from modules.logps import head_computes_logits, sequence_kl, sequence_logps, token_kl
from modules.online_dpo import OnlineDPO
from modules.ppo import PPO
from modules.rloo import RLOO

VOCAB, PROMPT, LENGTH = 8, [1, 2, 3], 3


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """A random 1-layer Llama with an 8-token vocabulary and an untied head, whose distributions are far from
    uniform (large initial weights)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def every_response() -> tuple[torch.Tensor, dict]:
    """All VOCAB ** LENGTH responses to PROMPT, and their rows in `sequence_logps`'s batch format."""
    responses = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
    input_ids = torch.cat([torch.tensor(PROMPT).expand(len(responses), -1), responses], 1)
    labels = input_ids.clone()
    labels[:, : len(PROMPT)] = IGNORE_INDEX
    return responses, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@torch.no_grad()
def tempered_sequence_logps(model, responses: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """log p_T(y | prompt) of each whole response, p_T the model's autoregressive distribution at temperature T,
    in float64."""
    logits = model(input_ids=batch["input_ids"]).logits[:, len(PROMPT) - 1 : -1].double()
    return (logits / temperature).log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1).sum(1)


# --- the KL itself ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("head_on_responses", [False, True])
def test_the_chain_rule_against_every_response(temperature, head_on_responses, monkeypatch):
    """sum_y p_T(y) log(p_T(y) / q_T(y)), enumerated, equals the p_T-expectation of the per-sequence sums of
    per-token KLs: the exact sequence KL; and every per-sequence value is >= 0. In chunks of 100 positions."""
    policy, reference = tiny_llama(0), tiny_llama(1)
    assert head_computes_logits(policy) and head_computes_logits(reference)
    monkeypatch.setattr(logps, "KL_CHUNK_ELEMENTS", 100 * VOCAB)
    responses, batch = every_response()
    log_p = tempered_sequence_logps(policy, responses, batch, temperature)
    log_q = tempered_sequence_logps(reference, responses, batch, temperature)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)  # the enumeration is the whole distribution
    exact = (log_p.exp() * (log_p - log_q)).sum()
    with torch.no_grad():
        per_sequence = sequence_kl(policy, reference, batch, temperature, (head_on_responses, head_on_responses))
    assert per_sequence.shape == (VOCAB**LENGTH,) and (per_sequence >= 0).all()
    assert exact.item() > 0.1  # two different models: a KL worth checking
    assert (log_p.exp() * per_sequence.double()).sum().item() == pytest.approx(exact.item(), rel=1e-5)
    # The KL is of the tempered distributions: at another temperature it is another number.
    other = sequence_kl(policy, reference, batch, temperature * 1.5)
    assert (log_p.exp() * other.double()).sum().item() != pytest.approx(exact.item(), rel=1e-2)


def test_token_kl_by_hand_and_its_refusals():
    # p = (1/2, 1/2) at T 1; q = softmax(0, log 3) = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    policy = torch.zeros(1, 2)
    reference = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]])
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    torch.testing.assert_close(token_kl(policy, reference, 1.0), expected[None])
    # bf16 logits give a float32 KL; a model with itself gives exactly 0
    same = torch.randn(4, 3, 50).bfloat16()
    kl = token_kl(same, same, 0.7)
    assert kl.dtype == torch.float32 and kl.shape == (4, 3) and (kl == 0).all()
    with pytest.raises(ValueError, match="temperature 0.0 is not defined"):
        token_kl(policy, reference, 0.0)
    with pytest.raises(ValueError, match="share a vocabulary"):
        token_kl(policy, torch.zeros(1, 3), 1.0)


def test_the_old_estimator_was_negative_where_the_kl_is_positive():
    """The policy's logits are the reference's times T (its head scaled by 0.7): sampled at T 0.7, it draws from
    the untempered reference, so the old quantity (untempered log pi - log pi_ref of the samples) has
    expectation -KL(pi_ref || pi) < 0. Expectations are exact, over every response."""
    temperature = 0.7
    reference = tiny_llama(2)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.lm_head.weight.mul_(temperature)
    responses, batch = every_response()
    sampling_probability = tempered_sequence_logps(policy, responses, batch, temperature).exp()
    with torch.no_grad():
        old = (sequence_logps(policy, batch).total - sequence_logps(reference, batch).total).double()
        exact = sequence_kl(policy, reference, batch, temperature).double()
    old_expectation = (sampling_probability * old).sum().item()
    exact_expectation = (sampling_probability * exact).sum().item()
    assert old_expectation < -0.01 and exact_expectation > 0.01
    assert (old < 0).any() and (exact >= 0).all()


# --- bench eval ------------------------------------------------------------------------------------------------
def test_truncation_counts_on_a_constructed_case(tokenizer):
    formatter = Formatter(tokenizer, chat_template=False, max_length=64, max_prompt_length=12)
    prompts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: " + "tell me a very long story " * 4 + "\n\nAssistant:"]
    prompt_ids = [formatter.generation_prompt_ids(p) for p in prompts]
    assert len(formatter.prompt_ids(prompts[0])) <= 12 < len(formatter.prompt_ids(prompts[1]))
    assert truncated_prompts(formatter, prompts, prompt_ids) == [0, 1]
    eos = tokenizer.eos_token_id
    # at the limit without EOS; at the limit ending in EOS (it ended); shorter with EOS; shorter without
    generated = [[5, 6, 7], [5, 6, eos], [5, eos], [5, 6]]
    assert responses_at_max(generated, 3, eos) == [1, 0, 0, 0]


@pytest.fixture
def perturbed_tiny(tmp_path):
    """The tiny policy with its weights moved: a checkpoint that differs from its reference ("tiny")."""
    model, tokenizer = load_causal_lm("tiny"), load_tokenizer("tiny")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    folder = tmp_path / "perturbed"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_eval_kl_is_the_exact_kl_of_the_policys_samples(workdir, hh_path, reward_models, perturbed_tiny,
                                                         monkeypatch):
    monkeypatch.setattr(bench.sampling.generation, "cache_dir", lambda: workdir / "cache")
    settings = EvalSettings(n_prompts=6, sampling=Sampling(temperature=0.7, max_new_tokens=5, batch_size=4),
                            judge=reward_models["judge"], proxy=None, pref_accuracy=False)
    # A prompt limit between the eval prompts' lengths: some are cut, some are not.
    tokenizer = load_tokenizer("tiny")
    pairs = eval_pairs({"path": hh_path}, settings.split, settings.n_prompts, settings.prompt_seed)
    lengths = sorted(len(eval_formatter(tokenizer, {}).prompt_ids(p.prompt)) for p in pairs)
    assert lengths[0] < lengths[-1]
    data = {"path": hh_path, "max_prompt_length": lengths[2], "max_length": lengths[2] + 64}
    drawn = {}  # by desc: the prompt ids and what was sampled
    real_sample = bench.evaluation.evaluate.sample

    def recorded_sample(model, tok, prompt_ids, sampling, desc, **kwargs):
        drawn[desc] = (prompt_ids, real_sample(model, tok, prompt_ids, sampling, desc, **kwargs))
        return drawn[desc][1]

    monkeypatch.setattr(bench.evaluation.evaluate, "sample", recorded_sample)

    metrics = bench.evaluation.evaluate.evaluate(Target(perturbed_tiny, "tiny", "kl-test", data), settings).metrics

    prompt_ids, generated = drawn["policy samples"]
    rows = [{"prompt_ids": p, "completion_ids": g} for p, g in zip(prompt_ids, generated)]
    policy, reference = load_causal_lm(perturbed_tiny), load_causal_lm("tiny")
    expected = []
    with torch.no_grad():  # in float32, though evaluate samples under bf16 autocast
        for start in range(0, len(rows), 4):
            batch = Collator("sft", tokenizer.pad_token_id)(rows[start : start + 4])
            expected.append(sequence_kl(policy, reference, batch, 0.7, (True, True)).float())
    expected = torch.cat(expected)
    assert (expected > 0).all()
    assert metrics["eval/kl"] == pytest.approx(expected.mean().item(), rel=1e-4)

    client = mlflow.MlflowClient(tracking.tracking_uri())  # not mlflow's global URI, which other tests leave set
    (run,) = client.search_runs([client.get_experiment_by_name("kl-test").experiment_id])
    assert run.data.tags["eval.kl_kind"] == "exact" and run.data.tags["eval.kl_temperature"] == "0.7"
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval/samples.json")).read())
    columns = {name: [row[i] for row in table["data"]] for i, name in enumerate(table["columns"])}
    torch.testing.assert_close(torch.tensor(columns["kl"]), expected, rtol=1e-4, atol=1e-6)
    # Made again into the same run (as `bench compare` does for a KL taken the old way), the evaluation replaces
    # its samples table, which MLflow's log_table would otherwise append to, and makes no run of its own.
    again = Target(perturbed_tiny, "tiny", "kl-test", data, run_id=run.info.run_id, again=True)
    assert bench.evaluation.evaluate.evaluate(again, settings).run_id == run.info.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval/samples.json")).read())
    assert len(table["data"]) == settings.n_prompts
    cut = [int(length > lengths[2]) for length in (len(eval_formatter(tokenizer, {}).prompt_ids(p.prompt))
                                                   for p in pairs)]
    assert columns["prompt_truncated"] == cut and 0 < sum(cut) < len(cut)
    assert metrics["eval/prompts/truncated_ratio"] == pytest.approx(sum(cut) / len(cut))
    at_max = [int(len(g) == 5 and g[-1] != tokenizer.eos_token_id) for g in generated]
    assert columns["response_at_max"] == at_max
    assert metrics["eval/completions/clipped_ratio"] == pytest.approx(sum(at_max) / len(at_max))


def test_greedy_evaluation_has_no_kl(caplog):
    rows = [{"prompt_ids": [1, 2], "completion_ids": [3]}]
    with caplog.at_level(logging.WARNING, logger="bench.evaluation.evaluate"):
        kl = bench.evaluation.evaluate.samples_kl(None, None, rows, None, 4, temperature=0)
    assert torch.isnan(kl).all() and "undefined for greedy sampling" in caplog.text
    assert bench.evaluation.evaluate.kl_tags(Sampling(temperature=0))["eval.kl_kind"].startswith("undefined")


# --- the online modules' objective/kl ------------------------------------------------------------------------
def prompts_batch(hh_path, n=2):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view="prompts", max_length=96, max_prompt_length=48,
                          batch_size=n, max_train_pairs=4, max_val_pairs=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@torch.no_grad()
def kl_from_full_logits(module, samples) -> torch.Tensor:
    """Per response, the exact KL at the sampling temperature, from both models' full forward passes in
    float64: computed apart from the modules' code."""
    sequences, temperature = samples.sequences, module.hparams.temperature
    inputs = {"input_ids": sequences.query_response, "attention_mask": sequences.attention_mask,
              "position_ids": sequences.position_ids}
    width = sequences.context_length
    log_p = (module.policy(**inputs).logits[:, width - 1 : -1].double() / temperature).log_softmax(-1)
    log_q = (module.reference(**inputs).logits[:, width - 1 : -1].double() / temperature).log_softmax(-1)
    return ((log_p.exp() * (log_p - log_q)).sum(-1) * samples.mask).sum(1)


@pytest.mark.parametrize("build", [
    lambda proxy: PPO(policy="tiny", proxy=proxy, max_new_tokens=6, ppo_epochs=2, temperature=0.7),
    lambda proxy: RLOO(policy="tiny", proxy=proxy, num_generations=2, max_new_tokens=6, micro_batch_rows=3),
    lambda proxy: GRPO(policy="tiny", proxy=proxy, num_generations=2, max_new_tokens=6, temperature=0.9),
    lambda proxy: OnlineDPO(policy="tiny", proxy=proxy, max_new_tokens=6, temperature=0.5),
], ids=["ppo", "rloo-micro-batches", "grpo", "online-dpo"])
def test_objective_kl_is_the_exact_kl_of_the_rollout(hh_path, reward_models, monkeypatch, build):
    """In a training step, whose updates move the policy, and in a validation step: objective/kl is the mean
    exact KL of the rollout under the policy that sampled it, recomputed from the two models' logits."""
    module = build(reward_models["proxy"])
    module.configure_model()
    with torch.no_grad():  # a policy unlike its reference
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    expected, logged = [], {}
    real_sample_responses = module.sample_responses

    def sample_responses(batch, per_prompt):
        samples = real_sample_responses(batch, per_prompt)
        expected.append(kl_from_full_logits(module, samples))  # before any update
        return samples

    def update(losses, batch_idx):  # an optimizer step, in effect: the policy moves
        for _ in [losses] if isinstance(losses, torch.Tensor) else losses:
            pass
        with torch.no_grad():
            for p in module.policy.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return True

    monkeypatch.setattr(module, "sample_responses", sample_responses)
    monkeypatch.setattr(module, "update", update)
    monkeypatch.setattr(module, "lr_schedulers", lambda: SimpleNamespace(step=lambda: None))
    monkeypatch.setattr(module, "log_skipped_batches", lambda: None)
    monkeypatch.setattr(module, "log_metrics", lambda stage, metrics, *args, **kwargs: logged.update({stage: metrics}))
    batch = prompts_batch(hh_path)
    module.training_step(batch, 0)
    module.validation_step(batch, 0)
    for stage, kl in zip(("train", "val"), expected):
        assert (kl >= 0).all() and kl.mean() > 0
        assert logged[stage]["objective/kl"].item() == pytest.approx(kl.mean().item(), rel=1e-4), stage
        assert "objective/kl_estimate" in logged[stage]


def test_scores_along_training_log_the_exact_kl_and_take_a_computable_gold(hh_path, reward_models, perturbed_tiny,
                                                                           monkeypatch):
    """`val/overopt/kl` is the mean `sequence_kl` of the policy's samples at the callback's temperature, and a
    computable reward (`reward:vader`) can be the gold."""
    from contextlib import nullcontext

    import bench.evaluation.overoptimisation
    from bench.evaluation.overoptimisation import ScoresAlongTraining
    from bench.evaluation.rewards import make_reward

    tokenizer = load_tokenizer("tiny")
    module = SimpleNamespace(policy=load_causal_lm(perturbed_tiny), reference=load_causal_lm("tiny"),
                             tokenizer=tokenizer)
    logged = {}
    data = {"path": hh_path, "subsets": None, "val_fraction": 0.1, "test_fraction": 0.1, "chat_template": True,
            "max_length": 96, "max_prompt_length": 48}
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, datamodule=SimpleNamespace(hparams=data),
                              precision_plugin=SimpleNamespace(forward_context=nullcontext),
                              loggers=[SimpleNamespace(log_metrics=lambda metrics, step: logged.update(metrics))])
    drawn = []
    real_sample = bench.evaluation.overoptimisation.sample
    monkeypatch.setattr(bench.evaluation.overoptimisation, "sample",
                        lambda *args, **kwargs: drawn.append(real_sample(*args, **kwargs)) or drawn[-1])
    callback = ScoresAlongTraining("reward:vader", reward_models["proxy"], n_prompts=3,
                                   sampling={"temperature": 0.8, "max_new_tokens": 5, "batch_size": 2})
    callback.on_train_start(trainer, module)

    rows = [{"prompt_ids": p, "completion_ids": g} for p, g in zip(callback.prompt_ids, drawn[0])]
    with torch.no_grad():
        expected = sequence_kl(module.policy, module.reference, Collator("sft", tokenizer.pad_token_id)(rows), 0.8)
    assert (expected > 0).all()
    assert logged["val/overopt/kl"] == pytest.approx(expected.mean().item(), rel=1e-4)
    texts = bench.sampling.generation.decode_responses(tokenizer, drawn[0])
    gold = make_reward("reward:vader").score(callback.prompts, texts).mean().item()
    assert logged["val/overopt/gold_score"] == pytest.approx(gold)


def test_response_logps_sum_and_count_each_rows_completion_in_length_sorted_batches():
    # evaluation's pair log-probs go through the reference cache's batching loop (one loop for both): rows of
    # different lengths, batched in another order, still give each row its own sum and token count
    from bench.evaluation.evaluate import response_logps

    model = tiny_llama(seed=3)
    rows = [{"prompt_ids": [1, 2, 3][: 1 + i % 3], "completion_ids": [4, 5, 6, 7, 1][: 1 + (i * 2) % 5]} for i in range(7)]
    got = response_logps(model, rows, pad_id=0, batch_size=3, desc="test")
    for i, row in enumerate(rows):
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        labels = ids.clone()
        labels[:, : len(row["prompt_ids"])] = IGNORE_INDEX
        alone = sequence_logps(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        torch.testing.assert_close(got.total[i], alone.total[0].float(), rtol=1e-5, atol=1e-5)
        assert got.tokens[i] == len(row["completion_ids"])


def test_samples_kl_is_float32_under_bf16_autocast_and_keeps_each_rows_order():
    # Evaluation samples under bf16 autocast, which rounds the two models differently (a KL of 0.371 for 0.244 on
    # SmolLM2-135M): samples_kl turns it off, and its length-sorted batches still give each row its own KL.
    from bench.evaluation.evaluate import samples_kl

    policy, reference = tiny_llama(seed=3), tiny_llama(seed=4)
    rows = [{"prompt_ids": [1, 2, 3][: 1 + i % 3], "completion_ids": [4, 5, 6, 7, 1][: 1 + (i * 2) % 5]} for i in range(7)]
    collate = Collator("sft", pad_id=0)
    alone = torch.stack([sequence_kl(policy, reference, collate([row]), 0.7)[0] for row in rows])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = torch.stack([sequence_kl(policy, reference, collate([row]), 0.7)[0] for row in rows])
        got = samples_kl(policy, reference, rows, collate, batch_size=3, temperature=0.7)
    assert (rounded - alone).abs().max() > 1e-3  # bf16 would have shown
    torch.testing.assert_close(got, alone.float(), rtol=1e-5, atol=1e-6)
