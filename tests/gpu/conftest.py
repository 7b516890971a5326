"""The GPU suite (``make gpu-test``): every test under ``tests/gpu`` is marked ``gpu`` and,
where torch sees no CUDA device, skipped with a reason that ``-ra`` lists (never silently),
so the CPU suite stays green and still imports every module here.

``CUBLAS_WORKSPACE_CONFIG`` is set before anything can start cuBLAS: with
``torch.use_deterministic_algorithms(True)`` (the ``deterministic`` fixture, and the SIGKILL
test's children) cuBLAS refuses to run without it.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: run `make gpu-test` on a GPU machine"
)


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            item.add_marker(NEEDS_CUDA)


@pytest.fixture
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the test, restored after it."""
    before = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark = cudnn


@pytest.fixture
def cuda_memory() -> Iterator[None]:
    """Return the cached GPU memory after the test, so the next one starts clean."""
    try:
        yield
    finally:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
