"""Dynamic high resolution (NVLM, InternVL): an image is matched to the tile grid whose shape is closest to its
own, resized onto that grid and cut into tiles of the encoder's size; a thumbnail of the whole image goes first.
The encoder sees every tile at its own resolution, so a large image keeps its detail instead of being shrunk to one
encoder-sized square. NVLM-H puts the thumbnail's tokens in the LLM's sequence and lets the tiles in through
cross-attention (fusion.method="hybrid").

Each image becomes a TiledImage: (1 + tiles, C, size, size) pixels — the thumbnail, then its grid's tiles row by
row — and the id of its grid (index in VisionConfig.aspect_ratios + 1). A batch pads every image to 1 + max_tiles
slots with zeros (the processor's pad_batch), and the model knows from the id which of them are real: a dataset's
preprocessed images are kept without their padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image

from tessera.errors import DataError

from tessera.vision.preprocess import (MAX_PREPROCESSED_PIXELS, check_preprocessed_size, largest_step,
                                      normalised_pixels, preprocess_image, to_rgb)


class TiledImage(NamedTuple):
    pixels: torch.Tensor  # (tiles, C, tile, tile): the image's own tiles (the thumbnail first, for the hybrid)
    aspect_ratio_id: int  # index of its (rows, columns) grid + 1; 0 marks a padding image


def closest_grid(width: int, height: int, grids: Sequence[Sequence[int]], tile: int) -> int:
    """The index of the (rows, columns) grid whose shape is closest to a width x height image's (InternVL's and
    NVLM's rule). Of grids equally close, the fewest tiles — unless the image has more than half the pixels of a
    larger one's canvas, which then keeps the detail."""
    aspect = width / height
    best, best_diff = None, float("inf")
    for index in sorted(range(len(grids)), key=lambda i: grids[i][0] * grids[i][1]):  # fewest tiles first
        rows, cols = grids[index]
        diff = abs(aspect - cols / rows)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * tile * tile * rows * cols):
            best, best_diff = index, diff
    return best


def real_tiles(aspect_ratio_ids: torch.Tensor, grids: Sequence[Sequence[int]], max_tiles: int) -> torch.Tensor:
    """(images, max_tiles) bool: which tile slots of each image hold part of it (id 0, a padding image: none)."""
    counts = torch.tensor([0] + [rows * cols for rows, cols in grids], device=aspect_ratio_ids.device)
    return torch.arange(max_tiles, device=aspect_ratio_ids.device)[None] < counts[aspect_ratio_ids][:, None]


def tiling_step(width: int, height: int, size: int, grids: Sequence[Sequence[int]], resize_mode: str
                ) -> tuple[str, tuple[int, int]]:
    """The preprocessing step that builds the largest image from a width x height one, and that image's size: its
    grid's canvas, or the thumbnail's padded square."""
    rows, cols = grids[closest_grid(width, height, grids, size)]
    canvas = (cols * size, rows * size)
    step, produced = largest_step(width, height, size, resize_mode)
    if produced[0] * produced[1] >= canvas[0] * canvas[1]:
        return step, produced
    return f"resizing it onto its {rows}x{cols} grid of {size}x{size} tiles", canvas


def preprocess_tiled(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                     grids: Sequence[Sequence[int]], resize_mode: str = "squash",
                     max_pixels: int = MAX_PREPROCESSED_PIXELS) -> TiledImage:
    """The thumbnail (preprocessed as a single image is, with resize_mode) and the tiles of the closest grid: the
    image resized onto rows x columns tiles of size² (stretched a little to the grid's shape, as NVLM does), each
    normalised with the encoder's mean and std. No padding slots (see pad_tiles)."""
    check_preprocessed_size(image.size, *tiling_step(*image.size, size, grids, resize_mode), max_pixels)
    image = to_rgb(image)
    index = closest_grid(image.width, image.height, grids, size)
    rows, cols = grids[index]
    canvas = normalised_pixels(image.resize((cols * size, rows * size), Image.Resampling.BICUBIC), mean, std)
    channels = canvas.shape[0]
    tiles = canvas.view(channels, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, channels,
                                                                                         size, size)
    thumbnail = preprocess_image(image, size, mean, std, resize_mode, max_pixels)
    return TiledImage(torch.cat([thumbnail[None], tiles]), index + 1)


def pad_tiles(images: Sequence[TiledImage], slots: int) -> torch.Tensor:
    """(images, slots, C, size, size): each image's tiles (the hybrid's thumbnail first), then zeros up to slots."""
    first = images[0].pixels
    out = first.new_zeros(len(images), slots, *first.shape[1:])
    for i, image in enumerate(images):
        if len(image.pixels) > slots:
            raise DataError(f"image {i} of the batch has {len(image.pixels)} tiles (a hybrid's thumbnail, if any, "
                            f"counted among them); expected at most {slots}, the tile slots of the batch's "
                            f"pixel_values")
        out[i, :len(image.pixels)] = image.pixels
    return out
