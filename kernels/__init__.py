"""Triton kernels of wsd_engine, installed as `wsd_engine.kernels`.

Each module holds one operation: `_name_kernel` (@triton.jit), the launcher `name()` and a
pure-torch `name_ref()`. Importing this package imports Triton; `import wsd_engine` never does.
On a CPU-only machine the kernels run only under TRITON_INTERPRET=1 (set before import).
"""
