"""What batches are made of, shared by the data and the modules: the label that masks a token out of the loss,
the reference log-prob columns, a token sequence's cache key and right-padded prompt + completion rows.
Imports nothing of this project, so that `modules` and `datamodules` can both build on it."""

import hashlib
import json

import torch

IGNORE_INDEX = -100
# Views whose rows a frozen reference scores: {column of reference log-probs: the response column it scores}.
REFERENCE_COLUMNS = {
    "paired": {"chosen_reference_logp": "chosen_ids", "rejected_reference_logp": "rejected_ids"},
    "unpaired": {"reference_logp": "completion_ids", "kl_reference_logp": "kl_completion_ids"},
}


def sequence_key(prompt_ids: list[int], response_ids: list[int]) -> str:
    """Names a prompt + response token sequence in the reference log-prob cache."""
    return hashlib.blake2b(json.dumps([prompt_ids, response_ids]).encode(), digest_size=16).hexdigest()


def pad_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows; labels are -100 on prompt and padding tokens."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion)
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the sequences of these lengths, shortest first, in batches of `batch_size`: little padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
