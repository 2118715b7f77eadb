"""The HH-RLHF LightningDataModule and the three data views the algorithm modules ask for.

- paired:   prompt, chosen, rejected (DPO, IPO); batches hold the chosen rows, then the rejected rows;
- unpaired: one row per response with a `desirable` flag (KTO), plus a mismatched completion, another
            pair's response attached to this prompt, for KTO's KL reference point;
- sft:      prompt with its chosen response;
- reward:   chosen and rejected transcripts as a reward model reads them (its own tokenizer, raw HH text);
- ranked:   k candidates per prompt with proxy rewards (RRHF): chosen, rejected and k - 2 policy samples;
- prompts:  prompts alone, as token ids and raw text, for online rollouts (PPO).

For reward models the train split is halved by prompt hash: the proxy (which PPO and RRHF optimise) and
the judge (which evaluates) never see the same prompt, so optimising the proxy does not grade itself.
"""

import hashlib
import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import datasets
import lightning.pytorch as L
import torch
from jsonargparse.typing import PositiveInt
from torch.utils.data import DataLoader, DistributedSampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from bench.core.batches import REFERENCE_COLUMNS, pad_rows, sequence_key
from bench.core.errors import ConfigError, DataError
from bench.core.models import load_tokenizer
from bench.sampling.generation import Sampling
from datamodules.candidates import check_num_candidates, ranked_rows
from datamodules.formatting import Formatter, RewardFormatter
from datamodules.hh_rlhf import HUB_ID, Pair, ReadReport, check_fractions, check_local_folder, is_local, load_splits

log = logging.getLogger(__name__)

View = Literal["paired", "unpaired", "sft", "reward", "ranked", "prompts"]
TrainSubset = Literal["all", "proxy", "judge"]


def padded_length(row: dict) -> int:
    """The width a row pads its batch to: its prompt and its longest response."""
    responses = [value for key, value in row.items() if key.endswith("_ids") and key != "prompt_ids"]
    return len(row.get("prompt_ids", [])) + max(map(len, responses), default=0)


def paired_rows(pairs: list[Pair], formatter: Formatter) -> list[dict]:
    return [formatter.pair(p) for p in pairs]


