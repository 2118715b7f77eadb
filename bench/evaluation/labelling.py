"""Labelling primitives shared by the gold worlds (`bench.experiments.gold`: gold-relabelled HH pairs; `bench.evaluation.onpolicy`: the
reference's own samples): the label rule, and the source files and their fingerprint that caches are keyed by."""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from bench.core.errors import ConfigError, DataError
from datamodules.hh_rlhf import _local_split_files, is_local

LabelRule = Literal["deterministic", "bradley-terry"]
RULES = ("deterministic", "bradley-terry")


def label_pairs(chosen_scores: np.ndarray, rejected_scores: np.ndarray, rule: LabelRule, temperature: float = 1.0,
                seed: int = 0) -> np.ndarray:
    """True where the human-chosen response stays chosen. Deterministic: where its gold score is not below the
    rejected one's. Bradley-Terry: with probability sigma((r_chosen - r_rejected) / T), one uniform draw per pair
    from `seed`, in pair order."""
    margin = np.asarray(chosen_scores, dtype=np.float64) - np.asarray(rejected_scores, dtype=np.float64)
    if rule == "deterministic":
        return margin >= 0
    import torch  # here, not at the top: `bench label --help` reads RULES without loading torch

    keep_probability = torch.sigmoid(torch.from_numpy(margin / temperature)).numpy()
    return np.random.default_rng(seed).random(len(margin)) < keep_probability


def source_files(path: str, subsets: list[str] | None) -> list[Path]:
    if not is_local(path):
        raise ConfigError(f"gold labels are written for a local HH-RLHF folder; {path!r} is not one (download it "
                          "first, e.g. with `huggingface-cli download Anthropic/hh-rlhf --repo-type dataset`)")
    return [file for files in _local_split_files(Path(path).expanduser(), subsets).values() for file in files]


def source_fingerprint(files: list[Path]) -> list[dict]:
    return [{"file": str(f.resolve()), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]


def check_manifest(path: Path, expected: dict, remedy: str) -> dict:
    """The manifest at `path` of a cached labelled folder, refused (one line naming the field) where a field
    differs from what these settings ask for; `remedy` says what to do instead."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable label manifest ({err})") from err
    for field, value in expected.items():
        if manifest.get(field) != value:
            raise ConfigError(f"{path}: {field} is {manifest.get(field)!r}, but these settings ask for {value!r}; "
                              f"{remedy}")
    return manifest


def publish(partial: Path, folder: Path, manifest: dict, manifest_name: str = "manifest.json") -> None:
    """Write the manifest into the finished `partial` folder and rename it to `folder`, atomically: a reader sees
    the whole labelled copy or none of it. Another process that made it meanwhile wrote the same key, the same
    content: ours is dropped."""
    (partial / manifest_name).write_text(json.dumps(manifest, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        shutil.rmtree(partial)
    else:
        partial.rename(folder)
