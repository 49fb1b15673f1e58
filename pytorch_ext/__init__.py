"""fastlayers: fused attention, layer norm and linear-with-epilogue for PyTorch, each in CUDA C++
and Triton, with a plain-PyTorch reference backend.

    import fastlayers as fl
    fl.layer_norm(x, weight, bias=None, eps=1e-5, *, residual=None, rms=False, backend=None)
    fl.attention(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, dropout_p=0.0,
                 deterministic=False, backend=None)
    fl.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *,
                              cache_leftpad=None, block_table=None, causal=True, softmax_scale=None,
                              backend=None)
    fl.linear(x, weight, bias=None, *, activation=None, residual=None, backend=None)
    fl.available_backends(); fl.last_backend(op); with fl.use_backend("triton"): ...
    fl.patch(hf_model, *, strict=True, backend=None) / fl.unpatch(hf_model): fastlayers inside a
        transformers BERT / RoBERTa / GPT-2 / BART model, in place (pytorch_ext/patch.py)

Importing fastlayers touches no GPU and loads no library; backends load on first use.
"""
__version__ = "0.1.0"

from . import nn  # noqa: E402
from .backends import (BACKENDS, BackendUnavailableError, available_backends, last_backend,  # noqa: E402
                       use_backend)
from .ops.attention import attention, attention_with_kvcache  # noqa: E402
from .ops.layer_norm import layer_norm  # noqa: E402
from .ops.linear import linear  # noqa: E402
from .patch import patch, unpatch  # noqa: E402  (transformers is imported only when a model is patched)

__all__ = ["layer_norm", "attention", "attention_with_kvcache", "linear", "available_backends", "last_backend", "use_backend", "BackendUnavailableError",
           "BACKENDS", "nn", "patch", "unpatch", "__version__"]
