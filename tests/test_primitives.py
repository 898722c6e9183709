"""Tests of the public Z-order primitives: morton_encode / morton_decode / zorder / argsort /
searchsorted, against pymorton, pure-Python bit loops, numpy and the torch reference; SIMD
paths, threads and fork safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zeta

MAX_EXAMPLES = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "50"))
HSET = settings(max_examples=MAX_EXAMPLES, deadline=None)
UINTS = [np.uint8, np.uint16, np.uint32, np.uint64]


def py_morton(coords, bits):
    code = 0
    d = len(coords)
    for b in range(bits):
        for j, c in enumerate(coords):
            code |= ((int(c) >> b) & 1) << (b * d + j)
    return code


def py_demorton(code, d, bits):
    return [sum(((int(code) >> (b * d + j)) & 1) << b for b in range(bits)) for j in range(d)]


def rand_coords(rng, n, d, bits, dtype=np.uint64):
    hi = (1 << bits) - 1
    a = rng.integers(0, hi, size=(n, d), dtype=np.uint64, endpoint=True)
    # make sure the extremes are there
    a[0] = 0
    a[1] = hi
    return a.astype(dtype)


def smallest_uint(bits):
    for t in UINTS:
        if np.iinfo(t).bits >= bits:
            return t
    raise AssertionError


# ---------------------------------------------------------------------------------------------
# morton_encode / morton_decode
# ---------------------------------------------------------------------------------------------


def test_against_pymorton():
    pymorton = pytest.importorskip("pymorton")
    rng = np.random.default_rng(0)
    # pymorton: coordinate 0 = lowest bit; 16 bits per coordinate in 2-D, 10 in 3-D
    c2 = rand_coords(rng, 500, 2, 16, np.uint32)
    codes2 = zeta.morton_encode(c2, bits=16)
    assert codes2.dtype == np.uint32
    assert [int(x) for x in codes2] == [pymorton.interleave2(int(a), int(b)) for a, b in c2]
    dec2 = zeta.morton_decode(codes2, 2, bits=16)
    assert [tuple(map(int, r)) for r in dec2] == [pymorton.deinterleave2(int(x)) for x in codes2]
    c3 = rand_coords(rng, 500, 3, 10, np.uint16)
    codes3 = zeta.morton_encode(c3, bits=10)
    assert codes3.dtype == np.uint32
    assert [int(x) for x in codes3] == [pymorton.interleave3(*map(int, r)) for r in c3]
    dec3 = zeta.morton_decode(codes3, 3, bits=10)
    assert [tuple(map(int, r)) for r in dec3] == [pymorton.deinterleave3(int(x)) for x in codes3]


@pytest.mark.parametrize("d", range(1, 9))
def test_against_python_bit_loop(d):
    rng = np.random.default_rng(d)
    for bits in sorted({1, 3, 32 // d, 32 // d + 1, 64 // d} - {0}):
        if bits > 64 // d:
            continue
        for dtype in UINTS:
            if np.iinfo(dtype).bits < bits:
                continue
            c = rand_coords(rng, 200, d, bits, dtype)
            codes = zeta.morton_encode(c, bits=bits)
            want_dtype = np.uint32 if d * bits <= 32 else np.uint64
            assert codes.dtype == want_dtype, (d, bits, dtype)
            assert [int(x) for x in codes] == [py_morton(r, bits) for r in c], (d, bits, dtype)
            dec = zeta.morton_decode(codes, d, bits=bits)
            assert dec.dtype == codes.dtype and dec.shape == (200, d)
            np.testing.assert_array_equal(dec.astype(np.uint64), c.astype(np.uint64))
        # decoding arbitrary d*bits-bit codes
        cdt = np.uint32 if d * bits <= 32 else np.uint64
        raw = rng.integers(0, (1 << (d * bits)) - 1, size=300, dtype=np.uint64, endpoint=True)
        raw = raw.astype(cdt)
        dec = zeta.morton_decode(raw, d, bits=bits)
        assert [list(map(int, r)) for r in dec] == [py_demorton(x, d, bits) for x in raw]
        if d * bits < np.iinfo(cdt).bits:  # codes with bits above d*bits are rejected
            over = raw.copy()
            over[-1] |= cdt(1) << cdt(d * bits)
            with pytest.raises(ValueError, match="^codes"):
                zeta.morton_decode(over, d, bits=bits)


@pytest.mark.parametrize("d", range(1, 9))
def test_default_bits_and_output_width(d):
    c = np.ones((3, d), np.uint8)
    assert zeta.morton_encode(c).dtype == np.uint64  # default bits = 64 // d
    assert [int(x) for x in zeta.morton_encode(c)] == [py_morton([1] * d, 64 // d)] * 3
    for bits in range(1, 64 // d + 1):
        want = np.uint32 if d * bits <= 32 else np.uint64
        assert zeta.morton_encode(c, bits=bits).dtype == want, (d, bits)
    # decode's default bits: the code width // d
    codes32 = zeta.morton_encode(c, bits=32 // d)
    np.testing.assert_array_equal(zeta.morton_decode(codes32, d), c)
    codes64 = zeta.morton_encode(c, bits=64 // d)
    np.testing.assert_array_equal(zeta.morton_decode(codes64, d), c)


@HSET
@given(st.data())
def test_hypothesis_encode_decode_round_trip(data):
    d = data.draw(st.integers(1, 8), label="d")
    bits = data.draw(st.integers(1, 64 // d), label="bits")
    n = data.draw(st.integers(1, 40), label="n")
    hi = (1 << bits) - 1
    rows = data.draw(
        st.lists(st.lists(st.integers(0, hi), min_size=d, max_size=d), min_size=n, max_size=n),
        label="rows",
    )
    dtype = data.draw(
        st.sampled_from([t for t in UINTS if np.iinfo(t).bits >= bits]), label="dtype"
    )
    c = np.array(rows, dtype=dtype)
    codes = zeta.morton_encode(c, bits=bits)
    assert [int(x) for x in codes] == [py_morton(r, bits) for r in rows]
    back = zeta.morton_decode(codes, d, bits=bits)
    assert [list(map(int, r)) for r in back] == rows


@HSET
@given(st.data())
def test_hypothesis_decode_encode_round_trip(data):
    d = data.draw(st.integers(1, 8), label="d")
    bits = data.draw(st.integers(1, 64 // d), label="bits")
    total = d * bits
    codes = data.draw(st.lists(st.integers(0, (1 << total) - 1), min_size=1, max_size=40))
    arr = np.array(codes, dtype=np.uint32 if total <= 32 else np.uint64)
    coords = zeta.morton_decode(arr, d, bits=bits)
    again = zeta.morton_encode(coords, bits=bits)
    assert [int(x) for x in again] == codes


def test_leading_axes_and_kinds():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    c = rand_coords(rng, 24, 3, 10, np.uint16).reshape(2, 3, 4, 3)
    codes = zeta.morton_encode(c, bits=10)
    assert codes.shape == (2, 3, 4)
    np.testing.assert_array_equal(codes.reshape(-1), zeta.morton_encode(c.reshape(-1, 3), bits=10))
    back = zeta.morton_decode(codes, 3, bits=10)
    assert back.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(back, c)
    # torch in -> torch out (uint32 / uint64 codes)
    tc = torch.from_numpy(c)
    tcodes = zeta.morton_encode(tc, bits=10)
    assert torch.is_tensor(tcodes) and tcodes.dtype == torch.uint32
    np.testing.assert_array_equal(tcodes.numpy(), codes)
    t64 = zeta.morton_encode(tc, bits=11)
    assert t64.dtype == torch.uint64
    np.testing.assert_array_equal(t64.numpy(), zeta.morton_encode(c, bits=11))
    tback = zeta.morton_decode(tcodes, 3, bits=10)
    assert torch.is_tensor(tback) and tback.dtype == torch.uint32
    np.testing.assert_array_equal(tback.numpy(), c)
    # non-contiguous inputs
    big = rand_coords(rng, 100, 6, 10, np.uint32)
    view = big[::3, ::2]  # (34, 3), strided
    assert not view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(
        zeta.morton_encode(view, bits=10), zeta.morton_encode(view.copy(), bits=10)
    )
    tview = torch.from_numpy(big)[::3, ::2]
    np.testing.assert_array_equal(
        zeta.morton_encode(tview, bits=10).numpy(), zeta.morton_encode(view.copy(), bits=10)
    )
    cview = zeta.morton_encode(big.copy(), bits=10)[::2]
    np.testing.assert_array_equal(zeta.morton_decode(cview, 6, bits=10), big[::2])


# ---------------------------------------------------------------------------------------------
# zorder
# ---------------------------------------------------------------------------------------------


def _as_i64(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.uint64).view(np.int64)


@pytest.mark.parametrize("d", range(1, 9))
def test_zorder_equals_torch_reference(d):
    torch = pytest.importorskip("torch")
    from zeta.backends import torch_ref as T

    rng = np.random.default_rng(10 + d)
    x = rng.standard_normal((300, d)) * rng.choice([0.01, 1.0, 100.0], size=(300, 1))
    x[:5] = [[0.0] * d, [1e30] * d, [-1e30] * d, [1e-300] * d, [-0.0] * d]
    for dtype in (np.float64, np.float32):
        xx = x.astype(dtype)
        for bits in sorted({1, 32 // d, T.default_bits(d), 64 // d}):
            for shift in sorted({0, 1, d}):
                for scale in (1.0, 0.25):
                    got = zeta.zorder(xx, bits, shift, scale=scale)
                    assert got.dtype == (np.uint32 if d * bits <= 32 else np.uint64)
                    want = T.zorder(torch.from_numpy(xx), bits, shift=shift, scale=scale)
                    np.testing.assert_array_equal(
                        _as_i64(got), want.numpy(), err_msg=f"{bits} {shift}"
                    )
    # default bits as documented
    assert zeta.zorder(x).dtype == (np.uint32 if d <= 4 else np.uint64)
    np.testing.assert_array_equal(
        _as_i64(zeta.zorder(x)), T.zorder(torch.from_numpy(x), T.default_bits(d)).numpy()
    )


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8])
def test_zorder_monotone_per_coordinate_and_shift_range(d):
    rng = np.random.default_rng(d)
    base = rng.standard_normal(d)
    line = np.linspace(-50, 50, 2001)
    bits = 32 // d if d <= 4 else 64 // d
    for j in range(d):
        pts = np.tile(base, (len(line), 1))
        pts[:, j] = line
        for shift in range(d + 1):
            codes = zeta.zorder(pts, bits, shift).astype(np.uint64)
            assert (np.diff(codes.astype(np.float64)) >= 0).all() and (
                codes[1:] >= codes[:-1]
            ).all()
            assert codes[-1] > codes[0]
            # every coordinate of a shifted code still fits `bits` bits
            grid = zeta.morton_decode(codes, d, bits=bits)
            assert int(grid.max()) < (1 << bits)
    pts = rng.standard_normal((50, d))
    c0 = zeta.zorder(pts, bits, 0)
    assert not np.array_equal(c0, zeta.zorder(pts, bits, d))
    for bad in (-1, d + 1):
        with pytest.raises(ValueError, match="^shift"):
            zeta.zorder(pts, bits, bad)


def test_zorder_kinds_and_layouts():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 5, 3))
    codes = zeta.zorder(x)
    assert codes.shape == (4, 5) and codes.dtype == np.uint32
    np.testing.assert_array_equal(codes.reshape(-1), zeta.zorder(x.reshape(-1, 3)))
    t = zeta.zorder(torch.from_numpy(x))
    assert torch.is_tensor(t) and t.dtype == torch.uint32
    np.testing.assert_array_equal(t.numpy(), codes)
    t64 = zeta.zorder(torch.from_numpy(x).float(), 21)
    assert t64.dtype == torch.uint64
    np.testing.assert_array_equal(t64.numpy(), zeta.zorder(x.astype(np.float32), 21))
    # float16 / bfloat16 are upcast
    x16 = x.astype(np.float16)
    np.testing.assert_array_equal(zeta.zorder(x16), zeta.zorder(x16.astype(np.float32)))
    tb = torch.from_numpy(x).bfloat16()
    np.testing.assert_array_equal(zeta.zorder(tb).numpy(), zeta.zorder(tb.float().numpy()))
    # non-contiguous
    wide = rng.standard_normal((40, 7))
    view = wide[::2, 1:4]
    np.testing.assert_array_equal(zeta.zorder(view), zeta.zorder(view.copy()))
    np.testing.assert_array_equal(
        zeta.zorder(torch.from_numpy(wide)[::2, 1:4]).numpy(), zeta.zorder(view.copy())
    )


# ---------------------------------------------------------------------------------------------
# argsort / searchsorted
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 17, 1000, 65537, 300_000])
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_argsort_matches_numpy_stable(n, dtype):
    rng = np.random.default_rng(n)
    hi = np.iinfo(dtype).max
    many_dups = rng.integers(0, 7, size=n, dtype=dtype)
    spread = rng.integers(0, hi, size=n, dtype=dtype, endpoint=True)
    for a in (many_dups, spread):
        got = zeta.argsort(a)
        assert got.dtype == np.int64 and got.shape == a.shape
        np.testing.assert_array_equal(got, np.argsort(a, kind="stable"))
    if n <= 65537:
        rows = rng.integers(0, 50, size=(3, 2, n), dtype=dtype)
        rows[1, 0] = np.sort(rows[1, 0])[::-1]  # a descending row
        rows[2, 1] = 5  # a constant row
        np.testing.assert_array_equal(zeta.argsort(rows), np.argsort(rows, axis=-1, kind="stable"))


def test_argsort_small_dtypes_kinds_and_views():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for dtype in (np.uint8, np.uint16):
        a = rng.integers(0, 5, size=(4, 999), dtype=dtype)
        np.testing.assert_array_equal(zeta.argsort(a), np.argsort(a, axis=-1, kind="stable"))
    a = rng.integers(0, 1000, size=(6, 500), dtype=np.uint32)
    view = a[::2, ::3]
    assert not view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(zeta.argsort(view), np.argsort(view, axis=-1, kind="stable"))
    t = torch.from_numpy(a)
    got = zeta.argsort(t)
    assert torch.is_tensor(got) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), np.argsort(a, axis=-1, kind="stable"))
    np.testing.assert_array_equal(
        zeta.argsort(t[::2, ::3]).numpy(), np.argsort(view, axis=-1, kind="stable")
    )
    # sorting zorder codes of points
    pts = rng.standard_normal((2000, 3))
    codes = zeta.zorder(pts)
    np.testing.assert_array_equal(zeta.argsort(codes), np.argsort(codes, kind="stable"))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("side", ["left", "right"])
def test_searchsorted_matches_numpy(dtype, side):
    rng = np.random.default_rng(7)
    hi = np.iinfo(dtype).max
    for n, m in ((1, 5), (10, 100), (1000, 777), (50_000, 20_000)):
        s = np.sort(rng.integers(0, 30 if n < 1000 else hi, size=n, dtype=dtype, endpoint=True))
        q = rng.integers(0, 30 if n < 1000 else hi, size=m, dtype=dtype, endpoint=True)
        q[:3] = [0, hi, s[len(s) // 2]]
        got = zeta.searchsorted(s, q, side=side)
        assert got.dtype == np.int64 and got.shape == q.shape
        np.testing.assert_array_equal(got, np.searchsorted(s, q, side=side))
    # multi-row: each row its own sorted array
    s = np.sort(rng.integers(0, 20, size=(3, 4, 64), dtype=dtype), axis=-1)
    q = rng.integers(0, 21, size=(3, 4, 10), dtype=dtype)
    got = zeta.searchsorted(s, q, side=side)
    want = np.stack(
        [np.searchsorted(s[i, j], q[i, j], side=side) for i in range(3) for j in range(4)]
    ).reshape(3, 4, 10)
    np.testing.assert_array_equal(got, want)
    # non-contiguous rows
    sv, qv = s[:, ::2], q[:, ::2, ::3]
    np.testing.assert_array_equal(
        zeta.searchsorted(sv, qv, side=side), zeta.searchsorted(sv.copy(), qv.copy(), side=side)
    )


def test_searchsorted_torch_and_mixed_widths():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    s = np.sort(rng.integers(0, 100, size=(2, 40), dtype=np.uint32), axis=-1)
    q = rng.integers(0, 100, size=(2, 15), dtype=np.uint32)
    got = zeta.searchsorted(torch.from_numpy(s), torch.from_numpy(q), side="right")
    assert torch.is_tensor(got) and got.dtype == torch.int64
    want = np.stack([np.searchsorted(s[i], q[i], side="right") for i in range(2)])
    np.testing.assert_array_equal(got.numpy(), want)
    # uint32 queries into uint64 codes
    got = zeta.searchsorted(s.astype(np.uint64), q, side="left")
    want = np.stack([np.searchsorted(s[i], q[i], side="left") for i in range(2)])
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

_u32 = np.zeros((4, 3), np.uint32)
_codes = np.arange(10, dtype=np.uint32)

BAD = {
    "enc-float": (lambda: zeta.morton_encode(np.zeros((2, 3))), TypeError, "coords"),
    "enc-signed": (lambda: zeta.morton_encode(np.zeros((2, 3), np.int64)), TypeError, "coords"),
    "enc-list": (lambda: zeta.morton_encode([[1, 2, 3]]), TypeError, "coords"),
    "enc-str": (lambda: zeta.morton_encode("abc"), TypeError, "coords"),
    "enc-d0": (lambda: zeta.morton_encode(np.zeros((2, 0), np.uint32)), ValueError, "coords"),
    "enc-d9": (lambda: zeta.morton_encode(np.zeros((2, 9), np.uint32)), ValueError, "coords"),
    "enc-0d": (lambda: zeta.morton_encode(np.uint32(3)), ValueError, "coords"),
    "enc-empty-d0": (lambda: zeta.morton_encode(np.zeros((0, 0), np.uint32)), ValueError, "coords"),
    "enc-empty-bits": (
        lambda: zeta.morton_encode(np.zeros((0, 3), np.uint32), 22),
        ValueError,
        "bits",
    ),
    "enc-bits-big": (lambda: zeta.morton_encode(_u32, bits=22), ValueError, "bits"),
    "enc-bits0": (lambda: zeta.morton_encode(_u32, bits=0), ValueError, "bits"),
    "enc-bits-float": (lambda: zeta.morton_encode(_u32, bits=3.0), TypeError, "bits"),
    "enc-too-big": (
        lambda: zeta.morton_encode(np.array([[1, 8, 2]], np.uint32), bits=3),
        ValueError,
        "coords",
    ),
    "enc-too-big-late": (
        lambda: zeta.morton_encode(
            np.r_[np.zeros((5000, 2), np.uint64), [[0, 1 << 40]]].astype(np.uint64), bits=32
        ),
        ValueError,
        "coords",
    ),
    "dec-signed": (lambda: zeta.morton_decode(np.zeros(3, np.int64), 2), TypeError, "codes"),
    "dec-float": (lambda: zeta.morton_decode(np.zeros(3), 2), TypeError, "codes"),
    "dec-str": (lambda: zeta.morton_decode("abc", 2), TypeError, "codes"),
    "dec-d0": (lambda: zeta.morton_decode(_codes, 0), ValueError, "dims"),
    "dec-d9": (lambda: zeta.morton_decode(_codes, 9), ValueError, "dims"),
    "dec-dims-float": (lambda: zeta.morton_decode(_codes, 2.0), TypeError, "dims"),
    "dec-bits-big": (lambda: zeta.morton_decode(_codes, 2, bits=17), ValueError, "bits"),
    "z-nan": (lambda: zeta.zorder(np.array([[0.0, np.nan]])), ValueError, "x"),
    "z-inf": (lambda: zeta.zorder(np.array([[np.inf, 0.0]], np.float32)), ValueError, "x"),
    "z-nan-late": (
        lambda: zeta.zorder(np.r_[np.zeros((9999, 3)), [[0, 0, np.nan]]]),
        ValueError,
        "x",
    ),
    "z-int": (lambda: zeta.zorder(np.zeros((2, 3), np.int32)), TypeError, "x"),
    "z-str": (lambda: zeta.zorder("abc"), TypeError, "x"),
    "z-d0": (lambda: zeta.zorder(np.zeros((2, 0))), ValueError, "x"),
    "z-d9": (lambda: zeta.zorder(np.zeros((2, 9))), ValueError, "x"),
    "z-bits-big": (lambda: zeta.zorder(np.zeros((2, 3)), 22), ValueError, "bits"),
    "z-bits0": (lambda: zeta.zorder(np.zeros((2, 3)), 0), ValueError, "bits"),
    "z-scale0": (lambda: zeta.zorder(np.zeros((2, 3)), scale=0.0), ValueError, "scale"),
    "z-scale-nan": (lambda: zeta.zorder(np.zeros((2, 3)), scale=float("nan")), ValueError, "scale"),
    "z-shift-float": (lambda: zeta.zorder(np.zeros((2, 3)), shift=1.0), ValueError, "shift"),
    "arg-float": (lambda: zeta.argsort(np.zeros(5)), TypeError, "codes"),
    "arg-signed": (lambda: zeta.argsort(np.zeros(5, np.int32)), TypeError, "codes"),
    "arg-str": (lambda: zeta.argsort("abc"), TypeError, "codes"),
    "arg-0d": (lambda: zeta.argsort(np.uint32(1)), ValueError, "codes"),
    "ss-lead": (
        lambda: zeta.searchsorted(np.zeros((2, 5), np.uint32), np.zeros((3, 5), np.uint32)),
        ValueError,
        "queries",
    ),
    "ss-lead-1d": (
        lambda: zeta.searchsorted(np.zeros((2, 5), np.uint32), np.zeros(5, np.uint32)),
        ValueError,
        "queries",
    ),
    "ss-side": (lambda: zeta.searchsorted(_codes, _codes, side="middle"), ValueError, "side"),
    "ss-float": (lambda: zeta.searchsorted(_codes, np.zeros(3)), TypeError, "queries"),
    "ss-sorted-float": (lambda: zeta.searchsorted(np.zeros(3), _codes), TypeError, "sorted_codes"),
    "ss-str": (lambda: zeta.searchsorted("abc", _codes), TypeError, "sorted_codes"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_argument(name):
    fn, exc, arg = BAD[name]
    with pytest.raises(exc) as e:
        fn()
    assert str(e.value).startswith(arg + ":") or str(e.value).startswith(arg + ","), str(e.value)


def test_meta_tensors_are_refused_by_name():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="^x: a meta tensor"):
        zeta.zorder(torch.zeros(4, 3, device="meta"))
    with pytest.raises(ValueError, match="^codes: a meta tensor"):
        zeta.argsort(torch.zeros(5, dtype=torch.uint64, device="meta"))
    with pytest.raises(ValueError, match="^queries: a meta tensor"):
        codes = torch.zeros(5, dtype=torch.uint64)
        zeta.searchsorted(codes, codes.to("meta"))


def test_signed_torch_rejected():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="^coords"):
        zeta.morton_encode(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="^codes"):
        zeta.argsort(torch.zeros(5, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# SIMD paths, threads, fork
# ---------------------------------------------------------------------------------------------

_PROBE = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np
    import zeta
    rng = np.random.default_rng(0)
    out = {"path": zeta._core.simd_path()}
    h = hashlib.sha256()
    for d in range(1, 9):
        for bits in sorted({1, 32 // d, 64 // d}):
            c = rng.integers(0, (1 << bits) - 1, size=(3001, d), dtype=np.uint64, endpoint=True)
            for dt in (np.uint32, np.uint64):
                if bits <= np.iinfo(dt).bits:
                    codes = zeta.morton_encode(c.astype(dt), bits=bits)
                    h.update(codes.tobytes())
                    h.update(zeta.morton_decode(codes, d, bits=bits).tobytes())
            x = rng.standard_normal((3001, d)) * 3
            for shift in (0, d):
                h.update(zeta.zorder(x, bits, shift).tobytes())
                h.update(zeta.zorder(x.astype(np.float32), bits, shift, scale=0.5).tobytes())
    a = rng.integers(0, 1000, size=(3, 50001), dtype=np.uint32)
    h.update(zeta.argsort(a).tobytes())
    h.update(zeta.searchsorted(np.sort(a, -1), a[:, :999], side="right").tobytes())
    # the distance scans (3-D float32: the SIMD kernel; else the portable loop): the same
    # distances bit for bit, so the same neighbours and outputs
    # (1e19: distances overflow to inf, which knn ranks by position and attention refuses;
    # 5e17: within attention's coordinate limit, squared distances up to ~1e37)
    for dk, scale in ((3, 1.0), (3, 1e-20), (3, 1e19), (3, 5e17), (2, 1.0), (4, 1.0)):
        q = (rng.standard_normal((1, 2, 3001, dk)) * scale).astype(np.float32)
        k = (rng.standard_normal((1, 2, 3001, dk)) * scale).astype(np.float32)
        v = rng.standard_normal((1, 2, 3001, 5)).astype(np.float32)
        k[0, 0, 100:200] = k[0, 0, 50]  # duplicates: ties by position
        for kw in ({}, {"exact": False}, {"n_curves": 1, "window": 3, "exact": False}, {"causal": False}):
            idx, d2 = zeta.knn(q, k, 17, **kw)
            h.update(idx.tobytes())
            h.update(d2.tobytes())
            if scale < 1e19:
                h.update(zeta.attention(q, k, v, topk=17, **kw).tobytes())
        if scale >= 1e19:
            continue
        c = zeta.KVCache(2, dk, 5)
        c.extend(k, v)
        h.update(c.attend(q[:, :, -9:], topk=17).tobytes())
        h.update(c.attend(q[:, :, -9:], topk=17, exact=False).tobytes())
        h.update(c.attend(q[:, :, -9:], topk=17, exact=True).tobytes())
    # the top-k's cuts (a sorted merge in 1, 2, 4 or 8 registers of AVX-512, twice as many
    # of AVX2, or a select; topk * multiplicity around the merge's limit of 64)
    q = rng.standard_normal((1, 2, 600, 3)).astype(np.float32)
    k = rng.standard_normal((1, 2, 600, 3)).astype(np.float32)
    k[0, 1, 50:120] = k[0, 1, 7]
    for topk in (1, 8, 21, 32, 33, 64, 65):
        for kw in ({}, {"exact": False, "n_curves": 2, "n_sink": 4}, {"exact": False, "n_curves": 3}):
            idx, d2 = zeta.knn(q, k, topk, **kw)
            h.update(idx.tobytes())
            h.update(d2.tobytes())
    # the value sums (float32 and float16 rows; d_v with a tail of every kernel width)
    q = rng.standard_normal((1, 2, 2001, 3)).astype(np.float32)
    k = rng.standard_normal((1, 2, 2001, 3)).astype(np.float32)
    for dv in (1, 8, 16, 37, 64):
        v = rng.standard_normal((1, 2, 2001, dv)).astype(np.float32)
        h.update(zeta.attention(q, k, v, topk=9).tobytes())
        for vdt in ("float16", "bfloat16"):  # rows stored in 16 bits, summed in float32
            c = zeta.KVCache(2, 3, dv, dtype=vdt)
            c.extend(k, v)
            h.update(c.attend(q[:, :, -5:], topk=9).tobytes())
    out["digest"] = h.hexdigest()
    out["scan"] = zeta._core.cpu_features()["scan"]
    print(json.dumps(out))
    """
)


