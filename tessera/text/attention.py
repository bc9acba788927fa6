"""Causal self-attention with grouped-query attention (GQA) and RoPE, through PyTorch's SDPA kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import TextConfig
from tessera.linear import Linear
from tessera.text.cache import KVCache
from tessera.text.rope import apply_rotary


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, in float32 on CPU where half precision is slower:
    - under bf16 autocast (mixed-precision training): the projections around it run in bf16, but CPU's bf16
      attention backward is about 4× slower than float32's (measured on the quickstart's shapes), and the softmax
      keeps its full precision. The output stays float32;
    - a bf16 (or fp16) model's decode step, one query row against the cache: CPU's kernel took 3× as long in bf16
      as in float32, casts included (162 against 55 µs at batch 1, 1188 against 383 µs at batch 8, 300 keys).
      Prefill's hundreds of rows are as fast or faster in bf16, so they stay there."""
    autocast = torch.is_autocast_enabled("cpu")
    decoding = q.is_cpu and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-2] == 1
    if not (autocast or decoding):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():  # an additive mask must match the queries' dtype
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return y if autocast else y.to(q.dtype)


class SelfAttention(nn.Module):
    """q/k/v from one fused projection; num_kv_heads ≤ num_heads key/value heads, each shared by a group of
    query heads (SDPA's `enable_gqa` broadcasts them without copying)."""

    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_size = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv = Linear(config.hidden_size, qkv_size, bias=config.attention_bias)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None, keep: int | None = None) -> torch.Tensor:
        """mask: boolean (batch, 1, q, k), True where attention is allowed; None means plain causal. keep: the
        output of only the last `keep` query rows; keys and values come from every row."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        query_and_key_heads = self.num_heads + self.num_kv_heads
        # q and k sit side by side in the fused projection: RoPE rotates both in one pass (half the small ops)
        qk = apply_rotary(qkv[:, :, :query_and_key_heads], *rope).transpose(1, 2)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, :, query_and_key_heads:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if keep is not None:
            # queries are cut after the fused projection, not before: projecting the kept rows apart (~1% of a
            # training step) changed bf16 rounding enough to move the quickstart's results (0.928 → 0.855 exact match)
            q = q[:, :, -keep:]
            if mask is not None:
                mask = mask[:, :, -keep:]
            elif keep > 1:  # plain causal: the kept rows are the last queries, against every key
                keys = k.shape[2]
                mask = torch.ones(keep, keys, dtype=torch.bool, device=x.device).tril(keys - keep)
        rows = q.shape[2]
        gqa = self.num_kv_heads != self.num_heads
        if mask is None and rows > 1:  # no padding, queries and keys line up: plain causal
            y = attend(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # the mask, or none for a single query row without padding, which sees every key
            y = attend(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, rows, -1))
