"""NVLM-H, the hybrid fusion: dynamic high-resolution tiling, the processor's thumbnails and tiles, and the model's
properties — gates at zero are Method A on the thumbnail alone, cache = no cache, batched = one by one, padding
tiles are never read, and the tiles reach only the tokens that may see their image."""

import dataclasses

import pytest
import torch
from PIL import Image

import tessera
from tessera import ConfigError, DataError, ImageTokenMismatchError, ModelConfig, MultimodalLM, Processor
from tessera.text.cache import KVCache
from tessera.vision.preprocess import preprocess_image
from tessera.vision.tiling import closest_grid, pad_tiles, preprocess_tiled, real_tiles
from tests.conftest import tiny_config
from tests.test_processor import SENTENCES, VOCAB

GRIDS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]  # every grid of <= 4 tiles


def hybrid_config(**fusion) -> ModelConfig:
    config = tiny_config("hybrid", cross_attention_layers=[1, 3], **fusion)
    return dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=VOCAB))


@pytest.fixture(scope="module")
def tokenizer():
    return tessera.train_tokenizer(SENTENCES, vocab_size=300)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Processor.for_model(hybrid_config(), tokenizer)


def open_gates(model: MultimodalLM, value: float = 0.7) -> MultimodalLM:
    """The gates open, and the tile positions learned (random): as a trained hybrid, every path carries a signal."""
    for block in model.cross_attention.values():
        torch.nn.init.constant_(block.attn_gate, value)
        torch.nn.init.constant_(block.mlp_gate, value)
    torch.nn.init.normal_(model.projector.tile_positions.embedding.weight, std=0.5)
    return model


def quadrants(size: tuple[int, int]) -> Image.Image:
    """An image whose four quarters have four colours."""
    image = Image.new("RGB", size)
    w, h = size
    for (x, y), colour in zip([(0, 0), (1, 0), (0, 1), (1, 1)], [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        image.paste(colour, (x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))
    return image


def logits(model: MultimodalLM, batch: dict) -> torch.Tensor:
    """Every row's logits (with labels the model would compute only the supervised rows')."""
    return model(**batch, return_logits=True).logits


def ask(processor, images, question="What colour is the circle?", answer=None):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


# --- configuration -----------------------------------------------------------------------------------------------
def test_the_hybrid_has_gated_blocks_and_as_many_image_tokens_as_its_thumbnail_gives():
    config = tiny_config("hybrid")
    assert config.cross_attention_layers == [3]  # every 4th layer by default, as Method B
    assert config.image_seq_length == config.num_feature_tokens == 16  # the thumbnail's 4x4 patches
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("vision, words", [
    ({"encoder": "none"}, "fusion.method='hybrid' with vision.encoder='none': the hybrid encodes a thumbnail and "
                          "tiles with one ViT; expected vision.encoder='vit'"),
    ({"encoder": "tiled"}, "fusion.method='hybrid' with vision.encoder='tiled'"),
    ({"max_num_tiles": 0}, "vision.max_num_tiles=0: expected a positive integer"),
    ({"max_num_tiles": 2, "supported_aspect_ratios": [[2, 2]]},
     "vision.supported_aspect_ratios=[[2, 2]]: expected a non-empty list of [rows, columns] pairs of at most "
     "max_num_tiles=2 tiles"),
])
def test_a_hybrid_config_that_cannot_tile_is_refused_naming_the_field(vision, words):
    data = tiny_config("hybrid").to_dict()
    data["vision"].update(vision)
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_dict(data)
    assert words in str(error.value)


# --- dynamic high resolution -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, grid", [
    ((32, 16), [1, 2]),  # twice as wide: one row of two tiles
    ((16, 48), [3, 1]),  # three times as tall
    ((16, 16), [1, 1]),  # square and small: one tile (2x2 would upscale it for no detail)
    ((40, 40), [2, 2]),  # square and larger than half the 2x2 canvas: four tiles keep its detail
    ((100, 10), [1, 4]),  # wider than any grid: the widest
])
def test_an_image_gets_the_grid_closest_to_its_shape(size, grid):
    assert GRIDS[closest_grid(*size, GRIDS, tile=16)] == grid


