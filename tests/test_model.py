"""Properties of the model core: the LLM left untouched by zero gates, who sees which image, cache = no cache,
batched = one by one, checkpoints, freezing."""

import re
import threading

import pytest
import torch

from tessera import CheckpointError, ConfigError, ImageTokenMismatchError, ModelConfig, MultimodalLM
from tessera.text.cache import KVCache
from tessera.text.decoder import DecoderLLM
from tests.conftest import tiny_config

IMG = 3  # the image token id of the tiny configs


def _prompt(fusion: str, before: list[int], after: list[int], images: int = 1) -> list[int]:
    per_image = tiny_config(fusion).image_seq_length
    return before + [IMG] * (per_image * images) + after


def _open_gates(model: MultimodalLM, value: float = 1.0) -> None:
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# --- Method B ----------------------------------------------------------------------------------------------------
def test_cross_attention_with_zero_gates_leaves_the_llm_untouched():
    model = MultimodalLM(tiny_config("cross", cross_attention_layers=[0, 2, 3])).eval()
    bare = DecoderLLM(model.config.text).eval()
    bare.load_state_dict(model.llm.state_dict())
    ids = torch.tensor([_prompt("cross", [5, 6], [7, 8, 9]), _prompt("cross", [10, 4], [11, 12, 13])])
    with torch.no_grad():
        logits = model(ids, pixel_values=torch.randn(2, 3, 16, 16)).logits
        reference = bare(ids)
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)


def test_cross_attention_sees_only_images_whose_marker_came_before():
    model = MultimodalLM(tiny_config("cross", cross_attention_layers=[0, 2])).eval()
    _open_gates(model)
    ids = torch.tensor([_prompt("cross", [5, 6, 7], [8, 9, 10])])
    first = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a = model(ids, pixel_values=first).logits
        b = model(ids, pixel_values=first + torch.randn_like(first)).logits
    marker = 3
    torch.testing.assert_close(a[:, :marker], b[:, :marker], atol=0, rtol=0)  # tokens before the image: unmoved
    assert (a[:, marker:] - b[:, marker:]).abs().amax(-1).min() > 1e-4  # every token from the marker on: moved


