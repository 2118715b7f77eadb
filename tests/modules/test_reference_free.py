"""SimPO, ORPO and SLiC-HF: their pure losses against hand values and against TRL's own code on the same
random inputs, inside their modules, with no reference model, and their hyperparameters checked at parse time."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.core.errors import ConfigError
from datamodules.hh_datamodule import HHRLHFDataModule
from modules.losses import log1mexp, orpo_loss, simpo_loss, slic_loss
from modules.orpo import ORPO
from modules.simpo import SimPO
from modules.slic import SLiC

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL's experimental-API notice
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def trl(trainer_class, **attributes):
    """A TRL trainer with only the attributes its loss method reads (its __init__ needs a model and data)."""
    trainer = object.__new__(trainer_class)
    trainer.__dict__.update(accelerator=SimpleNamespace(device="cpu"), alpha=0.0, label_smoothing=0.0, **attributes)
    return trainer


def random_logps(seed, n=64, low=-3.0):
    """Length-averaged (or summed) log-probs in [low, -0.01): ORPO's odds need probabilities below 1."""
    g = torch.Generator().manual_seed(seed)
    return tuple(low + (low * -1 - 0.01) * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(2))


def test_simpo_loss_by_hand_and_equal_to_trl():
    # beta 2, gamma 1: c - r = 0.5 -> -log sigmoid(0) = log 2; c - r = 1 -> -log sigmoid(1)
    torch.testing.assert_close(simpo_loss(t(-1.0, -1.0), t(-1.5, -2.0), beta=2.0, gamma=1.0),
                               t(math.log(2), -math.log(1 / (1 + math.exp(-1)))))
    chosen, rejected = random_logps(0)
    for beta, gamma in ((2.0, 1.0), (2.5, 1.4), (0.1, 0.0)):
        expected, _, _ = trl(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=gamma).cpo_loss(chosen, rejected)
        torch.testing.assert_close(simpo_loss(chosen, rejected, beta, gamma), expected)


def test_orpo_loss_by_hand_and_its_odds_ratio_equal_to_trl():
    # c = log 0.5, r = log 0.25: odds 1 and 1/3 -> log odds ratio log 3; NLL -c = log 2
    c, r = t(math.log(0.5)), t(math.log(0.25))
    torch.testing.assert_close(orpo_loss(c, r, lam=0.1), math.log(2) - 0.1 * F.logsigmoid(t(math.log(3))))
    torch.testing.assert_close(log1mexp(t(-1e-10, -50.0)), t(math.log(1e-10), -math.exp(-50.0)), rtol=1e-6, atol=0)
    chosen, rejected = (x.float() for x in random_logps(1))  # TRL computes the odds ratio in float32
    for lam in (0.1, 0.5):
        ratio_terms, _, _, _, _ = trl(ORPOTrainer, beta=lam).odds_ratio_loss(chosen, rejected)
        # TRL's loss is the batch's token-mean NLL minus mean(beta * log sigmoid(log odds)); ours is per example.
        torch.testing.assert_close(orpo_loss(chosen, rejected, lam) + chosen, -ratio_terms)


def test_slic_loss_by_hand_and_its_hinge_equal_to_trl():
    # beta 1: margin 0.25 -> hinge 0.75; margin 2 -> 0; lam 0.1 adds 0.1 * -c
    torch.testing.assert_close(slic_loss(t(-10.0, -10.0), t(-10.25, -12.0), beta=1.0, lam=0.1), t(1.75, 1.0))
    chosen, rejected = random_logps(2, low=-60.0)
    for beta in (0.1, 1.0):
        expected, _, _ = trl(CPOTrainer, loss_type="hinge", beta=beta).cpo_loss(chosen, rejected)
        torch.testing.assert_close(slic_loss(chosen, rejected, beta), expected)


@pytest.mark.parametrize("module, pure", [
    (lambda: SimPO(policy="tiny", beta=2.0, gamma=0.5), lambda c, r, lc, lr: simpo_loss(c / lc, r / lr, 2.0, 0.5)),
    (lambda: ORPO(policy="tiny", lam=0.2), lambda c, r, lc, lr: orpo_loss(c / lc, r / lr, 0.2)),
    (lambda: SLiC(policy="tiny", beta=0.5, lam=0.01), lambda c, r, lc, lr: slic_loss(c, r, 0.5, 0.01)),
])
def test_each_module_takes_its_loss_on_the_policy_logps_with_no_reference(hh_path, module, pure):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view="paired", max_length=96, max_prompt_length=48,
                          batch_size=4, max_train_pairs=8, max_val_pairs=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = module()
    module.configure_model()
    assert module.reference is None
    with torch.no_grad():
        loss, metrics = module.loss_and_metrics(batch)
        logps = module.policy_logps(batch)
    (c, r), (lc, lr) = logps.total.chunk(2), logps.tokens.chunk(2)
    torch.testing.assert_close(loss, pure(c, r, lc, lr).mean())
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(metrics)
    if isinstance(module, ORPO):
        torch.testing.assert_close(metrics["nll_loss"], -(c / lc).mean())


@pytest.mark.parametrize("build, field", [
    (lambda: SimPO(policy="tiny", beta=0.0), "model.beta must be > 0"),
    (lambda: SimPO(policy="tiny", gamma=-0.1), "model.gamma must be >= 0"),
    (lambda: ORPO(policy="tiny", lam=0.0), "model.lam must be > 0"),
    (lambda: SLiC(policy="tiny", lam=-1.0), "model.lam must be >= 0"),
])
def test_bad_hyperparameters_are_refused_in_the_constructor(build, field):
    with pytest.raises(ConfigError, match=field):
        build()


@pytest.mark.parametrize("argv, field, kind", [
    (["simpo", "--model.beta=0"], "model.beta", "PositiveFloat"),
    (["simpo", "--model.gamma=-1"], "model.gamma", "NonNegativeFloat"),
    (["orpo", "--model.lam=0"], "model.lam", "PositiveFloat"),
    (["slic", "--model.beta=-2"], "model.beta", "PositiveFloat"),
    (["slic", "--model.lam=-0.5"], "model.lam", "NonNegativeFloat"),
])
def test_bad_hyperparameters_fail_at_parse_time_naming_them(refused_tiny_training, argv, field, kind):
    err = refused_tiny_training(*argv)
    assert field in err and kind in err
