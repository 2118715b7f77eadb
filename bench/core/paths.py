"""Checks that a folder or file bench is about to write can be written, made before the work that leads up
to the write: a run, a benchmark or a table should not be computed only to fail on its output."""

import errno
import os
import tempfile
from pathlib import Path

from bench.core.errors import BenchError


def cache_dir() -> Path:
    """Where converted models and other derived artefacts live; ``BENCH_CACHE`` overrides."""
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "bench"))


def check_writable_dir(path: Path | str, what: str) -> None:
    """`path` is a folder, or can be made one, and a file can be created in it. `what` names where the
    path came from (a flag) for the message. Nothing is left behind."""
    path = Path(path).expanduser()
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is" if existing == path.absolute() else f"is inside {existing}, which is"
        raise BenchError(f"{what} {path} {where} a file, not a folder")
    try:
        # Root passes every permission check but not a read-only mount, so try rather than os.access.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise BenchError(f"{what} {path}: cannot write in {existing} ({err.strerror or err})") from None


def check_writable_file(path: Path | str, what: str) -> None:
    """A file can be written at `path` (results are written as a temporary file beside it, then renamed)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise BenchError(f"{what} {path} is a folder; give a file name")
    try:
        check_writable_dir(path.parent, what)
    except BenchError as err:  # name the file the user gave, not its folder
        raise BenchError(str(err).replace(f"{what} {path.parent}", f"{what} {path}", 1)) from None


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC, also when a library (safetensors, sqlite) wraps it in an error of its own."""
    while err is not None:
        if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(err) \
                or "database or disk is full" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
