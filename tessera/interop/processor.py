"""HubProcessor: the processor of an imported checkpoint — its tokenizer.json, its Jinja chat template and its
image processor — behind the same interface as tessera's `Processor` (`processor(conversations, images)` → the
batch `MultimodalLM` takes, `decode`, `save_pretrained`).

It reproduces what transformers' LlavaProcessor / MllamaProcessor do with `apply_chat_template`: render the
template with the tokenizer's special tokens; add the tokenizer's own special tokens only when the prompt does not
already start with BOS; for LLaVA repeat each image token once per image feature; for Llama 3.2 Vision put BOS
after any leading `<|image|>` tokens when the prompt has none, and cut every image into tiles.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from tessera.checkpoint import written_whole
from tessera.config import ModelConfig
from tessera.errors import ConfigError, DataError
from tessera.interop.chat_template import render
from tessera.interop.hub_files import read_json, write_json
from tessera.interop.image_processing import ImageProcessing, tile_arrangements
from tessera.processor import IGNORE_INDEX, PROCESSOR_CONFIG_NAME, TOKENIZER_NAME, Processor, image_part_source
from tessera.text.tokenizer import load_tokenizer
from tessera.vision.preprocess import MAX_PREPROCESSED_PIXELS, load_image, naming
from tessera.vision.tiling import TiledImage, pad_tiles

FAMILIES = ("llava", "mllama")
# A message text's place holder when the template renders again to find it (see HubProcessor._locate):
# private-use characters no template writes
_MARK, _MARK_END = "\U0010fff0", "\U0010fff1"
_WS = "\u3000"  # ideographic space: whitespace to str.strip, written by no template
_MARKER = re.compile(f"({_MARK}([0-9a-f]{{8}})-[0-9]+{_MARK_END})")  # compiled once: the nonce is a group
KIND = "hf"  # processor_config.json "kind" of a HubProcessor (tessera's own processor has none)


@dataclass
class HubProcessorConfig:
    family: str
    image_token: str
    image_seq_length: int  # tokens per image in the text: the feature count (LLaVA) or 1 (Llama 3.2 Vision)
    image_processing: ImageProcessing
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, … as strings
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # written back on export
    processor_config: dict[str, Any] = field(default_factory=dict)  # likewise (without the image processor)
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r}: expected one of {', '.join(FAMILIES)}")
        if isinstance(self.image_processing, dict):
            self.image_processing = ImageProcessing(**self.image_processing)

    @property
    def image_size(self) -> int:
        return self.image_processing.output_size[0]


class HubProcessor(Processor):
    def __init__(self, tokenizer: Tokenizer, config: HubProcessorConfig, pad_token_id: int | None = None,
                 chat_template_file: Path | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template_file = chat_template_file  # where the template was read: what an error about it names
        self.image_token_id = self._token_id(config.image_token, "the image token")
        self.bos_token = config.special_tokens.get("bos_token")
        pad = config.special_tokens.get("pad_token")
        self.pad_token_id = self._token_id(pad, "pad_token") if pad else pad_token_id
        if self.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad_token and the model config none either; expected one to pad "
                              "batches with")
        eos = config.special_tokens.get("eos_token")
        self.end_token_id = self._token_id(eos, "eos_token") if eos else None

    def _token_id(self, token: str, what: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{what} {token!r} is not in tokenizer.json's vocabulary")
        return token_id

    # --- from a Hugging Face directory -------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, directory: str | Path, model_config: ModelConfig) -> HubProcessor:
        directory = Path(directory)
        tokenizer = load_hf_tokenizer(directory / TOKENIZER_NAME)
        tokenizer_config = read_json(directory / "tokenizer_config.json", required=False) or {}
        processor_config = read_json(directory / PROCESSOR_CONFIG_NAME, required=False) or {}
        image_settings = processor_config.pop("image_processor", None)
        where = directory / PROCESSOR_CONFIG_NAME
        if image_settings is None:
            where = directory / "preprocessor_config.json"
            image_settings = read_json(where, required=False)
            if image_settings is None:
                raise ConfigError(f"{directory}: no image processor settings; expected preprocessor_config.json "
                                  f"or processor_config.json with 'image_processor'")
        family = "mllama" if model_config.vision.encoder == "tiled" else "llava"
        image_processing = ImageProcessing.from_hf(image_settings, str(where))
        expected_kind = "tiles" if family == "mllama" else "resize"
        if image_processing.kind != expected_kind:
            raise ConfigError(f"{where}: image_processor_type={image_settings.get('image_processor_type')!r} does not "
                              f"fit a {family} model")
        check_fits_model(image_processing, model_config, str(where))
        special = template_tokens(tokenizer_config)
        image_token = processor_config.get("image_token") or tokenizer_config.get("image_token") or (
            "<|image|>" if family == "mllama" else None)
        if image_token is None:
            image_token = tokenizer.id_to_token(model_config.image_token_id)
        template, template_file = find_chat_template(directory, processor_config, tokenizer_config)
        config = HubProcessorConfig(
            family=family, image_token=_token_text(image_token), image_seq_length=model_config.image_seq_length,
            image_processing=image_processing, chat_template=template, special_tokens=special,
            tokenizer_config=tokenizer_config, processor_config=processor_config,
        )
        processor = cls(tokenizer, config, pad_token_id=model_config.pad_token_id, chat_template_file=template_file)
        if processor.image_token_id != model_config.image_token_id:
            raise ConfigError(f"{directory}: the image token {config.image_token!r} is id "
                              f"{processor.image_token_id} in tokenizer.json but {model_config.image_token_id} in "
                              f"config.json; expected them to agree")
        return processor

    # --- text ----------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt)[0]

    def _render(self, messages, add_generation_prompt
                ) -> tuple[str, list[tuple[int, int]], list[Any], list[dict[str, Any]]]:
        """The prompt, the character spans of its `{% generation %}` blocks (none if the template has no such
        tags), the images and the messages as the template saw them."""
        if self.config.chat_template is None:
            raise ConfigError("this checkpoint has no chat template (chat_template.jinja, chat_template.json, "
                              "processor_config.json or tokenizer_config.json); expected one to build prompts")
        template_messages, images = [], []
        for message in messages:
            content, part_images = _template_content(message)
            if isinstance(content, str):
                content = self._as_template_takes(content)
            images += part_images
            template_messages.append({**message, "content": content})
        text, spans = render(self.config.chat_template, template_messages, add_generation_prompt,
                             **self.config.special_tokens)
        return text, spans, images, template_messages

    def _as_template_takes(self, content: str) -> str | list[dict[str, Any]]:
        """A string content as the template writes it: as one text part where the template writes only parts. The
        llava-hf templates loop over a message's parts, so a string (what most OpenAI clients send, and what a
        data record holds) rendered as nothing, and the model answered an empty prompt. (An image token in the
        text stays the image token: see MessageTextEncoder.)"""
        writes_strings, writes_parts = self._template_writes
        return content if writes_strings or not writes_parts else [{"type": "text", "text": content}]

    @cached_property
    def _template_writes(self) -> tuple[bool, bool]:
        """Whether the chat template writes a message's content given as a string, and given as text parts
        (rendered once each with a marker; a template that refuses the probe counts as writing it)."""
        marker = "tessera-probe-8d1f"

        def writes(content) -> bool:
            try:
                text, _ = render(self.config.chat_template, [{"role": "user", "content": content}], True,
                                 **self.config.special_tokens)
            except Exception:  # noqa: BLE001 — a template may raise on anything; then nothing is converted
                return True
            return marker in text

        if self.config.chat_template is None:
            return True, False
        return writes(marker), writes([{"type": "text", "text": marker}])

    def _locate(self, text: str, messages: list[dict[str, Any]], add_generation_prompt: bool, answers: bool
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
        """Where the prompt `text` holds the assistant answers (when `answers`) and the texts of the messages that
        hold a special token (read as text; see `MessageTextEncoder`): two lists of character spans.

        The template renders again with each of those texts replaced by a marker, so a text is found where the
        template wrote it — not where the same characters happen to come first (the template's own EOS closing
        an earlier turn, for a typed `</s>`; "A" in "ASSISTANT:" for a one-letter answer), in whatever order the
        template writes the messages. The marker carries the text's surrounding whitespace as U+3000, which a trim
        removes like any whitespace but no template writes, so the rebuilt prompt has it where the template kept
        it, and a template's own whitespace beside it is never taken for the text's. A message is typed if its
        text parts hold a special token joined (a template may write them back to back), and then all its parts
        are text. If the prompt rebuilt from the markers is not the prompt, the template changed a text in another
        way (escaped it, say), or renders differently each time: then None (see `encode`)."""
        parts = list(_text_parts(messages))
        typed = {index for index, text_ in _joined_texts(messages).items()
                 if self.text_encoder.typed_special_token(text_)}
        wanted = [(index, part, piece) for index, part, piece in parts
                  if index in typed or (answers and messages[index]["role"] == "assistant")]
        if not wanted:
            return [], []
        nonce = secrets.token_hex(4)  # no text can hold the markers by chance, nor on purpose
        marked_messages, markers = [dict(m) for m in messages], {}
        for index, part, piece in wanted:
            marker = f"{_MARK}{nonce}-{len(markers)}{_MARK_END}"
            core = piece.strip()
            lead = piece[:len(piece) - len(piece.lstrip())]
            trail = piece[len(lead) + len(core):]  # "" for a whitespace-only piece (its whitespace is the lead)
            markers[marker] = (index, core, lead, trail)
            # the whitespace is written as _WS, which a trim removes as it does any whitespace, but which no template
            # writes of its own: kept, it is the text's; gone, the template trimmed it
            content = marked_messages[index]["content"]
            marked_piece = _WS * len(lead) + marker + _WS * len(trail)
            if isinstance(content, str):
                marked_messages[index]["content"] = marked_piece
            else:
                content = marked_messages[index]["content"] = list(content)
                content[part] = {**content[part], "text": marked_piece}
        marked, _ = render(self.config.chat_template, marked_messages, add_generation_prompt,
                           **self.config.special_tokens)
        rebuilt, length, answer_spans, typed_spans, cursor = [], 0, [], [], 0
        for found in _MARKER.finditer(marked):
            if found.group(2) != nonce or found.group(1) not in markers:
                continue  # marker characters in a text: left in place, the rebuilt prompt will not match
            index, core, lead, trail = markers[found.group(1)]
            lead_at = found.start() - len(lead)
            lead = lead if lead_at >= cursor and marked.startswith(_WS * len(lead), lead_at) else ""
            trail = trail if marked.startswith(_WS * len(trail), found.end()) else ""
            rebuilt.append(marked[cursor:found.start() - len(lead)])
            start = length + len(rebuilt[-1])
            length = start + len(lead) + len(core) + len(trail)
            rebuilt.append(lead + core + trail)
            cursor = found.end() + len(trail)
            end = length
            (typed_spans if index in typed else answer_spans).append((start, end))
            if index in typed and messages[index]["role"] == "assistant" and answers:
                answer_spans.append((start, end))
        if "".join(rebuilt) + marked[cursor:] == text:
            return answer_spans, typed_spans
        return None

    def _typed_or_answers(self, text: str, messages: list[dict[str, Any]], answers: bool, changing: bool
                          ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """What `_locate` gives when the marked render does not rebuild the prompt (`changing`: because the template
        renders differently each time): a DataError for a typed special token, else the answers looked for by their
        characters."""
        for index, text_ in _joined_texts(messages).items():
            token = self.text_encoder.typed_special_token(text_)
            if token:
                why = "renders differently each time" if changing else "changed it"
                raise DataError(f"messages[{index}]: its text holds the special token {token!r}, which is read as "
                                f"text only where the chat template copies the text into the prompt as it is (or "
                                f"trimmed); this template {why}. Expected the text without {token!r}")
        return (_answer_spans(text, messages) if answers else []), []

    def encode(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, labels: bool = True
               ) -> tuple[list[int], list[int] | None, list[Any]]:
        """Token ids, labels (the assistant answers; the template's {% generation %} blocks when it has them) and
        the images in the message parts, as transformers' processor would tokenize the rendered prompt.
        labels=False: a prompt to generate from, whose answers are not looked for (labels None) — so a template
        that rewrites its answers (strips their thinking, say) no longer stops a special token typed in another
        message from being placed as text."""
        text, spans, images, template_messages = self._render(messages, add_generation_prompt)
        find_answers = labels and not spans
        located = self._locate(text, template_messages, add_generation_prompt, answers=find_answers)
        changing = located is None and self._render(messages, add_generation_prompt)[0] != text
        if changing:
            # the template renders differently each time (Llama 3's writes today's date: midnight passed between
            # the two renders), not the texts: both again, back to back
            text, spans, images, template_messages = self._render(messages, add_generation_prompt)
            find_answers = labels and not spans
            located = self._locate(text, template_messages, add_generation_prompt, answers=find_answers)
        answers, typed = located or self._typed_or_answers(text, template_messages, find_answers, changing)
        spans = sorted(spans or answers) if labels else []
        # BOS typed in a message is text: only the template's own counts as the prompt having one
        bos_at = _first_outside(text, self.bos_token, typed) if self.bos_token else -1
        add_special_tokens = bos_at != 0
        if self.config.family == "mllama" and self.bos_token and bos_at < 0:
            # MllamaProcessor: BOS goes after any leading <|image|> tokens
            image, lead = self.config.image_token, 0
            while text.startswith(image, lead):
                lead += len(image)
            text = text[:lead] + self.bos_token + text[lead:]
            spans, typed = ([(a + len(self.bos_token), b + len(self.bos_token)) for a, b in spans_]
                            for spans_ in (spans, typed))
        ids, targets, in_answer, next_span = [], [], False, 0
        for token_id, (start, end), special in self.text_encoder.encode(text, typed, add_special_tokens):
            # an answer token lies inside an answer span; the EOS right after an answer is learned too
            closes_answer = in_answer and token_id == self.end_token_id
            while next_span < len(spans) and spans[next_span][1] <= start:  # tokens and spans both go left to right
                next_span += 1
            in_answer = not special and next_span < len(spans) and start < spans[next_span][1] and \
                end > spans[next_span][0]  # overlaps, as transformers
            # each image token stands for image_seq_length features (LLaVA), as transformers repeats it
            repeat = self.config.image_seq_length if token_id == self.image_token_id else 1
            ids += [token_id] * repeat
            targets += [token_id if in_answer or closes_answer else IGNORE_INDEX] * repeat
        return ids, targets if labels else None, images

    def user_message(self, text: str, num_images: int) -> dict[str, Any]:
        return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}

    # --- images --------------------------------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        return self.config.image_token

    def preprocess_image(self, image: str | Path | Image.Image | np.ndarray, max_pixels: int = MAX_PREPROCESSED_PIXELS
                         ) -> torch.Tensor | TiledImage:
        loaded = load_image(image)
        with naming(image):
            pixels, grid = self.config.image_processing(loaded, max_pixels)
        if self.config.family == "llava":
            return pixels
        tiles = self.config.image_processing.max_image_tiles
        return TiledImage(pixels, tile_arrangements(tiles).index(grid) + 1)  # padded to max_image_tiles in a batch

    def _largest_step(self, width: int, height: int) -> tuple[str, tuple[int, int]]:
        return self.config.image_processing.largest_step(width, height)

    def pad_batch(self, rows, pixel_values, padding_side: str = "right") -> dict[str, torch.Tensor]:
        flat = [image for row in pixel_values for image in row]
        batch = self.pad_rows(rows, padding_side)
        batch["image_counts"] = torch.tensor([len(row) for row in pixel_values], dtype=torch.long)
        h, w = self.config.image_processing.output_size
        if self.config.family == "llava":
            batch["pixel_values"] = torch.stack(flat) if flat else torch.zeros(0, 3, h, w)
            return batch
        tiles = self.config.image_processing.max_image_tiles
        batch["pixel_values"] = pad_tiles(flat, tiles) if flat else torch.zeros(0, tiles, 3, h, w)
        batch["aspect_ratio_ids"] = torch.tensor([t.aspect_ratio_id for t in flat], dtype=torch.long)
        return batch

    # --- persistence ---------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with written_whole(directory / TOKENIZER_NAME) as partial:
            self.tokenizer.save(str(partial))
        settings = {"kind": KIND, "pad_token_id": self.pad_token_id, **asdict(self.config)}
        write_json(directory / PROCESSOR_CONFIG_NAME, settings)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HubProcessor:
        directory = Path(directory)
        path = directory / PROCESSOR_CONFIG_NAME
        settings = read_json(path)
        settings.pop("kind", None)
        pad_token_id = settings.pop("pad_token_id", None)
        try:
            config = HubProcessorConfig(**settings)
        except TypeError as e:
            raise ConfigError(f"{path}: invalid processor settings ({e})") from None
        return cls(load_hf_tokenizer(directory / TOKENIZER_NAME), config, pad_token_id,
                   chat_template_file=path if config.chat_template is not None else None)


def hub_processor(directory: Path) -> HubProcessor | None:
    """The HubProcessor of a Hugging Face checkpoint directory or of one `tessera convert` wrote; None for a
    directory of tessera's own."""
    from tessera.interop.hub_files import is_hf_checkpoint

    if is_hf_checkpoint(directory):
        from tessera.interop.convert import hf_model_config

        return HubProcessor.from_hf_dir(directory, hf_model_config(directory)[1])
    try:
        settings = json.loads((directory / PROCESSOR_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no file or no JSON: not a hub processor's (tessera's own reading says why)
        return None
    return HubProcessor.from_pretrained(directory) if isinstance(settings, dict) and settings.get("kind") == KIND \
        else None


def check_fits_model(image_processing: ImageProcessing, model_config: ModelConfig, where: str) -> None:
    """The images (or tiles) must be the encoder's size, and as many tiles as it has positions for: the model reads
    a fixed number of image tokens per image, and other sizes would fill them with a part of the features."""
    vision = model_config.vision
    try:
        height, width = image_processing.output_size
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if (height, width) != (vision.image_size, vision.image_size):
        raise ConfigError(f"{where}: the image processor makes {width}x{height} images but config.json's "
                          f"vision_config.image_size={vision.image_size}; expected its size (and crop_size) to give "
                          f"{vision.image_size}x{vision.image_size}")
    if image_processing.kind == "tiles" and image_processing.max_image_tiles != vision.max_num_tiles:
        raise ConfigError(f"{where}: max_image_tiles={image_processing.max_image_tiles} but config.json's "
                          f"vision_config.max_num_tiles={vision.max_num_tiles}; expected them to agree")


def load_hf_tokenizer(path: Path) -> Tokenizer:
    return load_tokenizer(path, required_tokens=())


def find_chat_template(directory: Path, processor_config: dict[str, Any], tokenizer_config: dict[str, Any]
                       ) -> tuple[str | None, Path | None]:
    """The template and the file it came from, in transformers' order for a processor: processor_config.json's
    "chat_template", chat_template.json, chat_template.jinja; then the tokenizer's (tokenizer_config.json). Named
    templates: the "default" one."""
    legacy = read_json(directory / "chat_template.json", required=False)
    jinja = directory / "chat_template.jinja"
    candidates = [
        (processor_config.get("chat_template"), directory / PROCESSOR_CONFIG_NAME),
        (legacy.get("chat_template") if legacy else None, directory / "chat_template.json"),
        (jinja.read_text(encoding="utf-8") if jinja.is_file() else None, jinja),
        (tokenizer_config.get("chat_template"), directory / "tokenizer_config.json"),
    ]
    for template, source in candidates:
        if isinstance(template, list):  # [{"name": …, "template": …}, …]
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str) and template:
            return template, source
    return None, None


def _token_text(token: Any) -> str:
    """tokenizer_config.json writes a special token as a string or as {"content": …, …}."""
    return token.get("content") if isinstance(token, dict) else token


def template_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """What transformers' tokenizer.special_tokens_map gives a chat template: every `*_token` entry holding a
    token (bos, eos, unk, sep, pad, cls, mask and model-specific ones such as image_token) and the named
    extra_special_tokens."""
    def is_token(value: Any) -> bool:
        return isinstance(_token_text(value), str)

    tokens = {key: _token_text(value) for key, value in tokenizer_config.items()
              if key.endswith("_token") and is_token(value)}
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens.update({key: _token_text(value) for key, value in extra.items() if is_token(value)})
    return tokens


def _template_content(message: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The message content a template sees (image parts as {"type": "image"}) and the images it carries."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"message {message!r}: expected an object with 'role' and 'content'")
    content = message["content"]
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise DataError(f"{message['role']} message content {content!r}: expected a string or a list of parts")
    parts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            source = image_part_source(part)
            if source is not None:
                images.append(source)
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise DataError(f"message part {part!r}: expected {{'type': 'text', 'text': …}} or {{'type': 'image'}}")
    return parts, images


def _answer_spans(text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Without {% generation %} tags: each assistant message's text where it appears in the rendered prompt."""
    return [span for index, _, span in _located_pieces(text, messages)
            if span is not None and messages[index]["role"] == "assistant"]


def _joined_texts(messages: list[dict[str, Any]]) -> dict[int, str]:
    """Each message's text parts joined (a template may write them back to back), by message index."""
    joined: dict[int, str] = {}
    for index, _, piece in _text_parts(messages):
        joined[index] = joined.get(index, "") + piece
    return joined


def _text_parts(messages: list[dict[str, Any]]) -> Iterator[tuple[int, int, str]]:
    """(message index, part index, text) for every non-empty text of the messages, in order (part 0 for a string
    content)."""
    for index, message in enumerate(messages):
        content = message["content"]
        pieces = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
        yield from ((index, part, piece) for part, piece in enumerate(pieces) if piece)


def _first_outside(text: str, token: str, spans: list[tuple[int, int]]) -> int:
    """Where `token` first occurs in `text` outside the spans, or -1."""
    at = text.find(token)
    while at >= 0 and any(a <= at < b for a, b in spans):
        at = text.find(token, at + 1)
    return at


def _located_pieces(text: str, messages: list[dict[str, Any]]) -> Iterator[tuple[int, str, tuple[int, int] | None]]:
    """(message index, text, its character span in the rendered prompt or None) for every message text.

    Each text part is looked for on its own, after the previous one: a template writes parts with separators (and
    image tokens) between them, so their concatenation is often not in the prompt; had the search not moved past
    such a message, an answer word that also occurs in the question would have been found there. A piece not
    found verbatim is looked for without its surrounding whitespace, which many templates trim (Llama 3's)."""
    cursor = 0
    for index, _, piece in _text_parts(messages):
        at = text.find(piece, cursor)
        if at < 0 and piece.strip():
            piece = piece.strip()
            at = text.find(piece, cursor)
        if at < 0:
            yield index, piece, None
            continue
        yield index, piece, (at, at + len(piece))
        cursor = at + len(piece)
