"""fl.layer_norm hardening (issue 8): strided 1-D parameters, grid limits, in-place edits of the
outputs in training, mixed dtypes, autocast, and the native torch backend.

Every backend that can run here is tested through the public op: "torch" always, Triton through
the interpreter on CPU (no GPU) or compiled on a GPU, CUDA on a GPU (marker gpu). Expected values
come from float64 references (layer_norm_ref on float64 copies, or torch's own float64 kernels);
torch's behaviour at the case's dtypes (what it accepts, the dtypes it returns, what it does under
autocast, which in-place sequences it allows) is probed in the tests themselves, so a torch that
changes fails here instead of drifting apart silently. Shapes are tiny (the interpreter is slow).
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from backends_matrix import kernel_backend_cases
from conftest import HAS_CUDA, INTERPRET
from fastlayers.kernels import layer_norm as tri
from fastlayers.ops import layer_norm as ln_op
from helpers import assert_close_rule

EPS = 1e-5
HALF = (torch.float16, torch.bfloat16)


def _backends():
    """(backend, device) of every backend that runs here: torch on CPU (and CUDA), the kernels."""
    cases = [pytest.param("torch", "cpu", id="torch-cpu")]
    if HAS_CUDA:
        cases.append(pytest.param("torch", "cuda", marks=pytest.mark.gpu, id="torch-gpu"))
    return cases + [c for c in kernel_backend_cases() if not c.marks or c.values[1] == "cuda"]


BACKENDS = _backends()
COMPILE = [pytest.param(False, id="eager"), pytest.param(True, id="compiled")]


def _compiled(fn, compiled):
    if not compiled:
        return fn
    torch._dynamo.reset()  # the tests' closures share code objects: no recompile limit across cases
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _ref64(x, weight, bias, residual, rms, eps=EPS):
    """float64 oracle: (y, s) of the op's documented math, s = x + residual rounded to x's dtype."""
    s = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    w64 = weight.double() if weight is not None else None
    b64 = bias.double() if bias is not None else None
    cols = x.shape[-1]
    y, _, _, _ = ln_op.layer_norm_ref(s.double().reshape(-1, cols), None, w64, b64, eps, rms)
    return y.reshape(x.shape), s


def _skip_interpreter_bf16(backend, device, dtype):
    # The interpreter rounds float32 -> bfloat16 stores toward zero (a GPU rounds to nearest even):
    # bf16 outputs of the Triton kernels are tested on a GPU (DESIGN.md: fp32/fp16 under the interpreter).
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton interpreter: float32 -> bfloat16 truncates; bf16 outputs are GPU-tested")


def _leaf(t, device, grad=True):
    return None if t is None else t.detach().to(device).clone().requires_grad_(grad)


# ============================================================================ 1. strided parameters
# Each view of a 1-D parameter the op must read as the tensor it is (kernels index weight and bias
# as contiguous, so the op copies these at its boundary): a stride-2 slice, a stride-0 expand (a
# kernel reading it as contiguous reads past its storage), a column of a matrix (stride = row
# length), a storage offset.
VIEWS = {
    "stride2": (lambda n: torch.randn(2 * n), lambda base, n: base[::2]),
    "expand": (lambda n: torch.randn(1), lambda base, n: base.expand(n)),
    "column": (lambda n: torch.randn(n, 3), lambda base, n: base[:, 1]),
    "offset": (lambda n: torch.randn(n + 5), lambda base, n: base[5:]),
}


# Compiled runs (each a fresh trace, seconds on CPU) for two views; every view eagerly.
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("view,compiled", [(v, False) for v in VIEWS] + [("stride2", True), ("expand", True)])
def test_strided_weight_and_bias(view, compiled, backend, device):
    make, take = VIEWS[view]
    cols = 24
    rms = view in ("expand", "offset")
    x = torch.randn(2, 3, cols)
    wbase, bbase = make(cols), make(cols)
    r = torch.randn(2, 3, cols)

    def run(x, wbase, bbase, r):
        return fl.layer_norm(x, take(wbase, cols), take(bbase, cols), EPS, residual=r, rms=rms, backend=backend)

    leaves = [_leaf(t, device) for t in (x, wbase, bbase, r)]
    y, s = _compiled(run, compiled)(*leaves)
    w64, b64 = take(wbase.double(), cols), take(bbase.double(), cols)
    y64, _ = _ref64(x.double(), w64, b64, r.double(), rms)
    assert_close_rule(y.cpu(), y64, what=f"y ({view})")
    torch.testing.assert_close(s.detach().cpu(), x + r, rtol=0, atol=0)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum() + s.sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, wbase, bbase, r)]
    y64 = fl.layer_norm(leaves64[0], take(leaves64[1], cols), take(leaves64[2], cols), EPS, residual=leaves64[3],
                        rms=rms, backend="torch")[0]
    grads64 = torch.autograd.grad((y64 * gy.cpu().double()).sum() + (leaves64[0] + leaves64[3]).sum(), leaves64)
    for name, g, g64 in zip(("dx", "dweight", "dbias", "dresidual"), grads, grads64):
        assert_close_rule(g.cpu(), g64, floor=1e-4, what=f"{name} ({view})")


# ============================================================================ 2. grid limits
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# Row counts up to what no memory holds (the configs are plain arithmetic) and the column
# counts each kernel path starts at.
EXTREME_ROWS = [1, 17, 2**16 + 1, 2**31 - 1, 2**31, 2**31 + 5, 2**36, 2**40]
EXTREME_COLS = [1, 7, 1024, 1025, 8192, 8193, 16384, 16385, 65536]


def _check_grid(grid, what):
    assert len(grid) <= 3 and all(isinstance(n, int) for n in grid), what
    for axis, n in enumerate(grid):
        assert 1 <= n <= GRID_LIMITS[axis], f"{what}: grid axis {axis} = {n} outside [1, {GRID_LIMITS[axis]}]"


@pytest.mark.parametrize("cols", EXTREME_COLS)
def test_triton_grids_fit_the_limits(cols):
    assert tri.GRID_LIMITS == GRID_LIMITS
    for rows in EXTREME_ROWS:
        f = tri.fwd_config(rows, cols)
        _check_grid(f.grid, f"fwd rows={rows} cols={cols}")
        assert f.grid[0] == min(-(-rows // f.rows_per_tile), tri._MAX_PROGRAMS)  # the rest: grid-stride loop
        for cap in (4, 4 * 132):
            b = tri.bwd_config(rows, cols, cap)
            what = f"bwd rows={rows} cols={cols} cap={cap}"
            _check_grid(b.grid, what)
            if b.row_sums_grid is not None:
                _check_grid(b.row_sums_grid, what + " row sums")
            programs, tiles = b.grid
            # the programs' row ranges cover every row, none starts past the end
            assert programs * b.rows_per_prog >= rows and (programs - 1) * b.rows_per_prog < rows, what
            assert tiles * b.block >= cols and programs <= max(cap, 1), what


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every floating tensor torch.empty / empty_like makes during the test starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels through the interpreter")
@pytest.mark.parametrize("split", [False, True])
def test_triton_grid_stride_loops_cover_every_row(split, monkeypatch, nan_outputs):
    # Two programs for more row tiles (forward) and rows (row-sums kernel) than that: the grid-stride
    # loops must visit every one. split: 150 columns take the chunked forward and the column-tiled
    # backward (blocks shrunk so the interpreter stays quick).
    monkeypatch.setattr(tri, "_MAX_PROGRAMS", 2)
    rows, cols = (20, 150) if split else (37, 7)
    if split:
        for name, v in (("_MAX_BLOCK", 128), ("_MAX_BLOCK_BWD", 128), ("_COL_TILE", 64), ("_CHUNK", 64),
                        ("_TILE_ELEMS", 512)):
            monkeypatch.setattr(tri, name, v)
    x = torch.randn(rows, cols)
    w, b = torch.randn(cols), torch.randn(cols)
    cfg = tri.fwd_config(rows, cols)
    assert cfg.grid == (2,) and -(-rows // cfg.rows_per_tile) > 2 and cfg.single != split
    bcfg = tri.bwd_config(rows, cols, tri._programs_cap(x))
    assert (bcfg.row_sums_grid == (2,)) if split else bcfg.row_sums_grid is None
    for rms in (False, True):
        y, _, mean, rstd = tri.layer_norm_fwd(x, None, w, b, EPS, rms)
        y64, _ = _ref64(x.double(), w.double(), b.double(), None, rms)
        assert_close_rule(y, y64, what="y")
        dy = torch.randn(rows, cols)
        ds, dw, db = tri.layer_norm_bwd(dy, x, w, mean, rstd, None, True, rms)
        x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
        y64 = ln_op._native(x64, w64, b64, None, EPS, rms)
        g64 = torch.autograd.grad((y64 * dy.double()).sum(), (x64, w64, b64))
        for name, g, e in zip(("ds", "dweight", "dbias"), (ds, dw, db), g64):
            assert_close_rule(g, e, floor=1e-4, what=name)


def _cuda_launch_dims():
    from fastlayers import _cuda
    if _cuda.load_error() is not None:
        pytest.skip(f"libfastlayers_cuda not loadable: {_cuda.load_error()}")
    from fastlayers.cuda_ops import layer_norm as cuda_ln
    return cuda_ln.launch_dims


@pytest.mark.parametrize("cols", EXTREME_COLS)
def test_cuda_grids_fit_the_limits(cols):
    # The library's own launch plan (fl_layer_norm_launch_dims, which its launchers use): no GPU needed.
    launch_dims = _cuda_launch_dims()
    for rows in EXTREME_ROWS:
        for backward in (False, True):
            for vw in (1, 4, 8):
                launches = launch_dims(rows, cols, backward, vw)
                assert len(launches) == (3 if backward and cols > 8192 else 2 if backward else 1)
                for grid, block in launches:
                    what = f"rows={rows} cols={cols} backward={backward} vw={vw}"
                    _check_grid(grid, what)
                    assert 1 <= block[0] * block[1] * block[2] <= 1024, what
    assert launch_dims(0, cols, False, 1) == [] and launch_dims(0, cols, True, 1) == []


def test_cuda_launch_dims_rejects_bad_arguments():
    launch_dims = _cuda_launch_dims()
    for args, word in (((4, 0, False, 1), "cols"), ((4, 65537, False, 1), "cols"), ((-1, 8, False, 1), "rows"),
                       ((4, 8, False, 3), "vector_width")):
        with pytest.raises(RuntimeError, match=word):
            launch_dims(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_many_rows_one_column(backend):
    # 2^25 + 3 rows of 1 column: forward grids past 2^20 blocks walk rows by grid-stride loops.
    rows = 2**25 + 3
    x = torch.randn(rows, 1, device="cuda")
    w, b = torch.randn(1, device="cuda"), torch.randn(1, device="cuda")
    y = fl.layer_norm(x, w, b, backend=backend)
    torch.testing.assert_close(y, b.expand(rows, 1).contiguous())  # x - mean == 0 in every row
    r = torch.randn(rows, 1, device="cuda")
    y = fl.layer_norm(x, w, None, residual=r, rms=True, backend=backend)[0]
    torch.testing.assert_close(y, F.rms_norm(x + r, (1,), w, EPS))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_rows_times_cols_past_2_31(backend):
    # 2^31 + 2^14 elements (bf16, 4 GiB): 64-bit offsets in every kernel, forward and backward.
    rows, cols = 2**17 + 1, 2**14
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(cols, device="cuda", requires_grad=True)
    y = fl.layer_norm(x, w, None, rms=True, backend=backend)
    last = F.rms_norm(x[-2:].detach().float(), (cols,), w.detach(), EPS)
    torch.testing.assert_close(y[-2:].float(), last, atol=2e-2, rtol=2e-2)
    gy = torch.zeros_like(y)
    gy[-1] = 1
    dx, = torch.autograd.grad(y, (x,), gy)
    x_last = x[-1:].detach().float().requires_grad_()
    dx_last, = torch.autograd.grad(F.rms_norm(x_last, (cols,), w.detach(), EPS).sum(), (x_last,))
    torch.testing.assert_close(dx[-1:].float(), dx_last, atol=2e-2, rtol=2e-2)
    assert not dx[:-1].any()


# ============================================================================ 3. in-place edits
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("shape,compiled", [((5, 16), False), ((2, 3, 16), False), ((2, 3, 16), True)])
def test_relu_inplace_after_norm_module_in_training(module, shape, compiled, backend, device):
    ref = getattr(torch.nn, module)(16, device=device)
    ours = getattr(fl.nn, module)(16, device=device, backend=backend)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict())
    act = torch.nn.ReLU(inplace=True)
    x = torch.randn(shape, device=device)

    def step(model, x):
        y = act(model(x))
        return (y * torch.arange(y.numel(), device=device).reshape(y.shape)).sum()

    losses, grads = [], []
    for model, fn in ((ref, step), (ours, _compiled(step, compiled))):
        xl = x.clone().requires_grad_()
        loss = fn(model, xl)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, (xl, *model.parameters())))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-4)
    for g, e in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)


def _torch_block(x, w, r):
    h = x + r
    return F.layer_norm(h, (x.shape[-1],), w), h


@pytest.mark.parametrize("compiled", COMPILE)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_residual_sum_edited_in_place(backend, device, compiled):
    # `h += 1` on the returned sum, as after `h = x + r; y = F.layer_norm(h)`: the edit itself is
    # legal, the gradient of h is h's; and y edited in place too (its backward does not read y).
    x, w, r = torch.randn(2, 3, 16), torch.randn(16), torch.randn(2, 3, 16)
    gh, gy = torch.randn(2, 3, 16), torch.randn(2, 3, 16)

    def ours(x, w, r):
        y, h = fl.layer_norm(x, w, residual=r, backend=backend)
        h += 1
        y.mul_(2)
        return (h * gh.to(device)).sum() + (y.detach() * gy.to(device)).sum()

    def plain(x, w, r):
        y, h = _torch_block(x, w, r)
        h += 1
        y.mul_(2)
        return (h * gh).sum() + (y.detach() * gy).sum()

    leaves = [_leaf(t, device) for t in (x, w, r)]
    loss = _compiled(ours, compiled)(*leaves)
    g = torch.autograd.grad(loss, [leaves[0], leaves[2]])
    leaves_t = [_leaf(t, "cpu") for t in (x, w, r)]
    loss_t = plain(*leaves_t)
    g_t = torch.autograd.grad(loss_t, [leaves_t[0], leaves_t[2]])
    torch.testing.assert_close(loss.cpu(), loss_t, rtol=1e-5, atol=1e-4)
    for a, e in zip(g, g_t):
        torch.testing.assert_close(a.cpu(), e)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_output_edited_in_place_then_full_backward(backend, device):
    # y *= 2 then a loss through y and h: legal in plain torch (layer norm saves its input, not its
    # output), so legal here, with the same gradients.
    x, w, b, r = torch.randn(4, 16), torch.randn(16), torch.randn(16), torch.randn(4, 16)
    gy, gh = torch.randn(4, 16), torch.randn(4, 16)
    leaves = [_leaf(t, device) for t in (x, w, b, r)]
    y, h = fl.layer_norm(*leaves[:3], residual=leaves[3], backend=backend)
    y *= 2
    g = torch.autograd.grad((y * gy.to(device)).sum() + (h * gh.to(device)).sum(), leaves)
    leaves_t = [_leaf(t, "cpu") for t in (x, w, b, r)]
    h_t = leaves_t[0] + leaves_t[3]
    y_t = F.layer_norm(h_t, (16,), leaves_t[1], leaves_t[2])
    y_t *= 2
    g_t = torch.autograd.grad((y_t * gy).sum() + (h_t * gh).sum(), leaves_t)
    for a, e in zip(g, g_t):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sum_edited_then_needed_by_the_norm_raises_as_in_torch(backend, device):
    # Plain torch refuses this backward (F.layer_norm saved h, then h changed); so does every backend,
    # with torch's own message -- never a silently wrong gradient.
    leaves = [_leaf(t, device) for t in (torch.randn(3, 8), torch.randn(8), torch.randn(3, 8))]
    y_t, h_t = _torch_block(*[_leaf(t, "cpu") for t in leaves])
    h_t += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y_t.sum() + h_t.sum()).backward()
    y, h = fl.layer_norm(leaves[0], leaves[1], residual=leaves[2], backend=backend)
    h += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + h.sum()).backward()


# ============================================================================ 4. mixed dtypes
def _torch_accepts(fn) -> bool:
    try:
        fn()
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("xdtype,compiled", [(torch.float16, False), (torch.bfloat16, False), (torch.float16, True)])
def test_half_activations_with_float32_parameters(xdtype, compiled, rms, backend, device):
    _skip_interpreter_bf16(backend, device, xdtype)
    cols = 40
    x = torch.randn(3, 5, cols).to(xdtype)
    r = torch.randn(3, 5, cols).to(xdtype)
    w, b = 1 + 0.5 * torch.randn(cols), 0.5 * torch.randn(cols)
    leaves = [_leaf(t, device) for t in (x, w, b, r)]
    f = _compiled(lambda x, w, b, r: fl.layer_norm(x, w, b, EPS, residual=r, rms=rms, backend=backend), compiled)
    y, s = f(*leaves)
    assert y.dtype == xdtype and s.dtype == xdtype
    y64, s_ref = _ref64(x, w, b, r, rms)
    torch.testing.assert_close(s.detach().cpu(), s_ref, rtol=0, atol=0)
    # torch's own result at these dtypes (F.layer_norm takes them; RMSNorm: F.rms_norm + bias)
    own = ln_op._native(x, w, b, r, EPS, rms)[0] if rms else F.layer_norm(s_ref, (cols,), w, b, EPS)
    assert own.dtype == xdtype
    assert_close_rule(y.detach().cpu(), y64, own, what="y")
    gy = torch.randn(3, 5, cols).to(xdtype)
    gs = torch.randn(3, 5, cols).to(xdtype)
    grads = torch.autograd.grad((y.float() * gy.to(device).float()).sum() + (s.float() * gs.to(device).float()).sum(),
                                leaves)
    assert [g.dtype for g in grads] == [xdtype, torch.float32, torch.float32, xdtype]
    l64 = [t.detach().double().requires_grad_() for t in (s_ref, w, b)]
    y64 = ln_op._native(l64[0], l64[1], l64[2], None, EPS, rms)
    g64 = torch.autograd.grad((y64 * gy.double()).sum(), l64)
    ds64 = g64[0] + gs.double()
    floor = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xdtype]
    for name, g, e in (("dx", grads[0], ds64), ("dweight", grads[1], g64[1]), ("dbias", grads[2], g64[2]),
                       ("dresidual", grads[3], ds64)):
        assert_close_rule(g.cpu(), e, factor=0, floor=floor * (4 if name in ("dweight", "dbias") else 1),
                          what=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("xdtype,wdtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                           (torch.float32, torch.float64), (torch.float16, torch.bfloat16)])
def test_rms_norm_takes_any_parameter_dtype_as_torch(xdtype, wdtype, backend, device):
    _skip_interpreter_bf16(backend, device, xdtype)
    x = torch.randn(6, 32).to(xdtype)
    w = (1 + 0.5 * torch.randn(32)).to(wdtype)
    torch_y = F.rms_norm(x, (32,), w, EPS)  # torch accepts every pairing; y has x's dtype
    assert torch_y.dtype == xdtype
    xl, wl = _leaf(x, device), _leaf(w, device)
    y = fl.layer_norm(xl, wl, None, EPS, rms=True, backend=backend)
    assert y.dtype == xdtype
    y64, _ = _ref64(x, w, None, None, True)
    assert_close_rule(y.detach().cpu(), y64, torch_y, what="y")
    gy = torch.randn(6, 32)
    dx, dw = torch.autograd.grad((y.double() * gy.to(device).double()).sum(), (xl, wl))
    assert dx.dtype == xdtype and dw.dtype == wdtype
    l64 = [x.double().requires_grad_(), w.double().requires_grad_()]
    g64 = torch.autograd.grad((F.rms_norm(l64[0], (32,), l64[1], EPS) * gy.double()).sum(), l64)
    floor = 1.6e-2 if torch.bfloat16 in (xdtype, wdtype) else 2e-3
    assert_close_rule(dx.cpu(), g64[0], factor=0, floor=floor, what="dx")
    assert_close_rule(dw.cpu(), g64[1], factor=0, floor=4 * floor, what="dweight")


@pytest.mark.parametrize("xdtype,wdtype,bdtype", [
    (torch.float32, torch.bfloat16, None), (torch.float32, torch.float64, None), (torch.float64, torch.float32, None),
    (torch.bfloat16, torch.float16, None), (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float16, torch.float32)])
def test_layer_norm_rejects_mixed_dtypes_torch_rejects(xdtype, wdtype, bdtype):
    x = torch.randn(4, 8).to(xdtype)
    w = torch.randn(8).to(wdtype)
    b = torch.randn(8).to(bdtype) if bdtype is not None else None
    assert not _torch_accepts(lambda: F.layer_norm(x, (8,), w, b))
    bad = "weight" if bdtype is None or wdtype != xdtype and wdtype != torch.float32 else "bias"
    with pytest.raises(TypeError, match=f"{bad}: expected x's dtype"):
        fl.layer_norm(x, w, b)
    with pytest.raises(TypeError, match="residual: expected x's dtype"):
        fl.layer_norm(x, None, residual=torch.randn(4, 8).to(torch.float16 if xdtype != torch.float16 else
                                                                 torch.float32))


def test_mixed_dtypes_through_the_custom_op():
    # What torch.compile runs for kernel backends: parameters of float32 beside half activations, and
    # the backward op's param_dtype (dbias's dtype when there is no weight).
    x, b = torch.randn(3, 12).to(torch.bfloat16), torch.randn(12)
    backends = ["torch"] + (["triton"] if INTERPRET else [])
    for backend in backends:
        torch.library.opcheck(torch.ops.fastlayers.layer_norm_fwd.default, (x, None, b, None, EPS, False, backend))
        y, _, mean, rstd = torch.ops.fastlayers.layer_norm_fwd(x, None, b, None, EPS, False, backend)
        args = (torch.randn(3, 12).to(torch.bfloat16), x, None, mean, rstd, None, True, False, backend, torch.float32)
        torch.library.opcheck(torch.ops.fastlayers.layer_norm_bwd.default, args)
        ds, dw, db = torch.ops.fastlayers.layer_norm_bwd(*args)
        assert ds.dtype == torch.bfloat16 and db.dtype == torch.float32 and dw.numel() == 0


# ============================================================================ 5. autocast
def test_autocast_policy_matches_torch_dispatcher():
    # _AUTOCAST_FP32 says where torch's autocast runs the norms in fp32: the ops registered for
    # AutocastCUDA (its fp32 list; the GPU test checks the dtype) and not for AutocastCPU.
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("aten::layer_norm", "aten::rms_norm"):
        assert has(op, "AutocastCUDA") == ("cuda" in ln_op._AUTOCAST_FP32), op
        assert has(op, "AutocastCPU") == ("cpu" in ln_op._AUTOCAST_FP32), op


# (x dtype, residual dtype or None, weight dtype): what autocast training passes (fp32 residual
# stream, half outputs of autocast linears, fp32 parameters).
AUTOCAST_CASES = [(torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.float32, torch.float32),
                  (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float32, None, torch.float32),
                  (torch.bfloat16, None, torch.bfloat16)]


def _check_autocast(backend, device, ac_dtype, xdtype, rdtype, wdtype, rms, compiled):
    cols = 16
    x = torch.randn(2, 3, cols, dtype=xdtype, device=device)
    r = torch.randn(2, 3, cols, dtype=rdtype, device=device) if rdtype is not None else None
    w = (1 + 0.5 * torch.randn(cols)).to(wdtype).to(device)
    b = None if rms else (0.5 * torch.randn(cols)).to(wdtype).to(device)

    def plain(x, w, b, r):  # the torch composition fl.layer_norm stands for
        s = x if r is None else x + r
        y = F.rms_norm(s, (cols,), w, EPS) if rms else F.layer_norm(s, (cols,), w, b, EPS)
        return y if r is None else (y, s)

    def ours(x, w, b, r):
        return fl.layer_norm(x, w, b, EPS, residual=r, rms=rms, backend=backend)

    with torch.autocast(device, dtype=ac_dtype):
        expect = plain(x, w, b, r)
        got = _compiled(ours, compiled)(x, w, b, r)
    expect = expect if r is not None else (expect,)
    got = got if r is not None else (got,)
    for name, g, e in zip(("y", "s"), got, expect):
        assert g.dtype == e.dtype, f"{name}: dtype {g.dtype}, torch under autocast gives {e.dtype}"
        torch.testing.assert_close(g, e, rtol=2e-2 if e.dtype in HALF else 1e-5,
                                   atol=2e-2 if e.dtype in HALF else 1e-5)


@pytest.mark.parametrize("backend,device", [c for c in BACKENDS if c.values[1] == "cpu"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("case,compiled",
                         [(c, False) for c in AUTOCAST_CASES] + [(c, True) for c in AUTOCAST_CASES[1:3]])
def test_cpu_autocast_as_torch(case, compiled, rms, backend, device):
    xdtype, rdtype, wdtype = case
    _skip_interpreter_bf16(backend, device, xdtype if rdtype in (None, xdtype) else rdtype)
    if not rms and xdtype == torch.float32 and wdtype == torch.bfloat16:
        pytest.skip("F.layer_norm rejects it")
    _check_autocast(backend, device, torch.bfloat16, xdtype, rdtype, wdtype, rms, compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("case", AUTOCAST_CASES)
@pytest.mark.parametrize("ac_dtype", HALF)
def test_gpu_autocast_as_torch(ac_dtype, case, rms, backend):
    # torch's behaviour is probed by the same call of the plain composition (float32 norms today).
    _check_autocast(backend, "cuda", ac_dtype, *case, rms, False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case", AUTOCAST_CASES[1:3])
def test_gpu_autocast_as_torch_compiled(case, backend):
    _check_autocast(backend, "cuda", torch.bfloat16, *case, False, True)


# ============================================================================ 6. the torch backend
def test_torch_backend_is_torch_autograd():
    x, w, b, r = (torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True),
                  torch.randn(8, requires_grad=True), torch.randn(3, 8, requires_grad=True))
    y, s = fl.layer_norm(x, w, b, residual=r, backend="torch")
    assert "LayerNorm" in type(y.grad_fn).__name__ and "Add" in type(s.grad_fn).__name__
    y = fl.layer_norm(x, w, None, rms=True, backend="torch")
    assert "Fn" not in type(y.grad_fn).__name__, type(y.grad_fn).__name__  # no autograd.Function of ours


@pytest.mark.parametrize("rms", [False, True])
def test_torch_backend_traces_the_native_ops(rms):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    f = torch.compile(lambda x, w, r: fl.layer_norm(x, w, residual=r, rms=rms), fullgraph=True, backend=capture)
    x, w, r = torch.randn(4, 8), torch.randn(8), torch.randn(4, 8)
    y, s = f(x, w, r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (8,), w, EPS) if rms else F.layer_norm(x + r, (8,), w))
    assert graphs and "fastlayers" not in graphs[0] and ("rms_norm" if rms else "layer_norm") in graphs[0]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("params", ["none", "bias32", "same"])
def test_half_statistics_stay_float32(params, dtype, backend, device):
    # One column (every row constant) with BERT's eps = 1e-12: rstd = 1e6 must stay a float32
    # statistic (dx = rstd * (dy - mean(dy)) = 0). CPU F.layer_norm with half parameters saves a half
    # rstd (fp16: inf, then 0 * inf = NaN); the torch backend hands it float32 parameters instead.
    _skip_interpreter_bf16(backend, device, dtype)
    x = torch.randn(5, 1).to(dtype)
    w = b = None
    if params == "bias32":
        b = torch.randn(1)
    elif params == "same":
        w, b = torch.randn(1).to(dtype), torch.randn(1).to(dtype)
    if dtype == torch.float16 and params == "same":  # torch itself: NaN (why the backend avoids it)
        xt = x.clone().requires_grad_()
        assert torch.autograd.grad(F.layer_norm(xt, (1,), w, b, 1e-12).sum(), xt)[0].isnan().all()
    leaves = [_leaf(t, device) for t in (x, w, b)]
    y = fl.layer_norm(*leaves, eps=1e-12, backend=backend)
    gy = torch.randn(5, 1).to(dtype)
    grads = torch.autograd.grad((y.float() * gy.to(device).float()).sum(), [t for t in leaves if t is not None])
    l64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = F.layer_norm(l64[0], (1,), l64[1], l64[2], 1e-12)
    g64 = torch.autograd.grad((y64 * gy.double()).sum(), [t for t in l64 if t is not None])
    # torch's own at these values with float32 statistics: its CPU kernel forms x * (rstd w) + ...,
    # which cancels to ~1e6 * 2^-24 in y and in dweight (xhat): the rule's "torch's own error"
    lo = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    own = F.layer_norm(lo[0], (1,), torch.ones(1) if w is None else lo[1].float(),
                       None if b is None else lo[2].float(), 1e-12)
    g_own = torch.autograd.grad((own.float() * gy.float()).sum(), [t for t in lo if t is not None])
    assert_close_rule(y.detach().cpu(), y64, own, what="y")
    assert grads[0].dtype == dtype and not grads[0].any()
    floor = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, e, o in zip(grads, g64, g_own):
        assert_close_rule(g.cpu(), e, o, floor=4 * floor, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nn_rms_norm_eps_none_mixed_as_torch(dtype):
    ref = torch.nn.RMSNorm(24, eps=None)
    ours = fl.nn.RMSNorm(24, eps=None)
    with torch.no_grad():
        ref.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    x = 1e-4 * torch.randn(5, 24).to(dtype)  # small: eps matters
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    for backend in ["triton"] if INTERPRET and dtype != torch.float64 else []:
        ours.backend = backend
        y = ours(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref(x).float(), rtol=2e-2, atol=2e-2)


def test_layer_norm_modules_import_no_dynamo():
    code = ("import sys, torch; import fastlayers.ops.layer_norm, fastlayers.kernels.layer_norm, "
            "fastlayers.cuda_ops.layer_norm, fastlayers.nn; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
