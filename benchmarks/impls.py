"""Shared pieces of the per-op job lists: the run configuration, fastlayers ops looked up defensively
(an op or backend missing from this build becomes a "not available: ..." row, never a crash),
torch.compile builders, and optional third-party baselines imported on demand.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    backends: list[str]              # fastlayers backends to measure
    max_autotune: bool = True        # torch.compile(mode="max-autotune") rows (off in --quick)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def fl_op(name: str):
    """(function, None) or (None, "not available: ...") for a public fastlayers op."""
    try:
        import fastlayers as fl
    except Exception as e:  # the package itself failing to import is a result to record
        return None, f"not available: import fastlayers failed ({type(e).__name__}: {e})"
    fn = getattr(fl, name, None)
    if fn is None:
        return None, f"not available: fastlayers.{name} is not defined in this build"
    return fn, None


def backend_skip(backend: str) -> str | None:
    """A "not available: ..." status when fl.available_backends() says the backend cannot run here.
    The torch backend always runs: not asking keeps a CPU run from importing triton (~1 s)."""
    if backend == "torch":
        return None
    try:
        import fastlayers as fl
        info = fl.available_backends()
    except Exception:
        return None  # no registry to ask: try the call, its exception will say why
    entry = info.get(backend)
    if entry is None:
        return f"not available: backend {backend!r} unknown (known: {', '.join(info)})"
    if not entry.get("available", False):
        return f"not available: {entry.get('reason') or 'backend unavailable'}"
    return None


def fl_jobs_spec(op: str, cfg: Config):
    """[(impl name, backend, function or None, skip status or None)] for the configured backends."""
    fn, why = fl_op(op)
    out = []
    for b in cfg.backends:
        skip = why or backend_skip(b)
        out.append((f"fastlayers[{b}]", b, fn, skip))
    return out


def compiled(fn, **kwargs):
    """A builder: a fresh torch.compile of fn with static shapes, after clearing dynamo's caches
    (each case compiles for its own shape; the recompile limit never silently falls back to eager).
    torch._dynamo is imported here, when a compile row runs, never at `fastlayers bench` start-up."""
    def build():
        import torch._dynamo
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False, **kwargs)
    return build


def optional(module: str):
    """(module, None) or (None, "not available: ... not importable")."""
    try:
        return importlib.import_module(module), None
    except Exception as e:
        return None, f"not available: {module} not importable ({type(e).__name__})"


def randn(shape, cfg: Config, scale: float = 1.0, offset: float = 0.0):
    t = torch.randn(*shape, device=cfg.device, dtype=cfg.dtype) * scale
    return t + offset if offset else t
