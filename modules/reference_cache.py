"""Reference log-probs computed once and kept on disk, shared by every run that asks for the same ones.

The frozen reference gives the same log-prob for the same token sequence in every run, algorithm and
sweep trial, so its forwards are a third of a DPO step spent recomputing constants. The cache holds
one number per sequence (the summed response log-prob) in `datasets` Arrow shards under
`cache_dir()/reference_logps/<settings key>/`. The settings key names everything that changes those
numbers besides the tokens: the reference's weights, the tokenizer and formatting settings, and the
numeric precision (`BENCH_REFERENCE_CACHE` moves the root). Inside it, a sequence is found by the hash of its prompt and response token ids,
so DPO, IPO and KTO share the chosen and rejected rows of the same pairs.

A shard is written to a temporary folder, checksummed, then renamed into place. A shard whose files
no longer match their checksum is deleted and its sequences computed again, never used.
"""

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from bench.core.batches import length_batches, pad_rows
from bench.core.models import cache_dir
from bench.sampling.generation import model_fingerprint

log = logging.getLogger(__name__)

CHECKSUM_FILE = "checksum.json"


def reference_cache_root() -> Path:
    """``BENCH_REFERENCE_CACHE``, else ``<BENCH_CACHE>/reference_logps``."""
    return Path(os.environ.get("BENCH_REFERENCE_CACHE") or cache_dir() / "reference_logps")


def _files_digest(folder: Path) -> dict[str, str]:
    return {file.name: hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(folder.iterdir()) if file.name != CHECKSUM_FILE}


class ReferenceLogpCache:
    """Summed response log-probs of one reference model under one set of formatting settings."""

    def __init__(self, settings: dict, root: Path | None = None):
        self.settings = settings
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = (root or reference_cache_root()) / key

    @classmethod
    def for_run(cls, reference: str, tokenizer: str, formatting: dict, precision: str) -> "ReferenceLogpCache":
        return cls({"reference": model_fingerprint(reference), "tokenizer": model_fingerprint(tokenizer),
                    "formatting": formatting, "precision": precision})

    def load(self) -> dict[str, float]:
        """Every intact shard's log-probs by sequence key; a corrupted shard is deleted and reported."""
        table: dict[str, float] = {}
        if not self.folder.is_dir():
            return table
        for shard in sorted(self.folder.glob("shard-*")):
            try:
                expected = json.loads((shard / CHECKSUM_FILE).read_text())
                if _files_digest(shard) != expected:
                    raise ValueError("files do not match their checksum")
                rows = datasets.load_from_disk(str(shard))
                table.update(zip(rows["key"], rows["logp"]))
            except (OSError, ValueError, json.JSONDecodeError) as err:
                log.warning("reference log-prob cache shard %s is corrupted (%s); deleting it, its sequences "
                            "will be computed again", shard, err)
                shutil.rmtree(shard, ignore_errors=True)
        return table

    def store(self, logps: dict[str, float]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "settings.json").write_text(json.dumps(self.settings, indent=1, sort_keys=True))
        name = f"shard-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        partial = self.folder / f".{name}.{os.getpid()}.partial"
        rows = datasets.Dataset.from_dict({"key": list(logps), "logp": list(logps.values())})
        rows.save_to_disk(str(partial))
        (partial / CHECKSUM_FILE).write_text(json.dumps(_files_digest(partial)))
        partial.rename(self.folder / name)  # atomic: a reader sees the whole shard or none of it
        return self.folder / name


@torch.no_grad()
def compute_logps(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    logps_fn,
    forward_context,
    rank: int = 0,
    world_size: int = 1,
    desc: str = "reference log-probs",
) -> dict[int, float]:
    """Summed response log-probs of (prompt ids, response ids) sequences, in batches of similar length.
    With several processes each computes every `world_size`-th batch; every process runs the same number
    of forwards (sharded models need that) and returns {sequence index: log-prob} for its own batches."""
    batches = length_batches([len(prompt) + len(response) for prompt, response in sequences], batch_size)
    forwards = -(-len(batches) // world_size)
    values: dict[int, float] = {}
    for step in tqdm(range(forwards), desc=desc, unit="batch", disable=rank != 0):
        index = step * world_size + rank
        batch_rows = batches[min(index, len(batches) - 1)]  # past the end: a repeat, discarded
        batch = pad_rows([sequences[i][0] for i in batch_rows], [sequences[i][1] for i in batch_rows], pad_id)
        batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
        with forward_context():
            totals = logps_fn(model, batch).total.float().cpu().tolist()
        if index < len(batches):
            values.update(zip(batch_rows, totals))
    return values
