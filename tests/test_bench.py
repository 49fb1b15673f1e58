"""CPU tests of the benchmark harness (fastlayers.bench) and the `fastlayers` CLI.

- `fastlayers bench --quick --device cpu` runs the model-sized CPU configuration of the torch
  backend and writes valid JSON with the environment header, every row's error, the backends that
  ran, and the torch backend's ratio to the native call per op (one run per module, in a tmp dir).
- a plain run (no --out) writes only under the documented per-user folder, never into the checkout,
  says where, and never imports torch._dynamo.
- every row is checked against its baseline on the same inputs: deliberately wrong stand-in ops (the
  LayerNorm rows running RMSNorm, a dropped causal flag / mask / activation / residual, a wrong
  backward, a decode reading unused cache slots) make exactly their rows FAILED, with no speed; correct
  stand-ins that record their arguments prove every row's label matches what it asks for; the
  baseline rows are checked against float64 oracles written from the case labels alone.
- the FLOP / byte formulas match DESIGN.md ("Measuring") on hand-computed cases.
- the runner classifies rows: ok (with the backend that ran), unsupported, not available, error,
  FAILED, unverified -- with stand-in ops, so it does not depend on the state of the real kernels.
- the bert model group (part of the default run): fastlayers.models.BertModel against transformers
  eager / sdpa with the same weights, checked on the non-padded positions; a perturbed weight, a
  dropped padding mask or a model that does not run on fastlayers ops is caught; --ops / --models.
"""
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers import cli
from fastlayers.bench import attention, bert, formulas, harness, linear, norm, readme_table, report, run
from fastlayers.bench.impls import Config

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = {"card", "driver", "cuda", "torch", "triton", "python", "git_commit", "fastlayers", "date",
            "backends_requested", "out_dir", "seed"}
GROUPS = {"norm": norm, "attention": attention, "linear": linear}
SPEED_KEYS = ("time_ms", "rate", "fraction_of_peak", "speedup_vs_eager", "time_ratio_vs_eager", "baseline_time_ms")


def _cli(argv) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc, stdout = _cli(["bench", "--quick", "--device", "cpu", "--no-plot", "--out", str(out)])
    return rc, stdout, out


# ---------------------------------------------------------------------------------------------
# the real CLI run (torch backend, real ops)

def test_cli_bench_quick_cpu_writes_json(cpu_run):
    rc, stdout, out = cpu_run
    assert "device: cpu" in stdout and "numbers are not GPU figures" in stdout
    assert "fastlayers backends asked for: torch" in stdout
    assert f"results folder: {out}" in stdout
    failing = []
    for group in ("norm", "attention", "linear"):
        latest = out / f"{group}-latest.json"
        dated = [p for p in out.glob(f"{group}-cpu-*.json")]
        assert latest.exists() and len(dated) == 1, sorted(p.name for p in out.iterdir())
        doc = json.loads(latest.read_text())
        assert doc == json.loads(dated[0].read_text())
        assert doc["group"] == group and doc["schema"] == report.SCHEMA
        assert ENV_KEYS <= set(doc["env"]), ENV_KEYS - set(doc["env"])
        assert doc["env"]["torch"] == torch.__version__ and doc["env"]["dtype"] == "float32"
        assert doc["env"]["backends_requested"] == ["torch"] and doc["env"]["git_commit"]
        assert doc["tolerances"]["float32"] == harness.TOLERANCE[torch.float32]
        rows = doc["rows"]
        eager = [r for r in rows if r["impl"] == "torch eager"]
        assert eager and all(r["reference"] and r["status"] == "ok" and r["time_ms"] > 0
                             and r["speedup_vs_eager"] == 1.0 and r["error"] == 0.0 for r in eager)
        fl_rows = [r for r in rows if r["impl"] == "fastlayers[torch]"]
        assert fl_rows and len(fl_rows) == len(eager)
        for r in fl_rows:
            assert r["baseline"] == "torch eager" and r["tolerance"] == harness.TOLERANCE[torch.float32], r
            if r["status"] == "ok":
                assert r["backend_ran"] == "torch" and r["rate"] > 0 and r["error"] <= r["tolerance"], r
                assert r["time_ratio_vs_eager"] == pytest.approx(1 / r["speedup_vs_eager"])
                if r["unit"] != "us/call":       # timed alternately with its baseline: the ratio's base
                    assert r["time_ratio_vs_eager"] == pytest.approx(r["time_ms"] / r["baseline_time_ms"])
                if r["unit"] != "us/call":
                    assert r["goal"] == {"max_time_ratio": report.GOAL_TIME_RATIO,
                                         "met": r["time_ratio_vs_eager"] <= report.GOAL_TIME_RATIO}
            else:
                assert r["status"].startswith(("FAILED", "error")), r
                assert all(r[k] is None for k in SPEED_KEYS), r
                failing.append(r)
        assert doc["backends_ran"] == {"fastlayers[torch]": ["torch"]}
        assert f"== {group}" in stdout
    assert "fastlayers backends that ran (fl.last_backend): fastlayers[torch] -> torch" in stdout
    # the default run measures the bert model group too
    bert_rows = json.loads((out / "bert-latest.json").read_text())["rows"]
    failing += [r for r in bert_rows
                if r["impl"].startswith("fastlayers") and r["status"].startswith(("FAILED", "error"))]
    # any failing fastlayers row makes the exit status 1
    assert rc == (1 if failing else 0)


def test_cli_bench_cpu_shows_each_op_against_its_native_call(cpu_run):
    _, stdout, out = cpu_run
    summary = stdout[stdout.index("torch backend vs the native torch call"):]
    for op, native in (("layer_norm", "F.layer_norm"), ("rms_norm", "F.rms_norm"),
                       ("attention padding mask", "SDPA bool attn_mask"),
                       ("attention causal", "SDPA is_causal=True"),
                       ("attention_with_kvcache", "SDPA on the valid cache slice"),
                       ("linear + gelu", "F.linear + F.gelu")):
        lines = [line for line in summary.splitlines() if line.startswith(op + " ") and native in line]
        assert lines, (op, native, summary)
    assert "goal: within 1.2x" in summary


def test_cpu_bench_torch_backend_rows_pass(cpu_run):
    """The torch backend computes what its native call computes, on every CPU row (a FAILED row
    here is a real fault of the op, e.g. NaN in unused KV-cache slots leaking into the output)."""
    _, _, out = cpu_run
    bad = [(r["variant"], report.case_label(g, r["case"]), r["status"])
           for g in GROUPS for r in json.loads((out / f"{g}-latest.json").read_text())["rows"]
           if r["impl"] == "fastlayers[torch]" and r["status"] != "ok"]
    assert not bad, bad


def test_readme_table_from_cpu_json(cpu_run, capsys):
    _, _, out = cpu_run
    assert readme_table.main(["--results", str(out)]) == 1           # CPU runs are left out by default
    capsys.readouterr()
    assert readme_table.main(["--results", str(out), "--include-cpu"]) == 0
    text = capsys.readouterr().out
    assert "| variant | case | unit |" in text and "torch eager" in text and "not GPU figures" in text
    # the bert table: one row per case, sequences/s, fastlayers cells with their speed-up over sdpa
    assert "### BERT encoder" in text
    assert "| case | transformers eager | transformers sdpa | fastlayers[torch] |" in text
    assert re.search(r"\| bert-tiny-cpu B2 L128 lengths 16\.\.128 \| [0-9.]+ \| [0-9.]+ \| "
                     r"[0-9.]+ \([0-9.]+x sdpa\) \|", text), text
    # as a script from the checkout, too (it imports no torch)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_table.py"), "--results", str(out),
                           "--include-cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == text.strip(), proc.stderr[-2000:]


