"""Programmatic dependent launch (PDL, sm_90+): the next kernel of a decode step starts
while the current one finishes.

At batch 1 a decode step is a chain of short kernels, each waiting for the previous one to
end before it is even launched; the gap and the ramp of every kernel (a few µs) add up over
~160 kernels per step. With PDL (`launch_pdl=True`), a kernel may be scheduled as soon as
every program of its predecessor has executed `griddepcontrol.launch_dependents`; it must
execute `griddepcontrol.wait` (returns once the predecessor has completed and its writes are
visible) before it touches anything the predecessor, or anything after its own wait, writes.

The discipline every PDL kernel here follows, which keeps the chain race-free:
  1. before its wait a program reads only model weights (never written during a step) and
     computes addresses;
  2. it signals `launch_dependents` right after its own wait, so a kernel can be running
     ahead of at most one unfinished predecessor, and everything two launches back is done.
`griddepcontrol.wait` is a no-op in a kernel launched without PDL, so a PDL kernel after an
ordinary one (a torch op) is still ordered by the stream.

Off by default (`PDL_DEFAULT`) until a GPU run shows it pays:
`python -m benchmarks.run --suite decode` times the fused-gemv decode step with and without.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import capability

# TritonOps.pdl's default. UNMEASURED (written without a GPU): see benchmarks/NOTES.md.
PDL_DEFAULT = False


def pdl_supported(device) -> bool:
    """PDL needs a compiled kernel (not the interpreter) on an sm_90+ CUDA device.
    `WSD_ENGINE_NO_PDL=1` in the environment turns it off everywhere (pdl=True then launches
    ordinarily and start-up tuning leaves the PDL settings out), for a driver or tool that
    mishandles PDL launches."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("WSD_ENGINE_NO_PDL") == "1":
        return False
    return capability(device)[0] >= 9


def use_pdl(pdl: bool | None, device) -> bool:
    """The launch flag for a `pdl=` argument: None follows PDL_DEFAULT; True where the
    device cannot do it is a no-op (the kernel runs as an ordinary launch)."""
    if pdl is None:
        pdl = PDL_DEFAULT
    if not isinstance(pdl, bool):
        raise ValueError(f"pdl must be True, False or None (PDL_DEFAULT), got {pdl!r}")
    return pdl and pdl_supported(device)


@triton.jit
def pdl_wait():
    """griddepcontrol.wait: returns once the predecessor grid completed and its memory
    operations are visible (a no-op in a kernel launched without PDL). Written as inline
    PTX, not pure (some Triton releases marked their helper pure, which lets it be dropped)."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def pdl_release():
    """griddepcontrol.launch_dependents: the next kernel may launch once every program of
    this one has executed it (or exited)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2(ptrs):
    """An L2 prefetch of the 128-byte line of each pointer (a hint: no data returned, no
    ordering; pass only addresses inside an allocation). For the time a kernel spends
    before its PDL wait."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def pdl_wait_then_release(PDL: tl.constexpr):
    """Wait for the predecessor kernel (its writes become visible), then let the next
    kernel launch. Nothing when PDL is off (the interpreter never sees the PTX)."""
    if PDL:
        pdl_wait()
        pdl_release()


__all__ = ["PDL_DEFAULT", "pdl_supported", "use_pdl", "pdl_wait", "pdl_release",
           "prefetch_l2", "pdl_wait_then_release"]
