"""Hugging Face interop, reviewed: settings transformers honours (or refuses) that an import must not drop in
silence. Uses the tiny random checkpoints of tests/test_interop.py (nothing is downloaded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera import ConfigError, MultimodalLM, Processor  # noqa: E402
from tessera.interop.convert import convert  # noqa: E402
from tests.test_interop import _ask, _copy_checkpoint, families, hf_tokenizer, imported  # noqa: E402,F401


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- the image processor must give the images the model was built for -----------------------------------------
@pytest.mark.parametrize("name, edit, words", [
    # LLaVA: 12x12 crops give 36 patches where the model's 8x8 images give 16 image tokens
    ("llava-clip-llama", lambda c: c["image_processor"].update(size={"shortest_edge": 12},
                                                               crop_size={"height": 12, "width": 12}),
     ["processor_config.json", "12x12", "vision_config.image_size=8"]),
    ("llava-siglip-qwen2", lambda c: c["image_processor"].update(size={"height": 6, "width": 6}),
     ["processor_config.json", "6x6", "vision_config.image_size=8"]),
    ("mllama", lambda c: c["image_processor"].update(size={"height": 20, "width": 20}),
     ["processor_config.json", "20x20", "vision_config.image_size=16"]),
    ("mllama", lambda c: c["image_processor"].update(max_image_tiles=2),
     ["processor_config.json", "max_image_tiles=2", "vision_config.max_num_tiles=4"]),
])
def test_an_image_processor_that_does_not_fit_the_model_is_named(name, edit, words, families, tmp_path):
    """Before: the processor made 12x12 images, the encoder interpolated its positions to 36 patches and the model
    wrote the first 16 of them into its 16 image tokens — an answer about a third of the image, with no error
    (transformers' CLIP refuses the size)."""
    directory = _copy_checkpoint(families[name].directory, tmp_path / "hf")
    _edit_json(directory / "processor_config.json", edit)
    for load in (Processor.from_pretrained, lambda d: convert(d, tmp_path / "converted")):
        with pytest.raises(ConfigError) as error:
            load(directory)
        message = str(error.value)
        assert all(word in message for word in words), message


# --- labels: the answer as the template writes it ---------------------------------------------------------------
@pytest.mark.parametrize("answer", ["a red square\n", "  a red square", "a red square "])
def test_an_answer_the_template_trims_is_still_learned(answer, imported):
    """Llama 3's template writes `content | trim`, and answers in data often end in a newline. Before, such an
    answer was not found verbatim in the prompt and got no labels: the record was dropped as "answer cut off by
    the length limit", or, with several answers, trained on the others only."""
    _, processor = imported["mllama"]
    conversation = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                    {"role": "user", "content": "And now?"},
                    {"role": "assistant", "content": answer}]
    ids, labels, _ = processor.encode(conversation)
    learned = [i for i, label in zip(ids, labels) if label != -100]
    assert processor.decode(learned) == "a red squarea red square"


# --- image processing: every size transformers honours ------------------------------------------------------------
@pytest.mark.parametrize("size", [(3, 7), (9, 40), (17, 64), (100, 5), (20, 13), (8, 8)])
def test_a_longest_edge_bound_is_honoured_as_transformers_does(size):
    """size={"shortest_edge": s, "longest_edge": l} resizes the short side to s unless that makes the long side
    longer than l (transformers' get_size_with_aspect_ratio). Before, longest_edge was dropped in silence and a
    thin image came out as a different crop."""
    import numpy as np
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tessera.interop.image_processing import ImageProcessing

    theirs = CLIPImageProcessorPil(size={"shortest_edge": 8, "longest_edge": 12}, crop_size={"height": 8, "width": 8})
    ours = ImageProcessing.from_hf(theirs.to_dict(), "preprocessor_config.json")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    expected = theirs(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours(image)[0], expected, atol=1e-6, rtol=0)
    assert ours.largest_step(*size)[1] == tuple(reversed(ours._resized_size(size[1], size[0])))


