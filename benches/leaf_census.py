"""How many keys a query's exact search must scan, for several ways to cut a sorted run into
leaves (numpy only; no GPU, no zeta kernels).

Usage: python benches/leaf_census.py [--n 32768] [--queries 400] [--topk 32]

N Gaussian 3-D keys are sorted by their Morton code (10 bits per coordinate over the keys'
range); a run of them is cut into leaves by each partition below, and for every query the
leaves whose box comes within its brute-force top-k distance are counted: the least an exact
leaf scan has to read (the search itself reads more, its radius shrinks as it goes).
Partitions: fixed blocks of L entries; "snapped" leaves of ~L (leaf j starts in [j*L - L/2,
j*L + L/2) where the largest Z-order cell begins: the CUDA kernels' exact_leaf_starts_kernel);
radix leaves of at most L (the Rust core's box trees: split at the highest differing bit).
Box rounds: leaves / 32 (a warp tests 32 boxes at a time).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List

import numpy as np


def _spread(x: np.ndarray) -> np.ndarray:
    x = x & 0x3FF
    x = (x | (x << 16)) & 0x030000FF
    x = (x | (x << 8)) & 0x0300F00F
    x = (x | (x << 4)) & 0x030C30C3
    return (x | (x << 2)) & 0x09249249


def sorted_run(k: np.ndarray):
    """(codes, points) of the keys sorted by their 30-bit Morton code."""
    lo, hi = k.min(0), k.max(0)
    g = np.clip(((k - lo) / np.maximum(hi - lo, 1e-30) * 1023).astype(np.int64), 0, 1023)
    code = (_spread(g[:, 0]) << 2) | (_spread(g[:, 1]) << 1) | _spread(g[:, 2])
    order = np.argsort(code, kind="stable")
    return code[order], k[order]


def fixed(c: np.ndarray, leaf: int) -> np.ndarray:
    return np.minimum(np.arange(0, len(c) + leaf, leaf), len(c))


def snapped(c: np.ndarray, leaf: int) -> np.ndarray:
    n = len(c)
    x = c[1:] ^ c[:-1]  # the change before entry i is x[i - 1]
    top = np.zeros(len(x), np.int64)
    nz = x > 0
    top[nz] = np.floor(np.log2(x[nz])).astype(np.int64) + 1
    starts = [0]
    for j in range(1, -(-n // leaf)):
        mid = j * leaf
        a0, a1 = max(1, mid - leaf // 2), min(n, mid + leaf // 2)
        if a0 >= a1:
            starts.append(mid)
            continue
        i = np.arange(a0, a1)
        key = np.lexsort((np.abs(i - mid), -top[i - 1]))  # largest cell, then nearest mid
        starts.append(int(i[key[0]]))
    return np.array(starts + [n])


def radix(c: np.ndarray, leaf: int) -> np.ndarray:
    out: List[int] = []
    stack = [(0, len(c))]
    while stack:
        s0, s1 = stack.pop()
        if s1 - s0 <= leaf:
            out.append(s0)
            continue
        c0, c1 = int(c[s0]), int(c[s1 - 1])
        if c0 == c1:
            m = s0 + (s1 - s0) // 2
        else:
            split = (c1 >> ((c0 ^ c1).bit_length() - 1)) << ((c0 ^ c1).bit_length() - 1)
            m = s0 + int(np.searchsorted(c[s0:s1], split))
        stack += [(m, s1), (s0, m)]
    return np.array(sorted(out) + [len(c)])


PARTITIONS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "fixed 64": lambda c: fixed(c, 64),
    "fixed 32": lambda c: fixed(c, 32),
    "snapped 64": lambda c: snapped(c, 64),
    "snapped 32": lambda c: snapped(c, 32),
    "radix <= 64": lambda c: radix(c, 64),
    "radix <= 128": lambda c: radix(c, 128),
    "radix <= 192": lambda c: radix(c, 192),
}


def census(n: int, queries: int, topk: int, seed: int = 0) -> Dict[str, Dict[str, float]]:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, 3)).astype(np.float32)
    q = rng.standard_normal((queries, 3)).astype(np.float32)
    c, pts = sorted_run(k)
    r = np.sort(((q[:, None, :] - k[None]) ** 2).sum(-1), axis=1)[:, min(topk, n) - 1]
    res = {}
    for name, cut in PARTITIONS.items():
        b = cut(c)
        size = np.diff(b)
        assert (size > 0).all() and b[-1] == n
        lo = np.minimum.reduceat(pts, b[:-1], axis=0)
        hi = np.maximum.reduceat(pts, b[:-1], axis=0)
        gap = np.maximum(np.maximum(lo[None] - q[:, None], q[:, None] - hi[None]), 0)
        hit = (gap**2).sum(-1) <= r[:, None]
        res[name] = {
            "leaves": float(len(size)),
            "largest": float(size.max()),
            "leaves_per_query": float(hit.sum(1).mean()),
            "keys_per_query": float((hit * size[None]).sum(1).mean()),
            "box_rounds": len(size) / 32,
        }
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--topk", type=int, default=32)
    a = ap.parse_args(argv)
    print(f"N = {a.n} Gaussian 3-D keys, one sorted run, {a.queries} queries, top-{a.topk}")
    print(
        f"{'leaves':14s} {'count':>6s} {'largest':>7s} {'hit/query':>9s} {'keys/query':>10s}"
        f" {'box rounds':>10s}"
    )
    for name, r in census(a.n, a.queries, a.topk).items():
        print(
            f"{name:14s} {r['leaves']:6.0f} {r['largest']:7.0f} {r['leaves_per_query']:9.1f}"
            f" {r['keys_per_query']:10.1f} {r['box_rounds']:10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
