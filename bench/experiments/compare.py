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
import inspect
import logging
import os
import shlex
import tempfile
from datetime import datetime
from pathlib import Path

import mlflow

import modules
from bench.core.errors import BenchError, ConfigError
from bench.core.workers import WORKER_TAG, close_dead_runs, this_worker
from bench.evaluation.best_of_n import check_ns, evaluate_best_of_n
from bench.evaluation.best_of_n import stage_name as best_of_n_stage_name
from bench.evaluation.overoptimisation import ScoresAlongTraining
from bench.evaluation.rewards import reward_needs_hub
from bench.experiments import gold
from bench.reports import figures
from bench.runs import recipes, tracking
from bench.runs.strategies import check_strategies

log = logging.getLogger(__name__)

ROWS_PER_PROMPT = {"unpaired": 2}  # KTO: a desirable and an undesirable row per prompt; other views one


def stage_names() -> list[str]:
    """Every stage, in the order they run: SFT, the reward models, then the aligned algorithms."""
    return ["sft", "rm", *modules.aligned()]


def arms_of(recipe_name: str, recipe: dict) -> dict[str, tuple[str, dict]]:
    """`compare.arms`: {arm: (its algorithm, the recipe sections it overrides for that algorithm)}. An arm is an
    algorithm with other settings, run as a stage of its own (`dpo-beta0.5: {algorithm: dpo, model: {beta: 0.5}}`)."""
    arms = {}
    for name, section in ((recipe.get("compare") or {}).get("arms") or {}).items():
        section = dict(section or {})
        algorithm = section.pop("algorithm", None)
        if algorithm not in modules.aligned():
            raise ConfigError(f"recipe {recipe_name}: compare.arms.{name}.algorithm must name an aligned algorithm "
                              f"({', '.join(modules.aligned())}), got {algorithm!r}")
        unknown = set(section) - set(recipes.CLI_SECTIONS)
        if unknown:
            raise ConfigError(f"recipe {recipe_name}: compare.arms.{name} has {sorted(unknown)}; an arm overrides "
                              f"only {', '.join(recipes.CLI_SECTIONS)}")
        if name in stage_names():
            raise ConfigError(f"recipe {recipe_name}: compare.arms.{name} would hide the stage of that name")
        arms[name] = (algorithm, section)
    return arms


def algorithm_of(stage: str, arms: dict[str, tuple[str, dict]]) -> str:
    return arms[stage][0] if stage in arms else stage


def stages_of(recipe_name: str, recipe: dict) -> list[str]:
    all_stages, arms = stage_names(), arms_of(recipe_name, recipe)
    stages = list((recipe.get("compare") or {}).get("stages") or ("rm", *modules.aligned()))
    unknown = [s for s in stages if s not in all_stages and s not in arms]
    if unknown:
        raise ConfigError(f"recipe {recipe_name}: compare.stages names {unknown}, which is not a stage; "
                          f"stages are {', '.join(all_stages)} and the recipe's compare.arms ({', '.join(arms) or 'none'})")
    optimising = [s for s in stages if algorithm_of(s, arms) in modules.aligned()
                  and modules.module_class(algorithm_of(s, arms)).proxy_setting]
    if optimising and "rm" not in stages:
        raise ConfigError(f"recipe {recipe_name}: compare.stages has {', '.join(optimising)}, which optimise a proxy "
                          "reward model, but no `rm` stage to train it")
    # SFT before the reward models before the algorithms; an arm where its algorithm stands, in the recipe's order
    return sorted(stages, key=lambda s: (all_stages.index(algorithm_of(s, arms)), stages.index(s)))


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


def comparison_recipe(recipe: dict) -> dict:
    """The recipe with `compare.algorithms` and `compare.eval` merged in: they override it for comparisons only."""
    settings = recipe.get("compare") or {}
    merged = recipes.deep_merge(recipe, {"algorithms": settings.get("algorithms") or {},
                                         "eval": settings.get("eval") or {}})
    merged["compare"] = {k: v for k, v in settings.items() if k not in ("algorithms", "eval")}
    return merged


