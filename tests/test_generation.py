"""tessera.generation: token choice (greedy, temperature, top-k, top-p) against transformers' warpers, and the
sampling settings' validation."""

import pytest
import torch

from tessera.generation import SamplingParams, next_tokens


def test_choosing_a_token_leaves_the_callers_logits_as_they_were():
    logits = torch.randn(2, 10)
    before = logits.clone()
    for temperature in (0.0, 1.0):
        next_tokens(logits, SamplingParams(temperature=temperature, suppress_token_ids=(1, 4)), None)
        assert torch.equal(logits, before)
