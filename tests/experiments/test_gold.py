"""Gold labels: the two label rules, the relabelled copy in the dataset's own layout (read back by the normal
loader), its manifest, the cache, and copies that do not match their settings."""

import gzip
import json

import numpy as np
import pytest

from bench.core.errors import ConfigError
from bench.core.precision import inference_autocast
from bench.evaluation.judges import load_scorer
from bench.experiments.gold import GoldSettings, check_manifest, label_pairs, relabelled_source
from datamodules.hh_rlhf import load_splits
from modules.reward_model import load_reward_model


def test_bradley_terry_at_low_temperature_is_the_deterministic_rule():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=2000), rng.normal(size=2000)  # no exact ties
    deterministic = label_pairs(chosen, rejected, "deterministic")
    assert 0.4 < deterministic.mean() < 0.6
    for seed in range(3):
        assert (label_pairs(chosen, rejected, "bradley-terry", temperature=1e-6, seed=seed) == deterministic).all()


def test_bradley_terry_keeps_each_label_with_its_probability():
    margins = np.array([0.0, 1.0, -2.0, 3.0])
    chosen, rejected = np.repeat(margins, 20000), np.zeros(4 * 20000)
    kept = label_pairs(chosen, rejected, "bradley-terry", temperature=1.0, seed=1).reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(kept, 1 / (1 + np.exp(-margins)), atol=0.01)
    doubled = label_pairs(chosen, rejected, "bradley-terry", temperature=2.0, seed=1).reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(doubled, 1 / (1 + np.exp(-margins / 2)), atol=0.01)
    again = label_pairs(chosen, rejected, "bradley-terry", temperature=1.0, seed=1)
    assert (again == label_pairs(chosen, rejected, "bradley-terry", temperature=1.0, seed=1)).all()


