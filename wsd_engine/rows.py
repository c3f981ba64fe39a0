"""Where the tokens of one batched forward go (the per-step metadata of a batch).

Row b of a batch has `counts[b]` new tokens at positions `starts[b]`, `starts[b] + 1`, ...
of cache slot `slots[b]`; the tokens of all rows are laid out one after another
(row b's are tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1). A decode step is the case
of one token per row, a prefill of new requests or the scoring of draft chunks the case
of several. Built once per forward on the host; its tensors go to the device together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def to_device(values, device, dtype=torch.int64) -> torch.Tensor:
    """Host numbers -> a device tensor without waiting for the device: on CUDA through
    pinned memory and an asynchronous copy (a plain copy from pageable memory would wait
    for every queued kernel: one host sync per forward)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(eq=False)
class RowBatch:
    slots: torch.Tensor            # [B] int64 cache slot of each row
    starts: torch.Tensor           # [B] int64 first new position of each row
    cu_seqlens: torch.Tensor       # [B + 1] int64 token offsets
    positions: torch.Tensor        # [T] int64 position of each token
    token_slots: torch.Tensor      # [T] int64 cache slot of each token
    token_rows: torch.Tensor       # [T] int64 row of each token
    token_index: torch.Tensor      # [T] int64 index of each token within its row
    last: torch.Tensor             # [B] int64 each row's last token (into [T])
    padded_positions: torch.Tensor  # [B, max_q] position of query i of row b (padding:
    #                                 the row's first position)
    host_slots: tuple              # the same on the host
    host_starts: tuple
    host_counts: tuple

    @classmethod
    def build(cls, slots, starts, counts, device) -> "RowBatch":
        """Rows given as host ints: cache slot, first new position, number of new tokens
        (>= 1 each; slots distinct)."""
        B = len(slots)
        if not B or len(starts) != B or len(counts) != B or min(counts) < 1:
            raise ValueError(f"a row batch needs >= 1 rows of >= 1 tokens (slots {slots}, "
                             f"counts {counts})")
        cu = [0]
        for n in counts:
            cu.append(cu[-1] + n)
        pos, tslot, trow, tidx = [], [], [], []
        max_q = max(counts)
        padded = []
        for b, (s, p0, n) in enumerate(zip(slots, starts, counts)):
            pos.extend(range(p0, p0 + n))
            tslot.extend([s] * n)
            trow.extend([b] * n)
            tidx.extend(range(n))
            padded.append(list(range(p0, p0 + n)) + [p0] * (max_q - n))
        # one host->device copy for the whole description
        flat = to_device([*slots, *starts, *cu, *pos, *tslot, *trow, *tidx,
                          *(c - 1 for c in cu[1:]), *(x for r in padded for x in r)], device)
        T = cu[-1]
        parts = torch.split(flat, [B, B, B + 1, T, T, T, T, B, B * max_q])
        return cls(*parts[:8], parts[8].view(B, max_q), tuple(slots), tuple(starts),
                   tuple(counts))

    @property
    def n_rows(self) -> int:
        return len(self.host_slots)

    @property
    def n_tokens(self) -> int:
        return sum(self.host_counts)

    @property
    def max_q(self) -> int:
        """The most new tokens in one row."""
        return max(self.host_counts)

    @property
    def max_len(self) -> int:
        """The longest row after this forward (its cache positions in use)."""
        return max(p + n for p, n in zip(self.host_starts, self.host_counts))

    @property
    def max_len_hint(self) -> int | None:
        """max_len when known on the host (None in a graph-captured step, whose rows'
        positions are only on the device)."""
        return self.max_len if self.host_starts else None

    @property
    def is_decode(self) -> bool:
        """One new token per row."""
        return self.max_q == 1
