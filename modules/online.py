"""What every online algorithm shares (PPO, RLOO, GRPO, online DPO): sampling responses from the policy as it
trains, scoring them with the proxy reward model, per-token log-probs of the responses under the policy and
the reference, TRL's `objective/` metrics, and Lightning manual optimisation: one training step is one
rollout of a batch of prompts, followed by the algorithm's own updates (`train_on`).

`objective/kl` is the exact KL of the rollout, not a sampled log-ratio: per response, the sum over its tokens
of KL(pi_T || pi_ref_T) of the two next-token distributions at the sampling temperature T, over the whole
vocabulary (`modules.logps.token_kl`), under the policy that sampled it; its mean over responses estimates the
sequence-level KL and is never negative. It is the quantity `bench eval` logs as `eval/kl` and scores along
training as `val/overopt/kl`. The losses keep their own estimators; the sampled log-ratio sum that TRL logs
as objective/kl (and that PPO's reward penalises) is `objective/kl_estimate`.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type

from bench.core.errors import ConfigError
from bench.sampling.generation import Sampling, check_backend, decode_responses, sample
from modules.base import AlignmentModule, require_positive
from modules.logps import token_kl
from modules.reward_model import check_proxy, load_proxy

# k, the responses sampled per prompt by the group methods (RLOO, GRPO): a baseline needs at least two.
AtLeastTwo = restricted_number_type("AtLeastTwo", int, (">=", 2))


def require_group_size(num_generations: int) -> None:
    if not num_generations >= 2:
        raise ConfigError(f"model.num_generations (k, responses per prompt) must be >= 2, got {num_generations}")


@dataclass
class Sequences:
    """Prompts left-padded to `context_length`, each followed by its right-padded response."""

    query_response: torch.Tensor
    attention_mask: torch.Tensor
    context_length: int

    def __getitem__(self, rows) -> "Sequences":
        return Sequences(self.query_response[rows], self.attention_mask[rows], self.context_length)

    @property
    def position_ids(self) -> torch.Tensor:
        return self.attention_mask.cumsum(1) - self.attention_mask  # real tokens count from 0, as in generate

    @property
    def response_mask(self) -> torch.Tensor:
        return self.attention_mask[:, self.context_length :].bool()


@dataclass
class Samples:
    """`per_prompt` sampled responses for each prompt of a batch, prompt-major (the responses of prompt 0, then
    of prompt 1, ...), and the proxy's scores of them. `mask` is (rows, T) over the response tokens."""

    sequences: Sequences
    mask: torch.Tensor
    scores: torch.Tensor
    ended: torch.Tensor  # the response ended with EOS / end of turn
    per_prompt: int
    # Per response, the exact KL to the reference at the sampling temperature under the policy that sampled it
    # (`OnlineModule.response_kl`): set where the rollout's logits are computed, before any update.
    kl: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> "Samples":
        """A run of rows (a micro-batch); `per_prompt` still says how the whole batch is grouped."""
        return Samples(self.sequences[rows], self.mask[rows], self.scores[rows], self.ended[rows], self.per_prompt,
                       None if self.kl is None else self.kl[rows])


