"""Alignment algorithms as LightningModules behind one interface, and their pure loss functions.

The registry imports the algorithm modules on first use: `bench` and `datamodules` import helpers from
here, and the algorithm modules import from them.
"""

import importlib

# Everything `bench train` can train: the policy algorithms and the reward model, as module:class.
_REGISTRY = {
    "sft": "modules.sft:SFT",
    "dpo": "modules.dpo:DPO",
    "ipo": "modules.ipo:IPO",
    "kto": "modules.kto:KTO",
    "rrhf": "modules.rrhf:RRHF",
    "ppo": "modules.ppo:PPO",
    "rm": "modules.reward_model:RewardModel",
}
ALGORITHMS = [name for name in _REGISTRY if name != "rm"]
TRAINABLE = list(_REGISTRY)


def module_class(name: str) -> type:
    module, _, attribute = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def __getattr__(name: str):
    """`from modules import DPO` still works."""
    for key, target in _REGISTRY.items():
        if target.endswith(f":{name}"):
            return module_class(key)
    raise AttributeError(f"module 'modules' has no attribute {name!r}")
