"""`tessera serve`: the official openai client against a real uvicorn server on a loopback port, every bad request
and its error object, batching (concurrent = one at a time), disconnects, loading, file/remote image policies."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.server
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from tessera import ModelConfig, MultimodalLM, Processor, TextConfig, VisionConfig, train_tokenizer
from tessera.errors import ConfigError
from tessera.generation import SamplingParams, TokenChooser
import tessera.serve.app
from tessera.serve import ServeSettings, create_app
from tessera.serve.app import LOAD_FAILED, load_checkpoint
from tessera.serve.protocol import APIError, parse_chat_request

API_KEY = "sk-test-key"
MAX_IMAGES = 2
MAX_BATCH = 8
CORPUS = ["What colour is the square? The square is red.", "Describe the image. A blue circle on the left.",
          "How many shapes are there? There are three shapes.", "Is there a green triangle? Yes, at the top."]


# --- a tiny checkpoint and a real server ---------------------------------------------------------------------------
def make_checkpoint(directory: Path, fusion: str = "unified") -> Path:
    """Random weights (diverse answers per prompt) behind a real trained tokenizer; 1024 positions, so a long
    generation outlives a client that disconnects."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CORPUS * 20, vocab_size=300)
    config = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64),
        text=TextConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_position_embeddings=1024),
        fusion={"method": fusion, **({"cross_attention_layers": [1]} if fusion == "cross" else {})},
    )
    model = MultimodalLM(config)
    with torch.no_grad():  # louder image features (and open gates), so that the images steer the answers
        model.projector.linear_2.weight.mul_(8)
        for block in model.cross_attention.values():
            block.attn_gate.fill_(0.8)
            block.mlp_gate.fill_(0.8)
    model.save_pretrained(directory)
    Processor.for_model(config, tokenizer).save_pretrained(directory)
    return directory


@dataclass
class Server:
    url: str
    app: FastAPI

    @property
    def engine(self):
        return self.app.state.tessera["engine"]

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", API_KEY), max_retries=0,
                             timeout=60, **options)


@contextmanager
def running_server(settings: ServeSettings, loader=None, wait: bool = True):
    """uvicorn in a thread, on a socket bound to a free loopback port before the server starts (no port race)."""
    app = create_app(settings, loader)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        _until(lambda: server.started, "uvicorn to start")
        if wait:
            wait_until_healthy(url)
        yield Server(url, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_until_healthy(url: str, timeout: float = 60.0) -> None:
    def healthy():
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    _until(healthy, f"{url}/health to answer 200", timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "ck")


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    (root / "allowed").mkdir()
    Image.fromarray(_noise(20, 12, seed=3)).save(root / "allowed" / "a.png")
    Image.fromarray(_noise(20, 12, seed=4)).save(root / "secret.png")
    (root / "allowed" / "link.png").symlink_to(root / "secret.png")  # inside by name, outside in fact
    return root / "allowed"


@pytest.fixture(scope="module")
def server(checkpoint, allowed_dir):
    settings = ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny", api_key=API_KEY,
                             max_images_per_prompt=MAX_IMAGES, max_batch=MAX_BATCH,
                             allowed_local_dir=str(allowed_dir), max_body_bytes=2 ** 20)
    with running_server(settings) as s:
        yield s


@pytest.fixture(scope="module")
def reference(checkpoint):
    """What the model answers in-process (MultimodalLM.generate, no server) — the ground truth."""
    model, processor = load_checkpoint(checkpoint)

    def answer(messages, images=(), max_new_tokens=12, **options):
        batch = processor([messages], [list(images)], add_generation_prompt=True, padding_side="left")
        batch.pop("labels")
        return model.generate(**batch, max_new_tokens=max_new_tokens, tokenizer=processor, **options).texts[0]

    answer.processor = processor
    return answer


