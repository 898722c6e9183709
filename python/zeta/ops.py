"""The functional API: ``knn``, ``attention``, ``recall``.

numpy in -> numpy out; torch in -> torch out on the same device. Shapes follow
``torch.nn.functional.scaled_dot_product_attention``: q (B, H, N, d_k), k (B, H_kv, S, d_k),
v (B, H_kv, S, d_v); H % H_kv == 0 (GQA); with S > N the queries are the last N positions.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from . import _core
from ._arrays import is_torch, refuse_meta
from ._validate import check_qkv_shapes, gamma_array, index_params
from .backends import CallInfo, select
from .backends.cupy_backend import is_cupy

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _kind(arrays, names) -> Tuple[str, str, str]:
    """(kind, device, dtype) shared by all inputs, or a TypeError naming the odd one."""
    kinds = [
        "torch"
        if is_torch(a)
        else "numpy"
        if isinstance(a, np.ndarray)
        else "cupy"
        if is_cupy(a)
        else None
        for a in arrays
    ]
    for a, kd, nm in zip(arrays, kinds, names):
        if kd is None:
            raise TypeError(f"{nm}: expected a numpy array or torch tensor, got {type(a).__name__}")
    if len(set(kinds)) > 1:
        raise TypeError(f"{', '.join(names)}: mix numpy arrays and torch tensors; pass one kind")
    kind = kinds[0]
    if kind in ("torch", "cupy"):
        devs = [str(a.device) for a in arrays]
        if len(set(devs)) > 1:
            raise ValueError(
                f"{names[devs.index(devs[-1])]}: on {devs[-1]}, but {names[0]} is on {devs[0]}; put them on one device"
            )
        dtypes = [str(a.dtype).replace("torch.", "") for a in arrays]
        device = arrays[0].device.type if kind == "torch" else "cuda"
        if kind == "torch":
            refuse_meta(arrays[0], names[0])
    else:
        dtypes = [str(a.dtype) for a in arrays]
        device = "cpu"
    for d, nm in zip(dtypes, names):
        if d not in _FLOATS:
            raise TypeError(
                f"{nm}: expected a float dtype (float16/bfloat16/float32/float64), got {d}"
            )
    if len(set(dtypes)) > 1:
        odd = next(nm for d, nm in zip(dtypes, names) if d != dtypes[0])
        raise TypeError(
            f"{odd}: dtype {dtypes[names.index(odd)]} differs from {names[0]}'s {dtypes[0]}; use one dtype"
        )
    return kind, device, dtypes[0]


def _np_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    return np.ascontiguousarray(a)


def _no_neighbours(q: Any, shape: Tuple[int, ...]):
    """knn's answer when there is nothing to search: every slot missing (-1 / +inf)."""
    total = math.prod(shape)
    if total * 8 > 2**62:  # numpy/torch would fail with a message that names no argument
        raise MemoryError(
            f"topk: {shape[-1]} slots for each of {math.prod(shape[:-1])} queries: "
            f"{total:,} results do not fit in memory"
        )
    if is_torch(q):
        import torch

        idx = torch.full(shape, -1, dtype=torch.int64, device=q.device)
        return idx, torch.full(shape, float("inf"), dtype=q.dtype, device=q.device)
    if is_cupy(q):
        import cupy

        with cupy.cuda.Device(q.device.id):
            return cupy.full(shape, -1, np.int64), cupy.full(shape, np.inf, q.dtype)
    return np.full(shape, -1, np.int64), np.full(shape, np.inf, q.dtype)


def _empty_attention(q: Any, k: Any, v: Any, gamma: Any, shape: Tuple[int, ...]):
    """An empty (B, H, N, d_v) output, as SDPA gives; for torch, part of the autograd graph
    (zero gradients) when an input requires grad, so ``out.sum().backward()`` still runs."""
    if not is_torch(q):
        return np.zeros(shape, q.dtype)
    out = q.new_zeros(shape)
    for t in (q, k, v, gamma):
        if is_torch(t) and t.requires_grad:
            out = out + 0 * t.sum().to(out.dtype)
    return out