def test_cross_attention_second_image_only_affects_tokens_after_its_marker():
    model = MultimodalLM(tiny_config("cross", cross_attention_layers=[1])).eval()
    _open_gates(model)
    ids = torch.tensor([[5, IMG, 6, 7, IMG, 8, 9]])
    images = torch.randn(2, 3, 16, 16)
    changed = images.clone()
    changed[1] += torch.randn_like(changed[1])
    with torch.no_grad():
        a = model(ids, pixel_values=images).logits
        b = model(ids, pixel_values=changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().amax(-1).min() > 1e-4


def test_latest_scope_forgets_earlier_images():
    model = MultimodalLM(tiny_config("cross", cross_attention_layers=[1], cross_attention_scope="latest")).eval()
    _open_gates(model)
    ids = torch.tensor([[5, IMG, 6, 7, IMG, 8, 9]])
    images = torch.randn(2, 3, 16, 16)
    changed = images.clone()
    changed[0] += torch.randn_like(changed[0])
    with torch.no_grad():
        a = model(ids, pixel_values=images).logits
        b = model(ids, pixel_values=changed).logits
    # self-attention carries image 0's influence on, so compare the cross-attention inputs directly: with the
    # second marker, tokens only see image 1, so changing image 0 may move positions 1..3 only through the
    # tokens in between — position 4 onwards attends to image 1 alone.
    from tessera.fusion.cross_attention import image_visibility
    visible = image_visibility(ids, IMG, 2, "latest")[0]
    assert visible[:, 0].tolist() == [False, True, True, True, False, False, False]
    assert visible[:, 1].tolist() == [False, False, False, False, True, True, True]
    assert (a[:, 1:4] - b[:, 1:4]).abs().amax() > 1e-4


def test_consecutive_markers_stay_visible_together_in_latest_scope():
    from tessera.fusion.cross_attention import image_visibility
    ids = torch.tensor([[IMG, IMG, 5, 6, IMG, 7]])
    visible = image_visibility(ids, IMG, 3, "latest")[0]
    assert visible[:, 0].tolist() == [True, True, True, True, False, False]
    assert visible[:, 1].tolist() == [False, True, True, True, False, False]
    assert visible[:, 2].tolist() == [False, False, False, False, True, True]


def test_an_image_of_several_tokens_is_seen_from_its_first_and_runs_of_them_stay_visible_together():
    """The hybrid's images are runs of thumbnail tokens (2 each here), not single markers."""
    from tessera.fusion.cross_attention import image_visibility
    ids = torch.tensor([[5, IMG, IMG, IMG, IMG, 6, IMG, IMG, 7]])
    latest = image_visibility(ids, IMG, 3, "latest", tokens_per_image=2)[0]
    assert latest[:, 0].tolist() == [False, True, True, True, True, True, False, False, False]
    assert latest[:, 1].tolist() == [False, False, False, True, True, True, False, False, False]
    assert latest[:, 2].tolist() == [False] * 6 + [True] * 3
    previous = image_visibility(ids, IMG, 3, "previous", tokens_per_image=2)[0]
    assert previous[:, 1].tolist() == [False] * 3 + [True] * 6


# --- Method A ----------------------------------------------------------------------------------------------------
def test_unified_image_change_moves_logits_after_its_tokens():
    model = MultimodalLM(tiny_config("unified")).eval()
    ids = torch.tensor([_prompt("unified", [5, 6], [7, 8])])
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a = model(ids, pixel_values=image).logits
        b = model(ids, pixel_values=image + torch.randn_like(image)).logits
    torch.testing.assert_close(a[:, :2], b[:, :2], atol=0, rtol=0)  # causal: text before the image is unmoved
    assert (a[:, -2:] - b[:, -2:]).abs().amax(-1).min() > 1e-4


def test_unified_count_mismatch_names_sample_and_counts():
    model = MultimodalLM(tiny_config("unified")).eval()
    per_image = model.config.image_seq_length
    good = _prompt("unified", [5], [6])
    short = [5] + [IMG] * (per_image - 1) + [6, 6]
    ids = torch.tensor([good, short])
    with pytest.raises(ImageTokenMismatchError) as error:
        model(ids, pixel_values=torch.randn(2, 3, 16, 16), image_counts=[1, 1])
    message = str(error.value)
    assert "sample 1" in message and f"{per_image - 1} image tokens" in message and f"{per_image} image features" in message
    # placeholders without any image: the caller forgot pixel_values, which is what the message says
    with pytest.raises(ImageTokenMismatchError, match="sample 0: the text has 16 image tokens but no images were "
                                                      "given; expected the processor's pixel_values"):
        model(torch.tensor([good]))
    with pytest.raises(ImageTokenMismatchError, match="sample 1: the text has 16 image tokens but its 0 image"):
        model(torch.tensor([good, good]), pixel_values=torch.randn(1, 3, 16, 16), image_counts=[1, 0])


def test_any_number_of_images_per_sample():
    model = MultimodalLM(tiny_config("unified")).eval()
    rows = [_prompt("unified", [5], [6], images=2), [5, 6, 7], _prompt("unified", [8], [9], images=1)]
    ids, mask = _left_pad(rows)
    out = model(ids, mask, pixel_values=torch.randn(3, 3, 16, 16), image_counts=[2, 0, 1])
    assert out.logits.shape == (3, ids.shape[1], 96)
    assert torch.isfinite(out.logits).all()


# --- generation --------------------------------------------------------------------------------------------------
def _generation_batch(fusion: str):
    rows = [
        _prompt(fusion, [1, 5, 6, 7, 8, 9], [10, 11]),
        [1, 12, 13],  # text only, much shorter: heavy left padding
        _prompt(fusion, [1, 14], [15], images=2),
    ]
    ids, mask = _left_pad(rows)
    return rows, ids, mask, torch.randn(3, 3, 16, 16), [1, 0, 2]


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_kv_cache_equals_recomputing(fusion, linear_route, poisoned_cache):
    model = MultimodalLM(tiny_config(fusion, cross_attention_layers=[0, 2])).eval()
    _open_gates(model, 0.7)
    _, ids, mask, pixels, counts = _generation_batch(fusion)
    cached = model.generate(ids, mask, pixels, counts, max_new_tokens=12, eos_token_id=[])
    recomputed = model.generate(ids, mask, pixels, counts, max_new_tokens=12, eos_token_id=[], use_cache=False)
    assert cached.sequences == recomputed.sequences
    assert all(len(s) == 12 for s in cached.sequences)
    assert len({tuple(s) for s in cached.sequences}) > 1  # the samples really differ


@pytest.mark.parametrize("fusion", ["unified", "cross"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_a_prefill_in_chunks_equals_one_prefill(fusion, chunk, poisoned_cache):
    """Chunks that split an image's tokens, a padded row and the images' markers: the same logits, cache and image
    state as one prefill, to float rounding (each chunk's attention is summed apart), and the same decode after."""
    model = MultimodalLM(tiny_config(fusion, cross_attention_layers=[0, 2])).eval()
    _open_gates(model, 0.7)
    _, ids, mask, pixels, counts = _generation_batch(fusion)
    caches = [KVCache(model.config.text, 3, ids.shape[1] + 4, model.dtype) for _ in range(2)]
    with torch.inference_mode():
        logits = [model(ids, mask, pixels, counts, cache=caches[0], logits_to_keep=1).logits[:, -1]]
        steps = list(model.prefill_in_chunks(ids, mask, caches[1], chunk, pixels, counts))
        assert len(steps) == -(-ids.shape[1] // chunk) and all(step is None for step in steps[:-1])
        logits.append(steps[-1])
        for _ in range(4):
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
            token = logits[0].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=-1)
            logits = [model(token, mask, cache=cache, logits_to_keep=1).logits[:, -1] for cache in caches]
    whole, chunked = caches
    assert whole.length == chunked.length == ids.shape[1] + 4
    torch.testing.assert_close(chunked.keys, whole.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.values, whole.values, rtol=1e-5, atol=1e-5)
    if fusion == "cross":
        assert torch.equal(chunked.cross.visible, whole.cross.visible)
        assert torch.equal(chunked.cross.real, whole.cross.real)
        for layer, (k, v) in whole.cross.keys_values.items():
            assert torch.equal(chunked.cross.keys_values[layer][0], k)
            assert torch.equal(chunked.cross.keys_values[layer][1], v)


def test_a_prefill_in_chunks_takes_a_new_chunk_size_for_the_rest():
    """A server whose running rows have all finished sends the rest's length: one forward for every token left."""
    model = MultimodalLM(tiny_config("unified")).eval()
    _, ids, mask, pixels, counts = _generation_batch("unified")
    caches = [KVCache(model.config.text, 3, ids.shape[1], model.dtype) for _ in range(2)]
    with torch.inference_mode():
        whole = model(ids, mask, pixels, counts, cache=caches[0], logits_to_keep=1).logits[:, -1]
        chunks = model.prefill_in_chunks(ids, mask, caches[1], 3, pixels, counts)
        assert next(chunks) is None and caches[1].length == 3
        rest = chunks.send(ids.shape[1])
    assert caches[1].length == ids.shape[1]
    torch.testing.assert_close(rest, whole, rtol=1e-5, atol=1e-5)


def test_a_prefill_in_chunks_refuses_a_used_cache_or_an_empty_chunk():
    model = MultimodalLM(tiny_config("unified")).eval()
    cache = KVCache(model.config.text, 1, 8, model.dtype)
    with pytest.raises(ValueError, match="chunk=0: expected at least 1 token"):
        next(model.prefill_in_chunks(torch.tensor([[1, 5]]), None, cache, 0))
    cache.advance(2)
    with pytest.raises(ValueError, match="the cache holds 2 tokens; a prefill starts from an empty one"):
        next(model.prefill_in_chunks(torch.tensor([[1, 5]]), None, cache, 4))


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_batched_generation_equals_one_by_one(fusion, linear_route):
    model = MultimodalLM(tiny_config(fusion, cross_attention_layers=[1, 3])).eval()
    _open_gates(model, 0.7)
    rows, ids, mask, pixels, counts = _generation_batch(fusion)
    batched = model.generate(ids, mask, pixels, counts, max_new_tokens=10, eos_token_id=[])
    start = 0
    for i, row in enumerate(rows):
        own = pixels[start:start + counts[i]]
        start += counts[i]
        single = model.generate(torch.tensor([row]), None, own, [counts[i]], max_new_tokens=10, eos_token_id=[])
        assert single.sequences[0] == batched.sequences[i], f"sample {i}"


def test_the_encoder_free_model_generates_alike_cached_or_not_batched_or_alone_saved_or_not(tmp_path):
    """Fuyu's design (vision.encoder="none") through the same properties as the others. Method A only: Method B
    would see raw patches as an unordered set (its image keys carry no position), so it is refused."""
    config = tiny_config("cross", cross_attention_layers=[0, 2])
    config.vision.encoder = "none"
    with pytest.raises(ConfigError, match=r"^vision.encoder='none' with fusion.method='cross': raw patches have no "):
        MultimodalLM(config)
    config = tiny_config("unified")
    config.vision.encoder = "none"
    model = MultimodalLM(config).eval()
    fusion = "unified"
    rows, ids, mask, pixels, counts = _generation_batch(fusion)
    cached = model.generate(ids, mask, pixels, counts, max_new_tokens=8, eos_token_id=[]).sequences
    assert cached == model.generate(ids, mask, pixels, counts, max_new_tokens=8, eos_token_id=[],
                                    use_cache=False).sequences
    assert len({tuple(s) for s in cached}) > 1
    starts = [sum(counts[:i]) for i in range(len(rows))]
    for i, row in enumerate(rows):
        own = pixels[starts[i]:starts[i] + counts[i]]
        alone = model.generate(torch.tensor([row]), None, own, [counts[i]], max_new_tokens=8, eos_token_id=[])
        assert alone.sequences[0] == cached[i], f"sample {i}"
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path)
    assert loaded.config.vision.encoder == "none"
    assert loaded.generate(ids, mask, pixels, counts, max_new_tokens=8, eos_token_id=[]).sequences == cached


def test_prefill_logits_batched_match_single(linear_route):
    model = MultimodalLM(tiny_config("unified")).eval()
    rows, ids, mask, pixels, counts = _generation_batch("unified")
    with torch.no_grad():
        batched = model(ids, mask, pixels, counts).logits
        single = model(torch.tensor([rows[0]]), pixel_values=pixels[:1]).logits
    torch.testing.assert_close(batched[0, -len(rows[0]):], single[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_right_padded_prompts_generate_what_left_padded_ones_do(fusion):
    model = MultimodalLM(tiny_config(fusion, cross_attention_layers=[1, 3])).eval()
    _open_gates(model, 0.7)
    rows, ids, mask, pixels, counts = _generation_batch(fusion)
    width = ids.shape[1]
    right_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    left = model.generate(ids, mask, pixels, counts, max_new_tokens=8, eos_token_id=[])
    right = model.generate(right_ids, right_mask, pixels, counts, max_new_tokens=8, eos_token_id=[])
    assert right.sequences == left.sequences


def test_a_pad_token_that_also_stops_generation_can_end_it():
    config = tiny_config()
    config.stop_token_ids = [0]  # the pad token (0) doubles as a stop token, as in some Qwen2 checkpoints
    model = MultimodalLM(config).eval()
    def likeliest_zero(module, inputs, logits):
        logits[..., 0] += 100

    model.llm.lm_head.register_forward_hook(likeliest_zero)
    result = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=6)
    assert result.sequences == [[]] and result.finish_reasons == ["stop"]


def test_images_are_encoded_once_per_generate(monkeypatch):
    model = MultimodalLM(tiny_config("cross")).eval()
    calls = []
    original = model.vision.forward
    monkeypatch.setattr(model.vision, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, ids, mask, pixels, counts = _generation_batch("cross")
    model.generate(ids, mask, pixels, counts, max_new_tokens=5)
    assert len(calls) == 1


def test_eos_stop_strings_and_seeded_sampling():
    model = MultimodalLM(tiny_config("unified")).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    free = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    first = free.sequences[0][0]
    stopped = model.generate(ids, max_new_tokens=8, eos_token_id=first)
    assert stopped.sequences == [[]] and stopped.finish_reasons == ["stop"]
    assert free.finish_reasons == ["length"]

    class Digits:  # decodes token ids as space-separated numbers
        def decode(self, ids):
            return " ".join(map(str, ids))

    stop = str(free.sequences[0][2])
    result = model.generate(ids, max_new_tokens=8, eos_token_id=[], stop_strings=[f" {stop}"], tokenizer=Digits())
    assert result.finish_reasons == ["stop"]
    assert result.texts[0] == " ".join(map(str, free.sequences[0][:2]))
    # sampling: same seed → same tokens; another seed → (almost surely) others; never <image> or <pad>
    a = model.generate(ids, max_new_tokens=16, temperature=1.5, seed=1, eos_token_id=[])
    b = model.generate(ids, max_new_tokens=16, temperature=1.5, seed=1, eos_token_id=[])
    c = model.generate(ids, max_new_tokens=16, temperature=1.5, seed=2, eos_token_id=[])
    assert a.sequences == b.sequences and a.sequences != c.sequences
    assert not {0, IMG} & set(a.sequences[0] + c.sequences[0])


def test_a_streamer_gets_the_prompt_then_each_step_as_transformers_streamers_expect():
    model = MultimodalLM(tiny_config("unified")).eval()
    _, ids, mask, pixels, counts = _generation_batch("unified")

    class Recorder:
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ends += 1

    recorder, modes = Recorder(), []
    model.llm.register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    result = model.generate(ids, mask, pixels, counts, max_new_tokens=6, eos_token_id=[], streamer=recorder)
    assert torch.equal(recorder.puts[0], ids) and recorder.ends == 1
    assert torch.stack(recorder.puts[1:], dim=1).tolist() == result.sequences
    # generate decodes under inference_mode, but what a streamer keeps are ordinary tensors: writable in place
    assert modes and all(modes)
    assert not any(t.is_inference() for t in recorder.puts)
    recorder.puts[-1].add_(1)

    # transformers' own streamer, fed by tessera's generate, yields the text generate returns
    streamers = pytest.importorskip("transformers.generation.streamers")

    class Digits:
        def decode(self, ids, **options):
            return "".join(f" {i}" for i in ids)

    one = ids[:1, mask[0].bool()]
    streamer = streamers.TextIteratorStreamer(Digits(), skip_prompt=True)
    result = model.generate(one, None, pixels[:counts[0]], counts[:1], max_new_tokens=6, eos_token_id=[],
                            streamer=streamer, tokenizer=Digits())
    assert "".join(streamer) == result.texts[0]


def test_a_generation_that_fails_still_ends_its_streamer_and_raises_its_own_error():
    """A consumer reading a TextIteratorStreamer in another thread would wait forever for the end of a generation
    that raised; it gets what was streamed, then the end, and the caller gets generation's error."""
    streamers = pytest.importorskip("transformers.generation.streamers")
    model = MultimodalLM(tiny_config("unified")).eval()
    _, ids, mask, pixels, counts = _generation_batch("unified")
    calls = []

    def fail_at_the_third_forward(*_):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the model broke")

    model.llm.register_forward_pre_hook(fail_at_the_third_forward)

    class Digits:
        def decode(self, ids, **options):
            return "".join(f" {i}" for i in ids)

    streamer = streamers.TextIteratorStreamer(Digits(), skip_prompt=True, timeout=30)
    received = []
    consumer = threading.Thread(target=lambda: received.extend(streamer))
    consumer.start()
    one = ids[:1, mask[0].bool()]
    with pytest.raises(RuntimeError, match="the model broke"):
        model.generate(one, None, pixels[:counts[0]], counts[:1], max_new_tokens=6, eos_token_id=[],
                       streamer=streamer)
    consumer.join(timeout=30)
    assert not consumer.is_alive()
    assert len("".join(received).split()) == 2  # the prefill's token and one step's, then the end

    class EndsBadly:  # an end() that raises must not hide the error that stopped the generation
        def put(self, value):
            pass

        def end(self):
            raise ValueError("no tokens")

    calls.clear()
    with pytest.raises(RuntimeError, match="the model broke"):
        model.generate(one, None, pixels[:counts[0]], counts[:1], max_new_tokens=6, streamer=EndsBadly())


def test_a_row_that_has_stopped_streams_pad_tokens_as_in_transformers():
    """transformers' generate puts pad_token_id for a row once it has finished; tessera went on streaming the
    tokens that row would have had, which generate never returns (a batch streamer showed text past the EOS)."""
    model = MultimodalLM(tiny_config("unified")).eval()
    _, ids, mask, pixels, counts = _generation_batch("unified")
    free = model.generate(ids, mask, pixels, counts, max_new_tokens=6, eos_token_id=[]).sequences
    # an EOS that ends row 0 at its first token and no other row before its third
    eos = free[0][0]
    assert all(eos not in row[:3] for row in free[1:]), "the example needs rows that stop at different steps"

    class Recorder:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            pass

    recorder = Recorder()
    result = model.generate(ids, mask, pixels, counts, max_new_tokens=6, eos_token_id=[eos], streamer=recorder)
    streamed = list(zip(*recorder.puts[1:]))  # per row, the tokens it was given
    pad = model.config.pad_token_id
    assert result.sequences[0] == [] and len(streamed[0]) >= 3
    assert list(streamed[0]) == [eos] + [pad] * (len(streamed[0]) - 1)
    for row, sequence in zip(streamed[1:], result.sequences[1:]):
        assert list(row[:len(sequence)]) == sequence


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    from tessera.generation import SamplingParams, next_tokens
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert next_tokens(logits, SamplingParams(temperature=1.0, top_k=1), g).item() == 1
        assert next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.3), g).item() == 1
    picks = {next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.9), g).item() for _ in range(200)}
    assert picks == {1, 2}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# --- checkpoints -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_save_then_load_gives_identical_logits(tmp_path, fusion):
    model = MultimodalLM(tiny_config(fusion)).eval()
    _open_gates(model, 0.3)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = MultimodalLM.from_pretrained(tmp_path)
    ids = torch.tensor([_prompt(fusion, [5, 6], [7, 8])])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixel_values=pixels).logits, loaded(ids, pixel_values=pixels).logits,
                                   atol=0, rtol=0)