def _run_py(code, env_extra, timeout=120):
    env = dict(os.environ)
    env.update(env_extra)
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_every_simd_path_gives_identical_results():
    """Morton codes, sorts, the distance scans and value sums of knn / attention / KVCache:
    every path this CPU has (ZETA_SIMD; read once per process for the vector kernels) gives
    the same bits."""
    feats = zeta._core.cpu_features()
    paths, vectors = feats["paths"], feats["vectors"]
    assert "portable" in paths and vectors[0] == "portable"
    # the vector kernels need POPCNT beside AVX2 / AVX-512F
    assert ("avx2" in vectors) == (feats["avx2"] and feats["popcnt"])
    assert ("avx512" in vectors) == (feats["avx512f"] and feats["popcnt"])
    results = {}
    for p in dict.fromkeys(paths + vectors):
        res = json.loads(_run_py(_PROBE, {"ZETA_SIMD": p}).strip().splitlines()[-1])
        if p in paths:
            assert res["path"] == p
        # the vector kernels: the named one if this CPU has it, else the best one below it
        want = {"portable": "portable", "avx2": "avx2" if "avx2" in vectors else "portable"}
        assert res["scan"] == want.get(p, vectors[-1]), (p, res["scan"])
        results[p] = res["digest"]
    assert len(set(results.values())) == 1, results


