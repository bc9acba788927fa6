"""The OpenAI chat-completions wire format: the error object, the request schema and its validation into a tessera
prompt, and the response and stream-chunk bodies.

Everything here is pure: no I/O, no model. A request that cannot be served raises `APIError`, whose body is the
OpenAI error object `{"error": {"message", "type", "param", "code"}}` (`code` is the HTTP status, as vLLM sends it,
unless the error has a code of its own such as OpenAI's "model_not_found").
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tessera.errors import DataError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "unavailable_error"}
MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status if self.code is None else self.code}}


# --- the request schema --------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "5" is not an integer and true is not a number; a misspelt key inside a part is an error, not ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _an_object(cls, value: Any) -> Any:
        if isinstance(value, str):  # pydantic's own message named the class behind it, ImageURL
            raise ValueError('expected an object {"url": "data:image/…;base64,…"}, not the URL string itself')
        return value


class RefusalPart(_Strict):
    """What an OpenAI model said instead of answering: an assistant message echoed back may hold one."""
    type: Literal["refusal"]
    refusal: str


Part = Annotated[TextPart | ImagePart | RefusalPart, Field(discriminator="type")]


class Message(BaseModel):
    # extra keys ignored: clients echo back assistant messages with refusal/tool_calls/annotations set to null
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None  # null: an assistant message echoed back whose answer was a refusal
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_or_parts(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError("expected a string or a list of content parts ({'type': 'text'|'image_url', …})")
        return value


class StreamOptions(_Strict):
    include_usage: bool | None = None  # null: the default (false)


class ChatCompletionRequest(BaseModel):
    # extra top-level keys that do not change the answer (user, metadata, store, …) are tolerated, as vLLM does;
    # the ones that would, and that we cannot honour (_NEUTRAL), are refused by _refuse_unsupported
    model_config = ConfigDict(strict=True, extra="allow")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 and 0 switch it off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    # null means the default, as for every optional OpenAI field (the openai client sends None as null)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate exactly max_tokens tokens

    @field_validator("stop", mode="before")
    @classmethod
    def _string_or_strings(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError("expected a string or a list of strings")
        return value


# Fields that change the answer; each is accepted only at its neutral value (never silently ignored). Clients
# written for vLLM or SGLang send their extensions expecting them to be honoured.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    # OpenAI's
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "best_of": (None, 1), "echo": (None, False),
    "web_search_options": (None,),
    # vLLM's sampling extensions
    "repetition_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0), "min_tokens": (None, 0),
    "stop_token_ids": (None, []), "allowed_token_ids": (None,), "bad_words": (None, []),
    "logits_processors": (None, []), "include_stop_str_in_output": (None, False), "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0), "truncate_prompt_tokens": (None,), "skip_special_tokens": (None, True),
    "prompt_logprobs": (None,),
    # vLLM's guided decoding
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structural_tag": (None,), "structured_outputs": (None,),
    # vLLM's prompt building
    "continue_final_message": (None, False), "add_generation_prompt": (None, True), "add_special_tokens": (None, False),
    "chat_template": (None,), "chat_template_kwargs": (None, {}), "documents": (None,),
    "mm_processor_kwargs": (None, {}),
    # SGLang's
    "min_new_tokens": (None, 0), "no_stop_trim": (None, False), "regex": (None,), "ebnf": (None,),
    "json_schema": (None,), "lora_path": (None,),
}


@dataclass
class ChatRequest:
    """A validated request: tessera chat messages with `{"type": "image"}` where each image goes, and the image
    URLs (with the request field that holds each) in the same order."""

    messages: list[dict[str, Any]]
    image_urls: list[tuple[str, str]]  # (param, url)
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    n: int
    stream: bool
    include_usage: bool

    def sampling(self, choice: int, max_new_tokens: int) -> dict[str, Any]:
        """The generation settings of one choice (choice i of a seeded request samples with seed + i)."""
        seed = None if self.seed is None else (self.seed + choice) % 2 ** 64
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": seed, "stop_strings": self.stop,
                "eos_token_id": [] if self.ignore_eos else None}


def unknown_model(model_id: str, served_model: str) -> APIError:
    """OpenAI's 404 for a model id the server does not serve (GET /v1/models/{id} and chat completions alike), with
    the id it does serve: a default id is the checkpoint path, which a client can hardly guess."""
    return APIError(404, f"The model '{model_id}' does not exist; this server serves '{served_model}'", "model",
                    type="invalid_request_error", code="model_not_found")


def parse_chat_request(body: Any, served_model: str, max_images: int, max_choices: int) -> ChatRequest:
    """The JSON body of POST /v1/chat/completions → ChatRequest, or APIError (400, or 404 for another model).

    The image count is checked here, before any image is fetched or decoded."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body is a JSON {type(body).__name__}; expected a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise _schema_error(e) from None
    _refuse_unsupported(request.model_extra or {})
    if request.model is not None and request.model != served_model:
        raise unknown_model(request.model, served_model)
    n, stream = request.n or 1, bool(request.stream)
    if n > max_choices:
        raise APIError(400, f"n={n}: at most {max_choices} choices per request (the server's --max-batch)", "n")
    if request.stream_options is not None and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop={list(stop)!r}: expected at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    messages, image_urls = _tessera_messages(request.messages)
    if len(image_urls) > max_images:
        raise APIError(400, f"At most {max_images} image(s) may be provided in one prompt. "
                            f"Set `--max-images-per-prompt` to increase this limit.", "messages")
    return ChatRequest(
        messages=messages, image_urls=image_urls,
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p, top_k=max(request.top_k or 0, 0),
        seed=request.seed, stop=stop, ignore_eos=bool(request.ignore_eos), n=n, stream=stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


def _refuse_unsupported(extra: dict[str, Any]) -> None:
    for name, value in extra.items():
        if name in _NEUTRAL and not any(_same(value, neutral) for neutral in _NEUTRAL[name]):
            raise APIError(400, f"{name}={json.dumps(value)[:60]} is not supported by this server; leave it out or "
                                f"set it to {json.dumps(_NEUTRAL[name][-1])}", name)


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality: true is not 1 (Python's == says it is), so repetition_penalty=true is not the neutral 1."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _tessera_messages(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages → tessera messages whose `{"type": "image"}` parts mark where each image goes."""
    out, image_urls = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None and message.role != "assistant":
            raise APIError(400, f"messages[{i}].content: null is only allowed in assistant messages; expected a "
                                f"string or a list of content parts", f"messages[{i}].content")
        if message.content is None or isinstance(message.content, str):
            content = message.content or ""
            _check_text(content, f"messages[{i}].content")
            out.append({"role": role, "content": content})
            continue
        parts = []
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if isinstance(part, RefusalPart) and message.role != "assistant":
                raise APIError(400, f"{param}: refusal parts are only allowed in assistant messages, not "
                                    f"{message.role} messages", param)
            if isinstance(part, (TextPart, RefusalPart)):  # a refusal is what the assistant said
                text = part.text if isinstance(part, TextPart) else part.refusal
                _check_text(text, f"{param}.{part.type}")
                parts.append({"type": "text", "text": text})
            elif message.role != "user":
                raise APIError(400, f"{param}: image_url parts are only allowed in user messages, not "
                                    f"{message.role} messages", param)
            else:
                parts.append({"type": "image"})
                image_urls.append((f"{param}.image_url.url", part.image_url.url))
        out.append({"role": role, "content": parts})
    return out, image_urls


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape parses to a lone surrogate, which no tokenizer takes
        raise APIError(400, f"{param}: the text is not valid Unicode ({text[e.start]!r} at character {e.start} is a "
                            f"lone surrogate); expected UTF-8 text", param) from None


def _refuse_image_tokens(messages: list[dict[str, Any]], processor) -> None:
    """The image token typed as text ("<image>" for tessera's, "<|image|>" for Llama 3.2 Vision) would stand for
    an image that was never sent: refused here, as a 400 for this request alone. Every other special token typed
    is read as the characters it is (see `MessageTextEncoder`)."""
    image = processor.image_token
    for i, message in enumerate(messages):
        content = message["content"]
        texts = [(f"messages[{i}].content", content)] if isinstance(content, str) else [
            (f"messages[{i}].content[{j}].text", part["text"]) for j, part in enumerate(content)
            if part["type"] == "text"]
        for param, text in texts:
            if image in text:
                raise APIError(400, f"{param} contains the image token {image!r}, which stands for an image; send "
                                    f"images as image_url parts, not as text", param)


def _refuse_text_too_long_to_fit(messages: list[dict[str, Any]], processor, context_length: int) -> None:
    """Text that cannot fit the context whatever its tokens, refused before it is tokenized: a request body may
    hold 32 MB of text, which took the tokenizer minutes and gigabytes (on a thread other requests need too)."""
    most = _characters_per_token_at_most(processor.tokenizer)
    if most is None:
        return
    characters = sum(len(content) if isinstance(content, str) else
                     sum(len(part["text"]) for part in content if part["type"] == "text")
                     for content in (message["content"] for message in messages))
    if characters > context_length * most:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, your "
                            f"messages hold {characters} characters, more than {context_length} tokens of this "
                            f"tokenizer can (at most {most} characters a token). Please reduce the length of the "
                            f"messages.", "messages")


# Normalizers that keep every character, or merge at most 3 into one (Unicode composition: Hangul jamo)
_KEEPING_NORMALIZERS = {"NFD": 1, "NFKD": 1, "Lowercase": 1, "Prepend": 1, "NFC": 3, "NFKC": 3}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


@functools.lru_cache(maxsize=8)
def _characters_per_token_at_most(tokenizer) -> int | None:
    """The most characters of a text one token can stand for, or None when no bound holds. A token stands for no
    more characters than its vocabulary entry has — when every character reaches the vocabulary: through a
    byte-level BPE (GPT-2, Llama 3, tessera's: an entry has one character per byte, and a character is at least one
    byte) or a SentencePiece one (Llama 2, Mistral), times what a composing normalizer merges. A normalizer that
    collapses runs of spaces (T5's), a pre-tokenizer that drops whitespace (BERT's), or an unknown kind: None."""
    config = json.loads(tokenizer.to_str())
    merged = 1

    def keeps(node, kinds) -> bool:
        nonlocal merged
        if node is None:
            return True
        kind = node.get("type")
        if kind == "Sequence":
            return all(keeps(child, kinds) for child in node.get("normalizers", node.get("pretokenizers", [])))
        if kind == "Replace":  # Llama 2's " " → "▁": a string by one at least as long
            pattern = node.get("pattern", {}).get("String")
            return pattern is not None and len(node.get("content", "")) >= len(pattern) > 0
        if kind not in kinds or node.get("behavior") == "Removed":
            return False
        if isinstance(kinds, dict):
            merged *= kinds[kind]
        return True

    if not (keeps(config.get("normalizer"), _KEEPING_NORMALIZERS)
            and keeps(config.get("pre_tokenizer"), _KEEPING_PRE_TOKENIZERS)):
        return None
    return merged * max(map(len, tokenizer.get_vocab()), default=1)


def _schema_error(error: ValidationError) -> APIError:
    """The most specific schema error (the deepest field), with its field named as `messages[0].content[1].text`."""
    detail = max(error.errors(), key=lambda e: len(e["loc"]))
    param = _param(detail["loc"])
    message = detail["msg"].removeprefix("Value error, ")
    if detail["type"] in ("model_type", "model_attributes_type"):  # not "… or instance of Message": our class names
        message = "Input should be a JSON object"
    value = detail.get("input")
    if detail["type"] != "missing" and isinstance(value, (str, int, float, bool)):
        message += f" (got {value!r:.60})"
    return APIError(400, f"{param}: {message}" if param else message, param or None)


_UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: Sequence[str | int]) -> str:
    """Pydantic's error location without its union-branch labels: ('messages', 0, 'content',
    'list[tagged-union[…]]', 1, 'image_url', 'image_url', 'url') → 'messages[0].content[1].image_url.url'."""
    out, tag_follows_index, skip_tag = "", False, False
    for segment in loc:
        if isinstance(segment, int):
            out += f"[{segment}]"
            skip_tag, tag_follows_index = tag_follows_index, False
        elif "[" in segment or segment in _UNION_BRANCHES:
            tag_follows_index = tag_follows_index or "tagged-union" in segment
        elif skip_tag:  # a discriminated union puts the tag ('text', 'image_url') after the list index
            skip_tag = False
        else:
            out += f".{segment}" if out else segment
    return out


