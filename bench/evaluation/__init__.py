"""Judging policies: evaluation (`evaluate`), judges, computable rewards, best-of-N, over-optimisation, gold
labels and on-policy data, and the statistics. Imports `bench.runs` and the layers below it."""