def test_a_longest_edge_alone_is_refused():
    from tessera.interop.image_processing import ImageProcessing

    with pytest.raises(ConfigError, match=r"preprocessor_config.json.size=\{'longest_edge': 12\}"):
        ImageProcessing.from_hf({"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 12}},
                                "preprocessor_config.json")


# --- chat templates: the variables transformers gives them ---------------------------------------------------------
def test_a_chat_template_sees_every_special_token_transformers_gives_it(families, tmp_path):
    """transformers renders a template with its tokenizer's special_tokens_map: bos/eos/unk/sep/pad/cls/mask, every
    other `*_token` entry of tokenizer_config.json and its named extra_special_tokens. Before, only bos, eos, unk
    and pad were passed, so `{{ image_token }}` or `{{ sep_token }}` rendered as nothing: another prompt."""
    from transformers import AutoProcessor

    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    _edit_json(directory / "tokenizer_config.json", lambda c: c.update(
        sep_token="</s>", cls_token="<s>", mask_token={"content": "<pad>", "lstrip": False, "__type": "AddedToken"},
        image_token="<image>", extra_special_tokens={"video_token": "<pad>"}, add_bos_token=True))
    (directory / "chat_template.jinja").write_text(
        "[{{ bos_token }}|{{ eos_token }}|{{ sep_token }}|{{ cls_token }}|{{ mask_token }}|{{ image_token }}|"
        "{{ video_token }}|{{ add_bos_token }}]{% for m in messages %}{{ m['content'] }}{% endfor %}")
    conversation = [{"role": "user", "content": "hi"}]
    expected = AutoProcessor.from_pretrained(directory).apply_chat_template(conversation)
    assert expected == "[<s>|</s>|</s>|<s>|<pad>|<image>|<pad>|]hi"
    assert Processor.from_pretrained(directory).apply_chat_template(conversation) == expected
    converted = convert(directory, tmp_path / "converted")
    assert Processor.from_pretrained(converted).apply_chat_template(conversation) == expected


# --- malformed hub files: one error naming the file and the field ------------------------------------------------
@pytest.mark.parametrize("settings, words", [
    ({"resample": "bicubic"}, "preprocessor_config.json.resample='bicubic': expected one of PIL's filter numbers"),
    ({"resample": 9}, "preprocessor_config.json.resample=9"),
    ({"size": {"height": "a", "width": 8}}, "preprocessor_config.json.size={'height': 'a', 'width': 8}"),
    ({"size": {"height": 0, "width": 8}}, "preprocessor_config.json.size={'height': 0, 'width': 8}"),
    ({"image_mean": [0.5, 0.5]}, "preprocessor_config.json.image_mean=[0.5, 0.5]: expected 3 numbers"),
    ({"image_std": "x"}, "preprocessor_config.json.image_std='x'"),
    ({"image_std": [0.5, 0, 0.5]}, "preprocessor_config.json.image_std=[0.5, 0, 0.5]"),
    ({"rescale_factor": "x"}, "preprocessor_config.json.rescale_factor='x'"),
    ({"do_center_crop": True, "crop_size": {"shortest_edge": 8}}, "preprocessor_config.json.crop_size="),
    ({"image_processor_type": 5}, "preprocessor_config.json.image_processor_type=5"),
])
def test_a_malformed_image_processor_setting_is_named(settings, words):
    """Before: ValueError("invalid literal for int() with base 10: 'bicubic'"), a numpy broadcasting error at the
    first image, or a KeyError — none saying which file or field."""
    from tessera.interop.image_processing import ImageProcessing

    with pytest.raises(ConfigError) as error:
        ImageProcessing.from_hf({"image_processor_type": "SiglipImageProcessor", "size": {"height": 8, "width": 8},
                                 **settings}, "preprocessor_config.json")
    assert words in str(error.value)


def test_non_square_llama_vision_tiles_are_refused():
    """transformers' MllamaImageProcessor refuses height != width; tessera cut tiles by the height alone."""
    from tessera.interop.image_processing import ImageProcessing

    with pytest.raises(ConfigError, match=r"size=\{'height': 16, 'width': 8\}: .*square tiles"):
        ImageProcessing.from_hf({"image_processor_type": "MllamaImageProcessor", "size": {"height": 16, "width": 8}},
                                "preprocessor_config.json")


@pytest.mark.parametrize("weight_map", [{"a.weight": 5}, {"a.weight": None}, {"a.weight": ["x"]}])
def test_a_malformed_shard_index_is_named(weight_map, tmp_path):
    from tessera import CheckpointError
    from tessera.interop.hub_files import read_weights

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as error:
        read_weights(tmp_path)
    message = str(error.value)
    assert "model.safetensors.index.json" in message and "'a.weight'" in message and "shard file name" in message


# --- convert → export gives back what came in ------------------------------------------------------------------
def test_convert_then_export_keeps_the_generation_settings(families, tmp_path):
    """convert → export wrote a generation_config.json of the three special ids only: the source's max_length,
    do_sample, temperature and top_p were gone, and transformers' generate fell back to its defaults."""
    from transformers import GenerationConfig

    from tessera.interop.export import export_hf

    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    settings = {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "max_length": 77, "do_sample": True,
                "temperature": 0.6, "top_p": 0.9}
    (directory / "generation_config.json").write_text(json.dumps(settings))
    exported = export_hf(convert(directory, tmp_path / "ck"), tmp_path / "out")
    generation = GenerationConfig.from_pretrained(exported)
    assert {key: getattr(generation, key) for key in settings} == settings
    (directory / "generation_config.json").unlink()  # a source without one: an earlier conversion's is not kept
    assert not (convert(directory, tmp_path / "ck", overwrite=True) / "generation_config.json").exists()


def test_an_eos_of_null_in_generation_config_defers_to_config_json(families, tmp_path):
    """transformers reads "eos_token_id": null in generation_config.json as no say; tessera took it as no EOS at all
    and refused the checkpoint."""
    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    expected = MultimodalLM.from_pretrained(directory).config.eos_token_id
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": None, "max_length": 20}))
    assert MultimodalLM.from_pretrained(directory).config.eos_token_id == expected


def test_a_mistral_without_a_sliding_window_stays_mistral(families, tmp_path):
    """text_config {"model_type": "mistral", "sliding_window": null} (Mistral 7B v0.2's, llava-v1.6-mistral's) came
    back from convert → export as model_type "llama": the family was chosen by tessera's switches alone."""
    from transformers import LlavaConfig

    from tessera.interop.export import export_hf

    directory = _copy_checkpoint(families["llava-clip-mistral"].directory, tmp_path / "hf")
    _edit_json(directory / "config.json", lambda c: c["text_config"].update(sliding_window=None))
    exported = export_hf(convert(directory, tmp_path / "ck"), tmp_path / "out")
    text = LlavaConfig.from_pretrained(exported).text_config
    assert text.model_type == "mistral" and text.sliding_window is None  # not MistralConfig's default 4096


def test_a_family_its_switches_contradict_is_named():
    from tessera import TextConfig
    from tessera.interop.text_models import text_config_to_hf

    with pytest.raises(ConfigError, match=r"text\.family='llama' with .*sliding_window=8: .*expected family 'mistral"):
        text_config_to_hf(TextConfig(sliding_window=8, family="llama"))
    with pytest.raises(ConfigError, match=r"text\.family='gemma': expected one of 'llama', 'mistral', 'qwen2'"):
        TextConfig(family="gemma")


# --- writing: never over the source, never beside stale weights ----------------------------------------------------
def test_convert_or_export_into_its_own_source_is_refused(families, tmp_path, capsys):
    """`tessera convert DIR DIR` wrote tessera's config.json and weights over the Hugging Face checkpoint (and
    `tessera export CK CK` over the tessera one): the source was gone, with no error."""
    from tessera.cli import main

    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    assert main(["convert", str(directory), str(directory / ".." / "hf")]) == 2
    assert "is the checkpoint being converted" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    converted = convert(directory, tmp_path / "ck")
    before = {path.name: path.read_bytes() for path in converted.iterdir()}
    assert main(["export", str(converted), str(converted)]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in converted.iterdir()} == before
    # converting a tessera checkpoint again said "architectures=[] (model_type=None)"
    assert main(["convert", str(converted), str(tmp_path / "again")]) == 2
    assert f"{converted}: a tessera checkpoint already; expected a transformers directory" in capsys.readouterr().err


def test_a_broken_or_classless_config_json_is_named_as_such(families, tmp_path, capsys):
    """`tessera convert` took a config.json it could not read (a download cut short) for a tessera checkpoint's,
    and said "a tessera checkpoint already"; one without "architectures" was reported as architectures=[]."""
    from tessera.cli import main

    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    config = (directory / "config.json").read_text()
    (directory / "config.json").write_text(config[: len(config) // 2])
    assert main(["convert", str(directory), str(tmp_path / "ck")]) == 2
    assert f"{directory / 'config.json'}: not valid JSON" in capsys.readouterr().err
    (directory / "config.json").write_bytes(b"\xff\xfe{}")
    assert main(["convert", str(directory), str(tmp_path / "ck")]) == 2
    assert f"{directory / 'config.json'}: not UTF-8 text" in capsys.readouterr().err
    (directory / "config.json").write_text(config)
    _edit_json(directory / "config.json", lambda c: c.pop("architectures"))
    assert main(["convert", str(directory), str(tmp_path / "ck")]) == 2
    assert (f"{directory / 'config.json'}: no 'architectures' field, which names the model class "
            f"(model_type='llava'); tessera imports LlavaForConditionalGeneration" in capsys.readouterr().err)
    assert not (tmp_path / "ck").exists()


def test_an_output_directory_holding_files_is_refused_and_overwrite_replaces_the_checkpoint(families, tmp_path,
                                                                                          capsys):
    """convert and export wrote into a directory holding another model file by file: its config and weights were
    replaced without a word, and its other files stayed to be read beside the new ones (another chat_template.json
    won over the exported chat_template.jinja, in transformers and in tessera alike)."""
    from tessera.cli import main

    converted = convert(families["llava-clip-llama"].directory, tmp_path / "ck")
    target = tmp_path / "out"
    assert main(["export", str(converted), str(target)]) == 0
    exported = sorted(path.name for path in target.iterdir())
    (target / "chat_template.json").write_text('{"chat_template": "OLD {{ messages }}"}')  # another model's
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    assert main(["export", str(converted), str(target)]) == 2
    assert (f"{target}: holds chat_template.jinja, chat_template.json, config.json, generation_config.json and "
            f"4 more; expected a new or empty directory, or --overwrite" in capsys.readouterr().err)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before  # nothing written
    assert main(["export", str(converted), str(target), "--overwrite"]) == 0
    assert sorted(path.name for path in target.iterdir()) == exported  # the other model's file is gone
    # a second conversion into the first one's directory
    source = families["llava-clip-llama"].directory
    assert main(["convert", str(source), str(converted)]) == 2
    assert f"{converted}: holds config.json, generation_config.json" in capsys.readouterr().err
    assert main(["convert", str(source), str(converted), "--overwrite"]) == 0
    assert MultimodalLM.from_pretrained(converted).config == MultimodalLM.from_pretrained(source).config


def test_overwrite_replaces_only_a_checkpoint(families, tmp_path, capsys, monkeypatch):
    """--overwrite pointed at `.`, a run's output or one's documents by mistake would have taken what they hold: a
    directory is replaced only if it holds a config.json and nothing but the kinds of file a checkpoint holds."""
    from tessera.cli import main

    source = str(families["llava-clip-llama"].directory)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "thesis.pdf").write_bytes(b"%PDF")
    (papers / "config.json").write_text("{}")
    shards = tmp_path / "shards"  # a checkpoint's kinds of file, but no config.json: no checkpoint
    shards.mkdir()
    (shards / "model.safetensors").write_bytes(b"")
    for directory, what in [(run, "checkpoints/, metrics.jsonl, which no checkpoint writes"),
                            (papers, "thesis.pdf, which no checkpoint writes"),
                            (shards, "no config.json, so no checkpoint")]:
        before = sorted(path.name for path in directory.iterdir())
        assert main(["convert", source, str(directory), "--overwrite"]) == 2
        assert (f"{directory}: holds {what}; --overwrite replaces a checkpoint's files only"
                in capsys.readouterr().err)
        assert sorted(path.name for path in directory.iterdir()) == before
    empty = tmp_path / "empty"  # `.`: written into, the working directory staying where it is
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["convert", source, "."]) == 0
    assert (empty / "config.json").is_file() and Path.cwd() == empty


def test_a_write_stopped_half_way_leaves_the_directory_as_it_was(families, tmp_path, monkeypatch):
    from tessera.interop import export

    converted = convert(families["llava-clip-llama"].directory, tmp_path / "ck")
    target = tmp_path / "out"
    export.export_hf(converted, target)
    before = {path.name: path.read_bytes() for path in target.iterdir()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_processor", stopped)  # the weights and config.json are written by then
    with pytest.raises(KeyboardInterrupt):
        export.export_hf(converted, target, overwrite=True)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before  # no staging left in it either
    with pytest.raises(KeyboardInterrupt):  # a new directory, stopped: not left behind, empty
        export.export_hf(converted, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_weights_written_over_an_older_layout_replace_it(tmp_path):
    """A directory holding model.safetensors from an earlier (smaller) export, now written as shards: both
    transformers and tessera read model.safetensors first, so they loaded the OLD weights in silence. The other
    layout's files are now removed (as transformers' save_pretrained does)."""
    from tessera.interop.hub_files import read_weights, write_weights

    old = {"w": torch.zeros(4, 4)}
    new = {"w": torch.ones(4, 4), "v": torch.full((4, 4), 2.0)}
    write_weights(old, tmp_path)
    write_weights(new, tmp_path, max_shard_bytes=64)
    assert not (tmp_path / "model.safetensors").exists()
    tensors, _ = read_weights(tmp_path)
    assert tensors.keys() == new.keys() and all(torch.equal(tensors[k], new[k]) for k in new)
    stale_shard = tmp_path / "model-00003-of-00003.safetensors"  # a shard a three-shard export had left
    stale_shard.write_bytes(b"old")
    write_weights(old, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(read_weights(tmp_path)[0]["w"], old["w"])


@pytest.mark.parametrize("settings, words", [
    ({"image_processor_type": ["CLIPImageProcessor"]}, "preprocessor_config.json.image_processor_type=["),
    ({"image_processor_type": {"name": "CLIPImageProcessor"}}, "preprocessor_config.json.image_processor_type={"),
    # SigLIP has no default crop size: a centre crop needs one (transformers refuses it too)
    ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 8, "width": 8}, "do_center_crop": True},
     "preprocessor_config.json.crop_size=None: expected"),
])
def test_a_malformed_image_processor_setting_is_a_config_error_not_a_crash(settings, words):
    """An unhashable image_processor_type raised TypeError ("unhashable type: 'list'"), and do_center_crop without
    a crop_size KeyError('crop_size'): neither named the file or the field."""
    from tessera.interop.image_processing import ImageProcessing

    with pytest.raises(ConfigError) as error:
        ImageProcessing.from_hf(settings, "preprocessor_config.json")
    assert words in str(error.value)


@pytest.mark.parametrize("settings", ["CLIPImageProcessor", ["size", 8], 5])
def test_image_processor_settings_that_are_not_an_object_are_named(settings):
    """processor_config.json {"image_processor": "CLIPImageProcessor"} failed with AttributeError."""
    from tessera.interop.image_processing import ImageProcessing

    with pytest.raises(ConfigError, match=r"processor_config.json: .*expected an object of image processor"):
        ImageProcessing.from_hf(settings, "processor_config.json")


# --- a chat template that cannot build a prompt: said in one line, a 400 or a failed load, never a 500 -------------
MISTRAL_LIKE = "{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"


def _without_chat_template(directory: Path) -> Path:
    """The checkpoint with none of the four places a chat template may be read from holding one."""
    for name in "chat_template.jinja", "chat_template.json":
        (directory / name).unlink(missing_ok=True)
    for name in "processor_config.json", "tokenizer_config.json":
        if (directory / name).exists():
            _edit_json(directory / name, lambda c: c.pop("chat_template", None))
    return directory


def test_a_template_that_fails_while_rendering_is_a_data_error(families, tmp_path, capsys):
    """A template written for string contents, given text parts: its `+` raised TypeError, which only
    raise_exception's TemplateError was turned into a DataError for, so `tessera generate` printed a traceback and
    the server answered 500 "internal server error: TypeError"."""
    from tessera.cli import main
    from tessera.errors import DataError
    from tessera.serve import ServeSettings
    from tests.test_serve import assert_error, running_server

    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    (directory / "chat_template.jinja").write_text(MISTRAL_LIKE)
    words = 'chat template: rendering failed: TypeError: can only concatenate str (not "list") to str'
    processor = Processor.from_pretrained(directory)
    with pytest.raises(DataError) as error:
        processor([[processor.user_message("hi", 0)]], add_generation_prompt=True)
    assert str(error.value) == words
    assert main(["generate", "--checkpoint", str(directory), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == f"tessera generate: error: {words}"
    with running_server(ServeSettings(checkpoint=str(directory), served_model_name="m")) as s:
        parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        assert_error(_ask(s, parts), 400, "messages", words)
        assert _ask(s, [{"role": "user", "content": "hi"}]).status_code == 200  # strings it can add


def test_a_checkpoint_without_a_chat_template_fails_to_load_in_the_server(families, tmp_path):
    """The server builds every prompt with the template: without one it started, /health said ok, and every chat
    request was a 500 "internal server error: ConfigError" whose reason only the server log held."""
    import httpx

    from tessera.serve import ServeSettings
    from tessera.serve.app import LOAD_FAILED
    from tests.test_serve import _until, assert_error, running_server

    directory = _without_chat_template(_copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf"))
    with running_server(ServeSettings(checkpoint=str(directory), served_model_name="m"), wait=False) as s:
        state = s.app.state.tessera
        _until(lambda: state["engine"] is not None or state["error"] is not None, "the load to end")
        words = f"loading the model failed: ConfigError: {directory}: no chat template (chat_template.jinja"
        for response in httpx.get(f"{s.url}/health"), _ask(s, [{"role": "user", "content": "hi"}]):
            assert_error(response, 503, None, words, LOAD_FAILED)


@pytest.mark.parametrize("written_to", ["processor_config.json", "chat_template.json", "chat_template.jinja",
                                        "tokenizer_config.json"])
def test_a_chat_template_that_is_not_jinja_fails_the_servers_load(families, tmp_path, written_to):
    """Loaded, it made every chat request a 400 "chat template: not valid Jinja": the client's fault in the API's
    words, though no request could have passed. The error names the file the template was read from: a checkpoint
    may hold it in any of four."""
    from tessera.serve.app import check_chat_template

    directory = _without_chat_template(_copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf"))
    broken = "{% for message in messages %}{{ message['content'] }}"
    if written_to == "chat_template.jinja":
        (directory / written_to).write_text(broken)
    elif (directory / written_to).exists():
        _edit_json(directory / written_to, lambda c: c.update(chat_template=broken))
    else:
        (directory / written_to).write_text(json.dumps({"chat_template": broken}))
    with pytest.raises(ConfigError, match=re.escape(f"{directory / written_to}: chat template: not valid Jinja (")):
        check_chat_template(Processor.from_pretrained(directory), str(directory))
    check_chat_template(Processor.from_pretrained(families["llava-clip-llama"].directory), "fine")


def test_a_placeholder_count_that_does_not_match_names_the_models_image_token(imported):
    """`tessera generate --prompt "<|image|> hi"` without --image on Llama 3.2 Vision said "1 <image>
    placeholder(s)": tessera's own token, which this model does not have."""
    from tessera.errors import DataError

    _, processor = imported["mllama"]
    with pytest.raises(DataError, match=r"^conversation 0: 1 <\|image\|> placeholder\(s\) but 0 image\(s\)"):
        processor([[processor.user_message("<|image|> hi", 0)]], add_generation_prompt=True)
