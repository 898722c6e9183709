"""What the CUDA search kernel does per query, counted on the CPU (no GPU needed).

Usage: python benches/gpu_opmix.py [--n 32768] [--queries 2048] [--topk 32]

Runs ``zeta._cuda.search.knn`` through the test suite's CPU shim (tests/cuda_shim: the same
``.cu`` sources, every thread a fiber) on N Gaussian 3-D keys and the queries of the last --queries positions (one head, causal)
with the exact search (the default) and the window search, and prints the kernels' event
counters (``ZETA_STAT`` in kernels/search.cu) per query: probes (first-pass windows), offer
rounds (32 candidates each), rounds where some candidate entered the queue, flushes (sorts of
the queue into the best list), box rounds (32 leaf bounds) and leaves scanned by the exact
pass, and candidates. With the instruction counts of the code paths (SASS) this tells where a
kernel's time goes without a profiler.
"""

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cuda_shim import shim_runtime  # noqa: E402

from zeta._cuda import search  # noqa: E402
from zeta._validate import index_params  # noqa: E402

EVENTS = {
    5: "probes (first-pass windows)",
    0: "offer rounds",
    1: "rounds with a candidate queued",
    2: "flushes",
    9: "group box rounds (32 groups of 32 leaves)",
    3: "box rounds (32 leaves)",
    4: "leaves scanned (exact pass)",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--queries", type=int, default=2048, help="the last positions' queries")
    ap.add_argument("--topk", type=int, default=32)
    args = ap.parse_args()
    rt = shim_runtime.ShimRuntime(shim_runtime.build())
    stats_fn = rt.lib.zeta_stats
    stats_fn.restype = ctypes.POINTER(ctypes.c_ulonglong)
    stats = stats_fn()
    rng = np.random.default_rng(0)
    s, n = args.n, min(args.queries, args.n)
    q = rng.standard_normal((1, 1, n, 3)).astype(np.float32)
    k = rng.standard_normal((1, 1, s, 3)).astype(np.float32)
    print(
        f"N = {s} keys, queries at the last {n} positions, one head, causal, top-{args.topk}, "
        "Gaussian 3-D; per query:"
    )
    for exact in (True, False):
        p = index_params(3, args.topk, exact=exact)
        for i in range(16):
            stats[i] = 0
        t = time.time()
        search.knn(rt, q, k, (1, 1, 1, n, s, 3), p, args.topk)
        queries = stats[7] / 32
        name = "exact search (defaults)" if exact else "window search (exact=False defaults)"
        win = search.EXACT_WINDOW if exact and search.EXACT_WINDOW >= 0 else p.window
        print(
            f"\n{name}: window {win}, {p.n_curves} curve(s), chunk {p.chunk} "
            f"({time.time() - t:.0f} s on the shim)"
        )
        for i, label in EVENTS.items():
            print(f"  {stats[i] / 32 / queries:9.2f}  {label}")
        print(f"  {stats[8] / queries:9.1f}  candidates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
