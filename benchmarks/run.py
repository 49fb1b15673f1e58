"""`fastlayers bench`: measures the card's peaks, then every selected op group and model, then prints a
table per group and writes its JSON (and PNG).
What runs: `--ops` picks op groups (norm, attention, linear), `--models` picks models (bert: the
encoder's sequences/s against transformers eager, sdpa and torch.compile; see bert.py. gpt2 and
bart: generate -- decode latency and throughput, prefill, beam search -- against transformers
generate and its compiled static-cache path; see gpt2.py, bart.py, generation.py). Each takes a
comma-separated list, "all" or "none". Neither flag: every op group and the DEFAULT_MODELS (bert):
gpt2 and bart run when named or with --models all, because they are slow to measure (on a GPU,
transformers' compile of generate costs ~1 min per batch shape; on a CPU each group adds ~30 s with
--quick and minutes without). Only one flag: just what it names (`--ops norm` measures norm alone,
`--models gpt2` GPT-2 alone). Both: each as given (`--ops none --models bert` = `--models bert`).
torch.compile rows run last, after every group's other rows, and each group's JSON is already
written before them, so a run cut short (--max-seconds, a kill) keeps what it measured.
Every row is checked against its baseline's result on the same inputs before it is timed (see
harness.py); the table shows each row's error, and a row over its dtype's tolerance is FAILED, with
no speed. The header says which fastlayers backends were asked for, and each group says which ran
(fl.last_backend after each row's call).
Without a CUDA GPU it runs model-sized CPU shapes (one thread by default) and ends with the torch
backend's time against the native torch call doing the same work, per op (goal: within 1.2x).
Results go to --out DIR, else to default_out_dir() -- never into the source checkout.
Exit status: 0, or 1 when a fastlayers row ended in "error: ..." (a kernel or dispatch failure) or
"FAILED: ..." (its result disagrees with the baseline's); "unsupported"/"not available" rows and
failing third-party baselines do not count.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import attention, bart, bert, gpt2, linear, norm, report
from .report import default_out_dir
from .harness import TOLERANCE, Progress, Runner, card_slug, environment, measure_peaks, run_jobs, short_message, \
    tolerance
from .impls import DTYPES, Config

OP_GROUPS = {"norm": norm, "attention": attention, "linear": linear}
MODEL_GROUPS = {"bert": bert, "gpt2": gpt2, "bart": bart}
DEFAULT_MODELS = ("bert",)          # neither flag given: every op group and these (run.__doc__ says why)
GROUPS = {**OP_GROUPS, **MODEL_GROUPS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default=None, metavar="LIST",
                   help="op groups: comma-separated among norm, attention, linear, or 'all' / 'none' "
                        "(default: all when --models is not given either, else none)")
    p.add_argument("--models", default=None, metavar="LIST",
                   help="models: comma-separated among bert, gpt2, bart, or 'all' / 'none' (default: bert when "
                        "--ops is not given either, else none); bert: encoder sequences/s of "
                        "fastlayers.models.BertModel against transformers eager, sdpa and torch.compile; gpt2, bart: "
                        "generate (decode ms/token and tokens/s, prefill, beam search) against transformers generate "
                        "and its static cache + torch.compile; same random weights")
    p.add_argument("--quick", action="store_true",
                   help="a reduced shape set (a few minutes on one H100, seconds on a CPU; no max-autotune compiles)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the JSON (and PNG) results (default: $FASTLAYERS_BENCH_DIR, else "
                        "$XDG_CACHE_HOME/fastlayers/bench, else ~/.cache/fastlayers/bench)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fastlayers backends to measure (default: triton,cuda on a GPU, "
                        "torch without one)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="input dtype (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: the GPU when there is one; cpu: the CPU configuration even on a GPU machine")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU runs: torch threads (default 1: steady ratios on a shared machine; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the input tensors (default 0; recorded in the JSON)")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: rows not started by then are recorded as skipped (results still written)")


def _parse_list(text: str, allowed, what: str, keywords: bool = False) -> list[str]:
    """The names in a comma-separated list; with keywords, "all" and "none" alone are allowed too."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if keywords and items in (["all"], ["none"]):
        return list(allowed) if items == ["all"] else []
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad or not items or len(set(items)) != len(items):
        extra = ", or 'all' / 'none'" if keywords else ""
        raise SystemExit(f"fastlayers bench: {what} must be a comma-separated subset of "
                         f"{', '.join(allowed)}{extra}; got {text!r}")
    return items


