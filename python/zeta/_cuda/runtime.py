"""Kernel sources, their instantiations, and the runtime that launches them.

The launch code of every op (``index.py``, ``search.py``, ``backward.py``, ``primitives.py``)
talks to a :class:`Runtime`: an array module (``xp``: cupy on a GPU) plus ``launch`` and
``empty``. :class:`CupyRuntime` compiles ``zeta/kernels/*.cu`` with NVRTC through
``cupy.RawModule`` (once per device and file, or per kernel for the files of ``PER_KERNEL``,
memoized; cupy keeps its own on-disk cache) and launches on the current stream. The test suite
plugs in a CPU runtime (numpy arrays, the same ``.cu`` files compiled by a C++ compiler with a
shim header) so the same launch code runs in CI.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

#: Every kernel instantiation, per source file (cupy ``name_expressions``).
NAME_EXPRESSIONS: Dict[str, List[str]] = {
    "zorder.cu": [
        "zeta::zorder_kernel<unsigned int>",
        "zeta::zorder_kernel<unsigned long long>",
        "zeta::morton_encode_kernel<unsigned int>",
        "zeta::morton_encode_kernel<unsigned long long>",
        "zeta::morton_decode_kernel<unsigned int>",
        "zeta::morton_decode_kernel<unsigned long long>",
        "zeta::searchsorted_kernel<unsigned int>",
        "zeta::searchsorted_kernel<unsigned long long>",
    ],
    "index.cu": [
        "zeta::index_level0_kernel",
        "zeta::index_merge_kernel",
        "zeta::index_points_kernel",
        "zeta::exact_leaf_starts_kernel",
        "zeta::exact_boxes_kernel",
        "zeta::exact_super_boxes_kernel",
    ],
    "search.cu": [f"zeta::knn_kernel<{d}>" for d in (0, 2, 3, 4)]
    + [
        f"zeta::forward_kernel<{t}, {d}>"
        for t in ("float", "zeta::f16", "zeta::bf16")
        for d in (0, 2, 3, 4)
    ],
    "backward.cu": [
        "zeta::backward_kernel<float>",
        "zeta::backward_kernel<zeta::f16>",
        "zeta::backward_kernel<zeta::bf16>",
    ],
}

#: Sources compiled one kernel instantiation at a time (a module per name expression): a call
#: compiles only the kernels it launches. search.cu's 16 instantiations as one program took
#: 68 s of NVRTC + ptxas on an idle 2-core CPU (328 s on a slower one, past the tests' 300 s
#: limit); one at a time 3-6 s each at sm_90 (`python tests/nvrtc_compile.py` prints them).
PER_KERNEL = ("search.cu", "backward.cu")

#: Options of every compile: no fused multiply-add (distances and quantization must match the
#: CPU bit for bit); NVRTC's default dialect (C++17); the kernel folder on the include path.
NVRTC_OPTIONS: Tuple[str, ...] = ("--fmad=false",)

#: The C++ type a kernel reads for each value dtype name.
VALUE_TYPE = {"float32": "float", "float16": "zeta::f16", "bfloat16": "zeta::bf16"}


def env_int(name: str, default: int, lo: int) -> int:
    """An integer measurement knob from the environment; a value that is not an integer >= lo
    warns and gives ``default`` (a bad knob must not break ``import zeta``)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = lo - 1
    if v < lo:
        import warnings

        warnings.warn(
            f"{name}={raw!r} is not an integer >= {lo}; using {default}", RuntimeWarning, 2
        )
        return default
    return v


def extra_options() -> Tuple[str, ...]:
    """``-D`` flags from ``ZETA_CUDA_DEFINES`` ("NAME=VALUE,..."): tuning knobs of the
    kernels (e.g. ZETA_UNROLL, ZETA_MIN_BLOCKS in search.cu) for measurements; ``-lineinfo``
    with ``ZETA_CUDA_LINEINFO=1`` (source lines in profilers such as ncu); ``-DZETA_LEAF``
    when ``ZETA_CUDA_LEAF`` sets another leaf size (index.LEAF)."""
    raw = os.environ.get("ZETA_CUDA_DEFINES", "")
    opts = tuple("-D" + d.strip() for d in raw.split(",") if d.strip())
    if os.environ.get("ZETA_CUDA_LINEINFO", "0") == "1":
        opts += ("-lineinfo",)
    from .index import LEAF

    if LEAF != 64:  # the kernels' ZETA_LEAF must match the boxes index.py builds
        opts += (f"-DZETA_LEAF={LEAF}",)
    return opts


def dk_template(dk: int) -> int:
    """The DK the search kernels were instantiated for (0: any d_k, read at run time)."""
    return dk if dk in (2, 3, 4) else 0


def source(name: str) -> str:
    with open(os.path.join(KERNEL_DIR, name)) as f:
        return f.read()


def blocks(n: int, threads: int) -> int:
    return max(1, (int(n) + threads - 1) // threads)


class Runtime:
    """What the launch code needs: ``xp``, ``empty``/``zeros``, ``launch``."""

    xp: Any

    def empty(self, shape: Sequence[int], dtype: Any) -> Any:
        return self.xp.empty(tuple(int(s) for s in shape), dtype=dtype)

    def zeros(self, shape: Sequence[int], dtype: Any) -> Any:
        return self.xp.zeros(tuple(int(s) for s in shape), dtype=dtype)

    def launch(
        self, file: str, name: str, grid: int, block: int, args: Sequence[Any], shared_mem: int = 0
    ) -> None:
        raise NotImplementedError


class CupyRuntime(Runtime):
    """cupy.RawModule per (device, file) or, for :data:`PER_KERNEL`, per (device, kernel),
    compiled on first use."""

    _modules: Dict[Tuple[int, str, str], Any] = {}

    def __init__(self, empty=None, zeros=None):
        import cupy

        self.xp = cupy
        if empty is not None:
            self.empty = empty  # type: ignore[method-assign]
        if zeros is not None:
            self.zeros = zeros  # type: ignore[method-assign]

    @classmethod
    def module(cls, file: str, name: str = "") -> Any:
        """The compiled module of ``file`` that holds kernel ``name`` (the whole file, or for
        the files of :data:`PER_KERNEL` that one instantiation)."""
        import cupy

        one = name if file in PER_KERNEL else ""
        exprs = [one] if one else NAME_EXPRESSIONS[file]
        key = (cupy.cuda.Device().id, file, one)
        mod = cls._modules.get(key)
        if mod is None:
            mod = cupy.RawModule(
                code=source(file),
                options=NVRTC_OPTIONS + ("-I" + KERNEL_DIR,) + extra_options(),
                name_expressions=exprs,
            )
            mod.compile()
            cls._modules[key] = mod
        return mod

    _functions: Dict[Tuple[int, str], Any] = {}

    def launch(self, file, name, grid, block, args, shared_mem=0):
        import cupy

        key = (cupy.cuda.Device().id, name)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = self.module(file, name).get_function(name)
        fn((int(grid),), (int(block),), tuple(args), shared_mem=int(shared_mem))
