import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may touch the network

import pytest
import torch

from tessera import ModelConfig, TextConfig, VisionConfig


def tiny_config(fusion: str = "unified", **fusion_options) -> ModelConfig:
    """A model small enough to train in seconds: 16 px images in 4×4 patches → 16 image features."""
    return ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64),
        text=TextConfig(vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_position_embeddings=256),
        fusion={"method": fusion, **fusion_options},
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned_cache(monkeypatch):
    """KV caches whose storage starts as NaN: a slot read before it is written turns the answer into NaN."""
    import tessera.text.cache

    monkeypatch.setattr(tessera.text.cache, "unzeroed",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@pytest.fixture(params=["default", "onednn"])
def linear_route(request, monkeypatch):
    """Runs a test twice: with tessera.linear's size thresholds as shipped (the tiny test models stay with PyTorch's
    kernels) and with every float32 product sent through oneDNN, so properties and parity hold on both routes."""
    import tessera.linear

    if request.param == "onednn":
        if tessera.linear.backend() != "onednn":
            pytest.skip("this torch build has no oneDNN linear")
        monkeypatch.setattr(tessera.linear, "MIN_WEIGHT_ELEMENTS", 0)
        monkeypatch.setattr(tessera.linear, "MIN_MULTIPLY_ADDS", 0)
    return request.param
