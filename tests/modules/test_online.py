"""RLOO, GRPO and online DPO: their pure losses and advantages against hand values and against TRL's own code
on the same inputs, inside their modules on the tiny model, and their hyperparameters checked at parse time."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import trl.trainer.rloo_trainer as trl_rloo
from trl import GRPOTrainer, RLOOTrainer

from bench.core.errors import ConfigError
from datamodules.hh_datamodule import HHRLHFDataModule
from modules.grpo import GRPO
from modules.losses import dpo_loss, group_advantages, grpo_loss, rloo_advantages, rloo_loss
from modules.online_dpo import OnlineDPO
from modules.rloo import RLOO


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- hand values -----------------------------------------------------------------------------------------
def test_rloo_advantages_and_loss_by_hand():
    # k 3, prompt 0 rewards 1, 2, 6: baselines 4, 3.5, 1.5; prompt 1: all equal -> 0
    torch.testing.assert_close(rloo_advantages(t(1, 2, 6, 5, 5, 5), 3), t(-3, -1.5, 4.5, 0, 0, 0))
    # rho = e^0.5 with A 1: -min(1.65, 1.2) = -1.2; rho 1 with A -2: 2; rho = e^-1 with A -1: -min(-0.37, -0.8) = 0.8
    losses = rloo_loss(t(0.5, 0.0, -1.0), t(0.0, 0.0, 0.0), t(1.0, -2.0, -1.0), 0.2)
    torch.testing.assert_close(losses, t(-1.2, 2.0, 0.8))


def test_group_advantages_by_hand():
    # group 1, 2, 3: mean 2, unbiased std 1 -> -1, 0, 1 (over std + 1e-4)
    torch.testing.assert_close(group_advantages(t(1, 2, 3), 3), t(-1, 0, 1) / (1 + 1e-4))
    torch.testing.assert_close(group_advantages(t(1, 2, 3, 7, 7, 7), 3, scale=False), t(-1, 0, 1, 0, 0, 0))


def test_grpo_loss_aggregations_by_hand():
    # ratio 1 everywhere (one iteration), beta 0: the per-token loss is -A.
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    logprobs = torch.zeros(2, 4)
    advantages = t(1.0, -2.0)
    # dapo: tokens -1 x 4 and +2 x 1 -> (-4 + 2) / 5; grpo: mean(-1, 2) = 0.5; dr_grpo: (-4 + 2) / (2 * 8)
    for loss_type, expected in (("dapo", -2 / 5), ("grpo", 0.5), ("dr_grpo", -2 / 16)):
        loss, clip = grpo_loss(logprobs, logprobs, advantages, mask, 0.2, 0.2, loss_type=loss_type, max_completion_length=8)
        assert loss.item() == pytest.approx(expected) and clip.item() == 0
    # k3 KL of ref - logp = log 2 on each token: 2 - log 2 - 1; padding holding -inf adds nothing
    ref = torch.full((2, 4), math.log(2.0))
    padded = torch.where(mask.bool(), logprobs, torch.tensor(-math.inf))
    loss, _ = grpo_loss(padded, logprobs, torch.zeros(2), mask, 0.2, 0.2, beta=0.5, ref_logprobs=ref)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2)))


# --- TRL's code on the same inputs -----------------------------------------------------------------------
def random_rollout(seed, rows=6, width=5):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (rows, 1), generator=g)).long()
    logprobs = -torch.rand(rows, width, generator=g) * 3
    old = logprobs + 0.3 * torch.randn(rows, width, generator=g)  # ratios both inside and outside the clip
    ref = logprobs + 0.5 * torch.randn(rows, width, generator=g)
    return mask, logprobs, old, ref, torch.randn(rows, generator=g)


def trl_trainer(trainer_class, per_token_logps, **attributes):
    """A TRL trainer with only what `_compute_loss` reads; the model's per-token log-probs are given."""
    trainer = object.__new__(trainer_class)
    accelerator = SimpleNamespace(num_processes=1, device="cpu", process_index=0, gather=lambda x: x,
                                  gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)
    trainer.__dict__.update(
        accelerator=accelerator, model=SimpleNamespace(training=True), aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), **attributes)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (per_token_logps, torch.zeros_like(per_token_logps), None)
    return trainer


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trls(loss_type, beta):
    mask, logprobs, old, ref, advantages = random_rollout(0)
    ours_logprobs = logprobs.clone().requires_grad_()
    trls_logprobs = logprobs.clone().requires_grad_()
    trainer = trl_trainer(GRPOTrainer, trls_logprobs, beta=beta, loss_type=loss_type, epsilon_low=0.2,
                          epsilon_high=0.28, max_completion_length=5)
    inputs = {"prompt_ids": torch.ones(6, 2, dtype=torch.long), "prompt_mask": torch.ones(6, 2, dtype=torch.long),
              "completion_ids": torch.ones(6, 5, dtype=torch.long), "completion_mask": mask, "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    expected = trainer._compute_loss(None, inputs)
    loss, clip_ratio = grpo_loss(ours_logprobs, old, advantages, mask, 0.2, 0.28, beta, ref, loss_type, 5)
    torch.testing.assert_close(loss, expected)
    assert clip_ratio.item() == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][0])
    loss.backward(), expected.backward()
    torch.testing.assert_close(ours_logprobs.grad, trls_logprobs.grad)


