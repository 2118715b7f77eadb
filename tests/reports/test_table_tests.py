"""`bench table`'s tests against a baseline fixed in advance, on synthetic rows: a null where every row equals the
baseline in distribution must mark a table (any "*") at most 5 % of the time; a real difference of twice the
printed MDE must be found; rows that cannot be tested say why, and a table without a best-of-1 row names the test
it used instead."""

from types import SimpleNamespace

import numpy as np
import pytest

from bench.core.errors import BenchError
from bench.reports import table
from bench.reports.table import (
    BASELINE,
    ONE_ROW,
    SEEDS_DIFFER,
    WIN_VS_REF_TEST,
    Row,
    baseline_tests,
    comparison_stage_runs,
    csv_record,
)
from bench.runs import tracking

SEEDS, PROMPTS = 3, 128
TEXTS = [f"prompt {i}" for i in range(PROMPTS)]
# Judge-score components: a prompt's difficulty (shared by every row), each row's own per-seed training effect,
# each row's own per-prompt effect, and sampling noise. The seed effect dominates the mean's variance: the regime
# where a Satterthwaite df estimated from 3 seeds would reject far too often.
PROMPT_SD, SEED_SD, ROW_PROMPT_SD, NOISE_SD = 1.0, 0.15, 0.4, 0.7


def judge_scores(rng, difficulty, shift=0.0, seeds=SEEDS):
    return (difficulty + shift + rng.normal(0, SEED_SD, (seeds, 1)) + rng.normal(0, ROW_PROMPT_SD, (1, PROMPTS))
            + rng.normal(0, NOISE_SD, (seeds, PROMPTS)))


def row(name, outcomes, seeds=SEEDS, prompts="test split, 128 prompts, prompt seed 0", judge="gold", texts=TEXTS):
    return Row(name, [f"run-{name}"], [str(s) for s in range(seeds)], "compare synthetic", prompts, judge, {},
               outcomes=outcomes, prompt_texts=list(texts))


def null_table(rng, rows=8, shifted=None, shift=0.0):
    difficulty = rng.normal(0, PROMPT_SD, (1, PROMPTS))
    names = [BASELINE] + [f"arm-{i}" for i in range(rows)]
    return [row(name, {"judge_policy": judge_scores(rng, difficulty, shift if name == shifted else 0.0)})
            for name in names]


def line_of(text, name):
    """The markdown table line of a row, split into its cells."""
    (line,) = [line for line in text.splitlines() if line.startswith(f"| {name} ")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def rows_tested(rows):
    return [r for r in rows if r.test.difference is not None]


@pytest.fixture
def quiet_markdown(monkeypatch):
    """markdown() without torch's import (machine()) or git: the table's text is what is tested."""
    monkeypatch.setattr(table, "machine", lambda: "test machine")
    monkeypatch.setattr(tracking, "git_commit", lambda: "test")

    def render(rows):
        baseline_tests(rows)
        return table.markdown("x", [csv_record(r, {}) for r in rows], "bench table --experiment x", "", [])
    return render


def test_family_wise_false_positives_stay_at_five_percent_under_the_null():
    """8 rows equal in distribution to best-of-1, 3 seeds x 128 prompts with seed and prompt effects: the share of
    tables with any "*" is at most 0.05 + 2 standard errors."""
    rng = np.random.default_rng(11)
    tables = 500
    marked = 0
    for _ in range(tables):
        rows = null_table(rng)
        baseline_tests(rows)
        assert len(rows_tested(rows)) == 8 and all(r.test.tests_in_group == 8 for r in rows)
        marked += any(r.test.significant for r in rows_tested(rows))
    assert marked / tables <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / tables)


def test_a_difference_of_twice_the_mde_is_found():
    """One row shifted by twice the MDE the table prints (median over null tables) is marked in >= 80 % of
    tables, and its interval, at its Holm level, excludes 0 exactly when it is marked."""
    rng = np.random.default_rng(12)
    mdes = []
    for _ in range(40):
        rows = null_table(rng)
        baseline_tests(rows)
        mdes += [r.test.mde for r in rows_tested(rows)]
    mde = float(np.median(mdes))
    found = 0
    simulations = 200
    for _ in range(simulations):
        rows = null_table(rng, shifted="arm-3", shift=2 * mde)
        baseline_tests(rows)
        shifted = next(r.test for r in rows if r.algorithm == "arm-3")
        assert shifted.significant == (shifted.low > 0 or shifted.high < 0)
        found += shifted.significant
    assert found / simulations >= 0.8


