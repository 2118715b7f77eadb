"""Nothing left RUNNING (issue 26): a comparison or a study stopped by Ctrl-C, refused, or killed outright
leaves its MLflow parent run closed, and says the command that carries on; that command does."""

import lightning.pytorch  # noqa: F401 - its log handler binds sys.stderr at import: not a test's capsys
import mlflow
import pytest
import yaml

from bench.cli import main
from bench.core.workers import WORKER_TAG, this_worker
from bench.runs import recipes, tracking


def all_runs(experiment: str) -> list:
    client = mlflow.MlflowClient(tracking.tracking_uri())
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


@pytest.fixture
def small_compare(workdir, hh_path) -> list[str]:
    """`bench compare` on tiny with three stages (a reward model, DPO, IPO), as a recipe file of the user's."""
    _, recipe = recipes.load("tiny")
    recipe["compare"]["stages"] = ["rm", "dpo", "ipo"]
    (workdir / "small.yaml").write_text(yaml.safe_dump(recipe))
    return ["compare", "--recipe", "small.yaml", "--data-path", hh_path]


def parents(experiment: str) -> list:
    return [r for r in all_runs(experiment) if r.data.tags.get("compare_role") == "parent"]


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_stopped_comparison_is_killed_and_the_same_command_carries_on(small_compare, capsys, ctrl_c_at_third_batch):
    with pytest.raises(SystemExit) as exit_info:
        main(small_compare)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (parent,) = parents("small")
    assert parent.info.status == "KILLED" and parent.data.tags["stopped"] == "interrupted"
    command = " ".join(["bench", *small_compare])
    assert (f"the comparison stopped; its MLflow parent run {parent.info.run_id} is marked KILLED. The same command "
            f"carries on from where it stopped:  {command}") in err
    assert "--resume" not in err and "default_root_dir" not in err  # `bench train`'s hints are not this command's
    assert [r.info.status for r in all_runs("small") if r.info.status == "RUNNING"] == []

    ctrl_c_at_third_batch["armed"] = False
    main(small_compare)
    old, new = sorted(parents("small"), key=lambda r: r.info.start_time)
    assert (old.info.status, new.info.status) == ("KILLED", "FINISHED")
    assert new.data.tags["stage.rm-proxy"].endswith("(reused)")  # the reward models finished before the Ctrl-C
    assert new.data.tags["stage.rm-judge"].endswith("(reused)")
    assert not new.data.tags["stage.dpo"].endswith("(reused)")
    assert [r.info.run_name for r in all_runs("small") if r.info.status == "RUNNING"] == []


def test_a_refused_comparison_leaves_no_parent_and_a_dead_ones_parent_is_closed(small_compare, workdir, capsys):
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.create_experiment("small")
    dead = this_worker().rsplit(":", 2)[0] + ":999999999:1"  # a pid no process has: its bench was SIGKILLed
    orphan = client.create_run(experiment, run_name="compare-sigkilled",
                               tags={"compare_role": "parent", WORKER_TAG: dead}).info.run_id
    with pytest.raises(SystemExit) as exit_info:
        # Lightning refuses it when the first stage builds its trainer, after the parent run is made (a flag the
        # stages' parsers refuse is refused before anything: test_user_faults).
        main([*small_compare, "--trainer.max_steps=-5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "`max_steps` must be a non-negative integer or -1" in err
    assert client.get_run(orphan).info.status == "KILLED"
    assert "was RUNNING but its process is gone: marked KILLED" in err
    assert [r.info.run_id for r in all_runs("small")] == [orphan]  # the refused comparison's parent is gone


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_stopped_study_is_killed_and_the_same_command_finishes_it(workdir, hh_path, reward_models, capsys,
                                                                   ctrl_c_at_third_batch):
    sweep = ["sweep", "dpo", "--recipe", "tiny", "--n-trials", "1", f"--data.path={hh_path}", "--trainer.max_steps=3",
             "--trainer.limit_val_batches=1", "--eval.n_prompts=2", f"--eval.judge={reward_models['judge']}",
             f"--eval.proxy={reward_models['proxy']}"]
    with pytest.raises(SystemExit) as exit_info:
        main(sweep)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (parent,) = [r for r in all_runs("tiny") if r.data.tags.get("sweep_role") == "study"]
    assert parent.info.status == "KILLED"
    assert (f"study 'tiny-dpo' stopped; its MLflow parent run {parent.info.run_id} is marked KILLED. The same command "
            f"carries on from where it stopped:  {' '.join(['bench', *sweep])}") in err
    assert "--resume" not in err and "default_root_dir" not in err

    ctrl_c_at_third_batch["armed"] = False
    main(sweep)
    runs = all_runs("tiny")
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["finished_trials"] == "1"
    trials = {r.info.run_name: r.info.status for r in runs if r.data.tags.get("sweep_role") == "trial"}
    assert trials == {"tiny-dpo trial 0 · seed 0 · 3 steps": "KILLED", "tiny-dpo trial 1 · seed 0 · 3 steps": "FINISHED"}


@pytest.fixture
def sigterm_at_first_call(monkeypatch):
    """`arm(module, name)`: SIGTERM is sent to this process, as `kill` or a scheduler sends it, when
    `module.name` is first called. A SIGTERM that reaches the handler in place before the command (the default
    would end pytest) is recorded in the returned list."""
    import os
    import signal

    reached_outside = []

    def arm(module, name: str) -> list:
        real, sent = getattr(module, name), []

        def sends_sigterm(*args, **kwargs):
            if not sent:
                sent.append(os.kill(os.getpid(), signal.SIGTERM))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, sends_sigterm)
        return reached_outside

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: reached_outside.append(signum))
    yield arm
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_sigterm_outside_training_stops_a_comparison_as_ctrl_c_does(small_compare, capsys, sigterm_at_first_call):
    import bench.evaluation.evaluate

    reached_outside = sigterm_at_first_call(bench.evaluation.evaluate, "sample")  # the first evaluation's sampling
    with pytest.raises(SystemExit) as exit_info:
        main(small_compare)
    assert exit_info.value.code == 130 and reached_outside == []
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (parent,) = parents("small")
    assert parent.info.status == "KILLED" and parent.data.tags["stopped"] == "interrupted"
    assert f"its MLflow parent run {parent.info.run_id} is marked KILLED. The same command carries on" in err
    assert [r.info.run_name for r in all_runs("small") if r.info.status == "RUNNING"] == []


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_sigterm_in_training_stops_at_the_next_batch_and_the_run_resumes(workdir, hh_path, capsys, caplog,
                                                                         sigterm_at_first_call):
    import modules.dpo

    reached_outside = sigterm_at_first_call(modules.dpo, "dpo_loss")
    train = ["train", "dpo", "--recipe", "tiny", f"--data.path={hh_path}", "--eval", "false",
             "--checkpoint.every_n_train_steps=1", "--trainer.max_steps=4"]
    with pytest.raises(SystemExit) as exit_info:
        main(train)
    assert exit_info.value.code == 130 and reached_outside == []
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "Received SIGTERM" in caplog.text  # Lightning's own handling, not ours mid-step
    (run,) = all_runs("tiny")
    assert run.info.status == "KILLED"
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0]  # the batch it was in
    assert f"interrupted; MLflow run {run.info.run_id} is marked KILLED. Continue it from its last checkpoint" in err
    main([*train, "--resume"])
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
