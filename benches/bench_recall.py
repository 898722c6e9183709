"""recall@32 of the causal window search (``exact=False``) on Gaussian 3-D points vs window x
n_curves, with the time per call (exact neighbours computed once, in float64), of its defaults
(2 curves, window 4 * topk) and of zeta's defaults (exact search, recall 1); exact search
against the window search's defaults and against 1 curve with window 32 (the defaults before
both, the reference of issue 10's cost goal) per query, on one thread (a child process with
ZETA_NUM_THREADS=1) and on all threads, in the same run.

Usage: python benches/bench_recall.py [--quick] [--out DIR]

Writes ``benches/results/recall-<machine tag>-<date>.json`` and a ``.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from _common import (
    DK,
    TOPK,
    base_report,
    fmt_s,
    gauss,
    goal,
    kib,
    loadavg,
    med,
    print_goals,
    progress,
    pyplot,
    recall_from_exact,
    save_figure,
    suite_main,
    time_calls,
)

RECALL_N, RECALL_N_QUICK = 65536, 16384
WINDOWS = [8, 16, 32, 64, 128, 256]
CURVES = [1, 2, 3, 4]
GOAL_RECALL = 0.95
#: the defaults must find at least this share of the exact top-32 (issue 10)
GOAL_DEFAULT_RECALL = 0.9
#: the reference of the exact-search cost goal: the defaults when it was set
BEFORE = {"n_curves": 1, "window": TOPK, "exact": False}
#: exact search may cost this many times the default per query (issue 10)
GOAL_EXACT_RATIO = 1.5


def exact_vs_default(n: int, reps: int) -> Dict[str, Any]:
    """Seconds per zeta.knn call: zeta's defaults (exact search), the window search's
    defaults, the defaults before (1 curve, window 32) and exact=True, on this process's
    threads."""
    import zeta
    from zeta import _core

    q, k = gauss(n)
    out: Dict[str, Any] = {"threads": _core.num_threads(), "N": n}
    runs = (
        ("default", {}),
        ("window", {"exact": False}),
        ("before", BEFORE),
        ("exact", {"exact": True}),
    )
    for name, kw in runs:
        times = time_calls(lambda kw=kw: zeta.knn(q, k, TOPK, causal=True, **kw), reps, 120)
        out[name] = {"median_s": med(times), "times_s": times, "us_per_query": med(times) * 1e6 / n}
    out["ratio"] = out["exact"]["median_s"] / out["before"]["median_s"]
    out["ratio_vs_window"] = out["exact"]["median_s"] / out["window"]["median_s"]
    out["load_avg"] = loadavg()
    return out


def exact_vs_default_one_thread(n: int, reps: int) -> Dict[str, Any]:
    """:func:`exact_vs_default` in a child process with ZETA_NUM_THREADS=1."""
    env = {**os.environ, "ZETA_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--exact-vs-default", str(n), str(reps)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_recall(quick: bool) -> Dict[str, Any]:
    import zeta

    n = RECALL_N_QUICK if quick else RECALL_N
    reps = 2 if quick else 3
    rep = base_report(
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
        f"\n== recall: zeta.knn causal, Gaussian 3-D q, k, N={kib(n)}, topk={TOPK}; "
        f"window x n_curves"
    )
    q, k = gauss(n)
    settings = [(w, c) for c in CURVES for w in WINDOWS]
    rows = []
    with progress(len(settings) + 7, "recall", "cfg") as bar:
        t0 = time.perf_counter()
        _, ex_d2 = zeta.exact_knn(q.astype(np.float64), k.astype(np.float64), TOPK, causal=True)
        t_exact = time.perf_counter() - t0
        bar.update(1)

        def measure(budget_s: float, **kw) -> Dict[str, Any]:
            """Times zeta.knn with ``kw`` and scores its last result."""
            idx = None

            def call():
                nonlocal idx
                idx, _ = zeta.knn(q, k, TOPK, causal=True, **kw)

            times = time_calls(call, reps, budget_s=budget_s)
            return {
                "median_s": med(times),
                "times_s": times,
                "us_per_query": med(times) * 1e6 / n,
                "recall": recall_from_exact(q, k, idx, ex_d2, causal=True),
                "load_avg": loadavg(),
                "_idx": idx,
            }

        for w, c in settings:
            r = measure(30, window=w, n_curves=c, exact=False)
            r.pop("_idx")
            rows.append({"window": w, "n_curves": c, "exact": False, **r})
            bar.update(1)
        default_row = {"defaults": True, **measure(60)}
        default_row.pop("_idx")
        window_row = {"window_defaults": True, **measure(60, exact=False)}
        window_idx = window_row.pop("_idx")
        ref = zeta.recall(q, k, window_idx, causal=True)  # our recall == zeta.recall's
        check = {
            "setting": "window search defaults",
            "ours": window_row["recall"],
            "zeta.recall": ref,
            "equal": abs(window_row["recall"] - ref) < 1e-12,
        }
        bar.update(1)
        from zeta._validate import default_window

        exact_w = default_window(TOPK, exact=True)  # what exact=True resolves to
        exact_row = {"window": exact_w, "n_curves": 1, "exact": True, **measure(60, exact=True)}
        exact_row.pop("_idx")
        rows.append(exact_row)
        bar.update(1)
        vs = {"all_threads": exact_vs_default(n, reps)}
        bar.update(1)
        vs["one_thread"] = exact_vs_default_one_thread(n, reps)
        bar.update(1)
        bar.update(1)
    print(
        f"  exact_knn (once, float64): {t_exact:.1f} s; check vs zeta.recall, window defaults: "
        f"{check['ours']:.6f} vs {check['zeta.recall']:.6f} "
        f"({'equal' if check['equal'] else 'DIFFERENT'})"
    )
    print(f"  {'':>8s}" + "".join(f"{'n_curves=' + str(c):>22s}" for c in CURVES))
    print(f"  {'window':>8s}" + "".join(f"{'recall':>10s} {'time':>11s}" for _ in CURVES))
    for w in WINDOWS:
        cells = []
        for c in CURVES:
            r = next(x for x in rows if x["window"] == w and x["n_curves"] == c and not x["exact"])
            cells.append(f"{r['recall']:>10.4f} {fmt_s(r['median_s']):>11s}")
        print(f"  {w:>8d}" + "".join(cells))
    print(
        f"  exact=True (window {exact_row['window']}, 1 curve): recall {exact_row['recall']:.4f}, "
        f"{fmt_s(exact_row['median_s'])}"
    )
    print(
        f"  defaults (zeta.knn(q, k, {TOPK}): exact): recall {default_row['recall']:.4f}, "
        f"{fmt_s(default_row['median_s'])}; window search defaults (exact=False): recall "
        f"{window_row['recall']:.4f}, {fmt_s(window_row['median_s'])}"
    )
    for nm, x in vs.items():
        print(
            f"  {nm} ({x['threads']} threads): defaults {x['default']['us_per_query']:.2f}, "
            f"window search {x['window']['us_per_query']:.2f}, "
            f"1 curve window {TOPK} {x['before']['us_per_query']:.2f}, "
            f"exact {x['exact']['us_per_query']:.2f} us/query; exact / 1-curve {x['ratio']:.2f}x, "
            f"exact / window search {x['ratio_vs_window']:.2f}x"
        )
    ok = [r for r in rows if r["recall"] >= GOAL_RECALL and not r["exact"]]
    best = min(ok, key=lambda r: r["median_s"]) if ok else max(rows, key=lambda r: r["recall"])
    note = (
        f"{len(ok)} of {len(rows)} settings reach it: "
        + ", ".join(f"w={r['window']}/c={r['n_curves']}" for r in ok)
        + f"; fastest: window={best['window']}, n_curves={best['n_curves']} "
        f"(recall {best['recall']:.4f}, {fmt_s(best['median_s'])})"
        if ok
        else f"none; best recall {best['recall']:.4f} at window={best['window']}, "
        f"n_curves={best['n_curves']}"
    )
    worst = max(x["ratio"] for x in vs.values())
    goals = {
        "recall_0.95": goal(
            f"recall@{TOPK} >= {GOAL_RECALL} (causal, N={kib(n)})", best["recall"], bool(ok), note
        ),
        "exact_recall": goal(
            "exact=True recall@32 == 1", exact_row["recall"], exact_row["recall"] == 1.0, ""
        ),
        "default_recall": goal(
            f"recall@{TOPK} of the defaults >= {GOAL_DEFAULT_RECALL} (causal, N={kib(n)})",
            default_row["recall"],
            default_row["recall"] >= GOAL_DEFAULT_RECALL,
            f"{fmt_s(default_row['median_s'])} per call (exact search; the window search's "
            f"defaults: {window_row['recall']:.4f}, {fmt_s(window_row['median_s'])})",
        ),
        "exact_cost": goal(
            f"exact=True <= {GOAL_EXACT_RATIO}x 1 curve, window {TOPK} (the defaults before) per "
            "query (one thread and all)",
            worst,
            worst <= GOAL_EXACT_RATIO,
            ", ".join(
                f"{nm}: {x['ratio']:.2f}x (vs the window search's defaults: "
                f"{x['ratio_vs_window']:.2f}x)"
                for nm, x in vs.items()
            ),
        ),
    }
    print_goals(goals)
    rep["results"] = {
        "exact_knn_s": t_exact,
        "check_vs_zeta_recall": check,
        "settings": rows,
        "defaults": default_row,
        "window_defaults": window_row,
        "exact_vs_default": vs,
    }
    rep["goals"] = goals
    return rep


def _plot_recall(rep: Dict[str, Any], png: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in rep["results"]["settings"] if not r.get("exact")]
    ex = [r for r in rep["results"]["settings"] if r.get("exact")]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for r in ex:
        ax.plot([r["median_s"]], [r["recall"]], marker="*", ms=14, color="tab:red", ls="none")
        ax.annotate(
            "exact=True",
            (r["median_s"], r["recall"]),
            xytext=(6, -4),
            textcoords="offset points",
            fontsize=8,
            color="tab:red",
        )
    for key, text in (
        ("defaults", "defaults (exact)"),
        ("window_defaults", "window search defaults"),
    ):
        d = rep["results"].get(key)
        if not d:
            continue
        ax.plot(
            [d["median_s"]], [d["recall"]], marker="D", ms=9, mfc="none", color="black", ls="none"
        )
        ax.annotate(
            text,
            (d["median_s"], d["recall"]),
            xytext=(-52, 6),
            textcoords="offset points",
            fontsize=8,
        )
    for c, color in zip(CURVES, ("tab:blue", "tab:orange", "tab:purple", "tab:green")):
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
    ax.axhline(
        GOAL_DEFAULT_RECALL, color="gray", ls=":", lw=1, label=f"defaults >= {GOAL_DEFAULT_RECALL}"
    )
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
    save_figure(fig, png)
    return True


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--exact-vs-default"]:  # the one-thread child of exact_vs_default_one_thread
        print(json.dumps(exact_vs_default(int(args[1]), int(args[2]))))
        return {}
    return suite_main("recall", bench_recall, _plot_recall, __doc__, argv)


if __name__ == "__main__":
    main()
