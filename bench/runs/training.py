"""One training run: a recipe section and command-line overrides in, a LightningCLI run logged to MLflow out.
`bench train`, every `bench compare` stage and every `bench sweep` trial go through `train_one`."""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import mlflow
import yaml

from bench.core import precision
from bench.core.errors import BenchError, first_line
from bench.core.paths import check_writable_dir, is_disk_full
from bench.core.signals import sigterm_to_lightning
from bench.core.workers import WORKER_TAG, close_dead_runs, lock_run_dir, this_worker
from bench.runs import recipes, tracking

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str | None  # None when training was interrupted
    output_path: Path
    reused: bool = False  # a finished run with the same config served instead


def default_precision() -> str:
    """bf16 autocast where the hardware has bf16 arithmetic, else fp32 (`bench.core.precision`)."""
    return "bf16-mixed" if precision.bf16_arithmetic() else "32-true"


def config_fingerprint(algorithm: str, config: dict) -> str:
    """What makes two runs the same experiment: the algorithm and its resolved config, less where and how
    often it is written."""
    trainer = {k: v for k, v in config["trainer"].items() if k not in ("default_root_dir", "logger")}
    kept = {k: v for k, v in config.items() if k != "checkpoint"}
    payload = json.dumps({"algorithm": algorithm, **kept, "trainer": trainer}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resume_checkpoint_class():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class ResumeCheckpoint(ModelCheckpoint):
        """`last.ckpt` every N steps, to resume a killed run. Unlike ModelCheckpoint it writes none when
        training ends: a finished run keeps its model in HF format, and the checkpoint is then removed."""

        def on_train_end(self, trainer, pl_module) -> None:
            pass

    return ResumeCheckpoint


RUN_RECORD = "run.json"  # in the run directory: its MLflow run and config fingerprint, read on resume
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# The run directory, for the processes that Lightning's DDP launcher starts: they rerun this command, and
# must train in rank 0's directory, not one named after their own start time.
RUN_DIR_ENV = "BENCH_RUN_DIR"


def resume_checkpoint(run_dir: Path) -> Path:
    """Where a run directory's resume checkpoint is: in the `checkpoint.dirpath` its saved config names (a
    user's `--checkpoint.dirpath`, on scratch storage say), else in its own `checkpoints/`."""
    dirpath = None
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        dirpath = saved["checkpoint"]["dirpath"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):  # no config saved yet, or not one of ours
        pass
    return Path(dirpath) / LAST_CHECKPOINT.name if isinstance(dirpath, str) and dirpath else run_dir / LAST_CHECKPOINT


def latest_unfinished_run_dir(recipe_name: str, algorithm: str, output_name: str) -> Path:
    """The newest run directory of this algorithm with a checkpoint and no saved model: the experiment's
    unfinished runs (wherever --trainer.default_root_dir put them), and `runs/<recipe>/<algorithm>-*`."""
    dirs = {last.parent.parent for last in Path("runs", recipe_name).glob(f"{algorithm}-*/{LAST_CHECKPOINT}")}
    client = mlflow.MlflowClient(tracking.tracking_uri())
    if (experiment := client.get_experiment_by_name(recipe_name)) is not None:
        query = f"tags.algorithm = '{algorithm}' and attributes.status != 'FINISHED'"
        dirs |= {Path(run.data.tags["output_path"]).parent for run in client.search_runs([experiment.experiment_id], query)
                 if run.data.tags.get("output_path")}
    checkpoints = {d: resume_checkpoint(d) for d in dirs if not (d / output_name).exists()}
    candidates = {d: last for d, last in checkpoints.items() if last.exists()}
    if not candidates:
        raise BenchError(f"--resume: no unfinished {algorithm} run with a checkpoint under {Path('runs', recipe_name)}")
    return max(candidates, key=lambda run_dir: candidates[run_dir].stat().st_mtime)


def earlier_run(run_dir: Path) -> dict | None:
    """The record of the run that `run_dir` already holds, if any; a finished one is never trained over."""
    record_file = run_dir / RUN_RECORD
    if not record_file.exists():
        if (last := resume_checkpoint(run_dir)).exists():
            raise BenchError(f"{last} exists but {record_file} does not: not a `bench train` "
                             "run directory")
        return None
    try:
        record = json.loads(record_file.read_text())
        status = mlflow.MlflowClient(tracking.tracking_uri()).get_run(record["mlflow_run_id"]).info.status
    except Exception as err:  # a damaged record, or a run this tracking store does not hold
        raise BenchError(f"{record_file}: cannot read its MLflow run from {tracking.tracking_uri()}: "
                         f"{type(err).__name__}: {first_line(err)}") from err
    if status == "FINISHED":
        raise BenchError(f"{run_dir} holds MLflow run {record['mlflow_run_id']}, which already finished; "
                         "train in a new directory")
    return record


def another_config_message(run_dir: Path, earlier: dict, config: dict) -> str:
    """Why a resume is refused: the settings that differ from the run's own (its config.yaml), and the command
    that resumes it."""
    differences = []
    if (run_dir / "config.yaml").exists():
        original = tracking.flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
        given = tracking.flatten(json.loads(json.dumps(config)))  # as the YAML holds it: lists, not tuples
        differences = [f"{key} {original.get(key, '(unset)')} there, {given.get(key, '(unset)')} now"
                       for key in sorted(set(original) | set(given)) if original.get(key) != given.get(key)]
    shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
    command = earlier.get("resume_command")
    return (f"{run_dir} holds a run with another config ({shown or 'fingerprint ' + earlier['config_fingerprint']}); "
            + (f"resume it with `{command}`" if command else "resume with the same recipe and overrides")
            + ", or train in a new directory")


def at_a_glance(algorithm: str, config: dict, tags: dict[str, str]) -> tuple[str, dict[str, object]]:
    """The run's name in the MLflow UI (what, seed, budget) and its key params. The `algo.` params sort before
    every config section: MLflow's compare view plots the first three params that differ, alphabetically."""
    trainer, flat = config["trainer"], tracking.flatten(config)
    epochs = trainer.get("max_epochs") or 1
    budget = (f"{trainer['max_steps']} steps" if (trainer.get("max_steps") or -1) > 0
              else f"{epochs} epoch{'s' if epochs > 1 else ''}")
    label = tags.get("compare_stage") or (f"{tags['optuna.study']} trial {tags['optuna.trial']}"
                                          if "optuna.trial" in tags else algorithm)
    params = {"algo.name": algorithm, "algo.seed": config["seed_everything"], "algo.budget": budget,
              **{f"algo.{key.split('.')[-1]}": flat.get(key) for key in recipes.key_settings(algorithm)}}
    return f"{label} · seed {config['seed_everything']} · {budget}", params


def find_finished_run(experiment: str, fingerprint: str) -> tuple[str, Path] | None:
    """A finished run of this config whose model is still on disk: its id and output."""
    return tracking.newest_finished_output(experiment, f"tags.config_fingerprint = '{fingerprint}'")


def reward_train_subset(role: str, train_on: str) -> str:
    """The train pairs a reward model reads: all of them for a shared or gold model, or when asked; else its role's half."""
    return "all" if role in ("shared", "gold") or train_on == "all" else role


@dataclass
class RunOptions:
    """What a `train_one` call fixes for its TrainCLI, besides the config and the command line."""
    algorithm: str
    recipe_name: str
    run_name: str  # the run directory's name, unless --trainer.default_root_dir names the directory
    module_class: type
    tags: dict[str, str] | None
    callbacks: list | None
    check_only: bool
    is_rank_zero: bool

    @property
    def is_reward_model(self) -> bool:
        return self.module_class.model_key != "policy"

    @property
    def model_spec_key(self) -> str:
        """The model section's key naming the HF model: the tokenizer and the run's `model` tag follow it."""
        return self.module_class.model_key


def run_dir_and_name(algorithm: str, recipe_name: str, output_name: str, argv: list[str], run_name: str | None,
                     resume: str | None) -> tuple[list[str], str, bool]:
    """The command line and run name that put this process in its run directory, and whether it is rank 0:
    a resumed run's directory, rank 0's for the other processes of a DDP run, or a new one named by the time."""
    if resume is not None:
        run_dir = latest_unfinished_run_dir(recipe_name, algorithm, output_name) if resume == "latest" else Path(resume)
        if not (last := resume_checkpoint(run_dir)).exists():
            raise BenchError(f"--resume: {last} does not exist")
        argv, run_name = [*argv, f"--trainer.default_root_dir={run_dir}"], run_dir.name
    from lightning.pytorch.utilities import rank_zero_only

    is_rank_zero = rank_zero_only.rank == 0  # from the launcher's environment (LOCAL_RANK, RANK, SLURM_PROCID)
    if os.environ.get(RUN_DIR_ENV) and not is_rank_zero:
        argv, run_name = [*argv, f"--trainer.default_root_dir={os.environ[RUN_DIR_ENV]}"], Path(os.environ[RUN_DIR_ENV]).name
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(a.startswith("--trainer.default_root_dir") for a in argv):
        raise BenchError("started as one of several processes (torchrun, SLURM): pass --trainer.default_root_dir "
                         "so that every process trains in the same run directory")
    # The process id keeps two `bench train` started in the same second out of each other's folder.
    return argv, run_name or f"{algorithm}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}", is_rank_zero


def check_manual_optimisation(trainer_config: dict, options: "RunOptions") -> None:
    """Lightning clips and accumulates gradients only under automatic optimisation, and stops a run that asks for
    either under manual optimisation with a traceback. The online algorithms step by hand: one update per rollout
    (or `model.num_iterations`, PPO's `ppo_epochs`), each clipped at `model.max_grad_norm`."""
    if not options.module_class.online:
        return
    if (clip := trainer_config.get("gradient_clip_val")) is not None:
        raise BenchError(f"trainer.gradient_clip_val={clip}: {options.algorithm} clips each of its updates at "
                         "--model.max_grad_norm instead; leave trainer.gradient_clip_val unset (null)")
    if (accumulate := trainer_config.get("accumulate_grad_batches") or 1) != 1:
        raise BenchError(f"trainer.accumulate_grad_batches={accumulate}: {options.algorithm} takes its optimizer steps "
                         "itself, on each rollout's whole batch; give a larger --data.batch_size instead")


def check_training_budget(trainer_config: dict) -> None:
    for key in ("max_steps", "max_epochs", "limit_train_batches"):
        if trainer_config.get(key) == 0:  # Lightning would save the untrained model as a finished run
            raise BenchError(f"--trainer.{key}=0 trains nothing; give it a positive value")


def check_nodes(trainer_config: dict) -> None:
    """Several nodes need a launcher that tells each process its place (SLURM, torchrun, LSF, MPI; Kubeflow and
    hand-made launches set RANK and WORLD_SIZE) or NODE_RANK set by hand on each. Without either, every process
    takes itself for node 0 and waits for the others until the process group times out."""
    from lightning.pytorch.plugins import environments

    nodes = trainer_config.get("num_nodes") or 1
    launchers = (environments.SLURMEnvironment, environments.TorchElasticEnvironment, environments.LSFEnvironment,
                 environments.MPIEnvironment)
    placed = "NODE_RANK" in os.environ or {"RANK", "WORLD_SIZE"} <= os.environ.keys()
    if nodes > 1 and not placed and not any(launcher.detect() for launcher in launchers):
        raise BenchError(f"--trainer.num_nodes={nodes}: no multi-node launcher found (SLURM, torchrun, LSF, MPI) "
                         "and neither NODE_RANK nor RANK and WORLD_SIZE are set, so this process would wait for the "
                         "other nodes; start bench on every node through a launcher, or set MASTER_ADDR, MASTER_PORT "
                         "and NODE_RANK on each (docs/scale-out.md)")


def place_resume_checkpoint(config, run_dir: Path) -> Path | None:
    """Puts the resume checkpoint in the run directory unless told otherwise; the one already there, if any."""
    checkpoint = config["checkpoint"]
    checkpoint["dirpath"] = checkpoint.get("dirpath") or str(run_dir / LAST_CHECKPOINT.parent)
    if config["trainer"].get("enable_checkpointing") is False:  # the resume checkpoint is a callback
        config["trainer"]["enable_checkpointing"] = True
        checkpoint.update(every_n_train_steps=0, save_last=False)
        log.info("trainer.enable_checkpointing=false: this run writes no checkpoint and cannot be resumed")
    last = Path(checkpoint["dirpath"]) / LAST_CHECKPOINT.name
    return last if last.exists() else None


def resolve_latest_proxies(config, recipe_name: str) -> None:
    """PPO's model.proxy and the ranked view's data.proxy: "latest" is the experiment's newest proxy."""
    for section in ("model", "data"):
        if config[section].get("proxy") == "latest":
            config[section]["proxy"] = tracking.find_reward_model(recipe_name, "proxy")
            log.info("%s.proxy: the newest proxy of experiment %r, %s", section, recipe_name, config[section]["proxy"])


def train_cli_class():
    """The LightningCLI of `bench train`, made on demand: Lightning is slow to import."""
    from lightning.pytorch.cli import LightningCLI

    from bench.runs.throughput import TrainingThroughput

    class TrainCLI(LightningCLI):
        """Parses and builds one run's model, data and trainer; `run_options` says which run."""

        def __init__(self, run_options: RunOptions, *args, **kwargs):
            self.run_options = run_options  # before LightningCLI's constructor, which calls the methods below
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser):
            module_class = self.run_options.module_class
            parser.link_arguments(f"model.{self.run_options.model_spec_key}", "data.tokenizer")
            if self.run_options.is_reward_model:
                parser.link_arguments(("model.role", "model.train_on"), "data.train_subset", compute_fn=reward_train_subset)
                parser.link_arguments("model.max_length", "data.max_length")
            # Resumable runs: the last checkpoint every N steps, with optimizer, scheduler, loop and data position.
            parser.add_lightning_class_args(resume_checkpoint_class(), "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                                 "checkpoint.every_n_train_steps": 50})
            parser.set_defaults({"data.view": module_class.data_view, "trainer.precision": default_precision()})
            if module_class.data_view == "ranked":
                parser.set_defaults({"data.proxy": "latest"})

        def before_instantiate_classes(self):
            options = self.run_options
            given_dir = self.config["trainer"].get("default_root_dir")
            self.run_dir = Path(given_dir or Path("runs") / options.recipe_name / options.run_name)
            check_writable_dir(self.run_dir, "--trainer.default_root_dir" if given_dir else "the run directory")
            check_training_budget(self.config["trainer"])
            check_nodes(self.config["trainer"])
            check_manual_optimisation(self.config["trainer"], options)
            self.resume_from = place_resume_checkpoint(self.config, self.run_dir)
            # Rank 0 keeps the run's records; the other processes only train with it.
            self.earlier = earlier_run(self.run_dir) if options.is_rank_zero and not options.check_only else None
            resolve_latest_proxies(self.config, options.recipe_name)
            if options.module_class.data_view == "ranked":  # before the logger makes a store: a bad proxy leaves none
                from modules.reward_model import check_proxy

                check_proxy(self.config["data"]["proxy"], self.config["data"]["allow_judge_as_proxy"])

        def instantiate_trainer(self, **kwargs):
            options = self.run_options
            if options.check_only:
                return None
            # Its logger comes later (`attach_logger`), as the logger makes the MLflow store.
            trainer = super().instantiate_trainer(logger=False, default_root_dir=str(self.run_dir), **kwargs)
            trainer.callbacks.extend([TrainingThroughput(), *(options.callbacks or [])])
            return trainer

        def attach_logger(self) -> None:
            """The run's MLflow logger, made once the settings and the data have been read: a fault in either
            stops the command before it has made a store."""
            options = self.run_options
            resumed_run_id = self.earlier["mlflow_run_id"] if self.resume_from and self.earlier else None
            self.run_logger = tracking.make_logger(options.recipe_name, self.run_dir.name, options.tags,
                                                   run_id=resumed_run_id)
            self.trainer.logger = self.run_logger

    return TrainCLI


def build_cli(options: RunOptions, recipe_config: dict, argv: list[str]):
    """The TrainCLI of the recipe's config and the overrides, with a bad value as one line; the ranked view's
    proxy is checked here, so that `check_only` sees it too."""
    from datamodules.hh_datamodule import HHRLHFDataModule

    algorithm = options.algorithm
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{options.recipe_name}-{algorithm}-") as recipe_file:
        yaml.safe_dump(recipe_config, recipe_file)
        recipe_file.flush()
        # sys.argv stays as it is: Lightning's DDP launcher reruns it in the processes it starts.
        try:
            cli = train_cli_class()(
                options,
                options.module_class,
                HHRLHFDataModule,
                args=["--config", recipe_file.name, *argv],
                run=False,
                save_config_callback=None,
                # LightningCLI's --optimizer/--lr_scheduler would replace the modules' own configure_optimizers,
                # which build their parameter groups after configure_model: not offered.
                auto_configure_optimizers=False,
                parser_kwargs={"prog": f"bench train {algorithm}", "exit_on_error": False},
            )
        except argparse.ArgumentError as err:  # jsonargparse's, with exit_on_error off: one line, not its usage
            raise BenchError(f"{' '.join(str(err).split())}; see `bench train {algorithm} --help`") from None
        except Exception as err:
            if refused_by_lightning(err):  # a trainer setting (no GPU, max_steps=-5, FSDP on a CPU): before any run
                raise BenchError(trainer_refusal(err)) from None
            raise
    if cli.datamodule.hparams.view == "ranked":  # the data layer scores its candidates with the proxy it is given
        from modules.reward_model import load_proxy

        cli.datamodule.load_proxy = load_proxy
    return cli


def resolved_config(cli) -> dict:
    """The run's config as the trainer, model and datamodule really got it: the parser's dump leaves out linked
    and overridden values."""
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    config["trainer"].update(logger="MLFlowLogger", default_root_dir=str(cli.run_dir))
    config["data"].update({key: cli.datamodule.hparams[key] for key in ("tokenizer", "train_subset", "max_length", "proxy")})
    if "proxy" in config["model"]:
        config["model"]["proxy"] = cli.model.hparams.proxy
    return config


def claim_run_dir(client, cli, recipe_name: str) -> dict | None:
    """Makes and locks the run directory (held until fit ends); the record of the unfinished run it holds, if any."""
    tracking.experiment_id(client, recipe_name)  # made here, safely when two start at once; the logger only finds it
    close_dead_runs(client, recipe_name)
    cli.run_dir.mkdir(parents=True, exist_ok=True)
    cli.run_lock = lock_run_dir(cli.run_dir)
    earlier = cli.earlier
    if earlier is None and (earlier := earlier_run(cli.run_dir)):  # written by a run that held the lock meanwhile
        raise BenchError(f"{cli.run_dir} was taken by MLflow run {earlier['mlflow_run_id']} meanwhile; train in another folder")
    return earlier


def reopen_run(client, cli, earlier: dict, config: dict, fingerprint: str) -> None:
    """A resumed run carries on in its own MLflow run, and only with the config it started with."""
    if earlier["config_fingerprint"] != fingerprint:
        raise BenchError(another_config_message(cli.run_dir, earlier, config))
    client.set_tag(earlier["mlflow_run_id"], "resumed_from", str(cli.resume_from))
    client.set_tag(earlier["mlflow_run_id"], WORKER_TAG, this_worker())
    client.update_run(earlier["mlflow_run_id"], status="RUNNING")  # it was KILLED (or left RUNNING by a SIGKILL)
    log.info("resuming MLflow run %s from %s", earlier["mlflow_run_id"], cli.resume_from)


def run_tags(options: RunOptions, config: dict, fingerprint: str, output_path: Path) -> dict[str, str]:
    """The tags a new run is found and compared by."""
    data = config["data"]
    tags = {
        "algorithm": options.algorithm,
        "recipe": options.recipe_name,
        "model": config["model"][options.model_spec_key],
        "data_source": data["path"] + (f"[{','.join(data['subsets'])}]" if data.get("subsets") else ""),
        "seed": str(config["seed_everything"]),
        "git_commit": tracking.git_commit(),
        "precision": str(config["trainer"]["precision"]),
        "output_path": str(output_path),
        "config_fingerprint": fingerprint,
        "mlflow.source.name": f"bench train {options.algorithm}",  # the UI's Source column; MLflow would show sys.argv[0]
        WORKER_TAG: this_worker(),  # a later bench closes the run if this process dies without a word (SIGKILL)
    }
    if options.is_reward_model:
        tags["role"] = config["model"]["role"]
    proxy = config["model"].get("proxy") or (data["proxy"] if data["view"] == "ranked" else None)
    if proxy:
        tags["proxy"] = proxy
    return tags


def record_new_run(client, cli, options: RunOptions, earlier: dict | None, config: dict, fingerprint: str,
                   output_path: Path) -> None:
    """Writes a new run's config, tags, key params and datasets to MLflow, and its record (`run.json`) to the
    run directory, where a resume finds it."""
    if earlier:  # it died before its first checkpoint: start over, and say so on its MLflow run
        client.set_terminated(earlier["mlflow_run_id"], "KILLED")
        client.set_tag(earlier["mlflow_run_id"], "abandoned",
                       f"restarted in {cli.run_dir}: it died before its first checkpoint")
    config_file = cli.run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    tags = run_tags(options, config, fingerprint, output_path)
    name, key_params = at_a_glance(options.algorithm, config, {**(options.tags or {}), **tags})
    tracking.record_run(cli.run_logger, config, config_file, {**tags, "mlflow.runName": name}, key_params)
    data = config["data"]
    tracking.log_datasets(client, cli.run_logger.run_id, data["path"], data.get("subsets"), cli.datamodule.pairs,
                          {"train": "training", "validation": "validation"})
    (cli.run_dir / RUN_RECORD).write_text(json.dumps({"mlflow_run_id": cli.run_logger.run_id,
                                                      "config_fingerprint": fingerprint,
                                                      "resume_command": cli.resume_command}))
    log.info("MLflow run %s (experiment %r) at %s", cli.run_logger.run_id, options.recipe_name, tracking.tracking_uri())


def train_one(
    algorithm: str,
    recipe_name: str,
    config: dict,
    argv: list[str],
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    reuse: bool = False,
    resume: str | None = None,
    check_only: bool = False,
    rerun_command: str | None = None,
    bench_args: list[str] | None = None,
) -> TrainResult | None:
    """Train one module with LightningCLI and log it to MLflow: `config` is its config from the recipe
    (`Recipe.config`), `argv` the command line's LightningCLI overrides, applied over it.

    `tags` go on the run (`mlflow.parentRunId` nests it under a comparison or a study), `callbacks` join the
    recipe's, and with `reuse` a finished run of the same experiment with the same config is returned instead.
    A run directory that holds a checkpoint is resumed from it, in the same MLflow run; `resume` names that
    directory, or is "latest" for the newest unfinished run of this algorithm and recipe.
    With `check_only`, the config is parsed and its model and data classes built (which checks every value),
    and nothing else: no trainer, run, folder or MLflow store. A caller that carries on by itself (a comparison,
    a study) names its own command in `rerun_command`: that is what an interrupted run tells the user;
    `bench_args` are the command's own flags (`--eval false`) that the printed resume command keeps.
    """
    import modules

    module_class = modules.module_class(algorithm)
    argv, run_name, is_rank_zero = run_dir_and_name(algorithm, recipe_name, module_class.output_name, argv, run_name,
                                                    resume)
    options = RunOptions(algorithm, recipe_name, run_name, module_class, tags, callbacks, check_only, is_rank_zero)
    cli = build_cli(options, config, argv)
    if check_only:
        return None
    config = resolved_config(cli)
    fingerprint = config_fingerprint(algorithm, config)
    if reuse and (found := find_finished_run(recipe_name, fingerprint)):
        log.info("%s: reusing finished run %s with the same config (fingerprint %s)", algorithm, found[0], fingerprint)
        return TrainResult(run_id=found[0], output_path=found[1], reused=True)
    output_path = (cli.run_dir / module_class.output_name).resolve()
    # The data is read now, not in fit: a fault in it then stops the command before any run or folder exists.
    cli.datamodule.setup("fit")
    cli.attach_logger()
    if not is_rank_zero:
        return fit(cli, output_path)
    cli.rerun_command = rerun_command
    cli.resume_command = shlex.join(["bench", "train", algorithm, "--recipe", recipe_name, *(bench_args or []),
                                     *[a for a in argv if not a.startswith("--trainer.default_root_dir")],
                                     f"--resume={cli.run_dir}"])
    client = mlflow.MlflowClient(tracking.tracking_uri())
    earlier = claim_run_dir(client, cli, recipe_name)
    if cli.resume_from is not None:
        reopen_run(client, cli, earlier, config, fingerprint)
    else:
        record_new_run(client, cli, options, earlier, config, fingerprint, output_path)
    return fit(cli, output_path)


def fit(cli, output_path: Path) -> TrainResult:
    os.environ[RUN_DIR_ENV] = str(cli.run_dir.resolve())
    try:
        # Lightning's progress bars write to stdout, which carries the command's result only (a run, a JSON line)
        with contextlib.redirect_stdout(sys.stderr), sigterm_to_lightning():
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from)
    except SystemExit:  # Lightning exits after Ctrl-C or SIGTERM, with the run marked FAILED
        if cli.trainer.interrupted and cli.trainer.is_global_zero:
            interrupted(cli)
            sys.exit(130)
        raise
    except Exception as err:
        if is_disk_full(err) and cli.trainer.is_global_zero:  # Lightning has marked the run FAILED
            raise BenchError(disk_full_message(cli)) from None
        # a setting Lightning checks once the data is known (a validation interval longer than the epoch)
        if refused_by_lightning(err) and cli.trainer.global_step == 0 and cli.trainer.is_global_zero:
            raise BenchError(f"{trainer_refusal(err)} (MLflow run {cli.run_logger.run_id} is marked FAILED; nothing "
                             "was trained)") from None
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        if getattr(cli, "run_lock", None):
            cli.run_lock.close()
    if cli.trainer.interrupted or not cli.trainer.is_global_zero:
        return TrainResult(run_id=None, output_path=output_path)
    last = Path(cli.trainer.checkpoint_callback.last_model_path or cli.run_dir / LAST_CHECKPOINT)
    if last.is_dir():  # a sharded (FSDP) checkpoint
        shutil.rmtree(last)
    elif last.is_file():  # it only served resuming: the model is saved in HF format
        last.unlink()
    print(f"run {cli.run_logger.run_id} finished; model saved to {cli.model.output_dir}")
    return TrainResult(run_id=cli.run_logger.run_id, output_path=output_path)


