"""The controlled-sentiment world's pieces: computable rewards (VADER against direct calls, the registry, one
line for an unknown name), on-policy preference data (sampled by a tiny reference, labelled by the gold, read
back through the normal loader, refused when its manifest does not match), the proxy's agreement with the
gold, best-of-N picked by the gold, and the recipe's compare arms."""

import gzip
import json

import numpy as np
import pytest
import torch

from bench.core.errors import ConfigError
from bench.evaluation.judges import RewardJudge, load_scorer
from bench.evaluation.rewards import REWARDS, Reward, make_reward

SENTENCES = ["I love this, it is wonderful!", "This is terrible and I hate it.", "The box is on the table.",
             "Not bad at all :)", "", "WORST. DAY. EVER!!!"]


def test_vader_gold_equals_direct_calls():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    direct = [SentimentIntensityAnalyzer().polarity_scores(s)["compound"] for s in SENTENCES]
    scores = make_reward("reward:vader").score(["a prompt"] * len(SENTENCES), SENTENCES, batch_size=4)
    np.testing.assert_allclose(scores.numpy(), direct, atol=1e-6)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0  # it reads sentiment, not length


def test_a_reward_registers_by_naming_its_class_and_judges():
    class ExclamationMarks(Reward):
        name = "test-exclamations"

        def score_texts(self, prompts, responses):
            return [float(r.count("!")) for r in responses]

    try:
        judge = RewardJudge("reward:test-exclamations")
        outcomes = judge.compare(["p"] * 3, ["a!!", "b", "c!"], ["a!", "b", "c!"])
        assert outcomes.tolist() == [1.0, 0.5, 0.5]
        assert judge.describe()["path"] == "reward:test-exclamations"
        assert isinstance(load_scorer("reward:test-exclamations", "judge"), ExclamationMarks)
    finally:
        REWARDS.pop("test-exclamations")


def test_an_unknown_reward_is_one_line(workdir, capsys):
    from bench.cli import main

    with pytest.raises(ConfigError, match=r"'reward:vaderr' names no registered computable reward; known: reward:vader"):
        make_reward("reward:vaderr")
    for gold in ("reward:nosuch", "no/such/folder"):
        with pytest.raises(SystemExit) as exit_info:
            main(["label", "--recipe", "smol-sentiment", "--gold", gold])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and gold in err
    assert not (workdir / "mlflow.db").exists()


def test_pairs_of_a_prompts_samples_disjoint_or_all():
    from bench.evaluation.onpolicy import candidate_pairs

    responses = [["a", "b", "c", "d"], ["e", " ", "g", "h"]]  # the second prompt's second sample is empty
    assert candidate_pairs(["p", "q"], responses) == [("p", "a", "b"), ("p", "c", "d"), ("q", "g", "h")]
    assert candidate_pairs(["p", "q"], responses, "all") == [
        ("p", "a", "b"), ("p", "a", "c"), ("p", "a", "d"), ("p", "b", "c"), ("p", "b", "d"), ("p", "c", "d"),
        ("q", "e", "g"), ("q", "e", "h"), ("q", "g", "h")]


def test_the_pairs_setting_is_checked_and_keyed_only_when_not_the_default(monkeypatch):
    from bench.evaluation import onpolicy

    with pytest.raises(ConfigError, match=r"gold.on_policy.pairs must be one of disjoint, all, got 'every'"):
        onpolicy.OnPolicySettings.from_dict({"pairs": "every"})
    with pytest.raises(ConfigError, match=r"gold.on_policy.pairs must be a string, got \['all'\]"):
        onpolicy.OnPolicySettings.from_dict({"pairs": ["all"]})
    monkeypatch.setattr(onpolicy, "scorer_fingerprint", lambda spec: "gold")
    monkeypatch.setattr(onpolicy, "model_fingerprint", lambda spec: "reference")

    def manifest(**values):
        return onpolicy.expected_manifest("reward:vader", "tiny", onpolicy.OnPolicySettings.from_dict(values),
                                          {"rule": "bradley-terry"}, {})

    # Folders labelled before the setting existed were keyed without it: the default keeps their key.
    assert "pairs" not in manifest()["on_policy"] and manifest() == manifest(pairs="disjoint")
    assert manifest(pairs="all")["on_policy"]["pairs"] == "all" and manifest(pairs="all") != manifest()