# --- images --------------------------------------------------------------------------------------------------------
def _noise(width: int, height: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()


def png_bytes(seed: int, size=(24, 18)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(*size, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def bomb_png(width: int, height: int) -> bytes:
    """A real decompression bomb: a grayscale PNG of width x height zero pixels, a few kB compressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\x00" * ((width + 1) * height), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# --- the happy paths, through the official client ------------------------------------------------------------------
def test_health_models_and_page(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == 1024
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for path in "/health", "/":  # load balancers and uptime probes may ask with HEAD
        assert httpx.head(f"{server.url}{path}").status_code == 200
    assert "tessera playground" in page.text


def test_retrieve_a_model_by_id(server):
    """GET /v1/models/{id} (the openai client's models.retrieve) gives the list's entry, and OpenAI's 404 for an
    id the server does not serve."""
    client = server.client()
    assert client.models.retrieve("tiny").model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4o")
    assert error.value.code == "model_not_found" and error.value.param == "model"
    for unknown in "gpt-4o", "tiny/extra":
        assert_error(httpx.get(f"{server.url}/v1/models/{unknown}", headers=_auth()), 404, "model",
                     f"The model '{unknown}' does not exist; this server serves 'tiny'", "invalid_request_error",
                     "model_not_found")
    assert_error(httpx.get(f"{server.url}/v1/models/tiny"), 401)
    # a chat completion for another model gets the same 404
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert error.value.code == "model_not_found" and error.value.param == "model"
    assert_error(_post(server, _chat(model="gpt-4o")), 404, "model",
                 "The model 'gpt-4o' does not exist; this server serves 'tiny'", "invalid_request_error",
                 "model_not_found")


def test_the_default_model_id_is_the_checkpoint_path_without_a_trailing_slash(checkpoint):
    """`--checkpoint ck/` (shell completion adds the slash) served the id "ck/", and a request for "ck" got a 404
    that did not say which id would do."""
    assert ServeSettings(checkpoint="/").model_name == "/"
    assert ServeSettings(checkpoint="ck/", served_model_name="m/").model_name == "m/"  # as the operator chose
    with running_server(ServeSettings(checkpoint=f"{checkpoint}/", api_key=API_KEY)) as s:
        client = s.client()
        assert [m.id for m in client.models.list().data] == [str(checkpoint)]
        assert client.chat.completions.create(model=str(checkpoint), messages=user(text("hi")), max_tokens=2).choices
        assert_error(_post(s, _chat(model=f"{checkpoint}/")), 404, "model",
                     f"The model '{checkpoint}/' does not exist; this server serves '{checkpoint}'",
                     "invalid_request_error", "model_not_found")


def test_text_completion_matches_the_model_and_counts_usage(server, reference):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour?"}]
    result = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-") and result.model == "tiny"
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == reference(messages)
    prompt_ids, _, _ = reference.processor.encode(messages, add_generation_prompt=True)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= result.usage.completion_tokens <= 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_special_tokens_typed_in_a_message_are_answered_as_text(server, reference):
    """A role or end token pasted into a message is text to the model (it could otherwise end the user's turn and
    write the assistant's), not a refusal."""
    messages = [{"role": "user", "content": "What does <|end|><|assistant|> mean?"}]
    result = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert result.choices[0].message.content == reference(messages)
    prompt_ids, _, _ = reference.processor.encode(messages, add_generation_prompt=True)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert prompt_ids.count(reference.processor.end_token_id) == 1  # the template's own, closing the turn


def test_streaming_gives_the_same_text_in_openai_chunks(server):
    client = server.client()
    messages = user(text("Describe the image."), image_part(data_url(png_bytes(1))))
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # the raw wire format: only `data:` events, ending with [DONE]
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True}
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=_auth())
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_images_are_placed_where_their_parts_are(server, reference):
    client = server.client()
    a, b = png_bytes(1), png_bytes(2, size=(40, 30))
    one = user(image_part(data_url(a)), text("What colour is the square?"))
    result = client.chat.completions.create(model="tiny", messages=one, max_tokens=12, temperature=0)
    expected = reference(user({"type": "image"}, text("What colour is the square?")), [pil(a)])
    assert result.choices[0].message.content == expected
    # the prompt is the training form: the image's tokens, a new line, the question
    written, _, _ = reference.processor.encode([reference.processor.user_message("What colour is the square?", 1)], True)
    assert result.usage.prompt_tokens == len(written)

    two = user(text("Compare"), image_part(data_url(a)), text("with"), image_part(data_url(b)))
    swapped = user(text("Compare"), image_part(data_url(b)), text("with"), image_part(data_url(a)))
    answers = [client.chat.completions.create(model="tiny", messages=m, max_tokens=12, temperature=0)
               .choices[0].message.content for m in (two, swapped)]
    tessera_two = user(text("Compare"), {"type": "image"}, text("with"), {"type": "image"})
    assert answers == [reference(tessera_two, [pil(a), pil(b)]), reference(tessera_two, [pil(b), pil(a)])]
    other = client.chat.completions.create(model="tiny", messages=user(image_part(data_url(b)), one[0]["content"][1]),
                                           max_tokens=12, temperature=0)
    assert other.choices[0].message.content != result.choices[0].message.content  # the image is seen


def test_part_order_binds_the_images():
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [text("Compare"), image_part("data:image/png;base64,QQ=="),
                                                      text("with"), image_part("data:image/gif;base64,Qg==")]}]}
    request = parse_chat_request(body, "tiny", max_images=2, max_choices=1)
    assert request.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [text("Compare"), {"type": "image"}, text("with"),
                                                             {"type": "image"}]}]
    assert request.image_urls == [("messages[1].content[1].image_url.url", "data:image/png;base64,QQ=="),
                                  ("messages[1].content[3].image_url.url", "data:image/gif;base64,Qg==")]


def test_assistant_messages_echoed_back_from_openai_are_taken():
    """OpenAI answers a refusal as content null beside a refusal field, or as a refusal part: a client that sends the
    conversation back must not get a 400. A refusal is what the assistant said; null content is an empty answer.
    Elsewhere both stay refused, and stream_options' include_usage may be null (the default), like every option."""
    refused = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    as_part = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}, text(" Sorry.")]}
    body = {"messages": [{"role": "user", "content": "Hi"}, refused, {"role": "user", "content": "Why?"}, as_part,
                         {"role": "user", "content": "OK"}], "stream": True, "stream_options": {"include_usage": None}}
    request = parse_chat_request(body, "tiny", max_images=2, max_choices=1)
    assert request.messages[1] == {"role": "assistant", "content": ""}
    assert request.messages[3] == {"role": "assistant", "content": [text("I can't."), text(" Sorry.")]}
    assert request.include_usage is False
    for message, param in [({"role": "user", "content": None}, "messages[0].content"),
                           ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]},
                            "messages[0].content[0]")]:
        with pytest.raises(APIError) as caught:
            parse_chat_request({"messages": [message]}, "tiny", max_images=2, max_choices=1)
        assert caught.value.status == 400 and caught.value.param == param and "assistant" in caught.value.message
    # where an object was expected, the message names none of tessera's own classes (Message, StreamOptions)
    for body, expected in [({"messages": ["hi"]}, "messages[0]: Input should be a JSON object (got 'hi')"),
                           ({"messages": [{"role": "user", "content": ["a"]}]},
                            "messages[0].content[0]: Input should be a JSON object (got 'a')"),
                           ({"messages": [{"role": "user", "content": "x"}], "stream_options": True},
                            "stream_options: Input should be a JSON object (got True)")]:
        with pytest.raises(APIError) as caught:
            parse_chat_request(body, "tiny", max_images=2, max_choices=1)
        assert caught.value.status == 400 and caught.value.message == expected