def test_tied_embeddings_saved_once_and_stay_tied(tmp_path):
    config = tiny_config()
    config.text.tie_word_embeddings = True
    model = MultimodalLM(ModelConfig.from_dict(config.to_dict()))
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "llm.lm_head.weight" not in f.keys()
    loaded = MultimodalLM.from_pretrained(tmp_path)
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    torch.testing.assert_close(loaded.llm.lm_head.weight, model.llm.embed_tokens.weight)


def test_a_checkpoint_loads_in_its_stored_dtype_or_the_one_asked_for(tmp_path):
    config = tiny_config()
    config.text.tie_word_embeddings = True
    model = MultimodalLM(ModelConfig.from_dict(config.to_dict())).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    stored = MultimodalLM.from_pretrained(tmp_path)
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}  # not widened to float32 on the way
    assert stored.llm.lm_head.weight is stored.llm.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(stored.state_dict()[name], tensor), name
    wide = MultimodalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in wide.parameters())
    assert wide.llm.lm_head.weight is wide.llm.embed_tokens.weight
    for dtype in (torch.int8, "float32x", 32):  # an integer dtype failed deep in the weight copy, naming shapes
        with pytest.raises(ConfigError, match="dtype"):
            MultimodalLM.from_pretrained(tmp_path, dtype=dtype)