def test_tiles_are_the_image_resized_onto_its_grid_row_by_row_after_the_thumbnail():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    image = quadrants((32, 32))  # its 2x2 grid's canvas: the tiles are its quarters, unresized
    tiled = preprocess_tiled(image, 16, mean, std, GRIDS)
    assert tiled.pixels.shape == (5, 3, 16, 16) and GRIDS[tiled.aspect_ratio_id - 1] == [2, 2]
    assert torch.equal(tiled.pixels[0], preprocess_image(image, 16, mean, std))
    for slot, colour in zip(range(1, 5), [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)]):  # one quarter each
        expected = (torch.tensor(colour, dtype=torch.float32) - 0.5) / 0.25
        assert torch.allclose(tiled.pixels[slot], expected[:, None, None].expand(3, 16, 16), atol=1e-5)

    wide = preprocess_tiled(quadrants((32, 16)), 16, mean, std, GRIDS)
    assert GRIDS[wide.aspect_ratio_id - 1] == [1, 2]
    assert wide.pixels.shape == (3, 3, 16, 16)  # kept without padding; a batch pads it
    batch = pad_tiles([wide, tiled], 5)
    assert torch.equal(batch[0, :3], wide.pixels) and batch[0, 3:].abs().sum() == 0
    assert torch.equal(batch[1], tiled.pixels)
    with pytest.raises(DataError, match=r"^image 1 of the batch has 5 tiles \(a hybrid's thumbnail, if any, "
                                        r"counted among them\); expected at most 3, the tile slots"):
        pad_tiles([wide, tiled], 3)
    assert real_tiles(torch.tensor([wide.aspect_ratio_id, tiled.aspect_ratio_id]), GRIDS, 4).tolist() == \
        [[True, True, False, False], [True, True, True, True]]


def test_an_image_whose_grid_would_be_too_large_is_refused_before_it_is_built(processor):
    with pytest.raises(DataError, match=r"resizing it onto its 1x4 grid of 16x16 tiles would make it 64x16 = 1024 "
                                        r"pixels, more than the 1000 allowed"):
        processor.check_image_size(400, 100, max_pixels=1000)


# --- the processor -----------------------------------------------------------------------------------------------
def test_the_processor_gives_each_image_a_thumbnail_its_tiles_and_its_grid(processor, tokenizer):
    batch = processor([ask(processor, [quadrants((32, 16))], answer="red"),
                       ask(processor, [quadrants((16, 16)), quadrants((32, 32))], answer="blue")])
    assert batch["pixel_values"].shape == (3, 5, 3, 16, 16)
    assert [GRIDS[i - 1] for i in batch["aspect_ratio_ids"].tolist()] == [[1, 2], [1, 1], [2, 2]]
    assert batch["image_counts"].tolist() == [1, 2]
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert image_tokens == [16, 32]  # the thumbnail's 16 per image: the tiles take no place in the text

    empty = processor([[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]])
    assert empty["pixel_values"].shape == (0, 5, 3, 16, 16) and empty["aspect_ratio_ids"].shape == (0,)


def test_a_saved_processor_tiles_as_before(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.config == processor.config
    image = quadrants((48, 16))
    assert torch.equal(loaded.preprocess_image(image).pixels, processor.preprocess_image(image).pixels)


@pytest.mark.parametrize("settings, words", [
    ({"tile_grids": [[1, 2]], "max_tiles": None}, "expected both set (dynamic high resolution) or both null"),
    ({"tile_grids": [[1, 2]], "max_tiles": 1}, "processor.tile_grids=[[1, 2]]: expected a non-empty list of "
                                                "[rows, columns] pairs of at most processor.max_tiles=1 tiles"),
    ({"tile_grids": [[1, 2]], "max_tiles": 0}, "processor.max_tiles=0: expected a positive integer"),
])
def test_bad_tiling_settings_are_refused_naming_the_field(processor, settings, words):
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(processor.config, **settings)
    assert words in str(error.value)


# --- the model ---------------------------------------------------------------------------------------------------
def test_gates_at_zero_are_method_a_reading_the_thumbnail_alone(processor):
    """A fresh hybrid is NVLM-D on its thumbnail: its blocks add nothing until training opens their gates."""
    hybrid = MultimodalLM(hybrid_config()).eval()
    unified = MultimodalLM(dataclasses.replace(hybrid.config, fusion=dataclasses.replace(
        hybrid.config.fusion, method="unified"))).eval()
    unified.load_state_dict({k: v for k, v in hybrid.state_dict().items()
                             if not k.startswith(("cross_attention.", "projector.tile_positions."))})
    batch = processor([ask(processor, [quadrants((32, 16))], answer="red"),
                       ask(processor, [quadrants((16, 16)), quadrants((40, 40))], answer="blue")])
    with torch.no_grad():
        ours = logits(hybrid, batch)
        thumbnails_only = unified(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:, 0],
                                  batch["image_counts"]).logits  # no labels: every row
        assert torch.equal(ours, thumbnails_only)
        open_gates(hybrid)
        assert not torch.allclose(logits(hybrid, batch), thumbnails_only, atol=1e-3)  # the tiles now count


