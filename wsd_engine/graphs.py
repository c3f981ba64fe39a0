"""CUDA graphs of a `Model`: capture once over static buffers, replay with new contents.

All the static buffers of a graph sit in one dict, kept in `model.graphs` under its kind:

    "decode"         one token of the one-sequence phases (cache slot 0):
                     `Model.decode_one_token` (`generate`'s steps)
                     {"graph", "token" [1], "pos" [1], "out" [1, V]}
    ("prefill", b)   a prompt of n <= b tokens in slot 0, padded to b with copies of its
                     last token: `Model.prefill` (`generate`'s prompt)
                     {"graph", "token" [b], "pos" [1], "row" [1], "out" [1, V]}
    ("rows", b)      one token for each of b rows, each in its own cache slot (the batched
                     decode step of the WSD engine): `Model.decode_rows`
                     {"graph", "token" [b], "meta" [2b] (slots, then positions), "batch"
                     (the RowBatch over those buffers), "out" [b, V]}

A call replays the smallest graph of its kind that holds it and runs eagerly when none
does. A replay reads nothing back to the host: inputs go in by device copies, fills, and
(rows) one copy of the rows' slots and positions from pinned host memory. Outputs are
the static "out" buffers: the next replay overwrites them.

Each graph has its own memory pool: a shared pool could hand one graph's freed
intermediates to another graph's output, which the first graph's replay would overwrite.
Capturing needs CUDA and the triton backend (`Model.can_capture`); it writes cache
positions from 0 (of slot 0, or of slots 0..b-1) and resets the cache, holding the model
(`Model.reserved`: a sequence parked there is put back by its owner's next use). A graph
keeps the kernels it was captured with (`Model.set_decode_kernels` refuses to change them
while graphs exist: `clear_graphs` first).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import ConfigError
from .rows import RowBatch

if TYPE_CHECKING:
    from .runner import Model

# prompt lengths with a prefill graph (`capture_prefill`): a prompt runs in the smallest
# that holds it, so the padding is under 2x (weight reads dominate at these sizes)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
# batch sizes with a batched decode graph (`capture_decode_rows`): B rows replay the
# smallest captured size >= B, padded
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def check_sizes(sizes, what: str = "buckets") -> tuple[int, ...]:
    """A non-empty list / tuple of positive ints (ConfigError otherwise), sorted, unique."""
    if (not isinstance(sizes, (list, tuple)) or not sizes
            or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes)):
        raise ConfigError(f"{what} must be a non-empty list or tuple of positive ints, got "
                          f"{sizes!r}")
    return tuple(sorted(set(sizes)))


def row_graph_sizes(buckets, max_rows: int) -> list[int]:
    """The batch sizes `capture_decode_rows` captures for at most `max_rows` rows: the
    buckets below max_rows, and max_rows itself when it is not above the largest bucket
    (so a full batch never pads past the slots, e.g. (1, 2, 4) and 3 rows -> [1, 2, 3]).
    A max_rows above every bucket adds nothing: those larger batches run eagerly."""
    sizes = [b for b in check_sizes(buckets, "graph batch sizes") if b < max_rows]
    return sizes + [max_rows] if max_rows <= max(buckets) else sizes


# ---- capture --------------------------------------------------------------------------
def capture_decode(model: "Model") -> None:
    """The one-token step of slot 0; `decode_one_token` then replays it. Resets the cache."""
    _need_capture(model)
    g = {"token": _zeros(model, 1), "pos": _zeros(model, 1)}
    _capture(model, "decode", g, lambda: model.forward_at(g["token"], g["pos"]))


def capture_prefill(model: "Model", buckets=PREFILL_BUCKETS) -> None:
    """The prompt prefill of slot 0 for each bucket size b that fits the cache: b tokens at
    a device start position, the logits of one row picked through a static index. `prefill`
    of n tokens then replays the smallest bucket b >= n that fits after the start, the
    prompt padded with copies of its last token (their K/V, past the prompt, are never
    read); longer prompts run eagerly. Resets the cache."""
    buckets = check_sizes(buckets, "prefill buckets")
    _need_capture(model)
    for b in buckets:
        if b <= model.max_seq_len:
            g = {"token": _zeros(model, b), "pos": _zeros(model, 1), "row": _zeros(model, 1)}
            _capture(model, ("prefill", b), g,
                     lambda g=g: model.forward_at(g["token"], g["pos"], rows=g["row"]))


def capture_decode_rows(model: "Model", buckets=GRAPH_BATCH_SIZES,
                        max_rows: int | None = None) -> list[int]:
    """The batched decode step (one token per row, each row at its slot's length) for each
    size of `row_graph_sizes(buckets, max_rows)` (max_rows: default and at most the
    model's cache slots). `decode_rows` of B rows then replays the smallest size >= B.
    Returns the sizes captured. Resets the cache."""
    check_sizes(buckets, "graph batch sizes")
    _need_capture(model)
    max_rows = model.max_batch_size if max_rows is None else min(max_rows,
                                                                  model.max_batch_size)
    sizes = row_graph_sizes(buckets, max_rows)
    for b in sizes:
        token, meta = _zeros(model, b), _zeros(model, 2 * b)
        meta[:b] = torch.arange(b, device=model.device)      # capture: slots 0..b-1 at 0
        slots, pos = meta[:b], meta[b:]
        ar = torch.arange(b + 1, device=model.device)
        # one token per row: token b is row b, its position the row's start; the host
        # fields are unknown (rows live on the device only), so the kernels read nothing
        # on the host (max_len_hint None)
        batch = RowBatch(slots=slots, starts=pos, cu_seqlens=ar, positions=pos,
                         token_slots=slots, token_rows=ar[:b], token_index=_zeros(model, b),
                         last=ar[:b], padded_positions=pos.view(b, 1), host_slots=(),
                         host_starts=(), host_counts=(1,) * b)
        g = {"token": token, "meta": meta, "batch": batch}
        _capture(model, ("rows", b), g,
                 lambda g=g: model.forward_rows(g["token"], g["batch"]))
    return sizes


def clear_graphs(model: "Model") -> None:
    """Drop every captured graph (and its memory pool); calls run eagerly until the next
    capture."""
    model.graphs.clear()


def _need_capture(model: "Model") -> None:
    if not model.can_capture:
        raise ConfigError("CUDA graphs need device='cuda' and backend='triton' "
                          f"(this model: {model.device}, {model.backend})")


def _zeros(model: "Model", n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64, device=model.device)


def _capture(model: "Model", key, g: dict, body) -> None:
    """Capture body() (reading g's input buffers) as graph `key`: g gets "graph" and
    "out" and goes into model.graphs."""
    with model.reserved():
        with torch.inference_mode():
            g["graph"], g["out"] = _record(body)
        model.cache.reset()
    model.graphs[key] = g


def _record(body):
    """(CUDA graph of body(), its output): two warm-up runs on a side stream (compile the
    kernels, settle allocations), then the capture, in a memory pool of its own. The one
    CUDA-only step (tests/_graph_standins.py stands in for it on CPU)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


# ---- replay: the caller checks the cache room and keeps the cache lengths --------------
def replay_decode(model: "Model", token: torch.Tensor, start: int) -> torch.Tensor | None:
    """Logits [1, V] (the static buffer) of token [1] at position `start` of slot 0, or None
    without a decode graph."""
    g = model.graphs.get("decode")
    if g is None:
        return None
    g["token"].copy_(token.reshape(1))
    g["pos"].fill_(start)                       # a fill kernel: no host sync
    g["graph"].replay()
    return g["out"]


def replay_prefill(model: "Model", tokens: torch.Tensor, start: int) -> torch.Tensor | None:
    """Logits [V] of the last of tokens [n] prefilled at `start` of slot 0 (a copy), or
    None when no prefill graph holds n tokens there. Positions [start + n, start + b) get
    the padding's K/V, past the length the caller sets: never attended to."""
    n = tokens.shape[0]
    fits = [key[1] for key in model.graphs
            if isinstance(key, tuple) and key[0] == "prefill"
            and n <= key[1] and start + key[1] <= model.max_seq_len]
    if not fits:
        return None
    b = min(fits)
    g = model.graphs[("prefill", b)]
    g["token"][:n].copy_(tokens)
    if b > n:
        g["token"][n:].copy_(tokens[-1:].expand(b - n))
    g["pos"].fill_(start)
    g["row"].fill_(n - 1)
    g["graph"].replay()
    return g["out"][0].clone()                  # the static buffer is the next replay's


def row_graph(model: "Model", n_rows: int) -> int | None:
    """The size of the smallest batched decode graph holding n_rows rows, or None."""
    sizes = [key[1] for key in model.graphs
             if isinstance(key, tuple) and key[0] == "rows" and key[1] >= n_rows]
    return min(sizes) if sizes else None


def replay_rows(model: "Model", tokens: torch.Tensor, slots, starts) -> torch.Tensor | None:
    """Logits [B, V] (a view of the static buffer) of tokens [B] (on the device) appended
    at positions starts[b] of cache slots slots[b] (host ints), or None when no batched
    decode graph holds B rows. Rows B..b-1 of the graph repeat the last row (its slot,
    position and token: the same K/V written twice; their logits are not returned)."""
    B = len(slots)
    b = row_graph(model, B)
    if b is None:
        return None
    g, pad = model.graphs[("rows", b)], b - B
    g["token"][:B].copy_(tokens)
    if pad:
        g["token"][B:].copy_(tokens[B - 1:].expand(pad))
    meta = [*slots, *[slots[-1]] * pad, *starts, *[starts[-1]] * pad]
    host = torch.tensor(meta, dtype=torch.int64, pin_memory=model.device.type == "cuda")
    g["meta"].copy_(host, non_blocking=True)    # from pinned memory: no host sync
    g["graph"].replay()
    return g["out"][:B]
