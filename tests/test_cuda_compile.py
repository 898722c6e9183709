"""Every CUDA source compiles with NVRTC for sm_80 and sm_90 (no GPU needed)."""

import ctypes
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from nvrtc_compile import compile_file, find_nvrtc, units  # noqa: E402

from zeta._cuda.runtime import KERNEL_DIR, NAME_EXPRESSIONS  # noqa: E402


@pytest.fixture(scope="module")
def nvrtc():
    path = find_nvrtc()
    assert path is not None, "nvidia-cuda-nvrtc is part of the test extra: pip install -e .[test]"
    return ctypes.CDLL(path)


def test_every_source_is_listed():
    on_disk = {p.name for p in Path(KERNEL_DIR).glob("*.cu")}
    assert on_disk == set(NAME_EXPRESSIONS)


def test_every_kernel_is_compiled():
    """The units below (what the runtime compiles as one program) cover every kernel."""
    assert sorted(e for _, exprs in units() for e in exprs) == sorted(
        e for exprs in NAME_EXPRESSIONS.values() for e in exprs
    )


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize(
    "file,exprs",
    [pytest.param(f, e, id=f"{f}:{'+'.join(e) if len(e) == 1 else 'all'}") for f, e in units()],
)
def test_nvrtc_compiles(nvrtc, file, exprs, arch):
    ok, log, lowered = compile_file(nvrtc, file, arch, exprs=exprs)
    assert ok, log
    assert len(lowered) == len(exprs)
    assert "warning" not in log.lower(), log


# What benches/gpu_variants.py launches (bf16 values, d_k = 3): the search kernels it times.
VARIANT_KERNELS = ["zeta::knn_kernel<3>", "zeta::forward_kernel<zeta::bf16, 3>"]


def test_the_gpu_variants_compile(nvrtc):
    """The compile-time variants that benches/gpu_variants.py times on a GPU (sm_90 only; the
    kernels it launches: the other instantiations differ from these by template arguments,
    which the default build above compiles)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benches"))
    from gpu_variants import DEFINES

    for env in DEFINES.values():
        raw = env.get("ZETA_CUDA_DEFINES", "")
        extra = tuple("-D" + d for d in raw.split(",") if d)
        if "ZETA_CUDA_LEAF" in env:
            extra += (f"-DZETA_LEAF={env['ZETA_CUDA_LEAF']}",)
        if extra:
            for expr in VARIANT_KERNELS:
                ok, log, _ = compile_file(nvrtc, "search.cu", "sm_90", extra, [expr])
                assert ok and "warning" not in log.lower(), (extra, expr, log)


def test_nvrtc_reports_a_broken_kernel(nvrtc, monkeypatch):
    """The check can fail: a source with an error does not compile."""
    import nvrtc_compile

    monkeypatch.setattr(
        nvrtc_compile, "source", lambda f: "__global__ void k() { undefined_fn(); }"
    )
    monkeypatch.setitem(NAME_EXPRESSIONS, "broken.cu", ["k"])
    ok, log, _ = nvrtc_compile.compile_file(nvrtc, "broken.cu", "sm_90")
    assert not ok and "undefined_fn" in log
