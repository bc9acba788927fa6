"""Defects found reviewing training and evaluation: each test failed on the code before its fix."""

import json
import re
from pathlib import Path

import pytest
import torch

from tessera import ConfigError, DataError
from tessera.cli import main
from tessera.data.shapes import make_shapes_dataset
from tessera.eval.evaluate import evaluate
from tessera.eval.metrics import exact_match
from tessera.train.loop import TrainSettings, drop_metrics_after, read_metrics, train_stage
from tessera.train.recipes import Stage
from tessera.train.run import RunConfig, build_stages
from tessera.train.state import StageState, TrainingState, latest_resumable, save_state
from tests.test_train import _model_and_data


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(directory, train=12, test=3, seed=0, text_train=12, text_test=4)
    return directory


@pytest.mark.parametrize("prediction, reference, same", [
    ("", "A", False),  # an empty answer is no answer, whatever the reference normalises to
    ("The", "A.", False),
    ("an", "A", False),
    ("A", "a.", True),  # a multiple-choice letter still matches itself
    ("(B)", "b", True),
    ("the red circle", "Red circle.", True),  # articles beside other words still go
])
def test_an_answer_of_articles_only_is_compared_by_its_words(prediction, reference, same):
    """VQA's normalisation drops articles, so the answer "A" became "" and matched an empty prediction (or "the")."""
    assert exact_match(prediction, reference) is same


@pytest.mark.parametrize("records, skipped", [
    ([], 0),
    ([{"id": "lost", "image": "images/none.png",
       "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}], 1),
])
def test_evaluating_a_file_without_a_usable_record_is_a_data_error_naming_it(shapes, tmp_path, records, skipped):
    """It printed a table of dashes ("0 questions") and `tessera eval` exited 0, as if it had evaluated something."""
    model, processor, _, _ = _model_and_data(shapes, "unified")
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records))
    with pytest.raises(DataError, match=re.escape(f"{data}: no usable record to evaluate ({skipped} skipped)")):
        evaluate(model, processor, data)


@pytest.mark.parametrize("setting", [{"limit": 0}, {"limit": -1}, {"batch_size": 0}, {"max_new_tokens": 0},
                                     {"limit": 2.5}])
def test_evaluate_refuses_counts_below_one(shapes, setting):
    """limit=0 evaluated every record (0 read as "no limit"); the CLI refused it, the function did not."""
    model, processor, _, _ = _model_and_data(shapes, "unified")
    (name, value), = setting.items()
    with pytest.raises(ConfigError, match=re.escape(f"{name}={value!r}: expected an integer >= 1")):
        evaluate(model, processor, shapes / "test.json", **setting)


def test_lr_scale_for_a_component_the_stage_does_not_train_is_refused_naming_the_key(tmp_path):
    """align trains the projector only: a scale for its llm changed nothing, silently."""
    with pytest.raises(ConfigError, match=re.escape(
            "lr_scale.align.llm: stage 'align' does not train llm (it trains projector)")):
        RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "lr_scale": {"align": {"llm": 0.1}}})
    run = RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "lr_scale": {"instruct": {"llm": 0.1}}})
    assert {s.name: s.lr_scale for s in build_stages(run)}["instruct"] == {"llm": 0.1}


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_weight_decay_spares_biases_norms_and_gates(shapes, tmp_path, fusion):
    """As transformers' Trainer does (no decay for biases and norm weights): decay pulled RMSNorm scales and Method
    B's tanh gates towards 0, closing the very gates the stage trains. With every gradient zeroed, AdamW moves a
    weight only by its decay, so what moved is exactly what decays."""
    model, processor, examples, _ = _model_and_data(shapes, fusion)
    train = ("vision", "projector", "llm") + (("cross_attention",) if fusion == "cross" else ())
    for p in model.parameters():
        p.register_hook(torch.zeros_like)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = Stage("joint", train, "mix", steps=1, lr=0.1)
    train_stage(model, processor, stage, examples, TrainSettings(batch_size=4, progress=False, weight_decay=0.5),
                tmp_path, tmp_path / "m.jsonl", log=lambda *_: None)
    decayed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    one_dimensional = {n for n, p in model.named_parameters() if p.dim() < 2}
    assert decayed == set(before) - one_dimensional
    assert any(n.endswith("_gate") for n in one_dimensional) == (fusion == "cross")
    for n in decayed:
        torch.testing.assert_close(dict(model.named_parameters())[n], before[n] * (1 - 0.1 * 0.5))


