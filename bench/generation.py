"""Batched sampling from a policy, and the on-disk cache of the reference policy's samples."""

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.errors import ConfigError
from bench.models import cache_dir, resolve

log = logging.getLogger(__name__)

# A response ends where the model starts the next human turn, in raw HH or chat form.
NEW_TURN = re.compile(r"(\n\s*)?(Human:|<\|im_start\|>user)")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"invalid sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, "
                              "max_new_tokens >= 1, batch_size >= 1")


def cut_at_new_turn(text: str) -> str:
    match = NEW_TURN.search(text)
    return (text[: match.start()] if match else text).strip()


@torch.no_grad()
def sample(
    model, tokenizer, prompt_ids: list[list[int]], sampling: Sampling, desc: str, leave: bool = True
) -> list[list[int]]:
    """Generated token ids per prompt, ending at EOS / end of turn (included) or at max_new_tokens.
    Batched by prompt length (less left-padding), with the KV cache. Seeds the global RNG with `sampling.seed`."""
    was_training = model.training
    model.eval()
    torch.manual_seed(sampling.seed)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs = []
    for start in tqdm(range(0, len(order), sampling.batch_size), desc=desc, unit="batch", leave=leave):
        chunk = [prompt_ids[i] for i in order[start : start + sampling.batch_size]]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=None,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            use_cache=True,
        )[:, width:].tolist()
        for ids in generated:
            outputs.append(ids[: ids.index(eos_id) + 1] if eos_id in ids else ids)
    model.train(was_training)
    by_prompt = [None] * len(order)
    for position, index in enumerate(order):
        by_prompt[index] = outputs[position]
    return by_prompt


def decode_responses(tokenizer, generated: list[list[int]]) -> list[str]:
    return [cut_at_new_turn(tokenizer.decode(ids, skip_special_tokens=True)) for ids in generated]


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


def reference_samples_key(reference: str, prompt_ids: list[list[int]], sampling: Sampling) -> str:
    """Reference-policy samples are shared by every algorithm evaluated against the same reference."""
    return JsonCache.key({"model": model_fingerprint(reference), "prompts": prompt_ids, "sampling": asdict(sampling)})
