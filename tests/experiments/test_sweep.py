"""`bench sweep` on the tiny model: search spaces, resuming a study, MLflow parent and child runs, two workers
on a real PostgreSQL storage, and bad input before any training."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from postgres_server import running_postgres

from bench.cli import main
from bench.core.errors import ConfigError
from bench.experiments.sweep import load_space, make_sampler, parse_objectives


def sweep_args(hh_path, reward_models, *extra):
    """A trial of one optimizer step, judged on 4 validation prompts with untrained reward models."""
    return ["sweep", "dpo", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1", "--eval.n_prompts=4", f"--eval.judge={reward_models['judge']}",
            f"--eval.proxy={reward_models['proxy']}", *extra]


def finished_trials(storage: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=study_name, storage=storage)
    return [t for t in study.get_trials() if t.state == TrialState.COMPLETE]


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_rerun_resumes_the_study_and_mlflow_nests_each_trial(workdir, hh_path, reward_models, capsys):
    main(sweep_args(hh_path, reward_models, "--n-trials", "2"))
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    assert len(finished_trials(storage, "tiny-dpo")) == 2
    main(sweep_args(hh_path, reward_models, "--n-trials", "3"))
    trials = finished_trials(storage, "tiny-dpo")
    assert [t.number for t in trials] == [0, 1, 2]  # one more, none repeated
    assert "study 'tiny-dpo': complete 3" in capsys.readouterr().out

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    for trial in trials:
        child = by_trial[trial.number]
        assert float(child.data.params["model.beta"]) == pytest.approx(trial.params["model.beta"])
        assert child.data.metrics["eval/win_rate_vs_chosen"] == pytest.approx(trial.value)
        assert child.data.params["eval.split"] == "validation"
    best = [c for c in children if c.data.tags.get("best_trial") == "true"]
    assert len(best) == 1
    assert parents[0].data.tags["best_run_id"] == best[0].info.run_id
    figures = {a.path for a in client.list_artifacts(parents[0].info.run_id, "figures")}
    assert figures == {"figures/win_rates.png", "figures/reward_vs_kl.png", "figures/training_curves.png"}


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_two_workers_on_postgres_finish_exactly_n_trials(tmp_path, hh_path, reward_models):
    n_trials = 3
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    # Two processes creating one sqlite store at once race on its schema; workers share a ready store (or server).
    mlflow.MlflowClient(tracking_uri).search_experiments()
    with running_postgres() as url:
        # Each worker has its own sampler seed, so that their first (random) proposals differ.
        workers = [subprocess.Popen(
            [sys.executable, "-m", "bench.cli", *sweep_args(hh_path, reward_models, "--n-trials", str(n_trials),
                                                            "--storage", url, "--seed", str(seed))],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (0, 1)]
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        trials = optuna.load_study(study_name="tiny-dpo", storage=url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials
    assert all(t.user_attrs.get("surplus") for t in trials if t.state != TrialState.COMPLETE)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n_trials
    runs_per_trial = Counter(t.user_attrs["mlflow_run_id"] for t in complete)
    assert len(runs_per_trial) == n_trials
    assert all("finished with value" in output for output in outputs)  # both workers ran trials


def write_space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("space:\n  model.beta: {distribution: gaussian, low: 0.1, high: 1}\n", "space.model.beta: unknown distribution 'gaussian'"),
    ("space:\n  model.beta: {distribution: float, low: 0.5, high: 0.1}\n", "space.model.beta"),
    ("space:\n  model.beta: {distribution: float, low: 0.0, high: 1.0, log: true}\n", "space.model.beta"),
    ("space:\n  model.beta: {distribution: float, high: 1.0}\n", "needs 'low'"),
    ("space:\n  model.beta: {distribution: float, low: 0.1, high: 1.0, scale: log}\n", "unknown keys ['scale']"),
    ("grid:\n  model.beta: [0.1]\n", "`space` must map config paths"),
])
def test_an_invalid_search_space_names_the_file_and_field(tmp_path, text, message):
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")) as raised:
        load_space("dpo", path)
    assert message in str(raised.value)


def test_every_shipped_search_space_is_valid():
    for algorithm in ("dpo", "ipo", "kto", "rrhf", "ppo"):
        space = load_space(algorithm)
        assert space.distributions and set(space.grid) == set(space.distributions)


def test_objectives_take_eval_metrics_and_directions():
    kl_down = parse_objectives(["eval/win_rate_vs_chosen", "eval/kl"])
    assert [(o.metric, o.direction) for o in kl_down] == [("eval/win_rate_vs_chosen", "maximize"), ("eval/kl", "minimize")]
    assert parse_objectives(["eval/kl:max"])[0].direction == "maximize"


@pytest.mark.parametrize("extra, message", [
    (["--objective", "train/loss"], "objective 'train/loss' is not a metric that evaluation logs"),
    (["--storage", "postgresql+psycopg2://bench@127.0.0.1:9/none"], "Optuna storage '127.0.0.1:9/none' is unreachable"),
    (["--storage", "nosuchdb://x"], "Optuna storage 'nosuchdb://x' is unreachable"),
    (["--sampler", "cmaes", "--objective", "eval/win_rate_vs_chosen", "--objective", "eval/kl"], "CMA-ES is single-objective"),
])
def test_bad_sweep_input_fails_before_any_training(workdir, hh_path, reward_models, capsys, extra, message):
    with pytest.raises(SystemExit) as exited:
        main(sweep_args(hh_path, reward_models, "--n-trials", "1", *extra))
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (workdir / "runs").exists()


def test_an_unknown_algorithm_is_named(workdir, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "ppo2"])
    assert "unknown algorithm 'ppo2'; choose one of" in capsys.readouterr().err


def test_samplers_check_their_needs_before_a_study_starts(tmp_path):
    space = load_space("dpo", write_space(tmp_path, "space:\n  model.beta: {distribution: float, low: 0.01, high: 0.5}\n"))
    with pytest.raises(ConfigError, match=r"grid sampler needs grid values for \['model.beta'\]"):
        make_sampler("grid", space, seed=0, n_objectives=1)
    assert isinstance(make_sampler("cmaes", space, seed=0, n_objectives=1), optuna.samplers.CmaEsSampler)
    grid = make_sampler("grid", load_space("dpo"), seed=0, n_objectives=1)
    study = optuna.create_study(sampler=grid, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("model.beta", 0.01, 0.5, log=True), n_trials=3)
    assert sorted(t.params["model.beta"] for t in study.trials) == [0.05, 0.1, 0.5]  # the DPO paper's betas


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_workers_racing_to_create_a_new_optuna_database_both_connect():
    """Two workers opening the same new PostgreSQL database at once race to create Optuna's tables."""
    import threading

    import sqlalchemy

    from bench.experiments.sweep import open_storage

    with running_postgres() as url:
        admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        for attempt in range(4):
            with admin.connect() as connection:
                connection.execute(sqlalchemy.text(f"CREATE DATABASE race_{attempt}"))
            fresh = url.rsplit("/", 1)[0] + f"/race_{attempt}"
            start, outcomes = threading.Barrier(2), []

            def worker():
                start.wait()
                try:
                    outcomes.append(open_storage(fresh, 60, 180))
                except Exception as err:
                    outcomes.append(err)

            threads = [threading.Thread(target=worker) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert all(not isinstance(o, Exception) for o in outcomes), outcomes
        admin.dispose()


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_sweep_killed_mid_trial_reruns_that_trial_and_finishes_exactly_n(workdir, hh_path, reward_models):
    """SIGKILL while trial 1 trains; the rerun marks it failed, retries its parameters, and stops at 2 finished."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    argv = sweep_args(hh_path, reward_models, "--n-trials", "2", "--trainer.max_steps=3")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    worker = subprocess.Popen([sys.executable, "-m", "bench.cli", *argv], cwd=workdir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "runs" / "tiny" / "tiny-dpo-trial-1" / "run.json").exists():  # trial 1 is training
        assert worker.poll() is None, worker.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "trial 1 never started"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    study = optuna.load_study(study_name="tiny-dpo", storage=storage)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]

    main(argv)  # the rerun: the dead worker's trial does not wait out the heartbeat grace period

    trials = optuna.load_study(study_name="tiny-dpo", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == trials[1].params and trials[2].system_attrs["retry_history"] == [1]
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`optuna.trial` = '1'")
    assert [(r.info.status, r.data.tags["optuna.state"]) for r in runs] == [("FAILED", "FAIL")]
