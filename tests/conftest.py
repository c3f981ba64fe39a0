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


def pytest_collection_modifyitems(config, items):
    if _gpu_suite(config):
        return
    reason = ("needs a CUDA GPU and compiled kernels: run `pytest -m gpu` on a GPU machine"
              if not HAS_CUDA else "GPU tests run in their own session: `pytest -m gpu`")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
