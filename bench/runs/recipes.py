"""Recipes: YAML files in bench/recipes/ (or any path) holding a whole LightningCLI config.

The `trainer`, `data` and `model` sections are shared by all algorithms; `algorithms.<name>` holds the
sections one algorithm overrides. Resolving a recipe for an algorithm merges the two. The shared
`model` section describes the policy, so a module that trains something else (the reward model, whose
`model_key` is `backbone`) takes its `model` section from its own `algorithms.<name>` alone. The `eval` section holds `bench eval`'s settings (bench/evaluation/evaluate.py).

Where the data is does not depend on the working directory: `HH_RLHF_PATH`, when set, replaces every
`data.path` of a recipe; otherwise a relative local `data.path` is taken relative to the repository root
for the recipes shipped in bench/recipes, and relative to the recipe file's folder for any other.
"""

import copy
import os
from pathlib import Path

import yaml

from bench.core.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # bench/recipes: the shipped recipes
PROJECT_ROOT = RECIPE_DIR.parents[1]
SWEEP_DIR = PROJECT_ROOT / "sweeps"  # ALGO.yaml: an algorithm's search space (`bench.experiments.sweep.load_space` checks it)


def key_settings(algorithm: str) -> list[str]:
    """The settings that matter for an algorithm: the config paths its search space tunes (`model.beta`,
    `model.lr`); `model.lr` for one without a space."""
    file = SWEEP_DIR / f"{algorithm}.yaml"
    space = (yaml.safe_load(file.read_text()) or {}).get("space") if file.is_file() else None
    return list(space) if isinstance(space, dict) and space else ["model.lr"]
DATA_ENV = "HH_RLHF_PATH"  # the one place the HH-RLHF source is set for every command
CLI_SECTIONS = ("seed_everything", "trainer", "data", "model")
# Every section a recipe may hold, and the keys of `compare:`; a misspelt one is refused, never ignored.
SECTIONS = (*CLI_SECTIONS, "algorithms", "eval", "compare", "gold", "published")
COMPARE_KEYS = ("stages", "arms", "seeds", "budget_prompts", "best_of_n", "best_of_n_gold", "overoptimisation",
                "algorithms", "eval")


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a folder; give a recipe YAML file (for example {path / 'recipe.yaml'})")
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; known recipes: {', '.join(available())}, or give a path")
    return path


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_data_path(path: str, base: Path = PROJECT_ROOT) -> str:
    """`HH_RLHF_PATH` if set; else a relative local folder anchored at `base`; a hub id as it is."""
    from datamodules.hh_rlhf import is_local

    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    expanded = Path(path).expanduser()
    if expanded.is_absolute() or not (path.startswith(".") or is_local(path)):
        return str(expanded) if expanded.is_absolute() else path
    return os.path.normpath(base / expanded)


def _resolve_data_paths(recipe: dict, base: Path) -> None:
    if os.environ.get(DATA_ENV) and isinstance(recipe.get("data") or {}, dict):  # also a recipe without data.path
        recipe["data"] = {**(recipe.get("data") or {}), "path": os.environ[DATA_ENV]}
    sections = [recipe.get("data"), *((overrides or {}).get("data") for overrides in
                                      (recipe.get("algorithms") or {}).values() if isinstance(overrides, dict))]
    for section in sections:
        if isinstance(section, dict) and isinstance(section.get("path"), str):
            section["path"] = resolve_data_path(section["path"], base)


def read_yaml_file(path: Path, what: str):
    """A user's YAML file (a recipe, a search space), or one line naming it and what is wrong with it."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {yaml_problem(err)}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not a text file ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read ({err.strerror or err})") from err


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parser's error in one line: what is wrong and where, lines and columns counted from 1."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not problem or mark is None:
        return " ".join(str(err).split())
    where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        where += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    return where


def load(name_or_path: str) -> tuple[str, dict]:
    """(recipe name, the recipe with its data paths resolved)."""
    path = recipe_path(name_or_path)
    recipe = read_yaml_file(path, "recipe")
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path} must be a mapping of config sections")
    check_keys(path, recipe)
    _resolve_data_paths(recipe, PROJECT_ROOT if path.resolve().parent == RECIPE_DIR else path.resolve().parent)
    return path.stem, recipe


def check_keys(path: Path, recipe: dict) -> None:
    """Sections, algorithm names and comparison keys are known ones; LightningCLI checks what is inside
    `trainer`, `data` and `model`, and `eval`/`gold` check their own settings."""
    from modules import declared_names

    trainable = declared_names()

    def refuse(where: str, unknown: set, known) -> None:
        if unknown:
            raise ConfigError(f"recipe {path}: unknown {where} {', '.join(map(repr, sorted(map(str, unknown))))}; "
                              f"known: {', '.join(known)}")

    refuse("section", set(recipe) - set(SECTIONS), SECTIONS)
    for section in ("algorithms", "compare"):
        if not isinstance(recipe.get(section) or {}, dict):
            raise ConfigError(f"recipe {path}: `{section}:` must be a mapping")
    compare = recipe.get("compare") or {}
    refuse("compare key", set(compare) - set(COMPARE_KEYS), COMPARE_KEYS)
    for where, sections in (("algorithms", recipe.get("algorithms") or {}), ("compare.algorithms", compare.get("algorithms") or {})):
        refuse(f"algorithm under {where}:", set(sections) - set(trainable), trainable)
        for name, overrides in sections.items():
            if not isinstance(overrides or {}, dict):
                raise ConfigError(f"recipe {path}: {where}.{name} must be a mapping of config sections")
            refuse(f"section under {where}.{name}:", set(overrides or {}) - set(CLI_SECTIONS), CLI_SECTIONS)


def for_algorithm(recipe: dict, algorithm: str) -> dict:
    """The LightningCLI config for `algorithm`: the shared sections merged with `algorithms.<algorithm>`.
    Sections that are not LightningCLI's (eval, compare, published, ...) are left out."""
    import modules

    shared = {key: value for key, value in recipe.items() if key in CLI_SECTIONS}
    if not modules.trains_policy(algorithm):  # the shared `model` section describes the policy
        shared.pop("model", None)
    if modules.module_class(algorithm).online and "gradient_clip_val" in (shared.get("trainer") or {}):
        # Lightning's clipping is for automatic optimisation; an online algorithm clips each update itself
        # (model.max_grad_norm). Its own section, or the command line, may still set one, and is refused.
        shared["trainer"] = {k: v for k, v in shared["trainer"].items() if k != "gradient_clip_val"}
    overrides = (recipe.get("algorithms") or {}).get(algorithm) or {}
    return deep_merge(shared, overrides)