def dry_run_recipe(recipe: dict, data_path: str) -> dict:
    """The recipe with the tiny policy, MiniLM reward models, short sequences and one step per stage."""
    small = comparison_recipe(recipe)
    trainer = small.setdefault("trainer", {})
    trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_steps=1, max_epochs=-1,
                   val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.pop("num_nodes", None)
    small.setdefault("data", {}).update(path=data_path, batch_size=2, eval_batch_size=2, max_train_pairs=8,
                                        max_val_pairs=2, max_length=64, max_prompt_length=32)
    small.setdefault("model", {}).update(policy="tiny", reference=None)
    for name, section in (small.get("algorithms") or {}).items():
        section = section or {}
        model, data = section.get("model") or {}, section.get("data") or {}
        if name == "rm":
            model.update(backbone="all-minilm-l6-v2", max_length=64)
        else:
            model.update(policy="tiny", reference=None)
        if "max_new_tokens" in model:
            model["max_new_tokens"] = 4
        if name in modules.registry() and modules.module_class(name).online:  # one update per rollout
            accepted = inspect.signature(modules.module_class(name).__init__).parameters
            model.update({key: 1 for key in ("ppo_epochs", "num_mini_batches", "num_iterations") if key in accepted})
        for key in ("batch_size", "eval_batch_size"):
            if key in data:
                data[key] = 2
        if "candidate_sampling" in data:
            data["candidate_sampling"] = {**data["candidate_sampling"], "max_new_tokens": 4, "batch_size": 4}
        for key in ("max_train_pairs", "max_val_pairs"):
            data.pop(key, None)
        if "trainer" in section:
            for key in ("max_steps", "max_epochs", "limit_train_batches", "val_check_interval", "limit_val_batches",
                        "strategy", "precision", "accelerator", "devices", "num_nodes"):
                section["trainer"].pop(key, None)
        section.update(model=model, data=data)
        small["algorithms"][name] = section
    compare = small.setdefault("compare", {})
    compare["budget_prompts"] = 2
    if compare.get("best_of_n"):
        compare["best_of_n"] = [1, 2]
    if compare.get("best_of_n_gold"):
        compare["best_of_n_gold"] = [2]
    if compare.get("overoptimisation"):
        compare["overoptimisation"] = {**compare["overoptimisation"], "n_prompts": 2, "every_n_steps": 1,
                                       "sampling": {"max_new_tokens": 4, "batch_size": 2}}
    on_policy = (small.get("gold") or {}).get("on_policy")
    if on_policy is not None:  # the tiny policy samples a few short responses to a few prompts
        small["gold"]["on_policy"] = {**on_policy, "max_prompts": 160, "max_prompt_tokens": 64,
                                      "prompts": "hh-first-turn",
                                      "sampling": {**(on_policy.get("sampling") or {}), "max_new_tokens": 8,
                                                   "batch_size": 64}}
        small["data"].update(val_fraction=0.2, test_fraction=0.2)
    if small.get("gold") and reward_needs_hub(small["gold"].get("model")):  # a local gold stands in for a hub one
        small["gold"] = {**small["gold"], "model": "reward:vader"}
    if small.get("gold"):  # a one-step MiniLM gold model labels the slice
        small["gold"] = {**small["gold"], "train": {"trainer": {"max_steps": 1, "max_epochs": -1, "limit_val_batches": 1},
                                                   "data": {"batch_size": 2, "max_train_pairs": 8},
                                                   "model": {"backbone": "all-minilm-l6-v2", "max_length": 64}}}
    judge = "gold" if small.get("gold") and (small.get("eval") or {}).get("judge") == "gold" else "latest"
    small["eval"] = {**(small.get("eval") or {}), "n_prompts": 2, "judge": judge, "proxy": "latest",
                     "sampling": {**((small.get("eval") or {}).get("sampling") or {}), "max_new_tokens": 4, "batch_size": 2}}
    return small


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


def compare(recipe_name: str, recipe: dict, argv: list[str], dry_run: bool = False, data_path: str | None = None,
            seeds: list[int] | None = None, command: str | None = None) -> dict:
    """Run the comparison; returns {stage: run id}. `argv` holds LightningCLI overrides for every stage. A
    recipe with a gold world (`gold:`) first gets its gold model and gold labels (`bench label`), cached."""
    stages = stages_of(recipe_name, recipe)
    seeds_of(recipe_name, recipe, seeds)  # checked before anything runs
    if dry_run:
        data_path = data_path or os.environ.get("HH_RLHF_PATH") or recipe.get("data", {}).get("path")
        if not data_path or not Path(data_path).is_dir():
            raise ConfigError(f"a dry run reads local data: set HH_RLHF_PATH or --data-path (recipe has {data_path!r})")
        for line in check_strategies(recipe_name, recipe):  # the tiny stand-ins below train with strategy auto
            print(f"strategy checked: {line}")
        recipe = dry_run_recipe(recipe, str(Path(data_path).resolve()))
        if "rm" not in stages:  # a local judge stands in for the recipe's (often a remote API)
            stages = sorted([*stages, "rm"], key=stage_names().index)
        with throwaway_workspace():
            recipe = gold.gold_world(recipe_name, recipe, create=True)
            runs = Comparison(recipe_name, recipe, stages, argv, seeds=(seeds or seeds_of(recipe_name, recipe, None))[:1]).run()
        print(f"dry run of recipe {recipe_name}: {len(runs)} stages ran one step each: {', '.join(runs)}")
        return runs
    if data_path:
        recipe = recipes.deep_merge(recipe, {"data": {"path": data_path}})
    recipe = gold.gold_world(recipe_name, recipe, create=True)
    return Comparison(recipe_name, recipe, stages, argv, seeds, command=command).run()


