"""Defects found reviewing `tessera eval` / `tessera generate`: each test failed on the code before its fix."""

import json
import re

import pytest

from tessera import CheckpointError, DataError, ModelConfig, MultimodalLM, Processor, train_tokenizer
from tessera.cli import main
from tessera.data.shapes import make_shapes_dataset
from tessera.eval.evaluate import evaluate
from tessera.eval.report import metrics_table
from tessera.train.run import dataset_texts
from tests.test_train import TINY_MODEL


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(directory, train=12, test=2, seed=0, text_train=12, text_test=4)
    return directory


def _model(shapes, max_positions=512):
    tokenizer = train_tokenizer(dataset_texts(shapes), vocab_size=400)
    config = ModelConfig.from_dict({**TINY_MODEL, "text": {**TINY_MODEL["text"], "vocab_size": 448,
                                                           "max_position_embeddings": max_positions}})
    return MultimodalLM(config), Processor.for_model(config, tokenizer, max_length=256)


@pytest.fixture(scope="module")
def checkpoint(shapes, tmp_path_factory):
    model, processor = _model(shapes)
    directory = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _question(record_id, question, image):
    return {"id": record_id, "type": "colour", "image": str(image),
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}]}


def test_a_prompt_too_long_to_answer_is_a_skipped_record_not_the_end_of_the_evaluation(shapes, tmp_path, capsys):
    """A prompt within max_length but without room for max_new_tokens in the model's positions was kept, then
    generate refused its whole batch after the other answers were computed, naming neither file nor record."""
    model, processor = _model(shapes, max_positions=128)
    image = shapes / "images/test_00000.png"
    records = [_question("short", "What colour is the square?", image),
               _question("long", "What colour is the square? " * 15, image),  # 119 tokens: within max_length
               _question("short-too", "What colour is the circle?", image)]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records))
    metrics, predictions = evaluate(model, processor, data, max_new_tokens=16)
    assert [p["id"] for p in predictions] == ["short", "short-too"] and metrics["questions"] == 2
    assert "1  prompt too long to answer  (e.g. long)" in capsys.readouterr().out
    with pytest.raises(DataError, match=re.escape(f"{data}: record long: prompt too long to answer: its ")):
        evaluate(model, processor, data, max_new_tokens=16, strict=True)
    # room depends on the answer's length too: with 2 new tokens the long prompt fits
    _, predictions = evaluate(model, processor, data, max_new_tokens=2)
    assert [p["id"] for p in predictions] == ["short", "long", "short-too"]


def test_limit_takes_the_first_records_of_the_file_and_never_reads_the_rest(shapes, tmp_path, capsys):
    """--limit 3 still read, checked and decoded the whole file, so --strict failed on record 7."""
    model, processor = _model(shapes)
    image = shapes / "images/test_00000.png"
    records = [_question("first", "What colour is the square?", image),
               {**_question("lost", "What colour is the circle?", image), "image": str(shapes / "none.png")},
               _question("third", "What colour is the triangle?", image),
               {**_question("broken", "What?", image), "conversations": "not turns"}]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records))
    metrics, predictions = evaluate(model, processor, data, limit=3, strict=False, max_new_tokens=2)
    assert [p["id"] for p in predictions] == ["first", "third"]  # the skipped second record counts as one of 3
    assert f"{data}: 2 records kept, 1 skipped" in capsys.readouterr().out
    _, predictions = evaluate(model, processor, data, limit=1, strict=True, max_new_tokens=2)
    assert [p["id"] for p in predictions] == ["first"]
    with pytest.raises(DataError, match=re.escape(f"{data}: record lost: missing image")):
        evaluate(model, processor, data, limit=2, strict=True, max_new_tokens=2)


def test_the_metrics_name_the_records_skipped_by_reason(shapes, tmp_path):
    """stdout said "2 records kept, 2 skipped" but the metrics JSON said nothing of them: a score over part of the
    file looked like one over all of it."""
    model, processor = _model(shapes)
    image = shapes / "images/test_00000.png"
    records = [_question("first", "What colour is the square?", image),
               {**_question("lost", "What colour is the circle?", image), "image": str(shapes / "none.png")},
               {**_question("lost-too", "What?", image), "image": str(shapes / "none.png")},
               {"id": "unanswered", "conversations": [{"from": "human", "value": "hi"}]}]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records))
    text = tmp_path / "text.jsonl"
    text.write_text((shapes / "text_test.jsonl").read_text() + json.dumps({**records[0], "id": "pictured"}) + "\n")
    metrics, _ = evaluate(model, processor, data, text, max_new_tokens=2)
    assert metrics["records"] == {"file": str(data), "kept": 1, "skipped": 3,
                                  "skipped_by_reason": {"missing image": 2, "no answer": 1},
                                  "skipped_ids": {"missing image": ["lost", "lost-too"], "no answer": ["unanswered"]}}
    assert metrics["text_records"]["skipped_ids"] == {"image in a text-only file": ["pictured (line 5)"]}
    assert re.search(r"\n  records skipped +3   \(of 4; by reason and id in the JSON\)", metrics_table(metrics))