def knn(
    q: Any,
    k: Any,
    topk: int,
    *,
    causal: bool = True,
    chunk: int = 64,
    window: Optional[int] = None,
    n_curves: Optional[int] = None,
    n_sink: int = 0,
    bits: Optional[int] = None,
    scale: float = 1.0,
    exact: bool = True,
    backend: str = "auto",
):
    """Top-k nearest keys of every query through the causal Z-order index: by default
    exactly the brute-force top-k; ``exact=False`` for the approximate window search.

    Args:
        q: queries, (B, H, N, d_k), d_k in 1..8; finite (squared distances that overflow
            to inf rank by position, as brute force in float32 does).
        k: keys, (B, H_kv, S, d_k); H % H_kv == 0. Causal: query i sits at position S - N + i
            and sees keys at positions <= its own.
        topk: neighbours per query (>= 1); more than there are keys: the extra slots are
            missing (-1 / +inf).
        causal: restrict to past keys (exact at token level).
        chunk: tokens per chunk of the dyadic-run index.
        window: candidates taken on each side of the query's code in every run (default
            ``2 * topk``, the exact search's first k-th distance; ``4 * topk`` with
            ``exact=False``, where a window >= S makes the result exact).
        n_curves: shifted Z-curves searched (1..d_k+1; default 1; 2 with ``exact=False``,
            where more curves give more recall: its defaults find ~94% of the exact top-32
            of Gaussian 3-D keys at N = 64k, 92% at 256k; benches/bench_recall.py).
        n_sink: first positions always taken as candidates.
        bits: grid bits per coordinate (default ``32 // d_k``).
        scale: the fixed squash's scale (see :func:`zeta.zorder`).
        exact: exact search (the default): a window gives a first k-th distance, then
            every block of the index whose bounding box meets that ball is scanned, so the
            result equals the brute-force top-k (:func:`exact_knn`), ties by position
            included, on any input. ``window``, ``n_curves``, ``n_sink``, ``chunk``,
            ``bits`` and ``scale`` then change only the speed, never the answer (the CUDA
            kernels search exactly too; the torch backend by brute force in blocks).
            False: the window search, the top-k among the windows' candidates (faster for
            small windows, approximate).
        backend: "auto" (Rust on the CPU, the CUDA kernels on a GPU, the torch reference
            otherwise), "rust", "cupy" or "torch".

    Returns:
        (indices int64 (B, H, N, topk), sq_dists (B, H, N, topk)) sorted by (distance,
        position); missing slots (fewer causal keys than topk) are -1 / +inf. Empty
        inputs (B, H or N = 0) give empty outputs; no keys (S = 0) gives only missing slots.
    """
    kind, device, dtype = _kind([q, k], ["q", "k"])
    topk = _topk(topk, slots=True)
    b, h, _, n, s, _, _ = check_qkv_shapes(tuple(q.shape), tuple(k.shape), causal=causal)
    p = index_params(
        q.shape[-1],
        topk,
        causal=causal,
        chunk=chunk,
        window=window,
        n_curves=n_curves,
        n_sink=n_sink,
        bits=bits,
        scale=scale,
        exact=exact,
    )
    info = CallInfo(kind, device, dtype, q.shape[-1], topk=topk, op="knn", exact=p.exact)
    be = select(info, backend)
    if b * h * n == 0 or s == 0:  # empty in, empty out; no keys: every slot missing
        return _no_neighbours(q, (b, h, n, topk))
    return be.knn(q, k, topk, p)


