"""`bench table --experiment NAME`: results/NAME.md and results/NAME.csv from the experiment's MLflow runs.

Rows come from the newest finished `bench compare` (test prompts) and from every sweep's best trial
(validation prompts). Within each judge and prompt set, every row is tested against a baseline fixed in
advance, Holm-adjusted across the set's rows (`baseline_tests`): the `best-of-1` row (the reference policy
sampled with the same per-prompt random streams as every trained policy) by the paired difference in mean judge
score over shared seeds and prompts; without it, each row's win rate against the reference's own samples against
0.5. Win rates keep their seed-and-prompt bootstrap CIs as description. The recipe's published numbers, when
it has them, are printed beside the measured ones.
"""

import csv
import io
import json
import os
import platform
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np

import modules
from bench.core.atomic import write_atomically
from bench.core.errors import BenchError, ConfigError
from bench.evaluation.stats import (
    Difference,
    holm,
    minimum_detectable_difference,
    paired_difference,
    seed_prompt_bootstrap,
)
from bench.reports import figures
from bench.runs import recipes, tracking

RESULTS_DIR = Path("results")
WIN_COLUMNS = ("win_rate_vs_chosen", "win_rate_vs_ref")
# Per-prompt columns of eval/samples.json read when present: the judge's (gold's) and the proxy's score of the
# policy's response, its exact KL, and whether the prompt was cut or the response hit max_new_tokens (0/1).
OUTCOME_COLUMNS = (*WIN_COLUMNS, "judge_policy", "proxy_policy", "kl", "prompt_truncated", "response_at_max")
BASELINE = "best-of-1"  # the pre-specified baseline of every table that has it
ALPHA = 0.05  # family-wise error rate of each table's tests
POWER = 0.8  # of the minimum detectable difference
JUDGE_SCORE_TEST = "judge score vs best-of-1"
WIN_VS_REF_TEST = "win vs reference against 0.5"
SEEDS_DIFFER = "seeds differ from the reference's: not tested"
ONE_ROW = "one row: nothing to test"
CEILING = "ceiling: best-of-N picked by the gold reward, not an algorithm"


@dataclass
class RowTest:
    """A row's test against its table's baseline. `difference` is None when the row was not tested (`note` says
    why); the interval, Holm-adjusted p and MDE are filled in once the whole table's p-values are known."""

    test: str  # JUDGE_SCORE_TEST or WIN_VS_REF_TEST
    baseline: str
    difference: Difference | None = None
    note: str = ""
    tests_in_group: int = 0
    level: float | None = None  # confidence level of the interval, at which it agrees with Holm's decision
    low: float | None = None
    high: float | None = None
    p_holm: float | None = None
    significant: bool | None = None
    mde: float | None = None


@dataclass
class Row:
    """One algorithm (or best-of-N) of one comparison or sweep: its run under each seed, all judged by one
    judge on one set of prompts."""

    algorithm: str  # the comparison stage's name (an arm such as dpo-beta0.1), or a sweep's algorithm
    run_ids: list[str]
    seeds: list[str]
    source: str  # which comparison or sweep the runs belong to
    prompts: str  # which prompts they were evaluated on: rows are compared only within one prompt set
    judge: str  # which judge scored them: rows are compared only within one judge
    metrics: dict  # each metric's mean over the seeds
    outcomes: dict = field(default_factory=dict)  # per-prompt outcomes, (seeds x prompts), by OUTCOME_COLUMNS
    prompt_texts: list = field(default_factory=list)
    intervals: dict = field(default_factory=dict)  # seed-and-prompt bootstrap CI of each win rate
    kl_kind: str | None = None  # what eval/kl is: exact, bound (best-of-N's analytic bound), ... (None: not said)
    test: RowTest | None = None  # against the table's baseline (`baseline_tests`)
    vs_best: float | None = None  # win rate vs chosen minus the table's best row's: description, never tested

    @property
    def run_id(self) -> str:
        return ",".join(self.run_ids)


