"""The machinery every algorithm shares: policy and frozen reference, per-sequence log-probs,
optimizer with linear warmup, metric logging, and saving the policy in HF format."""

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveFloat

from bench.errors import ConfigError
from bench.models import load_causal_lm, load_tokenizer
from bench.models import resolve as resolve_model
from datamodules.hh_datamodule import IGNORE_INDEX

log = logging.getLogger(__name__)


def require_positive(**values: float) -> None:
    """Config validation for callers that bypass the CLI's parse-time type checks."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"model.{name} must be > 0, got {value}")


@dataclass
class SequenceLogps:
    """Per-sequence sums of response-token log-probs, and the token counts they sum over."""

    total: torch.Tensor
    tokens: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens.clamp(min=1)

    def reduce(self, average: bool) -> torch.Tensor:
        return self.mean if average else self.total


def sequence_logps(model: torch.nn.Module, batch: dict, prefix: str = "") -> SequenceLogps:
    """Sum of log pi(y_t | x, y_<t) over the tokens whose label is not IGNORE_INDEX."""
    logits = model(
        input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"], use_cache=False
    ).logits[:, :-1]
    labels = batch[f"{prefix}labels"][:, 1:]
    # cross_entropy runs in fp32 under autocast and never materialises the full log-softmax.
    token_logps = -F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    mask = labels != IGNORE_INDEX
    return SequenceLogps(total=(token_logps * mask).sum(-1), tokens=mask.sum(-1))


class AlignmentModule(L.LightningModule):
    """Base of every algorithm. A subclass names its data view and implements `loss_and_metrics`.

    Args:
        policy: model spec of the policy to train (hub id, folder, ``smollm2-135m-instruct`` or ``tiny``).
        reference: model spec of the frozen reference; a copy of the initial policy when unset.
        lr: peak learning rate, reached after `warmup_steps` of linear warmup.
        optimizer: adamw or rmsprop (the DPO paper's choice).
        weight_decay: AdamW/RMSprop weight decay.
        warmup_steps: linear warmup length in optimizer steps.
        trust_remote_code: allow model code from the hub; off unless asked for.
    """

    data_view: ClassVar[str] = "paired"
    needs_reference: ClassVar[bool] = True

    def __init__(
        self,
        policy: str = "smollm2-135m-instruct",
        reference: str | None = None,
        lr: PositiveFloat = 5e-7,
        optimizer: Literal["adamw", "rmsprop"] = "adamw",
        weight_decay: float = 0.0,
        warmup_steps: NonNegativeInt = 0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        require_positive(lr=lr)
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        for spec in (policy, reference):
            if spec is not None:
                resolve_model(spec)  # fail on a bad spec now, not after the run has started
        self.save_hyperparameters(logger=False)
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None

    # --- models -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.policy, hp.trust_remote_code)
        self.policy = load_causal_lm(hp.policy, hp.trust_remote_code).train()  # from_pretrained gives eval mode
        if self.needs_reference:
            self.reference = (
                load_causal_lm(hp.reference, hp.trust_remote_code) if hp.reference else copy.deepcopy(self.policy)
            )
            self.reference.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference is a fixed function: no dropout, ever
        return self

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        view = getattr(getattr(datamodule, "hparams", None), "view", self.data_view)
        if view != self.data_view:
            raise ConfigError(f"{type(self).__name__} trains on the {self.data_view!r} view, but data.view is {view!r}")

    def policy_logps(self, batch: dict, prefix: str = "") -> SequenceLogps:
        return sequence_logps(self.policy, batch, prefix)

    @torch.no_grad()
    def reference_logps(self, batch: dict, prefix: str = "") -> SequenceLogps:
        return sequence_logps(self.reference, batch, prefix)

    def mean_across_devices(self, value: torch.Tensor) -> torch.Tensor:
        if self._trainer is None:  # used outside a Trainer, e.g. in a notebook
            return value
        return self.trainer.strategy.reduce(value, reduce_op="mean")

    # --- the algorithm ------------------------------------------------------------------------
    def loss_and_metrics(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | tuple]]:
        """The scalar loss to minimise and detached metrics. A metric is a tensor averaged over the
        batch, or (value, weight) when it averages over part of the batch only."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step("train", batch)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step("val", batch)

    def _step(self, stage: str, batch: dict) -> torch.Tensor:
        loss, metrics = self.loss_and_metrics(batch)
        batch_size = self.examples_in(batch)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), batch_size=batch_size, on_step=on_step, on_epoch=not on_step,
                 prog_bar=True, sync_dist=True)
        for name, value in metrics.items():
            value, weight = value if isinstance(value, tuple) else (value, batch_size)
            self.log(f"{stage}/{name}", value.detach().float(), batch_size=weight, on_step=on_step,
                     on_epoch=not on_step, sync_dist=True)
        return loss

    def examples_in(self, batch: dict) -> int:
        """How many examples a batch holds, for weighting epoch means."""
        return batch["input_ids"].shape[0]

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        optimizer_class = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[hp.optimizer]
        optimizer = optimizer_class(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # Linear warmup then constant, as in the DPO reference code.
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (hp.warmup_steps + 1))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    # --- output -------------------------------------------------------------------------------
    @property
    def policy_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "policy"

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.policy.save_pretrained(self.policy_dir)
            self.tokenizer.save_pretrained(self.policy_dir)
            log.info("saved the trained policy to %s", self.policy_dir)


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """TRL's names for paired implicit-reward statistics (reward = beta * logratio)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }


class PairedPreferenceModule(AlignmentModule):
    """An offline paired-preference loss of the chosen and rejected log-ratios (DPO, IPO, ...).
    A subclass gives `pair_loss`, its `reward_scale` and whether log-ratios are length-averaged."""

    data_view = "paired"
    average_logratios: bool = False

    @property
    def reward_scale(self) -> float:
        raise NotImplementedError

    def pair_loss(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_and_metrics(self, batch):
        # One forward over chosen and rejected rows together: the collator stacks them.
        policy, reference = self.policy_logps(batch), self.reference_logps(batch)
        logratios = policy.reduce(self.average_logratios) - reference.reduce(self.average_logratios)
        chosen_logratios, rejected_logratios = logratios.chunk(2)
        loss = self.pair_loss(chosen_logratios, rejected_logratios).mean()
        chosen_logps, rejected_logps = policy.total.detach().chunk(2)
        rewards = self.reward_scale * logratios.detach()
        return loss, preference_metrics(*rewards.chunk(2), chosen_logps, rejected_logps)

    def examples_in(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # chosen and rejected rows of each pair
