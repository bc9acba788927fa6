"""Image preprocessing: any PIL image → RGB → square → normalised tensor the encoder expects."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tessera.errors import DataError, ImageTooLargeError

RESIZE_MODES = ("squash", "pad")
# Preprocessing can build an image far larger than its input: padding to a square (a 20000x100 image becomes
# 20000x20000) or a shortest-edge resize scaling up a thin one. Past this many pixels (192 MB as 8-bit RGB) it is
# refused before anything is allocated, with an error naming the size, instead of exhausting memory. The server
# passes its own, smaller limit (ServeSettings.max_image_pixels, 4096 x 4096).
MAX_PREPROCESSED_PIXELS = 8192 * 8192


def load_image(source: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """The image of a file (or a PIL image), upright: turned as its EXIF Orientation tag says, as every viewer and
    transformers' load_image show it, instead of a phone photo reaching the model on its side. A numpy array of
    8-bit pixels, (height, width) or (height, width, 3 or 4) as PIL and OpenCV-turned-RGB give them, is an image too."""
    if isinstance(source, Image.Image):
        return upright(source)
    if isinstance(source, np.ndarray):
        if source.dtype == np.uint8 and (source.ndim == 2 or source.ndim == 3 and source.shape[2] in (3, 4)):
            return Image.fromarray(source)
        raise DataError(f"a numpy array of shape {source.shape} and dtype {source.dtype} given as an image: expected "
                        f"uint8 pixels, (height, width) or (height, width, 3 or 4)")
    if not isinstance(source, (str, os.PathLike)) and not hasattr(source, "read"):  # an open file PIL reads
        # else a tensor, say, failed inside PIL as having no .read
        raise DataError(f"an object of type {type(source).__name__} given as an image: expected a file path, an open "
                        f"file, a PIL image or a uint8 numpy array")
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise DataError(f"{source}: a web address; tessera reads images from files and fetches none (the server "
                        f"does, with --allow-remote-images): expected a file path")
    if isinstance(source, str) and source.startswith("file://"):  # as a chat message's image part may give it
        source = url2pathname(urlparse(source).path)
    try:
        with Image.open(source) as image:
            image.load()
            return upright(image)
    except FileNotFoundError:
        raise DataError(f"{source}: image file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{source}: not a readable image ({e})") from None
    except Image.DecompressionBombError as e:  # PIL's guard against huge pixel counts (not an OSError)
        raise ImageTooLargeError(f"{source}: refused as a decompression bomb ({e})") from None


def upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation; the image itself when it has none (or the tag says upright)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


@contextmanager
def naming(source: str | Path | Image.Image | np.ndarray):
    """A DataError raised inside names the image file, when the image came from one."""
    try:
        yield
    except DataError as e:
        if not isinstance(source, (str, os.PathLike)):  # an image in memory: no file to name
            raise
        raise type(e)(f"{source}: {e}") from None


def check_preprocessed_size(size: tuple[int, int], step: str, produced: tuple[int, int], max_pixels: int) -> None:
    """DataError when a preprocessing `step` would turn an image of `size` (width, height) into one of `produced`
    size with more than max_pixels pixels."""
    width, height = produced
    if width * height > max_pixels:
        raise ImageTooLargeError(f"the image is {size[0]}x{size[1]}; {step} would make it {width}x{height} = "
                        f"{width * height} pixels, more than the {max_pixels} allowed; expected a smaller or less "
                        f"elongated image")


def largest_step(width: int, height: int, size: int, resize_mode: str) -> tuple[str, tuple[int, int]]:
    """The step of preprocess_image that builds the largest image from a width x height one, and that image's
    (width, height)."""
    if resize_mode == "pad" and width != height:
        side = max(width, height)
        return "padding it to a square", (side, side)
    return f"resizing it to {size}x{size}", (size, size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, 16-bit and transparent images → 8-bit RGB.

    Transparency (an alpha band, or a PNG's transparent colour) is composited on white, as a viewer shows it and
    transformers' convert_to_rgb does, rather than dropped, which would reveal whatever colour the invisible
    pixels happen to hold. 16-bit and float images are scaled to 8 bits, not clipped.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        brightest = values.max(initial=0)
        if image.mode.startswith("I;16"):
            top = 65535.0  # a 16-bit image's range is 0..65535 however dark it is
        elif image.mode == "F" and brightest <= 1.0:  # float images are commonly 0..1
            top = 1.0
        else:  # "I" and "F" hold 8-bit data (PIL's conversions) or 16-bit data (some PNG and TIFF readers); the
            # range is the one the data fits, not its own maximum, which would brighten a dark image to white
            top = 255.0 if brightest <= 255 else 65535.0 if brightest <= 65535 else brightest
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.info.get("transparency") is not None:  # a PNG tRNS colour key (P, and also L or RGB images)
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def preprocess_image(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                     resize_mode: str = "squash", max_pixels: int = MAX_PREPROCESSED_PIXELS) -> torch.Tensor:
    """(3, size, size) float tensor, normalised with the encoder's mean/std.

    resize_mode "squash" stretches to a square; "pad" first pads to a square with the mean colour (LLaVA-1.5),
    keeping the aspect ratio. An image whose padded square would exceed max_pixels raises DataError."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    check_preprocessed_size(image.size, *largest_step(*image.size, size, resize_mode), max_pixels)
    image = to_rgb(image)
    if resize_mode == "pad" and image.width != image.height:
        side = max(image.size)
        fill = tuple(int(m * 255) for m in mean)  # truncated, as LLaVA's expand2square and transformers' do_pad
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return normalised_pixels(image, mean, std)


def normalised_pixels(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """An RGB image as a (3, height, width) float tensor, scaled to 0..1 and normalised with the encoder's mean/std."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - mean_t) / std_t