def _run_outcomes(client: mlflow.MlflowClient, run_id: str) -> tuple[dict, list]:
    # One small file per run: MLflow's download bar for each (11 in a comparison) would bury the table's output.
    no_bars = mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    with tempfile.TemporaryDirectory() as folder, no_bars:
        try:
            path = client.download_artifacts(run_id, "eval/samples.json", folder)
        except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise BenchError(f"run {run_id} has no eval/samples.json to compare prompts on: {err}") from err
        table = json.loads(Path(path).read_text())
    columns = table["columns"]
    rows = [dict(zip(columns, values)) for values in table["data"]]
    outcomes = {name: np.array([r[name] for r in rows], dtype=float) for name in OUTCOME_COLUMNS if name in columns}
    return outcomes, [r["prompt"] for r in rows]


def judge_of(run) -> str:
    """The judge a run was evaluated by: its reward-model folder or endpoint and model."""
    tags = run.data.tags
    if tags.get("eval.judge.kind") == "chat_completions":
        return f"{tags.get('eval.judge.model')} at {tags.get('eval.judge.url')}"
    return tags.get("eval.judge.path", "?")


def kl_kind_of(runs: list) -> str | None:
    """What the runs' eval/kl is, by their `eval.kl_kind` tags: `bound` (best-of-N's analytic bound
    log N - (N-1)/N) if any run's is; runs from before the tag that are best-of-N (tag `algorithm` best-of-n)
    always logged the bound; other runs from before it say nothing (None)."""
    kinds = {run.data.tags.get("eval.kl_kind", "bound" if run.data.tags.get("algorithm") == "best-of-n" else None)
             for run in runs}
    if "bound" in kinds:
        return "bound"
    kinds.discard(None)
    return ", ".join(sorted(kinds)) or None


def _row(client, runs: list, algorithm: str, source: str) -> Row:
    """A row from the runs of one algorithm, one per seed, which must share their prompts and judge."""
    first = runs[0]
    params = first.data.params
    prompt_seed = params.get("eval.prompt_seed", params.get("eval.sampling.seed"))
    prompts = f"{params.get('eval.split', 'test')} split, {params.get('eval.n_prompts')} prompts, prompt seed {prompt_seed}"
    judges = {judge_of(run) for run in runs}
    if len(judges) > 1:
        raise BenchError(f"{source}: the {algorithm} runs were judged by different judges ({sorted(judges)})")
    metric_names = set.intersection(*(set(run.data.metrics) for run in runs))
    metrics = {name: float(np.mean([run.data.metrics[name] for run in runs])) for name in metric_names}
    row = Row(algorithm, [run.info.run_id for run in runs], [run.data.tags.get("seed", "?") for run in runs], source,
              prompts, judges.pop(), metrics, kl_kind=kl_kind_of(runs))
    per_seed = []
    for run in runs:
        outcomes, texts = _run_outcomes(client, run.info.run_id)
        if row.prompt_texts and texts != row.prompt_texts:
            raise BenchError(f"{source}: the {algorithm} runs of different seeds were evaluated on different prompts")
        row.prompt_texts = texts
        per_seed.append(outcomes)
    row.outcomes = {name: np.stack([o[name] for o in per_seed]) for name in OUTCOME_COLUMNS
                    if all(name in o for o in per_seed)}
    for name in WIN_COLUMNS:
        if name in row.outcomes:
            row.intervals[name] = seed_prompt_bootstrap(row.outcomes[name])
    return row


def stage_of(key: str) -> str:
    """The stage of a parent run's stage key, `<stage>` or `<stage>.seed<S>`: stage names may hold dots and
    dashes (dpo-beta0.1), so only a last `.seed<digits>` is a seed."""
    stage, found, seed = key.rpartition(".seed")
    return stage if found and seed.isdigit() else key


def comparison_stage_runs(client, parent) -> dict[str, list]:
    """{stage: its runs, one per seed, in seed order} of a finished comparison (reward models left out)."""
    by_stage: dict[str, list] = {}
    for tag, value in sorted(parent.data.tags.items()):
        if not tag.startswith("stage.") or not value.split():
            continue
        run = client.get_run(value.split()[0])
        algorithm = run.data.tags.get("algorithm")
        if algorithm not in modules.registry() or modules.trains_policy(algorithm):  # not the reward models
            by_stage.setdefault(stage_of(tag.removeprefix("stage.")), []).append(run)
    for runs in by_stage.values():
        runs.sort(key=lambda run: int(run.data.tags.get("seed", "0") or 0))
    return by_stage


