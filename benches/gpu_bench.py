"""ZETA on a GPU (cupy backend) vs torch SDPA (flash and cuDNN): time and peak memory vs N.

Usage: python benches/gpu_bench.py [--quick] [--out DIR]

B=1, H=8, d_k=3, d_v=64 (SDPA: head dim 64), topk=32, causal, bf16 inputs (zeta computes
queries/keys in float32 inside and reads bf16 values), plus zeta with float32 inputs; zeta's
default is the exact search (since 2026-11-30), the window search (``exact=False``) runs too
(bf16).
N = 4k..128k for everything, zeta alone up to 1M. Forward, and forward+backward (the backward
of sum(out * grad)). Times: CUDA events, median of repeats after warm-up. Peak memory: the
largest torch allocation during the call minus what the inputs already held.

Writes ``gpu-<gpu tag>-<date>.json`` and ``.png`` into --out (default benches/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import zeta

B, H, DK, DV, TOPK = 1, 8, 3, 64, 32


def gpu_tag() -> str:
    name = torch.cuda.get_device_name(0)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def timed(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def peak_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(
    fwd: Callable[[], torch.Tensor],
    grad: torch.Tensor,
    params: List[torch.Tensor],
    reps: int,
    backward: bool,
) -> Dict[str, float]:
    def f():
        with torch.no_grad():
            return fwd()

    def fb():
        for p in params:
            p.grad = None
        fwd().backward(grad)

    row = {"fwd_ms": timed(f, reps), "fwd_peak_mb": peak_mb(f)}
    if backward:
        row["fwdbwd_ms"] = timed(fb, max(3, reps // 2))
        row["fwdbwd_peak_mb"] = peak_mb(fb)
    return row


def zeta_case(
    n: int, dtype, reps: int, backward: bool, exact: Optional[bool] = None
) -> Dict[str, float]:
    """zeta.attention with its defaults (exact=None) or the given search."""
    kw = {} if exact is None else {"exact": exact}
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, n, DK, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, H, n, DK, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, H, n, DV, device="cuda", generator=g).to(dtype).requires_grad_()
    grad = torch.randn(B, H, n, DV, device="cuda", dtype=dtype)
    return measure(
        lambda: zeta.attention(q, k, v, topk=TOPK, **kw), grad, [q, k, v], reps, backward
    )


def sdpa_case(n: int, backend, reps: int, backward: bool) -> Optional[Dict[str, float]]:
    from torch.nn.attention import sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, H, n, DV, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(B, H, n, DV, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        return measure(fwd, grad, [q, k, v], reps, backward)
    except RuntimeError as e:  # backend unavailable for this shape/GPU
        return {"error": str(e).splitlines()[0][:200]}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    series = [
        ("zeta bf16 (defaults: exact)", "zeta_bf16"),
        ("zeta fp32 (defaults: exact)", "zeta_fp32"),
        ("zeta window search bf16", "zeta_window_bf16"),
        ("SDPA flash bf16", "sdpa_flash"),
        ("SDPA cuDNN bf16", "sdpa_cudnn"),
    ]
    for ax, key, title in (
        (axes[0], "fwd_ms", "forward"),
        (axes[1], "fwdbwd_ms", "forward + backward"),
        (axes[2], "fwd_peak_mb", "forward peak memory (MB)"),
    ):
        for label, name in series:
            pts = [
                (r["n"], r[name][key])
                for r in res["rows"]
                if isinstance(r.get(name), dict) and key in r[name]
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_title(title + (" (ms)" if "ms" in key else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"zeta (cupy backend) vs SDPA on {res['gpu']}: B={B} H={H} d_k={DK} d_v={DV} "
        f"top-{TOPK}, causal"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 4k..32k only, fewer repeats")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--max-n", type=int, default=1 << 20, help="largest N for zeta alone")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting new sizes after this many seconds (0: no limit)",
    )
    args = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend

    be = zeta.backends()
    if not be["cupy"]["available"]:
        print("cupy backend unavailable:", be["cupy"]["reason"])
        return 1
    both = [1 << p for p in range(12, 15 if args.quick else 18)]
    alone = [1 << p for p in range(18, int(math.log2(args.max_n)) + 1)] if not args.quick else []
    res = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "zeta": zeta.__version__,
        "date": dt.date.today().isoformat(),
        "config": dict(B=B, H=H, d_k=DK, d_v=DV, topk=TOPK, causal=True),
        "kernel_env": {
            k: os.environ[k]
            for k in (
                "ZETA_CUDA_DEFINES",
                "ZETA_CUDA_QUERY_ORDER",
                "ZETA_CUDA_EXACT_WINDOW",
                "ZETA_CUDA_POINTS",
                "ZETA_CUDA_LEAF",
            )
            if k in os.environ
        },
        "rows": [],
    }
    try:
        import cupy

        res["cupy"] = cupy.__version__
    except ImportError:
        pass
    t_start = time.time()
    for n in both + alone:
        if args.budget_s and time.time() - t_start > args.budget_s:
            res["rows"].append({"n": n, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        reps = 10 if n <= 1 << 15 else 5
        row = {"n": n}
        row["zeta_bf16"] = zeta_case(n, torch.bfloat16, reps, True)
        row["zeta_fp32"] = zeta_case(n, torch.float32, reps, True)
        row["zeta_window_bf16"] = zeta_case(n, torch.bfloat16, reps, True, exact=False)
        if n in both:
            row["sdpa_flash"] = sdpa_case(n, SDPBackend.FLASH_ATTENTION, reps, True)
            row["sdpa_cudnn"] = sdpa_case(n, SDPBackend.CUDNN_ATTENTION, reps, True)
            for name in ("sdpa_flash", "sdpa_cudnn"):
                s = row[name]
                if s and "fwd_ms" in s:
                    row[f"speedup_fwd_vs_{name}"] = s["fwd_ms"] / row["zeta_bf16"]["fwd_ms"]
                    row[f"speedup_fwdbwd_vs_{name}"] = (
                        s["fwdbwd_ms"] / row["zeta_bf16"]["fwdbwd_ms"]
                    )
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{gpu_tag()}-{res['date']}" + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    plot(res, out / f"{stem}.png")
    print("wrote", out / f"{stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
