"""Benchmarks: tessera against transformers and against this CPU's matmul limit (`tessera bench`)."""
