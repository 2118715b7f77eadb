"""The GPU recipes' FSDP strategy, checked on CPU: built as LightningCLI builds it, wrapping the decoder layers."""

import copy

import pytest
from lightning.pytorch.strategies import FSDPStrategy

from bench.core.errors import ConfigError
from bench.core.models import resolve
from bench.runs import recipes
from bench.runs.strategies import build_strategy, check_strategies

GPT_NEOX_LAYER = "transformers.models.gpt_neox.modeling_gpt_neox.GPTNeoXLayer"


@pytest.mark.parametrize("name, layer", [("dpo-hh-pythia28", "GPTNeoXLayer"), ("kto-archangel", "GPTNeoXLayer"),
                                         ("rrhf-hh", "LlamaDecoderLayer")])
def test_gpu_recipes_shard_and_checkpoint_their_decoder_layers(name, layer):
    recipe_name, recipe = recipes.load(name)
    (first, *rest) = check_strategies(recipe_name, recipe)
    assert first.startswith("trainer.strategy: FSDPStrategy")
    assert f"auto_wrap_policy={layer}" in first and f"activation_checkpointing_policy={layer}" in first
    strategy = build_strategy("trainer.strategy", recipe["trainer"]["strategy"])
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy.kwargs["use_orig_params"]
    # Both policies are ModuleWrapPolicy objects over exactly the decoder layer class.
    for policy in (strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"]):
        assert {cls.__name__ for cls in policy._module_classes} == {layer}
    if name == "rrhf-hh":  # its reward model is a Pythia, with its own wrap class
        assert rest == ["algorithms.rm.trainer.strategy: FSDPStrategy (auto_wrap_policy=GPTNeoXLayer, "
                        "activation_checkpointing_policy=GPTNeoXLayer) for EleutherAI/pythia-1.4b"]


def fsdp_recipe(**init_args) -> dict:
    return {"trainer": {"strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy",
                                     "init_args": {"auto_wrap_policy": [GPT_NEOX_LAYER], **init_args}}},
            "model": {"policy": "EleutherAI/pythia-2.8b"}}


@pytest.mark.parametrize("recipe, message", [
    (fsdp_recipe(auto_wrap_policy=["torch.nn.Linear"]), "torch.nn.modules.linear.Linear is not the decoder layer"),
    (fsdp_recipe(sharding_strategy="FULLY_SHARDED"), "recipe bad: trainer.strategy: "),
    (fsdp_recipe(shard_everything=True), "shard_everything"),
])
def test_a_wrong_strategy_config_is_named_by_the_dry_run(recipe, message):
    with pytest.raises(ConfigError, match=message):
        check_strategies("bad", recipe)


def test_a_layer_of_another_model_type_than_the_policy_is_refused():
    recipe = copy.deepcopy(fsdp_recipe())
    recipe["model"]["policy"] = resolve("smollm2-135m-instruct")  # a local folder: its config says llama
    with pytest.raises(ConfigError, match="GPTNeoXLayer is a gpt_neox layer, but the policy .* is a llama model"):
        check_strategies("bad", recipe)
