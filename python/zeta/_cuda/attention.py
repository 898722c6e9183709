"""Attention forward/backward on the device, around the kernels: gamma, the mean token.

Arrays are the runtime's (cupy on a GPU): q, k float32; v float32 or float16/bfloat16 stored
as 16-bit raw arrays (``vdtype`` names which); gamma (H,) float64.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from . import backward as _backward
from . import search
from .runtime import Runtime


def values_f32(rt: Runtime, v: Any, vdtype: str) -> Any:
    """v as float32 (16-bit storage decoded)."""
    if vdtype == "float32":
        return v
    if vdtype == "bfloat16":
        return (v.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return v.view(np.float16).astype(np.float32)


def mean_kv(rt: Runtime, k: Any, vf: Any, n: int, causal: bool) -> Tuple[Any, Any]:
    """Means of the keys/values visible to each query: (B, Hkv, N, dk|dv) float32.

    Prefix sums in float64, as the Rust core; causal query i sees positions 0..S-N+i.
    """
    xp = rt.xp
    s = k.shape[2]
    out = []
    for x in (k, vf):
        x64 = x.astype(np.float64)
        if causal:
            cnt = xp.arange(s - n + 1, s + 1, dtype=np.float64)[:, None]
            m = xp.cumsum(x64, axis=2)[:, :, s - n :] / cnt
        else:
            m = xp.broadcast_to(x64.mean(axis=2, keepdims=True), x64.shape[:2] + (n, x64.shape[3]))
        out.append(xp.ascontiguousarray(m.astype(np.float32)))
    return out[0], out[1]


def _mean_grad(rt: Runtime, dbar: Any, hkv: int, s: int, causal: bool) -> Any:
    """Gradient of the per-query means w.r.t. the keys (or values): (B,H,N,d) -> (B,Hkv,S,d)."""
    xp = rt.xp
    b, h, n, d = dbar.shape
    w = dbar.astype(np.float64).reshape(b, hkv, h // hkv, n, d).sum(axis=2)  # (B, Hkv, N, d)
    if not causal:
        return xp.broadcast_to(w.sum(axis=2, keepdims=True) / s, (b, hkv, s, d))
    w = w / xp.arange(s - n + 1, s + 1, dtype=np.float64)[:, None]
    suffix = xp.cumsum(w[:, :, ::-1], axis=2)[:, :, ::-1]  # R_i = sum_{i' >= i} w_i'
    first = xp.arange(s) - (s - n)
    return suffix[:, :, xp.maximum(first, 0)]


def forward(
    rt: Runtime, q, k, v, vdtype: str, gamma, shape, dv: int, p, topk: int, mean_token: bool
):
    """-> out (B,H,N,dv) in v's storage, idx (B,H,N,topk) int32."""
    if mean_token:
        kbar, vbar = mean_kv(rt, k, values_f32(rt, v, vdtype), shape[3], p.causal)
    else:
        kbar = vbar = rt.zeros((1,), np.float32)
    return search.forward(rt, q, k, v, vdtype, gamma, kbar, vbar, shape, dv, p, topk, mean_token)


def backward(
    rt: Runtime, q, k, v, vdtype: str, gamma, idx, dout, shape, dv: int, p, mean_token: bool
):
    """-> dq (B,H,N,dk), dk (B,Hkv,S,dk), dv (B,Hkv,S,dv) float32, dgamma (H,) float64."""
    b, h, hkv, n, s, dk = shape
    topk = idx.shape[-1]
    if mean_token:
        kbar, vbar = mean_kv(rt, k, values_f32(rt, v, vdtype), n, p.causal)
    else:
        kbar = vbar = rt.zeros((1,), np.float32)
    dq, dkk, dvv, dg2, dkbar, dvbar = _backward.backward(
        rt, q, k, v, vdtype, gamma, idx, dout, kbar, vbar, shape, dv, topk, mean_token
    )
    if mean_token:
        dkk = (dkk + _mean_grad(rt, dkbar, hkv, s, p.causal)).astype(np.float32)
        dvv = (dvv + _mean_grad(rt, dvbar, hkv, s, p.causal)).astype(np.float32)
    dgamma = 2.0 * gamma * dg2.astype(np.float64).sum(axis=(0, 2))
    return dq, dkk, dvv, dgamma