def test_rows_of_other_seeds_are_not_tested_and_say_so(quiet_markdown):
    rng = np.random.default_rng(13)
    difficulty = rng.normal(0, PROMPT_SD, (1, PROMPTS))
    rows = [row(BASELINE, {"judge_policy": judge_scores(rng, difficulty)}),
            row("dpo", {"judge_policy": judge_scores(rng, difficulty, 1.0)}),
            row("kto", {"judge_policy": judge_scores(rng, difficulty, 1.0, seeds=2)}, seeds=2)]
    text = quiet_markdown(rows)
    kto = rows[2].test
    assert kto.difference is None and kto.note == SEEDS_DIFFER and kto.p_holm is None
    assert rows[1].test.tests_in_group == 1  # kto is not counted in Holm's m
    cells = line_of(text, "kto")
    assert cells[1] == "2" and cells[5] == SEEDS_DIFFER and cells[6:8] == ["–", "–"]  # no Δ, p or MDE
    assert "Holm over 1 row;" in text and "alpha/m = 0.05/1 = 0.05)" in text


def test_one_row_says_there_is_nothing_to_test(quiet_markdown):
    rng = np.random.default_rng(14)
    only_baseline = [row(BASELINE, {"judge_policy": rng.normal(size=(SEEDS, PROMPTS))})]
    text = quiet_markdown(only_baseline)
    assert ONE_ROW in text and " *" not in text and "| best-of-1 | 3 |" in text
    assert only_baseline[0].test.difference is None and only_baseline[0].test.tests_in_group == 0
    no_outcomes = [row("dpo", {}, seeds=1)]  # an old run without per-prompt win rates: no test is possible
    assert ONE_ROW in quiet_markdown(no_outcomes)


def test_without_best_of_1_win_rate_vs_reference_is_tested_against_one_half(quiet_markdown):
    rng = np.random.default_rng(15)
    wins = {"better": (rng.random((1, PROMPTS)) < 0.8).astype(float),
            "even": rng.choice([0.0, 0.5, 1.0], (1, PROMPTS))}
    rows = [row(name, {"win_rate_vs_ref": w, "win_rate_vs_chosen": w}, seeds=1) for name, w in wins.items()]
    text = quiet_markdown(rows)
    better, even = (r.test for r in rows)
    assert better.test == even.test == WIN_VS_REF_TEST and better.tests_in_group == 2
    assert better.difference.mean == pytest.approx(wins["better"].mean() - 0.5)
    assert better.significant and better.p_holm == pytest.approx(min(1, 2 * better.difference.p))  # Holm, smaller p
    assert "win rate vs the reference's own samples minus 0.5" in text and "Holm over 2 rows" in text
    assert "the baseline is the reference policy's own samples" in text  # the paragraph below says what was tested
    assert "With 3 seeds" not in text and "lower bounds" not in text  # one seed: no few-seeds caveat


def test_judge_score_table_columns_and_csv(quiet_markdown):
    rng = np.random.default_rng(16)
    difficulty = rng.normal(0, PROMPT_SD, (1, PROMPTS))
    rows = [row(BASELINE, {"judge_policy": judge_scores(rng, difficulty)}),
            row("dpo-beta0.1", {"judge_policy": judge_scores(rng, difficulty, 1.5)}),
            row("best-of-4-gold", {"judge_policy": judge_scores(rng, difficulty, 2.0)})]
    for r, kind in zip(rows, ("exact", "exact", "bound")):
        r.kl_kind = kind
        r.metrics = {"eval/kl": 0.25, "eval/prompts/truncated_ratio": 0.125}
    text = quiet_markdown(rows)
    records = {r.algorithm: csv_record(r, {}) for r in rows}
    assert set(table.CSV_FIELDS) == set(records["dpo-beta0.1"])
    dpo = records["dpo-beta0.1"]
    scores = [r.outcomes["judge_policy"] for r in rows[:2]]
    assert dpo["diff_vs_reference"] == pytest.approx(scores[1].mean() - scores[0].mean())
    assert dpo["significant"] is True and dpo["p_holm"] < 0.05 and dpo["tests_in_group"] == 2
    first = dpo["p"] < records["best-of-4-gold"]["p"]  # Holm's first step, else its second (both are rejected)
    assert dpo["diff_ci_level"] == pytest.approx(1 - 0.05 / 2 if first else 1 - 0.05 / 1)
    assert dpo["diff_ci_low"] > 0 and dpo["mde"] > 0 and dpo["prompts_truncated"] == 0.125
    assert dpo["completions_clipped"] is None and dpo["kl_kind"] == "exact"
    assert records["best-of-4-gold"]["kl_kind"] == "bound" and records[BASELINE]["diff_vs_reference"] is None
    gold, baseline = line_of(text, "best-of-4-gold (ceiling)"), line_of(text, BASELINE)
    dpo_cells = line_of(text, "dpo-beta0.1")
    assert gold[9] == "≤ 0.25" and dpo_cells[9] == "0.25"  # KL: best-of-N's bound is marked as one
    assert baseline[4] == f"{scores[0].mean():.3f}" and baseline[5] == "reference" and baseline[6] == "–"
    low, high, level = dpo["diff_ci_low"], dpo["diff_ci_high"], dpo["diff_ci_level"]
    assert dpo_cells[5] == f"{dpo['diff_vs_reference']:+.3f} [{low:+.3f}, {high:+.3f}] ({100 * level:.2f} %) *"
    assert dpo_cells[7] == f"{dpo['mde']:.3f}" and dpo_cells[11] == "0.125" and dpo_cells[12] == "–"
    mde = np.median([dpo["mde"], records["best-of-4-gold"]["mde"]])
    assert (f"smallest difference this table can detect at 80 % power: {mde:.3g} (median over its rows, Holm worst "
            "case alpha/m = 0.05/2 = 0.025)") in text and "Holm over 2 rows" in text
    assert "Satterthwaite" in text and "With 3 seeds the seed variance is estimated from 3 values" in text


