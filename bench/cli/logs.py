"""bench's log lines on stderr: `LEVEL logger: message`, for bench's own loggers and its models' and data's."""

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so that redirection (and pytest) is respected."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def configure_logging() -> None:
    # Lightning configures its own loggers; Optuna's own handler binds the sys.stderr of the moment it is first
    # used (`bench.experiments.sweep` removes it), so its lines come through here too.
    for name in ("bench", "modules", "datamodules", "optuna"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