def selected_groups(ops: str | None, models: str | None) -> list[str]:
    """The groups to run, op groups first (in GROUPS order). Neither flag: every op group and the
    DEFAULT_MODELS; one flag: only what it names; both: each as given. Nothing selected is an error."""
    if ops is None and models is None:
        ops, models = "all", ",".join(DEFAULT_MODELS)
    chosen = (_parse_list("none" if ops is None else ops, list(OP_GROUPS), "--ops", keywords=True)
              + _parse_list("none" if models is None else models, list(MODEL_GROUPS), "--models", keywords=True))
    if not chosen:
        raise SystemExit("fastlayers bench: nothing to measure (--ops and --models both select none)")
    return [g for g in GROUPS if g in chosen]


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    groups = selected_groups(args.ops, args.models)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not gpu:
        raise SystemExit("fastlayers bench: --device cuda but torch sees no CUDA GPU")
    if args.threads < 0:
        raise SystemExit(f"fastlayers bench: --threads must be >= 0, got {args.threads}")
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if args.backends:
        backends = _parse_list(args.backends, ["torch", "triton", "cuda"], "--backends")
    else:
        backends = ["triton", "cuda"] if gpu else ["torch"]
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    cfg = Config(device=device, dtype=DTYPES[dtype], quick=args.quick, backends=backends,
                 max_autotune=not args.quick)
    threads = torch.get_num_threads()
    if not gpu and args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, groups, gpu, device, cfg)
    finally:
        torch.set_num_threads(threads)


def _header(gpu: bool, cfg: Config, out_dir: Path) -> list[str]:
    dtype = str(cfg.dtype).replace("torch.", "")
    if gpu:
        where = f"device: {cfg.device} ({dtype})"
    else:
        why = "no CUDA GPU found" if not torch.cuda.is_available() else "--device cpu"
        where = (f"device: cpu ({why}; model-sized CPU shapes, {torch.get_num_threads()} thread(s), {dtype}; "
                 f"numbers are not GPU figures)")
    return [where,
            f"fastlayers backends asked for: {', '.join(cfg.backends)} (each row proves the one that ran "
            f"with fl.last_backend: column 'ran')",
            f"every row is checked against its baseline on the same inputs: error = max|out - base| / max|base|, "
            f"tolerance {tolerance(cfg.dtype, cfg.device.type):g} for {dtype}; over it the row is FAILED, "
            f"with no speed",
            f"results folder: {out_dir}"]


def _run(args, argv, groups, gpu, device, cfg) -> int:
    out_dir = Path(args.out).expanduser() if args.out else default_out_dir()
    env = environment(device, cfg.dtype, args.quick, argv)
    env["backends_requested"] = list(cfg.backends)
    env["out_dir"] = str(out_dir)
    env["seed"] = args.seed
    tolerances = {str(k).replace("torch.", ""): tolerance(k, device.type) for k in TOLERANCE}
    slug = card_slug(env)
    for line in _header(gpu, cfg, out_dir):
        print(line, flush=True)
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
    runner = Runner(device, args.quick, peaks, max_seconds=args.max_seconds,
                    cpu_min_seconds=0.05 if args.quick else 0.3, cpu_min_reps=3 if args.quick else 7,
                    seed=args.seed)
    rows_by_group = {}
    for g in groups:
        rows_by_group[g] = run_jobs(runner, phases[g][0], progress)
        if phases[g][1]:
            pending = _placeholder_rows(phases[g][1], "skipped: pending (torch.compile rows run last)")
            rows = _table_order(rows_by_group[g] + pending)
            if g in MODEL_GROUPS:
                report.add_model_metrics(g, rows, env, peaks)
            report.write_json(out_dir, g, env, peaks, rows, slug, tolerances)
    for g in groups:
        rows_by_group[g] += run_jobs(runner, phases[g][1], progress)
    failed = []
    for g in groups:
        rows = rows_by_group[g] = _table_order(rows_by_group[g])
        print(f"\n== {g} ({env['card']}, {env['dtype']}) ==", flush=True)
        if g in MODEL_GROUPS:
            report.add_model_metrics(g, rows, env, peaks)
            print(report.format_model_table(g, rows), flush=True)
            print(report.format_model_summary(g, rows, env), flush=True)
        else:
            if not gpu:
                report.mark_goal(rows)
            print(report.format_table(g, rows), flush=True)
        ran = report.backends_ran(rows)
        print("fastlayers backends that ran (fl.last_backend): "
              + ("; ".join(f"{impl} -> {', '.join(b)}" for impl, b in ran.items()) or "none"), flush=True)
        paths = report.write_json(out_dir, g, env, peaks, rows, slug, tolerances)
        print(f"wrote {', '.join(str(p) for p in paths)}", flush=True)
        if not args.no_plot:
            plot = report.write_plot(out_dir, g, env, rows, slug)
            print(f"wrote {plot}" if isinstance(plot, Path) else plot, flush=True)
        failed += [r for r in rows if r["impl"].startswith("fastlayers")
                   and (r["status"].startswith("error") or r["status"].startswith("FAILED"))]
    op_rows = {g: rows for g, rows in rows_by_group.items() if g in OP_GROUPS}
    if not gpu and "torch" in cfg.backends and op_rows:
        print("\n" + report.format_goal_table(op_rows), flush=True)
    print(f"\nresults folder: {out_dir}", flush=True)
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
             "speedup_vs_eager": None, "time_ratio_vs_eager": None, "baseline_time_ms": None,
             "backend_ran": None, "baseline": None,
             "error": None, "tolerance": None, "reference": False, "status": status} for j in jobs]


def _table_order(rows: list[dict]) -> list[dict]:
    """Rows regrouped by (variant, case) in first-seen order, implementations in run order."""
    order: dict = {}
    for r in rows:
        order.setdefault((r["variant"], report.case_label(r["group"], r["case"])), []).append(r)
    return [r for group in order.values() for r in group]
