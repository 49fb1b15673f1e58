"""The CUDA library: built wherever nvcc is (CI builds it), exports the whole C ABI, loads with
ctypes without a GPU, and reports what it supports."""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fastlayers
from fastlayers import _cuda

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "fastlayers.h"


def _declared_entry_points():
    text = HEADER.read_text()
    return sorted(set(re.findall(r"FL_API\s+[\w\s\*]+?\b(fl_\w+)\s*\(", text)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the library is not built here")
def test_library_built_and_loads():
    assert _cuda.load_error() is None, _cuda.load_error()
    info = _cuda.build_info()
    assert info["version"] == fastlayers.__version__
    assert info["archs"], info


def test_signature_table_matches_header():
    declared = _declared_entry_points()
    assert declared, "no FL_API declarations found"
    assert sorted(_cuda.SIGNATURES) == declared


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the library is not built here")
def test_exported_symbols_and_no_torch_dependency():
    lib = _cuda.library_path()
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = set(re.findall(r"\sT\s(fl_\w+)", out))
    assert set(_declared_entry_points()) <= exported
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    libs = re.findall(r"Shared library: \[(.+?)\]", needed)
    assert not [n for n in libs if "torch" in n or "python" in n or "cudart" in n], libs


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the library is not built here")
def test_errors_reported_without_gpu():
    # Argument validation runs before any CUDA call, so it works on a machine without a GPU.
    lib = _cuda.lib()
    status = lib.fl_layer_norm_fwd(None, 0, None, 0, None, None, None, 0, None, 0, None, None,
                                   4, -1, ctypes.c_float(1e-5), 0, 0, 0, None)
    assert status != 0
    assert b"cols" in lib.fl_last_error()
