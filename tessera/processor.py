"""The Processor: chat messages + images → the tensors MultimodalLM takes, and generated ids → text.

    processor = Processor.for_model(config, tokenizer)
    batch = processor([messages], padding_side="right")   # training: labels on the answers only
    prompt = processor([messages], add_generation_prompt=True, padding_side="left")

Chat template (one conversation):

    <|begin|><|system|>…<|end|><|user|><image>\nWhat colour is the circle?<|end|><|assistant|>red<|end|>

Method A expands each `<image>` into as many image tokens as the encoder + projector produce (the hybrid: as many
as its thumbnail gives); Method B keeps one marker per image. Labels are -100 everywhere except the assistant
answers and the `<|end|>` closing them (so the model learns when to stop).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from tessera.checkpoint import CONFIG_NAME, read_json_object, write_whole, written_whole
from tessera.config import ModelConfig, _float, _positive, _sequence, check_grid_list, is_integer
from tessera.errors import CheckpointError, ConfigError, DataError
from tessera.text.tokenizer import BEGIN, END, IMAGE, PAD, ROLE_TOKENS, MessageTextEncoder, load_tokenizer
from tessera.vision.preprocess import (MAX_PREPROCESSED_PIXELS, RESIZE_MODES, check_preprocessed_size, largest_step,
                                      load_image, naming, preprocess_image)
from tessera.vision.tiling import TiledImage, pad_tiles, preprocess_tiled, tiling_step

IGNORE_INDEX = -100
PROCESSOR_CONFIG_NAME = "processor_config.json"
TOKENIZER_NAME = "tokenizer.json"

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant", "content": str | [{"type": "text"|"image", …}]}


@dataclass
class ProcessorConfig:
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    image_seq_length: int  # tokens that stand for one image in the text
    resize_mode: str = "squash"
    max_length: int | None = None  # longer training conversations are cut from the right (not prompts)
    # Dynamic high resolution (the hybrid): a thumbnail plus the image cut into the closest of these (rows, columns)
    # grids of image_size² tiles, padded to max_tiles slots. None: one image_size² image.
    tile_grids: list[list[int]] | None = None
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        # checked as a model config's fields are: a zero std gave inf pixels, a string length a TypeError later
        _positive("processor", image_size=self.image_size, image_seq_length=self.image_seq_length)
        for name, positive in (("image_mean", False), ("image_std", True)):
            values = _sequence(f"processor.{name}", getattr(self, name), "a list of 3 numbers, one per channel")
            if len(values) != 3:  # the images are RGB
                raise ConfigError(f"processor.{name}={getattr(self, name)!r}: expected 3 numbers, one per channel")
            setattr(self, name, tuple(_float("processor", name, v, positive=positive) for v in values))
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"processor.resize_mode={self.resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        if self.max_length is not None and (not is_integer(self.max_length) or self.max_length < 1):
            raise ConfigError(f"processor.max_length={self.max_length!r}: expected a positive integer or null")
        if (self.tile_grids is None) != (self.max_tiles is None):
            raise ConfigError(f"processor.tile_grids={self.tile_grids!r} with processor.max_tiles={self.max_tiles!r}: "
                              f"expected both set (dynamic high resolution) or both null")
        if self.tile_grids is not None:
            _positive("processor", max_tiles=self.max_tiles)
            check_grid_list("processor.tile_grids", self.tile_grids, "processor.max_tiles", self.max_tiles)
            self.tile_grids = [list(grid) for grid in self.tile_grids]


class Processor:
    """What turns conversations and images into a model's inputs, and its outputs back into text: the chat format
    (<|user|>, <|assistant|> and <|end|> around each turn), each <image> placeholder expanded into the model's image
    tokens, images preprocessed (RGB, resized, normalised), labels on the answers only, rows padded into a batch.

    processor([messages, ...], images) gives a batch for model(**batch) or model.generate(**batch); for_model makes
    one that fits a ModelConfig; from_pretrained loads a checkpoint's (a Hugging Face one's: its chat template)."""

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.pad_token_id = self._special_id(PAD)
        self.begin_token_id = self._special_id(BEGIN)
        self.end_token_id = self._special_id(END)
        self.image_token_id = self._special_id(IMAGE)
        self.role_token_ids = {role: self._special_id(token) for role, token in ROLE_TOKENS.items()}

    @classmethod
    def for_model(cls, model_config: ModelConfig, tokenizer: Tokenizer | str | Path, max_length: int | None = None,
                  resize_mode: str = "squash") -> Processor:
        """A processor whose image size, normalisation and image-token count follow the model's config; the
        tokenizer (a tokenizers.Tokenizer, or its tokenizer.json's path) must have the special ids the model was
        built with."""
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        vision, tiled = model_config.vision, model_config.fusion.method == "hybrid"
        processor = cls(tokenizer, ProcessorConfig(
            image_size=vision.image_size, image_mean=vision.image_mean, image_std=vision.image_std,
            image_seq_length=model_config.image_seq_length, resize_mode=resize_mode, max_length=max_length,
            tile_grids=vision.aspect_ratios if tiled else None, max_tiles=vision.max_num_tiles if tiled else None,
        ))
        for name, ours in (("image_token_id", processor.image_token_id), ("pad_token_id", processor.pad_token_id),
                           ("eos_token_id", processor.end_token_id)):
            if getattr(model_config, name) != ours:
                raise ConfigError(f"{name}={getattr(model_config, name)} in the model config but the tokenizer gives "
                                  f"{ours}; expected them to agree")
        if tokenizer.get_vocab_size() > model_config.text.vocab_size:
            raise ConfigError(f"text.vocab_size={model_config.text.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.get_vocab_size()} tokens")
        return processor

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"the tokenizer has no special token {token!r}")
        return token_id

    # --- images ------------------------------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        """The text that stands for one image in a prompt."""
        return IMAGE

    def preprocess_image(self, image: str | Path | Image.Image | np.ndarray, max_pixels: int = MAX_PREPROCESSED_PIXELS
                         ) -> torch.Tensor | TiledImage:
        """An image (a file path, a PIL image or a uint8 numpy array) as the model's (3, size, size) pixel tensor —
        or, with tile grids, its thumbnail and tiles (vision/tiling.py)."""
        c = self.config
        loaded = load_image(image)
        with naming(image):
            if c.tile_grids is not None:
                return preprocess_tiled(loaded, c.image_size, c.image_mean, c.image_std, c.tile_grids, c.resize_mode,
                                        max_pixels)
            return preprocess_image(loaded, c.image_size, c.image_mean, c.image_std, c.resize_mode, max_pixels)

    def check_image_size(self, width: int, height: int, max_pixels: int = MAX_PREPROCESSED_PIXELS) -> None:
        """DataError if preprocess_image would build an image of more than max_pixels from a width x height one:
        lets the server refuse an image from its header, before decoding it."""
        check_preprocessed_size((width, height), *self._largest_step(width, height), max_pixels)

    def _largest_step(self, width: int, height: int) -> tuple[str, tuple[int, int]]:
        c = self.config
        if c.tile_grids is not None:
            return tiling_step(width, height, c.image_size, c.tile_grids, c.resize_mode)
        return largest_step(width, height, c.image_size, c.resize_mode)

    # --- text --------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as one string, `<image>` placeholders not yet expanded."""
        parts = [BEGIN]
        for message in messages:
            role, text, _ = _read_message(message)
            parts.append(f"{ROLE_TOKENS[role]}{text}{END}")
        if add_generation_prompt:
            parts.append(ROLE_TOKENS["assistant"])
        return "".join(parts)

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = False, labels: bool = True
               ) -> tuple[list[int], list[int] | None, list[Any]]:
        """Token ids, labels (None with labels=False: a prompt to generate from) and the images found in the message
        parts, for one conversation."""
        ids, targets, images = [self.begin_token_id], [IGNORE_INDEX], []
        for message in messages:
            role, text, part_images = _read_message(message)
            images.extend(part_images)
            content = self._text_ids(text) + [self.end_token_id]
            ids += [self.role_token_ids[role]] + content
            # an answer's image tokens are no target: their features replace them, and generate never makes them
            targets += [IGNORE_INDEX] + ([IGNORE_INDEX if t == self.image_token_id else t for t in content]
                                         if role == "assistant" else [IGNORE_INDEX] * len(content))
        if add_generation_prompt:
            ids.append(self.role_token_ids["assistant"])
            targets.append(IGNORE_INDEX)
        return ids, targets if labels else None, images

    @cached_property
    def text_encoder(self) -> MessageTextEncoder:
        """Reads the special tokens typed in a message as text, the image token aside."""
        return MessageTextEncoder(self.tokenizer, self.image_token)

    def _text_ids(self, text: str) -> list[int]:
        typed = [(0, len(text))] if self.text_encoder.typed_special_token(text) else []
        ids = []
        for token in self.text_encoder.encode(text, typed):
            ids += [token.id] * (self.config.image_seq_length if token.id == self.image_token_id else 1)
        return ids

    def user_message(self, text: str, num_images: int) -> Message:
        """A user turn asking `text` about `num_images` images (placed first unless the text has placeholders)."""
        if IMAGE in text or not num_images:
            return {"role": "user", "content": text}
        return {"role": "user", "content": f"{IMAGE}\n" * num_images + text}

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, **options) -> str:
        """Token ids back to text, the special tokens left out unless asked for. One id, a list or a tensor, as
        transformers' tokenizers take them: its streamers decode a single id at the end of a line. `options` they
        pass (clean_up_tokenization_spaces) change nothing here."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tokenizer.decode([ids] if isinstance(ids, int) else list(ids),
                                     skip_special_tokens=skip_special_tokens)

    # --- batches -----------------------------------------------------------------------------------------------
    def __call__(self, conversations: Sequence[Sequence[Message]], images: Sequence[Sequence[Any]] | None = None,
                 *, add_generation_prompt: bool = False, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """A padded batch: input_ids, attention_mask, labels, pixel_values (all images, sample order),
        image_counts. Images come from the message parts or from `images` (one list per conversation).
        Training batches pad on the right; generation prompts on the left, so every prompt ends at the last
        column and the next token is predicted from there."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        if not isinstance(conversations, (str, dict)):
            conversations = list(conversations)  # a generator too: it is read more than once below
        if isinstance(conversations, (str, dict)) or any(isinstance(c, dict) for c in conversations):
            # one conversation's messages, taken for conversations, failed as a malformed message
            raise DataError("conversations holds messages: expected a list of conversations, each a list of "
                            "messages — processor([messages]) for one")
        if not conversations:
            raise DataError("no conversations: expected at least one")
        if images is not None and len(images) != len(conversations):
            raise DataError(f"{len(images)} image lists for {len(conversations)} conversations; expected one each")
        if images is not None:
            for index, sample in enumerate(images):
                if isinstance(sample, (str, Path, Image.Image)):
                    raise DataError(f"images[{index}] is a single image ({type(sample).__name__}); expected a list "
                                    f"of images for each conversation, e.g. [[image]]")
        rows, pixel_values = [], []
        for index, messages in enumerate(conversations):
            ids, labels, part_images = self.encode(messages, add_generation_prompt)
            sample_images = list(part_images) + list(images[index] if images is not None else [])
            placeholders = ids.count(self.image_token_id) // self.config.image_seq_length
            if placeholders != len(sample_images):
                raise DataError(f"conversation {index}: {placeholders} {self.image_token} placeholder(s) but "
                                f"{len(sample_images)} image(s); expected one image per placeholder")
            # max_length bounds training rows; cutting a prompt's right end would drop its question and the
            # assistant turn the answer starts from (the model's own position limit still applies)
            rows.append((ids, labels) if add_generation_prompt else self.truncate(ids, labels, index))
            pixel_values.append([self.preprocess_image(image) for image in sample_images])
        return self.pad_batch(rows, pixel_values, padding_side)

    def pad_batch(self, rows: Sequence[tuple[list[int], list[int]]], pixel_values: Sequence[Sequence[torch.Tensor]],
                  padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Already encoded (ids, labels) rows and each row's preprocessed images → one padded batch."""
        out = self.pad_rows(rows, padding_side)
        flat = [pixels for row in pixel_values for pixels in row]
        size = self.config.image_size
        if self.config.tile_grids is not None:  # each image a TiledImage: its thumbnail and tiles, and its grid's id
            slots = 1 + self.config.max_tiles
            out["pixel_values"] = pad_tiles(flat, slots) if flat else torch.zeros(0, slots, 3, size, size)
            out["aspect_ratio_ids"] = torch.tensor([image.aspect_ratio_id for image in flat], dtype=torch.long)
        else:
            out["pixel_values"] = torch.stack(flat) if flat else torch.zeros(0, 3, size, size)
        out["image_counts"] = torch.tensor([len(row) for row in pixel_values], dtype=torch.long)
        return out

    def pad_rows(self, rows: Sequence[tuple[list[int], list[int]]], padding_side: str = "right"
                 ) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels of already encoded (ids, labels) rows, padded to one width."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        width = max(len(ids) for ids, _ in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in rows:
            pad = width - len(ids)

            def fill(values: list[int], value: int) -> list[int]:
                return [value] * pad + values if padding_side == "left" else values + [value] * pad

            batch["input_ids"].append(fill(list(ids), self.pad_token_id))
            batch["attention_mask"].append(fill([1] * len(ids), 0))
            batch["labels"].append(fill(list(labels), IGNORE_INDEX))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    def truncate(self, ids: list[int], labels: list[int], index: int | None = None) -> tuple[list[int], list[int]]:
        """Cut to max_length from the right — never through an image's tokens."""
        limit = self.config.max_length
        if limit is None or len(ids) <= limit:
            return ids, labels
        if self.image_token_id in ids[limit:]:
            where = f"conversation {index}: " if index is not None else ""
            raise DataError(f"{where}{len(ids)} tokens exceed max_length={limit} and cutting would "
                            f"split an image's tokens; expected a longer max_length or fewer images")
        return ids[:limit], labels[:limit]

    # --- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """tokenizer.json and processor_config.json into `directory` (beside the model's files); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with written_whole(directory / TOKENIZER_NAME) as partial:
            self.tokenizer.save(str(partial))
        settings = asdict(self.config)
        if self.config.tile_grids is None:  # untiled: written as before, so older tessera reads it too
            del settings["tile_grids"], settings["max_tiles"]
        write_whole(directory / PROCESSOR_CONFIG_NAME, json.dumps(settings, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Processor:
        """tessera's processor, or — for a Hugging Face checkpoint or one converted from it — a HubProcessor
        (interop/processor.py) with the checkpoint's own tokenizer, chat template and image processing. Beside a
        model's config.json, every token id must fit the model's embedding and the tile grids must be the model's
        (CheckpointError otherwise); a processor saved on its own has no model to compare with."""
        directory = Path(directory)
        if not directory.is_dir():  # else named as a missing processor_config.json inside it
            raise CheckpointError(f"{directory}: no such checkpoint directory; expected one holding tokenizer.json "
                                  f"and processor_config.json (Processor.save_pretrained writes them)")
        from tessera.interop.processor import hub_processor

        hub = hub_processor(directory)
        processor = hub or cls._tessera_processor(directory)
        if (directory / CONFIG_NAME).is_file():  # a model beside it: read once, for both checks
            model_config = checkpoint_model_config(directory)
            check_tokenizer_fits_model(processor.tokenizer, directory, model_config)
            if hub is None:
                check_tiling_fits_model(processor.config, directory / PROCESSOR_CONFIG_NAME, model_config)
        return processor

    @classmethod
    def _tessera_processor(cls, directory: Path) -> Processor:
        path = directory / PROCESSOR_CONFIG_NAME
        try:
            settings = read_json_object(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; expected the processor settings") from None
        try:
            config = ProcessorConfig(**settings)
        except ConfigError as e:  # before ValueError, which it subclasses
            raise ConfigError(f"{path}: {e}") from None
        except (ValueError, TypeError) as e:  # fields ProcessorConfig has not, or values it cannot take
            raise ConfigError(f"{path}: invalid processor settings ({e})") from None
        return cls(load_tokenizer(directory / TOKENIZER_NAME), config)


def check_tiling_fits_model(config: ProcessorConfig, path: Path, model_config: ModelConfig) -> None:
    """CheckpointError unless the processor cuts images into the model's tile grids, in the model's order: an aspect
    ratio id names a grid by its place in the list, so grids listed in another order would have the model read a
    1x2 image as 3x1, a padding slot as a tile, without a word."""
    hybrid = model_config.fusion.method == "hybrid"
    expected = (model_config.vision.aspect_ratios, model_config.vision.max_num_tiles) if hybrid else (None, None)
    if (config.tile_grids, config.max_tiles) != expected:
        raise CheckpointError(f"{path}: tile_grids={config.tile_grids}, max_tiles={config.max_tiles}, but the model "
                              f"beside it expects tile_grids={expected[0]}, max_tiles={expected[1]} "
                              f"(vision.aspect_ratios and vision.max_num_tiles of its fusion.method="
                              f"{model_config.fusion.method!r}); expected the processor saved with this model")


def checkpoint_model_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a tessera checkpoint or of a Hugging Face LLaVA / Llama 3.2 Vision directory, read
    without its weights."""
    from tessera.interop.hub_files import is_hf_checkpoint

    if is_hf_checkpoint(directory):
        from tessera.interop.convert import hf_model_config

        return hf_model_config(directory)[1]
    return ModelConfig.load(directory / CONFIG_NAME)


def check_tokenizer_fits_model(tokenizer: Tokenizer, directory: Path, model_config: ModelConfig) -> None:
    """CheckpointError if the tokenizer gives ids past the embedding of the model in `directory` (each one would be
    an IndexError deep in generation). Fewer tokens than the vocabulary are fine: models pad their vocabulary."""
    config_path = directory / CONFIG_NAME
    text = model_config.text
    highest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if highest >= text.embedding_rows:  # rows past vocab_size are ids the model reads but never predicts
        extra = f" + num_extra_embeddings={text.num_extra_embeddings}" if text.num_extra_embeddings else ""
        raise CheckpointError(f"{directory / TOKENIZER_NAME}: {tokenizer.get_vocab_size()} tokens (ids up to "
                              f"{highest}), but {config_path} gives the model text.vocab_size={text.vocab_size}"
                              f"{extra}; expected every token id below {text.embedding_rows} (is this the tokenizer "
                              f"the model was trained with?)")


def _read_message(message: Message) -> tuple[str, str, list[Any]]:
    """(role, text with <image> placeholders, images carried by the parts) of one chat message."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"message {message!r}: expected an object with 'role' and 'content'")
    role, content = message["role"], message["content"]
    if role not in ROLE_TOKENS:
        raise DataError(f"message role {role!r}: expected one of {', '.join(ROLE_TOKENS)}")
    if isinstance(content, str):
        return role, content, []
    if not isinstance(content, list):
        raise DataError(f"{role} message content {content!r}: expected a string or a list of parts")
    text, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image":
            text.append(IMAGE)
            source = image_part_source(part)
            if source is not None:
                images.append(source)
        else:
            raise DataError(f"message part {part!r}: expected {{'type': 'text', 'text': …}} or {{'type': 'image'}}")
    return role, join_parts(text), images


IMAGE_PART_KEYS = ("image", "path", "url")  # where transformers' chat messages put an image part's image


def image_part_source(part: dict[str, Any]) -> Any:
    """The image an image part carries (a PIL image, an array, a file path or file:// URL), or None: a placeholder
    whose image is passed apart."""
    return next((part[key] for key in IMAGE_PART_KEYS if part.get(key) is not None), None)


def join_parts(pieces: Sequence[str]) -> str:
    """A message's parts as one text, `<image>` for each image part. What follows an image starts on a new line,
    as `Processor.user_message` and LLaVA's chat template write it, and as the training records have it: served
    through the OpenAI API ([image, text] parts) without the newline, the quickstart's model answered 0.804 of its
    test questions right instead of 0.928."""
    text, previous = "", None
    for piece in pieces:
        if previous == IMAGE and not piece.startswith("\n"):
            text += "\n"
        text, previous = text + piece, piece
    return text
