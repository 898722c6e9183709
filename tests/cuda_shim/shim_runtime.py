"""Runs zeta's CUDA kernels on the CPU: the .cu sources compiled by g++ with zeta_cpu_shim.h.

:class:`ShimRuntime` has the interface of :class:`zeta._cuda.runtime.CupyRuntime` with numpy
arrays, so the package's own launch code (index build, search, forward, backward, primitives)
runs unchanged in CI. Each kernel instantiation of ``NAME_EXPRESSIONS`` gets an ``extern "C"``
launcher that takes its arguments as ``cuLaunchKernel`` does (an array of pointers to values).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Any, Dict, Sequence

import numpy as np

from zeta._cuda.runtime import KERNEL_DIR, NAME_EXPRESSIONS, Runtime, extra_options

HERE = os.path.dirname(os.path.abspath(__file__))

_CTYPES = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _sources() -> str:
    lines = ['#include "common.cuh"']
    for f in NAME_EXPRESSIONS:
        lines.append(f'#include "{f}"')
    lines.append('extern "C" {')
    for i, expr in enumerate(_all_exprs()):
        lines.append(
            f"int zeta_launch_{i}(unsigned gx, unsigned bx, size_t shmem, void** args, char* err, "
            f"size_t errlen) {{ return zeta_shim::launch_kernel(&{expr}, dim3{{gx, 1, 1}}, "
            f"dim3{{bx, 1, 1}}, shmem, args, err, errlen); }}"
        )
    lines.append("unsigned long long* zeta_stats() { return zeta_shim::g_stats; }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _all_exprs():
    return [e for f in NAME_EXPRESSIONS for e in NAME_EXPRESSIONS[f]]


def build(cache_dir: str | None = None) -> str:
    """Compiles the shim library (cached by the hash of every input); returns its path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    src = _sources()
    # the kernels' -D settings (ZETA_CUDA_DEFINES, ZETA_CUDA_LEAF), as on a GPU
    defines = [o for o in extra_options() if o.startswith("-D")]
    h = hashlib.sha256((src + " ".join(defines)).encode())
    for name in sorted(os.listdir(KERNEL_DIR)) + ["zeta_cpu_shim.h"]:
        path = os.path.join(KERNEL_DIR if name != "zeta_cpu_shim.h" else HERE, name)
        with open(path, "rb") as f:
            h.update(name.encode() + f.read())
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "zeta-cuda-shim")
    os.makedirs(cache_dir, exist_ok=True)
    lib = os.path.join(cache_dir, f"shim-{h.hexdigest()[:16]}.so")
    if os.path.exists(lib):
        return lib
    cpp = lib[:-3] + ".cpp"
    with open(cpp, "w") as f:
        f.write(src)
    tmp = lib + f".{os.getpid()}.tmp"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-g0",
        "-shared",
        "-fPIC",
        "-ffp-contract=off",
        "-DZETA_CPU_SHIM",
        *defines,
        "-I",
        KERNEL_DIR,
        "-I",
        HERE,
        cpp,
        "-o",
        tmp,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"shim compile failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
    os.replace(tmp, lib)
    return lib


class ShimRuntime(Runtime):
    """numpy arrays + the kernels compiled for the CPU."""

    xp = np

    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        self.index: Dict[str, int] = {e: i for i, e in enumerate(_all_exprs())}
        self.launches = 0

    def launch(
        self, file: str, name: str, grid: int, block: int, args: Sequence[Any], shared_mem: int = 0
    ) -> None:
        assert name in NAME_EXPRESSIONS[file], (file, name)
        keep = []
        ptrs = (ctypes.c_void_p * len(args))()
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                assert a.flags["C_CONTIGUOUS"] or a.size <= 1, (
                    f"argument {i} of {name} not contiguous"
                )
                obj: Any = ctypes.c_void_p(a.ctypes.data)
            elif isinstance(a, np.generic):
                obj = _CTYPES[a.dtype](a.item())
            else:
                raise TypeError(
                    f"argument {i} of {name}: pass numpy arrays or numpy scalars, got {type(a)}"
                )
            keep.append(obj)
            ptrs[i] = ctypes.cast(ctypes.pointer(obj), ctypes.c_void_p)
        err = ctypes.create_string_buffer(512)
        fn = getattr(self.lib, f"zeta_launch_{self.index[name]}")
        fn.restype = ctypes.c_int
        rc = fn(
            ctypes.c_uint(int(grid)),
            ctypes.c_uint(int(block)),
            ctypes.c_size_t(int(shared_mem)),
            ptrs,
            err,
            ctypes.c_size_t(512),
        )
        self.launches += 1
        if rc != 0:
            raise RuntimeError(f"{name}: {err.value.decode()}")
