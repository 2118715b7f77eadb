"""Prompt sources of the on-policy gold world (`gold.on_policy.prompts`, `bench.evaluation.onpolicy`): where the prompts come
from that the reference samples its responses to.

A source is a subclass of `PromptSource` with a `name` and one method, `prompts`; naming the class registers it
(as `bench.evaluation.rewards` registers rewards). Every source returns HH-format prompts, `"\\n\\nHuman: <text>\\n\\nAssistant:"`,
deduplicated, each kept only when `fits(prompt)` (by default: at most `max_prompt_tokens` tokens of the policy's
tokenizer). Shipped:

- `hh-first-turn` (the default): the first human turn of each dialogue of the local HH source `data["path"]`,
  deduplicated in source order.
- `imdb-prefix`: the controlled-sentiment prompts of the DPO paper (Rafailov et al. 2023, §6.1 and App. C.1):
  a prefix of 2 to 8 tokens (of the policy's tokenizer) of each IMDb review, the length drawn per review
  from a seeded RNG. The reviews are the `train` split of `data["path"]`: the hub dataset `stanfordnlp/imdb`
  (`datasets.load_dataset(path, split="train")`), or a local copy: a `.parquet` / `.jsonl` / `.jsonl.gz`
  file, or a folder of them (a snapshot of the hub dataset; files whose name starts with `train` are read
  when there are any). `<br />` tags are replaced by spaces. The reviews are shuffled with the seed before
  `limit` is applied (the hub's `train` split is sorted by label: its first half is all negative).
  Deviation from the paper: the harness wraps each prefix in the HH dialogue format (raw text, for a model
  without a chat template, `data.chat_template: false`), `"\\n\\nHuman: <prefix>\\n\\nAssistant:"`, and the
  policy answers it, where the paper's policy continues the bare prefix as the rest of the review.
"""

import gzip
import hashlib
import inspect
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from bench.core.errors import ConfigError, DataError, first_line
from bench.core.registries import register
from bench.evaluation.labelling import source_files, source_fingerprint
from datamodules.hh_rlhf import ASSISTANT_TAG, is_local, read_pairs

HUMAN_TAG = "\n\nHuman:"
DEFAULT = "hh-first-turn"
PROMPT_SOURCES: dict[str, type["PromptSource"]] = {}

Fits = Callable[[str], bool]


def hh_prompt(text: str) -> str:
    """`text` as the one human turn of an HH dialogue, ready for the assistant's answer."""
    return f"{HUMAN_TAG} {text}{ASSISTANT_TAG}"


def first_turn_prompt(prompt: str) -> str:
    """`\\n\\nHuman: <first human turn>\\n\\nAssistant:` of an HH prompt."""
    first = prompt.split(ASSISTANT_TAG, 1)[0]
    return first + ASSISTANT_TAG


def token_budget(tokenizer, max_prompt_tokens: int) -> Fits:
    """The default `fits`: the prompt's raw text, as the tokenizer encodes it (with its special tokens, as
    `Formatter.prompt_ids` encodes a prompt without a chat template), is at most `max_prompt_tokens` tokens."""
    return lambda prompt: len(tokenizer(prompt).input_ids) <= max_prompt_tokens


class PromptSource:
    """Where the on-policy world's prompts come from. `prompts` is the interface `bench.evaluation.onpolicy` calls."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(PROMPT_SOURCES, cls, "name", "prompt source name")

    def prompts(self, data: dict, tokenizer, max_prompt_tokens: int, limit: int | None = None, seed: int = 0,
                fits: Fits | None = None) -> list[str]:
        """HH-format prompts, deduplicated, each kept when `fits(prompt)` (default: `token_budget`); the first
        `limit` of them (all when None). `data` holds the recipe's data settings (`path`, `subsets`)."""
        raise NotImplementedError

    def fingerprint(self, data: dict) -> list | dict:
        """What identifies the prompts this source reads from `data`: on-policy caches are keyed by it."""
        raise NotImplementedError



def code_fingerprint(cls: type) -> str:
    """Changes when the class's code does."""
    return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]


