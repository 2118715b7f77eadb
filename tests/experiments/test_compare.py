"""`bench compare` and `bench table` on the tiny model, the dry run of every recipe, and bad input."""

import csv
import json

import mlflow
import numpy as np
import pytest
import yaml

from bench.cli import main
from bench.evaluation.stats import paired_seed_prompt_bootstrap
from bench.reports.table import published_rows
from bench.runs import recipes, tracking

ALIGNED = [s for s in recipes.load("tiny")[1]["compare"]["stages"] if s != "rm"]  # every aligned algorithm


# tiny's stages already run on the tiny models (the next test trains and evaluates them all): a dry run of it would
# repeat smol-hh's with the same models and stages, for 40 s of the suite.
@pytest.mark.parametrize("recipe", [name for name in recipes.available() if name != "tiny"])
@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_dry_run_builds_and_steps_every_stage_of_every_recipe(workdir, hh_path, capsys, recipe):
    main(["compare", "--recipe", recipe, "--dry-run", "--data-path", hh_path])
    out = capsys.readouterr().out
    _, loaded = recipes.load(recipe)
    stages = loaded["compare"]["stages"]
    ran = [s.rstrip(",") for s in out.split("ran one step each: ")[1].split()]
    expected = [s for s in stages if s not in ("rm",)]
    assert [s for s in ran if not s.startswith(("rm-", "best-of-"))] == expected
    gold_judge = (loaded.get("eval") or {}).get("judge") == "gold"  # the gold model judges: no judge is trained
    assert {"rm-proxy", *([] if gold_judge else ["rm-judge"])} <= set(ran)
    assert [s for s in ran if s.startswith("best-of-")] == (
        [f"best-of-{n}" for n in ([1, 2] if loaded["compare"].get("best_of_n") else [])]
        + (["best-of-2-gold"] if loaded["compare"].get("best_of_n_gold") else []))  # the gold's pick: a ceiling
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()  # a throwaway workspace