def sft_rows(pairs: list[Pair], formatter: Formatter) -> list[dict]:
    return [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"]} for r in paired_rows(pairs, formatter)]


def unpaired_rows(pairs: list[Pair], formatter: Formatter, seed: int) -> list[dict]:
    """Two rows per pair, shuffled so that batches mix desirable and undesirable rows. The mismatched
    partner of each pair is fixed here, from the seed, so it is the same in every run and process."""
    if len(pairs) < 2:
        raise DataError(f"the unpaired view needs at least 2 pairs to mismatch completions, got {len(pairs)}")
    tokenized = paired_rows(pairs, formatter)
    rng = random.Random(seed)
    order = list(range(len(tokenized)))
    rng.shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    rows = []
    for i, pair in enumerate(tokenized):
        mismatched = tokenized[partner[i]]
        for desirable, key in ((True, "chosen_ids"), (False, "rejected_ids")):
            rows.append(
                {
                    "prompt_ids": pair["prompt_ids"],
                    "completion_ids": pair[key],
                    "desirable": desirable,
                    "kl_completion_ids": formatter.fit_completion(pair["prompt_ids"], mismatched[key]),
                }
            )
    rng.shuffle(rows)
    return rows


def prompt_rows(pairs: list[Pair], formatter: Formatter) -> list[dict]:
    return [{"prompt_ids": formatter.generation_prompt_ids(p.prompt), "prompt": p.prompt}
            for p in pairs]


def train_subset(pairs: list[Pair], subset: TrainSubset) -> list[Pair]:
    if subset == "all":
        return pairs
    # A hash independent of the split hash, so each half is a uniform sample of the train split.
    keep = 0 if subset == "proxy" else 1
    return [p for p in pairs if hashlib.sha256(b"reward-half:" + p.prompt.encode()).digest()[0] % 2 == keep]


class GlobalBatchSampler(DistributedSampler):
    """The train order, drawn from seed + epoch (Lightning calls `set_epoch`, so a resumed run sees the
    order the uninterrupted one saw): shuffled and, given `lengths`, grouped by length in mega-batches of
    the global batch (batch size times W processes), as HF's LengthGroupedSampler does. Process r takes
    positions r, r + W, ...: the processes' step-k batches together are one process's step-k batch at W
    times the batch size. A DistributedSampler, so that Lightning keeps it instead of wrapping it in one
    that shuffles again (and would undo the length grouping)."""

    def __init__(self, dataset, batch_size: int, seed: int, lengths: list[int] | None = None, num_replicas: int = 1,
                 rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.lengths = batch_size, lengths

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            order = get_length_grouped_indices(self.lengths, self.batch_size * self.num_replicas, generator=generator)
        order = (order * -(-self.total_size // len(order)))[: self.total_size]  # every process gets as many rows
        return iter(order[self.rank :: self.num_replicas])


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints mid-epoch through its `state_dict`/`load_state_dict`
    protocol: a resumed epoch skips the batches already trained on. The state names its epoch: a
    checkpoint taken on an epoch's last batch resumes at the next epoch, which must skip nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_taken, self.resume_at = 0, None

    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)  # GlobalBatchSampler's, which Lightning sets each epoch

    def __iter__(self):
        resume_at, self.resume_at = self.resume_at, None
        skip = resume_at["batches_taken"] if resume_at and resume_at["epoch"] == self.epoch() else 0
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self.batches_taken = index + 1
                yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch(), "batches_taken": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = state


class Collator:
    def __init__(self, view: View, pad_id: int):
        self.view, self.pad_id = view, pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.view == "reward":  # whole transcripts, nothing masked
            sequences = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
            batch = pad_rows([[]] * len(sequences), sequences, self.pad_id)
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.view == "prompts":  # generation left-pads these itself
            return {"prompt_ids": [r["prompt_ids"] for r in rows], "prompts": [r["prompt"] for r in rows]}
        if self.view == "ranked":  # row-major: the k candidates of prompt 0, then of prompt 1, ...
            k = len(rows[0]["candidate_ids"])
            batch = pad_rows([r["prompt_ids"] for r in rows for _ in range(k)],
                             [c for r in rows for c in r["candidate_ids"]], self.pad_id)
            batch["rewards"] = torch.tensor([r["rewards"] for r in rows], dtype=torch.float32)
            batch["candidate_mask"] = torch.tensor([r["candidate_valid"] for r in rows], dtype=torch.bool)
            return batch
        prompts = [r["prompt_ids"] for r in rows]
        if self.view == "paired":
            batch = pad_rows(prompts + prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
                             self.pad_id)
            if "chosen_reference_logp" in rows[0]:  # same order as the rows: chosen, then rejected
                batch["reference_logps"] = torch.tensor([r["chosen_reference_logp"] for r in rows] +
                                                        [r["rejected_reference_logp"] for r in rows])
            return batch
        batch = pad_rows(prompts, [r["completion_ids"] for r in rows], self.pad_id)
        if self.view == "unpaired":
            batch["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)
            kl = pad_rows(prompts, [r["kl_completion_ids"] for r in rows], self.pad_id)
            batch.update({f"kl_{key}": value for key, value in kl.items()})
            if "reference_logp" in rows[0]:
                batch["reference_logps"] = torch.tensor([r["reference_logp"] for r in rows])
                batch["kl_reference_logps"] = torch.tensor([r["kl_reference_logp"] for r in rows])
        return batch


class HHRLHFDataModule(L.LightningDataModule):
    """HH-RLHF from the hub or a local folder in its layout, as one of the three views.

    Args:
        path: hub id (``Anthropic/hh-rlhf``) or a local folder with ``<subset>/<split>.jsonl.gz``.
        subsets: subset folders (the hub's ``data_dir``), e.g. ``[harmless-base]``; all when unset.
        tokenizer: model spec whose tokenizer formats the data (linked to the policy by ``bench train``).
        view: paired, unpaired or sft; ``bench train`` sets it from the algorithm.
        chat_template: format with the tokenizer's chat template when it has one, else raw HH text.
        max_length, max_prompt_length: DPO-reference truncation (keep the prompt's end, then cut responses).
        val_fraction, test_fraction: shares carved by prompt hash when the source lacks those splits.
        max_train_pairs, max_val_pairs: take only the first N pairs of a split (short runs).
        train_subset: all, or the proxy's or the judge's half of the train split (reward models).
        seed: fixes the unpaired view's shuffling and mismatched partners, and the train order.
        num_candidates: RRHF's k for the ranked view: chosen, rejected and k - 2 samples of the policy
            (``tokenizer`` names the initial policy, which ``bench train`` links to ``model.policy``).
        candidate_sampling: how the ranked view samples; its candidates are cached on disk.
        proxy: the proxy reward-model folder that scores ranked candidates, or ``latest``: the newest
            proxy of the recipe's MLflow experiment.
        allow_judge_as_proxy: let a model trained as the judge score candidates, on purpose.
        group_by_length: shuffle, then sort by length within mega-batches of 50 batches (less padding).
    """

    def __init__(
        self,
        path: str = HUB_ID,
        subsets: list[str] | None = None,
        tokenizer: str = "smollm2-135m-instruct",
        view: View = "paired",
        chat_template: bool = True,
        max_length: PositiveInt = 512,
        max_prompt_length: PositiveInt = 256,
        batch_size: PositiveInt = 8,
        eval_batch_size: PositiveInt | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_pairs: int | None = None,
        max_val_pairs: int | None = None,
        train_subset: TrainSubset = "all",
        seed: int = 0,
        num_workers: int = 0,
        num_candidates: int = 4,
        candidate_sampling: Sampling = Sampling(temperature=1.0),
        proxy: str | None = None,
        allow_judge_as_proxy: bool = False,
        group_by_length: bool = True,
    ):
        super().__init__()
        candidate_sampling = Sampling.of(candidate_sampling, "data.candidate_sampling")  # a mapping, from a YAML config
        if view == "ranked":
            check_num_candidates(num_candidates)
            if not proxy:
                raise ConfigError("the ranked view needs data.proxy: a proxy reward-model folder, or 'latest'")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        check_fractions(val_fraction, test_fraction)
        if is_local(path):
            check_local_folder(Path(path).expanduser(), "data.path")
        self.save_hyperparameters(logger=False)
        # Plain values only in hparams: checkpoints are read back with torch.load(weights_only=True).
        self.hparams.candidate_sampling = asdict(candidate_sampling)
        self.candidate_sampling = candidate_sampling
        self.report: ReadReport | None = None
        self.views: dict[str, datasets.Dataset] = {}
        self.pairs: dict[str, list[Pair]] = {}  # the pairs each view was made from (logged as the run's datasets)
        # How the ranked view loads the proxy that scores its candidates: `load_proxy(proxy, allow_judge_as_proxy)`,
        # set by whoever builds it with a module (`bench.runs.training`), as the data layer sits below `modules`.
        self.load_proxy = None

    def setup(self, stage: str | None = None) -> None:
        if self.views:
            return
        hp = self.hparams
        splits, self.report = load_splits(hp.path, hp.subsets, hp.val_fraction, hp.test_fraction)
        limits = {"train": hp.max_train_pairs, "validation": hp.max_val_pairs}
        self.tokenizer = load_tokenizer(hp.tokenizer)
        formatter = (
            RewardFormatter(self.tokenizer, hp.max_length)
            if hp.view == "reward"
            else Formatter(self.tokenizer, hp.chat_template, hp.max_length, hp.max_prompt_length)
        )
        splits["train"] = train_subset(splits["train"], hp.train_subset)
        for split in ("train", "validation"):
            pairs = splits[split][: limits[split]]
            if not pairs:
                raise DataError(f"split {split!r} of {hp.path} is empty; check val_fraction and the source")
            self.views[split] = datasets.Dataset.from_list(self._rows(pairs, formatter, split))
            self.pairs[split] = pairs
        self.test_pairs = splits["test"]
        log.info("HH-RLHF %s view: %s", hp.view, {k: len(v) for k, v in self.views.items()})

    def _rows(self, pairs: list[Pair], formatter, split: str) -> list[dict]:
        if self.hparams.view in ("paired", "reward"):
            return paired_rows(pairs, formatter)
        if self.hparams.view == "sft":
            return sft_rows(pairs, formatter)
        if self.hparams.view == "prompts":
            return prompt_rows(pairs, formatter)
        if self.hparams.view == "ranked":
            hp = self.hparams
            if self.load_proxy is None:
                raise ConfigError("the ranked view scores candidates with a proxy: set the datamodule's load_proxy "
                                  "(modules.reward_model.load_proxy) before setup")
            return ranked_rows(pairs, formatter, hp.tokenizer, hp.proxy, hp.num_candidates, self.candidate_sampling,
                               self.load_proxy, hp.allow_judge_as_proxy, split)
        return unpaired_rows(pairs, formatter, self.hparams.seed)

    def formatting(self) -> dict:
        """The settings besides the tokenizer that decide the token ids of a row."""
        hp = self.hparams
        return {"chat_template": hp.chat_template, "max_length": hp.max_length, "max_prompt_length": hp.max_prompt_length}

    def reference_sequences(self) -> dict[str, tuple[list[int], list[int]]]:
        """Every (prompt, response) of the train and validation views that a reference scores, by key."""
        sequences = {}
        for view in self.views.values():
            for response_column in REFERENCE_COLUMNS.get(self.hparams.view, {}).values():
                for prompt, response in zip(view["prompt_ids"], view[response_column]):
                    sequences[sequence_key(prompt, response)] = (prompt, response)
        return sequences

    def attach_reference_logps(self, logps: dict[str, float]) -> None:
        """Add the reference log-prob columns, which the collator then puts in every batch."""
        for split, view in self.views.items():
            for column, response_column in REFERENCE_COLUMNS[self.hparams.view].items():
                values = [logps[sequence_key(p, r)] for p, r in zip(view["prompt_ids"], view[response_column])]
                view = view.remove_columns([column]) if column in view.column_names else view
                view = view.add_column(column, values)
            self.views[split] = view

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle:
            lengths = None
            if self.hparams.group_by_length and self.hparams.view not in ("prompts", "ranked"):
                lengths = [padded_length(row) for row in self.views[split]]
            trainer = self.trainer
            world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = GlobalBatchSampler(self.views[split], batch_size, self.hparams.seed, lengths, world_size, rank)
        return ResumableDataLoader(
            self.views[split],
            batch_size=batch_size,
            sampler=sampler,
            # Its own generator for the loader's base seed, which would otherwise be drawn from the global RNG
            # when each epoch's iterator starts: a resumed run restores that RNG and must not draw again.
            generator=torch.Generator().manual_seed(self.hparams.seed),
            collate_fn=Collator(self.hparams.view, self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)
