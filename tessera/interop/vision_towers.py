"""CLIP and SigLIP vision towers as tessera's `VisionEncoder`: one `VisionConfig` and one name map.

The two differ by three switches of tessera's ViT: CLIP has a CLS token, a bias-free patch convolution and a
LayerNorm before the first block; SigLIP has no CLS, a patch bias and no pre-norm. Both end in a `post_layernorm`
(and SigLIP in an attention-pooling head) that only their pooled output reads — LLaVA takes hidden states from
before it — so import leaves them out and export writes an identity norm and no head.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.config import VisionConfig
from tessera.errors import ConfigError
from tessera.interop.hub_files import INTEGERS, NUMBER, POSITIVE, TEXT, checked
from tessera.interop.name_map import Rule, fuse, linear, norm, rename

TOWER_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
# the kinds of value a CLIP or SigLIP vision_config holds (image and patch sizes may be [h, w])
TOWER_KINDS = dict(model_type=(TEXT,), hidden_size=(POSITIVE,), intermediate_size=(POSITIVE,),
                   num_hidden_layers=(POSITIVE,), num_attention_heads=(POSITIVE,), num_channels=(POSITIVE,),
                   image_size=(POSITIVE, INTEGERS), patch_size=(POSITIVE, INTEGERS), hidden_act=(TEXT,),
                   layer_norm_eps=(NUMBER,))
# transformers' ACT2FN name ↔ tessera's (only exact equivalents)
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def square(value: Any, where: str) -> int:
    """transformers allows (h, w) image and patch sizes; tessera's encoders are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}={value!r}: tessera's encoders take square sizes; expected one integer")
        value = value[0]
    return value


def activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{where}.hidden_act={name!r}: expected one of {', '.join(map(repr, ACTIVATIONS))}")
    return ACTIVATIONS[name]


def tower_config_from_hf(hf: dict[str, Any] | None, where: str, defaults: dict[str, Any] | None = None
                         ) -> VisionConfig:
    hf = checked(hf, TOWER_KINDS, where)
    model_type = hf.get("model_type", "clip_vision_model")
    if model_type not in TOWER_DEFAULTS:
        raise ConfigError(f"{where}.model_type={model_type!r}: tessera imports the vision towers "
                          f"{', '.join(map(repr, TOWER_DEFAULTS))}")
    c = {**TOWER_DEFAULTS[model_type], **(defaults or {}), **hf}
    clip = model_type == "clip_vision_model"
    return VisionConfig(
        image_size=square(c["image_size"], f"{where}.image_size"),
        patch_size=square(c["patch_size"], f"{where}.patch_size"), num_channels=c["num_channels"],
        hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], hidden_act=activation(c["hidden_act"], where),
        layer_norm_eps=float(c["layer_norm_eps"]), use_cls_token=clip, pre_layernorm=clip, attention_bias=True,
        patch_bias=not clip,
    )


def tower_config_to_hf(vision: VisionConfig) -> dict[str, Any]:
    """VisionConfig → a CLIP (CLS + pre-norm) or SigLIP (neither) tower; anything else has no equivalent."""
    if vision.encoder != "vit":
        raise ConfigError(f"vision.encoder={vision.encoder!r}: LLaVA's towers are plain ViTs; expected 'vit'")
    if vision.use_cls_token != vision.pre_layernorm:
        raise ConfigError(
            f"vision.use_cls_token={vision.use_cls_token} with vision.pre_layernorm={vision.pre_layernorm}: no "
            f"transformers tower matches (CLIP has a CLS token and a pre-norm, SigLIP neither); expected both "
            f"true or both false")
    tessera_to_hf = {ours: theirs for theirs, ours in ACTIVATIONS.items()}
    fields = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                  num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                  num_channels=vision.num_channels, image_size=vision.image_size, patch_size=vision.patch_size,
                  hidden_act=tessera_to_hf[vision.hidden_act], layer_norm_eps=vision.layer_norm_eps)
    if vision.use_cls_token:
        return {"model_type": "clip_vision_model", **fields}
    return {"model_type": "siglip_vision_model", **fields, "vision_use_head": False}


def vit_block_rules(ours: str, theirs: str, vision: VisionConfig, out_proj: str = "out_proj",
                    norms: tuple[str, str] = ("layer_norm1", "layer_norm2")) -> list[Rule]:
    """One pre-LN block: fused q/k/v (+ biases), the attention output, two LayerNorms, fc1/fc2."""
    d, inner, bias = vision.hidden_size, vision.intermediate_size, vision.attention_bias
    attn = f"{theirs}.self_attn"
    rules = [fuse(f"{ours}.attn.qkv.weight", *((f"{attn}.{p}_proj.weight", (d, d)) for p in "qkv"))]
    if bias:
        rules.append(fuse(f"{ours}.attn.qkv.bias", *((f"{attn}.{p}_proj.bias", (d,)) for p in "qkv")))
    rules += linear(f"{ours}.attn.out", f"{attn}.{out_proj}", d, d, bias)
    rules += norm(f"{ours}.norm1", f"{theirs}.{norms[0]}", d)
    rules += norm(f"{ours}.norm2", f"{theirs}.{norms[1]}", d)
    rules += linear(f"{ours}.fc1", f"{theirs}.mlp.fc1", inner, d, True)
    rules += linear(f"{ours}.fc2", f"{theirs}.mlp.fc2", d, inner, True)
    return rules


def patch_rules(vision: VisionConfig, theirs: str) -> list[Rule]:
    d, p, c = vision.hidden_size, vision.patch_size, vision.num_channels
    rules = [rename("vision.patch_embedding.proj.weight", f"{theirs}.weight", (d, c, p, p))]
    if vision.patch_bias:
        rules.append(rename("vision.patch_embedding.proj.bias", f"{theirs}.bias", (d,)))
    return rules


def tower_rules(vision: VisionConfig, theirs: str) -> list[Rule]:
    """tessera's `vision` ↔ a CLIP or SigLIP tower under `theirs` (transformers' current layout)."""
    d = vision.hidden_size
    positions = vision.num_patches + int(vision.use_cls_token)
    emb = f"{theirs}.embeddings"
    rules = patch_rules(vision, f"{emb}.patch_embedding")
    rules.append(rename("vision.position_embedding", f"{emb}.position_embedding.weight", (positions, d)))
    if vision.use_cls_token:
        rules.append(rename("vision.cls_token", f"{emb}.class_embedding", (d,)))
    if vision.pre_layernorm:
        rules += norm("vision.pre_norm", f"{theirs}.pre_layrnorm", d)  # sic: transformers' name
    for i in range(vision.num_layers):
        rules += vit_block_rules(f"vision.blocks.{i}", f"{theirs}.encoder.layers.{i}", vision)
    return rules


def unread_tower_tensors(names: list[str], theirs: str) -> list[str]:
    """The tower's pooled-output weights (post_layernorm, SigLIP's head): present in checkpoints, never read."""
    return [n for n in names if n.startswith((f"{theirs}.post_layernorm.", f"{theirs}.head."))]


def identity_post_norm(vision: VisionConfig, theirs: str) -> dict[str, torch.Tensor]:
    """The post_layernorm transformers' tower always builds; an identity, since LLaVA never reads it."""
    return {f"{theirs}.post_layernorm.weight": torch.ones(vision.hidden_size),
            f"{theirs}.post_layernorm.bias": torch.zeros(vision.hidden_size)}
