"""The `fastlayers` command (console entry point fastlayers.cli:main).

  fastlayers bench [--ops norm,attention,linear] [--quick] [--out DIR] [--backends ...] [--dtype bf16]
                   [--device auto|cuda|cpu] [--threads N] [--seed N] [--no-plot] [--max-seconds S]
                                                     measure (see fastlayers.bench.run); results go to
                                                     --out DIR, else ~/.cache/fastlayers/bench
                                                     ($XDG_CACHE_HOME, $FASTLAYERS_BENCH_DIR), never
                                                     into the source checkout
  fastlayers info                                    backends, CUDA library build info, versions
`python -m fastlayers.cli ...` is the same command (benchmarks/gpu_check.sh uses it: no PATH assumptions).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlayers", description="fastlayers: fused transformer layers for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark the ops against torch and other baselines")
    from fastlayers.bench.run import add_arguments
    add_arguments(bench)
    sub.add_parser("info", help="available backends, CUDA library build info, versions")
    return p


def info() -> int:
    import torch

    import fastlayers as fl
    print(f"fastlayers {getattr(fl, '__version__', 'unknown')}")
    print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"triton {_version('triton')}")
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        print(f"device: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("device: no CUDA GPU")
    backends = getattr(fl, "available_backends", None)
    if backends is None:
        print("backends: fastlayers.available_backends is not defined in this build")
    else:
        print("backends:")
        for name, entry in backends().items():
            state = "available" if entry.get("available") else f"unavailable: {entry.get('reason')}"
            print(f"  {name:8s} {state}")
    try:
        from fastlayers import _cuda
        err = _cuda.load_error()
        if err is None:
            print("CUDA library build info:")
            print(json.dumps(_cuda.build_info(), indent=2, sort_keys=True))
        else:
            print(f"CUDA library: {err}")
    except Exception as e:  # info must report, not crash
        print(f"CUDA library: could not be queried ({type(e).__name__}: {e})")
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:
        return f"not importable ({type(e).__name__})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "info":
        return info()
    from fastlayers.bench import run
    return run.main(args, ["fastlayers", *argv])


if __name__ == "__main__":
    sys.exit(main())
