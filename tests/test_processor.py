"""tessera.Processor: chat template, image-token expansion, label masking, padding, truncation, persistence."""

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import tessera
from tessera import CheckpointError, ConfigError, DataError, Processor
from tessera.processor import IGNORE_INDEX, PROCESSOR_CONFIG_NAME, TOKENIZER_NAME
from tests.conftest import tiny_config

SENTENCES = [
    "What colour is the circle?",
    "The circle is red.",
    "What shape is on the left?",
    "A blue square is on the left.",
    "How many shapes are there?",
    "There are two shapes.",
    "You are a helpful assistant that describes pictures.",
    "hello world, hello shapes",
] * 3
VOCAB = 512  # a byte-level BPE has at least 256 + 7 tokens: tiny_config's 96 cannot hold it


@pytest.fixture(scope="module")
def tokenizer():
    return tessera.train_tokenizer(SENTENCES, vocab_size=300)


def model_config(fusion: str = "unified", vocab_size: int = VOCAB, **overrides) -> tessera.ModelConfig:
    config = tiny_config(fusion)
    return dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=vocab_size), **overrides)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Processor.for_model(model_config("unified"), tokenizer)


def image(colour=(255, 0, 0), size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def runs(mask: list[bool]) -> list[tuple[int, int]]:
    """(start, stop) of each run of True values."""
    spans, start = [], None
    for i, value in enumerate(mask + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            spans.append((start, i))
            start = None
    return spans


QA = [
    {"role": "system", "content": "You are a helpful assistant that describes pictures."},
    {"role": "user", "content": "What colour is the circle?"},
    {"role": "assistant", "content": "The circle is red."},
]


# --- tokenizer and template ----------------------------------------------------------------------------------------
def test_special_token_ids_match_the_model_config_defaults(tokenizer, processor):
    ids = {t: tokenizer.token_to_id(t) for t in ("<pad>", "<|begin|>", "<|end|>", "<image>")}
    assert ids == {"<pad>": 0, "<|begin|>": 1, "<|end|>": 2, "<image>": 3}
    defaults = tessera.ModelConfig()
    assert (defaults.pad_token_id, defaults.eos_token_id, defaults.image_token_id) == (0, 2, 3)
    assert (processor.pad_token_id, processor.begin_token_id, processor.end_token_id,
            processor.image_token_id) == (0, 1, 2, 3)
    roles = processor.role_token_ids
    assert roles == {"system": tokenizer.token_to_id("<|system|>"), "user": tokenizer.token_to_id("<|user|>"),
                     "assistant": tokenizer.token_to_id("<|assistant|>")}
    assert len(set(roles.values()) | {0, 1, 2, 3}) == 7


def test_special_tokens_are_never_split(tokenizer):
    ids = text_ids(tokenizer, "<image>\nWhat<|end|>")
    assert ids[0] == 3 and ids[-1] == 2
    assert 3 not in ids[1:-1] and 2 not in ids[1:-1]


def test_chat_template_string(processor):
    assert processor.apply_chat_template(QA) == (
        "<|begin|><|system|>You are a helpful assistant that describes pictures.<|end|>"
        "<|user|>What colour is the circle?<|end|><|assistant|>The circle is red.<|end|>"
    )
    assert processor.apply_chat_template(QA[:2], add_generation_prompt=True) == (
        "<|begin|><|system|>You are a helpful assistant that describes pictures.<|end|>"
        "<|user|>What colour is the circle?<|end|><|assistant|>"
    )


def test_chat_template_turns_image_parts_into_placeholders(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]}]
    assert processor.apply_chat_template(messages) == "<|begin|><|user|><image>\nWhat colour?<|end|>"


@pytest.mark.parametrize("images", [1, 2])
def test_image_parts_encode_as_the_training_prompt(processor, images):
    """[image, text] parts, as OpenAI clients send them, give the same tokens as `user_message`, the form of the
    training records: each image on its own line before the text."""
    parts = [{"type": "image"}] * images + [{"type": "text", "text": "What colour is the circle?"}]
    written = processor.user_message("What colour is the circle?", images)
    assert written["content"] == "<image>\n" * images + "What colour is the circle?"
    assert processor.encode([{"role": "user", "content": parts}], True) == processor.encode([written], True)


def test_text_around_image_parts(processor):
    parts = [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
             {"type": "image"}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}])
    assert text == "<|begin|><|user|>Compare<image>\nwith<image><|end|>"  # nothing added after a closing image


# --- image tokens --------------------------------------------------------------------------------------------------
def test_method_a_expands_each_image_into_image_seq_length_tokens(tokenizer, processor):
    config = model_config("unified")
    assert config.image_seq_length == 16
    messages = [{"role": "user", "content": "<image>\nWhat colour is the circle?<image>"},
                {"role": "assistant", "content": "The circle is red."}]
    ids, labels, found = processor.encode(messages)
    assert found == []
    assert [stop - start for start, stop in runs([i == 3 for i in ids])] == [16, 16]
    assert ids[:2] == [processor.begin_token_id, processor.role_token_ids["user"]]
    # between the two images: exactly the question's text tokens
    question = text_ids(tokenizer, "\nWhat colour is the circle?")
    assert ids[2 + 16:2 + 16 + len(question)] == question
    assert ids[2 + 16 + len(question):2 + 32 + len(question)] == [3] * 16

    batch = processor([messages], images=[[image(), image((0, 0, 255))]])
    assert (batch["input_ids"] == 3).sum().item() == 2 * config.image_seq_length
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert (batch["labels"][batch["input_ids"] == 3] == IGNORE_INDEX).all()


def test_method_b_keeps_one_marker_per_image(tokenizer):
    config = model_config("cross")
    assert config.image_seq_length == 1
    processor = Processor.for_model(config, tokenizer)
    messages = [{"role": "user", "content": "<image>What colour is the circle?<image>"}]
    batch = processor([messages], images=[[image(), image()]])
    row = batch["input_ids"][0].tolist()
    assert row.count(3) == 2
    assert row[2] == 3 and row[-2] == 3 and row[-1] == processor.end_token_id
    assert batch["image_counts"].tolist() == [2]


