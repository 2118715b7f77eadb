"""`bench compare` over several seeds on the tiny model, with best-of-N and scores along training: each stage
under each seed, one judge for all, and `bench table` rows over seeds with seed-and-prompt CIs and the
over-optimisation figure; `bench table` keeps rows of different judges apart."""

import csv

import mlflow
import numpy as np
import pytest
import yaml

from bench.cli import main
from bench.evaluation.best_of_n import best_of_n_kl
from bench.reports.table import markdown
from bench.runs import recipes


@pytest.fixture(scope="module")
def compared(tmp_path_factory, hh_path):
    import os

    workdir = tmp_path_factory.mktemp("seeds")
    previous = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    _, recipe = recipes.load("tiny")
    recipe["compare"] = {"stages": ["rm", "dpo", "ppo"], "seeds": [0, 1], "budget_prompts": 8, "best_of_n": [1, 2],
                         "overoptimisation": {"stages": ["dpo"], "every_n_steps": 1, "n_prompts": 4,
                                              "sampling": {"max_new_tokens": 6, "batch_size": 4}}}
    path = workdir / "seeded.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        main(["compare", "--recipe", str(path), "--data-path", hh_path])
        main(["table", "--experiment", "seeded", "--output-dir", str(workdir / "results")])
        yield workdir, mlflow.MlflowClient()
    finally:
        os.chdir(previous[0])
        if previous[1] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous[1]


@pytest.mark.slow  # its module fixture runs a benchmark/comparison
def test_every_stage_runs_under_every_seed_with_one_judge(compared):
    _, client = compared
    experiment = client.get_experiment_by_name("seeded")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.compare_role = 'parent'")
    stages = {tag.removeprefix("stage."): value for tag, value in parent.data.tags.items() if tag.startswith("stage.")}
    expected = {f"{stage}.seed{seed}" for seed in (0, 1) for stage in ("rm-proxy", "dpo", "ppo", "best-of-1", "best-of-2")}
    assert expected | {"rm-judge.seed0"} == set(stages)  # the first seed's judge judges both
    judge = client.get_run(stages["rm-judge.seed0"]).data.tags["output_path"]
    for stage in ("dpo", "ppo", "best-of-2"):
        runs = [client.get_run(stages[f"{stage}.seed{seed}"]) for seed in (0, 1)]
        assert [r.data.tags["seed"] for r in runs] == ["0", "1"]
        assert {r.data.tags["eval.judge.path"] for r in runs} == {judge}
        assert runs[0].data.tags["eval.proxy"] != runs[1].data.tags["eval.proxy"]  # a proxy per seed
    for seed in (0, 1):
        best = client.get_run(stages[f"best-of-2.seed{seed}"])
        assert best.data.metrics["eval/kl"] == pytest.approx(best_of_n_kl(2))
        dpo = stages[f"dpo.seed{seed}"]
        kl = client.get_metric_history(dpo, "val/overopt/kl")
        gold = client.get_metric_history(dpo, "val/overopt/gold_score")
        assert len(kl) >= 2 and len(gold) == len(kl) and {m.step for m in kl} >= {0}
        assert abs(min(kl, key=lambda m: m.step).value) < 1e-3  # before the first step the policy is the reference


@pytest.mark.slow  # its module fixture runs a benchmark/comparison
def test_table_rows_are_means_over_seeds_with_seed_and_prompt_cis(compared):
    workdir, client = compared
    with open(workdir / "results" / "seeded.csv") as file:
        rows = {r["algorithm"]: r for r in csv.DictReader(file)}
    assert set(rows) == {"dpo", "ppo", "best-of-1", "best-of-2"}
    for name, row in rows.items():
        run_ids = row["run_id"].split(",")
        assert row["seeds"] == "0 1" and len(run_ids) == 2
        values = [client.get_run(r).data.metrics["eval/win_rate_vs_chosen"] for r in run_ids]
        assert float(row["win_rate_vs_chosen"]) == pytest.approx(np.mean(values))
        assert float(row["win_rate_vs_chosen_ci_low"]) <= float(row["win_rate_vs_chosen"]) <= float(row["win_rate_vs_chosen_ci_high"])
    text = (workdir / "results" / "seeded.md").read_text()
    assert "(seeded-overoptimisation.png)" in text and text.count("Judge: `") == 1
    assert (workdir / "results" / "seeded-overoptimisation.png").read_bytes().startswith(b"\x89PNG")


def test_rows_of_different_judges_get_tables_of_their_own():
    def record(algorithm, judge, win):
        return {"algorithm": algorithm, "source": "compare x", "prompts": "test split, 8 prompts, prompt seed 0",
                "judge": judge, "seeds": "0", "run_id": algorithm, "win_rate_vs_chosen": win,
                "win_rate_vs_chosen_ci_low": win - 0.1, "win_rate_vs_chosen_ci_high": win + 0.1, "win_rate_vs_ref": 0.5,
                "win_rate_vs_ref_ci_low": 0.4, "win_rate_vs_ref_ci_high": 0.6, "judge_score": None, "proxy_score": None,
                "kl": None, "response_len": None, "train_tokens": None, "train_wall_time_s": None,
                "train_tokens_per_s": None, "diff_vs_best": None, "diff_ci_low": None, "diff_ci_high": None,
                "diff_significant": None, "best": None, "published_metric": None, "published_value": None}

    text = markdown("x", [record("dpo", "/judges/a", 0.6), record("kto", "/judges/b", 0.7),
                          record("ipo", "/judges/a", 0.5)], "bench table --experiment x", "", [])
    tables = text.split("Judge: `")[1:]
    assert len(tables) == 2 and "one of several judges" in tables[0]
    assert tables[0].startswith("/judges/a") and "| dpo |" in tables[0] and "| ipo |" in tables[0]
    assert "| kto |" not in tables[0] and "| kto |" in tables[1]
