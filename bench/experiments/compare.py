"""`bench compare --recipe NAME`: every stage of a recipe, once, under one MLflow parent run.

1. SFT, when the recipe's `compare.stages` lists it; the aligned algorithms then start from its policy.
2. The proxy and the judge reward models.
3. The aligned algorithms, each on the same budget: `compare.budget_prompts` training prompts
   (optimizer steps x prompts per step; KTO reads two rows per prompt, PPO one rollout per batch of prompts).
4. `bench eval` of each aligned policy on the same test prompts, judged by this comparison's judge.

A stage whose config matches a finished run of the experiment reuses that run. `--dry-run` swaps in the
tiny model, tiny data settings and a throwaway MLflow store, and runs one step of every stage.
"""

import contextlib
import gc
import logging
import os
import shlex
import tempfile
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import mlflow

import modules
from bench.core.errors import BenchError, ConfigError
from bench.core.memory import collections_of_new_objects_only
from bench.core.workers import WORKER_TAG, close_dead_runs, this_worker
from bench.evaluation.best_of_n import evaluate_best_of_n
from bench.evaluation.best_of_n import stage_name as best_of_n_stage_name
from bench.evaluation.evaluate import EvalSettings, check_evaluation_possible
from bench.evaluation.overoptimisation import ScoresAlongTraining
from bench.experiments.recipe import Recipe, resolve
from bench.reports import figures
from bench.runs import tracking
from bench.runs.strategies import check_strategies

log = logging.getLogger(__name__)

ROWS_PER_PROMPT = {"unpaired": 2}  # KTO: a desirable and an undesirable row per prompt; other views one


def budget_overrides(algorithm: str, config: dict, prompts: int) -> list[str]:
    """Trainer settings that make `algorithm` train on exactly `prompts` prompts."""
    module_class = modules.module_class(algorithm)
    view = module_class.data_view
    batch_size = config["data"].get("batch_size", 8)
    rows = prompts * ROWS_PER_PROMPT.get(view, 1)
    if rows % batch_size:
        raise ConfigError(f"compare.budget_prompts {prompts} ({rows} rows for {algorithm}) is not a multiple of "
                          f"{algorithm}'s data.batch_size {batch_size}")
    steps = rows // batch_size
    validate_at_end = f"--trainer.val_check_interval={steps}"
    if module_class.online:  # one rollout per batch; Lightning counts its optimizer steps as trainer steps
        return [f"--trainer.limit_train_batches={steps}", "--trainer.max_epochs=1", "--trainer.max_steps=-1",
                validate_at_end]
    # The budget's prompts only: RRHF samples candidates for them, DPO/IPO/KTO cache reference log-probs of them.
    return [f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", validate_at_end,
            f"--data.max_train_pairs={prompts}"]


