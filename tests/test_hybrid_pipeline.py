"""NVLM-H's hybrid fusion (fusion.method="hybrid") through the rest of tessera, as a user meets it: trained by the
nvlm-h recipe, reloaded, evaluated (`tessera eval`), served (the OpenAI-compatible server, and the batching engine's
chunked prefill and joins) and refused by `tessera export`. The hybrid's own unit properties (config, tiling,
processor, model) are in tests/test_hybrid.py."""

import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from tessera import ConfigError, MultimodalLM, Processor
from tessera.cli import main
from tessera.data.shapes import make_shapes_dataset
from tessera.eval.metrics import exact_match
from tessera.interop.export import export_hf
from tessera.model import COMPONENTS
from tessera.serve.app import load_checkpoint
from tessera.serve.batch import RunningBatch
from tessera.serve.engine import Job
from tessera.train.loop import read_metrics
from tessera.train.recipes import RECIPES
from tessera.train.run import RunConfig, run_training
from tessera.vision.tiling import TiledImage
from tests.test_serve import CORPUS, _noise, data_url, image_part, pil, text, user
# the server and its in-process reference, on this module's `checkpoint` (a hybrid one)
from tests.test_serve import allowed_dir, reference, server  # noqa: F401
from tests.test_serve_batching import SpyEngine, _by_hand, alone, drive
from tests.test_train import TINY_MODEL

