"""Triton kernels of wsd_engine, installed as `wsd_engine.kernels`.

Each module holds one operation: `_name_kernel` (@triton.jit), the launcher `name()` and a
pure-torch `name_ref()`; the batched (per-row) variants are `name_rows()` / `name_rows_ref()`
next to them. Helpers used by more than one module (Triton helpers such as RoPE, the online
softmax and bf16 rounding; argument checks) live in `_common.py`: a module imports those from
there, never another kernel module's private names. RoPE has no kernel of its own (the
attention kernels apply it); its torch reference `rope_ref` and the `rope_tables` that tests
and benchmarks use are in `_common.py` too.
Importing this package imports Triton; `import wsd_engine` never does.
On a CPU-only machine the kernels run only under TRITON_INTERPRET=1 (set before import).
"""
