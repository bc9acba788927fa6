"""Continuous batching (tessera/serve/batch.py, tessera/serve/engine.py), driven step by step: requests join a running
batch at chosen decode steps, rows leave when they finish or are cancelled, and every answer equals the request's
answer from `MultimodalLM.generate` alone — greedy and seeded, Method A and Method B, with and without images."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tessera.generation import SamplingParams
from tessera.serve.app import load_checkpoint
from tessera.serve.engine import Engine, Failed, Job
from tests.test_serve import CORPUS, _noise, make_checkpoint


@pytest.fixture(scope="module", params=["unified", "cross"])
def served(request, tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp(f"batching-{request.param}") / "ck", request.param)
    return load_checkpoint(directory)


class SpyEngine(Engine):
    """Keeps every row's ChoiceStream (its tokens and finish reason), and can fail the model at chosen moments."""

    def __init__(self, *args, fail_step=None, fail_prefill=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams = {}
        self.fail_step, self.fail_prefill = fail_step, fail_prefill
        self.batch_sizes = []  # rows of every decode step

    def _prefill_batch(self, jobs, chunk=0):
        if self.fail_prefill is not None and self.fail_prefill(jobs):
            raise RuntimeError("prefill failed")
        batch = super()._prefill_batch(jobs, chunk)
        self.streams.update({(row.job.id, row.choice): row.stream for row in batch.rows})
        return batch

    def _step_batch(self, batch):
        if self.fail_step is not None and self.fail_step(batch):
            raise RuntimeError("decode step failed")
        super()._step_batch(batch)
        self.batch_sizes.append(len(batch))


def make_request(processor, rng: random.Random, index: int, images: int) -> tuple[list[int], list[torch.Tensor]]:
    question = CORPUS[index % 4][: rng.randint(4, 40)]
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    ids = processor.encode([{"role": "user", "content": content}], add_generation_prompt=True)[0]
    pixels = [processor.preprocess_image(Image.fromarray(_noise(rng.randint(10, 30), rng.randint(10, 30),
                                                                seed=1000 + 7 * index + k)))
              for k in range(images)]
    return ids, pixels


def alone(model, processor, prompt_ids, pixels, params: SamplingParams):
    """The request by itself through MultimodalLM.generate: (tokens without EOS, finish reason, text)."""
    inputs = processor.pad_batch([(prompt_ids, prompt_ids)], [pixels], padding_side="left")
    out = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                         inputs["image_counts"], aspect_ratio_ids=inputs.get("aspect_ratio_ids"),
                         max_new_tokens=params.max_new_tokens,
                         temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
                         stop_strings=params.stop_strings, eos_token_id=list(params.eos_token_ids),
                         tokenizer=processor, suppress_token_ids=params.suppress_token_ids)
    return out.sequences[0], out.finish_reasons[0], out.texts[0]


def drive(engine: Engine, arrivals: dict[int, list], cancels: dict[int, list] | None = None, limit: int = 500):
    """Run the engine step by step in this thread: at step k, the jobs of arrivals[k] are submitted and those of
    cancels[k] cancelled first. Returns each job's events per choice: (text, finish reason or 'failed', tokens)."""
    cancels = cancels or {}

    async def run():
        jobs = {}
        for k in range(limit):
            for make in arrivals.get(k, []):
                job = make()
                jobs[job.id] = job
                engine.submit(job)
            for job_id in cancels.get(k, []):
                jobs[job_id].cancel()
            with torch.inference_mode():
                engine.step()
            await asyncio.sleep(0)
            if k > max(arrivals) and engine.running_rows == 0 and not engine._pending and engine._joining is None:
                break
        else:
            raise AssertionError("the engine did not finish")
        await asyncio.sleep(0)
        results = {}
        for job_id, job in jobs.items():
            texts, reasons = [""] * job.rows, [None] * job.rows
            while not job.events.empty():
                event = job.events.get_nowait()
                if isinstance(event, Failed):
                    reasons = ["failed" if r is None else r for r in reasons]
                    continue
                texts[event.choice] += event.text
                reasons[event.choice] = event.finish_reason
            results[job_id] = list(zip(texts, reasons))
        return results

    return asyncio.run(run())


