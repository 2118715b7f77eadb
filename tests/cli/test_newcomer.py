"""What a newcomer meets in the first hour (issue 17): the right recipe by default, sweeps that check
before they create, help that helps, and interrupts that say how to resume."""

import lightning.pytorch  # noqa: F401 - its log handler binds sys.stderr at import: not a test's capsys
import mlflow
import pytest

from bench.cli import main

TINY_TRAIN = ["--recipe", "tiny", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
              "--trainer.limit_val_batches=1"]


def runs_of(experiment: str) -> list:
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_bench_eval_takes_the_recipe_and_experiment_of_the_run(workdir, hh_path, capsys, reward_models):
    main(["train", "dpo", *TINY_TRAIN, f"--data.path={hh_path}"])
    (run,) = runs_of("tiny")
    run_id = run.info.run_id
    # No judge in the experiment yet: the closing hint is a command that works as printed.
    assert f"Run `bench eval {run_id} --recipe tiny` after training the judge" in capsys.readouterr().err
    assert "eval_skipped" in run.data.tags
    main(["eval", run_id, "--judge", reward_models["judge"], "--proxy", "none"])  # no --recipe
    run = mlflow.MlflowClient().get_run(run_id)
    params = run.data.params
    # tiny's eval section (8 prompts of up to 12 tokens), not smol-hh's (64 of 128)
    assert params["eval.n_prompts"] == "8" and params["eval.sampling.max_new_tokens"] == "12"
    assert 0 <= run.data.metrics["eval/win_rate_vs_chosen"] <= 1
    assert "eval_skipped" not in run.data.tags
    assert mlflow.MlflowClient().get_experiment_by_name("smol-hh") is None


@pytest.mark.parametrize("override, needle", [
    ("--data.max_length=-5", 'a trial\'s config: Parser key "data.max_length"'),
    ("--model.nope=1", "a trial's config: unrecognized arguments: --model.nope=1"),
    ("--eval.n_prompts=0", "eval.n_prompts must be >= 1, got 0"),  # the recipe's settings, checked when it resolves
])
def test_a_sweep_checks_its_overrides_before_creating_anything(workdir, hh_path, capsys, override, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "dpo", "--recipe", "tiny", "--n-trials", "1", f"--data.path={hh_path}", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    assert line.startswith(f"bench sweep: error: {needle}")
    assert sorted(p.name for p in workdir.iterdir()) == []  # no optuna.db, mlflow.db or run folder


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_trial_folder_left_by_an_earlier_study_is_set_aside(workdir, hh_path, reward_models, capsys, recwarn):
    """After deleting optuna.db and mlflow.db to start over, trial 0's old folder names a run no store holds."""
    stale = workdir / "runs" / "tiny" / "tiny-dpo-trial-0"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "run.json").write_text('{"mlflow_run_id": "0123456789abcdef", "config_fingerprint": "x"}')
    (stale / "checkpoints" / "last.ckpt").write_bytes(b"old")
    main(["sweep", "dpo", "--recipe", "tiny", "--n-trials", "1", f"--data.path={hh_path}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=1", "--eval.n_prompts=2", f"--eval.judge={reward_models['judge']}",
          f"--eval.proxy={reward_models['proxy']}"])
    captured = capsys.readouterr()
    assert "study 'tiny-dpo': complete 1" in captured.out
    (aside,) = (workdir / "runs" / "tiny").glob("tiny-dpo-trial-0.old-*")
    assert f"{stale} was left by an earlier study" not in captured.err  # relative path in the message
    assert "tiny-dpo-trial-0 was left by an earlier study named like this one; moved it to" in captured.err
    assert (aside / "checkpoints" / "last.ckpt").read_bytes() == b"old"
    (trial,) = [r for r in runs_of("tiny") if r.data.tags.get("optuna.trial") == "0"]
    assert trial.info.status == "FINISHED" and (stale / "run.json").exists()
    # Optuna's experimental-feature warnings and Lightning's pytree deprecation are not the user's business.
    assert not [w for w in recwarn if "experimental" in str(w.message) or "LeafSpec" in str(w.message)]


def test_a_surplus_sweep_trial_is_one_line_not_a_traceback(caplog):
    import logging

    import optuna

    from bench.core.quiet import quiet_libraries
    from bench.experiments.sweep import SurplusTrial

    quiet_libraries()
    optuna.logging.enable_propagation()  # to caplog, through the root logger
    try:
        def objective(trial):
            raise SurplusTrial(f"trial {trial.number} is surplus: 3 trials are already finished or running")

        with caplog.at_level(logging.INFO):
            optuna.create_study().optimize(objective, n_trials=1, catch=(SurplusTrial,))
    finally:
        optuna.logging.disable_propagation()
    assert not [r for r in caplog.records if r.exc_info or "failed" in r.getMessage()], caplog.text


