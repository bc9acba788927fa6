"""Training: stage freezing per recipe, loss normalisation under accumulation, a short run that learns, run
configs and their overrides; evaluation."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from tessera import ConfigError, DataError, ModelConfig, MultimodalLM, Processor, TrainingError, train_tokenizer
from tessera.data.records import load_examples
from tessera.data.shapes import make_shapes_dataset
from tessera.eval.evaluate import evaluate
from tessera.eval.metrics import caption_scores, exact_match, normalize_answer
from tessera.eval.report import metrics_table
from tessera.model import COMPONENTS
from tessera.train.loop import TrainSettings, batches, lr_lambda, read_metrics, train_stage, training_precision
from tessera.train.recipes import RECIPES, Stage, encoder_pretraining
from tessera.presets.tiny import tiny_config
from tessera.train.run import RunConfig, build_stages, dataset_texts, model_config, run_training, select

TINY_MODEL = {
    "vision": {"image_size": 48, "patch_size": 16, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
               "intermediate_size": 64},
    "text": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
             "max_position_embeddings": 512},
    "fusion": {"cross_attention_layers": [1]},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(directory, train=40, test=6, seed=0, text_train=40, text_test=10)
    return directory


def _model_and_data(shapes, fusion):
    tokenizer = train_tokenizer(dataset_texts(shapes), vocab_size=400)
    config = ModelConfig.from_dict({**TINY_MODEL, "text": {**TINY_MODEL["text"], "vocab_size": 448},
                                    "fusion": {**TINY_MODEL["fusion"], "method": fusion}})
    model = MultimodalLM(config)
    processor = Processor.for_model(config, tokenizer, max_length=256)
    examples, report = load_examples(shapes / "train.json", processor)
    assert report.skipped == 0
    text, _ = load_examples(shapes / "text_train.jsonl", processor)
    return model, processor, examples, text


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_stage_changes_exactly_what_it_trains(shapes, tmp_path, name):
    recipe = RECIPES[name]
    model, processor, examples, text = _model_and_data(shapes, recipe.fusion)
    with torch.no_grad():  # open Method B's gates, or the blocks behind them would get no gradient at all
        for block in model.cross_attention.values():
            block.attn_gate.fill_(0.5)
            block.mlp_gate.fill_(0.5)
    settings = TrainSettings(batch_size=4, progress=False, clip=0)
    for stage in [encoder_pretraining(recipe.fusion)] + recipe.stages:
        stage = Stage(stage.name, stage.train, stage.data, steps=2, lr=1e-2, keep=stage.keep)
        before = {c: {k: v.clone() for k, v in model.component(c).state_dict().items()} for c in COMPONENTS}
        train_stage(model, processor, stage, select(examples, stage.data, text), settings, tmp_path,
                    tmp_path / "m.jsonl", log=lambda *_: None)
        kept = stage.train if stage.keep is None else stage.keep
        for component in COMPONENTS:
            after = model.component(component).state_dict()
            changed = any(not torch.equal(before[component][k], after[k]) for k in after)
            assert changed == (component in kept and bool(after)), f"{name}/{stage.name}: {component}"
        counts = model.parameter_counts()
        for component in COMPONENTS:
            trainable = counts[component]["trainable"]
            assert (trainable == counts[component]["total"]) if component in stage.train else trainable == 0


def test_llama32_recipe_never_trains_the_llm():
    for stage in RECIPES["llama3.2"].stages + RECIPES["nvlm-x"].stages:
        assert "llm" not in stage.train


def test_accumulated_loss_weighs_every_answer_token_the_same(shapes):
    """Two micro-batches with different answer lengths: the accumulated gradient equals the gradient of the
    token mean over the whole batch (not the mean of the two micro-batch means)."""
    model, processor, examples, _ = _model_and_data(shapes, "unified")
    short = [e for e in examples if e.example.type == "questions"][:2]
    long = [e for e in examples if e.example.type == "caption"][:2]
    parts = [processor.pad_batch([(e.input_ids, e.labels) for e in group], [e.pixel_values for e in group])
             for group in (short, long)]
    total = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)
    model.zero_grad()
    for part in parts:
        model(**part, num_items_in_batch=total).loss.backward()
    accumulated = model.projector.linear_1.weight.grad.clone()
    model.zero_grad()
    whole = processor.pad_batch([(e.input_ids, e.labels) for e in short + long], [e.pixel_values for e in short + long])
    model(**whole).loss.backward()
    torch.testing.assert_close(accumulated, model.projector.linear_1.weight.grad, rtol=1e-4, atol=1e-7)


def test_warmup_then_cosine_to_the_floor():
    factor = lr_lambda(100, warmup_fraction=0.1, min_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(99) == pytest.approx(0.1, abs=1e-3)
    values = [factor(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly():
    factor = lr_lambda(100, warmup_fraction=0.1, min_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert all(factor(s) == 1.0 for s in range(10, 80))
    assert factor(90) == pytest.approx(0.5) and factor(99) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="schedule='step'"):
        lr_lambda(100, 0.1, 0.1, schedule="step")


def test_batches_are_seeded_and_cover_every_example(shapes):
    model, processor, examples, _ = _model_and_data(shapes, "unified")
    first = [next(batches(examples, processor, 8, seed=1))["input_ids"] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    stream = batches(examples, processor, 8, seed=1)
    seen = sum(int(next(stream)["image_counts"].sum()) for _ in range(len(examples) // 8))
    assert seen == len(examples) // 8 * 8


def test_grouping_by_length_pads_less_and_still_covers_every_example(shapes):
    _, processor, examples, _ = _model_and_data(shapes, "unified")
    per_epoch = len(examples) // 4
    examples = examples[:per_epoch * 4]  # whole batches only, so an epoch holds every example

    def epoch(group):
        stream = batches(examples, processor, 4, seed=3, group_by_length=group)
        return [next(stream) for _ in range(per_epoch)]

    plain, grouped = epoch(False), epoch(True)
    padded = lambda run: sum(b["input_ids"].numel() for b in run)  # noqa: E731
    real = lambda run: sum(int(b["attention_mask"].sum()) for b in run)  # noqa: E731
    assert real(grouped) == real(plain)
    assert padded(grouped) - real(grouped) < 0.5 * (padded(plain) - real(plain))  # padding at least halved
    rows = lambda run: sorted(tuple(r[m.bool()].tolist()) for b in run for r, m in zip(b["input_ids"], b["attention_mask"]))  # noqa: E731
    assert rows(grouped) == rows(plain)


def test_a_seconds_long_run_lowers_the_loss_and_writes_its_outputs(shapes, tmp_path):
    run = RunConfig.from_dict({
        "recipe": "molmo", "data": str(shapes), "out": str(tmp_path / "run"), "model": TINY_MODEL,
        "vocab_size": 400, "batch_size": 8, "steps": {"text": 30, "train": 40},
        "lr": {"text": 3e-3, "train": 3e-3}, "checkpoint_every": 20,
    })
    result = run_training(run, log=lambda *_: None, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["text"] * 30 + ["train"] * 40
    assert {"loss", "lr", "samples_per_s", "tokens", "grad_norm"} <= set(records[0])
    for stage in ("text", "train"):
        losses = [r["loss"] for r in records if r["stage"] == stage]
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, stage
    assert (tmp_path / "run/loss.png").stat().st_size > 1000
    for directory in ("checkpoint", "checkpoints/stage-0-text", "checkpoints/stage-1-train",
                      "checkpoints/step-000020", "checkpoints/step-000060"):
        assert (tmp_path / "run" / directory / "model.safetensors").is_file(), directory
    loaded = MultimodalLM.from_pretrained(tmp_path / "run/checkpoint")
    assert loaded.config == result["model"].config
    assert math.isfinite(result["text_loss_before"]) and math.isfinite(result["text_loss_after"])


def test_a_stage_that_trains_a_component_at_a_learning_rate_of_0_says_so(shapes, tmp_path):
    """A rate of 0 is a way to hold a component for one stage, but more often a slip: a stage set to learn nothing
    ran silently ("training projector, llm") and changed no weight."""
    lines = []
    run_training(RunConfig.from_dict({
        "recipe": "llava", "data": str(shapes), "out": str(tmp_path / "run"), "model": TINY_MODEL, "vocab_size": 400,
        "batch_size": 4, "steps": {"text": 1, "encoder_pretrain": 0, "align": 1, "instruct": 1},
        "lr": {"align": 0}, "lr_scale": {"instruct": {"llm": 0}}}), log=lines.append, progress=False)
    warnings = [line for line in lines if line.startswith("warning: stage")]
    assert warnings == ["warning: stage 'align' trains projector at a learning rate of 0 (so the stage changes no "
                        "weight)", "warning: stage 'instruct' trains llm at a learning rate of 0"]


def test_a_stage_whose_gradients_and_moments_outgrow_memory_is_warned_about(shapes, tmp_path, monkeypatch):
    import tessera.train.loop as loop

    model, processor, examples, _ = _model_and_data(shapes, "unified")
    stage = Stage("instruct", ("projector", "llm"), "questions", steps=1)
    trainable = sum(p.numel() for name in stage.train for p in model.component(name).parameters())
    needed = 3 * 4 * trainable  # float32: a gradient and two moments a weight

    def warnings(available, **environment):
        monkeypatch.setattr(loop, "available_memory", lambda: None if available is None else (available, 2**40))
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        lines = []
        train_stage(model, processor, stage, examples, TrainSettings(batch_size=4, progress=False), tmp_path,
                    tmp_path / "m.jsonl", log=lines.append)
        return [line for line in lines if line.startswith("warning:")]

    assert warnings(needed - 1) == [
        f"warning: stage 'instruct' trains {trainable / 1e6:.2f}M parameters, whose gradients and AdamW moments take "
        f"{needed / 2**30:.1f} GiB more, beyond the {(needed - 1) / 2**30:.1f} GiB available (activations come on "
        f"top); it will most likely run out of memory. Train fewer components in this stage, or use a machine with "
        f"more memory"]
    assert warnings(needed) == [] and warnings(None) == []  # None: not Linux, nothing to compare with
    # two processes on this machine each hold their own
    assert "in each of this machine's 2 processes" in warnings(needed, LOCAL_WORLD_SIZE="2")[0]


def test_a_stage_of_0_steps_is_one_line_that_says_it_is_left_out(shapes, tmp_path):
    """It printed the header and the parameter table of a stage that would train nothing."""
    model, processor, examples, _ = _model_and_data(shapes, "unified")
    lines = []
    done = train_stage(model, processor, Stage("align", ("projector",), "captions", steps=0), examples,
                       TrainSettings(batch_size=4, progress=False), tmp_path, tmp_path / "m.jsonl", log=lines.append)
    assert done == [] and lines == ["stage 'align': 0 steps, left out"]


def test_a_resumed_stage_s_moments_in_memory_count_as_held(monkeypatch):
    import tessera.train.loop as loop

    model = MultimodalLM(tiny_config("unified", 512))
    model.freeze("vision", "projector")
    weights = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    monkeypatch.setattr(loop, "available_memory", lambda: (weights, 2**40))  # room for one copy, not three
    stage = Stage("instruct", ("llm",), "questions")
    lines = []
    loop.warn_if_training_state_outgrows_memory(model, stage, lines.append)
    assert len(lines) == 1
    lines = []
    loop.warn_if_training_state_outgrows_memory(model, stage, lines.append, held=2 * weights)  # its two moments
    assert lines == []


def test_a_nan_loss_stops_the_stage_before_the_update(shapes, tmp_path):
    model, processor, examples, _ = _model_and_data(shapes, "unified")
    with torch.no_grad():
        model.projector.linear_1.weight[0, 0] = float("nan")  # every image token's loss becomes NaN
    weights = {k: v.clone() for k, v in model.llm.state_dict().items()}
    stage = Stage("instruct", ("projector", "llm"), "questions", steps=3)
    with pytest.raises(TrainingError, match=r"stage 'instruct', step 1 \(run step 5\): the loss is nan"):
        train_stage(model, processor, stage, examples, TrainSettings(batch_size=4, progress=False), tmp_path,
                    tmp_path / "m.jsonl", first_step=4, log=lambda *_: None)
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in weights.items())  # not stepped


def test_without_clipping_a_non_finite_gradient_still_stops_the_stage(shapes, tmp_path):
    """clip 0 computes no clipping norm, but the gradient's norm is still checked before the update."""
    model, processor, examples, _ = _model_and_data(shapes, "unified")
    model.projector.linear_1.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    weights = {k: v.clone() for k, v in model.projector.state_dict().items()}
    stage = Stage("instruct", ("projector", "llm"), "questions", steps=2)
    with pytest.raises(TrainingError, match=r"stage 'instruct', step 1 .* the gradient norm inf"):
        train_stage(model, processor, stage, examples, TrainSettings(batch_size=4, progress=False, clip=0),
                    tmp_path, tmp_path / "m.jsonl", log=lambda *_: None)
    assert all(torch.equal(v, model.projector.state_dict()[k]) for k, v in weights.items())  # not stepped