# --- labels --------------------------------------------------------------------------------------------------------
def test_labels_supervise_only_the_answer_and_its_end(tokenizer, processor):
    ids, labels, _ = processor.encode(QA)
    answer = text_ids(tokenizer, "The circle is red.")
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert [labels[i] for i in supervised] == answer + [processor.end_token_id]
    assert all(labels[i] == ids[i] for i in supervised)
    # the answer sits right after the <|assistant|> token, and ends the sequence
    start = ids.index(processor.role_token_ids["assistant"]) + 1
    assert supervised == list(range(start, len(ids)))
    assert labels[start - 1] == IGNORE_INDEX  # the role token itself is not supervised
    assert len(labels) == len(ids)


def test_an_image_in_an_answer_is_not_a_target(processor):
    """Its image tokens stand for features, which replace them; labelled, they trained the model to predict image
    placeholders, which generate never makes (tessera's data loader skips such records; this is the API's own)."""
    messages = [{"role": "user", "content": "Draw it."}, {"role": "assistant", "content": "<image>\nred"}]
    ids, labels, images = processor.encode(messages)
    image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image_positions) == processor.config.image_seq_length and len(images) == 0
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    assert [t for t in labels if t != IGNORE_INDEX][-1] == processor.end_token_id  # the text answer still is


def test_multi_turn_supervises_every_assistant_turn(tokenizer, processor):
    messages = [
        {"role": "system", "content": "You are a helpful assistant that describes pictures."},
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "The circle is red."},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "There are two shapes."},
    ]
    batch = processor([messages], images=[[image()]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    spans = runs([label != IGNORE_INDEX for label in labels])
    assert len(spans) == 2
    assistant = processor.role_token_ids["assistant"]
    answers = []
    for start, stop in spans:
        assert ids[start - 1] == assistant
        assert labels[stop - 1] == processor.end_token_id
        assert labels[start:stop] == ids[start:stop]
        answers.append(processor.decode(labels[start:stop]))
    assert answers == ["The circle is red.", "There are two shapes."]
    # nothing of the user turns, the system prompt or the image is supervised
    assert sum(label != IGNORE_INDEX for label in labels) == (
        len(text_ids(tokenizer, "The circle is red.")) + len(text_ids(tokenizer, "There are two shapes.")) + 2)
    assert processor.decode([label for label in labels if label != IGNORE_INDEX]) == (
        "The circle is red.There are two shapes.")


# --- padding -------------------------------------------------------------------------------------------------------
def test_right_padding_for_training(processor):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "red"}]
    batch = processor([QA, short], padding_side="right")
    long_ids, long_labels, _ = processor.encode(QA)
    short_ids, short_labels, _ = processor.encode(short)
    width, n = len(long_ids), len(short_ids)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2, width)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == long_ids and batch["labels"][0].tolist() == long_labels
    assert batch["attention_mask"][0].tolist() == [1] * width
    assert batch["input_ids"][1].tolist() == short_ids + [processor.pad_token_id] * (width - n)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][1].tolist() == short_labels + [IGNORE_INDEX] * (width - n)
    assert batch["pixel_values"].shape == (0, 3, 16, 16)
    assert batch["image_counts"].tolist() == [0, 0]


def test_left_padding_for_generation_prompts(processor):
    prompts = [QA[:2], [{"role": "user", "content": "Hi"}]]
    batch = processor(prompts, add_generation_prompt=True, padding_side="left")
    assistant = processor.role_token_ids["assistant"]
    assert batch["input_ids"][:, -1].tolist() == [assistant, assistant]
    long_ids, _, _ = processor.encode(prompts[0], add_generation_prompt=True)
    short_ids, _, _ = processor.encode(prompts[1], add_generation_prompt=True)
    width, n = len(long_ids), len(short_ids)
    assert short_ids == [1, processor.role_token_ids["user"]] + short_ids[2:-2] + [2, assistant]
    assert batch["input_ids"][0].tolist() == long_ids
    assert batch["input_ids"][1].tolist() == [processor.pad_token_id] * (width - n) + short_ids
    assert batch["attention_mask"][1].tolist() == [0] * (width - n) + [1] * n
    assert batch["attention_mask"][0].tolist() == [1] * width
    # a prompt has no answer: nothing is supervised, pads included
    assert (batch["labels"] == IGNORE_INDEX).all()


def test_padding_side_is_validated(processor):
    with pytest.raises(ValueError, match="padding_side"):
        processor([QA], padding_side="middle")


# --- images in batches ---------------------------------------------------------------------------------------------
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_batch_with_2_0_1_images(processor):
    conversations = [
        [{"role": "user", "content": "<image><image>\nWhat shape is on the left?"},
         {"role": "assistant", "content": "A blue square is on the left."}],
        [{"role": "user", "content": "How many shapes are there?"},
         {"role": "assistant", "content": "There are two shapes."}],
        [{"role": "user", "content": [{"type": "image", "image": image(COLOURS[2], (20, 12))},
                                      {"type": "text", "text": "What colour is the circle?"}]},
         {"role": "assistant", "content": "The circle is red."}],
    ]
    batch = processor(conversations, images=[[image(COLOURS[0]), image(COLOURS[1], (8, 24))], [], []])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["image_counts"].tolist() == [2, 0, 1]
    assert (batch["input_ids"] == 3).sum(dim=1).tolist() == [32, 0, 16]
    # images in sample order, each preprocessed like a lone image
    expected = [image(COLOURS[0]), image(COLOURS[1], (8, 24)), image(COLOURS[2], (20, 12))]
    for got, source in zip(batch["pixel_values"], expected):
        torch.testing.assert_close(got, processor.preprocess_image(source))
    assert not torch.allclose(batch["pixel_values"][0], batch["pixel_values"][1])


def test_images_as_paths_and_parts_without_payload(processor, tmp_path):
    path = tmp_path / "green.png"
    image(COLOURS[1]).save(path)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    batch = processor([conversation], images=[[str(path)]])
    assert batch["image_counts"].tolist() == [1]
    torch.testing.assert_close(batch["pixel_values"][0], processor.preprocess_image(image(COLOURS[1])))


def test_placeholder_image_count_mismatch_names_the_conversation(processor):
    fine = [{"role": "user", "content": "<image>What colour?"}]
    missing = [{"role": "user", "content": "<image> and <image>"}]
    with pytest.raises(DataError, match="conversation 1") as excinfo:
        processor([fine, missing], images=[[image()], [image()]])
    assert "2 <image> placeholder" in str(excinfo.value) and "1 image" in str(excinfo.value)
    with pytest.raises(DataError, match="conversation 0"):
        processor([[{"role": "user", "content": "no placeholder"}]], images=[[image()]])
    with pytest.raises(DataError, match="conversation 0"):
        processor([[{"role": "user", "content": [{"type": "image"}]}]])
    with pytest.raises(DataError, match="image lists"):
        processor([fine, fine], images=[[image()]])


