"""Inference of the `tessera bench` model in float32 and in bfloat16: prefill latency and greedy decode speed at
batch 1 and 8, the two dtypes timed interleaved (a warm-up first) and the medians compared. tessera only, random
weights (Method A, LLaVA-style).

    python benchmarks/inference_precision.py
    python benchmarks/inference_precision.py --new-tokens 64 --repeats 3
    python benchmarks/inference_precision.py --quick          # `tessera bench --quick`'s tiny model, in seconds

bf16 halves the weights a decode step streams from memory, but how fast it multiplies depends on the CPU: with
AVX-512 BF16 or AMX it is native, elsewhere oneDNN converts to float32 on the way (not measured here).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from tessera.bench.suite import FULL, QUICK, llava_batch, tessera_config
from tessera.bench.timing import DecodeClock, interleaved
from tessera.model import MultimodalLM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model of `tessera bench --quick`")
    parser.add_argument("--new-tokens", type=int, help="default: 128 (32 with --quick)")
    parser.add_argument("--repeats", type=int, help="default: 5 (3 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    new_tokens = sizes.new_tokens if args.new_tokens is None else args.new_tokens
    repeats = sizes.repeats if args.repeats is None else args.repeats
    if new_tokens < 2 or repeats < 1:
        parser.error("--new-tokens must be at least 2 (decode speed is the tokens after the first) and --repeats 1")
    torch.manual_seed(0)
    models = {"float32": MultimodalLM(tessera_config(sizes, "unified")).eval()}
    models["bfloat16"] = copy.deepcopy(models["float32"]).to(torch.bfloat16)

    def generation(batch: int, new_tokens: int, timed: bool = False):
        """One generation per call by each precision; with timed, each call returns its decoding's seconds."""
        prompt = llava_batch(sizes, batch, sizes.prompt_tokens, labelled=False)

        def run(model, dtype):
            pixels = prompt["pixel_values"].to(dtype)
            clock = DecodeClock() if timed else None
            out = model.generate(prompt["input_ids"], prompt["attention_mask"], pixels, [1] * batch,
                                 max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
            assert all(len(tokens) == new_tokens for tokens in out.sequences)
            return clock.seconds if timed else None

        return {dtype: (lambda m=model, d=getattr(torch, dtype): run(m, d)) for dtype, model in models.items()}

    print(f"{torch.get_num_threads()} threads, medians of {repeats} interleaved runs; {new_tokens} new tokens")
    print(f"{'measurement':38s} {'float32':>9s} {'bfloat16':>9s} {'bf16 faster by':>15s}")
    first = interleaved(generation(1, 1), repeats)
    print(f"{f'prefill, 1 image + {sizes.prompt_tokens}-token prompt, ms':38s} {first['float32'] * 1e3:9.1f} "
          f"{first['bfloat16'] * 1e3:9.1f} {first['float32'] / first['bfloat16']:14.2f}×", flush=True)
    for batch in sizes.decode_batches:
        seconds = interleaved(generation(batch, new_tokens, timed=True), repeats, self_timed=True)
        speed = {d: batch * (new_tokens - 1) / t for d, t in seconds.items()}
        print(f"{f'decode, batch {batch}, tokens/s':38s} {speed['float32']:9.1f} {speed['bfloat16']:9.1f} "
              f"{speed['bfloat16'] / speed['float32']:14.2f}×", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