def collect_rows(experiment: str) -> list[Row]:
    client = mlflow.MlflowClient(tracking.tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise BenchError(f"no MLflow experiment {experiment!r} in {tracking.tracking_uri()}")
    ids = [found.experiment_id]
    rows = []
    comparisons = client.search_runs(ids, "tags.compare_role = 'parent' and attributes.status = 'FINISHED'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    for parent in comparisons:
        for stage, runs in comparison_stage_runs(client, parent).items():
            rows.append(_row(client, runs, stage, f"compare {parent.info.run_name}"))
    for study in client.search_runs(ids, "tags.sweep_role = 'study'", order_by=["attributes.start_time DESC"]):
        best = study.data.tags.get("best_run_id")
        if best:
            run = client.get_run(best)
            rows.append(_row(client, [run], run.data.tags.get("algorithm", "?"),
                             f"sweep {study.data.tags['optuna.study']} best trial {study.data.tags.get('best_trial')}"))
    if not rows:
        raise BenchError(f"experiment {experiment!r} has no finished `bench compare` and no sweep with a best trial")
    return rows


def proxy_agreement(experiment: str) -> str:
    """A line on how often each seed's proxy orders the held-out pairs as the gold does (`bench compare` logs it
    in a gold world), or "" when the newest finished comparison has no such measurement."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    found = client.get_experiment_by_name(experiment)
    parents = client.search_runs([found.experiment_id], "tags.compare_role = 'parent' and attributes.status = "
                                 "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    measured = []
    for tag, value in sorted(parents[0].data.tags.items()) if parents else []:
        if tag.startswith(f"stage.{modules.reward_model_name()}-proxy") and value.split():
            run = client.get_run(value.split()[0])
            if "eval/proxy_gold_agreement" in run.data.metrics:
                measured.append((run.data.tags.get("seed", "?"), run.data.metrics))
    if not measured:
        return ""
    cells = ", ".join(f"seed {seed} {m['eval/proxy_gold_agreement']:.3f} (its pairs' labels "
                      f"{m['eval/label_gold_agreement']:.3f})" for seed, m in measured)
    pairs = int(measured[0][1]["eval/proxy_gold_agreement_pairs"])
    return (f"Proxy against the gold: on {pairs} held-out test pairs that the gold does not score equal, the share "
            f"that the proxy orders as the gold does: {cells}.")


def is_ceiling(name: str) -> bool:
    """best-of-N-gold: best-of-N picked by the gold reward, an upper reference point, not an algorithm."""
    return re.fullmatch(r"best-of-\d+-gold", name) is not None


def _groups(rows: list[Row]) -> list[list[Row]]:
    """The rows by (judge, prompt set), in first-seen order: only rows of one group are ever compared."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.judge, row.prompts), []).append(row)
    return list(groups.values())


def _check_same_prompts(group: list[Row]) -> None:
    first = group[0]
    for row in group[1:]:
        if row.prompt_texts != first.prompt_texts:
            raise BenchError(f"runs {row.run_id} and {first.run_id} claim the same prompt set ({row.prompts}) "
                             "but were evaluated on different prompts")


def _paired(row: Row, a, b, against: str) -> Difference:
    try:
        return paired_difference(a, b)
    except ValueError as err:  # same prompt texts and seeds, yet other shapes: the runs' tables disagree
        raise BenchError(f"{row.algorithm} ({row.run_id}) cannot be paired with {against}: {err}") from err


def _judge_score_test(row: Row, baseline: Row) -> RowTest:
    """The row's mean judge score minus the baseline's, on the same seeds and prompts."""
    test = RowTest(JUDGE_SCORE_TEST, baseline.algorithm, note=CEILING if is_ceiling(row.algorithm) else "")
    if row is baseline:
        test.note = "the reference: the baseline of this table's tests"
    elif row.seeds != baseline.seeds:
        test.note = SEEDS_DIFFER  # pairing other seeds would silently mix seed effects into the difference
    elif "judge_policy" not in row.outcomes:
        test.note = "no per-prompt judge scores: not tested"
    else:
        test.difference = _paired(row, row.outcomes["judge_policy"], baseline.outcomes["judge_policy"], BASELINE)
    return test


def _win_vs_ref_test(row: Row) -> RowTest:
    """The row's per-prompt win rate against the reference's own samples, against 0.5 (a fixed baseline: the
    reference compared with itself wins half the time)."""
    test = RowTest(WIN_VS_REF_TEST, "reference samples (0.5)", note=CEILING if is_ceiling(row.algorithm) else "")
    if "win_rate_vs_ref" not in row.outcomes:
        test.note = "no per-prompt win rates vs reference: not tested"
    else:
        outcomes = row.outcomes["win_rate_vs_ref"]
        test.difference = _paired(row, outcomes, np.full_like(outcomes, 0.5), "0.5")
    return test


def _adjust(tests: list[RowTest], alpha: float) -> None:
    """Holm across the group's tested rows: each tested row's adjusted p, its interval at the level where it
    agrees with Holm, its mark, and its MDE at Holm's worst-case level alpha / m."""
    tested = [t for t in tests if t.difference is not None]
    for test in tests:
        test.tests_in_group = len(tested)
    if not tested:
        return
    result = holm([t.difference.p for t in tested], alpha)
    for test, p_holm, level in zip(tested, result.adjusted, result.levels):
        test.level, test.p_holm, test.significant = float(level), float(p_holm), bool(p_holm < alpha)
        test.low, test.high = test.difference.interval(level)
        test.mde = minimum_detectable_difference(test.difference.se, test.difference.df, alpha / len(tested), POWER)


def _describe_vs_best(group: list[Row]) -> None:
    """Win rate vs chosen minus the group's best row's: a description only, with no interval and no mark. A row
    alone in its table (a sweep's best trial, on its own prompts) is best of nothing: it gets none, or every
    sweep that joins would add a second row at 0, "best", beside the comparison's."""
    scored = [r for r in group if "win_rate_vs_chosen" in r.outcomes]
    if len(scored) > 1:
        best = max(r.outcomes["win_rate_vs_chosen"].mean() for r in scored)
        for row in scored:
            row.vs_best = float(row.outcomes["win_rate_vs_chosen"].mean() - best)


def baseline_tests(rows: list[Row], alpha: float = ALPHA) -> None:
    """Test every row against its (judge, prompt set) group's baseline, fixed in advance, and Holm-adjust
    within the group; sets each row's `test`. The baseline is the `best-of-1` row when the group has one and
    it has per-prompt judge scores (the statistic is then the paired difference in mean judge score); else
    each row's win rate vs the reference's own samples is tested against 0.5. A row of other seeds than the
    baseline's is not tested (its note says so)."""
    for group in _groups(rows):
        _check_same_prompts(group)
        _describe_vs_best(group)
        baseline = next((r for r in group if r.algorithm == BASELINE), None)
        if baseline is not None and "judge_policy" in baseline.outcomes:
            tests = [_judge_score_test(row, baseline) for row in group]
        else:
            tests = [_win_vs_ref_test(row) for row in group]
        _adjust(tests, alpha)
        for row, test in zip(group, tests):
            row.test = test


def published_rows(experiment: str) -> tuple[str, list[dict]]:
    """The recipe's `published:` section, when the experiment is named after a recipe."""
    try:
        _, recipe = recipes.load(experiment)
    except ConfigError:
        return "", []
    published = recipe.get("published") or {}
    return published.get("source", ""), list(published.get("rows") or [])


def machine() -> str:
    import torch

    from bench.core.precision import cpu_description

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}; {cpu_description()}), {memory:.0f} GiB RAM, {device}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