def test_an_image_preprocessing_would_blow_up_is_a_data_error_naming_the_file(tokenizer, tmp_path):
    """Offline (tessera train/eval read image files through the processor): a 9000x1 strip that padding would turn
    into 81 million pixels is refused with its file and size, not a MemoryError or the OOM killer."""
    padding = Processor.for_model(model_config("unified"), tokenizer, resize_mode="pad")
    path = tmp_path / "strip.png"
    Image.new("RGB", (9000, 1)).save(path)
    with pytest.raises(DataError) as excinfo:
        padding.preprocess_image(path)
    assert str(excinfo.value).startswith(f"{path}: the image is 9000x1; padding it to a square would make it "
                                         f"9000x9000 = 81000000 pixels, more than the 67108864 allowed")
    with pytest.raises(DataError, match="the image is 9000x1"):  # a PIL image has no file to name
        padding.preprocess_image(Image.open(path))
    # the data loader names the data file and record too
    from tessera.data.records import load_examples

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "strip", "images": ["strip.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "black"}]}) + "\n")
    with pytest.raises(DataError, match=rf"data.jsonl: record strip \(line 1\): image too large: {path}: the image is 9000x1"):
        load_examples(data, padding, strict=True)
    # the size check the server makes from an image's header, before decoding it
    padding.check_image_size(4096, 3072, max_pixels=4096 * 4096)
    with pytest.raises(DataError, match="4097x4097"):
        padding.check_image_size(4097, 3072, max_pixels=4096 * 4096)
    Processor.for_model(model_config("unified"), tokenizer).check_image_size(9000, 1)  # squash: fine


# --- message validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("message", [
    {"role": "robot", "content": "beep"},
    {"role": "user"},
    {"content": "hello"},
    "just a string",
    {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]},
    {"role": "user", "content": ["a bare string part"]},
], ids=["unknown-role", "missing-content", "missing-role", "not-a-dict", "unknown-part", "bare-part"])
def test_invalid_messages_raise_data_error(processor, message):
    with pytest.raises(DataError):
        processor([[message]])
    with pytest.raises(DataError):
        processor.apply_chat_template([message])


def test_unknown_role_error_names_the_role_and_the_allowed_ones(processor):
    with pytest.raises(DataError) as excinfo:
        processor.encode([{"role": "robot", "content": "beep"}])
    message = str(excinfo.value)
    assert "robot" in message and all(role in message for role in ("system", "user", "assistant"))


@pytest.mark.parametrize("message", [
    {"role": "user", "content": None},
    {"role": "user", "content": 42},
    {"role": "user", "content": [{"type": "text"}]},
], ids=["content-none", "content-int", "text-part-without-text"])
def test_malformed_content_raises_data_error_not_a_crash(processor, message):
    with pytest.raises(DataError):
        processor([[message]])


# --- truncation ----------------------------------------------------------------------------------------------------
def test_max_length_truncates_from_the_right(tokenizer):
    full = Processor.for_model(model_config(), tokenizer)
    ids, labels, _ = full.encode(QA)
    limit = len(ids) - 3
    cut = Processor.for_model(model_config(), tokenizer, max_length=limit)
    batch = cut([QA, QA[:1]])
    assert batch["input_ids"].shape == (2, limit)
    assert batch["input_ids"][0].tolist() == ids[:limit]
    assert batch["labels"][0].tolist() == labels[:limit]
    assert batch["attention_mask"][0].tolist() == [1] * limit
    # a shorter conversation is left alone (and padded)
    short_ids, _, _ = full.encode(QA[:1])
    assert len(short_ids) < limit
    assert batch["input_ids"][1, :len(short_ids)].tolist() == short_ids
    # a conversation exactly at the limit is not cut
    exact = Processor.for_model(model_config(), tokenizer, max_length=len(ids))
    assert exact([QA])["input_ids"][0].tolist() == ids


def test_max_length_does_not_cut_a_generation_prompt(tokenizer):
    # a checkpoint's processor keeps the training max_length; a longer prompt must still end in the assistant turn
    question = [{"role": "user", "content": "What colour is the circle? " * 6}]
    full_ids, _, _ = Processor.for_model(model_config(), tokenizer).encode(question, add_generation_prompt=True)
    cut = Processor.for_model(model_config(), tokenizer, max_length=len(full_ids) - 5)
    batch = cut([question, QA[1:2]], add_generation_prompt=True, padding_side="left")
    assert batch["input_ids"][0].tolist() == full_ids
    assert full_ids[-1] == cut.role_token_ids["assistant"]
    assert batch["input_ids"].shape == (2, len(full_ids))
    # a training row of the same conversation is still cut to the limit
    assert cut([question + QA[2:]])["input_ids"].shape == (1, len(full_ids) - 5)


def test_truncation_through_image_tokens_raises(tokenizer):
    messages = [{"role": "user", "content": "<image>What colour is the circle?"},
                {"role": "assistant", "content": "The circle is red."}]
    processor = Processor.for_model(model_config(), tokenizer, max_length=10)  # image tokens are at 2..17
    with pytest.raises(DataError) as excinfo:
        processor([[{"role": "user", "content": "Hi"}], messages], images=[[], [image()]])
    assert "conversation 1" in str(excinfo.value) and "max_length=10" in str(excinfo.value)
    # cutting after the image's last token is fine
    after_image = Processor.for_model(model_config(), tokenizer, max_length=18)
    batch = after_image([messages], images=[[image()]])
    assert batch["input_ids"].shape == (1, 18)
    assert batch["input_ids"][0, 2:].tolist() == [3] * 16


def test_max_length_must_be_positive(tokenizer):
    with pytest.raises(ConfigError, match="max_length"):
        Processor.for_model(model_config(), tokenizer, max_length=0)


# --- for_model -----------------------------------------------------------------------------------------------------
def test_for_model_follows_the_model_config(tokenizer):
    config = model_config()
    processor = Processor.for_model(config, tokenizer, resize_mode="pad")
    assert processor.config.image_size == config.vision.image_size == 16
    assert tuple(processor.config.image_mean) == config.vision.image_mean
    assert tuple(processor.config.image_std) == config.vision.image_std
    assert processor.config.image_seq_length == 16
    assert processor.config.resize_mode == "pad"
    assert processor.preprocess_image(image(size=(40, 10))).shape == (3, 16, 16)


