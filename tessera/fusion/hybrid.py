"""NVLM-H, the hybrid of Methods A and B: every image is encoded as a low-resolution thumbnail of the whole and
high-resolution tiles (vision/tiling.py). The thumbnail's features take the places of its `<image>` tokens in the
LLM's sequence, as Method A's do (unified.py), so self-attention reasons over the whole image at little cost; the
tiles' features — most of the image tokens — are the keys and values of Method B's gated cross-attention blocks
(cross_attention.py), so the detail never lengthens the sequence.

A hybrid's image features are (images, (1 + max_tiles) · S, width): the thumbnail's S features, then each tile
slot's S (zeros for the padding slots of an image with fewer tiles)."""

from __future__ import annotations

import torch
from torch import nn

from tessera.errors import ImageTokenMismatchError


class TilePositions(nn.Module):
    """Where each tile lies in its image: a learned vector per (grid, tile slot), added to every feature of the
    tile. Cross-attention gives its keys no position, so without it a tile's detail would reach the LLM with no
    place in the image (Llama 3.2 Vision's encoder embeds each tile's position per grid too; NVLM marks tiles with
    text tags). Zero at first: a new hybrid reads its tiles as they are."""

    def __init__(self, num_grids: int, max_tiles: int, width: int):
        super().__init__()
        self.max_tiles, self.width = max_tiles, width
        self.embedding = nn.Embedding(num_grids + 1, max_tiles * width)  # row 0: no grid (never a real image)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, tile_features: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(images, max_tiles, S, width) features and each image's grid id → the features with their places."""
        places = self.embedding(aspect_ratio_ids).view(-1, self.max_tiles, 1, self.width)
        return tile_features + places.to(tile_features.dtype)


def split_thumbnail_and_tiles(image_features: torch.Tensor, tokens_per_tile: int, max_tiles: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, S, width) thumbnail features for the sequence and (images, max_tiles · S, width) tile features for
    cross-attention."""
    expected = (1 + max_tiles) * tokens_per_tile
    if image_features.shape[1] != expected:
        raise ImageTokenMismatchError(
            f"each image gives {image_features.shape[1]} image features; the hybrid expects {expected}: a thumbnail "
            f"and {max_tiles} tile slots (vision.max_num_tiles) of {tokens_per_tile} features each")
    return image_features[:, :tokens_per_tile], image_features[:, tokens_per_tile:]
