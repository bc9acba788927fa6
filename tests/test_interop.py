"""Hugging Face interop: tiny random transformers models (pinned version, fp32, eager attention) saved to a temp
dir, imported by tessera, and compared — logits on a padded batch of two conversations with different images,
20 greedy tokens, the processor's token ids and pixels, and the export loaded back by transformers.

Nothing is downloaded: tokenizers are trained here, models are random.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, MllamaConfig, MllamaForConditionalGeneration,
    MllamaProcessor, PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

from tessera import (  # noqa: E402
    CheckpointError, ConfigError, DataError, FusionConfig, ModelConfig, MultimodalLM, Processor, TextConfig,
    VisionConfig, train_tokenizer,
)
from tessera.cli import main  # noqa: E402
from tessera.interop import llava  # noqa: E402
from tessera.interop.convert import convert  # noqa: E402
from tessera.interop.export import export_hf  # noqa: E402
from tessera.interop.hub_files import read_weights, write_weights  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

ATOL = 1e-4
NEW_TOKENS = 20
LLAVA_TEMPLATE = (  # llava-hf's llava-1.5 template
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MLLAMA_TEMPLATE = (  # Llama 3.2 Vision's layout, without the tool-calling branches
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# --- a tokenizer trained here: <pad> 0, <s> 1, </s> 2, <image> 3, ..., <|image|> = vocab (Llama 3.2's extra row) --
@pytest.fixture(scope="module")
def hf_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["USER: What is in the picture? ASSISTANT: a red square on a blue circle",
              "<|start_header_id|>user<|end_header_id|> Describe the image. <|eot_id|>"] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(["<|image|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@dataclass
class Family:
    name: str
    model: torch.nn.Module  # the transformers model
    processor: object  # the transformers processor
    directory: Path  # what save_pretrained wrote


def _llava(tmp: Path, hf_tokenizer, name: str, vision: dict, text: dict, image_processor, **llava) -> Family:
    vocab = len(hf_tokenizer)
    config = LlavaConfig(vision_config={"image_size": 8, "patch_size": 2, "hidden_size": 32, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "intermediate_size": 37, **vision},
                         text_config={"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 37,
                                      "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **text},
                         image_token_index=3, **llava)
    model = LlavaForConditionalGeneration(config)
    strategy = config.vision_feature_select_strategy
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tokenizer, patch_size=2,
                               vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=int(vision["model_type"] == "clip_vision_model"),
                               chat_template=LLAVA_TEMPLATE)
    return _save(tmp / name, name, model, processor, model.model.multi_modal_projector)


def _mllama(tmp: Path, hf_tokenizer) -> Family:
    vocab = len(hf_tokenizer) - 1  # <|image|> sits in the extra embedding rows
    config = MllamaConfig(
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 16, "num_hidden_layers": 3,
                       "num_global_layers": 2, "attention_heads": 2, "intermediate_size": 32, "vision_output_dim": 48,
                       "intermediate_layers_indices": [0, 2], "max_num_tiles": 4},
        text_config={"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 37, "cross_attention_layers": [1],
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 256,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}},
        image_token_index=vocab)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # every gate open (at zero they hide the cross-attention and tile paths), each different
        gates = [p for name, p in model.named_parameters() if "gate" in name.rsplit(".", 1)[-1]]
        assert len(gates) == 3 + 2 * 2 + 2  # positional, pre/post-tile; 2 global layers; the cross-attention layer
        for k, gate in enumerate(gates):
            gate.fill_(0.3 + 0.1 * k)
    image_processor = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                chat_template=MLLAMA_TEMPLATE)
    return _save(tmp / "mllama", "mllama", model, processor, model.model.multi_modal_projector)


def _save(directory: Path, name: str, model, processor, projector) -> Family:
    with torch.no_grad():
        # transformers starts biases at 0 and norms at 1: jitter every weight so a dropped bias (Qwen2's q/k/v,
        # the projector's) or a swapped norm shows in the logits
        for param_name, param in model.named_parameters():
            if "gate" not in param_name.rsplit(".", 1)[-1]:
                param.add_(torch.randn_like(param) * 0.1)
        for param in projector.parameters():
            param.normal_(std=0.5)
    model.config._attn_implementation = "eager"
    for sub in ("vision_config", "text_config"):
        getattr(model.config, sub)._attn_implementation = "eager"
    model.eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Family(name, model, processor, directory)


FAMILIES = ("llava-clip-llama", "llava-siglip-qwen2", "llava-clip-mistral", "mllama")


@pytest.fixture(scope="module")
def families(tmp_path_factory, hf_tokenizer) -> dict[str, Family]:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("hf")
    clip_crop = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return {
        "llava-clip-llama": _llava(tmp, hf_tokenizer, "llava-clip-llama", {"model_type": "clip_vision_model"},
                                   {"model_type": "llama"}, clip_crop, vision_feature_layer=-2),
        "llava-siglip-qwen2": _llava(tmp, hf_tokenizer, "llava-siglip-qwen2", {"model_type": "siglip_vision_model"},
                                     {"model_type": "qwen2", "tie_word_embeddings": True},
                                     SiglipImageProcessorPil(size={"height": 8, "width": 8}),
                                     vision_feature_layer=-1, vision_feature_select_strategy="full"),
        # a sliding window shorter than the prompt, a list of feature layers, the "full" strategy, LLaVA's pad
        "llava-clip-mistral": _llava(tmp, hf_tokenizer, "llava-clip-mistral",
                                     {"model_type": "clip_vision_model", "num_hidden_layers": 3, "hidden_act": "gelu"},
                                     {"model_type": "mistral", "sliding_window": 12},
                                     LlavaImageProcessorPil(size={"shortest_edge": 8},
                                                            crop_size={"height": 8, "width": 8}, do_pad=True),
                                     vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"),
        "mllama": _mllama(tmp, hf_tokenizer),
    }


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in ((20, 13, 3), (9, 40, 3),
                                                                                        (33, 33, 3))]


def _conversations(images, answer: bool = False):
    """Two conversations of different lengths; the first has two images, the second one."""
    first = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    second = [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                           {"type": "image", "image": images[2]}]}]
    if answer:
        first.append({"role": "assistant", "content": [{"type": "text", "text": "a red square"}]})
    return [first, second]


def _hf_inputs(family: Family, conversations, padding_side: str):
    family.processor.tokenizer.padding_side = padding_side
    return family.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt",
                                                processor_kwargs={"padding": True})


def _tessera_inputs(processor: Processor, conversations, padding_side: str):
    batch = processor(conversations, add_generation_prompt=True, padding_side=padding_side)
    batch.pop("labels")
    return batch


@pytest.fixture(scope="module")
def imported(families):
    return {name: (MultimodalLM.from_pretrained(f.directory), Processor.from_pretrained(f.directory))
            for name, f in families.items()}


def _both_batches(name, families, imported, padding_side: str):
    """The two test conversations through tessera's processor and through transformers' (tessera's model too)."""
    family, (model, processor) = families[name], imported[name]
    conversations = _conversations(_images())
    return family, model, _tessera_inputs(processor, conversations, padding_side), \
        _hf_inputs(family, conversations, padding_side)


# --- import: the processor's output and the logits -------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_processor_matches_transformers(name, families, imported):
    _, _, ours, theirs = _both_batches(name, families, imported, "right")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    pixels = theirs["pixel_values"]
    if name == "mllama":  # transformers packs (batch, images, tiles, ...); tessera lists the real images
        pixels = torch.cat([pixels[0, :2], pixels[1, :1]])
        assert ours["aspect_ratio_ids"].tolist() == [*theirs["aspect_ratio_ids"][0].tolist(),
                                                     theirs["aspect_ratio_ids"][1, 0].item()]
    torch.testing.assert_close(ours["pixel_values"], pixels, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_string_content_and_data_records_reach_an_imported_template(name, imported, tmp_path):
    """llava-hf's templates loop over a message's parts, so a string content (what OpenAI clients send, and what a
    data record holds) rendered as nothing; and a record's `<image>` placeholder reached Llama 3.2 Vision's
    template as text, not as its `<|image|>`: eval on an imported checkpoint skipped or refused every record."""
    from tessera.data.records import load_examples

    _, processor = imported[name]
    text = "What is in the picture?"
    as_string, _, _ = processor.encode([{"role": "user", "content": text}], add_generation_prompt=True, labels=False)
    as_part, _, _ = processor.encode([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                     add_generation_prompt=True, labels=False)
    assert as_string == as_part and len(as_string) > 8
    _images()[0].save(tmp_path / "a.png")
    record = {"id": "r", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                           {"role": "assistant", "content": "a red square"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    examples, report = load_examples(tmp_path / "data.jsonl", processor, strict=True)
    ids = examples[0].input_ids
    assert ids.count(processor.image_token_id) == processor.config.image_seq_length
    assert any(label != -100 for label in examples[0].labels)  # the answer is there to learn


@pytest.mark.parametrize("name, size, words", [
    ("llava-clip-llama", (4_000_000, 1), "resizing its shortest edge to 8 would make it 32000000x8 = 256000000"),
    ("llava-clip-llama", (3, 10_000), "resizing its shortest edge to 8 would make it 8x26666 = 213328"),
    ("llava-clip-mistral", (9000, 100), "padding it to a square would make it 9000x9000 = 81000000"),
])
def test_image_processing_refuses_an_image_a_step_would_blow_up(name, size, words, imported):
    """A thin image has few pixels, but LLaVA's square padding or CLIP's shortest-edge resize (which scales the
    long side up with the short one) would build one of gigabytes: refused first, naming both sizes."""
    _, processor = imported[name]
    with pytest.raises(DataError) as excinfo:
        processor.check_image_size(*size, max_pixels=200_000)
    assert f"the image is {size[0]}x{size[1]}; {words}" in str(excinfo.value)
    with pytest.raises(DataError, match=words):  # preprocessing itself checks before allocating
        processor.preprocess_image(Image.new("RGB", size), max_pixels=200_000)
    # ordinary images pass: a 4096x3072 photo, the encoder's size, a single pixel; the tile canvas is bounded
    for ok_name, ok_size in [(name, (4096, 3072)), (name, (336, 336)), (name, (1, 1)), ("mllama", size)]:
        imported[ok_name][1].check_image_size(*ok_size, max_pixels=4096 * 4096)


def _alone(family: Family, padding_side: str):
    """Transformers' inputs for each test conversation on its own (no batch-mates, no padding)."""
    return [_hf_inputs(family, [conversation], padding_side) for conversation in _conversations(_images())]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, families, imported, linear_route):
    """Each sample of tessera's batch gives the logits transformers gives it alone (and in the batch, but for
    Llama 3.2 Vision, whose padded batch lets text before a sample's first image attend to the blank padding
    images of the batch's other slots; tessera keeps every sample independent of its batch-mates)."""
    family, model, ours, theirs = _both_batches(name, families, imported, "right")
    with torch.no_grad():
        got = model(**ours).logits
        for i, alone in enumerate(_alone(family, "right")):
            expected = family.model(**alone).logits[0]
            assert (got[i, :len(expected)] - expected).abs().max() <= ATOL, i
        if name != "mllama":
            batched = family.model(**theirs).logits
            assert (got - batched).abs()[theirs["attention_mask"].bool()].max() <= ATOL


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_transformers(name, families, imported, linear_route):
    """tessera's batch generates, sample by sample, what transformers generates for each sample alone."""
    family, model, ours, _ = _both_batches(name, families, imported, "left")
    family.model.generation_config.eos_token_id = None  # 20 tokens on both sides, whatever a random model writes
    family.model.generation_config.pad_token_id = 0
    expected = []
    with torch.no_grad():
        for alone in _alone(family, "left"):
            tokens = family.model.generate(**alone, max_new_tokens=NEW_TOKENS, do_sample=False)
            expected.append(tokens[0, alone["input_ids"].shape[1]:].tolist())
    got = model.generate(**ours, max_new_tokens=NEW_TOKENS, eos_token_id=[], suppress_token_ids=())
    assert got.sequences == expected


def test_a_llama_vision_sample_does_not_depend_on_its_batch_mates(families, imported):
    """A text-only prompt, a one-image and a two-image prompt batched together give each what they give alone:
    the padding image slots of a sample with fewer images are seen by none of its tokens."""
    model, processor = imported["mllama"]
    images = _images()
    conversations = [[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
                     [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                                   {"type": "image", "image": images[2]}]}],
                     _conversations(images)[0]]
    batched = model.generate(**_tessera_inputs(processor, conversations, "left"), max_new_tokens=8,
                             eos_token_id=[], suppress_token_ids=()).sequences
    for conversation, tokens in zip(conversations, batched):
        alone = model.generate(**_tessera_inputs(processor, [conversation], "left"), max_new_tokens=8,
                               eos_token_id=[], suppress_token_ids=()).sequences[0]
        assert tokens == alone, conversation


# --- export ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_transformers_with_the_same_logits(name, families, tmp_path):
    family = families[name]
    checkpoint = convert(family.directory, tmp_path / "tessera")
    out = export_hf(checkpoint, tmp_path / "hf")
    reloaded_cls = type(family.model)
    reloaded = reloaded_cls.from_pretrained(out, attn_implementation="eager").eval()
    processor = type(family.processor).from_pretrained(out)
    conversations = _conversations(_images())
    inputs = _hf_inputs(family, conversations, "right")
    family.processor.tokenizer.padding_side = processor.tokenizer.padding_side = "right"
    again = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
    assert again["input_ids"].tolist() == inputs["input_ids"].tolist()  # tokenizer, template and image settings
    with torch.no_grad():
        expected = family.model(**inputs).logits
        got = reloaded(**inputs).logits
    assert (got - expected).abs()[inputs["attention_mask"].bool()].max() <= ATOL


def test_a_tessera_trained_llava_exports_and_transformers_agrees(tmp_path):
    config = tiny_config("unified", vision_feature_layer=[-2, -1])
    config.vision.pre_layernorm = True  # CLIP's layout: a CLS token and a pre-norm (tessera's patch bias is folded)
    model = _save_tessera(tmp_path, config)
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    theirs = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, *[3] * model.config.num_feature_tokens, 7, 8]])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        diff = (theirs(input_ids=ids, pixel_values=pixels).logits - model(ids, pixel_values=pixels).logits).abs()
    assert diff.max() <= ATOL
    # the exported tokenizer, chat template and image settings give what tessera's processor gives
    ours = Processor.from_pretrained(tmp_path / "ck")
    image, text = (lambda i: {"type": "image", "image": _images()[i]}), (lambda t: {"type": "text", "text": t})
    for parts in ([image(0), text("what colour is the square")],  # each image on its own line, as in training
                  [image(0), image(1), text("\nwhich is bigger")],
                  [text("compare"), image(0), text("with"), image(1)]):
        conversation = [{"role": "user", "content": parts}]
        expected = ours([conversation], add_generation_prompt=True)
        got = LlavaProcessor.from_pretrained(out).apply_chat_template([conversation], add_generation_prompt=True,
                                                                      tokenize=True, return_dict=True,
                                                                      return_tensors="pt")
        assert got["input_ids"].tolist() == expected["input_ids"].tolist(), parts
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pre_layernorm, projector, encoder, field", [
    (False, "mlp", "vit", "vision.use_cls_token=True with vision.pre_layernorm=False"),  # tessera's default ViT
    (True, "linear", "vit", "fusion.projector='linear'"),
    (True, "mlp", "none", "vision.encoder='none'"),  # Fuyu's: no tower
])
def test_export_refuses_a_part_transformers_lacks(tmp_path, pre_layernorm, projector, encoder, field):
    config = tiny_config("unified", projector=projector)
    config.vision.pre_layernorm = pre_layernorm
    config.vision.encoder = encoder
    _save_tessera(tmp_path, config)
    with pytest.raises(ConfigError, match=field):
        export_hf(tmp_path / "ck", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_flamingo_style_cross_attention(tmp_path, capsys):
    _save_tessera(tmp_path, tiny_config("cross"))
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "hf"), "--format", "hf"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "MllamaForConditionalGeneration" in error
    assert f"{tmp_path / 'ck'}: vision.encoder='vit'" in error  # which checkpoint, as the hybrid's refusal says


