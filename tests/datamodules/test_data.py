"""HH-RLHF reading, parsing, splitting, formatting, truncation and the three views."""

import gzip
import json

import pytest
import torch

from bench.core.batches import IGNORE_INDEX
from bench.core.errors import DataError
from datamodules.formatting import Formatter
from datamodules.hh_datamodule import Collator, HHRLHFDataModule, paired_rows, unpaired_rows
from datamodules.hh_rlhf import Pair, hh_to_messages, load_splits, parse_record, read_pairs


def write_jsonl_gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def record(prompt="\n\nHuman: hi\n\nAssistant:", chosen=" hello", rejected=" go away"):
    return json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected})


def test_real_slice_counts_and_splits(hh_path):
    splits, report = load_splits(hh_path)
    assert report.pairs_read == 2312
    assert dict(report.dropped) == {"mismatched_prompt": 5, "empty_response": 4}
    assert report.kept == 2303
    assert sum(report.split_sizes.values()) == 2303
    assert all(report.split_sizes[s] > 150 for s in ("validation", "test"))
    prompts = {name: {p.prompt for p in pairs} for name, pairs in splits.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    again, _ = load_splits(hh_path)
    assert again == splits


def test_parse_follows_dpo_reference():
    prompt = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    pair = parse_record({"chosen": prompt + " yes", "rejected": prompt + " no"})
    assert pair == Pair(prompt=prompt, chosen=" yes", rejected=" no")
    assert parse_record({"chosen": prompt + " yes", "rejected": "\n\nHuman: x\n\nAssistant: no"}) == "mismatched_prompt"
    assert parse_record({"chosen": prompt + "  ", "rejected": prompt + " no"}) == "empty_response"
    assert parse_record({"chosen": "no tags", "rejected": "none"}) == "no_assistant_turn"


def test_hh_turns_become_chat_messages():
    prompt = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:"
    assert hh_to_messages(prompt) == [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "b."},
        {"role": "user", "content": "c?"},
    ]


def test_counts_drops_by_reason(tmp_path):
    write_jsonl_gz(tmp_path / "s" / "test.jsonl.gz", [record(), record(chosen=" "), record(), "",
                                                      json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a",
                                                                  "rejected": "\n\nHuman: r\n\nAssistant: b"})])
    pairs, report = read_pairs(str(tmp_path))
    assert report.pairs_read == 4 and report.kept == 2
    assert dict(report.dropped) == {"empty_response": 1, "mismatched_prompt": 1}
    assert len(pairs["test"]) == 2


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl_gz(tmp_path / "s" / "train.jsonl.gz", [record(), record(), '{"chosen": "x", "rej'])
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        read_pairs(str(tmp_path))


def test_missing_key_names_file_and_line(tmp_path):
    path = write_jsonl_gz(tmp_path / "s" / "train.jsonl.gz", [record(), json.dumps({"chosen": "x"})])
    with pytest.raises(DataError, match=rf"{path}:2: missing key 'rejected'"):
        read_pairs(str(tmp_path))


def test_nonexistent_data_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_pairs(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.path .*nowhere does not exist"):
        HHRLHFDataModule(path=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("chat_template", [True, False])
def test_response_tokens_are_exactly_the_response_text_tokens(tokenizer, chat_template):
    formatter = Formatter(tokenizer, chat_template=chat_template)
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant:"
    pair = Pair(prompt=prompt, chosen=" It is 4.", rejected=" Fish.")
    row = formatter.pair(pair)
    assert row["prompt_ids"] == tokenizer(formatter.prompt_text(prompt), add_special_tokens=not chat_template).input_ids
    for key, response in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
        text = response.strip() if chat_template else response
        assert row[key] == tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert tokenizer.decode(row[key][:-1]) == text
    if chat_template:
        assert "<|im_start|>assistant\n" in formatter.prompt_text(prompt)
        assert tokenizer.eos_token == "<|im_end|>"  # SmolLM2's end-of-turn token ends each response
    else:
        assert formatter.prompt_text(prompt) == prompt


def test_truncation_keeps_prompt_end_then_cuts_responses(tokenizer):
    formatter = Formatter(tokenizer, chat_template=False, max_length=64, max_prompt_length=24)
    long_prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(80)) + "\n\nAssistant:"
    long_response = " " + " ".join(f"reply{i}" for i in range(80))
    full_prompt = formatter.prompt_ids(long_prompt)
    row = formatter.pair(Pair(long_prompt, long_response, " short"))
    assert row["prompt_ids"] == full_prompt[-24:]
    assert row["chosen_ids"] == formatter.response_ids(long_response)[: 64 - 24]
    assert row["rejected_ids"] == formatter.response_ids(" short")
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) <= 64
    # Short enough already: nothing is cut.
    short = formatter.pair(Pair("\n\nHuman: hi\n\nAssistant:", " hello", " bye"))
    assert short["chosen_ids"][-1] == tokenizer.eos_token_id


def some_pairs(n):
    return [Pair(f"\n\nHuman: question {i}?\n\nAssistant:", f" answer {i}", f" wrong {i}") for i in range(n)]


def test_paired_collation_masks_prompts(tokenizer):
    formatter = Formatter(tokenizer)
    rows = paired_rows(some_pairs(3), formatter)
    batch = Collator("paired", tokenizer.pad_token_id)(rows)
    assert batch["input_ids"].shape[0] == 6
    for i, row in enumerate(rows):
        for offset, key in ((0, "chosen_ids"), (3, "rejected_ids")):
            labels = batch["labels"][i + offset]
            kept = labels[labels != IGNORE_INDEX].tolist()
            assert kept == row[key]
            assert (labels[: len(row["prompt_ids"])] == IGNORE_INDEX).all()
            assert batch["attention_mask"][i + offset].sum() == len(row["prompt_ids"]) + len(row[key])


def test_unpaired_view_is_deterministic_mixed_and_mismatched(tokenizer):
    formatter = Formatter(tokenizer)
    pairs = some_pairs(20)
    rows = unpaired_rows(pairs, formatter, seed=3)
    assert rows == unpaired_rows(pairs, formatter, seed=3)
    assert len(rows) == 40 and sum(r["desirable"] for r in rows) == 20
    first_batch = [r["desirable"] for r in rows[:8]]
    assert any(first_batch) and not all(first_batch)
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(tuple(r["prompt_ids"]), []).append(r["completion_ids"])
    for r in rows:
        # the mismatched completion is a response to another prompt
        assert r["kl_completion_ids"] not in by_prompt[tuple(r["prompt_ids"])]
    batch = Collator("unpaired", tokenizer.pad_token_id)(rows[:4])
    assert batch["desirable"].dtype == torch.bool and batch["kl_input_ids"].shape[0] == 4


def test_datamodule_views_on_the_real_slice(hh_path):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view="sft", batch_size=2, max_train_pairs=10)
    dm.setup("fit")
    assert len(dm.views["train"]) == 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 2
