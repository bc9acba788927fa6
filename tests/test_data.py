"""The built-in shapes world and the data readers: determinism, disjoint splits, and every bad-record kind."""

import hashlib
import json
import re
import struct
import zlib

import pytest
from PIL import Image
from tokenizers import normalizers

import tessera
from tessera import DataError, Processor
from tessera.data.records import load_examples
from tessera.data.shapes import QUESTION_TYPES, Scene, Shape, caption, make_shapes_dataset, questions
from tests.conftest import tiny_config


def _digest(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", train=12, test=4, seed=3, text_train=5, text_test=3)
    make_shapes_dataset(tmp_path / "b", train=12, test=4, seed=3, text_train=5, text_test=3)
    make_shapes_dataset(tmp_path / "c", train=12, test=4, seed=4, text_train=5, text_test=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert a == {"train": 24, "test": json.loads((tmp_path / "a/test.json").read_text()).__len__(),
                 "text_train": 5, "text_test": 3}


def _scene_of(record) -> str:
    return record["conversations"][1]["value"]  # the caption names every shape, colour, size and position


def test_no_test_scene_equals_a_training_scene(tmp_path):
    make_shapes_dataset(tmp_path, train=400, test=200, seed=0, text_train=300, text_test=100)
    train = json.loads((tmp_path / "train.json").read_text())
    test = json.loads((tmp_path / "test.json").read_text())
    trained = {_scene_of(r) for r in train if r["type"] == "caption"}
    tested = {_scene_of(r) for r in test if r["type"] == "caption"}
    texts = lambda name: {json.loads(line)["messages"][1]["content"]
                          for line in (tmp_path / name).read_text().splitlines()}
    assert len(tested) == 200 and not tested & trained
    assert not tested & texts("text_train.jsonl")  # nor a training text describes a test scene
    assert not texts("text_test.jsonl") & (trained | texts("text_train.jsonl"))


def test_the_test_split_does_not_depend_on_the_training_size(tmp_path):
    make_shapes_dataset(tmp_path / "small", train=10, test=5, seed=1)
    make_shapes_dataset(tmp_path / "large", train=40, test=5, seed=1)
    small, large = ((tmp_path / d / "test.json").read_text() for d in ("small", "large"))
    assert small == large


def test_records_are_llava_conversations_with_every_task(tmp_path):
    make_shapes_dataset(tmp_path, train=30, test=30, seed=0, image_size=64)
    train = json.loads((tmp_path / "train.json").read_text())
    test = json.loads((tmp_path / "test.json").read_text())
    for record in train + test:
        assert set(record) == {"id", "image", "type", "conversations"}
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert (tmp_path / record["image"]).is_file()
    assert {r["type"] for r in test} == {"caption", *QUESTION_TYPES}
    assert {r["type"] for r in train} == {"caption", "questions"}  # one multi-turn record per image
    with Image.open(tmp_path / train[0]["image"]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    text = [json.loads(line) for line in (tmp_path / "text_train.jsonl").read_text().splitlines()]
    assert all(m["messages"][0]["content"].startswith("Scene: ") for m in text)


def test_caption_and_answers_are_read_off_the_scene():
    import random

    scene = Scene((Shape(0, "circle", "red", "large"), Shape(4, "square", "blue", "small")), (240, 240, 240), "plain")
    assert caption(scene) == "a red circle at the top left and a small blue square in the center"
    answers = {kind: (q, a) for kind, q, a in questions(scene, random.Random(0))}
    assert answers["count"] == ("How many shapes are there?", "two")
    assert answers["colour"][1] == {"What colour is the circle?": "red", "What colour is the square?": "blue"}[answers["colour"][0]]
    assert answers["position"][1] == {"Where is the circle?": "top left", "Where is the square?": "center"}[answers["position"][0]]
    assert answers["shape"][1] == {"What shape is at the top left?": "circle",
                                   "What shape is at the center?": "square"}[answers["shape"][0]]
    every = questions(scene, random.Random(0), every=True)
    assert sorted((k, q, a) for k, q, a in every if k in ("colour", "shape", "position")) == [
        ("colour", "What colour is the circle?", "red"), ("colour", "What colour is the square?", "blue"),
        ("position", "Where is the circle?", "top left"), ("position", "Where is the square?", "center"),
        ("shape", "What shape is at the center?", "square"), ("shape", "What shape is at the top left?", "circle")]
    assert sorted(a for k, _, a in every if k == "exists") == ["no", "yes"]
    question, answer = answers["exists"]
    colour, shape = question.removeprefix("Is there a ").rstrip("?").split()
    assert answer == ("yes" if (colour, shape) in {("red", "circle"), ("blue", "square")} else "no")


# --- reading and validating records ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor():
    tokenizer = tessera.train_tokenizer(["What colour is the circle? red blue square triangle"] * 5, vocab_size=300)
    config = tiny_config("unified")
    config = tessera.ModelConfig.from_dict({**config.to_dict(), "text": {**config.to_dict()["text"], "vocab_size": 320}})
    return Processor.for_model(config, tokenizer, max_length=40)


def _llava(record_id, question, answer, image="ok.png"):
    record = {"id": record_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


BAD_RECORDS = [
    (_llava("missing", "<image>\nWhat colour?", "red", image="nowhere.png"), "missing image"),
    (_llava("unreadable", "<image>\nWhat colour?", "red", image="broken.png"), "unreadable image"),
    (_llava("two-placeholders", "<image><image>\nWhat colour?", "red"), "placeholder count ≠ image count"),
    (_llava("no-placeholder", "What colour?", "red"), "placeholder count ≠ image count"),
    (_llava("empty-answer", "<image>\nWhat colour?", "   "), "empty turn"),
    ({"id": "gpt-first", "image": "ok.png", "conversations": [{"from": "gpt", "value": "<image>\nred"},
                                                             {"from": "human", "value": "What colour?"}]},
     "mis-ordered turns"),
    ({"id": "no-answer", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]},
     "no answer"),
    ({"id": "empty", "image": "ok.png", "conversations": []}, "empty conversation"),
    ({"id": "bad-turn", "conversations": [{"from": "robot", "value": "hi"}]}, "malformed turns"),
    (_llava("long-answer", "<image>\n" + "What colour is the circle? " * 12, "red"), "answer cut off by the length limit"),
    (_llava("invisible", "<image>\nWhat colour?", "~~~"), "answer tokenises to nothing"),
    (_llava("image-int", "<image>\nWhat colour?", "red", image=5), "malformed images"),
    (_llava("image-list-int", "<image>\nWhat colour?", "red", image=[1]), "malformed images"),
    ({"id": "images-dicts", "images": [{"path": "ok.png"}], "messages": [
        {"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}]},
     "malformed images"),
    ({"id": "conversations-int", "conversations": 5}, "malformed turns"),
    (_llava("type-int", "<image>\nWhat colour?", "red") | {"type": 5}, "malformed type"),
    (_llava("bomb", "<image>\nWhat colour?", "red", image="bomb.png"), "image too large"),
    (_llava("image-in-answer", "What colour?", "<image>\nred"), "image placeholder in an answer"),
]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: PIL refuses to open one this large (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _write_data(tmp_path, records):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def tilde_blind_processor(processor):
    """The same processor with a tokenizer whose normaliser deletes '~': an answer of tildes tokenises to nothing."""
    tokenizer = processor.tokenizer.__class__.from_str(processor.tokenizer.to_str())
    tokenizer.normalizer = normalizers.Replace("~", "")
    return Processor(tokenizer, processor.config)


def test_every_bad_record_is_skipped_and_counted_by_reason(tmp_path, tilde_blind_processor):
    good = _llava("good", "<image>\nWhat colour?", "red")
    untyped = _llava("good", "<image>\nWhat colour?", "red") | {"type": None}  # null: a question, as no type
    path = _write_data(tmp_path, [good] + [record for record, _ in BAD_RECORDS] + [untyped])
    examples, report = load_examples(path, tilde_blind_processor)
    assert [e.example.id for e in examples] == ["good", "good"]
    expected = {}
    for _, reason in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.reasons) == expected
    summary = report.summary()
    assert f"2 records kept, {len(BAD_RECORDS)} skipped" in summary and "missing image" in summary
    assert "(e.g. missing)" in summary


@pytest.mark.parametrize("record, reason", BAD_RECORDS, ids=[r["id"] for r, _ in BAD_RECORDS])
def test_strict_stops_at_the_first_bad_record_naming_file_record_and_reason(tmp_path, tilde_blind_processor,
                                                                             record, reason):
    path = _write_data(tmp_path, [_llava("good", "<image>\nWhat colour?", "red"), record])
    with pytest.raises(DataError) as error:
        load_examples(path, tilde_blind_processor, strict=True)
    message = str(error.value)
    assert str(path) in message and f"record {record['id']}" in message and reason in message


def test_messages_jsonl_reads_parts_and_reports_bad_lines(tmp_path, processor):
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "b.png")
    lines = [
        {"id": "parts", "images": ["b.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]},
        {"id": "text-only", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{broken json\n")
    examples, report = load_examples(path, processor)
    assert [e.example.id for e in examples] == ["parts", "text-only"]
    assert examples[0].example.messages[0]["content"] == "<image>\nWhat colour?" and len(examples[0].pixel_values) == 1
    assert dict(report.reasons) == {"invalid JSON": 1}
    with pytest.raises(DataError, match=r"data.jsonl: record line 3: invalid JSON"):
        load_examples(path, processor, strict=True)


def test_jsonl_errors_name_the_line_and_the_message(tmp_path, processor):
    good = {"id": "r1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "red"}]}
    bad = {"id": "r1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] * 4 + [bad] + [good]))
    examples, report = load_examples(path, processor)
    assert [e.example.id for e in examples] == ["r1"] * 5  # the id stays the record's own
    assert "(e.g. r1 (line 5))" in report.summary()
    with pytest.raises(DataError, match=r"data.jsonl: record r1 \(line 5\): malformed turns: message 1: content must "
                                        r"be a string or a list of parts, got 7"):
        load_examples(path, processor, strict=True)


def test_a_data_file_that_is_not_utf8_is_a_one_line_error_naming_it(tmp_path, processor):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(DataError, match=rf"{path}: line 2: not UTF-8 text"):
        load_examples(path, processor)


def test_a_text_only_file_skips_records_with_images(tmp_path, processor):
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "b.png")
    lines = [{"id": "text", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]},
             {"id": "pictured", "images": ["b.png"], "messages": [
                 {"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "blue"}]}]
    path = tmp_path / "text_test.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    examples, report = load_examples(path, processor, text_only=True)
    assert [e.example.id for e in examples] == ["text"] and dict(report.reasons) == {"image in a text-only file": 1}
    with pytest.raises(DataError, match=r"text_test.jsonl: record pictured \(line 2\): image in a text-only file"):
        load_examples(path, processor, strict=True, text_only=True)


def test_the_tokenizer_texts_pass_over_wrong_typed_records(tmp_path):
    from tessera.train.run import dataset_texts

    (tmp_path / "train.json").write_text(json.dumps([
        {"id": "x", "conversations": 5}, {"id": "y", "messages": {"role": "user"}},
        {"id": "z", "conversations": [{"from": "human", "value": "hello"}, 3]}]))
    assert dataset_texts(tmp_path) == ["hello"]


def test_a_file_that_is_not_a_record_list_is_an_error(tmp_path, processor):
    path = tmp_path / "data.json"
    path.write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_examples(path, processor)
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "missing.json", processor)


def test_jsonl_text_with_unicode_line_separators_stays_one_record(tmp_path, processor):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings; only "\n" ends a JSONL line
    lines = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"What colour?{sep}"},
                                          {"role": "assistant", "content": "red"}]}
             for i, sep in enumerate(["\u2028", "\u2029", "\x85", "\x0c"])]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\r\n" for line in lines), encoding="utf-8")
    examples, report = load_examples(path, processor, strict=True)
    assert [e.example.id for e in examples] == ["r0", "r1", "r2", "r3"] and report.skipped == 0
    # line numbers in messages count "\n" only, as an editor does
    path.write_text(path.read_text(encoding="utf-8") + "{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"record line 5: invalid JSON"):
        load_examples(path, processor, strict=True)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".JSONL"])  # the suffix's case does not matter
def test_a_data_file_starting_with_a_utf8_bom_is_read(tmp_path, processor, suffix):
    # Windows editors and PowerShell's Out-File write one; json.loads refuses it
    record = {"id": "bom", "messages": [{"role": "user", "content": "What colour?"},
                                        {"role": "assistant", "content": "red"}]}
    path = tmp_path / f"data{suffix}"
    text = json.dumps([record]) if suffix == ".json" else json.dumps(record) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    examples, report = load_examples(path, processor, strict=True)
    assert [e.example.id for e in examples] == ["bom"] and report.skipped == 0


def test_jsonl_under_another_name_says_so_and_ndjson_is_jsonl(tmp_path, processor):
    """Messages records one per line in data.txt or data.json were reported as invalid JSON ("Extra data") with a
    hint to write a list of LLaVA records; .ndjson, JSONL's other usual name, was read as one JSON document."""
    records = [{"id": str(i), "messages": [{"role": "user", "content": "What colour?"},
                                           {"role": "assistant", "content": "red"}]} for i in range(2)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    for name in ("data.txt", "data.json"):
        (tmp_path / name).write_text(lines)
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: one JSON record per line (JSONL), read as "
                                                      f"one JSON document by its name; expected a name ending in "
                                                      f".jsonl")):
            load_examples(tmp_path / name, processor)
    (tmp_path / "data.ndjson").write_text(lines)
    examples, report = load_examples(tmp_path / "data.ndjson", processor, strict=True)
    assert [e.example.id for e in examples] == ["0", "1"]
    from tessera.train.run import split_file
    (tmp_path / "train.ndjson").write_text(lines)  # a training directory's too
    assert split_file(tmp_path, "train") == tmp_path / "train.ndjson"
    (tmp_path / "broken.json").write_text('[{"id": 1},\n')  # broken JSON that is not JSONL keeps its own message
    with pytest.raises(DataError, match="not valid JSON"):
        load_examples(tmp_path / "broken.json", processor)


def test_a_dataset_written_again_leaves_no_images_of_the_one_before(tmp_path):
    """Written again with fewer scenes, the same directory kept the earlier dataset's images beside the new records
    (43 of 50 referenced by nothing)."""
    make_shapes_dataset(tmp_path, train=6, test=4, seed=0, text_train=0, text_test=0)
    make_shapes_dataset(tmp_path, train=3, test=2, seed=1, text_train=0, text_test=0)
    written = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert written == [f"{split}_{i:05d}.png" for split, n in (("test", 2), ("train", 3)) for i in range(n)]


def test_json_records_sharing_an_id_or_without_one_are_named_by_their_place(tmp_path, processor):
    """Skipped records are listed by id, so two records sharing one were one name for both, and "id": null was
    listed as "None"."""
    bad = {"messages": [{"role": "user", "content": "What colour?"}]}  # no answer: skipped
    records = [{"id": "a", **bad}, {"id": "a", **bad}, {"id": None, **bad}, {"id": "b", **bad}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    _, report = load_examples(tmp_path / "data.json", processor)
    assert [label for labels in report.examples.values() for label in labels] == ["a (#0)", "a (#1)", "#2", "b"]
