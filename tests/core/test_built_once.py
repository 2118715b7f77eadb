"""A cached model folder is built by one process at a time: two `bench` commands on a fresh machine (or two
test workers) do not write the same staging folder at once, and the second finds the folder built."""

import multiprocessing
import time
from pathlib import Path

from bench.core.atomic import written_whole
from bench.core.models import _built_once


def slow_build(target: Path) -> None:
    with (target.parent / "builds.log").open("a") as log:
        log.write("build\n")
    with written_whole(target) as staging:
        staging.mkdir()
        time.sleep(1.0)  # long enough that the other process arrives while this one builds
        (staging / "config.json").write_text("{}")


def build_and_report(target: str) -> None:
    built = _built_once(Path(target), slow_build)
    assert (built / "config.json").read_text() == "{}"


def test_two_processes_build_a_cached_folder_once(tmp_path):
    target = tmp_path / "models" / "some-model"
    target.parent.mkdir()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=build_and_report, args=(str(target),)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert [process.exitcode for process in processes] == [0, 0]
    assert (tmp_path / "models" / "builds.log").read_text() == "build\n"  # the second process found it built
    assert sorted(p.name for p in target.parent.iterdir()) == [".some-model.lock", "builds.log", "some-model"]