def refused_by_lightning(err: BaseException) -> bool:
    """Lightning's own refusal of a trainer setting (no GPU, a strategy this machine cannot run, a validation
    interval longer than the epoch): a MisconfigurationException, or a ValueError raised in Lightning's code, not
    the model's."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if isinstance(err, MisconfigurationException):
        return True
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return (isinstance(err, ValueError) and frame is not None
            and f"{os.sep}lightning{os.sep}" in frame.tb_frame.f_code.co_filename)


def trainer_refusal(err: BaseException) -> str:
    return f"trainer: {' '.join(str(err).split())}"


def disk_full_message(cli) -> str:
    last = Path(cli.trainer.checkpoint_callback.dirpath or cli.run_dir / LAST_CHECKPOINT.parent) / LAST_CHECKPOINT.name
    carry_on = (cli.rerun_command or cli.resume_command) if last.exists() else \
        (cli.rerun_command or f"the same command with --trainer.default_root_dir={cli.run_dir}")
    return (f"no space left on the device while training into {cli.run_dir}: MLflow run {cli.run_logger.run_id} is "
            f"marked FAILED and no partial model is left{f'; its last checkpoint {last} is kept' if last.exists() else ''}. "
            f"Free some space, then:  {carry_on}")


def interrupted(cli) -> None:
    """A run stopped on purpose is KILLED, not FAILED, and the user is told how to continue it."""
    mlflow.MlflowClient(tracking.tracking_uri()).set_terminated(cli.run_logger.run_id, "KILLED")
    last = Path(cli.trainer.checkpoint_callback.dirpath or cli.run_dir / LAST_CHECKPOINT.parent) / LAST_CHECKPOINT.name
    if cli.rerun_command:  # a comparison's or a study's stage: its caller says how to carry on
        log.warning("interrupted; MLflow run %s is marked KILLED", cli.run_logger.run_id)
    elif last.exists():
        log.warning("interrupted; MLflow run %s is marked KILLED. Continue it from its last checkpoint with:  %s",
                    cli.run_logger.run_id, cli.resume_command)
    else:
        log.warning("interrupted before the run's first checkpoint; MLflow run %s is marked KILLED. The same "
                    "command with --trainer.default_root_dir=%s starts it over", cli.run_logger.run_id, cli.run_dir)