def test_for_model_rejects_a_tokenizer_larger_than_the_vocab(tokenizer):
    size = tokenizer.get_vocab_size()
    assert size > 263
    with pytest.raises(ConfigError) as excinfo:
        Processor.for_model(model_config(vocab_size=size - 1), tokenizer)
    assert "vocab_size" in str(excinfo.value) and str(size) in str(excinfo.value)
    with pytest.raises(ConfigError):
        Processor.for_model(tiny_config("unified"), tokenizer)  # 96 < 263 + merges
    assert Processor.for_model(model_config(vocab_size=size), tokenizer).tokenizer is tokenizer


def test_for_model_rejects_disagreeing_special_ids(tokenizer):
    with pytest.raises(ConfigError, match="image_token_id"):
        Processor.for_model(model_config(image_token_id=5), tokenizer)


def test_invalid_resize_mode_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="resize_mode"):
        Processor.for_model(model_config(), tokenizer, resize_mode="crop")


# --- persistence ---------------------------------------------------------------------------------------------------
def round_trip_batch(processor):
    conversations = [
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
         {"role": "assistant", "content": "The circle is red."}],
        [{"role": "user", "content": "How many shapes are there?"}],
    ]
    return processor(conversations, images=[[image((200, 30, 90), (24, 12))], []], padding_side="right")


def test_save_and_load_give_identical_batches(tokenizer, tmp_path):
    processor = Processor.for_model(model_config(), tokenizer, max_length=60, resize_mode="pad")
    directory = processor.save_pretrained(tmp_path / "proc")
    assert (directory / PROCESSOR_CONFIG_NAME).is_file() and (directory / TOKENIZER_NAME).is_file()
    loaded = Processor.from_pretrained(directory)
    assert loaded.config.max_length == 60 and loaded.config.resize_mode == "pad"
    assert loaded.config.image_seq_length == 16
    assert loaded.tokenizer.get_vocab_size() == tokenizer.get_vocab_size()
    expected, got = round_trip_batch(processor), round_trip_batch(loaded)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert loaded.decode(got["input_ids"][1].tolist()) == processor.decode(expected["input_ids"][1].tolist())


def test_save_and_load_give_an_equal_config(tokenizer, tmp_path):
    processor = Processor.for_model(model_config(), tokenizer, max_length=60, resize_mode="pad")
    loaded = Processor.from_pretrained(processor.save_pretrained(tmp_path / "proc"))
    assert loaded.config == processor.config


def test_from_pretrained_without_processor_config(processor, tmp_path):
    directory = processor.save_pretrained(tmp_path / "proc")
    (directory / PROCESSOR_CONFIG_NAME).unlink()
    with pytest.raises(ConfigError) as excinfo:
        Processor.from_pretrained(directory)
    assert PROCESSOR_CONFIG_NAME in str(excinfo.value)


def test_from_pretrained_with_invalid_processor_config(processor, tmp_path):
    directory = processor.save_pretrained(tmp_path / "proc")
    settings = json.loads((directory / PROCESSOR_CONFIG_NAME).read_text())
    (directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps({**settings, "resize_mode": "crop"}))
    with pytest.raises(ConfigError, match="resize_mode") as excinfo:
        Processor.from_pretrained(directory)
    assert PROCESSOR_CONFIG_NAME in str(excinfo.value)
    (directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps({**settings, "colour": "blue"}))
    with pytest.raises(ConfigError, match=PROCESSOR_CONFIG_NAME):
        Processor.from_pretrained(directory)


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "not valid JSON ("), (b'{"max_length": 60, "\xff": 1}', "not UTF-8 text ("),
    (b"[1, 2]", "expected a JSON object, got list"),
])
def test_an_unreadable_processor_config_is_named_once(processor, tmp_path, content, expected):
    """config.json, processor_config.json and a Hugging Face directory's JSON files are read by one function, so
    each fault reads alike wherever it is, with the file named once."""
    directory = processor.save_pretrained(tmp_path / "proc")
    path = directory / PROCESSOR_CONFIG_NAME
    path.write_bytes(content)
    with pytest.raises(ConfigError) as excinfo:
        Processor.from_pretrained(directory)
    assert str(excinfo.value).startswith(f"{path}: {expected}") and str(excinfo.value).count(str(path)) == 1


