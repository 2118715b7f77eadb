"""Per-sequence log-probs of response tokens: the quantity every loss here is a function of; and the exact KL
between two policies' tempered next-token distributions (`token_kl`, `sequence_kl`): what `eval/kl`,
`val/overopt/kl` and the online algorithms' `objective/kl` report."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.core.batches import IGNORE_INDEX


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


def sequence_logps(model: torch.nn.Module, batch: dict, prefix: str = "", head_on_responses: bool = False) -> SequenceLogps:
    """Sum of log pi(y_t | x, y_<t) over the tokens whose label is not IGNORE_INDEX.

    With `head_on_responses`, the output head runs on response positions only: prompt and padding
    are most of a batch, and the vocabulary projection and its softmax are the largest activations.
    Only for models where `head_computes_logits` holds.
    """
    input_ids, attention_mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
    targets = batch[f"{prefix}labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if head_on_responses:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][mask])
        # cross_entropy runs in fp32 under autocast and never materialises the full log-softmax.
        token_logps = -F.cross_entropy(logits, targets[mask], reduction="none")
        rows = mask.nonzero()[:, 0]
        total = torch.zeros(len(targets), dtype=token_logps.dtype, device=token_logps.device)
        total = total.index_add(0, rows, token_logps)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        token_logps = -F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)
        total = (token_logps * mask).sum(-1)
    return SequenceLogps(total=total, tokens=mask.sum(-1))


def sequence_logps_by_length(model: torch.nn.Module, batch: dict, prefix: str = "", head_on_responses: bool = False,
                             rows_per_forward: int | None = None) -> SequenceLogps:
    """`sequence_logps` over the batch's rows sorted by length, `rows_per_forward` at a time, each group padded
    only to its own longest row. The same numbers as one forward (up to float summation order): a preference
    batch pairs short and long responses, and one forward computes on about half padding (`bench perf`)."""
    input_ids, attention_mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
    if rows_per_forward is None or len(input_ids) <= rows_per_forward:
        return sequence_logps(model, batch, prefix, head_on_responses)
    lengths = attention_mask.sum(-1)
    total = tokens = None
    for rows in lengths.argsort().split(rows_per_forward):
        width = int(lengths[rows].max())
        group = {f"{prefix}{name}": batch[f"{prefix}{name}"][rows, :width] for name in ("input_ids", "attention_mask", "labels")}
        part = sequence_logps(model, group, prefix, head_on_responses)
        if total is None:
            total = part.total.new_zeros(len(input_ids))
            tokens = part.tokens.new_zeros(len(input_ids))
        total, tokens = total.index_put((rows,), part.total), tokens.index_put((rows,), part.tokens)
    return SequenceLogps(total=total, tokens=tokens)


@torch.no_grad()
def head_computes_logits(model: torch.nn.Module) -> bool:
    """Whether the model's logits are exactly its output head applied to its decoder's last hidden state.
    Checked on a short input, so that models which rescale or soft-cap logits in forward() keep the
    full path."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if decoder is None or head is None or decoder is model:
        return False
    input_ids = torch.arange(1, 9, device=model.device)[None] % model.config.vocab_size
    expected = model(input_ids=input_ids, use_cache=False).logits
    got = head(decoder(input_ids=input_ids, use_cache=False).last_hidden_state)
    return got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


# --- the exact KL between two policies at a sampling temperature -------------------------------------------
# Elements (positions x vocabulary) of one float32 intermediate of the KL: 2**24 is 64 MB, and the KL holds a
# handful of them at a time (SmolLM2's 49,152-token vocabulary: 341 positions a chunk).
KL_CHUNK_ELEMENTS = 2**24


def check_kl_temperature(temperature: float) -> None:
    """The KL of two sampling distributions needs distributions: greedy decoding (temperature 0) is a point mass
    on each model's argmax, whose KL is infinite or zero, and says nothing about how far the models are."""
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"the KL at temperature {temperature} is not defined: it is the KL of the tempered "
                         "next-token distributions softmax(logits / T), which need 0 < T < inf (T 0 is greedy)")


