"""Ahead-of-time compile check of the Triton kernels, CPU only (no GPU, no driver needed).

    python benchmarks/triton_aot_check.py [--arch 80 90] [--only layer_norm attention linear]
                                          [--dtype fp16 bf16] [--filter SUBSTRING] [-v]

For each representative input the real launchers of kernels/layer_norm.py, kernels/attention.py and
kernels/linear.py are called with "meta" tensors (shapes, no storage) while every module-level
@triton.jit kernel is swapped for a recorder: what a launcher would launch (kernel, arguments,
constexprs, num_warps, num_stages) is captured, never re-typed here. Device queries are answered
as an H100 (sm_90, 132 SMs) or an A100 (sm_80, 108 SMs) would, so the launchers' own heuristics
pick the configs. Each captured launch is then specialised by Triton's own binder (argument types,
16-byte alignment / divisibility like a real launch of aligned tensors) and compiled with
triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32)) through the ptxas bundled with
the installed triton wheel. One line per kernel variant and arch: registers, spill bytes
(stores/loads; on a Triton cache hit the cubin's stack-frame bytes, marked *), shared memory
(bytes, Triton's allocation; more than the arch's per-block limit is a FAIL), status OK / SPILL /
FAIL. Exit status 1 if any variant fails (spills are reported, not failed). A kernel launched with
host TMA descriptors (kernels/linear.py on sm_90 picks them for aligned operands) is listed as
"name[tma]" and FAILs unless its PTX holds the bulk tensor copy (cp.async.bulk.tensor, UTMALDG in
SASS); the "ptr" linear cases use operands TMA cannot take (odd row strides), so the pointer path
is checked on sm_90 too. FASTLAYERS_TRITON_TMA=0 in the environment turns TMA off. A cold run of
everything takes ~6 min on 2 busy cores; narrow it with --arch / --only / --dtype / --filter.

Uses two private Triton helpers (runtime.jit.create_function_from_signature and
JITFunction._pack_args), the same in Triton 3.6 and 3.9 (both checked); if another version moves
them the script fails loudly. Do not run with TRITON_INTERPRET=1.
Identical specialisations (same kernel, signature, constexprs, options) are compiled once;
Triton's on-disk cache makes re-runs fast.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (the launchers must pick GPU configs)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from fastlayers.kernels import attention as attn_mod  # noqa: E402
from fastlayers.kernels import layer_norm as ln_mod  # noqa: E402
from fastlayers.kernels import linear as lin_mod  # noqa: E402

_SMS = {80: 108, 90: 132}  # A100 / H100 SXM SM counts
# Largest shared memory one block may use (opt-in), bytes: A100 163 KB, H100 227 KB. Triton only
# checks this when it loads the kernel on a GPU ("out of resource"), so it is checked here.
_SMEM_MAX = {80: 166912, 90: 232448}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_META = torch.device("meta")


# ----------------------------------------------------------------------------------------------
# Capture: run a launcher with meta tensors, record its kernel launches
# ----------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a JITFunction: kernel[grid](*args, **kwargs) appends to a log."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, args, kwargs))


@contextlib.contextmanager
def _patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def _device_patches(module, cap):
    """Answers to the launchers' device queries as a GPU of compute capability cap would give."""
    sms = _SMS[cap]
    if module is ln_mod:
        return dict(_programs_cap=lambda t: 4 * sms)
    if module is attn_mod:
        return dict(_device_info=lambda index: (cap // 10, cap % 10, sms), _is_hopper=lambda d: cap >= 90)
    if module is lin_mod:  # its validation also rejects non-CUDA tensors: skip it (not under test)
        return dict(_device_info=lambda index: (cap // 10, sms), _device_index=lambda t: 0,
                    unsupported_reason=lambda x, weight: None)
    raise ValueError(module)


def capture(module, cap, launcher, *args, **kwargs):
    """-> [(kernel, args, kwargs)] the launcher would launch on an sm_<cap> GPU."""
    log = []
    kernels = {k: v for k, v in vars(module).items() if isinstance(v, JITFunction)}
    recorders = {k: _Recorder(v, log) for k, v in kernels.items()}
    with _patched(module, **recorders, **_device_patches(module, cap)), \
            _patched(torch.cuda, current_device=lambda: 0):
        launcher(*args, **kwargs)
    return log


# ----------------------------------------------------------------------------------------------
# Representative launches (the launchers choose every config)
# ----------------------------------------------------------------------------------------------
def _t(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device=_META)


def cases_layer_norm(dt):
    rows = 4096
    for cols in (768, 4096, 8192, 65536):
        x, w = _t(rows, cols, dtype=dt), _t(cols, dtype=dt)
        st = _t(rows, dtype=torch.float32)
        yield (f"cols={cols} fwd ln+res", ln_mod.layer_norm_fwd, (x, _t(rows, cols, dtype=dt), w, w, 1e-5, False))
        yield (f"cols={cols} fwd rms", ln_mod.layer_norm_fwd, (x, None, w, None, 1e-5, True))
        yield (f"cols={cols} bwd ln+dres", ln_mod.layer_norm_bwd, (x, x, w, st, st, x, True, False))
        yield (f"cols={cols} bwd rms", ln_mod.layer_norm_bwd, (x, x, w, None, st, None, False, True))


def cases_attention(dt):
    B, H, L = 2, 16, 2048
    for D in (64, 128, 256):
        q = _t(B, L, H, D, dtype=dt)
        lse = _t(B, H, L, dtype=torch.float32)
        rng = _t(2, dtype=torch.int64)  # [seed, offset], read by the kernels
        for causal in (False, True):
            for p in (0.0, 0.1):
                tag = f"D={D} {'causal' if causal else 'full'}{' drop' if p else ''}"
                yield (f"{tag} fwd", attn_mod.attention_fwd, (q, q, q, None, D ** -0.5, causal, p, rng))
                yield (f"{tag} bwd", attn_mod.attention_bwd,
                       (q, q, q, q, q, lse, None, D ** -0.5, causal, p, rng, False))
        kpm = _t(B, L, dtype=torch.bool)
        yield (f"D={D} full kpm fwd", attn_mod.attention_fwd, (q, q, q, kpm, D ** -0.5, False, 0.0, None))
        yield (f"D={D} full kpm bwd", attn_mod.attention_bwd,
               (q, q, q, q, q, lse, kpm, D ** -0.5, False, 0.0, None, False))
        # decode: one new token over an 8k cache, B=4 (split-KV + combine)
        qd, cache = _t(4, 1, H, D, dtype=dt), _t(4, 8192, H, D, dtype=dt)
        lens = _t(4, dtype=torch.int32)
        yield (f"D={D} decode Lq=1", attn_mod.attention_with_kvcache,
               (qd, cache, cache, lens, qd, qd, D ** -0.5, True))


def cases_linear(dt):
    M, N, K = 4096, 4096, 4096
    x, w, b, r = _t(M, K, dtype=dt), _t(N, K, dtype=dt), _t(N, dtype=dt), _t(M, N, dtype=dt)
    for act in lin_mod.ACTIVATIONS:
        for res in (None, r):
            tag = f"{M}x{N}x{K} fwd {act or 'none'}{'+res' if res is not None else ''}"
            yield (tag, lin_mod.linear_fwd, (x, w, b, act, res, True))
    xs = _t(16, K, dtype=dt)
    yield (f"16x{N}x{K} fwd none", lin_mod.linear_fwd, (xs, w, b, None, None, False))
    for act in (None, "gelu"):
        yield (f"{M}x{N}x{K} bwd {act or 'none'}", lin_mod.linear_bwd, (r, x, w, r, act, True, True, True))
    # Odd row strides (column slices): no TMA possible, the pointer path runs on sm_90 as well.
    xo, ro = _t(M, K + 1, dtype=dt)[:, :K], _t(M, N + 1, dtype=dt)[:, :N]
    yield (f"{M}x{N}x{K} fwd gelu+res ptr", lin_mod.linear_fwd, (xo, w, b, "gelu", r, True))
    yield (f"{M}x{N}x{K} bwd gelu ptr", lin_mod.linear_bwd, (ro, xo, w, ro, "gelu", True, True, False))
    # long M, small N x K: the dweight GEMM splits M and sums fp32 partials
    xl, wl, dyl = _t(16384, 256, dtype=dt), _t(256, 256, dtype=dt), _t(16384, 256, dtype=dt)
    yield ("16384x256x256 bwd gelu split-M", lin_mod.linear_bwd, (dyl, xl, wl, dyl, "gelu", True, True, True))


_CASES = {"layer_norm": (ln_mod, cases_layer_norm), "attention": (attn_mod, cases_attention),
          "linear": (lin_mod, cases_linear)}


# ----------------------------------------------------------------------------------------------
# Compile
# ----------------------------------------------------------------------------------------------
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def specialise(kernel, cap, args, kwargs):
    """Triton's own launch-time specialisation -> (signature, constexprs, attrs, options, target)."""
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                              options)
    return signature, constexprs, attrs, options, target


def compile_one(kernel, signature, constexprs, attrs, options, target, tma=False):
    """-> (registers, spill stores, spill loads, shared bytes, from_cache) of kernel on target.
    tma: the launch passed TMA descriptors; raise unless the PTX has the bulk tensor copy."""
    buf = io.StringIO()
    with _patched(triton.knobs.nvidia, dump_ptxas_log=True), contextlib.redirect_stdout(buf):
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    if tma and "cp.async.bulk.tensor" not in ck.asm["ptx"]:
        raise RuntimeError("TMA descriptors passed but no cp.async.bulk.tensor in the PTX")
    log = buf.getvalue()
    regs = _REGS.search(log)
    spill = _SPILL.search(log)
    cached = regs is None
    if cached:  # ptxas did not run (Triton cache hit): ask the cubin
        regs, spill = _cubin_usage(ck)
    else:
        regs = int(regs.group(1))
        spill = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
    return regs, spill[0], spill[1], ck.metadata.shared, cached


def _cubin_usage(ck):
    """Registers and stack-frame bytes from cuobjdump (bundled with triton) of a cached cubin."""
    import subprocess
    import tempfile
    tool = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    # The stack frame holds the spill slots (these kernels have no local arrays or calls); its
    # size stands in for both spill columns when ptxas' own log is not available.
    spill = int(stack.group(1)) if stack else 0
    return (int(regs.group(1)) if regs else -1), (spill, spill)


def _short(constexprs, kernel):
    names = kernel.arg_names
    items = []
    for path, v in constexprs.items():
        name = names[path[0]] if len(path) == 1 else str(path)
        if name.isupper() and name not in ("UPCAST", "UPCAST_DOT", "DOT_PRECISION"):
            items.append(f"{name}={v}")
    return " ".join(items)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(_SMS))
    ap.add_argument("--only", nargs="+", default=list(_CASES), choices=list(_CASES))
    ap.add_argument("--dtype", nargs="+", default=list(_DTYPES), choices=list(_DTYPES))
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="print constexprs and full errors")
    a = ap.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}, ptxas {triton.knobs.nvidia.ptxas.path}")
    hdr = f"{'status':6} {'arch':6} {'dtype':5} {'case':34} {'kernel':32} {'w':>2} {'st':>2} " \
          f"{'regs':>4} {'spill st/ld':>11} {'smem':>7} {'s':>5}"
    print(hdr)
    seen, failures, spills, n = set(), [], [], 0
    t_all = time.time()
    for cap in a.arch:
        for op in a.only:
            module, cases = _CASES[op]
            for dname in a.dtype:
                for name, launcher, args in cases(_DTYPES[dname]):
                    if a.filter not in name:
                        continue
                    try:
                        launches = capture(module, cap, launcher, *args)
                    except Exception as e:  # a launcher that cannot even pick a config
                        failures.append((cap, dname, name, "launcher", traceback.format_exc()))
                        print(f"{'FAIL':6} sm_{cap:<3} {dname:5} {name:34} {'(launcher)':32} {e}")
                        continue
                    for kernel, kargs, kkw in launches:
                        kname = kernel.fn.__name__.lstrip("_").removesuffix("_kernel")
                        tma = any(isinstance(v, TensorDescriptor) for v in (*kargs, *kkw.values()))
                        kname += "[tma]" if tma else ""
                        try:
                            sig, cexp, attrs, opts, target = specialise(kernel, cap, kargs, dict(kkw))
                        except Exception as e:
                            failures.append((cap, dname, name, kname, traceback.format_exc()))
                            print(f"{'FAIL':6} sm_{cap:<3} {dname:5} {name:34} {kname:32} bind: {e}")
                            continue
                        key = (kernel.fn.__qualname__, cap, str(sorted(sig.items())),
                               str(sorted((k, str(v)) for k, v in cexp.items())), str(attrs),
                               opts.num_warps, opts.num_stages)
                        if key in seen:
                            continue
                        seen.add(key)
                        n += 1
                        t0 = time.time()
                        try:
                            regs, sst, sld, smem, cached = compile_one(kernel, sig, cexp, attrs, opts, target,
                                                                       tma)
                            if smem > _SMEM_MAX[cap]:
                                raise RuntimeError(f"shared memory {smem} B > sm_{cap} limit {_SMEM_MAX[cap]} B")
                            status = "OK" if sst == 0 and sld == 0 else "SPILL"
                            if status == "SPILL":
                                spills.append((cap, dname, name, kname))
                            print(f"{status:6} sm_{cap:<3} {dname:5} {name:34} {kname:32} "
                                  f"{opts.num_warps:>2} {opts.num_stages:>2} {regs:>4} {f'{sst}/{sld}' + ('*' if cached else ' '):>11} "
                                  f"{smem:>7} {time.time() - t0:5.1f}", flush=True)
                        except Exception as e:
                            msg = str(e).strip().splitlines()
                            failures.append((cap, dname, name, kname, traceback.format_exc()))
                            print(f"{'FAIL':6} sm_{cap:<3} {dname:5} {name:34} {kname:32} "
                                  f"{opts.num_warps:>2} {opts.num_stages:>2} {msg[0] if msg else type(e).__name__}"
                                  f" ({time.time() - t0:.1f}s)", flush=True)
                        if a.verbose:
                            print(f"       constexprs: {_short(cexp, kernel)}")
    print(f"\n{n} variants compiled in {time.time() - t_all:.0f}s: {n - len(failures) - len(spills)} OK, "
          f"{len(spills)} spill, {len(failures)} FAIL (triton {triton.__version__}); "
          "spill* = stack-frame bytes from cuobjdump (Triton cache hit, no ptxas log)")
    for cap, dname, name, kname, tb in failures:
        print(f"\n--- FAIL sm_{cap} {dname} {name} {kname}")
        print(tb if a.verbose else tb.strip().splitlines()[-1][:2000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
