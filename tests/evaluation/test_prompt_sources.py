"""Prompt sources of the on-policy world (bench/evaluation/prompt_sources.py) and the hub sentiment classifier as a reward
(bench/evaluation/rewards.py), without the hub: `hh-first-turn` on a small HH folder, `imdb-prefix` on small local IMDb-like
files, one line for an unknown source or an unreachable hub, and the classifier's log-odds on a tiny
random-init classifier saved to a folder."""

import gzip
import json

import pytest
import torch

from bench.core.errors import ConfigError, DataError
from bench.evaluation.prompt_sources import PROMPT_SOURCES, make_prompt_source, source_prompts
from bench.evaluation.rewards import REWARDS, HubSentimentClassifier, make_reward

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


@pytest.fixture
def hh_folder(tmp_path):
    """Two splits of multi-turn dialogues; first turns repeat within and across splits, one is long."""
    folder = tmp_path / "hh" / "helpful-base"
    folder.mkdir(parents=True)

    def write(split, turns):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as out:
            for turn in turns:
                prompt = f"\n\nHuman: {turn}\n\nAssistant: Sure.\n\nHuman: And then?\n\nAssistant:"
                out.write(json.dumps({"chosen": prompt + " Yes.", "rejected": prompt + " No."}) + "\n")

    write("train", ["Name a fruit?", "What is rain?", "Name a fruit?", "long " * 40 + "question?", "Why blue?"])
    write("test", ["Why blue?", "Count to three?", "What is rain?"])
    return tmp_path / "hh"


def test_hh_first_turn_dedups_in_source_order_and_keeps_what_fits(hh_folder, tokenizer):
    data = {"path": str(hh_folder)}
    everything = source_prompts("hh-first-turn", data, tokenizer, 10_000, fits=lambda p: True)
    # splits in name order (test, then train), each first human turn once, the later turns dropped
    assert everything == [f"{HUMAN}{t}{ASSISTANT}" for t in
                          ["Why blue?", "Count to three?", "What is rain?", "Name a fruit?", "long " * 39 + "long question?"]]
    short = source_prompts("hh-first-turn", data, tokenizer, 10_000, fits=lambda p: "long" not in p)
    assert short == everything[:4]
    assert source_prompts("hh-first-turn", data, tokenizer, 10_000, limit=2, fits=lambda p: True) == everything[:2]
    # without `fits`: the tokenizer's count of the raw prompt against max_prompt_tokens
    budget = max(len(tokenizer(p).input_ids) for p in everything[:4])
    assert source_prompts("hh-first-turn", data, tokenizer, budget) == everything[:4]
    with pytest.raises(DataError, match="no first human turn fits in 3 prompt tokens"):
        source_prompts("hh-first-turn", data, tokenizer, 3)


WORDS = ["amazing", "boring", "clever", "dreadful", "elegant", "forgettable", "gripping", "hollow", "inspired",
         "jarring", "kind", "lazy"]


def reviews() -> list[str]:
    """60 distinct reviews (two with <br /> tags) and 10 copies of one more."""
    texts = [f"{WORDS[i % 12]} {WORDS[(i * 5 + 1) % 12]} film number {i}, with {WORDS[(i * 7 + 3) % 12]} acting "
             f"and a {WORDS[(i + 4) % 12]} plot that I would call {WORDS[(i * 11) % 12]} overall." for i in range(60)]
    texts[0] = "Great<br /><br />film, " + texts[0]
    texts[1] = "Well<br/>then<BR />this is " + texts[1]
    return texts + ["This movie is the best thing I have seen in years."] * 10


@pytest.fixture
def imdb_jsonl(tmp_path):
    path = tmp_path / "imdb.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": 1}) + "\n" for text in reviews()))
    return path


def prefix_of(prompt: str) -> str:
    assert prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT)
    return prompt[len(HUMAN):-len(ASSISTANT)]