def test_from_pretrained_with_a_tokenizer_lacking_a_special_token(processor, tmp_path):
    directory = processor.save_pretrained(tmp_path / "proc")
    incomplete = Tokenizer(models.BPE())
    incomplete.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    incomplete.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]  # no <image>
    incomplete.train_from_iterator(SENTENCES, trainer=trainers.BpeTrainer(
        vocab_size=280, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    incomplete.save(str(directory / TOKENIZER_NAME))
    with pytest.raises(CheckpointError) as excinfo:
        Processor.from_pretrained(directory)
    assert "<image>" in str(excinfo.value) and TOKENIZER_NAME in str(excinfo.value)


def test_from_pretrained_without_tokenizer(processor, tmp_path):
    directory = processor.save_pretrained(tmp_path / "proc")
    (directory / TOKENIZER_NAME).unlink()
    with pytest.raises(CheckpointError, match=TOKENIZER_NAME):
        Processor.from_pretrained(directory)


# --- decode --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sentence", ["The circle is red.", "  Zebras ünïcödé 🦓\nsecond line\t tab"])
def test_decode_round_trips_text(processor, tokenizer, sentence):
    assert processor.decode(text_ids(tokenizer, sentence)) == sentence
    ids, _, _ = processor.encode([{"role": "user", "content": sentence}])
    assert ids[0] == processor.begin_token_id and ids[-1] == processor.end_token_id
    assert processor.decode(ids) == sentence  # special tokens skipped
    assert processor.decode(ids, skip_special_tokens=False) == f"<|begin|><|user|>{sentence}<|end|>"


def test_hub_processor_labels_the_answer_not_the_same_word_in_a_question_of_several_parts():
    # llava-hf's llava-1.5 template (no {% generation %} tags): each text part followed by a space
    from tessera.interop.image_processing import ImageProcessing
    from tessera.interop.processor import HubProcessor, HubProcessorConfig

    template = ("{% for message in messages %}{{ message['role'].upper() + ': '}}{% for content in message['content'] "
                "| selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{% for content in "
                "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
                "{% endfor %}")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(
        ["<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "red", "or", "blue?", "Is", "it", "<unk>"])},
        unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>", "<image>"])
    config = HubProcessorConfig(family="llava", image_token="<image>", image_seq_length=1,
                                image_processing=ImageProcessing(kind="resize", size={"height": 8, "width": 8}),
                                chat_template=template, special_tokens={"pad_token": "<pad>", "eos_token": "</s>"})
    hub = HubProcessor(tokenizer, config)
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Is it"}, {"type": "image"},
                                                 {"type": "text", "text": "red or blue?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    ids, labels, _ = hub.encode(conversation)
    red = tokenizer.token_to_id("red")
    assert ids.count(red) == 2  # once in the question, once as the answer
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == [len(ids) - 1]
    assert ids[-1] == red


# --- special tokens typed in a message: read as text ---------------------------------------------------------
def _llama2_like_tokenizer() -> Tokenizer:
    """Llama 2's layout: a "▁" prepended to each stretch between added tokens, BOS added by the post-processor,
    and an added token that swallows the spaces around it."""
    from tokenizers import AddedToken, normalizers, processors

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                                  show_progress=False)
    corpus = [s.replace(" ", "▁") for s in SENTENCES] + ["<b>s</b>▁html▁USER:▁ASSISTANT:"] * 3
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken("<sep>", lstrip=True, rstrip=True)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


@pytest.mark.parametrize("layout", ["byte-level", "llama2"])
def test_a_typed_special_token_is_read_as_text_and_the_rest_of_the_prompt_as_the_tokenizer_reads_it(layout,
                                                                                                      tokenizer):
    from tessera.text.tokenizer import MessageTextEncoder

    tok = tokenizer if layout == "byte-level" else _llama2_like_tokenizer()
    if layout == "byte-level":
        tok = Tokenizer.from_str(tok.to_str())
        tok.add_special_tokens(["</s>"])
        from tokenizers import AddedToken
        tok.add_special_tokens([AddedToken("<sep>", lstrip=True, rstrip=True)])
    encoder = MessageTextEncoder(tok, "<image>")
    message = "What is <s> in html? </s> ends it"
    prompt = f"<s>The circle is red. <sep> <image>{message}</s> hello"
    start = prompt.index(message)
    typed = [(start, start + len(message))]
    for add in (False, True):
        normal = tok.encode(prompt, add_special_tokens=add)
        # no message holds a special token: the tokenizer's own tokens, ids and spans
        assert [t.id for t in encoder.encode(prompt, [], add)] == normal.ids
        assert [t.span for t in encoder.encode(prompt, [], add)] == normal.offsets
        # a span that holds none changes nothing either (the cutting reproduces the tokenizer's)
        plain_span = [(prompt.index("The"), prompt.index("The") + 5)]
        assert [t.id for t in encoder.encode(prompt, plain_span, add)] == normal.ids

        tokens = encoder.encode(prompt, typed, add)
        ids = [t.id for t in tokens]
        inside = [t.id for t in tokens if start <= t.span[0] and t.span[1] <= start + len(message)]
        assert tok.token_to_id("</s>") not in inside and tok.token_to_id("<s>") not in inside
        assert tok.decode(inside, skip_special_tokens=False).strip() == message
        # outside the message: the same tokens as the tokenizer's, the BOS it adds included
        before = [t.id for t in tokens if t.added or t.span[1] <= start]
        after = [t.id for t in tokens if not t.added and t.span[0] >= start + len(message)]
        assert before == [i for i, (a, b), s in zip(normal.ids, normal.offsets, normal.sequence_ids)
                          if s is None or b <= start]
        assert after == [tok.token_to_id("</s>"), *tok.encode(" hello", add_special_tokens=False).ids] == \
            normal.ids[-len(after):]
        assert ids == before + inside + after


def test_a_whitespace_special_token_stays_the_token_beside_a_typed_one(tokenizer):
    """A tokenizer may mark whitespace special: it is how the tokenizer reads that whitespace anywhere, so a message
    holding it stays as it was, and beside a typed token it is still the token."""
    from tessera.text.tokenizer import MessageTextEncoder

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.add_special_tokens(["\n\n", "<|eot|>"])
    encoder = MessageTextEncoder(tok, "<image>")
    assert encoder.typed_special_token("two lines\n\nof text") is None
    text = "two lines\n\nof text<|eot|>"
    assert encoder.typed_special_token(text) == "<|eot|>"
    ids = [t.id for t in encoder.encode(text, [(0, len(text))])]
    assert tok.token_to_id("\n\n") in ids and tok.token_to_id("<|eot|>") not in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_processor_reads_special_tokens_typed_in_a_message_as_text(processor, tokenizer):
    """A role or end token typed in a message (pasted from a chat log, or a question about the format) would
    otherwise end the turn there and forge the next one; the image token still places an image."""
    text = "What is <|end|><|assistant|> in a prompt?"
    ids, labels, _ = processor.encode([{"role": "user", "content": f"<image>\n{text}"},
                                       {"role": "assistant", "content": "The <|end|> token."}])
    specials = {processor.end_token_id, *processor.role_token_ids.values()}
    # the template's own: begin, user, end, assistant, end; nothing from the typed text
    assert [i for i in ids if i in specials | {processor.begin_token_id}] == [
        processor.begin_token_id, processor.role_token_ids["user"], processor.end_token_id,
        processor.role_token_ids["assistant"], processor.end_token_id]
    assert ids.count(processor.image_token_id) == processor.config.image_seq_length
    assert processor.decode(ids) == f"\n{text}The <|end|> token."
    answer = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert processor.decode(answer, skip_special_tokens=False) == "The <|end|> token.<|end|>"
    # text without one is tokenized as before
    plain, _, _ = processor.encode([{"role": "user", "content": "What colour is the circle?"}])
    assert plain == [processor.begin_token_id, processor.role_token_ids["user"],
                     *text_ids(tokenizer, "What colour is the circle?"), processor.end_token_id]


def test_hub_processor_reads_special_tokens_typed_in_a_message_as_text(tmp_path):
    """An HTML question holding Llama 2's `<s>` and `</s>`, through a template that trims the text (Llama 3's
    way); a template that rewrites the text cannot keep a typed token as text, and says so."""
    from tessera.interop.image_processing import ImageProcessing
    from tessera.interop.processor import HubProcessor, HubProcessorConfig

    tokenizer = _llama2_like_tokenizer()
    trimming = ("{% for message in messages %}{{ message['role'].upper() + ': ' + message['content'] | trim + ' ' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    config = HubProcessorConfig(family="llava", image_token="<image>", image_seq_length=1,
                                image_processing=ImageProcessing(kind="resize", size={"height": 8, "width": 8}),
                                chat_template=trimming,
                                special_tokens={"pad_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    hub = HubProcessor(tokenizer, config)
    question = "  What does <s>old</s> do in html?  "
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": "The circle is red."}]
    ids, labels, _ = hub.encode(conversation, add_generation_prompt=False)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    assert ids[0] == bos and bos not in ids[1:] and eos not in ids
    assert hub.decode(ids) == f"USER: {question.strip()} ASSISTANT: The circle is red. "
    assert hub.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == "The circle is red."
    # the same conversation without the typed tokens: exactly the tokenizer's reading of the rendered prompt
    clean = [{"role": "user", "content": "What does it do in html?"}, conversation[1]]
    assert hub.encode(clean)[0] == tokenizer.encode(hub.apply_chat_template(clean)).ids

    hub.config.chat_template = trimming.replace("| trim", "| e")  # HTML-escaped: "&lt;s&gt;"
    with pytest.raises(DataError, match=r"messages\[0\]: its text holds the special token '<s>', which is read as "
                                        r"text only where the chat template copies the text into the prompt as it "
                                        r"is \(or trimmed\); this template changed it\. Expected the "
                                        r"text without"):
        hub.encode(conversation)
    assert hub.encode(clean)[0]  # text without one still goes through that template

    # in a data file, that record is skipped (or, --strict, named) and the others are kept
    from tessera.data.records import load_examples

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"id": str(i), "messages": messages})
                              for i, messages in enumerate([clean, conversation, clean])) + "\n")
    kept, report = load_examples(data, hub)
    assert [e.example.id for e in kept] == ["0", "2"] and report.reasons == {"refused by the chat template": 1}
    with pytest.raises(DataError, match=rf"{data}: record 1 \(line 2\): refused by the chat template: "
                                        rf"messages\[0\]: its text holds the special token '<s>'"):
        load_examples(data, hub, strict=True)


def _hub(tokenizer, template, **special):
    from tessera.interop.image_processing import ImageProcessing
    from tessera.interop.processor import HubProcessor, HubProcessorConfig

    return HubProcessor(tokenizer, HubProcessorConfig(
        family="llava", image_token="<image>", image_seq_length=1, chat_template=template,
        image_processing=ImageProcessing(kind="resize", size={"height": 8, "width": 8}),
        special_tokens={"pad_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", **special}))


LLAVA_LIKE = ("{% for message in messages %}{{ message['role'].upper() + ': ' + message['content'] + ' ' }}"
              "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_a_typed_token_is_found_where_the_template_wrote_the_message_not_where_its_characters_come_first():
    """A user typing `</s>` after an assistant turn: the template's EOS closing that turn comes first in the prompt,
    and must stay the token; the user's is text."""
    tokenizer = _llama2_like_tokenizer()
    hub, eos = _hub(tokenizer, LLAVA_LIKE), tokenizer.token_to_id("</s>")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "</s>"}, {"role": "assistant", "content": "blue"}]
    ids, labels, _ = hub.encode(conversation)
    assert ids.count(eos) == 2  # the EOS closing each answer, not the typed one
    assert "USER: </s> ASSISTANT:" in hub.decode(ids)
    # the answers are learned as without the typed token
    clean = [{**message, "content": "<b>"} if message["content"] == "</s>" else message for message in conversation]
    clean_ids, clean_labels, _ = hub.encode(clean)
    assert [label for label in labels if label != IGNORE_INDEX] == \
        [label for label in clean_labels if label != IGNORE_INDEX]


def test_a_template_that_writes_the_date_still_places_texts_when_midnight_passes(monkeypatch):
    """Llama 3's template writes today's date (`strftime_now`), and finding the texts renders it a second time: if
    the date changed in between, both renders run again. A template that renders differently every time cannot
    place a typed token, and says so; its answers are then looked for by their characters."""
    from datetime import datetime, timedelta

    import tessera.interop.chat_template as chat_template

    class Clock:  # each call to now() is a second later: midnight passes after the first `ticks` renders
        def __init__(self, ticks):
            self.calls, self.ticks = 0, ticks

        def now(self):
            self.calls += 1
            return datetime(2026, 11, 27, 23, 59, 59) + timedelta(days=int(self.calls > self.ticks))

    tokenizer = _llama2_like_tokenizer()
    hub, eos = _hub(tokenizer, "{{ strftime_now('%d %b %Y') }} " + LLAVA_LIKE), tokenizer.token_to_id("</s>")
    conversation = [{"role": "user", "content": "Is </s> a tag?"}, {"role": "assistant", "content": "S"}]
    for messages in conversation, [conversation[0] | {"content": "Is it a tag?"}, conversation[1]]:
        monkeypatch.setattr(chat_template, "datetime", Clock(ticks=0))  # the 28th all along
        after_midnight = hub.encode(messages)
        monkeypatch.setattr(chat_template, "datetime", Clock(ticks=1))  # the 27th, then the 28th
        ids, labels, _ = hub.encode(messages)
        assert (ids, labels) == after_midnight[:2]
        assert ids.count(eos) == 1  # the template's own, after the answer (a typed one is text)
        # the answer where the template wrote it, not the "S" in "USER"
        assert [i for i, label in zip(ids, labels) if label != IGNORE_INDEX] == [tokenizer.token_to_id("S")]

    hub.config.chat_template = "{{ strftime_now('%f') }} " + LLAVA_LIKE  # a new text at every render
    ticks = iter(range(10**6))
    monkeypatch.setattr(chat_template, "datetime", SimpleNamespace(
        now=lambda: datetime(2026, 11, 27) + timedelta(microseconds=next(ticks))))
    with pytest.raises(DataError, match=r"messages\[0\]: its text holds the special token '</s>'.*this template "
                                        r"renders differently each time\. Expected"):
        hub.encode(conversation)


def test_a_prompt_to_generate_from_skips_looking_for_its_answers(processor, monkeypatch):
    """labels=False (the server's prompts): the same ids, no labels, and an imported template renders once — the
    second render only locates answers (or typed special tokens, which still need it)."""
    import tessera.interop.processor as hub_module

    tokenizer = _llama2_like_tokenizer()
    hub = _hub(tokenizer, LLAVA_LIKE)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"},
               {"role": "user", "content": "and now?"}]
    renders = []
    render = hub_module.render
    monkeypatch.setattr(hub_module, "render", lambda *args, **kwargs: renders.append(1) or render(*args, **kwargs))
    for p, expected_renders in ((hub, 1), (processor, 0)):
        ids, labels, _ = p.encode(history, add_generation_prompt=True)
        renders.clear()
        assert p.encode(history, add_generation_prompt=True, labels=False) == (ids, None, [])
        assert len(renders) == expected_renders
    typed = history[:2] + [{"role": "user", "content": "and </s>?"}]
    ids, _, _ = hub.encode(typed, add_generation_prompt=True, labels=False)
    assert ids == hub.encode(typed, add_generation_prompt=True)[0]
    assert ids.count(tokenizer.token_to_id("</s>")) == 1  # the template's, after "red": the typed one is text