def seeds_of(recipe_name: str, recipe: dict, seeds: list[int] | None) -> list[int]:
    """`--seeds`, else `compare.seeds`, else the recipe's one `seed_everything`."""
    seeds = seeds if seeds is not None else (recipe.get("compare") or {}).get("seeds")
    if seeds is None:
        return [int(recipe.get("seed_everything", 0) or 0)]
    if not isinstance(seeds, list) or not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"recipe {recipe_name}: compare.seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"recipe {recipe_name}: compare.seeds repeats a seed: {seeds}")
    return seeds


class Comparison:
    """Every stage under every seed: `stage.<name>` tags on the parent run name each stage's run (with one
    seed), or `stage.<name>.seed<S>` (with several). Per seed: SFT, the proxy, the aligned algorithms, their
    evaluation and best-of-N; the judge is one for the whole comparison (the recipe's, for example a gold
    model, or the one the first seed trains), so that every row is judged by the same judge."""

    def __init__(self, recipe_name: str, recipe: dict, stages: list[str], argv: list[str],
                 seeds: list[int] | None = None, command: str | None = None):
        self.recipe = comparison_recipe(recipe)
        # What reruns this comparison: its finished stages are reused (by config), the rest trained.
        self.command = command or shlex.join(["bench", "compare", "--recipe", recipe_name, *argv])
        self.recipe_name, self.stages, self.argv = recipe_name, stages, argv
        self.seeds = seeds_of(recipe_name, self.recipe, seeds)
        settings = self.recipe["compare"]
        self.budget = settings.get("budget_prompts")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ConfigError(f"recipe {recipe_name}: compare.budget_prompts must be a positive integer, got {self.budget!r}")
        self.best_of_n = check_ns(settings["best_of_n"]) if settings.get("best_of_n") else []
        self.best_of_n_gold = check_ns(settings["best_of_n_gold"]) if settings.get("best_of_n_gold") else []
        self.arms = arms_of(recipe_name, self.recipe)
        tracking_settings = settings.get("overoptimisation") or {}
        self.tracked = set(tracking_settings.get("stages") or [])
        self.tracking = {k: v for k, v in tracking_settings.items() if k != "stages"}
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

    def stage_key(self, stage: str, seed: int) -> str:
        return stage if len(self.seeds) == 1 else f"{stage}.seed{seed}"

    def seed_args(self, seed: int) -> list[str]:
        return [f"--seed_everything={seed}", f"--data.seed={seed}"]

    def algorithm(self, stage: str) -> str:
        return algorithm_of(stage, self.arms)

    def aligned_stages(self) -> list[str]:
        return [s for s in self.stages if self.algorithm(s) in modules.aligned()]

    def stage_recipe(self, stage: str) -> dict:
        """The recipe a stage trains with: an arm's overrides merged over its algorithm's section."""
        if stage not in self.arms:
            return self.recipe
        algorithm, overrides = self.arms[stage]
        return recipes.deep_merge(self.recipe, {"algorithms": {algorithm: overrides}})

    def train(self, stage: str, algorithm: str, argv: list[str], seed: int, callbacks: list | None = None):
        from bench.runs.training import train_one

        tags = {"mlflow.parentRunId": self.parent, "compare_stage": stage, "seed": str(seed)}
        result = train_one(algorithm, self.recipe_name, self.stage_recipe(stage), [*argv, *self.seed_args(seed), *self.argv],
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
        # Every stage's budget is checked before the first one trains.
        budgets = {stage: budget_overrides(self.algorithm(stage), recipes.for_algorithm(self.stage_recipe(stage),
                                                                                         self.algorithm(stage)), self.budget)
                   for stage in self.aligned_stages() if self.budget}
        close_dead_runs(self.client, self.recipe_name)
        self.parent = self.parent_run()
        log.info("comparison of %s over seeds %s under MLflow parent run %s", ", ".join(self.stages), self.seeds,
                 self.parent)
        judge = (self.recipe.get("eval") or {}).get("judge")
        self.judge = judge if judge not in (None, "latest") and not str(judge).startswith("http") else None
        with tracking.closed_on_error(self.client, self.parent, "the comparison", self.command,
                                      discard=self.refused_before_any_stage):
            for seed in self.seeds:
                self.run_seed(seed, budgets)
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
        if "rm" in self.stages:
            proxy_run = self.train("rm-proxy", "rm", ["--model.role=proxy"], seed)
            proxy = str(proxy_run.output_path)
            self.record_proxy_agreement(proxy_run.run_id, proxy)
            if self.judge is None:  # the first seed's judge judges every seed
                self.judge = str(self.train("rm-judge", "rm", ["--model.role=judge"], seed).output_path)
            proxy_args = {name: [f"--{cls.proxy_setting}={proxy}"] for name, cls in modules.registry().items()
                          if cls.proxy_setting}
        if "sft" in self.stages:
            self.evaluate("sft", sft.run_id, seed, proxy)
        for stage in self.aligned_stages():
            callbacks = None
            if stage in self.tracked and self.judge and proxy:
                callbacks = [ScoresAlongTraining(self.judge, proxy, **self.tracking)]
            result = self.train(stage, self.algorithm(stage),
                                [*policy_args, *proxy_args.get(self.algorithm(stage), []), *budgets.get(stage, [])],
                                seed, callbacks)
            self.evaluate(stage, result.run_id, seed, proxy)
        if self.best_of_n and proxy:
            self.best_of_n_stage(seed, proxy, policy_args)

    def record_proxy_agreement(self, run_id: str, proxy: str) -> None:
        """In a gold world: how often the proxy orders the held-out test pairs as the gold does."""
        gold_spec = self.recipe.get("gold_model")
        if not gold_spec or "eval/proxy_gold_agreement" in self.client.get_run(run_id).data.metrics:
            return
        from bench.evaluation.onpolicy import proxy_gold_agreement

        metrics = proxy_gold_agreement(proxy, gold_spec, recipes.for_algorithm(self.recipe, "dpo")["data"])
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
        log.info("proxy %s orders %.3f of %d held-out pairs as the gold %s does (their labels: %.3f)", proxy,
                 metrics["eval/proxy_gold_agreement"], metrics["eval/proxy_gold_agreement_pairs"], gold_spec,
                 metrics["eval/label_gold_agreement"])

    def eval_settings(self, seed: int, proxy: str | None):
        from bench.evaluation.evaluate import EvalSettings

        settings = dict(self.recipe.get("eval") or {})
        # "latest" means this comparison's own reward models, not whichever is newest in the experiment.
        if self.judge and settings.get("judge", "latest") == "latest":
            settings["judge"] = self.judge
        if proxy and settings.get("proxy", "latest") == "latest":
            settings["proxy"] = proxy
        settings["sampling"] = {**(settings.get("sampling") or {}), "seed": seed}
        return EvalSettings.from_dict(settings)

    def evaluate(self, algorithm: str, run_id: str, seed: int, proxy: str | None) -> None:
        from bench.evaluation.evaluate import evaluate, resolve_target

        if "eval/win_rate_vs_chosen" in self.client.get_run(run_id).data.metrics:
            log.info("%s: run %s is already evaluated", algorithm, run_id)
            return
        evaluate(resolve_target(run_id, None, {}, self.recipe_name), self.eval_settings(seed, proxy))
        gc.collect()

    def best_of_n_stage(self, seed: int, proxy: str, policy_args: list[str]) -> None:
        """Best-of-N of the reference policy (the aligned stages' starting point) for every N, judged on the
        same test prompts as the stages."""
        config = recipes.for_algorithm(self.recipe, "dpo")
        reference = policy_args[0].split("=", 1)[1] if policy_args else config["model"]["policy"]
        for pick, ns in (("proxy", self.best_of_n), ("gold", self.best_of_n_gold)):
            if not ns:
                continue
            runs = evaluate_best_of_n(reference, config["data"], self.eval_settings(seed, proxy), ns, self.recipe_name,
                                      tags={"mlflow.parentRunId": self.parent, "seed": str(seed)}, pick=pick)
            for n, run_id in runs.items():
                self.client.set_tag(run_id, "compare_stage", best_of_n_stage_name(n, pick))
                key = self.stage_key(best_of_n_stage_name(n, pick), seed)
                self.runs[key] = run_id
                self.client.set_tag(self.parent, f"stage.{key}", run_id)
