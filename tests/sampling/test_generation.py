"""The sampler backends: the harness's decode loop gives plain `model.generate`'s greedy outputs token for
token (tiny model and SmolLM2), with EOS, `max_new_tokens` and left-padded batches of mixed lengths; it is
deterministic for a seed; bad settings are one line naming the field."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch

import bench.sampling.decoding
import bench.sampling.generation
from bench.cli import main
from bench.core.errors import ConfigError
from bench.sampling.generation import KVCacheSampler, Sampling, invert_cdf, sample

PROMPTS = [list(range(5, 5 + n)) for n in (9, 3, 14, 6, 11, 20, 2)]  # mixed lengths: left padding in every batch


@pytest.fixture(scope="module")
def tiny():
    from bench.core.models import load_causal_lm, load_tokenizer

    return load_causal_lm("tiny"), load_tokenizer("tiny")


def tokens_as_eos(tokenizer, eos_id: int):
    """The tokenizer's ids with another EOS: the random tiny model never samples its real EOS."""
    return SimpleNamespace(eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)


def both_backends(model, tokenizer, prompts, **settings):
    return [sample(model, tokenizer, prompts, Sampling(backend=backend, **settings), desc=backend)
            for backend in ("hf", "harness")]


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_greedy_equals_model_generate_with_eos_and_max_new_tokens(tiny, precision):
    model, tokenizer = tiny
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else torch.no_grad()
    with context:
        free_running = sample(model, tokenizer, PROMPTS, Sampling(temperature=0, max_new_tokens=12, batch_size=3),
                              desc="no eos")
        # An EOS that some rows reach early and others never: rows finish at different steps.
        eos_id = free_running[0][3]
        stopping = tokens_as_eos(tokenizer, eos_id)
        hf, harness = both_backends(model, stopping, PROMPTS, temperature=0, max_new_tokens=12, batch_size=3)
    assert hf == harness
    ended = [ids for ids in harness if ids[-1] == eos_id]
    assert ended and len(ended) < len(PROMPTS)  # both kinds of row, or the test proves nothing
    for ids in harness:
        assert len(ids) <= 12 and eos_id not in ids[:-1]
        assert ids[-1] == eos_id or len(ids) == 12


def test_dropping_finished_rows_changes_no_output(tiny, monkeypatch):
    model, tokenizer = tiny
    greedy = Sampling(temperature=0, max_new_tokens=10, batch_size=7)
    eos_id = sample(model, tokenizer, PROMPTS, greedy, desc="no eos")[2][1]
    stopping = tokens_as_eos(tokenizer, eos_id)
    dropped = sample(model, stopping, PROMPTS, greedy, desc="dropping")
    monkeypatch.setattr(KVCacheSampler, "compact_fraction", float("inf"))  # never drop a row
    kept = sample(model, stopping, PROMPTS, greedy, desc="keeping")
    assert dropped == kept


def test_sampling_is_deterministic_for_a_seed(tiny):
    model, tokenizer = tiny
    settings = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8, batch_size=3, seed=7)
    first = sample(model, tokenizer, PROMPTS, settings, desc="first")
    assert sample(model, tokenizer, PROMPTS, settings, desc="again") == first
    other = sample(model, tokenizer, PROMPTS, Sampling(**{**settings.__dict__, "seed": 8}), desc="other seed")
    assert other != first
    # Repeated prompts draw from their own streams: RRHF's candidates and best-of-N need distinct samples.
    repeated = sample(model, tokenizer, [PROMPTS[0]] * 4, settings, desc="repeated")
    assert len({tuple(ids) for ids in repeated}) > 1