def test_a_tile_reaches_only_the_tokens_that_see_its_image_and_padding_tiles_are_never_read(processor):
    model = open_gates(MultimodalLM(hybrid_config())).eval()
    batch = processor([ask(processor, [quadrants((32, 16)), quadrants((40, 40))], answer="red")])
    with torch.no_grad():
        before = logits(model, batch)
        padded = dict(batch, pixel_values=batch["pixel_values"].clone())
        padded["pixel_values"][0, 3:] = torch.randn(2, 3, 16, 16)  # the wide image's two padding slots
        assert torch.equal(logits(model, padded), before)

        changed = dict(batch, pixel_values=batch["pixel_values"].clone())
        changed["pixel_values"][1, 4] = torch.randn(3, 16, 16)  # the second image's last tile
        after = logits(model, changed)
    second_image = (batch["input_ids"][0] == processor.image_token_id).nonzero().flatten()[16]
    differs = (after - before).abs().amax(-1)[0] > 1e-6
    assert not differs[:second_image].any() and differs[second_image:].all()


def test_a_tile_brings_its_place_in_the_image_once_its_positions_are_learned(processor):
    """Cross-attention keys have no position: the same tile in another slot (or another grid) would read the same
    without the projector's tile positions. They start at zero, so a new hybrid reads its tiles as they are."""
    model = open_gates(MultimodalLM(hybrid_config())).eval()
    torch.nn.init.zeros_(model.projector.tile_positions.embedding.weight)  # as a new hybrid's
    image = processor.preprocess_image(quadrants((32, 32)))
    swapped = image.pixels.clone()
    swapped[[1, 2]] = swapped[[2, 1]]  # the top row's two tiles trade places
    ids = torch.tensor([image.aspect_ratio_id])

    def tile_features(pixels, grid=ids):
        with torch.no_grad():
            return model.encode_images(pixels[None], grid)[0].view(5, 16, -1)

    def as_swapped_back(features):
        return features[[0, 2, 1, 3, 4]]

    assert torch.equal(as_swapped_back(tile_features(swapped)), tile_features(image.pixels))  # zero: no place
    torch.nn.init.normal_(model.projector.tile_positions.embedding.weight)
    assert not torch.allclose(as_swapped_back(tile_features(swapped)), tile_features(image.pixels), atol=1e-3)
    wide = processor.preprocess_image(quadrants((32, 16)))
    assert tile_features(pad_tiles([wide], 5)[0], torch.tensor([wide.aspect_ratio_id]))[3:].abs().sum() == 0


def test_padding_tiles_are_never_attended_even_by_rows_that_see_no_image(processor):
    """Llama 3.2 Vision's rule for text before any image (cross_attention_blind_rows="attend_all") lets those rows
    attend to every key of their sample's images: for the hybrid, the real tiles' only — whatever the padding slots
    hold, nothing changes."""
    model = open_gates(MultimodalLM(hybrid_config(cross_attention_blind_rows="attend_all"))).eval()
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                             {"type": "image", "image": quadrants((32, 16))}]}]
    batch = processor([messages], add_generation_prompt=True)
    del batch["labels"], batch["pixel_values"]
    prompt = processor([messages], add_generation_prompt=True)
    with torch.no_grad():
        features = model.encode_images(prompt["pixel_values"], prompt["aspect_ratio_ids"])
        junk = features.clone()
        junk.view(1, 5, 16, -1)[:, 3:] = torch.randn(1, 2, 16, junk.shape[-1])  # the 1x2 grid's two padding slots
        before = model(**batch, image_features=features).logits
        assert torch.equal(model(**batch, image_features=junk).logits, before)


def test_a_processor_that_cuts_other_grids_than_its_model_is_refused_at_load(processor, tmp_path):
    """An aspect-ratio id names a grid by its place in the list: grids in another order would have the model read
    a 1x2 image as another grid, silently."""
    MultimodalLM(hybrid_config()).save_pretrained(tmp_path)
    shuffled = dataclasses.replace(processor.config, tile_grids=list(reversed(processor.config.tile_grids)))
    Processor(processor.tokenizer, shuffled).save_pretrained(tmp_path)
    with pytest.raises(tessera.CheckpointError, match=r"processor_config.json: tile_grids=\[\[4, 1\], .* but the "
                                                      r"model beside it expects tile_grids=\[\[1, 1\], "):
        Processor.from_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert Processor.from_pretrained(tmp_path).config == processor.config


