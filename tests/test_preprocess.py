"""tessera.vision.preprocess: any PIL image → 8-bit RGB → square → normalised tensor."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import tessera
from tessera.config import CLIP_MEAN, CLIP_STD
from tessera.vision.preprocess import RESIZE_MODES, load_image, preprocess_image, to_rgb

WHITE = (255, 255, 255)


def rgb_pixels(image: Image.Image) -> np.ndarray:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    return np.asarray(rgb)


# --- to_rgb -------------------------------------------------------------------------------------------------------
def test_to_rgb_grayscale_l_replicates_the_channel():
    image = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), mode="L")
    pixels = rgb_pixels(image)
    assert pixels.shape == (1, 3, 3)
    assert pixels.tolist() == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_to_rgb_palette_looks_up_the_colours():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    assert rgb_pixels(image).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_to_rgb_palette_with_transparency_composites_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)  # red, but palette index 0 is transparent
    image.putpixel((1, 0), 1)  # opaque green
    image.info["transparency"] = 0
    assert rgb_pixels(image).tolist() == [[list(WHITE), [0, 255, 0]]]


@pytest.mark.parametrize("mode, key", [("L", 7), ("RGB", (1, 2, 3))])
def test_to_rgb_grayscale_or_rgb_with_a_transparent_colour_composites_on_white(tmp_path, mode, key):
    # a PNG tRNS chunk marks one grey level or one RGB colour transparent, as a palette index can be
    image = Image.new(mode, (2, 1), key)
    image.putpixel((1, 0), 60 if mode == "L" else (60, 60, 60))
    path = tmp_path / "keyed.png"
    image.save(path, transparency=key)
    with Image.open(path) as reopened:
        assert reopened.mode == mode and reopened.info["transparency"] == key
        assert rgb_pixels(reopened).tolist() == [[list(WHITE), [60, 60, 60]]]


def test_to_rgb_rgba_composites_on_white():
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))      # fully transparent red → white, not red
    image.putpixel((1, 0), (255, 0, 0, 255))    # opaque red stays red
    image.putpixel((2, 0), (0, 0, 0, 128))      # half-transparent black → mid grey
    pixels = rgb_pixels(image)
    assert pixels[0, 0].tolist() == list(WHITE)
    assert pixels[0, 1].tolist() == [255, 0, 0]
    assert all(abs(int(v) - 127) <= 2 for v in pixels[0, 2])


def test_to_rgb_la_composites_on_white():
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 0))      # transparent black → white
    image.putpixel((1, 0), (60, 255))   # opaque dark grey
    assert rgb_pixels(image).tolist() == [[list(WHITE), [60, 60, 60]]]


def test_to_rgb_16_bit_grayscale_is_scaled_not_clipped():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert image.mode.startswith("I;16")
    channel = rgb_pixels(image)[0, :, 0].tolist()
    assert channel[0] == 0
    assert abs(channel[1] - 128) <= 1  # mid-grey, not clipped to 255
    assert channel[2] == 255


def test_to_rgb_dark_16_bit_image_stays_dark():
    """In an I;16 image the range is always 0..65535: a 16-bit value of 255 is ~0.4 % brightness (→ 1), whatever
    the brightest pixel happens to be. Guessing "8-bit data" from max <= 255 turns a dark 16-bit image white."""
    image = Image.fromarray(np.array([[0, 255]], dtype=np.uint16))
    assert image.mode.startswith("I;16")
    channel = rgb_pixels(image)[0, :, 0].tolist()
    assert channel == [0, 1]


def test_to_rgb_16_bit_png_reopened_in_whatever_mode_pil_gives(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as reopened:
        reopened.load()
        assert reopened.mode in ("I", "I;16", "I;16B", "I;16L")
        as_32_bit = reopened.convert("I")  # mode I: 32-bit integers holding the 16-bit values
        for image in (reopened, as_32_bit):
            channel = rgb_pixels(image)[0, :, 0].tolist()
            assert channel[0] == 0
            assert abs(channel[1] - 128) <= 1
            assert channel[2] == 255
    assert as_32_bit.mode == "I"
    # load_image on the file goes through the same path
    loaded = load_image(path)
    assert np.asarray(to_rgb(loaded))[0, :, 0].tolist()[2] == 255


def test_to_rgb_32_bit_image_with_8_bit_values_keeps_them():
    image = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")
    assert image.mode == "I"
    assert rgb_pixels(image)[0, :, 0].tolist() == [0, 100, 255]


def test_to_rgb_float_image_in_unit_range_is_scaled():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert image.mode == "F"
    channel = rgb_pixels(image)[0, :, 0].tolist()
    assert channel[0] == 0
    assert abs(channel[1] - 128) <= 1
    assert channel[2] == 255


def test_to_rgb_dark_float_image_keeps_its_8_bit_levels():
    # PIL's convert("F") of an 8-bit image, and float TIFFs, hold 0..255: a dark one must not be stretched to white
    gray = Image.fromarray(np.array([[0, 40, 100]], dtype=np.uint8), mode="L")
    assert rgb_pixels(gray.convert("F"))[0, :, 0].tolist() == [0, 40, 100]
    sixteen = Image.fromarray(np.array([[0.0, 6553.5, 13107.0]], dtype=np.float32), mode="F")
    assert rgb_pixels(sixteen)[0, :, 0].tolist() == [0, 26, 51]  # 16-bit levels, scaled like an I;16 image


def test_to_rgb_keeps_rgb_unchanged():
    image = Image.new("RGB", (2, 2), (10, 20, 30))
    assert rgb_pixels(image)[1, 1].tolist() == [10, 20, 30]


# --- preprocess_image ----------------------------------------------------------------------------------------------
def mean_colour(mean=CLIP_MEAN) -> tuple[int, int, int]:
    return tuple(int(round(m * 255)) for m in mean)


def test_preprocess_shape_dtype_and_normalisation():
    image = Image.new("RGB", (40, 24), mean_colour())
    pixels = preprocess_image(image, 16, CLIP_MEAN, CLIP_STD)
    assert pixels.shape == (3, 16, 16)
    assert pixels.dtype == torch.float32
    # the mean colour normalises to ~0 (only the 8-bit rounding of the mean remains: < 0.5/255/std)
    assert pixels.abs().max().item() < 0.01


def test_preprocess_normalises_with_mean_and_std_per_channel():
    image = Image.new("RGB", (16, 16), (255, 0, 255))
    pixels = preprocess_image(image, 16, CLIP_MEAN, CLIP_STD)
    for channel, value in enumerate((1.0, 0.0, 1.0)):
        expected = (value - CLIP_MEAN[channel]) / CLIP_STD[channel]
        torch.testing.assert_close(pixels[channel], torch.full((16, 16), expected), atol=1e-5, rtol=0)


def test_preprocess_converts_non_rgb_inputs():
    grey = Image.new("L", (20, 20), 128)
    pixels = preprocess_image(grey, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert pixels.shape == (3, 8, 8)
    assert pixels.abs().max().item() < 0.01  # 128/255 ≈ 0.5 → ~0


def test_pad_keeps_aspect_ratio_and_pads_with_the_mean_colour():
    red = Image.new("RGB", (16, 8), (255, 0, 0))  # wide: padded above and below, no resize needed at 16 px
    padded = preprocess_image(red, 16, CLIP_MEAN, CLIP_STD, resize_mode="pad")
    squashed = preprocess_image(red, 16, CLIP_MEAN, CLIP_STD, resize_mode="squash")
    red_normalised = torch.tensor([(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
                                   (0.0 - CLIP_MEAN[2]) / CLIP_STD[2]])[:, None, None]
    assert padded.shape == squashed.shape == (3, 16, 16)
    # pad: rows 0..3 and 12..15 are the mean colour as LLaVA and transformers (do_pad) fill it, int(mean * 255):
    # normalised, a little below 0; rows 4..11 hold the image
    fill = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])[:, None, None]
    torch.testing.assert_close(padded[:, :4], fill.expand(3, 4, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[:, 12:], fill.expand(3, 4, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[:, 4:12], red_normalised.expand(3, 8, 16), atol=1e-4, rtol=0)
    # squash: the image fills the whole square
    torch.testing.assert_close(squashed, red_normalised.expand(3, 16, 16), atol=1e-4, rtol=0)


def test_pad_on_a_tall_image_pads_left_and_right():
    blue = Image.new("RGB", (8, 16), (0, 0, 255))
    padded = preprocess_image(blue, 16, CLIP_MEAN, CLIP_STD, resize_mode="pad")
    assert padded[:, :, :4].abs().max().item() < 0.02  # the mean colour, truncated to whole levels
    assert padded[:, :, 12:].abs().max().item() < 0.02
    assert padded[2, :, 4:12].min().item() > 1.0  # blue channel of the image: (1 - 0.41) / 0.28 ≈ 2.1


def test_pad_on_a_square_image_is_the_same_as_squash():
    image = Image.new("RGB", (32, 32), (0, 200, 50))
    torch.testing.assert_close(preprocess_image(image, 16, CLIP_MEAN, CLIP_STD, "pad"),
                               preprocess_image(image, 16, CLIP_MEAN, CLIP_STD, "squash"))


@pytest.mark.parametrize("image_size", [(16, 16), (16, 8)])
def test_unknown_resize_mode_raises_naming_the_allowed_values(image_size):
    with pytest.raises(ValueError) as excinfo:
        preprocess_image(Image.new("RGB", image_size), 16, CLIP_MEAN, CLIP_STD, resize_mode="crop")
    message = str(excinfo.value)
    assert "crop" in message
    for mode in RESIZE_MODES:
        assert mode in message


def test_pad_refuses_an_image_whose_square_would_be_too_large_before_building_it():
    """A 4097x1 strip has few pixels, but padding makes it 4097x4097: over the limit, refused with its size."""
    with pytest.raises(tessera.DataError) as excinfo:
        preprocess_image(Image.new("RGB", (4097, 1)), 16, CLIP_MEAN, CLIP_STD, "pad", max_pixels=4096 * 4096)
    assert str(excinfo.value) == ("the image is 4097x1; padding it to a square would make it 4097x4097 = 16785409 "
                                  "pixels, more than the 16777216 allowed; expected a smaller or less elongated image")
    assert preprocess_image(Image.new("RGB", (4096, 1)), 16, CLIP_MEAN, CLIP_STD, "pad",
                            max_pixels=4096 * 4096).shape == (3, 16, 16)
    # squash resizes straight to the encoder's size: the same strip is fine
    assert preprocess_image(Image.new("RGB", (4097, 1)), 16, CLIP_MEAN, CLIP_STD, "squash",
                            max_pixels=4096 * 4096).shape == (3, 16, 16)


# --- load_image ----------------------------------------------------------------------------------------------------
def test_load_image_missing_path_raises_data_error_with_the_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(tessera.DataError) as excinfo:
        load_image(path)
    assert str(path) in str(excinfo.value)


def test_load_image_non_image_file_raises_data_error_with_the_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(tessera.DataError) as excinfo:
        load_image(str(path))
    assert str(path) in str(excinfo.value)


def test_load_image_reads_a_file_and_passes_images_through(tmp_path):
    path = tmp_path / "square.png"
    Image.new("RGB", (5, 3), (1, 2, 3)).save(path)
    loaded = load_image(path)
    assert loaded.size == (5, 3)
    assert np.asarray(to_rgb(loaded))[2, 4].tolist() == [1, 2, 3]  # pixels still readable after the file closed
    image = Image.new("RGB", (2, 2))
    assert load_image(image) is image


def test_load_image_names_a_file_past_pils_decompression_bomb_guard(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses past twice this: 100x100 is a "bomb" now
    with pytest.raises(tessera.DataError, match=r"bomb.png: refused as a decompression bomb"):
        load_image(path)


@pytest.mark.parametrize("orientation, top_left", [(6, [255, 0, 0]), (8, [0, 0, 255]), (3, [0, 0, 255])])
def test_load_image_turns_a_photo_upright_by_its_exif_orientation(tmp_path, orientation, top_left):
    # stored 4x2, left half red and right half blue; a camera held sideways tags how to turn it for display
    stored = Image.new("RGB", (4, 2), (255, 0, 0))
    stored.paste((0, 0, 255), (2, 0, 4, 2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    for source in (path, Image.open(path)):  # a file, and a PIL image a server decoded
        loaded = load_image(source)
        assert loaded.size == ((2, 4) if orientation in (6, 8) else (4, 2))
        assert np.asarray(to_rgb(loaded))[0, 0].tolist() == top_left
    # what a processor turns it into is what transformers' load_image shows
    transformers = pytest.importorskip("transformers")
    upright = transformers.image_utils.load_image(str(path))
    assert np.array_equal(np.asarray(to_rgb(load_image(path))), np.asarray(upright))


def test_pad_mode_matches_transformers_llava_do_pad():
    """A model trained here in pad mode and exported sets transformers' do_pad: both must fill the same colour (the
    fill was rounded here and truncated there, 0.015 apart after normalising)."""
    from transformers import LlavaImageProcessorPil

    wide = Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 16, 3), dtype=np.uint8))
    theirs = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)
    expected = torch.from_numpy(theirs(wide, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(preprocess_image(wide, 16, CLIP_MEAN, CLIP_STD, resize_mode="pad"), expected,
                               atol=1e-6, rtol=0)


def test_a_uint8_numpy_array_is_an_image_and_other_objects_are_named():
    """A notebook's image is often a numpy array (PIL's, or OpenCV's turned RGB): it was handed to PIL as a file
    and failed with "'numpy.ndarray' object has no attribute 'read'", as did a tensor or None."""
    from tessera.errors import DataError

    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(rgb_pixels(load_image(pixels)), pixels)
    assert load_image(pixels[..., 0]).mode == "L" and load_image(np.dstack([pixels, pixels[..., :1]])).mode == "RGBA"
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    encoded.seek(0)
    assert np.array_equal(rgb_pixels(load_image(encoded)), pixels)  # an open file, as PIL reads them
    for source, words in [
        (pixels.astype(np.float32), "a numpy array of shape (20, 30, 3) and dtype float32 given as an image: "
                                    "expected uint8 pixels"),
        (pixels[..., :2], "a numpy array of shape (20, 30, 2) and dtype uint8"),
        (torch.zeros(3, 4, 4), "an object of type Tensor given as an image: expected a file path, an open file, a "
                               "PIL image or a uint8 numpy array"),
        (None, "an object of type NoneType given as an image"),
    ]:
        with pytest.raises(DataError, match=re.escape(words)):
            load_image(source)
