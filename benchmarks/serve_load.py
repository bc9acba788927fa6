"""Load test for `tessera serve`: many concurrent clients, good and bad requests mixed, against a real server
process — once per --max-batch value, so batching can be compared with one request at a time.

    python benchmarks/serve_load.py --checkpoint runs/quickstart/checkpoint            # 64 clients x 8 requests
    python benchmarks/serve_load.py --checkpoint CK --max-batch 16 8 1 --clients 32

Every request has an expected status (200 for good ones; 400 or 404 for the bad ones); the run fails (exit 1) on
any 5xx, any request without a response ("lost"), or any answer of the wrong status or shape. Prints requests/s,
p50/p99 latency and generated tokens/s per --max-batch value.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Describe the image.",
             "Is there a red square?", "Where is the triangle?"]
GOOD = ("text", "image", "image_stream", "two_images")
BAD = {"bad_base64": 400, "not_an_image": 400, "too_many_images": 400, "max_tokens_zero": 400,
       "malformed_json": 400, "unknown_model": 404}


@dataclass
class Result:
    kind: str
    expected: int
    status: int | None  # None: no response at all (lost)
    seconds: float
    tokens: int = 0
    well_formed: bool = False


def scene(rng: random.Random, size: int = 48) -> str:
    """A PNG of a few coloured shapes as a data URL."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y = rng.randrange(0, size - 16), rng.randrange(0, size - 16)
        colour = rng.choice(["red", "green", "blue", "yellow", "purple"])
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + 14, y + 14), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def build_request(kind: str, rng: random.Random, model: str, max_tokens: int, max_images: int,
                  ignore_eos: bool) -> bytes:
    def parts(*urls: str) -> list[dict]:
        return [{"type": "image_url", "image_url": {"url": u}} for u in urls] + \
            [{"type": "text", "text": rng.choice(QUESTIONS)}]

    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos,
            "messages": [{"role": "user", "content": parts(scene(rng))}]}
    if kind == "text":
        body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    elif kind == "image_stream":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    elif kind == "two_images":
        body["messages"] = [{"role": "user", "content": parts(scene(rng), scene(rng))}]
    elif kind == "bad_base64":
        body["messages"] = [{"role": "user", "content": parts("data:image/png;base64,iVBORw0KGgo!!")}]
    elif kind == "not_an_image":
        body["messages"] = [{"role": "user", "content": parts("data:image/png;base64,"
                                                              + base64.b64encode(b"not a png" * 20).decode())}]
    elif kind == "too_many_images":
        body["messages"] = [{"role": "user", "content": parts(*[scene(rng)] * (max_images + 1))}]
    elif kind == "max_tokens_zero":
        body["max_tokens"] = 0
    elif kind == "unknown_model":
        body["model"] = "no-such-model"
    raw = json.dumps(body).encode()
    return raw[: len(raw) // 2] if kind == "malformed_json" else raw


async def send(client: httpx.AsyncClient, kind: str, payload: bytes) -> Result:
    expected = BAD.get(kind, 200)
    started = time.perf_counter()
    try:
        if kind == "image_stream":
            async with client.stream("POST", "/v1/chat/completions", content=payload) as response:
                lines = [line async for line in response.aiter_lines() if line]
            status = response.status_code
            usage = [json.loads(line[6:]).get("usage") for line in lines[:-1]]
            tokens = usage[-1]["completion_tokens"] if usage and usage[-1] else 0
            well_formed = status == 200 and lines[-1] == "data: [DONE]" and tokens > 0
        else:
            response = await client.post("/v1/chat/completions", content=payload)
            status, body = response.status_code, response.json()
            if status == 200:
                tokens = body["usage"]["completion_tokens"]
                well_formed = body["choices"][0]["finish_reason"] in ("stop", "length")
            else:
                tokens = 0
                well_formed = set(body.get("error", {})) == {"message", "type", "param", "code"}
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return Result(kind, expected, None, time.perf_counter() - started)
    return Result(kind, expected, status, time.perf_counter() - started, tokens, well_formed)


async def run_load(url: str, model: str, clients: int, per_client: int, bad_fraction: float, max_tokens: int,
                   max_images: int, ignore_eos: bool, seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    plans = []  # every request is built before the clock starts, so image encoding is not measured
    for _ in range(clients):
        kinds = [rng.choice(list(BAD)) if rng.random() < bad_fraction else rng.choice(GOOD) for _ in range(per_client)]
        plans.append([(k, build_request(k, rng, model, max_tokens, max_images, ignore_eos)) for k in kinds])
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"Content-Type": "application/json"}) as client:

        async def one_client(plan):
            return [await send(client, kind, payload) for kind, payload in plan]

        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(plan) for plan in plans))
        elapsed = time.perf_counter() - started
    return [r for client_results in results for r in client_results], elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, max_batch: int, max_images: int, threads: int | None, log_path: Path
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "tessera.cli", "serve", "--checkpoint", checkpoint, "--port", str(port),
               "--max-batch", str(max_batch), "--max-images-per-prompt", str(max_images)]
    command += ["--threads", str(threads)] if threads else []
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"the server did not become healthy in 180 s:\n{log_path.read_text()}")


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarise(max_batch: int, results: list[Result], elapsed: float) -> dict:
    good = [r for r in results if r.expected == 200]
    latencies = [r.seconds for r in results if r.status is not None]
    good_latencies = [r.seconds for r in good if r.status == 200]
    return {
        "max_batch": max_batch, "requests": len(results), "good": len(good), "bad": len(results) - len(good),
        "seconds": elapsed, "requests_per_s": len(results) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        "good_p50_ms": 1000 * percentile(good_latencies, 50), "good_p99_ms": 1000 * percentile(good_latencies, 99),
        "tokens_per_s": sum(r.tokens for r in good) / elapsed,
        "server_errors": sum(1 for r in results if r.status is not None and r.status >= 500),
        "lost": sum(1 for r in results if r.status is None),
        "wrong": sum(1 for r in results if r.status is not None and (r.status != r.expected or not r.well_formed)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="e.g. the one `tessera quickstart` writes")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[16, 1], help="one server run per value")
    parser.add_argument("--bad-fraction", type=float, default=0.25)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens per answer "
                                                                  "(a decode-heavy load)")
    parser.add_argument("--max-images", type=int, default=2, help="the server's --max-images-per-prompt")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for max_batch in args.max_batch:
            log_path = Path(tmp) / f"server-{max_batch}.log"
            process, url = start_server(args.checkpoint, max_batch, args.max_images, args.threads, log_path)
            try:
                model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                load = dict(max_tokens=args.max_tokens, max_images=args.max_images, ignore_eos=args.ignore_eos)
                asyncio.run(run_load(url, model, 2, 1, 0.0, **load, seed=99))  # warm-up
                results, elapsed = asyncio.run(run_load(url, model, args.clients, args.requests_per_client,
                                                        args.bad_fraction, **load, seed=args.seed))
            finally:
                process.terminate()
                process.wait(timeout=60)
            rows.append(summarise(max_batch, results, elapsed))
            print(f"--max-batch {max_batch}: {len(results)} requests in {elapsed:.1f} s", flush=True)

    print(f"\n{args.clients} clients x {args.requests_per_client} requests, {args.bad_fraction:.0%} bad, "
          f"max_tokens {args.max_tokens}{' (ignore_eos)' if args.ignore_eos else ''}, greedy, "
          f"server --threads {args.threads or 'default'}; "
          f"checkpoint {args.checkpoint}")
    header = ("max_batch", "requests", "bad", "req/s", "p50 ms", "p99 ms", "good p50", "good p99", "tok/s", "5xx",
              "lost", "wrong")
    print(" ".join(f"{h:>9s}" for h in header))
    for r in rows:
        print(" ".join(f"{v:>9}" for v in (
            r["max_batch"], r["requests"], r["bad"], f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}", f"{r['good_p50_ms']:.0f}", f"{r['good_p99_ms']:.0f}", f"{r['tokens_per_s']:.0f}",
            r["server_errors"], r["lost"], r["wrong"])))
    if len(rows) > 1:
        base = rows[-1]
        for r in rows[:-1]:
            print(f"throughput --max-batch {r['max_batch']} vs {base['max_batch']}: "
                  f"{r['requests_per_s'] / base['requests_per_s']:.2f}x requests/s, "
                  f"{r['tokens_per_s'] / max(base['tokens_per_s'], 1e-9):.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    failed = any(r["server_errors"] or r["lost"] or r["wrong"] for r in rows)
    if failed:
        print("FAILED: a 5xx, a lost request or a wrong answer (see the table)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