def scenario(model, processor, seed: int, count: int = 12):
    """count requests with random prompts (0-2 images), lengths, arrival steps and endings: some stop on a stop
    string or on an EOS token taken from their own answer, some are sampled with a seed and n=2, some cancelled."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        ids, pixels = make_request(processor, rng, i, rng.choice([0, 0, 1, 2]))
        max_new = rng.randint(2, 24)
        sampled = rng.random() < 0.25
        base = model.sampling_params(max_new_tokens=max_new, temperature=0.9 if sampled else 0.0,
                                     top_p=0.9 if sampled else 1.0, seed=rng.randint(0, 99) if sampled else None)
        n = 2 if sampled else 1
        ending = rng.choice(["length", "length", "stop_string", "eos"]) if not sampled else "length"
        tokens, _, text = alone(model, processor, ids, pixels, base)
        if ending == "stop_string" and len(text) > 6:
            start = rng.randint(1, len(text) - 3)
            base = SamplingParams(**{**vars(base), "stop_strings": (text[start:start + 2],)})
        elif ending == "eos" and len(tokens) > 2:
            stop_token = tokens[rng.randint(1, len(tokens) - 1)]
            base = SamplingParams(**{**vars(base), "eos_token_ids": (*base.eos_token_ids, stop_token)})
        params = [SamplingParams(**{**vars(base), "seed": None if base.seed is None else base.seed + c})
                  for c in range(n)]
        specs.append((f"job{i}", ids, pixels, params, rng.randint(0, 30)))
    cancelled = {f"job{i}": rng.randint(1, 8) for i in rng.sample(range(count), 2)}
    return specs, cancelled


def _by_hand(names, max_new_tokens: int):
    """For a test that steps RunningBatches itself: each row's tokens by name, steps(batch, count=1) and finish(batch),
    which steps until every row has its tokens, each leaving (in place) when it has them, as in the engine."""
    answers = {name: [] for name in names}

    def steps(batch, count=1):
        for _ in range(count):
            for name, token in zip(batch.rows, batch.choose()):
                answers[name].append(token)
            batch.step()
        return batch

    def finish(batch):
        while batch is not None:
            for name, token in zip(batch.rows, batch.choose()):
                answers[name].append(token)
            keep = [i for i, name in enumerate(batch.rows) if len(answers[name]) < max_new_tokens]
            batch = batch.select(keep, in_place=True) if keep else None
            if batch is not None:
                batch.step()

    return answers, steps, finish


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_requests_joining_and_leaving_answer_as_alone(served, seed, poisoned_cache):
    """Every row answers as its request alone does. The caches start as NaN (poisoned_cache): merging batches
    must zero the padding it puts in front of the shorter side, which attention reads with weight zero."""
    model, processor = served
    specs, cancelled = scenario(model, processor, seed)
    engine = SpyEngine(model, processor, max_batch=6, max_images=2)
    arrivals, cancels = {}, {}
    for job_id, ids, pixels, params, step in specs:
        arrivals.setdefault(step, []).append(lambda j=job_id, i=ids, p=pixels, s=params: Job(j, i, p, s))
        if job_id in cancelled:
            cancels.setdefault(step + cancelled[job_id], []).append(job_id)
    results = drive(engine, arrivals, cancels)
    for job_id, ids, pixels, params, _ in specs:
        for choice, p in enumerate(params):
            tokens, reason, text = alone(model, processor, ids, pixels, p)
            got_text, got_reason = results[job_id][choice]
            stream = engine.streams.get((job_id, choice))
            if job_id in cancelled and got_reason is None:  # left mid-answer: what it was sent is a prefix
                assert text.startswith(got_text)
                continue
            assert (got_text, got_reason) == (text, reason), (job_id, choice)
            assert stream.checker.tokens[0] == tokens, (job_id, choice)
    outcomes = {(job_id, choice): reason for job_id, choice, reason, _ in engine.finished}
    assert len(outcomes) == len(engine.finished) == sum(len(spec[3]) for spec in specs)  # every row once
    # largest_batch counts the rows admitted, and a row may finish at its first token, before any decode step
    assert 6 >= engine.stats["largest_batch"] >= max(engine.batch_sizes) > 2
    # rows really joined running batches: some decode step had more rows than the step before it
    assert any(b > a for a, b in zip(engine.batch_sizes, engine.batch_sizes[1:]))
    # and most joined in place (every row left in place): the storage had room, so the running rows were not copied
    assert engine.stats["cache_copies"] < engine.stats["joined_rows"] / 2
    assert engine.stats["steps"] == len(engine.batch_sizes)


def test_rows_join_and_leave_in_place_and_answer_as_alone(served, poisoned_cache):
    """Rows join into the spare rows of the longer batch's storage, and leave by moving a later row into their
    place: the other rows are not copied. A join with no room left copies both batches into new storage, and so
    does a leave that keeps a quarter of the rows or fewer. Either way, each row answers as alone (the caches
    start as NaN: every slot read was written)."""
    from tessera.serve.batch import RunningBatch

    model, processor = served
    params = model.sampling_params(max_new_tokens=14, eos_token_id=[])  # every row runs its 14 tokens

    def request(index, images, characters):
        content = [{"type": "image"}] * images + [{"type": "text", "text": (CORPUS[index] * 9)[:characters]}]
        ids = processor.encode([{"role": "user", "content": content}], add_generation_prompt=True)[0]
        return ids, [processor.preprocess_image(Image.fromarray(_noise(12 + k, 20, seed=index * 10 + k)))
                     for k in range(images)]

    requests = {"a": request(0, 1, 40), "b": request(1, 0, 8), "c": request(2, 2, 160), "d": request(3, 0, 20),
                "e": request(0, 1, 30)}
    expected = {name: alone(model, processor, *request, params)[0] for name, request in requests.items()}
    answers, steps, finish = _by_hand(requests, params.max_new_tokens)

    def prefill(*names, capacity=4):
        inputs = processor.pad_batch([(requests[n][0], requests[n][0]) for n in names],
                                     [requests[n][1] for n in names], padding_side="left")
        return RunningBatch.prefill(model, list(names), [params] * len(names), inputs, capacity=capacity)

    a = steps(prefill("a"), 3)  # a: image + prompt, 3 tokens in; b's prompt is shorter: b joins into a's storage
    b = prefill("b")
    assert b.length < a.length
    storage = a.storage
    joined = a.merge(b)
    # Method B: a's image keys/values (the prefill's own, without room) move once, at the first join a batch hosts
    assert joined.copied == bool(a.cross_storage) and joined.rows == ["a", "b"] and joined.storage is storage
    with pytest.raises(RuntimeError, match="handed in place to a batch made from it"):
        a.merge(prefill("d"))
    steps(joined, 2)
    c = prefill("c")  # two images: longer than the running rows, so they are copied into c's storage
    assert c.length > joined.length
    storage = c.storage
    joined = joined.merge(c)
    assert joined.copied and joined.rows == ["c", "a", "b"] and joined.storage is storage
    steps(joined, 2)
    joined = joined.merge(prefill("d", "e", capacity=0))  # 5 rows: more than the storage holds
    assert joined.copied and joined.rows == ["c", "a", "b", "d", "e"] and joined.capacity == 5
    steps(joined, 1)
    left = joined.select([1, 2, 4], in_place=True)  # c and d leave: e moves into c's row, the others stay
    assert not left.copied and left.rows == ["e", "a", "b"] and joined.storage is None
    with pytest.raises(RuntimeError, match="handed in place"):
        joined.select([0])
    alone_left = left.select([1], in_place=True)  # a quarter of the 5 rows held or fewer: copied, memory given back
    assert alone_left.copied and alone_left.rows == ["a"] and left.storage is not None
    finish(left)
    for name in "eab":
        assert answers[name] == expected[name], name
    for name in "cd":  # they left early: what they had is a prefix of their answers alone
        assert answers[name] == expected[name][:len(answers[name])], name


def _cross_requests(kind: str, directory: Path):
    """A Method B model with a ViT (one key group per image) or a tiled encoder (one per tile, Llama 3.2 Vision),
    and a function making one request's inputs (an image marker per image, text ids, random pixels)."""
    if kind == "vit":
        model, _ = load_checkpoint(make_checkpoint(directory, "cross"))
        pixels = lambda generator: torch.randn(3, 16, 16, generator=generator)  # noqa: E731
    else:
        from tests.test_model_review import _tiled_model

        torch.manual_seed(0)
        model = _tiled_model()
        with torch.no_grad():  # open gates, so that the images steer the answers
            for block in model.cross_attention.values():
                block.attn_gate.fill_(0.8)
                block.mlp_gate.fill_(0.8)
        pixels = lambda generator: torch.randn(4, 3, 8, 8, generator=generator)  # noqa: E731
    image = model.config.image_token_id

    def request(seed: int, images: int, text: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        ids = [image] * images + torch.randint(3, 90, (text,), generator=generator).tolist()
        return {"ids": ids, "pixels": [pixels(generator) for _ in range(images)],
                "ratios": torch.randint(1, 9, (images,), generator=generator)}

    return model, request


def _left_padded(requests: list[dict]) -> dict:
    width = max(len(r["ids"]) for r in requests)
    pixels = [p for r in requests for p in r["pixels"]]
    return {"input_ids": torch.tensor([[0] * (width - len(r["ids"])) + r["ids"] for r in requests]),
            "attention_mask": torch.tensor([[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in requests]),
            "pixel_values": torch.stack(pixels) if pixels else None,
            "image_counts": [len(r["pixels"]) for r in requests],
            "aspect_ratio_ids": torch.cat([r["ratios"] for r in requests])}


@pytest.mark.parametrize("kind", ["vit", "tiled"])
def test_image_keys_values_join_and_leave_in_place(kind, tmp_path, poisoned_cache):
    """Method B: a newcomer's image keys/values are written into the running batch's spare rows (with room for
    --max-images-per-prompt images a row), and a leaving row's place goes to the last row: the running rows' image
    keys/values stay where they are (once the first join a batch hosts has moved the prefill's own into storage with
    room). Without room for a newcomer's images, the join copies and says so. Every row answers as its request alone
    (storage starts as NaN: padding groups must be written as zeros)."""
    from tessera.serve.batch import RunningBatch

    model, request = _cross_requests(kind, tmp_path / "ck")
    params = model.sampling_params(max_new_tokens=6, eos_token_id=[])
    requests = {"a": request(1, 1, 12), "b": request(2, 2, 3), "c": request(3, 0, 2), "d": request(4, 2, 2)}
    expected = {}
    for name, r in requests.items():
        inputs = _left_padded([r])
        out = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                             inputs["image_counts"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                             max_new_tokens=6, eos_token_id=[])
        expected[name] = out.sequences[0]
    answers, step, finish = _by_hand(requests, params.max_new_tokens)

    def prefill(name, image_room):
        return RunningBatch.prefill(model, [name], [params], _left_padded([requests[name]]), capacity=4,
                                    image_room=image_room)

    def storage(batch):  # the data pointers of every gated block's image keys/values storage
        return [t.data_ptr() for pair in batch.cross_storage.values() for t in pair]

    with torch.inference_mode():
        a = step(step(prefill("a", image_room=2)))
        # the prefill's own, not views that keep the joint key/value projection's output alive
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size()
                   for pair in a.cross_storage.values() for t in pair)
        c = prefill("c", image_room=2)  # no images: nothing of its own to write
        assert c.length < a.length
        # the first join a batch hosts moves its own image keys/values (the prefill's, no room) into storage with room
        joined = step(a.merge(c))
        assert joined.copied and joined.rows == ["a", "c"] and storage(joined) != storage(a)
        held = storage(joined)
        b = prefill("b", image_room=2)  # two images where a has one: within the room
        joined = step(joined.merge(b))
        assert not joined.copied and joined.rows == ["a", "c", "b"] and storage(joined) == held
        for pair in joined.cache.cross.keys_values.values():  # views of the storage: a's row was not moved
            assert [t.data_ptr() for t in pair] == held[:2]
            held = held[2:] + held[:2]
        left = joined.select([1, 2], in_place=True)  # a leaves: b moves into its row, with its images
        assert not left.copied and left.rows == ["b", "c"] and storage(left) == held
        finish(left)
    assert answers["b"] == expected["b"] and answers["c"] == expected["c"]
    assert answers["a"] == expected["a"][:len(answers["a"])]

    with torch.inference_mode():  # no room for more images than the running rows have: the join copies
        answers["a"], answers["c"] = [], []
        a = step(prefill("a", image_room=0)).merge(prefill("c", image_room=0))
        joined = a.merge(prefill("d", image_room=0))
        assert joined.copied and storage(joined) != storage(a)
        finish(joined)
    assert answers["d"] == expected["d"] and answers["a"] == expected["a"] and answers["c"] == expected["c"]


def test_the_storage_takes_room_only_where_memory_could_fill_it(served, monkeypatch):
    """Room for --max-batch rows is address space until written, but one allocation of more address space than the
    machine could back may be refused: then, and when memory is short, the storage is just what is needed."""
    import tessera.serve.batch as batch
    from tessera.text.cache import KVCache

    model = served[0]

    def shape(storage):  # rows, slots
        return storage.keys.shape[1], storage.max_length

    assert shape(batch._new_storage(model, 2, 10, capacity=8)) == (8, 15)
    monkeypatch.setattr(batch, "available_memory", lambda: (1000, 10**9))  # 1 kB available
    assert shape(batch._new_storage(model, 2, 10, capacity=8)) == (2, 10)
    monkeypatch.setattr(batch, "available_memory", lambda: None)  # unknown: try, and fall back if refused

    def refusing(config, rows, *args, **kwargs):
        if rows > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return KVCache(config, rows, *args, **kwargs)

    monkeypatch.setattr(batch, "KVCache", refusing)
    assert shape(batch._new_storage(model, 2, 10, capacity=8)) == (2, 10)
    # on another device (a GPU's allocator hands out memory, not address space): no room at all
    monkeypatch.setattr(batch, "KVCache", KVCache)
    monkeypatch.setattr(batch, "available_memory", lambda: (10**15, 10**15))
    elsewhere = SimpleNamespace(config=model.config, dtype=model.dtype, device=torch.device("meta"))
    assert shape(batch._new_storage(elsewhere, 2, 10, capacity=8)) == (2, 10)
    assert shape(batch._new_storage(model, 2, 10, capacity=8)) == (8, 15)


def test_a_leave_copies_only_to_give_memory_back_and_only_if_it_can(served, monkeypatch):
    """Few rows left of many the storage held move to fresh storage, giving back the memory the others wrote; not
    under light load (nothing to give back: 1 of 3 rows held in storage for 8), and not when fresh storage cannot
    be had — in place, a leave needs no memory."""
    import tessera.serve.batch as batch_module
    from tessera.serve.batch import RunningBatch

    model, processor = served
    params = model.sampling_params(max_new_tokens=4, eos_token_id=[])
    rng = random.Random(3)

    def prefill(rows):
        requests = [make_request(processor, rng, i, 0) for i in range(rows)]
        inputs = processor.pad_batch([(ids, ids) for ids, _ in requests], [p for _, p in requests],
                                     padding_side="left")
        batch = RunningBatch.prefill(model, list(range(rows)), [params] * rows, inputs, capacity=8)
        batch.choose()
        return batch

    assert not prefill(3).select([1], in_place=True).copied  # light load: 1 of 3 held
    assert prefill(4).select([1], in_place=True).copied  # 1 of 4 held: memory given back

    def refused(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    batch = prefill(4)
    monkeypatch.setattr(batch_module, "_new_storage", refused)
    left = batch.select([1], in_place=True)
    assert not left.copied and left.rows == [1] and batch.storage is None
    left.step()  # and it decodes on
    with pytest.raises(RuntimeError, match="can't allocate"):  # a copy asked for cannot fall back
        left.select([0])


def test_a_batch_refuses_sampling_params_that_suppress_every_token(served):
    """The engine's batch takes SamplingParams as given: with every token suppressed it chose token 0 for good."""
    from tessera.errors import ConfigError
    from tessera.serve.batch import RunningBatch

    model, processor = served
    ids, _ = make_request(processor, random.Random(0), 0, 0)
    inputs = processor.pad_batch([(ids, ids)], [[]], padding_side="left")
    everything = SamplingParams(max_new_tokens=2, suppress_token_ids=tuple(range(model.config.text.vocab_size)))
    with pytest.raises(ConfigError, match="^suppress_token_ids: all"):
        RunningBatch.prefill(model, [0], [everything], inputs, capacity=1)


@pytest.mark.parametrize("what", ["answered", "cancelled", "a chunk fails"])
def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_rows_steps(served, what, monkeypatch):
    """With prefill_chunk, a newcomer's long prompt runs a chunk per iteration and the running row decodes between
    the chunks instead of waiting for the whole prefill; both answer as alone. A newcomer cancelled mid-prefill is
    dropped; a chunk that fails sends the prefill again in one go."""
    from tessera.serve.batch import Prefill

    model, processor = served
    params = model.sampling_params(max_new_tokens=24, eos_token_id=[])
    short_ids, short_pixels = make_request(processor, random.Random(5), 0, 1)
    content = [{"type": "image"}, {"type": "text", "text": (CORPUS[1] * 4)[:150]}]
    long_ids = processor.encode([{"role": "user", "content": content}], add_generation_prompt=True)[0]
    long_pixels = [processor.preprocess_image(Image.fromarray(_noise(20, 16, seed=77)))]
    chunks = 1 + -(-len(long_ids) // 8)  # its image is worth more than a chunk: encoded in an advance of its own
    assert chunks > 5 and Engine(model, processor, 1).image_cost > 8
    if what == "a chunk fails":
        advance, calls = Prefill.advance, []

        def failing_second_chunk(self, rest=False):
            calls.append(self.rows[0].job.id)
            if calls.count("long") == 2:
                raise RuntimeError("chunk failed")
            return advance(self, rest)

        monkeypatch.setattr(Prefill, "advance", failing_second_chunk)
    engine = SpyEngine(model, processor, max_batch=4, prefill_chunk=8)
    results = drive(engine, {0: [lambda: Job("short", short_ids, short_pixels, [params])],
                             2: [lambda: Job("long", long_ids, long_pixels, [params])]},
                    {4: ["long"]} if what == "cancelled" else None)
    assert results["short"] == [alone(model, processor, short_ids, short_pixels, params)[2:0:-1]]
    if what == "cancelled":  # the image and a chunk ran at steps 2 and 3; cancelled before step 4, it is dropped there
        assert results["long"] == [("", None)] and engine.stats["prefill_chunks"] == 2
        assert ("long", 0, "cancelled", 0) in engine.finished and set(engine.batch_sizes) == {1}
        return
    assert results["long"] == [alone(model, processor, long_ids, long_pixels, params)[2:0:-1]]
    if what == "a chunk fails":  # the image was encoded at step 2, the first chunk failed at step 3: then in one go
        assert engine.stats["prefill_chunks"] == 1 and engine.stats["failed_runs"] == 1
        assert engine.batch_sizes[:4] == [1, 1, 1, 2]
        return
    # the short row took a decode step at every iteration while the chunks ran (steps 2 to 2 + chunks - 1)
    assert engine.stats["prefill_chunks"] == chunks
    assert engine.batch_sizes[:1 + chunks] == [1] * (1 + chunks) and engine.batch_sizes[1 + chunks] == 2


@pytest.mark.parametrize("served", ["cross"], indirect=True)  # only Method B keeps image keys/values
def test_a_leave_stays_in_place_when_the_image_keys_values_copy_is_refused(served, monkeypatch):
    """Method B: the copy that gives memory back needs new image key/value storage too (the larger part, for Llama 3.2
    Vision); refused, the leave moves the rows in place, KV cache and image keys/values alike."""
    import tessera.serve.batch as batch_module
    from tessera.serve.batch import RunningBatch

    model, processor = served
    params = model.sampling_params(max_new_tokens=6, eos_token_id=[])
    requests = [make_request(processor, random.Random(8), i, 1) for i in range(4)]
    inputs = processor.pad_batch([(ids, ids) for ids, _ in requests], [p for _, p in requests], padding_side="left")
    batch = RunningBatch.prefill(model, list(range(4)), [params] * 4, inputs, capacity=8)
    tokens = [[token] for token in batch.choose()]

    def refused(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(batch_module, "_new_cross_storage", refused)
    left = batch.select([2], in_place=True)  # 1 of 4 rows: a copy would give memory back, but cannot be had
    assert not left.copied and left.rows == [2] and left.cache.cross.keys_values
    while len(tokens[2]) < params.max_new_tokens:
        left.step()
        tokens[2] += left.choose()
    assert tokens[2] == alone(model, processor, *requests[2], params)[0]


def test_beside_a_chunked_prefill_newcomers_that_fit_a_chunk_join_at_once(served):
    """A chunk bounds the tokens each prefill of an iteration takes, rows × the longest prompt and the images' worth
    (an iteration may run a chunk of a long prompt and newcomers that fit one). A short request arriving during a long one's chunks joins
    in one go without waiting for it; of two that fit a chunk apart but not together, one joins at once and the
    other at the next iteration. With nothing being chunked, two such newcomers are split likewise: one in one go,
    the other as a chunked prefill of one chunk. Every answer is as alone."""
    model, processor = served
    params = model.sampling_params(max_new_tokens=40, eos_token_id=[])
    rng = random.Random(11)
    short = {name: make_request(processor, rng, i, i % 2) for i, name in enumerate(["run", "c", "d", "e"])}
    cost = Engine(model, processor, 1).image_cost  # an image, in prompt tokens' worth
    chunk = int(max(len(ids) + cost * len(pixels) for ids, pixels in short.values())) + 1
    content = [{"type": "image"}, {"type": "text", "text": (CORPUS[2] * 40)[:1400]}]
    long_ids = processor.encode([{"role": "user", "content": content}], add_generation_prompt=True)[0]
    long_pixels = [processor.preprocess_image(Image.fromarray(_noise(18, 22, seed=78)))]
    first = int(chunk - cost)  # its image and the tokens that fit beside it in the first chunk
    chunks = 1 + -(-(len(long_ids) - first) // chunk)
    assert first > 0 and chunks >= 6 and len(long_ids) + params.max_new_tokens <= model.config.text.max_position_embeddings
    requests = {**short, "long": (long_ids, long_pixels)}
    job = lambda name: lambda: Job(name, *requests[name], [params])  # noqa: E731

    engine = SpyEngine(model, processor, max_batch=6, prefill_chunk=chunk)
    results = drive(engine, {0: [job("run")], 2: [job("long")], 3: [job("c")], 5: [job("d"), job("e")]})
    for name in requests:
        assert results[name] == [alone(model, processor, *requests[name], params)[2:0:-1]], name
    # c joins at step 3, d at 5 and e at 6 (d and e together would take more than a chunk), while long's chunks
    # run at steps 2, 3, …: it joins at its last
    last_chunk = 2 + chunks - 1
    assert engine.batch_sizes[:last_chunk + 1] == [1, 1, 1, 2, 2, 3] + [4] * (last_chunk - 6) + [5]
    assert engine.stats["prefill_chunks"] == chunks

    engine = SpyEngine(model, processor, max_batch=6, prefill_chunk=chunk)
    results = drive(engine, {0: [job("run")], 2: [job("d"), job("e")]})
    for name in ("run", "d", "e"):
        assert results[name] == [alone(model, processor, *requests[name], params)[2:0:-1]], name
    assert engine.batch_sizes[:4] == [1, 1, 2, 3] and engine.stats["prefill_chunks"] == 1


def test_a_newcomer_that_fails_its_prefill_leaves_the_running_rows_alone(served):
    """A request whose prefill fails joins while others decode: it gets its 500 alone (the other newcomers
    prefilled with it are bisected out and join), and the running rows go on."""
    model, processor = served
    rng = random.Random(5)
    params = [model.sampling_params(max_new_tokens=10)]
    good = [make_request(processor, rng, i, i % 2) for i in range(4)]
    bad = make_request(processor, rng, 9, 1)
    engine = SpyEngine(model, processor, max_batch=8, fail_prefill=lambda jobs: any(j.id == "bad" for j in jobs))
    arrivals = {0: [lambda i=i: Job(f"good{i}", *good[i], params) for i in range(2)],
                3: [lambda: Job("bad", *bad, params),
                    *[lambda i=i: Job(f"good{i}", *good[i], params) for i in (2, 3)]]}
    results = drive(engine, arrivals)
    assert results["bad"] == [("", "failed")]
    for i, (ids, pixels) in enumerate(good):
        _, reason, text = alone(model, processor, ids, pixels, params[0])
        assert results[f"good{i}"] == [(text, reason)]
    assert engine.stats["failed_rows"] == 1 and engine.stats["failed_runs"] == 3  # 3 newcomers, then 2, then bad
    assert 4 in engine.batch_sizes  # the good newcomers joined the two running rows


def test_a_decode_step_that_fails_is_bisected_and_the_other_rows_go_on(served):
    """A step fails whenever one row is in it: the step runs again for halves of the batch, that row's request gets
    its 500 (after the text it was already sent), and every other row finishes as alone, from where it was."""
    model, processor = served
    rng = random.Random(6)
    params = [model.sampling_params(max_new_tokens=12, eos_token_id=[])]  # every row runs its 12 tokens
    requests = [make_request(processor, rng, i, i % 3) for i in range(6)]
    engine = SpyEngine(model, processor, max_batch=8,
                       fail_step=lambda batch: any(row.job.id == "job3" and row.stream.tokens >= 4
                                                   for row in batch.rows))
    results = drive(engine, {0: [lambda i=i: Job(f"job{i}", *requests[i], params) for i in range(6)]})
    for i, (ids, pixels) in enumerate(requests):
        _, reason, text = alone(model, processor, ids, pixels, params[0])
        if i == 3:
            sent, outcome = results["job3"][0]
            assert outcome == "failed" and text.startswith(sent)
        else:
            assert results[f"job{i}"] == [(text, reason)]
    assert engine.stats["failed_rows"] == 1
    assert engine.stats["failed_runs"] == 4  # 6 rows, then 3, 2 and 1 (job3 is the third of six)
    assert max(engine.batch_sizes[-5:]) == 5  # the five others decode together again after the failure


def test_a_decode_step_that_fails_in_the_lm_head_leaves_the_rows_where_they_were(served, monkeypatch):
    """The decoder counts the new cache slot before its final norm and LM head: a failure there must not leave the
    cache one slot ahead of the rows' masks, or every retry fails and every row gets a 500."""
    model, processor = served
    rng = random.Random(7)
    params = [model.sampling_params(max_new_tokens=6, eos_token_id=[])]
    requests = [make_request(processor, rng, i, i % 2) for i in range(2)]
    head, calls = model.llm.lm_head.forward, []

    def failing_once(x):
        calls.append(x.shape[0])
        if len(calls) == 2:  # the first decode step (the first call is the prefill)
            raise RuntimeError("out of memory")
        return head(x)

    monkeypatch.setattr(model.llm.lm_head, "forward", failing_once)
    engine = SpyEngine(model, processor, max_batch=4)
    results = drive(engine, {0: [lambda i=i: Job(f"job{i}", *requests[i], params) for i in range(2)]})
    monkeypatch.undo()
    for i, (ids, pixels) in enumerate(requests):
        _, reason, text = alone(model, processor, ids, pixels, params[0])
        assert results[f"job{i}"] == [(text, reason)]
    assert engine.stats["failed_runs"] == 1 and engine.stats["failed_rows"] == 0


def test_newcomers_whose_admission_fails_after_bisection_get_their_500(served, monkeypatch):
    """A failed prefill's halves are prefilled again and merged; if that merge fails, the half that could not join
    is out of the queue and not yet running — it must still get its 500 (a client would otherwise wait forever) —
    and the other half and the running rows go on."""
    import tessera.serve.batch as batch_module

    model, processor = served
    rng = random.Random(9)
    params = [model.sampling_params(max_new_tokens=8)]
    requests = [make_request(processor, rng, i, 0) for i in range(3)]
    merge = batch_module.RunningBatch.merge

    def failing_merge(self, other):
        if any(row.job.id.startswith("new") for row in self.rows) and \
                all(row.job.id.startswith("new") for row in self.rows + other.rows):
            raise RuntimeError("out of memory")
        return merge(self, other)

    monkeypatch.setattr(batch_module.RunningBatch, "merge", failing_merge)
    engine = SpyEngine(model, processor, max_batch=4, fail_prefill=lambda jobs: len(jobs) > 1)
    results = drive(engine, {0: [lambda: Job("running", *requests[0], params)],
                             2: [lambda i=i: Job(f"new{i}", *requests[i], params) for i in (1, 2)]})
    assert results["new2"] == [("", "failed")] and engine.stats["failed_rows"] == 1
    for name, request in ("running", requests[0]), ("new1", requests[1]):
        _, reason, text = alone(model, processor, *request, params[0])
        assert results[name] == [(text, reason)], name


def test_a_decode_step_whose_halves_cannot_be_merged_again_fails_only_the_half_left_out(served, monkeypatch):
    """A failed decode step is run again in halves, which merge back; if that merge fails (no memory for it), the rows
    of the half that could not join get their 500 and the others go on (it failed every running row)."""
    import tessera.serve.batch as batch_module

    model, processor = served
    params = [model.sampling_params(max_new_tokens=8, eos_token_id=[])]
    requests = [make_request(processor, random.Random(12), i, i % 2) for i in range(3)]
    merge, failed = batch_module.RunningBatch.merge, []

    def failing_merge(self, other):
        if len(self) + len(other) == 3 and not failed:  # the first merge of the two halves
            failed.append(1)
            raise RuntimeError("out of memory")
        return merge(self, other)

    engine = SpyEngine(model, processor, max_batch=4, fail_step=lambda batch: len(batch) == 3 and not failed)
    monkeypatch.setattr(batch_module.RunningBatch, "merge", failing_merge)
    results = drive(engine, {0: [lambda i=i: Job(f"job{i}", *requests[i], params) for i in range(3)]})
    monkeypatch.undo()
    # the halves: rows 0-1 and row 2; the second could not join the first
    assert results["job2"] == [("", "failed")] and engine.stats["failed_rows"] == 1
    for i in (0, 1):
        _, reason, text = alone(model, processor, *requests[i], params[0])
        assert results[f"job{i}"] == [(text, reason)], i


def test_a_chunked_prefill_finishes_the_rest_in_one_forward(served):
    """With no rows left to decode, nothing waits for the chunks: the engine runs the rest in one forward. (An image
    worth more than a chunk is encoded in an advance of its own, before the first chunk.)"""
    from tessera.serve.batch import Prefill

    model, processor = served
    params = model.sampling_params(max_new_tokens=6, eos_token_id=[])
    ids, pixels = make_request(processor, random.Random(13), 0, 1)
    inputs = processor.pad_batch([(ids, ids)], [pixels], padding_side="left")
    with torch.inference_mode():
        prefill = Prefill(model, ["row"], [params], inputs, chunk=3)
        assert prefill.image_cost > 3
        assert prefill.advance() is None and prefill.cache.length == 0  # the image
        first = int(3 - prefill.keys_values_cost)  # beside Method B's keys/values of the image
        assert prefill.advance() is None and prefill.cache.length == first
        batch = prefill.finish()
        assert prefill.chunks == 3 and batch.length == len(ids)
        tokens = []
        while len(tokens) < params.max_new_tokens:
            tokens += batch.choose()
            batch.step()
    assert tokens == alone(model, processor, ids, pixels, params)[0]


def _encodings(model, monkeypatch) -> list[int]:
    """How many images each call of the model's image encoder takes, in order (recorded while the test runs)."""
    calls, encode = [], model.encode_images

    def counted(pixel_values, aspect_ratio_ids=None):
        calls.append(pixel_values.shape[0])
        return encode(pixel_values, aspect_ratio_ids)

    monkeypatch.setattr(model, "encode_images", counted)
    return calls


@pytest.mark.parametrize("images_per_advance", [2, 1])
def test_a_chunked_prefill_encodes_images_by_their_worth(served, monkeypatch, images_per_advance):
    """An advance does about a chunk's worth of work, an image counted at its encoding's worth in prompt tokens:
    images worth more than a chunk are encoded in advances of their own, as many as fit and at least one; the rest of
    the chunk after the last goes to the prompt's first tokens. The answer is the one-go prefill's."""
    from tessera.serve.batch import Prefill

    model, processor = served
    params = model.sampling_params(max_new_tokens=6, eos_token_id=[])
    content = [{"type": "image"}] * 3 + [{"type": "text", "text": (CORPUS[3] * 8)[:300]}]
    ids = processor.encode([{"role": "user", "content": content}], add_generation_prompt=True)[0]
    pixels = [processor.preprocess_image(Image.fromarray(_noise(14, 18, seed=80 + k))) for k in range(3)]
    inputs = processor.pad_batch([(ids, ids)], [pixels], padding_side="left")
    encodings = _encodings(model, monkeypatch)
    with torch.inference_mode():
        prefill = Prefill(model, ["row"], [params], inputs, chunk=1)
        # room for images_per_advance images; in the last advance of images, for a few tokens beside their
        # keys/values (Method B)
        chunk = int(images_per_advance * prefill.image_cost + prefill.keys_values_cost) + 3
        prefill.chunk = chunk
        assert prefill.advance() is None and encodings == [images_per_advance] and prefill.cache.length == 0
        while prefill.cache.length == 0:  # the other images, then the first tokens beside the last
            assert prefill.advance() is None
        assert sum(encodings) == 3 and max(encodings) == images_per_advance
        first = int(chunk - encodings[-1] * prefill.image_cost - prefill.keys_values_cost)
        assert prefill.cache.length == first >= 1 and len(ids) > first + chunk
        # placed, the encoded images are let go: not held through the text chunks (for Llama 3.2 Vision, ~52 MB in
        # bf16 an image, and a copy for each row that has it)
        assert not prefill._features and "image_features" not in prefill._chunks.gi_frame.f_locals
        assert prefill.advance() is None and prefill.cache.length == first + chunk
        batch = prefill.finish()
        tokens = []
        while len(tokens) < params.max_new_tokens:
            tokens += batch.choose()
            batch.step()
    assert len(encodings) == -(-3 // images_per_advance)
    assert tokens == alone(model, processor, ids, pixels, params)[0]


def test_the_choices_of_a_request_share_its_images_encoding(served, monkeypatch):
    """n choices are n rows with the same images: each image is encoded once for all of them (a 4-tile Llama 3.2
    Vision image is worth more than 1,000 prompt tokens), and every choice answers as the request alone."""
    model, processor = served
    requests = {name: make_request(processor, random.Random(19), i, 2) for i, name in enumerate(["run", "n3"])}
    params = [model.sampling_params(max_new_tokens=8, temperature=0.9, seed=40 + k) for k in range(3)]
    encodings = _encodings(model, monkeypatch)
    engine = SpyEngine(model, processor, max_batch=8)
    results = drive(engine, {0: [lambda: Job("run", *requests["run"], params[:1])],
                             2: [lambda: Job("n3", *requests["n3"], params)]})
    assert encodings == [2, 2]  # the running request's two images, then the three choices' two
    monkeypatch.undo()
    assert results["run"] == [alone(model, processor, *requests["run"], params[0])[2:0:-1]]
    assert results["n3"] == [alone(model, processor, *requests["n3"], p)[2:0:-1] for p in params]


def test_static_batching_admits_only_between_batches(served):
    """continuous=False (the comparison baseline): a request that arrives while a batch runs waits for its end."""
    model, processor = served
    rng = random.Random(7)
    params = [model.sampling_params(max_new_tokens=6)]
    requests = [make_request(processor, rng, i, 0) for i in range(3)]
    engine = SpyEngine(model, processor, max_batch=8, continuous=False)
    results = drive(engine, {0: [lambda i=i: Job(f"job{i}", *requests[i], params) for i in range(2)],
                             2: [lambda: Job("job2", *requests[2], params)]})
    assert engine.batch_sizes == [2] * 5 + [1] * 5
    for i, (ids, pixels) in enumerate(requests):
        _, reason, text = alone(model, processor, ids, pixels, params[0])
        assert results[f"job{i}"] == [(text, reason)]


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_many_staggered_clients_through_the_server_answer_as_one_at_a_time(fusion, tmp_path):
    """A stress test through the real HTTP server and the openai client: 40 requests (text or images, streamed or
    not, some with n=2, different max_tokens, greedy or seeded) from 40 threads that start at random moments, with
    --max-batch 5, so requests keep joining running batches and leaving them. Every answer (and its usage count)
    equals its answer when the requests are sent one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from tessera.serve import ServeSettings
    from tests.test_serve import data_url, image_part, png_bytes, running_server, text, user

    directory = make_checkpoint(tmp_path / "ck", fusion)
    rng = random.Random(11)
    requests = []
    for i in range(40):
        parts = [text(CORPUS[i % 4][: rng.randint(5, 45)])]
        for k in range(rng.choice([0, 0, 1, 2])):
            parts.insert(k, image_part(data_url(png_bytes(300 + 3 * i + k))))
        sampled = i % 5 == 0
        options = {"temperature": 0.8, "seed": i, "n": 2} if sampled else {"temperature": 0}
        requests.append({"messages": user(*parts), "max_tokens": rng.randint(1, 30), "stream": i % 3 == 0,
                         **options})
    delays = [rng.uniform(0, 0.3) for _ in requests]  # arriving faster than they are answered: a queue forms
    settings = ServeSettings(checkpoint=str(directory), max_batch=5, max_images_per_prompt=2)
    with running_server(settings) as s:
        client = s.client()

        def ask(request, delay=0.0):
            time.sleep(delay)
            if not request["stream"]:
                result = client.chat.completions.create(model=str(directory), **request)
                return [(c.message.content, c.finish_reason) for c in result.choices], result.usage.completion_tokens
            texts, reasons, usage = {}, {}, None
            for chunk in client.chat.completions.create(model=str(directory), stream_options={"include_usage": True},
                                                        **request):
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                    reasons[c.index] = c.finish_reason or reasons.get(c.index)
                usage = chunk.usage.completion_tokens if chunk.usage else usage
            return [(texts[i], reasons[i]) for i in sorted(texts)], usage

        one_at_a_time = [ask(r) for r in requests]
        assert s.engine.stats["largest_batch"] <= 2 and s.engine.stats["joined_rows"] == 0
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(ask, requests, delays))
        assert together == one_at_a_time and all(usage for _, usage in together)
        stats = s.engine.stats
        assert stats["largest_batch"] == 5 and stats["joined_rows"] > 10, stats  # they really joined running batches
        assert stats["failed_rows"] == stats["cancelled_rows"] == 0
    assert len({answer for answers, _ in one_at_a_time for answer in answers}) > 20


def test_a_row_whose_token_cannot_be_chosen_fails_alone(served, monkeypatch):
    """Choosing a token can fail for one row (sampling from logits holding NaN, say): that request gets its 500 and
    the others go on; and a failure outside the model's runs does not stop the worker (the running rows fail)."""
    import tessera.serve.batch as batch_module

    model, processor = served
    rng = random.Random(8)
    greedy = [model.sampling_params(max_new_tokens=8)]
    poisoned = [model.sampling_params(max_new_tokens=8, temperature=1.0, seed=666)]
    requests = [make_request(processor, rng, i, i % 2) for i in range(3)]
    choose = batch_module.next_tokens

    def next_tokens(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return choose(logits, params, generator)

    monkeypatch.setattr(batch_module, "next_tokens", next_tokens)
    engine = SpyEngine(model, processor, max_batch=4)
    results = drive(engine, {0: [lambda i=i: Job(f"job{i}", *requests[i], greedy) for i in (0, 1)],
                             2: [lambda: Job("bad", *requests[2], poisoned)]})
    assert results["bad"] == [("", "failed")] and engine.stats["failed_rows"] == 1
    for i in (0, 1):
        _, reason, text = alone(model, processor, *requests[i], greedy[0])
        assert results[f"job{i}"] == [(text, reason)]
    # a request with two choices, the second failing: the first, chosen before it in the same step, is not decoded
    # any further for a request that has already had its 500
    engine = SpyEngine(model, processor, max_batch=4)
    results = drive(engine, {0: [lambda: Job("job0", *requests[0], greedy)],
                             2: [lambda: Job("bad", *requests[2], greedy + poisoned)]})
    assert results["bad"] == [("", "failed"), ("", "failed")] and engine.stats["failed_rows"] == 2
    assert set(engine.batch_sizes) == {1}  # every decode step ran job0 alone, the step of the failure too
    _, reason, text = alone(model, processor, *requests[0], greedy[0])
    assert results["job0"] == [(text, reason)]

    def broken(self, keep):
        raise RuntimeError("a bug")

    async def outcome():  # the worker thread this time, with a bug in dropping finished rows
        engine = Engine(model, processor, max_batch=4).start()
        try:
            jobs = [Job(f"job{i}", *requests[i], greedy) for i in range(3)]
            jobs[2].params = [model.sampling_params(max_new_tokens=2)]  # finishes first: its row leaves
            for job in jobs:
                engine.submit(job)
            events = [await asyncio.wait_for(_last_event(job), 30) for job in jobs]
            later = Job("later", *requests[0], greedy)
            monkeypatch.undo()
            engine.submit(later)
            return events, await asyncio.wait_for(_last_event(later), 30)
        finally:
            engine.stop()

    monkeypatch.setattr(batch_module.RunningBatch, "select", broken)
    events, later = asyncio.run(outcome())
    assert all(isinstance(event, Failed) for event in events[:2])  # the running rows failed ...
    assert events[2].finish_reason == "length"  # the row that finished keeps its answer
    assert later.finish_reason == "length"  # ... and the worker still serves


async def _last_event(job: Job):
    while True:
        event = await job.events.get()
        if isinstance(event, Failed) or event.finish_reason:
            return event
