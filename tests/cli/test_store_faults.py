"""The MLflow store, the disk and a second process (issue 26): a bad MLFLOW_TRACKING_URI, a damaged or half-built
store, a disk that fills, two `bench train` at once. One line naming the problem, exit 2, no traceback, and
nothing half-written left on disk."""

import errno
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401 - its log handler binds sys.stderr at import: not a test's capsys
import mlflow
import pytest
import yaml
from test_user_faults import fails_in_one_line

from bench.cli import main
from bench.runs import recipes, tracking

TINY = ["--recipe", "tiny", "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
        "--eval", "false"]


@pytest.mark.parametrize("uri, needle", [
    ("foo://bar", "MLflow does not track to 'foo'"),
    ("file:///tmp/somewhere", "a folder is MLflow's file store"),
    ("some/folder", "use a sqlite store, for example MLFLOW_TRACKING_URI=sqlite:///"),
])
def test_a_tracking_uri_mlflow_cannot_use_is_one_line(workdir, capsys, monkeypatch, uri, needle):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fails_in_one_line(capsys, ["train", "dpo", *TINY], f"MLFLOW_TRACKING_URI={uri}", needle)
    assert list(workdir.iterdir()) == []


def test_a_damaged_store_is_named_with_what_to_do(workdir, capsys):
    (workdir / "mlflow.db").write_bytes(b"SQLite format 3\x00" + b"\x07" * 3000)  # a truncated, garbled file
    line = fails_in_one_line(capsys, ["train", "dpo", *TINY], f"the MLflow store {workdir / 'mlflow.db'} is damaged",
                             "move it aside")
    assert "runs/ are kept" in line
    assert sorted(p.name for p in workdir.iterdir()) == ["mlflow.db"]  # left for the user to inspect


