"""Measurement core of `fastlayers bench`: jobs, timers, the run loop, peaks and the environment header.

A Job is one (case, variant, implementation) row. The Runner times it and returns a result dict;
it never raises for a job: an implementation that cannot run a case is recorded as
"unsupported: <message>", a missing one as "not available: <why>", a crash as "error: <message>".
GPU timing is triton.testing.do_bench (CUDA events, median, warm-up, L2 flushed before each call)
over a rotation of input sets whose total size exceeds twice the L2, so a call never finds its
inputs in cache. CPU timing (no GPU) is a perf_counter loop, median per call. Host-overhead jobs
time a Python loop of many calls with a CPU timer and synchronise once at the end.
Nothing here touches the GPU at import.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Exceptions that mean "this implementation does not take this case" (validation at an op boundary).
_UNSUPPORTED = (ValueError, TypeError, NotImplementedError)


@dataclass
class Job:
    group: str                       # "norm" | "attention" | "linear"
    case: dict                       # shape parameters shown in the table and stored in JSON
    variant: str                     # "fwd" | "bwd" | "fwd+bwd" | "fwd_residual" | "decode" | "host_nograd" | "host_grad"
    impl: str                        # e.g. "fastlayers[triton]", "torch eager", "torch.compile"
    unit: str                        # "GB/s" | "TFLOP/s" | "us/call"
    work: float                      # bytes or FLOPs of one call (formulas.py); unused for us/call
    inputs_key: tuple                # jobs with equal keys share input sets (made once)
    make_inputs: Callable[[], dict]  # one fresh input set on the device
    build: Callable[[], Callable[[dict], Any]] | None = None   # returns call(inputs); run once per job
    grad_keys: tuple = ()            # inputs differentiated by bwd / fwd+bwd variants
    context: Callable[[], Any] | None = None   # context manager entered around the whole measurement
    fl_op: str | None = None         # fastlayers op name, for fl.last_backend
    fl_backend: str | None = None    # the backend this row asked for
    peak: str | None = None          # "bandwidth" | "gemm": what the rate is a fraction of
    skip: str | None = None          # status decided before running (e.g. "not available: ...")
    is_reference: bool = False       # the torch-eager row that speed-ups are relative to
    note: str | None = None          # shown in JSON (e.g. "gelu tanh approximation")
    compare: bool = True             # record max |out - eager| (off when the row computes something else)
    timing: str = "device"           # "device" | "host"
    host_iters: int = 1000

    def row_key(self) -> tuple:
        return (self.group, tuple(sorted(self.case.items())), self.variant)


def short_message(e: BaseException, limit: int = 240) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# progress bar (stderr; redraws in place on a terminal, prints a line every 5% in a log)

class Progress:
    def __init__(self, total: int, stream=None, width: int = 30):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_pct_logged = -5
        self.t0 = time.perf_counter()

    def update(self, label: str) -> None:
        self.done += 1
        frac = self.done / self.total
        pct = int(100 * frac)
        filled = int(self.width * frac)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        line = f"[{bar}] {self.done}/{self.total} {elapsed:6.1f}s {label}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.done >= self.total:
                self.stream.write("\n")
        elif pct >= self.last_pct_logged + 5 or self.done >= self.total:
            self.last_pct_logged = pct
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# environment header

def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown (nvidia-smi not found)" if smi is None else "unknown (nvidia-smi failed)"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception as e:  # an optional package that fails to import is reported, not fatal
        return f"not importable ({type(e).__name__})"


def environment(device: torch.device, dtype: torch.dtype, quick: bool, argv: list[str] | None = None) -> dict:
    import fastlayers
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "fastlayers": getattr(fastlayers, "__version__", "unknown"),
        "git_commit": _git_commit(),
        "dtype": str(dtype).replace("torch.", ""),
        "quick": quick,
        "command": " ".join(argv) if argv is not None else " ".join(sys.argv),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "card": props.name,
            "driver": _driver_version(),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": l2_bytes(device),
        })
    else:
        env.update({"card": f"cpu ({platform.processor() or platform.machine()})", "driver": "none",
                    "cpu_threads": torch.get_num_threads()})
    return env


def l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    size = getattr(props, "L2_cache_size", None) or getattr(props, "l2_cache_size", None)
    return int(size) if size else 50 * 2**20


def card_slug(env: dict) -> str:
    name = env["card"] if env["device_type"] == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug or "unknown"


# ---------------------------------------------------------------------------------------------
# timers

def gpu_time_ms(fn: Callable[[], Any], quick: bool, grad_to_none=None) -> float:
    from triton.testing import do_bench
    warmup, rep = (10, 40) if quick else (25, 100)
    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def cpu_time_ms(fn: Callable[[], Any], min_seconds: float = 0.05, min_reps: int = 3, max_reps: int = 200) -> float:
    fn()
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure_peaks(device: torch.device, quick: bool) -> dict:
    """The card's copy bandwidth (bytes read + written) and bf16 GEMM rate, measured now."""
    from triton.testing import do_bench
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(2**30, free // 8)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = float(do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median"))
    copy_gbs = 2 * nbytes / (ms * 1e-3) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # (n, n)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # (n, n)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)  # (n, n)
    ms_mm = float(do_bench(lambda: torch.mm(a, b, out=c), warmup=25, rep=100 if not quick else 60,
                           return_mode="median"))
    gemm_tflops = 2.0 * n ** 3 / (ms_mm * 1e-3) / 1e12
    del a, b, c
    torch.cuda.empty_cache()
    return {"copy_bandwidth_gbs": round(copy_gbs, 1), "copy_bytes": 2 * nbytes, "copy_ms": ms,
            "bf16_gemm_tflops": round(gemm_tflops, 1), "gemm_shape": [n, n, n], "gemm_ms": ms_mm}


# ---------------------------------------------------------------------------------------------
# the run loop

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _set_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def _with_grad(inputs: dict, grad_keys: tuple) -> dict:
    out = dict(inputs)
    for k in grad_keys:
        out[k] = inputs[k].detach().requires_grad_(True)
    return out


class Runner:
    """Runs jobs in order; jobs of one (case, variant) must start with their reference row."""

    def __init__(self, device: torch.device, quick: bool, peaks: dict | None, max_seconds: float | None = None,
                 max_sets: int = 32):
        self.device = device
        self.quick = quick
        self.peaks = peaks or {}
        self.deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self.max_seconds = max_seconds
        self.max_sets = max_sets
        self.l2 = l2_bytes(device) if device.type == "cuda" else 0
        self._sets_key = None
        self._sets: list[dict] = []
        self._ref_ms: dict = {}
        self._ref_out: dict = {}

    # input sets, shared by the jobs of one case
    def _input_sets(self, job: Job) -> list[dict]:
        if self._sets_key != job.inputs_key:
            self._sets, self._sets_key = [], None
            self._free()
            first = job.make_inputs()
            n = 1
            if self.device.type == "cuda" and job.timing == "device":
                # enough sets that their total is over twice the L2: rotation never hits in cache
                n = max(1, min(self.max_sets, math.ceil(2 * self.l2 / max(1, _set_bytes(first)))))
            self._sets = [first] + [job.make_inputs() for _ in range(n - 1)]
            self._sets_key = job.inputs_key
        return self._sets

    def _free(self):
        # only on a GPU, only between cases or after a failure: gc.collect costs ~0.1 s a call
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time(self, fn, grad_to_none=None) -> float:
        if self.device.type == "cuda":
            return gpu_time_ms(fn, self.quick, grad_to_none)
        return cpu_time_ms(fn)

    def run(self, job: Job) -> dict:
        row = {"group": job.group, "case": dict(job.case), "variant": job.variant, "impl": job.impl,
               "unit": job.unit, "work": job.work, "time_ms": None, "rate": None, "fraction_of_peak": None,
               "peak": job.peak, "speedup_vs_eager": None, "backend_ran": None, "max_abs_diff_vs_eager": None,
               "reference": job.is_reference, "status": "ok"}
        if job.note:
            row["note"] = job.note
        if job.skip:
            row["status"] = job.skip
            return row
        if self.deadline is not None and time.perf_counter() > self.deadline:
            row["status"] = f"skipped: time budget (--max-seconds {self.max_seconds:g}) exhausted"
            return row
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with (job.context() if job.context else contextlib.nullcontext()):
                    self._measure(job, row)
        except torch.cuda.OutOfMemoryError as e:
            row["status"] = f"error: out of memory ({short_message(e, 120)})"
        except _Unsupported as e:
            row["status"] = f"unsupported: {e}"
        except Exception as e:  # one bad row never ends the run; the message is kept
            row["status"] = f"error: {short_message(e)}"
        if row["status"] != "ok":
            row["time_ms"] = row["rate"] = row["fraction_of_peak"] = None
            if job.is_reference:
                self._ref_ms.pop(job.row_key(), None)
            self._free()
        return row

    def _first_call(self, job: Job, call, inputs):
        """The first (warm-up) call: exceptions here mean the implementation cannot run the case."""
        try:
            out = call(inputs)
            self._sync()
            return out
        except torch.cuda.OutOfMemoryError:
            raise
        except _UNSUPPORTED as e:
            raise _Unsupported(short_message(e)) from e
        except RuntimeError as e:
            # baselines (SDPA backends, cuBLASLt epilogues) report "cannot run" as RuntimeError;
            # fastlayers as BackendUnavailableError (a RuntimeError) when a named backend cannot
            if job.fl_op is None or _is_backend_unavailable(e):
                raise _Unsupported(short_message(e)) from e
            raise

    def _measure(self, job: Job, row: dict) -> None:
        sets = self._input_sets(job)
        call = job.build() if job.build else None
        if call is None:
            raise RuntimeError("job has no implementation")
        variant_kind = _kind(job.variant)
        if job.timing == "host":
            self._measure_host(job, row, call, sets[0])
        elif variant_kind == "fwd":
            with torch.no_grad():
                out = self._first_call(job, call, sets[0])
                self._record_backend(job, row)
                self._compare(job, row, out)
                del out
                state = {"i": 0}

                def fn():
                    state["i"] += 1
                    return call(sets[state["i"] % len(sets)])
                ms = self._time(fn)
        else:
            gsets = [_with_grad(s, job.grad_keys) for s in sets]
            out0 = self._first_call(job, call, gsets[0])
            self._record_backend(job, row)
            if variant_kind == "bwd":
                graphs = [(out0, gsets[0])] + [(call(s), s) for s in gsets[1:]]
                grads = [[torch.randn_like(t) for t in _tensors(o) if t.requires_grad] for o, _ in graphs]
                state = {"i": 0}

                def fn():
                    i = state["i"] = (state["i"] + 1) % len(graphs)
                    outs, s = graphs[i]
                    outs = [t for t in _tensors(outs) if t.requires_grad]
                    return torch.autograd.grad(outs, [s[k] for k in job.grad_keys], grads[i], retain_graph=True)
                fn()
                self._sync()
                ms = self._time(fn)
                del graphs, grads
            else:  # fwd+bwd
                grads = [torch.randn_like(t) for t in _tensors(out0) if t.requires_grad]
                del out0
                state = {"i": 0}

                def fn():
                    i = state["i"] = (state["i"] + 1) % len(gsets)
                    s = gsets[i]
                    outs = [t for t in _tensors(call(s)) if t.requires_grad]
                    return torch.autograd.grad(outs, [s[k] for k in job.grad_keys], grads)
                fn()
                self._sync()
                ms = self._time(fn)
        if job.timing != "host":
            row["time_ms"] = ms
            row["rate"] = _rate(job, ms)
            peak = self._peak_value(job.peak)
            if peak and row["rate"] is not None:
                row["fraction_of_peak"] = row["rate"] / peak
        self._speedup(job, row)

    def _measure_host(self, job: Job, row: dict, call, inputs) -> None:
        grad = job.variant == "host_grad"
        inputs = _with_grad(inputs, job.grad_keys) if grad else inputs
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            self._first_call(job, call, inputs)
            self._record_backend(job, row)
            for _ in range(min(50, job.host_iters)):
                call(inputs)
            self._sync()
            n = job.host_iters
            t0 = time.perf_counter()
            for _ in range(n):
                call(inputs)
            self._sync()
            dt = time.perf_counter() - t0
        row["time_ms"] = 1e3 * dt / n
        row["rate"] = 1e6 * dt / n                       # microseconds per call
        row["work"] = n

    def _peak_value(self, peak: str | None):
        if peak == "bandwidth":
            return self.peaks.get("copy_bandwidth_gbs")
        if peak == "gemm":
            return self.peaks.get("bf16_gemm_tflops")
        return None

    def _record_backend(self, job: Job, row: dict) -> None:
        if job.fl_op is None:
            return
        import fastlayers as fl
        last = getattr(fl, "last_backend", None)
        if last is None:
            row["backend_ran"] = "unknown (fastlayers.last_backend missing)"
            return
        ran = last(job.fl_op)
        row["backend_ran"] = ran
        if job.fl_backend is not None and ran != job.fl_backend:
            raise RuntimeError(f"asked for backend {job.fl_backend!r} but fl.last_backend({job.fl_op!r}) "
                               f"says {ran!r} ran")

    def _compare(self, job: Job, row: dict, out) -> None:
        """max |out - eager| on the first input set (first output tensor), to show the row computed the op."""
        key = job.row_key()
        first = _tensors(out)[:1]
        if not first or not job.compare:
            return
        if job.is_reference:
            self._ref_out[key] = first[0].detach().float().clone()
            # keep one reference only (memory)
            for k in [k for k in self._ref_out if k != key]:
                del self._ref_out[k]
            row["max_abs_diff_vs_eager"] = 0.0
        elif key in self._ref_out and self._ref_out[key].shape == first[0].shape:
            row["max_abs_diff_vs_eager"] = float((first[0].detach().float() - self._ref_out[key]).abs().max())

    def _speedup(self, job: Job, row: dict) -> None:
        key = job.row_key()
        if job.is_reference:
            self._ref_ms[key] = row["time_ms"]
            row["speedup_vs_eager"] = 1.0
        elif key in self._ref_ms and row["time_ms"]:
            row["speedup_vs_eager"] = self._ref_ms[key] / row["time_ms"]


class _Unsupported(Exception):
    pass


def _is_backend_unavailable(e: BaseException) -> bool:
    try:
        import fastlayers
        cls = getattr(fastlayers, "BackendUnavailableError", None)
    except Exception:
        cls = None
    return cls is not None and isinstance(e, cls)


def _kind(variant: str) -> str:
    if variant == "fwd+bwd":
        return "fwd+bwd"
    if variant.startswith("bwd"):
        return "bwd"
    return "fwd"


def _rate(job: Job, ms: float):
    if not ms or ms <= 0:
        return None
    if job.unit == "TFLOP/s":
        return job.work / (ms * 1e-3) / 1e12
    if job.unit == "GB/s":
        return job.work / (ms * 1e-3) / 1e9
    return None


def run_jobs(runner: Runner, jobs: list[Job], progress: Progress | None = None) -> list[dict]:
    rows = []
    for job in jobs:
        rows.append(runner.run(job))
        if progress:
            case = ",".join(f"{k}={v}" for k, v in job.case.items())
            progress.update(f"{job.group} {job.variant} {case} {job.impl}")
    return rows