@pytest.fixture
def source(tmp_path):
    """A small HH folder in the dataset's layout, with one unscorable record (an empty response)."""
    folder = tmp_path / "hh" / "harmless-base"
    folder.mkdir(parents=True)
    records = []
    for i in range(30):
        prompt = f"\n\nHuman: Question number {i} about the weather?\n\nAssistant:"
        records.append({"chosen": prompt + f" A short answer {i}.", "rejected": prompt + " " + "A much longer and "
                        f"more elaborate answer about clouds, rain and wind, number {i}." * (1 + i % 3)})
    records.append({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."})
    with gzip.open(folder / "test.jsonl.gz", "wt") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return tmp_path / "hh"


@pytest.mark.parametrize("rule, temperature", [("deterministic", 1.0), ("bradley-terry", 100.0)])
def test_relabelled_copy_reads_back_through_the_loader(source, tmp_path, reward_models, rule, temperature,
                                                      monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "bench-cache"))  # the scores are made here, not reused
    gold = load_reward_model(reward_models["judge"], role="gold")
    settings = GoldSettings(model=reward_models["judge"], rule=rule, temperature=temperature)
    data = {"path": str(source)}
    folder, manifest = relabelled_source(settings, data, lambda: gold, root=tmp_path / "cache")
    assert (folder / "harmless-base" / "test.jsonl.gz").exists()  # the dataset's own layout
    counts = manifest["counts"]
    assert counts["pairs"] == 30 and counts["dropped"] == {"empty_response": 1}
    human, _ = load_splits(str(source))
    relabelled, report = load_splits(str(folder))
    assert report.pairs_read == 30 and sum(map(len, relabelled.values())) == 30
    assert {s: len(p) for s, p in relabelled.items()} == {s: len(p) for s, p in human.items()}
    # Each record is the human pair, kept or swapped, with the gold model's scores of what it now holds.
    originals = [json.loads(line) for line in gzip.open(source / "harmless-base" / "test.jsonl.gz", "rt")][:30]
    lines = [json.loads(line) for line in gzip.open(folder / "harmless-base" / "test.jsonl.gz", "rt")]
    # The gold model scores the original pairs here as labelling does (its precision, the same batches): a bf16
    # score depends on its batch's padding (by 7e-4 in a CI run), so only the same batches compare exactly.
    prompts = [o["chosen"][: o["chosen"].rfind("Assistant:") + len("Assistant:")] for o in originals]
    with inference_autocast("cpu"):
        scores = {side: gold.score(prompts, [o[side][len(p):] for o, p in zip(originals, prompts)],
                                   batch_size=settings.batch_size).tolist() for side in ("chosen", "rejected")}
    flipped = 0
    for i, (original, line) in enumerate(zip(originals, lines)):
        swapped = (line["chosen"], line["rejected"]) == (original["rejected"], original["chosen"])
        assert swapped or (line["chosen"], line["rejected"]) == (original["chosen"], original["rejected"])
        flipped += swapped
        direct = [scores["rejected"][i], scores["chosen"][i]] if swapped else [scores["chosen"][i], scores["rejected"][i]]
        assert direct == pytest.approx([line["gold_chosen"], line["gold_rejected"]], abs=1e-6)
        if rule == "deterministic":
            assert line["gold_chosen"] >= line["gold_rejected"]
    assert flipped == counts["flipped"]
    if rule == "bradley-terry":  # at T = 100 each label is nearly a coin toss: both kinds, surely
        assert 0 < flipped < 30
    assert manifest["rule"] == rule and manifest["gold_fingerprint"]
    assert manifest["agreement_with_human"]["labels_vs_human"] == pytest.approx(1 - flipped / 30)


def test_the_copy_is_cached_and_a_mismatching_manifest_is_refused(source, tmp_path, reward_models):
    gold = load_reward_model(reward_models["judge"], role="gold")
    settings = GoldSettings(model=reward_models["judge"], rule="bradley-terry", temperature=0.5, seed=3)
    data = {"path": str(source)}
    folder, _ = relabelled_source(settings, data, lambda: gold, root=tmp_path / "cache")

    def never():
        raise AssertionError("a cached copy must not be scored again")

    again, _ = relabelled_source(settings, data, never, root=tmp_path / "cache")
    assert again == folder
    other_seed = GoldSettings(model=reward_models["judge"], rule="bradley-terry", temperature=0.5, seed=4)
    assert relabelled_source(other_seed, data, lambda: gold, root=tmp_path / "cache")[0] != folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["rule"] = "deterministic"  # a copy whose manifest says another rule
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"manifest.json: rule is 'deterministic', but these settings ask for "
                                          r"'bradley-terry'"):
        relabelled_source(settings, data, never, root=tmp_path / "cache")
    with pytest.raises(ConfigError, match="gold_fingerprint"):
        check_manifest(folder, {"gold_fingerprint": "another model"})


def test_bad_gold_settings_name_the_field():
    with pytest.raises(ConfigError, match="gold.rule 'majority' is unknown"):
        GoldSettings(model="x", rule="majority")
    with pytest.raises(ConfigError, match="gold.temperature must be > 0"):
        GoldSettings(model="x", temperature=0)


def test_a_reward_model_gold_s_labels_are_keyed_by_the_precision_it_scored_in(source, tmp_path, reward_models,
                                                                             monkeypatch):
    from bench.core import precision

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "bench-cache"))
    data, root = {"path": str(source)}, tmp_path / "cache"
    calls = []

    def scorer(spec, role="gold"):
        def made():
            calls.append(spec)
            return load_scorer(spec, role)
        return made

    def never():
        raise AssertionError("scored again in the precision it was cached in")

    folders = {}
    for spec in (reward_models["judge"], "reward:vader"):
        settings = GoldSettings(model=spec, rule="deterministic")
        for bf16 in (True, False):
            monkeypatch.setattr(precision, "bf16_arithmetic", lambda device_type=None, bf16=bf16: bf16)
            folders[spec, bf16], manifest = relabelled_source(settings, data, scorer(spec), root=root)
            assert manifest.get("precision") == (None if bf16 or spec == "reward:vader" else "fp32")
            assert relabelled_source(settings, data, never, root=root)[0] == folders[spec, bf16]
    # bf16 autocast keeps the key it had before precision was recorded; fp32 scores of a model are kept apart.
    assert folders[reward_models["judge"], True] != folders[reward_models["judge"], False]
    assert folders["reward:vader", True] == folders["reward:vader", False]  # text in, a number out
    assert calls == [reward_models["judge"], reward_models["judge"], "reward:vader"]