def test_text_too_long_for_the_context_whatever_its_tokens_is_refused_before_it_is_tokenized(reference,
                                                                                            monkeypatch):
    """A body may hold 32 MB of text, which took the tokenizer minutes and gigabytes: text with more characters than
    the context's tokens could hold (at the vocabulary's longest entry each, twice over) is refused without a look at
    its tokens. Text below that bound is tokenized and counted as before."""
    from tessera.serve.protocol import _characters_per_token_at_most, encode_prompt

    processor = reference.processor
    bound = 1024 * _characters_per_token_at_most(processor.tokenizer)
    encode = processor.encode
    monkeypatch.setattr(processor, "encode", lambda *a, **k: pytest.fail("tokenized"))
    for content in ["a" * (bound + 1), [text("a" * (bound // 2)), text("b" * (bound // 2 + 1))]]:
        request = parse_chat_request({"messages": [{"role": "user", "content": content}]}, "tiny", 2, 1)
        with pytest.raises(APIError, match="maximum context length is 1024 tokens.*hold") as caught:
            encode_prompt(request, processor, 1024)
        assert caught.value.status == 400 and caught.value.param == "messages"
    monkeypatch.setattr(processor, "encode", encode)
    request = parse_chat_request({"messages": [{"role": "user", "content": "a" * bound}]}, "tiny", 2, 1)
    with pytest.raises(APIError, match="your messages resulted in [0-9]+ tokens"):  # tokenized: too long all the same
        encode_prompt(request, processor, 1024)


def test_the_characters_a_token_can_stand_for_are_bounded_only_where_no_character_is_dropped():
    """A normalizer that collapses runs of spaces (T5's) or a pre-tokenizer that drops whitespace (BERT's) makes 100K
    characters a handful of tokens: no bound there. Unicode composition merges up to 3 characters into one."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    from tessera.serve.protocol import _characters_per_token_at_most

    def made(normalizer=None, pre_tokenizer=None):
        tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "abcd": 1}, merges=[]))
        if normalizer is not None:
            tokenizer.normalizer = normalizer
        if pre_tokenizer is not None:
            tokenizer.pre_tokenizer = pre_tokenizer
        return _characters_per_token_at_most(tokenizer)

    assert made(pre_tokenizer=pre_tokenizers.ByteLevel()) == 4
    assert made(normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])) == 4  # Llama 2
    assert made(normalizers.NFKC(), pre_tokenizers.Metaspace()) == 12
    assert made(normalizers.Replace(Regex(" {2,}"), " ")) is None  # T5, ALBERT
    assert made(pre_tokenizer=pre_tokenizers.Whitespace()) is None  # BERT
    assert made(normalizers.Replace("ab", "")) is None


def test_local_file_urls_inside_the_allowed_dir(server, allowed_dir):
    client = server.client()
    as_file = user(image_part((allowed_dir / "a.png").as_uri()), text("What colour?"))
    as_data = user(image_part(data_url((allowed_dir / "a.png").read_bytes())), text("What colour?"))
    answers = [client.chat.completions.create(model="tiny", messages=m, max_tokens=8, temperature=0)
               .choices[0].message.content for m in (as_file, as_data)]
    assert answers[0] == answers[1]


def test_stop_strings_end_the_answer_and_are_excluded(server, reference):
    client = server.client()
    messages = [{"role": "user", "content": "How many shapes are there?"}]
    free = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    start = next(i for i in range(3, len(free) - 2) if "\ufffd" not in free[i:i + 2])
    stop = free[start:start + 2]
    expected = free[:free.index(stop)]
    for stream in (False, True):
        response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                  stop=[stop, "never-generated"], stream=stream,
                                                  extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in response if c.choices]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            content, reason = response.choices[0].message.content, response.choices[0].finish_reason
        assert (content, reason) == (expected, "stop"), f"stream={stream}"


def test_max_completion_tokens_wins_and_ignore_eos_fills_it(server):
    result = server.client().chat.completions.create(model="tiny", messages=user(text("Hi")), max_tokens=3,
                                                     max_completion_tokens=7, temperature=0,
                                                     extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 7 and result.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible_and_n_gives_choices(server):
    client = server.client()

    def sample(seed, n=1):
        result = client.chat.completions.create(model="tiny", messages=user(text("Describe the image.")),
                                                max_tokens=16, temperature=1.0, top_p=0.95, seed=seed, n=n,
                                                extra_body={"ignore_eos": True})
        return [c.message.content for c in result.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    three = sample(7, n=3)
    assert len(three) == 3 and three[0] == sample(7)[0] and len(set(three)) == 3  # choice i samples with seed + i
    assert three == sample(7, n=3)


def test_null_means_the_default(server):
    """The openai client sends a None argument as null: n, stream and ignore_eos then take their defaults."""
    client = server.client()
    plain = client.chat.completions.create(model="tiny", messages=user(text("Hi")), max_tokens=4, temperature=0)
    nulls = client.chat.completions.create(model="tiny", messages=user(text("Hi")), max_tokens=4, temperature=0,
                                           n=None, stream=None, stream_options=None, extra_body={"ignore_eos": None})
    assert len(nulls.choices) == 1 and nulls.choices[0].message.content == plain.choices[0].message.content
    assert nulls.usage.completion_tokens == plain.usage.completion_tokens


# --- bad requests --------------------------------------------------------------------------------------------------
def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def _one_image(url: str) -> dict:
    return _chat(messages=user(text("What is it?"), image_part(url)))


PNG = png_bytes(5)
URL = "messages[0].content[1].image_url.url"
BAD_REQUESTS = [
    # (id, body: dict | bytes, status, param, words in the message)
    ("malformed JSON", b'{"messages": [', 400, None, "not valid JSON"),
    ("NaN, which JSON does not have", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     None, "NaN is not a JSON value"),
    ("not an object", b"[1, 2]", 400, None, "expected a JSON object"),
    ("messages missing", {"model": "tiny"}, 400, "messages", "Field required"),
    ("messages empty", _chat(messages=[]), 400, "messages", "at least 1"),
    ("max_tokens a string", _chat(max_tokens="5"), 400, "max_tokens", "valid integer"),
    ("max_tokens a bool", _chat(max_tokens=True), 400, "max_tokens", "valid integer"),
    ("max_tokens zero", _chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    ("max_tokens negative", _chat(max_tokens=-3), 400, "max_tokens", "greater than or equal to 1"),
    ("max_completion_tokens zero", _chat(max_completion_tokens=0), 400, "max_completion_tokens",
     "greater than or equal to 1"),
    ("temperature too high", _chat(temperature=3), 400, "temperature", "less than or equal to 2"),
    ("top_p zero", _chat(top_p=0), 400, "top_p", "greater than 0"),
    ("content a number", _chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     "a string or a list of content parts"),
    ("unknown role", _chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role", "'user'"),
    ("unknown part type", _chat(messages=user({"type": "input_audio", "input_audio": {}})), 400,
     "messages[0].content[0]", "'text', 'image_url'"),
    ("unknown key in a part", _chat(messages=user({"type": "text", "text": "a", "txt": "b"})), 400,
     "messages[0].content[0].txt", "Extra inputs"),
    ("image_url without url", _chat(messages=user(text("a"), {"type": "image_url", "image_url": {"uri": "x"}})),
     400, "messages[0].content[1].image_url.url", "Field required"),
    ("text part not a string", _chat(messages=user({"type": "text", "text": 3})), 400,
     "messages[0].content[0].text", "valid string"),
    ("stop not strings", _chat(stop=[1]), 400, "stop[0]", "valid string"),
    ("too many stop strings", _chat(stop=list("abcde")), 400, "stop", "at most 4"),
    ("empty stop string", _chat(stop=""), 400, "stop", "non-empty"),
    ("unsupported logprobs", _chat(logprobs=True), 400, "logprobs", "not supported"),
    ("unsupported tools", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
     "not supported"),
    *[(f"vLLM's {name}", _chat(**{name: value}), 400, name, f"{name}={json.dumps(value)} is not supported")
      for name, value in [("repetition_penalty", 5.0), ("repetition_penalty", True), ("min_p", 0.99),
                          ("min_tokens", 12), ("stop_token_ids", [5, 6]), ("allowed_token_ids", [10]),
                          ("bad_words", ["red"]), ("guided_choice", ["red", "blue"]),
                          ("structured_outputs", {"choice": ["red"]}), ("include_stop_str_in_output", True),
                          ("use_beam_search", True), ("length_penalty", 2.0), ("truncate_prompt_tokens", 2),
                          ("skip_special_tokens", False), ("prompt_logprobs", 1), ("continue_final_message", True),
                          ("add_generation_prompt", False), ("chat_template_kwargs", {"enable_thinking": True}),
                          ("min_new_tokens", 3)]],
    ("stream_options without stream", _chat(stream_options={"include_usage": True}), 400, "stream_options",
     "only allowed when stream is true"),
    ("n above max batch", _chat(n=MAX_BATCH + 1), 400, "n", f"at most {MAX_BATCH}"),
    ("image token in text", _chat(messages=user(text("<image> what?"))), 400, "messages[0].content[0].text",
     "messages[0].content[0].text contains the image token '<image>', which stands for an image; send images as "
     "image_url parts, not as text"),
    ("image in an assistant message", _chat(messages=[{"role": "assistant", "content": [image_part(data_url(PNG))]}]),
     400, "messages[0].content[0]", "only allowed in user messages"),
    ("invalid base64", _one_image("data:image/png;base64,!!not*base64!!"), 400, URL, "invalid base64"),
    ("truncated base64", _one_image(data_url(PNG)[:-3]), 400, URL, "invalid base64"),
    ("base64 with line breaks", _one_image("data:image/png;base64," + base64.encodebytes(PNG).decode()), 400, URL,
     "no line breaks"),
    ("truncated image", _one_image(data_url(PNG[:len(PNG) // 2])), 400, URL, "not a decodable image"),
    ("bytes that are not an image", _one_image(data_url(b"hello, world! " * 10)), 400, URL,
     "the bytes are not an image format PIL reads (PNG, JPEG, WebP, GIF, …)"),
    ("data URL of text", _one_image(data_url(b"hello", "text/plain")), 400, URL, "expected image/"),
    ("data URL not base64", _one_image("data:image/png,rawbytes"), 400, URL, "Only base64 data URLs"),
    ("too many pixels", _one_image(data_url(bomb_png(5000, 5000))), 400, URL, "at most 16777216 are allowed"),
    ("decompression bomb past PIL's guard", _one_image(data_url(bomb_png(20000, 20000))), 400, URL,
     "decompression bomb"),
    ("too many images", _chat(messages=user(*[image_part(data_url(PNG))] * 3)), 400, "messages",
     "At most 2 image(s) may be provided in one prompt."),
    ("too many images, checked before decoding", _chat(messages=user(*[image_part("data:image/png;base64,!!")] * 3)),
     400, "messages", "At most 2 image(s) may be provided in one prompt."),
    ("prompt longer than the context", _chat(messages=[{"role": "user", "content": "zq " * 1500}], max_tokens=None),
     400, "messages", "maximum context length is 1024 tokens"),
    ("prompt + max_tokens longer than the context", _chat(max_tokens=1020), 400, "max_tokens",
     "maximum context length is 1024 tokens"),
    ("ftp URL", _one_image("ftp://example.com/a.png"), 400, URL, "unsupported image URL scheme ftp:"),
    ("remote URL while remote images are off", _one_image("http://127.0.0.1:9/a.png"), 400, URL,
     "remote image URLs are disabled"),
    ("local file outside the allowed dir", "secret", 400, URL, "outside the allowed local directory"),
    ("local file escaping with ..", "escape", 400, URL, "outside the allowed local directory"),
    ("local symlink leading outside", "link", 400, URL, "link.png is outside the allowed local directory"),
    ("local file URL with a host", _one_image("file://example.com/a.png"), 400, URL, "expected file:///"),
    ("local file URL with a NUL byte", "nul", 400, URL, "the file URL's path contains a NUL byte (%00)"),
    ("local file name too long", "long", 400, URL, "(File name too long)"),
    ("local file URL naming a directory", "directory", 400, URL, "is a directory; expected an image file"),
    ("image_url as the URL string itself", _chat(messages=user(text("What is it?"), {"type": "image_url",
                                                                                    "image_url": "data:image/png"})),
     400, "messages[0].content[1].image_url", 'expected an object {"url": '),
    ("lone surrogate in text", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}', 400,
     "messages[0].content", "messages[0].content: the text is not valid Unicode ('\\ud800' at character 3 is a "
                            "lone surrogate)"),
    ("lone surrogate in a text part", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": '
                                      b'"\\udfff"}]}]}', 400, "messages[0].content[0].text", "lone surrogate"),
    ("deeply nested body", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None,
     "the request body is nested too deeply to parse"),
]


def _post(server, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(_auth() if headers is None else headers)})


def assert_error(response: httpx.Response, status: int, param=None, words: str = "", type: str | None = None,
                 code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == (code or status)
    assert error["type"] == (type or {400: "invalid_request_error", 401: "authentication_error",
                                      404: "not_found_error", 405: "invalid_request_error",
                                      413: "invalid_request_error", 500: "server_error",
                                      503: "unavailable_error"}[status])
    assert error["param"] == param and words in error["message"], error
    return error


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_error_object(server, allowed_dir, case):
    _, body, status, param, words = case
    if body == "secret":
        body = _one_image((allowed_dir.parent / "secret.png").as_uri())
    elif body == "escape":
        body = _one_image(f"file://{allowed_dir}/../secret.png")
    elif body == "nul":
        body = _one_image(f"file://{allowed_dir}/a%00.png")
    elif body == "long":
        body = _one_image(f"file://{allowed_dir}/{'a' * 300}.png")
    elif body == "link":
        body = _one_image((allowed_dir / "link.png").as_uri())
    elif body == "directory":
        body = _one_image(allowed_dir.as_uri() + "/")
    error = assert_error(_post(server, body), status, param, words)
    if case[1] == "link":
        assert "secret" not in error["message"]  # where a symlink leads is not the client's to learn


def test_auth_size_and_routing_errors(server):
    assert_error(_post(server, _chat(), headers={}), 401)
    assert_error(_post(server, _chat(), headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{server.url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model="tiny", messages=user(text("hi")))
    assert_error(_post(server, b'{"messages": "' + b"x" * 2 ** 20 + b'"}'), 413, None, "larger than")
    assert_error(httpx.get(f"{server.url}/v1/nothing", headers=_auth()), 404)
    assert_error(httpx.get(f"{server.url}/v1/chat/completions", headers=_auth()), 405)
    with pytest.raises(openai.BadRequestError, match=r"\(s\) may be provided in one prompt"):
        server.client().chat.completions.create(model="tiny", messages=user(*[image_part(data_url(PNG))] * 3))


def test_an_image_preprocessing_would_blow_up_is_refused_from_its_header(checkpoint, tmp_path):
    """The pixel limit holds for what preprocessing builds too: padding (LLaVA's do_pad, tessera's "pad" mode) or a
    shortest-edge resize turns a thin strip of a few kB into gigabytes. Refused from the header, before decoding."""
    padding = tmp_path / "pad"
    shutil.copytree(checkpoint, padding)
    settings_path = padding / "processor_config.json"
    settings_path.write_text(json.dumps({**json.loads(settings_path.read_text()), "resize_mode": "pad"}))
    with running_server(ServeSettings(checkpoint=str(padding), served_model_name="tiny",
                                      max_image_pixels=64 * 64)) as s:
        words = ("the image is 65x1; padding it to a square would make it 65x65 = 4225 pixels, more than the 4096 "
                 "allowed; expected a smaller or less elongated image")
        assert_error(_post(s, _one_image(data_url(png_bytes(1, size=(65, 1))))), 400, URL, f"{URL}: {words}")
        header_only = bomb_png(65, 1)[:41]  # the signature, IHDR and the start of IDAT: no pixel data at all
        assert_error(_post(s, _one_image(data_url(header_only))), 400, URL, words)
        with pytest.raises(openai.BadRequestError, match="padding it to a square"):
            s.client().chat.completions.create(model="tiny", messages=user(image_part(data_url(bomb_png(1, 65)))))
        answer = s.client().chat.completions.create(model="tiny", max_tokens=2,
                                                    messages=user(image_part(data_url(png_bytes(2, (64, 9))))))
        assert answer.choices[0].finish_reason in ("stop", "length")


def test_sampling_extensions_at_their_neutral_values_and_harmless_extras_are_accepted(server):
    """vLLM's extensions are refused only when they would change the answer; what does not (user, metadata,
    store, …) is ignored, as before."""
    client = server.client()
    plain = client.chat.completions.create(model="tiny", messages=user(text("What colour?")), max_tokens=6,
                                           temperature=0)
    neutral = client.chat.completions.create(
        model="tiny", messages=user(text("What colour?")), max_tokens=6, temperature=0, user="someone",
        metadata={"team": "a"}, store=False, frequency_penalty=0,
        extra_body={"repetition_penalty": 1.0, "min_p": 0, "min_tokens": 0, "stop_token_ids": [],
                    "skip_special_tokens": True, "add_generation_prompt": True, "continue_final_message": False,
                    "include_stop_str_in_output": False, "guided_choice": None, "priority": 3})
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match=r"repetition_penalty=1.3 is not supported by this server; "
                                                     r"leave it out or set it to 1.0"):
        client.chat.completions.create(model="tiny", messages=user(text("hi")), extra_body={"repetition_penalty": 1.3})


def test_server_survives_every_bad_request(server):
    """After the whole list above (run here again, concurrently), the server still answers."""
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda case: _post(server, case[1]).status_code,
                                 [c for c in BAD_REQUESTS if not isinstance(c[1], str)]))
    assert all(s in (400, 404) for s in statuses)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.client().chat.completions.create(model="tiny", messages=user(text("hi")), max_tokens=2).choices


# --- batching ------------------------------------------------------------------------------------------------------
def test_per_row_sampling_equals_each_row_alone():
    """The generation change behind batching: each row keeps its own settings and seeded stream."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5),
            SamplingParams(temperature=0.7, top_p=0.8, top_k=10, seed=9)]
    together = TokenChooser(rows, 3, torch.device("cpu"), 50)
    alone = [TokenChooser(p, 1, torch.device("cpu"), 50) for p in rows]
    picks = [together(logits.clone()).tolist() for _ in range(20)]
    assert picks == [[alone[i](logits[i:i + 1].clone()).item() for i in range(3)] for _ in range(20)]
    assert {p[0] for p in picks} == {int(logits[0].argmax())} and len({p[1] for p in picks}) > 1
    with pytest.raises(ValueError, match="one per row"):
        TokenChooser(rows, 2, torch.device("cpu"), 50)


def test_a_tiny_temperature_decodes_greedily():
    """logits / 1e-40 overflows float32: sampling then met inf and NaN and failed. Below 1e-5 decoding is greedy."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1)) * 10
    for temperature in (1e-40, 5e-324, 1e-6):
        rows = [SamplingParams(temperature=temperature, seed=3), SamplingParams(temperature=temperature, top_p=0.5)]
        assert TokenChooser(rows, 2, torch.device("cpu"), 50)(logits.clone()).tolist() == logits.argmax(-1).tolist()


def test_a_tiny_temperature_answers_as_greedy_through_the_server(server):
    client = server.client()
    answers = [client.chat.completions.create(model="tiny", messages=user(text("What colour?")), max_tokens=8,
                                              temperature=t, seed=1).choices[0].message.content for t in (0, 1e-40)]
    assert answers[0] == answers[1]


def _mixed_requests() -> list[dict]:
    """16 requests of different lengths, images, limits and sampling settings."""
    requests = []
    for i in range(16):
        parts = [text(CORPUS[i % 4][: 10 + 3 * i])]
        for k in range(i % 3):
            parts.insert(k, image_part(data_url(png_bytes(100 + i * 3 + k))))
        options = {"temperature": 0} if i % 4 else {"temperature": 0.9, "top_p": 0.9, "seed": i}
        requests.append({"messages": user(*parts), "max_tokens": 4 + i % 9, **options})
    return requests


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_concurrent_requests_equal_one_at_a_time(fusion, checkpoint, tmp_path):
    directory = checkpoint if fusion == "unified" else make_checkpoint(tmp_path / "cross", "cross")
    settings = ServeSettings(checkpoint=str(directory), max_batch=MAX_BATCH, max_images_per_prompt=MAX_IMAGES)
    with running_server(settings) as s:
        client = s.client()

        def ask(request):
            result = client.chat.completions.create(model=str(directory), **request)
            return result.choices[0].message.content, result.choices[0].finish_reason, result.usage.completion_tokens

        requests = _mixed_requests()
        one_at_a_time = [ask(r) for r in requests]
        assert s.engine.stats["largest_batch"] == 1
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(ask, requests))
        assert together == one_at_a_time
        assert s.engine.stats["largest_batch"] > 1  # they really shared forward passes
        assert len({answer for answer, _, _ in one_at_a_time}) > 8


def test_a_job_that_fails_fails_alone_and_its_batch_mates_stay_batched(checkpoint, reference):
    """A failing prefill is split in halves that run again (bisection), so a request that cannot be generated (here:
    an image tensor of the wrong size) gets its 500 alone, the requests prefilled with it get the answers they get
    alone (prefilled in groups of 1 + 2 + 3 rows, not 6 one at a time, then decoded together), and every row is
    counted once."""
    import asyncio

    from tessera.serve.engine import Engine, Failed, Job

    model, processor = load_checkpoint(checkpoint)
    engine = Engine(model, processor, max_batch=8)  # started once every job waits, so that they share a batch
    params = [model.sampling_params(max_new_tokens=6, temperature=0)]
    questions = [[{"role": "user", "content": CORPUS[i % 4][:12 + i]}] for i in range(7)]
    runs = []  # (rows, outcome) of every run of the model

    def spy(batch, prefill=engine._prefill_batch):
        if not runs:  # the client of the last job leaves while the first run fails: it is not run again
            batch[-1].cancel()
        try:
            prefilled = prefill(batch)
        except Exception:
            runs.append((len(batch), "failed"))
            raise
        runs.append((len(batch), "ok"))
        return prefilled

    engine._prefill_batch = spy

    async def outcome(job: Job):
        answer = ""
        while True:
            event = await asyncio.wait_for(job.events.get(), 60)
            if isinstance(event, Failed):
                return event.error.status, event.error.message
            answer += event.text
            if event.finish_reason:
                return 200, answer

    async def run():
        image_ids = processor.encode(user({"type": "image"}, text("What colour?")), add_generation_prompt=True)[0]
        bad = Job("bad", image_ids, [torch.zeros(3, 5, 5)], params)
        good = [Job(f"good{i}", processor.encode(q, add_generation_prompt=True)[0], [], params)
                for i, q in enumerate(questions)]
        for job in (bad, *good):
            engine.submit(job)
        engine.start()
        return await outcome(bad), [await outcome(job) for job in good[:-1]]

    try:
        (bad_status, error), answers = asyncio.run(run())
    finally:
        engine.stop()
    assert bad_status == 500 and error.startswith("generation failed: ")
    assert answers == [(200, reference(q, max_new_tokens=6)) for q in questions[:-1]]
    assert runs == [(8, "failed"), (4, "failed"), (2, "failed"), (1, "failed"), (1, "ok"), (2, "ok"), (3, "ok")]
    assert engine.stats == {"prefills": 1, "rows": 8, "largest_batch": 6, "retries": 6, "failed_runs": 4,
                            "failed_rows": 1, "cancelled_rows": 1, "steps": 5}  # 6 tokens: 5 decode steps
    reasons = {job_id: reason for job_id, _, reason, _ in engine.finished}
    assert len(engine.finished) == 8 and reasons["bad"] == "failed" and reasons["good6"] == "cancelled"


# --- disconnects, loading, the command ----------------------------------------------------------------------------
def test_a_client_that_disconnects_frees_its_rows_and_the_loop_stays_free(server):
    body = _chat(max_tokens=900, temperature=0, stream=True, ignore_eos=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        for line in r.iter_lines():
            chunk = json.loads(line.removeprefix("data: ")) if line.startswith("data: {") else None
            if chunk and chunk["choices"][0]["delta"].get("content"):
                job_id = chunk["id"]
                break
    # the stream is closed: the worker stops decoding that row long before its 900 tokens
    _until(lambda: any(f[0] == job_id for f in server.engine.finished), "the cancelled row to be released")
    [(_, _, reason, tokens)] = [f for f in server.engine.finished if f[0] == job_id]
    assert reason == "cancelled" and tokens < 900

    # a non-streaming client that hangs up is released too
    cancelled = server.engine.stats["cancelled_rows"]
    rows = server.engine.stats["rows"]
    payload = json.dumps(_chat(max_tokens=900, temperature=0, ignore_eos=True)).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        _until(lambda: server.engine.stats["rows"] > rows, "the request to be scheduled")
        # while the model works on it, the event loop still answers others
        assert httpx.get(f"{server.url}/health").status_code == 200
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # no response yet: it is still being generated
    _until(lambda: server.engine.stats["cancelled_rows"] > cancelled, "the hung-up request to be released")
    assert server.client().chat.completions.create(model="tiny", messages=user(text("hi")), max_tokens=2).choices


def test_health_is_503_while_loading_then_200(checkpoint):
    gate = threading.Event()

    def slow_loader():
        gate.wait(30)
        return load_checkpoint(checkpoint)

    with running_server(ServeSettings(checkpoint=str(checkpoint)), slow_loader, wait=False) as s:
        assert_error(httpx.get(f"{s.url}/health"), 503, None, "loading")
        assert_error(_post(s, _chat(model=None)), 503)
        gate.set()
        wait_until_healthy(s.url)
        assert s.client().chat.completions.create(model=str(checkpoint), messages=user(text("hi")),
                                                  max_tokens=2).choices

    def broken_loader():
        raise OSError("disk on fire")

    with running_server(ServeSettings(checkpoint=str(checkpoint)), broken_loader, wait=False) as s:
        _until(lambda: "disk on fire" in httpx.get(f"{s.url}/health").text, "the load failure to be reported")
        # a failed load is permanent: its own error type tells clients to stop waiting
        for response in httpx.get(f"{s.url}/health"), _post(s, _chat(model=None)):
            assert_error(response, 503, None, "loading the model failed: OSError: disk on fire", LOAD_FAILED)


class _ImageHost(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []  # every path asked for, in order
    release = threading.Event()  # /slow.png answers once it is set

    def do_GET(self):
        self.paths.append(self.path)
        if self.path == "/slow.png":
            self.release.wait(timeout=60)
            self.path = "/a.png"
        if self.path == "/a.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "/a.png")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host():
    """A local HTTP server with /a.png (PNG), /slow.png (the same, once _ImageHost.release is set), /moved.png (a
    redirect to it) and 404 for the rest: its base URL."""
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    _ImageHost.paths.clear()
    _ImageHost.release.clear()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    _ImageHost.release.set()
    host.shutdown()


def _with_remote_timeout(monkeypatch, seconds: float) -> None:
    policy = ServeSettings.image_policy
    monkeypatch.setattr(ServeSettings, "image_policy",
                        lambda self: dataclasses.replace(policy(self), remote_timeout=seconds))


def test_requests_do_not_wait_for_other_requests_slow_image_hosts(checkpoint, image_host, monkeypatch):
    """Remote images are fetched on the event loop. Fetched in threads, six requests whose image host was slow
    took every thread of asyncio's pool (six on two cores), and a text-only request waited for them."""
    _with_remote_timeout(monkeypatch, 60)
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny",
                                      allowed_image_hosts=["127.0.0.1"])) as s, ThreadPoolExecutor(8) as pool:
        greedy = {"temperature": 0, "max_tokens": 4}
        slow = [pool.submit(_post, s, {**_one_image(f"{image_host}/slow.png"), **greedy}) for _ in range(8)]
        _until(lambda: _ImageHost.paths.count("/slow.png") == 8, "the eight slow fetches to be under way")
        quick = _post(s, _chat(messages=user(text("Hello")), max_tokens=2))
        assert quick.status_code == 200 and not any(f.done() for f in slow)  # it did not wait for them
        _ImageHost.release.set()
        by_data = _post(s, {**_one_image(data_url(PNG)), **greedy}).json()["choices"][0]["message"]["content"]
        assert all(f.result().json()["choices"][0]["message"]["content"] == by_data for f in slow)


