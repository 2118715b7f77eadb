"""Greedy decoding of SmolLM2 on evaluation's HH test prompts: in fp32 the harness's sampler and plain
`model.generate` give the same tokens; under bf16 autocast (the evaluation setting) they can part, and
where they first part the two tokens they chose are a near-tie of bf16 rounding: a plain full forward of
the shared prefix, under the same autocast, puts both among its top 2 with logits at most a few bf16
spacings apart (bf16 keeps 8 significant bits: the spacing near a logit x is about |x| * 2**-8), and so does
an fp32 forward. docs/performance.md has the numbers over 128 new tokens."""

import pytest
import torch

from bench.sampling.generation import Sampling, sample

N_PROMPTS = 16  # the test prompts evaluation samples with eval.n_prompts 16 and prompt seed 0
MAX_NEW_TOKENS = 32  # on this machine 5 of the 16 part within 32 tokens (8 within 128); fewer tokens keep it short
MAX_SPACINGS = 4  # the two chosen tokens' logits may lie this many spacings apart (measured over 128 tokens:
# at most 1.98 in bf16, 2.47 in fp32)


@pytest.fixture(scope="module")
def smollm2_prompts(hh_path):
    from bench.core.models import load_causal_lm, load_tokenizer
    from bench.evaluation.evaluate import eval_formatter, eval_pairs

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm("smollm2-135m-instruct").eval()
    data = {"path": hh_path}
    formatter = eval_formatter(tokenizer, data)
    prompts = [formatter.generation_prompt_ids(pair.prompt) for pair in eval_pairs(data, "test", N_PROMPTS, 0)]
    return model, tokenizer, prompts


def greedy(model, tokenizer, prompts, backend: str) -> list[list[int]]:
    return sample(model, tokenizer, prompts, Sampling(temperature=0, max_new_tokens=MAX_NEW_TOKENS, backend=backend),
                  desc=backend, leave=False)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def next_token_logits(model, ids: list[int], bf16: bool) -> torch.Tensor:
    """The next-token logits of one unpadded sequence by the model's plain forward, as fp32 numbers."""
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.no_grad()
    with context:
        return model(torch.tensor([ids])).logits[0, -1].float()


def tokens_above(logits: torch.Tensor, token: int) -> int:
    """How many tokens have a strictly larger logit: 0 or 1 for a token among the top 2, ties counted."""
    return int((logits > logits[token]).sum())


@pytest.mark.e2e
@pytest.mark.slow  # about 25-50 s: 16 prompts, both backends, in bf16 and fp32
def test_greedy_backends_part_only_at_bf16_near_ties(smollm2_prompts):
    model, tokenizer, prompts = smollm2_prompts
    assert greedy(model, tokenizer, prompts, "hf") == greedy(model, tokenizer, prompts, "harness")  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf, harness = greedy(model, tokenizer, prompts, "hf"), greedy(model, tokenizer, prompts, "harness")

    report = []
    for prompt, a, b in zip(prompts, hf, harness):
        if a == b:
            continue
        t = first_difference(a, b)
        assert t < min(len(a), len(b)), "one output is a prefix of the other: they end differently, not at a token"
        chosen_hf, chosen_harness = a[t], b[t]
        logits = next_token_logits(model, prompt + a[:t], bf16=True)
        spacing = logits.max().abs().item() * 2**-8
        gap = (logits[chosen_hf] - logits[chosen_harness]).abs().item()
        report.append((t, chosen_hf, chosen_harness, gap, gap / spacing))
        assert tokens_above(logits, chosen_hf) <= 1 and tokens_above(logits, chosen_harness) <= 1, report[-1]
        assert gap <= MAX_SPACINGS * spacing, report[-1]
        # in fp32 too the two are the top 2, with a margin of the order of bf16's spacing at this magnitude
        exact = next_token_logits(model, prompt + a[:t], bf16=False)
        assert tokens_above(exact, chosen_hf) <= 1 and tokens_above(exact, chosen_harness) <= 1, report[-1]
        assert (exact[chosen_hf] - exact[chosen_harness]).abs().item() <= MAX_SPACINGS * spacing, report[-1]
    print(f"bf16: {N_PROMPTS - len(report)} of {N_PROMPTS} identical; first divergences (t, hf, harness, gap, "
          f"gap/spacing): {report}")
