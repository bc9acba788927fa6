"""The decoder LLMs tessera imports — Llama, Mistral, Qwen2 and Llama 3.2 Vision's text model — as one
`TextConfig` and one name map.

They differ only by switches tessera's decoder has: Qwen2 puts biases on q/k/v, Mistral may attend through a
sliding window, Llama 3.1+ stretches RoPE ("llama3" scaling), Llama 3.2 Vision has 8 extra embedding rows.
A setting outside those switches is refused with the field named. Defaults are transformers' own (the pinned
version's configuration classes), because published config.json files often leave defaults out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tessera.config import TEXT_FAMILIES, FusionConfig, ModelConfig, TextConfig, VisionConfig
from tessera.errors import ConfigError
from tessera.interop.hub_files import FLAG, INTEGER, INTEGERS, LIST, NULL, NUMBER, OBJECT, POSITIVE, TEXT, checked
from tessera.interop.name_map import Rule, fuse, norm, rename

TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  rope_theta=10000.0, pad_token_id=None, eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096, rope_theta=10000.0, pad_token_id=None, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, rope_theta=10000.0,
                  pad_token_id=None, eos_token_id=None),
    "mllama_text_model": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                              num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                              rope_theta=500000.0, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                              pad_token_id=128004, eos_token_id=128001),
}
# the kinds of value a text_config (and its rope_parameters) holds
TEXT_KINDS = dict(
    model_type=(TEXT,), vocab_size=(POSITIVE,), hidden_size=(POSITIVE,), intermediate_size=(POSITIVE,),
    num_hidden_layers=(POSITIVE,), num_attention_heads=(POSITIVE,), num_key_value_heads=(POSITIVE, NULL),
    head_dim=(POSITIVE, NULL), hidden_act=(TEXT,), max_position_embeddings=(POSITIVE,), rms_norm_eps=(NUMBER,),
    tie_word_embeddings=(FLAG,), attention_bias=(FLAG,), mlp_bias=(FLAG,), use_sliding_window=(FLAG,),
    sliding_window=(POSITIVE, NULL), layer_types=(LIST, NULL), rope_theta=(NUMBER,), rope_parameters=(OBJECT, NULL),
    rope_scaling=(OBJECT, NULL), pad_token_id=(INTEGER, NULL), eos_token_id=(INTEGER, INTEGERS, NULL),
    cross_attention_layers=(INTEGERS, NULL),
)
ROPE_KINDS = dict(rope_type=(TEXT,), type=(TEXT,), rope_theta=(NUMBER,), factor=(NUMBER,), low_freq_factor=(NUMBER,),
                  high_freq_factor=(NUMBER,), original_max_position_embeddings=(POSITIVE,))
MLLAMA_EXTRA_EMBEDDINGS = 8  # <|image|> and friends sit past the output vocabulary


def with_defaults(config: dict[str, Any] | None, defaults: dict[str, Any], where: str,
                  kinds: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """config.json's object at `where` over transformers' defaults, each value of the kind `kinds` lists."""
    # an explicit null stays null (Mistral's sliding_window: null means none)
    return {**defaults, **checked(config, kinds, where)}


def text_config_from_hf(hf: dict[str, Any] | None, where: str, default_type: str = "llama") -> TextConfig:
    """A transformers text config (dict) → TextConfig; a setting tessera can't honour raises ConfigError."""
    hf = checked(hf, TEXT_KINDS, where)
    model_type = hf.get("model_type", default_type)
    if model_type not in TEXT_DEFAULTS:
        raise ConfigError(f"{where}.model_type={model_type!r}: tessera imports the text models "
                          f"{', '.join(map(repr, TEXT_DEFAULTS))}")
    c = {**TEXT_DEFAULTS[model_type], **hf}  # an explicit null stays null, as in with_defaults
    heads = c["num_attention_heads"]
    if c["hidden_act"] != "silu":
        raise ConfigError(f"{where}.hidden_act={c['hidden_act']!r}: tessera's decoder uses SwiGLU; expected 'silu'")
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise ConfigError(f"{where}.head_dim={c['head_dim']!r}: tessera's decoder needs hidden_size / "
                          f"num_attention_heads = {c['hidden_size'] // heads}")
    for name in ("mlp_bias", "attention_bias") if model_type == "llama" else ("mlp_bias",):
        if c.get(name):  # Llama's attention_bias also puts a bias on o_proj, which tessera's decoder lacks
            raise ConfigError(f"{where}.{name}=True: tessera's Llama decoder has no such biases; expected false")
    if c.get("use_sliding_window"):
        raise ConfigError(f"{where}.use_sliding_window=True: per-layer sliding windows (Qwen2) are not supported; "
                          f"expected false")
    if c.get("layer_types") and len(set(c["layer_types"])) > 1:
        raise ConfigError(f"{where}.layer_types={c['layer_types']!r}: tessera gives every layer the same attention; "
                          f"expected one layer type")
    theta, scaling = _rope(c, where)
    return TextConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=c["num_key_value_heads"] or heads, intermediate_size=c["intermediate_size"],
        rms_norm_eps=float(c["rms_norm_eps"]), rope_theta=float(theta),
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=bool(c["tie_word_embeddings"]),
        attention_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases
        sliding_window=c.get("sliding_window") if model_type == "mistral" else None, rope_scaling=scaling,
        num_extra_embeddings=MLLAMA_EXTRA_EMBEDDINGS if model_type == "mllama_text_model" else 0,
        family=model_type if model_type in TEXT_FAMILIES else None,  # kept for export (Mistral's null window)
    )