def _topk(topk: Any, *, slots: bool = False) -> int:
    """topk checked: an int >= 1. ``slots``: it sizes an output (knn's (B, H, N, topk)),
    so a value no buffer could hold is refused here rather than deep in an allocator."""
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise TypeError(f"topk: expected an int, got {type(topk).__name__}")
    if topk < 1:
        raise ValueError(f"topk: must be >= 1, got {topk}")
    if slots and topk * 8 > 2**62:  # int64 slots: numpy refuses any axis this long
        raise ValueError(f"topk: {topk} result slots per query is more than any memory holds")
    return int(topk)


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    topk: int = 32,
    gamma: Any = 1.0,
    causal: bool = True,
    chunk: int = 64,
    window: Optional[int] = None,
    n_curves: Optional[int] = None,
    n_sink: int = 0,
    mean_token: bool = False,
    bits: Optional[int] = None,
    scale: float = 1.0,
    exact: bool = True,
    backend: str = "auto",
):
    """ZETA top-k attention with Adaptive Cauchy-Softmax scores.

    Each query attends to its ``topk`` nearest keys (found by :func:`knn`'s index):
    ``s_j = 1 / (||q - k_j||^2 + gamma^2)``, ``a_j = s_j / sum(s)``, ``o = sum a_j v_j``.

    Args:
        q: (B, H, N, d_k) queries; d_k in 1..8 (typically 3). Coordinates of q and k must
            be finite and within ``zeta._validate.coord_limit`` (float32: 2.66e18 at d_k = 3;
            float64: ~1e153), so that no squared distance overflows (ValueError otherwise).
        k: (B, H_kv, S, d_k) keys; H % H_kv == 0 (GQA).
        v: (B, H_kv, S, d_v) values.
        topk: keys attended per query (>= 1; fewer keys than topk: all of them).
        gamma: float, or a per-head (H,) tensor/array, in [2^-24, 2^62] (outside it the
            float32 scores or their gradients overflow). Differentiable when a tensor that
            requires grad.
        mean_token: add one attended item per query made of the running means of k and v
            over positions <= i (so every past token gets gradient).
        causal, chunk, window, n_curves, n_sink, bits, scale: as in :func:`knn`.
        exact: attend to the exact top-k (the default; brute-force equal, as :func:`knn`'s
            ``exact``); False: to the window search's top-k. The backward is the same (the
            selected indices are constants).
        backend: "auto" (Rust on the CPU, the CUDA kernels on a GPU, the torch reference
            otherwise), "rust", "cupy" or "torch".

    Returns:
        (B, H, N, d_v), the inputs' kind, dtype and device. float16/bfloat16: queries and
        keys are widened to float32, values are read in their dtype, sums are in float32.
        Differentiable in q, k, v and gamma (torch tensors). B, H, N or d_v = 0 gives an
        empty output (as SDPA); S = 0 with N > 0 is an error (nothing to attend to).
    """
    kind, device, dtype = _kind([q, k, v], ["q", "k", "v"])
    topk = _topk(topk)
    b, h, hkv, n, s, dk, dv = check_qkv_shapes(
        tuple(q.shape), tuple(k.shape), tuple(v.shape), causal=causal
    )
    # Fewer keys than topk is ordinary input (a short prompt): attend to those there are, as
    # ZetaAttention and KVCache.attend do.
    topk = min(topk, max(s, 1))
    p = index_params(
        dk,
        topk,
        causal=causal,
        chunk=chunk,
        window=window,
        n_curves=n_curves,
        n_sink=n_sink,
        bits=bits,
        scale=scale,
        exact=exact,
    )
    if not isinstance(mean_token, (bool, np.bool_)):
        raise TypeError(f"mean_token: expected a bool, got {type(mean_token).__name__}")
    if kind == "torch":
        gamma = _gamma_tensor(gamma, h, q)
    else:
        gamma = gamma_array(_host(gamma), h)
    grad = kind == "torch" and any(t.requires_grad for t in (q, k, v, gamma))
    info = CallInfo(
        kind, device, dtype, dk, requires_grad=grad, topk=topk, op="attention", exact=p.exact
    )
    be = select(info, backend)
    if b * h * n * dv == 0:
        return _empty_attention(q, k, v, gamma, (b, h, n, dv))
    return be.attention(q, k, v, gamma, topk, bool(mean_token), p)


def _gamma_tensor(gamma: Any, h: int, q: Any):
    """gamma as a torch (H,) tensor on q's device (a tensor keeps its graph)."""
    import torch

    if is_torch(gamma):
        if gamma.device != q.device:
            raise ValueError(f"gamma: on {gamma.device}, but q is on {q.device}")
        if gamma.numel() == 1:
            return gamma.reshape(1).expand(h)
        if tuple(gamma.shape) == (h,):
            return gamma
        raise ValueError(
            f"gamma: expected a float or shape ({h},) (one per query head), got shape {tuple(gamma.shape)}"
        )
    g = gamma_array(gamma, h)
    if q.device.type == "cpu" or torch.compiler.is_compiling():
        return torch.as_tensor(g, dtype=torch.float64, device=q.device)
    # on an accelerator: uploaded once per (values, device), since a copy from pageable host
    # memory waits for the device's queued work (a host-side stall of every call)
    key = (tuple(g.tolist()), str(q.device))
    t = _GAMMA_TENSORS.get(key)
    if t is None:
        if len(_GAMMA_TENSORS) > 256:
            _GAMMA_TENSORS.clear()
        t = _GAMMA_TENSORS[key] = torch.as_tensor(g, dtype=torch.float64, device=q.device)
    return t