def _finite(checkpoint) -> bool:
    return all(torch.isfinite(p).all() for p in MultimodalLM.from_pretrained(checkpoint).parameters())


def test_a_diverging_run_stops_and_keeps_its_good_checkpoints(shapes, tmp_path):
    """lr 1e30: the first update throws the weights far out, the second step's loss is no longer finite."""
    run = RunConfig.from_dict({
        "recipe": "molmo", "data": str(shapes), "out": str(tmp_path / "run"), "model": TINY_MODEL,
        "vocab_size": 400, "batch_size": 4, "steps": {"text": 2, "train": 3}, "lr": {"train": 1e30},
        "checkpoint_every": 1,
    })
    with pytest.raises(TrainingError, match=r"stage 'train', step 2 \(run step 4\)"):
        run_training(run, log=lambda *_: None, progress=False)
    checkpoints = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["stage-0-text", "step-000001", "step-000002",
                                                             "step-000003"]
    assert _finite(checkpoints / "stage-0-text") and _finite(checkpoints / "step-000003")
    assert not (tmp_path / "run/checkpoint").exists() and not (tmp_path / "run/interrupted").exists()


def test_an_interrupted_run_saves_its_model_and_a_rerun_appends_to_its_metrics(shapes, tmp_path, monkeypatch):
    config = {"recipe": "llava", "data": str(shapes), "out": str(tmp_path / "run"), "model": TINY_MODEL,
              "vocab_size": 400, "batch_size": 4,
              "steps": {"text": 2, "encoder_pretrain": 3, "align": 1, "instruct": 1}}
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C in encoder_pretrain's second step
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_training(RunConfig.from_dict(config), log=lines.append, progress=False)
    assert any("stopped in stage 'encoder_pretrain' after 1 of its 3 steps (run step 3)" in line
               and str(tmp_path / "run/interrupted") in line for line in lines)
    saved = MultimodalLM.from_pretrained(tmp_path / "run/interrupted")
    text = MultimodalLM.from_pretrained(tmp_path / "run/checkpoints/stage-0-text")

    def same(component):
        ours, theirs = saved.component(component).state_dict(), text.component(component).state_dict()
        return all(torch.equal(ours[k], theirs[k]) for k in ours)

    assert same("llm") and same("projector") and not same("vision")  # the captioner's decoder put back, as planned

    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    with (tmp_path / "run/metrics.jsonl").open("a") as f:  # as a run killed while writing a record leaves it
        f.write('{"run": 1, "stage": "encod')
    lines = []
    run_training(RunConfig.from_dict(config), log=lines.append, progress=False)
    records = read_metrics(tmp_path / "run/metrics.jsonl")  # the rerun's first record is not lost to that line
    assert [(r["run"], r["step"]) for r in records] == [(1, 1), (1, 2), (1, 3)] + [(2, s) for s in range(1, 8)]
    # run 1's stop holds run 1's steps since its last checkpoint: another run finishing (a rerun started without
    # --resume, say) leaves it, byte for byte (run 1 resumed and finished removes it: tests/test_resume.py)
    assert MultimodalLM.from_pretrained(tmp_path / "run/interrupted").state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k])
               for k, v in MultimodalLM.from_pretrained(tmp_path / "run/interrupted").state_dict().items())
    assert not any("removed" in line for line in lines)


