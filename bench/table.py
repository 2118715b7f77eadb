"""`bench table --experiment NAME`: results/NAME.md and results/NAME.csv from the experiment's MLflow runs.

Rows come from the newest finished `bench compare` (test prompts) and from every sweep's best trial
(validation prompts). Each row's win rate is compared with the best row's on the same prompts by a
paired bootstrap. The recipe's published numbers, when it has them, are printed beside the measured ones.
"""

import csv
import io
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np

from bench import figures, recipes, tracking
from bench.atomic import write_atomically
from bench.errors import BenchError, ConfigError
from bench.stats import paired_seed_prompt_bootstrap, seed_prompt_bootstrap

RESULTS_DIR = Path("results")
WIN_COLUMNS = ("win_rate_vs_chosen", "win_rate_vs_ref")


@dataclass
class Row:
    """One algorithm (or best-of-N) of one comparison or sweep: its run under each seed, all judged by one
    judge on one set of prompts."""

    algorithm: str
    run_ids: list[str]
    seeds: list[str]
    source: str  # which comparison or sweep the runs belong to
    prompts: str  # which prompts they were evaluated on: rows are compared only within one prompt set
    judge: str  # which judge scored them: rows are compared only within one judge
    metrics: dict  # each metric's mean over the seeds
    outcomes: dict = field(default_factory=dict)  # per-prompt outcomes, (seeds x prompts), by WIN_COLUMNS
    prompt_texts: list = field(default_factory=list)
    intervals: dict = field(default_factory=dict)  # seed-and-prompt bootstrap CI of each win rate
    difference: dict = field(default_factory=dict)  # paired bootstrap against the best row

    @property
    def run_id(self) -> str:
        return ",".join(self.run_ids)


def _run_outcomes(client: mlflow.MlflowClient, run_id: str) -> tuple[dict, list]:
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "eval/samples.json", folder)
        except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise BenchError(f"run {run_id} has no eval/samples.json to compare prompts on: {err}") from err
        table = json.loads(Path(path).read_text())
    columns = table["columns"]
    rows = [dict(zip(columns, values)) for values in table["data"]]
    outcomes = {name: np.array([r[name] for r in rows], dtype=float) for name in WIN_COLUMNS if name in columns}
    return outcomes, [r["prompt"] for r in rows]


def judge_of(run) -> str:
    """The judge a run was evaluated by: its reward-model folder or endpoint and model."""
    tags = run.data.tags
    if tags.get("eval.judge.kind") == "chat_completions":
        return f"{tags.get('eval.judge.model')} at {tags.get('eval.judge.url')}"
    return tags.get("eval.judge.path", "?")


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
              prompts, judges.pop(), metrics)
    per_seed = []
    for run in runs:
        outcomes, texts = _run_outcomes(client, run.info.run_id)
        if row.prompt_texts and texts != row.prompt_texts:
            raise BenchError(f"{source}: the {algorithm} runs of different seeds were evaluated on different prompts")
        row.prompt_texts = texts
        per_seed.append(outcomes)
    row.outcomes = {name: np.stack([o[name] for o in per_seed]) for name in WIN_COLUMNS if all(name in o for o in per_seed)}
    for name, values in row.outcomes.items():
        row.intervals[name] = seed_prompt_bootstrap(values)
    return row


def comparison_stage_runs(client, parent) -> dict[str, list]:
    """{stage: its runs, one per seed, in seed order} of a finished comparison (reward models left out)."""
    by_stage: dict[str, list] = {}
    for tag, value in sorted(parent.data.tags.items()):
        if tag.startswith("stage.") and not tag.startswith("stage.rm") and value.split():
            stage = tag.removeprefix("stage.").split(".seed")[0]
            by_stage.setdefault(stage, []).append(client.get_run(value.split()[0]))
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


def compare_with_best(rows: list[Row]) -> None:
    """Within each judge and prompt set, each row's win rate vs chosen against the best row's, by the paired
    bootstrap over seeds and prompts (rows with the same seeds; a row of other seeds gets no difference)."""
    for group_key in {(r.judge, r.prompts) for r in rows}:
        group = [r for r in rows if (r.judge, r.prompts) == group_key and "win_rate_vs_chosen" in r.outcomes]
        if not group:
            continue
        best = max(group, key=lambda r: r.outcomes["win_rate_vs_chosen"].mean())
        for row in group:
            if row.prompt_texts != best.prompt_texts:
                raise BenchError(f"runs {row.run_id} and {best.run_id} claim the same prompt set ({row.prompts}) "
                                 "but were evaluated on different prompts")
            if row.seeds != best.seeds:
                continue
            mean, low, high = paired_seed_prompt_bootstrap(row.outcomes["win_rate_vs_chosen"],
                                                           best.outcomes["win_rate_vs_chosen"])
            row.difference = {"vs": best.algorithm, "mean": mean, "low": low, "high": high,
                              "significant": row is not best and (high < 0 or low > 0)}


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

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), {memory:.0f} GiB RAM, {device}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


CSV_FIELDS = ["algorithm", "source", "prompts", "judge", "seeds", "run_id", "win_rate_vs_chosen",
              "win_rate_vs_chosen_ci_low", "win_rate_vs_chosen_ci_high", "win_rate_vs_ref", "win_rate_vs_ref_ci_low",
              "win_rate_vs_ref_ci_high", "judge_score", "proxy_score", "kl", "response_len", "train_tokens",
              "train_wall_time_s", "train_tokens_per_s", "diff_vs_best", "diff_ci_low", "diff_ci_high",
              "diff_significant", "best", "published_metric", "published_value"]


