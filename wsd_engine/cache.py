"""Static KV cache: preallocated slots of `max_seq_len` positions, a length per slot.

Layout per model: k, v = [n_layers, n_slots, n_kv_heads, max_seq_len, head_dim] in the
model dtype; `k[layer]` is the [n_slots, n_kv, S, hd] block a batched kernel reads and
`k[layer, s]` slot s's [n_kv, S, hd] slab. Positions [0, lengths[s]) of slot s are valid.
Truncating slot s to position p is `lengths[s] = p`: the positions past p are simply
overwritten by the next write (this is how the WSD switch drops the draft tokens after k,
in O(1)); releasing a slot is truncating it to 0.

A model loaded for one request at a time has one slot; `length` is slot 0's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ContextOverflowError


@dataclass(eq=False)
class StaticKVCache:
    k: torch.Tensor   # [n_layers, n_slots, n_kv, max_seq_len, head_dim]
    v: torch.Tensor   # [n_layers, n_slots, n_kv, max_seq_len, head_dim]
    lengths: list = field(default_factory=list)   # [n_slots] valid positions per slot

    def __post_init__(self):
        if not self.lengths:
            self.lengths = [0] * self.k.shape[1]

    @classmethod
    def allocate(cls, n_layers: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device, n_slots: int = 1) -> "StaticKVCache":
        shape = (n_layers, n_slots, n_kv_heads, max_seq_len, head_dim)
        # zeros (not empty) so unwritten slots never hold NaN bit patterns that a masked
        # kernel could still multiply by 0.
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        """Slot 0's length (the one-request phases of `Model` use slot 0)."""
        return self.lengths[0]

    @length.setter
    def length(self, n: int) -> None:
        self.lengths[0] = n

    def slot_k(self, layer: int, slot: int = 0) -> torch.Tensor:
        return self.k[layer, slot]                                     # [n_kv, S, hd]

    def slot_v(self, layer: int, slot: int = 0) -> torch.Tensor:
        return self.v[layer, slot]                                     # [n_kv, S, hd]

    def check_fits(self, start: int, n_new: int) -> None:
        """Raise ContextOverflowError if positions [start, start + n_new) do not fit."""
        if start + n_new > self.max_seq_len:
            raise ContextOverflowError(
                f"sequence of {start + n_new} tokens ({start} cached + {n_new} new) does not "
                f"fit the KV cache of {self.max_seq_len} positions; shorten the prompt / "
                f"max_new_tokens or load the model with a larger max_seq_len")

    def check_slot(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.n_slots:
            raise ValueError(f"cache slot {slot!r} does not exist (slots 0..{self.n_slots - 1})")

    def truncate(self, length: int, slot: int = 0) -> None:
        """Keep positions [0, length) of a slot: O(1)."""
        self.check_slot(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} "
                             f"to {length}")
        self.lengths[slot] = length

    def reset(self, slot: int | None = None) -> None:
        """Empty one slot, or every slot (None)."""
        if slot is None:
            self.lengths = [0] * self.n_slots
        else:
            self.check_slot(slot)
            self.lengths[slot] = 0

    def snapshot(self) -> tuple:
        """A copy of the valid positions of every slot: (lengths, [(k, v) per slot in
        use, [L, nkv, length, hd] each, or None])."""
        parts = [(self.k[:, s, :, :n].clone(), self.v[:, s, :, :n].clone()) if n else None
                 for s, n in enumerate(self.lengths)]
        return list(self.lengths), parts

    def restore(self, snap: tuple) -> None:
        """Put a `snapshot` back: the cache then holds exactly those sequences."""
        lengths, parts = snap
        for s, (n, part) in enumerate(zip(lengths, parts)):
            if part is not None:
                self.k[:, s, :, :n].copy_(part[0])
                self.v[:, s, :, :n].copy_(part[1])
        self.lengths = list(lengths)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