def test_simd_env_read_per_call(monkeypatch):
    paths = zeta._core.cpu_features()["paths"]
    rng = np.random.default_rng(1)
    c = rng.integers(0, 1 << 20, size=(5000, 3), dtype=np.uint32)
    x = rng.standard_normal((5000, 4))
    outs = []
    for p in paths:
        monkeypatch.setenv("ZETA_SIMD", p)
        assert zeta._core.simd_path() == p
        codes = zeta.morton_encode(c, bits=21)
        outs.append((codes, zeta.morton_decode(codes, 3, bits=21), zeta.zorder(x)))
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            np.testing.assert_array_equal(a, b)
    # an unknown value falls back to the best path instead of failing
    monkeypatch.setenv("ZETA_SIMD", "nonsense")
    assert zeta._core.simd_path() in paths
    np.testing.assert_array_equal(zeta.morton_encode(c, bits=21), outs[0][0])


def test_num_threads_env():
    code = "import zeta; print(zeta._core.num_threads())"
    assert _run_py(code, {"ZETA_NUM_THREADS": "1"}).strip() == "1"
    assert _run_py(code, {"ZETA_NUM_THREADS": "3"}).strip() == "3"


_CACHE_DIGEST = textwrap.dedent(
    """
    import hashlib
    import numpy as np
    import zeta
    rng = np.random.default_rng(4)
    k = rng.standard_normal((2, 4, 3000, 3)).astype(np.float32)
    v = rng.standard_normal((2, 4, 3000, 7)).astype(np.float32)
    q = rng.standard_normal((2, 8, 3000, 3)).astype(np.float32)
    c = zeta.KVCache(4, 3, 7, batch=2, chunk=16)
    h = hashlib.sha256()
    for a, b in ((0, 1000), (1000, 1001), (1001, 2950), (2950, 3000)):
        c.extend(k[:, :, a:b], v[:, :, a:b])
        for exact in (False, True):
            h.update(c.attend(q[:, :, b - 1 : b], topk=9, exact=exact).tobytes())
            h.update(c.attend(q[:, :, max(0, b - 40) : b], topk=9, exact=exact).tobytes())
    print(h.hexdigest())
    """
)


