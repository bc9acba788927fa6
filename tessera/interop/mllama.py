"""MllamaForConditionalGeneration (Llama 3.2 Vision) ↔ a Method B (`fusion="cross"`) MultimodalLM.

Llama 3.2 Vision is the article's cross-attention design: a tiled encoder (vision/tiled.py), one Linear projector,
and a Llama 3.1 decoder in which the layers listed in `cross_attention_layers` are gated cross-attention layers
instead of self-attention ones. In tessera terms: `vision.encoder="tiled"`, `fusion.projector="linear"`,
`cross_attention_placement="replace"`, `cross_attention_scope="latest"` (each `<|image|>` is seen from itself to
the next image) and `cross_attention_blind_rows="attend_all"` (transformers' treatment of text before the first
image: its mask is lifted and only its MLP branch is zeroed). One difference, chosen: in transformers' padded
batch that text also attends to the blank images padding a sample with fewer images than its batch-mates; in
tessera it sees only its own sample's images, so a sample gives the same answer batched or alone (transformers'
answer for the sample alone).
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.config import FusionConfig, ModelConfig, VisionConfig
from tessera.errors import ConfigError
from tessera.interop.hub_files import INTEGER, INTEGERS, LIST, NULL, NUMBER, OBJECT, POSITIVE, TEXT, checked
from tessera.interop.name_map import Rule, fuse, linear, norm, rename, rename_keys
from tessera.interop.text_models import (
    TEXT_KINDS, decoder_rules, mlp_rules, mllama_text_config_to_hf, model_config, special_ids, text_config_from_hf,
    with_defaults,
)
from tessera.interop.vision_towers import activation, patch_rules, square, vit_block_rules

ARCHITECTURE = "MllamaForConditionalGeneration"
VISION, PROJECTOR, DECODER, LM_HEAD = "model.vision_model", "model.multi_modal_projector", "model.language_model", \
    "lm_head.weight"
VISION_DEFAULTS = dict(hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8,
                       attention_heads=16, num_channels=3, intermediate_size=5120, vision_output_dim=7680,
                       image_size=448, patch_size=14, norm_eps=1e-5, max_num_tiles=4,
                       intermediate_layers_indices=[3, 7, 15, 23, 30], supported_aspect_ratios=None)
# the kinds of value its vision_config holds (image and patch sizes may be [h, w])
VISION_KINDS = dict(hidden_size=(POSITIVE,), hidden_act=(TEXT,), num_hidden_layers=(POSITIVE,),
                    num_global_layers=(INTEGER,), attention_heads=(POSITIVE,), num_channels=(POSITIVE,),
                    intermediate_size=(POSITIVE,), vision_output_dim=(POSITIVE,), image_size=(POSITIVE, INTEGERS),
                    patch_size=(POSITIVE, INTEGERS), norm_eps=(NUMBER,), max_num_tiles=(POSITIVE,),
                    intermediate_layers_indices=(INTEGERS,), supported_aspect_ratios=(LIST, NULL))
# the kinds of value config.json's own keys hold (text_config and vision_config are checked by their readers)
KINDS = dict(vision_config=(OBJECT, NULL), text_config=(OBJECT, NULL), image_token_index=(INTEGER,))
LEGACY_NAMES = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", f"{DECODER}."),
    (r"^vision_model\.", f"{VISION}."),
    (r"^multi_modal_projector\.", f"{PROJECTOR}."),
]


def config_from_hf(hf: dict[str, Any], where: str, generation: dict[str, Any]) -> ModelConfig:
    checked(hf, KINDS, where)
    v = with_defaults(hf.get("vision_config"), VISION_DEFAULTS, f"{where}.vision_config", VISION_KINDS)
    vision = VisionConfig(
        encoder="tiled", image_size=square(v["image_size"], f"{where}.vision_config.image_size"),
        patch_size=square(v["patch_size"], f"{where}.vision_config.patch_size"), num_channels=v["num_channels"],
        hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"], num_heads=v["attention_heads"],
        intermediate_size=v["intermediate_size"], hidden_act=activation(v["hidden_act"], f"{where}.vision_config"),
        layer_norm_eps=float(v["norm_eps"]), use_cls_token=True, attention_bias=False, patch_bias=False,
        max_num_tiles=v["max_num_tiles"], supported_aspect_ratios=v["supported_aspect_ratios"],
        num_global_layers=v["num_global_layers"], intermediate_layers=list(v["intermediate_layers_indices"]),
    )
    if v["vision_output_dim"] != vision.feature_width:
        raise ConfigError(f"{where}.vision_config.vision_output_dim={v['vision_output_dim']}: the encoder gives "
                          f"hidden_size × (1 + len(intermediate_layers_indices)) = {vision.feature_width}")
    text_hf = with_defaults(hf.get("text_config"), {"model_type": "mllama_text_model"}, f"{where}.text_config",
                            TEXT_KINDS)
    text = text_config_from_hf(text_hf, f"{where}.text_config", default_type="mllama_text_model")
    layers = text_hf.get("cross_attention_layers")
    if layers is None:  # (not `or`: an explicit [] is the file's own, and refused as such below)
        layers = [3, 8, 13, 18, 23, 28, 33, 38]  # transformers' default, the 11B's
    fusion = FusionConfig(method="cross", projector="linear", projector_bias=True, cross_attention_layers=layers,
                          cross_attention_scope="latest", cross_attention_placement="replace",
                          cross_attention_blind_rows="attend_all")
    pad, eos = special_ids(text_hf, generation)
    return model_config(vision, text, fusion, hf.get("image_token_index", 128256), pad, eos, where)


def current_names(names: list[str]) -> dict[str, str]:
    return rename_keys(names, LEGACY_NAMES)


def weight_rules(config: ModelConfig) -> list[Rule]:
    vision, text = config.vision, config.text
    cross = config.cross_attention_layers
    rules = vision_rules(vision)
    rules += linear("projector.linear_1", PROJECTOR, text.hidden_size, vision.feature_width, True)
    rules += decoder_rules(text, DECODER, LM_HEAD, [i for i in range(text.num_layers) if i not in cross])
    for i in cross:
        rules += cross_attention_rules(text, f"cross_attention.{i}", f"{DECODER}.layers.{i}")
    return rules


def vision_rules(vision: VisionConfig) -> list[Rule]:
    d, tiles, ratios = vision.hidden_size, vision.max_num_tiles, len(vision.aspect_ratios) + 1
    tokens = vision.num_patches + 1
    rules = patch_rules(vision, f"{VISION}.patch_embedding")
    rules += [
        rename("vision.cls_token", f"{VISION}.class_embedding", (d,)),
        rename("vision.position_embedding", f"{VISION}.gated_positional_embedding.embedding", (tokens, d)),
        rename("vision.position_gate", f"{VISION}.gated_positional_embedding.gate", (1,)),
        rename("vision.tile_position_embedding.weight", f"{VISION}.gated_positional_embedding.tile_embedding.weight",
               (ratios, tiles * tokens * d)),
    ]
    for ours, theirs in (("pre_tile_embedding", "pre_tile_positional_embedding"),
                         ("post_tile_embedding", "post_tile_positional_embedding")):
        rules += [rename(f"vision.{ours}.embedding.weight", f"{VISION}.{theirs}.embedding.weight", (ratios, tiles * d)),
                  rename(f"vision.{ours}.gate", f"{VISION}.{theirs}.gate", (1,))]
    rules += norm("vision.pre_norm", f"{VISION}.layernorm_pre", d)
    rules += norm("vision.post_norm", f"{VISION}.layernorm_post", d)
    names = dict(out_proj="o_proj", norms=("input_layernorm", "post_attention_layernorm"))
    for i in range(vision.num_layers):
        rules += vit_block_rules(f"vision.blocks.{i}", f"{VISION}.transformer.layers.{i}", vision, **names)
    for i in range(vision.num_global_layers):
        theirs = f"{VISION}.global_transformer.layers.{i}"
        rules += vit_block_rules(f"vision.global_blocks.{i}", theirs, vision, **names)
        rules += [rename(f"vision.global_blocks.{i}.attn_gate", f"{theirs}.gate_attn", (1,)),
                  rename(f"vision.global_blocks.{i}.mlp_gate", f"{theirs}.gate_ffn", (1,))]
    return rules


def cross_attention_rules(text, ours: str, theirs: str) -> list[Rule]:
    d, hd = text.hidden_size, text.head_dim
    q, kv = text.num_heads * hd, text.num_kv_heads * hd
    attn = f"{theirs}.cross_attn"
    return [
        *norm(f"{ours}.attn_norm", f"{theirs}.input_layernorm", d, bias=False),
        rename(f"{ours}.q_proj.weight", f"{attn}.q_proj.weight", (q, d)),
        fuse(f"{ours}.kv_proj.weight", (f"{attn}.k_proj.weight", (kv, d)), (f"{attn}.v_proj.weight", (kv, d))),
        *norm(f"{ours}.q_norm", f"{attn}.q_norm", hd, bias=False),
        *norm(f"{ours}.k_norm", f"{attn}.k_norm", hd, bias=False),
        rename(f"{ours}.o_proj.weight", f"{attn}.o_proj.weight", (d, q)),
        rename(f"{ours}.attn_gate", f"{theirs}.cross_attn_attn_gate", (1,)),
        *norm(f"{ours}.mlp_norm", f"{theirs}.post_attention_layernorm", d, bias=False),
        *mlp_rules(f"{ours}.mlp", f"{theirs}.mlp", d, text.intermediate_size),
        rename(f"{ours}.mlp_gate", f"{theirs}.cross_attn_mlp_gate", (1,)),
    ]


def unread(names: list[str], config: ModelConfig) -> list[str]:
    return []


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    vision, fusion = config.vision, config.fusion
    required = {  # field: (tessera's value, the one Llama 3.2 Vision has)
        "fusion.method": (fusion.method, "cross"), "vision.encoder": (vision.encoder, "tiled"),
        "fusion.projector": (fusion.projector, "linear"), "fusion.projector_bias": (fusion.projector_bias, True),
        "fusion.cross_attention_placement": (fusion.cross_attention_placement, "replace"),
        "fusion.cross_attention_scope": (fusion.cross_attention_scope, "latest"),
        "fusion.cross_attention_blind_rows": (fusion.cross_attention_blind_rows, "attend_all"),
        "vision.patch_bias": (vision.patch_bias, False), "vision.attention_bias": (vision.attention_bias, False),
    }
    for name, (value, wanted) in required.items():
        if value != wanted:
            raise ConfigError(f"{name}={value!r}: MllamaForConditionalGeneration has no equivalent; it needs "
                              f"{name}={wanted!r}")
    text = mllama_text_config_to_hf(config.text, config.cross_attention_layers)
    text.update(pad_token_id=config.pad_token_id, eos_token_id=[config.eos_token_id, *config.stop_token_ids])
    tessera_to_hf = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
    return {
        "architectures": [ARCHITECTURE], "model_type": "mllama", "image_token_index": config.image_token_id,
        "text_config": text,
        "vision_config": {
            "model_type": "mllama_vision_model", "hidden_size": vision.hidden_size,
            "hidden_act": tessera_to_hf[vision.hidden_act], "num_hidden_layers": vision.num_layers,
            "num_global_layers": vision.num_global_layers, "attention_heads": vision.num_heads,
            "num_channels": vision.num_channels, "intermediate_size": vision.intermediate_size,
            "vision_output_dim": vision.feature_width, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "norm_eps": vision.layer_norm_eps,
            "max_num_tiles": vision.max_num_tiles, "intermediate_layers_indices": list(vision.intermediate_layers),
            "supported_aspect_ratios": vision.aspect_ratios,
        },
    }


def export_extras(config: ModelConfig) -> dict[str, torch.Tensor]:
    return {}