def test_same_prompt_set_with_other_prompts_is_an_error():
    rng = np.random.default_rng(17)
    rows = [row(BASELINE, {"judge_policy": rng.normal(size=(SEEDS, PROMPTS))}),
            row("dpo", {"judge_policy": rng.normal(size=(SEEDS, PROMPTS))}, texts=TEXTS[::-1])]
    with pytest.raises(BenchError, match="claim the same prompt set"):
        baseline_tests(rows)


def test_stage_names_with_dashes_and_dots_keep_their_seeds_apart():
    """Only a last `.seed<digits>` is a seed; reward models are left out; runs come in seed order (10 after 2)."""
    ids = {"stage.dpo-beta0.1.seed10": "a10", "stage.dpo-beta0.1.seed2": "a2", "stage.rloo-kl0.05.seed1": "b1",
           "stage.rloo-kl0.05.seed0": "b0", "stage.best-of-4-gold.seed0": "c0", "stage.rm-proxy.seed0": "r0",
           "stage.rm-judge.seed0": "r1", "stage.best-of-1": "d0", "stage.x.seedling": "e0"}
    # a reward model is known by its run's `algorithm` tag (the registry's reward model), not by its stage name
    runs = {run_id: SimpleNamespace(run_id=run_id, data=SimpleNamespace(tags={
        "seed": run_id[1:], "algorithm": "rm" if run_id.startswith("r") else "dpo"}))
            for run_id in ids.values()}
    client = SimpleNamespace(get_run=runs.__getitem__)
    parent = SimpleNamespace(data=SimpleNamespace(tags=ids))
    by_stage = {stage: [run.run_id for run in found] for stage, found in comparison_stage_runs(client, parent).items()}
    assert by_stage == {"dpo-beta0.1": ["a2", "a10"], "rloo-kl0.05": ["b0", "b1"], "best-of-4-gold": ["c0"],
                        "best-of-1": ["d0"], "x.seedling": ["e0"]}


def test_what_a_rows_kl_is():
    def run(**tags):
        return SimpleNamespace(data=SimpleNamespace(tags=tags))

    assert table.kl_kind_of([run(**{"eval.kl_kind": "bound"}), run(**{"eval.kl_kind": "bound"})]) == "bound"
    assert table.kl_kind_of([run(algorithm="best-of-n")]) == "bound"  # from before the tag: always the bound
    assert table.kl_kind_of([run(algorithm="dpo", **{"eval.kl_kind": "exact"})]) == "exact"
    assert table.kl_kind_of([run(**{"eval.kl_kind": "undefined (greedy sampling)"})]) == "undefined (greedy sampling)"
    assert table.kl_kind_of([run(algorithm="dpo")]) is None  # an old run does not say


def test_the_proxy_agreement_line_reads_each_seeds_proxy(workdir):
    import mlflow

    from bench.reports.table import proxy_agreement
    from bench.runs import tracking

    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.create_experiment("agree")
    assert proxy_agreement("agree") == ""  # no comparison yet
    parent = client.create_run(experiment, tags={"compare_role": "parent"}).info.run_id
    for seed, value in ((0, 0.7), (1, 0.75)):
        child = client.create_run(experiment, tags={"seed": str(seed)}).info.run_id
        for key, metric in (("eval/proxy_gold_agreement", value), ("eval/label_gold_agreement", 0.76),
                            ("eval/proxy_gold_agreement_pairs", 289)):
            client.log_metric(child, key, metric)
        client.set_tag(parent, f"stage.rm-proxy.seed{seed}", child)
    assert proxy_agreement("agree") == ""  # the comparison has not finished
    client.set_terminated(parent)
    line = proxy_agreement("agree")
    assert "on 289 held-out test pairs" in line
    assert "seed 0 0.700 (its pairs' labels 0.760), seed 1 0.750" in line