def test_allocator_choice():
    """mimalloc by default; ZETA_ALLOCATOR=system at import keeps the system's; same bits."""
    code = "import zeta; print(zeta._core.allocator())\n" + _CACHE_DIGEST
    mi = _run_py(code, {}).split()
    sysa = _run_py(code, {"ZETA_ALLOCATOR": "system"}).split()
    assert mi[0] == "mimalloc" and sysa[0] == "system"
    assert mi[1] == sysa[1]


_BIG_CACHE = textwrap.dedent(
    """
    import hashlib
    import numpy as np
    import zeta

    # one head of 1,024 float32 value dims: the values grow past 128 MiB (the block moves
    # from mimalloc to the system allocator) and on (grown in place)
    rng = np.random.default_rng(0)
    t, blk = 40_960, 4_096
    k = rng.standard_normal((1, 1, t, 3), dtype=np.float32)
    v = rng.standard_normal((1, 1, t, 1024), dtype=np.float32)
    c = zeta.KVCache(1, 3, 1024)
    for a in range(0, t, blk):
        c.extend(k[:, :, a : a + blk], v[:, :, a : a + blk])
    assert c.nbytes > 128 << 20
    q = rng.standard_normal((1, 1, 8, 3), dtype=np.float32)
    got = c.attend(q, topk=16)
    want = zeta.attention(q, k, v, topk=16)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    del c  # frees the blocks that moved to the system allocator
    # a prefill: one extend makes the values' block at its exact size, past 128 MiB (the
    # system allocator's from the start), and the next token grows it (in place)
    c = zeta.KVCache(1, 3, 1024)
    c.extend(k[:, :, : t - 1], v[:, :, : t - 1])
    assert c.nbytes > 128 << 20
    c.extend(k[:, :, t - 1 :], v[:, :, t - 1 :])
    got2 = c.attend(q, topk=16)
    assert np.allclose(got2, want, rtol=1e-5, atol=1e-6)
    got = np.concatenate([got, got2])
    del c
    # fresh blocks of 128 MiB and more (argsort's int64 output) stay mimalloc's: two in turn,
    # the first freed before the second
    keys = rng.integers(0, 1 << 30, size=(1 << 24) + 4096, dtype=np.uint32)
    order = np.argsort(keys, kind="stable")
    for _ in range(2):
        out = zeta.argsort(keys)
        assert out.nbytes > 128 << 20 and (out == order).all()
        del out
    print(zeta._core.allocator(), hashlib.sha256(got.tobytes()).hexdigest()[:16])
    """
)


