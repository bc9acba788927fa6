"""Analytic FLOPs read off a ModelConfig: a training step's (the benchmark's MFU), and what encoding an image costs
next to prefilling a prompt token (a server's chunked prefill spreads the work by it).

Conventions (those of MFU in the PaLM paper): a matmul of (m × k) by (k × n) costs 2·m·k·n; attention scores and
the weighted sum cost 4·q·k·d per layer (counted in full, causal or not); a training step is 3× the forward
(backward = twice the forward) for every part that runs, except the patch embedding: the pixels take no gradient,
so its backward is the weight gradient alone (2× its forward). The LM head is counted only where a label needs its
logits, and so is the last decoder layer's work past its keys and values (its queries, attention, output
projection and MLP), which no later layer reads — unless a cross-attention block replaces that last layer
(`cross_attention_placement="replace"`): the block then reads every row. A replaced layer is no self-attention
layer. The ViT's blocks only up to the deepest selected feature; the tiled encoder's local and global blocks all
run, over every tile slot of an image, each tile padded to a multiple of 8 tokens (real tokens attend to the
padding). The hybrid (NVLM-H) encodes a thumbnail and tiles per image, counted at its most tiles: the thumbnail's
tokens join the sequence, the tiles' are the cross-attention blocks' keys and values. These are the FLOPs a step
must spend, whatever an implementation spends on top.
"""

from __future__ import annotations

from tessera.config import ModelConfig
from tessera.vision.encoder import deepest_layer
from tessera.vision.tiled import PAD_TO_MULTIPLE

TRAIN = 3  # forward + backward


def patch_flops(config: ModelConfig, images: int, patches_per_image: int) -> float:
    """Forward FLOPs of the patch embedding: one (channels·patch²) → width product per patch (none without an
    encoder: the projector embeds the patches)."""
    v = config.vision
    if v.encoder == "none":
        return 0.0
    return images * patches_per_image * 2 * (v.num_channels * v.patch_size**2) * v.hidden_size


def encoded_per_image(config: ModelConfig) -> int:
    """Images the encoder runs for one image: the hybrid's thumbnail and its most tiles, else one."""
    return 1 + config.vision.max_num_tiles if config.fusion.method == "hybrid" else 1


def vision_tokens(config: ModelConfig) -> tuple[int, int]:
    """(patches, positions) of one image: what the patch embedding projects, and what the encoder's blocks run
    over (CLS included; the tiled encoder's every tile slot, padded)."""
    v = config.vision
    if v.encoder == "tiled":
        per_tile = v.num_patches + 1
        return v.max_num_tiles * v.num_patches, v.max_num_tiles * (per_tile + (-per_tile) % PAD_TO_MULTIPLE)
    return v.num_patches, v.num_patches + int(v.use_cls_token)


