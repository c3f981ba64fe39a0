"""Test setup: offline hub, Triton interpreter unless the GPU suite was asked for.

`pytest` runs the CPU suite (Triton kernels under TRITON_INTERPRET=1, on CPU tensors) on
any machine; `pytest -m gpu` on a CUDA machine runs the GPU suite with compiled kernels.
The interpreter is process-wide and must be chosen before any kernel is decorated, so the
two suites run in separate pytest invocations.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _gpu_suite(config) -> bool:
    expr = (config.getoption("markexpr") or "").replace(" ", "")
    return HAS_CUDA and "gpu" in expr and "notgpu" not in expr


def pytest_configure(config):
    if not _gpu_suite(config):
        os.environ["TRITON_INTERPRET"] = "1"
        _check_interpreter()


def _check_interpreter():
    """The kernels loop over ranges bounded by values they load; some Triton releases'
    interpreters cannot (3.6.0 with NumPy 2.4: "only 0-dimensional arrays can be converted
    to Python scalars"). One clear error here instead of a failure in every kernel test."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return   # the torch-only tests still run; kernel tests fail on their import

    @triton.jit
    def _probe(n_ptr, out_ptr):
        n = tl.load(n_ptr)
        acc = n * 0
        for _ in range(0, n, 1):
            acc += 1
        tl.store(out_ptr, acc)

    n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](n, out)
        ok = out.item() == 3
    except Exception as e:  # noqa: BLE001 - reported below with the fix
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = f"a 3-step loop ran {out.item()} times"
    if not ok:
        import numpy
        raise pytest.UsageError(
            f"the CPU suite runs the Triton kernels in Triton's interpreter, and this one "
            f"(triton {triton.__version__}, numpy {numpy.__version__}) cannot run a loop "
            f"bounded by a loaded value ({why}). Install the Triton that matches torch 2.13: "
            f"pip install triton==3.7.1 (or run `pytest -m gpu` on a CUDA machine).")


def pytest_collection_modifyitems(config, items):
    if _gpu_suite(config):
        return
    reason = ("needs a CUDA GPU and compiled kernels: run `pytest -m gpu` on a GPU machine"
              if not HAS_CUDA else "GPU tests run in their own session: `pytest -m gpu`")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_process_left():
    """Fails a test that leaves worker processes behind (and stops them); tensor-parallel
    test modules use it for every test (`pytestmark`)."""
    import multiprocessing
    before = {p.pid for p in multiprocessing.active_children()}
    yield
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    for p in left:
        p.kill()
    assert not left, f"worker processes left behind: {left}"
