"""Dispatch: every backend declares what it takes and says why not; the torch backend's
primitives (the GPU fallback without cupy) agree with the Rust core."""

import numpy as np
import pytest
import torch

import zeta
from zeta.backends import BACKENDS, CallInfo, select


def test_report_lists_every_backend_with_a_reason():
    rep = zeta.backends()
    assert set(rep) == {"rust", "cupy", "torch"}
    for name, r in rep.items():
        assert r["available"] or r["reason"], name


def test_auto_picks_rust_on_cpu_and_forcing_names_the_reasons():
    info = CallInfo("numpy", "cpu", "float32", 3, topk=8, op="knn")
    assert select(info).name == "rust"
    with pytest.raises(ValueError, match="backend: 'cupy' cannot run this call"):
        select(info, "cupy")
    with pytest.raises(ValueError, match="backend: unknown"):
        select(info, "nope")


def test_no_backend_error_lists_all_reasons():
    info = CallInfo("numpy", "cpu", "float32", 9, topk=8, op="knn")  # key_dim 9: nobody
    with pytest.raises(ValueError) as e:
        select(info)
    msg = str(e.value)
    for name in ("rust", "cupy", "torch"):
        assert f"{name}:" in msg
    assert "key_dim 9" in msg


def test_a_backend_without_a_backward_declines_a_call_that_needs_one():
    info = CallInfo("torch", "cpu", "float32", 3, requires_grad=True, topk=4, op="knn")
    reasons = BACKENDS["rust"].not_supported_reasons(info)
    assert any("no backward for knn" in r for r in reasons)
    info.op = "attention"
    assert BACKENDS["rust"].not_supported_reasons(info) == []


def test_cupy_declines_numpy_and_large_topk():
    r = BACKENDS["cupy"].not_supported_reasons(CallInfo("numpy", "cpu", "float32", 3, topk=300))
    assert any("numpy" in x for x in r)
    assert any("topk 300" in x for x in r)


def test_torch_backend_primitives_match_rust():
    tb = BACKENDS["torch"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 3, generator=g)
    for bits, shift in ((10, 0), (10, 2), (21, 3)):
        want = zeta.zorder(x, bits, shift)
        got = tb.zorder(x, 3, bits, shift, 1.0)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    c = torch.from_numpy(np.random.default_rng(1).integers(0, 1 << 10, (30, 3)).astype(np.uint32))
    enc = tb.morton_encode(c, 10)
    np.testing.assert_array_equal(enc.numpy(), zeta.morton_encode(c, 10).numpy())
    np.testing.assert_array_equal(tb.morton_decode(enc, 3, 10).numpy(), c.numpy())
    wide = torch.from_numpy(
        np.random.default_rng(2).integers(0, 1 << 63, (20, 1), dtype=np.uint64) * 2
    )
    enc = tb.morton_encode(wide, 64)
    np.testing.assert_array_equal(enc.numpy(), zeta.morton_encode(wide.numpy(), 64))
    codes = zeta.zorder(x.numpy(), 21)  # uint64 codes
    dup = torch.from_numpy((codes >> np.uint64(50)).astype(np.uint64))
    np.testing.assert_array_equal(
        tb.argsort(dup).numpy(), np.argsort(dup.numpy(), -1, kind="stable")
    )
    s = torch.from_numpy(np.sort(codes, axis=-1))
    for right in (False, True):
        got = tb.searchsorted(s, torch.from_numpy(codes), right)
        want = zeta.searchsorted(s.numpy(), codes, side="right" if right else "left")
        np.testing.assert_array_equal(got.numpy(), want)


def test_torch_backend_knn_and_attention_match_rust():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 40, 3)).astype(np.float32)
    k = rng.standard_normal((1, 1, 40, 3)).astype(np.float32)
    v = rng.standard_normal((1, 1, 40, 8)).astype(np.float32)
    i1, d1 = zeta.knn(q, k, 6, chunk=8, backend="torch")
    i2, d2 = zeta.knn(q, k, 6, chunk=8, backend="rust")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    o1 = zeta.attention(q, k, v, topk=6, chunk=8, backend="torch")
    o2 = zeta.attention(q, k, v, topk=6, chunk=8, backend="rust")
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-6)
    q[0, 0, 3, 0] = np.nan
    for be in ("torch", "rust"):
        with pytest.raises(ValueError, match="q"):
            zeta.attention(q, k, v, topk=6, backend=be)


def test_a_bad_cuda_knob_warns_instead_of_breaking_import():
    """ZETA_CUDA_LEAF / ZETA_CUDA_EXACT_WINDOW are measurement knobs: a bad value warns and
    the default is used; `import zeta` must keep working (also without a GPU)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ZETA_CUDA_LEAF": "abc", "ZETA_CUDA_EXACT_WINDOW": "-5"}
    code = (
        "import warnings; warnings.simplefilter('always'); import zeta; "
        "import zeta._cuda.index as I, zeta._cuda.search as S; print(I.LEAF, S.EXACT_WINDOW)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["64", "8"]
    assert "ZETA_CUDA_LEAF='abc'" in r.stderr and "ZETA_CUDA_EXACT_WINDOW='-5'" in r.stderr