def test_an_image_fetch_is_given_up_at_the_remote_timeout(checkpoint, image_host, monkeypatch):
    _with_remote_timeout(monkeypatch, 0.5)
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny",
                                      allowed_image_hosts=["127.0.0.1"])) as s:
        assert_error(_post(s, _one_image(f"{image_host}/slow.png")), 400, URL, "took longer than 0.5 s")


def _answers_as_from_data(server: Server, url: str) -> None:
    """The image fetched from `url` gives the same greedy answer as the same PNG sent as a data URL."""
    client = server.client()
    by_url, by_data = [client.chat.completions.create(model="tiny", messages=_one_image(u)["messages"], max_tokens=8,
                                                      temperature=0).choices[0].message.content
                       for u in (url, data_url(PNG))]
    assert by_url == by_data


def test_remote_images_only_when_allowed(checkpoint, image_host):
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny",
                                      allow_remote_images=True)) as s:
        _answers_as_from_data(s, f"{image_host}/a.png")
        assert_error(_post(s, _one_image(f"{image_host}/moved.png")), 400, URL, "redirects are not followed")
        assert_error(_post(s, _one_image(f"{image_host}/missing.png")), 400, URL, "HTTP 404")
        assert_error(_post(s, _one_image("file:///etc/hostname")), 400, URL,
                     "Cannot load local files without `--allowed-local-dir`.")