def with_text_only_questions(shapes: Path, directory: Path, count: int = 40) -> Path:
    """The shapes data and `count` question records without an image, in `directory`."""
    directory.mkdir()
    (directory / "images").symlink_to(shapes / "images")
    for name in ("text_train.jsonl", "text_test.jsonl"):
        shutil.copy(shapes / name, directory)
    records = json.loads((shapes / "train.json").read_text()) + [
        {"id": f"text-{i}", "type": "questions", "conversations": [
            {"from": "human", "value": f"What comes after {i}?"}, {"from": "gpt", "value": str(i + 1)}]}
        for i in range(count)]
    (directory / "train.json").write_text(json.dumps(records))
    return directory


def test_method_b_trains_through_steps_whose_rows_have_no_image(shapes, tmp_path):
    """With the LLM frozen, a text-only row reaches no trainable weight (its cross-attention blocks see no image):
    its loss has no graph, and backward() raised. Its gradient is zero: the step goes on without one."""
    data = with_text_only_questions(shapes, tmp_path / "data")
    run = RunConfig.from_dict({"recipe": "llama3.2", "data": str(data), "out": str(tmp_path / "run"),
                               "model": TINY_MODEL, "vocab_size": 400, "batch_size": 1,
                               "steps": {"text": 1, "pretrain": 1, "finetune": 8}})
    run_training(run, log=lambda *_: None, progress=False)
    finetune = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if r["stage"] == "finetune"]
    assert len(finetune) == 8 and all(math.isfinite(r["loss"]) for r in finetune)
    norms = [r["grad_norm"] for r in finetune]
    assert 0.0 in norms and any(n > 0 for n in norms)  # text-only steps and image steps both ran


