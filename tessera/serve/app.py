"""The HTTP server: FastAPI routes for the playground page, /health, /v1/models (and /v1/models/{id}) and
/v1/chat/completions.

A thin layer: `protocol` validates requests and shapes responses, `images` loads image URLs, `engine` runs the
model on its own thread. The model loads in the background, so /health answers 503 until it is ready.

    tessera serve --checkpoint runs/quickstart/checkpoint --port 8000
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.checkpoint import CONFIG_NAME, load_dtype
from tessera.errors import CheckpointError, ConfigError, DataError, TesseraError
from tessera.serve.engine import Engine, Failed, Job
from tessera.serve.images import ImagePolicy, bare_host, decode_image, image_bytes
from tessera.serve.protocol import (APIError, ChatRequest, Completion, choice_delta, encode_prompt,
                                    parse_chat_request, unknown_model, usage)

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one, so our lines print beside its own
# the error type of the 503 for a model that failed to load (which is permanent); still loading is "unavailable_error"
LOAD_FAILED = "model_load_error"


@dataclass
class ServeSettings:
    checkpoint: str
    served_model_name: str | None = None  # the model id clients send; default: the checkpoint path, less a final /
    api_key: str | None = None
    max_images_per_prompt: int = 4
    max_batch: int = 8
    prefill_chunk: int = 512  # tokens of a newcomer's prompt per iteration while rows run (0: in one go)
    allowed_local_dir: str | None = None
    allow_remote_images: bool = False
    allowed_image_hosts: list[str] | None = None  # remote images from these hosts only (implies remote images)
    max_body_bytes: int = 32 * 2 ** 20
    max_image_pixels: int = 4096 * 4096
    threads: int | None = None  # torch's intra-op threads (process-wide, so only `serve` applies it)
    cors_origins: list[str] | None = None  # web pages on these origins ("*": any) may call the API; None: same origin
    dtype: str = "auto"  # weights in memory (see `load_checkpoint`)

    @property
    def model_name(self) -> str:
        # shell completion adds a slash to a directory, which no client would send back ("/" itself stays)
        return self.served_model_name or self.checkpoint.rstrip("/" + os.sep) or self.checkpoint

    def check(self) -> None:
        """Fail before the server starts, with one line naming the setting."""
        directory = Path(self.checkpoint)
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory}: not a checkpoint directory; expected one written by save_pretrained "
                                  f"({CONFIG_NAME} + model.safetensors + tokenizer.json)")
        if self.allowed_local_dir is not None and not Path(self.allowed_local_dir).is_dir():
            problem = "not a directory" if Path(self.allowed_local_dir).exists() else "no such directory"
            raise ConfigError(f"--allowed-local-dir {self.allowed_local_dir}: {problem}")
        load_dtype(self.dtype)  # a name it knows
        for flag, value, least in (("--max-batch", self.max_batch, 1), ("--threads", self.threads, 1),
                                   ("--prefill-chunk", self.prefill_chunk, 0),
                                   ("--max-images-per-prompt", self.max_images_per_prompt, 0),
                                   ("--max-image-pixels", self.max_image_pixels, 1)):
            if value is not None and (type(value) is not int or value < least):  # bool is an int subclass
                raise ConfigError(f"{flag} {value!r}: expected an integer >= {least}")
        # PIL refuses an image past twice its own limit before tessera's check sees it: a larger limit would not hold
        pil_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        if pil_limit is not None and self.max_image_pixels > pil_limit:
            raise ConfigError(f"--max-image-pixels {self.max_image_pixels}: expected at most {pil_limit} (PIL "
                              f"refuses larger images as decompression bombs)")
        for origin in self.cors_origins or ():
            if not is_origin(origin):
                raise ConfigError(f"--cors-origin {origin!r}: expected * or an origin as browsers send it: "
                                  f"http(s)://host[:port] in lower case, without path or trailing slash, e.g. "
                                  f"https://app.example.com or http://localhost:3000")
        for host in self.allowed_image_hosts or ():
            if bare_host(host) is None:
                raise ConfigError(f"--allowed-image-hosts: {host!r} is not a host name; expected names like "
                                  f"images.example.com, 10.0.0.5 or [::1], comma-separated, without scheme, port "
                                  f"or path")

    def image_policy(self) -> ImagePolicy:
        local = Path(self.allowed_local_dir) if self.allowed_local_dir else None
        hosts = frozenset(map(bare_host, self.allowed_image_hosts)) if self.allowed_image_hosts is not None else None
        return ImagePolicy(allowed_local_dir=local, allow_remote=self.allow_remote_images, allowed_hosts=hosts,
                           max_pixels=self.max_image_pixels)


def is_origin(text: str) -> bool:
    """`text` is "*" or an origin in the exact form browsers send (CORS compares the strings)."""
    if text == "*":
        return True
    try:
        parts = urlsplit(text)
        parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc \
        and text == f"{parts.scheme}://{parts.netloc}" and text == text.lower()


def load_checkpoint(directory: str | Path, dtype: str = "auto"):
    """(model, processor) of a tessera checkpoint or a Hugging Face directory, the weights in `dtype` (one of
    tessera.checkpoint.LOAD_DTYPES)."""
    from tessera.model import MultimodalLM
    from tessera.processor import Processor

    return MultimodalLM.from_pretrained(directory, dtype=dtype), Processor.from_pretrained(directory)


def check_chat_template(processor, checkpoint: str) -> None:
    """The server answers chat completions only, and a Hugging Face checkpoint's chat template builds their prompts
    (tessera's own processor has its format built in): without one, or with one that is not Jinja, the load fails.
    Found at the first request instead, /health said ok and every request was refused with a reason only the
    server's files could change."""
    from tessera.interop.chat_template import compile_template
    from tessera.interop.processor import HubProcessor

    if not isinstance(processor, HubProcessor):
        return
    if processor.config.chat_template is None:
        raise ConfigError(f"{checkpoint}: no chat template (chat_template.jinja, chat_template.json, or "
                          f"'chat_template' in processor_config.json or tokenizer_config.json); expected one, which "
                          f"builds the prompt of every chat completion")
    try:  # not Jinja: every request would be refused (400) for the checkpoint's fault, not the client's
        compile_template(processor.config.chat_template)
    except DataError as e:
        raise ConfigError(f"{processor.chat_template_file or checkpoint}: {e}") from None


def create_app(settings: ServeSettings, loader: Callable[[], tuple] | None = None) -> FastAPI:
    """The ASGI app. loader() returns (model, processor); by default it reads settings.checkpoint."""
    loader = loader or (lambda: load_checkpoint(settings.checkpoint, settings.dtype))
    name = settings.model_name
    policy = settings.image_policy()
    playground = (resources.files("tessera.serve") / "static" / "index.html").read_text(encoding="utf-8")
    started = int(time.time())
    state: dict[str, Engine | str | None] = {"engine": None, "error": None}

    def load() -> None:
        try:
            log.info("loading %s", settings.checkpoint)
            model, processor = loader()
            check_chat_template(processor, settings.checkpoint)
            state["engine"] = Engine(model, processor, settings.max_batch, max_images=settings.max_images_per_prompt,
                                     prefill_chunk=settings.prefill_chunk).start()
            log.info("model %r ready (max batch %d)", name, settings.max_batch)
        except Exception as e:  # the server stays up and /health reports why it cannot serve
            if isinstance(e, TesseraError):  # a checkpoint tessera refuses says why in one line; a fault, in full
                log.error("loading %s failed: %s", settings.checkpoint, e)
            else:
                log.exception("loading %s failed", settings.checkpoint)
            state["error"] = f"loading the model failed: {type(e).__name__}: {e}"

    # requests' tokenizing and image decoding (see prepare), as many at once as asyncio's default pool would run
    preparing = ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="tessera-prepare")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="tessera-load", daemon=True).start()
        yield
        if state["engine"] is not None:
            state["engine"].stop()
        preparing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tessera", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tessera = state  # tests read the engine and its statistics here
    app.add_middleware(InternalErrors)  # added first, so inside the CORS middleware: a 500 carries its header too
    if settings.cors_origins:
        # Starlette answers the browser's preflight OPTIONS here, before authorize() (a preflight carries no API
        # key), and adds Access-Control-Allow-Origin to responses, errors included, so that pages can read them.
        # No cookies are involved (the API key is a header), so credentials stay off.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    def ready() -> Engine:
        if state["error"] is not None:  # its own type, so clients (the playground) stop waiting for the model
            raise APIError(503, state["error"], type=LOAD_FAILED)
        if state["engine"] is None:
            raise APIError(503, "the model is still loading; retry when GET /health returns 200")
        return state["engine"]

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key; expected the header Authorization: Bearer <key>")

    # --- errors: every one is the OpenAI error object ------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code,
                            headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(error)).body(), status_code=400)

    # --- routes --------------------------------------------------------------------------------------------------
    # HEAD too: load balancers and uptime probes ask with it
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        ready()
        return JSONResponse({"status": "ok"})

    def model_card(engine: Engine) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "tessera",
                "max_model_len": engine.context_length}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card(ready())]})

    # :path because the default id is the checkpoint path: the openai client sends its slashes as %2F, which
    # arrive decoded
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        authorize(request)
        engine = ready()
        if model_id != name:  # OpenAI's answer for an unknown id
            raise unknown_model(model_id, name)
        return JSONResponse(model_card(engine))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        engine = ready()
        body = await read_json(request, settings.max_body_bytes)
        chat = parse_chat_request(body, name, settings.max_images_per_prompt, engine.max_batch)
        prompt_ids, pixel_values, max_new = await prepare(chat, engine, policy, preparing)
        completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", name)
        params = [engine.model.sampling_params(**chat.sampling(i, max_new)) for i in range(chat.n)]
        job = Job(completion.id, prompt_ids, pixel_values, params)
        engine.submit(job)
        if chat.stream:
            return StreamingResponse(stream_events(job, chat, completion, len(prompt_ids)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(job, chat, completion, len(prompt_ids), request)

    return app


class InternalErrors:
    """Answers an unhandled exception (a server bug) with OpenAI's 500 error object. Starlette's own catch-all
    (`exception_handler(Exception)`) answers outside every middleware, so its 500 carried no CORS header and a page
    on an allowed origin saw only a network error; this one sits inside the CORS middleware. A response already
    under way (a stream) cannot be replaced: its exception goes on to uvicorn, which closes the connection."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as error:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            body = APIError(500, f"internal server error: {type(error).__name__}").body()
            await JSONResponse(body, status_code=500)(scope, receive, send)


async def prepare(chat: ChatRequest, engine: Engine, policy: ImagePolicy, executor: Executor):
    """Prompt ids and max_new_tokens (checked against the context first), then the images, fetched (remote ones on
    the event loop), decoded and preprocessed once per request. What preprocessing builds is held to the same pixel
    limit as the images. Tokenizing and decoding are CPU work: in `executor`'s threads, off the event loop — not
    asyncio's default pool, where host name lookups wait (a slow DNS server had held up other requests' tokenizing)."""
    loop = asyncio.get_running_loop()
    processor = engine.processor
    prompt_ids, max_new = await loop.run_in_executor(executor, encode_prompt, chat, processor, engine.context_length)
    pixel_values = []
    for param, url in chat.image_urls:
        data = await image_bytes(url, policy, param, executor)
        pixel_values.append(await loop.run_in_executor(executor, preprocessed, data, processor, policy, param))
    return prompt_ids, pixel_values, max_new


def preprocessed(data: bytes, processor, policy: ImagePolicy, param: str):
    image = decode_image(data, policy.max_pixels, param,
                         lambda w, h: processor.check_image_size(w, h, policy.max_pixels))
    try:
        return processor.preprocess_image(image, policy.max_pixels)
    except DataError as e:
        raise APIError(400, f"{param}: {e}", param) from None


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing more than `limit` bytes without reading them all."""
    too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body, parse_constant=_not_json)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # thousands of nested arrays: the parser runs out of stack
        raise APIError(400, "the request body is nested too deeply to parse; expected a chat completion request") \
            from None


