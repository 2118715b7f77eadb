"""Dropout is off in the policy (and PPO's value backbone) in every forward: training, rollouts and log-prob
passes, as TRL's `disable_dropout` and the DPO reference code. Checked on a tiny model with attention dropout."""

import lightning.pytorch as L
import pytest
import torch

from datamodules.hh_datamodule import HHRLHFDataModule
from modules.dpo import DPO
from modules.grpo import GRPO
from modules.ppo import PPO


def with_dropout(model, p=0.5):
    """The tiny Llama's attention dropout (0 in SmolLM2 and in `tiny`) set to p, as a model that has it."""
    model.config.attention_dropout = p
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
    return model


def data(hh_path, view):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view=view, max_length=96, max_prompt_length=48,
                          batch_size=2, max_train_pairs=4, max_val_pairs=2)
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def test_the_test_model_has_dropout_in_train_mode(hh_path):
    _, batch = data(hh_path, "paired")
    module = DPO(policy="tiny")
    module.configure_model()
    policy = with_dropout(module.policy).train()  # what Lightning's train() used to leave it in
    first, second = (policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for _ in range(2))
    assert not torch.allclose(first, second)


def test_policy_log_probs_have_no_dropout_in_training(hh_path, tmp_path):
    dm, batch = data(hh_path, "paired")
    module = DPO(policy="tiny", reference_cache=False)
    module.configure_model()
    with_dropout(module.policy)
    module.train()  # as Lightning does before training
    assert module.training and not module.policy.training and not module.reference.training
    first, second = module.policy_logps(batch).total, module.policy_logps(batch).total
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert first.requires_grad
    # And through a Trainer: the policy is in eval mode in training_step.
    seen = []
    original = module.loss_and_metrics
    module.loss_and_metrics = lambda b: seen.append(module.policy.training) or original(b)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(module, datamodule=dm)
    assert seen == [False]


@pytest.mark.parametrize("share_value_backbone", [False, True])
def test_ppo_old_log_probs_and_values_equal_the_first_update_s(hh_path, reward_models, share_value_backbone):
    _, batch = data(hh_path, "prompts")
    module = PPO(policy="tiny", proxy=reward_models["proxy"], max_new_tokens=6,
                 share_value_backbone=share_value_backbone)
    module.configure_model()
    with_dropout(module.policy)
    if module.value_backbone is not None:  # a copy of the decoder made before: give it dropout too
        for layer in module.value_backbone.layers:
            layer.self_attn.attention_dropout = 0.5
    module.train()
    rollout = module.rollout(module.sample_responses(batch, 1))
    logprobs, hidden = module.response_logprobs(module.policy, "policy", rollout.sequences)  # as in ppo_updates
    torch.testing.assert_close(logprobs * rollout.mask, rollout.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(module.value_estimates(rollout.sequences, hidden) * rollout.mask, rollout.values,
                               rtol=0, atol=0)


def test_grpo_first_iteration_ratio_is_one_with_a_dropout_model(hh_path, reward_models, monkeypatch):
    _, batch = data(hh_path, "prompts")
    module = GRPO(policy="tiny", proxy=reward_models["proxy"], num_generations=2, max_new_tokens=6)
    module.configure_model()
    with_dropout(module.policy)
    module.train()
    monkeypatch.setattr(module, "update", lambda losses, batch_idx: bool(list(losses)))  # the passes, no step
    metrics = module.train_on(module.sample_responses(batch, 2), 0)
    assert metrics["clip_ratio/region_mean"].item() == 0
