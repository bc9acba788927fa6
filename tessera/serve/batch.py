"""The running batch of continuous (iteration-level) batching: the rows decoding together, and the three ways it
changes between decode steps — rows join (`prefill` + `merge`), rows leave (`select`), every row takes a step.

One KV cache holds every row, right-aligned: its last slot is each row's latest token, and a row holding fewer
tokens than the cache is long has masked padding in its first slots. A row's real tokens are always contiguous and
its positions count only its own tokens, so where a row sits in the cache changes nothing it computes (a sliding
window, counted in slots, spans the same tokens as alone).

- prefill: newcomers run their prompts as their own left-padded batch with their own cache. Their images are
  encoded here, and a request that cannot be run fails here, before it touches the running rows.
- merge: two batches become one, in a cache as long as the longer of the two (the shorter side gets padding in
  front) and with room for the longest generation still to come. The cache is a view of a larger storage, with rows
  for the server's whole `--max-batch` and half as many slots again as first needed: the shorter side's rows are
  written into the longer side's spare rows, and the running rows are not copied. Only when the storage has no
  room are both sides copied into new storage. (Copying had cost a join about two decode steps: 37–40 ms for 8 rows
  of 789 tokens of the benchmark model, against 16–17 ms a step.) The room is not reserved where the memory
  available could not fill it (see `_new_storage`).
- select: rows that finished or were cancelled leave (every per-row tensor and list keeps the chosen rows). A kept
  row past the new row count moves into a row that was left; the others stay where they are. Leading slots that
  have become padding for every row left are cut by starting the view later, so the cache is never longer than
  the longest row in it. Once a quarter of the rows the storage has held or fewer are left, they are copied into
  new storage, and the memory the others had written is given back.
- step: each row's chosen token goes through the model, giving each row's next logits.

Each row chooses its tokens from its own logits with its own SamplingParams and seeded generator, consumed once per
token as when the request runs alone, so a row's answer does not depend on who joins or leaves around it.

Method B's image keys and values (`cache.cross`) follow their rows the same way, in storage of their own
(`cross_storage`, one key and one value tensor per gated block). Their image-group dimension is padded with zero keys
that no token may see (real=False), as a static batch pads a sample with fewer images, and is trimmed (the view
made shorter) when the rows that had the most images leave. A row without images attends to nothing and its gated
blocks add exactly zero, as when the request runs alone (and skips them). A join writes the newcomers' rows into the
storage's spare rows when it has room for them and for their image groups; a prefill's own keys/values have no
room, so the first join into a batch copies its rows once, into storage with room for `--max-batch` rows. (For
Llama 3.2 Vision a row's keys/values are ~210 MB in bf16 per image: copied at every join, they would cost about
what a decode step does.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tessera.flops import image_encoding_flops, image_keys_values_flops, prompt_token_flops
from tessera.generation import SamplingParams, next_tokens
from tessera.memory import available_memory
from tessera.text import cache as text_cache  # its `unzeroed` looked up at call time: tests poison it
from tessera.text.cache import CrossAttentionState, KVCache


class RunningBatch:
    """Rows at the same point of their loop: either each has logits to choose its next token from (`logits`), or
    each has chosen it and waits for the step that feeds it (`tokens`). `rows` holds the caller's object per row."""

    def __init__(self, model, rows: list[Any], params: list[SamplingParams],
                 generators: list[torch.Generator | None], generated: list[int], storage: KVCache, start: int,
                 length: int, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor | None,
                 tokens: torch.Tensor | None = None):
        self.model = model
        self.rows, self.params, self.generators, self.generated = rows, params, generators, generated
        # the batch's cache is a view of the first len(rows) rows of `storage`, from slot `start` on; the rows and
        # slots past it are room for rows to join without a copy
        self.storage, self.start = storage, start
        self.cache = storage.view(len(rows), start, length)
        # Method B: layer → (keys, values) whose first len(rows) rows and first image groups `cache.cross` views;
        # empty while no row has images
        self.cross_storage: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.image_room = 0  # the most images a row may bring: the image groups new cross storage has room for
        self.copied = False  # whether making this batch copied the rows of the batch it was made from (stats)
        self.rows_written = len(rows)  # the most rows the storage has held: what a leave could give back
        self.mask = mask  # (rows, cache.length): 1 for a real token, 0 for padding
        self.positions = positions  # (rows, 1): the position of each row's next token
        self.logits = logits  # (rows, vocab) or None
        self.tokens = tokens  # (rows,) or None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return self.cache.length

    # --- rows join ---------------------------------------------------------------------------------------------
    @classmethod
    def prefill(cls, model, rows: list[Any], params: Sequence[SamplingParams], inputs: dict[str, torch.Tensor],
                capacity: int = 0, image_room: int = 0) -> RunningBatch:
        """Run the (left-padded) prompts of `inputs` (the processor's pad_batch) with a cache of their own, with
        storage for `capacity` rows (the most the batch may grow to) and, for Method B, image keys/values for
        `image_room` images a row (the most a request may bring)."""
        return Prefill(model, rows, params, inputs, capacity, image_room).finish()

    def merge(self, other: RunningBatch) -> RunningBatch:
        """Both batches' rows in one batch, right-aligned in a cache as long as the longer. When the longer batch's
        storage has room for the other's rows and for every row's remaining tokens, the other's rows are written
        into it and the longer's stay where they are (its rows come first, and that batch is used up). Otherwise
        both are copied into new storage (self's rows first). Method B's image keys/values follow the same order,
        and stay in place only if the longer's image storage too has room for every row and image group."""
        self._check_usable()
        other._check_usable()
        length = max(self.length, other.length)
        rows = len(self) + len(other)
        slots = length + max(_room(self), _room(other))
        host, guest = (self, other) if self.length >= other.length else (other, self)
        in_place = rows <= host.storage.keys.shape[1] and host.start + slots <= host.storage.max_length
        if in_place:
            parts, storage, start = (host, guest), host.storage, host.start
        else:
            parts, start = (self, other), 0
            storage = _new_storage(self.model, rows, slots, max(self.capacity, other.capacity))
        first_row = len(host) if in_place else 0
        for part in parts[1:] if in_place else parts:
            end_row, offset = first_row + len(part), length - part.length
            for new, old in (storage.keys, part.cache.keys), (storage.values, part.cache.values):
                new[:, first_row:end_row, :, start + offset:start + length] = old[:, :, :, :part.length]
                # padding in front: masked, but attention still multiplies it by a zero weight, so never NaN
                new[:, first_row:end_row, :, start:start + offset] = 0
            first_row = end_row
        a, b = parts
        merged = RunningBatch(self.model, a.rows + b.rows, a.params + b.params, a.generators + b.generators,
                              a.generated + b.generated, storage, start, length,
                              torch.cat([F.pad(part.mask, (length - part.length, 0)) for part in parts]),
                              torch.cat([a.positions, b.positions]), _cat(a.logits, b.logits), _cat(a.tokens, b.tokens))
        merged.image_room = max(self.image_room, other.image_room)
        merged.cache.cross, merged.cross_storage, cross_copied = _merge_cross(parts, in_place, merged.capacity)
        merged.copied = not (in_place and host is self) or (cross_copied and bool(self.cross_storage))
        if in_place:
            merged.rows_written = max(host.rows_written, rows)
            host.storage = None  # its rows belong to the merged batch now (only once all of it has succeeded)
        return merged

    # --- rows leave --------------------------------------------------------------------------------------------
    def select(self, keep: Sequence[int], in_place: bool = False) -> RunningBatch:
        """A batch of the rows at these indices, without the leading slots that are padding for all of them.

        in_place: the kept rows stay in this batch's storage (it is then used up) and a kept row past the new row
        count moves into a row that was left, so only those rows are copied; the new batch's rows are in that
        order, not `keep`'s. Not when a quarter of the rows the storage has held or fewer are kept: those few are
        copied into new storage (if it can be had), which gives back the memory the others' rows had taken.
        Otherwise the kept rows are copied into new storage, in `keep`'s order (two batches selected from one, as a
        failed step's halves are, must not share storage). `copied` on the new batch says which happened."""
        self._check_usable()
        keep = list(keep)
        real = self.mask[keep].bool().any(0).nonzero()
        first = int(real[0]) if len(real) else self.length
        length = self.length - first
        storage = cross_storage = None
        # a quarter of the rows written or fewer left: copied, so that the memory the others' rows took is given
        # back — unless that memory cannot be had (the KV cache's or the image keys/values'); in place, a leave
        # needs none
        if not in_place or 4 * len(keep) <= self.rows_written:
            try:
                storage = _new_storage(self.model, len(keep), length + _room_for(
                    [self.params[i] for i in keep], [self.generated[i] for i in keep]), self.capacity)
                cross_storage = _cross_storage_for(self, keep, storage.keys.shape[1])
            except RuntimeError:
                if not in_place:
                    raise
                storage = None
        if storage is None:
            kept, count = set(keep), len(keep)
            movers = iter(i for i in keep if i >= count)
            keep = [i if i in kept else next(movers) for i in range(count)]
            storage, start = self.storage, self.start + first
            moves = [(i, row) for row, i in enumerate(keep) if i != row]
            slots = slice(start, self.start + self.length)
            for t in (storage.keys, storage.values):
                for old_row, new_row in moves:
                    t[:, new_row, :, slots] = t[:, old_row, :, slots]
        else:
            start = 0
            # run by run of consecutive rows: indexing by a list would gather into a temporary first (a second copy)
            row = 0
            for run_start, run_end in _runs(keep):
                end = row + run_end - run_start
                for new, old in (storage.keys, self.cache.keys), (storage.values, self.cache.values):
                    new[:, row:end, :, :length] = old[:, run_start:run_end, :, first:self.length]
                row = end
        in_place = storage is self.storage
        cross = _select_cross(self, keep, None if in_place else cross_storage)
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        picked = [self.params[i] for i in keep], [self.generated[i] for i in keep]
        selected = RunningBatch(self.model, [self.rows[i] for i in keep], picked[0],
                                [self.generators[i] for i in keep], picked[1], storage, start, length,
                                mask[:, first:], self.positions[index],
                                None if self.logits is None else self.logits[index],
                                None if self.tokens is None else self.tokens[index])
        selected.image_room = self.image_room
        selected.cache.cross, selected.cross_storage = cross
        selected.copied = not in_place
        if in_place:
            selected.rows_written = self.rows_written
            self.storage = None  # its rows belong to the selected batch now
        return selected

    @property
    def capacity(self) -> int:
        """The most rows this batch's storage holds."""
        return self.storage.keys.shape[1] if self.storage is not None else len(self)

    def _check_usable(self) -> None:
        if self.storage is None:
            raise RuntimeError("this batch's rows were handed in place to a batch made from it; use that one")

    # --- decoding ----------------------------------------------------------------------------------------------
    def choose(self) -> list[int | Exception]:
        """Each row's next token, from its logits, with its own settings and random stream — or the exception that
        choosing it raised (the row must then leave before the next step)."""
        chosen = []
        for i, (p, g) in enumerate(zip(self.params, self.generators)):
            try:
                chosen.append(int(next_tokens(self.logits[i:i + 1], p, g)))
            except Exception as e:
                chosen.append(e)
        self.tokens = torch.tensor([t if isinstance(t, int) else 0 for t in chosen], device=self.logits.device)
        self.logits = None
        self.generated = [n + 1 for n in self.generated]
        return chosen

    def step(self) -> None:
        """Feed each row's chosen token. The batch changes only once the forward has succeeded: after a failure the
        same rows can run again (the cache slot a failed forward wrote to is past `length`, and is written again)."""
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=-1)
        forward = self.model._decode_step or self.model  # compiled when the model is (MultimodalLM.compile)
        length = self.cache.length
        try:
            logits = forward(self.tokens[:, None], mask, position_ids=self.positions, cache=self.cache).logits[:, -1]
        except BaseException:  # the decoder counts the new slot before its final norm and head, which may fail
            self.cache.length = length
            raise
        self.mask, self.positions, self.logits, self.tokens = mask, self.positions + 1, logits, None


