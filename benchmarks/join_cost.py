"""What a row joining or leaving the serving engine's running batch costs (tessera/serve/batch.py): the benchmark
LLaVA model of `tessera bench` (random weights), --rows rows decoded to --tokens tokens, then one newcomer (an image
and a 32-token prompt, 64 new tokens) joins and the first row leaves. Each is timed with the storage having room
(in place: the running rows stay where they are) and without (copied, as every join and leave was before), side by
side in each round, with the median of three decode steps after the join. Prints medians over --repeats rounds.
--fusion cross: the bench's Method B model, whose rows also hold their image's keys/values (`cache.cross`);
--fusion hybrid: the bench's NVLM-H model (a thumbnail in the sequence, keys/values of four tiles an image).

    python benchmarks/join_cost.py                 # 8 rows of 789 tokens, 5 rounds
    python benchmarks/join_cost.py --fusion cross --image-tokens 1024
    python benchmarks/join_cost.py --quick --tokens 60   # the bench's reduced model: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tessera.bench.suite import FULL, HYBRID_TILES, QUICK, llava_batch, llava_pair, tessera_config
from tessera.model import MultimodalLM
from tessera.serve.batch import RunningBatch

NEWCOMER_TOKENS = 64


def prefill(model, sizes, rows: int, capacity: int, new_tokens: int) -> RunningBatch:
    fusion = model.config.fusion.method
    tiles = HYBRID_TILES if fusion == "hybrid" else 1  # the hybrid's encoder reads a tile: a quarter of the image
    batch = llava_batch(sizes, rows, 32, labelled=False, image_tokens=model.config.vision.num_patches * tiles,
                        fusion=fusion)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    inputs["image_counts"] = torch.ones(rows, dtype=torch.long)
    params = model.sampling_params(max_new_tokens=new_tokens, eos_token_id=[])
    return RunningBatch.prefill(model, list(range(rows)), [params] * rows, inputs, capacity=capacity)


def timed(run) -> tuple[float, object]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def round_of(model, sizes, running: RunningBatch, results: dict[str, list[float]]) -> None:
    for in_place in (True, False):
        how = "in place" if in_place else "copied"
        rows = running.select(range(len(running)))  # new storage holding the rows, with room for one more
        if not in_place:  # no spare row: the join copies
            rows.storage = rows.storage.view(len(rows))
            rows.cross_storage = {layer: (k[:len(rows)], v[:len(rows)])
                                  for layer, (k, v) in rows.cross_storage.items()}
        newcomer = prefill(model, sizes, 1, 0, NEWCOMER_TOKENS)
        newcomer.choose()
        seconds, joined = timed(lambda: rows.merge(newcomer))
        assert joined.copied != in_place
        results[f"join, {how}"].append(seconds)
        steps = []
        for _ in range(3):
            steps.append(timed(joined.step)[0])
            joined.choose()
        results[f"decode step after the join, {how}"].append(statistics.median(steps))
        seconds, left = timed(lambda: joined.select(range(1, len(joined)), in_place=in_place))
        assert left.copied != in_place
        results[f"leave, {how}"].append(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=789, help="the running rows' length when the newcomer joins")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fusion", choices=("unified", "cross", "hybrid"), default="unified")
    parser.add_argument("--image-tokens", type=int, default=None, help="per image (default: the bench's 256)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    tokens = args.tokens
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        if args.fusion == "unified" and args.image_tokens is None:
            model, _ = llava_pair(sizes, Path(directory))
        else:
            torch.manual_seed(0)
            model = MultimodalLM(tessera_config(sizes, args.fusion, args.image_tokens)).eval()
        running = prefill(model, sizes, args.rows, args.rows + 1, tokens)
        if running.length >= tokens:
            parser.error(f"--tokens {tokens}: expected more than the prompt's {running.length}")
        while running.length < tokens:
            running.choose()
            running.step()
        running.choose()
        print(f"{args.fusion}: {args.rows} rows of {running.length} tokens, a newcomer of {NEWCOMER_TOKENS} new "
              f"tokens joins, the first row leaves; medians of {args.repeats}, {torch.get_num_threads()} threads")
        results: dict[str, list[float]] = {f"{what}, {how}": [] for what in
                                           ("join", "decode step after the join", "leave")
                                           for how in ("in place", "copied")}
        for _ in range(args.repeats):
            round_of(model, sizes, running, results)
    print(f"{'':36s} {'ms':>8s}")
    for name, seconds in results.items():
        print(f"{name:36s} {statistics.median(seconds) * 1000:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
