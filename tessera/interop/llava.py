"""LlavaForConditionalGeneration ↔ a Method A (`fusion="unified"`) MultimodalLM.

LLaVA is the article's unified-embedding decoder as transformers builds it: a CLIP or SigLIP tower, hidden states
taken from `vision_feature_layer` (one index or a list concatenated on channels; "default" drops CLS, "full"
keeps it), a Linear → GELU → Linear projector, and a Llama, Mistral or Qwen2 decoder reading the image features in
place of the `<image>` tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.config import FusionConfig, ModelConfig
from tessera.errors import ConfigError
from tessera.interop.hub_files import FLAG, INTEGER, INTEGERS, NULL, OBJECT, TEXT, checked
from tessera.interop.name_map import Rule, linear, rename_keys
from tessera.interop.text_models import (
    decoder_rules, model_config, special_ids, text_config_from_hf, text_config_to_hf,
)
from tessera.interop.vision_towers import (
    identity_post_norm, tower_config_from_hf, tower_config_to_hf, tower_rules, unread_tower_tensors,
)

ARCHITECTURE = "LlavaForConditionalGeneration"
TOWER, PROJECTOR, DECODER, LM_HEAD = "model.vision_tower", "model.multi_modal_projector", "model.language_model", \
    "lm_head.weight"
# LlavaConfig's default tower when config.json gives none: CLIP ViT-L/14 at 336 px
DEFAULT_TOWER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14)
# transformers writes checkpoints in its older module layout (as the hub's were saved); tessera maps both.
LEGACY_NAMES = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", f"{DECODER}."),
    (r"^vision_tower\.vision_model\.", f"{TOWER}."),
    (r"^vision_tower\.", f"{TOWER}."),
    (r"^multi_modal_projector\.", f"{PROJECTOR}."),
]
# the kinds of value config.json's own keys hold (text_config and vision_config are checked by their readers)
KINDS = dict(vision_config=(OBJECT, NULL), text_config=(OBJECT, NULL), projector_hidden_act=(TEXT,),
             vision_feature_select_strategy=(TEXT,), vision_feature_layer=(INTEGER, INTEGERS),
             multimodal_projector_bias=(FLAG,), image_token_index=(INTEGER,), image_token_id=(INTEGER,),
             tie_word_embeddings=(FLAG,), pad_token_id=(INTEGER, NULL))


def config_from_hf(hf: dict[str, Any], where: str, generation: dict[str, Any]) -> ModelConfig:
    """config.json (and generation_config.json, whose EOS list transformers' generate stops on) → ModelConfig."""
    checked(hf, KINDS, where)
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{where}.projector_hidden_act={act!r}: tessera's projector uses GELU; expected 'gelu'")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{where}.vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'")
    vision_hf = hf.get("vision_config")
    vision = tower_config_from_hf(vision_hf, f"{where}.vision_config",
                                  defaults=DEFAULT_TOWER if (vision_hf or {}).get("model_type", "clip_vision_model")
                                  == "clip_vision_model" else None)
    if strategy == "default" and not vision.use_cls_token:
        raise ConfigError(f"{where}.vision_feature_select_strategy='default' with a SigLIP tower: transformers would "
                          f"drop the first patch (there is no CLS token); tessera expects 'full'")
    text_hf = hf.get("text_config") or {}
    if hf.get("tie_word_embeddings"):  # older LLaVA configs keep the flag at the top level
        text_hf = {**text_hf, "tie_word_embeddings": True}
    text = text_config_from_hf(text_hf, f"{where}.text_config")
    fusion = FusionConfig(method="unified", projector="mlp", projector_bias=hf.get("multimodal_projector_bias", True),
                          vision_feature_layer=hf.get("vision_feature_layer", -2),
                          vision_feature_select_strategy=strategy)
    pad, eos = special_ids(text_hf, generation)
    image_token_id = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return model_config(vision, text, fusion, image_token_id, hf.get("pad_token_id") if pad is None else pad, eos,
                        where)


def current_names(names: list[str]) -> dict[str, str]:
    return rename_keys(names, LEGACY_NAMES)


def weight_rules(config: ModelConfig) -> list[Rule]:
    text, width = config.text, config.image_feature_width
    rules = tower_rules(config.vision, TOWER)
    bias = config.fusion.projector_bias
    rules += linear("projector.linear_1", f"{PROJECTOR}.linear_1", text.hidden_size, width, bias)
    rules += linear("projector.linear_2", f"{PROJECTOR}.linear_2", text.hidden_size, text.hidden_size, bias)
    rules += decoder_rules(text, DECODER, LM_HEAD, range(text.num_layers))
    return rules


def unread(names: list[str], config: ModelConfig) -> list[str]:
    ignored = unread_tower_tensors(names, TOWER)
    if config.text.tie_word_embeddings and LM_HEAD in names:  # some tied checkpoints store the copy anyway
        ignored.append(LM_HEAD)
    return ignored


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    if config.fusion.method != "unified":
        raise ConfigError(f"fusion.method={config.fusion.method!r}: LlavaForConditionalGeneration is Method A; "
                          f"expected 'unified'")
    if config.vision.encoder != "vit":  # Fuyu's encoder-free model has its own class, with another LLM
        raise ConfigError(f"vision.encoder={config.vision.encoder!r}: LlavaForConditionalGeneration reads images "
                          f"through a ViT tower; expected 'vit'")
    if config.fusion.projector != "mlp":
        raise ConfigError(f"fusion.projector={config.fusion.projector!r}: LLaVA's projector is Linear → GELU → "
                          f"Linear; no transformers equivalent for a single Linear (expected 'mlp')")
    text = text_config_to_hf(config.text)
    text.update(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    return {
        "architectures": [ARCHITECTURE], "model_type": "llava",
        "vision_config": tower_config_to_hf(config.vision), "text_config": text,
        "image_token_index": config.image_token_id, "image_seq_length": config.num_feature_tokens,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": config.fusion.projector_bias,
        "vision_feature_layer": config.fusion.vision_feature_layer,
        "vision_feature_select_strategy": config.fusion.vision_feature_select_strategy,
        "tie_word_embeddings": config.text.tie_word_embeddings,
    }


def export_extras(config: ModelConfig) -> dict[str, torch.Tensor]:
    return identity_post_norm(config.vision, TOWER)
