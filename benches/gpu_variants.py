"""Measures kernel tuning variants of the cupy backend side by side (one subprocess each).

Usage: python benches/gpu_variants.py [--out DIR]
Each variant sets ZETA_CUDA_DEFINES / ZETA_CUDA_QUERY_ORDER for its own process; every row is
forward and forward+backward time (CUDA events, median) of zeta.attention at B=1, H=8, d_k=3,
d_v=64, top-32, bf16, causal. Writes gpu-variants-<date>.json.
"""

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    f"unroll{u}-bounds{b}-{'zorder' if o else 'posorder'}": {
        "ZETA_CUDA_DEFINES": f"ZETA_UNROLL={u},ZETA_MIN_BLOCKS={b}",
        "ZETA_CUDA_QUERY_ORDER": str(o),
    }
    for u, b, o in ((1, 8, 1), (1, 8, 0), (2, 8, 1), (2, 8, 0), (1, 6, 1))
}

CHILD = r"""
import json, torch, zeta
def timed(fn, reps=7):
    for _ in range(2): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]
row = {}
for n in (32768, 131072):
    q, k = (torch.randn(1, 8, n, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(v)
    def f():
        with torch.no_grad(): zeta.attention(q, k, v, topk=32)
    def fb(): zeta.attention(q, k, v, topk=32).backward(g)
    row[n] = {"fwd_ms": timed(f), "fwdbwd_ms": timed(fb)}
print(json.dumps(row))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    res = {"date": dt.date.today().isoformat(), "variants": {}}
    for name, env in VARIANTS.items():
        r = subprocess.run(
            [sys.executable, "-c", CHILD],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        row = (
            json.loads(r.stdout.strip().splitlines()[-1])
            if r.returncode == 0
            else {"error": r.stderr[-800:]}
        )
        res["variants"][name] = {"env": env, **row}
        print(name, json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-variants-{res['date']}.json").write_text(json.dumps(res, indent=1))
    # the fastest forward+backward at 32k: what a caller may export for the benchmark
    ok = {k: v for k, v in res["variants"].items() if "32768" in v}
    if ok:
        best = min(ok, key=lambda k: ok[k]["32768"]["fwdbwd_ms"] + ok[k]["131072"]["fwdbwd_ms"] / 4)
        env = ok[best]["env"]
        print("best", best)
        (out / "best-variant.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))


if __name__ == "__main__":
    main()
