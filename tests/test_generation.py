"""tessera.generation: token choice (greedy, temperature, top-k, top-p) against transformers' warpers, and the
sampling settings' validation."""

import re

import numpy as np
import pytest
import torch

from tessera import MultimodalLM
from tessera.errors import ConfigError
from tessera.generation import SamplingParams, next_tokens, truncated
from tests.conftest import tiny_config


def test_choosing_a_token_leaves_the_callers_logits_as_they_were():
    logits = torch.randn(2, 10)
    before = logits.clone()
    for temperature in (0.0, 1.0):
        next_tokens(logits, SamplingParams(temperature=temperature, suppress_token_ids=(1, 4)), None)
        assert torch.equal(logits, before)


def _kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    return {int(i) for i in torch.nonzero(truncated(logits / params.temperature, params)[0] > float("-inf"))}


@pytest.mark.parametrize("seed", range(40))
def test_top_k_and_top_p_keep_the_tokens_transformers_keeps_ties_included(seed):
    warpers = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(seed)
    # few distinct values, so top-k and top-p boundaries often fall inside a run of tied logits (common in bf16)
    logits = torch.randint(-2, 3, (1, 8), generator=g).float()
    temperature = float(torch.empty(()).uniform_(0.3, 2.0, generator=g))
    top_k = int(torch.randint(0, 6, (), generator=g))
    top_p = float(torch.empty(()).uniform_(0.05, 0.95, generator=g))
    expected = warpers.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = warpers.TopKLogitsWarper(top_k)(None, expected)
    expected = warpers.TopPLogitsWarper(top_p)(None, expected)
    kept = {i for i in range(8) if expected[0, i] > float("-inf")}
    assert _kept(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)) == kept


def test_top_p_among_tied_tokens_keeps_the_higher_ids_as_transformers_does():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # each token 0.25: top_p 0.5 keeps two of the four
    assert _kept(logits, SamplingParams(temperature=1.0, top_p=0.5)) == {2, 3}
    assert _kept(logits, SamplingParams(temperature=1.0, top_p=0.51)) == {1, 2, 3}
    # and sampling draws from exactly those
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.5)
    assert {int(next_tokens(logits, params, g)) for _ in range(100)} == {2, 3}


@pytest.mark.parametrize("settings, field", [
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"seed": 1.5}, "seed"), ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"), ({"seed": 2**64}, "seed"), ({"top_k": -1}, "top_k"), ({"top_p": 1.5}, "top_p"),
    # text where a number belongs: a TypeError from inside a comparison, before
    ({"temperature": "0.7"}, "temperature"), ({"top_p": "0.9"}, "top_p"), ({"max_new_tokens": True}, "max_new_tokens"),
])
def test_bad_sampling_settings_are_refused_up_front_naming_the_field(settings, field):
    with pytest.raises(ConfigError, match=rf"^{field}="):  # tessera's own error, a ValueError too
        SamplingParams(**settings)


@pytest.mark.parametrize("eos", ["<|end|>", 9999, -1, [2, "x"], 2.0])
def test_an_eos_token_the_model_cannot_generate_is_refused_not_waited_for(eos):
    """A string (split into characters) or an id past the vocabulary never matched a generated token: generation
    ran to max_new_tokens without a word."""
    model = MultimodalLM(tiny_config()).eval()
    with pytest.raises(ConfigError, match=re.escape(f"eos_token_id={eos!r}: expected a token id or a list of them, "
                                                    f"each in 0..95 (text.vocab_size=96)")):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, eos_token_id=eos)
    with pytest.raises(ConfigError, match=r"^suppress_token_ids="):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, suppress_token_ids=[eos])
    stopped = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, eos_token_id=torch.tensor([2]),
                             suppress_token_ids=torch.arange(96)[torch.arange(96) != 2])  # tensors work as lists
    assert stopped.finish_reasons == ["stop"]


