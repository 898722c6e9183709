"""knn and the attention forward on the device (kernel ``kernels/search.cu``).

One warp per query: probe every run of the index (and the own chunk, and the sinks), keep the
``topk`` smallest ``(d2, position)`` keys, then (forward) the Cauchy-weighted sum of values.
With ``p.exact`` the windows only give a first k-th distance: every run is then scanned leaf by
leaf through the leaf boxes of :func:`index.exact_boxes`, skipping leaves beyond it, so the
result is the brute-force top-k.
"""

from __future__ import annotations

import os
from typing import Any, Tuple

import numpy as np

from . import index
from .runtime import VALUE_TYPE, Runtime, blocks, dk_template, env_int

WARPS = 4  # warps (queries) per block
MAX_TOPK = 256  # the best list of a warp: kp = pow2 >= topk, 2*kp keys, <= 16 rounds of 32
#: Walk queries in Z-order instead of position order (ZETA_CUDA_QUERY_ORDER=1). Off: on an
#: H200 it measured 3.73 vs 3.29 ms forward at N=32k, 11.5 vs 11.5 ms at 128k
#: (benches/results/gpu-variants-*.json): the index of one head fits in L2 either way.
QUERY_ORDER = os.environ.get("ZETA_CUDA_QUERY_ORDER", "0") == "1"
#: The window the exact search's first pass takes on each side of the query's code, rounded
#: out to whole leaves (ZETA_CUDA_EXACT_WINDOW; -1: the call's ``window``). The exact result
#: does not depend on it (every run of curve 0 is scanned after it, pruned by the k-th best
#: so far). On an H200 (N = 32k / 128k, bf16, benches/gpu_variants.py, 2026-11-30) 8 / 16 / 32
#: / 64 (the call's default) measured 6.34 / 6.34 / 6.37 / 6.42 and 26.3 / 27.6 / 27.2 / 26.7
#: ms forward: no difference beyond noise; 8 is what the benchmark ran with.
EXACT_WINDOW = env_int("ZETA_CUDA_EXACT_WINDOW", 8, -1)
#: d_k = 3: store each index entry's point (x, y, z, position) beside it, 16 more bytes per
#: entry and level, so the scans read one coalesced row per entry instead of the entry and
#: three scattered coordinates (ZETA_CUDA_POINTS=0: off, for measurements). On an H200 (bf16,
#: 2026-11-30): forward 7.01 -> 6.42 ms at N = 32k, 32.5 -> 26.7 ms at 128k; +36 MB at 32k.
POINTS = os.environ.get("ZETA_CUDA_POINTS", "1") != "0"


def kp_of(topk: int) -> int:
    """Slots of the per-warp best list: a power of two >= max(topk, 32)."""
    kp = 32
    while kp < topk:
        kp *= 2
    return kp


def _prepare(rt: Runtime, q: Any, k: Any, shape: Tuple[int, ...], p: Any, topk: int):
    """Codes + index + the scalar argument list shared by the knn and forward kernels."""
    b, h, hkv, n, s, dk = shape
    qcodes = index.codes(rt, q, dk, p.bits, n, p.n_curves, p.scale)
    kcodes = index.codes(rt, k, dk, p.bits, s, p.n_curves, p.scale)
    pts_keys = k if dk == 3 and POINTS else None
    levels, n_full, pts = index.build(
        rt, kcodes, b * hkv * p.n_curves, s, p.chunk, p.causal, pts_keys, p.n_curves
    )
    kp = kp_of(topk)
    order = _query_order(rt, qcodes, b * h, p.n_curves, n) if QUERY_ORDER else None
    args = (
        q,
        k,
        qcodes,
        levels,
        np.int64(n),
        np.int64(s),
        np.int64(n_full),
        np.int32(b),
        np.int32(h),
        np.int32(hkv),
        np.int32(dk),
        np.int32(p.chunk),
        np.int32(min(EXACT_WINDOW if p.exact and EXACT_WINDOW >= 0 else p.window, 1 << 30)),
        np.int32(p.n_curves),
        np.int32(min(p.n_sink, 1 << 30)),
        np.int32(bool(p.causal)),
        np.int32(index.n_levels(s, p.chunk)),
        np.int32(topk),
        np.int32(kp),
        order if order is not None else rt.zeros((1,), np.int64),
        np.int32(order is not None),
    )
    if p.exact:
        boxes, box_offs, starts = index.exact_boxes(
            rt, levels, k, b * hkv, p.n_curves, s, p.chunk, p.causal
        )
        args += (np.int32(1), boxes, box_offs, starts)
    else:
        args += (np.int32(0), rt.zeros((1,), np.float32), rt.zeros((1,), np.int64), index.NULL)
    args += (pts if pts is not None else index.NULL,)
    return args, kp