CSV_FIELDS = ["algorithm", "source", "prompts", "judge", "seeds", "run_id", "win_rate_vs_chosen",
              "win_rate_vs_chosen_ci_low", "win_rate_vs_chosen_ci_high", "win_rate_vs_ref", "win_rate_vs_ref_ci_low",
              "win_rate_vs_ref_ci_high", "judge_score", "proxy_score", "kl", "kl_kind", "response_len",
              "prompts_truncated", "completions_clipped", "train_tokens", "train_wall_time_s", "train_tokens_per_s",
              "test", "baseline", "diff_vs_reference", "diff_se", "diff_df", "diff_ci_low", "diff_ci_high",
              "diff_ci_level", "p", "p_holm", "significant", "mde", "tests_in_group", "test_note", "diff_vs_best",
              "published_metric", "published_value"]


def _metric_or_mean(row: Row, metric: str, column: str) -> float | None:
    """The run metric, else the mean of its per-prompt column (older runs log neither)."""
    if metric in row.metrics:
        return row.metrics[metric]
    return float(row.outcomes[column].mean()) if column in row.outcomes else None


def _test_fields(test: RowTest | None) -> dict:
    if test is None:
        return {}
    d = test.difference
    return {"test": test.test, "baseline": test.baseline, "diff_vs_reference": d and d.mean, "diff_se": d and d.se,
            "diff_df": d and d.df, "diff_ci_low": test.low, "diff_ci_high": test.high, "diff_ci_level": test.level,
            "p": d and d.p, "p_holm": test.p_holm, "significant": test.significant, "mde": test.mde,
            "tests_in_group": test.tests_in_group, "test_note": test.note or None}


