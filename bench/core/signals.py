"""How a command stops on SIGTERM: as on Ctrl-C. `kill`, a scheduler's time limit or preemption and a container's
stop send SIGTERM, whose default ends the process at once: a comparison's or a study's parent run was left
RUNNING until another command found its process gone, and nothing said how to carry on. Raised as a
KeyboardInterrupt, SIGTERM takes the paths Ctrl-C takes (runs marked KILLED, the command that carries on named,
exit 130). Inside `trainer.fit` Lightning handles SIGTERM itself: it stops at the next batch (and keeps
SLURM's auto-requeue working), which `bench.runs.training.fit` reports as an interrupted run."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def stop_as_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


@contextmanager
def handled_sigterm(handler) -> Iterator[None]:
    """SIGTERM goes to `handler` (a function, or signal.SIG_DFL) for the duration; signals can only be set from
    the main thread, so elsewhere (a command called from another thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_as_ctrl_c():
    return handled_sigterm(stop_as_ctrl_c)


def sigterm_to_lightning():
    """Lightning calls the SIGTERM handler it finds as well as its own; with ours it would raise mid-step, so
    it finds the default, and stops at the next batch alone."""
    return handled_sigterm(signal.SIG_DFL)