def test_a_loaded_model_does_not_change_when_its_file_does(tmp_path):
    """The weights are copies, not views of the (memory-mapped) file: overwriting a served checkpoint in place
    must not change, or crash, the model already loaded from it."""
    MultimodalLM(tiny_config()).save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(len(data) - header)  # every stored number becomes 0, in place
    with open(weights, "r+b") as f:
        f.write(data)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())


def test_rope_frequencies_stay_float32_in_a_bf16_model():
    model = MultimodalLM(tiny_config()).to(torch.bfloat16)
    reference = MultimodalLM(tiny_config()).llm.rotary
    assert model.llm.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.llm.rotary.inv_freq, reference.inv_freq)
    far = torch.tensor([[700, 2000]])  # the angle's error would grow with the position
    for got, want in zip(model.llm.rotary(far, torch.bfloat16), reference(far, torch.bfloat16)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_the_same_bits_at_inference_as_with_gradients_and_as_llama(dtype):
    """Inference writes the norm into the tensors it makes (see RMSNorm.forward); it must round exactly as the
    norm that training differentiates and as transformers' LlamaRMSNorm, and leave its input and weight alone."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from tessera.text.norm import RMSNorm

    torch.manual_seed(0)
    for shape in [(1, 1, 512), (8, 1, 512), (2, 37, 64)]:
        norm = RMSNorm(shape[-1], 1e-6)
        reference = llama.LlamaRMSNorm(shape[-1], 1e-6)
        with torch.no_grad():
            norm.weight.normal_()
            reference.weight.copy_(norm.weight)
        norm, reference = norm.to(dtype), reference.to(dtype)
        x = (3 * torch.randn(shape)).to(dtype)
        x_before, weight_before = x.clone(), norm.weight.detach().clone()
        with torch.inference_mode():
            at_inference, want = norm(x), reference(x)
        with torch.no_grad():
            without_gradients = norm(x)
        assert torch.equal(x, x_before) and torch.equal(norm.weight, weight_before)
        with_gradients = norm(x.requires_grad_())
        for got in (at_inference, without_gradients, with_gradients.detach()):
            assert got.dtype == dtype and torch.equal(got, want)


def test_loading_a_missing_or_misshapen_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file
    MultimodalLM(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    name = "projector.linear_2.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(weights))
    with pytest.raises(CheckpointError, match=f"'{name}' is missing"):
        MultimodalLM.from_pretrained(tmp_path)
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(3, 3\).*\(32, 32\)"):
        MultimodalLM.from_pretrained(tmp_path)
    tensors[name] = torch.zeros(32, 32)
    tensors["llm.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="unexpected tensor 'llm.extra.weight'"):
        MultimodalLM.from_pretrained(tmp_path)
    weights.write_bytes(b"\x80\x04 pickle, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MultimodalLM.from_pretrained(tmp_path)


# --- freezing ----------------------------------------------------------------------------------------------------
def test_frozen_components_do_not_change_under_an_optimizer_step():
    model = MultimodalLM(tiny_config("cross"))
    model.freeze("vision", "llm")
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([_prompt("cross", [1, 5], [6, 7, 8])])
    model(ids, pixel_values=torch.randn(1, 3, 16, 16), labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name in before:
        if name.startswith(("vision.", "llm.")):
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    assert not torch.equal(before["projector.linear_1.weight"], after["projector.linear_1.weight"])
    assert not torch.equal(before["cross_attention.3.attn_gate"], after["cross_attention.3.attn_gate"])
    counts = model.parameter_counts()
    assert counts["vision"]["trainable"] == 0 and counts["llm"]["trainable"] == 0
    assert counts["cross_attention"]["trainable"] == counts["cross_attention"]["total"] > 0
    model.unfreeze("llm")
    assert model.parameter_counts()["llm"]["trainable"] == counts["llm"]["total"]
    with pytest.raises(ValueError, match="component 'decoder'"):
        model.freeze("decoder")


def test_all_labels_masked_is_an_error_not_a_zero_loss():
    from tessera import DataError
    model = MultimodalLM(tiny_config())
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(DataError, match="every label is -100"):
        model(ids, labels=torch.full_like(ids, -100))
    # a label in the first column is not -100, but no token predicts it: the message says where the rest is
    with pytest.raises(DataError, match=r"every label past the first column \(which no token predicts\) is -100"):
        model(ids, labels=torch.tensor([[1, -100, -100]]))


@pytest.mark.parametrize("fusion, options, padded", [
    ("unified", {}, True),
    ("unified", {}, False),  # no padding: the last layer's rows need a causal mask of their own
    ("cross", {"cross_attention_layers": [1]}, True),
    ("cross", {"cross_attention_layers": [3], "cross_attention_placement": "replace"}, False),  # last layer replaced
])
def test_loss_from_supervised_logits_only_equals_the_loss_from_all_logits(fusion, options, padded):
    """Training computes the LM head only where a label needs it, and the last decoder layer only from the first
    labelled row on; the loss and gradients must not notice."""
    model = MultimodalLM(tiny_config(fusion, **options))
    _open_gates(model, 0.5)
    second = [1, 11, 12, 13] if padded else _prompt(fusion, [1, 11, 16], [12, 13, 14, 15])
    ids, mask = _left_pad([_prompt(fusion, [1, 5, 6], [7, 8, 9, 10]), second])
    assert bool(mask.all()) != padded
    labels = ids.masked_fill(ids == IMG, -100).masked_fill(mask == 0, -100)
    labels[:, :-3] = -100  # the answer: the last three tokens
    labels[1, -1] = -100  # a row whose labels end earlier
    pixels = torch.randn(1, 3, 16, 16)
    counts = [1, 0] if padded else [1, 1]
    pixels = pixels.repeat(sum(counts), 1, 1, 1)
    sparse = model(ids, mask, pixels, counts, labels=labels)
    assert sparse.logits is None
    sparse.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    dense = model(ids, mask, pixels, counts, labels=labels, return_logits=True)
    assert dense.logits.shape == (2, ids.shape[1], 96)
    dense.loss.backward()
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-6, atol=1e-7)
    assert sparse.num_tokens == dense.num_tokens == int((labels[:, 1:] != -100).sum())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("keep", [1, 3])
def test_logits_of_the_last_rows_equal_those_rows_of_all_logits(keep, padded):
    """With logits_to_keep the last decoder layer works on those rows only (see DecoderLLM.run_layers)."""
    llm = DecoderLLM(tiny_config().text)
    ids, mask = _left_pad([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12] if padded else [1, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        every = llm(ids, attention_mask=mask)
        last = llm(ids, attention_mask=mask, logits_to_keep=keep)
    torch.testing.assert_close(last, every[:, -keep:], rtol=1e-5, atol=1e-6)


def test_logits_of_the_last_rows_after_a_cached_prefix():
    """A prompt continued through the KV cache (several new tokens at once) trims the last layer the same way."""
    llm = DecoderLLM(tiny_config().text)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        every = llm(ids)
        cache = KVCache(llm.config, 1, 16, torch.float32)
        llm(ids[:, :4], cache=cache)
        last = llm(ids[:, 4:], cache=cache, logits_to_keep=2)
    torch.testing.assert_close(last, every[:, -2:], rtol=1e-5, atol=1e-6)


def test_a_bf16_model_decoding_through_the_cache_matches_its_full_forward(linear_route, monkeypatch):
    """A bfloat16 model's decode steps (one query row each) attend in float32 and, on the oneDNN route, multiply by
    the packed bf16 weights; the reference, one forward over the whole sequence with PyTorch's own kernels, does
    neither. Both agree to bf16's precision, padded rows included."""
    import tessera.linear

    torch.manual_seed(0)
    llm = DecoderLLM(tiny_config().text).to(torch.bfloat16).eval()
    ids, mask = _left_pad([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15]])
    with torch.no_grad():
        with monkeypatch.context() as plain:
            plain.setattr(tessera.linear, "_OP", None)  # every product through F.linear
            every = llm(ids, attention_mask=mask).float()
        cache = KVCache(llm.config, 2, 16, torch.bfloat16)
        stepped = [llm(ids[:, :4], attention_mask=mask[:, :4], cache=cache, logits_to_keep=1)]
        for t in range(4, ids.shape[1]):
            stepped.append(llm(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    stepped = torch.cat(stepped, dim=1).float()
    assert stepped.shape == every[:, 3:].shape
    real = mask[:, 3:].bool()  # padding rows' logits are never read
    scale = every.abs().max()
    torch.testing.assert_close(stepped[real], every[:, 3:][real], rtol=0, atol=0.03 * scale)
    assert (stepped[real].argmax(-1) == every[:, 3:][real].argmax(-1)).float().mean() >= 0.8


def test_one_query_row_of_a_bf16_model_attends_in_float32():
    """A bf16 decode step's attention is float32 attention on the same inputs, returned in bf16 (CPU's bf16 kernel
    was about 3× slower for one row); more rows stay in bf16."""
    import torch.nn.functional as F

    from tessera.text.attention import attend
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8).bfloat16(), torch.randn(2, 2, 9, 8).bfloat16(), torch.randn(2, 2, 9, 8).bfloat16()
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False
    y = attend(q, k, v, attn_mask=mask, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected.bfloat16())
    additive = torch.zeros(2, 1, 1, 9).masked_fill(~mask, float("-inf"))  # a float mask, in the model's dtype
    assert torch.equal(attend(q, k, v, attn_mask=additive.bfloat16(), enable_gqa=True), y)
    rows = torch.randn(2, 4, 9, 8).bfloat16()
    assert torch.equal(attend(rows, k, v, is_causal=True, enable_gqa=True),
                       F.scaled_dot_product_attention(rows, k, v, is_causal=True, enable_gqa=True))


def test_attention_stays_float32_under_bf16_autocast():
    """Mixed-precision training runs the projections in bf16 but attention in float32 (CPU's bf16 attention
    backward is several times slower): the result equals float32 attention on the same inputs, gradients flow."""
    import torch.nn.functional as F

    from tessera.text.attention import attend
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8).bfloat16().requires_grad_() for _ in range(3))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q, k, v, is_causal=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    plain = attend(q.detach(), k.detach(), v.detach(), is_causal=True)  # outside autocast: untouched dtype
    assert plain.dtype == torch.bfloat16


