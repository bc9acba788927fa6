"""Image URLs of a chat request → decoded RGB images, under the server's policy.

`data:image/…;base64,…` always works; `file://` only inside --allowed-local-dir; `http(s)://` only with
--allow-remote-images (off by default, so the server cannot be used to make requests elsewhere) or from the hosts
of --allowed-image-hosts, without redirects (so an allowed host cannot send the server on elsewhere), with a
timeout and a size cap. Every image's pixel count, and the size the model's preprocessing would give it, are
checked from its header before it is decoded, so neither a decompression bomb nor a 4,000,000 x 1 strip that
padding or a shortest-edge resize would blow up to gigabytes is ever expanded. Every failure is an APIError 400
naming the request field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from tessera.errors import DataError
from tessera.serve.protocol import APIError
from tessera.vision.preprocess import to_rgb


@dataclass
class ImagePolicy:
    allowed_local_dir: Path | None = None
    allow_remote: bool = False
    allowed_hosts: frozenset[str] | None = None  # remote images from these hosts only (lower case); None: any
    max_bytes: int = 20 * 2 ** 20  # per image file or download
    max_pixels: int = 4096 * 4096  # per image, and per image its preprocessing builds (padded square, resize)
    remote_timeout: float = 5.0


def bare_host(text: str) -> str | None:
    """`text` as `request_host` gives it, or None unless `text` is a host alone (no scheme, port, path or user)."""
    import httpx

    try:
        parts = urlparse(f"//{text}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or port is not None or parts.path or parts.query or parts.fragment or "@" in text \
            or any(c.isspace() for c in text):
        return None
    try:
        return request_host(httpx.URL(f"http://{text}/"))
    except httpx.InvalidURL:
        return None


def request_host(url) -> str:
    """The host an httpx.URL connects to, compared as: lower case, IDNA (xn--) form, no trailing dot, IPv6 without
    brackets. The allow-list is checked on the URL httpx parsed, the one it fetches, so that no second URL parser
    can read another host out of a crafted URL."""
    return url.raw_host.decode("ascii").lower().rstrip(".")


SizeCheck = Callable[[int, int], None]  # (width, height) → None, or DataError when preprocessing would be too large


async def image_bytes(url: str, policy: ImagePolicy, param: str, executor: Executor | None = None) -> bytes:
    """The bytes at `url` (a request's image_url.url, found at `param`). A remote image is fetched on the event loop:
    no thread waits on a slow host (fetched in threads, six slow fetches had taken every thread of asyncio's pool and
    stalled the other requests' tokenizing); its host name is looked up in asyncio's default pool. A data URL is
    decoded, and a local file read, in `executor`'s threads (default: asyncio's)."""
    loop = asyncio.get_running_loop()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return await loop.run_in_executor(executor, _data_url_bytes, url, param)
    if scheme == "file":
        return await loop.run_in_executor(executor, _local_file_bytes, url, policy, param)
    if scheme in ("http", "https"):
        return await _remote_bytes(url, policy, param, executor)
    raise APIError(400, f"{param}: unsupported image URL scheme {scheme + ':' if scheme else repr(url[:40])}; "
                        f"expected a data:image/…;base64 URL (file:// and http(s):// only when the server "
                        f"allows them)", param)


def decode_image(data: bytes, max_pixels: int, param: str, check_size: SizeCheck | None = None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise APIError(400, f"{param}: the image is {width}x{height} = {width * height} pixels; at most "
                                f"{max_pixels} are allowed", param)
        if check_size is not None:
            check_size(width, height)
        image.load()
        return to_rgb(image)
    except APIError:
        raise
    except DataError as e:
        raise APIError(400, f"{param}: {e}", param) from None
    except Image.DecompressionBombError as e:  # PIL's own guard, past twice its MAX_IMAGE_PIXELS
        raise APIError(400, f"{param}: refused as a decompression bomb ({e})", param) from None
    except UnidentifiedImageError:  # its message names the in-memory buffer object, of no use to the client
        raise APIError(400, f"{param}: the bytes are not an image format PIL reads (PNG, JPEG, WebP, GIF, …)",
                       param) from None
    except Exception as e:  # corrupt files raise anything from OSError to SyntaxError inside PIL: all mean 400
        raise APIError(400, f"{param}: the bytes are not a decodable image ({type(e).__name__}: {e})", param) from None


def _data_url_bytes(url: str, param: str) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    media_type, *options = header.split(";")
    if not comma or "base64" not in [option.strip().lower() for option in options]:
        raise APIError(400, f"{param}: Only base64 data URLs are supported for now; expected "
                            f"data:image/<format>;base64,<data>", param)
    if not media_type.lower().startswith("image/"):
        raise APIError(400, f"{param}: the data URL's media type is {media_type or 'missing'!r}; expected image/…",
                       param)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: invalid base64 in the data URL ({e}); expected the standard alphabet (A-Z, a-z, "
                            f"0-9, + and /, = padding) on one line: no line breaks, and not the URL-safe - and _",
                       param) from None


def _local_file_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.allowed_local_dir is None:
        raise APIError(400, f"{param}: Cannot load local files without `--allowed-local-dir`.", param)
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{param}: file URL host {parsed.netloc!r}; expected file:///absolute/path", param)
    local = unquote(parsed.path)
    if "\x00" in local:  # no file name holds one; Path() would raise ValueError
        raise APIError(400, f"{param}: the file URL's path contains a NUL byte (%00); expected a file name", param)
    root = policy.allowed_local_dir.resolve()
    path = Path(local).resolve()  # resolves .. and symlinks before the containment check
    # messages name the file as the client wrote it: where a symlink leads is the server's business
    if not path.is_relative_to(root):
        raise APIError(400, f"{param}: {local} is outside the allowed local directory {root}", param)
    try:
        if path.is_dir():
            raise APIError(400, f"{param}: {local} is a directory; expected an image file", param)
        if not path.is_file():
            raise APIError(400, f"{param}: no such file {local}", param)
        if path.stat().st_size > policy.max_bytes:
            raise APIError(400, f"{param}: {local} is larger than {policy.max_bytes} bytes", param)
        return path.read_bytes()
    except OSError as e:  # a name too long, no permission, …
        raise APIError(400, f"{param}: cannot read {local} ({e.strerror})", param) from None


async def _remote_bytes(url: str, policy: ImagePolicy, param: str, executor: Executor | None) -> bytes:
    if not policy.allow_remote and policy.allowed_hosts is None:
        raise APIError(400, f"{param}: remote image URLs are disabled on this server; send the image as a "
                            f"data:image/…;base64 URL (or start the server with --allow-remote-images)", param)
    import httpx

    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise APIError(400, f"{param}: {url[:80]!r} is not a valid URL ({e})", param) from None
    host = request_host(target)
    if policy.allowed_hosts is not None and host not in policy.allowed_hosts:
        raise APIError(400, f"{param}: images from {host or repr(url[:40])} are not allowed on this server; "
                            f"allowed hosts: {', '.join(sorted(policy.allowed_hosts))}", param)
    # loading the CA bundle took ~50 ms, during which the loop stalled
    ssl_context = await asyncio.get_running_loop().run_in_executor(executor, _ssl_context)
    try:
        async with asyncio.timeout(policy.remote_timeout):  # httpx's timeout is per read; this one is for it all
            async with httpx.AsyncClient(timeout=policy.remote_timeout, follow_redirects=False,
                                         verify=ssl_context) as client, \
                    client.stream("GET", target) as response:
                if response.status_code != 200:
                    raise APIError(400, f"{param}: fetching {url} gave HTTP {response.status_code}; expected 200 "
                                        f"(redirects are not followed)", param)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise APIError(400, f"{param}: {url} is larger than {policy.max_bytes} bytes", param)
                return bytes(data)
    except TimeoutError:
        raise APIError(400, f"{param}: fetching {url} took longer than {policy.remote_timeout} s", param) from None
    except httpx.HTTPError as e:
        raise APIError(400, f"{param}: could not fetch {url} ({type(e).__name__}: {e})", param) from None


@functools.cache
def _ssl_context():
    """httpx's default TLS settings (certifi's CA bundle), made once: an AsyncClient made without one loads the bundle
    itself, synchronously, ~50 ms on the event loop for every image."""
    import httpx

    return httpx.create_ssl_context()