_GAMMA_TENSORS: dict = {}


def _host(x: Any) -> Any:
    """A cupy array as numpy (gamma); anything else unchanged."""
    return x.get() if is_cupy(x) else x


def exact_knn(q: Any, k: Any, topk: int, *, causal: bool = True):
    """Brute-force exact top-k (no index; O(N*S)): the oracle for :func:`recall`.

    Same shapes, tie rule and padding as :func:`knn`. Runs in Rust on the CPU.
    """
    kind, _device, _dtype = _kind([q, k], ["q", "k"])
    topk = _topk(topk, slots=True)
    b, h, _, n, s, _, _ = check_qkv_shapes(tuple(q.shape), tuple(k.shape), causal=causal)
    if b * h * n == 0 or s == 0:
        return _no_neighbours(q, (b, h, n, topk))
    if kind == "torch":
        import torch

        want = torch.float64 if q.dtype == torch.float64 else torch.float32
        qn = q.detach().cpu().to(want).numpy()
        kn = k.detach().cpu().to(want).numpy()
    else:
        qn, kn = _np_float(q), _np_float(k)
    idx, d2 = _core.exact_knn(
        np.ascontiguousarray(qn), np.ascontiguousarray(kn), topk, bool(causal)
    )
    if kind == "torch":
        import torch

        return torch.from_numpy(idx).to(q.device), torch.from_numpy(d2).to(q.device)
    return idx, d2


def recall(q: Any, k: Any, indices: Any, *, causal: bool = True) -> float:
    """Fraction of the exact top-k neighbours found in ``indices`` (brute force oracle).

    Args:
        q: (B, H, N, d_k); k: (B, H_kv, S, d_k).
        indices: (B, H, N, topk) int64 from :func:`knn` (-1 = empty slot).
        causal: whether the neighbours were restricted to positions <= the query's.

    Returns:
        float in [0, 1]: over all queries, (retrieved keys within the exact k-th nearest
        distance) / (number of exact neighbours; fewer than topk when fewer keys exist).
        Ties at the k-th distance count as found.
    """
    kind, _, _ = _kind([q, k], ["q", "k"])
    ind = indices.detach().cpu().numpy() if is_torch(indices) else np.asarray(indices)
    if ind.ndim != 4 or ind.shape[:3] != tuple(q.shape[:3]):
        raise ValueError(
            f"indices: expected shape (B, H, N, topk) = {tuple(q.shape[:3])} + (topk,), got {ind.shape}"
        )
    if ind.dtype.kind not in "iu":
        raise TypeError(f"indices: expected integers, got {ind.dtype}")
    topk = ind.shape[-1]
    if kind == "torch":
        qn = q.detach().cpu().double().numpy()
        kn = k.detach().cpu().double().numpy()
    else:
        qn, kn = q.astype(np.float64), k.astype(np.float64)
    _, d2 = exact_knn(qn, kn, topk, causal=causal)
    b, h, n, dk = qn.shape
    s = kn.shape[2]
    if np.any(ind >= s):
        raise ValueError(f"indices: values must be < S={s}")
    g = h // kn.shape[1]
    kk = np.repeat(kn, g, axis=1)  # (B, H, S, dk)
    valid = ind >= 0
    safe = np.where(valid, ind, 0)
    got = kk[np.arange(b)[:, None, None, None], np.arange(h)[None, :, None, None], safe]
    gd2 = ((got - qn[:, :, :, None, :]) ** 2).sum(-1)  # (B, H, N, topk)
    if causal:
        pos = np.arange(n) + (s - n)
        valid &= ind <= pos[None, None, :, None]
    kth = np.max(np.where(np.isfinite(d2), d2, -np.inf), axis=-1, keepdims=True)
    hits = (valid & (gd2 <= kth * (1 + 1e-12))).sum(-1)
    denom = np.isfinite(d2).sum(-1)
    return float(np.minimum(hits, denom).sum() / max(denom.sum(), 1))