def test_allowed_image_hosts_limit_where_images_come_from(checkpoint, image_host):
    url = f"{image_host}/a.png"
    # listing a host is enough to allow remote images from it, and from it alone
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny",
                                      allowed_image_hosts=["127.0.0.1", "Images.Example.com"])) as s:
        _answers_as_from_data(s, url)
        assert_error(_post(s, _one_image(url.replace("127.0.0.1", "localhost"))), 400, URL,
                     "images from localhost are not allowed on this server; allowed hosts: 127.0.0.1, "
                     "images.example.com")
    _ImageHost.paths.clear()
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny",
                                      allow_remote_images=True, allowed_image_hosts=["images.example.com"])) as s:
        assert_error(_post(s, _one_image(url)), 400, URL, "images from 127.0.0.1 are not allowed")
    assert _ImageHost.paths == []  # refused before any request left the server


@pytest.mark.parametrize("url, allowed", [
    ("http://127.0.0.1@evil.invalid/a.png", False),  # user info, not the host
    ("http://evil.invalid#@127.0.0.1/a.png", False),
    ("http://evil.invalid?@127.0.0.1/a.png", False),
    ("http://xn--bcher-kva.invalid/a.png", False),
    ("http://LOCALHOST.:9/a.png", True),  # case, a trailing dot and the port do not matter
])
def test_the_image_host_check_reads_the_host_the_request_goes_to(url, allowed):
    from tessera.serve.images import image_bytes

    policy = ServeSettings(checkpoint="unused", allowed_image_hosts=["127.0.0.1", "localhost"]).image_policy()
    with pytest.raises(APIError) as error:  # an allowed URL is fetched, and nothing listens on port 9
        asyncio.run(image_bytes(url, policy, URL))
    assert ("are not allowed on this server" in error.value.message) == (not allowed), error.value.message
    with pytest.raises(APIError, match="is not a valid URL"):  # a 400, not a server error
        asyncio.run(image_bytes("http://127.0.0.1:port/a.png", policy, URL))


