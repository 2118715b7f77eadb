"""The one rule of every class-attribute registry (rewards, judges, prompt sources, samplers): a name names one
class. A user's class named like a built-in one is refused, not put in its place without a word."""


def register(registry: dict[str, type], cls: type, key: str, what: str) -> None:
    """Adds `cls` to `registry` under the value of its own attribute `key` (`name`, a judge's `kind`); a class that
    does not set one itself (a subclass keeping its parent's) is not registered. A name another class holds is
    refused; the same class defined again (its module reloaded) replaces itself."""
    name = cls.__dict__.get(key)
    if not name:
        return
    taken = registry.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"{what} {name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                        f"{cls.__module__}.{cls.__qualname__} needs another {what.split()[-1]}")
    registry[name] = cls