@pytest.mark.parametrize("recipe", ["llava", "llama3.2"])
def test_a_compiled_run_trains_its_stages_through_the_compiled_parts(shapes, tmp_path, monkeypatch, recipe):
    """compile: true compiles the model (MultimodalLM.compile, each part one graph: a graph break is an error) and
    every stage trains through it, freezing and unfreezing between them. The "eager" backend keeps this fast: dynamo
    traces the graphs, no inductor kernel is built."""
    from tests.test_compile import CountingBackend

    backend = CountingBackend()
    compile_model = MultimodalLM.compile
    monkeypatch.setattr(MultimodalLM, "compile", lambda model: compile_model(model, backend=backend))
    torch._dynamo.reset()
    stages = ["text", *(stage.name for stage in RECIPES[recipe].stages)]
    run = RunConfig.from_dict({"recipe": recipe, "data": str(shapes), "out": str(tmp_path / "run"),
                               "model": TINY_MODEL, "vocab_size": 400, "batch_size": 4, "compile": True,
                               "pretrain_encoder": False, "steps": {stage: 2 for stage in stages}})
    try:
        run_training(run, log=lambda *_: None, progress=False)
    finally:
        torch._dynamo.reset()
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["stage"] for r in records] == [stage for stage in stages for _ in range(2)]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert backend.graphs >= 2  # the vision encoder and the layer stack at least


def test_an_encoder_free_model_trains_through_its_recipe_without_an_encoder_stage(shapes, tmp_path):
    """Fuyu's design (vision.encoder="none"): no encoder to pretrain, so "auto" adds no encoder_pretrain stage; the
    projector, which embeds the raw patches, and the LLM train."""
    run = RunConfig.from_dict({"recipe": "llava", "data": str(shapes), "out": str(tmp_path / "run"),
                               "model": {**TINY_MODEL, "vision": {**TINY_MODEL["vision"], "encoder": "none"}},
                               "vocab_size": 400, "batch_size": 4, "steps": {"text": 2, "align": 2, "instruct": 6}})
    run_training(run, log=lambda *_: None, progress=False)
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["stage"] for r in records] == ["text"] * 2 + ["align"] * 2 + ["instruct"] * 6
    assert all(math.isfinite(r["loss"]) for r in records)
    trained = MultimodalLM.from_pretrained(tmp_path / "run/checkpoint")
    assert trained.config.vision.encoder == "none" and not list(trained.vision.parameters())
    aligned = MultimodalLM.from_pretrained(tmp_path / "run/checkpoints/stage-1-align")
    text = MultimodalLM.from_pretrained(tmp_path / "run/checkpoints/stage-0-text")
    # align trained the projector (the patch embedding) alone; instruct the projector and the LLM
    assert not torch.equal(aligned.projector.linear_1.weight, text.projector.linear_1.weight)
    assert torch.equal(aligned.llm.embed_tokens.weight, text.llm.embed_tokens.weight)
    assert not torch.equal(trained.llm.embed_tokens.weight, aligned.llm.embed_tokens.weight)


def test_every_stage_has_records_of_its_kind_before_the_first_step(shapes, tmp_path):
    """A LLaVA file without "type" has no captions: the run stops before its text stage, not after it."""
    records = json.loads((shapes / "train.json").read_text())
    untyped = [{k: v for k, v in r.items() if k != "type"} | {"image": str(shapes / r["image"])} for r in records]
    (tmp_path / "untyped").mkdir()
    (tmp_path / "untyped/train.json").write_text(json.dumps(untyped))
    (tmp_path / "imageless").mkdir()  # the same records, their images not beside them
    (tmp_path / "imageless/train.json").write_text(json.dumps(records))
    for name in ("untyped", "imageless"):
        shutil.copy(shapes / "text_train.jsonl", tmp_path / name)
    for name, recipe, words in [
        ("untyped", "llava", "stage 'encoder_pretrain' trains on caption records (\"type\": \"caption\") but "
                             f"{tmp_path / 'untyped/train.json'} has none: 80 records kept (0 captions, 80 questions), "
                             f"0 skipped"),
        ("imageless", "molmo", f"stage 'train' trains on records but {tmp_path / 'imageless/train.json'} has none: "
                               f"0 records kept (0 captions, 0 questions), 80 skipped (80 missing image)"),
    ]:
        run = RunConfig.from_dict({"recipe": recipe, "data": str(tmp_path / name), "out": str(tmp_path / "run"),
                                   "model": TINY_MODEL, "vocab_size": 400, "batch_size": 4, "steps": {"text": 2}})
        with pytest.raises(DataError) as error:
            run_training(run, log=lambda *_: None, progress=False)
        assert str(error.value) == words
        assert not (tmp_path / "run").exists()  # nothing trained, and no empty OUT made for it left behind
    (tmp_path / "kept").mkdir()  # an OUT that was there before the run stays, empty as it was
    run = RunConfig.from_dict({"recipe": "llava", "data": str(tmp_path / "untyped"), "out": str(tmp_path / "kept"),
                               "model": TINY_MODEL, "vocab_size": 400, "batch_size": 4, "steps": {"text": 2}})
    with pytest.raises(DataError):
        run_training(run, log=lambda *_: None, progress=False)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [".train.lock"]