class OnlineModule(AlignmentModule):
    """Base of the online algorithms. A subclass sets `samples_per_prompt` and implements `train_on`.

    Args:
        proxy: proxy reward-model folder, or ``latest``: the newest proxy of the recipe's experiment.
        allow_judge_as_proxy: let a model trained as the judge be optimised, on purpose.
        temperature, max_new_tokens: sampling of the responses.
        sampling_backend: the sampler (`bench.sampling.generation`): harness or hf.
        missing_eos_penalty: subtracted from the score of a response that never ended (no EOS).
        max_grad_norm: gradient clipping of each update (manual optimisation clips here, not in Trainer).
    """

    data_view = "prompts"
    online = True
    proxy_setting = "model.proxy"
    pruning_metric = "val/objective/scores"
    samples_per_prompt: int = 1
    logprob_temperature_is_sampling: bool = True  # log-probs of the sampling distribution, as TRL's PPO and GRPO
    # Whether `train_on` sets `samples.kl` from the logits it computes before its first update anyway; if not,
    # `training_step` measures it first (one more forward pass of both models, without gradients).
    train_on_measures_kl: bool = False

    def __init__(
        self,
        proxy: str = "latest",
        allow_judge_as_proxy: bool = False,
        temperature: PositiveFloat = 0.7,
        max_new_tokens: PositiveInt = 128,
        sampling_backend: str = "harness",
        missing_eos_penalty: float | None = None,
        max_grad_norm: PositiveFloat = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        require_positive(temperature=temperature, max_new_tokens=max_new_tokens, max_grad_norm=max_grad_norm)
        check_proxy(proxy, allow_judge_as_proxy)
        check_backend(sampling_backend, "model.sampling_backend")
        self.automatic_optimization = False
        self.proxy = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        self.proxy = load_proxy(self.hparams.proxy, self.hparams.allow_judge_as_proxy, device="cpu")  # as the policy

    def dropout_free_models(self) -> list[torch.nn.Module]:
        return super().dropout_free_models() + ([self.proxy] if self.proxy is not None else [])

    @property
    def kl_coefficient(self) -> float:
        """The weight of the KL to the reference in the algorithm's objective (TRL's `objective/non_score_reward`)."""
        return self.hparams.beta

    # --- forward passes over sampled responses ----------------------------------------------------
    @staticmethod
    def response_hidden(decoder, sequences: Sequences) -> torch.Tensor:
        """A decoder's hidden states at the positions that predict the response tokens."""
        hidden = decoder(input_ids=sequences.query_response, attention_mask=sequences.attention_mask,
                         position_ids=sequences.position_ids, use_cache=False).last_hidden_state
        return hidden[:, sequences.context_length - 1 : -1]

    def response_logits(self, model, name: str, sequences: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """The untempered logits at the positions that predict the response tokens, in the model's dtype (half
        the memory under bf16 autocast), and the hidden states behind them."""
        hidden = self.response_hidden(model.get_decoder(), sequences)
        if self.head_on_responses[name]:
            return model.get_output_embeddings()(hidden), hidden
        logits = model(input_ids=sequences.query_response, attention_mask=sequences.attention_mask,
                       position_ids=sequences.position_ids, use_cache=False).logits
        return logits[:, sequences.context_length - 1 : -1], hidden

    def logprobs_of(self, logits: torch.Tensor, sequences: Sequences) -> torch.Tensor:
        """Per-token log-probs of the response tokens from `response_logits` (at the sampling temperature unless
        the algorithm says otherwise)."""
        logits = logits.float()
        if self.logprob_temperature_is_sampling:
            logits = logits / self.hparams.temperature
        targets = sequences.query_response[:, sequences.context_length :]
        return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

    def response_logprobs(self, model, name: str, sequences: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the responses (see `logprobs_of`), and the hidden states behind them."""
        logits, hidden = self.response_logits(model, name, sequences)
        return self.logprobs_of(logits, sequences), hidden

    def response_kl(self, policy_logits: torch.Tensor, reference_logits: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """Per response, the sum over its tokens (`mask`) of the exact KL between the policy's and the reference's
        next-token distributions at the sampling temperature, from their `response_logits` (`objective/kl`)."""
        mask = mask.bool()
        per_token = token_kl(policy_logits.detach()[mask], reference_logits.detach()[mask], self.hparams.temperature)
        total = torch.zeros(len(mask), dtype=per_token.dtype, device=mask.device)
        return total.index_add(0, mask.nonzero()[:, 0], per_token)

    @torch.no_grad()
    def rollout_kl(self, samples: Samples) -> torch.Tensor:
        """`response_kl` of the samples under the models as they are now: call it before the policy updates."""
        if self.policy is None or self.reference is None:
            raise RuntimeError("objective/kl needs the rollout's exact KL (Samples.kl) or the policy and the "
                               "reference to compute it from: configure the module first")
        policy_logits, _ = self.response_logits(self.policy, "policy", samples.sequences)
        reference_logits, _ = self.response_logits(self.reference, "reference", samples.sequences)
        return self.response_kl(policy_logits, reference_logits, samples.mask)

    # --- a rollout ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_responses(self, batch: dict, per_prompt: int) -> Samples:
        hp, tokenizer = self.hparams, self.tokenizer
        prompt_ids = [ids for ids in batch["prompt_ids"] for _ in range(per_prompt)]
        prompts = [text for text in batch["prompts"] for _ in range(per_prompt)]
        # Seeded from the global RNG, so a run is reproducible from seed_everything and each rollout differs;
        # each row draws from its own stream, so a prompt's responses differ from each other.
        seed = int(torch.randint(0, 2**31 - 1, ()))
        sampling = Sampling(temperature=hp.temperature, max_new_tokens=hp.max_new_tokens,
                            batch_size=len(prompt_ids), seed=seed, backend=hp.sampling_backend)
        generated = sample(self.policy, tokenizer, prompt_ids, sampling, desc="rollout: generate", leave=False)
        width, length = max(map(len, prompt_ids)), max(map(len, generated))
        pad = tokenizer.pad_token_id
        rows = [[pad] * (width - len(p)) + p + g + [pad] * (length - len(g)) for p, g in zip(prompt_ids, generated)]
        masks = [[0] * (width - len(p)) + [1] * (len(p) + len(g)) + [0] * (length - len(g))
                 for p, g in zip(prompt_ids, generated)]
        sequences = Sequences(torch.tensor(rows, device=self.device), torch.tensor(masks, device=self.device), width)
        ended = torch.tensor([len(g) > 0 and g[-1] == tokenizer.eos_token_id for g in generated], device=self.device)
        scores = self.proxy.score(prompts, decode_responses(tokenizer, generated)).to(self.device)
        if hp.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - hp.missing_eos_penalty)
        self.rollout_tokens = int(sequences.attention_mask.sum())
        return Samples(sequences, sequences.response_mask, scores, ended, per_prompt)

    @torch.no_grad()
    def logprobs_and_kl(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the samples under the policy and the reference, 0 on padding, and the exact
        KL of each response (`response_kl`), from one forward pass of each model."""
        sequences, mask = samples.sequences, samples.mask
        policy_logits, _ = self.response_logits(self.policy, "policy", sequences)
        logprobs = self.logprobs_of(policy_logits, sequences) * mask
        reference_logits, _ = self.response_logits(self.reference, "reference", sequences)
        ref_logprobs = self.logprobs_of(reference_logits, sequences) * mask
        return logprobs, ref_logprobs, self.response_kl(policy_logits, reference_logits, mask)

    def policy_logprobs_with_kl(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's per-token log-probs of the samples with their graph (for an update on them) and the
        reference's (0 on padding), from one forward pass of each; records the responses' exact KL in `samples.kl`.
        Called before any update on these samples, so that KL is the sampling policy's and needs no pass of its own."""
        sequences, mask = samples.sequences, samples.mask
        policy_logits, _ = self.response_logits(self.policy, "policy", sequences)
        with torch.no_grad():
            reference_logits, _ = self.response_logits(self.reference, "reference", sequences)
            ref = self.logprobs_of(reference_logits, sequences) * mask
        samples.kl = self.response_kl(policy_logits, reference_logits, mask)
        return self.logprobs_of(policy_logits, sequences), ref

    def old_and_reference_logprobs(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the samples under the policy as it sampled them and under the reference, 0 on
        padding; records the responses' exact KL in `samples.kl`."""
        logprobs, ref_logprobs, samples.kl = self.logprobs_and_kl(samples)
        return logprobs, ref_logprobs

    def objective_metrics(self, samples: Samples, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> dict:
        """TRL's `objective/` metrics of a rollout: per-response KL, entropy and scores, and the KL-penalised
        reward. `objective/kl` is the exact KL (`samples.kl`; measured now if the rollout has none); the reward
        penalises, as the losses do, the sampled log-ratio sum (`objective/kl_estimate`)."""
        kl = samples.kl if samples.kl is not None else self.rollout_kl(samples)
        kl_estimate = (logprobs - ref_logprobs).sum(1)
        non_score_reward = -self.kl_coefficient * kl_estimate
        return {
            "objective/kl": kl.mean(),
            "objective/kl_estimate": kl_estimate.mean(),
            "objective/entropy": (-logprobs).sum(1).mean(),
            "objective/non_score_reward": non_score_reward.mean(),
            "objective/rlhf_reward": (samples.scores + non_score_reward).mean(),
            "objective/scores": samples.scores.mean(),
            "val/num_eos_tokens": samples.ended.sum().float(),
            "response_len": samples.mask.sum(1).float().mean(),
        }

    def group_metrics(self, samples: Samples) -> dict:
        """TRL's GRPO and RLOO metrics of the proxy's scores of each prompt's group of responses."""
        grouped = samples.scores.view(-1, samples.per_prompt)
        std = grouped.std(1)
        return {"reward": samples.scores.mean(), "reward_std": samples.scores.std(),
                "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
                "completions/mean_length": samples.mask.sum(1).float().mean()}

    # --- training ----------------------------------------------------------------------------------
    def update(self, losses: torch.Tensor | Iterable[torch.Tensor], batch_idx: int) -> bool:
        """One optimizer step on a loss, or on the sum of losses computed and backpropagated one at a time
        (micro-batches: one holds its activations at a time); False (and no step) when a loss is not finite
        and the policy says skip."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for loss in [losses] if isinstance(losses, torch.Tensor) else losses:
            if not self.loss_is_finite(loss, batch_idx):
                optimizer.zero_grad()
                return False
            self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        return True

    def train_on(self, samples: Samples, batch_idx: int) -> dict:
        """The algorithm's updates on one rollout; returns its metrics."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> None:
        samples = self.sample_responses(batch, self.samples_per_prompt)
        if not self.train_on_measures_kl:  # the KL of the policy that sampled, before train_on updates it
            samples.kl = self.rollout_kl(samples)
        metrics = self.train_on(samples, batch_idx)
        self.lr_schedulers().step()
        self.log_metrics("train", metrics, len(batch["prompt_ids"]), prog_bar=("objective/scores", "objective/kl"))
        self.log_skipped_batches()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        samples = self.sample_responses(batch, self.samples_per_prompt)
        metrics = self.objective_metrics(samples, *self.old_and_reference_logprobs(samples))
        # TRL's "val/" names PPO's value head; in validation the stage prefix says it already.
        metrics = {name.removeprefix("val/"): value for name, value in metrics.items()}
        self.log_metrics("val", metrics, len(batch["prompt_ids"]), prog_bar=("objective/scores",))

    def examples_in(self, batch: dict) -> int:
        return len(batch["prompt_ids"])

    def tokens_in(self, batch: dict) -> int:
        return self.rollout_tokens  # prompts and sampled responses
