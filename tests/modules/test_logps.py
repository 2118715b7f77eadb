"""Log-probs over rows grouped by length equal one forward over the padded batch, values and gradients (in
float64, where summation order cannot hide a difference; in float32 they agree to rounding)."""

import pytest
import torch

from bench.core.batches import pad_rows
from bench.core.models import load_causal_lm
from modules.logps import sequence_logps, sequence_logps_by_length


@pytest.mark.parametrize("rows_per_forward", [1, 3, 16])
def test_grouped_forwards_give_the_batch_forwards_numbers(rows_per_forward):
    model = load_causal_lm("tiny").train().double()
    torch.manual_seed(0)
    lengths = [(3, 40), (25, 2), (7, 7), (12, 30), (2, 5), (30, 31)]  # prompt, response: much padding
    prompts = [torch.randint(5, 1000, (p,)).tolist() for p, _ in lengths]
    responses = [torch.randint(5, 1000, (r,)).tolist() for _, r in lengths]
    batch = pad_rows(prompts, responses, pad_id=0)

    def values_and_grads(function, **kwargs):
        model.zero_grad()
        logps = function(model, batch, **kwargs)
        (logps.total * torch.arange(1, len(lengths) + 1)).sum().backward()  # rows weighted differently
        return logps, [p.grad.clone() for p in model.parameters()]

    one, one_grads = values_and_grads(sequence_logps)
    grouped, grouped_grads = values_and_grads(sequence_logps_by_length, rows_per_forward=rows_per_forward)
    assert grouped.tokens.tolist() == one.tokens.tolist() == [r for _, r in lengths]
    torch.testing.assert_close(grouped.total, one.total, rtol=1e-12, atol=1e-10)
    for a, b in zip(grouped_grads, one_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
