"""Sampling from a policy: the `Sampling` settings, the sampler backends behind `sample()`, and the on-disk
cache of sampled token ids.

Every caller samples through `sample()`: evaluation (policy and reference samples), RRHF's candidates, PPO's
rollouts and best-of-N. `sampling.backend` chooses the class that does the work:

- ``harness`` (the default, `KVCacheSampler`, its machinery in `bench.sampling.decoding`): a decode loop over the
  model's own modules, with a key/value cache written in place and grouped by prompt length, the linear
  layers' weights cast to bf16 once and packed for oneDNN on CPU, and finished rows dropped from the batch.
  Each prompt draws from its own random stream, seeded from `sampling.seed` and its position, so a row's
  sample does not depend on which other rows finish first.
- ``hf`` (`HFGenerateSampler`): plain `model.generate`, as an HF or TRL user calls it.

A backend is a subclass of `Sampler` with one method; a GPU user adds vLLM as one more class.
"""

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, TopPLogitsWarper
from transformers.cache_utils import DynamicCache

from bench.core import precision
from bench.core.batches import length_batches
from bench.core.errors import ConfigError
from bench.core.registries import register
from bench.core.settings import check_values
from bench.core.models import cache_dir, resolve
from bench.sampling.decoding import DecodeCache, attention_for_decoding, decode_cache, decode_step, packed_linears

log = logging.getLogger(__name__)

# A response ends where the model starts the next human turn, in raw HH or chat form.
NEW_TURN = re.compile(r"(\n\s*)?(Human:|<\|im_start\|>user)")
DEFAULT_BACKEND = "harness"