def test_bench_train_help_shows_benchs_options_and_writes_nothing(workdir, capsys):
    for argv in (["train", "--help"], ["train", "-h"]):
        main(argv)
        out = capsys.readouterr().out
        assert out.startswith("usage: bench train ALGO") and "ALGO: dpo, grpo, ipo, kto" in out and "tiny" in out
        assert all(option in out for option in ("--recipe", "--eval auto|true|false", "--resume [RUN_DIR]"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dpo", "--recipe", "tiny", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bench train ALGO") and out.index("--resume") < out.index("--trainer.max_steps")
    assert "--optimizer" not in out and "--lr_scheduler" not in out  # not offered: the modules build their own
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "kto", "--recipe", "tiny", "--print_config"])
    assert exit_info.value.code == 0 and "policy: tiny" in capsys.readouterr().out
    assert sorted(p.name for p in workdir.iterdir()) == []  # no mlflow.db, no runs/


@pytest.mark.parametrize("argv, not_loaded", [
    (["train", "--help"], "torch"), (["train", "dpoo"], "torch"), (["label", "--help"], "torch"),
    (["compare", "--help"], "torch"), (["sweep", "--help"], "torch"), (["perf", "--help"], "lightning"),
])
def test_help_and_argument_errors_do_not_load_the_heavy_libraries(argv, not_loaded):
    # They took 5-8.5 s when they imported torch, Lightning and transformers for a list of names.
    import subprocess
    import sys

    code = (f"import sys\nfrom bench.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print({not_loaded!r} in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.splitlines()[-1] == "False", done.stderr


@pytest.mark.parametrize("argv, needles", [
    (["trian"], ["bench: error: unknown command 'trian'; choose one of data, train, eval", "`bench --help`"]),
    (["train"], ["bench train: error: no algorithm given; choose one of ", "dpo, grpo, ipo", "rm, rrhf, sft", "`bench train --help`"]),
    (["train", "dpo", "--recipe", "tiny", "--trainer.max_stepz=3"],
     ["unrecognized arguments: --trainer.max_stepz=3", "see `bench train dpo --help`"]),
    (["data", "--max-length", "many"], ["argument --max-length: invalid int value: 'many'", "`bench data --help`"]),
    (["compare", "--seeds", "0,x"], ["--seeds", "comma-separated integers", "`bench compare --help`"]),
])
def test_a_bad_argument_is_one_line_not_the_usage(workdir, capsys, argv, needles):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert all(needle in line for needle in needles), line


def test_recipes_find_their_data_from_any_folder(workdir, hh_path, monkeypatch, capsys):
    from bench.runs.recipes import PROJECT_ROOT

    def printed_data_path(*argv):
        with pytest.raises(SystemExit):
            main(["train", "dpo", *argv, "--print_config"])
        (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  path: ")]
        return line.removeprefix("  path: ")

    monkeypatch.delenv("HH_RLHF_PATH", raising=False)
    # A shipped recipe's relative path is the repository's, wherever bench runs; one's own recipe's is its folder's.
    assert printed_data_path("--recipe", "tiny") == str(PROJECT_ROOT.parent / "shared" / "data" / "hh-rlhf")
    (workdir / "mine").mkdir()
    (workdir / "mine" / "recipe.yaml").write_text("data:\n  path: ./hh\nmodel:\n  policy: tiny\n")
    assert printed_data_path("--recipe", "mine/recipe.yaml") == str(workdir / "mine" / "hh")
    monkeypatch.setenv("HH_RLHF_PATH", hh_path)  # one variable, honoured by every command
    assert printed_data_path("--recipe", "tiny") == hh_path
    assert printed_data_path("--recipe", "mine/recipe.yaml") == hh_path
    assert printed_data_path("--recipe", "tiny", "--data.path=elsewhere") == "elsewhere"


def ctrl_c_bench_ui(tmp_path, once_up: bool) -> tuple[str, str]:
    """Start `bench ui` as a user would, press Ctrl-C while its server starts or once it answers; its stdout and stderr."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with open(tmp_path / "out", "w") as out_file, open(tmp_path / "err", "w") as err_file:
        process = subprocess.Popen([sys.executable, "-m", "bench.cli", "ui", "--port", str(port)], cwd=tmp_path,
                                   env=env, stdout=out_file, stderr=err_file)
        # Once bench has started the server (a child process; bench's imports start others, `uname`), the server
        # is still importing for seconds.
        deadline = time.monotonic() + 120
        while not server_children(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        while once_up and "MLflow UI:" not in (tmp_path / "out").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        servers = server_children(process.pid)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert servers and not [pid for pid in servers if Path(f"/proc/{pid}").exists()]  # nothing left running
    return (tmp_path / "out").read_text(), (tmp_path / "err").read_text()


def server_children(pid: int) -> list[int]:
    """The `mlflow server` processes among pid's children."""
    from pathlib import Path

    def cmdline(child: str) -> bytes:
        try:
            return Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:  # a child that ended meanwhile (`uname`)
            return b""

    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if b"mlflow" in cmdline(c)]


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_ctrl_c_while_bench_ui_starts_prints_no_traceback(tmp_path):
    out, err = ctrl_c_bench_ui(tmp_path, once_up=False)
    assert "MLflow UI:" not in out  # it was stopped during start-up
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.slow
def test_bench_ui_prints_its_url_alone_on_stdout_and_stops_without_a_traceback(tmp_path):
    out, err = ctrl_c_bench_ui(tmp_path, once_up=True)
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith("MLflow UI: http://127.0.0.1:")]
    assert len(out.splitlines()) == 1
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "--allowed-hosts" not in err and "Warning" not in err, err  # no advice to use flags bench ui does not take
    assert "Finished server process" in err  # uvicorn shut down gracefully


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_ctrl_c_then_resume_anywhere_and_dead_runs_are_closed(workdir, hh_path, capsys, monkeypatch,
                                                               ctrl_c_at_third_batch):
    from bench.core.workers import WORKER_TAG, this_worker

    train = ["train", "dpo", "--recipe", "tiny", f"--data.path={hh_path}", "--eval", "false",
             "--checkpoint.every_n_train_steps=1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*train, "--trainer.default_root_dir=elsewhere/dpo-a"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (run,) = runs_of("tiny")
    assert run.info.status == "KILLED" and run.data.tags[WORKER_TAG] == this_worker()
    assert (f"interrupted; MLflow run {run.info.run_id} is marked KILLED. Continue it from its last checkpoint with:  "
            f"bench train dpo --recipe tiny --eval false --data.path={hh_path} --checkpoint.every_n_train_steps=1 "
            "--resume=elsewhere/dpo-a") in err  # with --eval false, which the command had
    # A run whose process died without a word (SIGKILL) is RUNNING until a later bench sees its process is gone.
    client = mlflow.MlflowClient()
    orphan = client.create_run(run.info.experiment_id, run_name="sigkilled",
                               tags={WORKER_TAG: this_worker().rsplit(":", 2)[0] + ":999999999:1"}).info.run_id
    ctrl_c_at_third_batch["armed"] = False
    main([*train, "--resume"])  # alone: finds the run outside runs/tiny through its MLflow run
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == str(workdir / "elsewhere/dpo-a/checkpoints/last.ckpt")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [0, 1, 2, 3]  # each step once: the checkpointed step is not logged again
    assert client.get_run(orphan).info.status == "KILLED"


@pytest.mark.parametrize("override, needle", [
    ("--data.max_length=-5", 'Parser key "data.max_length"'),
    ("--trainer.max_steps=0", "--trainer.max_steps=0 trains nothing"),
    ("--trainer.num_nodes=2", "--trainer.num_nodes=2: no multi-node launcher found"),  # it would wait for node 1
])
def test_values_that_cannot_train_fail_before_any_run(workdir, hh_path, capsys, override, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dpo", "--recipe", "tiny", f"--data.path={hh_path}", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err
    assert sorted(p.name for p in workdir.iterdir()) == []


@pytest.mark.parametrize("env, refused", [
    ({}, True),
    ({"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, False),  # set by hand on each node
    ({"RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "4",
      "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}, False),  # torchrun
    ({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, False),  # Kubeflow
])
def test_several_nodes_need_a_launcher_or_node_rank(monkeypatch, env, refused):
    from bench.core.errors import BenchError
    from bench.runs.training import check_nodes

    for name in ("NODE_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_nodes({"num_nodes": 1})  # one node needs neither
    if refused:
        with pytest.raises(BenchError, match="num_nodes=2: no multi-node launcher found"):
            check_nodes({"num_nodes": 2})
    else:
        check_nodes({"num_nodes": 2})


def test_a_reward_backbones_new_head_is_not_reported_but_other_load_news_is(capfd):
    import logging

    from bench.core.models import _FreshHeadReport, load_reward_backbone

    load_reward_backbone("all-minilm-l6-v2")  # MiniLM has no classifier: the head is new, as meant
    assert "LOAD REPORT" not in capfd.readouterr().err
    report = ("BertForSequenceClassification LOAD REPORT from: x\nKey | Status |\n---+---\n"
              "classifier.bias   | MISSING | \n{row}\n\nNotes:\n- MISSING:\tthose params were newly initialized")
    record = lambda row: logging.LogRecord("t", logging.WARNING, "", 0, report.format(row=row), None, None)  # noqa: E731
    assert not _FreshHeadReport().filter(record("classifier.weight | MISSING | "))
    assert _FreshHeadReport().filter(record("bert.encoder.layer.0.weight | MISSING | "))  # a real fault: shown
