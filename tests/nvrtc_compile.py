"""Compiles zeta's CUDA sources with NVRTC, without a GPU or a driver (ctypes, no cupy).

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (the test extra installs it). The kernels
include no toolkit header, so NVRTC alone suffices. Used by tests/test_cuda_compile.py and
runnable by hand: ``python tests/nvrtc_compile.py``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import time
from typing import List, Optional, Tuple

from zeta._cuda.runtime import KERNEL_DIR, NAME_EXPRESSIONS, NVRTC_OPTIONS, PER_KERNEL, source


def find_nvrtc() -> Optional[str]:
    """Path of libnvrtc.so from an installed nvidia-cuda-nvrtc wheel, or None."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        hits = sorted(glob.glob(os.path.join(root, "**", "libnvrtc.so*"), recursive=True))
        hits = [h for h in hits if "builtins" not in os.path.basename(h)]
        if hits:
            return hits[0]
    return None


def units() -> List[Tuple[str, List[str]]]:
    """What the runtime compiles as one program: (file, its kernels), or (file, [kernel]) for
    every instantiation of a :data:`~zeta._cuda.runtime.PER_KERNEL` file."""
    out: List[Tuple[str, List[str]]] = []
    for f, exprs in NAME_EXPRESSIONS.items():
        out += [(f, [e]) for e in exprs] if f in PER_KERNEL else [(f, list(exprs))]
    return out


def compile_file(
    lib: ctypes.CDLL,
    file: str,
    arch: str,
    extra: Tuple[str, ...] = (),
    exprs: Optional[List[str]] = None,
) -> Tuple[bool, str, List[str]]:
    """(ok, log, lowered names) of one .cu for ``arch`` (e.g. "sm_90"); ``extra``: more
    options (e.g. the ``-D`` tuning variants of benches/gpu_variants.py); ``exprs``: the
    kernel instantiations to build (default: all of the file's, as one program)."""
    exprs = NAME_EXPRESSIONS[file] if exprs is None else exprs
    prog = ctypes.c_void_p()
    src = source(file).encode()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, file.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})", []
    try:
        for expr in exprs:
            lib.nvrtcAddNameExpression(prog, expr.encode())
        opts = list(NVRTC_OPTIONS) + [f"--gpu-architecture={arch}", f"-I{KERNEL_DIR}", *extra]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        lowered = []
        if rc == 0:
            for expr in exprs:
                name = ctypes.c_char_p()
                if lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)) != 0:
                    return False, log + f"\nno lowered name for {expr}", lowered
                lowered.append(name.value.decode())
            cubin = ctypes.c_size_t()
            if lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) != 0 or cubin.value == 0:
                return False, log + "\nno CUBIN produced", lowered
        return rc == 0, log, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def main() -> int:
    path = find_nvrtc()
    if path is None:
        print("nvidia-cuda-nvrtc is not installed")
        return 1
    lib = ctypes.CDLL(path)
    bad = 0
    for arch in ("sm_80", "sm_90"):
        for f, exprs in units():
            t0 = time.perf_counter()
            ok, log, names = compile_file(lib, f, arch, exprs=exprs)
            what = exprs[0] if len(exprs) == 1 else f"{len(names)} kernels"
            dt = time.perf_counter() - t0
            print(f"{arch} {f} {what}: {'ok' if ok else 'FAILED'} ({dt:.1f} s)", flush=True)
            if not ok or log.strip():
                print(log)
            bad += not ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
