"""Measurement core of `fastlayers bench`: jobs, timers, the run loop, peaks and the environment header.

A Job is one (case, variant, implementation) row. The Runner checks it, then times it, and returns
a result dict; it never raises for a job:
- check first: every row's result on the first input set -- its output tensors (or what the job's
  check_output maps them to: a model row's non-padded positions) and, for bwd and fwd+bwd rows,
  the gradients of its grad_keys under the same fixed output gradients -- is compared with its
  baseline's on the SAME inputs (the case's reference row, usually torch eager, or the
  row's own `baseline` function when it computes something else, e.g. the plain GEMM).
  error = max over tensors of max|out - base| / max|base|; over TOLERANCE[dtype] the row is
  "FAILED: ..." and is never timed, so it never shows a speed. A row whose baseline did not run is
  "unverified: ..." and is not timed either.
- then time: GPU timing is triton.testing.do_bench (CUDA events, median, warm-up, L2 flushed before
  each call) over a rotation of input sets whose total size exceeds twice the L2, so a call never
  finds its inputs in cache. CPU timing (no GPU) is a perf_counter loop, median per call; a CPU
  row other than the baseline is timed call by call alternately with its baseline (ratio and
  speed-up use that paired baseline time, "baseline_time_ms"), so load on a shared machine hits both.
  Host-overhead jobs time a Python loop of many calls with a CPU timer and synchronise once.
Other statuses: "unsupported: <message>" (an implementation that refuses the case: a baseline's
exception, or fastlayers' BackendUnavailableError / NotImplementedError), "not available: <why>",
"error: <message>" (a crash; any other exception of a fastlayers row, so a wrong call signature
in the harness is an error, not "unsupported").
Input sets are made from a seed derived from the job's inputs_key, so a case regenerated later
(torch.compile rows run after every group) gets the very inputs its baseline saw.
Nothing here touches the GPU at import, and nothing imports torch._dynamo.
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
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Exceptions by which a baseline says "this implementation does not take this case" (SDPA backends
# and cuBLASLt epilogues refuse with RuntimeError).
_BASELINE_UNSUPPORTED = (ValueError, TypeError, NotImplementedError, RuntimeError)

# The check's tolerance on error = max|out - base| / max|base| (per output tensor), by dtype.
# Loose enough for two correct implementations that round differently (bf16: ~12 ulps of the
# largest value), tight enough for a wrong one: the harness's inputs make the usual mix-ups
# (LayerNorm vs RMSNorm, causal vs not, a missing mask, bias or activation) differ by > 0.1.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# float32 on a GPU: Triton's tl.dot and cuBLAS (when allowed) round matmul inputs to TF32.
TOLERANCE_GPU_FP32 = 5e-3


def tolerance(dtype: torch.dtype, device_type: str) -> float:
    if dtype == torch.float32 and device_type == "cuda":
        return TOLERANCE_GPU_FP32
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


@dataclass
class Job:
    group: str                       # "norm" | "attention" | "linear" | "bert"
    case: dict                       # shape parameters shown in the table and stored in JSON
    variant: str                     # fwd | bwd | fwd+bwd | fwd_residual | decode | host_nograd | host_grad
    impl: str                        # e.g. "fastlayers[triton]", "torch eager", "torch.compile"
    unit: str                        # "GB/s" | "TFLOP/s" | "seq/s" | "us/call"
    work: float                      # bytes or FLOPs of one call (formulas.py), sequences for seq/s;
                                     # unused for us/call
    inputs_key: tuple                # jobs with equal keys share input sets (made once, from a seed)
    make_inputs: Callable[[], dict]  # one fresh input set on the device (uses the global RNG)
    build: Callable[[], Callable[[dict], Any]] | None = None   # returns call(inputs); run once per job
    grad_keys: tuple = ()            # inputs differentiated by bwd / fwd+bwd variants
    context: Callable[[], Any] | None = None   # context manager entered around the whole measurement
    fl_op: str | tuple | None = None # fastlayers op name(s), for fl.last_backend; with several (a
                                     # model row), every one must report fl_backend, and backend_ran
                                     # is the first one's
    fl_backend: str | None = None    # the backend this row asked for
    peak: str | None = None          # "bandwidth" | "gemm": what the rate is a fraction of
    skip: str | None = None          # status decided before running (e.g. "not available: ...")
    is_reference: bool = False       # the baseline row (torch eager) of its (case, variant)
    note: str | None = None          # shown in JSON (e.g. "gelu tanh approximation")
    baseline: Callable[[dict], Any] | None = None   # this row's own expected result (it computes
    baseline_name: str | None = None                # something other than the reference row)
    timing: str = "device"           # "device" | "host"
    host_iters: int = 1000
    check_output: Callable[[dict, Any], Any] | None = None   # (inputs, call's output) -> what the check
                                     # compares (model rows: the non-padded positions); not timed
    info: dict | None = None         # extra JSON fields of the row (model rows: the model's config)

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


def _version(dist: str) -> str:
    """An installed distribution's version, read from its metadata (importing triton costs ~1 s)."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"
    except Exception as e:  # broken metadata is reported, not fatal
        return f"unknown ({type(e).__name__})"


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


