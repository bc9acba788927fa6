"""The batching engine: one worker thread runs the model, and requests share its forward passes (continuous batching).

The event loop never calls the model. A handler submits a Job and awaits its events; the worker hands each new piece
of text back to the loop with `call_soon_threadsafe`. Batching is iteration-level, as in vLLM and TGI: the worker
keeps one running batch (a `RunningBatch`, see tessera/serve/batch.py for how its KV cache is laid out) and, between
two decode steps,

1. admits waiting jobs, oldest first, while their rows fit in --max-batch (each choice of a request is a row): the
   newcomers' prompts are prefilled together as a batch of their own, then merged into the running batch, so they
   join at the next decode step instead of waiting for the batch to end. Newcomers that would take more than
   --prefill-chunk tokens (rows × the longest prompt) are prefilled a chunk of about that many per iteration
   instead, so the running rows keep decoding between the chunks; newcomers that fit a chunk still join at once
   beside it (an iteration then prefills up to two chunks' worth), and the others wait for it to end;
2. chooses every row's next token (each row with its own sampling settings and seeded generator) and posts the text;
3. drops the rows that finished (EOS, a stop string, their max_tokens) or whose client went away, freeing their slots
   at once;
4. runs one decode step for the rows left.

Failures are kept to the request that causes them. A prefill that fails runs again in two halves, each split again
if it fails (bisection), so only the job that fails alone gets the 500; the running rows are not involved. A decode
step that fails runs again for each half of the batch, likewise: the rows' caches are intact (a batch changes only
once a step succeeds), so the rows that can still be decoded go on where they were, even those that already sent
text, and only a row that fails alone fails (with its whole request).

`continuous=False` admits jobs only when no batch is running: static batching, as the engine did before, except
that finished rows still leave at once. It is kept as the baseline of benchmarks/continuous_batching.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.flops import image_cost_in_tokens
from tessera.generation import SamplingParams, StopChecker
from tessera.serve.batch import Prefill, RunningBatch
from tessera.serve.protocol import APIError

log = logging.getLogger("tessera.serve")


def _prefill_tokens(jobs: Sequence[Job], image_cost: float) -> float:
    """What prefilling the jobs together takes, in prompt tokens' worth: their rows × the longest prompt (the others
    are padded to it), and their images at `image_cost` each (once a request: its choices share them)."""
    return (sum(job.rows for job in jobs) * max((len(job.prompt_ids) for job in jobs), default=0)
            + image_cost * sum(len(job.pixel_values) for job in jobs))


def generation_failed(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {type(e).__name__}: {e}")


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


@dataclass
class Row:
    """One choice of a job in the running batch."""

    job: Job
    choice: int
    stream: ChoiceStream


class Engine:
    def __init__(self, model, processor, max_batch: int, continuous: bool = True, max_images: int = 0,
                 prefill_chunk: int = 0):
        """max_images: the most images a request may bring (the server's --max-images-per-prompt). Method B keeps
        image keys/values for that many per row, so that rows with more images than the running ones join without
        a copy; 0: only for as many as the batch's rows have.
        prefill_chunk: while rows are running, newcomers that would take more tokens than this (rows × the longest
        prompt, and each image at the prompt tokens its encoding is worth) are prefilled about this many at a time,
        one chunk between two decode steps (0: in one go)."""
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={prefill_chunk}: expected 0 (off) or a number of tokens")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected an integer >= 1")
        self.model = model
        self.processor = processor
        self.max_batch = max_batch
        self.max_images = max_images
        self.prefill_chunk = prefill_chunk
        self.image_cost = image_cost_in_tokens(model.config)  # prompt tokens' worth of encoding an image
        self.continuous = continuous
        self.context_length = model.config.text.max_position_embeddings
        # for tests and logs, each row counted once: rows admitted, joined_rows (admitted into a running batch),
        # prefills (groups of jobs admitted together), steps (decode steps), largest_batch (most rows in the running
        # batch), retries (runs of part of a failed prefill or step), failed_runs (retries included), failed_rows
        # (a 500), cancelled_rows, cache_copies (joins and leaves that copied the running rows' KV cache or image
        # keys/values: a join when their storage had no room, a leave when few rows stay; see tessera/serve/batch.py),
        # prefill_chunks (chunks of chunked prefills run)
        self.stats: Counter[str] = Counter()
        # every row's outcome, once: (job id, choice, reason: stop | length | cancelled | failed, tokens)
        self.finished: deque[tuple[str, int, str, int]] = deque(maxlen=1024)
        self._pending: deque[Job] = deque()
        self._batch: RunningBatch | None = None  # the running batch (worker thread only)
        self._joining: tuple[list[Job], Prefill] | None = None  # newcomers prefilled chunk by chunk (worker thread)
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

    @property
    def running_rows(self) -> int:
        return 0 if self._batch is None else len(self._batch)

    # --- the worker thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():  # grad mode is per thread
            while self._wait_for_work():
                try:
                    self.step()
                except Exception as e:  # a bug outside the model's runs, which have their own handling: the
                    log.exception("the batching engine failed")  # running rows fail, the worker goes on
                    batch, self._batch = self._batch, None
                    self._fail_all([row.job for row in batch.rows] if batch else [], e)

    def _wait_for_work(self) -> bool:
        """Block while there is nothing to do; False once the engine is stopping."""
        with self._wakeup:
            while not self._stopping and self._batch is None and self._joining is None and \
                    not any(not j.cancelled for j in self._pending):
                self._wakeup.wait()
            return not self._stopping

    def step(self) -> None:
        """One iteration: admit waiting jobs, choose and post every row's next token, drop the rows that are done,
        decode the others one step. The worker thread calls it in a loop; tests call it directly (under
        torch.inference_mode, without start()) to decide exactly when jobs arrive."""
        if self._batch is None or self.continuous:
            if self._joining is not None:
                self._join_next_chunk()
            # beside a chunked prefill, only newcomers that take no more than a chunk in one go are admitted
            self._admit(self._take_waiting(one_go_only=self._joining is not None))
        if self._batch is None:
            return
        batch = self._batch
        keep = []
        for i, (row, token) in enumerate(zip(batch.rows, batch.choose())):
            job, stream = row.job, row.stream
            if row.choice in job.recorded:  # its job failed in the meantime (another choice's row failed)
                continue
            if job.cancelled:
                self._record(job, row.choice, "cancelled", stream.tokens)
                continue
            if isinstance(token, Exception):  # e.g. sampling from logits that hold NaN
                log.error("choosing a token failed for request %s", job.id, exc_info=token)
                self._fail(job, generation_failed(token))
                continue
            piece = stream.add(token)
            if piece is not None:
                job.post(piece)
            if stream.done:
                self._record(job, row.choice, piece.finish_reason, stream.tokens)
            else:
                keep.append(i)
        # a row kept before a later choice of its request failed goes too: its request has had its 500
        keep = [i for i in keep if batch.rows[i].choice not in batch.rows[i].job.recorded]
        if len(keep) < len(batch):
            batch = batch.select(keep, in_place=True) if keep else None  # the batch before is not used again
            if batch is not None and batch.copied:
                self.stats["cache_copies"] += 1
        self._batch = self._decode(batch) if batch is not None else None

    def _take_waiting(self, one_go_only: bool = False) -> list[Job]:
        """Waiting jobs, oldest first, while their rows fit beside the running ones and those being prefilled (a job
        that does not fit waits, and so do the jobs behind it: a request with many choices is not overtaken
        forever). one_go_only: only while they take no more than --prefill-chunk tokens together."""
        free = self.max_batch - self.running_rows - (sum(job.rows for job in self._joining[0]) if self._joining else 0)
        taken = []
        with self._wakeup:
            while self._pending:
                job = self._pending[0]
                if job.cancelled:  # its client left before it was scheduled
                    self._pending.popleft()
                    for choice in range(job.rows):
                        self._record(job, choice, "cancelled", 0)
                    continue
                too_long = one_go_only and _prefill_tokens(taken + [job], self.image_cost) > self.prefill_chunk
                if job.rows > free or too_long:
                    break
                taken.append(self._pending.popleft())
                free -= job.rows
        if taken:
            self.stats.update(prefills=1, rows=sum(job.rows for job in taken))  # here: retries do not count again
        return taken

    def _admit(self, jobs: list[Job], in_one_go: bool = False) -> None:
        """Prefill the jobs and let them join. While rows are running, jobs that together take more than
        --prefill-chunk tokens (rows × the longest prompt, padding included, and their images: see _prefill_tokens)
        would stall them for the whole prefill: the most that fit are prefilled now in one go, and the others start a
        chunked prefill whose advances also take about --prefill-chunk tokens' worth (a chunk of
        prefill_chunk // rows tokens a row, or images) — unless in_one_go (a chunked prefill that failed, run again
        where a failure is bisected to its job)."""
        if not jobs:
            return
        one_go, chunked = list(jobs), []
        if self._batch is not None and self.prefill_chunk and not in_one_go:
            one_go = []
            for job in jobs:
                fits = _prefill_tokens(one_go + [job], self.image_cost) <= self.prefill_chunk
                (one_go if fits else chunked).append(job)
        if chunked:
            rows = sum(job.rows for job in chunked)
            try:
                self._joining = chunked, self._prefill_batch(chunked, chunk=max(1, self.prefill_chunk // rows))
            except Exception:  # e.g. no memory for its cache: in one go, where a failure is bisected to its job
                self.stats["failed_runs"] += 1
                log.warning("starting a chunked prefill of %d requests failed", len(chunked), exc_info=True)
                one_go += chunked
            else:
                if not one_go:  # its first chunk now (with others in one go: next time, so as not to take two)
                    self._join_next_chunk()
        if not one_go:
            return
        try:
            newcomers = self._prefill(one_go)
        except Exception as e:  # e.g. merging a bisected prefill's halves: out of the queue and not yet running,
            # these jobs would otherwise never hear back; the running rows go on
            log.exception("admitting %d requests failed", len(one_go))
            self._fail_all(one_go, e)
            return
        if newcomers is not None:
            self._join(one_go, newcomers)

    def _join_next_chunk(self) -> None:
        """The next chunk of the newcomers' prefill; after the last, they join. With no rows running, nothing waits
        for the chunks: they all run now. If a chunk fails, the newcomers are prefilled again in one go, where a
        failure is bisected to the job that causes it. Newcomers who have all been cancelled are dropped."""
        jobs, prefill = self._joining
        if all(job.cancelled for job in jobs):
            self._joining = None
            for job in jobs:
                for choice in range(job.rows):
                    self._record(job, choice, "cancelled", 0)
            return
        chunks, newcomers, failed = prefill.chunks, None, False
        try:
            newcomers = prefill.advance() if self._batch is not None else prefill.finish()
        except Exception:
            failed = True
            self.stats["failed_runs"] += 1
            log.warning("a chunked prefill of %d requests failed; running it again in one go", len(jobs),
                        exc_info=True)
        self.stats["prefill_chunks"] += prefill.chunks - chunks
        if failed:  # out of the except block, and dropped: its cache is let go before the retry takes another
            self._joining = prefill = None
            self._admit(jobs, in_one_go=True)
        elif newcomers is not None:
            self._joining = None
            self._join(jobs, newcomers)

    def _join(self, jobs: list[Job], newcomers: RunningBatch) -> None:
        """The prefilled newcomers join the running batch (or become it)."""
        try:
            merged = newcomers if self._batch is None else self._batch.merge(newcomers)
        except Exception as e:  # e.g. out of memory for the larger cache: the running rows go on
            log.exception("admitting %d requests failed", len(jobs))
            self._fail_all(jobs, e)
            return
        if self._batch is not None:
            self.stats["joined_rows"] += len(newcomers)
            if merged.copied:
                self.stats["cache_copies"] += 1
        self._batch = merged
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self._batch))

    def _prefill(self, jobs: list[Job]) -> RunningBatch | None:
        """The jobs' prompts as one batch of their own. If that fails (a bug, an input nothing caught earlier, out of
        memory), they run again in two halves, each split again if it fails, until the job that fails alone is the
        only one to get the 500; the others join the batch: one failing job among n costs them about log2(n) more
        prefills, not n - 1 one-row runs. A cancelled job is dropped. None if none of them could be prefilled."""
        try:
            return self._prefill_batch(jobs)
        except Exception as e:
            self.stats["failed_runs"] += 1
            error = generation_failed(e)
            if len(jobs) == 1:
                log.exception("generation failed for request %s", jobs[0].id)
                self._fail(jobs[0], error)
                return None
            log.warning("the prefill of %d requests failed (%s: %s); running it again in halves", len(jobs),
                        type(e).__name__, e, exc_info=True)
        # out of the except block: the failed prefill's cache, which its traceback holds, is let go before the halves
        again = []
        for job in jobs:
            if job.cancelled:
                self._fail(job, error)
            else:
                again.append(job)
        half = (len(again) + 1) // 2
        return self._retry([part for part in (again[:half], again[half:]) if part], self._prefill)

    def _prefill_batch(self, jobs: list[Job], chunk: int = 0) -> RunningBatch | Prefill:
        """The jobs' rows prefilled (chunk=0), or a Prefill that runs `chunk` tokens at each advance()."""
        rows = [Row(job, choice, ChoiceStream(choice, job.params[choice], self.processor.decode))
                for job in jobs for choice in range(job.rows)]
        inputs = self.processor.pad_batch([(row.job.prompt_ids, row.job.prompt_ids) for row in rows],  # labels: unused
                                          [row.job.pixel_values for row in rows], padding_side="left")
        sources = [n - row.choice for n, row in enumerate(rows)]  # a request's choices share its images: encoded once
        prefill = Prefill(self.model, rows, [row.job.params[row.choice] for row in rows], inputs,
                          capacity=self.max_batch, image_room=self.max_images, chunk=chunk, image_sources=sources)
        return prefill if chunk else prefill.finish()

    def _decode(self, batch: RunningBatch) -> RunningBatch | None:
        """One decode step of the batch. If it fails, each half of the batch runs the step again (and so on): the
        rows that can be decoded go on, and a row that fails alone fails its request — even one that has sent text,
        which cannot start over. None if no row is left."""
        try:
            self._step_batch(batch)
            self.stats["steps"] += 1
            return batch
        except Exception as e:
            self.stats["failed_runs"] += 1
            error = generation_failed(e)
            if len(batch) == 1:
                log.exception("generation failed for request %s", batch.rows[0].job.id)
                self._fail(batch.rows[0].job, error)
                return None
            log.warning("a decode step of %d rows failed (%s: %s); running it again in halves", len(batch),
                        type(e).__name__, e, exc_info=True)
            half = (len(batch) + 1) // 2
            return self._retry([batch.select(range(half)), batch.select(range(half, len(batch)))], self._decode)

    def _step_batch(self, batch: RunningBatch) -> None:
        batch.step()

    def _retry(self, parts: list, run) -> RunningBatch | None:
        """run() on each part of a failed run (jobs, or a batch's rows), the batches it gives merged into one."""
        merged = None
        for part in parts:
            self.stats["retries"] += 1
            done = run(part)
            if done is None:
                continue
            try:
                merged = done if merged is None else merged.merge(done)
            except Exception as e:  # e.g. no memory for the merged cache: this part's rows fail, the others go on
                log.exception("merging the parts of a run that was split failed")
                self._fail_all([row.job for row in done.rows], e)
        return merged

    def _fail_all(self, jobs: list[Job], e: Exception) -> None:
        for job in jobs:  # a job listed twice (one row per choice) is answered once: _fail skips it then
            self._fail(job, generation_failed(e))

    def _fail(self, job: Job, error: APIError) -> None:
        """The 500 for a job a failed run leaves unanswered (nobody waits for a cancelled one, nor for one whose
        choices have all finished)."""
        if len(job.recorded) == job.rows:
            return
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