def test_text_files_skip_records_with_images(shapes, tmp_path):
    """Text pretraining labels every token and the held-out text loss passes no images: an image record in either
    file is skipped and counted, not labelled on its image tokens or fed to the loss without its image."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(shapes / "images")
    shutil.copy(shapes / "train.json", data)
    pictured = {"id": "pictured", "images": ["images/train_00000.png"], "messages": [
        {"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": "a red circle"}]}
    for name in ("text_train.jsonl", "text_test.jsonl"):
        (data / name).write_text((shapes / name).read_text() + json.dumps(pictured) + "\n")
    run = RunConfig.from_dict({"recipe": "molmo", "data": str(data), "out": str(tmp_path / "run"), "model": TINY_MODEL,
                               "vocab_size": 400, "batch_size": 4, "steps": {"text": 1, "train": 0}})
    lines = []
    result = run_training(run, log=lines.append, progress=False)
    for name in ("text_train.jsonl", "text_test.jsonl"):
        summary = next(line for line in lines if line.startswith(str(data / name)))
        assert "1 skipped" in summary and "image in a text-only file  (e.g. pictured" in summary
    assert not any(e.pixel_values for e in result["text_examples"]) and math.isfinite(result["text_loss_before"])


def test_multimodal_stages_on_an_untrained_llm_are_warned_about(shapes, tmp_path):
    config = {"recipe": "molmo", "data": str(shapes), "out": str(tmp_path / "run"), "model": TINY_MODEL,
              "vocab_size": 400, "batch_size": 4, "steps": {"text": 0, "train": 1}}
    warning = ("warning: steps.text is 0 and there is no llm_checkpoint, so the multimodal stages train on an "
               "untrained LLM (random weights); for an LLM that reads, set llm_checkpoint to a trained LLM or "
               "steps.text > 0")
    for steps, warned in [({"text": 0, "train": 1}, True), ({"text": 1, "train": 1}, False),
                          ({"text": 0, "train": 0}, False)]:
        lines = []
        run_training(RunConfig.from_dict({**config, "steps": steps}), log=lines.append, progress=False)
        assert (warning in lines) == warned, steps


def test_an_llm_checkpoint_must_match_the_run_s_model(shapes, tmp_path):
    model, processor, _, _ = _model_and_data(shapes, "unified")  # text.vocab_size 448
    model.save_pretrained(tmp_path / "llm")
    processor.save_pretrained(tmp_path / "llm")
    text = {**TINY_MODEL["text"], "vocab_size": 448}
    config = {"recipe": "molmo", "data": str(shapes), "out": str(tmp_path / "run"), "batch_size": 4,
              "llm_checkpoint": str(tmp_path / "llm"), "steps": {"train": 1}}
    wider = RunConfig.from_dict({**config, "model": {**TINY_MODEL, "text": {**text, "hidden_size": 64}}})
    with pytest.raises(ConfigError, match=re.escape(
            f"llm_checkpoint {tmp_path / 'llm'}: its LLM differs from the run's model in text.hidden_size (32 in the "
            f"checkpoint, 64 in the run's model)")):
        run_training(wider, log=lambda *_: None, progress=False)
    lines = []
    same = run_training(RunConfig.from_dict({**config, "model": {**TINY_MODEL, "text": text}}), log=lines.append,
                        progress=False)
    assert same["steps"] == 1 and not any("steps.text" in line for line in lines)
    # text steps beside a trained LLM are not an error (one file for both ways) but not passed over in silence
    lines = []
    run_training(RunConfig.from_dict({**config, "model": {**TINY_MODEL, "text": text}, "steps": {"text": 5, "train": 0},
                                      "out": str(tmp_path / "run2")}), log=lines.append, progress=False)
    assert (f"note: steps.text=5 is not used: llm_checkpoint {tmp_path / 'llm'} is a trained LLM, so the run skips "
            f"text pretraining") in lines
    # with no text stage to run, text_train.jsonl is not read: a bad record there stopped a --strict fine-tune
    data = tmp_path / "data"
    data.mkdir()
    for name in ("images", "train.json", "text_test.jsonl"):
        (data / name).symlink_to(shapes / name)
    (data / "text_train.jsonl").write_text((shapes / "text_train.jsonl").read_text() + '{"id": "oops"}\n')
    lines = []
    strict = run_training(RunConfig.from_dict({**config, "model": {**TINY_MODEL, "text": text}, "data": str(data),
                                               "strict": True, "out": str(tmp_path / "run3")}),
                          log=lines.append, progress=False)
    assert strict["steps"] == 1 and not any("text_train.jsonl" in line for line in lines)


def test_frozen_llm_keeps_the_text_loss_exactly(shapes, tmp_path):
    """The article's claim about Llama 3.2: with the LLM frozen, multimodal training leaves text-only ability
    untouched — here to the last bit, because text without images never reaches a cross-attention block."""
    run = RunConfig.from_dict({
        "recipe": "llama3.2", "data": str(shapes), "out": str(tmp_path / "run"), "model": TINY_MODEL,
        "vocab_size": 400, "batch_size": 8, "steps": {"text": 10, "pretrain": 5, "finetune": 5},
        "gate_lr_scale": 30,
    })
    result = run_training(run, log=lambda *_: None, progress=False)
    assert result["text_loss_before"] == result["text_loss_after"]
    assert any(b.attn_gate.item() != 0 for b in result["model"].cross_attention.values())


def test_bf16_mixed_precision_learns_and_keeps_float32_weights(shapes, tmp_path, monkeypatch):
    """bf16-mixed runs the matmuls in bf16 but keeps the weights, their gradients and the loss in float32; its loss
    tracks the float32 loss to bf16's precision, and a short run learns as well as float32 does."""
    model, processor, examples, _ = _model_and_data(shapes, "unified")
    batch = processor.pad_batch([(e.input_ids, e.labels) for e in examples[:8]], [e.pixel_values for e in examples[:8]])
    exact = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(**batch).loss
    assert mixed.dtype == torch.float32 and mixed.item() != exact.item()
    assert abs(mixed.item() - exact.item()) < 0.02 * exact.item()

    calls = []
    monkeypatch.setattr(torch, "autocast", _recording(torch.autocast, calls))
    losses = {}
    for precision in ("fp32", "bf16-mixed"):
        torch.manual_seed(0)
        model, processor, examples, _ = _model_and_data(shapes, "unified")
        settings = TrainSettings(batch_size=8, progress=False, precision=precision)
        stage = Stage("instruct", ("projector", "llm"), "questions", steps=30, lr=3e-3)
        losses[precision] = train_stage(model, processor, stage, examples, settings, tmp_path, tmp_path / "m.jsonl",
                                        log=lambda *_: None)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [c.get("enabled") for c in calls] == [False] * 30 + [True] * 30
    first, last = losses["bf16-mixed"][:5], losses["bf16-mixed"][-5:]
    assert sum(last) < 0.8 * sum(first)
    assert abs(sum(last) - sum(losses["fp32"][-5:])) < 0.1 * sum(losses["fp32"][-5:])