def cpu_time_ms(fn: Callable[[], Any], min_seconds: float = 0.05, min_reps: int = 3, max_reps: int = 400) -> float:
    fn()
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cpu_time_pair_ms(fn: Callable[[], Any], base: Callable[[], Any], min_seconds: float = 0.05, min_reps: int = 3,
                     max_reps: int = 400) -> tuple[float, float]:
    """(fn's, base's) median ms, timed alternately call by call: on a shared CPU a load change hits
    both, so their ratio holds where two separate timings would drift apart."""
    fn()
    base()
    a, b = [], []
    t_end = time.perf_counter() + 2 * min_seconds
    while len(a) < min_reps or (time.perf_counter() < t_end and len(a) < max_reps):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        a.append(time.perf_counter() - t1)
        b.append(t1 - t0)
    return 1e3 * statistics.median(a), 1e3 * statistics.median(b)


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


def seed_of(key) -> int:
    """A seed fixed by a key (inputs_key, row key): same key, same tensors, in any run order."""
    return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF


def compare(result: list, base: list, same_dtype: bool = True) -> tuple[float | None, str | None, str | None]:
    """(error, worst tensor's name, problem) of a check result against its baseline's.
    error = max over the comparable tensors of max|out - base| / max|base| (absolute where the
    baseline is all 0; None when none is comparable); problem: the first tensor that cannot be
    compared (missing, wrong shape, another dtype when same_dtype) or has non-finite values, else None."""
    problem = None
    if len(result) != len(base):
        problem = (f"{len(result)} result tensors ({', '.join(n for n, _ in result)}), the baseline "
                   f"has {len(base)} ({', '.join(n for n, _ in base)})")
    worst, where = None, None
    for (name, a), (_, b) in zip(result, base):
        if a is None or b is None:
            if (a is None) != (b is None) and problem is None:
                problem = f"{name} is {'None' if a is None else 'a tensor'}, the baseline's is not"
            continue
        if tuple(a.shape) != tuple(b.shape):
            problem = problem or f"{name} has shape {tuple(a.shape)}, the baseline's {tuple(b.shape)}"
            continue
        if same_dtype and a.dtype != b.dtype:
            problem = problem or f"{name} has dtype {a.dtype}, the baseline's {b.dtype}"
        wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        af, bf = a.detach().to(wide), b.detach().to(wide)
        if not bool(torch.isfinite(bf).all()):
            raise _Unverified(f"the baseline's {name} is not finite")
        if not bool(torch.isfinite(af).all()):
            problem = problem or f"{name} has non-finite values"
            continue
        if af.numel() == 0:
            continue
        scale = float(bf.abs().max())
        diff = float((af - bf).abs().max())
        err = diff / scale if scale > 0 else diff
        if worst is None or err > worst:
            worst, where = err, name
    return worst, where, problem


