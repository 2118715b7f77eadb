"""Writing a results file so that a reader never sees half of it."""

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