def positions_per_chunk(vocab_size: int) -> int:
    return max(1, KL_CHUNK_ELEMENTS // vocab_size)


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p || q) per position, exactly, over the whole vocabulary, for p = softmax(policy_logits / T) and
    q = softmax(reference_logits / T): shape (...,) from logits (..., V).

    In float32 (float64 logits stay float64) via log_softmax, whatever the logits' dtype, a chunk of positions
    at a time, and clamped at 0: it is never negative but for rounding. This is the KL of the tempered,
    untruncated distributions: with top_p < 1 the sampler draws from a truncated p, which this does not model
    (the recipes sample with top_p 1). Summed over the tokens of a response sampled from p, it is an unbiased
    estimate of the sequence-level KL of the tempered autoregressive distributions (the chain rule), with
    less variance than the sum of the tempered log-ratios of the sampled tokens, and never negative."""
    check_kl_temperature(temperature)
    if policy_logits.shape != reference_logits.shape:
        raise ValueError(f"policy logits {tuple(policy_logits.shape)} and reference logits "
                         f"{tuple(reference_logits.shape)} differ: the two models must share a vocabulary")
    vocab_size = policy_logits.shape[-1]
    dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
    chunk = positions_per_chunk(vocab_size)
    pieces = [_kl_of_chunk(p.to(dtype), q.to(dtype), temperature)
              for p, q in zip(policy_logits.reshape(-1, vocab_size).split(chunk),
                              reference_logits.reshape(-1, vocab_size).split(chunk))]
    flat = torch.cat(pieces) if pieces else policy_logits.new_zeros(0, dtype=dtype)
    return flat.view(policy_logits.shape[:-1])


def _kl_of_chunk(policy_logits: torch.Tensor, reference_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = (policy_logits / temperature).log_softmax(-1)
    log_q = (reference_logits / temperature).log_softmax(-1)
    p = log_p.exp()
    # Tokens of probability 0 under p add nothing, even where q is 0 too (-inf - -inf would be NaN).
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0)


def _response_outputs(model: torch.nn.Module, batch: dict, mask: torch.Tensor, head_on_responses: bool):
    """What gives the logits at the positions that predict response tokens, as (N, ·) rows in the order of
    `mask.nonzero()`: the decoder's hidden states and the head to apply to them a chunk at a time, or (without
    `head_on_responses`) the logits themselves and no head."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if head_on_responses:
        hidden = model.get_decoder()(**inputs).last_hidden_state
        return hidden[:, :-1][mask], model.get_output_embeddings()
    return model(**inputs).logits[:, :-1][mask], None


def sequence_kl(policy: torch.nn.Module, reference: torch.nn.Module, batch: dict, temperature: float,
                head_on_responses: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """Per row of `batch` (input_ids, attention_mask, labels with IGNORE_INDEX off the response, as
    `sequence_logps` reads), the sum over its response tokens of `token_kl` between the policy's and the
    reference's next-token distributions at `temperature`. On responses sampled from the policy at that
    temperature, its mean estimates KL(pi_T || pi_ref_T) of the whole responses, and is never negative.

    `head_on_responses` (for the policy, for the reference): run that model's output head only on response
    positions, where `head_computes_logits` holds. The logits are made and reduced a chunk of positions at a
    time, so the batch's rows x response tokens x vocabulary never exist at once in float32."""
    check_kl_temperature(temperature)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    policy_rows, policy_head = _response_outputs(policy, batch, mask, head_on_responses[0])
    reference_rows, reference_head = _response_outputs(reference, batch, mask, head_on_responses[1])
    chunk = positions_per_chunk(policy.config.vocab_size)
    pieces = []
    for policy_part, reference_part in zip(policy_rows.split(chunk), reference_rows.split(chunk)):
        policy_logits = policy_head(policy_part) if policy_head is not None else policy_part
        reference_logits = reference_head(reference_part) if reference_head is not None else reference_part
        pieces.append(token_kl(policy_logits, reference_logits, temperature))
    per_token = torch.cat(pieces) if pieces else torch.zeros(0, device=mask.device)
    total = torch.zeros(len(mask), dtype=per_token.dtype, device=mask.device)
    return total.index_add(0, mask.nonzero()[:, 0], per_token)