def _save_tessera(tmp_path, config) -> MultimodalLM:
    """A tessera checkpoint (random weights, nonzero biases) with tessera's own processor."""
    tokenizer = train_tokenizer(["what colour is the square", "red"] * 20, vocab_size=300)
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=300))
    model = MultimodalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    model.save_pretrained(tmp_path / "ck")
    Processor.for_model(config, tokenizer).save_pretrained(tmp_path / "ck")
    return model


# --- the switches the imports added to tessera's parts ------------------------------------------------------------
@pytest.mark.parametrize("build, words", [
    (lambda: FusionConfig(cross_attention_placement="after"), ["fusion.cross_attention_placement='after'",
                                                               "'before', 'replace'"]),
    (lambda: FusionConfig(cross_attention_blind_rows="mask"), ["fusion.cross_attention_blind_rows='mask'",
                                                               "'skip', 'attend_all'"]),
    (lambda: VisionConfig(encoder="perceiver"), ["vision.encoder='perceiver'", "'vit', 'tiled'"]),
    (lambda: VisionConfig(encoder="tiled", num_layers=2, intermediate_layers=[2]),
     ["vision.intermediate_layers=[2]", "0..1"]),
    (lambda: TextConfig(rope_scaling={"rope_type": "yarn"}), ["text.rope_scaling.rope_type='yarn'", "'llama3'"]),
    (lambda: TextConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["'low_freq_factor'"]),
    (lambda: ModelConfig(vision=VisionConfig(encoder="tiled"), fusion="unified"),
     ["vision.encoder='tiled'", "fusion.method='cross'"]),
])
def test_new_switches_are_validated(build, words):
    with pytest.raises(ConfigError) as error:
        build()
    assert all(word in str(error.value) for word in words), str(error.value)


