"""Z-order primitives: Morton encode/decode, fused quantize+encode, argsort, searchsorted.

Every function takes numpy arrays, torch tensors or cupy arrays and returns the same kind.
Leading axes are independent rows. On the CPU the work runs in Rust, in parallel, with the GIL
released; on a GPU in the cupy backend's kernels (a CUDA tensor without cupy: on the CPU, and
the result moved back).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._arrays import contiguous, is_torch, like, to_numpy
from ._validate import check_bits, check_dims, default_zorder_bits
from .backends.cupy_backend import is_cupy

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
    if _on_gpu(coords):
        dt, shape = _dtype_of(coords), tuple(coords.shape)
        if dt is None or dt.type not in _UINTS:
            raise TypeError(
                f"coords: expected an unsigned integer dtype (uint8/16/32/64), got {coords.dtype}"
            )
        if len(shape) < 1:
            raise ValueError("coords: must have at least one axis (..., d)")
        check_dims("coords", shape[-1])
        bits = 64 // shape[-1] if bits is None else check_bits(bits, shape[-1])
        return _gpu_call("morton_encode", lambda c: morton_encode(c, bits), (coords,), bits)
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
    if _on_gpu(codes):
        dt = _dtype_of(codes)
        if dt is None or dt.type not in (np.uint32, np.uint64):
            raise TypeError(f"codes: expected uint32 or uint64, got {codes.dtype}")
        if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)):
            raise TypeError(f"dims: expected an int, got {type(dims).__name__}")
        check_dims("dims", int(dims))
        width = 32 if dt == np.uint32 else 64
        bits = width // dims if bits is None else check_bits(bits, dims, width)
        return _gpu_call(
            "morton_decode", lambda c: morton_decode(c, dims, bits), (codes,), int(dims), bits
        )
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
    if _on_gpu(x):
        name = str(x.dtype).replace("torch.", "")
        if name not in ("float16", "bfloat16", "float32", "float64"):
            raise TypeError(f"x: expected a float array (float32/float64), got {x.dtype}")
        if len(x.shape) < 1:
            raise ValueError("x: must have at least one axis (..., d)")
        d = x.shape[-1]
        check_dims("x", d)
        bits = default_zorder_bits(d) if bits is None else check_bits(bits, d)
        if (
            isinstance(shift, bool)
            or not isinstance(shift, (int, np.integer))
            or not 0 <= shift <= d
        ):
            raise ValueError(f"shift: must be an int curve index in 0..{d}, got {shift!r}")
        _check_finite_device(x, "x")
        return _gpu_call(
            "zorder",
            lambda c: zorder(c, bits, shift, scale=scale),
            (x,),
            d,
            bits,
            int(shift),
            float(scale),
        )
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


def _dtype_of(x: Any) -> Optional[np.dtype]:
    """numpy dtype of a numpy/cupy array or torch tensor (None for torch-only dtypes)."""
    try:
        return np.dtype(str(x.dtype).replace("torch.", ""))
    except TypeError:
        return None


def _check_finite_device(x: Any, name: str) -> None:
    ok = bool(x.isfinite().all()) if is_torch(x) else bool(__import__("cupy").isfinite(x).all())
    if not ok:
        raise ValueError(f"{name}: contains NaN or inf")


def _on_gpu(x: Any) -> bool:
    return is_cupy(x) or (is_torch(x) and x.device.type != "cpu")


def _gpu_call(fn_name: str, cpu_fn, arrays: tuple, *args):
    """A primitive on device arrays: the CUDA kernels when the cupy backend is available, else
    (torch tensors only) the CPU path on a host copy, moved back to the input's device. The
    caller has checked the arguments as the CPU path does."""
    from .backends import BACKENDS

    why = BACKENDS["cupy"].unavailable_reason()
    if why is None:
        from .backends import cupy_backend

        return getattr(cupy_backend, fn_name)(*arrays, *args)
    if any(is_cupy(a) for a in arrays):
        raise TypeError(f"cupy arrays need the cupy backend, which is unavailable: {why}")
    dev = arrays[0].device
    out = cpu_fn(*(a.cpu() for a in arrays))
    return out.to(dev)


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
    if _on_gpu(codes):
        dt = _dtype_of(codes)
        if dt is None or dt.kind != "u":
            raise TypeError(
                f"codes: expected unsigned integer codes (uint32/uint64), got {codes.dtype}"
            )
        if len(codes.shape) < 1:
            raise ValueError("codes: must have at least one axis")
        return _gpu_call("argsort", argsort, (codes,))
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
    if _on_gpu(sorted_codes) or _on_gpu(queries):
        for a, nm in ((sorted_codes, "sorted_codes"), (queries, "queries")):
            if not _on_gpu(a):
                raise TypeError(f"{nm}: on the CPU, but the other argument is on a GPU")
            dt = _dtype_of(a)
            if dt is None or dt.type not in (np.uint32, np.uint64):
                raise TypeError(f"{nm}: expected uint32 or uint64 codes on a GPU, got {a.dtype}")
            if len(a.shape) < 1:
                raise ValueError("sorted_codes, queries: must have at least one axis")
        if _dtype_of(sorted_codes) != _dtype_of(queries):
            raise TypeError(
                f"queries: dtype {queries.dtype} does not match sorted_codes' {sorted_codes.dtype}"
            )
        if tuple(sorted_codes.shape[:-1]) != tuple(queries.shape[:-1]):
            raise ValueError(
                f"queries: leading shape {tuple(queries.shape[:-1])} does not match "
                f"sorted_codes' {tuple(sorted_codes.shape[:-1])}"
            )
        return _gpu_call(
            "searchsorted",
            lambda a, b: searchsorted(a, b, side),
            (sorted_codes, queries),
            side == "right",
        )
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
