"""Llama 3.2 Vision's tiled image encoder (`vision.encoder="tiled"`).

A large image is resized onto a canvas of up to `max_num_tiles` square tiles (see interop/image_processing.py),
and every tile is a ViT input of its own. What the plain ViT lacks, and this encoder adds:

- aspect-ratio embeddings: each tile of an image laid out as, say, 1×2 tiles gets a learned vector for
  "tile k of a 1×2 layout", added before the CLS token (pre-tile) and again after the local blocks (post-tile);
- a gated position embedding: (1 − tanh g)·patch position + tanh g·(patch, tile, layout) position;
- local blocks that attend across all tiles of one image, then gated global blocks;
- the outputs of some local blocks kept and appended on channels, so the projector sees several depths at once.

Sequences are padded to a multiple of 8 tokens per tile. As in transformers, the attention mask only stops a
padding token (a padded position, or any token of a padding tile) from attending to another padding token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import VisionConfig
from tessera.vision.encoder import VisionBlock
from tessera.vision.patch_embedding import PatchEmbedding

PAD_TO_MULTIPLE = 8


class AspectRatioEmbedding(nn.Module):
    """A learned vector per (layout, tile), added to every token of the tile and scaled by tanh(gate)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.max_num_tiles, self.hidden_size = config.max_num_tiles, config.hidden_size
        self.embedding = nn.Embedding(len(config.aspect_ratios) + 1, config.max_num_tiles * config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x: (images, tiles, tokens, hidden)."""
        embedding = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + torch.tanh(self.gate) * embedding


def padding_attention_bias(tile_mask: torch.Tensor, real_tokens: int, tokens_per_tile: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """(images, 1, L, L) additive bias over the flattened tiles, L = tiles × tokens_per_tile: the most negative
    float where both the query and the key are padding (padded positions, or anything in a padding tile)."""
    images, tiles = tile_mask.shape
    padding = (~tile_mask)[:, :, None].repeat(1, 1, tokens_per_tile)
    padding[:, :, real_tokens:] = True
    padding = padding.reshape(images, tiles * tokens_per_tile)
    both = padding[:, :, None] & padding[:, None, :]
    return (both.to(dtype) * torch.finfo(dtype).min)[:, None]


class TiledVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        d, tiles = config.hidden_size, config.max_num_tiles
        self.tokens_per_tile = config.num_patches + 1  # CLS + patches
        self.patch_embedding = PatchEmbedding(config.num_channels, d, config.patch_size, bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * d**-0.5)
        self.pre_tile_embedding = AspectRatioEmbedding(config)
        self.position_embedding = nn.Parameter(torch.randn(self.tokens_per_tile, d) * d**-0.5)
        self.tile_position_embedding = nn.Embedding(len(config.aspect_ratios) + 1, tiles * self.tokens_per_tile * d)
        self.position_gate = nn.Parameter(torch.zeros(1))
        self.pre_norm = nn.LayerNorm(d)  # transformers builds these two with LayerNorm's default eps
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_layers))
        self.post_norm = nn.LayerNorm(d)
        self.post_tile_embedding = AspectRatioEmbedding(config)
        self.global_blocks = nn.ModuleList(VisionBlock(config, gated=True) for _ in range(config.num_global_layers))
        # Tiles per aspect-ratio id; id 0 (a padding image slot) counts its first tile, as transformers' processor
        # marks the first tile of every slot real.
        tile_counts = [1] + [rows * cols for rows, cols in config.aspect_ratios]
        self.register_buffer("tile_counts", torch.tensor(tile_counts), persistent=False)

    def tile_mask(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(images, max_num_tiles) bool: which tiles of each image hold part of the image."""
        tiles = torch.arange(self.config.max_num_tiles, device=aspect_ratio_ids.device)
        return tiles[None] < self.tile_counts[aspect_ratio_ids][:, None]

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(images, max_num_tiles, C, H, W) tiles and (images,) aspect-ratio ids → (images, max_num_tiles,
        tokens_per_tile, feature_width) features: the global output, then the kept local outputs interleaved
        channel by channel (transformers stacks them on a last axis before flattening)."""
        images, tiles = pixel_values.shape[:2]
        d, n = self.config.hidden_size, self.tokens_per_tile
        x = self.patch_embedding(pixel_values.flatten(0, 1)).view(images, tiles, n - 1, d)
        x = self.pre_tile_embedding(x, aspect_ratio_ids)
        x = torch.cat([self.cls_token.expand(images, tiles, 1, d).to(x.dtype), x], dim=2)
        gate = torch.tanh(self.position_gate)
        tile_positions = self.tile_position_embedding(aspect_ratio_ids).view(images, tiles, n, d)
        x = x + (1 - gate) * self.position_embedding + gate * tile_positions
        x = self.pre_norm(x)
        padded = n + (-n) % PAD_TO_MULTIPLE
        x = F.pad(x, (0, 0, 0, padded - n)).view(images, tiles * padded, d)
        mask = padding_attention_bias(self.tile_mask(aspect_ratio_ids), n, padded, x.dtype)
        kept = {}
        for i, block in enumerate(self.blocks):
            x = block(x, mask)
            if i in self.config.intermediate_layers:
                kept[i] = x
        x = self.post_norm(x)
        x = self.post_tile_embedding(x.view(images, tiles, padded, d), aspect_ratio_ids).view(images, -1, d)
        for block in self.global_blocks:
            x = block(x, mask)
        parts = [x]
        if kept:
            parts.append(torch.stack([kept[i] for i in self.config.intermediate_layers], dim=-1).flatten(-2))
        features = torch.cat(parts, dim=-1).view(images, tiles, padded, -1)
        return features[:, :, :n]
