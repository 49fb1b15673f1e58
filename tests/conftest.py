"""Test session setup.

Without a CUDA GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported -- hence here, at collection start. With a GPU the
interpreter stays off and the Triton tests run compiled kernels on CUDA tensors.
Tests marked `gpu` are skipped without a GPU.
"""
import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs torch on one thread: the tensors and models are tiny, and intra-op threads
    cost more than the math on a loaded 2-core runner (up to 30x measured); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test, so no two tests share inputs; stable per test id for reproducible
    # failures, and shifted by FASTLAYERS_TEST_SEED to draw fresh inputs on demand.
    base = int(os.environ.get("FASTLAYERS_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + base) % (2**31))
    yield
