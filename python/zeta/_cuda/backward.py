"""Backward of the attention on the device (kernel ``kernels/backward.cu``).

The forward's selected positions are constants: one warp per query recomputes its scores,
writes dq and its share of dgamma^2, and scatters dk/dv with float atomics.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from .runtime import VALUE_TYPE, Runtime, blocks

WARPS = 4


def backward(
    rt: Runtime,
    q: Any,
    k: Any,
    v: Any,
    vdtype: str,
    gamma: Any,
    idx: Any,
    dout: Any,
    kbar: Any,
    vbar: Any,
    shape: Tuple[int, ...],
    dv: int,
    topk: int,
    mean_token: bool,
) -> Tuple[Any, ...]:
    """Gradients for :func:`zeta._cuda.search.forward`.

    gamma: (H,) float64. Returns dq (B,H,N,dk), dk (B,Hkv,S,dk), dv (B,Hkv,S,dv) float32, dg2 (B,H,N) float32
    (dL/d(gamma^2) per query) and, with mean_token, dkbar (B,H,N,dk) / dvbar (B,H,N,dv)
    float32 (gradients of the per-query mean key/value; else 1-element dummies).
    """
    b, h, hkv, n, s, dk = shape
    dq = rt.zeros((b, h, n, dk), np.float32)
    dkk = rt.zeros((b, hkv, s, dk), np.float32)
    dvv = rt.zeros((b, hkv, s, dv), np.float32)
    dg2 = rt.zeros((b, h, n), np.float32)
    dkbar = rt.zeros((b, h, n, dk) if mean_token else (1,), np.float32)
    dvbar = rt.zeros((b, h, n, dv) if mean_token else (1,), np.float32)
    rows = b * h * n
    if rows == 0 or topk == 0:
        return dq, dkk, dvv, dg2, dkbar, dvbar
    rt.launch(
        "backward.cu",
        f"zeta::backward_kernel<{VALUE_TYPE[vdtype]}>",
        blocks(rows, WARPS),
        32 * WARPS,
        (
            q,
            k,
            v,
            gamma,
            idx,
            dout,
            kbar,
            vbar,
            np.int32(bool(mean_token)),
            np.int64(n),
            np.int64(s),
            np.int32(b),
            np.int32(h),
            np.int32(hkv),
            np.int32(dk),
            np.int32(dv),
            np.int32(topk),
            dq,
            dkk,
            dvv,
            dg2,
            dkbar,
            dvbar,
        ),
        shared_mem=WARPS * 3 * topk * 4,
    )
    return dq, dkk, dvv, dg2, dkbar, dvbar
