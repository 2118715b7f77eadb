"""Alignment algorithms as LightningModules behind one interface, and their pure loss functions.

`registry()` finds every trainable module: each class in this package that sets `name` (see the facts on
`modules.base.TrainedHFModel`). A new algorithm is a module file here; nothing else lists it. The registry
imports the algorithm modules, and their Lightning base, on first use: importing a light helper of this package
(`modules.losses`, `modules.logps`) loads none of them.
"""

import ast
import functools
import importlib
import pkgutil
from pathlib import Path


@functools.cache
def registry() -> dict[str, type]:
    """name -> class of every trainable module: the starting points (SFT), the reward model, then the aligned
    algorithms, offline before online, each group by name."""
    from modules.base import TrainedHFModel

    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, TrainedHFModel) and value.__module__ == module.__name__
                    and value.__dict__.get("name")):
                if value.name in found:
                    raise RuntimeError(f"two modules are named {value.name!r}: {found[value.name]} and {value}")
                found[value.name] = value
    return dict(sorted(found.items(), key=lambda item: (item[1].aligned, item[1].online, item[0])))


@functools.cache
def declared_names() -> list[str]:
    """The names the registry will find, read from the source without importing it.

    Importing the registry loads torch, Lightning and transformers (about 4 s): help, argument errors and
    recipe checks use this instead. It reads a class-level `name = "..."` in each module file;
    `tests/modules/test_registry.py` checks that it lists exactly the registry's names.
    """
    found = []
    for info in pkgutil.iter_modules(__path__):
        tree = ast.parse((Path(__path__[0]) / f"{info.name}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                found += [statement.value.value for statement in node.body
                          if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant)
                          and any(isinstance(target, ast.Name) and target.id == "name" for target in statement.targets)]
    return sorted(found)


def module_class(name: str) -> type:
    return registry()[name]


def algorithms() -> list[str]:
    """The policy-training algorithms (the reward model left out)."""
    from modules.base import AlignmentModule

    return [name for name, cls in registry().items() if issubclass(cls, AlignmentModule)]


def reward_model_name() -> str:
    """The registry's reward model: the module that trains a scorer rather than a policy (`model_key`), whose
    roles (proxy, judge, gold) comparisons, gold worlds and evaluation look up by its name."""
    (name,) = [name for name, cls in registry().items() if cls.model_key != "policy"]
    return name


def trains_policy(name: str) -> bool:
    return registry()[name].model_key == "policy"


def aligned() -> list[str]:
    """The algorithms that `bench compare` trains from the starting policy and evaluates, in display order."""
    return [name for name, cls in registry().items() if cls.aligned]


def __getattr__(name: str):
    """`ALGORITHMS`, `TRAINABLE`, and `from modules import DPO`."""
    if name == "ALGORITHMS":
        return algorithms()
    if name == "TRAINABLE":
        return list(registry())
    for cls in registry().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'modules' has no attribute {name!r}")
