"""A recipe's values against a settings group's field types: one line naming the field, before the group is built."""

from dataclasses import dataclass
from typing import Literal

import pytest

from bench.core.errors import ConfigError
from bench.core.settings import check_values


@dataclass
class Group:
    count: int = 1
    rate: float = 0.5
    name: str = "a"
    flag: bool = True
    limit: int | None = None
    rule: Literal["x", "y"] = "x"
    nested: dict | None = None  # not a scalar: left to its own check


@pytest.mark.parametrize("values", [
    {"count": 3, "rate": 2, "name": "b", "flag": False, "limit": None, "rule": "y", "nested": {"k": 1}},
    {"rate": 0.1, "limit": 7, "nested": "anything"},
])
def test_values_of_the_fields_types_pass(values):
    check_values(Group, values, "group")


@pytest.mark.parametrize("field, value, message", [
    ("count", "two", "group.count must be a whole number, got 'two'"),
    ("count", 2.0, "group.count must be a whole number, got 2.0"),
    ("count", True, "group.count must be a whole number, got True"),  # a bool is not a number here
    ("rate", "1e-5", "group.rate must be a number, got '1e-5'"),  # YAML 1.1 reads 1e-5 (no dot) as a string
    ("name", ["a"], "group.name must be a string, got ['a']"),
    ("flag", "maybe", "group.flag must be true or false, got 'maybe'"),
    ("limit", "lots", "group.limit must be a whole number or null, got 'lots'"),
    ("rule", 1, "group.rule must be a string, got 1"),
])
def test_a_value_of_another_type_is_one_line_naming_the_field(field, value, message):
    with pytest.raises(ConfigError) as error:
        check_values(Group, {field: value}, "group")
    assert str(error.value) == message