def _not_json(constant: str):
    """Python's json reads NaN, Infinity and -Infinity, which JSON has no such thing as (a temperature of NaN was
    then refused as out of range, "got nan")."""
    raise ValueError(f"{constant} is not a JSON value")


async def collect(job: Job, choices: int) -> tuple[list[str], list[str], int]:
    texts, reasons, tokens = [""] * choices, [None] * choices, 0
    while None in reasons:
        event = await job.events.get()
        if isinstance(event, Failed):
            raise event.error
        texts[event.choice] += event.text
        if event.finish_reason:
            reasons[event.choice] = event.finish_reason
            tokens += event.completion_tokens
    return texts, reasons, tokens


async def complete(job: Job, chat: ChatRequest, completion: Completion, prompt_tokens: int,
                   request: Request) -> Response:
    """The whole answer as one JSON response; if the client leaves first, its rows are freed."""
    answer = asyncio.ensure_future(collect(job, chat.n))
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        if answer not in done:
            return Response(status_code=499)  # nobody is listening
        texts, reasons, tokens = answer.result()
    finally:
        job.cancel()  # a no-op for a finished job
        answer.cancel()
        gone.cancel()
    return JSONResponse(completion.response(texts, reasons, usage(prompt_tokens, tokens)))


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream_events(job: Job, chat: ChatRequest, completion: Completion, prompt_tokens: int
                        ) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Starlette cancels this generator
    when the client disconnects; the finally clause then frees the job's rows."""

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        first = [choice_delta(i, {"role": "assistant", "content": ""}) for i in range(chat.n)]
        yield event(completion.chunk(first, None, chat.include_usage))
        open_choices, tokens = chat.n, 0
        while open_choices:
            item = await job.events.get()
            if isinstance(item, Failed):
                yield event(item.error.body())
                break
            delta = choice_delta(item.choice, {"content": item.text}, item.finish_reason)
            yield event(completion.chunk([delta], None, chat.include_usage))
            if item.finish_reason:
                open_choices -= 1
                tokens += item.completion_tokens
        else:
            if chat.include_usage:
                yield event(completion.chunk([], usage(prompt_tokens, tokens), True))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import torch
    import uvicorn

    settings.check()
    sockets = listen(host, port)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    config = uvicorn.Config(create_app(settings), log_level="info")  # (which sets uvicorn's logging up)
    for listening in sockets:  # uvicorn names the address only when it binds it itself
        address, bound_port = listening.getsockname()[:2]
        shown = f"[{address}]" if listening.family == socket.AF_INET6 else address
        log.info("tessera serve listening on http://%s:%d (Press CTRL+C to quit)", shown, bound_port)
    uvicorn.Server(config).run(sockets=sockets)


def listen(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, listening before the model loads: a port in use (or none such) is said at once, in one
    line. Bound by uvicorn, after its startup had begun loading the model, it failed late, and its exit aborted the
    process (the loading thread was still inside torch). One socket per address `host` resolves to, as asyncio binds
    them (an IPv6 one for IPv6 only)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number in 0..65535")
    try:
        addresses = dict.fromkeys((family, address) for family, _, _, _, address in
                                  socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                     flags=socket.AI_PASSIVE))
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot look it up ({e.strerror}); expected an address or a name of this "
                          f"machine") from None
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            listening = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(listening)
            if os.name != "nt":  # as uvicorn: a restart reuses the port (on Windows it would share a taken one)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listening.bind(address)
            listening.listen(2048)  # now: a second server on the port, bound but not yet listening, is refused
    except OSError as e:
        for listening in sockets:
            listening.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); expected a free "
                          f"port on an address of this machine") from None
    return sockets
