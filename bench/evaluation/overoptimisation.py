"""Scores along training: Gao et al.'s (2023) view of reward over-optimisation. Before the first step and every
`every_n_steps` optimizer steps, the policy samples a fixed set of validation prompts; the callback logs how far
it has moved from the reference (`val/overopt/kl`: the exact KL at the sampling temperature, summed over the
tokens of its samples and averaged over prompts, as `bench eval`'s `eval/kl`; see `bench.evaluation.evaluate`) and what
the gold (the judge: a reward model or a computable `reward:NAME`) and the proxy make of those samples
(`val/overopt/gold_score`, `val/overopt/proxy_score`). `bench compare` attaches it to the stages its recipe
names, and `bench.reports.figures.overoptimisation` plots both scores against sqrt(KL) beside best-of-N.
"""

import logging
import time

import lightning.pytorch as L
import torch

from bench.core.models import load_causal_lm
from bench.evaluation.evaluate import eval_formatter, eval_pairs, samples_kl
from bench.evaluation.judges import load_scorer
from bench.sampling.generation import Sampling, decode_responses, sample
from datamodules.hh_datamodule import Collator

log = logging.getLogger(__name__)

METRICS = ("val/overopt/kl", "val/overopt/gold_score", "val/overopt/proxy_score")


class ScoresAlongTraining(L.Callback):
    """Args:
        judge: the gold (judge): a reward-model folder or spec, or a computable reward (`reward:NAME`).
        proxy: the proxy: a reward-model folder or spec (the one the policy is trained against, where it is),
            or a computable reward.
        n_prompts: validation prompts sampled at each measurement (the same ones every time).
        every_n_steps: optimizer steps between measurements.
        sampling: how the policy samples them.
    """

    def __init__(self, judge: str, proxy: str, n_prompts: int = 32, every_n_steps: int = 4,
                 sampling: Sampling = Sampling(max_new_tokens=64)):
        sampling = Sampling.of(sampling, "compare.overoptimisation.sampling", max_new_tokens=64)  # a recipe's mapping
        self.judge_spec, self.proxy_spec = judge, proxy
        self.n_prompts, self.every_n_steps, self.sampling = n_prompts, every_n_steps, sampling
        self.measured_at: set[int] = set()
        self.seconds_outside_training = 0.0  # `TrainingThroughput` leaves this out of the run's wall time

    def on_train_start(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        hparams = trainer.datamodule.hparams
        data = {key: hparams[key] for key in ("path", "subsets", "val_fraction", "test_fraction", "chat_template",
                                               "max_length", "max_prompt_length")}
        pairs = eval_pairs(data, "validation", self.n_prompts, seed=0)
        self.prompts = [p.prompt for p in pairs]
        self.prompt_ids = [eval_formatter(module.tokenizer, data).generation_prompt_ids(p) for p in self.prompts]
        self.judge = load_scorer(self.judge_spec, role="judge")
        self.proxy = load_scorer(self.proxy_spec, role="proxy")
        self.reference = None
        self.measure(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.measure(trainer, module)

    def reference_of(self, module) -> torch.nn.Module:
        """The module's frozen reference, or (when its log-probs come from the cache) one loaded for this."""
        if getattr(module, "reference", None) is not None:
            return module.reference
        if self.reference is None:
            self.reference = load_causal_lm(module.hparams.reference or module.hparams.policy, device=module.device).eval()
        return self.reference

    @torch.no_grad()
    def measure(self, trainer, module) -> None:
        step = trainer.global_step
        if step in self.measured_at:
            return
        self.measured_at.add(step)
        started = time.perf_counter()
        policy, tokenizer = module.policy, module.tokenizer
        with trainer.precision_plugin.forward_context():
            generated = sample(policy, tokenizer, self.prompt_ids, self.sampling, desc="scores along training",
                               leave=False)
            rows = [{"prompt_ids": p, "completion_ids": g} for p, g in zip(self.prompt_ids, generated)]
            collate = Collator("sft", tokenizer.pad_token_id)
            was_training = policy.training
            policy.eval()  # the distribution it sampled from: no dropout
            try:
                kl = samples_kl(policy, self.reference_of(module), rows, collate, self.sampling.batch_size,
                                self.sampling.temperature)
            finally:
                policy.train(was_training)
        texts = decode_responses(tokenizer, generated)
        metrics = {"val/overopt/kl": kl.mean().item(),
                   "val/overopt/gold_score": self.judge.score(self.prompts, texts).mean().item(),
                   "val/overopt/proxy_score": self.proxy.score(self.prompts, texts).mean().item()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.seconds_outside_training += time.perf_counter() - started
        log.info("scores along training at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
