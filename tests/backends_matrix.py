"""Which kernel backends a test can run here: Triton through the interpreter on CPU tensors when
there is no GPU; Triton and CUDA on CUDA tensors (marked gpu) when there is one."""
import pytest

from conftest import HAS_CUDA, INTERPRET


def kernel_backend_cases():
    cases = []
    if INTERPRET:
        cases.append(pytest.param("triton", "cpu", id="triton-interp"))
    if HAS_CUDA:
        cases += [pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-gpu"),
                  pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda-gpu")]
    return cases or [pytest.param("triton", "cpu", marks=pytest.mark.skip(reason="no Triton path here"))]
