"""The decoder LLM: a Llama-style transformer that works on its own as a text-only language model.

Multimodal fusion plugs in from outside: Method A hands it `inputs_embeds` with image features already in place;
Method B passes `inject`, blocks run on the hidden state just before the listed decoder layers. With neither,
this is a plain text LM.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn

from tessera.config import TextConfig
from tessera.linear import Linear
from tessera.text.attention import SelfAttention
from tessera.text.cache import KVCache
from tessera.text.mlp import SwiGLU
from tessera.text.norm import RMSNorm
from tessera.text.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """x + Attn(RMSNorm x), then x + SwiGLU(RMSNorm x)."""

    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = SelfAttention(config, layer_index)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, mask, cache=None, keep=None):
        """keep: return only the last `keep` rows (see `DecoderLLM.run_layers`); every row still adds its keys and
        values to the attention."""
        attended = self.attn(self.input_norm(x), rope, mask, cache, keep)
        x = (x if keep is None else x[:, -keep:]) + attended
        return x + self.mlp(self.post_attention_norm(x))


class ReplacedLayer(nn.Module):
    """Holds the index of a decoder layer that a cross-attention block replaces (Llama 3.2 Vision), so the other
    layers keep their numbers. It has no weights and passes the hidden state through: with an image the block runs
    in its place, without one the index is skipped, as transformers does."""

    def forward(self, x, rope, mask, cache=None, keep=None):
        return x if keep is None else x[:, -keep:]


def positions_from_mask(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Each real token's position counts only the real tokens before it, so left padding does not shift RoPE."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_new:]


def padding_moved_to_the_front(input_ids: torch.Tensor, attention_mask: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation continues every row from its last slot, so a row padded on the right would continue from a pad
    token. Each row's trailing padding moves to its front (a roll): positions come from the mask, so the row then
    reads exactly as it would left-padded. Rows without trailing padding are returned as they are."""
    trailing = (attention_mask.flip(-1).cumsum(-1) == 0).sum(-1)  # padding slots after the last real token
    if not bool(trailing.any()):
        return input_ids, attention_mask
    slots = (torch.arange(input_ids.shape[1], device=input_ids.device) - trailing[:, None]) % input_ids.shape[1]
    return input_ids.gather(1, slots), attention_mask.gather(1, slots)


def attention_mask_4d(attention_mask: torch.Tensor | None, num_new: int, past: int,
                      sliding_window: int | None = None) -> torch.Tensor | None:
    """Boolean (batch, 1, new, past+new) mask: causal and not on padding keys; None when plain causal will do.
    With a sliding window, a query also sees only the keys less than `sliding_window` positions back (counted in
    sequence slots, padding included, as transformers counts them).

    A padding query (left padding) would see no key at all and SDPA would return NaN for it, so every query may
    always see itself; padding outputs are never read, real tokens are unaffected.
    """
    total = past + num_new
    if attention_mask is not None and attention_mask.shape[-1] != total:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens; expected past ({past}) + new ({num_new}) = {total}"
        )
    # Compiled, the mask is always built: skipping it needs a data-dependent branch (a graph break), and SDPA
    # computes the same attention with a mask that allows everything.
    no_padding = attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all()))
    window_cuts = sliding_window is not None and total > sliding_window
    if no_padding and (past == 0 or num_new == 1) and not window_cuts:
        return None
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    causal = key_pos <= query_pos
    if window_cuts:
        causal &= key_pos > query_pos - sliding_window
    if attention_mask is None:
        return causal[None, None]
    mask = causal[None] & attention_mask.bool()[:, None, :]
    mask |= (key_pos == query_pos)[None]
    return mask[:, None]


class DecoderLLM(nn.Module):
    def __init__(self, config: TextConfig, replaced_layers: Collection[int] = ()):
        """replaced_layers: indices whose layer a cross-attention block replaces (see `ReplacedLayer`)."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.embedding_rows, config.hidden_size)
        self.layers = nn.ModuleList(ReplacedLayer() if i in replaced_layers else DecoderLayer(config, i)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.apply(_init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inject: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Logits for the new tokens: all of them, the last `logits_to_keep` when it is an int > 0, or, when it is a
        boolean (batch, new) mask, only the marked positions as one (marked, vocab) matrix.

        attention_mask (batch, past + new) follows Hugging Face: 1 for real tokens, 0 for padding, covering the
        cached tokens too.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        num_new = x.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, num_new)
            else:
                position_ids = torch.arange(past, past + num_new, device=x.device).expand(x.shape[0], -1)
        rope = self.rotary(position_ids, x.dtype)
        mask = attention_mask_4d(attention_mask, num_new, past, self.config.sliding_window)
        x = self.run_layers(x, rope, mask, cache, inject, rows_read(logits_to_keep, num_new))
        if cache is not None:
            cache.advance(num_new)
        if isinstance(logits_to_keep, torch.Tensor):
            # the final norm is per token: norming only the kept rows is the same
            x = x[logits_to_keep[:, -x.shape[1]:]]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x))

    def run_layers(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                   cache: KVCache | None = None,
                   inject: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                   keep: int | None = None) -> torch.Tensor:
        """The layer stack, with Method B's blocks before their layers: the bulk of the work, and one graph for
        `torch.compile` whatever the caller does around it (see `MultimodalLM.compile`).

        keep: only the last `keep` rows of the output are read. Then the last layer computes its attention,
        output projection and MLP for those rows alone: its keys and values still come from every row, and no other
        layer reads its output. A prefill reads one row, a training step the labelled span (the image tokens
        before it carry no label), so that layer's work on the other rows would be thrown away. (Its fused
        projection still makes queries for every row; see `SelfAttention.forward`.)"""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if inject is not None and i in inject:
                x = inject[i](x)
            x = layer(x, rope, mask, cache, keep if i == last else None)
        return x


def rows_read(logits_to_keep: int | torch.Tensor, num_new: int) -> int | None:
    """How many trailing rows of the layer stack's output the logits need (None: all of them). A boolean
    (batch, new) mask needs the rows from its first marked column on, in any sample."""
    if isinstance(logits_to_keep, torch.Tensor):
        marked = logits_to_keep.any(0).nonzero()
        rows = num_new - int(marked[0]) if len(marked) else num_new
    else:
        rows = logits_to_keep or num_new
    return rows if rows < num_new else None


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