def _recording(autocast, calls):
    def wrapper(*args, **kwargs):
        if "dtype" in kwargs:  # the training loop's; the model's own (attention's opt-out) are not counted
            calls.append(kwargs)
        return autocast(*args, **kwargs)
    return wrapper


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    for avx512_bf16, amx, expected in [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"),
                                       (False, False, "fp32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert training_precision("auto") == expected
    assert training_precision("fp32") == "fp32" and training_precision("bf16-mixed") == "bf16-mixed"
    with pytest.raises(ValueError, match="precision='half'"):
        training_precision("half")


def test_a_key_given_twice_in_a_run_config_is_an_error_naming_both_lines(tmp_path):
    """YAML lets the later value win without a word: a second `steps:` further down undid the first, and the run
    trained the recipe's 800 default steps instead of 4."""
    path = tmp_path / "run.yaml"
    for text, key, lines in [("recipe: llava\nsteps: {text: 1, align: 1}\ndata: d\nsteps:\n  text: 0\n", "steps", (2, 4)),
                             ("recipe: llava\nlr:\n  align: 1e-3\n  align: 2e-3\n", "align", (3, 4))]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"'{key}' is given twice in one mapping \(first on line {lines[0]}\).*"
                                              rf"line {lines[1]}"):
            RunConfig.load(path)
    # a merge key's keys are not written twice, and a written key may override one of them
    path.write_text("recipe: llava\ndata: d\nscale: &scale {projector: 2.0, llm: 1.0}\n"
                    "lr_scale: {instruct: {<<: *scale, llm: 0.1}}\n")
    with pytest.raises(ConfigError, match="unknown field 'scale'"):  # loaded: only the anchor's holder is unknown
        RunConfig.load(path)
    path.write_text("recipe: llava\ndata: d\nlr_scale:\n  align: &scale {projector: 2.0}\n"
                    "  instruct: {<<: *scale, llm: 0.1}\n")
    assert RunConfig.load(path).lr_scale == {"align": {"projector": 2.0}, "instruct": {"projector": 2.0, "llm": 0.1}}


def test_a_run_config_s_paths_and_vocabulary_are_named_when_they_cannot_be_what_is_meant(shapes, tmp_path):
    """A directory given as the run config ([Errno 21]), the data's train.json given as data (the message suggested
    `tessera data shapes --out DATA/train.json`), a missing llm_checkpoint (reported as its tokenizer.json), a data
    directory with both a train.json and a train.jsonl, and a vocabulary smaller than a byte-level BPE can be (5 gave
    263 tokens) are each one line naming what was meant."""
    with pytest.raises(ConfigError, match="a directory; expected a run config YAML file"):
        RunConfig.load(tmp_path)
    base = {"recipe": "llava", "data": str(shapes), "out": str(tmp_path / "run"), "model": TINY_MODEL}
    with pytest.raises(DataError, match=re.escape(f"data={shapes / 'train.json'}: a file; expected the dataset's "
                                                  f"directory ({shapes} here?)")):
        run_training(RunConfig.from_dict({**base, "data": str(shapes / "train.json")}), log=lambda *_: None)
    lines = []  # not first called a trained LLM in a note about steps.text
    with pytest.raises(ConfigError, match=re.escape(f"llm_checkpoint={tmp_path / 'nope'}: no such directory")):
        run_training(RunConfig.from_dict({**base, "llm_checkpoint": str(tmp_path / "nope"), "steps": {"text": 5}}),
                     log=lines.append)
    assert not any("is a trained LLM" in line for line in lines)
    # a run's OUT for its text stage's checkpoint was reported as a missing OUT/tokenizer.json; a file as no directory
    text_stage = tmp_path / "llm" / "checkpoints" / "stage-0-text"
    text_stage.mkdir(parents=True)
    (text_stage / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape(f"llm_checkpoint={tmp_path / 'llm'}: no config.json or "
                                                    f"tokenizer.json in it, so not a checkpoint ({text_stage}?)")):
        run_training(RunConfig.from_dict({**base, "llm_checkpoint": str(tmp_path / "llm")}), log=lines.append)
    with pytest.raises(ConfigError, match=re.escape(f"llm_checkpoint={text_stage / 'config.json'}: a file; expected "
                                                    f"the checkpoint directory")):
        run_training(RunConfig.from_dict({**base, "llm_checkpoint": str(text_stage / "config.json")}),
                     log=lines.append)
    both = tmp_path / "both"  # train.json silently won over one's own train.jsonl beside it
    both.mkdir()
    (both / "train.json").write_text("[]")
    (both / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=re.escape(f"data={both}: train.json and train.jsonl both; expected one "
                                                  f"train file")):
        run_training(RunConfig.from_dict({**base, "data": str(both)}), log=lambda *_: None)
    with pytest.raises(ConfigError, match="vocab_size=5: expected an integer >= 263"):
        RunConfig.from_dict({**base, "vocab_size": 5})


def test_run_config_overrides_and_validation(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: llava\ndata: somewhere\nsteps: {align: 10}\nlr: {align: 1e-3}\n")
    run = RunConfig.load(path, ["steps.instruct=5", "lr.instruct=2e-4", "seed=3"])
    assert run.steps == {"align": 10, "instruct": 5} and run.lr == {"align": 1e-3, "instruct": 2e-4}
    assert run.seed == 3
    stages = {s.name: s for s in build_stages(run)}
    assert list(stages) == ["text", "encoder_pretrain", "align", "instruct"]
    assert stages["instruct"].steps == 5 and stages["instruct"].lr == 2e-4
    with pytest.raises(ConfigError, match="steps.pretrain: recipe 'llava' has no stage 'pretrain'"):
        build_stages(RunConfig.load(path, ["steps.pretrain=5"]))
    with pytest.raises(ConfigError, match="unknown field 'epochs'"):
        RunConfig.load(path, ["epochs=3"])
    with pytest.raises(ConfigError, match=r"lr.align='fast': expected a number"):
        RunConfig.load(path, ["lr.align=fast"])
    with pytest.raises(ConfigError, match="recipe 'gpt-5'"):
        build_stages(RunConfig.load(path, ["recipe=gpt-5"]))
    with pytest.raises(ConfigError, match="expected key=value"):
        RunConfig.load(path, ["steps"])
    with pytest.raises(ConfigError, match="no such run config"):
        RunConfig.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="schedule='linear': expected one of cosine, wsd"):
        RunConfig.load(path, ["schedule=linear"])
    with pytest.raises(ConfigError, match="schedule.text='step': expected one of"):
        RunConfig.load(path, ["schedule.text=step"])
    with pytest.raises(ConfigError, match="schedule.finetune: recipe 'llava' has no stage 'finetune'"):
        build_stages(RunConfig.load(path, ["schedule.finetune=wsd"]))
    schedules = {s.name: s.schedule for s in build_stages(RunConfig.load(path, ["schedule.text=wsd"]))}
    assert schedules == {"text": "wsd", "encoder_pretrain": "cosine", "align": "cosine", "instruct": "cosine"}
    assert {s.schedule for s in build_stages(RunConfig.load(path, ["schedule=wsd"]))} == {"wsd"}
    with pytest.raises(ConfigError, match="precision='fp16': expected one of fp32, bf16-mixed, auto"):
        RunConfig.load(path, ["precision=fp16"])
    with pytest.raises(ConfigError, match="min_lr_ratio=1.5: expected a fraction"):
        RunConfig.load(path, ["min_lr_ratio=1.5"])
    # a recipe whose first stage trains the encoder needs no separate encoder pretraining
    plain = RunConfig.from_dict({"recipe": "llama3.2", "data": "somewhere"})
    assert [s.name for s in build_stages(plain)] == ["text", "pretrain", "finetune"]
    # starting from a trained LLM skips text pretraining
    assert build_stages(RunConfig.load(path, ["llm_checkpoint=ck"]))[0].name == "encoder_pretrain"
    # an encoder-free model runs a recipe whose encoder-only stage is given 0 steps, without that stage
    (tmp_path / "fuyu.yaml").write_text("recipe: qwen2-vl\ndata: somewhere\n")
    fuyu = build_stages(RunConfig.load(tmp_path / "fuyu.yaml", ["model.vision.encoder=none", "steps.encoder=0"]))
    assert [s.name for s in fuyu] == ["text", "joint", "instruct"]
    # … and the skipped stage's settings may stay in the file (README's example sets steps.text)
    kept = build_stages(RunConfig.load(path, ["llm_checkpoint=ck", "steps.text=300", "lr.text=1e-3"]))
    assert "text" not in {s.name for s in kept}


@pytest.mark.parametrize("override, words", [
    ("clip=-1", "clip=-1: expected a maximum gradient norm > 0, or 0 for no clipping"),
    ("pretrain_encoder=1", "pretrain_encoder=1: expected true, false or auto"),
    ("warmup=100", "warmup=100: expected a fraction of each stage's steps in [0, 1), e.g. 0.05 (not a step count)"),
    ("checkpoint_every=-5", "checkpoint_every=-5: expected an integer >= 0"),
    ("keep_checkpoints=-1", "keep_checkpoints=-1: expected an integer >= 0"),
    ("checkpoint_every=often", "checkpoint_every='often': expected an integer >= 0"),
    ("threads=two", "threads='two': expected a positive integer"),
    ("seed=abc", "seed='abc': expected an integer >= 0"),
    ("lr=1e-3", "lr='1e-3': expected a mapping, e.g. lr: {instruct: 1.0e-3}"),
    ("steps=300", "steps=300: expected a mapping, e.g. steps: {instruct: 200}"),
    ("lr_scale.align=2", "lr_scale.align=2: expected a mapping, e.g. lr_scale.align: {llm: 0.1}"),
    ("lr.align=-1e-3", "lr.align='-1e-3': expected a number >= 0"),
    ("lr.align=.inf", "lr.align=inf: expected a number >= 0"),
    ("gate_lr_scale=0", "gate_lr_scale=0: expected a number > 0"),
    ("strict=maybe", "strict='maybe': expected true or false"),
    ("fusion=sideways", "fusion='sideways': expected unified, cross, hybrid, or nothing (the recipe's)"),
    ("max_length=600", "max_length=600 exceeds the model's text.max_position_embeddings=512"),
    ("model.text.max_position_embeddings=128", "max_length=256 exceeds the model's text.max_position_embeddings=128"),
    ("model.text.layers=2", "model: text: unknown field 'layers'"),
    ("steps.align=[", "override 'steps.align=[': '[' is not a YAML value"),
    ("lr_scale.instruct.llmm=0.1",
     "lr_scale.instruct.llmm: no such component; expected one of vision, projector, llm, cross_attention"),
    ("model.vision.encoder=none pretrain_encoder=true",
     "pretrain_encoder=true: the model has no encoder (vision.encoder='none'); expected false or auto"),
    ("max_length=10", "max_length=10: one image alone takes 10 tokens of this model; expected a max_length that "
                      "holds an image and its text"),
    ("model.vision.encoder=none steps.encoder_pretrain=300",
     "steps.encoder_pretrain=300: the model has no encoder to pretrain (vision.encoder='none'); expected no "
     "steps.encoder_pretrain (or 0)"),
    ("model.vision.encoder=none recipe=qwen2-vl",
     "recipe 'qwen2-vl': stage 'encoder' trains only the encoder, which vision.encoder='none' does not have; "
     "expected a recipe whose every stage trains more (llava, molmo, baichuan-omni, nvlm-d), or steps.encoder: 0 to "
     "leave the stage out"),
])
def test_every_run_config_value_is_checked_at_load_naming_its_key(tmp_path, override, words):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: llava\ndata: somewhere\n")
    with pytest.raises(ConfigError) as error:
        RunConfig.load(path, override.split())
    assert words in str(error.value)


def test_integers_written_as_floats_count_and_model_overrides_change_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: llava\ndata: somewhere\n")
    assert RunConfig.load(path, ["checkpoint_every=1e3"]).checkpoint_every == 1000  # a string to YAML 1.1
    tiny = tiny_config("unified", 512)
    for text in ("", "model: tiny\n"):
        path.write_text(f"recipe: llava\ndata: somewhere\n{text}")
        run = RunConfig.load(path, ["model.text.num_layers=2"])
        assert model_config(run, 512) == dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, num_layers=2))