@dataclass(frozen=True)
class Sampling:
    """How to sample: `temperature` 0 is greedy; `top_p` < 1 is nucleus sampling; a response ends at EOS /
    end of turn (kept) or after `max_new_tokens`. `batch_size` prompts of similar length decode together."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 64  # the harness's sampler gains up to here on 2 CPU cores (bench perf)
    seed: int = 0
    backend: str = DEFAULT_BACKEND

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"invalid sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, "
                              "max_new_tokens >= 1, batch_size >= 1")
        check_backend(self.backend)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def of(cls, value: "Sampling | dict | None", where: str = "sampling", **defaults) -> "Sampling":
        """Sampling settings from a recipe's mapping (or as given), over `defaults`: the one conversion that
        every `sampling:` section (eval, gold.on_policy, overoptimisation, data.candidate_sampling) goes through."""
        if isinstance(value, cls):
            return value
        values = {**defaults, **dict(value or {})}
        check_values(cls, values, where)
        return cls(**values)


def check_backend(backend: str, field: str = "sampling.backend") -> None:
    if backend not in SAMPLERS:
        raise ConfigError(f"{field} {backend!r} is unknown; choose one of {', '.join(SAMPLERS)}")


def cut_at_new_turn(text: str) -> str:
    match = NEW_TURN.search(text)
    return (text[: match.start()] if match else text).strip()


def decode_responses(tokenizer, generated: list[list[int]]) -> list[str]:
    return [cut_at_new_turn(tokenizer.decode(ids, skip_special_tokens=True)) for ids in generated]


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, attention_mask


def cut_after_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1]
    return ids


def row_seeds(seed: int, rows: int) -> list[int]:
    """One seed per prompt position, derived from `seed` (numpy's SeedSequence: independent streams)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(rows, dtype=np.uint64) % (2**63 - 1)]


class Sampler:
    """A sampling backend. Subclasses set `name` (the value of `sampling.backend`) and implement `generate`."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(SAMPLERS, cls, "name", "sampling backend name")

    def generate(self, model, prompt_ids: list[list[int]], sampling: Sampling, eos_ids: set[int], pad_id: int,
                 progress: tqdm) -> list[list[int]]:
        """Generated token ids per prompt, in the prompts' order, each ending at its first EOS (kept) or after
        `sampling.max_new_tokens`. `progress` counts prompts."""
        raise NotImplementedError


SAMPLERS: dict[str, type[Sampler]] = {}


class HFGenerateSampler(Sampler):
    """`model.generate` with the dynamic KV cache, under whatever autocast the caller set: the way HF and TRL
    sample. Seeds the global RNG with `sampling.seed`."""

    name = "hf"

    def generate(self, model, prompt_ids, sampling, eos_ids, pad_id, progress):
        torch.manual_seed(sampling.seed)
        outputs: list[list[int] | None] = [None] * len(prompt_ids)
        for batch in length_batches(list(map(len, prompt_ids)), sampling.batch_size):
            input_ids, attention_mask = left_padded([prompt_ids[i] for i in batch], pad_id, model.device)
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=not sampling.greedy,
                temperature=None if sampling.greedy else sampling.temperature,
                top_p=None if sampling.greedy else sampling.top_p, top_k=None,
                max_new_tokens=sampling.max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad_id,
                use_cache=True,
            )[:, input_ids.shape[1]:].tolist()
            for index, ids in zip(batch, generated):
                outputs[index] = cut_after_eos(ids, eos_ids)
            progress.update(len(batch))
        return outputs


# --- the harness's own decode loop --------------------------------------------------------------------------
# generation_config fields that change which tokens are drawn, with the value that leaves them off. The
# harness's loop applies temperature and top_p only; a model that asks for more is refused, not half-honoured.
UNHONOURED_GENERATION_FIELDS = {
    "top_k": (None, 0), "typical_p": (None, 1.0), "min_p": (None,), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
}


class KVCacheSampler(Sampler):
    """The harness's decode loop. Same semantics as `model.generate` (temperature, then HF's own top_p warper;
    greedy at temperature 0; a row ends at EOS or after `max_new_tokens`), with (`bench.sampling.decoding`):

    - the linear layers on weights cast to bf16 once and packed for oneDNN (`packed_linears`, CPU only);
    - a KV cache written in place, in the autocast dtype, rows of similar prompt length sharing buffers only
      as wide as they need (`DecodeCache`);
    - attention of the new token on the key/value heads by two matmuls over each group's buffers
      (`decode_attention`);
    - on Llama, Mistral and Qwen2, decode steps that call the model's modules without its forward's per-call
      machinery, q/k/v and gate/up each as one matmul (`FusedDecodeStep`; the same logits, bit for bit);
    - prompts run through the model in groups of similar length, and each distinct prompt once;
    - finished rows dropped from the batch at once, a later row of their group moved into their place;
    - one random stream per prompt (`row_seeds`), and a draw by inverting the cumulative distribution in two
      levels (`invert_cdf`).
    """

    name = "harness"
    compact_fraction = 0.0  # drop finished rows once they are this share of the batch (at least one): a drop
    # copies one row of the cache per finished row (`DecodeCache.rows_to_keep`)
    prefill_rows = 8  # prompts run through the model together before decoding (measured on
    # bench perf's 64 prompts: 4.0 s in groups of 8, 4.2 s of 16, 5.6 s of 32)

    @staticmethod
    def check(model) -> None:
        config = getattr(model, "generation_config", None)
        for field, neutral in UNHONOURED_GENERATION_FIELDS.items():
            value = getattr(config, field, None)
            if value not in neutral:
                raise ConfigError(f"the model's generation_config.{field}={value!r} is not honoured by "
                                  f"sampling.backend={KVCacheSampler.name!r}; set sampling.backend=hf to sample "
                                  "with model.generate")

    def generate(self, model, prompt_ids, sampling, eos_ids, pad_id, progress):
        self.check(model)
        warpers = self.warpers(sampling)
        seeds = row_seeds(sampling.seed, len(prompt_ids))
        outputs: list[list[int] | None] = [None] * len(prompt_ids)
        for batch in length_batches(list(map(len, prompt_ids)), sampling.batch_size):
            generators = [torch.Generator(model.device).manual_seed(seeds[i]) for i in batch]
            with attention_for_decoding(model), packed_linears(model):
                generated = self.decode(model, [prompt_ids[i] for i in batch], sampling, warpers, generators, eos_ids,
                                        pad_id)
            for index, ids in zip(batch, generated):
                outputs[index] = ids
            progress.update(len(batch))
        return outputs

    def prefill(self, model, prompts: list[list[int]], new_tokens: int, pad_id: int):
        """The cache of the prompts and the logits of their next token. Each distinct prompt runs through the
        model once (RRHF's candidates, best-of-N and group rollouts repeat prompts), and its cache rows are
        then repeated. Prompts come sorted by length; with a `DecodeCache` they run in groups of
        `prefill_rows`, each padded only to its own longest prompt and placed right-aligned in the cache (one
        batch of 64 padded to its longest prompt would compute on about twice the tokens it holds)."""
        position = {}
        for prompt in map(tuple, prompts):
            position.setdefault(prompt, len(position))
        copies = torch.tensor([position[tuple(p)] for p in prompts], device=model.device)
        distinct = [list(p) for p in position]
        input_ids, attention_mask = left_padded(distinct, pad_id, model.device)
        cache = decode_cache(model, [len(p) for p in distinct], new_tokens)
        if isinstance(cache, DynamicCache):
            logits = self.forward_prompts(model, input_ids, attention_mask, cache)
        else:
            groups = []
            for start in range(0, len(distinct), self.prefill_rows):
                group_ids, group_mask = left_padded(distinct[start:start + self.prefill_rows], pad_id, model.device)
                group_cache = DynamicCache(config=model.config)
                groups.append(self.forward_prompts(model, group_ids, group_mask, group_cache))
                for layer, group_layer in zip(cache.layers, group_cache.layers):
                    layer.place(slice(start, start + len(group_ids)), group_layer.keys, group_layer.values)
            logits = torch.cat(groups)
        if len(distinct) < len(prompts):
            cache.batch_select_indices(copies)
        return logits[copies], attention_mask[copies], cache

    @staticmethod
    def forward_prompts(model, input_ids, attention_mask, cache) -> torch.Tensor:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate: real tokens count from 0
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def decode(self, model, prompts, sampling, warpers, generators, eos_ids, pad_id) -> list[list[int]]:
        started = time.perf_counter()
        logits, attention_mask, cache = self.prefill(model, prompts, sampling.max_new_tokens, pad_id)
        prefilled = time.perf_counter()
        SAMPLING_STATS.prefill_seconds += prefilled - started
        next_position = attention_mask.sum(-1)
        forward_step = decode_step(model, cache)
        eos = torch.tensor(sorted(eos_ids), device=model.device)
        rows = torch.arange(len(prompts), device=model.device)  # the prompt behind each row of the batch
        outputs: list[list[int]] = [[] for _ in prompts]
        finished_rows = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
        for step in range(sampling.max_new_tokens):
            SAMPLING_STATS.decode_steps += 1
            SAMPLING_STATS.decode_rows += len(rows)
            tokens = self.choose(logits, sampling, warpers, [generators[r] for r in rows.tolist()])
            for row, token, done in zip(rows.tolist(), tokens.tolist(), finished_rows[rows].tolist()):
                if not done:  # a finished row decodes on until it is dropped; its tokens are not kept
                    outputs[row].append(token)
            finished_rows[rows] |= torch.isin(tokens, eos)
            if step == sampling.max_new_tokens - 1 or bool(finished_rows.all()):
                break
            finished = finished_rows[rows]
            if finished.sum() >= max(1, self.compact_fraction * len(rows)):
                keep = (cache.rows_to_keep(finished) if isinstance(cache, DecodeCache)
                        else (~finished).nonzero().squeeze(1))
                cache.batch_select_indices(keep)
                rows, tokens, attention_mask, next_position = (rows[keep], tokens[keep], attention_mask[keep],
                                                               next_position[keep])
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            logits = forward_step(tokens, next_position, attention_mask)
            next_position = next_position + 1
        SAMPLING_STATS.decode_seconds += time.perf_counter() - prefilled
        return outputs

    @staticmethod
    def warpers(sampling: Sampling) -> LogitsProcessorList:
        """What `generate` warps with after the temperature: HF's own top_p warper, when it cuts anything.
        `choose` divides by the temperature first, as HF's TemperatureLogitsWarper does, but in place."""
        warpers = LogitsProcessorList()
        if not sampling.greedy and sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        return warpers

    @staticmethod
    def choose(logits: torch.Tensor, sampling: Sampling, warpers, generators: list[torch.Generator]) -> torch.Tensor:
        """The next token of each row: the argmax at temperature 0, else a draw from the warped distribution
        (what `generate` does), each row from its own stream. A draw inverts the cumulative distribution at
        one uniform number; `torch.multinomial` would spend an exponential variate on every vocabulary entry."""
        if sampling.greedy:
            return logits.argmax(-1)
        scores = logits.to(torch.float32, copy=True).div_(sampling.temperature)  # generate warps in fp32
        probs = torch.softmax(warpers(None, scores), dim=-1)
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=logits.device) for g in generators])
        return invert_cdf(probs, uniform)