@pytest.mark.parametrize("out, words", [
    ("results", "--out {tmp}/results: is a directory; expected a file path for the metrics JSON"),
    ("taken.json", "--out {tmp}/taken.json: {tmp}/taken.predictions.jsonl, where the predictions go, is a directory"),
    ("afile/eval.json", "--out {tmp}/afile/eval.json: {tmp}/afile is a file, not a directory"),
    ("afile/deeper/eval.json", "--out {tmp}/afile/deeper/eval.json: {tmp}/afile is a file, not a directory"),
])
def test_an_out_path_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, out, words):
    """It failed with a bare "[Errno 21] Is a directory" (or Errno 17) after every answer was computed, losing
    them. The checkpoint given does not exist: the error about --out comes first, so nothing was loaded."""
    (tmp_path / "results").mkdir()
    (tmp_path / "taken.predictions.jsonl").mkdir()
    (tmp_path / "afile").write_text("x")
    code = main(["eval", "--checkpoint", str(tmp_path / "no-checkpoint"), "--data", str(tmp_path / "test.json"),
                 "--out", str(tmp_path / out)])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"tessera eval: error: {words.format(tmp=tmp_path)}"), error
    assert error.count("\n") == 1


def test_held_out_text_found_beside_the_data_that_cannot_be_used_is_a_warning_and_named_it_is_an_error(
        shapes, checkpoint, tmp_path, capsys):
    """A text_test.jsonl picked up beside --data aborted the evaluation (no usable held-out text records), with no
    way to opt out. Found, it is a warning and the loss is left out, saying so in the JSON; named, an error."""
    data = tmp_path / "test.json"
    data.write_text(json.dumps([_question("first", "What colour is the square?", shapes / "images/test_00000.png")]))
    found = tmp_path / "text_test.jsonl"
    found.write_text(json.dumps({"id": "pictured", "images": [str(shapes / "images/test_00000.png")], "messages": [
        {"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--max-new-tokens", "2"]
    for strict in [], ["--strict"]:
        assert main([*args, "--out", str(out), *strict]) == 0
        printed = capsys.readouterr()
        assert re.search(f"held-out text loss +—   \\(left out: {re.escape(str(found))} cannot be used", printed.out)
        error = printed.err
        assert error.startswith(f"warning: {found}: ") and "the held-out text loss is left out" in error, error
        metrics = json.loads(out.read_text())
        assert "text_loss" not in metrics and metrics["text_records"]["file"] == str(found)
        assert metrics["text_records"]["left_out"].startswith(f"{found}: ")
        if not strict:  # why it was skipped, not only that it was (--strict stops at the record, naming why)
            assert metrics["text_records"]["skipped_ids"] == {"image in a text-only file": ["pictured (line 1)"]}
            assert "(1 skipped: 1 image in a text-only file)" in error
    assert main([*args, "--text-data", str(found)]) == 2
    assert f"tessera eval: error: {found}: no usable held-out text records (1 skipped: 1 image in a text-only file)" \
        in capsys.readouterr().err


def test_a_tokenizer_whose_ids_do_not_fit_the_model_is_refused_at_load_naming_both_files(shapes, checkpoint, tmp_path,
                                                                                        capsys):
    """generate and eval died in a raw IndexError (index out of range in self) from the embedding lookup."""
    model, processor = _model(shapes)
    config = model.config.to_dict()
    small = ModelConfig.from_dict({**config, "text": {**config["text"], "vocab_size": 320}})
    MultimodalLM(small).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    tokens = processor.tokenizer.get_vocab_size()
    assert tokens > 320
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'tokenizer.json'}: {tokens} tokens (ids up to {tokens - 1}), but {tmp_path / 'config.json'} "
            f"gives the model text.vocab_size=320; expected every token id below 320")):
        Processor.from_pretrained(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "What colour is the square?"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"tessera generate: error: {tmp_path / 'tokenizer.json'}: ") and error.count("\n") == 1
    # fewer tokens than the vocabulary (448) is a padded vocabulary, not an error
    assert Processor.from_pretrained(checkpoint).tokenizer.get_vocab_size() == tokens < 448
