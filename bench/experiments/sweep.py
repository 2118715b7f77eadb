"""`bench sweep ALGO`: an Optuna study over `sweeps/<algo>.yaml`.

A trial trains with the recipe plus the sampled overrides, then evaluates on the **validation** prompts
(never the test prompts that tables report). The study lives in an RDB storage (SQLite by default), so
rerunning the same command resumes it, and several workers on one storage share it. Each trial's
heartbeat lets a crashed trial be failed and retried. MLflow holds one parent run per study with one
child run per trial.
"""

import copy
import logging
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import sqlalchemy.exc
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

import modules
from bench.core.errors import BenchError, ConfigError, first_line
from bench.core.memory import collections_of_new_objects_only
from bench.core.workers import WORKER_TAG, is_dead_local_worker, this_worker
from bench.experiments.recipe import Recipe
from bench.reports import figures
from bench.runs import tracking
from bench.runs.recipes import SWEEP_DIR, read_yaml_file

log = logging.getLogger(__name__)
# Optuna's default handler writes to the sys.stderr it found when first used, which may since be closed or
# redirected; its lines go through bench's handler on the `optuna` logger instead (bench.cli.logs).
optuna.logging.disable_default_handler()

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("tpe", "grid", "cmaes")


@dataclass
class SearchSpace:
    path: Path
    distributions: dict[str, optuna.distributions.BaseDistribution]
    grid: dict[str, list]


def load_space(algorithm: str, path: str | None = None) -> SearchSpace:
    """Read and check a search-space file: `space:` maps config paths to distributions, `grid:` to values."""
    file = Path(path) if path else SWEEP_DIR / f"{algorithm}.yaml"
    if not file.is_file():
        raise ConfigError(f"no search space for {algorithm!r}: {file} does not exist")
    content = read_yaml_file(file, "search space")
    space = content.get("space") if isinstance(content, dict) else None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search space {file}: `space` must map config paths to distributions")
    distributions = {name: _distribution(file, name, spec) for name, spec in space.items()}
    grid = content.get("grid") or {}
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search space {file}: grid.{name} must be a non-empty list of values")
    return SearchSpace(file, distributions, grid)


def _distribution(file: Path, name: str, spec) -> optuna.distributions.BaseDistribution:
    where = f"search space {file}: space.{name}"
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise ConfigError(f"{where} needs `distribution:` (float, int or categorical)")
    kind, options = spec["distribution"], {k: v for k, v in spec.items() if k != "distribution"}
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}}
    if kind not in allowed:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; use float, int or categorical")
    unknown = set(options) - allowed[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} for a {kind} distribution")
    try:
        if kind == "categorical":
            return CategoricalDistribution(options["choices"])
        number = float if kind == "float" else int
        return (FloatDistribution if kind == "float" else IntDistribution)(
            number(options["low"]), number(options["high"]), log=bool(options.get("log", False)),
            step=options.get("step", None if kind == "float" else 1))
    except KeyError as err:
        raise ConfigError(f"{where}: a {kind} distribution needs {err.args[0]!r}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def suggest(trial: optuna.Trial, name: str, distribution) -> object:
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log,
                                   step=distribution.step)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log,
                                 step=distribution.step)
    return trial.suggest_categorical(name, distribution.choices)


@dataclass
class Objective:
    metric: str
    direction: str  # "maximize" or "minimize"


def parse_objectives(specs: list[str]) -> list[Objective]:
    """`eval/win_rate_vs_chosen`, or `eval/kl:min`; the direction defaults to the metric's better side."""
    from bench.evaluation.evaluate import EVAL_METRICS

    objectives = []
    for spec in specs:
        metric, _, direction = spec.partition(":")
        if metric not in EVAL_METRICS:
            raise ConfigError(f"objective {metric!r} is not a metric that evaluation logs; "
                              f"choose from {', '.join(EVAL_METRICS)}")
        direction = {"": EVAL_METRICS[metric], "max": "maximize", "min": "minimize"}.get(direction, direction)
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"objective {spec!r}: the direction must be max or min")
        objectives.append(Objective(metric, direction))
    if not 1 <= len(objectives) <= 2:
        raise ConfigError(f"give one objective, or two for a multi-objective study; got {len(objectives)}")
    return objectives


