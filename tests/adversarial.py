"""Point sets for exact-search tests (numpy only): ties, equal keys, grid-cell edges,
clusters, heavy tails, huge and tiny scales; and the numpy brute-force oracles the tests and
benches/stress_exact.py check against."""

from __future__ import annotations

import numpy as np


def points(kind, shape, rng):
    """Inputs that break heuristics: ties, equal keys, grid-cell edges, clusters, heavy tails,
    huge and tiny scales."""
    if kind == "gauss":
        x = rng.standard_normal(shape)
    elif kind == "duplicates":
        x = rng.integers(-1, 2, size=shape).astype(float)
    elif kind == "all_equal":
        x = np.full(shape, 0.3)
    elif kind == "cell_edges":  # multiples of 1/4: edges of the index grid's cells
        x = rng.integers(-4, 5, size=shape) / 4.0
    elif kind == "clusters":
        centre = rng.integers(0, 4, size=shape[:-1] + (1,)) * 5.0
        x = centre + 1e-4 * rng.standard_normal(shape)
    elif kind == "heavy_tail":
        x = rng.standard_cauchy(shape)
    elif kind == "huge":  # squared distances overflow float32 to inf
        x = rng.standard_normal(shape) * 1e20
    elif kind == "tiny":  # squared distances underflow to 0 (all ties)
        x = rng.standard_normal(shape) * 1e-25
    else:
        raise ValueError(kind)
    return x


KINDS = [
    "gauss",
    "duplicates",
    "all_equal",
    "cell_edges",
    "clusters",
    "heavy_tail",
    "huge",
    "tiny",
]


def brute_knn(q, k, topk, causal):
    """numpy brute force in float64 bookkeeping but the inputs' dtype for distances, summed
    left to right over dimensions; (d2, position) order; -1 / +inf padding."""
    b, h, n, dk = q.shape
    hkv, s = k.shape[1], k.shape[2]
    grp = h // hkv
    idx = np.full((b, h, n, topk), -1, dtype=np.int64)
    d2 = np.full((b, h, n, topk), np.inf, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            kk = k[bi, hi // grp]
            for i in range(n):
                last = s - n + i if causal else s - 1
                with np.errstate(over="ignore"):  # huge inputs: d2 = inf, as in float32
                    diff = q[bi, hi, i][None, :] - kk[: last + 1]
                    dist = diff[:, 0] * diff[:, 0]
                    for j in range(1, dk):
                        dist = dist + diff[:, j] * diff[:, j]
                order = np.lexsort((np.arange(last + 1), dist))[:topk]
                idx[bi, hi, i, : len(order)] = order
                d2[bi, hi, i, : len(order)] = dist[order]
    return idx, d2


def brute_attention(q, k, v, topk, gamma):
    """numpy oracle: causal top-k Cauchy attention of the last T_q positions over all S keys,
    top-k by (float32 squared distance summed left to right, position)."""
    b, h, tq, dk = q.shape
    hkv, s = k.shape[1], k.shape[2]
    grp = h // hkv
    out = np.zeros((b, h, tq, v.shape[-1]), np.float64)
    g2 = np.float32(gamma) * np.float32(gamma)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, hi // grp], v[bi, hi // grp]
            for i in range(tq):
                last = s - tq + i
                diff = q[bi, hi, i][None, :] - kk[: last + 1]
                dist = diff[:, 0] * diff[:, 0]
                for j in range(1, dk):
                    dist = dist + diff[:, j] * diff[:, j]
                sel = np.lexsort((np.arange(last + 1), dist))[:topk]
                w = 1.0 / (dist[sel].astype(np.float64) + g2)
                out[bi, hi, i] = (w[:, None] * vv[sel]).sum(0) / w.sum()
    return out
