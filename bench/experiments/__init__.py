"""Commands' work that spans stages: comparisons, sweeps, gold worlds and the speed benchmark. Imports the
layers below."""
