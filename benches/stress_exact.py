"""Differential stress of the exact search: random configurations against a numpy brute force.

Usage: python benches/stress_exact.py [--seconds 120] [--seed 0] [--out DIR | --no-save]

Each configuration draws shapes (batch, GQA groups, N, S >= N, d_k 1..8), top-k (1..100, below
and above the key count), index settings (chunk, window, curves, sinks, scale, bits), float32
or float64, and a point set from ``tests/adversarial.py`` (ties, equal keys, grid-cell edges,
clusters, heavy tails, huge and tiny scales; queries and keys sometimes of different kinds,
half the keys sometimes copies of the others). Half the time budget goes to each check:

  knn    ``zeta.knn(exact=True)``: indices equal to the brute-force top-k by (float
         squared distance summed left to right, position), distances equal bit for bit,
         -1 / +inf padding; causal and not.
  cache  ``zeta.attention(exact=True)`` and a ``KVCache`` filled in random pieces, each
         piece's last queries attended (``exact=True``): both equal the brute-force
         Cauchy attention (float64 sums) within 1e-4 relative, and the cache's rows equal
         the parallel call's bit for bit (decode == parallel).

Inputs a call refuses with ValueError (coordinates past the float limit, bits too large for
d_k) are counted, not checked. A mismatch prints the configuration and saves its inputs
(``stress-mismatch-<n>.npz`` in the output folder). The tests check fixed cases of the same
kinds; this runs new ones for as long as asked, e.g. on a CPU whose SIMD paths (AVX2,
AVX-512) the test machine did not have.

Writes ``benches/results/stress_exact-<machine tag>-<date>.json``: counts per check and the
SIMD path in use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
from _common import RESULTS, base_report, progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from adversarial import KINDS, brute_attention, brute_knn, points  # noqa: E402

import zeta  # noqa: E402


def draw_points(rng: np.random.Generator, shape_q, shape_k, dtype) -> Tuple[np.ndarray, np.ndarray]:
    kind = KINDS[int(rng.integers(len(KINDS)))]
    kind_k = KINDS[int(rng.integers(len(KINDS)))] if rng.random() < 0.3 else kind
    q = points(kind, shape_q, rng)
    k = points(kind_k, shape_k, rng)
    s = shape_k[2]
    if rng.random() < 0.2 and s > 1:  # half the keys copies of the others
        k[:, :, : s // 2] = k[:, :, s - s // 2 :]
    return q.astype(dtype), k.astype(dtype)


def index_settings(rng: np.random.Generator, dk: int) -> Dict[str, Any]:
    kw: Dict[str, Any] = {}
    if rng.random() < 0.5:
        kw["chunk"] = int(rng.choice([1, 2, 3, 8, 16, 64, 128]))
    if rng.random() < 0.3:
        kw["window"] = int(rng.choice([1, 4, 32, 100]))
    if rng.random() < 0.3:
        kw["n_curves"] = int(rng.integers(1, 4))
    if rng.random() < 0.3:
        kw["n_sink"] = int(rng.integers(0, 5))
    if rng.random() < 0.3:
        kw["scale"] = float(rng.choice([1e-3, 0.1, 10.0, 1e4]))
    if rng.random() < 0.2:
        kw["bits"] = int(rng.integers(1, max(2, 64 // dk)))
    return kw


def knn_case(rng: np.random.Generator) -> Tuple[str, Dict[str, Any]]:
    b, hkv, grp = (int(x) for x in rng.integers(1, 3, size=3))
    n = int(rng.integers(1, 400))
    s = n + (int(rng.integers(0, 300)) if rng.random() < 0.3 else 0)
    dk = int(rng.choice([3, 3, 3, 1, 2, 4, 5, 8]))
    topk = int(rng.choice([1, 2, 7, 16, 31, 32, 33, 64, 65, 100]))
    causal = bool(rng.random() < 0.7)
    dtype = np.float32 if rng.random() < 0.8 else np.float64
    q, k = draw_points(rng, (b, hkv * grp, n, dk), (b, hkv, s, dk), dtype)
    kw = index_settings(rng, dk)
    cfg = dict(
        b=b, hkv=hkv, grp=grp, n=n, s=s, dk=dk, topk=topk, causal=causal, dtype=dtype.__name__, **kw
    )
    try:
        got_i, got_d = zeta.knn(q, k, topk, causal=causal, exact=True, **kw)
    except ValueError:
        return "refused", cfg
    want_i, want_d = brute_knn(q, k, topk, causal)
    same = np.array_equal(got_i, want_i) and np.array_equal(
        got_d.view(np.uint8), want_d.view(np.uint8)
    )
    return ("ok" if same else "mismatch"), dict(cfg, arrays=dict(q=q, k=k))


def cache_case(rng: np.random.Generator) -> Tuple[str, Dict[str, Any]]:
    b, hkv, grp = (int(x) for x in rng.integers(1, 3, size=3))
    t = int(rng.integers(1, 300))
    dk = int(rng.choice([3, 3, 2, 4]))
    dv = int(rng.choice([1, 8, 64, 65]))
    topk = int(rng.choice([1, 5, 16, 32, 33, 64]))
    gamma = float(rng.choice([1e-3, 0.5, 1.0, 30.0]))
    q, k = draw_points(rng, (b, hkv * grp, t, dk), (b, hkv, t, dk), np.float32)
    v = rng.standard_normal((b, hkv, t, dv)).astype(np.float32)
    kw = {key: val for key, val in index_settings(rng, dk).items() if key != "window"}
    cfg = dict(b=b, hkv=hkv, grp=grp, t=t, dk=dk, dv=dv, topk=topk, gamma=gamma, **kw)
    try:
        par = zeta.attention(q, k, v, topk=topk, gamma=gamma, exact=True, **kw)
        cache = zeta.KVCache(hkv, dk, dv, batch=b, **kw)
        got = np.zeros_like(par)
        seen = np.zeros(t, bool)
        p = 0
        while p < t:
            m = int(rng.integers(1, min(t - p, 64) + 1)) if rng.random() < 0.7 else t - p
            cache.extend(k[:, :, p : p + m], v[:, :, p : p + m])
            tq = m if rng.random() < 0.5 else int(rng.integers(1, m + 1))
            got[:, :, p + m - tq : p + m] = cache.attend(
                q[:, :, p + m - tq : p + m], topk=topk, gamma=gamma, exact=True
            )
            seen[p + m - tq : p + m] = True
            p += m
    except ValueError:
        return "refused", cfg
    want = brute_attention(q, k, v, topk, gamma)
    ok = (
        np.allclose(par, want, rtol=1e-4, atol=1e-5)
        and np.allclose(got[:, :, seen], want[:, :, seen], rtol=1e-4, atol=1e-5)
        and np.array_equal(got[:, :, seen], par[:, :, seen])
    )
    return ("ok" if ok else "mismatch"), dict(cfg, arrays=dict(q=q, k=k, v=v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="total time (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    a = ap.parse_args()
    report = base_report("stress_exact", False, {"seconds": a.seconds, "seed": a.seed})
    rng = np.random.default_rng(a.seed)
    counts: Dict[str, Dict[str, int]] = {}
    mismatches = []
    t_start = time.perf_counter()
    with progress(int(a.seconds), "stress", "s") as bar:
        for name, case in (("knn", knn_case), ("cache", cache_case)):
            c = counts.setdefault(name, {"ok": 0, "refused": 0, "mismatch": 0})
            t0 = time.perf_counter()
            done = 0
            while time.perf_counter() - t0 < a.seconds / 2:
                outcome, cfg = case(rng)
                c[outcome] += 1
                if outcome == "mismatch":
                    arrays = cfg.pop("arrays")
                    mismatches.append({"check": name, **cfg})
                    print(f"MISMATCH {name}: {cfg}", flush=True)
                    if not a.no_save:
                        a.out.mkdir(parents=True, exist_ok=True)
                        np.savez(a.out / f"stress-mismatch-{len(mismatches)}.npz", **arrays)
                now = min(int(time.perf_counter() - t0), int(a.seconds / 2))
                if now > done:
                    bar.update(now - done)
                    done = now
    for name, c in counts.items():
        print(f"  {name:<6} {c['ok']:>6} equal, {c['mismatch']} mismatches, {c['refused']} refused")
    report.update(
        {
            "counts": counts,
            "mismatches": mismatches,
            "wall_s": time.perf_counter() - t_start,
        }
    )
    if not a.no_save:
        a.out.mkdir(parents=True, exist_ok=True)
        stem = f"stress_exact-{report['machine']['tag']}-{report['date']}"
        path = a.out / f"{stem}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"  wrote {path}")
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