def invert_cdf(probs: torch.Tensor, uniform: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds `uniform` times the row's total. In two
    levels: block totals, then a cumulative sum inside the one block the draw falls in. Both cumulative sums
    run in float64, since in float32 the many tiny probabilities of a large vocabulary would round away; a
    float64 cumulative sum over the whole vocabulary costs about 15x more. A draw that rounding puts past a
    block's last token with any probability takes that token: a token of probability 0 is never drawn."""
    rows, vocab = probs.shape
    padded = torch.nn.functional.pad(probs, (0, -vocab % block)) if vocab % block else probs  # pad copies
    blocks = padded.view(rows, -1, block)
    block_totals = blocks.sum(-1)
    block_cdf = block_totals.cumsum(-1, dtype=torch.float64)
    target = (uniform * block_cdf[:, -1])[:, None]
    chosen = torch.searchsorted(block_cdf, target, right=True).squeeze(1)
    chosen = torch.minimum(chosen, last_nonzero(block_totals))
    row = torch.arange(rows, device=probs.device)
    before = torch.where(chosen > 0, block_cdf[row, (chosen - 1).clamp(min=0)], 0.0)
    inside = blocks[row, chosen]
    offset = torch.searchsorted(inside.cumsum(-1, dtype=torch.float64) + before[:, None], target, right=True)
    return chosen * block + torch.minimum(offset.squeeze(1), last_nonzero(inside))


def last_nonzero(values: torch.Tensor) -> torch.Tensor:
    """The index of the last positive entry along the last dimension (0 if there is none)."""
    return (values > 0).cumsum(-1).argmax(-1)


@dataclass
class SamplingStats:
    """What sampling has cost in this process (`bench perf` and `bench eval` report it): in all, and, for the
    harness's loop, where: prompts (prefill) and decode steps, with the rows those steps decoded."""

    seconds: float = 0.0
    tokens: int = 0
    prompts: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0
    decode_seconds: float = 0.0

    def since(self, earlier: "SamplingStats") -> "SamplingStats":
        return SamplingStats(**{name: getattr(self, name) - getattr(earlier, name) for name in asdict(self)})


SAMPLING_STATS = SamplingStats()


def check_fits_context(model, longest_prompt: int, max_new_tokens: int) -> None:
    """A prompt and its response must fit the model's positions: past them a model reads garbage, or a
    sampler sized for a billion tokens sits at 0 % for hours."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions and longest_prompt + max_new_tokens > positions:
        raise ConfigError(f"max_new_tokens {max_new_tokens} after prompts of up to {longest_prompt} tokens exceeds the "
                          f"model's {positions} positions: give max_new_tokens <= {max(positions - longest_prompt, 0)}")


@torch.no_grad()
def sample(
    model, tokenizer, prompt_ids: list[list[int]], sampling: Sampling, desc: str, leave: bool = True
) -> list[list[int]]:
    """Generated token ids per prompt, ending at EOS / end of turn (included) or at `max_new_tokens`, from
    `sampling.backend`. The model is in eval mode (no dropout) while it samples."""
    if not prompt_ids:
        return []
    check_fits_context(model, max(map(len, prompt_ids)), sampling.max_new_tokens)
    was_training = model.training
    model.eval()
    eos_ids = {tokenizer.eos_token_id}
    started = time.perf_counter()
    try:
        with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", leave=leave) as progress:
            generated = SAMPLERS[sampling.backend]().generate(model, prompt_ids, sampling, eos_ids,
                                                              tokenizer.pad_token_id, progress)
            tokens = sum(map(len, generated))
            seconds = time.perf_counter() - started
            progress.set_postfix_str(f"{tokens / seconds:.0f} tokens/s", refresh=True)
    finally:
        model.train(was_training)
    SAMPLING_STATS.seconds += seconds
    SAMPLING_STATS.tokens += tokens
    SAMPLING_STATS.prompts += len(prompt_ids)
    log.info("%s: %d tokens for %d prompts in %.1f s (%.0f tokens/s, backend %s)", desc, tokens, len(prompt_ids),
             seconds, tokens / seconds, sampling.backend)
    return generated


def model_fingerprint(spec: str) -> str:
    """Identifies a model's weights without reading them: its folder, and each file's size and mtime."""
    source = Path(resolve(spec))
    if not source.is_dir():
        return spec  # a hub id names immutable weights only with a revision; we take the id as given
    parts = [str(source.resolve())]
    for file in sorted(source.iterdir()):
        if file.is_file():
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class JsonCache:
    """JSON documents on disk under `cache_dir()/<name>`, keyed by a hash of everything that determines
    them (model fingerprints, prompts, settings). Written atomically; an unreadable file is a miss."""

    def __init__(self, name: str, root: Path | None = None):
        self.name = name
        self.root = root or cache_dir() / name

    @staticmethod
    def key(payload: dict) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def load(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            log.warning("%s cache %s is unreadable (%s); computing it again", self.name, path, err)
            return None

    def store(self, key: str, document: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(document))
        partial.replace(path)  # atomic: a reader never sees half a file
        return path


def reference_samples_key(reference: str, prompt_ids: list[list[int]], sampling: Sampling, autocast: bool) -> str:
    """Reference-policy samples are shared by every algorithm evaluated against the same reference in the same
    precision (`autocast`: bf16 autocast, else fp32)."""
    return JsonCache.key({"model": model_fingerprint(reference), "prompts": prompt_ids, "sampling": asdict(sampling),
                          **precision.cache_key_part(autocast)})