class Runner:
    """Runs jobs in order; jobs of one (case, variant) must start with their reference row."""

    def __init__(self, device: torch.device, quick: bool, peaks: dict | None, max_seconds: float | None = None,
                 max_sets: int = 32, cpu_min_seconds: float = 0.05, cpu_min_reps: int = 3, seed: int | None = None):
        self.device = device
        # inputs of key K, set i come from seed_of(K) + seed + i: the same within a run (baselines
        # re-run later see the same tensors); None draws the run's seed from torch's global RNG
        self.seed = int(torch.randint(0, 2**30, ())) if seed is None else int(seed)
        self.quick = quick
        self.peaks = peaks or {}
        self.deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self.max_seconds = max_seconds
        self.max_sets = max_sets
        self.cpu_min_seconds = cpu_min_seconds
        self.cpu_min_reps = cpu_min_reps
        self.l2 = l2_bytes(device) if device.type == "cuda" else 0
        self._sets_key = None
        self._sets: list[dict] = []
        self._ref_ms: dict = {}
        self._ref_jobs: dict = {}      # row key -> its reference Job (re-run when a later row needs it)
        self._ref_status: dict = {}    # row key -> the reference row's status
        self._base = None              # (row key, name, check result) of the last baseline computed
        self._ref_timer = None         # CPU: (row key, the reference row's timed function)

    # input sets, shared by the jobs of one case, made from a seed fixed by the inputs_key
    def _input_sets(self, job: Job) -> list[dict]:
        if self._sets_key != job.inputs_key:
            self._sets, self._sets_key, self._base, self._ref_timer = [], None, None, None
            self._free()
            first = self._make_inputs(job, 0)
            n = 1
            if self.device.type == "cuda" and job.timing == "device":
                # enough sets that their total is over twice the L2: rotation never hits in cache
                n = max(1, min(self.max_sets, math.ceil(2 * self.l2 / max(1, _set_bytes(first)))))
            self._sets = [first] + [self._make_inputs(job, i) for i in range(1, n)]
            self._sets_key = job.inputs_key
        return self._sets

    def _make_inputs(self, job: Job, i: int) -> dict:
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((seed_of(job.inputs_key) + 1_000_003 * self.seed + i) % 2**63)
            return job.make_inputs()

    def _free(self):
        # only on a GPU, only between cases or after a failure: gc.collect costs ~0.1 s a call
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time(self, job: Job, row: dict, fn) -> float:
        if self.device.type == "cuda":
            return gpu_time_ms(fn, self.quick)
        key = job.row_key()
        if job.is_reference:
            self._ref_timer = (key, fn)
        elif self._ref_timer is not None and self._ref_timer[0] == key and self._ref_status.get(key) == "ok":
            # CPU: timed call by call against the baseline, whose paired time the ratio uses
            ms, row["baseline_time_ms"] = cpu_time_pair_ms(fn, self._ref_timer[1], min_seconds=self.cpu_min_seconds,
                                                           min_reps=self.cpu_min_reps)
            return ms
        return cpu_time_ms(fn, min_seconds=self.cpu_min_seconds, min_reps=self.cpu_min_reps)

    def run(self, job: Job) -> dict:
        row = {"group": job.group, "case": dict(job.case), "variant": job.variant, "impl": job.impl,
               "unit": job.unit, "work": job.work, "time_ms": None, "rate": None, "fraction_of_peak": None,
               "peak": job.peak, "speedup_vs_eager": None, "time_ratio_vs_eager": None, "baseline_time_ms": None,
               "backend_ran": None, "baseline": None, "error": None, "tolerance": None,
               "reference": job.is_reference, "status": "ok"}
        if job.note:
            row["note"] = job.note
        if job.info:
            row.update(job.info)
        key = job.row_key()
        if job.is_reference:
            self._ref_jobs[key] = job
            self._ref_ms.pop(key, None)
        if job.skip:
            row["status"] = job.skip
        elif self.deadline is not None and time.perf_counter() > self.deadline:
            row["status"] = f"skipped: time budget (--max-seconds {self.max_seconds:g}) exhausted"
        else:
            self._run(job, row)
        if job.is_reference:
            self._ref_status[key] = row["status"]
        if row["status"] != "ok":
            for k in ("time_ms", "rate", "fraction_of_peak", "speedup_vs_eager", "time_ratio_vs_eager",
                      "baseline_time_ms"):
                row[k] = None
            if job.is_reference:
                self._ref_ms.pop(key, None)
        return row

    def _run(self, job: Job, row: dict) -> None:
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")     # recorded in the row, never printed mid-table
                with (job.context() if job.context else contextlib.nullcontext()):
                    self._measure(job, row)
        except torch.cuda.OutOfMemoryError as e:
            row["status"] = f"error: out of memory ({short_message(e, 120)})"
        except _Failed as e:
            row["status"] = f"FAILED: {e}"
        except _Unsupported as e:
            row["status"] = f"unsupported: {e}"
        except _Unverified as e:
            row["status"] = f"unverified: {e}"
        except Exception as e:  # one bad row never ends the run; the message is kept
            row["status"] = f"error: {short_message(e)}"
        messages = list(dict.fromkeys(short_message(w.message, 160) if isinstance(w.message, BaseException)
                                      else str(w.message).splitlines()[0][:160] for w in caught or []))
        if messages:
            row["warnings"] = messages[:3]
        if row["status"] != "ok":
            self._free()

    def _first_call(self, job: Job, fn):
        """The first call (warm-up and check): exceptions here may mean the implementation cannot
        run the case. A fastlayers row is "unsupported" only when fastlayers says so
        (BackendUnavailableError, NotImplementedError); any other exception is an error."""
        try:
            out = fn()
            self._sync()
            return out
        except torch.cuda.OutOfMemoryError:
            raise
        except (_Unverified, _Failed):
            raise
        except Exception as e:
            if job.fl_op is not None:
                if _is_backend_unavailable(e) or isinstance(e, NotImplementedError):
                    raise _Unsupported(short_message(e)) from e
                raise
            if isinstance(e, _BASELINE_UNSUPPORTED):
                raise _Unsupported(short_message(e)) from e
            raise

    def _result(self, job: Job, fn, inputs: dict, kind: str) -> list:
        """[(name, tensor)]: fn's outputs on `inputs`, and for bwd / fwd+bwd the gradients of the
        grad_keys under output gradients fixed by the row key (the same for every row of the key)."""
        view = job.check_output or (lambda _inputs, out: out)
        if kind == "fwd":
            with torch.no_grad():
                out = view(inputs, fn(inputs))
            return [(f"output {i}", t.detach()) for i, t in enumerate(_tensors(out))]
        g = _with_grad(inputs, job.grad_keys)
        outs = _tensors(view(g, fn(g)))
        diff = [t for t in outs if t.requires_grad]
        if not diff:
            raise RuntimeError("no output requires grad: the backward cannot run")
        grads = torch.autograd.grad(diff, [g[k] for k in job.grad_keys], self._grad_outputs(job, diff),
                                    allow_unused=True)
        return ([(f"output {i}", t.detach()) for i, t in enumerate(outs)]
                + [(f"grad {k}", gr) for k, gr in zip(job.grad_keys, grads)])

    def _grad_outputs(self, job: Job, outs: list) -> list:
        gen = torch.Generator(device=outs[0].device)
        gen.manual_seed((seed_of(job.row_key()) + 1_000_003 * self.seed) % 2**63)
        return [torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in outs]

    def _baseline(self, job: Job, inputs: dict, kind: str) -> tuple[str, list]:
        """(name, check result) of the baseline this row is compared with, on the same inputs."""
        key = job.row_key()
        if job.baseline is not None:
            name = job.baseline_name or "the row's own baseline"
            try:
                return name, self._result(job, job.baseline, inputs, kind)
            except Exception as e:
                raise _Unverified(f"its baseline ({name}) failed: {short_message(e)}") from e
        ref = self._ref_jobs.get(key)
        if ref is None:
            raise _Unverified("no baseline row ran for this case")
        status = self._ref_status.get(key, "not run")
        if status != "ok":     # also when its check passed but its timing then failed
            raise _Unverified(f"its baseline ({ref.impl}) did not pass: {status}")
        if self._base is not None and self._base[0] == key:
            return self._base[1], self._base[2]
        if ref.inputs_key != job.inputs_key:
            raise _Unverified(f"its baseline ({ref.impl}) runs other inputs ({ref.inputs_key} != {job.inputs_key})")
        try:  # a later row (torch.compile rows run last): the baseline again, on the same inputs
            with (ref.context() if ref.context else contextlib.nullcontext()):
                result = self._result(ref, ref.build(), inputs, kind)
        except Exception as e:
            raise _Unverified(f"its baseline ({ref.impl}) failed when run again: {short_message(e)}") from e
        self._base = (key, ref.impl, result)
        return ref.impl, result

    def _tolerance(self, *results: list) -> float:
        """The loosest tolerance of the dtypes compared (a bf16 row against a float32 baseline: bf16's)."""
        dtypes = {t.dtype for r in results for _, t in r if t is not None and t.is_floating_point()}
        if not dtypes:
            raise _Failed("the row returned no floating-point tensor to check")
        return max(tolerance(d, self.device.type) for d in dtypes)

    def _check(self, job: Job, row: dict, result: list, inputs: dict, kind: str) -> None:
        row["tolerance"] = self._tolerance(result)
        if job.is_reference and job.baseline is None:
            bad = [n for n, t in result
                   if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]
            self._base = None
            if bad:
                raise _Failed(f"the baseline's {bad[0]} is not finite")
            self._base = (job.row_key(), job.impl, result)
            row["baseline"], row["error"] = "(this row)", 0.0
            return
        name, base = self._baseline(job, inputs, kind)
        row["baseline"] = name
        row["tolerance"] = tol = self._tolerance(result, base)
        # against the reference row, the dtypes must match too (the op's output dtype is part of what
        # it computes); a row's own baseline may be computed wider (the plain GEMM's in float32)
        err, where, problem = compare(result, base, same_dtype=job.baseline is None)
        row["error"] = err
        if problem is not None:
            raise _Failed(f"{problem} (vs {name})")
        if err is None:
            raise _Failed(f"no tensor to compare with {name}'s")
        if not err <= tol:
            raise _Failed(f"error {err:.2g} > tolerance {tol:.0e} in {where} (vs {name})")

    def _measure(self, job: Job, row: dict) -> None:
        sets = self._input_sets(job)
        if job.build is None:
            raise RuntimeError("job has no implementation")
        call = job.build()
        kind = _kind(job.variant)
        _forget_backends(job)
        # warm-up and check on the first input set; a row that fails its check is never timed
        result = self._first_call(job, lambda: self._result(job, call, sets[0], kind))
        self._record_backend(job, row)
        self._check(job, row, result, sets[0], kind)
        del result
        if job.timing == "host":
            self._measure_host(job, row, call, sets[0])
            self._speedup(job, row)
            return
        if kind == "fwd":
            state = {"i": 0}

            def fn():
                state["i"] += 1
                return call(sets[state["i"] % len(sets)])
            with torch.no_grad():
                ms = self._time(job, row, fn)
        else:
            gsets = [_with_grad(s, job.grad_keys) for s in sets]
            if kind == "bwd":
                graphs = [(call(s), s) for s in gsets]
                grads = [[torch.randn_like(t) for t in _tensors(o) if t.requires_grad] for o, _ in graphs]
                state = {"i": 0}

                def fn():
                    i = state["i"] = (state["i"] + 1) % len(graphs)
                    outs, s = graphs[i]
                    outs = [t for t in _tensors(outs) if t.requires_grad]
                    return torch.autograd.grad(outs, [s[k] for k in job.grad_keys], grads[i], retain_graph=True)
                fn()
                self._sync()
                ms = self._time(job, row, fn)
            else:  # fwd+bwd
                grads = [torch.randn_like(t) for t in _tensors(call(gsets[0])) if t.requires_grad]
                state = {"i": 0}

                def fn():
                    i = state["i"] = (state["i"] + 1) % len(gsets)
                    s = gsets[i]
                    outs = [t for t in _tensors(call(s)) if t.requires_grad]
                    return torch.autograd.grad(outs, [s[k] for k in job.grad_keys], grads)
                fn()
                self._sync()
                ms = self._time(job, row, fn)
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
            for _ in range(min(50, job.host_iters)):
                call(inputs)
            self._sync()
            self._record_backend(job, row)   # the path timed (with or without grad) is the one proven
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
            raise RuntimeError("fastlayers.last_backend is missing: cannot prove which backend ran")
        ops = (job.fl_op,) if isinstance(job.fl_op, str) else tuple(job.fl_op)
        ran = {op: last(op) for op in ops}
        row["backend_ran"] = ran[ops[0]]
        if len(ops) > 1:
            row["backends_ran_by_op"] = ran
        for op, name in ran.items():
            if name is None:
                raise RuntimeError(f"fl.last_backend({op!r}) is None after the call: no backend recorded")
            if job.fl_backend is not None and name != job.fl_backend:
                raise RuntimeError(f"asked for backend {job.fl_backend!r} but fl.last_backend({op!r}) "
                                   f"says {name!r} ran")

    def _speedup(self, job: Job, row: dict) -> None:
        key = job.row_key()
        if job.is_reference:
            self._ref_ms[key] = row["time_ms"]
            row["speedup_vs_eager"] = row["time_ratio_vs_eager"] = 1.0
            return
        base_ms = row.get("baseline_time_ms") or self._ref_ms.get(key)
        if base_ms and row["time_ms"]:
            row["speedup_vs_eager"] = base_ms / row["time_ms"]
            row["time_ratio_vs_eager"] = row["time_ms"] / base_ms