def make_sampler(name: str, space: SearchSpace, seed: int, n_objectives: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "grid":
        missing = sorted(set(space.distributions) - set(space.grid))
        if missing:
            raise ConfigError(f"search space {space.path}: the grid sampler needs grid values for {missing}")
        return optuna.samplers.GridSampler(space.grid, seed=seed)
    if name == "cmaes":
        if n_objectives > 1:
            raise ConfigError("CMA-ES is single-objective; use tpe for two objectives")
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def check_trial_config(algorithm: str, recipe: Recipe, space: SearchSpace, overrides: list[str]) -> None:
    """Parse and build a trial's config (the overrides, with each searched value at one end of its range)
    and its eval settings before the study or any MLflow run exists: a bad override then fails here,
    not inside trial 0."""
    from bench.runs.training import train_one

    def example(distribution):
        return distribution.choices[0] if isinstance(distribution, CategoricalDistribution) else distribution.low

    params = [f"--{name}={example(distribution)}" for name, distribution in space.distributions.items()]
    try:
        train_one(algorithm, recipe.name, recipe.config(algorithm), [*overrides, *params], check_only=True)
    except BenchError as err:
        raise BenchError(f"a trial's config: {err}") from None


def default_storage() -> str:
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def open_storage(url: str, heartbeat_interval: int, grace_period: int) -> RDBStorage:
    """Connects now, so that a wrong or unreachable URL fails before any training. A trial whose heartbeat
    stops (its worker died) is failed by the next worker to look, and retried with the same parameters
    (Optuna's RetryHeartbeatStaleTrialCallback, which replaces RetryFailedTrialCallback)."""
    def connect() -> RDBStorage:
        return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))

    try:
        for attempt in range(5):
            try:
                return connect()
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Workers started together on a new database race to create Optuna's tables; the losers
                # find them made once the winner commits.
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except Exception as err:  # SQLAlchemy raises many kinds: bad URL, no driver, refused connection
        shown = url.split("@")[-1] if "@" in url else url  # never print a password
        raise BenchError(f"Optuna storage {shown!r} is unreachable: {type(err).__name__}: {first_line(err)}") from err


class SweepPruning(PyTorchLightningPruningCallback):
    """Reports the monitored validation metric at each validation's global step, not its epoch: a
    short run validates several times within one epoch. (Distributed runs keep the parent's protocol.)"""

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.is_ddp_backend or trainer.sanity_checking:
            return super().on_validation_end(trainer, pl_module)
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ConfigError(f"pruning monitors {self.monitor!r}, which validation did not log; "
                              f"logged: {sorted(k for k in trainer.callback_metrics if k.startswith('val/'))}")
        self._trial.report(value.item(), step=trainer.global_step)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step} ({self.monitor} = {value.item():.4f})")