def test_building_without_weights_leaves_other_threads_modules_real():
    """A server loads its model on a worker thread; modules other threads build meanwhile keep real weights."""
    import threading

    from torch import nn

    from tessera.checkpoint import parameters_on_meta

    built = {}
    with parameters_on_meta():
        worker = threading.Thread(target=lambda: built.setdefault("other", nn.Linear(2, 2)))
        worker.start()
        worker.join()
        built["own"] = nn.Linear(2, 2)
    assert not built["other"].weight.is_meta and built["own"].weight.is_meta


def test_input_ids_of_the_wrong_shape_or_past_the_embedding_are_named():
    """A single row of ids, an empty prompt or an id past the embedding table failed deep inside (an unpacking, a
    reshape, an IndexError); in the forward and in generate alike."""
    from tessera import DataError

    model = MultimodalLM(tiny_config()).eval()
    for ids, words in [
        (torch.tensor([1, 5, 6]), "input_ids of shape (3,): expected a (batch, length) tensor of at least one token"),
        (torch.zeros(1, 0, dtype=torch.long), "input_ids of shape (1, 0)"),
        ([[1, 5]], "input_ids of shape list"),
        (torch.tensor([[1, 5, 96]]), "input_ids hold 1..96: expected token ids in 0..95"),
    ]:
        for call in (lambda: model(ids), lambda: model.generate(ids, max_new_tokens=2)):
            with pytest.raises(DataError, match=re.escape(words)):
                call()


