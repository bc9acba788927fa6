"""The KV cache: keys and values of every past token, so each decode step only computes the new one.

Storage is preallocated for the whole generation (prompt + max_new_tokens): a decode step writes one slot per
layer instead of concatenating (which would copy the whole cache every step). Method B also keeps each
cross-attention block's image keys/values here, computed once at prefill.

The storage is not zeroed: attention reads only the slots below `length`, and each of those is written first (a
prefill writes every prompt slot, padding included; a step its own). Zeroing would cost more than it saves: zeros
took 56 ms of a 100 MB cache against 32 ms for a copy. A server's running batch zeroes the padding slots it adds
itself, when rows join it (tessera/serve/batch.py). Untouched, the storage past the written slots takes no memory,
so that batch can keep room to grow in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.config import TextConfig


@dataclass
class CrossAttentionState:
    """What Method B's blocks reuse at every decode step."""

    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer → (k, v)
    visible: torch.Tensor | None = None  # (batch, groups): images (or image tiles) the latest token may attend to
    real: torch.Tensor | None = None  # (batch, groups): which groups belong to the sample's own images


def unzeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Storage whose slots are written before they are read (tests fill it with NaN to prove that)."""
    return torch.empty(shape, dtype=dtype, device=device)


class KVCache:
    def __init__(self, config: TextConfig, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys, self.values = (unzeroed(shape, dtype, device) for _ in range(2))
        self.max_length = max_length
        self.length = 0  # tokens already stored (the same for every sample: padding is masked, not ragged)
        self.cross = CrossAttentionState()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v for `layer` after the cached ones and return all of them."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens for a cache built for {self.max_length}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def view(self, rows: int, start: int = 0, length: int = 0) -> KVCache:
        """A cache over the first `rows` rows of this one's storage, from slot `start` on, holding `length` tokens:
        the same memory, not a copy. A server's running batch keeps spare rows and slots in its storage, so that
        rows join and leave without copying the rest (tessera/serve/batch.py)."""
        view = object.__new__(KVCache)
        view.keys, view.values = (t[:, :rows, :, start:] for t in (self.keys, self.values))
        view.max_length, view.length, view.cross = self.max_length - start, length, CrossAttentionState()
        return view

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer has stored its new entries."""
        self.length += num_tokens
