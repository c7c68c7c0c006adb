"""Shared pytest setup: ``gpu``-marked tests skip cleanly when there is no CUDA device or no CUDA build of k2;
``one_thread`` runs a test with one intra-op thread."""

from __future__ import annotations

import pytest
import torch


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from k2 import _C
    except ImportError:
        return "k2._C is not built"
    if not _C.build_info()["cuda"]:
        return "k2._C was built without CUDA kernels"
    return None


@pytest.fixture
def one_thread():
    """Small tensors: a second intra-op thread only adds synchronisation on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
