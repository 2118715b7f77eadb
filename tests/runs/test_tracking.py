"""MLflow writes that several processes make at once: each run's datasets are logged even when another run
logs the same dataset at the same moment (MLflow's SQL store reads, then inserts, and the loser of the race
failed on the unique key: a traceback after training, seen when two `bench train` shared a new folder)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

CHILD = r"""
import sys, time
from pathlib import Path
import mlflow
from bench.runs import tracking
from datamodules.hh_rlhf import Pair

uri, barrier = sys.argv[1], Path(sys.argv[2])
client = mlflow.MlflowClient(uri)
run_id = client.create_run(tracking.experiment_id(client, "race")).info.run_id
pairs = {"train": [Pair(prompt="\n\nHuman: Hi\n\nAssistant:", chosen=" Hello.", rejected=" Go away.")]}
(barrier / f"ready-{run_id}").touch()
while not (barrier / "go").exists():
    time.sleep(0.001)
tracking.log_datasets(client, run_id, str(barrier), None, pairs, {"train": "training"})
"""


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_runs_logging_the_same_dataset_at_once_all_log_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # the store exists before the race: the race is the dataset's
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", CHILD, uri, str(barrier)], env=env, stderr=subprocess.PIPE,
                                  text=True) for _ in range(6)]
    deadline = time.time() + 300
    while len(list(barrier.glob("ready-*"))) < len(processes) and time.time() < deadline:
        time.sleep(0.05)
    (barrier / "go").touch()  # all six insert the same dataset within a few milliseconds (4 of 6 failed before)
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 6 and not [e for e in errors if "Traceback" in e], errors
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 6
    logged = [[(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] for run in runs]
    assert len(logged[0]) == 1 and logged[0][0][0] == "barrier:train"
    assert logged == [logged[0]] * 6  # one dataset, the same row for every run