def test_imdb_prefix_cuts_seeded_2_to_8_token_prefixes_wrapped_as_hh(imdb_jsonl, tokenizer):
    data = {"path": str(imdb_jsonl)}
    prompts = source_prompts("imdb-prefix", data, tokenizer, 64, seed=0)
    assert len(prompts) == len(set(prompts))
    cleaned = [r.replace("<br /><br />", " ").replace("<br/>", " ").replace("<BR />", " ") for r in reviews()]
    lengths = set()
    for prompt in prompts:
        prefix = prefix_of(prompt)
        assert "<br" not in prefix.lower() and "\n" not in prefix
        assert any(review.startswith(prefix) for review in cleaned), prefix
        lengths.add(len(tokenizer(prefix, add_special_tokens=False).input_ids))
    assert lengths <= set(range(2, 9)) and len(lengths) >= 5  # the length is drawn per review
    # the 10 copies of one review give at most 7 prompts (one per length 2..8): deduplicated
    copies = [p for p in prompts if prefix_of(p).startswith("This movie")]
    assert 1 <= len(copies) <= 7 and 40 < len(prompts) <= 60 + len(copies)
    assert any(prefix_of(p).startswith("Great film") for p in prompts)  # "<br /><br />" is a space
    assert any(prefix_of(p).startswith("Well then") for p in prompts)

    assert source_prompts("imdb-prefix", data, tokenizer, 64, seed=0) == prompts  # same seed, same prompts
    other = source_prompts("imdb-prefix", data, tokenizer, 64, seed=1)
    assert other != prompts and sorted(other) != sorted(prompts)  # another seed: other lengths, not just order
    assert source_prompts("imdb-prefix", data, tokenizer, 64, limit=7, seed=0) == prompts[:7]
    # the fits filter: a tighter token budget keeps only the shorter prompts, in the same order
    budget = sorted(len(tokenizer(p).input_ids) for p in prompts)[len(prompts) // 2]
    tight = source_prompts("imdb-prefix", data, tokenizer, budget, seed=0)
    assert tight == [p for p in prompts if len(tokenizer(p).input_ids) <= budget] and len(tight) < len(prompts)


def test_imdb_prefix_reads_a_parquet_snapshot_folder_and_jsonl_gz_alike(imdb_jsonl, tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    snapshot = tmp_path / "imdb-snapshot" / "plain_text"
    snapshot.mkdir(parents=True)
    pq.write_table(pa.table({"text": reviews(), "label": [0] * 70}), snapshot / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["Other split entirely, never read."] * 5, "label": [1] * 5}),
                   snapshot / "test-00000-of-00001.parquet")
    gz = tmp_path / "imdb.jsonl.gz"
    with gzip.open(gz, "wt") as out:
        out.write(imdb_jsonl.read_text())
    expected = source_prompts("imdb-prefix", {"path": str(imdb_jsonl)}, tokenizer, 64, seed=3)
    assert source_prompts("imdb-prefix", {"path": str(snapshot.parent)}, tokenizer, 64, seed=3) == expected
    assert source_prompts("imdb-prefix", {"path": str(gz)}, tokenizer, 64, seed=3) == expected
    source = make_prompt_source("imdb-prefix")
    assert source.fingerprint({"path": str(gz)}) != source.fingerprint({"path": str(imdb_jsonl)})
    assert source.fingerprint({"path": "stanfordnlp/imdb"})["hub"] == "stanfordnlp/imdb"


def test_imdb_prefix_faults_are_one_line(tmp_path, tokenizer, monkeypatch):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"text": "fine review here"}) + "\n" + json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: a record needs a 'text' string"):
        source_prompts("imdb-prefix", {"path": str(bad)}, tokenizer, 64)
    # the hub unreachable: says so and asks for a local copy
    offline(monkeypatch, tmp_path)
    with pytest.raises(DataError) as caught:
        source_prompts("imdb-prefix", {"path": "stanfordnlp/imdb"}, tokenizer, 64)
    message = str(caught.value)
    assert "\n" not in message and "stanfordnlp/imdb" in message and "unreachable" in message
    assert "local copy" in message and "data.path" in message


