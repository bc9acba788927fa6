"""The batching engine: one worker thread runs the model, and requests that arrive together share forward passes.

The event loop never calls the model. A handler submits a Job and awaits its events; the worker takes queued jobs
(up to --max-batch rows, each choice of a request being a row), runs them as one left-padded batch through
`MultimodalLM.stream_tokens` with per-row sampling settings, and hands each new piece of text back to the loop
with `call_soon_threadsafe`. Batches are static: the KV cache is sized per batch, so jobs that arrive while a
batch runs wait for the next one. A cancelled job (its client went away) stops being decoded at the next step, and
a batch whose rows are all finished or cancelled stops at once. If a batch fails, the jobs that have not sent any
text yet run again in two halves, and so on (bisection), so that only the job causing the failure gets the 500 and
the others are still decoded in batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.generation import SamplingParams, StopChecker
from tessera.serve.protocol import APIError

log = logging.getLogger("tessera.serve")


@dataclass
class Piece:
    """New text of one choice; finish_reason is set on its last piece ("stop", "length")."""

    choice: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Failed:
    error: APIError


class Job:
    """One request: its prompt, its images and one SamplingParams per choice. Created on the event loop."""

    def __init__(self, job_id: str, prompt_ids: list[int], pixel_values: Sequence[torch.Tensor],
                 params: Sequence[SamplingParams]):
        self.id = job_id
        self.prompt_ids = list(prompt_ids)
        self.pixel_values = list(pixel_values)
        self.params = list(params)
        self.events: asyncio.Queue[Piece | Failed] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()
        self.started = False  # some text was posted (read and written on the worker thread only)
        self.recorded: set[int] = set()  # choices whose outcome is in Engine.finished (worker thread only)

    @property
    def rows(self) -> int:
        return len(self.params)

    @property
    def max_new_tokens(self) -> int:
        return max(p.max_new_tokens for p in self.params)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, event: Piece | Failed) -> None:
        """Called from the worker thread: asyncio queues are not thread-safe, so the loop itself does the put."""
        self.started = self.started or isinstance(event, Piece)
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody waits for this job
            self.cancel()


class ChoiceStream:
    """One choice's text as it grows. Only text that can no longer change is released: not a possible start of a
    stop string, not half of a UTF-8 character. What is released in total equals the final text."""

    def __init__(self, choice: int, params: SamplingParams, decode):
        self.choice = choice
        self.checker = StopChecker(1, params, decode)
        self.stop_strings = tuple(params.stop_strings)
        self.sent = 0
        self.tokens = 0  # generated, the EOS token included
        self.done = False

    def add(self, token: int) -> Piece | None:
        self.tokens += 1
        self.checker.add([token])
        reason = self.checker.finish_reasons[0]
        text = self.checker.text(0)
        if reason is None:
            text = text[:len(text) - self._unsettled(text)]
        self.done = reason is not None
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        if not delta and reason is None:
            return None
        return Piece(self.choice, delta, reason, self.tokens)

    def _unsettled(self, text: str) -> int:
        """How many trailing characters may still change: a replacement character (an incomplete UTF-8 sequence
        the next token completes) or the longest suffix that begins a stop string."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held