def test_tiled_pixels_given_to_an_untiled_model_are_refused_naming_the_shape(processor):
    model = MultimodalLM(dataclasses.replace(hybrid_config(), fusion=dataclasses.replace(
        hybrid_config().fusion, method="unified"))).eval()
    batch = processor([ask(processor, [quadrants((32, 16))], answer="red")])
    with pytest.raises(DataError, match=r"pixel_values of shape \(1, 5, 3, 16, 16\): expected \(images, channels, "
                                        r"height, width\) for fusion.method='unified'; tiled images"):
        model(**batch)


def test_an_untiled_processor_saves_its_settings_as_before(tokenizer, tmp_path):
    """Without the tiling fields, so a tessera from before the hybrid reads a unified or cross model's processor."""
    import json

    Processor.for_model(dataclasses.replace(hybrid_config(), fusion=dataclasses.replace(
        hybrid_config().fusion, method="cross")), tokenizer).save_pretrained(tmp_path)
    assert not {"tile_grids", "max_tiles"} & set(json.loads((tmp_path / "processor_config.json").read_text()))


def test_generation_with_the_cache_is_generation_without_it(processor, poisoned_cache):
    model = open_gates(MultimodalLM(hybrid_config())).eval()
    prompts = processor([ask(processor, [quadrants((32, 16))]),
                         ask(processor, [quadrants((16, 16)), quadrants((48, 48))])],
                        add_generation_prompt=True, padding_side="left")
    cached = model.generate(**prompts, max_new_tokens=8)
    uncached = model.generate(**prompts, max_new_tokens=8, use_cache=False)
    assert cached.sequences == uncached.sequences


def test_a_batch_gives_each_row_what_it_gives_alone(processor):
    model = open_gates(MultimodalLM(hybrid_config())).eval()
    rows = [ask(processor, [quadrants((32, 16))], answer="red"),
            ask(processor, [quadrants((16, 16)), quadrants((48, 48))], "How many shapes are there?", "two"),
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]]
    with torch.no_grad():
        together = logits(model, processor(rows))
        for i, row in enumerate(rows):
            alone = logits(model, processor([row]))[0]
            assert torch.allclose(together[i, :alone.shape[0]], alone, atol=1e-5)


def test_a_chunked_prefill_ends_where_one_prefill_does(processor):
    model = open_gates(MultimodalLM(hybrid_config())).eval()
    prompt = processor([ask(processor, [quadrants((32, 16)), quadrants((48, 48))])], add_generation_prompt=True)
    del prompt["labels"]  # a prompt has no answer to learn
    with torch.no_grad():
        whole = model(**prompt, logits_to_keep=1).logits[:, -1]
        cache = KVCache(model.config.text, 1, prompt["input_ids"].shape[1], model.dtype, model.device)
        chunks = list(model.prefill_in_chunks(prompt["input_ids"], prompt["attention_mask"], cache, 7,
                                              prompt["pixel_values"], prompt["image_counts"],
                                              prompt["aspect_ratio_ids"]))
    assert all(c is None for c in chunks[:-1]) and torch.allclose(chunks[-1], whole, atol=1e-5)


