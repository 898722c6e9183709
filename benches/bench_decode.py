"""KVCache decode: per-token latency vs cache length against dense decode (numpy, torch).

Usage: python benches/bench_decode.py [--quick]

H_kv = H = 8, d_k=3, d_v=128, topk=32; S = 16k, 64k, 256k, 1M (quick: 16k, 64k); float32
values (float16 too at the largest S). Reports extend throughput, bytes per token, median
attend latency over 50 steps, dense decode in numpy and torch over the same arrays, and the
recall@32 of the decode path at the largest S. The suite lives in ``zeta.benchmarks`` (also
``zeta bench --only decode``).

Writes ``benches/results/decode-<machine tag>-<date>.json`` and a ``.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zeta.benchmarks import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results"
    main(["--only", "decode", "--out", str(out), *sys.argv[1:]])