def csv_record(row: Row, published: dict[str, dict]) -> dict:
    m = row.metrics
    record = dict.fromkeys(CSV_FIELDS)
    record.update(algorithm=row.algorithm, source=row.source, prompts=row.prompts, judge=row.judge,
                  seeds=" ".join(row.seeds), run_id=row.run_id)
    for name in WIN_COLUMNS:
        if name in row.intervals:  # over seeds and prompts
            record[name], record[name + "_ci_low"], record[name + "_ci_high"] = row.intervals[name]
        else:
            for suffix in ("", "_ci_low", "_ci_high"):
                record[name + suffix] = m.get(f"eval/{name}{suffix}")
    kl = _metric_or_mean(row, "eval/kl", "kl")
    record.update(judge_score=_metric_or_mean(row, "eval/judge_score", "judge_policy"),
                  proxy_score=_metric_or_mean(row, "eval/proxy_score", "proxy_policy"), kl=kl,
                  kl_kind=None if kl is None else row.kl_kind if "eval/kl" in m else "exact",
                  response_len=m.get("eval/response_len"),
                  prompts_truncated=_metric_or_mean(row, "eval/prompts/truncated_ratio", "prompt_truncated"),
                  completions_clipped=_metric_or_mean(row, "eval/completions/clipped_ratio", "response_at_max"),
                  train_tokens=m.get("train/tokens"), train_wall_time_s=m.get("train/wall_time_s"),
                  train_tokens_per_s=m.get("train/tokens_per_s"), diff_vs_best=row.vs_best,
                  published_metric=published.get(row.algorithm, {}).get("metric"),
                  published_value=published.get(row.algorithm, {}).get("value"))
    record.update(_test_fields(row.test))
    return record


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fmt_p(value) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


TABLE_COLUMNS = ["algorithm", "seeds", "win vs chosen [95% CI]", "win vs reference [95% CI]", "judge score",
                 "Δ vs reference [CI at Holm level]", "p (Holm)", "MDE", "proxy score", "KL", "length", "prompts cut",
                 "responses at max", "train tokens", "wall time (s)", "tokens/s", "published"]


def _diff_cell(r: dict) -> str:
    """Δ against the table's baseline with its interval at the Holm level, * when Holm rejects; or why not."""
    note = r.get("test_note") or ""
    if r.get("diff_vs_reference") is None:
        return "reference" if note.startswith("the reference") else (note or "–")
    level = f"{100 * r['diff_ci_level']:.2f} %"
    return (f"{r['diff_vs_reference']:+.3f} [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}] ({level})"
            + (" *" if r.get("significant") else ""))


def _row_cells(r: dict) -> list[str]:
    def win(name):
        return f"{_fmt(r[name])} [{_fmt(r[name + '_ci_low'])}, {_fmt(r[name + '_ci_high'])}]"

    label = r["algorithm"] + (" (sweep best trial)" if r["source"].startswith("sweep") else "")
    label += " (ceiling)" if is_ceiling(r["algorithm"]) else ""
    kl = _fmt(r.get("kl"), 2)
    kl = f"≤ {kl}" if r.get("kl_kind") == "bound" and r.get("kl") is not None else kl
    published = "–" if r["published_value"] is None else f"{r['published_value']} ({r['published_metric']})"
    return [label, str(len(r["seeds"].split())), win("win_rate_vs_chosen"), win("win_rate_vs_ref"),
            _fmt(r["judge_score"]), _diff_cell(r), _fmt_p(r.get("p_holm")), _fmt(r.get("mde")), _fmt(r["proxy_score"]),
            kl, _fmt(r["response_len"], 1), _fmt(r.get("prompts_truncated")), _fmt(r.get("completions_clipped")),
            _fmt(r["train_tokens"], 0), _fmt(r["train_wall_time_s"], 0), _fmt(r["train_tokens_per_s"], 1), published]