def test_training_reaches_every_component_the_hybrid_has(processor):
    model = open_gates(MultimodalLM(hybrid_config()), 0.1).train()
    model(**processor([ask(processor, [quadrants((32, 32))], answer="red")])).loss.backward()
    for name in ("vision", "projector", "llm", "cross_attention"):
        grads = [p.grad for p in model.component(name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("change, error, words", [
    (lambda b: b.update(pixel_values=b["pixel_values"][:, 0]), DataError,
     "pixel_values of shape (1, 3, 16, 16): the hybrid expects (images, 5, channels, height, width)"),
    (lambda b: b.pop("aspect_ratio_ids"), DataError, "aspect_ratio_ids: tiled images need each image's"),
    (lambda b: b.update(aspect_ratio_ids=torch.tensor([0])), DataError,
     "aspect_ratio_ids=[0]: expected ids in 1..8 (vision.aspect_ratios)"),
])
def test_bad_hybrid_inputs_are_refused_naming_what_was_expected(processor, change, error, words):
    model = MultimodalLM(hybrid_config()).eval()
    batch = processor([ask(processor, [quadrants((32, 16))], answer="red")])
    change(batch)
    with pytest.raises(error) as raised:
        model(**batch)
    assert words in str(raised.value)


def test_image_features_of_another_layout_are_refused(processor):
    model = MultimodalLM(hybrid_config()).eval()
    batch = processor([ask(processor, [quadrants((32, 16))], answer="red")])
    with pytest.raises(ImageTokenMismatchError, match=r"each image gives 16 image features; the hybrid expects 80: "
                                                      r"a thumbnail and 4 tile slots"):
        model(batch["input_ids"], image_features=torch.zeros(1, 16, 32), image_counts=[1],
              aspect_ratio_ids=batch["aspect_ratio_ids"])


def test_the_analytic_flops_are_what_a_hybrid_training_step_spends(monkeypatch):
    """As tests/test_bench.py checks Methods A and B: PyTorch's FLOP counter over a real step with every tile slot
    real, against training_step_flops (plus the last layer's surplus rows that test names)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import tessera.linear
    from tessera.flops import TRAIN, decoder_layer_flops, training_step_flops

    monkeypatch.setattr(tessera.linear, "_OP", None)  # every product through F.linear, which the counter sees
    config = hybrid_config()
    model = MultimodalLM(config).train()
    batch, labelled, image_tokens = 2, 6, config.image_seq_length
    text = torch.randint(10, 200, (batch, 12))
    input_ids = torch.cat([torch.full((batch, 1), 1), torch.full((batch, image_tokens), config.image_token_id), text],
                          dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -labelled:] = input_ids[:, -labelled:]  # `labelled` rows predict them
    full_grid = GRIDS.index([2, 2]) + 1  # all four tiles real: the count the analytic FLOPs take
    inputs = {"input_ids": input_ids, "labels": labels, "image_counts": [1] * batch,
              "pixel_values": torch.randn(batch, 5, 3, 16, 16), "aspect_ratio_ids": torch.full((batch,), full_grid)}
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(**inputs).loss.backward()

    sequence, t = input_ids.shape[1], config.text
    trailing_row = TRAIN * batch * (decoder_layer_flops(config, sequence, sequence, outputs=labelled + 1)
                                    - decoder_layer_flops(config, sequence, sequence, outputs=labelled))
    unread_queries = TRAIN * batch * (sequence - labelled - 1) * 2 * t.hidden_size * t.num_heads * t.head_dim
    analytic = training_step_flops(config, batch, image_tokens, sequence - image_tokens, labelled)
    assert counter.get_total_flops() == analytic + trailing_row + unread_queries


def test_a_hybrid_checkpoint_loads_as_it_was_saved(processor, tmp_path):
    model = open_gates(MultimodalLM(hybrid_config())).eval()
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path)
    batch = processor([ask(processor, [quadrants((32, 16))], answer="red")])
    with torch.no_grad():
        assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_compiled_the_hybrid_generates_and_trains_as_eager(processor):
    """torch.compile's opt-in (MultimodalLM.compile) on the hybrid: the ViT over thumbnails and tiles, the layer
    stack with its gated blocks and the decode step each compile as one graph (fullgraph=True), and give eager's
    tokens, loss and gradients."""
    import copy

    import torch._dynamo

    from tests.test_compile import CountingBackend

    torch._dynamo.reset()
    try:
        eager = open_gates(MultimodalLM(hybrid_config())).eval()
        backend = CountingBackend()
        compiled = copy.deepcopy(eager).compile(backend=backend)
        prompts = processor([ask(processor, [quadrants((32, 16))]), ask(processor, [quadrants((48, 48))])],
                            add_generation_prompt=True, padding_side="left")
        want = eager.generate(**prompts, max_new_tokens=6, eos_token_id=[])
        assert compiled.generate(**prompts, max_new_tokens=6, eos_token_id=[]).sequences == want.sequences
        assert backend.graphs >= 3  # vision encoder, layer stack at prefill, decode step

        batch = processor([ask(processor, [quadrants((32, 16))], answer="red"),
                           ask(processor, [quadrants((48, 48))], answer="blue")])
        losses = {}
        for name, model in (("eager", eager.train()), ("compiled", compiled.train())):
            losses[name] = model(**batch).loss
            losses[name].backward()
        torch.testing.assert_close(losses["compiled"], losses["eager"], atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    finally:
        torch._dynamo.reset()
