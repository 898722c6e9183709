"""``zeta bench``: the benchmark suites, against the usual baselines, with goals.

Usage: ``zeta bench [--quick] [--out DIR] [--only attention|recall|knn|decode]``
(or ``python benches/bench_attention.py [--quick]``, ``python benches/bench_decode.py``).

Suites (numpy is enough for zeta; torch, faiss, hnswlib and matplotlib are optional, a
missing peer is skipped with the reason printed):

- ``attention``: causal top-32 attention (B=1, H=8, d_k=3, d_v=64, float32) forward and
  forward+backward against ``torch.nn.functional.scaled_dot_product_attention`` (head dim 64
  for q/k/v, same H), N = 4k..128k; time (median of repeats) and peak RSS increase per call,
  each config in a fresh subprocess (``ru_maxrss`` delta; the Rust allocations are invisible
  to tracemalloc).
- ``recall``: recall@32 of the causal index on Gaussian 3-D points vs window x n_curves, with
  the time per call (exact neighbours computed once).
- ``knn``: non-causal ``zeta.knn`` against faiss ``IndexFlatL2`` (exact) and hnswlib (build +
  query) on the same points.
- ``decode``: ``KVCache`` per-token decode latency vs cache length (16k..1M) against dense
  decode in numpy and torch, extend throughput, bytes per token, and recall of the decode path.

Each suite prints a table with ratios and its goals as MET / MISSED, and writes
``<suite>-<machine tag>-<date>.json`` and ``.png`` into ``--out`` (default ``benches/results``
when that folder exists in the current directory, else ``./zeta-bench-results``). Timings on a
shared machine are noisy: compare the ratios (measured in the same run), and see ``load_avg``
in the JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ._progress import progress

SUITES = ("attention", "recall", "knn", "decode")
TOPK = 32
DK = 3
SEED = 1234

# attention
ATTN_H, ATTN_DV = 8, 64
ATTN_N = [4096, 8192, 16384, 32768, 65536, 131072]
ATTN_N_QUICK = [4096, 8192, 16384]
SDPA_MAX_N = {"fwd": 32768, "fwdbwd": 16384}
SDPA_MAX_N_QUICK = {"fwd": 16384, "fwdbwd": 8192}
GOAL_FWD_X_SDPA, GOAL_FWD_X_SDPA_N = 50.0, 32768
GOAL_FWDBWD_X_SDPA = 20.0
GOAL_SCALING = 10.0  # zeta forward t(128k) / t(16k)

# recall / knn
RECALL_N, RECALL_N_QUICK = 65536, 16384
WINDOWS = [8, 16, 32, 64, 128, 256]
CURVES = [1, 2, 4]
GOAL_RECALL = 0.95
GOAL_KNN_X_FAISS = 10.0
HNSW_BUILDS = [(16, 200), (8, 32), (4, 16)]  # (M, ef_construction); the first is hnswlib's default
HNSW_EFS = [10, 48, 128]  # 10 is hnswlib's default (raised to k by hnswlib)

# decode
DEC_H, DEC_DV = 8, 128
DEC_S = [16384, 65536, 262144, 1048576]
DEC_S_QUICK = [16384, 65536]
DEC_STEPS = 50
GOAL_US_PER_HEAD, GOAL_DENSE_X = 20.0, 100.0
GOAL_DEC_S = 1048576


# --------------------------------------------------------------------------------------
# machine, timing, small helpers
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            pass
    return platform.processor() or "unknown-cpu"


def machine_tag() -> str:
    """``<arch>-<cpu model>-<n>c``, the same tag as benches/bench_morton.py."""
    model = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-").lower() or "cpu"
    return f"{platform.machine().lower()}-{model}-{os.cpu_count()}c"


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _mem_available() -> Optional[int]:
    """Bytes the kernel says are available (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _optional(name: str) -> Tuple[Any, Optional[str]]:
    """(module, None) or (None, why it is missing)."""
    try:
        return __import__(name), None
    except ImportError as e:
        return (
            None,
            f"{name} is not installed ({e}); pip install {name if name != 'faiss' else 'faiss-cpu'}",
        )


def _time(fn: Callable[[], Any], reps: int, budget_s: float = float("inf")) -> List[float]:
    """Wall times of up to `reps` calls; stops early (after one) once `budget_s` is spent."""
    out: List[float] = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if sum(out) > budget_s:
            break
    return out


def _med(xs: List[float]) -> Optional[float]:
    return float(np.median(xs)) if xs else None


def _fmt_s(t: Optional[float]) -> str:
    if t is None:
        return "not run"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def _fmt_x(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2f}x"


def _ratio(slow: Optional[float], fast: Optional[float]) -> Optional[float]:
    return slow / fast if slow and fast else None


def _kib(n: int) -> str:
    return f"{n // 1024}k" if n < 1 << 20 else f"{n >> 20}M"


def _goal(desc: str, value: Optional[float], met: Optional[bool], note: str) -> Dict[str, Any]:
    return {"goal": desc, "value": value, "met": met, "note": note}


def _print_goals(goals: Dict[str, Dict[str, Any]]) -> None:
    for g in goals.values():
        state = "NOT RUN" if g["met"] is None else "MET" if g["met"] else "MISSED"
        print(f"  goal: {g['goal']}: {state} ({g['note']})")


def _gauss(n: int, seed: int = SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Gaussian queries and keys, (1, 1, n, 3) float32 each."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1, n, DK), dtype=np.float32)
    k = rng.standard_normal((1, 1, n, DK), dtype=np.float32)
    return q, k


def recall_from_exact(
    q: np.ndarray, k: np.ndarray, idx: np.ndarray, exact_d2: np.ndarray, causal: bool
) -> float:
    """:func:`zeta.recall` with the exact top-k distances given (computed once, reused).

    The same rule: a retrieved valid (and, causal, past) index counts when its true squared
    distance is <= the exact k-th one; the denominator counts the exact neighbours.
    """
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    b, h, n, _ = q64.shape
    s = k64.shape[2]
    g = h // k64.shape[1]
    kk = np.repeat(k64, g, axis=1) if g > 1 else k64
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    got = kk[np.arange(b)[:, None, None, None], np.arange(h)[None, :, None, None], safe]
    gd2 = ((got - q64[:, :, :, None, :]) ** 2).sum(-1)
    if causal:
        pos = np.arange(n) + (s - n)
        valid &= idx <= pos[None, None, :, None]
    kth = np.max(np.where(np.isfinite(exact_d2), exact_d2, -np.inf), axis=-1, keepdims=True)
    hits = (valid & (gd2 <= kth * (1 + 1e-12))).sum(-1)
    denom = np.isfinite(exact_d2).sum(-1)
    return float(np.minimum(hits, denom).sum() / max(denom.sum(), 1))


def _true_d2(q: np.ndarray, k: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float64 squared distances of (N, d) queries to their (N, k) neighbours in (S, d) keys."""
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    return ((k64[idx] - q64[:, None, :]) ** 2).sum(-1)


def _core_hash() -> Optional[str]:
    """First 12 hex digits of the loaded Rust extension's sha256 (tells builds apart)."""
    import hashlib

    from . import _core

    try:
        with open(_core.__file__, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except (OSError, AttributeError, TypeError):
        return None


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _base_report(suite: str, quick: bool, config: Dict[str, Any]) -> Dict[str, Any]:
    import zeta

    from . import _core

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zeta": zeta.__version__,
        "zeta_core_sha256": _core_hash(),
    }
    for name in ("torch", "faiss", "hnswlib", "matplotlib"):
        mod, _ = _optional(name)
        versions[name] = getattr(mod, "__version__", "installed") if mod is not None else None
    return {
        "suite": suite,
        "date": _dt.date.today().isoformat(),
        "quick": quick,
        "machine": {
            "tag": machine_tag(),
            "machine": platform.machine(),
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "zeta_threads": _core.num_threads(),
            "simd_path": _core.simd_path(),
            "versions": versions,
        },
        "load_avg": {"start": loadavg()},
        "config": config,
    }


def _write(report: Dict[str, Any], out: Path, plot: Callable[[Dict[str, Any], Path], bool]) -> None:
    report["load_avg"]["end"] = loadavg()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['suite']}-{report['machine']['tag']}-{report['date']}"
    js, png = out / f"{stem}.json", out / f"{stem}.png"
    js.write_text(json.dumps(report, indent=2) + "\n")
    rel = os.path.relpath
    if plot(report, png):
        print(f"  wrote {rel(js)} and {rel(png)}")
    else:
        print(f"  wrote {rel(js)} (matplotlib missing: no plot)")


# --------------------------------------------------------------------------------------
# attention: zeta vs SDPA, each config in a fresh subprocess (time + peak RSS)
# --------------------------------------------------------------------------------------


def _attention_worker(method: str, mode: str, n: int, reps: int) -> Dict[str, Any]:
    """Runs in its own process: warm up at N=1024, then `reps` timed calls at N."""
    torch, why = _optional("torch")
    if torch is None and (method == "sdpa" or mode == "fwdbwd"):
        return {"status": f"not run: {why}"}
    import zeta

    def make(nn: int):
        rng = np.random.default_rng(SEED + nn)
        if method == "zeta":
            shapes = [(1, ATTN_H, nn, DK), (1, ATTN_H, nn, DK), (1, ATTN_H, nn, ATTN_DV)]
        else:
            shapes = [(1, ATTN_H, nn, ATTN_DV)] * 3
        arrs = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        if torch is None:
            return arrs
        ts = [torch.from_numpy(a) for a in arrs]
        if mode == "fwdbwd":
            for t in ts:
                t.requires_grad_(True)
        return ts

    def call(ts) -> None:
        if method == "zeta":
            out = zeta.attention(*ts, topk=TOPK, causal=True)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(*ts, is_causal=True)
        if mode == "fwdbwd":
            out.sum().backward()
            for t in ts:
                t.grad = None

    warm = make(1024)
    call(warm)
    del warm
    ts = make(n)
    gc.collect()
    rss0 = _maxrss_mb()
    times, peak = [], None
    for r in range(reps):
        t0 = time.perf_counter()
        call(ts)
        times.append(time.perf_counter() - t0)
        if r == 0:
            peak = _maxrss_mb() - rss0
    return {
        "status": "ok",
        "median_s": _med(times),
        "times_s": times,
        "reps": len(times),
        "peak_rss_increase_mb": peak,
        "inputs": "torch" if torch is not None else "numpy",
        "torch_threads": torch.get_num_threads() if torch is not None else None,
    }


def _run_attention_worker(method: str, mode: str, n: int, reps: int) -> Dict[str, Any]:
    cfg = json.dumps({"method": method, "mode": mode, "n": n, "reps": reps})
    cmd = [sys.executable, "-m", "zeta.benchmarks", "--worker", cfg]
    load = loadavg()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"status": "error: timed out after 1800 s", "median_s": None, "load_avg": load}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"status": "error: " + " | ".join(tail), "median_s": None, "load_avg": load}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.setdefault("median_s", None)
    res["load_avg"] = load
    return res