@pytest.fixture
def source(tmp_path):
    """A small HH folder: multi-turn dialogues whose first human turns become the prompts, one duplicate."""
    folder = tmp_path / "hh" / "harmless-base"
    folder.mkdir(parents=True)
    with gzip.open(folder / "test.jsonl.gz", "wt") as out:
        for i in [*range(40), 3]:
            prompt = f"\n\nHuman: Tell me about day {i}?\n\nAssistant: Sure.\n\nHuman: More?\n\nAssistant:"
            out.write(json.dumps({"chosen": prompt + " Yes.", "rejected": prompt + " No."}) + "\n")
    return tmp_path / "hh"


def make_on_policy(source, monkeypatch, tmp_path, seed=0, create=True, pairs="disjoint"):
    from bench.evaluation import onpolicy

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    settings = onpolicy.OnPolicySettings.from_dict({"responses_per_prompt": 4, "max_prompt_tokens": 64, "pairs": pairs,
                                                    "sampling": {"max_new_tokens": 6, "batch_size": 32, "seed": 3}})
    rule = {"rule": "bradley-terry", "temperature": 0.3, "seed": seed}
    data = {"path": str(source), "chat_template": True, "max_length": 128, "max_prompt_length": 64,
            "val_fraction": 0.2, "test_fraction": 0.2}
    return onpolicy.on_policy_source("reward:vader", "tiny", settings, rule, data, create)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_on_policy_pairs_read_back_through_the_loader(source, monkeypatch, tmp_path):
    from datamodules.hh_rlhf import load_splits

    folder, manifest = make_on_policy(source, monkeypatch, tmp_path)
    counts = manifest["counts"]
    assert counts["prompts"] == 40  # the duplicate first turn once
    assert counts["pairs_sampled"] <= 80 and counts["pairs"] == counts["pairs_sampled"] - counts["ties_dropped"]
    splits, report = load_splits(str(folder), None, 0.2, 0.2)
    pairs = [p for split in splits.values() for p in split]
    assert len(pairs) == counts["pairs"] and report.kept == counts["pairs"]
    assert all(p.prompt.startswith("\n\nHuman: Tell me about day") and p.prompt.count("Human:") == 1 for p in pairs)
    records = [json.loads(line) for line in gzip.open(folder / "onpolicy" / "train.jsonl.gz", "rt")]
    vader = make_reward("reward:vader")
    for record, pair in zip(records, splits["train"] + splits["validation"] + splits["test"]):
        assert record["gold_chosen"] != record["gold_rejected"]
    chosen_text = [r["chosen"].split("\n\nAssistant:", 1)[1].strip() for r in records]
    np.testing.assert_allclose(vader.score([""] * len(records), chosen_text).numpy(),
                               [r["gold_chosen"] for r in records], atol=1e-6)
    against_gold = np.mean([r["gold_chosen"] < r["gold_rejected"] for r in records])
    assert manifest["counts"]["flip_rate"] == pytest.approx(against_gold)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_on_policy_data_sampled_in_fp32_is_not_reused_where_the_reference_samples_in_bf16(source, monkeypatch, tmp_path):
    from bench.core import precision

    monkeypatch.setattr(precision, "bf16_arithmetic", lambda device_type=None: False)
    fp32_folder, fp32_manifest = make_on_policy(source, monkeypatch, tmp_path)
    assert fp32_manifest["precision"] == "fp32"
    monkeypatch.setattr(precision, "bf16_arithmetic", lambda device_type=None: True)
    with pytest.raises(ConfigError, match="not made yet"):  # another folder, and its samples are not cached either
        make_on_policy(source, monkeypatch, tmp_path, create=False)
    bf16_folder, bf16_manifest = make_on_policy(source, monkeypatch, tmp_path)
    assert bf16_folder != fp32_folder and "precision" not in bf16_manifest  # bf16 folders keep their old keys
    assert len(list((tmp_path / "cache" / "onpolicy_samples").glob("*.json"))) == 2


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_on_policy_data_is_cached_and_refused_when_its_manifest_does_not_match(source, monkeypatch, tmp_path):
    folder, manifest = make_on_policy(source, monkeypatch, tmp_path)
    again, _ = make_on_policy(source, monkeypatch, tmp_path, create=False)
    assert again == folder
    from bench.evaluation import onpolicy

    def no_sampling(*args, **kwargs):
        raise AssertionError("the samples are cached: another pairing labels them again without sampling")

    monkeypatch.setattr(onpolicy, "sample", no_sampling)
    every, every_manifest = make_on_policy(source, monkeypatch, tmp_path, pairs="all")  # 6 pairs of 4 samples
    assert every != folder and every_manifest["on_policy"]["pairs"] == "all"
    assert manifest["counts"]["pairs_sampled"] < every_manifest["counts"]["pairs_sampled"] <= 6 * 40
    with pytest.raises(ConfigError, match="not made yet"):
        make_on_policy(source, monkeypatch, tmp_path, seed=1, create=False)
    edited = json.loads((folder / "manifest.json").read_text())
    edited["temperature"] = 9.0
    (folder / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match=r"temperature is 9.0, but these settings ask for 0.3"):
        make_on_policy(source, monkeypatch, tmp_path)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_proxy_gold_agreement_counts_the_pairs_the_gold_decides(source, monkeypatch, tmp_path):
    from bench.evaluation import onpolicy

    folder, _ = make_on_policy(source, monkeypatch, tmp_path)
    data = {"path": str(folder), "val_fraction": 0.2, "test_fraction": 0.2}
    # The gold as its own proxy agrees on every pair it decides; its labels only where they were not flipped.
    result = onpolicy.proxy_gold_agreement("reward:vader", "reward:vader", data, split="train")
    assert result["eval/proxy_gold_agreement"] == 1.0
    assert 0 < result["eval/label_gold_agreement"] <= 1.0
    REWARDS["test-negated"] = type("Negated", (Reward,), {"score_texts": lambda self, p, r: (
        -make_reward("reward:vader").score(p, r)).tolist()})
    try:
        flipped = onpolicy.proxy_gold_agreement("reward:test-negated", "reward:vader", data, split="train")
        assert flipped["eval/proxy_gold_agreement"] == 0.0
    finally:
        REWARDS.pop("test-negated")


