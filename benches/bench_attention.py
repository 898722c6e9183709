"""ZETA top-k attention vs torch SDPA: forward and forward+backward time and peak memory vs N.

Usage: python benches/bench_attention.py [--quick]

B=1, H=8, d_k=3, d_v=64, topk=32, float32, causal; N = 4k..128k (quick: 4k..16k). SDPA runs
with head dim 64 up to N=32k (forward) and 16k (forward+backward). Each config runs in a fresh
subprocess (peak RSS increase per call from ru_maxrss). The suite lives in
``zeta.benchmarks`` (also ``zeta bench --only attention``).

Writes ``benches/results/attention-<machine tag>-<date>.json`` and a ``.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zeta.benchmarks import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results"
    main(["--only", "attention", "--out", str(out), *sys.argv[1:]])
