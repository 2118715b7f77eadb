"""MLflow: where runs go, and what each training run records besides its metrics."""

import os
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store in the working directory
    (the file store refuses to start in MLflow 3.13+)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(timeout: float = 5.0) -> None:
    """Fail now, naming the server, if runs would log to an MLflow server that does not answer: MLflow's
    own client would retry for minutes and then fail after the training had run."""
    import urllib.error
    import urllib.request

    from bench.errors import BenchError

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        check_local_store(Path(uri.removeprefix("sqlite:///")))
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # it answered (e.g. 401 behind an auth proxy): reachable
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise BenchError(f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: {reason}. Start it "
                         "(`mlflow server`, see docs/scale-out.md), or unset MLFLOW_TRACKING_URI to log to ./mlflow.db") from err


def check_local_store(database: Path) -> None:
    """A sqlite store in a folder that cannot be written makes MLflow retry for minutes, then fail with a
    SQLAlchemy traceback."""
    from bench.errors import BenchError
    from bench.paths import check_writable_dir

    default = not os.environ.get("MLFLOW_TRACKING_URI")
    what = "the MLflow store (mlflow.db in the working directory)" if default else "the MLflow store (MLFLOW_TRACKING_URI)"
    try:
        check_writable_dir(database.parent, what)
    except BenchError as err:
        raise BenchError(f"{err}; run bench from a folder you can write, or set MLFLOW_TRACKING_URI") from None
    if database.exists() and not os.access(database, os.W_OK):
        raise BenchError(f"{what} {database} is read-only")


def artifact_location() -> str | None:
    """Artifacts of a local sqlite store go beside it; a tracking server chooses its own."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def experiment_id(client, name: str) -> str:
    """The id of the MLflow experiment `name`, created (with its artifacts beside the store) if missing.
    Two processes may create it at once (sweep workers); the one that loses reads the winner's."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location())
    except Exception:  # the store's unique-name violation; its type depends on the backend
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_logger(experiment: str, run_name: str, tags: dict[str, str] | None = None,
                run_id: str | None = None):
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(
        run_id=run_id,
        experiment_name=experiment,
        run_name=run_name,
        tags=tags,
        tracking_uri=tracking_uri(),
        artifact_location=artifact_location(),
        log_model=False,
    )


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def record_run(logger, config: dict, config_file: Path, tags: dict[str, str]) -> None:
    """Tags, every resolved config value as a param, and the config YAML as an artifact. Done here
    rather than by LightningCLI's SaveConfigCallback, which fails with MLflow on sqlite (Lightning #16310)."""
    client, run_id = logger.experiment, logger.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    logger.log_hyperparams(flatten(config))
    client.log_artifact(run_id, str(config_file))
