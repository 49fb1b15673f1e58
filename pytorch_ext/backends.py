"""Backend registry and selection: which implementation runs an op.

Backends: "torch" (the plain-PyTorch reference, always available), "triton" (CUDA tensors; CPU
tensors only under TRITON_INTERPRET=1), "cuda" (libfastlayers_cuda built and a GPU it was built for).

Selection rule (DESIGN.md): an explicit request -- the op's `backend=` argument, else the innermost
`use_backend(...)` context, else the FASTLAYERS_BACKEND environment variable -- must be able to run
the case or the call raises (never a silent fallback). With no request, a CUDA tensor goes to the
first backend of the op's AUTO_ORDER that supports the case and a CPU tensor to "torch".
Which backend ran is recorded per thread: `last_backend(op)`.

Nothing here touches the GPU at import; backend modules are imported on first use.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Callable, Iterator

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "FASTLAYERS_BACKEND"

_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the case."""


def _check_name(name, arg: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{arg}: expected one of {BACKENDS} or None, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, ops without a `backend=` argument use `name` (None: automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    stack = _stack()
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _stack() -> list:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def requested(explicit: str | None) -> str | None:
    """The explicit request in force: argument, then context, then environment; None = automatic."""
    if explicit is not None:
        return _check_name(explicit, "backend")
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, ENV_VAR)
    return None


def last_backend(op: str) -> str | None:
    """The backend that ran this thread's last eager call of `op` (e.g. "layer_norm")."""
    return getattr(_local, "last", {}).get(op)


def _record(op: str, name: str) -> None:
    last = getattr(_local, "last", None)
    if last is None:
        last = _local.last = {}
    last[op] = name


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install raises more than ImportError
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_reason(backend: str, device) -> str | None:
    """Why `backend` cannot run on tensors of `device` at all (None: it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        err = triton_import_error()
        if err:
            return err
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return (f"triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                f"got a tensor on {device}")
    if backend == "cuda":
        from . import _cuda
        err = _cuda.load_error()
        if err:
            return err
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got a tensor on {device}"
        return _cuda.device_error(device.index if device.index is not None else _current_device())
    raise AssertionError(backend)


def _current_device() -> int:
    import torch
    return torch.cuda.current_device()


class OpBackends:
    """Per-op table: backend name -> module exposing the op's launchers and unsupported_reason."""

    def __init__(self, op: str, modules: dict[str, str | Callable], auto_order: tuple[str, ...]):
        self.op = op
        self._sources = modules
        self._modules: dict = {}
        self.auto_order = auto_order

    def module(self, name: str):
        mod = self._modules.get(name)
        if mod is None:
            src = self._sources[name]
            mod = importlib.import_module(src) if isinstance(src, str) else src()
            self._modules[name] = mod
        return mod

    def reason(self, name: str, device, case_reason) -> str | None:
        """Why backend `name` cannot run this case, or None. case_reason(name, module) adds the
        op's own limits to the module's unsupported_reason."""
        r = device_reason(name, device)
        if r is None:
            r = case_reason(name, self.module(name))
        return r

    def select(self, explicit: str | None, device, case_reason) -> str:
        """Resolves the backend for one call (raises for an explicit backend that cannot run it)."""
        want = requested(explicit)
        if want is not None:
            r = self.reason(want, device, case_reason)
            if r is not None:
                raise BackendUnavailableError(f"{self.op}: backend {want!r} cannot run this case: {r}")
            return want
        if device.type != "cuda":
            return "torch"
        for name in self.auto_order:
            if self.reason(name, device, case_reason) is None:
                return name
        return "torch"

    def record(self, name: str) -> None:
        _record(self.op, name)


def available_backends() -> dict[str, dict]:
    """Which backends can run here, and why not the others:
    {"torch": {"available": True, "reason": None}, "triton": {...}, "cuda": {...}}.
    "available" means usable for CUDA tensors on this machine (triton: also CPU tensors when
    TRITON_INTERPRET=1)."""
    import torch

    out = {"torch": {"available": True, "reason": None}}
    has_gpu = torch.cuda.is_available()
    err = triton_import_error()
    if err is None and not has_gpu and not triton_interpreting():
        err = "no CUDA GPU found (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
    out["triton"] = {"available": err is None, "reason": err}
    from . import _cuda
    err = _cuda.load_error()
    if err is None and not has_gpu:
        err = "library loaded, but no CUDA GPU found"
    if err is None:
        err = _cuda.device_error(torch.cuda.current_device())
    out["cuda"] = {"available": err is None, "reason": err}
    return out