# --- the CLI on an imported checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llava-clip-llama", "mllama"])
def test_convert_then_generate_from_the_command_line(name, families, imported, tmp_path, capsys):
    family = families[name]
    assert main(["convert", str(family.directory), str(tmp_path / "ck")]) == 0
    image = tmp_path / "picture.png"
    _images()[0].save(image)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--image", str(image), "--prompt",
                 "What is in the picture?", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    model, processor = imported[name]
    message = processor.user_message("What is in the picture?", 1)
    batch = processor([[message]], [[image]], add_generation_prompt=True, padding_side="left")
    batch.pop("labels")
    assert printed == model.generate(**batch, max_new_tokens=5, tokenizer=processor).texts[0] + "\n"


@pytest.mark.parametrize("name", ["llava-clip-llama", "mllama"])
def test_serve_an_imported_checkpoint(name, families, imported):
    """The server answers as the model does in-process, one request at a time and batched: for Llama 3.2 Vision
    each image's tile arrangement (aspect-ratio id) must reach the model with its tiles."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    from tessera.serve import ServeSettings
    from tests.test_serve import running_server

    model, processor = imported[name]
    images = _images()  # three shapes: a different tile arrangement each

    def data_url(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def request(i):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[i])}},
                                             {"type": "text", "text": f"What is in picture {i}?"}]}]

    def expected(i):
        message = processor.user_message(f"What is in picture {i}?", 1)
        batch = processor([[message]], [[images[i]]], add_generation_prompt=True, padding_side="left")
        batch.pop("labels")
        return model.generate(**batch, max_new_tokens=6, tokenizer=processor).texts[0]

    settings = ServeSettings(checkpoint=str(families[name].directory), served_model_name="m", max_batch=4,
                             max_images_per_prompt=1)
    with running_server(settings) as server:
        client = server.client()

        def ask(i):
            result = client.chat.completions.create(model="m", messages=request(i), max_tokens=6, temperature=0)
            return result.choices[0].message.content

        answers = [expected(i) for i in range(len(images))]
        assert [ask(i) for i in range(len(images))] == answers
        assert server.engine.stats["largest_batch"] == 1
        each_twice = [i for i in range(len(images)) for _ in range(2)]
        with ThreadPoolExecutor(len(each_twice)) as pool:
            assert list(pool.map(ask, each_twice)) == [answers[i] for i in each_twice]
        assert server.engine.stats["largest_batch"] > 1  # different tile arrangements shared forward passes
        assert len(set(answers)) > 1  # the images are seen


def _ask(server, messages) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=60)


def test_serve_refuses_the_image_token_typed_as_text_and_reads_other_special_tokens_as_text(families):
    """The processor's image token typed as text ("<|image|>" for Llama 3.2 Vision) is a 400 naming the message,
    found before the request reaches the model, instead of a 500 for it and every request batched with it; in the
    words tessera's own "<image>" gets (test_serve). Any other special token of the imported tokenizer (its EOS
    here: an HTML strikethrough closes with it) is read as the characters it is, so it can neither end the turn nor
    forge another; tessera's own tokens are plain text to this tokenizer anyway."""
    from tessera.serve import ServeSettings
    from tests.test_serve import assert_error, data_url, png_bytes, running_server

    png = data_url(png_bytes(1))
    with running_server(ServeSettings(checkpoint=str(families["mllama"].directory), served_model_name="m")) as s:
        assert_error(_ask(s, [{"role": "user", "content": "what is <|image|> this?"}]), 400, "messages[0].content",
                     "messages[0].content contains the image token '<|image|>', which stands for an image; send "
                     "images as image_url parts, not as text")
        both = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}},
                                             {"type": "text", "text": "<|image|> what?"}]}]
        assert_error(_ask(s, both), 400, "messages[0].content[1].text", "the image token '<|image|>'")
        assert s.engine.stats["prefills"] == 0  # nothing reached the model
        typed = [{"role": "user", "content": "is <s>this</s> struck?"}]
        response = _ask(s, typed)
        assert response.status_code == 200, response.text
        ids, _, _ = s.engine.processor.encode(typed, add_generation_prompt=True)
        eos = s.engine.processor.end_token_id
        assert response.json()["usage"]["prompt_tokens"] == len(ids) and eos not in ids
        assert _ask(s, [{"role": "user", "content": "what is <|user|> this?"}]).status_code == 200


