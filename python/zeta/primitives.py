"""Z-order primitives: Morton encode/decode, fused quantize+encode, argsort, searchsorted.

Every function takes numpy arrays, torch tensors or cupy arrays and returns the same kind.
Leading axes are independent rows. The arguments are checked here, then the backend that
takes the input runs it (``zeta.backends``): Rust on the CPU (in parallel, GIL released), the
CUDA kernels for CUDA tensors and cupy arrays, the torch reference for other torch devices.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ._arrays import is_torch, refuse_meta, to_numpy
from ._validate import check_bits, check_dims, default_zorder_bits
from .backends import CallInfo, select
from .backends.cupy_backend import is_cupy

_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _input(x: Any, name: str) -> Tuple[Any, str, str, str, Tuple[int, ...]]:
    """(array, kind, device, dtype name, shape); array-likes become numpy arrays."""
    if is_cupy(x):
        return x, "cupy", "cuda", str(x.dtype), tuple(x.shape)
    if is_torch(x):
        refuse_meta(x, name)
        return x, "torch", x.device.type, str(x.dtype).replace("torch.", ""), tuple(x.shape)
    a = to_numpy(x, name)
    return a, "numpy", "cpu", str(a.dtype), a.shape


def _backend(op: str, kind: str, device: str, dtype: str, d: int = 1):
    return select(CallInfo(kind, device, dtype, d, op=op))


def _unsigned(dtype: str, allowed=("uint8", "uint16", "uint32", "uint64")) -> bool:
    return dtype in allowed


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
    a, kind, device, dtype, shape = _input(coords, "coords")
    if not _unsigned(dtype):
        raise TypeError(
            f"coords: expected an unsigned integer dtype (uint8/16/32/64), got {dtype}; "
            "cast non-negative values with .astype(np.uint32) first"
        )
    if len(shape) < 1:
        raise ValueError("coords: must have at least one axis (..., d)")
    d = shape[-1]
    check_dims("coords", d)
    bits = 64 // d if bits is None else check_bits(bits, d)
    return _backend("morton_encode", kind, device, dtype, d).morton_encode(a, bits)


def morton_decode(codes: Any, dims: int, bits: Optional[int] = None) -> Any:
    """Inverse of :func:`morton_encode`.

    Args:
        codes: uint32 or uint64, shape ``(...)``.
        dims: number of coordinates ``d`` (1..8).
        bits: bits per coordinate; default ``64 // dims``, capped by the code width.

    Returns:
        coordinates, shape ``(..., dims)``, of the codes' dtype.
    """
    a, kind, device, dtype, shape = _input(codes, "codes")
    if dtype not in ("uint32", "uint64"):
        raise TypeError(f"codes: expected uint32 or uint64, got {dtype}")
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)):
        raise TypeError(f"dims: expected an int, got {type(dims).__name__}")
    dims = int(dims)
    check_dims("dims", dims)
    width = 32 if dtype == "uint32" else 64
    bits = width // dims if bits is None else check_bits(bits, dims, width)
    return _backend("morton_decode", kind, device, dtype, dims).morton_decode(a, dims, bits)


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
    a, kind, device, dtype, shape = _input(x, "x")
    if dtype not in _FLOATS:
        raise TypeError(f"x: expected a float array (float32/float64), got {dtype}")
    if len(shape) < 1:
        raise ValueError("x: must have at least one axis (..., d)")
    d = shape[-1]
    check_dims("x", d)
    bits = default_zorder_bits(d) if bits is None else check_bits(bits, d)
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or not 0 <= shift <= d:
        raise ValueError(f"shift: must be an int curve index in 0..{d}, got {shift!r}")
    scale = float(scale)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be finite and > 0, got {scale}")
    return _backend("zorder", kind, device, dtype, d).zorder(a, d, bits, int(shift), scale)


def argsort(codes: Any) -> Any:
    """Stable argsort along the last axis (radix sort; rows in parallel).

    Args:
        codes: unsigned integer codes, shape ``(..., n)``.

    Returns:
        int64 indices, shape ``(..., n)``: ``take_along_axis(codes, idx, -1)`` is sorted and
        equal codes keep their order (as ``numpy.argsort(kind="stable")``).
    """
    a, kind, device, dtype, shape = _input(codes, "codes")
    if not _unsigned(dtype):
        raise TypeError(f"codes: expected unsigned integer codes (uint32/uint64), got {dtype}")
    if len(shape) < 1:
        raise ValueError("codes: must have at least one axis")
    return _backend("argsort", kind, device, dtype).argsort(a)


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
    s, kind, device, sdt, sshape = _input(sorted_codes, "sorted_codes")
    q, qkind, qdevice, qdt, qshape = _input(queries, "queries")
    if (qkind, qdevice) != (kind, device):
        raise TypeError(
            f"queries: a {qkind} input on {qdevice}, but sorted_codes is a {kind} input on {device}"
        )
    if len(sshape) < 1 or len(qshape) < 1:
        raise ValueError("sorted_codes, queries: must have at least one axis")
    if sshape[:-1] != qshape[:-1]:
        raise ValueError(
            f"queries: leading shape {qshape[:-1]} does not match sorted_codes' {sshape[:-1]}"
        )
    if not (_unsigned(sdt) and _unsigned(qdt)):
        bad = ("sorted_codes", sdt) if not _unsigned(sdt) else ("queries", qdt)
        raise TypeError(f"{bad[0]}: expected unsigned integer codes, got {bad[1]}")
    if kind != "numpy" and not (kind == "torch" and device == "cpu") and sdt != qdt:
        raise TypeError(
            f"queries: dtype {qdt} does not match sorted_codes' {sdt} (on a GPU, cast first)"
        )
    be = _backend("searchsorted", kind, device, sdt)
    return be.searchsorted(s, q, side == "right")