def _attn_reps(method: str, n: int, quick: bool) -> int:
    if method == "sdpa":
        return 1 if n > 8192 else (3 if n <= 4096 or not quick else 2)
    if quick:
        return 3 if n <= 8192 else 2
    return 5 if n <= 8192 else 3 if n <= 32768 else 2


def bench_attention(quick: bool) -> Dict[str, Any]:
    ns = ATTN_N_QUICK if quick else ATTN_N
    sdpa_max = SDPA_MAX_N_QUICK if quick else SDPA_MAX_N
    torch, why = _optional("torch")
    rep = _base_report(
        "attention",
        quick,
        {
            "B": 1,
            "H": ATTN_H,
            "d_k": DK,
            "d_v": ATTN_DV,
            "topk": TOPK,
            "dtype": "float32",
            "causal": True,
            "N": ns,
            "sdpa_head_dim": ATTN_DV,
            "sdpa_max_n": sdpa_max,
            "timing": "median of repeats, each config in a fresh subprocess after a warm-up call at "
            "N=1024; SDPA 1 repeat above N=8192",
            "memory": "peak RSS increase (ru_maxrss after the first call minus before it, inputs "
            "already allocated), MB",
        },
    )
    print(
        f"\n== attention: B=1 H={ATTN_H} d_k={DK} d_v={ATTN_DV} topk={TOPK} float32 causal, "
        f"zeta vs SDPA (head dim {ATTN_DV}); N = {', '.join(_kib(n) for n in ns)}"
    )
    if torch is None:
        print(f"  SDPA and forward+backward skipped: {why}")
    res: Dict[str, Any] = {m: {"fwd": {}, "fwdbwd": {}} for m in ("zeta", "sdpa")}
    jobs = []
    for mode in ("fwd", "fwdbwd"):
        for n in ns:
            jobs.append(("zeta", mode, n))
            if n <= sdpa_max[mode]:
                jobs.append(("sdpa", mode, n))
            else:
                res["sdpa"][mode][str(n)] = {
                    "status": f"not run: SDPA {'forward' if mode == 'fwd' else 'forward+backward'} "
                    f"is measured up to N={sdpa_max[mode]} (too slow on this machine)",
                    "median_s": None,
                }
    with progress(len(jobs), "attention", "cfg") as bar:
        for method, mode, n in jobs:
            res[method][mode][str(n)] = _run_attention_worker(
                method, mode, n, _attn_reps(method, n, quick)
            )
            bar.update(1)

    def t(m, mode, n):
        return res[m][mode].get(str(n), {}).get("median_s")

    def mb(m, mode, n):
        return res[m][mode].get(str(n), {}).get("peak_rss_increase_mb")

    hdr = (
        f"  {'N':>6s} | {'zeta fwd':>9s} {'SDPA fwd':>9s} {'ratio':>7s} | {'zeta f+b':>9s} "
        f"{'SDPA f+b':>9s} {'ratio':>7s} | peak RSS +MB fwd zeta/SDPA, f+b zeta/SDPA"
    )
    print(hdr)
    print("  " + "-" * (len(hdr) - 2))
    for n in ns:
        mems = "  ".join(
            f"{mb(m, mode, n):.0f}" if mb(m, mode, n) is not None else "-"
            for mode in ("fwd", "fwdbwd")
            for m in ("zeta", "sdpa")
        )
        print(
            f"  {_kib(n):>6s} | {_fmt_s(t('zeta', 'fwd', n)):>9s} {_fmt_s(t('sdpa', 'fwd', n)):>9s} "
            f"{_fmt_x(_ratio(t('sdpa', 'fwd', n), t('zeta', 'fwd', n))):>7s} | "
            f"{_fmt_s(t('zeta', 'fwdbwd', n)):>9s} {_fmt_s(t('sdpa', 'fwdbwd', n)):>9s} "
            f"{_fmt_x(_ratio(t('sdpa', 'fwdbwd', n), t('zeta', 'fwdbwd', n))):>7s} | {mems}"
        )
    for m in ("zeta", "sdpa"):
        for mode in ("fwd", "fwdbwd"):
            for n, r in res[m][mode].items():
                if r.get("status", "ok").startswith("error"):
                    print(f"  {m} {mode} N={n}: {r['status']}")

    goals: Dict[str, Any] = {}
    n32 = GOAL_FWD_X_SDPA_N
    r = _ratio(t("sdpa", "fwd", n32), t("zeta", "fwd", n32))
    goals["fwd_x_sdpa_32k"] = _goal(
        f">= {GOAL_FWD_X_SDPA:.0f}x faster forward than SDPA at N={_kib(n32)}",
        r,
        None if r is None else r >= GOAL_FWD_X_SDPA,
        f"{_fmt_x(r)}: zeta {_fmt_s(t('zeta', 'fwd', n32))}, SDPA {_fmt_s(t('sdpa', 'fwd', n32))}"
        if r is not None
        else f"N={_kib(n32)} not run",
    )
    both = [n for n in ns if t("zeta", "fwdbwd", n) and t("sdpa", "fwdbwd", n)]
    if both:
        nb = max(both)
        r = _ratio(t("sdpa", "fwdbwd", nb), t("zeta", "fwdbwd", nb))
        goals["fwdbwd_x_sdpa"] = _goal(
            f">= {GOAL_FWDBWD_X_SDPA:.0f}x faster forward+backward than SDPA at the largest N "
            "where both ran",
            r,
            r >= GOAL_FWDBWD_X_SDPA,
            f"{_fmt_x(r)} at N={_kib(nb)}: zeta {_fmt_s(t('zeta', 'fwdbwd', nb))}, "
            f"SDPA {_fmt_s(t('sdpa', 'fwdbwd', nb))}",
        )
        goals["fwdbwd_x_sdpa"]["n"] = nb
    else:
        goals["fwdbwd_x_sdpa"] = _goal(
            f">= {GOAL_FWDBWD_X_SDPA:.0f}x faster forward+backward than SDPA",
            None,
            None,
            "no N where both ran",
        )
    t128, t16 = t("zeta", "fwd", 131072), t("zeta", "fwd", 16384)
    r = _ratio(t128, t16)
    goals["zeta_fwd_scaling_128k_16k"] = _goal(
        f"zeta forward t(128k)/t(16k) <= {GOAL_SCALING:.0f} (8x the tokens)",
        r,
        None if r is None else r <= GOAL_SCALING,
        f"{r:.1f} ({_fmt_s(t128)} / {_fmt_s(t16)})" if r is not None else "N=128k not run",
    )
    _print_goals(goals)
    rep["results"] = res
    rep["goals"] = goals
    return rep


