"""Measures tuning variants of the cupy backend side by side on a GPU.

Usage: python benches/gpu_variants.py [--out DIR]

Compile-time variants (``ZETA_CUDA_DEFINES``, see DEFINES) run in one subprocess each; inside
each, the run-time variants: points stored beside the index entries or not
(``zeta._cuda.search.POINTS``), the window of the exact search's first pass
(``EXACT_WINDOW``) and leaves that follow the Z-order cells or fixed leaves
(``zeta._cuda.index.CELL_LEAVES``); the result depends on none, which the child checks: the knn indices of
every variant equal the first one's. Every row is
forward and forward+backward time (CUDA events, median) of ``zeta.attention`` with its
defaults (exact search) at B=1, H=8, d_k=3, d_v=64, top-32, bf16, causal, N = 32k and 128k.
Writes gpu-variants-<gpu>-<date>.json.
"""

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

# "default": search.cu's own settings (ZETA_MIN_BLOCKS 8), compiled by the tests already;
# "flushcall": WarpSelect::flush as a call, not inlined at every offer site (search.cu);
# "leaf32": leaf boxes of 32 entries instead of 64 (zeta/_cuda/index.py LEAF).
# Dropped after 2026-11-30 on an H200 (gpu-variants-nvidia-h200-2026-11-30.json): register
# caps ZETA_MIN_BLOCKS=6 and 0 (none), 6.55-6.64 and 7.29-7.38 vs 6.34-6.42 ms forward at
# 32k. Each define set costs a full compile (~50 s there).
DEFINES = {
    "default": {},
    "flushcall": {"ZETA_CUDA_DEFINES": "ZETA_FLUSH_NOINLINE=1"},
    "leaf32": {"ZETA_CUDA_LEAF": "32"},
}
# 2026-11-30 on an H200: windows 8 / 16 / 32 / 64 within noise (6.34 / 6.34 / 6.37 / 6.42 ms
# forward at 32k); the extremes stay.
EXACT_WINDOWS = (-1, 8)  # -1: the call's window (2 * topk = 64)

CHILD = r"""
import json, sys, torch, zeta
import zeta._cuda.search as S
import zeta._cuda.index as I
def timed(fn, reps):
    for _ in range(2): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]
row = {}
g = torch.Generator(device="cuda").manual_seed(0)
for n in (32768, 131072):
    q, k = (torch.randn(1, 8, n, 3, device="cuda", generator=g).to(torch.bfloat16).requires_grad_() for _ in range(2))
    v = torch.randn(1, 8, n, 64, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    gr = torch.randn_like(v)
    ref = None
    for cell in (True, False):
      I.CELL_LEAVES = cell
      for pts in (True, False):
        S.POINTS = pts
        for w in WINDOWS:
            S.EXACT_WINDOW = w
            if n == 32768:
                idx, _ = zeta.knn(q.detach(), k.detach(), 32)
                ref = idx if ref is None else ref
                assert torch.equal(idx, ref), f"window {w} points {pts} cells {cell}: other indices"
            def f():
                with torch.no_grad(): zeta.attention(q, k, v, topk=32)
            def fb(): zeta.attention(q, k, v, topk=32).backward(gr)
            key = f"{n}/w{w}/p{int(pts)}" + ("" if cell else "/fixedleaves")
            row[key] = {"fwd_ms": timed(f, 7), "fwdbwd_ms": timed(fb, 5)}
print(json.dumps(row))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    import torch

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower()
    res = {
        "date": dt.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0),
        "config": "B=1 H=8 d_k=3 d_v=64 top-32 bf16 causal, zeta.attention defaults (exact)",
        "keys": "N/w<exact first-pass window; -1: the call's, 2 * topk = 64>/p<points beside>"
        "[/fixedleaves: ZETA_CUDA_CELL_LEAVES=0]",
        "variants": {},
    }
    child = CHILD.replace("WINDOWS", repr(EXACT_WINDOWS))
    out = Path(args.out)
    for name, env in DEFINES.items():
        r = subprocess.run(
            [sys.executable, "-c", child],
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
        for k, v in row.items():
            print(f"{name:9s} {k:14s} {json.dumps(v)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)  # after each variant: a cut run keeps its rows
        (out / f"gpu-variants-{gpu}-{res['date']}.json").write_text(json.dumps(res, indent=1))
    # the fastest forward+backward (32k, plus 128k / 4): the settings gpu_check.sh's benchmark
    # then runs with (and that the code's defaults should be set to)
    cands = [
        (
            v[f"32768/w{w}/p{p}{f}"]["fwdbwd_ms"] + v[f"131072/w{w}/p{p}{f}"]["fwdbwd_ms"] / 4,
            name,
            w,
            p,
            f,
        )
        for name, v in res["variants"].items()
        for w in EXACT_WINDOWS
        for p in (1, 0)
        for f in ("", "/fixedleaves")
        if f"131072/w{w}/p{p}{f}" in v
    ]
    if cands:
        _, name, w, p, f = min(cands)
        env = dict(res["variants"][name]["env"])
        if w >= 0:
            env["ZETA_CUDA_EXACT_WINDOW"] = str(w)
        if not p:
            env["ZETA_CUDA_POINTS"] = "0"
        if f:
            env["ZETA_CUDA_CELL_LEAVES"] = "0"
        print("best", name, f"exact window {w}", f"points {p}", f"cell leaves {not f}", flush=True)
        (out / "best-variant.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))


if __name__ == "__main__":
    main()
