"""Z-order primitives: Morton encode/decode, fused quantize+encode, argsort, searchsorted.

Every function takes numpy arrays or CPU torch tensors and returns the same kind. Leading
axes are independent rows. Work runs in Rust, in parallel, with the GIL released.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._arrays import contiguous, like, to_numpy
from ._validate import check_bits, check_dims, default_zorder_bits

_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)


def morton_encode(coords: Any, bits: Optional[int] = None) -> Any:
    """Interleave the bits of unsigned integer coordinates into Morton (Z-order) codes.

    Args:
        coords: unsigned integers, shape ``(..., d)`` with ``d`` in 1..8 (uint8/16/32/64;
            Python ints or non-negative signed arrays are rejected: pass an unsigned dtype).
        bits: bits per coordinate; default the most that fit 64 bits (``64 // d``). Every
            value must be ``< 2**bits``.

    Returns:
        codes, shape ``(...)``: uint32 when ``d * bits <= 32``, else uint64. Bit ``b`` of
        coordinate ``j`` lands at bit ``b * d + j`` (coordinate 0 lowest), as in pymorton
        and libmorton.
    """
    a = to_numpy(coords, "coords")
    if a.dtype.type not in _UINTS:
        raise TypeError(
            f"coords: expected an unsigned integer dtype (uint8/16/32/64), got {a.dtype}; "
            "cast non-negative values with .astype(np.uint32) first"
        )
    if a.ndim < 1:
        raise ValueError("coords: must have at least one axis (..., d)")
    d = a.shape[-1]
    check_dims("coords", d)
    bits = 64 // d if bits is None else check_bits(bits, d)
    lead = a.shape[:-1]
    flat = contiguous(a.reshape(-1, d))
    out = _core.morton_encode(flat, bits, d * bits > 32)
    return like(out.reshape(lead), coords)


def morton_decode(codes: Any, dims: int, bits: Optional[int] = None) -> Any:
    """Inverse of :func:`morton_encode`.

    Args:
        codes: uint32 or uint64, shape ``(...)``.
        dims: number of coordinates ``d`` (1..8).
        bits: bits per coordinate; default ``64 // dims``, capped by the code width.

    Returns:
        coordinates, shape ``(..., dims)``, of the codes' dtype.
    """
    a = to_numpy(codes, "codes")
    if a.dtype.type not in (np.uint32, np.uint64):
        raise TypeError(f"codes: expected uint32 or uint64, got {a.dtype}")
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)):
        raise TypeError(f"dims: expected an int, got {type(dims).__name__}")
    check_dims("dims", int(dims))
    width = 32 if a.dtype == np.uint32 else 64
    bits = width // dims if bits is None else check_bits(bits, dims, width)
    out = _core.morton_decode(contiguous(a.reshape(-1)), int(dims), bits)
    return like(out.reshape(a.shape + (int(dims),)), codes)


def zorder(x: Any, bits: Optional[int] = None, shift: int = 0, *, scale: float = 1.0) -> Any:
    """Quantize float points to a fixed grid and Morton-encode them, in one pass.

    The grid map is fixed and data-independent (the same point always gets the same code):
    ``u = 0.5 + 0.5 * y / (1 + |y|)`` with ``y = x / scale``, then ``floor(u * 2**(bits-1))``;
    the data uses the lower half of each axis so that shifted curves fit (see ``shift``).

    Args:
        x: float32/float64 (float16/bfloat16 are upcast), shape ``(..., d)``, d in 1..8, finite.
        bits: grid bits per coordinate; default ``32 // d`` (uint32 codes) for d <= 4,
            else ``64 // d``.
        shift: curve index 0..d: shifts the grid by ``shift / m`` of its range, m = d + 1 when
            that is odd, else d + 2
            (Chan's shifted Z-curves; ``n_curves`` in :func:`zeta.knn` uses 0..n_curves-1).
        scale: the squash's scale (points with ``|x| >> scale`` crowd the grid's edges).

    Returns:
        codes, shape ``(...)``: uint32 when ``d * bits <= 32``, else uint64.
    """
    a = to_numpy(x, "x")
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"x: expected a float array (float32/float64), got {a.dtype}")
    if a.ndim < 1:
        raise ValueError("x: must have at least one axis (..., d)")
    d = a.shape[-1]
    check_dims("x", d)
    bits = default_zorder_bits(d) if bits is None else check_bits(bits, d)
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or not 0 <= shift <= d:
        raise ValueError(f"shift: must be an int curve index in 0..{d}, got {shift!r}")
    scale = float(scale)
    lead = a.shape[:-1]
    out = _core.zorder(contiguous(a.reshape(-1, d)), bits, int(shift), scale, d * bits > 32)
    return like(out.reshape(lead), x)


def _codes_2d(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype.type in (np.uint8, np.uint16):
        a = a.astype(np.uint32)
    if a.dtype.type not in (np.uint32, np.uint64):
        raise TypeError(f"{name}: expected unsigned integer codes (uint32/uint64), got {a.dtype}")
    if a.ndim < 1:
        raise ValueError(f"{name}: must have at least one axis")
    rows = int(np.prod(a.shape[:-1], dtype=np.int64))  # not -1: ambiguous when n == 0
    return contiguous(a.reshape(rows, a.shape[-1]))


def argsort(codes: Any) -> Any:
    """Stable argsort along the last axis (radix sort; rows in parallel).

    Args:
        codes: unsigned integer codes, shape ``(..., n)``.

    Returns:
        int64 indices, shape ``(..., n)``: ``take_along_axis(codes, idx, -1)`` is sorted and
        equal codes keep their order (as ``numpy.argsort(kind="stable")``).
    """
    a = to_numpy(codes, "codes")
    flat = _codes_2d(a, "codes")
    out = _core.argsort(flat)
    return like(out.reshape(a.shape), codes)


def searchsorted(sorted_codes: Any, queries: Any, side: str = "left") -> Any:
    """Insertion points of ``queries`` in ``sorted_codes`` along the last axis.

    Args:
        sorted_codes: unsigned codes, shape ``(..., n)``, each row sorted ascending (not
            checked, as in numpy).
        queries: codes, shape ``(..., m)`` with the same leading shape (or 1-D with a 1-D
            ``sorted_codes``).
        side: ``"left"`` (first index with ``code >= q``) or ``"right"`` (``code > q``).

    Returns:
        int64, shape ``(..., m)``, as ``numpy.searchsorted`` row by row.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side: must be 'left' or 'right', got {side!r}")
    s = to_numpy(sorted_codes, "sorted_codes")
    q = to_numpy(queries, "queries")
    if s.ndim < 1 or q.ndim < 1:
        raise ValueError("sorted_codes, queries: must have at least one axis")
    if s.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"queries: leading shape {q.shape[:-1]} does not match sorted_codes' {s.shape[:-1]}"
        )
    if q.dtype != s.dtype:
        if q.dtype.kind == "u" and np.can_cast(q.dtype, s.dtype):
            q = q.astype(s.dtype)
        elif s.dtype.kind == "u" and q.dtype.kind == "u":
            s = s.astype(np.uint64)
            q = q.astype(np.uint64)
        else:
            raise TypeError(f"queries: dtype {q.dtype} does not match sorted_codes' {s.dtype}")
    s2 = _codes_2d(s, "sorted_codes")
    q2 = _codes_2d(q, "queries")
    if s2.shape[0] != q2.shape[0]:
        s2 = s2.reshape(q2.shape[0], -1)
    out = _core.searchsorted(s2, q2, side == "right")
    return like(out.reshape(q.shape), queries)
