"""Library output that tells a `bench` user nothing they can act on, silenced once at start-up. Each entry
names what it hides and why; anything else the libraries say still gets through."""

import logging
import warnings

# (message regex, why it is noise)
HIDDEN_WARNINGS = (
    # bench hands LightningCLI its args on purpose and leaves sys.argv alone for Lightning's DDP launcher.
    r"LightningCLI's args parameter is intended to run from within Python",
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Optuna marks the heartbeat and its retry callback experimental; bench pins Optuna's version.
    r".* is experimental \(supported from v",
    r"Argument ``\w+`` is an experimental feature",
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class _DropTrialException(logging.Filter):
    """Drops what Optuna logs about a trial that raised one exception type: the message with its traceback,
    and the "Trial N failed with value None." after it. bench logs that case itself, in one line."""

    def __init__(self, exception_name: str):
        super().__init__()
        self.exception_name, self.dropped = exception_name, set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = str(record.msg)
        if type(exc).__name__ == self.exception_name:
            self.dropped.add(message.split(" failed", 1)[0])  # "Trial N"
            return False
        return not (message.endswith("failed with value None.") and message.split(" failed", 1)[0] in self.dropped)


_FILTERS: dict[str, logging.Filter] = {}


def quiet_libraries() -> None:
    """Idempotent: `bench` may run main() many times in one process (tests, notebooks)."""
    for message in HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if _FILTERS:
        return
    # Lightning's advertisement for its cloud logger, and the hardware lines, at every Trainer (a comparison
    # builds a dozen); bench's run line names the device, and `bench perf` reports the machine.
    _FILTERS["lightning.pytorch.utilities.rank_zero"] = _DropMessages(("💡 Tip:", "GPU available:", "TPU available:",
                                                                        "HPU available:"))
    # Every stage seeds itself: the seed is a param of its run.
    _FILTERS["lightning.fabric.utilities.seed"] = _DropMessages(("Seed set to",))
    # Each recipe is one MLflow experiment, created on first use: not a problem to warn about.
    _FILTERS["lightning.pytorch.loggers.mlflow"] = _DropMessages(("Experiment with name",))
    # A surplus sweep trial (another worker took the study's last place) is normal, not a failure.
    _FILTERS["optuna.study._optimize"] = _DropTrialException("SurplusTrial")
    for name, log_filter in _FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)
