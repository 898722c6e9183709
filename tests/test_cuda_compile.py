"""Every CUDA source compiles with NVRTC for sm_80 and sm_90 (no GPU needed)."""

import ctypes
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from nvrtc_compile import compile_file, find_nvrtc  # noqa: E402

from zeta._cuda.runtime import KERNEL_DIR, NAME_EXPRESSIONS  # noqa: E402


@pytest.fixture(scope="module")
def nvrtc():
    path = find_nvrtc()
    assert path is not None, "nvidia-cuda-nvrtc is part of the test extra: pip install -e .[test]"
    return ctypes.CDLL(path)


def test_every_source_is_listed():
    on_disk = {p.name for p in Path(KERNEL_DIR).glob("*.cu")}
    assert on_disk == set(NAME_EXPRESSIONS)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("file", sorted(NAME_EXPRESSIONS))
def test_nvrtc_compiles(nvrtc, file, arch):
    ok, log, lowered = compile_file(nvrtc, file, arch)
    assert ok, log
    assert len(lowered) == len(NAME_EXPRESSIONS[file])
    assert "warning" not in log.lower(), log


def test_the_gpu_variants_compile(nvrtc):
    """The compile-time variants that benches/gpu_variants.py times on a GPU (sm_90 only)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benches"))
    from gpu_variants import DEFINES

    for env in DEFINES.values():
        raw = env.get("ZETA_CUDA_DEFINES", "")
        extra = tuple("-D" + d for d in raw.split(",") if d)
        if "ZETA_CUDA_LEAF" in env:
            extra += (f"-DZETA_LEAF={env['ZETA_CUDA_LEAF']}",)
        if extra:
            ok, log, _ = compile_file(nvrtc, "search.cu", "sm_90", extra)
            assert ok and "warning" not in log.lower(), (extra, log)


def test_nvrtc_reports_a_broken_kernel(nvrtc, monkeypatch):
    """The check can fail: a source with an error does not compile."""
    import nvrtc_compile

    monkeypatch.setattr(
        nvrtc_compile, "source", lambda f: "__global__ void k() { undefined_fn(); }"
    )
    monkeypatch.setitem(NAME_EXPRESSIONS, "broken.cu", ["k"])
    ok, log, _ = nvrtc_compile.compile_file(nvrtc, "broken.cu", "sm_90")
    assert not ok and "undefined_fn" in log
