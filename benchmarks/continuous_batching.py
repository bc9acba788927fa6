"""Static against continuous batching in the serving engine, on requests that arrive staggered: a tiny random model
(Method A), N requests submitted one every few decode steps straight to `tessera.serve.engine.Engine` (no HTTP), once
with continuous=False (a request arriving while a batch runs waits for that batch to end) and once with continuous
batching (it joins at the next step), the two modes alternating for --repeats rounds. Prints the medians over the
rounds of the mean and p90 time to first token, the mean latency and the throughput side by side, and checks that
both modes gave the same answers. (The time to first token is taken when the worker chooses it: a random model's
first tokens often decode to no text yet, which would time the tokenizer, not the scheduling.)

    python benchmarks/continuous_batching.py                          # 16 requests, one every 4 decode steps
    python benchmarks/continuous_batching.py --requests 32 --every 2 --max-batch 8 --threads 1 --repeats 5

The arrival interval is `--every` times a decode step of a full batch (--max-batch rows), measured first. Generations ignore EOS, so every
request runs its own max_tokens (drawn between --min-tokens and --max-tokens, the same in both modes).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import torch

from tessera import ModelConfig, MultimodalLM, Processor, TextConfig, VisionConfig, train_tokenizer
from tessera.serve.engine import Engine, Job

CORPUS = ["What colour is the square? The square is red.", "Describe the image. A blue circle on the left.",
          "How many shapes are there? There are three shapes.", "Is there a green triangle? Yes, at the top."]


def tiny_model(hidden: int, layers: int) -> tuple[MultimodalLM, Processor]:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CORPUS * 20, vocab_size=300)
    config = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64),
        text=TextConfig(vocab_size=320, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=1024))
    return MultimodalLM(config).eval(), Processor.for_model(config, tokenizer)


def requests(processor, count: int, low: int, high: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        question = CORPUS[i % 4][: rng.randint(8, 45)]
        ids = processor.encode([{"role": "user", "content": question}], add_generation_prompt=True)[0]
        out.append((ids, rng.randint(low, high)))
    return out


class TimedEngine(Engine):
    """Notes when each job's first token is chosen (on the worker thread) in job.first."""

    def _prefill_batch(self, jobs):
        batch = super()._prefill_batch(jobs)
        for row in batch.rows:
            def add(token, job=row.job, add=row.stream.add):
                if not hasattr(job, "first"):
                    job.first = time.perf_counter()
                return add(token)
            row.stream.add = add
        return batch


async def serve(engine: Engine, model, work, interval: float) -> list[dict]:
    """Submit the requests one every `interval` seconds; each one's submit, first-token and end times and answer."""
    async def follow(job: Job, record: dict) -> None:
        answer = ""
        while True:
            piece = await job.events.get()
            answer += piece.text
            if piece.finish_reason:
                record.update(first=job.first, end=time.perf_counter(), answer=answer, tokens=piece.completion_tokens)
                return

    records, tasks = [], []
    for i, (ids, max_new) in enumerate(work):
        params = [model.sampling_params(max_new_tokens=max_new, eos_token_id=[])]
        job = Job(f"r{i}", ids, [], params)
        record = {"submit": time.perf_counter()}
        engine.submit(job)
        records.append(record)
        tasks.append(asyncio.ensure_future(follow(job, record)))
        await asyncio.sleep(interval)
    await asyncio.gather(*tasks)
    return records


def run(model, processor, work, interval: float, max_batch: int, continuous: bool) -> tuple[list[dict], dict]:
    engine = TimedEngine(model, processor, max_batch, continuous=continuous).start()
    try:
        return asyncio.run(serve(engine, model, work, interval)), dict(engine.stats)
    finally:
        engine.stop()


def step_time(model, processor, max_batch: int) -> float:
    """Seconds per decode step of max_batch rows, the engine driven step by step (after a warm-up)."""
    async def measure() -> float:
        engine = Engine(model, processor, max_batch)
        for i, (ids, _) in enumerate(requests(processor, max_batch, 40, 40, seed=99)):
            engine.submit(Job(f"w{i}", ids, [], [model.sampling_params(max_new_tokens=40, eos_token_id=[])]))
        with torch.inference_mode():
            for _ in range(5):  # the prefill, then a warm-up
                engine.step()
            start = time.perf_counter()
            for _ in range(20):
                engine.step()
            return (time.perf_counter() - start) / 20

    return asyncio.run(measure())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--every", type=float, default=4, help="decode steps between two arrivals (default 4)")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256, help="the decoder's width (default 256)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both modes (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = tiny_model(args.hidden, args.layers)
    work = requests(processor, args.requests, args.min_tokens, args.max_tokens)
    step_time(model, processor, args.max_batch)  # a first run warms up the kernels and the allocator
    interval = args.every * step_time(model, processor, args.max_batch)
    rounds = {"static": [], "continuous": []}
    for _ in range(args.repeats):
        for name in rounds:
            rounds[name].append(run(model, processor, work, interval, args.max_batch, name == "continuous"))

    print(f"{args.requests} requests, one every {args.every:g} decode steps ({1000 * interval:.1f} ms), "
          f"{args.min_tokens}-{args.max_tokens} new tokens each, --max-batch {args.max_batch}")
    print(f"{'median of ' + str(args.repeats) + ' rounds':28}{'static':>10}{'continuous':>12}")
    metrics = {
        "mean time to first token ms": lambda r: 1000 * statistics.mean(x["first"] - x["submit"] for x in r),
        "p90 time to first token ms": lambda r: 1000 * _p90([x["first"] - x["submit"] for x in r]),
        "mean latency ms": lambda r: 1000 * statistics.mean(x["end"] - x["submit"] for x in r),
        "throughput tokens/s": lambda r: sum(x["tokens"] for x in r) / _span(r),
    }
    for label, metric in metrics.items():
        cells = [statistics.median(metric(records) for records, _ in rounds[name]) for name in rounds]
        print(f"{label:28}" + "".join(f"{cell:10.1f}  " for cell in cells))
    for label, key in (("decode steps", "steps"), ("largest batch", "largest_batch"),
                       ("rows joined a running batch", "joined_rows")):
        print(f"{label:28}" + "".join(f"{rounds[name][-1][1].get(key, 0):10d}  " for name in rounds))
    answers = [[x["answer"] for x in records] for name in rounds for records, _ in rounds[name]]
    same = all(a == answers[0] for a in answers)
    print(f"same answers in every round of both modes: {'yes' if same else 'NO'}")
    return 0 if same else 1


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]


def _span(records: list[dict]) -> float:
    return max(x["end"] for x in records) - min(x["submit"] for x in records)


if __name__ == "__main__":
    raise SystemExit(main())