def _rope(c: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers' `rope_parameters`, or the older `rope_theta` + `rope_scaling`."""
    key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    params = dict(checked(c.get(key), ROPE_KINDS, f"{where}.{key}"))
    theta = params.get("rope_theta", c.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"{where}.rope_parameters.rope_type={rope_type!r}: tessera supports 'default' and 'llama3'")
    params.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": "llama3", **{k: params.get(k) for k in keys}}


def special_ids(hf: dict[str, Any] | None, generation: dict[str, Any]) -> tuple[int | None, Any]:
    """(pad id, EOS id or ids) of a text config; generation_config.json's EOS wins, as in transformers' generate."""
    c = {**TEXT_DEFAULTS[(hf or {}).get("model_type", "llama")], **(hf or {})}
    eos = generation.get("eos_token_id")  # null there defers to config.json's, as in transformers
    return c["pad_token_id"], c["eos_token_id"] if eos is None else eos


def model_config(vision: VisionConfig, text: TextConfig, fusion: FusionConfig, image_token_id: int,
                 pad_token_id: int | None, eos: int | list[int] | None, where: str) -> ModelConfig:
    """A ModelConfig with the special ids transformers' config gives: EOS may be a list (the first is tessera's
    eos_token_id, the rest stop tokens); a missing pad id falls back to EOS (generation never needs it)."""
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not eos_ids:
        raise ConfigError(f"{where}: no eos_token_id in config.json or generation_config.json; tessera needs one to "
                          f"know where an answer ends")
    return ModelConfig(vision=vision, text=text, fusion=fusion, image_token_id=image_token_id,
                       pad_token_id=eos_ids[0] if pad_token_id is None else pad_token_id,
                       eos_token_id=eos_ids[0], stop_token_ids=eos_ids[1:])


def text_config_to_hf(text: TextConfig) -> dict[str, Any]:
    """TextConfig → the transformers text config that builds the same decoder (Llama, Mistral or Qwen2)."""
    if text.num_extra_embeddings:
        raise ConfigError(f"text.num_extra_embeddings={text.num_extra_embeddings}: Llama, Mistral and Qwen2 have "
                          f"as many embedding rows as output tokens; no transformers equivalent")
    if text.attention_bias and text.sliding_window is not None:
        raise ConfigError("text.attention_bias=True with text.sliding_window: no transformers decoder has both "
                          "(Qwen2's window is per layer)")
    model_type = "qwen2" if text.attention_bias else "mistral" if text.sliding_window is not None else "llama"
    if text.family == "mistral" and model_type == "llama":  # a Mistral whose sliding_window is null
        model_type = "mistral"
    elif text.family not in (None, model_type):
        raise ConfigError(f"text.family={text.family!r} with text.attention_bias={text.attention_bias} and "
                          f"text.sliding_window={text.sliding_window}: transformers' Qwen2 has q/k/v biases and no "
                          f"window, Mistral no biases, Llama neither; expected family {model_type!r} or null")
    if text.rope_scaling and text.rope_scaling.get("rope_type") != "default" and model_type != "llama":
        raise ConfigError(f"text.rope_scaling={text.rope_scaling!r}: llama3 scaling exports only with a Llama "
                          f"decoder (no q/k/v biases, no sliding window)")
    fields = _decoder_fields(text)
    if model_type == "mistral":  # null written too: MistralConfig's default is a 4096-token window
        fields["sliding_window"] = text.sliding_window
    return {"model_type": model_type, **fields}


def _decoder_fields(text: TextConfig) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": text.rope_theta}
    if text.rope_scaling and text.rope_scaling.get("rope_type") == "llama3":
        rope = {**text.rope_scaling, "rope_theta": text.rope_theta}
    fields = dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                  num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
                  num_key_value_heads=text.num_kv_heads, head_dim=text.head_dim, hidden_act="silu",
                  max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
                  tie_word_embeddings=text.tie_word_embeddings, rope_parameters=rope)
    return fields