# --- the prompt ----------------------------------------------------------------------------------------------------
def encode_prompt(request: ChatRequest, processor, context_length: int) -> tuple[list[int], int]:
    """The prompt's token ids (image placeholders expanded) and max_new_tokens, checked against the context —
    before any image is decoded. max_tokens defaults to the rest of the context.

    What would fail later, in the model, is refused here as a 400 for this request alone (not a 500 for its whole
    batch): the image token typed as text, a chat template refusing the conversation, a prompt whose image tokens
    do not match its images."""
    _refuse_image_tokens(request.messages, processor)
    _refuse_text_too_long_to_fit(request.messages, processor, context_length)
    try:
        ids, _, _ = processor.encode(request.messages, add_generation_prompt=True, labels=False)
    except DataError as e:  # e.g. a template's raise_exception("Conversation roles must alternate …")
        raise APIError(400, str(e), "messages") from None
    image_tokens, per_image = ids.count(processor.image_token_id), processor.config.image_seq_length
    if image_tokens != len(request.image_urls) * per_image:
        raise APIError(400, f"the chat template put {image_tokens // per_image} image placeholder(s) in the prompt "
                            f"for {len(request.image_urls)} image_url part(s); expected one for each", "messages")
    prompt = len(ids)
    if prompt >= context_length:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, your "
                            f"messages resulted in {prompt} tokens (including {len(request.image_urls)} image(s)). "
                            f"Please reduce the length of the messages.", "messages")
    max_new = request.max_tokens if request.max_tokens is not None else context_length - prompt
    if prompt + max_new > context_length:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, you requested "
                            f"{prompt + max_new} tokens ({prompt} in the messages, {max_new} in the completion). "
                            f"Please reduce the length of the messages or completion.", "max_tokens")
    return ids, max_new


# --- responses -----------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Completion:
    """What identifies one response and its chunks."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def response(self, texts: Sequence[str], reasons: Sequence[str], usage_counts: dict[str, int]) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons))]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_counts}

    def chunk(self, choices: list[dict], usage_counts: dict[str, int] | None = None,
              with_usage_field: bool = False) -> dict:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if with_usage_field:  # with include_usage every chunk carries "usage": null except the last
            body["usage"] = usage_counts
        return body


def choice_delta(index: int, delta: dict[str, str], finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
