"""fastlayers: fused attention, layer norm and linear-with-epilogue for PyTorch, each in CUDA C++
and Triton, with a plain-PyTorch reference backend.

    import fastlayers as fl
    fl.layer_norm(x, weight, bias=None, eps=1e-5, *, residual=None, rms=False, backend=None)
    fl.available_backends()

Importing fastlayers touches no GPU and loads no library; backends load on first use.
"""
__version__ = "0.1.0"

from . import nn  # noqa: E402
from .backends import (BACKENDS, BackendUnavailableError, available_backends, last_backend,  # noqa: E402
                       use_backend)
from .ops.layer_norm import layer_norm  # noqa: E402

__all__ = ["layer_norm", "available_backends", "last_backend", "use_backend", "BackendUnavailableError",
           "BACKENDS", "nn", "__version__"]