def make_prompt_source(name: str, field: str = "gold.on_policy.prompts") -> PromptSource:
    """The registered source `name`; one line naming the known ones when it is unknown."""
    if name not in PROMPT_SOURCES:
        raise ConfigError(f"{field} {name!r} names no prompt source; known: {', '.join(sorted(PROMPT_SOURCES))}")
    return PROMPT_SOURCES[name]()


def source_prompts(name: str, data: dict, tokenizer, max_prompt_tokens: int, limit: int | None = None,
                   seed: int = 0, fits: Fits | None = None) -> list[str]:
    """The prompts of the registered source `name` (see `PromptSource.prompts`)."""
    return make_prompt_source(name).prompts(data, tokenizer, max_prompt_tokens, limit, seed, fits)


def kept_prompts(candidates: Iterable[str], fits: Fits, limit: int | None) -> list[str]:
    """The candidates deduplicated in order, kept where they fit, at most `limit` of them."""
    seen, prompts = set(), []
    for prompt in candidates:
        if prompt in seen:
            continue
        seen.add(prompt)
        if fits(prompt):
            prompts.append(prompt)
            if limit is not None and len(prompts) == limit:
                break
    return prompts


class HHFirstTurn(PromptSource):
    """The first human turn of each dialogue of the local HH source, deduplicated in source order (splits in
    name order), kept when it fits. `seed` is unused (nothing is drawn); `tokenizer` only counts a prompt's tokens
    when no `fits` is given."""

    name = "hh-first-turn"
    description = "the first human turn of each HH dialogue of data.path, deduplicated in source order"

    def prompts(self, data, tokenizer, max_prompt_tokens, limit=None, seed=0, fits=None):
        fits = fits or token_budget(tokenizer, max_prompt_tokens)
        path = data["path"]
        pairs, _ = read_pairs(path, data.get("subsets"))
        candidates = (first_turn_prompt(pair.prompt) for split in sorted(pairs) for pair in pairs[split])
        prompts = kept_prompts((c for c in candidates if c.startswith(HUMAN_TAG)), fits, limit)
        if not prompts:
            raise DataError(f"{path}: no first human turn fits in {max_prompt_tokens} prompt tokens")
        return prompts

    def fingerprint(self, data):
        # As `bench.evaluation.onpolicy` keyed its folders before prompt sources existed: the source files' hashes.
        return source_fingerprint(source_files(data["path"], data.get("subsets")))


BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
SPACES = re.compile(r"\s+")
REVIEW_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


