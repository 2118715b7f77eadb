"""The algorithm modules on the tiny model: losses at initialisation, learning, and the reference."""

import math

import lightning.pytorch as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.core.errors import ConfigError
from datamodules.hh_datamodule import HHRLHFDataModule
from modules import DPO, IPO, KTO, SFT
from modules.logps import sequence_logps


def datamodule(hh_path, view, **kwargs):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view=view, max_length=96, max_prompt_length=48,
                          batch_size=4, max_train_pairs=32, max_val_pairs=8, **kwargs)
    dm.setup("fit")
    return dm


def first_batch(dm):
    return next(iter(dm.train_dataloader()))


def ready(module):
    module.configure_model()
    return module


def test_sequence_logps_sum_only_response_tokens(hh_path):
    dm = datamodule(hh_path, "sft")
    batch = first_batch(dm)
    module = ready(SFT(policy="tiny"))
    logps = sequence_logps(module.policy, batch)
    logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = logits.log_softmax(-1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    response = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(logps.total, (token_logps * response).sum(-1), atol=1e-4, rtol=1e-5)
    assert logps.tokens.tolist() == response.sum(-1).tolist()
    assert module.head_on_responses == {"policy": True}  # a plain Llama: logits = lm_head(hidden)
    fast = sequence_logps(module.policy, batch, head_on_responses=True)
    torch.testing.assert_close(fast.total, logps.total, atol=1e-4, rtol=1e-5)


def test_losses_at_initialisation(hh_path):
    """With policy == reference every log-ratio is 0, which pins each loss to a known value."""
    paired = first_batch(datamodule(hh_path, "paired"))
    loss, metrics = ready(DPO(policy="tiny", beta=0.1)).loss_and_metrics(paired)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"].item() == 0 and metrics["rewards/accuracies"].item() == 0
    loss, _ = ready(IPO(policy="tiny", tau=0.1)).loss_and_metrics(paired)
    assert loss.item() == pytest.approx(25.0, abs=1e-5)  # (0 - 1/(2*0.1))^2
    loss, metrics = ready(KTO(policy="tiny", beta=0.1)).loss_and_metrics(first_batch(datamodule(hh_path, "unpaired")))
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0)
    assert metrics["kl"].item() == 0


def test_sft_loss_is_token_mean_nll(hh_path):
    batch = first_batch(datamodule(hh_path, "sft"))
    module = ready(SFT(policy="tiny"))
    loss, _ = module.loss_and_metrics(batch)
    logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kto_kl_is_the_mismatched_logratio_clamped(hh_path):
    batch = first_batch(datamodule(hh_path, "unpaired"))
    module = ready(KTO(policy="tiny"))
    with torch.no_grad():  # move the policy away from the reference
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # The module's own log-prob path (output head on response positions only), so that the comparison is
    # of the KL formula, not of float summation order between two paths.
    policy = sequence_logps(module.policy, batch, "kl_", module.head_on_responses["policy"])
    reference = sequence_logps(module.reference, batch, "kl_", module.head_on_responses["reference"])
    expected = (policy.total - reference.total).mean().clamp(min=0)
    torch.testing.assert_close(module.kl_estimate(batch), expected)




def test_dpo_learns_and_keeps_the_reference_frozen(hh_path, tmp_path):
    dm = datamodule(hh_path, "paired")
    module = DPO(policy="tiny", beta=0.5, lr=5e-3, reference_cache=False)  # the reference itself stays frozen
    batch = first_batch(dm)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        limit_train_batches=1, default_root_dir=tmp_path)
    ready(module)
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer.fit(module, datamodule=dm)  # the same single batch, 8 times
    for key, value in module.reference.state_dict().items():
        assert torch.equal(value, reference_before[key]), f"reference weight {key} changed"
    assert any(not torch.equal(v, policy_before[k]) for k, v in module.policy.state_dict().items())
    with torch.no_grad():
        loss, metrics = module.loss_and_metrics(batch)
    assert loss.item() < math.log(2) - 0.05
    assert metrics["rewards/margins"].item() > 0
    assert metrics["rewards/accuracies"].item() >= 0.75
    # The trained policy was saved in HF format at the end of training.
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, module.policy.state_dict()[key])


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: DPO(policy="tiny", beta=0.0), "model.beta"),
        (lambda: DPO(policy="tiny", beta=-1.0), "model.beta"),
        (lambda: IPO(policy="tiny", tau=0.0), "model.tau"),
        (lambda: KTO(policy="tiny", beta=-0.1), "model.beta"),
        (lambda: SFT(policy="tiny", lr=0.0), "model.lr"),
    ],
)
def test_non_positive_hyperparameters_are_rejected(build, field):
    with pytest.raises(ConfigError, match=rf"{field} must be > 0"):
        build()


def test_view_mismatch_is_an_error(hh_path, tmp_path):
    dm = datamodule(hh_path, "sft")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="DPO trains on the 'paired' view, but data.view is 'sft'"):
        trainer.fit(DPO(policy="tiny"), datamodule=dm)