def test_serve_refuses_a_conversation_the_chat_template_rejects(families, tmp_path):
    """A chat template's raise_exception ("roles must alternate", as Mistral's and Llama 2's templates say) is a 400
    with the template's words and param "messages", not an opaque 500 the openai client retries."""
    from tessera.serve import ServeSettings
    from tests.test_serve import assert_error, running_server

    alternating = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "alternating")
    template = alternating / "chat_template.jinja"
    template.write_text("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                        "{% endif %}{% endfor %}" + template.read_text())
    with running_server(ServeSettings(checkpoint=str(alternating), served_model_name="m")) as s:
        twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        assert_error(_ask(s, twice), 400, "messages",
                     "chat template: Conversation roles must alternate user/assistant/user/assistant/...")
        with pytest.raises(openai.BadRequestError, match="roles must alternate"):
            s.client().chat.completions.create(model="m", messages=[{"role": "system", "content": "a"}, *twice[:1]])
        assert s.client().chat.completions.create(model="m", messages=twice[:1], max_tokens=2).choices


def test_serve_refuses_a_template_that_drops_an_image(imported):
    """A chat template that renders no image marker for an image part: 400 before the model's token count check."""
    from tessera.serve.protocol import APIError, encode_prompt, parse_chat_request

    _, processor = imported["llava-clip-llama"]
    blind = copy.copy(processor)
    blind.config = dataclasses.replace(processor.config, chat_template="{% for m in messages %}{{ m['role'] }}: "
                                       "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}\n{% endfor %}")
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                                      {"type": "text", "text": "what?"}]}]}
    with pytest.raises(APIError) as error:
        encode_prompt(parse_chat_request(body, "m", 1, 1), blind, 256)
    assert (error.value.status, error.value.param) == (400, "messages")
    assert "put 0 image placeholder(s) in the prompt for 1 image_url part(s)" in error.value.message


