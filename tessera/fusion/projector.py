"""The projector: maps image features from the encoder's width to the LLM's width (the article's "adapter")."""

from __future__ import annotations

import torch
from torch import nn

from tessera.linear import Linear


class Projector(nn.Module):
    """`linear` (LLaVA 1.0) or `mlp`: Linear → GELU → Linear (LLaVA 1.5 onwards)."""

    def __init__(self, in_features: int, out_features: int, kind: str = "mlp", bias: bool = True):
        super().__init__()
        self.kind = kind
        self.linear_1 = Linear(in_features, out_features, bias=bias)
        if kind == "mlp":
            self.act = nn.GELU()
            self.linear_2 = Linear(out_features, out_features, bias=bias)
        elif kind != "linear":
            raise ValueError(f"projector kind {kind!r}: expected 'linear' or 'mlp'")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(features)
        return self.linear_2(self.act(x)) if self.kind == "mlp" else x
