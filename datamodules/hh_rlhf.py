"""Anthropic HH-RLHF: reading, parsing as the DPO reference code does, splitting and formatting.

A source is the hub dataset (``Anthropic/hh-rlhf``, optionally one subset's ``data_dir``) or a local
folder in the same layout, ``<subset>/<split>.jsonl.gz``. Each record's ``chosen`` and ``rejected`` are
whole dialogues; the prompt is ``chosen`` up to and including its last ``"\\n\\nAssistant:"``.
"""

import gzip
import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.core.errors import ConfigError, DataError

ASSISTANT_TAG = "\n\nAssistant:"
TURN_PATTERN = re.compile(r"\n\n(Human|Assistant):")
HUB_ID = "Anthropic/hh-rlhf"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class ReadReport:
    source: str
    files: list[str] = field(default_factory=list)
    pairs_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    split_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.pairs_read - sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "files": self.files,
            "pairs_read": self.pairs_read,
            "dropped": dict(sorted(self.dropped.items())),
            "kept": self.kept,
            "splits": self.split_sizes,
        }


def split_at_last_assistant(dialogue: str) -> tuple[str, str] | None:
    """(prompt including the last Assistant tag, the response after it), or None without such a tag."""
    cut = dialogue.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    cut += len(ASSISTANT_TAG)
    return dialogue[:cut], dialogue[cut:]


def parse_record(record: dict) -> Pair | str:
    """A Pair, or the reason the record is dropped."""
    chosen_split = split_at_last_assistant(record["chosen"])
    rejected_split = split_at_last_assistant(record["rejected"])
    if chosen_split is None or rejected_split is None:
        return "no_assistant_turn"
    (prompt, chosen), (rejected_prompt, rejected) = chosen_split, rejected_split
    if prompt != rejected_prompt:
        return "mismatched_prompt"
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected)


def hh_to_messages(prompt: str) -> list[dict[str, str]]:
    """HH prompt text -> chat messages; the trailing empty Assistant turn is the generation prompt."""
    parts = TURN_PATTERN.split(prompt)
    messages = []
    # parts = [preamble, role, text, role, text, ...]
    for role, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _read_jsonl_gz(path: Path) -> Iterator[tuple[str, dict]]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    opener = gzip.open if path.suffix == ".gz" else open
    line_number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                where = f"{path}:{line_number}"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
                yield where, record
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (it ends after line {line_number})") from None
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file, though its name ends in .gz") from None
    except (OSError, zlib.error) as err:  # a corrupt gzip stream, or a read error
        raise DataError(f"{path}: cannot be read ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{line_number + 1}: not UTF-8 text ({err.reason})") from None


def _check_keys(where: str, record) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with keys 'chosen' and 'rejected'")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: key {key!r} must be a string, got {type(record[key]).__name__}")
    return record


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def check_local_folder(root: Path, what: str = "data path") -> None:
    if root.is_file():
        raise DataError(f"{what} {root} is a file; give the folder that holds <subset>/<split>.jsonl.gz "
                        f"(for this file, {root.parent.parent})")
    if not root.is_dir():
        raise DataError(f"{what} {root} does not exist")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"data.{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction must be < 1 (train needs pairs), got "
                          f"{val_fraction} + {test_fraction}")


def _local_split_files(root: Path, subsets: list[str] | None) -> dict[str, list[Path]]:
    check_local_folder(root)
    subset_dirs = [root / s for s in subsets] if subsets else sorted(p for p in root.iterdir() if p.is_dir())
    by_split: dict[str, list[Path]] = {}
    for subset_dir in subset_dirs:
        if not subset_dir.is_dir():
            raise DataError(f"data path {root}: subset folder {subset_dir.name!r} does not exist")
        for file in sorted(subset_dir.glob("*.jsonl*")):
            by_split.setdefault(file.name.split(".")[0], []).append(file)
    if not by_split:
        raise DataError(f"data path {root} holds no <subset>/<split>.jsonl.gz files")
    return by_split


def _hub_records(path: str, subsets: list[str] | None) -> dict[str, Iterator[tuple[str, dict]]]:
    import datasets

    by_split: dict[str, list] = {}
    for subset in subsets or [None]:
        try:
            loaded = datasets.load_dataset(path, data_dir=subset)
        except Exception as err:  # noqa: BLE001 - datasets raises many types for an unreachable source
            raise DataError(f"data path {path!r} is not a local folder and could not be loaded from the hub: {err}")
        for split, rows in loaded.items():
            label = f"{path}[{subset or 'all'}/{split}]"
            by_split.setdefault(split, []).extend((f"{label} row {i}", row) for i, row in enumerate(rows))
    return {split: iter(rows) for split, rows in by_split.items()}


def read_pairs(path: str, subsets: list[str] | None = None) -> tuple[dict[str, list[Pair]], ReadReport]:
    """Every kept pair by source split, and a report of what was read and dropped."""
    report = ReadReport(source=path)
    if is_local(path):
        files = _local_split_files(Path(path).expanduser(), subsets)
        report.files = [str(f) for split_files in files.values() for f in split_files]
        records = {split: (r for f in split_files for r in _read_jsonl_gz(f)) for split, split_files in files.items()}
    else:
        records = _hub_records(path, subsets)
    pairs: dict[str, list[Pair]] = {}
    for split, rows in records.items():
        kept = pairs.setdefault(split, [])
        for where, record in rows:
            report.pairs_read += 1
            parsed = parse_record(_check_keys(where, record))
            if isinstance(parsed, str):
                report.dropped[parsed] += 1
            else:
                kept.append(parsed)
    if not any(pairs.values()):
        raise DataError(f"data path {path} holds no usable pairs ({report.pairs_read} read, "
                        f"{sum(report.dropped.values())} dropped)")
    return pairs, report


def _hash_fraction(prompt: str) -> float:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64


def assign_splits(
    source_splits: dict[str, list[Pair]], val_fraction: float, test_fraction: float
) -> dict[str, list[Pair]]:
    """train/validation/test. A source with a train and a test split keeps its test split and carves
    validation out of train; a single-split source is carved into all three. Carving hashes the prompt,
    so one prompt never lands in two splits and the result does not depend on file order."""
    if "train" in source_splits and "test" in source_splits:
        carved = {"train": [], "validation": [], "test": list(source_splits["test"])}
        to_carve, fractions = source_splits["train"], {"validation": val_fraction}
    elif len(source_splits) == 1:
        carved = {"train": [], "validation": [], "test": []}
        to_carve, fractions = next(iter(source_splits.values())), {"test": test_fraction, "validation": val_fraction}
    else:
        raise DataError(f"cannot map source splits {sorted(source_splits)} onto train/validation/test")
    for pair in to_carve:
        u, edge = _hash_fraction(pair.prompt), 0.0
        for split, fraction in fractions.items():
            edge += fraction
            if u < edge:
                carved[split].append(pair)
                break
        else:
            carved["train"].append(pair)
    return carved


def load_splits(
    path: str, subsets: list[str] | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[dict[str, list[Pair]], ReadReport]:
    check_fractions(val_fraction, test_fraction)
    source_splits, report = read_pairs(path, subsets)
    splits = assign_splits(source_splits, val_fraction, test_fraction)
    report.split_sizes = {name: len(splits[name]) for name in SPLITS}
    return splits, report