KILLED_MID_WRITE = r"""
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")  # changed pages spill into the file mid-transaction, behind a journal
db.execute("BEGIN")
db.execute("UPDATE experiments SET name = name || '-half-written'")
db.execute("CREATE TABLE filler (x BLOB)")
for _ in range(64):
    db.execute("INSERT INTO filler VALUES (zeroblob(65536))")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_store_whose_writer_was_killed_mid_write_is_rolled_back_not_called_damaged(workdir, hh_path):
    """A process killed during an MLflow write leaves a hot journal; opening the store read-only cannot roll it
    back ("attempt to write a readonly database"), and bench called the store damaged (seen in CI after a
    killed training run). Opened read-write, sqlite rolls the half-written change back, as MLflow would."""
    database = workdir / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{database}").create_experiment("kept")
    assert subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(database)]).returncode == -9
    assert (workdir / "mlflow.db-journal").stat().st_size > 0  # the hot journal of the killed writer
    main(["train", "dpo", *TINY, f"--data.path={hh_path}"])
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "kept", "tiny"]  # rolled back
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and not (workdir / "mlflow.db-journal").exists()
    with sqlite3.connect(database) as db:
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'filler'").fetchall()


def test_a_half_built_store_is_named_and_not_migrated_further(workdir, capsys):
    mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_experiments()  # a whole store ...
    with sqlite3.connect(workdir / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")  # ... whose migrations stopped midway
    fails_in_one_line(capsys, ["train", "dpo", *TINY], "has schema 0584bdc529eb", "mlflow db upgrade",
                      "moved aside")


def test_bench_table_in_an_empty_folder_creates_no_store(workdir, capsys):
    fails_in_one_line(capsys, ["table", "--experiment", "nosuch"], "no MLflow store at")
    assert list(workdir.iterdir()) == []


def test_a_disk_that_fills_while_the_store_is_built_leaves_no_store(tmp_path, capsys, monkeypatch):
    """A real full disk where the machine lets us mount a small tmpfs (as root), else a simulated ENOSPC."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)], capture_output=True).returncode == 0
    try:
        monkeypatch.chdir(small)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        if not mounted:
            def full(*args, **kwargs):
                raise sqlite3.OperationalError("database or disk is full")
            monkeypatch.setattr(mlflow.MlflowClient, "search_experiments", full)
        fails_in_one_line(capsys, ["train", "dpo", *TINY], f"could not create the MLflow store {small / 'mlflow.db'}",
                          "the disk is full", "nothing was written")
        assert list(small.iterdir()) == []  # no mlflow.db, no half-built staging file
    finally:
        if mounted:
            os.chdir(tmp_path)  # out of the mount; -l: MLflow's engine may still hold the deleted staging file
            subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_disk_that_fills_at_the_model_save_leaves_no_partial_model(workdir, hh_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def save_then_fill(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)  # config.json and the weights are written ...
        if Path(folder).name == ".policy.partial":  # (the trained policy's, not a model being cached)
            raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fill)
    line = fails_in_one_line(capsys, ["train", "dpo", *TINY, f"--data.path={hh_path}", "--trainer.default_root_dir=run",
                                      "--checkpoint.every_n_train_steps=1"],
                             "no space left on the device while training into run", "marked FAILED",
                             "no partial model is left", "Free some space, then:  bench train dpo")
    assert "--resume=run" in line
    (run,) = mlflow.MlflowClient(tracking.tracking_uri()).search_runs([mlflow.MlflowClient(tracking.tracking_uri()).get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED"
    assert sorted(p.name for p in (workdir / "run").iterdir() if not p.name.startswith(".lock")) == \
        ["checkpoints", "config.yaml", "run.json"]  # no policy/ and no .policy.partial/
    assert (workdir / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_two_bench_trains_in_a_new_folder_both_finish(workdir, hh_path):
    """Both create the store at once (an alembic traceback before): one builds it, the other uses it."""
    command = [sys.executable, "-c", "from bench.cli import main; main()", "train", "dpo", *TINY,
               f"--data.path={hh_path}"]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    processes = [subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0 and "Traceback" not in err, err
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert not [p for p in workdir.iterdir() if ".building" in p.name]


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_second_bench_train_into_the_same_folder_is_refused_while_the_first_trains(workdir, hh_path, capsys,
                                                                                      monkeypatch):
    from bench.core.workers import lock_run_dir

    (workdir / "run").mkdir()
    held = lock_run_dir(workdir / "run")  # the first `bench train`, still training
    try:
        fails_in_one_line(capsys, ["train", "dpo", *TINY, f"--data.path={hh_path}", "--trainer.default_root_dir=run"],
                          "is training in", "another --trainer.default_root_dir")
    finally:
        held.close()
    assert sorted(p.name for p in (workdir / "run").iterdir()) == [".lock"]  # nothing of the second one's
    main(["train", "dpo", *TINY, f"--data.path={hh_path}", "--trainer.default_root_dir=run"])  # once it is free
    assert (workdir / "run" / "policy" / "model.safetensors").is_file()


def test_a_misspelt_recipe_section_or_algorithm_is_refused_naming_the_file(workdir, capsys):
    _, recipe = recipes.load("tiny")
    for name, change, needle in [("section.yaml", {"algoritms": {}}, "unknown section 'algoritms'"),
                                 ("algorithm.yaml", {"algorithms": {"dpoo": {"model": {"beta": 0.5}}}},
                                  "unknown algorithm under algorithms: 'dpoo'"),
                                 ("compare.yaml", {"compare": {"stages": ["dpo"], "seed": [0, 1]}},
                                  "unknown compare key 'seed'"),
                                 ("inner.yaml", {"algorithms": {"dpo": {"modle": {"beta": 0.5}}}},
                                  "unknown section under algorithms.dpo: 'modle'")]:
        (workdir / name).write_text(yaml.safe_dump({**recipe, **change}))
        fails_in_one_line(capsys, ["train", "dpo", "--recipe", name], f"recipe {name}: ", needle)
    assert not (workdir / "runs").exists()


def test_eval_true_without_a_judge_is_refused_before_training(workdir, hh_path, capsys):
    fails_in_one_line(capsys, ["train", "dpo", *TINY[:-2], "--eval", "true", f"--data.path={hh_path}"],
                      "--eval true: no finished judge reward model in experiment 'tiny'")
    assert not (workdir / "runs").exists()
    fails_in_one_line(capsys, ["train", "dpo", *TINY[:-2], "--eval", "maybe"], "--eval takes auto, true or false")


def test_bench_table_does_not_overwrite_a_users_csv_or_figure(workdir, capsys):
    mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_experiments()
    out = workdir / "out"
    out.mkdir()
    for name in ("tiny.csv", "tiny-win_rates.png"):
        (out / name).write_text("the user's own")
        fails_in_one_line(capsys, ["table", "--experiment", "tiny", "--output-dir", str(out)],
                          f"{out / name} exists but tiny.md does not: bench did not write it")
        assert (out / name).read_text() == "the user's own"
        (out / name).unlink()


def test_a_run_folder_lock_is_exclusive_until_closed(tmp_path):
    """flock is per open file: a second holder is refused even in the same process (sweep workers in threads)."""
    from bench.core.errors import BenchError
    from bench.core.workers import lock_run_dir, this_worker

    first = lock_run_dir(tmp_path)
    with pytest.raises(BenchError, match=re.escape(f"another bench ({this_worker()}) is training in")):
        lock_run_dir(tmp_path)
    first.close()
    lock_run_dir(tmp_path).close()


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_saved_model_is_readable_by_others_as_the_umask_allows(workdir, hh_path):
    import os

    previous = os.umask(0o022)
    try:
        main(["train", "dpo", *TINY, f"--data.path={hh_path}", "--trainer.default_root_dir=run"])
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (workdir / "run" / "policy").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("flag, needle", [
    ("--trainer.accelerator=gpu", "trainer: No supported gpu backend found!"),
    ("--trainer.max_steps=-5", "trainer: `max_steps` must be a non-negative integer or -1"),
])
def test_a_trainer_setting_lightning_refuses_is_one_line(workdir, hh_path, capsys, flag, needle):
    import torch

    if flag.endswith("gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails_in_one_line(capsys, ["train", "dpo", *TINY, f"--data.path={hh_path}", flag], needle)
    assert not (workdir / "runs").exists()


def test_a_damaged_cached_model_is_named_with_how_to_rebuild_it(workdir, hh_path, capsys, monkeypatch):
    import shutil

    from bench.core.models import resolve

    cache = workdir / "cache"
    shutil.copytree(resolve("tiny"), cache / "models" / "tiny")
    weights = cache / "models" / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    monkeypatch.setenv("BENCH_CACHE", str(cache))
    fails_in_one_line(capsys, ["train", "dpo", *TINY, f"--data.path={hh_path}"],
                      f"model spec 'tiny': {weights} is damaged", f"delete it (rm -r {cache / 'models' / 'tiny'}) and it is rebuilt")
    assert not (workdir / "runs").exists()
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert client.get_experiment_by_name("tiny") is None or not client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id])  # no FAILED run either


def test_a_cache_folder_that_cannot_be_written_is_named_at_once(workdir, hh_path, capsys, monkeypatch):
    (workdir / "a-file").write_text("")
    monkeypatch.setenv("BENCH_CACHE", str(workdir / "a-file" / "cache"))
    fails_in_one_line(capsys, ["train", "dpo", *TINY, f"--data.path={hh_path}"],
                      "the cache folder (BENCH_CACHE)", "is inside", "a file, not a folder")