def vision_block_flops(config: ModelConfig, images: int, tokens_per_image: int) -> float:
    """Forward FLOPs of the encoder's blocks over `images` images of `tokens_per_image` positions (CLS included),
    through the deepest block a selected feature needs (LLaVA's default, the penultimate, leaves the last unread);
    the tiled encoder runs all its local blocks, then its global ones."""
    v = config.vision
    if v.encoder == "none":
        return 0.0
    if v.encoder == "tiled":
        layers = v.num_layers + v.num_global_layers
    else:
        layers = deepest_layer(config.fusion.feature_layers, v.num_layers)
    per_token = 2 * (3 * v.hidden_size**2 + v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    attention = 4 * tokens_per_image**2 * v.hidden_size
    return images * layers * (tokens_per_image * per_token + attention)


def projector_flops(config: ModelConfig, image_tokens: int) -> float:
    width = config.image_feature_width
    d = config.text.hidden_size
    per_token = 2 * width * d + (2 * d * d if config.fusion.projector == "mlp" else 0)
    return image_tokens * per_token


def decoder_layer_flops(config: ModelConfig, tokens: int, context: int, outputs: int | None = None) -> float:
    """One self-attention decoder layer over `tokens` new tokens attending to `context` keys (forward), of which
    `outputs` (default: all) need the layer's output; the others only give their keys and values."""
    t = config.text
    outputs = tokens if outputs is None else outputs
    kv = 2 * t.hidden_size * 2 * t.num_kv_heads * t.head_dim
    q_and_out = 2 * 2 * t.hidden_size * t.num_heads * t.head_dim
    mlp = 2 * 3 * t.hidden_size * t.intermediate_size
    return tokens * kv + outputs * (q_and_out + mlp) + 4 * outputs * context * t.num_heads * t.head_dim


def cross_block_flops(config: ModelConfig, text_tokens: int, image_tokens: int) -> float:
    """One gated cross-attention block: queries and MLP on the text, keys/values on the image features."""
    t = config.text
    q_and_out = 2 * 2 * t.hidden_size * t.num_heads * t.head_dim
    kv = 2 * t.hidden_size * 2 * t.num_kv_heads * t.head_dim
    mlp = 2 * 3 * t.hidden_size * t.intermediate_size
    attention = 4 * text_tokens * image_tokens * t.num_heads * t.head_dim
    return text_tokens * (q_and_out + mlp) + image_tokens * kv + attention


def training_step_flops(config: ModelConfig, batch: int, image_tokens: int, text_tokens: int,
                        labelled_tokens: int) -> float:
    """FLOPs of one training step (everything trains) on `batch` samples of one image each.

    image_tokens: tokens per image as the LLM sees them (the hybrid: its thumbnail's, and as many per tile through
    cross-attention); text_tokens: text tokens per sample; labelled_tokens: tokens per sample whose next token is a
    label (the LM head's work)."""
    patches, vit_tokens = vision_tokens(config)
    encoded = batch * encoded_per_image(config)
    forward = vision_block_flops(config, encoded, vit_tokens) + projector_flops(config, encoded * image_tokens)
    t = config.text
    method = config.fusion.method
    sequence = image_tokens + text_tokens if method != "cross" else text_tokens
    keys = image_tokens * config.vision.max_num_tiles if method == "hybrid" else image_tokens
    replaced = config.cross_attention_layers if config.fusion.cross_attention_placement == "replace" else []
    last_trimmed = t.num_layers - 1 not in replaced  # a block in the last layer's place reads every row
    full_layers = t.num_layers - len(replaced) - int(last_trimmed)
    forward += full_layers * batch * decoder_layer_flops(config, sequence, sequence)
    if last_trimmed:
        forward += batch * decoder_layer_flops(config, sequence, sequence, outputs=labelled_tokens)
    if method != "unified":  # the hybrid's thumbnail tokens read the tiles too
        forward += len(config.cross_attention_layers) * batch * cross_block_flops(config, sequence, keys)
    forward += batch * labelled_tokens * 2 * t.hidden_size * t.vocab_size
    # the pixels take no gradient: the patch embedding's backward is its weight gradient alone
    total = TRAIN * forward + 2 * patch_flops(config, encoded, patches)
    if config.vision.encoder == "none":  # no encoder: the projector's first product is the patch embedding
        total -= batch * image_tokens * 2 * config.image_feature_width * t.hidden_size
    return total


def image_encoding_flops(config: ModelConfig) -> float:
    """Forward FLOPs of encoding one image: patch embedding, encoder blocks and projector. A tiled encoder's image
    counts at its most tiles."""
    patches, positions = vision_tokens(config)
    encoded = encoded_per_image(config)
    return (patch_flops(config, encoded, patches) + vision_block_flops(config, encoded, positions)
            + projector_flops(config, encoded * config.num_feature_tokens))


def image_keys_values_flops(config: ModelConfig) -> float:
    """Method B: forward FLOPs of every cross-attention block's keys and values of one encoded image (the hybrid:
    of its most tiles; 0 for Method A)."""
    t = config.text
    kv = 2 * t.hidden_size * 2 * t.num_kv_heads * t.head_dim
    tiles = config.vision.max_num_tiles if config.fusion.method == "hybrid" else 1
    return len(config.cross_attention_layers) * tiles * config.num_feature_tokens * kv


def prompt_token_flops(config: ModelConfig) -> float:
    """Forward FLOPs of one prompt token through the LLM's projections and MLPs (attention, which grows with the
    context, left out): every decoder layer, and for Method B every cross-attention block's queries and MLP."""
    blocks = len(config.cross_attention_layers)
    replaced = blocks if config.fusion.cross_attention_placement == "replace" else 0
    return ((config.text.num_layers - replaced) * decoder_layer_flops(config, 1, 0)
            + blocks * cross_block_flops(config, 1, 0))


def image_cost_in_tokens(config: ModelConfig) -> float:
    """How many prompt tokens' prefill an image's encoding is worth: about 120 for the benchmark's model (100 for its
    Method B), 30 for LLaVA 1.5 7B (a ViT-L over 577 positions), 1,150 for Llama 3.2 Vision 11B (4 tiles of 1,601
    positions through 40 blocks)."""
    return (image_encoding_flops(config) + image_keys_values_flops(config)) / prompt_token_flops(config)