def test_length_grouped_cache_changes_no_output(tiny, monkeypatch):
    """Rows grouped by prompt length, in buffers that grow as tokens are decoded, with rows dropped and
    repeated across groups: the same tokens as one buffer for the batch under the model's own attention (which
    an architecture outside `GROUPED_CACHE_MODEL_TYPES` keeps), greedy and seeded."""
    model, tokenizer = tiny
    prompts = PROMPTS + [PROMPTS[1], PROMPTS[3], PROMPTS[1]]  # repeated prompts, in more than one group
    greedy = Sampling(temperature=0, max_new_tokens=10, batch_size=6)
    stopping = tokens_as_eos(tokenizer, sample(model, tokenizer, prompts, greedy, desc="no eos")[2][1])
    settings = [greedy, Sampling(temperature=1.0, max_new_tokens=10, batch_size=6, seed=3)]
    monkeypatch.setattr(KVCacheSampler, "prefill_rows", 2)
    monkeypatch.setattr(bench.sampling.decoding.DecodeCache, "group_rows", 2)
    monkeypatch.setattr(bench.sampling.decoding.DecodeCache, "growth", 3)
    caches = []
    original = bench.sampling.generation.decode_cache
    monkeypatch.setattr(bench.sampling.generation, "decode_cache", lambda *args: caches.append(original(*args)) or caches[-1])
    grouped = [sample(model, stopping, prompts, s, desc="grouped") for s in settings]
    assert all(cache.grouped and len(cache.groups) > 1 for cache in caches)
    assert max(buffer.shape[2] for cache in caches for buffer in cache.layers[0].key_buffers) > 3 + 20  # grew
    assert any(ids[-1] == stopping.eos_token_id and len(ids) < 10 for ids in grouped[0])  # rows were dropped
    caches.clear()
    # An architecture whose attention is not known to pass the cache's keys straight through keeps its own.
    monkeypatch.setattr(model.config, "model_type", "idefics")
    assert [sample(model, stopping, prompts, s, desc="one buffer") for s in settings] == grouped
    assert caches and not any(cache.grouped for cache in caches)