def test_suppressing_every_token_is_refused_not_answered_with_token_0():
    model = MultimodalLM(tiny_config()).eval()
    with pytest.raises(ConfigError, match=r"^suppress_token_ids: all 96 tokens of the vocabulary; expected at least "):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, suppress_token_ids=list(range(96)) + [3])


@pytest.mark.parametrize("params", [SamplingParams(suppress_token_ids=tuple(range(96))),
                                    SamplingParams(suppress_token_ids=(96,)), SamplingParams(eos_token_ids=(-1,))])
def test_sampling_params_made_by_hand_are_checked_against_the_vocabulary_too(params):
    """stream_tokens (and a server's batch) take SamplingParams built without model.sampling_params: suppressing
    every token answered token 0 there, and an id past the vocabulary failed inside the indexing."""
    model = MultimodalLM(tiny_config()).eval()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ConfigError, match=r"^(suppress|eos)_token_ids.*(vocabulary|0\.\.95)"):
        next(model.stream_tokens(ids, None, None, [0], params))
    with pytest.raises(ConfigError, match=r"^(suppress|eos)_token_ids"):
        next(model.stream_tokens(ids, None, None, [0], [params]))


def test_hand_built_sampling_params_take_ids_as_the_model_does():
    """A tensor's elements are 0-d tensors, which matched no generated token; a bare int was not iterable."""
    params = SamplingParams(eos_token_ids=torch.tensor([2, 5]), suppress_token_ids=np.int64(4))
    assert params.eos_token_ids == (2, 5) and params.suppress_token_ids == (4,)
    assert SamplingParams(eos_token_ids=2).eos_token_ids == (2,)
    assert all(type(i) is int for i in params.eos_token_ids + params.suppress_token_ids)
    for bad in ("<|end|>", [2.5], [2, "x"], True, [2, False], torch.tensor([True])):
        with pytest.raises(ConfigError, match=r"^eos_token_ids=.*: expected a token id or a collection of them"):
            SamplingParams(eos_token_ids=bad)


def test_the_extreme_seeds_torch_takes_are_accepted():
    for seed in (-2**63, 2**64 - 1, np.int64(3)):
        assert SamplingParams(temperature=1.0, seed=seed).generator(torch.device("cpu")) is not None


def test_seeds_apart_only_above_32_bits_sample_apart_and_small_seeds_sample_as_before():
    """The CPU generator reads a seed's low 32 bits only: 5, 5 + 2**32 and 5 + 2**40 drew the same numbers, and so did
    0, 2**63 and -2**63 (a server accepts any 64-bit seed)."""
    def draws(seed):
        return torch.rand(4, generator=SamplingParams(temperature=1.0, seed=seed).generator(torch.device("cpu")))

    for group in [(5, 5 + 2**32, 5 + 2**40), (0, 2**63, 2**64 - 1, 2**32 - 1)]:
        samples = [draws(seed) for seed in group]
        assert all(not torch.equal(a, b) for i, a in enumerate(samples) for b in samples[i + 1:]), group
    assert torch.equal(draws(-2**63), draws(2**63))  # the same 64 bits
    for seed in (0, 5, 2**32 - 1, -1, -5, -2**31):  # what torch's own seeding draws, as before
        assert torch.equal(draws(seed), torch.rand(4, generator=torch.Generator().manual_seed(seed)))


def test_numpy_and_tensor_numbers_are_settings_and_token_ids_come_in_any_collection():
    """A numpy float or a one-element tensor, as notebooks produce them, worked before the settings were checked;
    so did a set or a numpy array of token ids."""
    params = SamplingParams(temperature=np.float32(0.5), top_p=torch.tensor(0.5))
    assert (params.temperature, params.top_p) == (0.5, 0.5)
    model = MultimodalLM(tiny_config()).eval()
    assert model.sampling_params(eos_token_id={5, 6}).eos_token_ids == (5, 6)
    assert model.sampling_params(eos_token_id=np.array([2])).eos_token_ids == (2,)
    assert model.sampling_params(suppress_token_ids=np.int64(4)).suppress_token_ids == (4,)
