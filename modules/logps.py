"""Per-sequence log-probs of response tokens: the quantity every loss here is a function of."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datamodules.batches import IGNORE_INDEX


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
