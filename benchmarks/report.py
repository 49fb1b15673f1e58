"""Output of `fastlayers bench`: the aligned plain-text table (stdout), one JSON file per op group
(<group>-<card>-<date>.json plus <group>-latest.json, each with the environment header and the
measured peaks), and a PNG per op group when matplotlib is importable.
JSON layout: {"schema": 1, "group", "env": {...}, "peaks": {...} | null, "rows": [row, ...]} where a row
is the dict harness.Runner.run returns (case, variant, impl, unit, work, time_ms, rate,
fraction_of_peak, speedup_vs_eager, backend_ran, max_abs_diff_vs_eager, status).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = 1


def case_label(group: str, case: dict) -> str:
    c = case
    try:
        if group == "norm":
            return f"{c['norm']} {c['rows']}x{c['hidden']}"
        if group == "attention" and "cache" in c:
            return f"B{c['batch']} cache{c['cache']} H{c['heads']} D{c['head_dim']}"
        if group == "attention":
            return f"B{c['batch']} L{c['seqlen']} H{c['heads']} D{c['head_dim']}" + (" causal" if c["causal"] else "")
        if group == "linear":
            return f"{c['M']}x{c['K']}->{c['N']}" + (" +res" if c.get("residual") else "")
    except KeyError:
        pass
    return " ".join(f"{k}={v}" for k, v in c.items())


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(group: str, rows: list[dict]) -> str:
    head = ["variant", "case", "impl", "ran", "time ms", "rate", "unit", "of peak", "vs eager", "status"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        body.append([
            r["variant"], case_label(group, r["case"]), r["impl"], r.get("backend_ran") or "",
            _fmt(r["time_ms"], ".4g") if ok else "-",
            _fmt(r["rate"], ".4g") if ok else "-",
            r["unit"],
            (f"{100 * r['fraction_of_peak']:.0f}%" if r.get("fraction_of_peak") is not None else "-"),
            (f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") is not None else "-"),
            r["status"] if len(r["status"]) <= 90 else r["status"][:87] + "...",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    right = {4, 5, 7, 8}

    def line(cells):
        return "  ".join((str(c).rjust(w) if i in right else str(c).ljust(w))
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for cells, r in zip(body, rows):
        key = (r["variant"], cells[1])
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(cells))
    return "\n".join(out)


def _stamp(env: dict) -> str:
    return env["date"].replace("-", "").replace(":", "")


def write_json(out_dir: Path, group: str, env: dict, peaks: dict | None, rows: list[dict], slug: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "group": group, "env": env, "peaks": peaks, "rows": rows}
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
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    if not variants:
        return f"no successful rows in {group}: no plot"
    fig, axes = plt.subplots(len(variants), 1, figsize=(12, 3.6 * len(variants)), squeeze=False)
    for ax, variant in zip(axes[:, 0], variants):
        vrows = [r for r in ok if r["variant"] == variant]
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
