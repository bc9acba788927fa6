"""Export: a tessera checkpoint → a directory transformers loads (`from_pretrained`) as
LlavaForConditionalGeneration (Method A) or MllamaForConditionalGeneration (Method B).

Only where the architectures agree exactly: a part transformers has no equivalent for (a ViT with a CLS token but
no pre-norm, a single-Linear projector for LLaVA, Flamingo-style cross-attention blocks *before* their layer, …)
is refused with its config field named. Two differences are bridged exactly: a zero bias stands in for a missing
one, and a patch-embedding bias is folded into the patch position embeddings (CLIP's patch convolution has none;
both are added to every patch token).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tessera.config import ModelConfig
from tessera.errors import ConfigError
from tessera.interop import llava, mllama
from tessera.interop.hub_files import GENERATION_CONFIG_NAME, output_directory, read_json, write_json, write_weights
from tessera.interop.name_map import export_weights
from tessera.model import MultimodalLM
from tessera.processor import Processor, checkpoint_model_config
from tessera.text.tokenizer import BEGIN, END, IMAGE, PAD

# tessera's own chat template (processor.py) in Jinja, for models trained with tessera's processor: what follows an
# image part starts on a new line (`join_parts`)
TESSERA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% set after_image = loop.previtem is defined and loop.previtem['type'] == 'image' %}"
    "{% if part['type'] == 'image' %}{% if after_image %}{{ '\n' }}{% endif %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{% if after_image and not part['text'].startswith('\n') %}{{ '\n' }}{% endif %}"
    "{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def export_hf(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `checkpoint` (tessera's, or one converted from Hugging Face) in transformers' layout into `out_dir`, a
    new or empty directory (`overwrite`: or one holding another checkpoint, replaced once this one is written; see
    `output_directory`). Another model's files left beside an export would be read too: transformers prefers a
    chat_template.json or a tokenizer.model to what an export writes."""
    with output_directory(out_dir, checkpoint, "exported", overwrite) as out:
        # refused from its config, before the weights are read (a missing config.json: from_pretrained says so)
        config_file = Path(checkpoint) / "config.json"
        if config_file.is_file() and checkpoint_model_config(Path(checkpoint)).fusion.method == "hybrid":
            raise ConfigError(f"{checkpoint}: fusion.method='hybrid' (NVLM-H) has no transformers model class to "
                              f"export to (transformers has LLaVA for Method A and Mllama for Method B); expected a "
                              f"unified or cross model")
        model = MultimodalLM.from_pretrained(checkpoint)
        processor = Processor.from_pretrained(checkpoint)
        family = llava if model.config.fusion.method == "unified" else mllama
        try:  # refuses first, before anything is written
            hf_config = family.config_to_hf(model.config)
        except ConfigError as e:
            raise ConfigError(f"{checkpoint}: {e}") from None
        # the converted source's sampling settings (convert keeps its generation_config.json)
        generation = read_json(Path(checkpoint) / GENERATION_CONFIG_NAME, required=False) or {}
        config, state = hf_compatible(model)
        tensors = export_weights(state, family.weight_rules(config))
        tensors.update(family.export_extras(config))
        hf_config["dtype"] = str(model.dtype).removeprefix("torch.")
        bos = bos_token_id(processor)
        hf_config["text_config"]["bos_token_id"] = bos  # else transformers assumes its family's default
        write_weights({name: t.to(model.dtype) for name, t in tensors.items()}, out)
        write_json(out / "config.json", hf_config)
        eos = [config.eos_token_id, *config.stop_token_ids]
        # the source's sampling settings with the special ids the model now has: they may have been changed since
        write_json(out / GENERATION_CONFIG_NAME, {**generation, "bos_token_id": bos,
                                                  "eos_token_id": eos if len(eos) > 1 else eos[0],
                                                  "pad_token_id": config.pad_token_id})
        export_processor(processor, config, family, out)
    return Path(out_dir)


def bos_token_id(processor: Processor) -> int | None:
    from tessera.interop.processor import HubProcessor

    if isinstance(processor, HubProcessor):
        return processor.tokenizer.token_to_id(processor.bos_token) if processor.bos_token else None
    return processor.begin_token_id


def hf_compatible(model: MultimodalLM) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The same model with the vision switches transformers' LLaVA towers have: biases everywhere (zero where
    tessera has none) and, for a CLIP-style tower, the patch bias folded into the positions."""
    config, state = model.config, dict(model.state_dict())
    vision = config.vision
    if config.fusion.method != "unified":
        return config, state
    d = vision.hidden_size
    if not vision.attention_bias:
        for i in range(vision.num_layers):
            state[f"vision.blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d, dtype=model.dtype)
            state[f"vision.blocks.{i}.attn.out.bias"] = torch.zeros(d, dtype=model.dtype)
    clip_style = vision.use_cls_token
    if clip_style and vision.patch_bias:
        bias = state.pop("vision.patch_embedding.proj.bias")
        positions = state["vision.position_embedding"].clone()
        positions[:, 1:] += bias  # CLS (index 0) never went through the patch convolution
        state["vision.position_embedding"] = positions
    elif not clip_style and not vision.patch_bias:
        state["vision.patch_embedding.proj.bias"] = torch.zeros(d, dtype=model.dtype)
    vision = dataclasses.replace(vision, attention_bias=True, patch_bias=not clip_style)
    return dataclasses.replace(config, vision=vision), state


def export_processor(processor: Processor, config: ModelConfig, family, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja and processor_config.json (with the image
    processor inside, as transformers ≥ 5 writes it)."""
    from tessera.interop.processor import HubProcessor

    processor.tokenizer.save(str(out / "tokenizer.json"))
    if isinstance(processor, HubProcessor):  # imported: give back what came in
        settings = processor.config
        tokenizer_config = dict(settings.tokenizer_config)
        processor_config = dict(settings.processor_config)
        image_processor = dict(settings.image_processing.source)
        template = settings.chat_template
    else:
        tokenizer_config = {"bos_token": BEGIN, "eos_token": END, "pad_token": PAD}
        processor_config = {"image_token": IMAGE}
        image_processor = tessera_image_processor(processor)
        template = TESSERA_CHAT_TEMPLATE
    tokenizer_config.pop("chat_template", None)
    tokenizer_config.update(tokenizer_class="TokenizersBackend", backend="tokenizers")
    processor_config.pop("chat_template", None)
    processor_config["image_processor"] = image_processor
    if family is llava:
        processor_config.update(
            processor_class="LlavaProcessor", patch_size=config.vision.patch_size,
            vision_feature_select_strategy=config.fusion.vision_feature_select_strategy,
            num_additional_image_tokens=int(config.vision.use_cls_token))
    else:
        processor_config["processor_class"] = "MllamaProcessor"
    write_json(out / "tokenizer_config.json", tokenizer_config)
    write_json(out / "processor_config.json", processor_config)
    if template:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def tessera_image_processor(processor: Processor) -> dict[str, Any]:
    """tessera's preprocessing (bicubic squash to a square, or LLaVA-1.5's pad to a mean-colour square first) as
    transformers settings."""
    c = processor.config
    size = {"height": c.image_size, "width": c.image_size}
    settings = {"image_processor_type": "LlavaImageProcessor", "size": size, "crop_size": size,
                "do_center_crop": False, "do_resize": True, "resample": 3, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(c.image_mean),
                "image_std": list(c.image_std), "do_convert_rgb": True, "do_pad": c.resize_mode == "pad"}
    return settings
