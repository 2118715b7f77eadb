"""`bench data` and `bench train` end to end on the tiny recipe, with MLflow on sqlite."""

import json

import mlflow
import pytest

from bench.cli import main


def run_bench(*argv):
    main(list(argv))


def only_run(experiment):
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_bench_data_json(hh_path, capsys):
    run_bench("data", hh_path, "--tokenizer", "tiny", "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["pairs_read"] == 2312
    assert report["dropped"] == {"empty_response": 4, "mismatched_prompt": 5}
    assert report["kept"] == 2303
    assert sum(report["splits"].values()) == 2303
    prompt = report["tokens"]["percentiles"]["prompt"]
    assert 0 < prompt["p50"] <= prompt["p90"] <= prompt["p99"] <= prompt["p100"]


def test_bench_data_table(hh_path, capsys):
    run_bench("data", hh_path, "--tokenizer", "tiny")
    out = capsys.readouterr().out
    assert "pairs read    2,312" in out and "4  (empty_response)" in out and "kept          2,303" in out


@pytest.mark.parametrize(
    "algorithm, own_metric",
    [("sft", "train/logps/chosen"), ("dpo", "train/rewards/margins"), ("ipo", "train/rewards/margins"),
     ("kto", "train/kl")],
)
def test_train_logs_a_complete_mlflow_run(workdir, hh_path, algorithm, own_metric):
    run_bench("train", algorithm, "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=3",
              "--trainer.val_check_interval=3")
    client, run = only_run("tiny")
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["algorithm"] == algorithm and tags["model"] == "tiny" and tags["seed"] == "0"
    assert tags["data_source"] == hh_path and tags["git_commit"]
    assert "no finished judge reward model in experiment 'tiny'" in tags["eval_skipped"]
    params = run.data.params
    assert params["trainer.max_steps"] == "3" and params["model.policy"] == "tiny"
    assert params["data.view"] == {"sft": "sft", "kto": "unpaired"}.get(algorithm, "paired")
    assert params["data.tokenizer"] == "tiny"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert own_metric in run.data.metrics and "val/loss" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert (workdir / "runs" / "tiny").exists()
    output_dir = tags["output_path"]
    assert output_dir.endswith("policy") and (workdir / output_dir).joinpath("config.json").exists()


def test_print_config_shows_the_resolved_recipe(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_bench("train", "ipo", "--recipe", "tiny", "--model.tau=0.3", "--print_config")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "tau: 0.3" in out and "policy: tiny" in out and "view: paired" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "dpo", "--recipe", "tiny", "--model.beta=-1"], "model.beta"),
        (["train", "dpo", "--recipe", "tiny", "--model.beta=0"], "model.beta"),
        (["train", "ipo", "--recipe", "tiny", "--model.tau=0"], "model.tau"),
        (["train", "kto", "--recipe", "tiny", "--model.beta=-0.1"], "model.beta"),
        (["train", "dpo", "--recipe", "tiny", "--model.lr=0"], "model.lr"),
        (["train", "kto", "--recipe", "tiny", "--model.lr=-1e-5"], "model.lr"),
        (["train", "dpo", "--recipe", "tiny", "--data.batch_size=0"], "data.batch_size"),
        (["train", "dpo", "--recipe", "tiny", "--data.eval_batch_size=-2"], "data.eval_batch_size"),
    ],
)
def test_non_positive_config_values_fail_at_parse_time(workdir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_bench(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and ("PositiveFloat" in err or "PositiveInt" in err)
    assert not (workdir / "runs").exists()  # rejected before any run directory, model or MLflow run


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "rlhf"], "unknown algorithm 'rlhf'"),
        (["train", "dpo", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["train", "dpo", "--recipe", "tiny", "--data.path=/no/such/folder"], "/no/such/folder does not exist"),
        (["train", "dpo", "--recipe", "tiny", "--model.policy=./no-model-here"], "model spec './no-model-here'"),
        (["data", "/no/such/folder"], "data path /no/such/folder does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(workdir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_bench(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_train_rm_trains_a_proxy_and_a_judge_on_disjoint_halves(workdir, hh_path):
    run_bench("train", "rm", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=2",
              "--trainer.val_check_interval=2")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    by_role = {run.data.tags["role"]: run for run in runs}
    assert set(by_role) == {"proxy", "judge"}
    for role, run in by_role.items():
        assert run.data.params["data.train_subset"] == role and run.data.params["data.view"] == "reward"
        assert run.data.tags["model"] == "all-minilm-l6-v2" and run.data.tags["algorithm"] == "rm"
        assert {"train/loss", "val/loss", "val/accuracy", "val/margin"} <= set(run.data.metrics)
        assert 0 <= run.data.metrics["val/accuracy"] <= 1
        assert (workdir / run.data.tags["output_path"] / "config.json").exists()


def test_one_reward_model_for_both_roles_is_explicit_and_recorded(workdir, hh_path):
    run_bench("train", "rm", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=1",
              "--trainer.limit_val_batches=0", "--model.role=shared")
    _, run = only_run("tiny")
    assert run.data.tags["role"] == "shared" and run.data.params["data.train_subset"] == "all"
