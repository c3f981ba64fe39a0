"""Static KV cache: preallocated to `max_seq_len`, its length set by position.

Layout per model: k, v = [n_layers, n_kv_heads, max_seq_len, head_dim] in the model dtype;
`k[layer]` is the [n_kv, S, hd] slab a kernel reads. Positions [0, length) are valid.
Truncating to position p is `length = p`: the slots past p are simply overwritten by the
next write (this is how the WSD switch drops the draft tokens after k, in O(1)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ContextOverflowError


@dataclass(eq=False)
class StaticKVCache:
    k: torch.Tensor   # [n_layers, n_kv, max_seq_len, head_dim]
    v: torch.Tensor   # [n_layers, n_kv, max_seq_len, head_dim]
    length: int = 0   # number of valid positions

    @classmethod
    def allocate(cls, n_layers: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device) -> "StaticKVCache":
        shape = (n_layers, n_kv_heads, max_seq_len, head_dim)
        # zeros (not empty) so unwritten slots never hold NaN bit patterns that a masked
        # kernel could still multiply by 0.
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def check_fits(self, start: int, n_new: int) -> None:
        """Raise ContextOverflowError if positions [start, start + n_new) do not fit."""
        if start + n_new > self.max_seq_len:
            raise ContextOverflowError(
                f"sequence of {start + n_new} tokens ({start} cached + {n_new} new) does not "
                f"fit the KV cache of {self.max_seq_len} positions; shorten the prompt / "
                f"max_new_tokens or load the model with a larger max_seq_len")

    def truncate(self, length: int) -> None:
        """Keep positions [0, length): O(1)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    def snapshot(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """A copy of the valid positions: (length, k [L, nkv, length, hd], v likewise)."""
        n = self.length
        return n, self.k[:, :, :n].clone(), self.v[:, :, :n].clone()

    def restore(self, snap: tuple[int, torch.Tensor, torch.Tensor]) -> None:
        """Put a `snapshot` back: the cache then holds exactly that sequence."""
        n, k, v = snap
        self.k[:, :, :n].copy_(k)
        self.v[:, :, :n].copy_(v)
        self.length = n

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