def test_a_typed_token_that_strips_spaces_is_text_at_the_start_and_end_of_a_message():
    """An added token with lstrip/rstrip takes the spaces the template writes around the message into its span."""
    tokenizer = _llama2_like_tokenizer()
    hub, sep = _hub(tokenizer, LLAVA_LIKE), tokenizer.token_to_id("<sep>")
    for message in ["<sep> is the circle red?", "is the circle red? <sep>", "is the <sep> red?", "<sep>"]:
        ids, _, _ = hub.encode([{"role": "user", "content": message}], add_generation_prompt=True)
        assert sep not in ids, message
        assert message in hub.decode(ids), message


def test_a_typed_bos_leaves_the_prompt_s_own_bos_alone():
    """A prompt is taken to hold BOS already when it starts with its characters: typed ones do not count."""
    tokenizer = _llama2_like_tokenizer()
    bos = tokenizer.token_to_id("<s>")
    system_first = "{% for message in messages %}{{ message['content'] + ' ' }}{% endfor %}"
    for system in ("<b>old</b> is bold", "<s>old</s> is struck"):
        ids, _, _ = _hub(tokenizer, system_first).encode([{"role": "system", "content": system},
                                                          {"role": "user", "content": "hi"}])
        assert ids[0] == bos and ids.count(bos) == 1, system


