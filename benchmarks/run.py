"""`fastlayers bench`: measures the card's peaks, then every selected op group, then prints a table
per group and writes its JSON (and PNG). torch.compile rows run last, after every group's other rows,
and each group's JSON is already written before them, so a run cut short (--max-seconds, a kill)
keeps what it measured. Without a CUDA GPU it times a tiny CPU configuration of the torch backend.
Exit status: 0, or 1 when a fastlayers row ended in "error: ..." (a kernel or dispatch failure;
"unsupported"/"not available" rows and failing third-party baselines do not count).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import attention, linear, norm, report
from .harness import Progress, Runner, card_slug, environment, measure_peaks, run_jobs, short_message
from .impls import DTYPES, Config

GROUPS = {"norm": norm, "attention": attention, "linear": linear}
NO_GPU = "no CUDA GPU found: running a small CPU configuration of the torch backend (numbers are not GPU figures)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default="norm,attention,linear",
                   help="comma-separated op groups among norm, attention, linear (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="a reduced shape set (a few minutes on one H100; no max-autotune compiles)")
    p.add_argument("--out", default=str(default_out_dir()),
                   help="folder for the JSON (and PNG) results (default: benchmarks/results of the "
                        "source checkout, else ./fastlayers-results)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fastlayers backends to measure (default: triton,cuda on a GPU, "
                        "torch without one)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: the GPU when there is one; cpu: the small CPU configuration even on a GPU machine")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: rows not started by then are recorded as skipped (results still written)")


def default_out_dir() -> Path:
    here = Path(__file__).resolve().parent
    if (here.parent / "setup.py").exists():       # running from the source checkout (editable install)
        return here / "results"
    return Path.cwd() / "fastlayers-results"      # an installed wheel: never write into site-packages


def _parse_list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad or not items:
        raise SystemExit(f"fastlayers bench: {what} must be a comma-separated subset of "
                         f"{', '.join(allowed)}; got {text!r}")
    return items


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    groups = _parse_list(args.ops, list(GROUPS), "--ops")
    gpu = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not gpu:
        raise SystemExit("fastlayers bench: --device cuda but torch sees no CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if args.backends:
        backends = _parse_list(args.backends, ["torch", "triton", "cuda"], "--backends")
    else:
        backends = ["triton", "cuda"] if gpu else ["torch"]
    cfg = Config(device=device, dtype=DTYPES[args.dtype], quick=args.quick, backends=backends,
                 max_autotune=not args.quick)
    if not gpu:
        print(NO_GPU if not torch.cuda.is_available() else NO_GPU.replace("no CUDA GPU found", "--device cpu"),
              flush=True)
    threads = torch.get_num_threads()
    if not gpu:
        # one thread: tiny CPU ops on a shared machine time the thread pool's wake-ups otherwise
        torch.set_num_threads(1)
    try:
        return _run(args, argv, groups, gpu, device, cfg)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv, groups, gpu, device, cfg) -> int:
    backends = cfg.backends
    env = environment(device, cfg.dtype, args.quick, argv)
    env["backends"] = backends
    slug = card_slug(env)
    print(f"card: {env['card']} | driver {env['driver']} | CUDA {env['cuda']} | torch {env['torch']} | "
          f"triton {env['triton']} | python {env['python']} | fastlayers {env['fastlayers']} | "
          f"commit {env['git_commit'][:12]} | {env['date']}", flush=True)
    peaks = None
    if gpu:
        try:
            peaks = measure_peaks(device, args.quick)
            print(f"measured peaks: copy bandwidth {peaks['copy_bandwidth_gbs']:.0f} GB/s (read + write), "
                  f"bf16 GEMM {peaks['bf16_gemm_tflops']:.0f} TFLOP/s (torch.mm 8192^3)", flush=True)
        except Exception as e:
            peaks = None
            env["peaks_error"] = short_message(e)
            print(f"peak measurement failed ({short_message(e)}): no fractions of peak", flush=True)

    # Two phases: every group's fast rows first, then the torch.compile rows (each compiles for
    # seconds), so a time budget cuts compiles before it cuts any group. Each group's JSON is
    # written after phase 1 (compile rows pending) and rewritten after phase 2.
    phases = {g: ([], []) for g in groups}
    for g in groups:
        for job in GROUPS[g].jobs(cfg):
            phases[g][1 if job.impl.startswith("torch.compile") else 0].append(job)
    progress = Progress(sum(len(a) + len(b) for a, b in phases.values()))
    runner = Runner(device, args.quick, peaks, max_seconds=args.max_seconds)
    out_dir = Path(args.out)
    rows_by_group = {}
    for g in groups:
        rows_by_group[g] = run_jobs(runner, phases[g][0], progress)
        if phases[g][1]:
            pending = _placeholder_rows(phases[g][1], "skipped: pending (torch.compile rows run last)")
            report.write_json(out_dir, g, env, peaks, _table_order(rows_by_group[g] + pending), slug)
    for g in groups:
        rows_by_group[g] += run_jobs(runner, phases[g][1], progress)
    failed = []
    for g in groups:
        rows = _table_order(rows_by_group[g])
        print(f"\n== {g} ({env['card']}, {env['dtype']}) ==", flush=True)
        print(report.format_table(g, rows), flush=True)
        paths = report.write_json(out_dir, g, env, peaks, rows, slug)
        print(f"wrote {', '.join(str(p) for p in paths)}", flush=True)
        if not args.no_plot:
            plot = report.write_plot(out_dir, g, env, rows, slug)
            print(f"wrote {plot}" if isinstance(plot, Path) else plot, flush=True)
        failed += [r for r in rows if r["impl"].startswith("fastlayers") and r["status"].startswith("error")]
    if failed:
        print(f"\n{len(failed)} fastlayers row(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['group']} {r['variant']} {report.case_label(r['group'], r['case'])} {r['impl']}: "
                  f"{r['status']}", file=sys.stderr)
        return 1
    return 0


def _placeholder_rows(jobs, status: str) -> list[dict]:
    return [{"group": j.group, "case": dict(j.case), "variant": j.variant, "impl": j.impl, "unit": j.unit,
             "work": j.work, "time_ms": None, "rate": None, "fraction_of_peak": None, "peak": j.peak,
             "speedup_vs_eager": None, "backend_ran": None, "max_abs_diff_vs_eager": None,
             "reference": False, "status": status} for j in jobs]


def _table_order(rows: list[dict]) -> list[dict]:
    """Rows regrouped by (variant, case) in first-seen order, implementations in run order."""
    order: dict = {}
    for r in rows:
        order.setdefault((r["variant"], report.case_label(r["group"], r["case"])), []).append(r)
    return [r for group in order.values() for r in group]