# --- issue 26 item 15: a sweep row joins a comparison's table ---------------------------------------------
SWEEP_PROMPTS = "validation split, 128 prompts, prompt seed 0"


def comparison_and_sweep_row(rng, seeds):
    """A comparison's rows (test prompts, `seeds` seeds) and a sweep's best trial (one seed, validation prompts),
    as `collect_rows` builds them: the sweep row sits in a table of its own."""
    difficulty = rng.normal(0, PROMPT_SD, (1, PROMPTS))

    def outcomes(shift, seeds=seeds):
        return {"judge_policy": judge_scores(rng, difficulty, shift, seeds=seeds),
                "win_rate_vs_chosen": (rng.random((seeds, PROMPTS)) < 0.5 + shift / 4).astype(float),
                "win_rate_vs_ref": (rng.random((seeds, PROMPTS)) < 0.5 + shift / 4).astype(float)}

    rows = [row(name, outcomes(shift), seeds=seeds) for name, shift in ((BASELINE, 0.0), ("dpo", 1.0), ("ipo", 0.6))]
    sweep = row("dpo", outcomes(1.2, seeds=1), seeds=1, prompts=SWEEP_PROMPTS, texts=[f"v{i}" for i in range(PROMPTS)])
    sweep.source = "sweep s best trial 3"
    return rows, sweep


def table_cells(text):
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| algorithm |")]


def test_a_sweep_row_joining_marks_no_second_best_and_changes_no_comparison_row(quiet_markdown):
    rows, sweep = comparison_and_sweep_row(np.random.default_rng(18), seeds=1)
    alone = quiet_markdown(rows)
    joined = quiet_markdown(rows + [sweep])
    cells = table_cells(joined)
    assert [c[0] for c in cells] == [BASELINE, "dpo", "ipo", "dpo (sweep best trial)"]
    assert not [cell for line in cells for cell in line if cell == "best" or "**" in cell]  # no row marked best
    assert cells[:3] == table_cells(alone)  # the comparison's rows, their Δ and p, as before the sweep joined
    # Its CSV says which row is the comparison's best (Δ 0): one row; the sweep's, alone in its table, is best of
    # nothing.
    records = [csv_record(r, {}) for r in rows + [sweep]]
    assert [r["diff_vs_best"] == 0 for r in records].count(True) == 1 and records[-1]["diff_vs_best"] is None
    wins = [r.outcomes["win_rate_vs_chosen"].mean() for r in rows]
    assert records[int(np.argmax(wins))]["diff_vs_best"] == 0


def test_a_one_seed_table_says_nothing_of_several_seeds(quiet_markdown):
    rows, sweep = comparison_and_sweep_row(np.random.default_rng(19), seeds=1)
    text = quiet_markdown(rows + [sweep])
    for several in ("With 3 seeds", "several seeds", "seed values", "few seeds", "with several", "Satterthwaite",
                    "crossed random effects", "lower bounds"):
        assert several.lower() not in text.lower(), several
    assert "Model: the paired t-test over prompts (one seed)." in text
    assert "With one seed the seed variance is not in the interval at all" in text
    # Three seeds beside a one-seed sweep row: each model that ran is described, and the few-seeds caveat is given.
    rows, sweep = comparison_and_sweep_row(np.random.default_rng(20), seeds=3)
    text = quiet_markdown(rows + [sweep])
    assert "Model: with one seed, the paired t-test over prompts; with several, crossed random effects" in text
    assert "With 3 seeds the seed variance is estimated from 3 values" in text


def test_the_runs_line_names_the_seeds_and_mentions_sweeps_only_when_there_are_some(quiet_markdown):
    rows, sweep = comparison_and_sweep_row(np.random.default_rng(21), seeds=3)
    runs = lambda text: next(line for line in text.splitlines() if line.startswith("Runs: "))  # noqa: E731
    seeds = sorted({s for r in rows for s in r.seeds}, key=int)
    assert runs(quiet_markdown(rows)) == f"Runs: `bench compare --recipe x --seeds {','.join(seeds)}` (test prompts)"
    assert runs(quiet_markdown(rows + [sweep])).endswith(
        "(test prompts); sweep rows from `bench sweep` (their best trial, on validation prompts)")
    one_seed, _ = comparison_and_sweep_row(np.random.default_rng(22), seeds=1)
    assert runs(quiet_markdown(one_seed)) == "Runs: `bench compare --recipe x` (test prompts)"
