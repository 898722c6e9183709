"""ZETA top-k attention vs torch SDPA: forward and forward+backward time and peak memory vs N.

Usage: python benches/bench_attention.py [--quick] [--out DIR]

B=1, H=8, d_k=3, d_v=64, topk=32, float32, causal; N = 4k..128k (quick: 4k..16k). SDPA runs
with head dim 64 (for q, k and v, same H) up to N=32k (forward) and 16k (forward+backward).
"zeta" is ``zeta.attention``'s defaults: exact search (the brute-force top-k). The forward
with the window search (``exact=False``: 2 curves, window 4 * topk, recall@32 ~0.94) and with
1 curve, window 32 (the fast approximate setting, the defaults before both: recall@32 ~0.56)
run at N=32k (quick: 16k) in the same run.
Each config runs in a fresh subprocess (this script with ``--worker``): the time is the
median of repeats after a warm-up call at N=1024 and one untimed call of the same size, the
memory the peak RSS increase of that untimed call (``ru_maxrss`` delta; the Rust
allocations are invisible to tracemalloc).

Writes ``benches/results/attention-<machine tag>-<date>.json`` and a ``.png``.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from _common import (
    DK,
    SEED,
    TOPK,
    base_report,
    fmt_s,
    fmt_x,
    goal,
    kib,
    loadavg,
    maxrss_mb,
    med,
    optional,
    print_goals,
    progress,
    pyplot,
    ratio,
    save_figure,
    suite_main,
)

ATTN_H, ATTN_DV = 8, 64
ATTN_N = [4096, 8192, 16384, 32768, 65536, 131072]
ATTN_N_QUICK = [4096, 8192, 16384]
SDPA_MAX_N = {"fwd": 32768, "fwdbwd": 16384}
SDPA_MAX_N_QUICK = {"fwd": 16384, "fwdbwd": 8192}
GOAL_FWD_X_SDPA, GOAL_FWD_X_SDPA_N = 50.0, 32768
GOAL_FWDBWD_X_SDPA = 20.0
GOAL_SCALING = 9.7  # zeta forward t(128k) / t(16k): N log N, 8 * 17 / 14 (issue 10)
GOAL_EXACT_FWD_X_SDPA = 30.0  # exact=True forward vs SDPA at N=32k (issue 10)
ATTN_EXACT_N = [32768]
ATTN_EXACT_N_QUICK = [16384]


def _attention_worker(method: str, mode: str, n: int, reps: int) -> Dict[str, Any]:
    """Runs in its own process: warm up at N=1024, then `reps` timed calls at N."""
    torch, why = optional("torch")
    if torch is None and (method == "sdpa" or mode == "fwdbwd"):
        return {"status": f"not run: {why}"}
    import zeta

    def make(nn: int):
        rng = np.random.default_rng(SEED + nn)
        if method.startswith("zeta"):
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
        elif method == "zeta_window":
            out = zeta.attention(*ts, topk=TOPK, causal=True, exact=False)
        elif method == "zeta_1c":
            out = zeta.attention(*ts, topk=TOPK, causal=True, n_curves=1, window=TOPK, exact=False)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(*ts, is_causal=True)
        if mode == "fwdbwd":
            out.sum().backward()
            for t in ts:
                t.grad = None

    warm = make(1024)  # imports, thread pools, kernels' first use
    call(warm)
    del warm
    # One untimed call at the measured size: the first call of a size touches fresh memory
    # (zeta's allocator keeps it for the next calls, as in a training or decode loop). The
    # peak RSS is read on it.
    ts = make(n)
    gc.collect()
    rss0 = maxrss_mb()
    call(ts)
    peak = maxrss_mb() - rss0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call(ts)
        times.append(time.perf_counter() - t0)
    return {
        "status": "ok",
        "median_s": med(times),
        "times_s": times,
        "reps": len(times),
        "peak_rss_increase_mb": peak,
        "inputs": "torch" if torch is not None else "numpy",
        "torch_threads": torch.get_num_threads() if torch is not None else None,
    }


def _run_attention_worker(method: str, mode: str, n: int, reps: int) -> Dict[str, Any]:
    cfg = json.dumps({"method": method, "mode": mode, "n": n, "reps": reps})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", cfg]
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
    if method in ("zeta_window", "zeta_1c"):
        return 2
    if method == "sdpa":
        return 1 if n > 8192 else (3 if n <= 4096 or not quick else 2)
    if quick:
        return 3 if n <= 8192 else 2
    return 5 if n <= 8192 else 3 if n <= 32768 else 2


def bench_attention(quick: bool) -> Dict[str, Any]:
    ns = ATTN_N_QUICK if quick else ATTN_N
    exact_ns = [n for n in (ATTN_EXACT_N_QUICK if quick else ATTN_EXACT_N) if n in ns]
    sdpa_max = SDPA_MAX_N_QUICK if quick else SDPA_MAX_N
    torch, why = optional("torch")
    rep = base_report(
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
            "exact_n": exact_ns,
            "timing": "median of repeats, each config in a fresh subprocess after a warm-up call at "
            "N=1024; SDPA 1 repeat above N=8192",
            "memory": "peak RSS increase (ru_maxrss after the first call minus before it, inputs "
            "already allocated), MB",
        },
    )
    print(
        f"\n== attention: B=1 H={ATTN_H} d_k={DK} d_v={ATTN_DV} topk={TOPK} float32 causal, "
        f"zeta vs SDPA (head dim {ATTN_DV}); N = {', '.join(kib(n) for n in ns)}"
    )
    if torch is None:
        print(f"  SDPA and forward+backward skipped: {why}")
    methods = ("zeta", "sdpa", "zeta_window", "zeta_1c")
    res: Dict[str, Any] = {m: {"fwd": {}, "fwdbwd": {}} for m in methods}
    jobs = [(m, "fwd", n) for n in exact_ns for m in ("zeta_window", "zeta_1c")]
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
            f"  {kib(n):>6s} | {fmt_s(t('zeta', 'fwd', n)):>9s} {fmt_s(t('sdpa', 'fwd', n)):>9s} "
            f"{fmt_x(ratio(t('sdpa', 'fwd', n), t('zeta', 'fwd', n))):>7s} | "
            f"{fmt_s(t('zeta', 'fwdbwd', n)):>9s} {fmt_s(t('sdpa', 'fwdbwd', n)):>9s} "
            f"{fmt_x(ratio(t('sdpa', 'fwdbwd', n), t('zeta', 'fwdbwd', n))):>7s} | {mems}"
        )
    for m in methods:
        for mode in ("fwd", "fwdbwd"):
            for n, r in res[m][mode].items():
                if r.get("status", "ok").startswith("error"):
                    print(f"  {m} {mode} N={n}: {r['status']}")

    goals: Dict[str, Any] = {}
    n32 = GOAL_FWD_X_SDPA_N
    r = ratio(t("sdpa", "fwd", n32), t("zeta", "fwd", n32))
    goals["fwd_x_sdpa_32k"] = goal(
        f">= {GOAL_FWD_X_SDPA:.0f}x faster forward than SDPA at N={kib(n32)}",
        r,
        None if r is None else r >= GOAL_FWD_X_SDPA,
        f"{fmt_x(r)}: zeta {fmt_s(t('zeta', 'fwd', n32))}, SDPA {fmt_s(t('sdpa', 'fwd', n32))}"
        if r is not None
        else f"N={kib(n32)} not run",
    )
    both = [n for n in ns if t("zeta", "fwdbwd", n) and t("sdpa", "fwdbwd", n)]
    if both:
        nb = max(both)
        r = ratio(t("sdpa", "fwdbwd", nb), t("zeta", "fwdbwd", nb))
        goals["fwdbwd_x_sdpa"] = goal(
            f">= {GOAL_FWDBWD_X_SDPA:.0f}x faster forward+backward than SDPA at the largest N "
            "where both ran",
            r,
            r >= GOAL_FWDBWD_X_SDPA,
            f"{fmt_x(r)} at N={kib(nb)}: zeta {fmt_s(t('zeta', 'fwdbwd', nb))}, "
            f"SDPA {fmt_s(t('sdpa', 'fwdbwd', nb))}",
        )
        goals["fwdbwd_x_sdpa"]["n"] = nb
    else:
        goals["fwdbwd_x_sdpa"] = goal(
            f">= {GOAL_FWDBWD_X_SDPA:.0f}x faster forward+backward than SDPA",
            None,
            None,
            "no N where both ran",
        )
    t128, t16 = t("zeta", "fwd", 131072), t("zeta", "fwd", 16384)
    r = ratio(t128, t16)
    goals["zeta_fwd_scaling_128k_16k"] = goal(
        f"zeta forward t(128k)/t(16k) <= {GOAL_SCALING} (8x the tokens)",
        r,
        None if r is None else r <= GOAL_SCALING,
        f"{r:.1f} ({fmt_s(t128)} / {fmt_s(t16)})" if r is not None else "N=128k not run",
    )
    for n in exact_ns:
        te, ts_, tw = t("zeta", "fwd", n), t("sdpa", "fwd", n), t("zeta_window", "fwd", n)
        r = ratio(ts_, te)
        print(
            f"  window search (exact=False) forward N={kib(n)}: {fmt_s(tw)} "
            f"({fmt_x(ratio(tw, te))} the exact default's {fmt_s(te)}); SDPA {fmt_s(ts_)}: "
            f"{fmt_x(ratio(ts_, tw))}"
        )
        goals[f"exact_fwd_x_sdpa_{kib(n)}"] = goal(
            f">= {GOAL_EXACT_FWD_X_SDPA:.0f}x faster exact forward (the default) than SDPA at "
            f"N={kib(n)}",
            r,
            None if r is None else r >= GOAL_EXACT_FWD_X_SDPA,
            f"{fmt_x(r)}: exact {fmt_s(te)}, window search {fmt_s(tw)}, SDPA {fmt_s(ts_)}"
            if r is not None
            else "not run",
        )
    for n in exact_ns:
        t1, ts_ = t("zeta_1c", "fwd", n), t("sdpa", "fwd", n)
        print(
            f"  1 curve, window {TOPK} forward N={kib(n)}: {fmt_s(t1)}; SDPA {fmt_s(ts_)}: "
            f"{fmt_x(ratio(ts_, t1))} (the defaults: {fmt_x(ratio(ts_, t('zeta', 'fwd', n)))})"
        )
    print_goals(goals)
    rep["results"] = res
    rep["goals"] = goals
    return rep


def _plot_attention(rep: Dict[str, Any], png: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    ns = rep["config"]["N"]
    res = rep["results"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    style = {
        "zeta": dict(color="tab:blue", marker="o"),
        "sdpa": dict(color="tab:red", marker="s"),
        "zeta_window": dict(color="tab:green", marker="*", ms=12),
        "zeta_1c": dict(color="tab:cyan", marker="^", ms=9),
    }
    label = {
        "zeta": f"zeta top-{TOPK} (d_k={DK}), defaults (exact search)",
        "sdpa": f"torch SDPA causal (head dim {ATTN_DV})",
        "zeta_window": f"zeta top-{TOPK}, window search (2 curves, window {4 * TOPK})",
        "zeta_1c": f"zeta top-{TOPK}, 1 curve, window {TOPK}",
    }
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for m in ("zeta", "sdpa", "zeta_window", "zeta_1c"):
            if m not in res:
                continue
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
                    fmt_x(b["median_s"] / a["median_s"]),
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
        ax.set_xticklabels([kib(n) for n in ns])
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
    ax.set_xticklabels([kib(n) for n in ns])
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("peak RSS increase per call (MB)")
    ax.set_title("memory: peak RSS increase (fresh process per config)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # tiny N: the RSS may not grow at all
        ax.legend(fontsize=8)
    la = rep["load_avg"]
    fig.suptitle(
        f"zeta attention vs SDPA, B=1 H={ATTN_H} d_v={ATTN_DV} float32 causal "
        f"({rep['machine']['tag']}, {rep['date']}, load avg {la['start']} -> {la.get('end')}); "
        "missing points: not run",
        fontsize=9,
    )
    save_figure(fig, png)
    return True


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(json.dumps(_attention_worker(**json.loads(argv[1]))))
        return {}
    return suite_main("attention", bench_attention, _plot_attention, __doc__, argv)


if __name__ == "__main__":
    main()
