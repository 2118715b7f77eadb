"""A recipe's distributed strategy, checked where it cannot run: FSDP needs GPUs, so a dry run on CPU parses
and builds the strategy exactly as LightningCLI would, and checks that what it wraps and checkpoints are the
policy's decoder layers (a wrong class would leave the whole model as one unit: no sharding, no memory saved)."""

import importlib
import inspect
import logging

from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy

import modules
from bench.runs import recipes
from bench.core.errors import ConfigError

log = logging.getLogger(__name__)

LAYER_POLICIES = ("auto_wrap_policy", "activation_checkpointing_policy")


def strategy_sections(recipe: dict) -> list[tuple[str, dict, str]]:
    """(where, strategy config, policy spec) for every class-path strategy in the recipe."""
    found = []
    for algorithm in [None, *(recipe.get("algorithms") or {})]:
        config = recipes.for_algorithm(recipe, algorithm) if algorithm else recipe
        strategy = (config.get("trainer") or {}).get("strategy")
        if isinstance(strategy, dict):
            where = f"algorithms.{algorithm}.trainer.strategy" if algorithm else "trainer.strategy"
            model = config.get("model") or {}
            key = modules.module_class(algorithm).model_key if algorithm else "policy"
            found.append((where, strategy, model.get(key, "")))
    return found


def build_strategy(where: str, strategy: dict) -> Strategy:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    try:
        return parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
    except Exception as err:  # jsonargparse's errors name the option; keep its first lines
        detail = " ".join(line.strip() for line in str(err).splitlines()[:8])
        raise ConfigError(f"{where}: {detail}") from err


def check_decoder_layer(where: str, layer: type, policy: str) -> None:
    """`layer` must be what its HF model lists as unsplittable (its decoder layer), of the policy's model type."""
    module = inspect.getmodule(layer)
    models = [obj for obj in vars(module).values()
              if inspect.isclass(obj) and layer.__name__ in (getattr(obj, "_no_split_modules", None) or [])]
    if not models:
        raise ConfigError(f"{where}: {layer.__module__}.{layer.__name__} is not the decoder layer of a transformers "
                          "model (no model in its module lists it in _no_split_modules)")
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(policy, local_files_only=True).model_type
    except Exception:  # offline, the hub config is not at hand: the layer class alone was checked
        log.info("%s: %s's config is not available offline; checked %s alone", where, policy, layer.__name__)
        return
    if models[0].config_class.model_type != model_type:
        raise ConfigError(f"{where}: {layer.__name__} is a {models[0].config_class.model_type} layer, but the "
                          f"policy {policy} is a {model_type} model")


def check_strategies(recipe_name: str, recipe: dict) -> list[str]:
    """Every class-path strategy of the recipe built and checked; one line each, for the dry run to print."""
    checked, seen = [], set()
    for where, strategy, policy in strategy_sections(recipe):
        if (key := (repr(strategy), policy)) in seen:  # an algorithm that inherits the shared strategy and model
            continue
        seen.add(key)
        built = build_strategy(f"recipe {recipe_name}: {where}", strategy)
        layers = []
        for key in LAYER_POLICIES:
            for path in (strategy.get("init_args") or {}).get(key) or []:
                module_name, _, class_name = path.rpartition(".")
                layer = getattr(importlib.import_module(module_name), class_name)
                check_decoder_layer(f"recipe {recipe_name}: {where}.{key}", layer, policy)
                layers.append(f"{key}={class_name}")
        checked.append(f"{where}: {type(built).__name__} ({', '.join(layers) or 'no layer policies'}) for {policy}")
    return checked