def test_packed_linear_weights_change_no_output(tiny, monkeypatch):
    """Under bf16 autocast on CPU the linear layers run on weights packed for oneDNN: the same tokens as the
    autocast linear layers, and the model's own forward is back afterwards."""
    model, tokenizer = tiny
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels")
    settings = [Sampling(temperature=0, max_new_tokens=10, batch_size=4),
                Sampling(temperature=1.0, max_new_tokens=10, batch_size=4, seed=3)]
    calls = []
    original = bench.sampling.decoding.packed_linear
    monkeypatch.setattr(bench.sampling.decoding, "packed_linear", lambda *args: calls.append(1) or original(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = [sample(model, tokenizer, PROMPTS, s, desc="packed") for s in settings]
        assert calls
        assert not any("forward" in vars(module) for module in model.modules())
        monkeypatch.setattr(bench.sampling.decoding, "packed_linear_dtype", lambda model: None)
        assert [sample(model, tokenizer, PROMPTS, s, desc="autocast") for s in settings] == packed


def tiny_of(architecture: str):
    """A random 2-layer model of one architecture `FusedDecodeStep` runs, with grouped query heads (Qwen2 also
    with q/k/v biases)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    config = config_class(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          sliding_window=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    return model_class(config).eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_fused_decode_step_gives_the_models_logits(architecture, precision, monkeypatch):
    """Decode steps over several row groups, with rows leaving mid-way: the same logits, bit for bit, as the
    model's own forward pass over the same cache (under bf16 autocast on CPU, on packed and fused weights)."""
    model = tiny_of(architecture)
    monkeypatch.setattr(KVCacheSampler, "prefill_rows", 2)
    monkeypatch.setattr(bench.sampling.decoding.DecodeCache, "group_rows", 2)
    prompts = [[(7 * n + i) % 90 + 3 for i in range(n)] for n in (3, 5, 6, 8, 11)]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else torch.no_grad()
    runs = []
    with context, torch.no_grad(), bench.sampling.decoding.attention_for_decoding(model), \
            bench.sampling.decoding.packed_linears(model):
        for fused in (False, True):
            logits, mask, cache = KVCacheSampler().prefill(model, prompts, 6, pad_id=0)
            assert bench.sampling.decoding.FusedDecodeStep.fits(model, cache)
            step = (bench.sampling.decoding.FusedDecodeStep(model, cache) if fused
                    else partial(bench.sampling.decoding.hf_decode_step, model, cache))
            tokens, positions, steps = logits.argmax(-1), mask.sum(-1), []
            for index in range(5):
                if index == 2:  # rows 1 and 2 finish: one group keeps its first row, another moves a row up
                    keep = cache.rows_to_keep(torch.tensor([False, True, True, False, False]))
                    assert keep.tolist() == [0, 3, 4]
                    cache.batch_select_indices(keep)
                    tokens, positions, mask = tokens[keep], positions[keep], mask[keep]
                mask = torch.cat([mask, mask.new_ones((len(tokens), 1))], dim=1)
                steps.append(step(tokens, positions, mask))
                tokens, positions = steps[-1].argmax(-1), positions + 1
            runs.append(steps)
    for own, fused in zip(*runs):
        assert torch.equal(own, fused)


def test_only_the_exact_architectures_get_the_fused_step():
    model = tiny_of("llama")
    with bench.sampling.decoding.attention_for_decoding(model):
        cache = bench.sampling.decoding.decode_cache(model, [3, 5], 4)
        assert bench.sampling.decoding.FusedDecodeStep.fits(model, cache)
        subclass = type("WrappedLlamaForCausalLM", (type(model),), {})  # e.g. a wrapper's own forward
        model.__class__ = subclass
        assert not bench.sampling.decoding.FusedDecodeStep.fits(model, cache)
        assert not isinstance(bench.sampling.decoding.decode_step(model, cache), bench.sampling.decoding.FusedDecodeStep)


def test_finished_rows_leave_their_group_in_place(monkeypatch):
    """A finished row's place in its group's buffers is taken by the group's last live row: only that row is
    copied, and the buffers are views of the same memory."""
    monkeypatch.setattr(bench.sampling.decoding.DecodeCache, "group_rows", 3)
    cache = bench.sampling.decoding.DecodeCache(1, [2, 3, 3, 4, 5, 6], 4, None, "cpu", grouped=True)
    layer = cache.layers[0]
    keys, values = torch.randn(6, 2, 6, 4), torch.randn(6, 2, 6, 4)
    for begin, width in ((0, 3), (3, 6)):  # each group as wide as its longest prompt
        layer.place(slice(begin, begin + 3), keys[begin:begin + 3, :, :width], values[begin:begin + 3, :, :width])
    before = [buffer.clone() for buffer in layer.key_buffers]
    addresses = [buffer.data_ptr() for buffer in layer.key_buffers]
    keep = cache.rows_to_keep(torch.tensor([True, False, False, False, True, False]))
    assert keep.tolist() == [2, 1, 3, 5]
    cache.batch_select_indices(keep)
    assert [buffer.data_ptr() for buffer in layer.key_buffers] == addresses
    assert torch.equal(layer.key_buffers[0], before[0][[2, 1]])
    assert torch.equal(layer.key_buffers[1], before[1][[0, 2]])
    assert [(group.begin, group.end) for group in cache.groups] == [(0, 2), (2, 4)]
    # Any other order (here: a repeated row) copies the group.
    cache.batch_select_indices(torch.tensor([0, 0, 1, 2, 3]))
    assert torch.equal(layer.key_buffers[0], before[0][[2, 2, 1]])


def test_draws_invert_the_float64_cumulative_distribution():
    """The two-level inversion picks the token a float64 cumulative sum over the whole vocabulary picks (up to
    float rounding at a boundary), on a vocabulary that is not a multiple of the block, and never a token of
    probability 0."""
    generator = torch.Generator().manual_seed(0)
    agree = total = 0
    for scale in (0.5, 2.0, 8.0):
        logits = torch.randn(64, 1000, generator=generator) * scale
        logits[:, ::7] = float("-inf")  # tokens a warper removed
        probs = torch.softmax(logits, -1)
        for _ in range(20):
            uniform = torch.rand(64, generator=generator, dtype=torch.float64)
            cumulative = probs.cumsum(-1, dtype=torch.float64)
            exact = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True).squeeze(1)
            drawn = invert_cdf(probs, uniform, block=64)
            assert (probs.gather(1, drawn[:, None]) > 0).all()
            agree += int((drawn == exact.clamp(max=999)).sum())
            total += len(drawn)
    assert agree >= 0.999 * total
    # The edges: a draw at 0 takes the first possible token, a draw at 1 the last one.
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]])
    assert invert_cdf(probs, torch.tensor([0.0], dtype=torch.float64), block=2).tolist() == [1]
    assert invert_cdf(probs, torch.tensor([1.0], dtype=torch.float64), block=2).tolist() == [2]