def _cut_short(monkeypatch, name):
    """A kill while `name` is being written: half of it reaches the disk."""
    write = Path.write_text

    def cut(self, text, *args, **kwargs):
        if self.name.endswith(name) or self.name.endswith(name + ".partial"):
            write(self, text[:len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut)


def test_a_kill_while_metrics_jsonl_is_rewritten_on_resume_loses_no_record(tmp_path, monkeypatch):
    """The resume that drops the records of steps it takes again rewrote metrics.jsonl in place: a stop then lost
    every earlier run's records with it."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"run": run, "stage": "text", "step": step, "loss": 1.0}) + "\n"
                               for run in (1, 2) for step in range(1, 6)))
    original = metrics.read_text()
    _cut_short(monkeypatch, "metrics.jsonl")
    with pytest.raises(KeyboardInterrupt):
        drop_metrics_after(metrics, 2, 3)
    monkeypatch.undo()
    assert metrics.read_text() == original and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert drop_metrics_after(metrics, 2, 3) == 2 and len(read_metrics(metrics)) == 8


def test_a_kill_while_a_training_state_is_written_leaves_the_earlier_checkpoints_resumable(tmp_path, monkeypatch):
    """A half-written training_state.json made every --resume fail ("not valid JSON") instead of taking the
    checkpoint before it."""
    out = tmp_path / "run"

    def save(step):
        directory = out / f"checkpoints/step-{step:06d}"
        directory.mkdir(parents=True)
        stage = StageState(step, rng=torch.get_rng_state())
        save_state(directory, TrainingState(run=1, step=step, stage=0, stage_name="text", text_loss_before=None,
                                            fingerprint={"seed": 0}, stage_state=stage), out)

    save(2)
    _cut_short(monkeypatch, "training_state.json")
    with pytest.raises(KeyboardInterrupt):
        save(4)
    monkeypatch.undo()
    assert latest_resumable(out) == out / "checkpoints/step-000002"


@pytest.mark.parametrize("flag, value, words", [
    ("--train", -3, "--train -3: expected an integer >= 0"),
    ("--test", -1, "--test -1: expected an integer >= 0"),
    ("--text-train", -2, "--text-train -2: expected an integer >= 0"),
    ("--text-test", -2, "--text-test -2: expected an integer >= 0"),
    ("--image-size", 0, "--image-size 0: expected 16..2048 pixels"),
    ("--image-size", 100000, "--image-size 100000: expected 16..2048 pixels"),  # its memory had the process killed
])
def test_data_shapes_refuses_negative_counts_and_sizes_naming_the_flag(tmp_path, capsys, flag, value, words):
    """--train -3 wrote an empty training set and reported "-3 text_train records"; --image-size 0 failed with PIL's
    "cannot write empty image"."""
    assert main(["data", "shapes", "--out", str(tmp_path / "data"), "--train", "2", "--test", "1",
                 flag, str(value)]) == 2
    assert capsys.readouterr().err.strip() == f"tessera data: error: {words}"
    assert not (tmp_path / "data").exists()


def test_a_fusion_method_in_the_model_mapping_that_is_not_the_run_s_is_refused():
    """model.fusion.method was overwritten by the run's fusion without a word: {fusion: {method: cross}} under
    llava trained Method A."""
    for model in ({"preset": "tiny", "fusion": {"method": "cross"}}, {"fusion": {"method": "cross"}}):
        with pytest.raises(ConfigError, match=re.escape(
                "model.fusion.method='cross': the method is the run's fusion ('unified' here, the recipe "
                "llava's); expected fusion: cross beside recipe, or no model.fusion.method")):
            RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "model": model})
    RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "model": {"fusion": {"method": "unified"}}})
    RunConfig.from_dict({"recipe": "llama3.2", "data": "somewhere", "model": {"fusion": {"method": "cross"}}})


def test_gate_lr_scale_without_gates_is_refused():
    """Method A has no gates: gate_lr_scale changed nothing there, silently."""
    with pytest.raises(ConfigError, match=re.escape(
            "gate_lr_scale=100.0: fusion 'unified' has no gates (only cross-attention blocks do); expected "
            "fusion: cross or hybrid, or no gate_lr_scale")):
        RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "gate_lr_scale": 100})
    RunConfig.from_dict({"recipe": "llama3.2", "data": "somewhere", "gate_lr_scale": 100})
    RunConfig.from_dict({"recipe": "nvlm-h", "data": "somewhere", "gate_lr_scale": 100})  # the hybrid's blocks
    RunConfig.from_dict({"recipe": "llava", "data": "somewhere", "gate_lr_scale": 1})


def test_a_tokenizer_other_than_the_llm_checkpoint_s_is_refused(shapes, tmp_path):
    """The pretrained LLM's embeddings are indexed by its own tokenizer's ids: `tokenizer:` beside `llm_checkpoint:`
    won over the checkpoint's tokenizer.json, and a different one trained the LLM on ids that mean other words."""
    from tessera import train_tokenizer
    from tessera.train.run import dataset_texts, run_training
    from tests.test_train import TINY_MODEL

    model, processor, _, _ = _model_and_data(shapes, "unified")  # its tokenizer: 400 tokens from the dataset
    model.save_pretrained(tmp_path / "llm")
    processor.save_pretrained(tmp_path / "llm")
    train_tokenizer(dataset_texts(shapes), vocab_size=300).save(str(tmp_path / "other.json"))
    config = {"recipe": "molmo", "data": str(shapes), "out": str(tmp_path / "run"), "batch_size": 4,
              "llm_checkpoint": str(tmp_path / "llm"), "steps": {"train": 1},
              "model": {**TINY_MODEL, "text": {**TINY_MODEL["text"], "vocab_size": 448}}}
    with pytest.raises(ConfigError, match=re.escape(
            f"tokenizer {tmp_path / 'other.json'}: not the tokenizer of llm_checkpoint {tmp_path / 'llm'}")):
        run_training(RunConfig.from_dict({**config, "tokenizer": str(tmp_path / "other.json")}),
                     log=lambda *_: None, progress=False)
    assert not (tmp_path / "run/metrics.jsonl").exists()
    same = RunConfig.from_dict({**config, "tokenizer": str(tmp_path / "llm/tokenizer.json")})
    assert run_training(same, log=lambda *_: None, progress=False)["steps"] == 1


def test_a_kill_while_weights_are_written_leaves_the_earlier_weights(shapes, tmp_path, monkeypatch):
    """model.safetensors was written in place: a run killed while saving OUT/checkpoint again left half a file, and
    the checkpoint could no longer be loaded."""
    import tessera.checkpoint
    from tessera.checkpoint import WEIGHTS_NAME, load_weights, save_weights

    model, _, _, _ = _model_and_data(shapes, "unified")
    save_weights(model, tmp_path)
    saved = (tmp_path / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    write = tessera.checkpoint.save_file

    def killed(tensors, filename, metadata=None):
        write(tensors, filename, metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])  # half of it reached the disk
        raise KeyboardInterrupt

    monkeypatch.setattr(tessera.checkpoint, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == saved and [p.name for p in tmp_path.iterdir()] == [WEIGHTS_NAME]
    load_weights(model, tmp_path)


@pytest.mark.parametrize("name", ["config.json", "processor_config.json"])
def test_a_kill_while_a_checkpoint_is_saved_again_leaves_its_files_whole(shapes, tmp_path, monkeypatch, name):
    """config.json and processor_config.json were rewritten in place too: half a file, and the final checkpoint
    of a run saved again could no longer be loaded."""
    from tessera import MultimodalLM, Processor

    model, processor, _, _ = _model_and_data(shapes, "unified")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _cut_short(monkeypatch, name)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    MultimodalLM.from_pretrained(tmp_path), Processor.from_pretrained(tmp_path)