def test_labels_cover_the_answer_only(imported):
    _, processor = imported["llava-clip-llama"]
    conversation = _conversations(_images(), answer=True)[0]
    ids, labels, _ = processor.encode(conversation)
    answer = [i for i, label in zip(ids, labels) if label != -100]
    assert processor.decode(answer).strip() == "a red square"


# --- unsupported input: one line naming what is wrong --------------------------------------------------------------
def _copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_unknown_architecture_is_named(families, tmp_path, capsys):
    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="Qwen2VLForConditionalGeneration.*LlavaForConditionalGeneration"):
        MultimodalLM.from_pretrained(directory)
    assert main(["convert", str(directory), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Qwen2VLForConditionalGeneration" in error


@pytest.mark.parametrize("name, change, words", [
    ("llava-clip-llama", {"text_config": {"hidden_size": "x"}}, "text_config.hidden_size='x': expected a positive"),
    ("llava-clip-llama", {"vision_config": [1]}, "vision_config=[1]: expected an object or null"),
    ("llava-clip-llama", {"architectures": -1}, "architectures=-1; expected a list of class names"),
    ("mllama", {"vision_config": {"intermediate_layers_indices": None}},
     "vision_config.intermediate_layers_indices=None: expected a list of integers"),
    ("mllama", {"text_config": {"cross_attention_layers": []}},  # was read as the 11B's [3, 8, …, 38]
     "cross_attention_layers"),
    # each named by its key path in the file, not as a TypeError (…for //: 'str' and 'int') or by tessera's field
    ("llava-clip-llama", {"text_config": {"hidden_size": [512]}}, "text_config.hidden_size=[512]: expected a"),
    ("llava-clip-llama", {"text_config": {"num_hidden_layers": "2"}},  # was "text.num_layers='2'"
     "text_config.num_hidden_layers='2': expected a positive integer"),
    ("llava-clip-llama", {"vision_config": {"num_attention_heads": "4"}},  # was "vision.num_heads='4'"
     "vision_config.num_attention_heads='4': expected a positive integer"),
    ("llava-clip-llama", {"vision_config": {"hidden_act": ["gelu"]}},  # was "unhashable type: 'list'"
     "vision_config.hidden_act=['gelu']: expected a string"),
    ("llava-clip-llama", {"text_config": {"rms_norm_eps": [1e-5]}},
     "text_config.rms_norm_eps=[1e-05]: expected a number"),
    ("llava-clip-llama", {"text_config": {"num_attention_heads": 0}},  # was a ZeroDivisionError traceback
     "text_config.num_attention_heads=0: expected a positive integer"),
    ("llava-clip-llama", {"vision_feature_layer": "-2"},  # was "fusion.vision_feature_layer='-2'"
     "config.json.vision_feature_layer='-2': expected an integer or a list of integers"),
    ("mllama", {"text_config": {"rope_parameters": {"rope_type": "llama3", "factor": "8"}}},
     "text_config.rope_parameters.factor='8': expected a number"),
])
def test_a_config_value_of_the_wrong_kind_is_one_line_naming_the_file_and_key(families, tmp_path, capsys, name,
                                                                               change, words):
    """A wrongly typed config.json value crashed with a traceback (TypeError: unsupported operand type(s) for //;
    AttributeError: 'list' object has no attribute 'get'), then was one line naming the file but not the key."""
    directory = _copy_checkpoint(families[name].directory, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (directory / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(directory), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{directory / 'config.json'}" in error and words in error


@pytest.mark.parametrize("where, edit", [("text_config", {"tie_word_embeddings": "false"}),
                                         ("generation_config", {"eos_token_id": "2"})])
def test_a_flag_or_id_written_as_text_is_named_not_taken(families, tmp_path, where, edit):
    """"false" is truthy: text_config.tie_word_embeddings="false" imported as tied (and a checkpoint storing
    lm_head.weight then lost it); a generation_config.json EOS of "2" was blamed on config.json."""
    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    file = directory / ("config.json" if where == "text_config" else "generation_config.json")
    settings = json.loads(file.read_text())
    (settings["text_config"] if where == "text_config" else settings).update(edit)
    file.write_text(json.dumps(settings))
    key, value = next(iter(edit.items()))
    path = f"{file}.text_config" if where == "text_config" else str(file)
    with pytest.raises(ConfigError, match=re.escape(f"{path}.{key}={value!r}: expected")):
        MultimodalLM.from_pretrained(directory)


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_sharded_checkpoints_load_and_a_missing_shard_is_named(families, imported, tmp_path, layout):
    """In transformers' current layout (model.language_model…) and in the one older checkpoints such as
    llava-1.5-7b-hf keep (language_model.model…), which tessera renames on import."""
    family = families["llava-clip-llama"]
    directory = _copy_checkpoint(family.directory, tmp_path / "hf")
    tensors, _ = read_weights(directory)
    (directory / "model.safetensors").unlink()
    # the fixture's files hold the legacy names (checked below)
    names = llava.current_names(list(tensors)) if layout == "current" else {name: name for name in tensors}
    write_weights({names[name]: t for name, t in tensors.items()}, directory, max_shard_bytes=40_000)
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    sharded = MultimodalLM.from_pretrained(directory)
    reference, _ = imported["llava-clip-llama"]
    for (name, a), b in zip(sharded.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    # a tensor's fault is named in the shard that holds it, not only in the index
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    name = next(n for n in index["weight_map"] if n.endswith("layers.1.mlp.down_proj.weight"))
    assert name.startswith("model.language_model." if layout == "current" else "language_model.model."), name
    holder = directory / index["weight_map"][name]
    held = load_file(str(holder))
    save_file({**held, name: held[name][:-1], "model.extra.weight": torch.zeros(2)}, str(holder))
    index["weight_map"]["model.extra.weight"] = holder.name
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(holder))}: tensor '{name}' has shape"):
        MultimodalLM.from_pretrained(directory)
    save_file({**held, "model.extra.weight": torch.zeros(2)}, str(holder))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(holder))}: unexpected tensor 'model.extra.weight'"):
        MultimodalLM.from_pretrained(directory)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}: missing shard"):
        MultimodalLM.from_pretrained(directory)


