"""transformers' image processors for the imported families, step for step (the pinned version's PIL backend).

CLIP / SigLIP / LLaVA ("resize"): optionally pad to a square with the mean colour (LLaVA's do_pad), resize (the
shortest edge to `size["shortest_edge"]` keeping the aspect ratio, or to exactly height × width), centre-crop,
rescale by 1/255 (in float64, then float32) and normalise. Llama 3.2 Vision ("tiles"): pick the tile canvas
(`optimal_tiled_canvas`), resize the image to fit it keeping its aspect ratio, pad bottom/right with black, rescale,
normalise, and cut it into tiles.

Same steps in the same order and precision give the same pixels, so imported models see what transformers
would show them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from tessera.config import is_integer, is_number
from tessera.errors import ConfigError
from tessera.vision.preprocess import MAX_PREPROCESSED_PIXELS, check_preprocessed_size, to_rgb

KINDS = ("resize", "tiles")
PIL_FILTERS = (0, 1, 2, 3, 4, 5)  # nearest, lanczos, bilinear, bicubic, box, hamming
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# processor class → (kind, default settings) of the pinned transformers version
PROCESSOR_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "CLIPImageProcessor": ("resize", dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                          do_center_crop=True, resample=3, image_mean=OPENAI_CLIP_MEAN,
                                          image_std=OPENAI_CLIP_STD)),
    "LlavaImageProcessor": ("resize", dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                           do_center_crop=True, resample=3, image_mean=OPENAI_CLIP_MEAN,
                                           image_std=OPENAI_CLIP_STD, do_pad=False)),
    "SiglipImageProcessor": ("resize", dict(size={"height": 224, "width": 224}, do_center_crop=False, resample=3,
                                            image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))),
    "MllamaImageProcessor": ("tiles", dict(size={"height": 224, "width": 224}, resample=2,
                                           image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                           max_image_tiles=4)),
}


@dataclass
class ImageProcessing:
    kind: str
    size: dict[str, int]
    resample: int = 3  # PIL's resampling filter number (3 = bicubic, 2 = bilinear)
    crop_size: dict[str, int] | None = None  # centre crop; None: none
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    pad_to_square: bool = False
    max_image_tiles: int = 4
    source: dict[str, Any] = field(default_factory=dict)  # the original settings, written back on export

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"image processing kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @classmethod
    def from_hf(cls, settings: dict[str, Any], where: str) -> ImageProcessing:
        """transformers' preprocessor settings (preprocessor_config.json, or processor_config.json's
        "image_processor") → ImageProcessing; settings tessera can't honour raise ConfigError."""
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: the image processor settings are {settings!r}; expected an object of image "
                              f"processor fields")
        name = settings.get("image_processor_type", "CLIPImageProcessor")
        name = name.removesuffix("Fast").removesuffix("Pil") if isinstance(name, str) else name
        if not isinstance(name, str) or name not in PROCESSOR_DEFAULTS:  # (a list or dict is not even hashable)
            raise ConfigError(f"{where}.image_processor_type={name!r}: tessera reproduces "
                              f"{', '.join(PROCESSOR_DEFAULTS)}")
        kind, defaults = PROCESSOR_DEFAULTS[name]
        s = {**defaults, **{k: v for k, v in settings.items() if v is not None}}
        for flag in ("do_resize", "do_convert_rgb"):
            if s.get(flag) is False:
                raise ConfigError(f"{where}: {flag}=false is not supported; expected true")

        def setting(key: str, default: Any, parse, expected: str) -> Any:
            """s[key] parsed, or a ConfigError naming the file and the field."""
            value = s.get(key, default)
            parsed = parse(value)
            if parsed is None:
                raise ConfigError(f"{where}.{key}={value!r}: expected {expected}")
            return parsed

        shortest_edge_default = name in ("CLIPImageProcessor", "LlavaImageProcessor")
        size = _size(s["size"], shortest_edge_default, f"{where}.size")
        if kind == "tiles" and size.get("height") != size.get("width"):
            raise ConfigError(f"{where}.size={s['size']!r}: Llama 3.2 Vision cuts square tiles; expected "
                              f"height = width")
        crop = None
        if s.get("do_center_crop"):
            crop = _size(s.get("crop_size"), False, f"{where}.crop_size")  # SigLIP's defaults have none
            if "height" not in crop:
                raise ConfigError(f"{where}.crop_size={s['crop_size']!r}: expected {{'height': h, 'width': w}}")
        channels = "3 numbers (one per RGB channel) or one"
        return cls(kind=kind, size=size, crop_size=crop,
                   resample=setting("resample", None, lambda v: v if is_integer(v) and v in PIL_FILTERS else None,
                                    f"one of PIL's filter numbers {', '.join(map(str, PIL_FILTERS))}"),
                   do_rescale=bool(s.get("do_rescale", True)),
                   rescale_factor=setting("rescale_factor", 1 / 255, _positive, "a positive number"),
                   do_normalize=bool(s.get("do_normalize", True)),
                   image_mean=setting("image_mean", None, lambda v: _per_channel(v, lambda x: True), channels),
                   image_std=setting("image_std", None, lambda v: _per_channel(v, lambda x: x != 0),
                                     f"{channels}, none zero"),
                   pad_to_square=bool(s.get("do_pad")) and kind == "resize",
                   max_image_tiles=setting("max_image_tiles", 4, lambda v: v if is_integer(v) and v > 0 else None,
                                           "a positive integer"),
                   source=dict(settings))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the tensor one image (or one tile) becomes."""
        if self.kind == "tiles" or self.crop_size is None:
            if "shortest_edge" in self.size:
                raise ConfigError("image processing: a shortest-edge resize without a centre crop gives images of "
                                  "different sizes; expected crop_size")
            return self.size["height"], self.size["width"]
        return self.crop_size["height"], self.crop_size["width"]

    # --- one image ---------------------------------------------------------------------------------------------
    def __call__(self, image: Image.Image, max_pixels: int = MAX_PREPROCESSED_PIXELS
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
        """("resize") a (C, H, W) tensor and (1, 1); ("tiles") the (tiles, C, t, t) tiles and their
        (rows, columns). An image that a step would make larger than max_pixels raises DataError."""
        check_preprocessed_size(image.size, *self.largest_step(*image.size), max_pixels)
        pixels = np.asarray(to_rgb(image))  # (H, W, C) uint8
        if self.kind == "tiles":
            return self._tiles(pixels)
        if self.pad_to_square:
            pixels = _pad_to_square(pixels, tuple(int(m * 255) for m in self.image_mean))
        pixels = _resize(pixels, self._resized_size(*pixels.shape[:2]), self.resample)
        if self.crop_size is not None:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return torch.from_numpy(self._scale(pixels)), (1, 1)

    def largest_step(self, width: int, height: int) -> tuple[str, tuple[int, int]]:
        """The step that builds the largest image from a width x height one, and that image's (width, height):
        LLaVA's square padding, or a shortest-edge resize (which scales a thin image's long side up with its
        short one). The tile canvas is bounded by max_image_tiles."""
        if self.kind == "tiles":
            canvas_h, canvas_w = optimal_tiled_canvas(height, width, self.max_image_tiles, self.size["height"])
            return "fitting it to its tile canvas", (canvas_w, canvas_h)
        steps = []
        if self.pad_to_square and width != height:
            width = height = max(width, height)
            steps.append(("padding it to a square", (width, height)))
        new_h, new_w = self._resized_size(height, width)
        name = f"resizing its shortest edge to {self.size['shortest_edge']}" if "shortest_edge" in self.size \
            else f"resizing it to {new_w}x{new_h}"
        steps.append((name, (new_w, new_h)))
        return max(steps, key=lambda step: step[1][0] * step[1][1])

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        # transformers' get_resize_output_image_size(default_to_square=False), or with a longest_edge its
        # get_size_with_aspect_ratio: the short side shrinks below shortest_edge if the long one would pass the bound
        short, long = (width, height) if width <= height else (height, width)
        new_short = self.size["shortest_edge"]
        new_long = int(new_short * long / short)
        bound = self.size.get("longest_edge")
        if bound is not None and long / short * new_short > bound:
            raw_short = bound * short / long
            new_short, new_long = int(round(raw_short)), int(raw_short * long / short)
        if short == new_short:  # get_size_with_aspect_ratio keeps such an image as it is
            new_long = long
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def _scale(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, C) uint8 → (C, H, W) float32, rescaled and normalised as transformers does."""
        x = pixels.transpose(2, 0, 1)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32)
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            x = ((x.T - mean) / std).T
        return np.ascontiguousarray(x, dtype=np.float32)

    def _tiles(self, pixels: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        tile = self.size["height"]
        height, width = pixels.shape[:2]
        canvas_h, canvas_w = optimal_tiled_canvas(height, width, self.max_image_tiles, tile)
        pixels = _resize(pixels, fit_to_canvas(height, width, canvas_h, canvas_w, tile), self.resample)
        padded = np.zeros((canvas_h, canvas_w, pixels.shape[2]), dtype=pixels.dtype)  # black, before normalising
        padded[:pixels.shape[0], :pixels.shape[1]] = pixels
        x = self._scale(padded)
        rows, cols = canvas_h // tile, canvas_w // tile
        tiles = x.reshape(x.shape[0], rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
        return torch.from_numpy(np.ascontiguousarray(tiles.reshape(rows * cols, x.shape[0], tile, tile))), (rows, cols)


def tile_arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, columns) grid of at most max_tiles tiles, in transformers' order; aspect-ratio id = index + 1."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def optimal_tiled_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The canvas (height, width) for an image: the smallest upscale ≥ 1 if any grid allows one, else the largest
    downscale; ties go to the smallest area (transformers' get_optimal_tiled_canvas)."""
    canvases = np.array(tile_arrangements(max_tiles)) * tile
    heights, widths = canvases.T
    scale_h, scale_w = heights / height, widths / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    upscales = scales[scales >= 1]
    chosen_scale = np.min(upscales) if len(upscales) else np.max(scales[scales < 1])
    chosen = canvases[scales == chosen_scale]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The image's size on its canvas: within [tile, canvas] per side, aspect ratio kept (floored, at least 1)."""
    target_w, target_h = np.clip(width, tile, canvas_w), np.clip(height, tile, canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return int(min(math.floor(height * scale_w) or 1, target_h)), int(target_w)
    return int(target_h), int(min(math.floor(width * scale_h) or 1, target_w))


def _resize(pixels: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    height, width = size
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=resample))


def _pad_to_square(pixels: np.ndarray, colour: tuple[int, ...]) -> np.ndarray:
    height, width = pixels.shape[:2]
    if height == width:
        return pixels
    side = max(height, width)
    square = np.empty((side, side, pixels.shape[2]), dtype=pixels.dtype)
    square[:] = np.array(colour, dtype=pixels.dtype)
    if width > height:
        top = (side - height) // 2
        square[top:top + height] = pixels
    else:
        left = (side - width) // 2
        square[:, left:left + width] = pixels
    return square


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop: cut the middle, padding with zeros where the image is smaller."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    out = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    out[top_pad:top_pad + h, left_pad:left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return out[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def _size(value: Any, shortest_edge_default: bool, where: str) -> dict[str, int]:
    if is_integer(value):  # older configs: one number
        value = {"shortest_edge": value} if shortest_edge_default else {"height": value, "width": value}
    if isinstance(value, dict) and ("shortest_edge" in value or {"height", "width"} <= set(value)):
        keys = ("shortest_edge", "longest_edge") if "shortest_edge" in value else ("height", "width")
        size = {key: value[key] for key in keys if value.get(key) is not None}
        if all(is_integer(n) and n > 0 for n in size.values()):
            return size
    raise ConfigError(f"{where}={value!r}: expected {{'shortest_edge': n}} (and optionally 'longest_edge') or "
                      f"{{'height': h, 'width': w}}, in positive integers")


def _positive(value: Any) -> float | None:
    return float(value) if is_number(value) and value > 0 else None


def _per_channel(value: Any, valid) -> tuple[float, ...] | None:
    """One number per RGB channel (one number: the same for all), each passing `valid`; None if not."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values *= 3
    numbers = [float(v) for v in values if is_number(v)]
    return tuple(numbers) if len(numbers) == len(values) == 3 and all(map(valid, numbers)) else None
