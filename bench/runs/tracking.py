"""MLflow: where runs go, and what each training run records besides its metrics."""

import contextlib
import logging
import os
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


def configured_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store in the working directory
    (the file store refuses to start in MLflow 3.13+)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_uri() -> str:
    """`configured_uri()`, for a client about to use it: a local sqlite store that does not exist yet is
    created now, whole (`create_store`), rather than by MLflow in many steps that a full disk or a second
    `bench` can interrupt. Commands refused before they touch MLflow never ask, so they leave no store."""
    uri = configured_uri()
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.exists() and database.parent.is_dir():
            create_store(database)
    return uri


def store_is_missing() -> bool:
    """A local sqlite store that does not exist yet: it holds no run, and a command that only reads runs
    (`bench eval RUN_ID`) must not create it."""
    uri = configured_uri()
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


# What MLflow can track to: its database stores (SQLAlchemy URLs) and a tracking server.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_reachable(timeout: float = 5.0, create: bool = True) -> None:
    """Fail now, in one line naming the problem, if runs cannot be logged where MLFLOW_TRACKING_URI points:
    MLflow's own client would fail with a long traceback, or retry for minutes and fail after training.
    A local sqlite store must be whole and of this MLflow's schema; with `create` false a missing one is refused."""
    import urllib.error
    import urllib.request

    from bench.core.errors import BenchError

    uri = configured_uri()
    check_scheme(uri)
    if uri.startswith("sqlite:///"):
        check_local_store(Path(uri.removeprefix("sqlite:///")), create)
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


def check_scheme(uri: str) -> None:
    from bench.core.errors import BenchError

    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else uri.lower()
    if scheme in TRACKING_SCHEMES:
        return
    if scheme == "file" or "://" not in uri:
        path = uri.split("://", 1)[-1] if "://" in uri else uri
        raise BenchError(f"MLFLOW_TRACKING_URI={uri}: a folder is MLflow's file store, which this MLflow no longer "
                         f"starts; use a sqlite store, for example MLFLOW_TRACKING_URI=sqlite:///{Path(path).expanduser().absolute() / 'mlflow.db'}")
    raise BenchError(f"MLFLOW_TRACKING_URI={uri}: MLflow does not track to {scheme!r}; use sqlite:///PATH, "
                     "http(s)://HOST:PORT (an `mlflow server`) or a database URL such as postgresql://…")


def check_local_store(database: Path, create: bool = True) -> None:
    """A sqlite store in a folder that cannot be written makes MLflow retry for minutes, then fail with a
    SQLAlchemy traceback; a damaged or half-built one fails every later command with one."""
    from bench.core.errors import BenchError
    from bench.core.paths import check_writable_dir

    default = not os.environ.get("MLFLOW_TRACKING_URI")
    what = "the MLflow store (mlflow.db in the working directory)" if default else "the MLflow store (MLFLOW_TRACKING_URI)"
    try:
        check_writable_dir(database.parent, what)
    except BenchError as err:
        raise BenchError(f"{err}; run bench from a folder you can write, or set MLFLOW_TRACKING_URI") from None
    if not database.exists():
        if not create:
            raise BenchError(f"no MLflow store at {database}: run bench where your runs are, or set MLFLOW_TRACKING_URI")
        return  # `tracking_uri()` builds it, when a command first uses it
    if not os.access(database, os.W_OK):
        raise BenchError(f"{what} {database} is read-only")
    check_store_schema(database)


def create_store(database: Path) -> None:
    """Build a new sqlite store under a temporary name, then link it into place: a full disk or a second
    `bench` starting at the same moment never leaves a half-built store (MLflow builds it in many steps)."""
    import mlflow

    from bench.core.errors import BenchError, first_line
    from bench.core.paths import is_disk_full

    building = database.with_name(f".{database.name}.building-{os.getpid()}")
    try:
        mlflow.MlflowClient(f"sqlite:///{building}").search_experiments(max_results=1)
        os.link(building, database)
    except FileExistsError:
        pass  # another bench built it first: use theirs
    except Exception as err:
        raise BenchError(f"could not create the MLflow store {database}: {first_line(err)}"
                         f"{'; the disk is full' if is_disk_full(err) else ''}; nothing was written") from None
    finally:
        for leftover in database.parent.glob(f"{building.name}*"):  # the file and any sqlite journal beside it
            leftover.unlink(missing_ok=True)


def check_store_schema(database: Path) -> None:
    """The store opens and its schema is the one this MLflow writes, else one line saying what to do."""
    import sqlite3

    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    from bench.core.errors import BenchError

    try:  # read-write (the file is writable: checked): a writer killed mid-write left a journal to roll back
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=rw", uri=True)) as connection:
            revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error as err:
        raise BenchError(f"the MLflow store {database} is damaged ({err}): move it aside (mv {database} "
                         f"{database}.damaged) and run again; the run folders under runs/ are kept") from None
    head = ScriptDirectory.from_config(_get_alembic_config(f"sqlite:///{database}")).get_current_head()
    if revision is None or revision[0] != head:
        raise BenchError(f"the MLflow store {database} has schema {revision[0] if revision else 'none'}, this MLflow "
                         f"writes {head}: a store from an older MLflow is upgraded with `mlflow db upgrade "
                         f"sqlite:///{database}`; one left half-built (a full disk) must be moved aside "
                         f"(mv {database} {database}.damaged)")