def test_a_wrong_shaped_tensor_is_named(families, tmp_path):
    directory = _copy_checkpoint(families["mllama"].directory, tmp_path / "hf")
    tensors, _ = read_weights(directory)
    name = "language_model.model.layers.1.cross_attn.k_proj.weight"  # as transformers saves it
    tensors[name] = tensors[name][:-1]
    write_weights(tensors, directory)
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(15, 32\); config.json implies \(16, 32\)"):
        MultimodalLM.from_pretrained(directory)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(projector_hidden_act="relu"), "projector_hidden_act='relu'"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "text_config.hidden_act='gelu'"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='yarn'"),
    (lambda c: c["vision_config"].update(model_type="dinov2"), "vision_config.model_type='dinov2'"),
])
def test_a_config_field_tessera_cannot_honour_is_named(families, tmp_path, edit, words):
    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as error:
        MultimodalLM.from_pretrained(directory)
    message = str(error.value)
    assert words in message and "config.json" in message and "\n" not in message


def test_pickle_weights_are_refused(families, tmp_path):
    directory = _copy_checkpoint(families["llava-clip-llama"].directory, tmp_path / "hf")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        MultimodalLM.from_pretrained(directory)



def test_continuous_batching_of_llama_3_2_vision_answers_as_alone(imported):
    """Llama 3.2 Vision requests — images of different tile arrangements, and none — join a running batch at
    different decode steps and leave it at different lengths (the image keys/values are padded and trimmed per row,
    tile by tile); each answers as `generate` alone (tests/test_serve_batching.py has the general properties)."""
    from tessera.serve.engine import Engine, Job
    from tests.test_serve_batching import alone, drive

    model, processor = imported["mllama"]
    images = _images()
    requests = []
    for i in range(6):
        image = images[i % 3] if i % 4 != 3 else None
        message = processor.user_message(f"What is in picture {i}?", 0 if image is None else 1)
        ids = processor.encode([message], add_generation_prompt=True)[0]
        pixels = [] if image is None else [processor.preprocess_image(image)]
        params = [model.sampling_params(max_new_tokens=3 + 2 * i)]
        requests.append((f"r{i}", ids, pixels, params))
    engine = Engine(model, processor, max_batch=3)
    arrivals = {}
    for step, request in zip([0, 0, 1, 3, 4, 9], requests):
        arrivals.setdefault(step, []).append(lambda r=request: Job(*r))
    results = drive(engine, arrivals)
    for job_id, ids, pixels, params in requests:
        _, reason, text = alone(model, processor, ids, pixels, params[0])
        assert results[job_id] == [(text, reason)], job_id
    assert engine.stats["joined_rows"] >= 3 and engine.stats["largest_batch"] == 3