def test_top_p_and_temperature_warp_as_hf_warpers_do():
    """The draws are those of HF's own TemperatureLogitsWarper then TopPLogitsWarper (generate's order), on bf16
    logits as the model returns them, with the same uniform numbers."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = (torch.randn(6, 300) * 4).bfloat16()
    for temperature, top_p in ((0.7, 1.0), (1.3, 0.8), (0.5, 0.3)):
        settings = Sampling(temperature=temperature, top_p=top_p)
        hf_warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                         + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
        for seed in range(5):
            generators = [torch.Generator().manual_seed(seed * 10 + row) for row in range(6)]
            ours = KVCacheSampler.choose(logits, settings, KVCacheSampler.warpers(settings), generators)
            uniform = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(seed * 10 + row),
                                            dtype=torch.float64) for row in range(6)])
            probs = torch.softmax(hf_warpers(None, logits.float()), dim=-1)
            assert ours.tolist() == invert_cdf(probs, uniform).tolist()
    assert logits.dtype == torch.bfloat16  # warped on a copy
    greedy = Sampling(temperature=0)
    assert KVCacheSampler.choose(logits, greedy, KVCacheSampler.warpers(greedy), []).tolist() == \
        logits.float().argmax(-1).tolist()
    hot = Sampling(temperature=100.0)
    few = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    draws = {KVCacheSampler.choose(few, hot, KVCacheSampler.warpers(hot), [torch.Generator().manual_seed(s)]).item()
             for s in range(50)}
    assert draws == {0, 1, 2, 3}
    assert few.tolist() == [[4.0, 3.0, 0.0, -1.0]]  # fp32 logits are warped on a copy too


def test_unknown_backend_and_unhonoured_settings_are_named(tiny, capsys, workdir):
    with pytest.raises(ConfigError, match="sampling.backend 'vllm' is unknown; choose one of hf, harness"):
        Sampling(backend="vllm")
    model, tokenizer = tiny
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(ConfigError, match=r"generation_config.repetition_penalty=1.3 is not honoured by "
                                              r"sampling.backend='harness'"):
            sample(model, tokenizer, PROMPTS[:1], Sampling(max_new_tokens=2), desc="refused")
        assert sample(model, tokenizer, PROMPTS[:1], Sampling(max_new_tokens=2, backend="hf"), desc="hf")
    finally:
        model.generation_config.repetition_penalty = None
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "tiny", "--recipe", "tiny", "--backend", "vllm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "sampling.backend 'vllm' is unknown" in err and "Traceback" not in err


@pytest.mark.e2e
@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_greedy_equals_model_generate_on_smollm2(hh_path):
    """In fp32 the two backends compute the same numbers, so greedy decoding agrees token for token. Under bf16
    autocast they round differently (the harness stores keys and values in bf16, as autocast's attention
    reads them, and rounds its attention scores to bf16 where SDPA keeps fp32), and a near-tie between two tokens
    can then go either way after a few dozen tokens: the tiny-model test covers that path, and
    tests/sampling/test_greedy_bf16.py shows each divergence on SmolLM2 is such a near-tie."""
    from bench.core.models import load_causal_lm, load_tokenizer
    from datamodules.formatting import Formatter
    from datamodules.hh_rlhf import load_splits

    model, tokenizer = load_causal_lm("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    formatter = Formatter(tokenizer)
    pairs = load_splits(hh_path)[0]["test"][:6]
    prompts = [formatter.generation_prompt_ids(p.prompt) for p in pairs]
    hf, harness = both_backends(model, tokenizer, prompts, temperature=0, max_new_tokens=40, batch_size=3)
    assert hf == harness
    assert any(ids[-1] == tokenizer.eos_token_id for ids in harness)  # some answers end before the cap
    assert bench.sampling.generation.SAMPLING_STATS.tokens > 0


def test_a_backend_named_like_a_builtin_is_refused():
    with pytest.raises(TypeError, match="sampling backend name 'harness' is taken by "
                                        "bench.sampling.generation.KVCacheSampler"):
        class MyHarness(bench.sampling.generation.Sampler):
            name = "harness"

    class FewerPrefillRows(KVCacheSampler):  # a tuned variant keeps the name and stays unregistered
        prefill_rows = 4

    assert bench.sampling.generation.SAMPLERS["harness"] is KVCacheSampler
