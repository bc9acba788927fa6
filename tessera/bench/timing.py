"""Side-by-side timing on a shared, noisy machine: warm up every contender, then run them interleaved (A B A B …)
so a slow spell hits both, and report medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                self_timed: bool = False) -> dict[str, float]:
    """Median seconds per call of each contender; with self_timed, of the seconds each call returns (the part of
    the call it timed itself, e.g. decoding after the first token)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            started = time.perf_counter()
            measured = fn()
            times[name].append(measured if self_timed else time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


class DecodeClock:
    """A streamer (put/end, as transformers' and tessera's generate call one) that times the decoding: from the
    first new token to the end. Timed within one call, so a slow prefill cannot be mistaken for decode time, as a
    difference of two calls' times can (it once reported a negative tokens/s on a busy machine)."""

    def __init__(self):
        self.puts = 0
        self.first_token_at: float | None = None
        self.seconds: float | None = None

    def put(self, ids) -> None:  # the prompt's ids first, then each step's new tokens
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        if self.first_token_at is None:
            raise RuntimeError("generation ended before its first new token")
        self.seconds = time.perf_counter() - self.first_token_at