def test_an_unknown_prompt_source_is_one_config_error_naming_the_known_ones(tokenizer):
    assert {"hh-first-turn", "imdb-prefix"} <= set(PROMPT_SOURCES)
    with pytest.raises(ConfigError) as caught:
        source_prompts("imdb-prefixes", {"path": "x"}, tokenizer, 64)
    message = str(caught.value)
    assert "\n" not in message and "'imdb-prefixes'" in message and "hh-first-turn, imdb-prefix" in message


def offline(monkeypatch, tmp_path):
    """The hub unreachable, and empty caches (a machine that has downloaded the models must not find them)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets-cache")


def test_the_siebert_reward_without_the_hub_is_one_config_error_naming_the_model(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    reward = make_reward("reward:siebert-sentiment")  # made and fingerprinted without loading anything
    assert reward.model is None and "siebert/sentiment-roberta-large-english" in reward.fingerprint()
    with pytest.raises(ConfigError) as caught:
        reward.score(["\n\nHuman: The film\n\nAssistant:"], ["was wonderful."])
    message = str(caught.value)
    assert "\n" not in message and "siebert/sentiment-roberta-large-english" in message
    assert "hub" in message and "local copy" in message


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random-init BERT sentiment classifier (MiniLM's tokenizer), POSITIVE at index 0, saved to a folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bench.core.models import MINILM_SPEC, resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM_SPEC))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "POSITIVE", 1: "NEGATIVE"}, label2id={"POSITIVE": 0, "NEGATIVE": 1})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("classifier")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TEXTS = ["I loved every minute.", "Dull.", "", "It was a dreadful, boring mess of a film with no redeeming parts.",
         "Fine.", "The acting was great but the plot dragged on."]


def test_hub_classifier_scores_the_log_odds_of_the_positive_label(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    class TinyClassifier(HubSentimentClassifier):  # no name: not registered
        model_id = str(classifier_dir)
        micro_batch_size = 2

    reward = TinyClassifier()
    assert str(classifier_dir) in reward.fingerprint()
    scores = reward.score(["a prompt"] * len(TEXTS), TEXTS, batch_size=4)  # batches of 4, forwards of 2

    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    expected = logits[:, 0] - logits[:, 1]  # POSITIVE is label 0 here, NEGATIVE label 1
    assert scores.shape == (len(TEXTS),) and expected.abs().max() > 1e-4  # not all zero
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert reward.score([], []).shape == (0,)

    class WrongLabel(TinyClassifier):
        positive_label = "JOY"

    with pytest.raises(ConfigError, match="no single 'JOY' label .*POSITIVE, NEGATIVE"):
        WrongLabel().score(["p"], ["x"])


def test_the_siebert_reward_is_registered_with_its_model_id_and_needs_the_hub():
    from bench.evaluation.rewards import reward_needs_hub

    assert REWARDS["siebert-sentiment"].model_id == "siebert/sentiment-roberta-large-english"
    assert issubclass(REWARDS["siebert-sentiment"], HubSentimentClassifier)
    assert reward_needs_hub("reward:siebert-sentiment")  # what a dry run swaps for a local gold
    assert not any(reward_needs_hub(spec) for spec in ("reward:vader", "reward:nosuch", "train", None, "org/model"))


def test_a_prompt_source_named_like_a_builtin_is_refused():
    from bench.evaluation.prompt_sources import PromptSource

    with pytest.raises(TypeError, match="prompt source name 'hh-first-turn' is taken by "
                                        "bench.evaluation.prompt_sources.HHFirstTurn"):
        class MyFirstTurn(PromptSource):
            name = "hh-first-turn"
    assert PROMPT_SOURCES["hh-first-turn"].__name__ == "HHFirstTurn"