_WRITE_AUDIT = r"""
import json, os, sys
written = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
            written.append(os.fsdecode(path))
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.copyfile"):
        written.extend(os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))
sys.addaudithook(hook)
from fastlayers import cli
rc = cli.main(["bench", "--quick", "--device", "cpu", "--ops", "norm"])
print("RESULT " + json.dumps({"rc": rc, "written": [os.path.realpath(p) for p in written],
                              "dynamo": "torch._dynamo" in sys.modules}))
"""


def test_plain_bench_run_writes_only_to_the_default_folder(tmp_path):
    """No --out: results go to $XDG_CACHE_HOME/fastlayers/bench, the path is printed, nothing is
    written into the checkout (run from its root), and torch._dynamo is never imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTLAYERS_BENCH_DIR", "MPLCONFIGDIR")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run([sys.executable, "-c", _WRITE_AUDIT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    default = (tmp_path / "xdg" / "fastlayers" / "bench").resolve()
    assert f"results folder: {default}" in proc.stdout
    assert (default / "norm-latest.json").exists(), proc.stdout[-2000:]
    root = str(ROOT.resolve()) + os.sep
    into_checkout = [p for p in result["written"] if p.startswith(root) and "__pycache__" not in p]
    assert not into_checkout, into_checkout
    ours = [p for p in result["written"] if p.startswith(str(default))]
    assert any(p.endswith("norm-latest.json") for p in ours), result["written"]
    assert not result["dynamo"], "fastlayers bench imported torch._dynamo without a compile row"


def test_default_out_dir_is_per_user_and_documented(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLAYERS_BENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert run.default_out_dir() == tmp_path / "c" / "fastlayers" / "bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert run.default_out_dir() == Path.home() / ".cache" / "fastlayers" / "bench"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")          # the XDG spec: relative paths are ignored
    assert run.default_out_dir() == Path.home() / ".cache" / "fastlayers" / "bench"
    monkeypatch.setenv("FASTLAYERS_BENCH_DIR", str(tmp_path / "mine"))
    assert run.default_out_dir() == tmp_path / "mine"
    # gpu_check.sh names its own folder
    assert '--out "$BENCH_DIR"' in (ROOT / "benchmarks" / "gpu_check.sh").read_text()


def test_cli_info_runs(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends:" in text or "available_backends is not defined" in text
    assert "torch" in text


# ---------------------------------------------------------------------------------------------
# stand-in ops: correct or deliberately wrong, recording what each call asked for

class StandIns:
    """Differentiable torch compositions with fastlayers' signatures. `fault` makes one wrong."""

    def __init__(self, fault: str | None = None, ran: str | None = None):
        self.fault, self.ran = fault, ran
        self.calls: list = []
        self.last: dict = {}

    def _record(self, op, backend, **kw):
        self.calls.append((op, dict(kw, backend=backend)))
        self.last[op] = self.ran or backend or "torch"

    def layer_norm(self, x, weight, bias=None, eps=1e-5, *, residual=None, rms=False, backend=None):
        self._record("layer_norm", backend, x=x, bias=bias, residual=residual, rms=rms)
        s = x + residual if residual is not None else x
        if self.fault == "layer_norm runs rms_norm":
            rms = True
        if self.fault == "layer_norm wrong weight grad":
            weight = weight.detach() + 0 * weight          # forward right, d/dweight = 0
        y = F.rms_norm(s, (s.shape[-1],), weight, eps) if rms else F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
        if residual is None:
            return y
        return (y, x) if self.fault == "layer_norm returns x, not x + residual" else (y, s)

    def attention(self, q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, dropout_p=0.0,
                  backend=None):
        self._record("attention", backend, q=q, causal=causal, key_padding_mask=key_padding_mask)
        if self.fault == "attention ignores causal":
            causal = False
        if self.fault == "attention ignores key_padding_mask":
            key_padding_mask = None
        m = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m,
                                           is_causal=causal, scale=softmax_scale)
        return o.transpose(1, 2)

    def attention_with_kvcache(self, q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *, causal=True,
                               softmax_scale=None, block_table=None, backend=None):
        self._record("attention_with_kvcache", backend, q=q, k_cache=k_cache, cache_seqlens=cache_seqlens,
                     k_new=k_new, causal=causal, block_table=block_table)
        if block_table is not None:  # the logical caches of a paged one
            k_cache, v_cache = (t[block_table.long()].flatten(1, 2) for t in (k_cache, v_cache))
        outs = []
        for b in range(q.shape[0]):
            n = k_cache.shape[1] if self.fault == "decode attends every slot" else int(cache_seqlens[b])
            k, v = k_cache[b:b + 1, :n], v_cache[b:b + 1, :n]
            outs.append(F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2), scale=softmax_scale).transpose(1, 2))
        return torch.cat(outs)

    def linear(self, x, weight, bias=None, *, activation=None, residual=None, backend=None):
        self._record("linear", backend, x=x, weight=weight, bias=bias, activation=activation, residual=residual)
        y = F.linear(x, weight, bias)
        if self.fault != "linear drops the activation":
            y = {None: lambda t: t, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                 "relu": F.relu}[activation](y)
        if residual is not None and self.fault != "linear drops the residual":
            y = y + residual
        return y

    def install(self, monkeypatch, available=("torch", "triton", "cuda")):
        for op in ("layer_norm", "attention", "attention_with_kvcache", "linear"):
            monkeypatch.setattr(fl, op, getattr(self, op), raising=False)
        monkeypatch.setattr(fl, "last_backend", lambda op: self.last.get(op), raising=False)
        monkeypatch.setattr(fl, "available_backends",
                            lambda: {b: {"available": b in available, "reason": None if b in available else "no"}
                                     for b in ("torch", "triton", "cuda")}, raising=False)
        return self


def _small_shapes(monkeypatch) -> None:
    """Small cases for the stand-in tests: what they check (labels, arguments, the check's verdict)
    does not depend on the size, and the CPU time does."""
    monkeypatch.setattr(norm, "shapes", lambda cfg: [(64, 96)])
    monkeypatch.setattr(attention, "train_shapes", lambda cfg: [(2, 64, 2, 32)])
    monkeypatch.setattr(attention, "decode_shapes", lambda cfg: [(2, 64, 2, 32)])
    monkeypatch.setattr(linear, "shapes", lambda cfg: [(32, 48, 64, False), (32, 64, 48, True)])


def _cfg(dtype=torch.float32, backends=("torch",)):
    return Config(device=torch.device("cpu"), dtype=dtype, quick=True, backends=list(backends))


def _runner():
    return harness.Runner(torch.device("cpu"), quick=True, peaks=None, cpu_min_seconds=0.0)