def test_best_of_n_by_the_gold_picks_the_golds_favourite():
    from bench.evaluation.best_of_n import best_of

    gold = torch.tensor([[0.1, 0.9, -0.5, 0.3], [0.0, -0.2, 0.4, 0.8]])
    assert best_of(gold, 1).tolist() == [0, 0]
    assert best_of(gold, 3).tolist() == [1, 2]
    assert best_of(gold, 4).tolist() == [1, 3]


def test_compare_arms_are_stages_of_their_algorithm():
    from bench.experiments.recipe import arms_of, stages_of
    from bench.runs import recipes

    name, recipe = recipes.load("smol-sentiment")
    arms = arms_of(name, recipe["compare"]["arms"])
    assert arms["dpo-beta0.5"] == ("dpo", {"model": {"beta": 0.5}})
    assert arms["rloo-kl0.2"] == ("rloo", {"model": {"beta": 0.2}})
    assert stages_of(name, recipe["compare"]["stages"], arms) == ["rm", "dpo-beta0.1", "dpo-beta0.5", "ipo",
                                                                 "rloo-kl0.02", "rloo-kl0.2"]
    with pytest.raises(ConfigError, match=r"compare.arms.x.algorithm must name an aligned algorithm"):
        arms_of(name, {"x": {"algorithm": "nosuch"}})
    with pytest.raises(ConfigError, match=r"an arm overrides only"):
        arms_of(name, {"x": {"algorithm": "dpo", "eval": {}}})


def test_a_reward_named_like_a_builtin_is_refused_and_a_subclass_keeping_its_name_is_not_registered():
    with pytest.raises(TypeError, match="reward name 'vader' is taken by bench.evaluation.rewards.VaderSentiment"):
        class MyVader(Reward):
            name = "vader"

    class StricterVader(REWARDS["vader"]):  # a variant used directly, not a second "vader"
        pass

    assert REWARDS["vader"].__name__ == "VaderSentiment" and StricterVader.name == "vader"


def test_order_agreement_counts_only_the_pairs_the_gold_decides():
    import torch

    from bench.evaluation.onpolicy import order_agreement

    margin = torch.tensor([1.0, -1.0, 2.0, 0.5, -0.2])
    gold = torch.tensor([0.3, 0.1, 0.0, -3.0, -1.0])  # the third pair is a tie of the gold: left out
    assert order_agreement(margin, gold) == pytest.approx(2 / 4)  # the first and the last agree