def test_rloo_loss_equals_trls():
    mask, logprobs, old, _, advantages = random_rollout(1)
    trainer = trl_trainer(RLOOTrainer, logprobs, epsilon_low=0.2, epsilon_high=0.2)
    inputs = {"prompt_ids": torch.ones(6, 2, dtype=torch.long), "prompt_mask": torch.ones(6, 2, dtype=torch.long),
              "completion_ids": torch.ones(6, 5, dtype=torch.long), "completion_mask": mask, "advantages": advantages,
              "old_logps": (old * mask).sum(1)}
    expected = trainer._compute_loss(None, inputs)
    torch.testing.assert_close(rloo_loss((logprobs * mask).sum(1), (old * mask).sum(1), advantages, 0.2).mean(), expected)


def test_rloo_advantages_equal_trls(monkeypatch):
    """TRL computes them inside `_generate_and_score_completions`: it runs here with generation, the model's
    log-probs and the reward function replaced by fixed values."""
    k, rows = 3, 6
    mask, old, _, ref, _ = random_rollout(2, rows=rows)
    lengths = mask.sum(1).tolist()
    scores = torch.randn(rows, generator=torch.Generator().manual_seed(3))
    reference = object()
    trainer = object.__new__(RLOOTrainer)
    trainer.__dict__.update(
        accelerator=SimpleNamespace(device="cpu", process_index=0, reduce=lambda x, reduction="sum": x),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False), ref_model=reference,
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=SimpleNamespace(per_device_train_batch_size=rows, gradient_checkpointing_kwargs=None), beta=0.05,
        num_generations=k, reward_weights=torch.ones(1), reward_clip_range=None, normalize_advantages=False,
        reward_func_names=["proxy"], _metrics=defaultdict(lambda: defaultdict(list)), log_multimodal=False,
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [], "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={})
    trainer._generate = lambda prompts: ([[1, 2]] * rows, [[5] * n for n in lengths], ["x"] * rows)
    trainer._get_per_token_logps_and_entropies = lambda model, *args, **kwargs: (
        (old if model is trainer.model else ref)[:, : max(lengths)], None, None)
    trainer._calculate_rewards = lambda *args: scores[:, None]
    monkeypatch.setattr(trl_rloo, "gather", lambda x: x)
    monkeypatch.setattr(trl_rloo, "gather_object", lambda x: x)
    output = trainer._generate_and_score_completions([{"prompt": "p"}] * rows)
    kl = ((old - ref) * mask).sum(1)
    torch.testing.assert_close(rloo_advantages(scores - 0.05 * kl, k), output["advantages"])


# --- the modules on the tiny model -------------------------------------------------------------------------
def prompts_batch(hh_path, n=2):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view="prompts", max_length=96, max_prompt_length=48,
                          batch_size=n, max_train_pairs=4, max_val_pairs=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def captured_updates(module, monkeypatch):
    """The loss of each update (the sum of its micro-batches' shares), in place of the optimizer step."""
    losses = []
    monkeypatch.setattr(module, "update", lambda loss, batch_idx: losses.append(
        loss if isinstance(loss, torch.Tensor) else sum(loss)) or True)
    return losses


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_module_loss_is_the_pure_loss_on_its_samples(hh_path, reward_models, monkeypatch, loss_type):
    module = GRPO(policy="tiny", proxy=reward_models["proxy"], num_generations=3, max_new_tokens=6, beta=0.04,
                  loss_type=loss_type)
    module.configure_model()
    with torch.no_grad():  # a policy unlike its reference
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    samples = module.sample_responses(prompts_batch(hh_path), 3)
    assert samples.sequences.query_response.shape[0] == 6 and samples.scores.shape == (6,)
    old, ref = module.old_and_reference_logprobs(samples)
    losses = captured_updates(module, monkeypatch)
    metrics = module.train_on(samples, 0)
    advantages = group_advantages(samples.scores, 3)
    expected, _ = grpo_loss(old, old, advantages, samples.mask, 0.2, 0.2, 0.04, ref, loss_type, 6)
    torch.testing.assert_close(losses[0], expected, atol=1e-5, rtol=1e-5)
    assert {"reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio/region_mean", "completions/mean_length",
            "objective/kl", "objective/scores", "loss"} <= set(metrics)
    assert metrics["kl"].item() > 0 and metrics["clip_ratio/region_mean"].item() == 0  # ratio 1: nothing clipped


