"""Programmatic dependent launch (kernels/pdl.py): the switch on CPU, and on an sm_90 GPU
that a PDL launch really starts before its predecessor ends, eagerly and in a CUDA graph
(otherwise the `pdl` option could be silently inert: correct, and no faster)."""
import pytest
import torch
import triton
import triton.language as tl

from wsd_engine.kernels import pdl as pdl_mod
from wsd_engine.kernels.pdl import pdl_release, pdl_supported, pdl_wait, use_pdl


def test_pdl_can_be_turned_off_from_the_environment(monkeypatch):
    """WSD_ENGINE_NO_PDL=1 wins over a capable GPU (checked without one: the capability is
    stubbed as sm_90 and the interpreter switched off for the check)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl_mod, "capability", lambda device: (9, 0))
    monkeypatch.delenv("WSD_ENGINE_NO_PDL", raising=False)
    assert pdl_supported("cuda") and use_pdl(True, "cuda")
    monkeypatch.setenv("WSD_ENGINE_NO_PDL", "1")
    assert not pdl_supported("cuda") and not use_pdl(True, "cuda")


def test_pdl_switch_on_cpu(monkeypatch):
    assert not pdl_supported("cpu") and not use_pdl(True, "cpu")      # a no-op here
    monkeypatch.setattr(pdl_mod, "PDL_DEFAULT", True)
    assert not use_pdl(None, "cpu")
    for bad in ("yes", 1, 0.0):
        with pytest.raises(ValueError, match="pdl must be"):
            use_pdl(bad, "cpu")


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _busy_kernel(out_ptr, NS: tl.constexpr, PDL: tl.constexpr):
    """Releases its dependents first, then spins NS ns and stamps the time it ends."""
    if PDL:
        pdl_release()
    t0 = _now()
    t = t0
    while t - t0 < NS:
        t = _now()
    tl.store(out_ptr, t)


@triton.jit
def _early_kernel(out_ptr, PDL: tl.constexpr):
    """Stamps the time it starts (before its wait), then the time after the wait."""
    start = _now()
    if PDL:
        pdl_wait()
    tl.store(out_ptr, start)
    tl.store(out_ptr + 1, _now())


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_pdl_launch_overlaps_its_predecessor(graph):
    if not pdl_supported("cuda"):
        pytest.skip("PDL needs an sm_90+ GPU")
    spin_ns = 200_000   # far longer than a host launch: the eager case has margin too
    ends = torch.zeros(1, dtype=torch.int64, device="cuda")
    stamps = torch.zeros(2, dtype=torch.int64, device="cuda")

    def pair(pdl):
        _busy_kernel[(1,)](ends, NS=spin_ns, PDL=pdl, launch_pdl=pdl)
        _early_kernel[(1,)](stamps, PDL=pdl, launch_pdl=pdl)

    for pdl in (False, True):
        pair(pdl)                                            # compile outside any capture
        torch.cuda.synchronize()
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                pair(pdl)
            g.replay()
        else:
            pair(pdl)
        torch.cuda.synchronize()
        end, start, after_wait = ends.item(), stamps[0].item(), stamps[1].item()
        assert after_wait >= end                            # the wait always held
        if pdl:   # started while the predecessor was still spinning
            assert start < end - spin_ns // 2, (start, end)
        else:     # an ordinary launch starts after its predecessor ended
            assert start >= end, (start, end)