def artifact_location() -> str | None:
    """Artifacts of a local sqlite store go beside it; a tracking server chooses its own."""
    uri = configured_uri()
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


@contextlib.contextmanager
def closed_on_error(client, run_id: str, what: str, command: str, discard=lambda err: False):
    """A parent run (a comparison's, a study's) never stays RUNNING after its command stopped: KILLED when
    interrupted (and the user is told the command that carries on), FAILED on any other error, tagged why;
    deleted when `discard(err)` says it holds nothing (a command refused before its first stage)."""
    try:
        yield
    except BaseException as err:
        if discard(err):
            with contextlib.suppress(Exception):
                client.delete_run(run_id)
            raise
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        status = "KILLED" if interrupted else "FAILED"
        with contextlib.suppress(Exception):  # the store itself may be what failed
            client.set_tag(run_id, "stopped", "interrupted" if interrupted else f"{type(err).__name__}: {err}"[:500])
            client.set_terminated(run_id, status)
        hint = f" The same command carries on from where it stopped:  {command}" if interrupted else ""
        logging.getLogger(__name__).warning("%s stopped; its MLflow parent run %s is marked %s.%s", what, run_id, status, hint)
        raise


def written_despite_a_race(write, *args, attempts: int = 3):
    """`write(*args)`, an MlflowClient write that another process may make at the same moment (sweep workers
    writing a study's parent run; two runs of one experiment logging the same dataset): MLflow's SQL store
    reads, then inserts, so of two processes inserting the same tag, latest metric or dataset one fails on the
    unique key; written again, it finds the other's row and uses it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return write(*args)
        except MlflowException as err:
            if "unique" not in str(err).lower() or attempt == attempts - 1:
                raise
            log.info("another process wrote the same row at the same moment (%s); writing it again",
                     getattr(write, "__name__", "a write"))


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


def record_run(logger, config: dict, config_file: Path, tags: dict[str, str], key_params: dict | None = None) -> None:
    """Tags, every resolved config value as a param (and `key_params` besides), and the config YAML as an
    artifact. Done here rather than by LightningCLI's SaveConfigCallback, which fails with MLflow on sqlite
    (Lightning #16310)."""
    client, run_id = logger.experiment, logger.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    logger.log_hyperparams({**flatten(config), **(key_params or {})})
    client.log_artifact(run_id, str(config_file))


def log_datasets(client, run_id: str, source: str, subsets: list[str] | None, pairs_by_split: dict, context: dict) -> None:
    """The preference pairs a run trained, validated or was evaluated on, as MLflow datasets: named by source,
    subsets and split, with the digest of the rows themselves, so that runs on different data differ in the UI.
    `context` maps each split to MLflow's dataset context ("training", "validation", "evaluation")."""
    from dataclasses import asdict

    import mlflow.data
    import pandas as pd
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    where = f"{Path(source).name or source}" + (f"[{','.join(subsets)}]" if subsets else "")
    inputs = []
    for split, pairs in pairs_by_split.items():
        # A local folder (the data was just read: it exists) is its own source; a hub id is a dataset on the hub.
        origin = (str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else
                  HuggingFaceDatasetSource(path=source, data_dir=",".join(subsets) if subsets else None, split=split))
        dataset = mlflow.data.from_pandas(pd.DataFrame([asdict(pair) for pair in pairs]), source=origin,
                                          name=f"{where}:{split}")
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context[split])]))
    written_despite_a_race(client.log_inputs, run_id, inputs)  # two runs may log the same dataset at once


def newest_finished_output(experiment: str, filter_string: str, accept=lambda run: True) -> tuple[str, Path] | None:
    """The newest FINISHED run of the experiment that matches `filter_string` (and `accept`) and whose output
    (its `output_path` tag) is still on disk: its id and output. A missing local store holds none, and is not
    created by asking (a command refused for want of a reward model leaves no empty store behind)."""
    import mlflow

    if store_is_missing():
        return None
    client = mlflow.MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    for run in client.search_runs([found.experiment_id], f"{filter_string} and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"]):
        output = Path(run.data.tags.get("output_path", ""))
        if run.data.tags.get("output_path") and output.exists() and accept(run):
            return run.info.run_id, output
    return None


def find_reward_model(experiment: str, role: str) -> str:
    """The folder of the newest finished reward model for `role` in the experiment; a `shared` model
    serves either role because it was chosen explicitly."""
    import modules
    from bench.core.errors import BenchError

    found = newest_finished_output(experiment, f"tags.algorithm = '{modules.reward_model_name()}'",
                                   lambda run: run.data.tags.get("role") in (role, "shared"))
    if found is None:
        raise BenchError(f"no finished {role} reward model in experiment {experiment!r}; "
                         f"train one with `bench train {modules.reward_model_name()} --recipe {experiment}` or pass a folder")
    return str(found[1])