def mllama_text_config_to_hf(text: TextConfig, cross_attention_layers: list[int]) -> dict[str, Any]:
    if text.num_extra_embeddings != MLLAMA_EXTRA_EMBEDDINGS or text.attention_bias or text.sliding_window:
        raise ConfigError("text: Llama 3.2 Vision's text model has 8 extra embedding rows, no q/k/v biases and no "
                          "sliding window; expected text.num_extra_embeddings=8, attention_bias=false, "
                          "sliding_window=null")
    return {"model_type": "mllama_text_model", **_decoder_fields(text),
            "cross_attention_layers": list(cross_attention_layers)}


def decoder_rules(text: TextConfig, theirs: str, lm_head: str, self_attention_layers: Iterable[int]) -> list[Rule]:
    """tessera's `llm` ↔ a transformers decoder whose layers live under `theirs` (q/k/v and gate/up fused)."""
    d, hd = text.hidden_size, text.head_dim
    q, kv, inner = text.num_heads * hd, text.num_kv_heads * hd, text.intermediate_size
    rules = [rename("llm.embed_tokens.weight", f"{theirs}.embed_tokens.weight", (text.embedding_rows, d))]
    for i in self_attention_layers:
        ours, hf = f"llm.layers.{i}", f"{theirs}.layers.{i}.self_attn"
        rules.append(fuse(f"{ours}.attn.qkv.weight", (f"{hf}.q_proj.weight", (q, d)),
                          (f"{hf}.k_proj.weight", (kv, d)), (f"{hf}.v_proj.weight", (kv, d))))
        if text.attention_bias:
            rules.append(fuse(f"{ours}.attn.qkv.bias", (f"{hf}.q_proj.bias", (q,)),
                              (f"{hf}.k_proj.bias", (kv,)), (f"{hf}.v_proj.bias", (kv,))))
        rules.append(rename(f"{ours}.attn.o_proj.weight", f"{hf}.o_proj.weight", (d, q)))
        rules += mlp_rules(f"{ours}.mlp", f"{theirs}.layers.{i}.mlp", d, inner)
        rules += norm(f"{ours}.input_norm", f"{theirs}.layers.{i}.input_layernorm", d, bias=False)
        rules += norm(f"{ours}.post_attention_norm", f"{theirs}.layers.{i}.post_attention_layernorm", d, bias=False)
    rules += norm("llm.norm", f"{theirs}.norm", d, bias=False)
    if not text.tie_word_embeddings:
        rules.append(rename("llm.lm_head.weight", lm_head, (text.vocab_size, d)))
    return rules


def mlp_rules(ours: str, theirs: str, width: int, inner: int) -> list[Rule]:
    """SwiGLU: tessera's fused gate_up ↔ gate_proj + up_proj, and down ↔ down_proj."""
    return [fuse(f"{ours}.gate_up.weight", (f"{theirs}.gate_proj.weight", (inner, width)),
                 (f"{theirs}.up_proj.weight", (inner, width))),
            rename(f"{ours}.down.weight", f"{theirs}.down_proj.weight", (width, inner))]
