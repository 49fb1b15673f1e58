"""Output of `fastlayers bench`: the aligned plain-text table (stdout), one JSON file per op group
(<group>-<card>-<date>.json plus <group>-latest.json, each with the environment header and the
measured peaks), a PNG per op group when matplotlib is importable, and on CPU the summary of the
torch backend against the native torch call (goal: within GOAL_TIME_RATIO of its time).
JSON layout: {"schema": 2, "group", "env": {...}, "peaks": {...} | null, "tolerances": {dtype: tol},
"backends_ran": {impl: [backend, ...]}, "rows": [row, ...]} where a row is the dict
harness.Runner.run returns (case, variant, impl, unit, work, time_ms, rate, fraction_of_peak,
speedup_vs_eager, time_ratio_vs_eager, baseline_time_ms (CPU: the baseline's time measured call by
call alternately with this row's, which the ratio uses), backend_ran, baseline, error, tolerance, status, and on CPU
for the torch backend's rows "goal": {"max_time_ratio", "met"}). A row whose status is not "ok"
(FAILED, unverified, error, ...) has no time, rate, fraction of peak or speed-up.
Model groups (bert): unit "seq/s", work = sequences per call; the reference row is transformers
eager (so "speedup_vs_eager" is over it), and each row also has "speedup_vs_sdpa" and
"speedup_vs_compile" (over transformers sdpa and torch.compile of it, same case; null when either
did not run), "model_config", "backends_ran_by_op" for fastlayers rows (attention, linear,
layer_norm), and on a GPU in bf16 for fastlayers rows "goal": {"min_speedup_vs_sdpa",
"min_speedup_vs_compile", "met"} (MODEL_GOALS, issue 9).
Generation groups (gpt2, bart; generation.py): unit "ms/token" (batch-1 decode: rate = the call's
time / new tokens) or "tok/s" (rate = work / time; work = new tokens of the batch, or prompt tokens
for prefill); the reference row is transformers generate (so "speedup_vs_eager" is over it), and
each row also has "speedup_vs_compile" (over the compiled static-cache row of the same case),
"model_config", "generate_kwargs", "generation" (what the ids check found; generation.py) and, for
fastlayers decode rows profiled on a GPU, "time_split": {"wall_ms_per_step", "gpu_busy_ms_per_step",
"idle_ms_per_step", "weights_floor_ms_per_step"}; on a GPU in bf16 the fastlayers rows of the goal
case have "goal" (GENERATION_GOALS, issues 10 and 11).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = 2
GOAL_TIME_RATIO = 1.2     # CPU goal (issue 8): the torch backend within 1.2x of the native call's time
# Model goal (issue 9, H200 bf16): fastlayers' speed-up over transformers sdpa and over torch.compile of it
MODEL_GOALS = {"min_speedup_vs_sdpa": 1.8, "min_speedup_vs_compile": 1.2}
SDPA_IMPL, COMPILE_IMPL = "transformers sdpa", "torch.compile (transformers sdpa)"
# Generation groups (gpt2, bart; benchmarks/generation.py): the reference row and the compiled baseline
GENERATION_GROUPS = ("gpt2", "bart")
GEN_REFERENCE_IMPL, GEN_COMPILE_IMPL = "transformers generate", "torch.compile (transformers static cache)"
# Generation goals (issues 10 and 11, H200 bf16), judged on the fastlayers rows of one case each
GENERATION_GOALS = {
    "gpt2": {"case": {"model": "gpt2", "batch": 1, "search": "greedy"}, "variant": "decode",
             "max_ms_per_token": 0.5, "min_speedup_vs_compile": 1.3},
    "bart": {"case": {"model": "bart-base", "batch": 1, "search": "beam 4"}, "variant": "decode",
             "min_speedup_vs_transformers": 3.0},
}


def default_out_dir() -> Path:
    """Where `fastlayers bench` writes without --out: $FASTLAYERS_BENCH_DIR, else
    $XDG_CACHE_HOME/fastlayers/bench, else ~/.cache/fastlayers/bench -- a per-user folder outside
    any checkout (a plain run never writes into the source tree)."""
    explicit = os.environ.get("FASTLAYERS_BENCH_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", ""))
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"   # XDG: relative = unset
    return base / "fastlayers" / "bench"


def case_label(group: str, case: dict) -> str:
    c = case
    try:
        if group == "norm":
            return f"{c['norm']} {c['rows']}x{c['hidden']}"
        if group == "attention" and "cache" in c:
            page = f" page{c['page']}" if "page" in c else ""
            return f"B{c['batch']} cache{c['cache']}/{c.get('max_len', c['cache'])} H{c['heads']} D{c['head_dim']}{page}"
        if group == "attention":
            mask = c.get("mask", "causal" if c.get("causal") else "none")
            shape = f"B{c['batch']} L{c['seqlen']} H{c['heads']} D{c['head_dim']}"
            return shape + ("" if mask == "none" else f" {mask}")
        if group == "linear":
            return f"{c['M']}x{c['K']}->{c['N']}" + (" +res" if c.get("residual") else "")
        if group == "bert":
            shape = f"{c['model']} B{c['batch']} L{c['seqlen']}"
            return shape if c["lengths"] == "full" else f"{shape} lengths {c['lengths'].split()[-1]}"
        if group == "gpt2":
            return f"{c['model']} B{c['batch']} prompt {c['prompt']} +{c['new_tokens']}"
        if group == "bart":
            return f"{c['model']} {c['search']} B{c['batch']} in {c['prompt']} +{c['new_tokens']}"
    except KeyError:
        pass
    return " ".join(f"{k}={v}" for k, v in c.items())


def op_label(group: str, case: dict, variant: str) -> str:
    """The op a row measures, in the user's words (the CPU summary's first column)."""
    if group == "norm":
        name = "rms_norm" if case.get("norm") == "rms" else "layer_norm"
        return name + (" + residual" if variant == "fwd_residual" else "")
    if group == "attention":
        if "cache" in case:
            return "attention_with_kvcache"
        mask = case.get("mask", "none")
        return "attention" + {"none": "", "causal": " causal", "padding": " padding mask"}.get(mask, f" {mask}")
    if group == "linear":
        return f"linear + {case.get('activation', '?')}" + (" + residual" if case.get("residual") else "")
    return group


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _error_cell(r: dict) -> str:
    if r.get("reference") and r.get("baseline") == "(this row)":
        return "base"
    return _fmt(r.get("error"), ".1e")


def format_table(group: str, rows: list[dict]) -> str:
    head = ["variant", "case", "impl", "ran", "time ms", "rate", "unit", "of peak", "vs eager", "error", "status"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        body.append([
            r["variant"], case_label(group, r["case"]), r["impl"], r.get("backend_ran") or "",
            _fmt(r["time_ms"], ".4g") if ok else "-",
            _fmt(r["rate"], ".4g") if ok else "-",
            r["unit"],
            (f"{100 * r['fraction_of_peak']:.0f}%" if ok and r.get("fraction_of_peak") is not None else "-"),
            (f"{r['speedup_vs_eager']:.2f}x" if ok and r.get("speedup_vs_eager") is not None else "-"),
            _error_cell(r),
            r["status"] if len(r["status"]) <= 100 else r["status"][:97] + "...",
        ])
    return _align(head, body, right={4, 5, 7, 8, 9}, breaks=[(r["variant"], b[1]) for r, b in zip(rows, body)])


def add_model_speedups(rows: list[dict], env: dict) -> None:
    """Model rows: "speedup_vs_sdpa" and "speedup_vs_compile" from the same case's rows. Each is a
    quotient of time ratios to the reference row (transformers eager): on a GPU that is plain time
    over time; on CPU each ratio was timed call by call against the reference, so load cancels."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["variant"], tuple(sorted(r["case"].items()))), {})[r["impl"]] = r
    goal = env.get("device_type") == "cuda" and env.get("dtype") == "bfloat16"
    for impls in by_case.values():
        for r in impls.values():
            for key, base in (("speedup_vs_sdpa", SDPA_IMPL), ("speedup_vs_compile", COMPILE_IMPL)):
                b = impls.get(base)
                ok = r["status"] == "ok" and b is not None and b["status"] == "ok"
                mine, theirs = r.get("time_ratio_vs_eager"), (b or {}).get("time_ratio_vs_eager")
                r[key] = theirs / mine if ok and mine and theirs else None
            if goal and r["impl"].startswith("fastlayers"):
                vs_sdpa, vs_compile = r["speedup_vs_sdpa"], r["speedup_vs_compile"]
                met = None
                if vs_sdpa is not None and vs_compile is not None:
                    met = (vs_sdpa >= MODEL_GOALS["min_speedup_vs_sdpa"]
                           and vs_compile >= MODEL_GOALS["min_speedup_vs_compile"])
                r["goal"] = dict(MODEL_GOALS, met=met)


