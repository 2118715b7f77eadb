"""The machinery every algorithm shares: policy and frozen reference, the reference log-prob cache,
optimizer with linear warmup, the non-finite-loss policy, metric logging, and saving the policy in HF
format. The log-prob math is in `modules.logps`, the RNG state of checkpoints in `modules.rng`, the paired
offline family's base in `modules.paired`."""

import logging
import math
import time
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import lightning.pytorch as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from bench.core.atomic import written_whole
from bench.core.batches import IGNORE_INDEX, REFERENCE_COLUMNS
from bench.core.errors import BenchError, ConfigError
from bench.core.models import load_causal_lm, load_tokenizer
from bench.core.models import resolve as resolve_model
from modules.logps import SequenceLogps, head_computes_logits, sequence_logps_by_length
from modules.reference_cache import ReferenceLogpCache, compute_logps
from modules.rng import rng_states, set_rng_states

log = logging.getLogger(__name__)
# The policy and the reference are in eval mode on purpose (AlignmentModule.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def require_positive(**values: float) -> None:
    """Config validation for callers that bypass the CLI's parse-time type checks."""
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):  # jsonargparse's PositiveFloat lets inf through
            raise ConfigError(f"model.{name} must be > 0 and finite, got {value}")


def require_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ConfigError(f"model.{name} must be >= 0, got {value}")


def _logged_at(logger, pending: dict) -> bool:
    """Whether the run already holds the checkpointed step's metrics (MLflow keeps every value it is sent)."""
    if not hasattr(logger, "run_id") or not hasattr(logger.experiment, "get_metric_history"):
        return False
    key = next(iter(pending["metrics"]))
    return any(m.step == pending["step"] for m in logger.experiment.get_metric_history(logger.run_id, key))


