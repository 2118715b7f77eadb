"""A registry's name names one class: another class under a taken name is refused, naming both; the same class
defined again (a reloaded module) replaces itself; a class without a name of its own is not registered."""

import pytest

from bench.core.registries import register


def make(module: str, qualname: str, name: str = "vader") -> type:
    return type(qualname, (), {"__module__": module, "__qualname__": qualname, "name": name})


def test_a_taken_name_is_refused_and_the_same_class_again_replaces_itself():
    registry = {}
    first = make("somewhere", "Vader")
    register(registry, first, "name", "reward name")
    again = make("somewhere", "Vader")  # the module reloaded
    register(registry, again, "name", "reward name")
    assert registry == {"vader": again}
    register(registry, type("Variant", (again,), {}), "name", "reward name")  # keeps its parent's name
    assert registry == {"vader": again}
    with pytest.raises(TypeError, match=r"reward name 'vader' is taken by somewhere\.Vader; "
                                        r"mine\.MyVader needs another name"):
        register(registry, make("mine", "MyVader"), "name", "reward name")
    assert registry == {"vader": again}