def test_rloo_module_loss_is_the_pure_loss_on_its_samples(hh_path, reward_models, monkeypatch):
    module = RLOO(policy="tiny", proxy=reward_models["proxy"], num_generations=2, max_new_tokens=6, beta=0.1)
    module.configure_model()
    samples = module.sample_responses(prompts_batch(hh_path), 2)
    old, ref = module.old_and_reference_logprobs(samples)
    losses = captured_updates(module, monkeypatch)
    metrics = module.train_on(samples, 0)
    # The policy is its reference: the sequence KL is 0 and the reward is the score.
    advantages = rloo_advantages(samples.scores, 2)
    torch.testing.assert_close(advantages, torch.stack([samples.scores[0::2] - samples.scores[1::2],
                                                         samples.scores[1::2] - samples.scores[0::2]], 1).flatten())
    torch.testing.assert_close(losses[0], rloo_loss(old.sum(1), old.sum(1), advantages, 0.2).mean())
    assert metrics["kl"].item() == 0 and {"reward", "reward_std", "objective/rlhf_reward"} <= set(metrics)


@pytest.mark.parametrize("algorithm, settings", [(GRPO, {"loss_type": "dapo"}), (GRPO, {"loss_type": "grpo"}),
                                                 (GRPO, {"loss_type": "dr_grpo"}), (RLOO, {})])
def test_micro_batches_give_the_whole_rollouts_gradient(hh_path, reward_models, monkeypatch, algorithm, settings):
    """Micro-batches of 4 and 2 of a 6-response rollout: the same gradient, loss and metrics as one pass, where
    the policy runs once (its old log-probs are the update's own) instead of once without and once with a graph."""
    module = algorithm(policy="tiny", proxy=reward_models["proxy"], num_generations=3, max_new_tokens=6, beta=0.04,
                       **settings)
    module.configure_model()
    with torch.no_grad():  # a policy unlike its reference
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    samples = module.sample_responses(prompts_batch(hh_path), 3)
    samples.mask[0, 2:], samples.mask[5, 4:] = False, False  # responses of several lengths, as if they had ended
    assert len(samples.scores) == 6 and len(set(samples.mask.sum(1).tolist())) == 3

    forwards = []
    response_logits = module.response_logits
    monkeypatch.setattr(module, "response_logits", lambda model, name, sequences: forwards.append(
        (name, torch.is_grad_enabled())) or response_logits(model, name, sequences))

    def gradients(micro_batch_rows):
        module.hparams.micro_batch_rows = micro_batch_rows
        passes, grads = [], {}
        forwards.clear()

        def update(losses, batch_idx):
            module.policy.zero_grad()
            for loss in losses:
                passes.append(1)
                loss.backward()
            grads.update({n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None})
            return True

        monkeypatch.setattr(module, "update", update)
        return grads, module.train_on(samples, 0), len(passes), sorted(forwards)

    whole, whole_metrics, whole_passes, whole_forwards = gradients(None)
    split, split_metrics, split_passes, split_forwards = gradients(4)
    assert (whole_passes, split_passes) == (1, 2) and whole and whole.keys() == split.keys()
    assert whole_forwards == [("policy", True), ("reference", False)]
    assert split_forwards == [("policy", False)] * 2 + [("policy", True)] * 2 + [("reference", False)] * 2
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)
    for name in whole_metrics:
        torch.testing.assert_close(split_metrics[name], whole_metrics[name], rtol=1e-5, atol=1e-7)