def _test_summary(group: list[dict]) -> list[str]:
    """The lines below a table: which test ran over how many rows and the smallest difference it can detect,
    or why nothing was tested."""
    tested = [r for r in group if r.get("p") is not None]
    if not tested:
        return [ONE_ROW if len(group) == 1 else "no row tested: each row's Δ cell says why"]
    m = len(tested)
    if tested[0]["test"] == JUDGE_SCORE_TEST:
        what = f"Δ = mean judge score minus `{BASELINE}`'s on the same seeds and prompts"
    else:
        what = f"Δ = win rate vs the reference's own samples minus 0.5 (no `{BASELINE}` row with judge scores here)"
    mde = statistics.median(r["mde"] for r in tested)
    return [f"Test: {what}; Holm over {m} row{'s' * (m > 1)}; * = Holm-adjusted p < {ALPHA}.  ",
            f"smallest difference this table can detect at {100 * POWER:.0f} % power: {mde:.3g} (median over its "
            f"rows, Holm worst case alpha/m = {ALPHA}/{m} = {ALPHA / m:.3g})"]


def _table(group: list[dict], several_judges: bool) -> list[str]:
    judge, prompts = group[0]["judge"], group[0]["prompts"]
    lines = [f"Judge: `{judge}`" + (" (one of several judges in this experiment: compare rows within a table only)"
                                    if several_judges else "") + "  ", f"Prompts: {prompts}", ""]
    lines += ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in group]
    return lines + [""] + _test_summary(group) + [""]


def _description(records: list[dict]) -> str:
    """What the descriptive columns are."""
    most_seeds = max(len(r["seeds"].split()) for r in records)
    if most_seeds > 1:
        cis = ("With several seeds a row is the mean over its seeds, and its win-rate CIs resample seeds, then "
               f"prompts (10,000 resamples); that resampling sees only {most_seeds} seed values or fewer, so these "
               "CIs understate the seed variance: they describe, the tests below decide.")
    else:
        cis = "Win-rate CIs resample prompts (10,000 resamples): they describe, the tests below decide."
    return ("Win rates are judged by the judge above each table; ties count one half. " + cis + " Judge and "
            "proxy scores are on each reward model's own scale: a policy whose proxy score rises while its judge "
            "score does not is over-optimising the proxy. KL is the runs' eval/kl (in current runs the exact KL to "
            "the reference at the sampling temperature); \"≤\" marks best-of-N's analytic bound log N - (N-1)/N. "
            "Prompts cut: the share of prompts truncated to fit; responses at max: the share of responses that hit "
            "max_new_tokens.")


def _tests_explained(records: list[dict]) -> str:
    """What was tested, how, and what the result cannot show."""
    tested = [r for r in records if r.get("p") is not None]
    if not tested:
        return "No row was tested: no table had a baseline and a row to test against it."
    kinds = {r["test"] for r in tested}
    parts = ["Tests."]
    if JUDGE_SCORE_TEST in kinds:
        parts.append(f"Baseline, fixed before any run: the `{BASELINE}` row, the reference policy sampled with the "
                     "same per-prompt random streams as every trained policy. Statistic: D = the row's judge (gold) "
                     "score minus the baseline's, per seed and prompt; Δ is its mean. Every other row with the "
                     "baseline's seeds is tested.")
    if WIN_VS_REF_TEST in kinds:
        parts.append(f"In tables without a `{BASELINE}` row with judge scores, the baseline is the reference "
                     "policy's own samples: D = the row's per-prompt win against them (ties ½) minus 0.5, what the "
                     "reference scores against itself; every row is tested.")
    parts += [_method(tested), _limits(tested)]
    return " ".join(parts)


def _method(tested: list[dict]) -> str:
    """The model, the multiplicity correction and the MDE, in words."""
    counts = " or ".join(map(str, sorted({r["tests_in_group"] for r in tested})))
    ceiling = (" (best-of-N-gold rows are tested but are a ceiling, not an algorithm)"
               if any(is_ceiling(r["algorithm"]) for r in tested) else "")
    return (_model(tested) + f" Holm's step-down procedure over the {counts} rows "
            f"tested in each table{ceiling} keeps the chance of any false * at 5 %: * marks a Holm-adjusted "
            "p < 0.05, and each Δ's CI is drawn at the level beside it, at which it excludes 0 exactly when Holm "
            "rejects. MDE: the smallest true Δ a row's test detects with 80 % power at Holm's worst-case level "
            "0.05 / m, from the row's own standard error and degrees of freedom.")