def test_allowed_hosts_compare_in_idna_form():
    from tessera.serve.images import bare_host, request_host

    assert bare_host("Bücher.Example") == request_host(httpx.URL("http://xn--bcher-kva.example/")) \
        == request_host(httpx.URL("http://bücher.example./a.png"))


@pytest.mark.parametrize("host", ["http://images.example.com", "images.example.com:443", "example.com/images", "",
                                  "a b", "::1"])
def test_an_allowed_image_host_must_be_a_host_name(checkpoint, host):
    settings = ServeSettings(checkpoint=str(checkpoint), allowed_image_hosts=["example.org", host])
    with pytest.raises(ConfigError, match=f"--allowed-image-hosts: {re.escape(repr(host))} is not a host name"):
        settings.check()
    ServeSettings(checkpoint=str(checkpoint), allowed_image_hosts=["example.org", "10.0.0.5", "[::1]"]).check()


def test_the_allowed_local_dir_must_be_a_directory(checkpoint, allowed_dir):
    """A file given as --allowed-local-dir was said to be "no such directory"."""
    for path, problem in (allowed_dir / "a.png", "not a directory"), (allowed_dir / "nowhere", "no such directory"):
        with pytest.raises(ConfigError, match=re.escape(f"--allowed-local-dir {path}: {problem}")):
            ServeSettings(checkpoint=str(checkpoint), allowed_local_dir=str(path)).check()
    ServeSettings(checkpoint=str(checkpoint), allowed_local_dir=str(allowed_dir)).check()


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_the_prefill_chunk_must_be_a_whole_number_of_tokens_or_zero(checkpoint, value):
    with pytest.raises(ConfigError, match=re.escape(f"--prefill-chunk {value!r}: expected an integer >= 0")):
        ServeSettings(checkpoint=str(checkpoint), prefill_chunk=value).check()
    ServeSettings(checkpoint=str(checkpoint), prefill_chunk=0).check()  # off: prompts prefilled in one go


