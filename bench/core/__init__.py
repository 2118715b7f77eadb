"""The foundation: errors, atomic files, paths and the cache, model specs and loading, quieted library output, and
which process owns a run. Imports nothing else of the project."""
