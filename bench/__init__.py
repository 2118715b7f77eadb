"""The `bench` harness, in layers that import only the layers below them (`tests/test_imports.py`):

core         errors, atomic files, paths and the cache, model specs, quieted output, run ownership, batches
sampling     the samplers (`generation`) and the harness's decode loop (`decoding`)
             -- `datamodules` (the data views) and `modules` (the algorithms) sit here, between the two --
runs         recipes, MLflow tracking, `train_one`, strategies, the throughput callback
evaluation   evaluation, judges, computable rewards, best-of-N, over-optimisation, gold labels, statistics
reports      tables with their tests, figures, the data report
experiments  comparisons, sweeps, gold worlds, the speed benchmark
cli          the `bench` command and `bench ui`
"""