def test_online_dpo_ranks_each_pair_by_the_proxy_and_takes_dpo_on_it(hh_path, reward_models, monkeypatch):
    module = OnlineDPO(policy="tiny", proxy=reward_models["proxy"], max_new_tokens=6, beta=0.2, temperature=0.5)
    module.configure_model()
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    samples = module.sample_responses(prompts_batch(hh_path), 2)
    samples.scores = torch.tensor([1.0, 2.0, 0.5, 0.5])  # pair 0: the second wins; pair 1: a tie, the first
    losses = captured_updates(module, monkeypatch)
    metrics = module.train_on(samples, 0)
    with torch.no_grad():  # at temperature 1, not the sampling temperature
        logits = module.policy(input_ids=samples.sequences.query_response, attention_mask=samples.sequences.attention_mask,
                               position_ids=samples.sequences.position_ids).logits
        ref_logits = module.reference(input_ids=samples.sequences.query_response,
                                      attention_mask=samples.sequences.attention_mask,
                                      position_ids=samples.sequences.position_ids).logits
    width = samples.sequences.context_length
    targets = samples.sequences.query_response[:, width:, None]

    def summed(logits):
        return (logits[:, width - 1 : -1].log_softmax(-1).gather(-1, targets).squeeze(-1) * samples.mask).sum(1)

    logratios = summed(logits) - summed(ref_logits)
    expected = dpo_loss(logratios[[1, 2]], logratios[[0, 3]], 0.2).mean()
    torch.testing.assert_close(losses[0], expected, atol=1e-5, rtol=1e-5)
    assert metrics["objective/scores_margin"].item() == pytest.approx(0.5)
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "val/contain_eos_token",
            "objective/kl"} <= set(metrics)


@pytest.mark.parametrize("build, message", [
    (lambda p: GRPO(policy="tiny", proxy=p, num_generations=1), "model.num_generations (k, responses per prompt) must be >= 2"),
    (lambda p: RLOO(policy="tiny", proxy=p, num_generations=1), "model.num_generations (k, responses per prompt) must be >= 2"),
    (lambda p: GRPO(policy="tiny", proxy=p, beta=-0.1), "model.beta must be >= 0"),
    (lambda p: OnlineDPO(policy="tiny", proxy=p, beta=0.0), "model.beta must be > 0"),
])
def test_bad_hyperparameters_are_refused_in_the_constructor(reward_models, build, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(reward_models["proxy"])


@pytest.mark.parametrize("argv, field, kind", [
    (["rloo", "--model.num_generations=1"], "model.num_generations", "AtLeastTwo"),
    (["grpo", "--model.num_generations=1"], "model.num_generations", "AtLeastTwo"),
    (["grpo", "--model.beta=-0.5"], "model.beta", "NonNegativeFloat"),
    (["grpo", "--model.loss_type=token_sum"], "model.loss_type", "dapo"),
    (["rloo", "--model.micro_batch_rows=0"], "model.micro_batch_rows", "PositiveInt"),
    (["online-dpo", "--model.beta=0"], "model.beta", "PositiveFloat"),
])
def test_bad_hyperparameters_fail_at_parse_time_naming_them(refused_tiny_training, argv, field, kind):
    err = refused_tiny_training(*argv)
    assert field in err and kind in err


@pytest.mark.parametrize("algorithm", ["online-dpo", "rloo", "ppo"])
def test_lightnings_clipping_and_accumulation_are_refused_for_an_online_algorithm_and_a_recipes_clip_left_out(
        refused_tiny_training, algorithm):
    """Lightning clips only under automatic optimisation (it would stop an online run with a traceback); an online
    algorithm clips each update at model.max_grad_norm. A recipe's shared clip is for the offline algorithms."""
    from bench.runs.recipes import for_algorithm

    err = refused_tiny_training(algorithm, "--trainer.gradient_clip_val=1.0")
    assert f"trainer.gradient_clip_val=1.0: {algorithm} clips each of its updates at --model.max_grad_norm" in err
    err = refused_tiny_training(algorithm, "--trainer.accumulate_grad_batches=2")
    assert f"trainer.accumulate_grad_batches=2: {algorithm} takes its optimizer steps itself" in err
    recipe = {"trainer": {"gradient_clip_val": 10.0, "max_steps": 3}, "algorithms": {"dpo": {"model": {"beta": 0.1}}}}
    assert for_algorithm(recipe, algorithm)["trainer"] == {"max_steps": 3}
    assert for_algorithm(recipe, "dpo")["trainer"] == {"gradient_clip_val": 10.0, "max_steps": 3}
