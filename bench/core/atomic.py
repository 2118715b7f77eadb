"""Writing a results file or a model folder so that a reader never sees half of it."""

import contextlib
import fcntl
import os
import shutil
from pathlib import Path


def write_atomically(path: Path, content: str | bytes) -> None:
    """A temporary file beside `path`, then a rename: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    try:
        staging.write_bytes(content if isinstance(content, bytes) else content.encode())
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


@contextlib.contextmanager
def written_whole(target: Path):
    """Yields a staging folder beside `target`, renamed to `target` when the block ends: a model folder is
    there whole or not at all (a full disk, a crash), never a config without its weights."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier attempt's
    try:
        yield staging
        readable_as_umask_allows(staging)
        if target.exists():  # an earlier save into the same folder: replaced whole, never merged into
            replaced = target.with_name(f".{target.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            target.rename(replaced)
            staging.rename(target)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def readable_as_umask_allows(folder: Path) -> None:
    """Files as an ordinary write would make them (0644 under umask 022): some writers (safetensors) make
    theirs 0600, which hides a shared machine's runs and cache from everyone else."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def held_lock(path: Path):
    """An exclusive lock on the file `path` (made if absent) for the duration: two processes that would build
    the same cached folder (two `bench` commands, or test workers, on a fresh machine) build it one at a time,
    and the second finds it built. Released when the block ends or the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