def test_a_template_that_moves_a_message_still_reads_its_typed_token_as_text():
    """Mistral-Instruct's layout writes the system message into the last user turn: after the messages before it.
    Every text is copied as it is, so the typed token is found there and read as text."""
    tokenizer = _llama2_like_tokenizer()
    template = ("{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
                "{% set loop_messages = messages[1:] if system else messages %}{{ bos_token }}"
                "{% for m in loop_messages %}{% if m['role'] == 'user' %}"
                "{% if loop.last and system %}{{ '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
                "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
                "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    hub = _hub(tokenizer, template)
    conversation = [{"role": "system", "content": "Say <s> less."}, {"role": "user", "content": "What is <s>?"},
                    {"role": "assistant", "content": "The circle."}, {"role": "user", "content": "And </s> blue?"}]
    ids, _, _ = hub.encode(conversation)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    assert ids.count(bos) == 1 and ids.count(eos) == 1  # the template's own: BOS, the EOS after the answer
    assert all(text in hub.decode(ids) for text in ("Say <s> less.", "What is <s>?", "And </s> blue?"))


def test_a_typed_token_in_a_metaspace_first_tokenizer_changes_only_its_own_stretch():
    """Llama 2 and Mistral as transformers converts them now: a Metaspace pre-tokenizer that puts "▁" only before
    the text's first word. A stretch read again must not gain one, and the other stretches keep their tokens."""
    from tokenizers import processors

    from tessera.text.tokenizer import MessageTextEncoder

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([s.replace(" ", "▁") for s in SENTENCES] + ["[INST]<s>▁is"] * 3, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    encoder = MessageTextEncoder(tokenizer, "<image>")
    prompt = "[INST]The circle</s>[INST]is <s>red</s>"
    typed = [(prompt.index("is <s>"), prompt.index("red") + 3)]
    tokens = [tokenizer.id_to_token(t.id) for t in encoder.encode(prompt, typed, add_special_tokens=True)]
    normal = tokenizer.encode(prompt).tokens
    cut = normal.index("is▁")
    assert tokens[:cut + 1] == normal[:cut + 1] and tokens[-1] == "</s>"
    assert "".join(tokens[cut:-1]).replace("▁", " ") == "is <s>red" and "<s>" not in tokens[1:]


def test_a_special_token_split_over_a_message_s_text_parts_is_text():
    """A template that writes a message's text parts back to back joins them: a token split over two parts would
    be read as the token. A message is typed if its parts hold one joined, and then all its parts are text."""
    tokenizer = _llama2_like_tokenizer()
    template = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for part in message['content'] %}"
                "{{ part['text'] }}{% endfor %}{{ ' ' }}{% endfor %}")
    hub = _hub(tokenizer, template)
    parts = [{"type": "text", "text": "Is the circle red?</"}, {"type": "text", "text": "s> yes"}]
    ids, _, _ = hub.encode([{"role": "user", "content": parts}])
    assert tokenizer.token_to_id("</s>") not in ids and "Is the circle red?</s> yes" in hub.decode(ids)


def test_an_answer_is_learned_where_the_template_wrote_it_not_in_the_template_s_own_text():
    """Without {% generation %} tags, an answer "S" was looked for after the question and found in "ASSISTANT:"
    (the template's own characters learned, the answer not)."""
    tokenizer = _llama2_like_tokenizer()
    hub = _hub(tokenizer, LLAVA_LIKE)
    for answer in ("S", "red"):
        ids, labels, _ = hub.encode([{"role": "user", "content": "Is it red?"},
                                     {"role": "assistant", "content": answer}])
        learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert hub.decode([ids[i] for i in learned]) == answer, answer
        assert learned[0] > max(i for i, t in enumerate(ids) if tokenizer.id_to_token(t).endswith("ISTANT:"))