@contextlib.contextmanager
def throwaway_workspace():
    """A temporary working directory and MLflow store, so that a dry run leaves nothing behind."""
    previous_cwd, previous_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="bench-dry-run-") as folder:
        os.chdir(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        try:
            yield Path(folder)
        finally:
            os.chdir(previous_cwd)
            if previous_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_uri


def compare(recipe_arg: str, argv: list[str], data_path: str | None = None, seeds: list[int] | None = None,
            command: str | None = None) -> dict:
    """Run the comparison; returns {stage: run id}. `argv` holds the command line's overrides for every stage
    (`--eval.*` and LightningCLI's). A recipe with a gold world (`gold:`) first gets its gold model and gold
    labels (`bench label`), cached."""
    recipe, argv = resolve(recipe_arg, argv, comparison=True, world="create", data_path=data_path, seeds=seeds)
    return Comparison(recipe, argv, command=command).run()


def dry_run(recipe_arg: str, argv: list[str], data_path: str | None = None, seeds: list[int] | None = None) -> dict:
    """One step of every stage with tiny stand-ins, in a throwaway working directory and MLflow store; the
    recipe's own distributed strategies are checked first (the stand-ins train with strategy auto)."""
    recipe, _ = resolve(recipe_arg, argv, comparison=True, world="none", data_path=data_path, seeds=seeds)
    for line in check_strategies(recipe.name, recipe.sections):
        print(f"strategy checked: {line}")
    with throwaway_workspace():
        small, argv = resolve(recipe_arg, argv, comparison=True, world="create", data_path=data_path, seeds=seeds,
                              dry_run=True)
        runs = Comparison(small, argv).run()
    print(f"dry run of recipe {recipe.name}: {len(runs)} stages ran one step each: {', '.join(runs)}")
    return runs


class Comparison:
    """Every stage under every seed: `stage.<name>` tags on the parent run name each stage's run (with one
    seed), or `stage.<name>.seed<S>` (with several). Per seed: SFT, the proxy, the aligned algorithms, their
    evaluation and best-of-N; the judge is one for the whole comparison (the recipe's, for example a gold
    model, or the one the first seed trains), so that every row is judged by the same judge."""

    def __init__(self, recipe: Recipe, argv: list[str], command: str | None = None):
        self.recipe, self.argv, self.recipe_name = recipe, argv, recipe.name
        self.settings = recipe.compare
        # What reruns this comparison: its finished stages are reused (by config), the rest trained.
        self.command = command or shlex.join(["bench", "compare", "--recipe", recipe.name, *argv])
        self.stages, self.seeds = list(self.settings.stages), list(self.settings.seeds)
        self.budget = self.settings.budget_prompts
        self.best_of_n, self.best_of_n_gold = list(self.settings.best_of_n), list(self.settings.best_of_n_gold)
        self.budgets = self.check_before_anything()
        self.client = mlflow.MlflowClient(tracking.tracking_uri())
        self.runs: dict[str, str] = {}

    def parent_run(self) -> str:
        run = self.client.create_run(tracking.experiment_id(self.client, self.recipe_name), run_name=f"compare-{datetime.now():%Y%m%d-%H%M%S}",
                                     tags={"compare_role": "parent", "recipe": self.recipe_name,
                                           "git_commit": tracking.git_commit(), "command": self.command,
                                           WORKER_TAG: this_worker()})  # closed by a later bench if this one is SIGKILLed
        self.client.log_param(run.info.run_id, "stages", ",".join(self.stages))
        self.client.log_param(run.info.run_id, "budget_prompts", str(self.budget))
        self.client.log_param(run.info.run_id, "seeds", ",".join(map(str, self.seeds)))
        if self.best_of_n:
            self.client.log_param(run.info.run_id, "best_of_n", ",".join(map(str, self.best_of_n)))
        return run.info.run_id

    def check_before_anything(self) -> dict[str, list[str]]:
        """What a user can get wrong is refused before the store, a parent run or a stage exists: the command
        line's overrides, every stage's budget (returned: each stage's overrides that set it) and the judge."""
        self.check_overrides()
        budgets = {stage: budget_overrides(self.algorithm(stage), self.stage_config(stage, self.algorithm(stage)),
                                           self.budget)
                   for stage in self.aligned_stages() if self.budget}
        if modules.reward_model_name() not in self.stages and (self.aligned_stages() or "sft" in self.stages):
            # No judge of its own: the one it names, or the experiment's newest, must exist before a stage trains.
            check_evaluation_possible(self.recipe_name, self.recipe.eval, "a comparison evaluates every stage")
        return budgets

    def check_overrides(self) -> None:
        """The command line's overrides, parsed against the config of every stage that needs nothing an earlier
        stage makes: an unknown flag or a bad value is one line naming the stage, before any run exists. (A stage
        that optimises the proxy is checked when it starts: its proxy does not exist yet.)"""
        from bench.runs.training import train_one

        for stage in self.stages:
            algorithm = self.algorithm(stage)
            if modules.module_class(algorithm).proxy_setting:
                continue
            try:
                train_one(algorithm, self.recipe_name, self.stage_config(stage, algorithm),
                          [*self.seed_args(self.seeds[0]), *self.argv], check_only=True)
            except BenchError as err:
                raise BenchError(f"stage {stage}: {err}") from None

    def stage_key(self, stage: str, seed: int) -> str:
        return stage if len(self.seeds) == 1 else f"{stage}.seed{seed}"

    def seed_args(self, seed: int) -> list[str]:
        return [f"--seed_everything={seed}", f"--data.seed={seed}"]

    def algorithm(self, stage: str) -> str:
        return self.settings.algorithm(stage)

    def aligned_stages(self) -> list[str]:
        return [s for s in self.stages if self.algorithm(s) in modules.aligned()]

    def stage_config(self, stage: str, algorithm: str) -> dict:
        """The config a stage trains `algorithm` with: an arm's overrides over the algorithm's own."""
        return self.recipe.config(algorithm, self.settings.overrides(stage))

    def train(self, stage: str, algorithm: str, argv: list[str], seed: int, callbacks: list | None = None):
        from bench.runs.training import train_one

        tags = {"mlflow.parentRunId": self.parent, "compare_stage": stage, "seed": str(seed)}
        result = train_one(algorithm, self.recipe_name, self.stage_config(stage, algorithm),
                           [*argv, *self.seed_args(seed), *self.argv],
                           run_name=f"{stage}-s{seed}-{datetime.now():%Y%m%d-%H%M%S}", tags=tags, reuse=True,
                           callbacks=callbacks, rerun_command=self.command)
        gc.collect()  # free the trainer and its models before the next stage loads its own
        if result.run_id is None:
            raise BenchError(f"stage {stage} (seed {seed}) was interrupted")
        key = self.stage_key(stage, seed)
        self.runs[key] = result.run_id
        self.client.set_tag(self.parent, f"stage.{key}", result.run_id + (" (reused)" if result.reused else ""))
        return result

    def run(self) -> dict:
        close_dead_runs(self.client, self.recipe_name)
        self.parent = self.parent_run()
        log.info("comparison of %s over seeds %s under MLflow parent run %s", ", ".join(self.stages), self.seeds,
                 self.parent)
        judge = self.recipe.eval.judge
        self.judge = judge if judge not in (None, "latest") and not str(judge).startswith("http") else None
        with tracking.closed_on_error(self.client, self.parent, "the comparison", self.command,
                                      discard=self.refused_before_any_stage), collections_of_new_objects_only():
            for seed in self.seeds:
                self.run_seed(seed, self.budgets)
        self.client.set_terminated(self.parent)  # first: `bench table` reads finished comparisons only
        figures.log_figures_of_finished_run(self.client, self.parent, figures.comparison_run_ids(self.client, self.parent))
        if self.aligned_stages() or self.best_of_n:  # rows to table: the parent run carries the table itself
            from bench.reports.table import log_to_parent_run

            try:
                log_to_parent_run(self.client, self.parent, self.recipe_name)
            except BenchError as err:  # the comparison is done and kept; `bench table` says the same, at leisure
                log.warning("the comparison's table was not logged on its parent run %s: %s", self.parent, err)
        return self.runs

    def refused_before_any_stage(self, err: BaseException) -> bool:
        return isinstance(err, BenchError) and not self.runs  # the parent then holds nothing worth keeping

    def run_seed(self, seed: int, budgets: dict[str, list[str]]) -> None:
        policy_args: list[str] = []
        if "sft" in self.stages:
            sft = self.train("sft", "sft", [], seed)
            policy_args = [f"--model.policy={sft.output_path}"]  # the aligned policies' start and reference
        proxy_args: dict[str, list[str]] = {}
        proxy = None
        rm = modules.reward_model_name()  # its stage: a proxy for each seed, and one judge for the comparison
        if rm in self.stages:
            proxy_run = self.train(f"{rm}-proxy", rm, ["--model.role=proxy"], seed)
            proxy = str(proxy_run.output_path)
            self.record_proxy_agreement(proxy_run.run_id, proxy)
            if self.judge is None:  # the first seed's judge judges every seed
                self.judge = str(self.train(f"{rm}-judge", rm, ["--model.role=judge"], seed).output_path)
            proxy_args = {name: [f"--{cls.proxy_setting}={proxy}"] for name, cls in modules.registry().items()
                          if cls.proxy_setting}
        if "sft" in self.stages:
            self.evaluate("sft", sft.run_id, seed, proxy)
        for stage in self.aligned_stages():
            callbacks = None
            if stage in self.settings.tracked and self.judge and proxy:
                callbacks = [ScoresAlongTraining(self.judge, proxy, **self.settings.tracking)]
            result = self.train(stage, self.algorithm(stage),
                                [*policy_args, *proxy_args.get(self.algorithm(stage), []), *budgets.get(stage, [])],
                                seed, callbacks)
            self.evaluate(stage, result.run_id, seed, proxy)
        if self.best_of_n and proxy:
            self.best_of_n_stage(seed, proxy, policy_args)

    def record_proxy_agreement(self, run_id: str, proxy: str) -> None:
        """In a gold world: how often the proxy orders the held-out test pairs as the gold does."""
        gold_spec = self.recipe.gold_model
        if not gold_spec or "eval/proxy_gold_agreement" in self.client.get_run(run_id).data.metrics:
            return
        from bench.evaluation.onpolicy import proxy_gold_agreement

        metrics = proxy_gold_agreement(proxy, gold_spec, self.recipe.config("dpo")["data"])
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
        log.info("proxy %s orders %.3f of %d held-out pairs as the gold %s does (their labels: %.3f)", proxy,
                 metrics["eval/proxy_gold_agreement"], metrics["eval/proxy_gold_agreement_pairs"], gold_spec,
                 metrics["eval/label_gold_agreement"])

    def eval_settings(self, seed: int, proxy: str | None) -> EvalSettings:
        settings = self.recipe.eval
        # "latest" means this comparison's own reward models, not whichever is newest in the experiment.
        return replace(settings, judge=self.judge if self.judge and settings.judge == "latest" else settings.judge,
                       proxy=proxy if proxy and settings.proxy == "latest" else settings.proxy,
                       sampling=replace(settings.sampling, seed=seed))

    def evaluate(self, algorithm: str, run_id: str, seed: int, proxy: str | None) -> None:
        from bench.evaluation.evaluate import evaluate, kl_is_current, resolve_target

        run = self.client.get_run(run_id)
        again = "eval/win_rate_vs_chosen" in run.data.metrics
        if again and kl_is_current(run.data.tags):
            log.info("%s: run %s is already evaluated", algorithm, run_id)
            return
        if again:
            log.info("%s: run %s is evaluated again, into itself: its eval/kl was computed the old way (under bf16 "
                     "autocast)", algorithm, run_id)
        target = replace(resolve_target(run_id, None, {}, self.recipe_name), again=again)
        evaluated = evaluate(target, self.eval_settings(seed, proxy))
        figures.log_win_rates(self.client, evaluated.run_id)
        gc.collect()

    def best_of_n_stage(self, seed: int, proxy: str, policy_args: list[str]) -> None:
        """Best-of-N of the reference policy (the aligned stages' starting point) for every N, judged on the
        same test prompts as the stages."""
        config = self.recipe.config("dpo")
        reference = policy_args[0].split("=", 1)[1] if policy_args else config["model"]["policy"]
        for pick, ns in (("proxy", self.best_of_n), ("gold", self.best_of_n_gold)):
            if not ns:
                continue
            runs = evaluate_best_of_n(reference, config["data"], self.eval_settings(seed, proxy), ns, self.recipe_name,
                                      tags={"mlflow.parentRunId": self.parent, "seed": str(seed)}, pick=pick)
            for n, run_id in runs.items():
                self.client.set_tag(run_id, "compare_stage", best_of_n_stage_name(n, pick))
                figures.log_win_rates(self.client, run_id)
                key = self.stage_key(best_of_n_stage_name(n, pick), seed)
                self.runs[key] = run_id
                self.client.set_tag(self.parent, f"stage.{key}", run_id)