class Engine:
    def __init__(self, model, processor, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected an integer >= 1")
        self.model = model
        self.processor = processor
        self.max_batch = max_batch
        self.context_length = model.config.text.max_position_embeddings
        # for tests, each row counted once: batches and rows taken from the queue, largest_batch (rows), retries
        # (runs of part of a failed run), failed_runs (retries included), failed_rows (a 500), cancelled_rows
        self.stats: Counter[str] = Counter()
        # every row's outcome, once: (job id, choice, reason: stop | length | cancelled | failed, tokens)
        self.finished: deque[tuple[str, int, str, int]] = deque(maxlen=1024)
        self._pending: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tessera-model", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._wakeup:
            self._pending.append(job)
            self._wakeup.notify()

    # --- the worker thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():  # grad mode is per thread: stream_tokens is not decorated like generate()
            while (batch := self._next_batch()) is not None:
                self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        """Generate for the batch. If that fails (a bug, an input nothing caught earlier, out of memory), the jobs
        that have sent no text yet run again in two halves, each split again if it fails, until the job that fails
        alone is the only one to get the 500. Its batch-mates are answered, still in batches: one failing job among
        n costs them about log2(n) more runs, not n - 1 one-row decodes. A job that already sent text cannot start
        over and fails too; a cancelled one is dropped."""
        try:
            self._generate(batch)
        except Exception as e:
            self.stats["failed_runs"] += 1
            error = APIError(500, f"generation failed: {type(e).__name__}: {e}")
            if len(batch) == 1:
                log.exception("generation failed for request %s", batch[0].id)
                self._fail(batch[0], error)
                return
            log.warning("a batch of %d requests failed (%s: %s); running it again in halves", len(batch),
                        type(e).__name__, e, exc_info=True)
            again = []
            for job in batch:
                if job.started or job.cancelled:
                    self._fail(job, error)
                else:
                    again.append(job)
            half = (len(again) + 1) // 2
            for part in again[:half], again[half:]:
                if part:
                    self.stats["retries"] += 1
                    self._run_batch(part)

    def _fail(self, job: Job, error: APIError) -> None:
        """The 500 for a job a failed run leaves unanswered (nobody waits for a cancelled one)."""
        reason = "cancelled" if job.cancelled else "failed"
        if not job.cancelled:
            job.post(Failed(error))
        for choice in range(job.rows):
            if choice not in job.recorded:  # a choice that finished before the failure keeps its reason
                self._record(job, choice, reason, 0)

    def _record(self, job: Job, choice: int, reason: str, tokens: int) -> None:
        job.recorded.add(choice)
        self.finished.append((job.id, choice, reason, tokens))
        if reason in ("cancelled", "failed"):
            self.stats[f"{reason}_rows"] += 1

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job, plus every later one that still fits: rows <= max_batch, and the padded prompt
        plus the longest generation within the context (the KV cache is that long for every row)."""
        with self._wakeup:
            while not self._stopping and not any(not job.cancelled for job in self._pending):
                self._wakeup.wait()
            if self._stopping:
                return None
            waiting = []
            for job in self._pending:
                if not job.cancelled:
                    waiting.append(job)
                    continue
                for choice in range(job.rows):  # its client left before it was scheduled
                    self._record(job, choice, "cancelled", 0)
            batch, rest = [waiting[0]], []
            for job in waiting[1:]:
                rows = sum(j.rows for j in batch) + job.rows
                width = max(len(j.prompt_ids) for j in (*batch, job))
                longest = max(j.max_new_tokens for j in (*batch, job))
                fits = rows <= self.max_batch and width + longest <= self.context_length
                (batch if fits else rest).append(job)
            self._pending = deque(rest)
            rows = sum(job.rows for job in batch)
            self.stats.update(batches=1, rows=rows)  # here, so that a failed batch's retries do not count again
            self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
            return batch

    def _generate(self, batch: list[Job]) -> None:
        rows = [(job, choice) for job in batch for choice in range(job.rows)]
        inputs = self.processor.pad_batch([(job.prompt_ids, job.prompt_ids) for job, _ in rows],  # labels: unused
                                          [job.pixel_values for job, _ in rows], padding_side="left")
        params = [job.params[choice] for job, choice in rows]
        streams = [ChoiceStream(choice, job.params[choice], self.processor.decode) for job, choice in rows]
        # a tiled encoder (Llama 3.2 Vision) also needs each image's tile arrangement
        steps = self.model.stream_tokens(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                         inputs["image_counts"], params,
                                         aspect_ratio_ids=inputs.get("aspect_ratio_ids"))
        try:
            for tokens in steps:
                for (job, choice), stream, token in zip(rows, streams, tokens.tolist()):
                    if stream.done:
                        continue
                    if job.cancelled:
                        stream.done = True
                        self._record(job, choice, "cancelled", stream.tokens)
                        continue
                    piece = stream.add(token)
                    if piece is not None:
                        job.post(piece)
                    if stream.done:
                        self._record(job, choice, piece.finish_reason, stream.tokens)
                if all(stream.done for stream in streams):
                    break
        finally:
            steps.close()