@pytest.mark.parametrize("value, words", [
    (0, "--max-image-pixels 0: expected an integer >= 1"), (-5, "--max-image-pixels -5: expected an integer >= 1"),
    (True, "--max-image-pixels True: expected an integer >= 1"),
    ("4096", "--max-image-pixels '4096': expected an integer >= 1"),
    (2 * Image.MAX_IMAGE_PIXELS + 1, f"expected at most {2 * Image.MAX_IMAGE_PIXELS} (PIL refuses larger images"),
])
def test_the_image_pixel_limit_must_be_a_positive_integer_pil_can_reach(checkpoint, value, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ServeSettings(checkpoint=str(checkpoint), max_image_pixels=value).check()
    ServeSettings(checkpoint=str(checkpoint), max_image_pixels=2 * Image.MAX_IMAGE_PIXELS).check()


APP_ORIGIN = "https://app.example.com"


def _preflight(server: Server, origin: str) -> httpx.Response:
    """What a browser sends before a cross-origin POST with an API key."""
    return httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_is_off_unless_origins_are_given(server):
    assert_error(_preflight(server, APP_ORIGIN), 405)
    response = _post(server, _chat(), headers={**_auth(), "Origin": APP_ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_cors_origins_may_call_the_api_from_a_browser(checkpoint):
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny", api_key=API_KEY,
                                      cors_origins=[APP_ORIGIN, "http://localhost:3000"])) as s:
        preflight = _preflight(s, APP_ORIGIN)  # answered without the API key, which a preflight never carries
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert {"authorization", "content-type"} <= set(preflight.headers["access-control-allow-headers"].split(", "))
        answer = _post(s, _chat(), headers={**_auth(), "Origin": APP_ORIGIN})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == APP_ORIGIN
        # an error too, so that the page can read its message
        refused = _post(s, _chat(max_tokens=0), headers={**_auth(), "Origin": "http://localhost:3000"})
        assert_error(refused, 400, "max_tokens")
        assert refused.headers["access-control-allow-origin"] == "http://localhost:3000"
        # another origin is not let in
        assert _preflight(s, "https://evil.example.com").status_code == 400
        other = _post(s, _chat(), headers={**_auth(), "Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in other.headers
        assert_error(_post(s, _chat(), headers={"Origin": APP_ORIGIN}), 401)  # and the key is still required
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny",
                                      cors_origins=["*"])) as s:
        assert _preflight(s, "https://anywhere.example").headers["access-control-allow-origin"] == "*"
        answer = httpx.get(f"{s.url}/v1/models", headers={"Origin": "https://anywhere.example"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"


def test_a_server_bug_is_answered_with_a_500_a_page_can_read(checkpoint, monkeypatch, caplog):
    """An unhandled exception is OpenAI's 500 error object, logged with its traceback, and carries the CORS
    header (Starlette's own catch-all answers outside the CORS middleware, so a page saw a network error)."""
    def bug(*args):
        raise KeyError("a bug")
    monkeypatch.setattr(tessera.serve.app, "prepare", bug)
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny",
                                      cors_origins=[APP_ORIGIN])) as s:
        # uvicorn sets its logger up as it starts, not to propagate
        monkeypatch.setattr(tessera.serve.app.log, "handlers", [caplog.handler])
        response = _post(s, _chat(), headers={"Origin": APP_ORIGIN})
        assert_error(response, 500, words="internal server error: KeyError")
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert _post(s, _chat(), headers={"Origin": "https://evil.example.com"}).headers.get(
            "access-control-allow-origin") is None
    assert "unhandled error on POST /v1/chat/completions" in caplog.text and "KeyError: 'a bug'" in caplog.text


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "https://App.example.com",
                                    "ftp://example.com", "https://example.com/app", "https://user@example.com",
                                    "http://localhost:port", ""])
