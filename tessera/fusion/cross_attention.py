"""Method B, cross-modality attention: text hidden states (queries) attend to image features (keys/values) in
gated blocks inserted before some decoder layers (Flamingo, Llama 3.2 Vision, NVLM-X; NVLM-H's tiles).

Each block adds its attention and MLP outputs through tanh(gate) with the gates starting at 0, so a freshly built
block is the identity and the LLM behaves exactly as it did before training.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.config import TextConfig
from tessera.linear import Linear
from tessera.text.attention import attend
from tessera.text.mlp import SwiGLU
from tessera.text.norm import RMSNorm


def image_visibility(input_ids: torch.Tensor, image_token_id: int, max_images: int, scope: str,
                     tokens_per_image: int = 1) -> torch.Tensor:
    """(batch, seq, max_images) bool: may token i attend to image j of its sample?

    Image j starts at the sample's j-th run of tokens_per_image image tokens (one marker for Method B; the
    thumbnail's tokens for the hybrid). "previous": from its start on to the end. "latest": from its start until
    the next run of images starts (images that follow one another directly stay visible together).
    """
    batch, seq = input_ids.shape
    visible = torch.zeros(batch, seq, max_images, dtype=torch.bool, device=input_ids.device)
    for b in range(batch):
        tokens = (input_ids[b] == image_token_id).nonzero().flatten().tolist()
        positions = tokens[::tokens_per_image][:max_images]
        for j, start in enumerate(positions):
            end = seq
            if scope == "latest":
                later = positions[j + 1:]
                run_end = start
                for p in later:  # skip the rest of this run of images that follow one another directly
                    if p != run_end + tokens_per_image:
                        break
                    run_end = p
                end = next((p for p in later if p > run_end), seq)
            visible[b, start:end, j] = True
    return visible


def pack_images(image_features: torch.Tensor, image_counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, ...) features of every image in batch order → (batch, max_images, S, ...) and a (batch, max_images)
    mask of real image slots. Empty slots hold zeros (no token attends to them)."""
    batch, most = len(image_counts), max(image_counts, default=0)
    packed = image_features.new_zeros(batch, max(most, 1), *image_features.shape[1:])
    real = torch.zeros(batch, max(most, 1), dtype=torch.bool, device=image_features.device)
    start = 0
    for b, count in enumerate(image_counts):
        packed[b, :count] = image_features[start:start + count]
        real[b, :count] = True
        start += count
    return packed, real


class GatedCrossAttentionBlock(nn.Module):
    """attend_all_when_blind: what a token that may see no image gets. False: nothing. True (Llama 3.2 Vision):
    it attends to every key of its own sample's images, and only its MLP branch is zeroed; in a sample without
    images it gets nothing, as transformers, which skips the layer when there is no image."""

    def __init__(self, config: TextConfig, attend_all_when_blind: bool = False):
        super().__init__()
        self.attend_all_when_blind = attend_all_when_blind
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = Linear(d, config.num_heads * hd, bias=False)
        self.kv_proj = Linear(d, 2 * config.num_kv_heads * hd, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)  # per-head norms keep the logits of a new block tame
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.o_proj = Linear(config.num_heads * hd, d, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = SwiGLU(d, config.intermediate_size)
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        for linear in (self.q_proj, self.kv_proj, self.o_proj):
            nn.init.normal_(linear.weight, std=0.02)

    def image_keys_values(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, max_images, S, D) projected image features → keys and values (batch, kv_heads, M·S, head_dim).
        No RoPE: image tokens have no position in the text."""
        b, m, s, _ = images.shape
        k, v = self.kv_proj(images.reshape(b, m * s, -1)).chunk(2, dim=-1)
        k = self.k_norm(k.view(b, m * s, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, m * s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                real: torch.Tensor | None = None) -> torch.Tensor:
        """visible: (batch, seq, groups) bool, where the keys split evenly into `groups` runs — one per image, or one
        per image tile for a tiled encoder. real: (batch, groups) bool, the groups of the sample's own images
        (default: all); the others are the padding of a batch whose samples hold different numbers of images, and
        nobody attends to them, so a sample's output does not depend on what it is batched with."""
        b, t, _ = x.shape
        real = torch.ones_like(visible[:, 0]) if real is None else real
        tokens_per_group = keys.shape[2] // visible.shape[-1]
        sees_any = visible.any(-1, keepdim=True)  # (b, t, 1)
        if self.attend_all_when_blind:
            seen = torch.where(sees_any, visible, real[:, None, :])
            attention_row = real.any(-1)[:, None, None].to(x.dtype)  # a sample with images: every row
        else:
            seen, attention_row = visible, sees_any.to(x.dtype)
        seen = seen | ~seen.any(-1, keepdim=True)  # a row that sees nothing gets every key (finite, never NaN), and 0
        key_mask = seen.repeat_interleave(tokens_per_group, dim=-1)
        q = self.q_proj(self.attn_norm(x)).view(b, t, self.num_heads, self.head_dim)
        q = self.q_norm(q).transpose(1, 2)
        y = attend(q, keys, values, attn_mask=key_mask[:, None], enable_gqa=self.num_kv_heads != self.num_heads)
        attended = self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        # parenthesised as before attend_all_when_blind gained its per-sample row: the gate's gradient is summed in
        # the same order, and bf16 training rounds the same (the quickstart's results depend on it)
        x = x + torch.tanh(self.attn_gate) * (attention_row * attended)
        return x + torch.tanh(self.mlp_gate) * sees_any.to(x.dtype) * self.mlp(self.mlp_norm(x))