def test_a_model_mapping_without_a_vocab_size_gets_the_tokenizer_s_as_a_preset_does(tmp_path):
    """It got ModelConfig's default, 8192 rows, whatever the tokenizer's size: an LM head mostly of rows no token
    uses, that generation could still pick."""
    run = RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "model": TINY_MODEL})
    assert model_config(run, 448).text.vocab_size == 448
    given = {**TINY_MODEL, "text": {**TINY_MODEL["text"], "vocab_size": 1024}}
    assert model_config(RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "model": given}),
                        448).text.vocab_size == 1024


@pytest.mark.parametrize("recipe", [name for name, r in RECIPES.items() if r.fusion == "unified"])
@pytest.mark.parametrize("fusion, what", [("cross", "the image"), ("hybrid", "the image's tiles")])
def test_cross_fusion_under_a_recipe_that_never_trains_cross_attention_is_refused(recipe, fusion, what):
    """Its gates would stay at 0: the projector would get no gradient and the model would learn to ignore images
    (the hybrid: its tiles)."""
    with pytest.raises(ConfigError, match=re.escape(
            f"fusion={fusion!r} with recipe '{recipe}': no stage of {recipe} trains cross_attention, so nothing "
            f"would carry {what} into the LLM; expected fusion: unified (the recipe's) or a recipe that trains "
            f"cross_attention (llama3.2, nvlm-x, nvlm-h)")):
        RunConfig.from_dict({"recipe": recipe, "data": "somewhere", "fusion": fusion})
    for name in ("llama3.2", "nvlm-x", "nvlm-h"):
        RunConfig.from_dict({"recipe": name, "data": "somewhere", "fusion": fusion})


