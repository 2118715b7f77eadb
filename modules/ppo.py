"""PPO for RLHF, as the field converged on it (TRL's PPOv2; Huang et al., "The N+ implementation details
of RLHF with PPO"): on-policy rollouts scored by the proxy reward model, a per-token KL penalty against
the reference, GAE, and clipped policy and value updates. Lightning manual optimisation: one training
step is one rollout followed by `ppo_epochs` passes over `num_mini_batches`."""

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from tqdm.auto import tqdm

from bench.errors import ConfigError
from bench.generation import Sampling, check_backend, decode_responses, sample
from bench.judges import check_proxy, load_proxy
from modules.base import AlignmentModule, require_positive
from modules.losses import gae, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss


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
class Rollout:
    """One batch of prompts with sampled responses. Per-token tensors are (B, T) over response tokens,
    right-padded, and 0 where `mask` is 0."""

    sequences: Sequences
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    num_eos_tokens: torch.Tensor


class ValueHead(torch.nn.Module):
    """V(x, y_<t) from a decoder's hidden state. Zero-initialised: values start at 0 and the head learns
    before the backbone moves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).squeeze(-1).float()


class PPO(AlignmentModule):
    """Actor-critic RLHF against the proxy reward model.

    Args:
        proxy: proxy reward-model folder, or ``latest``: the newest proxy of the recipe's experiment.
        allow_judge_as_proxy: let a model trained as the judge be optimised, on purpose.
        kl_coef: initial coefficient of the per-token KL penalty.
        kl_target: with a value, adapt kl_coef towards this KL per response (Ziegler et al.'s controller).
        kl_horizon: the adaptive controller's horizon, in prompts.
        temperature, max_new_tokens: rollout sampling; log-probs are taken at the same temperature.
        sampling_backend: the sampler of rollouts (`bench.generation`): harness or hf.
        missing_eos_penalty: subtracted from the score of a response that never ended (no EOS).
        ppo_epochs: passes over each rollout.
        num_mini_batches: optimizer steps per pass; the rollout batch must divide into them.
        cliprange, cliprange_value: PPO's ratio clip and the value clip.
        vf_coef: weight of the value loss.
        gamma, lam: GAE's discount and lambda.
        share_value_backbone: compute values from the policy's own hidden states instead of a copy.
        max_grad_norm: gradient clipping of each PPO update (manual optimisation clips here, not in Trainer).
    """

    name = "ppo"
    data_view = "prompts"
    online = True
    proxy_setting = "model.proxy"
    pruning_metric = "val/objective/scores"
    colour = "#9467bd"

    def __init__(
        self,
        proxy: str = "latest",
        allow_judge_as_proxy: bool = False,
        kl_coef: NonNegativeFloat = 0.05,
        kl_target: PositiveFloat | None = None,
        kl_horizon: PositiveInt = 10000,
        temperature: PositiveFloat = 0.7,
        max_new_tokens: PositiveInt = 128,
        sampling_backend: str = "harness",
        missing_eos_penalty: float | None = None,
        ppo_epochs: int = 4,
        num_mini_batches: PositiveInt = 1,
        cliprange: PositiveFloat = 0.2,
        cliprange_value: PositiveFloat = 0.2,
        vf_coef: PositiveFloat = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        share_value_backbone: bool = False,
        max_grad_norm: PositiveFloat = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if ppo_epochs < 1:
            raise ConfigError(f"model.ppo_epochs must be >= 1, got {ppo_epochs}")
        require_positive(temperature=temperature, cliprange=cliprange, cliprange_value=cliprange_value,
                         vf_coef=vf_coef, num_mini_batches=num_mini_batches, max_new_tokens=max_new_tokens)
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ConfigError(f"need gamma and lam in [0, 1]; got {gamma}, {lam}")
        check_proxy(proxy, allow_judge_as_proxy)
        check_backend(sampling_backend, "model.sampling_backend")
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        self.kl_coef = kl_coef
        self.proxy = self.value_backbone = self.value_head = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        hp = self.hparams
        self.proxy = load_proxy(hp.proxy, hp.allow_judge_as_proxy)
        if not hp.share_value_backbone:
            self.value_backbone = copy.deepcopy(self.policy.get_decoder()).train()
        self.value_head = ValueHead(self.policy.config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.proxy is not None:
            self.proxy.eval()
        return self

    def trainable_parameters(self):
        modules = [self.policy, self.value_head] + ([self.value_backbone] if self.value_backbone else [])
        return [p for m in modules for p in m.parameters()]

    # --- forward passes over rollouts ----------------------------------------------------------
    @staticmethod
    def response_hidden(decoder, sequences: Sequences) -> torch.Tensor:
        """A decoder's hidden states at the positions that predict the response tokens."""
        hidden = decoder(input_ids=sequences.query_response, attention_mask=sequences.attention_mask,
                         position_ids=sequences.position_ids, use_cache=False).last_hidden_state
        return hidden[:, sequences.context_length - 1 : -1]

    def response_logprobs(self, model, name: str, sequences: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the responses at the sampling temperature, and the hidden states behind them."""
        hidden = self.response_hidden(model.get_decoder(), sequences)
        if self.head_on_responses[name]:
            logits = model.get_output_embeddings()(hidden)
        else:
            logits = model(input_ids=sequences.query_response, attention_mask=sequences.attention_mask,
                           position_ids=sequences.position_ids, use_cache=False).logits
            logits = logits[:, sequences.context_length - 1 : -1]
        logits = logits.float() / self.hparams.temperature
        targets = sequences.query_response[:, sequences.context_length :]
        return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"), hidden

    def value_estimates(self, sequences: Sequences, policy_hidden: torch.Tensor) -> torch.Tensor:
        if self.value_backbone is None:
            return self.value_head(policy_hidden)
        return self.value_head(self.response_hidden(self.value_backbone, sequences))

    # --- a rollout ---------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict) -> Rollout:
        hp, tokenizer = self.hparams, self.tokenizer
        prompt_ids = batch["prompt_ids"]
        # Seeded from the global RNG, so a run is reproducible from seed_everything and each rollout differs.
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
        logprobs, hidden = self.response_logprobs(self.policy, "policy", sequences)
        ref_logprobs, _ = self.response_logprobs(self.reference, "reference", sequences)
        values = self.value_estimates(sequences, hidden)
        ended = torch.tensor([g[-1] == tokenizer.eos_token_id for g in generated], device=self.device)
        scores = self.proxy.score(batch["prompts"], decode_responses(tokenizer, generated)).to(self.device)
        if hp.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - hp.missing_eos_penalty)
        mask = sequences.response_mask
        return Rollout(sequences, mask, logprobs * mask, ref_logprobs * mask, values * mask, scores,
                       ended.sum().float())

    def rollout_metrics(self, rollout: Rollout, kl_coef: float) -> tuple[dict, torch.Tensor]:
        """TRL's objective/ metrics, and the per-token rewards: -kl_coef * KL, plus the score at the last token."""
        kl = rollout.logprobs - rollout.ref_logprobs
        non_score_rewards = -kl_coef * kl
        last = rollout.mask.sum(1) - 1
        rewards = non_score_rewards.clone()
        rewards[torch.arange(len(last), device=last.device), last] += rollout.scores
        metrics = {
            "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-rollout.logprobs).sum(1).mean(),
            "objective/non_score_reward": non_score_rewards.sum(1).mean(),
            "objective/rlhf_reward": rollout.scores.mean() + non_score_rewards.sum(1).mean(),
            "objective/scores": rollout.scores.mean(),
            "val/num_eos_tokens": rollout.num_eos_tokens,
            "response_len": rollout.mask.sum(1).float().mean(),
        }
        return metrics, rewards

    # --- training ----------------------------------------------------------------------------------
    def ppo_updates(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, batch_idx: int) -> dict:
        hp = self.hparams
        optimizer = self.optimizers()
        if len(rollout.scores) % hp.num_mini_batches:
            raise ConfigError(f"the rollout batch ({len(rollout.scores)} prompts) does not divide into "
                              f"model.num_mini_batches={hp.num_mini_batches}")
        stats = defaultdict(list)
        progress = tqdm(total=hp.ppo_epochs * hp.num_mini_batches, desc="rollout: PPO updates", leave=False)
        for _ in range(hp.ppo_epochs):
            for rows in torch.randperm(len(rollout.scores), device=self.device).chunk(hp.num_mini_batches):
                mask = rollout.mask[rows]
                sequences = rollout.sequences[rows]
                logprobs, hidden = self.response_logprobs(self.policy, "policy", sequences)
                values = self.value_estimates(sequences, hidden)
                old_logprobs = rollout.logprobs[rows]
                policy_loss, policy_clipfrac = ppo_policy_loss(logprobs, old_logprobs, advantages[rows], mask,
                                                               hp.cliprange)
                value_loss, value_clipfrac = ppo_value_loss(values, rollout.values[rows], returns[rows], mask,
                                                            hp.cliprange_value)
                loss = policy_loss + hp.vf_coef * value_loss
                progress.update()
                if not self.loss_is_finite(loss, batch_idx):
                    continue
                optimizer.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                with torch.no_grad():
                    stats["policy/approxkl"].append(0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask))
                    stats["policy/clipfrac"].append(policy_clipfrac)
                    stats["loss/policy"].append(policy_loss)
                    stats["loss/value"].append(value_loss)
                    stats["val/clipfrac"].append(value_clipfrac)
                    stats["loss"].append(loss)
        progress.close()
        self.lr_schedulers().step()
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def adapt_kl_coef(self, kl: torch.Tensor, prompts: int) -> None:
        """Ziegler et al.'s proportional controller towards `kl_target`, with the error clipped to 0.2."""
        hp = self.hparams
        if hp.kl_target is not None:
            error = min(max(self.mean_across_devices(kl).item() / hp.kl_target - 1, -0.2), 0.2)
            self.kl_coef *= 1 + error * prompts * self.trainer.world_size / hp.kl_horizon

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rollout = self.rollout(batch)
        metrics, rewards = self.rollout_metrics(rollout, self.kl_coef)
        advantages, returns = gae(rewards, rollout.values, rollout.mask, self.hparams.gamma, self.hparams.lam)
        advantages = masked_whiten(advantages, rollout.mask)
        metrics.update(self.ppo_updates(rollout, advantages, returns, batch_idx))
        self.rollout_tokens = int(rollout.sequences.attention_mask.sum()) * self.hparams.ppo_epochs
        metrics["objective/kl_coef"] = torch.tensor(self.kl_coef)
        self.adapt_kl_coef(metrics["objective/kl"], len(rollout.scores))
        self.log_metrics("train", metrics, len(rollout.scores), prog_bar=("objective/scores", "objective/kl"))
        self.log_skipped_batches()  # here a skipped batch is one PPO mini-batch update

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rollout = self.rollout(batch)
        metrics, _ = self.rollout_metrics(rollout, self.kl_coef)
        # TRL's "val/" names the value head; in validation the stage prefix says it already.
        metrics = {name.removeprefix("val/"): value for name, value in metrics.items()}
        self.log_metrics("val", metrics, len(rollout.scores), prog_bar=("objective/scores",))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_coef = checkpoint.get("kl_coef", self.kl_coef)

    def examples_in(self, batch: dict) -> int:
        return len(batch["prompt_ids"])

    def tokens_in(self, batch: dict) -> int:
        return self.rollout_tokens  # prompts and sampled responses, once per PPO epoch
