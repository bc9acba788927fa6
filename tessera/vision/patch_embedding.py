"""Image → patches → linear projection.

The article shows two equal forms of the first step of a ViT: cut the image into P×P patches, flatten each, and
apply one shared Linear; or run a Conv2d whose kernel and stride are both P. We use the convolution (one fused op)
and keep `patchify` + `as_linear` so the equivalence can be checked and taught.

Fuyu drops the encoder and keeps only this first step: `RawPatches` hands the flattened patches themselves to the
projector, whose Linear is then the patch embedding, straight into the LLM's width.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.config import VisionConfig


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, num_patches, C·P·P): row-major patches, each flattened channel-first like Conv2d's kernel."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    patches = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


class PatchEmbedding(nn.Module):
    """Linear projection of non-overlapping patches, written as Conv2d(kernel = stride = patch_size)."""

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, (H/P)·(W/P), hidden), patches in row-major order."""
        return self.proj(pixel_values).flatten(2).transpose(1, 2)

    def as_linear(self) -> nn.Linear:
        """The same map as a Linear over flattened patches (see `patchify`)."""
        out_features, *_ = self.proj.weight.shape
        linear = nn.Linear(self.proj.weight[0].numel(), out_features, bias=self.proj.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.proj.weight.reshape(out_features, -1))
            if self.proj.bias is not None:
                linear.bias.copy_(self.proj.bias)
        return linear


class RawPatches(nn.Module):
    """The encoder-free "encoder" (vision.encoder="none", Fuyu): no weights; each patch's pixels, flattened, are
    its feature. Row-major like the ViT's patches, so the LLM reads them row by row in its own positions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, (H/P)·(W/P), C·P·P)."""
        return patchify(pixel_values, self.patch_size)
