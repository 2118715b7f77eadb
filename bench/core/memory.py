"""Freeing memory between the stages that one process runs (a comparison's stages, a study's trials)."""

import contextlib
import gc


@contextlib.contextmanager
def collections_of_new_objects_only():
    """Within it, `gc.collect()` scans only the objects made inside, not the ones alive on entry (imported
    torch, transformers and Lightning, a caller's state: 620,000 objects in a fresh `bench compare`, a full
    collection of them 0.3 s, and more in a long-lived process such as the test suite). The collections
    between stages are there to free the trainers' and models' reference cycles, which are all made inside.
    The objects alive on entry are left to the collector again on exit (`gc.freeze` / `gc.unfreeze`)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