def _query_order(rt: Runtime, qcodes: Any, bh: int, n_curves: int, n: int) -> Any:
    """Queries ordered by (batch*head, curve-0 code): neighbouring warps then search the same
    parts of the runs (cache reuse)."""
    xp = rt.xp
    c0 = qcodes.reshape(bh, n_curves, n)[:, 0, :].astype(np.uint64)
    keys = (xp.arange(bh, dtype=np.uint64)[:, None] << np.uint64(32)) | c0
    return xp.ascontiguousarray(xp.argsort(keys.reshape(-1)).astype(np.int64))


def knn(rt: Runtime, q: Any, k: Any, shape: Tuple[int, ...], p: Any, topk: int) -> Tuple[Any, Any]:
    """q (B,H,N,dk) f32, k (B,Hkv,S,dk) f32 -> idx (B,H,N,topk) int64, d2 float32."""
    b, h, _hkv, n, _s, _dk = shape
    idx = rt.empty((b, h, n, topk), np.int64)
    d2 = rt.empty((b, h, n, topk), np.float32)
    rows = b * h * n
    if rows == 0:
        return idx, d2
    args, kp = _prepare(rt, q, k, shape, p, topk)
    rt.launch(
        "search.cu",
        f"zeta::knn_kernel<{dk_template(shape[5])}>",
        blocks(rows, WARPS),
        32 * WARPS,
        args + (idx, d2),
        shared_mem=WARPS * 2 * kp * 8,
    )
    return idx, d2


def forward(
    rt: Runtime,
    q: Any,
    k: Any,
    v: Any,
    vdtype: str,
    gamma: Any,
    kbar: Any,
    vbar: Any,
    shape: Tuple[int, ...],
    dv: int,
    p: Any,
    topk: int,
    mean_token: bool,
) -> Tuple[Any, Any]:
    """Cauchy top-k attention forward.

    q (B,H,N,dk) f32, k (B,Hkv,S,dk) f32, v (B,Hkv,S,dv) in ``vdtype`` (float16/bfloat16 as
    16-bit raw arrays), gamma (H,) float64, kbar/vbar (B,Hkv,N,dk|dv) f32 (mean_token; else any
    1-element array). Returns out (B,H,N,dv) in v's storage type and idx (B,H,N,topk) int32.
    """
    b, h, _hkv, n, _s, _dk = shape
    out = rt.empty((b, h, n, dv), v.dtype)
    idx = rt.empty((b, h, n, topk), np.int32)
    rows = b * h * n
    if rows == 0:
        return out, idx
    args, kp = _prepare(rt, q, k, shape, p, topk)
    name = f"zeta::forward_kernel<{VALUE_TYPE[vdtype]}, {dk_template(shape[5])}>"
    rt.launch(
        "search.cu",
        name,
        blocks(rows, WARPS),
        32 * WARPS,
        args + (v, np.int32(dv), gamma, kbar, vbar, np.int32(bool(mean_token)), out, idx),
        shared_mem=WARPS * 3 * kp * 8,
    )
    return out, idx