def _model(tested: list[dict]) -> str:
    """The model of the tests that ran, only: a one-seed table says nothing of seeds it does not have."""
    seeds = {len(r["seeds"].split()) > 1 for r in tested}
    one = "the paired t-test over prompts"
    several = ("crossed random effects D[s, p] = μ + seed_s + prompt_p + e, whose mean has variance "
               "(MS_seed + MS_prompt - MS_resid) / (S P), with Satterthwaite degrees of freedom computed at the seed "
               "mean square's 95 % upper confidence bound (few seeds cannot claim many degrees of freedom)")
    if seeds == {False}:
        return f"Model: {one} (one seed)."
    if seeds == {True}:
        return f"Model: {several}."
    return f"Model: with one seed, {one}; with several, {several}."


def _limits(tested: list[dict]) -> str:
    seeds = sorted({len(r["seeds"].split()) for r in tested})
    text = ("What this cannot show: a row without * is not shown to equal the baseline (its MDE says how large a "
            "difference could have gone unseen); rows are not tested against each other; the result holds for this "
            "judge and for prompts drawn like these.")
    if seeds[-1] > 1:
        text += f" With {seeds[-1]} seeds the seed variance is estimated from {seeds[-1]} values"
    if 1 < seeds[-1] <= 5:  # few seeds: the seed term's S - 1 degrees of freedom rule the test
        text += (": the degrees of freedom stay near S - 1 whatever the data, so intervals are wide and small "
                 "differences go unseen; and at so few degrees of freedom the MDE, a normal-style formula, is "
                 "optimistic (in simulation with 3 seeds a true Δ of one MDE was found about 60 % of the time, of "
                 "two MDEs 97 %)")
    text += "." if seeds[-1] > 1 else ""
    if seeds[0] == 1:
        text += " With one seed the seed variance is not in the interval at all: it speaks for that seed only."
    return text


def _published(source: str, published: list[dict]) -> list[str]:
    lines = ["", "## Published", "", source, "", "| label | algorithm | model | metric | value | note |",
             "|---|---|---|---|---|---|"]
    for p in published:
        lines.append(f"| {p.get('label', '')} | {p.get('algorithm', '')} | {p.get('model', '')} | "
                     f"{p.get('metric', '')} | {p.get('value', '')} | {p.get('note', '')} |")
    return lines


def runs_line(experiment: str, records: list[dict]) -> str:
    """The commands whose runs the table holds: the comparison (with its seeds, when several) and any sweeps."""
    compared = [r for r in records if not r["source"].startswith("sweep")]
    seeds = sorted({s for r in compared for s in r["seeds"].split()}, key=lambda seed: (len(seed), seed))
    parts = [f"`bench compare --recipe {experiment}" + (f" --seeds {','.join(seeds)}" if len(seeds) > 1 else "")
             + "` (test prompts)"] if compared else []
    if len(compared) < len(records):
        parts.append("sweep rows from `bench sweep` (their best trial, on validation prompts)")
    return "Runs: " + "; ".join(parts)


def markdown(experiment: str, records: list[dict], command: str, source: str, published: list[dict]) -> str:
    lines = [f"# {experiment}", "",
             f"Command: `{command}`  ", f"Date: {datetime.now():%Y-%m-%d %H:%M %Z}".rstrip() + "  ",
             f"Machine: {machine()}  ", f"Commit: {tracking.git_commit()}  ",
             runs_line(experiment, records), ""]
    several_judges = len({r["judge"] for r in records}) > 1
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:  # one table per judge and prompt set: rows judged by different judges are never side by side
        groups.setdefault((r["judge"], r["prompts"]), []).append(r)
    for group in groups.values():
        lines += _table(group, several_judges)
    prompt_sets = sorted({r["prompts"] for r in records})
    sources = sorted({r["source"] for r in records})
    lines += [f"Rows from: {'; '.join(sources)}. Prompts: {'; '.join(prompt_sets)}.", "", _description(records), "",
              _tests_explained(records)]
    if published:
        lines += _published(source, published)
    return "\n".join(lines) + "\n"


def result_owner(command: str) -> str:
    """What a results file is the output of: `bench table` of one experiment, or `bench perf`."""
    found = re.search(r"--experiment[ =](\S+)", command)
    return f"bench table --experiment {found.group(1)}" if command.startswith("bench table") and found else \
        " ".join(command.split()[:2])