def test_a_cors_origin_must_be_one_as_browsers_send_it(checkpoint, origin):
    with pytest.raises(ConfigError, match=f"--cors-origin {re.escape(repr(origin))}: expected \\* or an origin"):
        ServeSettings(checkpoint=str(checkpoint), cors_origins=["*", origin]).check()
    ServeSettings(checkpoint=str(checkpoint), cors_origins=["*", "http://localhost:3000", "http://[::1]:8080",
                                                            APP_ORIGIN]).check()


TESSERA = shutil.which("tessera", path=os.path.dirname(sys.executable)) or "tessera"


def test_tessera_serve_command(checkpoint, tmp_path):
    bad = subprocess.run([TESSERA, "serve", "--checkpoint", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "not a checkpoint directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([TESSERA, "serve", "--checkpoint", str(checkpoint), "--allowed-image-hosts",
                          "images.example.com, x.com:80"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'x.com:80' is not a host name" in bad.stderr  # the list's spaces are fine
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([TESSERA, "serve", "--checkpoint", str(checkpoint), "--max-image-pixels", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "tessera serve: error: --max-image-pixels 0: expected an integer >= 1"

    # a port in use, or none such: one line at once, before the model loads (uvicorn's late exit aborted the process)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bad = subprocess.run([TESSERA, "serve", "--checkpoint", str(checkpoint), "--port",
                              str(taken.getsockname()[1])], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot listen there" in bad.stderr and "loading" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([TESSERA, "serve", "--checkpoint", str(checkpoint), "--port", "99999"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "tessera serve: error: --port 99999: expected a port number in 0..65535"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([TESSERA, "serve", "--checkpoint", str(checkpoint), "--port", str(port),
                                "--api-key", API_KEY, "--max-batch", "2", "--max-image-pixels", "4096",
                                "--cors-origin", "http://localhost:3000", "--cors-origin", APP_ORIGIN],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout=120)
        client = Server(f"http://127.0.0.1:{port}", None).client()
        assert client.models.list().data[0].id == str(checkpoint)
        for origin in "http://localhost:3000", APP_ORIGIN:  # --cors-origin is repeatable
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={**_auth(), "Origin": origin})
            assert models.headers["access-control-allow-origin"] == origin
        # the default id is a path: the client sends its slashes as %2F
        assert client.models.retrieve(str(checkpoint)).id == str(checkpoint)
        result = client.chat.completions.create(model=str(checkpoint), max_tokens=4, temperature=0,
                                                messages=_one_image(data_url(PNG))["messages"])
        assert result.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="65x64 = 4160 pixels; at most 4096 are allowed"):
            client.chat.completions.create(model=str(checkpoint), max_tokens=1,
                                           messages=_one_image(data_url(png_bytes(1, (65, 64))))["messages"])
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "model" in output and "ready" in output
    assert f"listening on http://127.0.0.1:{port}" in output  # uvicorn names no address when handed the socket


def test_a_second_server_on_a_port_is_refused_when_it_binds_even_while_the_first_still_loads():
    """Bound but not yet listening (uvicorn listens after its startup, which loads the model), two sockets with
    SO_REUSEADDR may share a port on Linux: the second server then failed late. Each is listening once bound."""
    from tessera.serve.app import listen

    first = listen("127.0.0.1", 0)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(ConfigError, match=f"--host 127.0.0.1 --port {port}: cannot listen there"):
            listen("127.0.0.1", port)
    finally:
        for s in first:
            s.close()
    with pytest.raises(ConfigError, match="--host no-such-host.invalid: cannot look it up"):
        listen("no-such-host.invalid", 0)
