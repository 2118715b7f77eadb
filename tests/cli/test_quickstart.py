"""The README's quick start as a newcomer runs it: the `bench` command in a fresh folder outside the repository,
the data found through HH_RLHF_PATH, the default MLflow store in that folder, the tiny recipe."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)  # this checkout, as `.venv/bin/bench` of a clone runs it
    return subprocess.run([sys.executable, "-m", "bench.cli", *argv], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_the_quick_start_from_a_fresh_folder(tmp_path, hh_path, monkeypatch):
    monkeypatch.setenv("HH_RLHF_PATH", hh_path)
    folder = tmp_path / "first-hour"
    folder.mkdir()
    assert REPO not in folder.parents
    trained = bench(folder, "train", "dpo", "--recipe", "tiny")
    assert trained.returncode == 0, trained.stderr
    (line,) = trained.stdout.splitlines()  # stdout is the result alone: Lightning's progress bars go to stderr
    assert line.startswith("run ") and " finished; model saved to runs/tiny/dpo-" in line
    assert "Epoch 0: 100%" in trained.stderr
    # No judge yet: the run says how to evaluate it later, and nothing else a newcomer must wade through.
    assert "--recipe tiny` after training the judge" in trained.stderr
    for noise in ("Traceback", "LightningCLI's args parameter", "Tip:", "LeafSpec", "ExperimentalWarning"):
        assert noise not in trained.stderr, noise
    (policy,) = folder.glob("runs/tiny/dpo-*/policy")
    assert (policy / "config.json").exists() and (folder / "mlflow.db").exists()
    # Before `bench compare` there is nothing to tabulate: one line says so.
    table = bench(folder, "table", "--experiment", "tiny")
    assert table.returncode == 2 and table.stderr.strip() == (
        "bench table: error: experiment 'tiny' has no finished `bench compare` and no sweep with a best trial")
    assert not (folder / "results").exists()