class IMDbPrefix(PromptSource):
    """A prefix of 2-8 policy tokens of each IMDb review (the DPO paper's §6.1 prompts), wrapped in the HH
    format; see the module's docstring for where the reviews come from and how this deviates from the paper."""

    name = "imdb-prefix"
    description = "a 2-8 token prefix of each IMDb review (train split of data.path, e.g. stanfordnlp/imdb)"
    hub_id: ClassVar[str] = "stanfordnlp/imdb"
    split: ClassVar[str] = "train"
    min_tokens: ClassVar[int] = 2
    max_tokens: ClassVar[int] = 8
    text_field: ClassVar[str] = "text"
    read_chars: ClassVar[int] = 512  # of each review tokenized: far more than 8 tokens' worth
    chunk: ClassVar[int] = 1024  # reviews tokenized at a time, until `limit` prompts are found

    def location(self, data: dict) -> str:
        return str(data.get("path") or self.hub_id)

    def prompts(self, data, tokenizer, max_prompt_tokens, limit=None, seed=0, fits=None):
        fits = fits or token_budget(tokenizer, max_prompt_tokens)
        where = self.location(data)
        reviews = self.reviews(where)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(reviews))
        lengths = rng.integers(self.min_tokens, self.max_tokens + 1, size=len(reviews))
        prompts = kept_prompts(self.candidates(tokenizer, reviews, order, lengths), fits, limit)
        if not prompts:
            raise DataError(f"{where}: no IMDb review prefix fits in {max_prompt_tokens} prompt tokens")
        return prompts

    def candidates(self, tokenizer, reviews: list[str], order, lengths) -> Iterator[str]:
        """Each review's prefix as an HH prompt, in `order`, tokenized a chunk at a time (lazily: `limit` may stop
        the reading early)."""
        for start in range(0, len(order), self.chunk):
            picked = order[start:start + self.chunk]
            texts = [clean(reviews[i])[:self.read_chars] for i in picked]
            encoded = tokenizer(texts, add_special_tokens=False).input_ids
            for ids, text, i in zip(encoded, texts, picked):
                prefix = self.prefix(tokenizer, ids, int(lengths[i]), text)
                if prefix is not None:
                    yield hh_prompt(prefix)

    def prefix(self, tokenizer, ids: list[int], length: int, text: str) -> str | None:
        """The text of the first `length` tokens (fewer when a review is shorter, or when the cut would split a
        character); None when fewer than `min_tokens` tokens remain or the text is blank."""
        length = min(length, len(ids))
        while length >= self.min_tokens:
            prefix = tokenizer.decode(ids[:length], skip_special_tokens=True).strip()
            if "\ufffd" not in prefix or "\ufffd" in text:  # not a multi-byte character cut in two
                return prefix or None
            length -= 1
        return None

    def fingerprint(self, data):
        where = self.location(data)
        if is_local(where):
            files = review_files(Path(where).expanduser(), self.split)
            return {"prompts": self.name, "code": code_fingerprint(type(self)),
                    "files": [{"file": str(f.resolve()), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                              for f in files]}
        return {"prompts": self.name, "code": code_fingerprint(type(self)), "hub": where, "split": self.split}

    def reviews(self, where: str) -> list[str]:
        """The review texts of the source's split, from a local copy or the hub."""
        if is_local(where):
            return [text for file in review_files(Path(where).expanduser(), self.split)
                    for text in read_texts(file, self.text_field, where)]
        import datasets

        try:
            loaded = datasets.load_dataset(where, split=self.split)
        except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError (FileNotFoundError), ...
            detail = first_line(err)[:200]
            raise DataError(f"imdb-prefix prompts: cannot load the hub dataset {where!r} (split {self.split}): "
                            f"{detail}; the HF hub is unreachable or the dataset is not cached, so give a local copy "
                            f"as data.path (e.g. `huggingface-cli download {where} --repo-type dataset --local-dir DIR` "
                            "on a machine with access, then data.path: DIR)") from err
        if self.text_field not in loaded.column_names:
            raise DataError(f"{where}: the {self.split} split has no {self.text_field!r} column "
                            f"(columns: {', '.join(loaded.column_names)})")
        return list(loaded[self.text_field])


def clean(review: str) -> str:
    """The review with its `<br />` tags replaced by spaces and its whitespace collapsed."""
    return SPACES.sub(" ", BREAK.sub(" ", review)).strip()


def review_files(path: Path, split: str) -> list[Path]:
    """The files of a local review source: the file itself, or the folder's review files (those whose name starts
    with `split` when there are any: a hub snapshot holds train, test and unsupervised files)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"imdb-prefix prompts: data path {path} does not exist (a hub dataset is named org/name, "
                        "e.g. stanfordnlp/imdb)")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(REVIEW_SUFFIXES)
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    of_split = [f for f in files if f.name.startswith(split)]
    if not (of_split or files):
        raise DataError(f"imdb-prefix prompts: {path} holds no {', '.join(REVIEW_SUFFIXES)} files of reviews")
    return of_split or files


def read_texts(file: Path, field: str, where: str) -> list[str]:
    """The `field` of every row of a parquet or JSON-lines file; one line naming the file (and line) at fault."""
    hh_hint = (" (HH_RLHF_PATH is set, and it replaces every recipe's data.path: unset it for this recipe)"
               if os.environ.get("HH_RLHF_PATH") else "")
    if file.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as err:  # pyarrow's errors are of several classes
            raise DataError(f"{file}: not a readable parquet file ({err})") from err
        if field not in table.column_names:
            raise DataError(f"{file}: no {field!r} column of review texts (columns: {', '.join(table.column_names)})"
                            + hh_hint)
        return [str(text) for text in table.column(field).to_pylist() if text]
    opener = gzip.open if file.name.endswith(".gz") else open
    texts = []
    try:
        with opener(file, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{file}:{number}: not a JSON record ({err})") from err
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise DataError(f"{file}:{number}: a record needs a {field!r} string of review text{hh_hint}")
                texts.append(record[field])
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot be read ({err})") from err
    return texts
