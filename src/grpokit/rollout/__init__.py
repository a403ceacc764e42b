"""Sampling completions: the `Sampler` protocol and the in-process KV-cache sampler (`sampler`), and held-out
evaluation through the same sampler (`evaluate`)."""
