"""How long a newcomer's prefill stalls the rows already decoding, in one go against chunked (the serving engine's
--prefill-chunk; tessera/serve/batch.py `Prefill`): the benchmark LLaVA model of `tessera bench` (random weights),
--rows rows decoding, then a newcomer with an image and a --prompt-tokens text prompt. Each setting runs as the engine
does: a chunk of the newcomer's prefill, then a decode step of the running rows, until the newcomer joins. Prints,
per --chunk setting (0: in one go), the medians over --repeats rounds (the settings alternate within each round) of

- the longest wait between two of a running row's tokens while the newcomer was prefilled (the stall),
- the newcomer's time to its first token, and how many tokens each running row got meanwhile.

    python benchmarks/prefill_chunks.py                       # 8 rows, a 1024-token prompt, chunks 0, 512, 256
    python benchmarks/prefill_chunks.py --quick --prompt-tokens 64 --chunks 0 16   # a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tessera.bench.suite import FULL, QUICK, llava_batch, llava_pair
from tessera.serve.batch import Prefill, RunningBatch


def inputs_for(sizes, rows: int, text_tokens: int) -> dict[str, torch.Tensor]:
    batch = llava_batch(sizes, rows, text_tokens, labelled=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"], "image_counts": torch.ones(rows, dtype=torch.long)}


def newcomer_joins(model, sizes, running: RunningBatch, prompt_tokens: int, chunk: int) -> dict[str, float]:
    """One newcomer's prefill between the running rows' decode steps, timed as the rows see it."""
    params = model.sampling_params(max_new_tokens=8, eos_token_id=[])
    start = last_token = time.perf_counter()
    prefill = Prefill(model, ["newcomer"], [params], inputs_for(sizes, 1, prompt_tokens), chunk=chunk)
    longest, tokens, joined = 0.0, 0, None
    while joined is None:
        joined = prefill.advance()
        running.choose()
        running.step()
        now = time.perf_counter()
        longest, last_token, tokens = max(longest, now - last_token), now, tokens + 1
        if joined is not None:
            first_token = now - start  # its logits are there: it chooses with the others at the next iteration
    return {"longest wait between two tokens, ms": longest * 1000,
            "newcomer's first token, ms": first_token * 1000, "tokens per running row meanwhile": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="the newcomer's text tokens (an image too)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        model, _ = llava_pair(sizes, Path(directory))
        steps = args.repeats * len(args.chunks) * (args.prompt_tokens + sizes.image_tokens + 2)  # at most
        params = model.sampling_params(max_new_tokens=steps + 1, eos_token_id=[])
        running = RunningBatch.prefill(model, list(range(args.rows)), [params] * args.rows,
                                       inputs_for(sizes, args.rows, 32))
        print(f"{args.rows} running rows; a newcomer of an image ({sizes.image_tokens} tokens) and "
              f"{args.prompt_tokens} text tokens; medians of {args.repeats}, {torch.get_num_threads()} threads")
        results: dict[int, list[dict[str, float]]] = {chunk: [] for chunk in args.chunks}
        for _ in range(args.repeats):
            for chunk in args.chunks:
                results[chunk].append(newcomer_joins(model, sizes, running, args.prompt_tokens, chunk))
    names = list(next(iter(results.values()))[0])
    print(f"{'chunk':>8s} " + " ".join(f"{name:>36s}" for name in names))
    for chunk, rounds in results.items():
        cells = [statistics.median(r[name] for r in rounds) for name in names]
        print(f"{chunk or 'whole':>8} " + " ".join(f"{cell:36.1f}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
