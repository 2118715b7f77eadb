"""The reward model: its data view, halves of the train split, learning, and scoring text."""

import lightning.pytorch as L
import pytest
import torch
from transformers import AutoConfig

from datamodules.formatting import RewardFormatter, reward_text
from datamodules.hh_datamodule import Collator, HHRLHFDataModule, train_subset
from datamodules.hh_rlhf import load_splits
from modules.reward_model import ROLE_KEY, RewardModel


def test_proxy_and_judge_halves_are_disjoint_and_cover_train(hh_path):
    splits, _ = load_splits(hh_path)
    proxy, judge = train_subset(splits["train"], "proxy"), train_subset(splits["train"], "judge")
    assert not {p.prompt for p in proxy} & {p.prompt for p in judge}
    assert len(proxy) + len(judge) == len(splits["train"])
    assert 0.4 < len(proxy) / len(splits["train"]) < 0.6


def test_reward_view_reads_raw_transcripts_with_the_backbone_tokenizer(hh_path):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="all-minilm-l6-v2", view="reward", max_length=64,
                          batch_size=3, max_train_pairs=6, train_subset="proxy")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape[0] == 6
    assert batch["input_ids"].shape[1] <= 64
    # Cut from the left: every row still ends with the tokenizer's [SEP] after the response.
    lengths = batch["attention_mask"].sum(-1)
    assert all(batch["input_ids"][i, n - 1] == dm.tokenizer.sep_token_id for i, n in enumerate(lengths))


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_reward_model_learns_and_saves_its_role(hh_path, tmp_path):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="all-minilm-l6-v2", view="reward", max_length=64,
                          batch_size=8, max_train_pairs=8, max_val_pairs=8)
    model = RewardModel(backbone="all-minilm-l6-v2", role="judge", lr=1e-4, max_length=64)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    # The same 8 pairs 10 times: the model must separate them.
    batch = next(iter(dm.train_dataloader()))
    model.eval()
    with torch.no_grad():
        chosen, rejected = model(batch["input_ids"], batch["attention_mask"]).chunk(2)
    assert (chosen > rejected).float().mean() >= 0.75
    assert AutoConfig.from_pretrained(tmp_path / "reward_model").to_dict()[ROLE_KEY] == "judge"
    # Scoring text directly matches the batch path.
    splits, _ = load_splits(hh_path)
    first = splits["train"][0]
    row = dm.views["train"][0]
    assert RewardFormatter(model.tokenizer, 64).encode([reward_text(first.prompt, first.chosen)])[0] == row["chosen_ids"]
    one = Collator("reward", model.tokenizer.pad_token_id)([row])
    with torch.no_grad():
        expected = model(one["input_ids"], one["attention_mask"])[0]
    torch.testing.assert_close(model.score([first.prompt], [first.chosen])[0], expected, atol=1e-4, rtol=1e-4)
