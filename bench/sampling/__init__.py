"""Sampling from a policy: `generation` (settings, the harness's KV-cache sampler, `model.generate`) and
`decoding` (its decode loop's machinery). Imports only `bench.core`."""
