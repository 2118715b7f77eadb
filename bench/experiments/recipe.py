"""A recipe resolved once: what every command trains, compares and evaluates with, as typed settings.

`resolve` is the one place where a recipe's sections are merged. Every function below it reads the `Recipe` it
returns, and none rewrites it: a stage's config is `Recipe.config(algorithm)`, an evaluation's settings are
`Recipe.eval` (changed per stage with `dataclasses.replace`, never by editing a mapping). The order, each step
over the ones before it, so that the command line always wins:

1. the YAML file (a name in bench/recipes, or a path): its sections and names checked, its data paths anchored
   (`HH_RLHF_PATH`, when set, is every recipe's data; `bench.runs.recipes.load`);
2. `--data-path`, over `data.path`;
3. for a comparison, `compare.algorithms` over `algorithms` and `compare.eval` over `eval`;
4. the command line's `--eval.KEY=VALUE` (and `bench eval`'s short flags, which are the same settings), over
   `eval`;
5. for a dry run, the tiny stand-ins (`dry_run_sections`);
6. the gold world, when the recipe has `gold:`: `data.path` becomes the gold-labelled data, `judge: gold` the
   gold's spec (`bench.experiments.gold.gold_world`);
7. validation into typed settings: `EvalSettings`, and for a comparison `CompareSettings` (stages, arms, seeds
   — `--seeds` wins —, the budget, best-of-N);
8. what is left of the command line (LightningCLI's `--trainer.max_steps=2`, `--model.beta=0.3`) is returned
   as it is: LightningCLI applies it last, over the algorithm's config.
"""

import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

import modules
from bench.core.errors import BenchError, ConfigError
from bench.evaluation.best_of_n import check_ns
from bench.evaluation.evaluate import EvalSettings
from bench.evaluation.rewards import reward_needs_hub
from bench.experiments import gold
from bench.runs import recipes

World = Literal["none", "read", "create"]  # the gold world: left out, read (an error when missing), or made


def stage_names() -> list[str]:
    """Every stage, in the order they run: SFT, the reward models, then the aligned algorithms."""
    starts = [name for name in modules.registry() if modules.trains_policy(name) and name not in modules.aligned()]
    return [*starts, modules.reward_model_name(), *modules.aligned()]


@dataclass(frozen=True)
class CompareSettings:
    """A comparison's `compare:` section, checked: which stages run, under which seeds, on which budget."""

    stages: tuple[str, ...]
    arms: dict[str, tuple[str, dict]]  # {arm: (its algorithm, the config sections it overrides)}
    seeds: tuple[int, ...]
    budget_prompts: int | None = None
    best_of_n: tuple[int, ...] = ()
    best_of_n_gold: tuple[int, ...] = ()
    tracked: frozenset[str] = frozenset()  # stages whose gold and proxy are scored along training
    tracking: dict = field(default_factory=dict)  # `ScoresAlongTraining`'s settings

    def algorithm(self, stage: str) -> str:
        return self.arms[stage][0] if stage in self.arms else stage

    def overrides(self, stage: str) -> dict:
        """What an arm overrides of its algorithm's config; nothing for any other stage."""
        return self.arms[stage][1] if stage in self.arms else {}

    @classmethod
    def parse(cls, name: str, section: dict, default_seed: int, seeds: list[int] | None) -> "CompareSettings":
        arms = arms_of(name, section.get("arms") or {})
        budget = section.get("budget_prompts")
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ConfigError(f"recipe {name}: compare.budget_prompts must be a positive integer, got {budget!r}")
        tracking = dict(section.get("overoptimisation") or {})
        return cls(stages=tuple(stages_of(name, section.get("stages"), arms)), arms=arms,
                   seeds=tuple(seeds_of(name, section.get("seeds") if seeds is None else seeds, default_seed)),
                   budget_prompts=budget,
                   best_of_n=tuple(check_ns(section["best_of_n"])) if section.get("best_of_n") else (),
                   best_of_n_gold=tuple(check_ns(section["best_of_n_gold"])) if section.get("best_of_n_gold") else (),
                   tracked=frozenset(tracking.pop("stages", None) or ()), tracking=tracking)


def arms_of(name: str, section: dict) -> dict[str, tuple[str, dict]]:
    """`compare.arms`: an arm is an algorithm with other settings, run as a stage of its own
    (`dpo-beta0.5: {algorithm: dpo, model: {beta: 0.5}}`)."""
    arms = {}
    for arm, settings in section.items():
        settings = dict(settings or {})
        algorithm = settings.pop("algorithm", None)
        if algorithm not in modules.aligned():
            raise ConfigError(f"recipe {name}: compare.arms.{arm}.algorithm must name an aligned algorithm "
                              f"({', '.join(modules.aligned())}), got {algorithm!r}")
        unknown = set(settings) - set(recipes.CLI_SECTIONS)
        if unknown:
            raise ConfigError(f"recipe {name}: compare.arms.{arm} has {sorted(unknown)}; an arm overrides "
                              f"only {', '.join(recipes.CLI_SECTIONS)}")
        if arm in stage_names():
            raise ConfigError(f"recipe {name}: compare.arms.{arm} would hide the stage of that name")
        arms[arm] = (algorithm, settings)
    return arms


