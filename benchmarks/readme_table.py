"""Regenerates the README results table (markdown, stdout) from `fastlayers bench` JSON files.

    python -m fastlayers.bench.readme_table [--results DIR] [--include-cpu] [FILE.json ...]

With no files it reads <group>-latest.json for norm, attention, linear, bert, gpt2 and bart under DIR (default: the
folder `fastlayers bench` writes to without --out, report.default_out_dir()). Only measured numbers
appear, each table headed by the card and versions that produced it; a row that did not run or did
not pass its check shows its status word (FAILED, unverified, unsupported, not available, ...).
CPU results (the no-GPU configuration) are left out unless --include-cpu: they are not GPU figures.
Cell: rate (fraction of the measured peak, speed-up over torch eager). Model tables (bert): one row
per case, cells in sequences/s, and fastlayers cells add their speed-up over transformers sdpa and
over torch.compile of it. Generation tables (gpt2, bart): one row per (variant, case), cells in the
row's unit (ms/token at batch 1, tokens/s otherwise), fastlayers cells add their speed-up over
transformers generate and over its compiled static-cache path.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `report` importable as a sibling
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report  # type: ignore
else:
    from . import report

TITLES = {"norm": "LayerNorm / RMSNorm", "attention": "Attention", "linear": "Linear (GEMM + bias + GELU)",
          "bert": "BERT encoder (fastlayers.models.BertModel vs transformers, same weights)",
          "gpt2": "GPT-2 generate (fastlayers.models.GPT2LMHeadModel vs transformers, same weights)",
          "bart": "BART generate (fastlayers.models.BartForConditionalGeneration vs transformers, same weights)"}
GROUPS = ("norm", "attention", "linear", "bert", "gpt2", "bart")
MODEL_GROUPS = ("bert",)
GENERATION_GROUPS = report.GENERATION_GROUPS


def _cell(r: dict) -> str:
    status = r["status"]
    if status != "ok" or r.get("rate") is None:
        return status.split(":")[0]          # FAILED, unverified, error, unsupported, ...: never a speed
    if r["unit"] == "us/call":
        s = f"{r['rate']:.1f} us"
    else:
        s = f"{r['rate']:.0f}" if r["rate"] >= 100 else f"{r['rate']:.3g}"
    extra = []
    if r.get("fraction_of_peak") is not None:
        extra.append(f"{100 * r['fraction_of_peak']:.0f}%")
    if r.get("speedup_vs_eager") is not None and not r.get("reference"):
        extra.append(f"{r['speedup_vs_eager']:.2f}x")
    return s + (f" ({', '.join(extra)})" if extra else "")


def _model_cell(r: dict) -> str:
    if r["status"] != "ok" or r.get("rate") is None:
        return r["status"].split(":")[0]
    s = f"{r['rate']:.0f}" if r["rate"] >= 100 else f"{r['rate']:.3g}"
    if not r["impl"].startswith("fastlayers"):
        return s
    extra = [f"{r[k]:.2f}x {name}" for k, name in (("speedup_vs_sdpa", "sdpa"), ("speedup_vs_compile", "compile"))
             if r.get(k) is not None]
    return s + (f" ({', '.join(extra)})" if extra else "")


def _header(group: str, env: dict) -> list[str]:
    return [f"### {TITLES.get(group, group)} -- {env.get('card')}",
            "",
            f"{env.get('dtype')}; driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, "
            f"triton {env.get('triton')}, python {env.get('python')}, fastlayers {env.get('fastlayers')} "
            f"(commit {str(env.get('git_commit'))[:12]}), {env.get('date')}."]


def model_table(doc: dict) -> str:
    group, env, rows = doc["group"], doc["env"], doc["rows"]
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows)
             if any(r["impl"] == i and r["status"] == "ok" for r in rows)]
    lines = _header(group, env)
    mc = next((r.get("model_config") for r in rows if r.get("model_config")), None)
    if mc:
        lines.append(f"Model: {mc.get('name')} (vocab {mc.get('vocab_size')}, H {mc.get('hidden_size')}, "
                     f"{mc.get('num_hidden_layers')} layers, {mc.get('num_attention_heads')} heads, FFN "
                     f"{mc.get('intermediate_size')}), {mc.get('weights')}; eval, forward only (no grad); "
                     f"attention_mask passed; \"lengths 16..L\": lengths uniform in 16..L, padded at the right.")
    if env.get("device_type") != "cuda":
        lines.append("CPU run of the torch backend: not GPU figures.")
    lines += ["Cells: sequences/s; fastlayers cells add the speed-up over transformers sdpa and over "
              "torch.compile of it (same run, same inputs, outputs checked against transformers eager).", ""]
    lines.append("| case | " + " | ".join(impls) + " |")
    lines.append("|---|" + "---|" * len(impls))
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(report.case_label(group, r["case"]), {})[r["impl"]] = r
    for case, cells in by_case.items():
        vals = [(_model_cell(cells[i]) if i in cells else "") for i in impls]
        if any(c and c[0].isdigit() for c in vals):
            lines.append(f"| {case} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _generation_cell(r: dict) -> str:
    if r["status"] != "ok" or r.get("rate") is None:
        return r["status"].split(":")[0]
    s = f"{r['rate']:.0f}" if r["rate"] >= 100 else f"{r['rate']:.3g}"
    if not r["impl"].startswith("fastlayers") or r.get("speedup_vs_eager") is None:
        return s
    extra = [f"{r['speedup_vs_eager']:.2f}x"]
    if r.get("speedup_vs_compile") is not None:
        extra.append(f"{r['speedup_vs_compile']:.2f}x compiled")
    return s + f" ({', '.join(extra)})"


def _generation_model(mc: dict) -> str:
    if "n_embd" in mc:
        return (f"{mc.get('name')} (vocab {mc.get('vocab_size')}, n_embd {mc.get('n_embd')}, {mc.get('n_layer')} "
                f"layers, {mc.get('n_head')} heads)")
    return (f"{mc.get('name')} (vocab {mc.get('vocab_size')}, d_model {mc.get('d_model')}, "
            f"{mc.get('encoder_layers')}+{mc.get('decoder_layers')} layers, {mc.get('encoder_attention_heads')} "
            f"heads, FFN {mc.get('encoder_ffn_dim')})")


def generation_table(doc: dict) -> str:
    group, env, rows = doc["group"], doc["env"], doc["rows"]
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows)
             if any(r["impl"] == i and r["status"] == "ok" for r in rows)]
    lines = _header(group, env)
    configs = {r["model_config"]["name"]: r["model_config"] for r in rows if r.get("model_config")}
    if configs:
        lines.append("Models: " + "; ".join(_generation_model(mc) for mc in configs.values())
                     + f", {next(iter(configs.values())).get('weights')}. Every call generates exactly its new "
                     "tokens (min_new_tokens = max_new_tokens); prompts full; \"prefill\": generate with one new "
                     "token (time to first token).")
    if env.get("device_type") != "cuda":
        lines.append("CPU run of the torch backend: not GPU figures.")
    lines += ["Cells: ms/token (batch 1 decode, the whole call / new tokens) or tokens/s; fastlayers cells add the "
              "speed-up over transformers generate and over its compiled static-cache path (same run, same "
              "inputs, ids checked against transformers generate).", ""]
    lines.append("| variant | case | unit | " + " | ".join(impls) + " |")
    lines.append("|---|---|---|" + "---|" * len(impls))
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["variant"], report.case_label(group, r["case"]), r["unit"]), {})[r["impl"]] = r
    for (variant, case, unit), cells in by_key.items():
        vals = [(_generation_cell(cells[i]) if i in cells else "") for i in impls]
        if any(c and c[0].isdigit() for c in vals):
            lines.append(f"| {variant} | {case} | {unit} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def table(doc: dict) -> str:
    if doc["group"] in GENERATION_GROUPS:
        return generation_table(doc)
    if doc["group"] in MODEL_GROUPS:
        return model_table(doc)
    group, env, peaks, rows = doc["group"], doc["env"], doc.get("peaks"), doc["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    # keep columns that measured something
    impls = [i for i in impls if any(r["impl"] == i and r["status"] == "ok" for r in rows)]
    lines = _header(group, env)
    if peaks:
        lines.append(f"Measured in the same run: copy bandwidth {peaks['copy_bandwidth_gbs']:.0f} GB/s, "
                     f"bf16 GEMM {peaks['bf16_gemm_tflops']:.0f} TFLOP/s.")
    if env.get("device_type") != "cuda":
        lines.append("CPU run of the torch backend: not GPU figures.")
    lines += ["Cells: rate (fraction of the measured peak, speed-up over torch eager).", ""]
    lines.append("| variant | case | unit | " + " | ".join(impls) + " |")
    lines.append("|---|---|---|" + "---|" * len(impls))
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["variant"], report.case_label(group, r["case"]), r["unit"]), {})[r["impl"]] = r
    for (variant, case, unit), cells in by_key.items():
        vals = [(_cell(cells[i]) if i in cells else "") for i in impls]
        if not any(c and c[0].isdigit() for c in vals):
            continue
        lines.append(f"| {variant} | {case} | {unit} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="result JSON files (default: <group>-latest.json under --results)")
    p.add_argument("--results", default=None,
                   help="folder of <group>-latest.json files (default: fastlayers bench's default folder)")
    p.add_argument("--include-cpu", action="store_true", help="also tabulate CPU (no-GPU) runs")
    args = p.parse_args(argv)
    results = Path(args.results) if args.results else report.default_out_dir()
    files = [Path(f) for f in args.files] or [results / f"{g}-latest.json" for g in GROUPS]
    out = []
    for f in files:
        if not f.exists():
            print(f"readme_table: {f} not found, skipped", file=sys.stderr)
            continue
        doc = json.loads(f.read_text())
        if doc.get("env", {}).get("device_type") != "cuda" and not args.include_cpu:
            print(f"readme_table: {f} is a CPU run, skipped (--include-cpu to show it)", file=sys.stderr)
            continue
        out.append(table(doc))
    if not out:
        print("readme_table: no GPU results to tabulate", file=sys.stderr)
        return 1
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