def test_a_tokenizer_file_s_truncation_and_padding_are_turned_off_as_transformers_does(tokenizer, tmp_path):
    """A tokenizer.json may set truncation (max_length 512, say) or padding; transformers turns both off and leaves
    cutting to the processor, which knows where the answer and the images are. tessera too."""
    from tessera.text.tokenizer import load_tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length=4)
    tok.enable_padding(length=64)
    tok.save(str(tmp_path / "tokenizer.json"))
    sentence = "What colour is the circle? The circle is red."
    ids = load_tokenizer(tmp_path / "tokenizer.json").encode(sentence).ids
    assert ids == tokenizer.encode(sentence).ids and len(ids) > 4


def test_an_answer_a_template_trims_is_learned_without_the_template_s_whitespace(tokenizer):
    """Llama 3's layout: header, "\\n\\n", the text trimmed. An answer that starts or ends with whitespace is
    learned from its first word to the end of turn; the header's newlines are the template's, not the answer's."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    template = ("{{ bos_token }}{% for message in messages %}"
                "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
                "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}")
    hub = _hub(tok, template, bos_token="<|begin|>", eos_token="<|eot_id|>", pad_token="<pad>")
    for answer in ["The circle is red.", "\nThe circle is red.", "\n\nThe circle is red.", " The circle is red.\n"]:
        ids, labels, _ = hub.encode([{"role": "user", "content": "What colour?"},
                                     {"role": "assistant", "content": answer}])
        learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert hub.decode(learned, skip_special_tokens=False) == "The circle is red.<|eot_id|>", repr(answer)


def test_a_whitespace_only_text_beside_a_typed_one_is_placed_too():
    """A text that is only whitespace (an empty-looking answer, a separator part) is all lead and no core: placed
    by its marker like any other, it does not make the typed message beside it unplaceable."""
    tokenizer = _llama2_like_tokenizer()
    hub, eos = _hub(tokenizer, LLAVA_LIKE), tokenizer.token_to_id("</s>")
    conversation = [{"role": "user", "content": "What ends html? </s>"}, {"role": "assistant", "content": " "},
                    {"role": "user", "content": "And?"}, {"role": "assistant", "content": "red"}]
    ids, labels, _ = hub.encode(conversation)
    assert ids.count(eos) == 2 and "What ends html? </s>" in hub.decode(ids)
    assert hub.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]).strip() == "red"


@pytest.mark.parametrize("field, value, words", [
    ("image_size", -1, "processor.image_size=-1: expected a positive integer"),
    ("image_seq_length", 0, "processor.image_seq_length=0: expected a positive integer"),
    ("image_mean", (0.5, 0.5), "processor.image_mean=(0.5, 0.5): expected 3 numbers, one per channel"),
    ("image_std", (0.5, 0, 0.5), "processor.image_std=0: expected a positive number"),  # inf pixels, before
    ("image_std", 0.5, "processor.image_std=0.5: expected a list of 3 numbers"),
    ("max_length", "8", "processor.max_length='8': expected a positive integer or null"),  # a TypeError, before
])
def test_processor_settings_are_checked_as_model_settings_are(field, value, words):
    from tessera.processor import ProcessorConfig

    settings = {"image_size": 16, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3, "image_seq_length": 16}
    with pytest.raises(ConfigError, match=re.escape(words)):
        ProcessorConfig(**{**settings, field: value})


def test_one_conversation_passed_as_the_batch_says_to_wrap_it(processor):
    """processor(messages) for processor([messages]) failed as a malformed message, or as two conversations short
    of images; an empty batch as max() of an empty sequence."""
    messages = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}]
    for call in (lambda: processor(messages), lambda: processor(messages, [[image()]]), lambda: processor(messages[0])):
        with pytest.raises(DataError, match=re.escape("conversations holds messages: expected a list of "
                                                      "conversations, each a list of messages — processor([messages])")):
            call()
    with pytest.raises(DataError, match="no conversations: expected at least one"):
        processor([])
    assert processor([messages])["input_ids"].shape[0] == 1
    assert processor(m for m in [messages, messages])["input_ids"].shape[0] == 2  # a generator of conversations


def test_a_missing_checkpoint_directory_or_a_directory_for_a_config_file_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'}: no such checkpoint directory"):
        Processor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: a directory; expected a config file "
                                                    f"({tmp_path / 'config.json'}?)")):
        tessera.ModelConfig.load(tmp_path)  # an IsADirectoryError, before


def test_image_parts_carry_their_image_under_any_key_transformers_messages_use(processor, tmp_path):
    """{"type": "image", "path": …} or "url" (transformers' chat messages) was read as a placeholder without its
    image, which then failed as "0 image(s)" for one placeholder."""
    image().save(tmp_path / "a.png")
    batches = [processor([[{"role": "user", "content": [part, {"type": "text", "text": "What colour?"}]}]])
               for part in ({"type": "image", "image": image()}, {"type": "image", "path": str(tmp_path / "a.png")},
                            {"type": "image", "url": (tmp_path / "a.png").as_uri()})]
    for batch in batches[1:]:
        assert torch.equal(batch["pixel_values"], batches[0]["pixel_values"])
        assert torch.equal(batch["input_ids"], batches[0]["input_ids"])
    web = [{"role": "user", "content": [{"type": "image", "url": "https://example.com/a.png"}]}]
    with pytest.raises(DataError, match="https://example.com/a.png: a web address; tessera reads images from files"):
        processor([web])


def test_a_processor_for_a_model_takes_the_tokenizer_file_s_path(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = model_config()
    by_path = Processor.for_model(config, tmp_path / "tokenizer.json")
    assert by_path([QA])["input_ids"].tolist() == Processor.for_model(config, tokenizer)([QA])["input_ids"].tolist()


def test_transformers_streamers_decode_through_the_processor_across_a_newline(processor):
    """transformers' streamers decode one id alone when a line ends (`decode(token_cache[-1])`): the processor takes
    an id as transformers' tokenizers do. It raised 'int' object is not iterable at the first newline."""
    streamers = pytest.importorskip("transformers.generation.streamers")
    ids = processor.tokenizer.encode("the red square\nis small").ids
    newline = processor.tokenizer.encode("\n").ids
    assert set(newline) <= set(ids)
    streamer = streamers.TextIteratorStreamer(processor)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(streamer) == processor.decode(ids) == "the red square\nis small"
    assert processor.decode(ids[0]) == processor.decode([ids[0]]) == processor.decode(torch.tensor(ids[:1]))