def test_image_counts_and_logits_to_keep_that_are_not_whole_counts_are_named():
    """image_counts=[1.7] was read as 1 image, logits_to_keep=-1 kept every row but the first two."""
    import numpy as np

    model = MultimodalLM(tiny_config()).eval()
    ids, pixels = torch.tensor([[5] + [IMG] * 16 + [6]]), torch.randn(1, 3, 16, 16)
    for counts in ([1.7], [-1], ["1"]):
        with pytest.raises(ImageTokenMismatchError, match=re.escape(f"image_counts={counts}: expected a whole "
                                                                    f"number of images, 0 or more, per sample")):
            model(ids, pixel_values=pixels, image_counts=counts)
    expected = model(ids, pixel_values=pixels, image_counts=[1]).logits
    for counts in ([np.int64(1)], torch.tensor([1])):  # numpy's and torch's integers are whole numbers
        torch.testing.assert_close(model(ids, pixel_values=pixels, image_counts=counts).logits, expected)
    with pytest.raises(ConfigError, match=r"logits_to_keep=-1: expected the number of last rows to keep, or 0"):
        model(ids, pixel_values=pixels, logits_to_keep=-1)


def test_generate_warns_when_padded_prompts_come_without_their_mask():
    model = MultimodalLM(tiny_config()).eval()
    padded = torch.tensor([[0, 0, 5, 6], [4, 5, 6, 7]])  # left-padded with the pad token, 0
    with pytest.warns(UserWarning, match=r"input_ids hold the pad token \(id 0\) but no attention_mask was given"):
        model.generate(padded, max_new_tokens=1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the mask, or without padding, nothing is said
        model.generate(padded, padded != 0, max_new_tokens=1)
        model.generate(padded[1:], max_new_tokens=1)


def test_a_model_output_is_read_as_transformers_outputs_are():
    model = MultimodalLM(tiny_config()).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    out = model(ids, labels=ids, return_logits=True)
    assert out["loss"] is out.loss and out["logits"] is out.logits
    assert out[0] is out.loss and out[1] is out.logits  # the loss first when there is one
    assert model(ids)[0] is not None and model(ids)[0].shape == (1, 4, 96)
    with pytest.raises(KeyError):
        out["hidden_states"]


def test_labels_outside_the_vocabulary_and_a_file_as_checkpoint_directory_are_named(tmp_path):
    from tessera import DataError

    model = MultimodalLM(tiny_config())
    ids = torch.tensor([[1, 5, 6]])
    for bad in (-1, 96):  # torch's IndexError ("Target -1 is out of bounds") from inside the loss, before
        with pytest.raises(DataError, match=rf"labels hold {bad}: expected token ids in 0..95 .* or -100"):
            model(ids, labels=torch.tensor([[-100, bad, 6]]))
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="file: a file; expected a directory to save the checkpoint into"):
        model.save_pretrained(tmp_path / "file")
    model.config.save(tmp_path / "new/dir/config.json")  # its directory made, not a temporary file's name in an error
    assert ModelConfig.load(tmp_path / "new/dir/config.json") == model.config