def fail_dead_local_trials(study: optuna.Study, experiment: str) -> None:
    """Fail, and retry with the same parameters, the running trials of workers on this machine that are
    gone (a killed `bench sweep`), now rather than after the heartbeat's grace period."""
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not (worker and is_dead_local_worker(worker)):
            continue
        try:
            failed = storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            failed = False
        if failed:
            log.warning("trial %d: its worker %s is gone; marked failed and queued again with the same parameters",
                        trial.number, worker)
            tag_trial_run(experiment, study.study_name, trial.number, "FAIL", "FAILED")
            RetryHeartbeatStaleTrialCallback(max_retry=3)(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


def tag_trial_run(experiment: str, study_name: str, number: int, state: str, status: str) -> None:
    """The trial's MLflow run ends with the trial: `optuna.state` tag and run status."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    query = f"tags.`optuna.study` = '{study_name}' and tags.`optuna.trial` = '{number}'"
    for run in client.search_runs([tracking.experiment_id(client, experiment)], query):
        client.set_tag(run.info.run_id, "optuna.state", state)
        client.set_terminated(run.info.run_id, status)


def set_aside_stale_trial_dir(run_dir: Path) -> None:
    """A trial number starts once (a retried trial gets a new number), so a folder already named after it was
    left by an earlier study of the same name, perhaps in a store since deleted: moved aside, not trained in."""
    if not run_dir.exists():
        return
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    log.warning("%s was left by an earlier study named like this one; moved it to %s", run_dir, aside)


class SurplusTrial(Exception):
    """Another worker already started the trial that completes the study."""


@dataclass
class Sweep:
    algorithm: str
    recipe: Recipe
    space: SearchSpace
    objectives: list[Objective]
    study: optuna.Study
    n_trials: int
    overrides: list[str]
    prune: bool
    parent_run_id: str
    command: str  # what carries the study on: an interrupted trial's run says it, not `bench train`'s resume

    @property
    def recipe_name(self) -> str:
        return self.recipe.name

    # --- one trial ----------------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial):
        trial.set_user_attr("worker", this_worker())  # first: a retried trial arrives with its dead worker's
        self.check_not_surplus(trial)
        params = {name: suggest(trial, name, distribution) for name, distribution in self.space.distributions.items()}
        try:
            return self.run_trial(trial, params)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Optuna would leave the trial RUNNING until its heartbeat
            self.study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # expires (3 minutes)
            raise

    def check_not_surplus(self, trial: optuna.Trial) -> None:
        """Workers check the count before asking for a trial, but two can ask at once; the lower numbers win."""
        ahead = [t for t in self.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)]
        if len(ahead) >= self.n_trials:
            trial.set_user_attr("surplus", True)
            log.info("trial %d is not needed: %d trials are already finished or running", trial.number, len(ahead))
            raise SurplusTrial(f"trial {trial.number} is surplus: {len(ahead)} trials are already finished or running")

    def run_trial(self, trial: optuna.Trial, params: dict):
        import gc

        from bench.evaluation.evaluate import evaluate, resolve_target
        from bench.runs.training import train_one

        run_name = f"{self.study.study_name}-trial-{trial.number}"
        tags = {"mlflow.parentRunId": self.parent_run_id, "optuna.study": self.study.study_name,
                "optuna.trial": str(trial.number), "sweep_role": "trial"}
        argv = [*self.overrides, *(f"--{name}={value}" for name, value in params.items())]
        monitor = modules.module_class(self.algorithm).pruning_metric  # logged during training, higher is better
        pruning = SweepPruning(trial, monitor) if self.prune and monitor else None
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in params.items()))
        set_aside_stale_trial_dir(Path("runs", self.recipe_name, run_name))
        try:
            result = train_one(self.algorithm, self.recipe_name, self.recipe.config(self.algorithm), argv, run_name=run_name, tags=tags,
                               callbacks=[pruning] if pruning else None, rerun_command=self.command)
        except optuna.TrialPruned:
            tag_trial_run(self.recipe_name, self.study.study_name, trial.number, "PRUNED", "KILLED")  # stopped on purpose, not failed
            raise
        finally:
            gc.collect()
            # A trial is never resumed (a failed one is retried from the start): its checkpoint is dead weight.
            shutil.rmtree(Path("runs", self.recipe_name, run_name, "checkpoints"), ignore_errors=True)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if result.run_id is None:
            raise BenchError(f"trial {trial.number}: training was interrupted")
        # a study selects on validation prompts: the tables report the test prompts
        settings = replace(self.recipe.eval, split="validation")
        metrics = evaluate(resolve_target(result.run_id, None, {}, self.recipe_name), settings).metrics
        client = mlflow.MlflowClient(tracking.tracking_uri())
        figures.log_win_rates(client, result.run_id)
        client.set_tag(result.run_id, "optuna.state", "COMPLETE")
        values = []
        for objective in self.objectives:
            if objective.metric not in metrics:
                raise ConfigError(f"objective {objective.metric!r} was not logged by this evaluation "
                                  f"(logged: {sorted(metrics)}); proxy_score needs a proxy, judge_score a reward-model judge")
            values.append(metrics[objective.metric])
        return values[0] if len(values) == 1 else values

    # --- the worker loop --------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        trials = self.study.get_trials(deepcopy=False)
        return (sum(t.state in FINISHED for t in trials), sum(t.state == TrialState.RUNNING for t in trials))

    def run(self, poll_seconds: float) -> None:
        """Run trials until the study holds `n_trials` finished ones; wait while other workers finish theirs."""
        with collections_of_new_objects_only():  # each trial ends with a collection (gc_after_trial)
            self.run_trials(poll_seconds)

    def run_trials(self, poll_seconds: float) -> None:
        while True:
            fail_dead_local_trials(self.study, self.recipe_name)
            finished, running = self.counts()
            if finished >= self.n_trials:
                return
            if finished + running >= self.n_trials:
                log.info("%d finished and %d running in other workers; waiting for them", finished, running)
                time.sleep(poll_seconds)
                optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial is retried here
                continue
            self.study.optimize(self.objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)


def parent_run(experiment: str, study_name: str, params: dict) -> str:
    """The study's MLflow parent run, shared by every worker and every resumption. Two workers that start at
    once may both create one; the earliest wins and the other is deleted."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment_id = tracking.experiment_id(client, experiment)
    query = f"tags.`optuna.study` = '{study_name}' and tags.sweep_role = 'study'"
    existing = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])
    if existing:
        return existing[0].info.run_id
    mine = client.create_run(experiment_id, run_name=f"sweep-{study_name}",
                             tags={"optuna.study": study_name, "sweep_role": "study", "algorithm": params["algorithm"]})
    for key, value in params.items():
        client.log_param(mine.info.run_id, key, value)
    earliest = client.search_runs([experiment_id], filter_string=query,
                                  order_by=["attributes.start_time ASC", "attributes.run_id ASC"])[0]
    if earliest.info.run_id != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return earliest.info.run_id


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def record_best(study: optuna.Study, objectives: list[Objective], parent_run_id: str) -> None:
    """Tag the best trial's run (every Pareto-optimal one, with two objectives) and summarise on the parent."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    best = best_trials(study)
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            client.set_tag(run_id, "best_trial", str(trial.number in {t.number for t in best}).lower())
    def on_parent(write, *args):  # every worker records the best when it ends, maybe at the same moment
        tracking.written_despite_a_race(write, parent_run_id, *args)

    for trial in best[:1]:
        on_parent(client.set_tag, "best_trial", str(trial.number))
        on_parent(client.set_tag, "best_run_id", trial.user_attrs.get("mlflow_run_id", ""))
        for objective, value in zip(objectives, trial.values):
            on_parent(client.log_metric, f"best/{objective.metric}", value)
        for name, value in trial.params.items():
            on_parent(client.set_tag, f"best.{name}", str(value))
    on_parent(client.set_tag, "finished_trials", str(sum(t.state in FINISHED for t in study.get_trials())))
    if client.get_run(parent_run_id).info.status != "FINISHED":  # it may be KILLED by a worker stopped earlier
        client.set_terminated(parent_run_id)
    figures.log_figures_of_finished_run(client, parent_run_id, figures.sweep_run_ids(client, parent_run_id))


def summary(study: optuna.Study, objectives: list[Objective]) -> str:
    names = [o.metric for o in objectives]
    lines = [f"study {study.study_name!r}: " + ", ".join(f"{state.name.lower()} {n}" for state in TrialState
                                                         if (n := sum(t.state == state for t in study.get_trials())))]
    for trial in study.get_trials():
        finished = trial.state == TrialState.COMPLETE  # a pruned trial's value is its last intermediate one
        values = ", ".join(f"{n}={v:.4f}" for n, v in zip(names, trial.values or [])) if finished else ""
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        lines.append(f"  trial {trial.number:3d} {trial.state.name:8s} {params}  {values}")
    best = best_trials(study)
    if len(objectives) > 1:
        lines.append(f"Pareto front ({' up, '.join(names)} {'up' if objectives[-1].direction == 'maximize' else 'down'}):")
    for trial in best:
        lines.append(f"  best trial {trial.number}: " + ", ".join(f"{n}={v:.4f}" for n, v in zip(names, trial.values))
                     + "  " + ", ".join(f"{k}={v}" for k, v in trial.params.items()))
    return "\n".join(lines)


def sweep(
    algorithm: str,
    recipe: Recipe,
    n_trials: int,
    study_name: str | None,
    storage_url: str | None,
    sampler_name: str,
    objective_specs: list[str],
    seed: int,
    overrides: list[str],
    prune: bool,
    space_path: str | None = None,
    heartbeat_interval: int = 60,
    grace_period: int = 180,
    poll_seconds: float = 10.0,
    command: str | None = None,
) -> optuna.Study:
    """Everything that can be wrong is checked before the first trial trains."""
    recipe_name = recipe.name
    if algorithm not in modules.algorithms():
        raise BenchError(f"bench sweep: unknown algorithm {algorithm!r}; choose one of {', '.join(modules.algorithms())}")
    if n_trials < 1:
        raise ConfigError(f"--n-trials must be >= 1, got {n_trials}")
    space = load_space(algorithm, space_path)
    objectives = parse_objectives(objective_specs)
    if sampler_name == "grid":
        grid_size = 1
        for values in space.grid.values():
            grid_size *= len(values)
        if n_trials > grid_size:
            log.warning("the grid holds %d points; running %d trials, not %d", grid_size, grid_size, n_trials)
            n_trials = grid_size
    check_trial_config(algorithm, recipe, space, overrides)
    from bench.evaluation.evaluate import check_evaluation_possible

    check_evaluation_possible(recipe_name, recipe.eval, "a study evaluates every trial",
                              needs_proxy=any(o.metric.startswith("eval/proxy") for o in objectives))
    storage = open_storage(storage_url or default_storage(), heartbeat_interval, grace_period)
    study_name = study_name or f"{recipe_name}-{algorithm}"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2) if prune and len(objectives) == 1
              else optuna.pruners.NopPruner())
    make_sampler(sampler_name, space, seed, len(objectives))  # check the sampler before touching the storage
    study = optuna.create_study(study_name=study_name, storage=storage, pruner=pruner,
                                directions=[o.direction for o in objectives], load_if_exists=True)
    # A resumed study must not replay the proposals it already holds, so the sampler's seed is derived from
    # (--seed, trials so far); a sum would let (0, 1) and (1, 0) collide. Workers that start together should
    # be given different --seed values.
    sampler_seed = int(np.random.SeedSequence([seed, len(study.get_trials(deepcopy=False))]).generate_state(1)[0])
    study.sampler = make_sampler(sampler_name, space, sampler_seed, len(objectives))
    if [d.name.lower() for d in study.directions] != [o.direction for o in objectives]:
        raise ConfigError(f"study {study_name!r} exists with directions {[d.name.lower() for d in study.directions]}; "
                          f"these objectives want {[o.direction for o in objectives]}: use another --study-name")
    parent_run_id = parent_run(recipe_name, study_name, {
        "algorithm": algorithm, "recipe": recipe_name, "sampler": sampler_name, "seed": seed,
        "objectives": ",".join(f"{o.metric}:{o.direction}" for o in objectives), "space": str(space.path),
        "overrides": " ".join(overrides)})
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    log.info("study %r in %s: %d of %d trials finished; MLflow parent run %s", study_name, storage.url,
             finished, n_trials, parent_run_id)
    command = command or shlex.join(["bench", "sweep", algorithm, "--recipe", recipe_name, *overrides])
    client = mlflow.MlflowClient(tracking.tracking_uri())
    if client.get_run(parent_run_id).info.status != "RUNNING":  # an interrupted study, resumed
        client.update_run(parent_run_id, status="RUNNING")
    # A later bench closes it if this worker is SIGKILLed; every worker of the study tags it, maybe at once.
    tracking.written_despite_a_race(client.set_tag, parent_run_id, WORKER_TAG, this_worker())
    with tracking.closed_on_error(client, parent_run_id, f"study {study_name!r}", command):
        Sweep(algorithm, recipe, space, objectives, study, n_trials, overrides,
              prune and len(objectives) == 1, parent_run_id, command).run(poll_seconds)
    record_best(study, objectives, parent_run_id)
    print(summary(study, objectives))
    return study
