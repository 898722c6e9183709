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
from typing import List, Optional, Tuple

from zeta._cuda.runtime import KERNEL_DIR, NAME_EXPRESSIONS, NVRTC_OPTIONS, source


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


def compile_file(
    lib: ctypes.CDLL, file: str, arch: str, extra: Tuple[str, ...] = ()
) -> Tuple[bool, str, List[str]]:
    """(ok, log, lowered names) of one .cu for ``arch`` (e.g. "sm_90"); ``extra``: more
    options (e.g. the ``-D`` tuning variants of benches/gpu_variants.py)."""
    prog = ctypes.c_void_p()
    src = source(file).encode()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, file.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})", []
    try:
        for expr in NAME_EXPRESSIONS[file]:
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
            for expr in NAME_EXPRESSIONS[file]:
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
        for f in NAME_EXPRESSIONS:
            ok, log, names = compile_file(lib, f, arch)
            print(f"{arch} {f}: {'ok' if ok else 'FAILED'} ({len(names)} kernels)")
            if not ok or log.strip():
                print(log)
            bad += not ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
