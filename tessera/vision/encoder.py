"""The image encoder: a ViT (CLIP/SigLIP-style) that turns an image into a sequence of patch features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import VisionConfig
from tessera.linear import Linear
from tessera.text.attention import attend
from tessera.vision.patch_embedding import PatchEmbedding

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": lambda: _QuickGELU(),
}


class _QuickGELU(nn.Module):
    """x·σ(1.702x): the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """(side², width) 2D sine-cosine positions (MAE): half the channels encode the row, half the column.

    Learned positions start from this table rather than from noise, so every patch knows its place from the
    first step; a small model on a short budget would otherwise spend its first thousand steps finding out."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = axis[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, width - table.shape[1]))  # widths not divisible by 4: zero tail


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over patches (fused q/k/v)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.out = Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: optional additive (batch, 1, n, n) attention bias."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN x), then x + MLP(LN x).

    gated=True scales both branches by tanh of a learned gate (Llama 3.2 Vision's global blocks, gates
    initialised to π/4)."""

    def __init__(self, config: VisionConfig, gated: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        if gated:
            self.attn_gate = nn.Parameter(torch.full((1,), math.pi / 4))
            self.mlp_gate = nn.Parameter(torch.full((1,), math.pi / 4))
        self.gated = gated

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attn(self.norm1(x), mask)
        x = x + (torch.tanh(self.attn_gate) * attn if self.gated else attn)
        mlp = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + (torch.tanh(self.mlp_gate) * mlp if self.gated else mlp)


class VisionEncoder(nn.Module):
    """ViT: patch embedding (+ CLS) + learned absolute positions → pre-LN blocks.

    `forward` returns every hidden state: index 0 is the embedding output, index i the output of block i, so
    LLaVA's `vision_feature_layer=-2` means the penultimate block, read before any final norm.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding(config.num_channels, config.hidden_size, config.patch_size,
                                              bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_cls_token else None
        num_positions = config.num_patches + int(config.use_cls_token)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm else None
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_layers))
        with torch.no_grad():
            self.position_embedding.normal_(std=0.02)
            self.position_embedding[0, int(config.use_cls_token):] = sincos_2d(config.grid_size, config.hidden_size)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def position_embeddings_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Learned positions for a grid_h × grid_w patch grid, bicubically interpolated when it differs from the
        grid the encoder was built for (the CLS position is kept as is)."""
        pos = self.position_embedding
        n_cls = int(self.cls_token is not None)
        side = self.config.grid_size
        if (grid_h, grid_w) == (side, side):
            return pos
        cls_pos, grid_pos = pos[:, :n_cls], pos[:, n_cls:]
        grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, grid_pos], dim=1)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        grid_h, grid_w = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        x = self.patch_embedding(pixel_values)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embeddings_for(grid_h, grid_w)
        return self.pre_norm(x) if self.pre_norm is not None else x

    def forward(self, pixel_values: torch.Tensor, up_to_layer: int | None = None) -> list[torch.Tensor]:
        """All hidden states [embeddings, block 1, …], stopping after block `up_to_layer` when given
        (layers past the deepest selected feature layer are never run)."""
        hidden = [self.embed(pixel_values)]
        last = self.config.num_layers if up_to_layer is None else up_to_layer
        for block in self.blocks[:last]:
            hidden.append(block(hidden[-1]))
        return hidden


def select_image_features(hidden_states: list[torch.Tensor], feature_layers: list[int], num_layers: int,
                          drop_cls: bool) -> torch.Tensor:
    """LLaVA's feature selection: pick the listed hidden states (negative indices count from the last block),
    concatenate them on channels, and drop the CLS token for the "default" strategy."""
    total = num_layers + 1
    picked = [hidden_states[i % total] for i in feature_layers]
    features = picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
    return features[:, 1:] if drop_cls else features


def deepest_layer(feature_layers: list[int], num_layers: int) -> int:
    """The deepest block any selected feature needs (so the blocks after it can be skipped)."""
    total = num_layers + 1
    return max(i % total for i in feature_layers)
