"""bench.core.memory: collections between stages scan only what the stages made."""

import gc
import weakref

from bench.core.memory import collections_of_new_objects_only


class Node:
    pass


def test_a_cycle_made_inside_is_freed_and_the_objects_from_before_are_left_alone_until_exit():
    assert gc.get_freeze_count() == 0
    with collections_of_new_objects_only():
        assert gc.get_freeze_count() > 10_000  # the test process's objects: not scanned by collections inside
        made = Node()
        made.self = made  # a reference cycle, as a trainer and its models make
        alive = weakref.ref(made)
        del made
        assert alive() is not None
        assert gc.collect() >= 1 and alive() is None
    assert gc.get_freeze_count() == 0


def test_the_objects_from_before_are_unfrozen_on_an_error_too():
    try:
        with collections_of_new_objects_only():
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert gc.get_freeze_count() == 0