FAULTS = {
    # fault -> (group, which rows of that group it must fail: predicate on (case, variant))
    "layer_norm runs rms_norm": ("norm", lambda c, v: c["norm"] == "layer"),
    "layer_norm wrong weight grad": ("norm", lambda c, v: v == "bwd"),
    "layer_norm returns x, not x + residual": ("norm", lambda c, v: v == "fwd_residual"),
    "attention ignores causal": ("attention", lambda c, v: c.get("mask") == "causal"),
    "attention ignores key_padding_mask": ("attention", lambda c, v: c.get("mask") == "padding"),
    "decode attends every slot": ("attention", lambda c, v: v.startswith("decode")),
    "linear drops the activation": ("linear", lambda c, v: True),
    "linear drops the residual": ("linear", lambda c, v: c["residual"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_wrong_implementation_is_failed_and_never_timed(monkeypatch, fault):
    group, should_fail = FAULTS[fault]
    StandIns(fault).install(monkeypatch)
    _small_shapes(monkeypatch)
    rows = harness.run_jobs(_runner(), GROUPS[group].jobs(_cfg()))
    fl_rows = [r for r in rows if r["impl"] == "fastlayers[torch]"]
    expected = [should_fail(r["case"], r["variant"]) for r in fl_rows]
    assert any(expected) and fl_rows
    for r, fail in zip(fl_rows, expected):
        if fail:
            assert r["status"].startswith("FAILED: "), (fault, r)
            assert all(r[k] is None for k in SPEED_KEYS), r          # never reported as a speed
            assert "vs torch eager" in r["status"]
        else:
            assert r["status"] == "ok" and r["error"] <= r["tolerance"], (fault, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_rows_running_rms_norm_fail_at_every_dtype(monkeypatch, tmp_path, dtype):
    """The bug `fastlayers bench` shipped with: its LayerNorm rows ran RMSNorm. Through the CLI: the
    table says FAILED, the JSON has no speed, the exit status is 1."""
    StandIns("layer_norm runs rms_norm").install(monkeypatch)
    _small_shapes(monkeypatch)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    rc, stdout = _cli(["bench", "--quick", "--device", "cpu", "--ops", "norm", "--dtype", name, "--no-plot",
                       "--out", str(tmp_path)])
    assert rc == 1
    rows = json.loads((tmp_path / "norm-latest.json").read_text())["rows"]
    for r in rows:
        if r["impl"] != "fastlayers[torch]":
            continue
        if r["case"]["norm"] == "layer":
            assert r["status"].startswith("FAILED") and r["error"] > 4 * r["tolerance"], r
            assert all(r[k] is None for k in SPEED_KEYS)
        else:
            assert r["status"] == "ok", r
    table = [line for line in stdout.splitlines() if "fastlayers[torch]" in line and " layer " in line]
    assert table and all("FAILED" in line and " - " in line for line in table), table


def _check_call(group, case, variant, op, kw, backend):
    """The arguments a fastlayers row passed agree with its label."""
    assert kw["backend"] == backend
    if group == "norm":
        assert op == "layer_norm"
        assert kw["rms"] == (case["norm"] == "rms")
        assert (kw["residual"] is not None) == (variant == "fwd_residual")
        assert (kw["bias"] is None) == (case["norm"] == "rms")
        assert tuple(kw["x"].shape) == (case["rows"], case["hidden"])
    elif group == "attention" and variant == "decode":
        assert op == "attention_with_kvcache"
        assert tuple(kw["q"].shape) == (case["batch"], case["q_len"], case["heads"], case["head_dim"])
        assert tuple(kw["k_cache"].shape) == (case["batch"], case["max_len"], case["heads"], case["head_dim"])
        assert kw["cache_seqlens"].tolist() == [case["cache"]] * case["batch"] and kw["k_new"] is None
    elif group == "attention" and variant == "decode paged":
        assert op == "attention_with_kvcache"
        P = case["page"]
        pages = -(-case["max_len"] // P)
        assert tuple(kw["q"].shape) == (case["batch"], case["q_len"], case["heads"], case["head_dim"])
        assert tuple(kw["k_cache"].shape) == (case["batch"] * pages, P, case["heads"], case["head_dim"])
        assert tuple(kw["block_table"].shape) == (case["batch"], pages)
        assert sorted(kw["block_table"].flatten().tolist()) == list(range(case["batch"] * pages))
        assert kw["cache_seqlens"].tolist() == [case["cache"]] * case["batch"] and kw["k_new"] is None
    elif group == "attention":
        assert op == "attention"
        assert kw["causal"] == (case["mask"] == "causal")
        assert (kw["key_padding_mask"] is not None) == (case["mask"] == "padding")
        assert tuple(kw["q"].shape) == (case["batch"], case["seqlen"], case["heads"], case["head_dim"])
    elif group == "linear":
        assert op == "linear"
        assert kw["activation"] == case["activation"]
        assert (kw["residual"] is not None) == case["residual"] and (kw["bias"] is not None) == case["bias"]
        assert tuple(kw["x"].shape) == (case["M"], case["K"]) and tuple(kw["weight"].shape) == (case["N"], case["K"])


def _gpu_job_lists(monkeypatch) -> Config:
    """The GPU configuration's job lists (every baseline, both kernel backends), at small shapes on
    CPU tensors: its code paths run here, though its kernels and timers cannot."""
    class Props:
        total_memory = 80 * 2**30
    monkeypatch.setattr(Config, "gpu", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    _small_shapes(monkeypatch)
    monkeypatch.setattr(attention, "train_shapes", lambda cfg: [(2, 64, 2, 32), (1, 48, 2, 16)])
    return Config(device=torch.device("cpu"), dtype=torch.float32, quick=False, backends=["triton", "cuda"])


@pytest.mark.parametrize("lists", ["cpu", "gpu"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_every_fastlayers_row_asks_for_what_its_label_says(monkeypatch, group, lists):
    """...and every other row (baselines, third-party, SDPA pinned to a backend, the plain GEMM)
    passes its check or says why it did not run. torch.compile rows are built, not run (minutes)."""
    spy = StandIns().install(monkeypatch)
    _small_shapes(monkeypatch)
    cfg = _gpu_job_lists(monkeypatch) if lists == "gpu" else _cfg(backends=("torch", "triton"))
    jobs = GROUPS[group].jobs(cfg)
    if lists == "gpu":
        assert any(j.impl == "torch.compile" for j in jobs)
        jobs = [j for j in jobs if not j.impl.startswith("torch.compile")]
    runner = _runner()
    n = 0
    for job in jobs:
        spy.calls.clear()
        row = runner.run(job)
        if not job.impl.startswith(("fastlayers", "torch eager")):
            assert row["status"] == "ok" or row["status"].startswith(("unsupported", "not available")), row
            continue
        assert row["status"] == "ok", row
        if job.impl.startswith("fastlayers"):
            assert spy.calls, job.impl
            for op, kw in spy.calls:
                _check_call(group, job.case, job.variant, op, kw, job.fl_backend)
            assert row["backend_ran"] == job.fl_backend and row["baseline"] == "torch eager"
            n += 1
        else:
            assert not spy.calls, (job.impl, "a baseline row called a fastlayers op")
    assert n


# float64 oracles written from the case labels alone (not from the harness's code)

def _oracle(group, case, variant, d):
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in d.items()}
    if group == "norm":
        s = d["x"] + d["r"] if variant == "fwd_residual" else d["x"]
        if case["norm"] == "rms":
            y = s / torch.sqrt((s * s).mean(-1, keepdim=True) + norm.EPS) * d["w"]
        else:
            mu = s.mean(-1, keepdim=True)
            y = (s - mu) / torch.sqrt(((s - mu) ** 2).mean(-1, keepdim=True) + norm.EPS) * d["w"] + d["b"]
        return [y, s] if variant == "fwd_residual" else [y]
    if group == "attention":
        if variant == "decode":
            n = case["cache"]
            q, k, v, allow = d["q"], d["k_cache"][:, :n], d["v_cache"][:, :n], None
        elif variant == "decode paged":  # the logical caches slot by slot, from the table
            n, P = case["cache"], case["page"]
            B, H, D = case["batch"], case["heads"], case["head_dim"]
            k, v = (torch.stack([torch.stack([t[int(d["block_table"][b, j // P]), j % P] for j in range(n)])
                                 for b in range(B)]) for t in (d["k_cache"], d["v_cache"]))
            q, allow = d["q"], None
        else:
            q, k, v = d["q"], d["k"], d["v"]
            L = case["seqlen"]
            allow = torch.ones(case["batch"], 1, L, L, dtype=torch.bool)
            if case["mask"] == "causal":
                allow = allow & torch.ones(L, L, dtype=torch.bool).tril()
            if case["mask"] == "padding":
                lens = torch.tensor(attention.padding_lengths(case["batch"], L))
                allow = allow & (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if allow is not None:
            s = s.masked_fill(~allow, float("-inf"))
        return [torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)]
    if group == "linear":
        z = d["x"] @ d["w"].T + d["b"]
        y = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
        return [y + d["r"] if case["residual"] else y]
    raise AssertionError(group)


@pytest.mark.parametrize("group", list(GROUPS))
def test_every_baseline_row_computes_what_its_label_says(group):
    seen = 0
    for job in GROUPS[group].jobs(_cfg()):
        if not job.is_reference or harness._kind(job.variant) != "fwd":
            continue
        d = job.make_inputs()
        with torch.no_grad():
            out = harness._tensors(job.build()(d))
        expect = _oracle(group, job.case, job.variant, d)
        assert len(out) == len(expect), (job.case, job.variant)
        for o, e in zip(out, expect):
            err = (o.double() - e).abs().max().item() / e.abs().max().item()
            assert err < 1e-5, (job.case, job.variant, err)
        seen += 1
    assert seen


def test_layer_norm_and_rms_norm_differ_on_the_bench_inputs():
    """The check can only catch a mix-up its inputs expose: on the norm rows' inputs the two norms
    differ by far more than the loosest (bf16) tolerance."""
    for job in norm.jobs(_cfg(torch.bfloat16)):
        if job.is_reference and job.variant == "fwd" and job.case["norm"] == "layer":
            d = {k: v.float() for k, v in job.make_inputs().items()}
            ln = F.layer_norm(d["x"], d["x"].shape[-1:], d["w"], d["b"])
            rms = F.rms_norm(d["x"], d["x"].shape[-1:], d["w"])
            assert ((ln - rms).abs().max() / ln.abs().max()).item() > 4 * harness.TOLERANCE[torch.bfloat16]
            return
    raise AssertionError("no LayerNorm row")


# ---------------------------------------------------------------------------------------------
# header and JSON: the backends asked for and the backends that ran

def test_header_and_json_state_the_backends_that_ran(monkeypatch, tmp_path):
    StandIns().install(monkeypatch)
    _small_shapes(monkeypatch)
    rc, stdout = _cli(["bench", "--quick", "--device", "cpu", "--ops", "norm", "--backends", "triton", "--no-plot",
                       "--out", str(tmp_path)])
    assert rc == 0, stdout
    assert "fastlayers backends asked for: triton" in stdout
    assert "torch backend" not in stdout.split("\n== ")[0]          # the header claims no other backend
    assert "fastlayers backends that ran (fl.last_backend): fastlayers[triton] -> triton" in stdout
    doc = json.loads((tmp_path / "norm-latest.json").read_text())
    assert doc["env"]["backends_requested"] == ["triton"]
    assert doc["backends_ran"] == {"fastlayers[triton]": ["triton"]}
    assert {r["backend_ran"] for r in doc["rows"] if r["impl"].startswith("fastlayers")} == {"triton"}
    assert "torch backend vs the native torch call" not in stdout    # the CPU goal is about the torch backend


def test_a_row_whose_op_ran_another_backend_is_an_error(monkeypatch):
    StandIns(ran="torch").install(monkeypatch)                    # asked triton, records torch
    _small_shapes(monkeypatch)
    rows = harness.run_jobs(_runner(), norm.jobs(_cfg(backends=("triton",)))[:2])
    assert rows[1]["status"].startswith("error:") and "says 'torch' ran" in rows[1]["status"]
    assert all(rows[1][k] is None for k in SPEED_KEYS)


# ---------------------------------------------------------------------------------------------
# the runner: classification, baselines on the same inputs, compare()

def test_runner_classifies_rows_with_stand_in_ops(monkeypatch):
    """ok (backend recorded), unsupported (BackendUnavailableError), error (ValueError / TypeError
    from a fastlayers op: a wrong call is a bug, not "unsupported"; a crash), not available."""
    spy = StandIns().install(monkeypatch)
    _small_shapes(monkeypatch)
    real = spy.layer_norm

    def stand_in(x, weight, bias=None, eps=1e-5, *, residual=None, rms=False, backend=None):
        if backend == "cuda":
            raise fl.BackendUnavailableError("layer_norm: backend 'cuda' cannot run this case: CPU tensor")
        if backend == "triton":
            raise ValueError("layer_norm: weight must have shape (768,), got (2,)")
        return real(x, weight, bias, eps, residual=residual, rms=rms, backend=backend)
    monkeypatch.setattr(fl, "layer_norm", stand_in)
    cfg = _cfg(backends=("torch", "triton", "cuda"))
    jobs = [j for j in norm.jobs(cfg) if j.case.get("norm") == "layer" and j.variant in ("fwd", "bwd")]
    rows = {(r["variant"], r["impl"]): r for r in harness.run_jobs(_runner(), jobs)}
    for v in ("fwd", "bwd"):
        assert rows[(v, "torch eager")]["status"] == "ok"
        ok = rows[(v, "fastlayers[torch]")]
        assert ok["status"] == "ok" and ok["backend_ran"] == "torch" and ok["speedup_vs_eager"] > 0
        assert ok["error"] == 0.0                                    # same composition, same inputs
        assert rows[(v, "fastlayers[cuda]")]["status"].startswith("unsupported: BackendUnavailableError")
        assert rows[(v, "fastlayers[triton]")]["status"].startswith("error: ValueError: layer_norm: weight")

    def wrong_signature(x, weight, bias=None, eps=1e-5, *, backend=None):   # no residual/rms kwargs
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    monkeypatch.setattr(fl, "layer_norm", wrong_signature)
    jobs = [j for j in norm.jobs(_cfg()) if j.variant == "fwd" and j.case["norm"] == "layer"]
    assert harness.run_jobs(_runner(), jobs)[1]["status"].startswith("error: TypeError")

    # a backend the registry marks unavailable, and an op missing from the build
    monkeypatch.setattr(fl, "available_backends", lambda: {"torch": {"available": True, "reason": None},
                                                           "cuda": {"available": False, "reason": "not built"}})
    assert [j.skip for j in norm.jobs(_cfg(backends=("cuda",))) if j.impl == "fastlayers[cuda]"][0] \
        == "not available: not built"
    monkeypatch.delattr(fl, "linear", raising=False)
    lin = [j for j in linear.jobs(_cfg()) if j.impl.startswith("fastlayers")]
    assert lin and all(j.skip == "not available: fastlayers.linear is not defined in this build" for j in lin)

    # a crash inside an implementation is an error row, not an exception
    def crash(x, *a, **k):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(fl, "layer_norm", crash)
    jobs = [j for j in norm.jobs(_cfg()) if j.variant == "fwd" and j.case["norm"] == "layer"]
    crashed = harness.run_jobs(_runner(), jobs)
    assert crashed[1]["status"] == "error: RuntimeError: kernel exploded"


def _job(name, key, fn, ref=False, case=None, **kw):
    case = case or {"n": key}
    return harness.Job(group="norm", case=case, variant="fwd", impl=name, unit="GB/s", work=1.0,
                       inputs_key=("t", key), make_inputs=lambda: {"x": torch.randn(64, 32)},
                       build=lambda: fn, is_reference=ref, **kw)


def test_a_row_run_after_other_cases_is_checked_on_its_baselines_inputs():
    """torch.compile rows run after every group: their case's inputs are made again by then, and the
    baseline is run again on them; both must be the inputs the row sees (same seed)."""
    f = lambda d: torch.tanh(d["x"])                              # noqa: E731
    jobs = [_job("torch eager", 1, f, ref=True), _job("torch eager", 2, f, ref=True),
            _job("late", 1, f), _job("late wrong", 1, lambda d: torch.tanh(d["x"]) * 1.01)]
    rows = harness.run_jobs(_runner(), jobs)
    assert rows[2]["status"] == "ok" and rows[2]["error"] == 0.0 and rows[2]["baseline"] == "torch eager"
    assert rows[3]["status"].startswith("FAILED: error 0.01") and rows[3]["time_ms"] is None


def test_rows_without_a_trustworthy_baseline_are_unverified_and_not_timed(monkeypatch):
    # a baseline whose check passed but whose timing then crashed: its result is not trusted either
    calls = {"n": 0}

    def flaky(d):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("crashed while timed")
        return torch.tanh(d["x"])
    rows = harness.run_jobs(_runner(), [_job("torch eager", 0, flaky, ref=True),
                                        _job("row", 0, lambda d: torch.tanh(d["x"]))])
    assert rows[0]["status"].startswith("error: RuntimeError: crashed while timed")
    assert rows[1]["status"].startswith("unverified: its baseline (torch eager) did not pass: error")
    nan = lambda d: d["x"] * float("nan")                         # noqa: E731
    rows = harness.run_jobs(_runner(), [_job("torch eager", 1, nan, ref=True),
                                              _job("row", 1, lambda d: torch.tanh(d["x"]))])
    assert rows[0]["status"].startswith("FAILED: the baseline's output 0 is not finite")
    assert rows[1]["status"].startswith("unverified: its baseline (torch eager) did not pass")
    assert all(rows[1][k] is None for k in SPEED_KEYS)
    # a row with its own baseline function (the plain GEMM against x @ w.T)
    own = _job("mm", 3, lambda d: d["x"] @ d["x"].T, baseline=lambda d: d["x"].double() @ d["x"].double().T,
               baseline_name="x @ x.T in float64")
    row = harness.run_jobs(_runner(), [own])[0]
    assert row["status"] == "ok" and row["baseline"] == "x @ x.T in float64" and row["error"] < 1e-6


def test_compare():
    a = torch.tensor([1.0, -2.0, 4.0])
    err, where, problem = harness.compare([("y", a + torch.tensor([0, 0.04, 0]))], [("y", a)])
    assert problem is None and where == "y" and err == pytest.approx(0.01)
    assert harness.compare([("y", a)], [("y", a[:2])]) == (None, None, "y has shape (3,), the baseline's (2,)")
    assert "2 result tensors" in harness.compare([("y", a), ("s", a)], [("y", a)])[2]
    assert harness.compare([("y", a.half())], [("y", a)]) == (0.0, "y", "y has dtype torch.float16, the baseline's "
                                                                         "torch.float32")
    assert harness.compare([("y", a.half())], [("y", a)], same_dtype=False) == (0.0, "y", None)
    assert harness.compare([("y", a * float("nan"))], [("y", a)])[2] == "y has non-finite values"
    # a problem in one tensor still reports the others' error
    assert harness.compare([("y", 2 * a), ("g", None)], [("y", a), ("g", a)]) \
        == (1.0, "y", "g is None, the baseline's is not")
    with pytest.raises(harness._Unverified):
        harness.compare([("y", a)], [("y", a * float("inf"))])


def test_table_shows_errors_and_failed_rows_have_no_speed():
    rows = [{"group": "norm", "case": {"norm": "layer", "rows": 4, "hidden": 8}, "variant": "fwd", "impl": i,
             "unit": "GB/s", "time_ms": t, "rate": None if t is None else 1.0 / t, "fraction_of_peak": None,
             "speedup_vs_eager": None if t is None else 0.5 / t, "backend_ran": ran, "reference": ref,
             "baseline": base, "error": err, "status": st}
            for i, t, ran, ref, base, err, st in (
                ("torch eager", 0.5, None, True, "(this row)", 0.0, "ok"),
                ("fastlayers[triton]", 0.25, "triton", False, "torch eager", 3e-3, "ok"),
                ("fastlayers[cuda]", None, "cuda", False, "torch eager", 0.2,
                 "FAILED: error 0.2 > tolerance 5e-02 in output 0 (vs torch eager)"))]
    lines = report.format_table("norm", rows).splitlines()
    assert len(lines) == 5 and len({line.index("GB/s") for line in lines[2:]}) == 1
    assert "error" in lines[0] and " base " in lines[2] and "3.0e-03" in lines[3] and "2.00x" in lines[3]
    cells = re.split(r"\s{2,}", lines[4])
    assert cells[2:] == ["fastlayers[cuda]", "cuda", "-", "-", "GB/s", "-", "-", "2.0e-01",
                         "FAILED: error 0.2 > tolerance 5e-02 in output 0 (vs torch eager)"], cells
    goal = report.format_goal_table({"norm": [dict(rows[0], note="F.layer_norm"),
                                              dict(rows[1], impl="fastlayers[torch]", time_ratio_vs_eager=0.5)]})
    assert "layer_norm" in goal and "F.layer_norm" in goal and "0.50x" in goal and "met" in goal


# ---------------------------------------------------------------------------------------------
# formulas and the GPU smoke cases

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
    # padding rows count the valid keys: B=4, L=256 -> lengths 256, 224, 192, 160
    assert attention.padding_lengths(4, 256) == [256, 224, 192, 160]
    job = [j for j in attention.jobs(_cfg()) if j.case.get("mask") == "padding" and j.variant == "fwd"][0]
    B, L, H, D = (job.case[k] for k in ("batch", "seqlen", "heads", "head_dim"))
    assert job.work == 4 * H * L * D * sum(attention.padding_lengths(B, L))


def test_gpu_smoke_cases_run_on_the_torch_backend():
    # The GPU smoke script's cases, pointed at the torch backend on CPU: they must run and agree.
    from fastlayers.bench import gpu_smoke as s
    for fn in (s.case_layer_norm, s.case_attention, s.case_kvcache, s.case_linear):
        ran, err = fn("torch", torch.float32, "cpu")
        assert ran == "torch" and err < 1e-4, (fn.__name__, ran, err)


# ---------------------------------------------------------------------------------------------
# the bert model group

def test_cli_bench_quick_cpu_bert_rows(cpu_run):
    """The default run's bert group: per case transformers eager (the reference), sdpa, each
    fastlayers backend (proven for attention, linear and layer_norm) and torch.compile (skipped in
    --quick on CPU), every ran row checked against eager on the same inputs, speed-ups over sdpa."""
    _, stdout, out = cpu_run
    doc = json.loads((out / "bert-latest.json").read_text())
    assert doc["group"] == "bert" and ENV_KEYS <= set(doc["env"])
    assert doc["backends_ran"] == {"fastlayers[torch]": ["torch"]}
    rows = doc["rows"]
    name, fields, cases = bert.setup(_cfg())
    expected = [{"model": name, "batch": B, "seqlen": L, "lengths": "full" if lo is None else f"uniform {lo}..{L}"}
                for B, L, lo in cases]
    assert list({json.dumps(r["case"]): r["case"] for r in rows}.values()) == expected
    for case in expected:
        by = {r["impl"]: r for r in rows if r["case"] == case}
        assert list(by) == ["transformers eager", "transformers sdpa", "fastlayers[torch]", report.COMPILE_IMPL]
        eager, sdpa, ours, comp = by.values()
        assert eager["reference"] and eager["error"] == 0.0 and eager["speedup_vs_eager"] == 1.0
        for r in (eager, sdpa, ours):
            assert r["status"] == "ok" and r["unit"] == "seq/s" and r["work"] == case["batch"], r
            assert r["rate"] == pytest.approx(case["batch"] / (r["time_ms"] * 1e-3))
            assert r["model_config"]["hidden_size"] == fields["hidden_size"] and r["speedup_vs_compile"] is None
        for r in (sdpa, ours):
            assert r["baseline"] == "transformers eager" and r["error"] <= r["tolerance"] == 1e-4, r
        assert ours["backend_ran"] == "torch"
        assert ours["backends_ran_by_op"] == {"attention": "torch", "linear": "torch", "layer_norm": "torch"}
        assert sdpa["speedup_vs_sdpa"] == 1.0
        assert ours["speedup_vs_sdpa"] == pytest.approx(sdpa["time_ratio_vs_eager"] / ours["time_ratio_vs_eager"])
        assert comp["status"].startswith("skipped: --quick on CPU") and all(comp[k] is None for k in SPEED_KEYS)
    assert "== bert" in stdout and "x transformers sdpa" in stdout and "vs compile" in stdout


def _tiny_bert(monkeypatch, cases=((2, 32, None), (2, 48, 16))):
    monkeypatch.setattr(bert, "setup", lambda cfg: ("bert-test", dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64), list(cases)))


def test_bert_check_catches_a_perturbed_weight(monkeypatch, tmp_path):
    """One weight of fastlayers' model nudged: its rows are FAILED with no speed, the exit status is 1,
    and the transformers rows are untouched."""
    _tiny_bert(monkeypatch)
    real = bert.fastlayers_loader

    def perturbed(folder, dtype, device):
        model = real(folder, dtype, device)
        with torch.no_grad():
            model.encoder.layer[0].intermediate.dense.weight[0, 0] += 0.1
        return model
    monkeypatch.setattr(bert, "fastlayers_loader", perturbed)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, stdout = _cli(["bench", "--models", "bert", "--device", "cpu", "--quick", "--no-plot", "--out",
                           str(tmp_path)])
    rows = json.loads((tmp_path / "bert-latest.json").read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "fastlayers[torch]"]
    assert len(ours) == 2 and rc == 1 and "fastlayers row(s) failed" in err.getvalue()
    for r in ours:
        assert r["status"].startswith("FAILED: error") and "(vs transformers eager)" in r["status"], r
        assert r["error"] > r["tolerance"] and all(r[k] is None for k in SPEED_KEYS)
    assert all(r["status"] == "ok" for r in rows if r["impl"].startswith("transformers"))
    assert not (tmp_path / "norm-latest.json").exists()           # --models alone: no op group ran


@pytest.fixture
def one_thread():
    """As `fastlayers bench` runs on CPU: tiny ops on 2 threads of a shared machine cost ~20 ms each."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bert_check_compares_the_non_padded_positions_with_the_mask_applied(monkeypatch, one_thread):
    """fl.attention dropping key_padding_mask fails the padded case only (all-ones masks change
    nothing), and a model that never calls fastlayers ops is an error even when its numbers are
    right and an earlier call left fl.last_backend records behind."""
    _tiny_bert(monkeypatch)
    StandIns(fault="attention ignores key_padding_mask").install(monkeypatch)
    rows = harness.run_jobs(_runner(), bert.jobs(_cfg()))
    ours = {r["case"]["lengths"]: r["status"] for r in rows if r["impl"] == "fastlayers[torch]"}
    assert ours["full"] == "ok" and ours["uniform 16..48"].startswith("FAILED"), ours
    monkeypatch.undo()

    _tiny_bert(monkeypatch)

    def transformers_model(folder, dtype, device):
        import transformers
        return transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").to(device, dtype)
    monkeypatch.setattr(bert, "fastlayers_loader", transformers_model)
    x = torch.randn(1, 4, 1, 8)
    fl.attention(x, x, x, backend="torch")                          # stale records of another call
    fl.layer_norm(x, torch.ones(8), backend="torch")
    rows = harness.run_jobs(_runner(), bert.jobs(_cfg()))
    ours = [r for r in rows if r["impl"] == "fastlayers[torch]"]
    assert ours and all(r["status"] == "error: RuntimeError: fl.last_backend('attention') is None after the call: "
                        "no backend recorded" for r in ours), [r["status"] for r in ours]


def test_bench_ops_and_models_flags():
    sel = run.selected_groups
    assert sel(None, None) == ["norm", "attention", "linear", "bert"]           # the default: everything
    assert sel("norm", None) == ["norm"] and sel(None, "bert") == ["bert"]      # one flag: only what it names
    assert sel("none", "bert") == ["bert"] and sel("all", "none") == ["norm", "attention", "linear"]
    assert sel("linear,norm", "all") == ["norm", "linear", "bert", "gpt2", "bart"]
    for ops, models, msg in (("none", "none", "nothing to measure"), ("bert", None, "--ops must be"),
                             (None, "t5", "--models must be"), ("norm,all", None, "--ops must be"),
                             ("norm,norm", None, "--ops must be"), (None, "", "--models must be")):
        with pytest.raises(SystemExit, match=msg):
            sel(ops, models)
    args = cli._parser().parse_args(["bench", "--models", "bert", "--ops", "none", "--quick"])
    assert (args.ops, args.models, args.quick) == ("none", "bert", True)
    assert cli._parser().parse_args(["bench"]).models is None
    with pytest.raises(SystemExit, match="nothing to measure"):
        run.main(cli._parser().parse_args(["bench", "--ops", "none", "--models", "none", "--device", "cpu"]))
    assert "--models bert" in run.__doc__ and "--ops none" in run.__doc__


def test_model_speedups_and_goal():
    def row(impl, ratio, status="ok"):
        return {"group": "bert", "case": {"model": "m", "batch": 1, "seqlen": 8, "lengths": "full"}, "variant": "fwd",
                "impl": impl, "status": status, "time_ratio_vs_eager": ratio if status == "ok" else None}
    rows = [row("transformers eager", 1.0), row("transformers sdpa", 0.8), row("fastlayers[cuda]", 0.4),
            row("fastlayers[triton]", 0.6), row(report.COMPILE_IMPL, 0.5)]
    report.add_model_speedups(rows, {"device_type": "cuda", "dtype": "bfloat16"})
    by = {r["impl"]: r for r in rows}
    assert by["fastlayers[cuda]"]["speedup_vs_sdpa"] == pytest.approx(2.0)
    assert by["fastlayers[cuda]"]["speedup_vs_compile"] == pytest.approx(1.25)
    assert by["fastlayers[cuda]"]["goal"] == dict(report.MODEL_GOALS, met=True)
    assert by["fastlayers[triton]"]["goal"]["met"] is False and "goal" not in by["transformers sdpa"]
    summary = report.format_model_summary("bert", rows, {"device_type": "cuda", "dtype": "bfloat16"})
    assert "fastlayers[cuda]: 2.00x transformers sdpa, 1.25x torch.compile  goal met" in summary
    assert "goal MISSED" in summary
    rows = [row("transformers eager", 1.0), row("transformers sdpa", 0.8), row("fastlayers[torch]", 0.4),
            row(report.COMPILE_IMPL, None, status="skipped: --quick on CPU")]
    report.add_model_speedups(rows, {"device_type": "cpu", "dtype": "float32"})
    assert rows[2]["speedup_vs_compile"] is None and "goal" not in rows[2]
    assert "torch.compile did not run" in report.format_model_summary("bert", rows, {"device_type": "cpu"})


# ---------------------------------------------------------------------------------------------
# the generation groups (gpt2, bart): fastlayers generate against transformers generate, same weights

from fastlayers.bench import bart as bart_bench, generation, gpt2 as gpt2_bench  # noqa: E402
from fastlayers.bench.generation import Case  # noqa: E402

GPT2_TEST = dict(gpt2_bench.GPT2, n_embd=16, n_layer=2, n_head=2, n_positions=64)
BART_TEST = dict(bart_bench.BART_BASE, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
GPT2_CASES = [Case("gpt2-test", 1, 8, 5, "decode"), Case("gpt2-test", 2, 8, 4, "decode"),
              Case("gpt2-test", 2, 16, 1, "prefill")]
BART_CASES = [Case("bart-test", 1, 8, 4, "decode", beams=4), Case("bart-test", 2, 8, 4, "decode")]
GEN_IMPLS = ["transformers generate", "fastlayers[torch]", "torch.compile (transformers static cache)"]


def _tiny_generation(mp):
    """Tiny configs (the real vocabularies, so eos / pad / specials are the real ids): seconds, not minutes."""
    mp.setattr(gpt2_bench, "setup", lambda cfg: [("gpt2-test", GPT2_TEST, list(GPT2_CASES))])
    mp.setattr(bart_bench, "setup", lambda cfg: [("bart-test", BART_TEST, list(BART_CASES))])


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gen")
    with pytest.MonkeyPatch.context() as mp:
        _tiny_generation(mp)
        rc, stdout = _cli(["bench", "--models", "gpt2,bart", "--device", "cpu", "--quick", "--no-plot",
                           "--out", str(out)])
    return rc, stdout, out


@pytest.mark.parametrize("group, cases", [("gpt2", GPT2_CASES), ("bart", BART_CASES)])
def test_cli_bench_generation_rows(gen_run, group, cases):
    """Per case: transformers generate (the reference), fastlayers[torch] (proven on attention, the
    decode op, linear and layer_norm) with exactly the reference's ids (CPU float32), and the compiled
    static-cache row skipped on CPU; rates in the row's unit; exactly the asked tokens generated."""
    rc, stdout, out = gen_run
    assert rc == 0, stdout
    doc = json.loads((out / f"{group}-latest.json").read_text())
    assert doc["group"] == group and ENV_KEYS <= set(doc["env"])
    assert doc["backends_ran"] == {"fastlayers[torch]": ["torch"]}
    rows = doc["rows"]
    for case in cases:
        by = {r["impl"]: r for r in rows if r["case"] == case.as_dict()}
        assert list(by) == GEN_IMPLS, (case, list(by))
        ref, ours, comp = by.values()
        assert ref["reference"] and ref["status"] == "ok" and ref["error"] == 0.0 and ref["speedup_vs_eager"] == 1.0
        assert ref["generation"]["failed"] == 0 and ref["generate_kwargs"]["min_new_tokens"] == case.new_tokens
        assert ours["status"] == "ok" and ours["error"] == 0.0 and ours["baseline"] == "transformers generate", ours
        start = 1 if group == "bart" else case.prompt
        gen = ours["generation"]
        assert gen["check"] == "exact ids" and gen["failed"] == 0 and gen["first_divergence"] is None
        assert gen["equal_tokens"] == gen["compared"] == case.batch * case.new_tokens
        assert gen["shape"] == [case.batch, start + case.new_tokens]
        assert ours["backend_ran"] == "torch" and set(ours["backends_ran_by_op"].values()) == {"torch"}
        decode_op = case.kind == "decode" or group == "bart"
        assert ("attention_with_kvcache" in ours["backends_ran_by_op"]) == decode_op
        for r in (ref, ours):
            assert r["variant"] == case.kind and r["model_config"]["name"].endswith("-test")
            if r["unit"] == "ms/token":
                assert case.batch == 1 and case.kind == "decode"
                assert r["rate"] == pytest.approx(r["time_ms"] / case.new_tokens)
            else:
                assert r["unit"] == "tok/s"
                assert r["work"] == case.batch * (case.prompt if case.kind == "prefill" else case.new_tokens)
                assert r["rate"] == pytest.approx(r["work"] / (r["time_ms"] * 1e-3))
            assert r["speedup_vs_compile"] is None
        assert comp["status"].startswith("skipped: CPU run") and all(comp[k] is None for k in SPEED_KEYS)
    assert f"== {group}" in stdout and "ids equal" in stdout and "x transformers generate" in stdout


def test_readme_table_from_generation_json(gen_run, capsys):
    _, _, out = gen_run
    assert readme_table.main([str(out / "gpt2-latest.json"), str(out / "bart-latest.json"), "--include-cpu"]) == 0
    text = capsys.readouterr().out
    assert "### GPT-2 generate" in text and "### BART generate" in text
    cells = r"\| [0-9.]+ \| [0-9.]+ \([0-9.]+x\) \|"         # transformers, then fastlayers with its speed-up
    assert re.search(r"\| decode \| gpt2-test B1 prompt 8 \+5 \| ms/token " + cells, text), text
    assert re.search(r"\| decode \| bart-test beam 4 B1 in 8 \+4 \| tok/s " + cells, text), text
    assert "gpt2-test (vocab 50257, n_embd 16, 2 layers, 2 heads" in text


def _perturbed(group, how):
    """A fastlayers loader whose model differs from the weights both libraries were given."""
    mod = gpt2_bench if group == "gpt2" else bart_bench
    real = mod.fastlayers_loader

    def load(folder, dtype, device):
        model = real(folder, dtype, device)
        with torch.no_grad():
            if how == "weights":    # a sign error in the last norm: the logits' order reversed
                norm = model.transformer.ln_f if group == "gpt2" else model.model.decoder.layers[-1].final_layer_norm
                norm.weight.neg_()
            else:               # "stops early": one token short, as a model ignoring min_new_tokens would be
                generate = model.generate
                model.generate = lambda *a, **k: generate(*a, **k)[:, :-1]
        return model
    return mod, load


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-exact", "bf16-near"])
@pytest.mark.parametrize("group", ["gpt2", "bart"])
def test_generation_check_catches_a_broken_model(monkeypatch, one_thread, group, dtype):
    """float32 on CPU compares ids exactly; other dtypes (the GPU's bf16) score the row's tokens with
    the reference model (near-argmax for greedy, the beam's log-probability for beam search). A
    correct model passes both, a model with a changed weight fails both, a model one token short
    fails with "wrong length"; failed rows have no speed and the transformers rows are untouched."""
    _tiny_generation(monkeypatch)
    monkeypatch.setattr(gpt2_bench, "setup", lambda cfg: [("gpt2-test", GPT2_TEST, GPT2_CASES[1:])])
    cfg = _cfg(dtype=dtype)
    mod = gpt2_bench if group == "gpt2" else bart_bench
    rows = harness.run_jobs(_runner(), mod.jobs(cfg))
    ours = [r for r in rows if r["impl"] == "fastlayers[torch]"]
    mode = "exact ids" if dtype == torch.float32 else None
    for r in ours:
        assert r["status"] == "ok" and r["generation"]["failed"] == 0, r
        want = mode or ("beam score" if r["case"]["search"] != "greedy" else "near-argmax")
        assert r["generation"]["check"] == want, r["generation"]
    for how in ("weights", "stops early") if dtype == torch.float32 else ("weights",):   # the length: any mode
        mod, load = _perturbed(group, how)
        monkeypatch.setattr(mod, "fastlayers_loader", load)
        rows = harness.run_jobs(_runner(), mod.jobs(cfg))
        ours = [r for r in rows if r["impl"] == "fastlayers[torch]"]
        assert all(r["status"] == "ok" for r in rows if r["impl"] == "transformers generate")
        failed = [r for r in ours if r["status"].startswith("FAILED: error")]
        assert all("(vs transformers generate)" in r["status"] and all(r[k] is None for k in SPEED_KEYS)
                   for r in failed)
        assert len(failed) == len(ours), [(r["status"], r["generation"]) for r in ours]
        if how == "stops early":
            assert all(r["generation"]["wrong_shape"] and r["error"] == 1.0 for r in failed)
        else:
            assert all(r["generation"]["failed"] > 0 and 0 < r["error"] <= 1 for r in failed)


def test_generation_row_plan_on_a_gpu():
    """The GPU configuration (built without a GPU: nothing runs): the issues' models and cases, a
    "no graph" row per decode case for one backend, the compile rows last in each case, and beam
    search's compile row unsupported when the installed transformers compiles only greedy/sampling."""
    for quick in (True, False):
        cfg = Config(device=torch.device("cuda"), dtype=torch.bfloat16, quick=quick, backends=["triton", "cuda"])
        models = [n for n, _, _ in gpt2_bench.setup(cfg)]
        assert models == (["gpt2"] if quick else ["gpt2", "gpt2-medium"])
        cases = {(c.batch, c.prompt, c.new_tokens, c.kind) for c in gpt2_bench.setup(cfg)[0][2]}
        assert {(1, 32, 256, "decode"), (8, 32, 256, "decode"), (8, 512, 1, "prefill")} <= cases
        assert ((32, 32, 256, "decode") in cases) == (not quick)
        assert [n for n, _, _ in bart_bench.setup(cfg)] == (["bart-base"] if quick else ["bart-base", "bart-large"])
        bart_cases = {(c.batch, c.prompt, c.new_tokens, c.beams) for c in bart_bench.setup(cfg)[0][2]}
        assert bart_cases == {(1, 64, 64, 4), (8, 64, 64, 4), (1, 64, 64, 1), (8, 64, 64, 1)}
    assert gpt2_bench.GPT2_MEDIUM["n_embd"] == 1024 and bart_bench.BART_LARGE["decoder_layers"] == 12
    cfg = Config(device=torch.device("cuda"), dtype=torch.bfloat16, quick=True, backends=["triton", "cuda"])
    for mod in (gpt2_bench, bart_bench):
        by_case: dict = {}
        for j in mod.jobs(cfg):
            by_case.setdefault(json.dumps(j.case), []).append(j)
        for jobs in by_case.values():
            impls = [j.impl for j in jobs]
            graph_rows = [i for i in impls if i.endswith("no graph")]
            assert impls[0] == "transformers generate" and impls[-1] == report.GEN_COMPILE_IMPL
            assert len(graph_rows) == (1 if jobs[0].variant == "decode" else 0), impls
            comp = jobs[-1]
            if jobs[0].case["search"] != "greedy":
                why = generation.compile_support(4)
                assert (comp.skip is None) == (why is None) and (why is None or "_beam_search" in comp.skip)
    assert generation.compile_support(1) is None


def test_generation_models_flags():
    sel = run.selected_groups
    assert sel(None, "gpt2") == ["gpt2"] and sel(None, "bart,gpt2") == ["gpt2", "bart"]
    assert sel(None, "all") == ["bert", "gpt2", "bart"] and sel("none", "all") == ["bert", "gpt2", "bart"]
    assert "gpt2" not in sel(None, None) and "bart" not in sel(None, None)     # the default: ops and bert
    assert run.DEFAULT_MODELS == ("bert",) and "--models gpt2" in run.__doc__


def test_generation_metrics_goal_and_time_split():
    def row(impl, case, ratio, unit="ms/token", status="ok", **extra):
        return dict({"group": "gpt2", "case": case, "variant": "decode", "impl": impl, "status": status,
                     "unit": unit, "work": 256.0, "time_ms": 0.4 * 256 * ratio if status == "ok" else None,
                     "time_ratio_vs_eager": ratio if status == "ok" else None,
                     "speedup_vs_eager": 1 / ratio if status == "ok" else None}, **extra)
    case = {"model": "gpt2", "batch": 1, "prompt": 32, "new_tokens": 256, "search": "greedy"}
    split = {"gpu_busy_ms_per_step": 0.1, "weight_bytes": 250e6}
    rows = [row("transformers generate", case, 1.0), row(report.GEN_COMPILE_IMPL, case, 0.5),
            row("fastlayers[cuda]", case, 0.25, generation=split), row("fastlayers[triton]", case, 0.45)]
    env = {"device_type": "cuda", "dtype": "bfloat16"}
    report.add_model_metrics("gpt2", rows, env, {"copy_bandwidth_gbs": 5000.0})
    by = {r["impl"]: r for r in rows}
    cuda = by["fastlayers[cuda]"]
    assert cuda["rate"] == pytest.approx(0.1) and cuda["speedup_vs_compile"] == pytest.approx(2.0)
    assert cuda["goal"] == {"max_ms_per_token": 0.5, "min_speedup_vs_compile": 1.3, "met": True}
    assert by["fastlayers[triton]"]["goal"]["met"] is False          # 0.18 ms/token, but 1.11x compile
    assert cuda["time_split"] == pytest.approx({"wall_ms_per_step": 0.1, "gpu_busy_ms_per_step": 0.1,
                                                "idle_ms_per_step": 0.0, "weights_floor_ms_per_step": 0.05})
    assert "goal" not in by["transformers generate"] and "time_split" not in by["fastlayers[triton]"]
    text = report.format_model_summary("gpt2", rows, env)
    assert "fastlayers[cuda]: 0.100 ms/token, 4.00x transformers generate, 2.00x its compiled static cache  goal met" \
        in text and "goal MISSED" in text
    assert "0.100 ms/step = 0.100 GPU busy + 0.000 idle; weights' bandwidth floor 0.050" in text
    bart_case = {"model": "bart-base", "batch": 1, "prompt": 64, "new_tokens": 64, "search": "beam 4"}
    rows = [row("transformers generate", bart_case, 1.0, unit="tok/s"),
            row(report.GEN_COMPILE_IMPL, bart_case, None, unit="tok/s", status="unsupported: beam search"),
            row("fastlayers[cuda]", bart_case, 0.3, unit="tok/s")]
    for r in rows:
        r["group"] = "bart"
    report.add_model_metrics("bart", rows, env)
    assert rows[2]["goal"] == {"min_speedup_vs_transformers": 3.0, "met": True}
    assert rows[2]["rate"] == pytest.approx(256 / (0.4 * 256 * 0.3 * 1e-3)) and rows[2]["speedup_vs_compile"] is None
    report.add_model_metrics("bart", rows, {"device_type": "cpu", "dtype": "float32"})
    assert "goal" not in rows[0]
    assert "not judged on this run: CPU figures" in report.format_model_summary("bart", rows, {"device_type": "cpu"})