@pytest.mark.parametrize("prediction, reference, same", [
    ("The Red circle.", "red circle", True),
    ("  top   left ", "top left", True),
    ("an orange square!", "orange square", True),
    ("yes", "no", False),
    ("red", "reds", False),
    ("2", "two", True),
    ("There are Two.", "there are 2", True),
    ("none", "0", True),
    ("one", "two", False),
    ("someone", "some1", False),  # whole words only
])
def test_exact_match_normalises_case_punctuation_articles_numbers_and_spaces(prediction, reference, same):
    assert exact_match(prediction, reference) is same
    assert normalize_answer("The  Blue, square.") == "blue square"


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_a_multi_turn_record_is_evaluated_on_its_first_turn_with_only_that_turn_s_images(shapes, tmp_path, fusion):
    """Its later turns' images are not in the prompt, so they must not reach the model (they did, and the model's
    image-token count check aborted the whole evaluation)."""
    model, processor, _, _ = _model_and_data(shapes, fusion)

    def ask(question):
        return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}

    images = [str(shapes / "images/test_00000.png"), str(shapes / "images/test_00001.png")]
    turns = [ask("What colour is the square?"), {"role": "assistant", "content": "red"},
             ask("How many shapes are there?"), {"role": "assistant", "content": "two"}]
    records = [{"id": "two-turns", "type": "colour", "images": images, "messages": turns},
               {"id": "first-turn", "type": "colour", "images": images[:1], "messages": turns[:2]}]
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics, predictions = evaluate(model, processor, tmp_path / "multi.jsonl")
    assert metrics["questions"] == 2
    assert predictions[0]["prediction"] == predictions[1]["prediction"]  # the same prompt, the same answer


@pytest.mark.parametrize("records, skipped", [
    ("", "0 skipped"),  # empty
    (json.dumps({"id": "unanswered", "messages": [{"role": "user", "content": "hi"}]}) + "\n",
     "1 skipped: 1 no answer"),
])
def test_held_out_text_without_a_usable_record_is_a_data_error_naming_the_file(shapes, tmp_path, capsys, records,
                                                                              skipped):
    """Not a ZeroDivisionError from a loss over no tokens; and the file's skipped records are reported."""
    model, processor, _, _ = _model_and_data(shapes, "unified")
    text = tmp_path / "text.jsonl"
    text.write_text(records)
    with pytest.raises(DataError, match=re.escape(f"{text}: no usable held-out text records ({skipped})")):
        evaluate(model, processor, shapes / "test.json", text, limit=2)
    if records:
        assert f"{text}: 0 records kept, 1 skipped" in capsys.readouterr().out


def test_evaluate_passes_max_new_tokens_to_generation(shapes, monkeypatch):
    model, processor, _, _ = _model_and_data(shapes, "unified")
    asked = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: asked.append(kw["max_new_tokens"]) or generate(**kw))
    evaluate(model, processor, shapes / "test.json", limit=3)
    evaluate(model, processor, shapes / "test.json", limit=3, max_new_tokens=5)
    assert asked == [48, 5]


def test_the_table_leaves_out_cider_for_a_handful_of_captions_and_the_json_keeps_it():
    """CIDEr-D takes its IDF from the references scored: one perfect caption scores 0."""
    perfect = caption_scores({"0": ["a red circle at the top left"]}, {"0": "a red circle at the top left"})
    assert perfect == {"cider": 0.0, "bleu4": pytest.approx(1.0)}
    row = next(r for r in metrics_table({"captions": 1, **perfect}).splitlines() if "CIDEr" in r)
    assert row.split()[2] == "—" and "(1 caption: too few for CIDEr-D" in row and "raw 0.000 in the JSON" in row
    table = metrics_table({"captions": 300, "cider": 0.0213, "bleu4": 0.0})  # the quickstart's row, as before
    assert "  CIDEr (captions)                0.021   (300 captions)\n" in table
    assert "(1 question)" in metrics_table({"questions": 1, "exact_match": 1.0})


def test_an_llm_checkpoint_converted_from_transformers_fits_a_run_whose_model_names_no_family():
    """text.family (the transformers class a converted LLM exports as) changes no number the LLM computes: a
    converted checkpoint ('llama') was refused as an llm_checkpoint for a run's model (None)."""
    from tessera.train.run import check_same_llm

    converted, ours = tiny_config(), tiny_config()
    converted.text.family = "llama"
    check_same_llm(converted.check(), ours, "converted")
    converted.text.rope_theta = 500000.0
    with pytest.raises(ConfigError, match=r"text.rope_theta \(500000.0 in the checkpoint, 10000.0 in the run's"):
        check_same_llm(converted.check(), ours, "converted")