def csv_record(row: Row, published: dict[str, dict]) -> dict:
    m = row.metrics
    record = {"algorithm": row.algorithm, "source": row.source, "prompts": row.prompts, "judge": row.judge,
              "seeds": " ".join(row.seeds), "run_id": row.run_id}
    for name in WIN_COLUMNS:
        if name in row.intervals:  # over seeds and prompts
            record[name], record[name + "_ci_low"], record[name + "_ci_high"] = row.intervals[name]
        else:
            for suffix in ("", "_ci_low", "_ci_high"):
                record[name + suffix] = m.get(f"eval/{name}{suffix}")
    record.update(judge_score=m.get("eval/judge_score"), proxy_score=m.get("eval/proxy_score"), kl=m.get("eval/kl"),
                  response_len=m.get("eval/response_len"), train_tokens=m.get("train/tokens"),
                  train_wall_time_s=m.get("train/wall_time_s"), train_tokens_per_s=m.get("train/tokens_per_s"))
    d = row.difference
    record.update(diff_vs_best=d.get("mean"), diff_ci_low=d.get("low"), diff_ci_high=d.get("high"),
                  diff_significant=d.get("significant"), best=d.get("vs"),
                  published_metric=published.get(row.algorithm, {}).get("metric"),
                  published_value=published.get(row.algorithm, {}).get("value"))
    return record


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(experiment: str, records: list[dict], command: str, source: str, published: list[dict]) -> str:
    lines = [f"# {experiment}", "",
             f"Command: `{command}`  ", f"Date: {datetime.now():%Y-%m-%d %H:%M %Z}".rstrip() + "  ",
             f"Machine: {machine()}  ", f"Commit: {tracking.git_commit()}  ",
             f"Runs: `bench compare --recipe {experiment}` (test prompts); sweep rows from `bench sweep` "
             "(their best trial, on validation prompts)", ""]

    def published_cell(r):
        return "–" if r["published_value"] is None else f"{r['published_value']} ({r['published_metric']})"

    judges = list(dict.fromkeys(r["judge"] for r in records))
    for judge in judges:  # one table per judge: rows judged by different judges are never side by side
        group = [r for r in records if r["judge"] == judge]
        lines += [f"Judge: `{judge}`" + (" (one of several judges in this experiment: compare rows within a "
                                           "table only)" if len(judges) > 1 else ""), ""]
        lines += ["| algorithm | seeds | win vs chosen [95% CI] | win vs reference [95% CI] | judge score | proxy score | "
                  "KL | length | train tokens | wall time (s) | tokens/s | Δ win vs best [95% CI] | published |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            def win(name):
                return f"{_fmt(r[name])} [{_fmt(r[name + '_ci_low'])}, {_fmt(r[name + '_ci_high'])}]"
            if r["diff_vs_best"] is None:
                diff = "–"
            elif r["best"] == r["algorithm"] and r["diff_vs_best"] == 0:
                diff = "best"
            else:
                diff = (f"{r['diff_vs_best']:+.3f} [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"
                        + (" *" if r["diff_significant"] else ""))
            label = r["algorithm"] + (" (sweep best trial)" if r["source"].startswith("sweep") else "")
            lines.append(f"| {label} | {len(r['seeds'].split())} | {win('win_rate_vs_chosen')} | {win('win_rate_vs_ref')} | "
                         f"{_fmt(r['judge_score'])} | {_fmt(r['proxy_score'])} | {_fmt(r['kl'], 2)} | "
                         f"{_fmt(r['response_len'], 1)} | {_fmt(r['train_tokens'], 0)} | {_fmt(r['train_wall_time_s'], 0)} | "
                         f"{_fmt(r['train_tokens_per_s'], 1)} | {diff} | {published_cell(r)} |")
        lines.append("")
    prompt_sets = sorted({r["prompts"] for r in records})
    sources = sorted({r["source"] for r in records})
    lines += [f"Rows from: {'; '.join(sources)}. Prompts: {'; '.join(prompt_sets)}.",
              "Win rates are judged by the judge above each table; ties count one half. With several seeds a "
              "row is the mean over its seeds, and its CIs resample seeds, then prompts (10,000 resamples); Δ is "
              "the paired difference in win rate vs chosen against the best row of the same table, resampling "
              "the same seeds and prompts for both; * marks a 95% CI that excludes 0. With 3 seeds the seed "
              "level of the bootstrap is coarse: read the CIs as lower bounds. Judge and proxy scores are on "
              "each reward model's own scale: a policy whose proxy score rises while its judge score does not "
              "is over-optimising the proxy."]
    if published:
        lines += ["", "## Published", "", source, "", "| label | algorithm | model | metric | value | note |",
                  "|---|---|---|---|---|---|"]
        for p in published:
            lines.append(f"| {p.get('label', '')} | {p.get('algorithm', '')} | {p.get('model', '')} | "
                         f"{p.get('metric', '')} | {p.get('value', '')} | {p.get('note', '')} |")
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


def table(experiment: str, command: str, output_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    rows = collect_rows(experiment)
    compare_with_best(rows)
    source, published = published_rows(experiment)
    # A measured row sits beside the published figure for the same algorithm on the recipe's own model.
    by_algorithm = {p["algorithm"]: p for p in published if p.get("compare", True)}
    records = [csv_record(r, by_algorithm) for r in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(records)
    md_path, csv_path = output_dir / f"{experiment}.md", output_dir / f"{experiment}.csv"
    check_not_anothers(md_path, result_owner(command))  # the CSV and PNGs beside it are the same table's
    text = markdown(experiment, records, command, source, published)  # its commit, before the PNGs dirty the tree
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
