"""Which process a run or trial belongs to, and whether that process is gone: `bench train` and `bench sweep`
tag what they start with host:pid:start-time, so a later command can close what a SIGKILL left RUNNING."""

import os
import socket
from pathlib import Path

WORKER_TAG = "bench.worker"


def this_worker() -> str:
    """host:pid:start-time. The start time tells a live worker from a later process that reuses its pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{process_start_time(os.getpid())}"


def process_start_time(pid: int) -> str:
    try:  # field 22 of /proc/PID/stat, after the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def is_dead_local_worker(worker: str) -> bool:
    host, pid, started = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return False  # another machine's worker: its heartbeat says when it died
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return started != "?" and process_start_time(int(pid)) != started


def lock_run_dir(run_dir: Path):
    """An open file holding an exclusive lock on `run_dir` until it is closed (or this process ends): two
    `bench` processes never train into one folder, where one model would silently replace the other."""
    import fcntl

    from bench.core.errors import BenchError

    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held open for the whole training
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise BenchError(f"another bench ({holder}) is training in {run_dir}; wait for it to finish, or train in "
                         "another --trainer.default_root_dir") from None
    handle.truncate(0)
    handle.write(this_worker())
    handle.flush()
    return handle


def close_dead_runs(client, experiment: str) -> None:
    """Mark KILLED the RUNNING runs of the experiment whose `bench` process on this machine is gone."""
    import logging

    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'"):
        worker = run.data.tags.get(WORKER_TAG)
        if worker and is_dead_local_worker(worker):
            client.set_terminated(run.info.run_id, "KILLED")
            client.set_tag(run.info.run_id, "killed", f"its process {worker} is gone")
            logging.getLogger(__name__).warning("MLflow run %s (%s) was RUNNING but its process is gone: marked KILLED",
                                                run.info.run_id, run.info.run_name)
