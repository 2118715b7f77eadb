"""What goes wrong in real runs gets a clear message before or as it happens: a NaN loss, an MLflow server that
is down, and a results file that belongs to another experiment or command."""

import math
import socket

import mlflow
import pytest
import torch
from safetensors.torch import load_file

import modules.dpo
from bench.cli import main
from bench.core.errors import BenchError
from bench.reports.table import write_result

TRAIN = ["train", "dpo", "--recipe", "tiny", "--eval", "false"]


@pytest.fixture
def nan_at_third_training_batch(monkeypatch):
    """The DPO loss of the third batch (step 2, batch index 2) is NaN; the tiny recipe validates after step 4."""
    calls = []

    def dpo_loss(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    real_loss = modules.dpo.dpo_loss
    monkeypatch.setattr(modules.dpo, "dpo_loss", dpo_loss)


def test_a_nan_loss_stops_the_run_naming_step_and_batch(workdir, hh_path, capsys, nan_at_third_training_batch):
    with pytest.raises(SystemExit) as exit_info:
        main([*TRAIN, f"--data.path={hh_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite training loss (nan) at step 2, batch index 2 of epoch 0" in err
    assert "--model.nonfinite_loss=skip" in err
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["train/loss"] == pytest.approx(0.693, abs=0.05)


def test_skip_mode_skips_the_nan_batch_and_counts_it(workdir, hh_path, capsys, nan_at_third_training_batch):
    main([*TRAIN, f"--data.path={hh_path}", "--model.nonfinite_loss=skip"])
    assert "skipped a batch with a non-finite loss (nan) at step 2, batch index 2" in capsys.readouterr().err
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    counts = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/skipped_batches"))
    assert counts == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0)]  # a running count: one batch skipped, at step 2
    weights = load_file(workdir / run.data.tags["output_path"] / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())  # the NaN never reached the weights
    assert math.isfinite(run.data.metrics["val/loss"])


def test_an_unreachable_tracking_server_is_named_before_training(workdir, monkeypatch, capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(SystemExit) as exit_info:
        main([*TRAIN])
    assert exit_info.value.code == 2
    assert f"the MLflow tracking server http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) is unreachable" in \
        capsys.readouterr().err
    assert not (workdir / "runs").exists()


def test_results_never_overwrite_another_experiments_table(tmp_path):
    table = tmp_path / "smol-hh.md"
    write_result(table, "# smol-hh\n\nCommand: `bench table --experiment smol-hh`  \nv1\n", "bench table --experiment smol-hh")
    # The same experiment's table is replaced, atomically: no partial file is left beside it.
    write_result(table, "# smol-hh\n\nCommand: `bench table --output-dir x --experiment=smol-hh`  \nv2\n",
                 "bench table --output-dir x --experiment=smol-hh")
    assert table.read_text().endswith("v2\n") and sorted(p.name for p in tmp_path.iterdir()) == ["smol-hh.md"]
    with pytest.raises(BenchError, match="holds the output of `bench table --output-dir x --experiment=smol-hh`; "
                                         "not overwriting it with `bench perf`'s"):
        write_result(table, "Command: `bench perf`\n", "bench perf --output smol-hh.md")
    with pytest.raises(BenchError, match="not overwriting it with `bench table --experiment tiny`'s"):
        write_result(table, "Command: `bench table --experiment tiny`\n", "bench table --experiment tiny")
    notes = tmp_path / "notes.md"
    notes.write_text("my own notes\n")
    with pytest.raises(BenchError, match="has no `Command:` line: bench did not write it"):
        write_result(notes, "Command: `bench perf`\n", "bench perf")
    assert table.read_text().endswith("v2\n") and notes.read_text() == "my own notes\n"


def test_bench_perf_refuses_a_table_as_its_output_before_running(tmp_path, capsys):
    table = tmp_path / "smol-hh.md"
    table.write_text("# smol-hh\n\nCommand: `bench table --experiment smol-hh`  \n")
    with pytest.raises(SystemExit):
        main(["perf", "--output", str(table)])
    assert "not overwriting it with `bench perf`'s" in capsys.readouterr().err