def format_model_table(group: str, rows: list[dict]) -> str:
    if group in GENERATION_GROUPS:
        return format_generation_table(group, rows)
    head = ["case", "impl", "ran", "time ms", "seq/s", "vs eager", "vs sdpa", "vs compile", "error", "status"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"

        def x(key):
            return f"{r[key]:.2f}x" if ok and r.get(key) is not None else "-"
        body.append([case_label(group, r["case"]), r["impl"], r.get("backend_ran") or "",
                     _fmt(r["time_ms"], ".4g") if ok else "-", _fmt(r["rate"], ".4g") if ok else "-",
                     x("speedup_vs_eager"), x("speedup_vs_sdpa"), x("speedup_vs_compile"), _error_cell(r),
                     r["status"] if len(r["status"]) <= 100 else r["status"][:97] + "..."])
    return _align(head, body, right={3, 4, 5, 6, 7, 8}, breaks=[b[0] for b in body])


def format_model_summary(group: str, rows: list[dict], env: dict) -> str:
    """One line per fastlayers row that ran: its speed-up over transformers sdpa and torch.compile,
    and on a GPU in bf16 the goal (MODEL_GOALS)."""
    if group in GENERATION_GROUPS:
        return format_generation_summary(group, rows, env)
    lines = []
    gpu_bf16 = env.get("device_type") == "cuda" and env.get("dtype") == "bfloat16"
    for r in rows:
        if not r["impl"].startswith("fastlayers") or r["status"] != "ok":
            continue
        parts = [f"{r['speedup_vs_sdpa']:.2f}x transformers sdpa" if r.get("speedup_vs_sdpa") else
                 "transformers sdpa did not run",
                 f"{r['speedup_vs_compile']:.2f}x torch.compile" if r.get("speedup_vs_compile") else
                 "torch.compile did not run"]
        line = f"  {case_label(group, r['case'])}  {r['impl']}: {', '.join(parts)}"
        if gpu_bf16 and r.get("goal"):
            met = r["goal"]["met"]
            line += "  goal " + ("met" if met else "MISSED" if met is False else "not measured")
        lines.append(line)
    goal = (f"goal on a GPU in bf16 (issue 9, H200): >= {MODEL_GOALS['min_speedup_vs_sdpa']:g}x transformers sdpa, "
            f">= {MODEL_GOALS['min_speedup_vs_compile']:g}x torch.compile of it")
    if not gpu_bf16:
        goal += " (not judged on this run: " + ("CPU figures" if env.get("device_type") != "cuda"
                                                else f"{env.get('dtype')}") + ")"
    return ("fastlayers speed-up (sequences/s over the baseline's, same inputs, same weights); " + goal + "\n"
            + ("\n".join(lines) if lines else "  no fastlayers row ran"))


def add_model_metrics(group: str, rows: list[dict], env: dict, peaks: dict | None = None) -> None:
    """A model group's derived fields: bert's speed-ups (add_model_speedups), or a generation group's
    rates, speed-ups and time split (add_generation_metrics)."""
    if group in GENERATION_GROUPS:
        add_generation_metrics(group, rows, env, peaks)
    else:
        add_model_speedups(rows, env)


def _new_tokens(r: dict) -> int:
    return int(r["case"].get("new_tokens") or 1)


def add_generation_metrics(group: str, rows: list[dict], env: dict, peaks: dict | None = None) -> None:
    """Generation rows (gpt2, bart): "rate" in the row's unit (ms/token: the call's time / new tokens;
    tok/s: work / time), "speedup_vs_compile" (over the compiled static-cache row of the same case, a
    quotient of time ratios to the reference as in add_model_speedups; "speedup_vs_eager" is already
    over transformers generate), "time_split" for rows whose check profiled a decode call (GPU):
    wall ms per step (the timed call / new tokens) = GPU busy + idle, beside the weights'
    bandwidth floor (weight bytes / the measured copy bandwidth), and on a GPU in bf16 the goal of the
    group's goal case (GENERATION_GOALS) on its fastlayers rows."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["variant"], tuple(sorted(r["case"].items()))), {})[r["impl"]] = r
    bandwidth = (peaks or {}).get("copy_bandwidth_gbs")
    gpu_bf16 = env.get("device_type") == "cuda" and env.get("dtype") == "bfloat16"
    goal = GENERATION_GOALS.get(group)
    for impls in by_case.values():
        comp = impls.get(GEN_COMPILE_IMPL)
        for r in impls.values():
            ok = r["status"] == "ok" and r.get("time_ms")
            if ok and r["unit"] == "ms/token":
                r["rate"] = r["time_ms"] / _new_tokens(r)
            elif ok and r["unit"] == "tok/s":
                r["rate"] = r["work"] / (r["time_ms"] * 1e-3)
            mine, theirs = r.get("time_ratio_vs_eager"), (comp or {}).get("time_ratio_vs_eager")
            r["speedup_vs_compile"] = (theirs / mine if ok and comp is not None and comp["status"] == "ok"
                                       and mine and theirs else None)
            gen = r.get("generation") or {}
            if ok and gen.get("gpu_busy_ms_per_step") is not None:
                wall = r["time_ms"] / _new_tokens(r)
                busy = gen["gpu_busy_ms_per_step"]
                floor = None
                if bandwidth and gen.get("weight_bytes"):
                    floor = gen["weight_bytes"] / (bandwidth * 1e9) * 1e3
                r["time_split"] = {"wall_ms_per_step": wall, "gpu_busy_ms_per_step": busy,
                                   "idle_ms_per_step": max(0.0, wall - busy), "weights_floor_ms_per_step": floor}
            if gpu_bf16 and goal and r["impl"].startswith("fastlayers") and r["variant"] == goal["variant"] \
                    and all(r["case"].get(k) == v for k, v in goal["case"].items()):
                r["goal"] = _generation_goal(goal, r)


def _generation_goal(goal: dict, r: dict) -> dict:
    """{the goal's thresholds, "met": True / False, or None when a figure it needs is missing}."""
    checks = []
    if "max_ms_per_token" in goal:
        checks.append(r["rate"] <= goal["max_ms_per_token"] if r["status"] == "ok" and r.get("rate") else None)
    if "min_speedup_vs_compile" in goal:
        v = r.get("speedup_vs_compile")
        checks.append(None if v is None else v >= goal["min_speedup_vs_compile"])
    if "min_speedup_vs_transformers" in goal:
        v = r.get("speedup_vs_eager") if r["status"] == "ok" else None
        checks.append(None if v is None else v >= goal["min_speedup_vs_transformers"])
    met = False if False in checks else (None if None in checks else True)
    return dict({k: v for k, v in goal.items() if k not in ("case", "variant")}, met=met)


def _check_cell(r: dict) -> str:
    """What a generation row's ids check found (generation.IdsCheck), in a few characters."""
    g = r.get("generation") or {}
    if r.get("reference") and r.get("baseline") == "(this row)":
        return "base" if "max_deficit" not in g else f"base (dev {g['max_deficit']:.2f})"
    if "check" not in g or "failed" not in g:
        return "-"
    if g.get("wrong_shape"):
        return "wrong length"
    div = g.get("first_divergence")
    where = "" if div is None else f", ids differ from {div}"
    if g["check"] == "exact ids":
        return "ids equal" if not g["failed"] else f"{g['failed']}/{g['compared']} differ{where}"
    if g["check"] == "beam score":
        return f"{g['failed']}/{g['compared']} worse" + (f" (short {g['max_score_shortfall']:.3f}{where})"
                                                        if "max_score_shortfall" in g else "")
    return f"{g['failed']}/{g['compared']} off (dev {g.get('max_deficit', float('nan')):.2f}{where})"


def format_generation_table(group: str, rows: list[dict]) -> str:
    head = ["variant", "case", "impl", "ran", "time ms", "rate", "unit", "vs transformers", "vs compile", "check",
            "status"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"

        def x(key):
            return f"{r[key]:.2f}x" if ok and r.get(key) is not None else "-"
        body.append([r["variant"], case_label(group, r["case"]), r["impl"], r.get("backend_ran") or "",
                     _fmt(r["time_ms"], ".4g") if ok else "-", _fmt(r.get("rate"), ".4g") if ok else "-", r["unit"],
                     x("speedup_vs_eager"), x("speedup_vs_compile"), _check_cell(r),
                     r["status"] if len(r["status"]) <= 100 else r["status"][:97] + "..."])
    return _align(head, body, right={4, 5, 7, 8}, breaks=[(b[0], b[1]) for b in body])


def format_generation_summary(group: str, rows: list[dict], env: dict) -> str:
    """Per fastlayers row that ran: speed-ups over transformers generate and its compiled static-cache
    path, the goal where judged, and (GPU) where a decode step's time goes."""
    gpu_bf16 = env.get("device_type") == "cuda" and env.get("dtype") == "bfloat16"
    goal = GENERATION_GOALS.get(group, {})
    lines, split = [], []
    for r in rows:
        if not r["impl"].startswith("fastlayers") or r["status"] != "ok":
            continue
        parts = [f"{r['speedup_vs_eager']:.2f}x transformers generate" if r.get("speedup_vs_eager") else
                 "transformers generate did not run",
                 f"{r['speedup_vs_compile']:.2f}x its compiled static cache" if r.get("speedup_vs_compile") else
                 "compiled static cache did not run"]
        if r["unit"] == "ms/token":
            parts.insert(0, f"{r['rate']:.3f} ms/token")
        line = f"  {r['variant']} {case_label(group, r['case'])}  {r['impl']}: {', '.join(parts)}"
        if r.get("goal"):
            met = r["goal"]["met"]
            line += "  goal " + ("met" if met else "MISSED" if met is False else "not measured")
        lines.append(line)
        t = r.get("time_split")
        if t:
            floor = t["weights_floor_ms_per_step"]
            split.append(f"  {case_label(group, r['case'])}  {r['impl']}: {t['wall_ms_per_step']:.3f} ms/step = "
                         f"{t['gpu_busy_ms_per_step']:.3f} GPU busy + {t['idle_ms_per_step']:.3f} idle"
                         + (f"; weights' bandwidth floor {floor:.3f}" if floor is not None else ""))
    text = []
    if group == "gpt2":
        text.append(f"goal on a GPU in bf16 (issue 10, H200): gpt2 batch 1 <= {goal.get('max_ms_per_token')} ms/token "
                    f"and >= {goal.get('min_speedup_vs_compile')}x transformers' compiled static cache")
    elif group == "bart":
        text.append(f"goal on a GPU in bf16 (issue 11, H200): bart-base beam 4 batch 1 >= "
                    f"{goal.get('min_speedup_vs_transformers')}x transformers generate")
    if text and not gpu_bf16:
        text[0] += " (not judged on this run: " + ("CPU figures" if env.get("device_type") != "cuda"
                                                   else f"{env.get('dtype')}") + ")"
    out = ["fastlayers against transformers (same weights, same inputs, every token generated)"
           + (f"; {text[0]}" if text else "")]
    out += lines or ["  no fastlayers row ran"]
    if split:
        out.append("where a decode step's time goes (torch.profiler kernel time of one generate call; idle = "
                   "timed wall - busy: launch and host overhead):")
        out += split
    return "\n".join(out)


def _align(head, body, right, breaks=None) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]

    def line(cells):
        return "  ".join((str(c).rjust(w) if i in right else str(c).ljust(w))
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for i, cells in enumerate(body):
        key = breaks[i] if breaks else None
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(cells))
    return "\n".join(out)


def backends_ran(rows: list[dict]) -> dict[str, list[str]]:
    """{impl: [backends fl.last_backend reported]} over the fastlayers rows that ran."""
    out: dict = {}
    for r in rows:
        if r.get("backend_ran"):
            out.setdefault(r["impl"], [])
            if r["backend_ran"] not in out[r["impl"]]:
                out[r["impl"]].append(r["backend_ran"])
    return out


def mark_goal(rows: list[dict], max_ratio: float = GOAL_TIME_RATIO) -> None:
    """CPU: the torch backend's rows at model-sized shapes get "goal": {max_time_ratio, met}."""
    for r in rows:
        if r["impl"] == "fastlayers[torch]" and r["unit"] != "us/call" and r["status"] == "ok" \
                and r.get("time_ratio_vs_eager") is not None:
            r["goal"] = {"max_time_ratio": max_ratio, "met": r["time_ratio_vs_eager"] <= max_ratio}


def format_goal_table(rows_by_group: dict[str, list[dict]], max_ratio: float = GOAL_TIME_RATIO) -> str:
    """One line per fastlayers[torch] row: its time against the native torch call's (the baseline
    row of the same case and inputs), the ratio, the check's error, and the goal."""
    head = ["op", "variant", "case", "native call", "native ms", "torch backend ms", "ratio", "error", "goal"]
    body = []
    for group, rows in rows_by_group.items():
        base = {(r["variant"], case_label(group, r["case"])): r for r in rows if r.get("reference")}
        for r in rows:
            if r["impl"] != "fastlayers[torch]":
                continue
            label = case_label(group, r["case"])
            b = base.get((r["variant"], label), {})
            ok = r["status"] == "ok"
            ratio = r.get("time_ratio_vs_eager") if ok else None
            if not ok:
                goal = r["status"].split(":")[0]
            elif r["unit"] == "us/call":
                goal = "(host overhead)"
            elif ratio is None:
                goal = "-"
            else:
                goal = "met" if ratio <= max_ratio else "MISSED"
            body.append([op_label(group, r["case"], r["variant"]), r["variant"], label,
                         b.get("note", b.get("impl", "")),
                         _fmt(r.get("baseline_time_ms") or b.get("time_ms"), ".4g"),
                         _fmt(r["time_ms"], ".4g") if ok else "-",
                         f"{ratio:.2f}x" if ratio is not None else "-", _error_cell(r), goal])
    title = (f"torch backend vs the native torch call (goal: within {max_ratio:g}x of its time; "
             f"ratio = torch backend time / native time; error = max|out - native| / max|native|)")
    return title + "\n" + _align(head, body, right={4, 5, 6, 7})


def _stamp(env: dict) -> str:
    return env["date"].replace("-", "").replace(":", "")


def write_json(out_dir: Path, group: str, env: dict, peaks: dict | None, rows: list[dict], slug: str,
               tolerances: dict | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "group": group, "env": env, "peaks": peaks, "tolerances": tolerances or {},
           "backends_ran": backends_ran(rows), "rows": rows}
    text = json.dumps(doc, indent=1, default=str)
    paths = [out_dir / f"{group}-{slug}-{_stamp(env)}.json", out_dir / f"{group}-latest.json"]
    for p in paths:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    return paths


def write_plot(out_dir: Path, group: str, env: dict, rows: list[dict], slug: str) -> Path | str:
    """Path of the PNG written, or a sentence saying why none was."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib not importable ({type(e).__name__}): no plot for {group} (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok" and r["rate"] is not None]
    panels = list(dict.fromkeys((r["variant"], r["unit"]) for r in ok))    # one unit per panel's axis
    if not panels:
        return f"no successful rows in {group}: no plot"
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (variant, unit) in zip(axes[:, 0], panels):
        vrows = [r for r in ok if r["variant"] == variant and r["unit"] == unit]
        cases = list(dict.fromkeys(case_label(group, r["case"]) for r in vrows))
        impls = list(dict.fromkeys(r["impl"] for r in vrows))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for r in vrows:
                if r["impl"] == impl:
                    xs.append(cases.index(case_label(group, r["case"])) + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r["rate"])
            ax.bar(xs, ys, width=width, label=impl)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(vrows[0]["unit"])
        ax.set_title(f"{group} {variant}", fontsize=9)
        ax.legend(fontsize=6, ncol=4)
    fig.suptitle(f"fastlayers {group} -- {env['card']}, torch {env['torch']}, {env['date']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{group}-{slug}-{_stamp(env)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