def _plot_attention(rep: Dict[str, Any], png: Path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    ns = rep["config"]["N"]
    res = rep["results"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    style = {"zeta": dict(color="tab:blue", marker="o"), "sdpa": dict(color="tab:red", marker="s")}
    label = {
        "zeta": f"zeta top-{TOPK} (d_k={DK})",
        "sdpa": f"torch SDPA causal (head dim {ATTN_DV})",
    }
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for m in ("zeta", "sdpa"):
            pts = [
                (n, res[m][mode][str(n)]["median_s"])
                for n in ns
                if res[m][mode].get(str(n), {}).get("median_s")
            ]
            if pts:
                ax.plot(*zip(*pts), label=label[m], **style[m])
        for n in ns:
            a, b = res["zeta"][mode].get(str(n), {}), res["sdpa"][mode].get(str(n), {})
            if a.get("median_s") and b.get("median_s"):
                ax.annotate(
                    _fmt_x(b["median_s"] / a["median_s"]),
                    (n, b["median_s"]),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=8,
                    color="tab:red",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 2)  # room for the ratio labels
        ax.set_xticks(ns)
        ax.set_xticklabels([_kib(n) for n in ns])
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("seconds per call (median)")
        ax.set_title(f"{title}: time vs N (labels: SDPA / zeta)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    for m, ls in (("zeta", "-"), ("sdpa", "--")):
        for mode, mk in (("fwd", "o"), ("fwdbwd", "^")):
            pts = [
                (n, res[m][mode][str(n)]["peak_rss_increase_mb"])
                for n in ns
                if (res[m][mode].get(str(n), {}).get("peak_rss_increase_mb") or 0) > 0
            ]
            if pts:
                ax.plot(
                    *zip(*pts),
                    ls=ls,
                    marker=mk,
                    color=style[m]["color"],
                    label=f"{m} {'fwd' if mode == 'fwd' else 'fwd+bwd'}",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([_kib(n) for n in ns])
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("peak RSS increase per call (MB)")
    ax.set_title("memory: peak RSS increase (fresh process per config)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    la = rep["load_avg"]
    fig.suptitle(
        f"zeta attention vs SDPA, B=1 H={ATTN_H} d_v={ATTN_DV} float32 causal "
        f"({rep['machine']['tag']}, {rep['date']}, load avg {la['start']} -> {la.get('end')}); "
        "missing points: not run",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# recall: window x n_curves on the causal index
# --------------------------------------------------------------------------------------


def bench_recall(quick: bool) -> Dict[str, Any]:
    import zeta

    n = RECALL_N_QUICK if quick else RECALL_N
    reps = 2 if quick else 3
    rep = _base_report(
        "recall",
        quick,
        {
            "B": 1,
            "H": 1,
            "d_k": DK,
            "topk": TOPK,
            "causal": True,
            "N": n,
            "data": "Gaussian q, k",
            "windows": WINDOWS,
            "n_curves": CURVES,
            "chunk": 64,
            "timing": f"median of up to {reps} calls of zeta.knn per setting",
            "recall": "exact neighbours computed once (zeta.exact_knn, float64); recall computed as "
            "zeta.recall does",
        },
    )
    print(
        f"\n== recall: zeta.knn causal, Gaussian 3-D q, k, N={_kib(n)}, topk={TOPK}; "
        f"window x n_curves"
    )
    q, k = _gauss(n)
    settings = [(w, c) for c in CURVES for w in WINDOWS]
    rows = []
    with progress(len(settings) + 2, "recall", "cfg") as bar:
        t0 = time.perf_counter()
        _, ex_d2 = zeta.exact_knn(q.astype(np.float64), k.astype(np.float64), TOPK, causal=True)
        t_exact = time.perf_counter() - t0
        bar.update(1)
        check = None
        for w, c in settings:
            idx = None

            def call(w=w, c=c):
                nonlocal idx
                idx, _ = zeta.knn(q, k, TOPK, causal=True, window=w, n_curves=c)

            times = _time(call, reps, budget_s=30)
            rec = recall_from_exact(q, k, idx, ex_d2, causal=True)
            rows.append(
                {
                    "window": w,
                    "n_curves": c,
                    "median_s": _med(times),
                    "times_s": times,
                    "us_per_query": _med(times) * 1e6 / n,
                    "recall": rec,
                    "load_avg": loadavg(),
                }
            )
            if w == TOPK and c == 1:  # the default setting: check against zeta.recall
                ref = zeta.recall(q, k, idx, causal=True)
                check = {
                    "window": w,
                    "n_curves": c,
                    "ours": rec,
                    "zeta.recall": ref,
                    "equal": abs(rec - ref) < 1e-12,
                }
            bar.update(1)
        bar.update(1)
    print(
        f"  exact_knn (once, float64): {t_exact:.1f} s; check vs zeta.recall at window={TOPK}, "
        f"n_curves=1: {check['ours']:.6f} vs {check['zeta.recall']:.6f} "
        f"({'equal' if check['equal'] else 'DIFFERENT'})"
    )
    print(f"  {'':>8s}" + "".join(f"{'n_curves=' + str(c):>22s}" for c in CURVES))
    print(f"  {'window':>8s}" + "".join(f"{'recall':>10s} {'time':>11s}" for _ in CURVES))
    for w in WINDOWS:
        cells = []
        for c in CURVES:
            r = next(x for x in rows if x["window"] == w and x["n_curves"] == c)
            cells.append(f"{r['recall']:>10.4f} {_fmt_s(r['median_s']):>11s}")
        print(f"  {w:>8d}" + "".join(cells))
    ok = [r for r in rows if r["recall"] >= GOAL_RECALL]
    best = min(ok, key=lambda r: r["median_s"]) if ok else max(rows, key=lambda r: r["recall"])
    note = (
        f"{len(ok)} of {len(rows)} settings reach it: "
        + ", ".join(f"w={r['window']}/c={r['n_curves']}" for r in ok)
        + f"; fastest: window={best['window']}, n_curves={best['n_curves']} "
        f"(recall {best['recall']:.4f}, {_fmt_s(best['median_s'])})"
        if ok
        else f"none; best recall {best['recall']:.4f} at window={best['window']}, "
        f"n_curves={best['n_curves']}"
    )
    goals = {
        "recall_0.95": _goal(
            f"recall@{TOPK} >= {GOAL_RECALL} (causal, N={_kib(n)})", best["recall"], bool(ok), note
        )
    }
    _print_goals(goals)
    rep["results"] = {"exact_knn_s": t_exact, "check_vs_zeta_recall": check, "settings": rows}
    rep["goals"] = goals
    return rep


def _plot_recall(rep: Dict[str, Any], png: Path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    rows = rep["results"]["settings"]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for c, color in zip(CURVES, ("tab:blue", "tab:orange", "tab:green")):
        rr = sorted((r for r in rows if r["n_curves"] == c), key=lambda r: r["window"])
        ax.plot(
            [r["median_s"] for r in rr],
            [r["recall"] for r in rr],
            marker="o",
            color=color,
            label=f"n_curves={c}",
        )
        for r in rr:
            ax.annotate(
                f"w{r['window']}",
                (r["median_s"], r["recall"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=color,
            )
    ax.axhline(GOAL_RECALL, color="green", ls="--", lw=1, label=f"goal {GOAL_RECALL}")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per zeta.knn call (median)")
    ax.set_ylabel(f"recall@{TOPK}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    cfg = rep["config"]
    ax.set_title(
        f"zeta.knn causal recall vs time, Gaussian 3-D, N={cfg['N']:,}, topk={TOPK}\n"
        f"({rep['machine']['tag']}, {rep['date']}, load avg {rep['load_avg']['start']}); "
        "labels: window",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# knn: zeta (non-causal) vs faiss flat vs hnswlib
# --------------------------------------------------------------------------------------


def bench_knn(quick: bool) -> Dict[str, Any]:
    import zeta

    n = RECALL_N_QUICK if quick else RECALL_N
    reps = 2 if quick else 3
    faiss, why_f = _optional("faiss")
    hnswlib, why_h = _optional("hnswlib")
    threads = os.cpu_count() or 1
    rep = _base_report(
        "knn",
        quick,
        {
            "queries": n,
            "keys": n,
            "d": DK,
            "k": TOPK,
            "causal": False,
            "data": "Gaussian q, k",
            "zeta_windows": WINDOWS,
            "zeta_n_curves": CURVES,
            "hnsw_builds": HNSW_BUILDS,
            "hnsw_efs": HNSW_EFS,
            "threads": threads,
            "timing": "zeta: median of calls (index build included); faiss: add + search; hnswlib: "
            "build (once) + query (median)",
            "recall": "vs faiss IndexFlatL2 (exact): a returned key counts when its float64 distance "
            "is <= the exact k-th one (as zeta.recall)",
        },
    )
    print(
        f"\n== knn: {_kib(n)} queries x {_kib(n)} keys, 3-D Gaussian, k={TOPK}, non-causal; "
        f"zeta.knn vs faiss IndexFlatL2 vs hnswlib ({threads} threads)"
    )
    q, k = _gauss(n)
    q2, k2 = q[0, 0], k[0, 0]
    res: Dict[str, Any] = {"faiss_flat": None, "hnsw": [], "zeta": []}
    total = 1 + len(WINDOWS) * len(CURVES) + len(HNSW_BUILDS)
    ex_d2 = None
    with progress(total, "knn", "cfg") as bar:
        if faiss is not None:
            faiss.omp_set_num_threads(threads)
            out: Dict[str, Any] = {}

            def fcall():
                ix = faiss.IndexFlatL2(DK)
                ix.add(k2)
                out["D"], out["I"] = ix.search(q2, TOPK)

            ft = _time(fcall, 2 if n <= 16384 else 1)
            fI = out["I"].astype(np.int64)
            ex_d2 = _true_d2(q2, k2, fI)[None, None]
            m = min(n, 2000)  # sanity: faiss vs zeta.exact_knn on a subsample
            _, sub_d2 = zeta.exact_knn(
                q[:, :, :m].astype(np.float64), k.astype(np.float64), TOPK, causal=False
            )
            chk = recall_from_exact(q[:, :, :m], k, fI[None, None, :m], sub_d2, causal=False)
            res["faiss_flat"] = {
                "median_s": _med(ft),
                "times_s": ft,
                "recall": 1.0,
                "recall_vs_zeta_exact_knn_first_2000": chk,
                "load_avg": loadavg(),
            }
        else:
            print(f"  faiss skipped: {why_f}; recall oracle: zeta.exact_knn")
            _, ex_d2 = zeta.exact_knn(
                q.astype(np.float64), k.astype(np.float64), TOPK, causal=False
            )
        bar.update(1)
        time.sleep(0.5)  # let faiss's OpenMP threads stop spinning before timing zeta
        for c in CURVES:
            for w in WINDOWS:
                idx = None

                def call(w=w, c=c):
                    nonlocal idx
                    idx, _ = zeta.knn(q, k, TOPK, causal=False, window=w, n_curves=c)

                times = _time(call, reps, budget_s=20)
                res["zeta"].append(
                    {
                        "window": w,
                        "n_curves": c,
                        "median_s": _med(times),
                        "times_s": times,
                        "recall": recall_from_exact(q, k, idx, ex_d2, causal=False),
                        "load_avg": loadavg(),
                    }
                )
                bar.update(1)
        if hnswlib is not None:
            for M, efc in HNSW_BUILDS:
                t0 = time.perf_counter()
                ix = hnswlib.Index(space="l2", dim=DK)
                ix.init_index(max_elements=n, M=M, ef_construction=efc, random_seed=SEED)
                ix.add_items(k2, num_threads=threads)
                tb = time.perf_counter() - t0
                for ef in HNSW_EFS:
                    ix.set_ef(ef)
                    got: Dict[str, Any] = {}

                    def hq(ix=ix, got=got):
                        got["L"] = ix.knn_query(q2, k=TOPK, num_threads=threads)[0]

                    tq = _time(hq, 1 if quick else 2)
                    rec = recall_from_exact(
                        q, k, got["L"].astype(np.int64)[None, None], ex_d2, causal=False
                    )
                    res["hnsw"].append(
                        {
                            "M": M,
                            "ef_construction": efc,
                            "ef": ef,
                            "build_s": tb,
                            "query_s": _med(tq),
                            "total_s": tb + _med(tq),
                            "recall": rec,
                            "default": (M, efc, ef) == (16, 200, 10),
                            "load_avg": loadavg(),
                        }
                    )
                del ix
                bar.update(1)
        else:
            print(f"  hnswlib skipped: {why_h}")
            bar.update(len(HNSW_BUILDS))

    ft = res["faiss_flat"]["median_s"] if res["faiss_flat"] else None
    print(f"  {'method':40s} {'recall':>8s} {'time':>10s} {'vs faiss':>9s}")
    if ft is not None:
        print(
            f"  {'faiss IndexFlatL2 (add+search)':40s} {1.0:>8.4f} {_fmt_s(ft):>10s} {'1.00x':>9s}"
            f"   (vs zeta.exact_knn on 2000 queries: "
            f"{res['faiss_flat']['recall_vs_zeta_exact_knn_first_2000']:.4f})"
        )
    for h in res["hnsw"]:
        name = f"hnswlib M={h['M']} efc={h['ef_construction']} ef={h['ef']}" + (
            " (default)" if h["default"] else ""
        )
        print(
            f"  {name:40s} {h['recall']:>8.4f} {_fmt_s(h['total_s']):>10s} "
            f"{_fmt_x(_ratio(ft, h['total_s'])):>9s}   (build {_fmt_s(h['build_s'])} + query "
            f"{_fmt_s(h['query_s'])})"
        )
    for z in res["zeta"]:
        name = f"zeta.knn window={z['window']} n_curves={z['n_curves']}"
        print(
            f"  {name:40s} {z['recall']:>8.4f} {_fmt_s(z['median_s']):>10s} "
            f"{_fmt_x(_ratio(ft, z['median_s'])):>9s}"
        )

    goals: Dict[str, Any] = {}
    ok = [z for z in res["zeta"] if z["recall"] >= GOAL_RECALL]
    best = (
        min(ok, key=lambda z: z["median_s"]) if ok else max(res["zeta"], key=lambda z: z["recall"])
    )
    res["zeta_best"] = {
        "window": best["window"],
        "n_curves": best["n_curves"],
        "reaches_goal_recall": bool(ok),
    }
    bdesc = (
        f"window={best['window']}, n_curves={best['n_curves']}, recall {best['recall']:.4f}, "
        f"{_fmt_s(best['median_s'])}"
    )
    if ft is None:
        goals["x_faiss_flat"] = _goal(
            f">= {GOAL_KNN_X_FAISS:.0f}x faster than faiss flat at recall >= {GOAL_RECALL}",
            None,
            None,
            f"faiss: {why_f}",
        )
    elif ok:
        r = ft / best["median_s"]
        goals["x_faiss_flat"] = _goal(
            f">= {GOAL_KNN_X_FAISS:.0f}x faster than faiss flat at recall >= {GOAL_RECALL}",
            r,
            r >= GOAL_KNN_X_FAISS,
            f"{_fmt_x(r)}: fastest zeta setting reaching it: {bdesc}; faiss {_fmt_s(ft)}",
        )
    else:
        goals["x_faiss_flat"] = _goal(
            f">= {GOAL_KNN_X_FAISS:.0f}x faster than faiss flat at recall >= {GOAL_RECALL}",
            None,
            False,
            f"no zeta setting reaches recall {GOAL_RECALL} (best {bdesc})",
        )
    if res["hnsw"]:
        match = [h for h in res["hnsw"] if h["recall"] >= best["recall"]]
        if match:
            hb = min(match, key=lambda h: h["total_s"])
            r = hb["total_s"] / best["median_s"]
            note = (
                f"{_fmt_x(r)}: zeta ({bdesc}) vs the cheapest hnswlib with recall >= zeta's: "
                f"M={hb['M']} efc={hb['ef_construction']} ef={hb['ef']}, recall "
                f"{hb['recall']:.4f}, {_fmt_s(hb['total_s'])} (build + query)"
            )
        else:
            hb = max(res["hnsw"], key=lambda h: h["recall"])
            r = hb["total_s"] / best["median_s"]
            note = (
                f"no hnswlib setting reaches zeta's recall; vs its best ({hb['recall']:.4f}, "
                f"{_fmt_s(hb['total_s'])}): {_fmt_x(r)}"
            )
        goals["faster_than_hnsw"] = _goal(
            "faster than hnswlib (build + query) at equal recall", r, r > 1.0, note
        )
        dflt = next((h for h in res["hnsw"] if h["default"]), None)
        if dflt:
            res["hnsw_default"] = dflt
            print(
                f"  hnswlib at its defaults (M=16, efc=200, ef=10 -> k): recall {dflt['recall']:.4f}, "
                f"{_fmt_s(dflt['total_s'])}; zeta ({bdesc}) is {_fmt_x(dflt['total_s'] / best['median_s'])} "
                "faster"
            )
    else:
        goals["faster_than_hnsw"] = _goal(
            "faster than hnswlib at equal recall", None, None, f"hnswlib: {why_h}"
        )
    _print_goals(goals)
    rep["results"] = res
    rep["goals"] = goals
    return rep


def _plot_knn(rep: Dict[str, Any], png: Path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    res = rep["results"]
    fig, ax = plt.subplots(figsize=(9, 5.8))
    for c, color in zip(CURVES, ("tab:blue", "tab:cyan", "tab:purple")):
        zz = sorted((z for z in res["zeta"] if z["n_curves"] == c), key=lambda z: z["window"])
        ax.plot(
            [z["median_s"] for z in zz],
            [z["recall"] for z in zz],
            marker="o",
            color=color,
            label=f"zeta.knn n_curves={c} (labels: window)",
        )
        for z in zz:
            ax.annotate(
                f"w{z['window']}",
                (z["median_s"], z["recall"]),
                textcoords="offset points",
                xytext=(3, -10),
                fontsize=7,
                color=color,
            )
    for (M, efc), color in zip(HNSW_BUILDS, ("tab:orange", "tab:olive", "tab:brown")):
        hh = [h for h in res["hnsw"] if (h["M"], h["ef_construction"]) == (M, efc)]
        if hh:
            ax.plot(
                [h["total_s"] for h in hh],
                [h["recall"] for h in hh],
                marker="^",
                ls="--",
                color=color,
                label=f"hnswlib M={M} efc={efc} (labels: ef), build+query",
            )
            for h in hh:
                ax.annotate(
                    f"ef{h['ef']}",
                    (h["total_s"], h["recall"]),
                    textcoords="offset points",
                    xytext=(3, 4),
                    fontsize=7,
                    color=color,
                )
    if res["faiss_flat"]:
        ax.scatter(
            [res["faiss_flat"]["median_s"]],
            [1.0],
            marker="*",
            s=160,
            color="tab:red",
            label="faiss IndexFlatL2 (exact), add+search",
            zorder=5,
        )
    ax.axhline(GOAL_RECALL, color="green", ls=":", lw=1, label=f"recall {GOAL_RECALL}")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log): zeta per call incl. index build; hnswlib build + query")
    ax.set_ylabel(f"recall@{TOPK} (vs exact)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    cfg = rep["config"]
    ax.set_title(
        f"k-NN, {cfg['queries']:,} queries x {cfg['keys']:,} keys, 3-D Gaussian, "
        f"k={TOPK}, non-causal\n({rep['machine']['tag']}, {rep['date']}, "
        f"load avg {rep['load_avg']['start']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# decode: KVCache vs dense decode in numpy and torch
# --------------------------------------------------------------------------------------


_VBLOCK = 16384


class _Values:
    """Decode values (H, S_total, d_v) float32, block-seeded so any range can be regenerated.

    With ``dense_heads == H`` (the machine holds it) the whole array is generated once and the
    cache is extended from it; the dense baselines read the same array. Otherwise only the first
    ``dense_heads`` heads are kept (for the dense baselines) and the cache's blocks are
    regenerated from their seeds.
    """

    def __init__(self, h: int, total: int, dv: int, dense_heads: int):
        self.h, self.total, self.dv, self.dh = h, total, dv, dense_heads
        self.dense = np.empty((dense_heads, total, dv), np.float32)
        self._blk: Tuple[int, Optional[np.ndarray]] = (-1, None)
        for a in range(0, total, _VBLOCK):
            b = min(total, a + _VBLOCK)
            self.dense[:, a:b] = self._block(a // _VBLOCK)[:dense_heads, : b - a]

    def _block(self, i: int) -> np.ndarray:
        if self._blk[0] != i:
            rng = np.random.default_rng([SEED, i])
            self._blk = (i, rng.standard_normal((self.h, _VBLOCK, self.dv), dtype=np.float32))
        return self._blk[1]  # type: ignore[return-value]

    def get(self, a: int, b: int) -> np.ndarray:
        """(1, H, b - a, d_v)."""
        if self.dh == self.h:
            return self.dense[None, :, a:b]
        parts = []
        for i in range(a // _VBLOCK, (b - 1) // _VBLOCK + 1):
            lo = max(a, i * _VBLOCK) - i * _VBLOCK
            hi = min(b, (i + 1) * _VBLOCK) - i * _VBLOCK
            parts.append(self._block(i)[:, lo:hi])
        return np.concatenate(parts, axis=1)[None]


def _dense_np(keys: np.ndarray, vals: np.ndarray, q: np.ndarray, n: int, heads: int) -> np.ndarray:
    """Dense decode of one token per head: scores q.k for all n keys, softmax, weighted sum."""
    out = np.empty((heads, vals.shape[-1]), np.float32)
    for h in range(heads):
        s = keys[h, :n] @ q[h]
        s -= s.max()
        np.exp(s, out=s)
        out[h] = (s @ vals[h, :n]) / s.sum()
    return out


def _dense_torch(torch, keys_t, vals_t, q_t, n: int, heads: int):
    with torch.no_grad():
        outs = []
        for h in range(heads):
            w = torch.softmax(keys_t[h, :n] @ q_t[h], dim=0)
            outs.append(w @ vals_t[h, :n])
        return torch.stack(outs)


def bench_decode(quick: bool) -> Dict[str, Any]:
    import zeta

    sizes = DEC_S_QUICK if quick else DEC_S
    H, dv = DEC_H, DEC_DV
    steps = DEC_STEPS
    dense_budget = 2.0 if quick else 8.0
    torch, why_t = _optional("torch")
    total = max(sizes) + steps * len(sizes) + 1
    val_bytes = H * total * dv * 4
    cache_est = total * (H * dv * 4 + H * 40)
    avail = _mem_available()
    dense_heads = H
    mem_note = "values generated once as one numpy array; the cache is extended from it and the dense baselines read it"
    if avail is not None and avail < 1.3 * (val_bytes + cache_est) + (1 << 30):
        room = avail - 1.3 * cache_est - (1 << 30)
        dense_heads = int(max(1, min(H, room // (1.3 * val_bytes / H))))
        mem_note = (
            f"only {avail / 2**30:.1f} GiB available: the dense baselines run on "
            f"{dense_heads} of {H} heads and are scaled per head x{H / dense_heads:g}"
        )
    rep = _base_report(
        "decode",
        quick,
        {
            "H_kv": H,
            "H": H,
            "d_k": DK,
            "d_v": dv,
            "topk": TOPK,
            "gamma": 1.0,
            "cache": "zeta.KVCache defaults (chunk 64, window = topk, n_curves 1)",
            "S": sizes,
            "decode_steps": steps,
            "values": "float32 (float16 cache also at the largest S)",
            "dense": "all S keys: q.k scores + softmax + weighted sum of values, all heads, numpy and "
            "torch (no_grad), on the same arrays as the cache",
            "dense_heads": dense_heads,
            "memory_note": mem_note,
            "timing": "median per token over the decode steps (each step extends one token first); "
            f"zeta steps run first, then dense on the same {H} heads (as many steps as fit "
            f"in {dense_budget:g} s per method and S, at least 3, at most {steps})",
        },
    )
    print(
        f"\n== decode: zeta.KVCache H={H} d_k={DK} d_v={dv} topk={TOPK}, S = "
        f"{', '.join(_kib(s) for s in sizes)}; vs dense decode (numpy, torch)"
    )
    print(f"  memory: {mem_note}")
    if torch is None:
        print(f"  torch dense skipped: {why_t}")
    rng = np.random.default_rng(SEED)
    keys = rng.standard_normal((1, H, total, DK), dtype=np.float32)
    t0 = time.perf_counter()
    vals = _Values(H, total, dv, dense_heads)
    t_gen = time.perf_counter() - t0
    kd = keys[0]
    if torch is not None:
        kd_t, vd_t = torch.from_numpy(kd), torch.from_numpy(vals.dense)
    rows: List[Dict[str, Any]] = []
    cache = zeta.KVCache(H, DK, dv)
    t_build = 0.0
    extra: Dict[str, Any] = {"values_generation_s": t_gen}
    scale = H / dense_heads
    qrng = np.random.default_rng(SEED + 1)
    with progress(len(sizes) + 2, "decode", "stage") as bar:
        for S in sizes:
            a0, tb = len(cache), 0.0
            for a in range(a0, S, 8192):
                b = min(S, a + 8192)
                kb, vb = keys[:, :, a:b], vals.get(a, b)
                t1 = time.perf_counter()
                cache.extend(kb, vb)
                tb += time.perf_counter() - t1
            t_build += tb
            row: Dict[str, Any] = {
                "S": S,
                "extend_tokens": S - a0,
                "extend_tokens_per_s": (S - a0) / tb if tb else None,
                "bytes_per_token": cache.nbytes / len(cache),
            }
            # zeta first, in a loop of its own: the dense baselines' BLAS/OpenMP threads keep
            # spinning for a while after each call and would steal the 2 cores from zeta's pool
            time.sleep(0.5)
            lz, le, ln, lt, diff = [], [], [], [], 0.0
            for _ in range(steps):
                p = len(cache)
                kb, vb = keys[:, :, p : p + 1], vals.get(p, p + 1)
                t1 = time.perf_counter()
                cache.extend(kb, vb)
                le.append(time.perf_counter() - t1)
                q = qrng.standard_normal((1, H, 1, DK), dtype=np.float32)
                t1 = time.perf_counter()
                cache.attend(q, topk=TOPK)
                lz.append(time.perf_counter() - t1)
            # then dense decode over the same cache contents (all n = len(cache) tokens)
            n = len(cache)
            while len(ln) < 3 or (sum(ln) + sum(lt) < 2 * dense_budget and len(ln) < steps):
                qh = qrng.standard_normal((H, DK), dtype=np.float32)
                t1 = time.perf_counter()
                o_np = _dense_np(kd, vals.dense, qh, n, dense_heads)
                ln.append(time.perf_counter() - t1)
                if torch is not None:
                    q_t = torch.from_numpy(qh)
                    t1 = time.perf_counter()
                    o_t = _dense_torch(torch, kd_t, vd_t, q_t, n, dense_heads)
                    lt.append(time.perf_counter() - t1)
                    diff = max(diff, float(np.abs(o_t.numpy() - o_np).max()))
            row.update(
                {
                    "cache_len_at_end": len(cache),
                    "zeta_us_per_token": _med(lz) * 1e6,
                    "zeta_us_per_token_per_head": _med(lz) * 1e6 / H,
                    "zeta_steps": len(lz),
                    "extend_one_us": _med(le) * 1e6,
                    "dense_numpy_us_per_token": _med(ln) * 1e6 * scale,
                    "dense_numpy_steps": len(ln),
                    "dense_torch_us_per_token": _med(lt) * 1e6 * scale if lt else None,
                    "dense_torch_steps": len(lt),
                    "dense_scaled_from_heads": dense_heads if dense_heads < H else None,
                    "dense_numpy_vs_torch_max_abs_diff": diff if lt else None,
                    "load_avg": loadavg(),
                }
            )
            best_dense = min(
                x for x in (row["dense_numpy_us_per_token"], row["dense_torch_us_per_token"]) if x
            )
            row["dense_best_x"] = best_dense / row["zeta_us_per_token"]
            rows.append(row)
            bar.update(1)

        # recall of the decode path at the largest S: zeta.knn with the cache's settings on the
        # final keys, the last T positions as queries, against exact_knn on the same queries
        L = len(cache)
        T = 128 if quick else 256
        kf = np.ascontiguousarray(keys[:, :, :L])
        qT = np.random.default_rng(SEED + 2).standard_normal((1, H, T, DK), dtype=np.float32)
        t1 = time.perf_counter()
        idx, _ = zeta.knn(qT, kf, TOPK, causal=True)
        t_knn = time.perf_counter() - t1
        t1 = time.perf_counter()
        _, ex_d2 = zeta.exact_knn(qT.astype(np.float64), kf.astype(np.float64), TOPK, causal=True)
        t_ex = time.perf_counter() - t1
        rec = recall_from_exact(qT, kf, idx, ex_d2, causal=True)
        extra["recall"] = {
            "S": L,
            "queries": T,
            "heads": H,
            "recall": rec,
            "knn_s": t_knn,
            "exact_knn_s": t_ex,
            "how": "zeta.knn(q (1,H,T,3), keys (1,H,S,3), causal; cache settings) "
            "vs zeta.exact_knn on the same queries (the last T positions)",
        }
        del kf
        bar.update(1)

        # float16 values at the largest S
        S = sizes[-1]
        f32_bytes = cache.nbytes
        del cache
        gc.collect()
        need16 = total * (H * dv * 2 + H * 40)
        avail = _mem_available()
        if avail is not None and avail < 1.3 * need16 + (1 << 29):
            extra["float16"] = {
                "S": S,
                "status": f"not run: {avail / 2**30:.1f} GiB available, "
                f"needs ~{need16 / 2**30:.1f} GiB",
            }
        else:
            c16 = zeta.KVCache(H, DK, dv, dtype="float16")
            tb = 0.0
            for a in range(0, S, 8192):
                b = min(S, a + 8192)
                kb, vb = keys[:, :, a:b], vals.get(a, b)
                t1 = time.perf_counter()
                c16.extend(kb, vb)
                tb += time.perf_counter() - t1
            lz = []
            for _ in range(steps):
                p = len(c16)
                c16.extend(keys[:, :, p : p + 1], vals.get(p, p + 1))
                q = qrng.standard_normal((1, H, 1, DK), dtype=np.float32)
                t1 = time.perf_counter()
                c16.attend(q, topk=TOPK)
                lz.append(time.perf_counter() - t1)
            extra["float16"] = {
                "S": S,
                "status": "ok",
                "extend_tokens_per_s": S / tb,
                "bytes_per_token": c16.nbytes / len(c16),
                "nbytes": c16.nbytes,
                "float32_nbytes": f32_bytes,
                "zeta_us_per_token": _med(lz) * 1e6,
                "zeta_us_per_token_per_head": _med(lz) * 1e6 / H,
                "load_avg": loadavg(),
            }
            del c16
        bar.update(1)
    extra["extend_total_s"] = t_build

    print(
        f"  {'S':>6s} {'extend tok/s':>13s} {'B/token':>8s} | {'zeta/token':>11s} {'per head':>9s} | "
        f"{'numpy dense':>12s} {'x':>7s} | {'torch dense':>12s} {'x':>7s}"
    )
    for r in rows:
        print(
            f"  {_kib(r['S']):>6s} {r['extend_tokens_per_s']:>13,.0f} {r['bytes_per_token']:>8,.0f} | "
            f"{_fmt_s(r['zeta_us_per_token'] * 1e-6):>11s} {r['zeta_us_per_token_per_head']:>6.1f} us | "
            f"{_fmt_s(r['dense_numpy_us_per_token'] * 1e-6):>12s} "
            f"{_fmt_x(r['dense_numpy_us_per_token'] / r['zeta_us_per_token']):>7s} | "
            f"{_fmt_s(r['dense_torch_us_per_token'] * 1e-6 if r['dense_torch_us_per_token'] else None):>12s} "
            f"{_fmt_x(_ratio(r['dense_torch_us_per_token'], r['zeta_us_per_token'])):>7s}"
        )
    f16 = extra["float16"]
    if f16["status"] == "ok":
        print(
            f"  float16 values, S={_kib(f16['S'])}: {f16['extend_tokens_per_s']:,.0f} tok/s, "
            f"{f16['bytes_per_token']:,.0f} B/token, {f16['zeta_us_per_token']:.1f} us/token "
            f"({f16['zeta_us_per_token_per_head']:.1f} us per head)"
        )
    else:
        print(f"  float16: {f16['status']}")
    rc = extra["recall"]
    print(
        f"  recall@{TOPK} of the decode path at S={rc['S']:,} ({rc['queries']} query positions x "
        f"{H} heads): {rc['recall']:.4f}"
    )
    if dense_heads < H:
        print(f"  note: {mem_note}")

    big = next((r for r in rows if r["S"] == GOAL_DEC_S), None)
    goals: Dict[str, Any] = {}
    if big is None:
        goals["us_per_head_1M"] = _goal(
            f"<= {GOAL_US_PER_HEAD:.0f} us per token per head at S=1M", None, None, "S=1M not run"
        )
        goals["x_dense_1M"] = _goal(
            f">= {GOAL_DENSE_X:.0f}x faster than dense at S=1M", None, None, "S=1M not run"
        )
    else:
        v = big["zeta_us_per_token_per_head"]
        goals["us_per_head_1M"] = _goal(
            f"<= {GOAL_US_PER_HEAD:.0f} us per token per head at S=1M",
            v,
            v <= GOAL_US_PER_HEAD,
            f"{v:.1f} us per head ({big['zeta_us_per_token']:.0f} us per token, {H} heads)",
        )
        r = big["dense_best_x"]
        goals["x_dense_1M"] = _goal(
            f">= {GOAL_DENSE_X:.0f}x faster than dense decode at S=1M (the faster of numpy/torch)",
            r,
            r >= GOAL_DENSE_X,
            f"{_fmt_x(r)}: numpy {_fmt_s(big['dense_numpy_us_per_token'] * 1e-6)}, torch "
            f"{_fmt_s(big['dense_torch_us_per_token'] * 1e-6 if big['dense_torch_us_per_token'] else None)}, "
            f"zeta {_fmt_s(big['zeta_us_per_token'] * 1e-6)} per token",
        )
    _print_goals(goals)
    rep["results"] = {"sizes": rows, **extra}
    rep["goals"] = goals
    return rep


def _plot_decode(rep: Dict[str, Any], png: Path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    res = rep["results"]
    rows = res["sizes"]
    S = [r["S"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.4))
    ax = axes[0]
    ax.plot(
        S,
        [r["zeta_us_per_token"] for r in rows],
        "o-",
        color="tab:blue",
        label="zeta KVCache.attend (float32 values)",
    )
    ax.plot(
        S,
        [r["dense_numpy_us_per_token"] for r in rows],
        "s--",
        color="tab:orange",
        label="dense decode, numpy",
    )
    tt = [(r["S"], r["dense_torch_us_per_token"]) for r in rows if r["dense_torch_us_per_token"]]
    if tt:
        ax.plot(*zip(*tt), "^--", color="tab:red", label="dense decode, torch")
    f16 = res.get("float16", {})
    if f16.get("status") == "ok":
        ax.scatter(
            [f16["S"]],
            [f16["zeta_us_per_token"]],
            marker="D",
            color="tab:cyan",
            zorder=5,
            label="zeta, float16 values",
        )
    for r in rows:
        ax.annotate(
            _fmt_x(r["dense_best_x"]),
            (r["S"], r["zeta_us_per_token"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
            color="tab:blue",
        )
    ax.axhline(
        GOAL_US_PER_HEAD * rep["config"]["H"],
        color="green",
        ls=":",
        lw=1,
        label=f"goal: {GOAL_US_PER_HEAD:.0f} us per head ({rep['config']['H']} heads)",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(S)
    ax.set_xticklabels([_kib(s) for s in S])
    ax.set_xlabel("cache length S (tokens)")
    ax.set_ylabel("us per decoded token, all heads (median)")
    ax.set_title("per-token decode latency (labels: zeta vs the faster dense)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo / 2, hi * 2)
    ax.legend(fontsize=8, loc="center right", bbox_to_anchor=(1.0, 0.45), framealpha=0.9)
    ax = axes[1]
    ax.plot(
        S,
        [r["bytes_per_token"] for r in rows],
        "o-",
        color="tab:blue",
        label="zeta, float32 values",
    )
    if f16.get("status") == "ok":
        ax.scatter(
            [f16["S"]],
            [f16["bytes_per_token"]],
            marker="D",
            color="tab:cyan",
            zorder=5,
            label="zeta, float16 values",
        )
    cfg = rep["config"]
    raw = cfg["H"] * (cfg["d_k"] + cfg["d_v"]) * 4
    ax.axhline(raw, color="gray", ls="--", lw=1, label=f"raw float32 keys + values ({raw:,} B)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(S)
    ax.set_xticklabels([_kib(s) for s in S])
    ax.set_ylim(0, max(r["bytes_per_token"] for r in rows) * 1.2)
    ax.set_xlabel("cache length S (tokens)")
    ax.set_ylabel("bytes per token (cache.nbytes / len)")
    ax.set_title("memory held per token", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    note = f"; dense on {cfg['dense_heads']} heads, scaled" if cfg["dense_heads"] < cfg["H"] else ""
    fig.suptitle(
        f"zeta KVCache decode, H={cfg['H']} d_k={cfg['d_k']} d_v={cfg['d_v']} topk={TOPK} "
        f"({rep['machine']['tag']}, {rep['date']}, load avg {rep['load_avg']['start']}{note})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

_RUN = {
    "attention": (bench_attention, _plot_attention),
    "recall": (bench_recall, _plot_recall),
    "knn": (bench_knn, _plot_knn),
    "decode": (bench_decode, _plot_decode),
}


def default_out() -> Path:
    p = Path("benches") / "results"
    return p if p.is_dir() else Path("zeta-bench-results")


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(prog="zeta bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (~3 min)")
    ap.add_argument(
        "--out",
        help="output folder (default benches/results if it exists, else ./zeta-bench-results)",
    )
    ap.add_argument(
        "--only", action="append", choices=SUITES, help="run only this suite (repeatable)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_attention_worker(**json.loads(a.worker))))
        return {}
    out = Path(a.out) if a.out else default_out()
    suites = [s for s in SUITES if s in a.only] if a.only else list(SUITES)
    import zeta

    print(
        f"zeta bench {zeta.__version__}: {', '.join(suites)}{' (quick)' if a.quick else ''} | "
        f"machine {machine_tag()} | load avg {loadavg()} | out {os.path.relpath(out)}"
    )
    for name in ("torch", "faiss", "hnswlib", "matplotlib"):
        if _optional(name)[0] is None:
            print(f"  {name} missing: its comparisons/plots are skipped")
    reports = {}
    t0 = time.perf_counter()
    for s in suites:
        fn, plot = _RUN[s]
        ts = time.perf_counter()
        rep = fn(a.quick)
        rep["wall_s"] = time.perf_counter() - ts
        _write(rep, out, plot)
        reports[s] = rep
    print(f"\ndone in {time.perf_counter() - t0:.0f} s (load avg {loadavg()})")
    return reports


if __name__ == "__main__":
    main()
