"""Faults a user can cause give one line on stderr that names the path or flag, exit 2 and leave nothing
behind: no traceback, no run folder, no MLflow run (issue 17)."""

import gzip
from pathlib import Path

import lightning.pytorch  # noqa: F401 - its log handler binds sys.stderr at import: not a test's capsys
import mlflow
import pytest

from bench.cli import main


def fails_in_one_line(capsys, argv: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def nothing_written(workdir: Path) -> None:
    assert not (workdir / "runs").exists()
    if (workdir / "mlflow.db").exists():
        client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")  # not an earlier test's global URI
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture
def bad_sources(tmp_path, hh_path) -> dict[str, Path]:
    """One source folder per fault, each in the dataset's layout."""
    real = (Path(hh_path) / "harmless-base" / "test.jsonl.gz").read_bytes()
    contents = {
        "truncated": real[: len(real) // 2],
        "plain": b"\n".join(gzip.decompress(real).splitlines()[:5]) + b"\n",  # JSON lines named .jsonl.gz
        "empty": b"",
    }
    sources = {}
    for kind, content in contents.items():
        file = tmp_path / "sources" / kind / "harmless-base" / "test.jsonl.gz"
        file.parent.mkdir(parents=True)
        file.write_bytes(content)
        sources[kind] = file
    return sources


@pytest.mark.parametrize("kind, problem", [("truncated", "truncated gzip file"),
                                           ("plain", "not a gzip file"), ("empty", "empty file (0 bytes)")])
def test_damaged_data_files_are_named_by_bench_data(workdir, capsys, bad_sources, kind, problem):
    file = bad_sources[kind]
    fails_in_one_line(capsys, ["data", str(file.parents[1]), "--tokenizer", "tiny"], str(file), problem)


def test_a_damaged_data_file_stops_bench_train_before_any_run(workdir, capsys, bad_sources):
    file = bad_sources["truncated"]
    fails_in_one_line(capsys, ["train", "dpo", "--recipe", "tiny", f"--data.path={file.parents[1]}"],
                      str(file), "truncated gzip file")
    nothing_written(workdir)


def test_unwritable_or_bad_output_folders_are_named_before_any_work(workdir, capsys):
    a_file = workdir / "a-file"
    a_file.write_text("x")
    # /sys cannot be written, even by root.
    fails_in_one_line(capsys, ["table", "--experiment", "tiny", "--output-dir", "/sys/results"],
                      "--output-dir /sys/results", "cannot write in /sys")
    fails_in_one_line(capsys, ["table", "--experiment", "tiny", f"--output-dir={a_file}/results"],
                      f"--output-dir {a_file}/results", "a file, not a folder")
    fails_in_one_line(capsys, ["perf", "--output", "/sys/perf.md"], "--output /sys/perf.md", "cannot write in /sys")
    fails_in_one_line(capsys, ["perf", "--output", f"{a_file}/perf.md"], f"{a_file}/perf.md", "a file, not a folder")
    for root_dir, problem in (("/sys/dpo-run", "cannot write in /sys"), (f"{a_file}/run", "a file, not a folder")):
        fails_in_one_line(capsys, ["train", "dpo", "--recipe", "tiny", f"--trainer.default_root_dir={root_dir}"],
                          f"--trainer.default_root_dir {root_dir}", problem)
    nothing_written(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["a-file"]


def test_an_unwritable_working_directory_is_named_instead_of_mlflow_retrying(workdir, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir("/sys")
    for argv in (["train", "dpo", "--recipe", "tiny"], ["table", "--experiment", "tiny"]):
        fails_in_one_line(capsys, argv, "the MLflow store (mlflow.db in the working directory) /sys",
                          "cannot write in /sys", "MLFLOW_TRACKING_URI")


def test_lightningclis_optimizer_options_are_not_offered(workdir, capsys):
    fails_in_one_line(capsys, ["train", "dpo", "--recipe", "tiny", "--optimizer=SGD"],
                      "unrecognized arguments: --optimizer=SGD", "see `bench train dpo --help`")
    nothing_written(workdir)
