"""The one rule of every class-attribute registry (rewards, judges, prompt sources, samplers): a name names one
class. A user's class named like a built-in one is refused, not put in its place without a word."""


def register(registry: dict[str, type], name: str, cls: type, what: str) -> None:
    """Adds `cls` to `registry` under `name`. A name another class holds is refused; the same class defined again
    (its module reloaded) replaces itself."""
    taken = registry.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"{what} {name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                        f"{cls.__module__}.{cls.__qualname__} needs another {what.split()[-1]}")
    registry[name] = cls