def all_gather_objects(value) -> list:
    """`value` from every process (just this one outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class NonFiniteLoss(BenchError):
    """A NaN or inf training loss, with where it happened."""


NonFiniteLossPolicy = Literal["error", "skip"]


class TrainedHFModel(L.LightningModule):
    """One HF model trained in `_step` by the optimizer these settings make, and saved with its tokenizer, in HF
    format, at the end of training. Subclasses provide `trained_model`, `tokenizer`, `_step` and `nonfinite_loss`
    ("error" or "skip") among their hyperparameters, and pass these settings on in `**kwargs`, which the CLI
    follows here: `--model.lr` and the rest are declared, documented and checked once, for every module.

    Args:
        lr: peak learning rate, reached after `warmup_steps` of linear warmup.
        optimizer: adamw or rmsprop (the DPO paper's choice).
        weight_decay: AdamW/RMSprop weight decay.
        warmup_steps: linear warmup length in optimizer steps.
    """

    output_name: ClassVar[str]  # the folder, in the run directory, that the model is saved to
    # The facts `bench` reads about a trainable module (`modules.registry()`); a class that sets `name` is found
    # there by its name, and sweeps, comparisons, tables and figures take it in with no other file edited.
    name: ClassVar[str | None] = None  # `bench train NAME`
    data_view: ClassVar[str]  # the DataModule view it trains on
    needs_reference: ClassVar[bool] = False  # a frozen reference model (or its cached log-probs)
    online: ClassVar[bool] = False  # samples from the policy as it trains (one rollout per batch of prompts)
    aligned: ClassVar[bool] = False  # a `bench compare` stage: trained from the starting policy, then evaluated
    proxy_setting: ClassVar[str | None] = None  # the config key that names the proxy reward model it optimises
    pruning_metric: ClassVar[str | None] = None  # the validation metric (higher is better) sweeps prune on
    colour: ClassVar[str] = "#7f7f7f"  # its colour in every figure
    # The `model` setting that names the HF model it trains. Only a module that trains the policy ("policy") takes
    # a recipe's shared `model:` section and is evaluated as a policy; the reward model trains a `backbone`.
    model_key: ClassVar[str] = "policy"
    trained_roles: ClassVar[tuple[str, ...]] = ()  # `--model.role`s that `bench train` trains one of each of by default
    skipped_batches: int = 0
    step_metrics_to_log: dict | None = None  # from the checkpoint a run resumes from

    def __init__(
        self,
        lr: PositiveFloat = 5e-7,  # a policy's; the reward model passes its own
        optimizer: Literal["adamw", "rmsprop"] = "adamw",
        weight_decay: float = 0.0,
        warmup_steps: NonNegativeInt = 0,
    ):
        super().__init__()
        require_positive(lr=lr)
        require_non_negative(warmup_steps=warmup_steps)
        # Saved here, not by the subclass: Lightning collects the arguments of every __init__ still running,
        # and these settings are variables of this one only (a subclass's kwargs hold just those passed).
        self.save_hyperparameters(logger=False)

    @property
    def trained_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def _step(self, stage: str, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self._step("train", batch)
        finite = self.loss_is_finite(loss, batch_idx)
        self.log_skipped_batches()
        return loss if finite else None  # None: Lightning skips the update

    def log_skipped_batches(self) -> None:
        if self.hparams.nonfinite_loss == "skip":  # a running count, so that its last value is the total
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)

    def loss_is_finite(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """False when the batch is to be skipped; raises NonFiniteLoss unless `nonfinite_loss` is "skip".
        Every process decides together: one rank skipping alone would hang the gradient all-reduce."""
        finite_here = torch.isfinite(loss.detach()).all()
        finite = finite_here.float()
        if self._trainer is not None:
            finite = self.trainer.strategy.reduce(finite, reduce_op="mean")
        if finite.item() == 1.0:
            return True
        where = f"step {self.global_step}, batch index {batch_idx} of epoch {self.current_epoch}"
        value = "on another process" if finite_here else loss.item()
        if self.hparams.nonfinite_loss != "skip":
            raise NonFiniteLoss(f"non-finite training loss ({value}) at {where}; lower model.lr, check that "
                                f"batch's data, or pass --model.nonfinite_loss=skip to skip such batches")
        self.skipped_batches += 1
        log.warning("skipped a batch with a non-finite loss (%s) at %s; %d skipped so far", value, where,
                    self.skipped_batches)
        return False

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step("val", batch)

    def trainable_parameters(self):
        return self.trained_model.parameters()

    def examples_in(self, batch: dict) -> int:
        """How many examples a batch holds, for weighting epoch means and counting budgets."""
        return batch["input_ids"].shape[0]

    def tokens_in(self, batch: dict) -> int:
        """Non-padding tokens the model reads for one training batch: what a training budget counts."""
        return int(sum(mask.sum() for key, mask in batch.items() if key.endswith("attention_mask")))

    def configure_optimizers(self) -> dict:
        """AdamW or RMSprop with linear warmup then a constant rate, as in the DPO reference code."""
        hp = self.hparams
        optimizer_class = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[hp.optimizer]
        optimizer = optimizer_class(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (hp.warmup_steps + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    @property
    def output_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / self.output_name

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()
        checkpoint["skipped_batches"] = self.skipped_batches
        # Lightning saves a step's checkpoint before it logs that step's metrics: a run killed in between
        # would lose them, and its resumption starts at the next step. Keep them to log on resume.
        logged_step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this batch at
        checkpoint["step_metrics"] = {"step": logged_step, "metrics": {
            key: float(value) for key, value in self.trainer.callback_metrics.items() if key.startswith("train/")}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:  # a resumed run draws what the uninterrupted one would have drawn
            set_rng_states(checkpoint["rng_states"])
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
        self.step_metrics_to_log = checkpoint.get("step_metrics")

    def on_train_start(self) -> None:
        pending, self.step_metrics_to_log = self.step_metrics_to_log, None
        if pending and pending["metrics"] and self.logger and (pending["step"] + 1) % self.trainer.log_every_n_steps == 0 \
                and not _logged_at(self.logger, pending):  # unless the killed run lived to log them
            self.logger.log_metrics(pending["metrics"], step=pending["step"])

    def on_train_end(self) -> None:
        state_dict = self.gathered_state_dict()  # every process: under FSDP this is a collective
        if self.trainer.is_global_zero:
            with written_whole(self.output_dir) as staging:  # a full disk leaves no model without weights
                self.trained_model.save_pretrained(staging, state_dict=state_dict)
                self.tokenizer.save_pretrained(staging)
            log.info("saved the trained %s to %s", self.output_name, self.output_dir)

    def gathered_state_dict(self) -> dict | None:
        """The trained model's full weights when FSDP shards them (on rank 0), else None: the model's own.
        Not yet run on GPUs."""
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(self.trainer.strategy, FSDPStrategy):
            return None
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = self.trainer.strategy.model
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            full = wrapped.state_dict()
        prefix = next(name for name, child in self.named_children() if child is self.trained_model) + "."
        return {key.removeprefix(prefix): value for key, value in full.items() if key.startswith(prefix)}


class AlignmentModule(TrainedHFModel):
    """Base of every algorithm. A subclass names its data view and implements `loss_and_metrics`.

    The optimizer settings (`lr`, `optimizer`, `weight_decay`, `warmup_steps`) are TrainedHFModel's.

    Args:
        policy: model spec of the policy to train (hub id, folder, ``smollm2-135m-instruct`` or ``tiny``).
        reference: model spec of the frozen reference; a copy of the initial policy when unset.
        trust_remote_code: allow model code from the hub; off unless asked for.
        reference_cache: take the reference's log-probs from the on-disk cache (`modules.reference_cache`),
            computing the missing ones once before training; the reference is not even loaded when
            every sequence is cached. Off: the reference scores every batch as it trains.
        nonfinite_loss: on a NaN or inf training loss, "error" stops the run naming the step and batch;
            "skip" skips that batch's update and counts it in `train/skipped_batches`.
        rows_per_forward: run each batch's rows through the model this many at a time, sorted by length, each
            group padded only to its own longest row (less padding to compute, the same loss); unset: one
            forward per batch, which suits GPUs, where a forward's size costs little.
    """

    data_view = "paired"
    needs_reference = True
    aligned = True
    output_name = "policy"

    def __init__(
        self,
        policy: str = "smollm2-135m-instruct",
        reference: str | None = None,
        trust_remote_code: bool = False,
        reference_cache: bool = True,
        nonfinite_loss: NonFiniteLossPolicy = "error",
        rows_per_forward: PositiveInt | None = None,
        **kwargs,  # the optimizer settings (TrainedHFModel)
    ):
        super().__init__(**kwargs)
        if rows_per_forward is not None:
            require_positive(rows_per_forward=rows_per_forward)
        for spec in (policy, reference):
            if spec is not None:
                resolve_model(spec)  # fail on a bad spec now, not after the run has started
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.reference_logps_cache: ReferenceLogpCache | None = None
        self.uncached_sequences: dict[str, tuple[list[int], list[int]]] = {}

    # --- models -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.policy, hp.trust_remote_code)
        # On the CPU: Lightning moves them to the device it trains on (and shards them under FSDP).
        self.policy = load_causal_lm(hp.policy, hp.trust_remote_code, device="cpu").eval()  # no dropout: see train()
        if self.needs_reference and self.reference_logps_cache is not None and not self.uncached_sequences:
            log.info("reference log-probs of every sequence are cached in %s: the reference model is not loaded",
                     self.reference_logps_cache.folder)
        elif self.needs_reference:
            # Loaded, not copied from the policy: the same initial weights, and the policy may have trained since.
            self.reference = load_causal_lm(hp.reference or hp.policy, hp.trust_remote_code, device="cpu")
            self.reference.requires_grad_(False).eval()
        self.head_on_responses = {name: head_computes_logits(model) for name, model in
                                  (("policy", self.policy), ("reference", self.reference)) if model is not None}

    def train(self, mode: bool = True):
        """Lightning sets train mode for training; the policy and the reference stay in eval mode, so that no
        forward has dropout: the reference is a fixed function, and the policy's log-probs must be the same in
        a rollout, in PPO's old log-probs and in its updates (TRL's `disable_dropout`, the DPO reference code)."""
        super().train(mode)
        for model in self.dropout_free_models():
            model.eval()
        return self

    def dropout_free_models(self) -> list[torch.nn.Module]:
        return [model for model in (self.policy, self.reference) if model is not None]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        view = getattr(getattr(datamodule, "hparams", None), "view", self.data_view)
        if view != self.data_view:
            raise ConfigError(f"{type(self).__name__} trains on the {self.data_view!r} view, but data.view is {view!r}")
        # Offline data only: an online algorithm's (PPO's) reference scores fresh samples.
        offline = self.data_view in REFERENCE_COLUMNS and hasattr(datamodule, "reference_sequences")
        if self.needs_reference and self.hparams.reference_cache and offline:
            hp = self.hparams
            self.reference_logps_cache = ReferenceLogpCache.for_run(
                hp.reference or hp.policy, datamodule.hparams.tokenizer, datamodule.formatting(), str(self.trainer.precision))
            self.cached_logps = self.reference_logps_cache.load()
            self.uncached_sequences = {key: sequence for key, sequence in datamodule.reference_sequences().items()
                                       if key not in self.cached_logps}

    def on_fit_start(self) -> None:
        if self.reference_logps_cache is None:
            return
        if self.uncached_sequences:
            self.cache_reference_logps()
        self.trainer.datamodule.attach_reference_logps(self.cached_logps)

    def cache_reference_logps(self) -> None:
        """Score the data's uncached sequences with the reference once, store them, and free the reference."""
        keys, started = list(self.uncached_sequences), time.perf_counter()
        datamodule = self.trainer.datamodule
        batch_size = 2 * (datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size)
        local = compute_logps(self.reference, [self.uncached_sequences[key] for key in keys],
                              datamodule.tokenizer.pad_token_id, batch_size, self._reference_sequence_logps,
                              self.trainer.precision_plugin.forward_context, self.global_rank, self.trainer.world_size)
        computed = {keys[index]: value for part in all_gather_objects(local) for index, value in part.items()}
        if self.trainer.is_global_zero:
            shard = self.reference_logps_cache.store(computed)
            log.info("computed reference log-probs of %d sequences in %.1f s; cached in %s",
                     len(computed), time.perf_counter() - started, shard)
        self.cached_logps.update(computed)
        self.uncached_sequences = {}
        self.reference = None  # every batch now carries its reference log-probs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if "state_dict" not in checkpoint:  # a sharded (FSDP) checkpoint keeps the weights elsewhere
            return
        # The reference is a constant that its spec reloads; a checkpoint need not carry a second copy.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("reference.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.reference is not None and "state_dict" in checkpoint:  # loaded for this run (e.g. the cache was cleared since)
            for key, value in self.reference.state_dict().items():
                checkpoint["state_dict"].setdefault(f"reference.{key}", value)

    def _reference_sequence_logps(self, model: torch.nn.Module, batch: dict) -> SequenceLogps:
        return sequence_logps_by_length(model, batch, "", self.head_on_responses["reference"],
                                        self.hparams.rows_per_forward)

    def policy_logps(self, batch: dict, prefix: str = "") -> SequenceLogps:
        return sequence_logps_by_length(self.policy, batch, prefix, self.head_on_responses["policy"],
                                        self.hparams.rows_per_forward)

    @torch.no_grad()
    def reference_logps(self, batch: dict, prefix: str = "") -> SequenceLogps:
        cached = batch.get(f"{prefix}reference_logps")
        if cached is not None:
            tokens = (batch[f"{prefix}labels"][:, 1:] != IGNORE_INDEX).sum(-1)
            return SequenceLogps(total=cached, tokens=tokens)
        return sequence_logps_by_length(self.reference, batch, prefix, self.head_on_responses["reference"],
                                        self.hparams.rows_per_forward)

    def mean_across_devices(self, value: torch.Tensor) -> torch.Tensor:
        if self._trainer is None:  # used outside a Trainer, e.g. in a notebook
            return value
        return self.trainer.strategy.reduce(value, reduce_op="mean")

    # --- the algorithm ------------------------------------------------------------------------
    def loss_and_metrics(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | tuple]]:
        """The scalar loss to minimise and detached metrics. A metric is a tensor averaged over the
        batch, or (value, weight) when it averages over part of the batch only."""
        raise NotImplementedError

    def _step(self, stage: str, batch: dict) -> torch.Tensor:
        loss, metrics = self.loss_and_metrics(batch)
        self.log_metrics(stage, {"loss": loss, **metrics}, self.examples_in(batch))
        return loss

    def weighted_means_across_devices(self, metrics: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, int]]:
        """(value, weight) means over the global batch. Weighted sums and weights are summed across devices,
        whose weights differ (a mean of per-device means would be wrong). Over no example anywhere: NaN, weight 0."""
        if not metrics:
            return {}
        values = torch.stack([torch.as_tensor(value).detach().float().to(self.device) for value, _ in metrics.values()])
        weights = torch.tensor([float(weight) for _, weight in metrics.values()], device=self.device)
        totals = torch.stack([torch.where(weights > 0, values * weights, torch.zeros_like(values)), weights])
        if self._trainer is not None:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return {name: (total / weight if weight > 0 else torch.tensor(float("nan"), device=self.device), int(weight))
                for name, total, weight in zip(metrics, *totals)}

    def log_metrics(self, stage: str, metrics: dict, batch_size: int, prog_bar: tuple[str, ...] = ("loss",)) -> None:
        """Log `<stage>/<name>` per step in training and as epoch means in validation, averaged across devices.
        A (value, weight) metric is a mean over `weight` examples of this device's batch, averaged over the
        global batch. Every device logs the same names (each log is an all-reduce). A statistic over no
        example is left out of validation's means, and is NaN in training, where Lightning would otherwise
        repeat the last step's value."""
        on_step = stage == "train"
        weighted = self.weighted_means_across_devices({n: v for n, v in metrics.items() if isinstance(v, tuple)})
        for name, value in (metrics | weighted).items():
            value, weight = value if isinstance(value, tuple) else (value, batch_size)
            if weight or on_step:
                self.log(f"{stage}/{name}", torch.as_tensor(value).detach().float(), batch_size=max(weight, 1),
                         on_step=on_step, on_epoch=not on_step, prog_bar=name in prog_bar, sync_dist=True)

    @property
    def trained_model(self) -> torch.nn.Module:
        return self.policy
