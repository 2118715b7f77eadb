"""The typed settings groups that recipes fill (`eval:`, `sampling:`, `gold:`, `gold.on_policy:`): a recipe's
values are checked against the group's field types once, before the group is built, so that `n_prompts: two`
is one line naming the field, not a TypeError from deep inside a comparison."""

import types
import typing

from bench.core.errors import ConfigError

DESCRIBED = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null"}


def check_values(settings_class: type, values: dict, where: str, also_known: str = "") -> None:
    """ConfigError listing the names the group does not have (`also_known`: the sections read beside it), else
    naming `where.field` for the first value of a scalar field (bool, int, float, str, a Literal, or a union of
    them with None) that is not of the field's type: an int passes as a float, a bool never as a number. Fields
    of other types (nested settings, tuples, mappings) are left to their own checks, and the values' ranges to
    the class's."""
    known = sorted(settings_class.__dataclass_fields__)
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown {where} settings {sorted(unknown)}; known: {known}"
                          + (f" and {also_known}" if also_known else ""))
    hints = typing.get_type_hints(settings_class)
    for name, value in values.items():
        allowed = scalar_types(hints.get(name))
        if allowed and not fits(value, allowed):
            wanted = " or ".join(dict.fromkeys(DESCRIBED[kind] for kind in allowed))
            raise ConfigError(f"{where}.{name} must be {wanted}, got {value!r}")


def scalar_types(hint) -> tuple[type, ...] | None:
    """The scalar types a field's annotation admits, or None when it admits something else too."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return tuple(dict.fromkeys(type(choice) for choice in typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        parts = [scalar_types(arg) for arg in typing.get_args(hint)]
        return None if None in parts else tuple(kind for part in parts for kind in part)
    return (hint,) if hint in DESCRIBED else None


def fits(value, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)