def stages_of(name: str, listed: list[str] | None, arms: dict[str, tuple[str, dict]]) -> list[str]:
    """The stages to run, in the order they run: SFT, the reward models, the algorithms (an arm where its
    algorithm stands, in the recipe's order)."""
    all_stages = stage_names()
    stages = list(listed or (modules.reward_model_name(), *modules.aligned()))

    def algorithm(stage: str) -> str:
        return arms[stage][0] if stage in arms else stage

    unknown = [s for s in stages if s not in all_stages and s not in arms]
    if unknown:
        raise ConfigError(f"recipe {name}: compare.stages names {unknown}, which is not a stage; "
                          f"stages are {', '.join(all_stages)} and the recipe's compare.arms "
                          f"({', '.join(arms) or 'none'})")
    optimising = [s for s in stages if algorithm(s) in modules.aligned()
                  and modules.module_class(algorithm(s)).proxy_setting]
    if optimising and modules.reward_model_name() not in stages:
        raise ConfigError(f"recipe {name}: compare.stages has {', '.join(optimising)}, which optimise a proxy "
                          f"reward model, but no `{modules.reward_model_name()}` stage to train it")
    return sorted(stages, key=lambda s: (all_stages.index(algorithm(s)), stages.index(s)))


def seeds_of(name: str, seeds, default_seed: int) -> list[int]:
    """`--seeds`, else `compare.seeds`, else the recipe's one `seed_everything`."""
    if seeds is None:
        return [default_seed]
    if not isinstance(seeds, (list, tuple)) or not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"recipe {name}: compare.seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"recipe {name}: compare.seeds repeats a seed: {list(seeds)}")
    return list(seeds)


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe (see the module's docstring). Its mappings are copies: reading one never changes it."""

    name: str
    sections: dict  # seed_everything, trainer, data, model and algorithms, merged as `resolve` says
    eval: EvalSettings
    compare: CompareSettings | None = None  # for a comparison
    gold_model: str | None = None  # the gold world's gold (a reward spec or a reward-model folder)
    gold_manifest: dict | None = None  # what the gold-labelled data was made from

    def config(self, algorithm: str, overrides: dict | None = None) -> dict:
        """The LightningCLI config of `algorithm` (the shared sections, then `algorithms.<algorithm>`, then
        `overrides`, for example an arm's)."""
        return recipes.deep_merge(recipes.for_algorithm(self.sections, algorithm), overrides or {})

    @property
    def data(self) -> dict:
        return copy.deepcopy(self.sections.get("data") or {})


def eval_overrides(argv: list[str]) -> tuple[dict, list[str]]:
    """`--eval.n_prompts=8` or `--eval.sampling.max_new_tokens 32` as a mapping for the recipe's `eval:`; the
    rest of argv is left for LightningCLI (`--trainer.max_steps=2`)."""
    settings, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--eval."):
            key, has_value, value = arg[2:].partition("=")
            if not has_value:
                if i + 1 >= len(argv):
                    raise BenchError(f"{arg} needs a value")
                value, i = argv[i + 1], i + 1
            node = settings
            *parents, leaf = key.split(".")[1:]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        else:
            rest.append(arg)
        i += 1
    return settings, rest


def resolve(name_or_path: str, argv: list[str] = (), *, comparison: bool = False, world: World = "read",
            data_path: str | None = None, eval_settings: dict | None = None, seeds: list[int] | None = None,
            dry_run: bool = False, gold_section: dict | None = None) -> tuple[Recipe, list[str]]:
    """(the recipe, the command line's LightningCLI overrides), in the order of the module's docstring.
    `eval_settings` are a command's own flags for `eval:` (bench eval's `--n-prompts`), applied with `--eval.*`;
    `gold_section` is `bench label`'s flags for `gold:`."""
    name, sections = recipes.load(name_or_path)  # 1
    if data_path:  # 2
        sections = recipes.deep_merge(sections, {"data": {"path": data_path}})
    if gold_section:
        sections = recipes.deep_merge(sections, {"gold": gold_section})
    compare_section = dict(sections.get("compare") or {})
    if comparison:  # 3
        sections = recipes.deep_merge(sections, {"algorithms": compare_section.pop("algorithms", None) or {},
                                                 "eval": compare_section.pop("eval", None) or {}})
    from_command_line, rest = eval_overrides(list(argv))  # 4
    sections = recipes.deep_merge(sections, {"eval": recipes.deep_merge(eval_settings or {}, from_command_line)})
    if dry_run:  # 5
        sections, compare_section = dry_run_sections(sections, compare_section)
    gold_model = gold_manifest = None
    if world != "none":  # 6
        sections = gold.gold_world(name, sections, create=world == "create")
        gold_model, gold_manifest = sections.pop("gold_model", None), sections.pop("gold_manifest", None)
    eval_ = EvalSettings.from_dict(sections.get("eval"))  # 7
    seed = int(sections.get("seed_everything", 0) or 0)
    compare = CompareSettings.parse(name, compare_section, seed, seeds) if comparison else None
    if dry_run and compare is not None:
        compare = CompareSettings(**{**compare.__dict__, "seeds": compare.seeds[:1]})
    kept = {key: value for key, value in sections.items() if key in (*recipes.CLI_SECTIONS, "algorithms")}
    return Recipe(name, kept, eval_, compare, gold_model, gold_manifest), rest  # 8: `rest`


def dry_run_sections(sections: dict, compare: dict) -> tuple[dict, dict]:
    """The recipe with the tiny policy, MiniLM reward models, short sequences and one step per stage; its
    `compare:` with two budget prompts, small best-of-N and a local judge (an `rm` stage) when it had none."""
    path = (sections.get("data") or {}).get("path")
    if not path or not Path(path).is_dir():
        raise ConfigError(f"a dry run reads local data: set HH_RLHF_PATH or --data-path (recipe has {path!r})")
    small = copy.deepcopy(sections)
    trainer = small.setdefault("trainer", {})
    trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_steps=1, max_epochs=-1,
                   val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.pop("num_nodes", None)
    small["data"].update(path=str(Path(path).resolve()), batch_size=2,
                                        eval_batch_size=2, max_train_pairs=8, max_val_pairs=2, max_length=64,
                                        max_prompt_length=32)
    small.setdefault("model", {}).update(policy="tiny", reference=None)
    for name, section in (small.get("algorithms") or {}).items():
        small["algorithms"][name] = small_algorithm(name, section or {})
    small_gold(small)
    judge = "gold" if small.get("gold") and (small.get("eval") or {}).get("judge") == "gold" else "latest"
    sampling = {**((small.get("eval") or {}).get("sampling") or {}), "max_new_tokens": 4, "batch_size": 2}
    small["eval"] = {**(small.get("eval") or {}), "n_prompts": 2, "judge": judge, "proxy": "latest",
                     "sampling": sampling}
    return small, small_compare(compare)


def small_algorithm(name: str, section: dict) -> dict:
    """One algorithm's section of a dry run: tiny models, two rows a batch, four new tokens."""
    model, data = section.get("model") or {}, section.get("data") or {}
    if not modules.trains_policy(name):  # the reward model
        model.update({modules.module_class(name).model_key: "all-minilm-l6-v2", "max_length": 64})
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
    return {**section, "model": model, "data": data}


def small_gold(small: dict) -> None:
    """A dry run's gold world: a few short on-policy samples of the tiny policy, a local gold for a hub one, and
    a one-step MiniLM gold model."""
    on_policy = (small.get("gold") or {}).get("on_policy")
    if on_policy is not None:
        small["gold"]["on_policy"] = {**on_policy, "max_prompts": 160, "max_prompt_tokens": 64,
                                      "prompts": "hh-first-turn",
                                      "sampling": {**(on_policy.get("sampling") or {}), "max_new_tokens": 8,
                                                   "batch_size": 64}}
        small["data"].update(val_fraction=0.2, test_fraction=0.2)
    if small.get("gold") and reward_needs_hub(small["gold"].get("model")):
        small["gold"] = {**small["gold"], "model": "reward:vader"}
    if small.get("gold"):
        train = {"trainer": {"max_steps": 1, "max_epochs": -1, "limit_val_batches": 1},
                 "data": {"batch_size": 2, "max_train_pairs": 8},
                 "model": {"backbone": "all-minilm-l6-v2", "max_length": 64}}
        small["gold"] = {**small["gold"], "train": train}


def small_compare(compare: dict) -> dict:
    small = {**compare, "budget_prompts": 2}
    if small.get("stages") and modules.reward_model_name() not in small["stages"]:  # a local judge for the recipe's API
        small["stages"] = [modules.reward_model_name(), *small["stages"]]
    if small.get("best_of_n"):
        small["best_of_n"] = [1, 2]
    if small.get("best_of_n_gold"):
        small["best_of_n_gold"] = [2]
    if small.get("overoptimisation"):
        small["overoptimisation"] = {**small["overoptimisation"], "n_prompts": 2, "every_n_steps": 1,
                                     "sampling": {"max_new_tokens": 4, "batch_size": 2}}
    return small
