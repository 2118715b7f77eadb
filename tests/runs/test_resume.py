"""A `bench train` killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted run
with the same seed ends: optimizer, scheduler, data position (across an epoch boundary) and RNG restored."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from bench.cli import main

# 24 pairs in batches of 4: 6 batches an epoch, so 10 steps cross into a second epoch, whose order must be
# the one an uninterrupted run draws.
TRAIN = ["train", "dpo", "--recipe", "tiny", "--trainer.max_steps=10", "--data.max_train_pairs=24",
         "--checkpoint.every_n_train_steps=2", "--trainer.val_check_interval=5", "--eval", "false"]


def bench_process(workdir: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *argv], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after_checkpoints(process: subprocess.Popen, checkpoint: Path, count: int, timeout: float = 300) -> None:
    """SIGKILL once `checkpoint` has been (re)written `count` times: mid-run, past the epoch boundary."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < count:
        if process.poll() is not None:
            pytest.fail(f"training ended before it was killed: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint appeared")
        if checkpoint.exists():
            seen.add(checkpoint.stat().st_mtime_ns)
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def last_values(client: mlflow.MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """Step -> value; a resumed run logs again the steps between its checkpoint and the kill."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


@pytest.mark.parametrize("checkpoints_before_kill, steps", [(4, (8, 9)), (3, (6, 7))],
                         ids=["mid-epoch", "at-epoch-end"])
@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_killed_training_resumes_to_the_same_result(workdir, hh_path, capsys, checkpoints_before_kill, steps):
    """Killed after the step-8 checkpoint (2 batches into epoch 1), or after the step-6 one (epoch 0's last
    batch: the resumed run must start epoch 1 at its first batch)."""
    data = f"--data.path={hh_path}"
    main([*TRAIN, data, "--trainer.default_root_dir=runs/tiny/dpo-whole"])

    killed_dir = workdir / "runs" / "tiny" / "dpo-killed"
    process = bench_process(workdir, *TRAIN, data, f"--trainer.default_root_dir={killed_dir}")
    kill_after_checkpoints(process, killed_dir / "checkpoints" / "last.ckpt", count=checkpoints_before_kill)
    step_at_kill = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step_at_kill in steps and not (killed_dir / "policy").exists()

    main([*TRAIN, data, "--resume"])  # the newest unfinished dpo run of the recipe: the killed one

    client = mlflow.MlflowClient()
    runs = {Path(run.data.tags["output_path"]).parent.name: run  # by run folder
            for run in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert set(runs) == {"dpo-whole", "dpo-killed"}  # resumed in the same MLflow run, not a new one
    whole, resumed = runs["dpo-whole"], runs["dpo-killed"]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from"].endswith("last.ckpt")
    # Finished: the model is saved in HF format, and the checkpoint, only there for resuming, is gone.
    assert (killed_dir / "policy" / "model.safetensors").exists() and not (killed_dir / "checkpoints" / "last.ckpt").exists()
    for key in ("train/loss", "train/rewards/margins", "train/logps/chosen", "val/loss"):
        expected, got = last_values(client, whole.info.run_id, key), last_values(client, resumed.info.run_id, key)
        assert sorted(got) == sorted(expected), key
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)
    expected_weights = load_file(workdir / "runs/tiny/dpo-whole/policy/model.safetensors")
    resumed_weights = load_file(killed_dir / "policy" / "model.safetensors")
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6)

    # The same command again finds the run directory finished, and says so instead of training over it.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*TRAIN, data, f"--trainer.default_root_dir={killed_dir}"])
    assert "which already finished" in capsys.readouterr().err


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_resume_refuses_another_config(workdir, hh_path, capsys):
    data = f"--data.path={hh_path}"
    run_dir = workdir / "runs" / "tiny" / "dpo-first"
    process = bench_process(workdir, *TRAIN, data, f"--trainer.default_root_dir={run_dir}")
    kill_after_checkpoints(process, run_dir / "checkpoints" / "last.ckpt", count=1)
    with pytest.raises(SystemExit):
        main([*TRAIN, data, "--model.beta=0.5", f"--resume={run_dir}"])
    # One line: what differs, and the command that resumes it.
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench train: error:")]
    assert "holds a run with another config (model.beta 0.1 there, 0.5 now)" in line
    assert "resume it with `bench train dpo --recipe tiny --eval false --trainer.max_steps=10 " in line
    assert f" {data} --resume={run_dir}`, or train in a new directory" in line
    with pytest.raises(SystemExit):
        main([*TRAIN, data, "--resume=runs/tiny/nothing-here"])
    assert "runs/tiny/nothing-here/checkpoints/last.ckpt does not exist" in capsys.readouterr().err


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
@pytest.mark.parametrize("how", ["run-dir", "latest"])
def test_a_run_checkpointing_elsewhere_resumes_from_there(workdir, hh_path, how):
    """`--checkpoint.dirpath` outside the run directory (scratch storage on a cluster): `--resume RUN_DIR` and
    `--resume` alone find the checkpoint where the run's saved config says it is."""
    data, scratch = f"--data.path={hh_path}", workdir / "scratch" / "checkpoints"
    run_dir = workdir / "runs" / "tiny" / "dpo-elsewhere"
    argv = [*TRAIN, data, f"--checkpoint.dirpath={scratch}"]
    process = bench_process(workdir, *argv, f"--trainer.default_root_dir={run_dir}")
    kill_after_checkpoints(process, scratch / "last.ckpt", count=1)
    assert not (run_dir / "checkpoints").exists()

    main([*argv, f"--resume={run_dir}" if how == "run-dir" else "--resume"])

    (run,) = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == str(scratch / "last.ckpt")
    assert (run_dir / "policy" / "model.safetensors").exists() and not (scratch / "last.ckpt").exists()