class _Unsupported(Exception):
    pass


class _Unverified(Exception):
    pass


class _Failed(Exception):
    pass


def _forget_backends(job: Job) -> None:
    """Clears this thread's fl.last_backend records before a fastlayers row's first call, so the
    backend proven is the one THIS row's call ran: a model that never calls an op would otherwise
    show the record an earlier row left. (fastlayers has no public reset: its thread-local.)"""
    if job.fl_op is None:
        return
    try:
        from fastlayers import backends
        vars(backends._local).pop("last", None)
    except Exception:  # another layout: the records stay, and a stale one can only match by chance
        pass


def _is_backend_unavailable(e: BaseException) -> bool:
    try:
        import fastlayers
        cls = getattr(fastlayers, "BackendUnavailableError", None)
    except Exception:
        cls = None
    return cls is not None and isinstance(e, cls)


def _kind(variant: str) -> str:
    """What a variant's check and timer run: "fwd" (also decode, host_*), "bwd" or "fwd+bwd"."""
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
    if job.unit == "seq/s":
        return job.work / (ms * 1e-3)
    return None


def run_jobs(runner: Runner, jobs: list[Job], progress: Progress | None = None) -> list[dict]:
    rows = []
    for job in jobs:
        rows.append(runner.run(job))
        if progress:
            case = ",".join(f"{k}={v}" for k, v in job.case.items())
            progress.update(f"{job.group} {job.variant} {case} {job.impl}")
    return rows
