"""CPU tests of the benchmark harness (fastlayers.bench) and the `fastlayers` CLI.

- `fastlayers bench --quick --device cpu` runs the small torch-backend configuration and writes valid
  JSON with the environment header (one run per module, in a tmp dir; a few seconds).
- the FLOP / byte formulas match DESIGN.md ("Measuring") on hand-computed cases.
- the runner classifies rows: ok (with the backend that ran), unsupported, not available, error --
  with stand-in ops, so it does not depend on the state of the real kernels.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers import cli
from fastlayers.bench import formulas, harness, norm, readme_table
from fastlayers.bench.impls import Config

ENV_KEYS = {"card", "driver", "cuda", "torch", "triton", "python", "git_commit", "fastlayers", "date"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["bench", "--quick", "--device", "cpu", "--no-plot", "--out", str(out)])
    return rc, buf.getvalue(), out


def test_cli_bench_quick_cpu_writes_json(cpu_run):
    rc, stdout, out = cpu_run
    assert "running a small CPU configuration of the torch backend (numbers are not GPU figures)" in stdout
    for group in ("norm", "attention", "linear"):
        latest = out / f"{group}-latest.json"
        dated = [p for p in out.glob(f"{group}-cpu-*.json")]
        assert latest.exists() and len(dated) == 1, sorted(p.name for p in out.iterdir())
        doc = json.loads(latest.read_text())
        assert doc == json.loads(dated[0].read_text())
        assert doc["group"] == group and doc["schema"] == 1
        assert ENV_KEYS <= set(doc["env"]), ENV_KEYS - set(doc["env"])
        assert doc["env"]["torch"] == torch.__version__
        assert doc["env"]["git_commit"]  # a hash or "unknown"
        rows = doc["rows"]
        eager = [r for r in rows if r["impl"] == "torch eager"]
        assert eager and all(r["status"] == "ok" and r["time_ms"] > 0 and r["speedup_vs_eager"] == 1.0
                             for r in eager)
        fl_rows = [r for r in rows if r["impl"] == "fastlayers[torch]"]
        assert fl_rows
        for r in fl_rows:
            assert r["status"] == "ok" or r["status"].startswith("not available"), r
            if r["status"] == "ok":
                assert r["backend_ran"] == "torch" and r["rate"] > 0
        assert f"== {group}" in stdout
    # any failing fastlayers row makes the exit status 1
    assert rc == 0


def test_readme_table_from_cpu_json(cpu_run, capsys):
    _, _, out = cpu_run
    assert readme_table.main(["--results", str(out)]) == 1           # CPU runs are left out by default
    capsys.readouterr()
    assert readme_table.main(["--results", str(out), "--include-cpu"]) == 0
    text = capsys.readouterr().out
    assert "| variant | case | unit |" in text and "torch eager" in text and "not GPU figures" in text


def test_cli_info_runs(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends:" in text or "available_backends is not defined" in text
    assert "torch" in text


def test_formulas_match_design_by_hand():
    # attention: 4*B*H*Lq*Lk_avg*D; B=2, H=3, Lq=5, Lk=7, D=4
    assert formulas.attention_fwd_flops(2, 3, 5, 7, 4, causal=False) == 4 * 2 * 3 * 5 * 7 * 4 == 3360
    # causal, bottom-right: Lk_avg = (max(0, 7-5) + 7) / 2 = 4.5
    assert formulas.attention_fwd_flops(2, 3, 5, 7, 4, causal=True) == 4 * 2 * 3 * 5 * 4.5 * 4 == 2160
    assert formulas.attention_lk_avg(7, 5, causal=True) == 2.5        # Lq > Lk: max(0, .) clamps
    assert formulas.attention_bwd_flops(2, 3, 5, 7, 4, causal=False) == 2.5 * 3360
    assert formulas.attention_fwdbwd_flops(2, 3, 5, 7, 4, causal=True) == 3.5 * 2160
    assert formulas.gemm_fwd_flops(3, 5, 7) == 2 * 3 * 5 * 7 and formulas.gemm_bwd_flops(3, 5, 7) == 420
    # decode: K and V of a (B=2, L=10, H=3, D=4) bf16 cache
    assert formulas.decode_kv_bytes(2, 10, 3, 4, 2) == 2 * 2 * 10 * 3 * 4 * 2 == 960
    # LayerNorm fwd, rows=3, cols=8, bf16: x + y = 2*48, weight + bias = 2*16 -> 128
    assert formulas.norm_fwd_bytes(3, 8, 2) == 128
    # with residual: + residual read + residual_out written (2*48) -> 224
    assert formulas.norm_fwd_bytes(3, 8, 2, has_residual=True) == 224
    # RMSNorm fwd, no bias: 96 + 16 -> 112
    assert formulas.norm_fwd_bytes(3, 8, 2, has_bias=False) == 112
    # LayerNorm bwd: s, dy, dx (3*48) + mean, rstd (3*2*4) + dweight, dbias (2*16) -> 200
    assert formulas.norm_bwd_bytes(3, 8, 2, rms=False) == 200
    # RMSNorm bwd: 144 + rstd 12 + dweight 16 -> 172
    assert formulas.norm_bwd_bytes(3, 8, 2, rms=True, has_bias=False) == 172


def test_runner_classifies_rows_with_stand_in_ops(monkeypatch):
    """ok (backend recorded), unsupported (BackendUnavailableError / ValueError), not available
    (backend registry says so), error (wrong backend ran, crash) -- one bad row never stops the run."""
    last = {}

    def stand_in(x, weight, bias=None, eps=1e-5, *, residual=None, rms=False, backend=None):
        if backend == "cuda":
            raise ValueError("layer_norm: backend 'cuda' takes CUDA tensors, got cpu")
        if backend == "triton":
            last["layer_norm"] = "torch"                 # claims a backend other than the one asked
        else:
            last["layer_norm"] = backend
        s = x + residual if residual is not None else x
        y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
        return (y, s) if residual is not None else y

    avail = {"torch": {"available": True, "reason": None}, "triton": {"available": True, "reason": None},
             "cuda": {"available": True, "reason": None}}
    monkeypatch.setattr(fl, "layer_norm", stand_in, raising=False)
    monkeypatch.setattr(fl, "last_backend", lambda op: last.get(op), raising=False)
    monkeypatch.setattr(fl, "available_backends", lambda: avail, raising=False)
    cfg = Config(device=torch.device("cpu"), dtype=torch.float32, quick=True, backends=["torch", "triton", "cuda"])
    jobs = [j for j in norm.jobs(cfg) if j.case.get("norm") == "layer" and j.variant in ("fwd", "bwd")]
    runner = harness.Runner(cfg.device, quick=True, peaks=None)
    rows = {(r["variant"], r["impl"]): r for r in harness.run_jobs(runner, jobs)}
    for v in ("fwd", "bwd"):
        assert rows[(v, "torch eager")]["status"] == "ok"
        ok = rows[(v, "fastlayers[torch]")]
        assert ok["status"] == "ok" and ok["backend_ran"] == "torch" and ok["speedup_vs_eager"] > 0
        assert rows[(v, "fastlayers[cuda]")]["status"].startswith("unsupported: ValueError: layer_norm")
        assert rows[(v, "fastlayers[triton]")]["status"].startswith("error:")
        assert "says 'torch' ran" in rows[(v, "fastlayers[triton]")]["status"]
    assert rows[("fwd", "fastlayers[torch]")]["max_abs_diff_vs_eager"] == 0.0

    # a backend the registry marks unavailable, and an op missing from the build
    avail["cuda"] = {"available": False, "reason": "libfastlayers_cuda.so is not built"}
    monkeypatch.delattr(fl, "linear", raising=False)
    from fastlayers.bench import linear
    skipped = [r for r in harness.run_jobs(runner, [j for j in norm.jobs(cfg) if j.impl == "fastlayers[cuda]"][:1])]
    assert skipped[0]["status"] == "not available: libfastlayers_cuda.so is not built"
    lin = [j for j in linear.jobs(cfg) if j.impl.startswith("fastlayers")]
    assert lin and all(j.skip == "not available: fastlayers.linear is not defined in this build" for j in lin)

    # a crash inside an implementation is an error row, not an exception
    def crash(x, *a, **k):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(fl, "layer_norm", crash)
    crashed = harness.run_jobs(runner, [j for j in norm.jobs(cfg) if j.impl == "fastlayers[torch]"][:1])
    assert crashed[0]["status"] == "error: RuntimeError: kernel exploded"


def test_table_is_aligned():
    from fastlayers.bench import report
    rows = [{"group": "norm", "case": {"norm": "layer", "rows": 4, "hidden": 8}, "variant": "fwd", "impl": i,
             "unit": "GB/s", "time_ms": t, "rate": 1.0 / t, "fraction_of_peak": None, "speedup_vs_eager": 1.0,
             "backend_ran": None, "status": "ok"} for i, t in (("torch eager", 0.5), ("fastlayers[triton]", 0.25))]
    lines = report.format_table("norm", rows).splitlines()
    assert len(lines) == 4 and len({line.index("GB/s") for line in lines[2:]}) == 1


def test_gpu_smoke_cases_run_on_the_torch_backend():
    # The GPU smoke script's cases, pointed at the torch backend on CPU: they must run and agree.
    import torch
    from fastlayers.bench import gpu_smoke as s
    for fn in (s.case_layer_norm, s.case_attention, s.case_kvcache, s.case_linear):
        ran, err = fn("torch", torch.float32, "cpu")
        assert ran == "torch" and err < 1e-4, (fn.__name__, ran, err)