def test_blocks_past_the_allocator_split_keep_their_contents():
    """Under mimalloc a block that grows to 128 MiB or more moves to the system allocator (the
    cache's values survive it, and are freed by it), as does one the cache's extend makes at
    that size; other fresh ones of that size stay mimalloc's (and are freed by it): the same
    results as with the system allocator alone."""
    mi = _run_py(_BIG_CACHE, {}).split()
    sysa = _run_py(_BIG_CACHE, {"ZETA_ALLOCATOR": "system"}).split()
    assert mi[0] == "mimalloc" and sysa[0] == "system"
    assert mi[1] == sysa[1]


def test_cache_is_the_same_on_one_thread():
    """A one-thread pool runs the KV cache's extend and attend on the caller's thread (no
    hand-off per call): the same bits as the parallel runs."""
    one = _run_py(_CACHE_DIGEST, {"ZETA_NUM_THREADS": "1"}).strip()
    assert one == _run_py(_CACHE_DIGEST, {"ZETA_NUM_THREADS": "2"}).strip()


_FORK = textwrap.dedent(
    """
    import os, sys, threading, time
    import numpy as np
    import zeta

    rng = np.random.default_rng(0)
    a = rng.integers(0, 1 << 30, size=(4, 200_000), dtype=np.uint32)
    want = np.argsort(a, axis=-1, kind="stable")
    assert (zeta.argsort(a) == want).all()  # the pool exists and has run

    def child_work():
        ok = (zeta.argsort(a) == want).all()
        x = np.random.default_rng(1).standard_normal((100_000, 3))
        ok = ok and zeta.zorder(x).shape == (100_000,)
        os._exit(0 if ok else 3)

    def wait(pid, limit=60.0):
        t0 = time.time()
        while time.time() - t0 < limit:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"

    # 1. fork after a parallel call
    pid = os.fork()
    if pid == 0:
        child_work()
    assert wait(pid) == 0, "child after a finished parallel call"

    # 2. fork while another thread is inside a zeta call
    stop = False
    def busy():
        while not stop:
            zeta.argsort(a)
    th = threading.Thread(target=busy)
    th.start()
    try:
        for _ in range(4):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:
                child_work()
            rc = wait(pid)
            assert rc == 0, f"child forked during a parallel call: {rc}"
    finally:
        stop = True
        th.join()
    print("ok")
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_safety():
    out = _run_py(_FORK, {"ZETA_NUM_THREADS": "2"}, timeout=150)
    assert out.strip().endswith("ok")


@pytest.mark.parametrize(
    "value,warns", [("abc", True), ("0", True), ("-3", True), ("1", False), ("", False)]
)
def test_bad_thread_count_env_warns_and_still_works(value, warns):
    code = (
        "import warnings, numpy as np\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import zeta\n"
        "print(sum('ZETA_NUM_THREADS' in str(x.message) for x in w))\n"
        "print(zeta.argsort(np.array([3, 1, 2], dtype=np.uint64)).tolist())\n"
    )
    out = _run_py(code, {"ZETA_NUM_THREADS": value}).split()
    assert out[0] == ("1" if warns else "0")
    assert out[1] == "[1,"


def test_python_dash_m_zeta_info():
    r = subprocess.run(
        [sys.executable, "-m", "zeta", "info"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "zeta" in r.stdout and "threads" in r.stdout.lower()


# ---------------------------------------------------------------------------------------------
# empty inputs follow numpy: an empty result of the shape and dtype a non-empty input gets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 2)])
@pytest.mark.parametrize("d", [1, 3, 6])
def test_empty_encode_decode_zorder(lead, d):
    c = np.zeros(lead + (d,), np.uint32)
    for bits in (None, 32 // d, 64 // d):
        full = zeta.morton_encode(np.ones((2, d), np.uint32), bits)
        got = zeta.morton_encode(c, bits)
        assert got.shape == lead and got.dtype == full.dtype, (bits, got.shape, got.dtype)
    for dt in (np.uint32, np.uint64):
        got = zeta.morton_decode(np.zeros(lead, dt), d)
        assert got.shape == lead + (d,) and got.dtype == dt
    for dt in (np.float32, np.float64):
        full = zeta.zorder(np.zeros((2, d), dt))
        got = zeta.zorder(np.zeros(lead + (d,), dt))
        assert got.shape == lead and got.dtype == full.dtype


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 4)])
@pytest.mark.parametrize("dt", [np.uint32, np.uint64])
def test_empty_argsort_matches_numpy(shape, dt):
    a = np.zeros(shape, dt)
    ref = np.argsort(a, axis=-1, kind="stable")
    got = zeta.argsort(a)
    assert got.shape == ref.shape and got.dtype == np.int64


@pytest.mark.parametrize("side", ["left", "right"])
def test_empty_searchsorted_matches_numpy(side):
    rng = np.random.default_rng(0)
    q = np.sort(rng.integers(0, 100, 7).astype(np.uint32))
    cases = [
        (np.zeros(0, np.uint32), q),  # nothing to search: every insertion point is 0
        (q, np.zeros(0, np.uint32)),  # no queries
        (np.zeros(0, np.uint32), np.zeros(0, np.uint32)),
    ]
    for s, qq in cases:
        got = zeta.searchsorted(s, qq, side=side)
        ref = np.searchsorted(s, qq, side=side)
        assert got.dtype == np.int64 and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)
    rows = np.zeros((3, 0), np.uint32)
    got = zeta.searchsorted(rows, np.ones((3, 4), np.uint32), side=side)
    np.testing.assert_array_equal(got, np.zeros((3, 4), np.int64))
    got = zeta.searchsorted(np.zeros((0, 5), np.uint32), np.zeros((0, 2), np.uint32), side=side)
    assert got.shape == (0, 2) and got.dtype == np.int64


def test_empty_torch_inputs_stay_torch():
    torch = pytest.importorskip("torch")
    got = zeta.argsort(torch.zeros((3, 0), dtype=torch.int32).to(torch.uint32))
    assert isinstance(got, torch.Tensor) and got.shape == (3, 0) and got.dtype == torch.int64
    got = zeta.zorder(torch.zeros((0, 3)))
    assert isinstance(got, torch.Tensor) and got.shape == (0,)