# stage → steps: a few of each, enough to move every weight a stage trains
STEPS = {"text": 2, "encoder_pretrain": 1, "align": 2, "finetune": 2}
# what NVLM-H's stages train: the encoder frozen throughout, the LLM in the finetune only
TRAINED = {"align": {"projector", "cross_attention"}, "finetune": {"projector", "llm", "cross_attention"}}
QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shapes data drawn at 96 px (twice the tiny model's 48 px encoder: a square scene is a 2x2 grid of tiles)
    and a few steps of every stage of the nvlm-h recipe: (root, run_training's result)."""
    root = tmp_path_factory.mktemp("hybrid")
    make_shapes_dataset(root / "data", train=16, test=4, seed=0, image_size=96, text_train=16, text_test=4)
    run = RunConfig.from_dict({"recipe": "nvlm-h", "data": str(root / "data"), "out": str(root / "run"),
                               "model": TINY_MODEL, "vocab_size": 400, "batch_size": 4, "steps": STEPS})
    return root, run_training(run, log=lambda *_: None, progress=False)


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels (tests/test_serve.py's), which steer even a barely trained model's answers. Its shape decides
    the grid of 48 px tiles: 96x96 2x2, 96x48 1x2, 48x96 2x1, and 48x48 1x1 (too small to be worth 2x2)."""
    return Image.fromarray(_noise(*size, seed=seed))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def grids(model: MultimodalLM, aspect_ratio_ids: torch.Tensor) -> list[list[int]]:
    return [model.config.vision.aspect_ratios[int(i) - 1] for i in aspect_ratio_ids]


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    """The trained hybrid with its gates opened and its image features made louder (as tests/test_serve.py's
    make_checkpoint does), so that the tiles, not only the thumbnail, steer the answers: a tile read wrongly, or
    one tile too many or too few, changes them. Also the `checkpoint` that test_serve's `server` and `reference`
    fixtures serve here."""
    root, _ = trained
    model = MultimodalLM.from_pretrained(root / "run/checkpoint")
    with torch.no_grad():
        model.projector.linear_2.weight.mul_(8)
        for block in model.cross_attention.values():
            block.attn_gate.fill_(0.8)
            block.mlp_gate.fill_(0.8)
    directory = tmp_path_factory.mktemp("hybrid-open") / "ck"
    model.save_pretrained(directory)
    Processor.from_pretrained(root / "run/checkpoint").save_pretrained(directory)
    return directory


# --- training ------------------------------------------------------------------------------------------------------
def _changed(before: MultimodalLM, after: MultimodalLM) -> set[str]:
    """The components with any weight that differs between the two models."""
    changed = set()
    for component in COMPONENTS:
        old, new = before.component(component).state_dict(), after.component(component).state_dict()
        if any(not torch.equal(old[name], new[name]) for name in new):
            changed.add(component)
    return changed


def test_each_nvlm_h_stage_trains_what_the_recipe_says_with_a_finite_loss(trained):
    root, result = trained
    assert result["model"].config.fusion.method == "hybrid"  # the recipe's fusion, with no fusion in the run
    assert [stage.name for stage in RECIPES["nvlm-h"].stages] == list(TRAINED)
    records = read_metrics(root / "run/metrics.jsonl")
    assert [r["stage"] for r in records] == [stage for stage, steps in STEPS.items() for _ in range(steps)]
    assert all(math.isfinite(r["loss"]) for r in records)
    checkpoints = root / "run/checkpoints"
    before = MultimodalLM.from_pretrained(checkpoints / "stage-1-encoder_pretrain")
    for index, (stage, components) in enumerate(TRAINED.items(), start=2):
        after = MultimodalLM.from_pretrained(checkpoints / f"stage-{index}-{stage}")
        assert _changed(before, after) == components, stage
        before = after


def test_the_saved_hybrid_checkpoint_reloads_to_the_model_trained_in_memory(trained):
    """The processor saved beside it tiles as the run's did (same grids, same pixels), and the model gives the
    same logits and loss on a batch of images of three grids."""
    root, result = trained
    model = result["model"].eval()
    loaded = MultimodalLM.from_pretrained(root / "run/checkpoint")
    processor = Processor.from_pretrained(root / "run/checkpoint")
    assert loaded.config == model.config
    assert processor.config == result["processor"].config
    assert processor.config.tile_grids == model.config.vision.aspect_ratios

    def ask(images: int, answer: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": answer}]

    conversations = [ask(1, "red"), ask(2, "blue")]
    images = [[noise((96, 96), 1)], [noise((96, 48), 2), noise((48, 96), 3)]]
    batch = processor(conversations, images)
    assert grids(model, batch["aspect_ratio_ids"]) == [[2, 2], [1, 2], [2, 1]]
    theirs = result["processor"](conversations, images)
    assert batch.keys() == theirs.keys() and all(torch.equal(batch[k], theirs[k]) for k in batch)
    with torch.no_grad():
        ours, reloaded = model(**batch, return_logits=True), loaded(**batch, return_logits=True)
    assert torch.equal(ours.logits, reloaded.logits) and torch.equal(ours.loss, reloaded.loss)
    assert math.isfinite(ours.loss.item())


# --- evaluation ----------------------------------------------------------------------------------------------------
def test_tessera_eval_scores_a_hybrid_checkpoint_s_answers(checkpoint, tmp_path, capsys):
    """`tessera eval` answers records of square (2x2 tiles) and wide (1x2) images in batches that mix them; each
    answer is the one model.generate gives the record alone, and exact_match counts the references it equals (the
    model's own answer for half the records, one it never gives for the others)."""
    model, processor = MultimodalLM.from_pretrained(checkpoint), Processor.from_pretrained(checkpoint)
    records, expected = [], []
    for index in range(4):
        for size in (96, 96), (96, 48):
            path = tmp_path / f"noise-{index}-{size[0]}x{size[1]}.png"
            noise(size, index).save(path)
            prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            batch = processor([prompt], [[path]], add_generation_prompt=True, padding_side="left")
            batch.pop("labels")
            answer = model.generate(**batch, max_new_tokens=6, tokenizer=processor).texts[0]
            matched = len(records) % 2 == 0
            reference = answer if matched else "purple hexagon"
            assert exact_match(answer, reference) == matched  # the test's premise: a reference it never gives
            records.append({"id": f"r{len(records)}", "type": "colour", "images": [str(path)],
                            "messages": prompt + [{"role": "assistant", "content": reference}]})
            expected.append(answer)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    assert "exact match" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    predictions = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predictions] == expected
    assert metrics["questions"] == 8 and metrics["exact_match"] == 0.5


# --- serving -------------------------------------------------------------------------------------------------------
def test_the_server_answers_an_image_as_generate_does(server, reference):  # noqa: F811
    """A chat completion with a data-URL image, square (2x2 tiles) or wide (1x2), is the model's greedy answer;
    the prompt counts the thumbnail's image tokens; and the two images give different answers (they are seen)."""
    client = server.client()
    answers = []
    for size, seed in ((96, 96), 1), ((96, 48), 2):
        image = png(noise(size, seed))
        result = client.chat.completions.create(model="tiny", messages=user(image_part(data_url(image)),
                                                                            text(QUESTION)),
                                                max_tokens=12, temperature=0)
        answer = result.choices[0].message.content
        assert answer == reference(user({"type": "image"}, text(QUESTION)), [pil(image)]), size
        prompt, _, _ = reference.processor.encode([reference.processor.user_message(QUESTION, 1)], True)
        assert result.usage.prompt_tokens == len(prompt)
        answers.append(answer)
    assert answers[0] != answers[1]


def params_of(model: MultimodalLM, tokens: int):
    """Greedy, exactly `tokens` tokens (no stop on EOS)."""
    return model.sampling_params(max_new_tokens=tokens, eos_token_id=[])


def _request(processor, question: str, images: list[Image.Image]) -> tuple[list[int], list]:
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    ids = processor.encode([{"role": "user", "content": content}], add_generation_prompt=True)[0]
    return ids, [processor.preprocess_image(image) for image in images]


def test_a_chunked_prefill_of_rows_with_different_tiles_gives_one_prefill_s_tokens(checkpoint, poisoned_cache):
    """Two newcomers, a wide image (1x2 tiles) and a square one too small for more than one tile, are prefilled
    together a few tokens at a time while a row decodes, then all three decode together: each gives the tokens
    model.generate gives it alone, in one prefill (the caches start as NaN: every slot read was written)."""
    model, processor = load_checkpoint(checkpoint)
    requests = {"running": _request(processor, "What colour?", [noise((48, 48), 3)]),
                "wide": _request(processor, (CORPUS[1] * 4)[:150], [noise((96, 48), 1)]),
                "square": _request(processor, (CORPUS[2] * 4)[:120], [noise((48, 48), 2)])}
    for name, tiles in ("wide", [1, 2]), ("square", [1, 1]):
        assert grids(model, torch.tensor([requests[name][1][0].aspect_ratio_id])) == [tiles]
    ids, pixels = requests["wide"]  # the premise: its second tile steers its answer (read as 1x1, it differs)
    one_tile = [TiledImage(pixels[0].pixels, aspect_ratio_id=1)]
    assert alone(model, processor, ids, one_tile, params_of(model, 10))[0] != \
        alone(model, processor, ids, pixels, params_of(model, 10))[0]
    params = {"running": params_of(model, 30), "wide": params_of(model, 10), "square": params_of(model, 10)}
    engine = SpyEngine(model, processor, max_batch=4, max_images=2, prefill_chunk=8)
    job = lambda name: lambda: Job(name, *requests[name], [params[name]])  # noqa: E731
    results = drive(engine, {0: [job("running")], 2: [job("wide"), job("square")]})
    for name, (ids, pixels) in requests.items():
        tokens, reason, answer = alone(model, processor, ids, pixels, params[name])
        assert results[name] == [(answer, reason)], name
        assert engine.streams[(name, 0)].checker.tokens[0] == tokens, name
    assert engine.stats["prefill_chunks"] > 4  # really in chunks, the running row decoding between them
    assert 3 in engine.batch_sizes  # and the newcomers joined it


def test_hybrid_image_keys_values_join_in_place_within_the_image_room(checkpoint, poisoned_cache):
    """As for Method B (tests/test_serve_batching.py): once the first join has moved a batch's image keys/values
    into storage with room for --max-images-per-prompt images a row, a newcomer with more images than the running
    rows but within that room is written into it without copying the running rows. A hybrid image is
    vision.max_num_tiles tile groups of keys/values, so the room must hold that many per image. Every row answers
    as alone."""
    model, processor = load_checkpoint(checkpoint)
    params = params_of(model, 6)
    requests = {"a": _request(processor, "What colour is the square? " * 3, [noise((48, 48), 4)]),
                "c": _request(processor, "Hi", []),
                "b": _request(processor, "Compare", [noise((96, 48), 5), noise((96, 96), 6)])}
    expected = {name: alone(model, processor, *request, params)[0] for name, request in requests.items()}
    answers, step, finish = _by_hand(requests, params.max_new_tokens)

    def prefill(name):
        ids, pixels = requests[name]
        inputs = processor.pad_batch([(ids, ids)], [pixels], padding_side="left")
        return RunningBatch.prefill(model, [name], [params], inputs, capacity=4, image_room=2)

    with torch.inference_mode():
        joined = step(step(step(prefill("a"))).merge(prefill("c")))
        assert joined.copied  # the prefill's own image keys/values, moved into storage with room
        b = prefill("b")
        assert b.length < joined.length  # b joins the running batch (its rows stay), not the other way round
        joined = joined.merge(b)  # two images where a has one: within the room of 2
        copied = joined.copied
        finish(step(joined))
    assert answers == expected
    assert not copied


# --- export --------------------------------------------------------------------------------------------------------
def test_export_refuses_a_hybrid_checkpoint_naming_the_hybrid_before_writing_anything(trained, tmp_path, capsys):
    """transformers has no NVLM-H class (LLaVA is Method A, Mllama Method B): `tessera export` says so in one line,
    and leaves no half-written directory behind."""
    root, _ = trained
    with pytest.raises(ConfigError) as error:
        export_hf(root / "run/checkpoint", tmp_path / "hf")
    assert "hybrid" in str(error.value)
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(root / "run/checkpoint"), str(tmp_path / "hf")]) == 2
    stderr = capsys.readouterr().err
    assert "hybrid" in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "hf").exists()