def check_not_anothers(path: Path, owner: str) -> None:
    """Refuse to replace a results file that another experiment's table (or another command) wrote; each
    writes its `Command:` line, which says whose it is."""
    if not path.exists():
        return
    found = re.search(r"^Command: `([^`]*)`", path.read_text(errors="replace"), re.MULTILINE)
    if found is None:
        raise BenchError(f"{path} exists and has no `Command:` line: bench did not write it; not overwriting it")
    if result_owner(found.group(1)) != owner:
        raise BenchError(f"{path} holds the output of `{found.group(1)}`; not overwriting it with `{owner}`'s: "
                         "choose another output path")


def check_not_users(md_path: Path, beside: list[Path]) -> None:
    """The CSV and figures beside a table are bench's only when its Markdown (with its `Command:` line) is
    there too; without it, a file of that name is the user's."""
    if md_path.exists():
        return
    for path in beside:
        if path.exists():
            raise BenchError(f"{path} exists but {md_path.name} does not: bench did not write it; not overwriting it "
                             "(move it, or choose another --output-dir)")


def write_result(path: Path, text: str, command: str) -> None:
    check_not_anothers(path, result_owner(command))
    write_atomically(path, text)


def figure_runs(client: mlflow.MlflowClient, experiment: str, rows: list[Row]) -> list[str]:
    """The table's runs, then every trial of the experiment's sweeps (the reward-vs-KL view plots them all)."""
    run_ids = [run_id for r in rows for run_id in r.run_ids]
    found = client.get_experiment_by_name(experiment)
    for study in client.search_runs([found.experiment_id], "tags.sweep_role = 'study'"):
        run_ids += figures.sweep_run_ids(client, study.info.run_id)
    return run_ids


def tested_records(experiment: str) -> tuple[list[Row], list[dict], str, list[dict]]:
    """(rows, their records with each row's test, the published source, its numbers): what every form of the
    table (`bench table`'s files, the comparison's parent run) is made of."""
    rows = collect_rows(experiment)
    baseline_tests(rows)
    source, published = published_rows(experiment)
    # A measured row sits beside the published figure for the same algorithm on the recipe's own model.
    by_algorithm = {p["algorithm"]: p for p in published if p.get("compare", True)}
    return rows, [csv_record(r, by_algorithm) for r in rows], source, published


def table_text(experiment: str, records: list[dict], command: str, source: str, published: list[dict]) -> str:
    text = markdown(experiment, records, command, source, published)  # its commit, before the PNGs dirty the tree
    agreement = proxy_agreement(experiment)
    return text + (f"\n{agreement}\n" if agreement else "")


def table(experiment: str, command: str, output_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    md_path, csv_path = output_dir / f"{experiment}.md", output_dir / f"{experiment}.csv"
    check_not_anothers(md_path, result_owner(command))  # the CSV and PNGs beside it are the same table's
    check_not_users(md_path, [csv_path, *(output_dir / f"{experiment}-{name}.png" for name in figures.CAPTIONS)])
    rows, records, source, published = tested_records(experiment)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(records)
    text = table_text(experiment, records, command, source, published)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    plotted = figures.make_figures(figures.collect_runs(client, figure_runs(client, experiment, rows)))
    try:
        images = figures.save_pngs(plotted, output_dir, experiment)
    finally:
        figures.close_figures(plotted)
    text += "\n## Figures\n\n" + figures.markdown_images(images) + "\n"
    write_atomically(csv_path, buffer.getvalue())
    write_atomically(md_path, text)
    return md_path, csv_path


def log_to_parent_run(client: mlflow.MlflowClient, run_id: str, experiment: str) -> None:
    """The comparison's table on its MLflow parent run, as `bench table` would write it now: an MLflow table
    (`comparison/table.json`, shown as a table in the UI, one row per algorithm with its test and MDE) and the
    Markdown (`comparison/table.md`); the figures are the run's `figures/`."""
    _, records, source, published = tested_records(experiment)
    client.log_table(run_id, data={field: [r[field] for r in records] for field in CSV_FIELDS},
                     artifact_file="comparison/table.json")
    text = table_text(experiment, records, f"bench table --experiment {experiment}", source, published)
    client.log_text(run_id, text, "comparison/table.md")
