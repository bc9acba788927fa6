"""How long a newcomer's prefill stalls the rows already decoding, in one go against chunked (the serving engine's
--prefill-chunk; tessera/serve/batch.py `Prefill`): the benchmark LLaVA model of `tessera bench` (random weights),
--rows rows decoding, then a newcomer with --images images and a --prompt-tokens text prompt. Each setting runs as
the engine does: an advance of the newcomer's prefill (about a chunk's worth: prompt tokens, or images counted at
their encoding's worth in prompt tokens), then a decode step of the running rows, until the newcomer joins.
--uncounted adds, for every chunk, the images counted as free: all encoded in the first chunk, beside a whole chunk
of text (as before images were counted). Prints, per setting (chunk 0: in one go), the medians over --repeats rounds
(the settings alternate within each round) of

- the longest wait between two of a running row's tokens while the newcomer was prefilled (the stall),
- the newcomer's time to its first token, and how many tokens each running row got meanwhile.

    python benchmarks/prefill_chunks.py                       # 8 rows, a 1024-token prompt, chunks 0, 512, 256
    python benchmarks/prefill_chunks.py --images 8 --uncounted --chunks 0 512   # images worth more than a chunk
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
from tessera.flops import image_cost_in_tokens
from tessera.serve.batch import Prefill, RunningBatch


def inputs_for(sizes, rows: int, text_tokens: int, images: int = 1) -> dict[str, torch.Tensor]:
    """BOS, `images` images' tokens, then text, a row; every image of its own random pixels."""
    batch = llava_batch(sizes, rows, text_tokens, labelled=False)
    ids, n = batch["input_ids"], sizes.image_tokens  # BOS, one image's tokens, text
    ids = torch.cat([ids[:, :1], ids[:, 1:1 + n].repeat(1, images), ids[:, 1 + n:]], dim=1)
    pixels = torch.randn(rows * images, *batch["pixel_values"].shape[1:], generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_counts": torch.full((rows,), images, dtype=torch.long)}


def newcomer_joins(model, sizes, running: RunningBatch, prompt_tokens: int, images: int, chunk: int,
                   counted: bool = True) -> dict[str, float]:
    """One newcomer's prefill between the running rows' decode steps, timed as the rows see it."""
    params = model.sampling_params(max_new_tokens=8, eos_token_id=[])
    start = last_token = time.perf_counter()
    prefill = Prefill(model, ["newcomer"], [params], inputs_for(sizes, 1, prompt_tokens, images), chunk=chunk)
    if not counted:
        prefill.image_cost = 1e-9  # every image in the first advance, beside a whole chunk of text
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
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="the newcomer's text tokens")
    parser.add_argument("--images", type=int, default=1, help="the newcomer's images")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256])
    parser.add_argument("--uncounted", action="store_true",
                        help="also run every chunk with the images counted as free (all in the first chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        model, _ = llava_pair(sizes, Path(directory))
        settings = [(chunk, counted) for chunk in args.chunks
                    for counted in ((True, False) if args.uncounted and chunk else (True,))]
        steps = args.repeats * len(settings) * (args.prompt_tokens + args.images * (sizes.image_tokens + 1) + 2)
        params = model.sampling_params(max_new_tokens=steps + 1, eos_token_id=[])
        running = RunningBatch.prefill(model, list(range(args.rows)), [params] * args.rows,
                                       inputs_for(sizes, args.rows, 32))
        cost = image_cost_in_tokens(model.config)
        print(f"{args.rows} running rows; a newcomer of {args.images} image(s) ({sizes.image_tokens} tokens each, "
              f"each worth {cost:.0f} prompt tokens) and {args.prompt_tokens} text tokens; medians of "
              f"{args.repeats}, {torch.get_num_threads()} threads")
        results: dict[tuple[int, bool], list[dict[str, float]]] = {setting: [] for setting in settings}
        for _ in range(args.repeats):
            for chunk, counted in settings:
                results[chunk, counted].append(newcomer_joins(model, sizes, running, args.prompt_tokens, args.images,
                                                              chunk, counted))
    names = list(next(iter(results.values()))[0])
    print(f"{'chunk':>16s} " + " ".join(f"{name:>36s}" for name in names))
    for (chunk, counted), rounds in results.items():
        cells = [statistics.median(r[name] for r in rounds) for name in names]
        label = "whole" if not chunk else f"{chunk}" + ("" if counted else ", uncounted")
        print(f"{label:>16} " + " ".join(f"{cell:36.1f}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