class Prefill:
    """Newcomers' prompts run as their own left-padded batch, with a cache of their own — in one forward, or about
    `chunk` tokens a row at a time (`advance`), so that a server can decode its running rows between the chunks of
    a long prompt (see MultimodalLM.prefill_in_chunks). After the last chunk it is a RunningBatch.

    The images are encoded first, each image a request's rows share once (the n choices of one request have the same
    images). An advance does about a chunk's worth of work, an image counted at the prompt tokens its encoding is
    worth (`image_cost_in_tokens`: ~30 for LLaVA 1.5, ~1,150 for a 4-tile Llama 3.2 Vision image, more than two
    512-token chunks): images that take more than a chunk are encoded in advances of their own, at least one image
    each, and images that take less leave the rest of the chunk to the prompt's first tokens (Method B's keys and
    values of the images count with the first chunk, which makes them). The encoded images are let go once the
    model has placed them."""

    def __init__(self, model, rows: list[Any], params: Sequence[SamplingParams], inputs: dict[str, torch.Tensor],
                 capacity: int = 0, image_room: int = 0, chunk: int = 0, image_sources: Sequence[int] | None = None):
        """image_sources: for each row, the row whose images it has (its request's first row); default its own."""
        for p in params:
            p.check_vocabulary(model.config.text.vocab_size)
        self.model, self.rows, self.params, self.inputs = model, list(rows), list(params), inputs
        self.image_room = image_room
        input_ids = inputs["input_ids"]
        self.storage = _new_storage(model, len(rows), input_ids.shape[1] + max(p.max_new_tokens for p in params),
                                    capacity)
        self.cache = self.storage.view(len(rows))
        self.chunk, self.chunks = chunk, 0  # tokens a row a chunk (0: all in one go); advances run so far
        self._chunks = None  # the model's prefill_in_chunks, from the first advance() that reaches the text
        self._distinct, self._gather = _distinct_images(inputs["image_counts"], image_sources or range(len(rows)))
        self._features: list[torch.Tensor] = []  # the distinct images encoded so far, in groups (until placed)
        self._encoded = 0
        per_token = prompt_token_flops(model.config)
        self.image_cost = image_encoding_flops(model.config) / per_token  # encoding a distinct image
        # Method B: each row's image keys and values, made with the first chunk (a row of its own for each choice)
        row_images = sum(map(int, inputs["image_counts"]))
        self.keys_values_cost = image_keys_values_flops(model.config) / per_token * row_images

    def advance(self, rest: bool = False) -> RunningBatch | None:
        """Run about the next chunk's worth — or, with rest, everything left (the images in one encoding, the text in
        one forward): the batch after the last chunk, else None."""
        length, rows = self.inputs["input_ids"].shape[1], len(self.rows)
        rest = rest or not self.chunk
        budget = self.chunk * rows  # prompt tokens' worth, for the whole batch
        encoding = self._encode_images(None if rest else budget)
        if self._encoded < len(self._distinct):
            self.chunks += 1  # images only this time
            return None
        if self._chunks is None:
            text = length if rest else int((budget - encoding - self.keys_values_cost) // rows)
            if text < 1:
                if encoding:  # the text (and the keys/values) from the next advance
                    self.chunks += 1
                    return None
                text = 1  # the keys/values alone are worth more than a chunk: one token a row beside them
            features, self._features = self._image_features(), []  # placed by the model, then let go
            self._chunks = self.model.prefill_in_chunks(
                self.inputs["input_ids"], self.inputs["attention_mask"], self.cache, text,
                image_features=features, image_counts=self.inputs["image_counts"],
                aspect_ratio_ids=self.inputs.get("aspect_ratio_ids"))
            del features
            logits = next(self._chunks)
        else:
            logits = self._chunks.send(length if rest else self.chunk)
        self.chunks += 1  # (one that raised is not counted)
        return None if logits is None else self._batch(logits)

    def finish(self) -> RunningBatch:
        """Run everything left: the images in one encoding, the text in one forward."""
        return self.advance(rest=True)

    def _encode_images(self, budget: int | None) -> float:
        """Encode the next group of distinct images: those that fit `budget` (at least one), or with None every one
        left. What that cost, in prompt tokens' worth."""
        done = self._encoded
        left = len(self._distinct) - done
        if not left:
            return 0.0
        take = left if budget is None else min(left, max(1, int(budget // self.image_cost)))
        # distinct images are a run of pixel_values unless rows share them: a slice then, not a copy
        chosen = slice(done, done + take) if self._gather is None else self._distinct[done:done + take]
        ratio_ids = self.inputs.get("aspect_ratio_ids")
        self._features.append(self.model.encode_images(
            self.inputs["pixel_values"][chosen], None if ratio_ids is None else ratio_ids.reshape(-1)[chosen]))
        self._encoded += take
        return take * self.image_cost

    def _image_features(self) -> torch.Tensor | None:
        """Every row's image features, in the batch's order (a shared image's features repeated for each row)."""
        if not self._features:
            return None
        features = torch.cat(self._features) if len(self._features) > 1 else self._features[0]
        return features if self._gather is None else features[self._gather]

    def _batch(self, logits: torch.Tensor) -> RunningBatch:
        attention_mask = self.inputs["attention_mask"]
        batch = RunningBatch(self.model, self.rows, self.params, [p.generator(self.model.device) for p in self.params],
                             [0] * len(self.rows), self.storage, 0, self.cache.length, attention_mask,
                             attention_mask.long().sum(-1, keepdim=True), logits)
        batch.image_room = self.image_room
        # the model's own image keys/values (see _own), without room: the first join this batch hosts moves them into
        # storage with room, and a newcomer batch that joins as the guest is written into the host's
        cross = self.cache.cross
        cross.keys_values = {layer: (_own(k), _own(v)) for layer, (k, v) in cross.keys_values.items()}
        batch.cache.cross, batch.cross_storage = cross, dict(cross.keys_values)
        return batch


def _distinct_images(image_counts: torch.Tensor, sources: Sequence[int]) -> tuple[list[int], torch.Tensor | None]:
    """The batch's images to encode — those of rows that are their own source, as indices into pixel_values — and
    for every image of every row, in order, its distinct image's place among them (None: every image is its own)."""
    counts = [int(c) for c in image_counts]
    starts = [sum(counts[:row]) for row in range(len(counts))]
    distinct = [starts[row] + k for row, source in enumerate(sources) if source == row for k in range(counts[row])]
    if len(distinct) == sum(counts):
        return distinct, None
    place = {image: n for n, image in enumerate(distinct)}
    return distinct, torch.tensor([place[starts[source] + k] for source in sources for k in range(counts[source])])


def _new_storage(model, rows: int, slots: int, capacity: int = 0) -> KVCache:
    """KV storage for `rows` rows and `slots` slots — with room for up to `capacity` rows and half as many slots
    again, so that later rows join without a copy, where `_room_fits` allows it."""
    text = model.config.text
    roomy = max(rows, capacity), slots + slots // 2
    size = (2 * text.num_layers * roomy[0] * text.num_kv_heads * roomy[1] * text.head_dim
            * model.dtype.itemsize)
    if _room_fits(model, size):
        try:
            return KVCache(text, *roomy, model.dtype, model.device)
        except RuntimeError:  # e.g. "DefaultCPUAllocator: can't allocate memory" for the address space
            pass
    return KVCache(text, rows, slots, model.dtype, model.device)


def _room_fits(model, size: int) -> bool:
    """Whether storage of `size` bytes with room to grow may be tried (a refused allocation then falls back to just
    what is needed). Pages never written are never touched: the room takes address space, not memory — in the
    CPU's memory. A GPU's allocator hands out memory, not address space, and the memory figures read here are the
    host's, so there the storage is just what is needed (joins copy); so too on the CPU where so much address space
    may be refused: when the room would be more than half the memory available now."""
    memory = available_memory() if torch.device(model.device).type == "cpu" else (0, 0)
    return memory is None or size <= memory[0] // 2


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive stretches of `indices`, as [start, end) pairs: [0, 1, 2, 5, 6] → [(0, 3), (5, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _room_for(params: Sequence[SamplingParams], generated: Sequence[int]) -> int:
    """Cache slots the rows may still need: at most one per token still to generate."""
    return max((p.max_new_tokens - n for p, n in zip(params, generated)), default=0)


def _room(batch: RunningBatch) -> int:
    return _room_for(batch.params, batch.generated)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if (a is None) != (b is None):
        raise ValueError("merging a batch that has chosen its tokens with one that has not")
    return None if a is None else torch.cat([a, b])


# --- Method B: the image keys/values of each row --------------------------------------------------------------------
def _per_group(state: CrossAttentionState) -> int:
    """Key slots per image group (an image, or an image tile)."""
    return next(iter(state.keys_values.values()))[0].shape[2] // state.real.shape[1]


def _new_cross_storage(model, like: CrossAttentionState, rows: int, slots: int, capacity: int = 0,
                       image_room: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Image key/value storage for `rows` rows of `slots` key slots, shaped like `like`'s, with room for up to
    `capacity` rows of `image_room` images each where `_room_fits` allows it."""
    k = next(iter(like.keys_values.values()))[0]

    def make(rows, slots):
        shape = (rows, k.shape[1], slots, k.shape[3])
        return {layer: tuple(text_cache.unzeroed(shape, k.dtype, k.device) for _ in range(2))
                for layer in like.keys_values}

    config = model.config
    groups_per_image = config.vision.max_num_tiles if config.tiled_images else 1
    roomy = max(rows, capacity), max(slots, image_room * groups_per_image * _per_group(like))
    size = 2 * len(like.keys_values) * roomy[0] * k.shape[1] * roomy[1] * k.shape[3] * k.dtype.itemsize
    if roomy != (rows, slots) and _room_fits(model, size):
        try:
            return make(*roomy)
        except RuntimeError:  # the address space refused
            pass
    return make(rows, slots)


def _merge_cross(parts: Sequence[RunningBatch], in_place: bool, capacity: int
                 ) -> tuple[CrossAttentionState, dict[int, tuple[torch.Tensor, torch.Tensor]], bool]:
    """The parts' image state stacked by row (the first part's rows first), image groups padded to the most any part
    has, and its storage. In place (the first part's KV storage is handed on): the first part's rows stay where they
    are if its storage has room for every row and group, and the other part's rows are written into its spare rows.
    Otherwise every row is written into new storage. Returns (state, storage, whether the first part's rows were
    copied)."""
    states = [part.cache.cross for part in parts]
    with_images = [s for s in states if s.keys_values]
    if not with_images:
        return CrossAttentionState(), {}, False
    per_group = _per_group(with_images[0])
    groups = max(s.real.shape[1] for s in with_images)
    rows, slots = sum(len(part) for part in parts), groups * per_group
    storage = parts[0].cross_storage if in_place else {}
    first = next(iter(storage.values()))[0] if storage else None
    kept = first is not None and rows <= first.shape[0] and slots <= first.shape[2]
    if not kept:
        storage = _new_cross_storage(parts[0].model, with_images[0], rows, slots, capacity,
                                     max(part.image_room for part in parts))
    row = 0
    for i, (part, state) in enumerate(zip(parts, states)):
        end = row + len(part)
        own = state.real.shape[1] * per_group if state.keys_values else 0
        for layer, pair in storage.items():
            for which, new in enumerate(pair):
                if own and not (kept and i == 0):
                    new[row:end, :, :own] = state.keys_values[layer][which]
                # the groups this part lacks: keys nobody sees, but attention still multiplies them by a zero
                # weight, so they must be finite (the storage is not zeroed, and may hold a departed row's)
                new[row:end, :, own:slots] = 0
        row = end
    merged = CrossAttentionState({layer: (k[:rows, :, :slots], v[:rows, :, :slots])
                                  for layer, (k, v) in storage.items()})
    for name in ("visible", "real"):
        pieces = []
        for part, state in zip(parts, states):
            if state.keys_values:
                t = getattr(state, name)
                pieces.append(F.pad(t, (0, groups - t.shape[1]), value=False))
            else:
                pieces.append(torch.zeros(len(part), groups, dtype=torch.bool, device=with_images[0].real.device))
        setattr(merged, name, torch.cat(pieces))
    return merged, storage, not kept


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` holding only its own memory: a view into a larger tensor (the values `chunk` cuts from a joint key/value
    projection) would keep all of it alive, and is copied out. Detached: a leave moves rows within it, which
    autograd refuses on such views."""
    t = t.detach()
    return t if t.untyped_storage().nbytes() <= t.numel() * t.element_size() else t.clone()


def _kept_groups(batch: RunningBatch, keep: Sequence[int]) -> int:
    """The image groups the rows `keep` need: up to the last one any of them has (0: none has an image)."""
    state = batch.cache.cross
    if not state.keys_values:
        return 0
    used = state.real[list(keep)].any(0).nonzero()
    return int(used[-1]) + 1 if len(used) else 0


def _cross_storage_for(batch: RunningBatch, keep: Sequence[int], capacity: int
                       ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """New image key/value storage for the rows `keep` (none if they have no image)."""
    groups = _kept_groups(batch, keep)
    if not groups:
        return {}
    state = batch.cache.cross
    return _new_cross_storage(batch.model, state, len(keep), groups * _per_group(state), capacity, batch.image_room)


def _select_cross(batch: RunningBatch, keep: list[int], storage: dict[int, tuple[torch.Tensor, torch.Tensor]] | None
                  ) -> tuple[CrossAttentionState, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """The image state of the rows `keep` (in its order), without the trailing image groups none of them has, and
    its storage: `storage` (from `_cross_storage_for`) with the kept rows copied into it, or with None, the batch's
    own, where rows move as in the KV storage (`keep` fills the left rows' places). No row with an image left: no
    state, as a batch without images has."""
    state = batch.cache.cross
    groups = _kept_groups(batch, keep)
    if not groups:
        return CrossAttentionState(), {}
    slots = groups * _per_group(state)
    if storage is None:
        storage = batch.cross_storage
        for pair in storage.values():
            for t in pair:
                for new_row, old_row in enumerate(keep):
                    if new_row != old_row:
                        t[new_row, :, :slots] = t[old_row, :, :slots]
    else:
        for layer, pair in storage.items():
            for new, old in zip(pair, state.keys_values[layer]):
                row = 0
                for run_start, run_end in _runs(keep):
                    end = row + run_end - run_start
                    new[row:end, :, :slots] = old[run_start:run_end, :, :slots]
                    row = end
    rows, index = len(keep), torch.tensor(keep, dtype=torch.long, device=state.real.device)
    keys_values = {layer: (k[:rows, :, :slots], v[:rows, :, :slots]) for layer, (k, v) in storage.items()}
    return CrossAttentionState(keys_values, state.visible[index, :groups], state.real[index, :groups]), storage
