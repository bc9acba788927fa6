"""NVLM-H, the hybrid of Methods A and B: every image is encoded as a low-resolution thumbnail of the whole and
high-resolution tiles (vision/tiling.py). The thumbnail's features take the places of its `<image>` tokens in the
LLM's sequence, as Method A's do (unified.py), so self-attention reasons over the whole image at little cost; the
tiles' features — most of the image tokens — are the keys and values of Method B's gated cross-attention blocks
(cross_attention.py), so the detail never lengthens the sequence.

A hybrid's image features are (images, (1 + max_tiles) · S, width): the thumbnail's S features, then each tile
slot's S (zeros for the padding slots of an image with fewer tiles)."""

from __future__ import annotations

import torch

from tessera.errors import ImageTokenMismatchError


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
