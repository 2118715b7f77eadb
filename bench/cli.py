"""The `bench` command.

  bench data [PATH] [--json]                         what an HH-RLHF source holds
  bench train ALGO [--recipe NAME|PATH] [overrides]  train with LightningCLI conventions
  bench eval RUN_ID|CHECKPOINT [--recipe NAME]       win rates, reward-model scores and KL
"""

import argparse
import gc
import json
import logging
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

from bench.errors import BenchError

log = logging.getLogger("bench")

USAGE = __doc__


def data_command(argv: list[str]) -> None:
    from bench.data_report import describe, format_report
    from datamodules.hh_rlhf import HUB_ID

    parser = argparse.ArgumentParser(prog="bench data", description="Report what an HH-RLHF source holds.")
    parser.add_argument("path", nargs="?", default=HUB_ID, help="hub id or local folder <subset>/<split>.jsonl.gz")
    parser.add_argument("--subsets", nargs="*", default=None, help="subset folders (the hub's data_dir)")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct", help="model spec for token lengths")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = describe(
        args.path, args.subsets, args.tokenizer, args.chat_template, args.max_length, args.max_prompt_length,
        args.val_fraction, args.test_fraction,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def _pop_option(argv: list[str], name: str, default: str) -> tuple[str, list[str]]:
    rest, value, i = [], default, 0
    while i < len(argv):
        if argv[i] == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(name + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return value, rest


def train_command(argv: list[str]) -> None:
    from modules import TRAINABLE

    if not argv or argv[0] not in TRAINABLE:
        given = argv[0] if argv else "nothing"
        raise BenchError(f"bench train: unknown algorithm {given!r}; choose one of {', '.join(TRAINABLE)}")
    algorithm, argv = argv[0], argv[1:]
    recipe_arg, argv = _pop_option(argv, "--recipe", "smol-hh")
    run_eval, argv = _pop_option(argv, "--eval", "auto")
    if algorithm == "rm" and not any(a.startswith("--model.role") for a in argv):
        # The default reward-model stage: a proxy and a judge, each on its own half of the train split.
        for role in ("proxy", "judge"):
            train_one(algorithm, recipe_arg, [*argv, f"--model.role={role}"], run_suffix=f"-{role}")
    else:
        run_id = train_one(algorithm, recipe_arg, argv)
        # The trainer, models and optimizer state form reference cycles; free them before evaluation
        # loads its own models (PPO's training state alone is about 17 GB with SmolLM2 on CPU).
        gc.collect()
        if algorithm != "rm" and run_id is not None and run_eval != "false":
            evaluate_after_training(run_id, recipe_arg, required=run_eval == "true")


def evaluate_after_training(run_id: str, recipe_arg: str, required: bool) -> None:
    """`bench eval` on the run just trained. Without a judge reward model in the recipe's experiment
    this warns and skips, unless `--eval true` asked for it."""
    import mlflow

    from bench import recipes, tracking
    from bench.evaluation import EvalSettings, evaluate, find_reward_model, resolve_target

    recipe_name, recipe = recipes.load(recipe_arg)
    settings = EvalSettings.from_dict(recipe.get("eval"))
    if settings.judge == "latest" and not required:
        try:
            find_reward_model(recipe_name, "judge")
        except BenchError as err:
            log.warning("evaluation skipped: %s. Run `bench eval %s` after training the judge.", err, run_id)
            mlflow.MlflowClient(tracking.tracking_uri()).set_tag(run_id, "eval_skipped", str(err))
            return
    evaluate(resolve_target(run_id, None, {}, recipe_name), settings)


def train_one(algorithm: str, recipe_arg: str, argv: list[str], run_suffix: str = "") -> str | None:
    """Train one module with LightningCLI and log it to MLflow; returns the MLflow run id."""
    from lightning.pytorch.cli import LightningCLI

    from bench import recipes, tracking
    import modules
    from bench.evaluation import find_reward_model
    from datamodules.hh_datamodule import HHRLHFDataModule

    module_class = modules.module_class(algorithm)
    is_reward_model = algorithm == "rm"
    model_spec_key = "backbone" if is_reward_model else "policy"
    recipe_name, recipe_config, _ = recipes.resolve(recipe_arg, algorithm)
    run_name = f"{algorithm}{run_suffix}-{datetime.now():%Y%m%d-%H%M%S}"

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments(f"model.{model_spec_key}", "data.tokenizer")
            if is_reward_model:
                parser.link_arguments("model.role", "data.train_subset", compute_fn=lambda role: "all" if role == "shared" else role)
                parser.link_arguments("model.max_length", "data.max_length")
            parser.set_defaults({"data.view": module_class.data_view})
            if module_class.data_view == "ranked":
                parser.set_defaults({"data.proxy": "latest"})

        def before_instantiate_classes(self):
            # PPO's model.proxy and the ranked view's data.proxy: "latest" is the experiment's newest proxy.
            for section in ("model", "data"):
                if self.config[section].get("proxy") == "latest":
                    self.config[section]["proxy"] = find_reward_model(recipe_name, "proxy")
                    log.info("%s.proxy: the newest proxy of experiment %r, %s", section, recipe_name,
                             self.config[section]["proxy"])

        def instantiate_trainer(self, **kwargs):
            trainer_config = self.config_init.get("trainer", {})
            self.run_dir = Path(trainer_config.get("default_root_dir") or Path("runs") / recipe_name / run_name)
            self.run_logger = tracking.make_logger(recipe_name, run_name)
            return super().instantiate_trainer(logger=self.run_logger, default_root_dir=str(self.run_dir), **kwargs)

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{recipe_name}-{algorithm}-") as recipe_file:
        yaml.safe_dump(recipe_config, recipe_file)
        recipe_file.flush()
        # LightningCLI reads sys.argv when given no args; ours are already split off from `bench train`.
        sys.argv = [f"bench train {algorithm}"]
        cli = TrainCLI(
            module_class,
            HHRLHFDataModule,
            args=["--config", recipe_file.name, *argv],
            run=False,
            save_config_callback=None,
            parser_kwargs={"prog": f"bench train {algorithm}"},
        )
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    # What the trainer and datamodule really got: the parser's dump leaves out linked and overridden values.
    config["trainer"].update(logger="MLFlowLogger", default_root_dir=str(cli.run_dir))
    config["data"].update({key: cli.datamodule.hparams[key] for key in ("tokenizer", "train_subset", "max_length", "proxy")})
    if "proxy" in config["model"]:
        config["model"]["proxy"] = cli.model.hparams.proxy
    cli.run_dir.mkdir(parents=True, exist_ok=True)
    config_file = cli.run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    data = config["data"]
    tags = {
        "algorithm": algorithm,
        "recipe": recipe_name,
        "model": config["model"][model_spec_key],
        "data_source": data["path"] + (f"[{','.join(data['subsets'])}]" if data.get("subsets") else ""),
        "seed": str(config["seed_everything"]),
        "git_commit": tracking.git_commit(),
        "precision": str(config["trainer"]["precision"]),
        "output_path": str((cli.run_dir / module_class.output_name).resolve()),
    }
    if is_reward_model:
        tags["role"] = config["model"]["role"]
    proxy = config["model"].get("proxy") or (config["data"]["proxy"] if config["data"]["view"] == "ranked" else None)
    if proxy:
        tags["proxy"] = proxy
    tracking.record_run(cli.run_logger, config, config_file, tags)
    log.info("MLflow run %s (experiment %r) at %s", cli.run_logger.run_id, recipe_name, tracking.tracking_uri())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.trainer.interrupted:
        return None
    print(f"run {cli.run_logger.run_id} finished; model saved to {cli.model.output_dir}")
    return cli.run_logger.run_id


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so that redirection (and pytest) is respected."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def configure_logging() -> None:
    for name in ("bench", "modules", "datamodules"):  # Lightning configures its own loggers
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def eval_command(argv: list[str]) -> None:
    from bench import recipes
    from bench.evaluation import EvalSettings, evaluate, resolve_target

    parser = argparse.ArgumentParser(prog="bench eval", description="Evaluate a policy: win rates, scores, KL.")
    parser.add_argument("target", help="MLflow run id of a `bench train` run, or a policy folder / model spec")
    parser.add_argument("--recipe", default="smol-hh", help="recipe whose eval settings, data and experiment to use")
    parser.add_argument("--reference", help="reference policy (default: the run's reference, or the target itself)")
    parser.add_argument("--data-path", help="HH-RLHF source, for a checkpoint (a run id brings its own)")
    parser.add_argument("--n-prompts", type=int)
    parser.add_argument("--judge", help="judge reward-model folder, 'latest', or an OpenAI-compatible base URL")
    parser.add_argument("--judge-model", help="model name for an http(s) judge")
    parser.add_argument("--judge-prompt", help="prompt template file for an http(s) judge (default: the DPO paper's)")
    parser.add_argument("--proxy", help="proxy reward-model folder, 'latest' or 'none'")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    recipe_name, recipe_config = recipes.load(args.recipe)
    eval_config = dict(recipe_config.get("eval") or {})
    for key in ("n_prompts", "judge", "judge_model", "judge_prompt", "proxy"):
        if getattr(args, key) is not None:
            eval_config[key] = None if getattr(args, key) == "none" else getattr(args, key)
    sampling = dict(eval_config.get("sampling", {}))
    for key in ("temperature", "top_p", "max_new_tokens", "batch_size", "seed"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    eval_config["sampling"] = sampling
    data = dict(recipe_config.get("data", {}))
    if args.data_path:
        data["path"] = args.data_path
    target = resolve_target(args.target, args.reference, data, recipe_name)
    metrics = evaluate(target, EvalSettings.from_dict(eval_config))
    print(json.dumps(metrics, indent=2))


COMMANDS = {"data": data_command, "train": train_command, "eval": eval_command}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"bench: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        command(argv[1:])
    except BenchError as err:
        print(f"bench {argv[0]}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
