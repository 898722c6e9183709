"""Z-order primitives on the device: zorder, Morton encode/decode, argsort, searchsorted.

Inputs are the runtime's arrays, already checked by ``zeta.primitives`` (dtypes, dims, bits).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .runtime import Runtime, blocks

THREADS = 256


def zorder(rt: Runtime, x: Any, d: int, bits: int, shift: int, scale: float) -> Any:
    """x (..., d) float32 -> codes (...) uint32 (d*bits <= 32) or uint64."""
    lead = x.shape[:-1]
    wide = d * bits > 32
    rows = x.size // d
    out = rt.empty((rows,), np.uint64 if wide else np.uint32)
    if rows:
        name = (
            "zeta::zorder_kernel<unsigned long long>"
            if wide
            else "zeta::zorder_kernel<unsigned int>"
        )
        rt.launch(
            "zorder.cu",
            name,
            blocks(rows, THREADS),
            THREADS,
            (
                rt.xp.ascontiguousarray(x.reshape(-1)),
                out,
                np.int64(rows),
                np.int32(d),
                np.int32(bits),
                np.int64(rows),
                np.int32(1),
                np.float64(scale),
                np.int32(shift),
            ),
        )
    return out.reshape(lead)


def morton_encode(rt: Runtime, coords: Any, bits: int) -> Any:
    """coords (..., d) unsigned -> codes (...) uint32 (d*bits <= 32) or uint64."""
    d = coords.shape[-1]
    lead = coords.shape[:-1]
    rows = coords.size // d
    wide = d * bits > 32
    out = rt.empty((rows,), np.uint64 if wide else np.uint32)
    if rows:
        c64 = rt.xp.ascontiguousarray(coords.reshape(-1).astype(np.uint64))
        t = "unsigned long long" if wide else "unsigned int"
        rt.launch(
            "zorder.cu",
            f"zeta::morton_encode_kernel<{t}>",
            blocks(rows, THREADS),
            THREADS,
            (c64, out, np.int64(rows), np.int32(d), np.int32(bits)),
        )
    return out.reshape(lead)


def morton_decode(rt: Runtime, codes: Any, d: int, bits: int) -> Any:
    """codes (...) uint32/uint64 -> coords (..., d) of the codes' dtype."""
    rows = codes.size
    out = rt.empty((rows * d,), codes.dtype)
    if rows:
        t = "unsigned long long" if codes.dtype == np.uint64 else "unsigned int"
        rt.launch(
            "zorder.cu",
            f"zeta::morton_decode_kernel<{t}>",
            blocks(rows, THREADS),
            THREADS,
            (
                rt.xp.ascontiguousarray(codes.reshape(-1)),
                out,
                np.int64(rows),
                np.int32(d),
                np.int32(bits),
            ),
        )
    return out.reshape(codes.shape + (d,))


def argsort(rt: Runtime, codes: Any) -> Any:
    """Stable argsort along the last axis -> int64."""
    xp = rt.xp
    if codes.size == 0:
        return xp.zeros(codes.shape, dtype=np.int64)
    if xp is np:
        return np.argsort(codes, axis=-1, kind="stable").astype(np.int64)
    return xp.argsort(codes, axis=-1).astype(np.int64)  # cupy: a stable radix sort


def searchsorted(rt: Runtime, sorted_codes: Any, queries: Any, right: bool) -> Any:
    """Row-wise: sorted (..., n), queries (..., m) of one unsigned dtype -> int64 (..., m)."""
    n = sorted_codes.shape[-1]
    m = queries.shape[-1]
    rows = queries.size // m if m else 0
    out = rt.empty(queries.shape, np.int64)
    if rows and m:
        if n == 0:
            out[...] = 0
            return out
        t = "unsigned long long" if sorted_codes.dtype == np.uint64 else "unsigned int"
        rt.launch(
            "zorder.cu",
            f"zeta::searchsorted_kernel<{t}>",
            blocks(rows * m, THREADS),
            THREADS,
            (
                rt.xp.ascontiguousarray(sorted_codes),
                rt.xp.ascontiguousarray(queries),
                out,
                np.int64(rows),
                np.int64(n),
                np.int64(m),
                np.int32(bool(right)),
            ),
        )
    return out