def compare_runs(client, experiment_id):
    runs = client.search_runs([experiment_id], "tags.compare_role = 'parent'", order_by=["attributes.start_time DESC"])
    return runs


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_compare_trains_every_stage_on_one_budget_then_reuses_them_and_tables(workdir, hh_path, capsys, monkeypatch):
    main(["compare", "--recipe", "tiny", "--data-path", hh_path])
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tiny")
    parent = compare_runs(client, experiment.experiment_id)[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["compare_stage"] for c in children) == sorted(["rm-proxy", "rm-judge", *ALIGNED])
    stage_runs = {c.data.tags["compare_stage"]: c for c in children}
    # 8 training prompts each: pairs for the paired algorithms, KTO two rows per prompt, prompts for RRHF and the
    # online algorithms.
    examples = {a: stage_runs[a].data.metrics["train/examples"] for a in ALIGNED}
    assert examples == {a: 16 if a == "kto" else 8 for a in ALIGNED} and {"dpo", "rrhf", "ppo", "rloo"} <= set(examples)
    for algorithm in ALIGNED:
        metrics = stage_runs[algorithm].data.metrics
        assert metrics["train/tokens"] > 0 and metrics["train/wall_time_s"] > 0
        assert metrics["train/tokens_per_s"] == pytest.approx(metrics["train/tokens"] / metrics["train/wall_time_s"])
        assert "eval/win_rate_vs_chosen" in metrics
        # Judged by this comparison's judge, on the same test prompts.
        assert client.get_run(stage_runs[algorithm].info.run_id).data.tags["eval.judge.path"] == \
            stage_runs["rm-judge"].data.tags["output_path"]

    at_a_glance_in_the_ui(client, stage_runs)

    # The comparison's figures and its table (with each row's test), on its parent run.
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/win_rates.png", "figures/reward_vs_kl.png", "figures/training_curves.png"}
    logged = json.loads(open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, dst_path=str(workdir / "p"),
                                                                 artifact_path="comparison/table.json")).read())
    cells = dict(zip(logged["columns"], zip(*logged["data"])))
    assert sorted(cells["algorithm"]) == sorted(ALIGNED)
    for algorithm, win_rate in zip(cells["algorithm"], cells["win_rate_vs_chosen"]):
        assert float(win_rate) == pytest.approx(stage_runs[algorithm].data.metrics["eval/win_rate_vs_chosen"])
    assert {"p_holm", "mde", "diff_vs_reference"} <= set(cells)

    main(["compare", "--recipe", "tiny", "--data-path", hh_path])
    again = compare_runs(client, experiment.experiment_id)[0]
    assert again.info.run_id != parent.info.run_id
    for stage in ["rm-proxy", "rm-judge", *ALIGNED]:
        assert again.data.tags[f"stage.{stage}"] == f"{stage_runs[stage].info.run_id} (reused)"
    assert not client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{again.info.run_id}'")

    # The commit is read before the table writes its figures: written first, they would mark it -dirty.
    results = workdir / "results"
    monkeypatch.setattr(tracking, "git_commit", lambda: "after-figures" if any(results.glob("*.png")) else "before")
    main(["table", "--experiment", "tiny", "--output-dir", str(results)])
    with open(workdir / "results" / "tiny.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted(r["algorithm"] for r in rows) == sorted(ALIGNED)
    by_algorithm = {r["algorithm"]: r for r in rows}
    for algorithm in ALIGNED:
        metrics = stage_runs[algorithm].data.metrics
        assert float(by_algorithm[algorithm]["win_rate_vs_chosen"]) == pytest.approx(metrics["eval/win_rate_vs_chosen"])
        assert float(by_algorithm[algorithm]["train_tokens"]) == metrics["train/tokens"]
    best = max(rows, key=lambda r: float(r["win_rate_vs_chosen"]))
    assert float(best["diff_vs_best"]) == 0
    for row in rows:
        assert float(row["diff_vs_best"]) == pytest.approx(float(row["win_rate_vs_chosen"]) - float(best["win_rate_vs_chosen"]))
    markdown = (workdir / "results" / "tiny.md").read_text()
    assert markdown.startswith("# tiny\n\nCommand: `bench table --experiment tiny")
    reevaluation_keeps_the_table(client, stage_runs["dpo"], workdir, capsys)
    assert "Commit: before  " in markdown
    assert "Machine:" in markdown and markdown.count("\n| ") == 1 + len(ALIGNED)  # the header and one row each
    for name in ("win_rates", "reward_vs_kl", "training_curves"):  # embedded, and beside the table
        assert f"(tiny-{name}.png)" in markdown
        assert (workdir / "results" / f"tiny-{name}.png").read_bytes().startswith(b"\x89PNG")


def at_a_glance_in_the_ui(client, stage_runs) -> None:
    """Issue 27: names that say what, seed and budget; the algorithm's key params first among the params (the compare
    view plots the first three that differ); the data each run trained, validated and was evaluated on as datasets."""
    dpo = client.get_run(stage_runs["dpo"].info.run_id)
    steps = dpo.data.params["trainer.max_steps"]  # the comparison's budget
    assert dpo.info.run_name == f"dpo · seed 0 · {steps} steps"
    assert {k: v for k, v in dpo.data.params.items() if k.startswith("algo.")} == {
        "algo.name": "dpo", "algo.seed": "0", "algo.budget": f"{steps} steps",
        "algo.beta": dpo.data.params["model.beta"], "algo.lr": dpo.data.params["model.lr"]}
    assert sorted(dpo.data.params)[0].startswith("algo.")
    rloo = client.get_run(stage_runs["rloo"].info.run_id)
    assert rloo.data.params["algo.num_generations"] == rloo.data.params["model.num_generations"]
    n_eval = recipes.load("tiny")[1]["eval"]["n_prompts"]
    datasets = {}
    for stage in ("dpo", "rloo"):
        run = client.get_run(stage_runs[stage].info.run_id)
        datasets[stage] = {i.tags[0].value: (i.dataset.name, json.loads(i.dataset.profile)["num_rows"], i.dataset.digest)
                           for i in run.inputs.dataset_inputs}
        assert {context: found[:2] for context, found in datasets[stage].items()} == {
            "training": ("hh-rlhf:train", int(run.data.params["data.max_train_pairs"])),
            "validation": ("hh-rlhf:validation", datasets[stage]["validation"][1]), "evaluation": ("hh-rlhf:test", n_eval)}
    # The same test prompts; the online algorithm trains on fewer prompts than DPO's pairs: other data, another digest.
    assert datasets["dpo"]["evaluation"] == datasets["rloo"]["evaluation"]
    assert datasets["dpo"]["training"][2] != datasets["rloo"]["training"][2]


def reevaluation_keeps_the_table(client, dpo_run, workdir, capsys) -> None:
    """Issue 26 item 1: `bench eval` of a comparison's run, with its settings or others, is a run of its own nested
    under it; the comparison's run keeps its one evaluation, and `bench table` reads the same table again."""
    run_id = dpo_run.info.run_id
    before = (workdir / "results" / "tiny.csv").read_text()
    samples = lambda run: len(json.loads(open(mlflow.artifacts.download_artifacts(  # noqa: E731
        run_id=run, artifact_path="eval/samples.json", dst_path=str(workdir / "dl" / run))).read())["data"])
    main(["eval", run_id])
    main(["eval", run_id, "--n-prompts", "4", "--max-new-tokens", "6"])
    run = client.get_run(run_id)
    assert run.data.params == dpo_run.data.params and samples(run_id) == 8
    assert run.data.metrics["eval/win_rate_vs_chosen"] == dpo_run.data.metrics["eval/win_rate_vs_chosen"]
    children = run.data.tags["reevaluated_in"].split(",")
    assert len(children) == 2
    for child, n_prompts in zip(children, (8, 4)):
        child_run = client.get_run(child)
        assert child_run.data.tags["eval_of"] == run_id and child_run.data.tags["mlflow.parentRunId"] == run_id
        assert child_run.info.status == "FINISHED" and child_run.data.params["eval.n_prompts"] == str(n_prompts)
        assert samples(child) == n_prompts
    capsys.readouterr()
    main(["table", "--experiment", "tiny", "--output-dir", str(workdir / "results")])
    assert (workdir / "results" / "tiny.csv").read_text() == before
    assert "Downloading artifacts" not in capsys.readouterr().err  # one bar per run buried the table (item 12)


def paired_bootstrap(a, b):  # one seed: the paired prompt bootstrap
    return paired_seed_prompt_bootstrap(np.atleast_2d(a), np.atleast_2d(b))


def test_paired_bootstrap_of_win_outcomes():
    same = np.array([1.0, 0.0, 0.5, 1.0])
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    better, worse = np.ones(40), np.r_[np.ones(10), np.zeros(30)]
    mean, low, high = paired_bootstrap(worse, better)
    assert mean == pytest.approx(-0.75) and low < mean < high < 0  # significant
    mixed_a, mixed_b = np.tile([1.0, 0.0], 20), np.tile([0.0, 1.0], 20)
    mean, low, high = paired_bootstrap(mixed_a, mixed_b)
    assert mean == 0 and low < 0 < high  # not significant


def test_paper_recipes_carry_their_published_numbers():
    source, rows = published_rows("dpo-hh-pythia28")
    assert "Figure 3" in source
    assert {(r["algorithm"], r["value"]) for r in rows if r.get("compare", True)} == {
        ("dpo", 0.63), ("best_of_128", 0.61), ("sft", 0.37)}
    _, rows = published_rows("kto-archangel")
    assert {r["algorithm"] for r in rows} == {"sft", "dpo", "kto", "ppo"} and len(rows) == 12
    _, rows = published_rows("rrhf-hh")
    assert {r["label"]: r["value"] for r in rows}["Alpaca+RRHF_DP"] == -1.02


@pytest.mark.parametrize("compare_section, message", [
    ({"stages": ["dpo", "dpo2"]}, "compare.stages names ['dpo2'], which is not a stage"),
    ({"stages": ["ppo"]}, "has ppo, which optimise a proxy reward model, but no `rm` stage"),
    ({"stages": ["dpo"], "budget_prompts": 3}, "compare.budget_prompts 3 (3 rows for dpo) is not a multiple of"),
])
def test_a_bad_comparison_is_refused_with_its_reason(workdir, hh_path, capsys, compare_section, message):
    _, recipe = recipes.load("tiny")
    recipe["compare"] = compare_section
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exited:
        main(["compare", "--recipe", str(path), "--data-path", hh_path])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_reused_stage_whose_kl_was_taken_under_bf16_autocast_is_evaluated_again(workdir, monkeypatch):
    # Runs evaluated before eval/kl turned autocast off keep their training and get a fresh evaluation; runs
    # evaluated since are left alone.
    from dataclasses import replace
    from types import SimpleNamespace

    import bench.evaluation.evaluate as evaluation
    from bench.experiments.compare import Comparison

    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.create_experiment("kl-again")
    metrics = {"eval/win_rate_vs_chosen": 0.5, "eval/kl": 0.49}
    old = client.create_run(experiment, tags={"eval.kl_kind": "exact"}).info.run_id
    new = client.create_run(experiment, tags=evaluation.kl_tags(evaluation.Sampling(temperature=1.0))).info.run_id
    for run_id in (old, new):
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
    evaluated = []
    monkeypatch.setattr(evaluation, "resolve_target",
                        lambda run_id, *args: evaluation.Target("policy", "reference", "kl-again", {}, run_id))
    monkeypatch.setattr(evaluation, "evaluate", lambda target, settings: evaluated.append(target) or
                        SimpleNamespace(run_id=target.run_id))
    monkeypatch.setattr("bench.reports.figures.log_win_rates", lambda client, run_id: None)
    comparison = SimpleNamespace(client=client, recipe_name="kl-again", eval_settings=lambda seed, proxy: None)
    for run_id in (old, new):
        Comparison.evaluate(comparison, "dpo", run_id, seed=0, proxy=None)
    assert [(target.run_id, target.again) for target in evaluated] == [(old, True)]
    # made again, the evaluation goes into the training run itself (a table reads it there), not a nested run
    assert evaluation.eval_run(client, evaluated[0]) == (old, False)
    assert evaluation.eval_run(client, replace(evaluated[0], again=False))[0] != old
    assert not evaluation.kl_is_current({"eval.kl_kind": "exact"})
    assert evaluation.kl_is_current({"eval.kl_kind": "undefined (greedy sampling)"})
