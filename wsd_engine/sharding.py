"""Tensor-parallel sharding: which part of every weight a rank holds, and reading only that
part from the checkpoint.

The layout (the usual Megatron split, with one all-reduce after each row-parallel matmul):

    q/k/v       column-parallel by head: rank r has query heads [r*nq/N, (r+1)*nq/N) and
                the key/value heads they use (with fewer KV heads than ranks, e.g. MQA,
                each KV head is replicated on the N/nkv ranks whose query heads read it);
                Qwen2's q/k/v biases are split with their rows
    o_proj      row-parallel (its input columns of the rank's heads); its bias, if any,
                is added once (rank 0; zeros elsewhere) so the all-reduce sums it once
    gate/up     column-parallel: intermediate rows [r*I/N, (r+1)*I/N)
    down_proj   row-parallel, bias as o_proj
    embedding   vocabulary-parallel: rows [v0_r, v1_r); a token outside the shard looks up
                zeros and one all-reduce assembles the embeddings (a sum with one non-zero
                term per element: exact)
    lm_head     vocabulary-parallel, the same rows (a tied lm_head is the embedding shard)
    norms       replicated

Vocabulary shards are ceil(V/N) rows each, the last one shorter. A rank reads its slices
through the safetensors library's memory-mapped `get_slice`, never a whole tensor.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import UnsupportedModelError

MAX_TENSOR_PARALLEL = 64

_LAYER_TENSOR = re.compile(r"model\.layers\.\d+\.(.+)$")


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `world`: its ranges of query heads, KV heads, intermediate rows and
    vocabulary rows (half-open)."""

    rank: int
    world: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    inter: tuple[int, int]
    vocab: tuple[int, int]
    vocab_shard: int              # rows of the largest vocabulary shard (ceil(V/N))
    head_dim: int

    @classmethod
    def make(cls, cfg: ModelConfig, world: int, rank: int) -> "ShardPlan":
        check_splits(cfg, world)
        nq, nkv, inter, V = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size
        hq = nq // world
        if nkv % world == 0:
            hk = nkv // world
            kv = (rank * hk, (rank + 1) * hk)
        else:                    # fewer KV heads than ranks: world / nkv ranks share one
            k0 = rank // (world // nkv)
            kv = (k0, k0 + 1)
        hi = inter // world
        vs = -(-V // world)
        return cls(rank=rank, world=world, heads=(rank * hq, (rank + 1) * hq), kv_heads=kv,
                   inter=(rank * hi, (rank + 1) * hi),
                   vocab=(min(V, rank * vs), min(V, (rank + 1) * vs)), vocab_shard=vs,
                   head_dim=cfg.head_dim)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of this rank's layers: its heads, KV heads and intermediate size (the
        vocabulary size stays the model's: token ids are global)."""
        return dataclasses.replace(cfg, num_heads=self.heads[1] - self.heads[0],
                                   num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                                   intermediate_size=self.inter[1] - self.inter[0],
                                   eos_token_ids=list(cfg.eos_token_ids))

    def part(self, name: str) -> tuple[int, int, int] | None | str:
        """How this rank takes a checkpoint tensor: (dim, start, stop) to slice, None to
        read it whole (replicated), or "zeros" (a row-parallel bias on ranks > 0)."""
        hd = self.head_dim
        q = (self.heads[0] * hd, self.heads[1] * hd)
        kv = (self.kv_heads[0] * hd, self.kv_heads[1] * hd)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (0, *self.vocab)
        m = _LAYER_TENSOR.match(name)
        if m is None:
            return None
        t = m.group(1)
        if t in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            return (0, *q)
        if t in ("self_attn.k_proj.weight", "self_attn.k_proj.bias",
                 "self_attn.v_proj.weight", "self_attn.v_proj.bias"):
            return (0, *kv)
        if t == "self_attn.o_proj.weight":
            return (1, *q)
        if t in ("mlp.gate_proj.weight", "mlp.gate_proj.bias",
                 "mlp.up_proj.weight", "mlp.up_proj.bias"):
            return (0, *self.inter)
        if t == "mlp.down_proj.weight":
            return (1, *self.inter)
        if t in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            return None if self.rank == 0 else "zeros"
        return None

    def read(self, f, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's part of tensor `name` (full shape `shape`) from an open safetensors
        file: only the slice's bytes are read."""
        how = self.part(name)
        if how is None:
            return f.get_tensor(name)
        sl = f.get_slice(name)
        if how == "zeros":
            return torch.zeros(shape, dtype=_torch_dtype(sl.get_dtype()))
        dim, a, b = how
        return sl[a:b] if dim == 0 else sl[:, a:b]

    def shard_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's part of a tensor of shape `shape`."""
        how = self.part(name)
        if how is None or how == "zeros":
            return tuple(shape)
        dim, a, b = how
        return tuple(b - a if i == dim else s for i, s in enumerate(shape))


def check_splits(cfg: ModelConfig, world: int) -> None:
    """UnsupportedModelError unless heads, KV heads and the MLP divide over `world` ranks."""
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= MAX_TENSOR_PARALLEL:
        raise UnsupportedModelError(f"tensor_parallel must be an int in [1, "
                                    f"{MAX_TENSOR_PARALLEL}], got {world!r}")
    problems = _split_problems(cfg, world)
    if problems:
        ok = [n for n in range(1, min(cfg.num_heads, MAX_TENSOR_PARALLEL) + 1)
              if not _split_problems(cfg, n)]
        raise UnsupportedModelError(
            f"this model cannot be split over tensor_parallel={world} ranks: "
            f"{' and '.join(problems)} do not divide evenly; sizes that work: "
            f"{', '.join(map(str, ok))}")


def _split_problems(cfg: ModelConfig, world: int) -> list[str]:
    """What does not divide over `world` ranks (empty: the split works)."""
    nq, nkv, inter, V = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size
    problems = []
    if nq % world:
        problems.append(f"its {nq} attention heads")
    if nkv % world and world % nkv:
        problems.append(f"its {nkv} key/value heads (neither a multiple nor a divisor of "
                        f"{world})")
    if inter % world:
        problems.append(f"its intermediate size {inter}")
    if (world - 1) * -(-V // world) >= V:
        problems.append(f"its vocabulary of {V} (the last rank's share would be empty)")
    return problems


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "F64": torch.float64}


def _torch_dtype(name: str) -> torch.dtype:
    return _DTYPES.get(name, torch.float32)
