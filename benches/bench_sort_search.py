"""Argsort and searchsorted of Morton codes: zeta's radix sort / merge search against numpy and torch.

Usage: python benches/bench_sort_search.py [--quick] [--out DIR]

Measures (best wall time of several calls, ms):
  argsort   - 1M random uint64 codes (63-bit, as 3-D Morton codes of 21 bits),
            - 1M random uint32 codes (30-bit, 3-D of 10 bits),
            - 1024 rows x 1024 uint64 codes (batched, along the last axis);
            ``zeta.argsort`` (stable) vs ``numpy.argsort`` (default quicksort and
            kind="stable"), ``numpy.sort`` (values only), ``torch.sort(stable=True)`` and
            ``torch.argsort``;
  searchsorted - 1M sorted uint64 codes with 1M random queries and with 1k queries;
            ``zeta.searchsorted`` vs ``numpy.searchsorted`` and ``torch.searchsorted``.
Every zeta result is checked against numpy's (stable argsort; searchsorted on both sides)
before timing. zeta runs with its default thread count here and with ``ZETA_NUM_THREADS=1``
in a subprocess (per-core numbers; torch is limited to one thread there too).

Goals (printed as met / missed): argsort >= 10x numpy.argsort and searchsorted >= 5x
numpy.searchsorted, on the 1M uint64 cases.

Writes ``benches/results/sort_search-<machine tag>-<date>.json`` and a ``.png`` bar chart.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from _common import (
    RESULTS,
    cpu_id,
    cpu_model,
    loadavg,
    machine_tag,
    save_figure,
)  # one machine tag for every result file

HERE = Path(__file__).resolve().parent
SEED = 1234
N = 1 << 20
BATCH = (1024, 1024)
FEW_QUERIES = 1000

GOAL_ARGSORT_X_NUMPY = 10.0
GOAL_SEARCH_X_NUMPY = 5.0


# --------------------------------------------------------------------------------------
# data, timing
# --------------------------------------------------------------------------------------


def make_data() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    c64 = rng.integers(0, 1 << 63, size=N, dtype=np.uint64)
    c32 = rng.integers(0, 1 << 30, size=N, dtype=np.uint32)
    batch = rng.integers(0, 1 << 63, size=BATCH, dtype=np.uint64)
    sorted64 = np.sort(rng.integers(0, 1 << 63, size=N, dtype=np.uint64))
    queries = rng.integers(0, 1 << 63, size=N, dtype=np.uint64)
    # some queries equal to present codes, so side="left"/"right" differ
    queries[::7] = sorted64[rng.integers(0, N, size=queries[::7].shape[0])]
    return {
        "u64": c64,
        "u32": c32,
        "batch": batch,
        "sorted": sorted64,
        "queries": queries,
        "few": queries[:FEW_QUERIES].copy(),
    }


def time_fn(fn: Callable[[], Any], reps: int) -> Dict[str, float]:
    """Best and median wall time (ms) of `reps` calls after one warm-up call.

    Best of several: on a shared machine the minimum is the run that was not preempted.
    """
    fn()
    ts: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return {"best_ms": ts[0], "median_ms": ts[len(ts) // 2]}


def reps_for(ms_guess: float, quick: bool) -> int:
    base = 3 if quick else 9
    if ms_guess < 5:
        return base * 5
    return base


# --------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------


def verify(data: Dict[str, np.ndarray]) -> Dict[str, bool]:
    import zeta

    ok: Dict[str, bool] = {}
    for case in ("u64", "u32", "batch"):
        a = data[case]
        ok[f"argsort_{case}"] = bool(
            np.array_equal(zeta.argsort(a), np.argsort(a, axis=-1, kind="stable"))
        )
    # duplicates: stability matters
    dup = (data["u64"] % np.uint64(1000)).astype(np.uint64)
    ok["argsort_duplicates"] = bool(
        np.array_equal(zeta.argsort(dup), np.argsort(dup, kind="stable"))
    )
    for q in ("queries", "few"):
        for side in ("left", "right"):
            ok[f"searchsorted_{q}_{side}"] = bool(
                np.array_equal(
                    zeta.searchsorted(data["sorted"], data[q], side=side),
                    np.searchsorted(data["sorted"], data[q], side=side),
                )
            )
    return ok


# --------------------------------------------------------------------------------------
# the measurements
# --------------------------------------------------------------------------------------


def torch_view(a: np.ndarray) -> Any:
    """The codes as a signed torch tensor (order kept: codes are below 2**63 / 2**31)."""
    import torch

    return torch.from_numpy(a.view(np.int64 if a.dtype == np.uint64 else np.int32))


def measure(data: Dict[str, np.ndarray], quick: bool, zeta_only: bool) -> Dict[str, Dict[str, Any]]:
    """Times every implementation on every case: {case: {impl: {best_ms, median_ms}}}."""
    import zeta

    try:
        import torch
    except ImportError:  # torch is optional
        torch = None  # type: ignore[assignment]

    res: Dict[str, Dict[str, Any]] = {}
    argsort_cases = {"argsort_u64_1M": "u64", "argsort_u32_1M": "u32", "argsort_1024x1024": "batch"}
    for name, key in argsort_cases.items():
        a = data[key]
        r: Dict[str, Any] = {}
        r["zeta.argsort"] = time_fn(partial(zeta.argsort, a), reps_for(10, quick))
        if not zeta_only:
            r["numpy.argsort"] = time_fn(partial(np.argsort, a, axis=-1), reps_for(100, quick))
            r["numpy.argsort(stable)"] = time_fn(
                partial(np.argsort, a, axis=-1, kind="stable"), reps_for(100, quick)
            )
            r["numpy.sort"] = time_fn(partial(np.sort, a, axis=-1), reps_for(20, quick))
        if torch is not None:
            t = torch_view(a)
            r["torch.sort(stable)"] = time_fn(
                partial(torch.sort, t, dim=-1, stable=True), reps_for(50, quick)
            )
            r["torch.argsort"] = time_fn(partial(torch.argsort, t, dim=-1), reps_for(50, quick))
        res[name] = r

    s = data["sorted"]
    for name, qkey in (("searchsorted_1M_1M", "queries"), ("searchsorted_1M_1k", "few")):
        q = data[qkey]
        big = q.shape[0] > FEW_QUERIES
        r = {}
        r["zeta.searchsorted"] = time_fn(
            partial(zeta.searchsorted, s, q), reps_for(20 if big else 0.1, quick)
        )
        if not zeta_only:
            r["numpy.searchsorted"] = time_fn(
                partial(np.searchsorted, s, q), reps_for(300 if big else 0.3, quick)
            )
        if torch is not None:
            ts, tq = torch_view(s), torch_view(q)
            r["torch.searchsorted"] = time_fn(
                partial(torch.searchsorted, ts, tq), reps_for(100 if big else 0.3, quick)
            )
        res[name] = r
    return res


def worker(quick: bool) -> Dict[str, Any]:
    """zeta with this process's ZETA_NUM_THREADS (and torch on one thread), verified."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    data = make_data()
    ok = verify(data)
    return {"verified": ok, "results": measure(data, quick, zeta_only=True)}


def run_worker(threads: int, quick: bool) -> Dict[str, Any]:
    env = dict(os.environ)
    env["ZETA_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker ZETA_NUM_THREADS={threads} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# machine tag, report, plot
# --------------------------------------------------------------------------------------


def make_plot(report: Dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cases = list(report["results"].keys())
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.6))
    for ax, case in zip(axes, cases):
        r = report["results"][case]
        labels = list(r.keys())
        vals = [r[k]["best_ms"] for k in labels]
        one = report["single_thread"]["results"].get(case, {})
        zkey = next(k for k in labels if k.startswith("zeta"))
        if zkey in one:
            labels.insert(1, f"{zkey}\n(1 thread)")
            vals.insert(1, one[zkey]["best_ms"])
        colors = ["tab:green" if lab.startswith("zeta") else "tab:gray" for lab in labels]
        y = np.arange(len(labels))
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(vals) / 2, max(vals) * 3)
        ax.set_xlabel("ms (best of runs, log scale)")
        ax.set_title(case, fontsize=10)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle(
        f"zeta argsort / searchsorted vs numpy, torch ({report['machine']['tag']}, "
        f"{report['date']}, zeta threads={report['config']['zeta_threads']})",
        fontsize=10,
    )
    save_figure(fig, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.quick)))
        return

    import zeta
    from zeta import _core

    zeta_threads = _core.num_threads() if hasattr(_core, "num_threads") else None
    if zeta_threads is None:
        env_t = os.environ.get("ZETA_NUM_THREADS")
        zeta_threads = int(env_t) if env_t else os.cpu_count()
    try:
        import torch

        torch_version: Optional[str] = torch.__version__
        torch_threads: Optional[int] = torch.get_num_threads()
    except ImportError:
        torch_version, torch_threads = None, None

    print(
        f"machine: {machine_tag()} ({cpu_id()}) | zeta threads {zeta_threads} | torch {torch_version} "
        f"threads {torch_threads} | numpy {np.__version__} | n = {N:,}"
    )
    load0 = loadavg()
    if load0 is not None and load0[0] > (os.cpu_count() or 1):
        print(f"note: load average {load0} exceeds the core count: timings are noisy")

    data = make_data()
    ok = verify(data)
    bad = [k for k, v in ok.items() if not v]
    print("verified against numpy: " + ("all equal" if not bad else f"MISMATCH in {bad}"))
    if bad:
        sys.exit(1)

    results = measure(data, args.quick, zeta_only=False)
    single = run_worker(1, args.quick)
    bad1 = [k for k, v in single["verified"].items() if not v]
    if bad1:
        print(f"single-thread worker: MISMATCH in {bad1}")
        sys.exit(1)

    print(f"\n{'case':<22} {'implementation':<24} {'best ms':>10} {'median ms':>10} {'zeta x':>8}")
    for case, r in results.items():
        zkey = next(k for k in r if k.startswith("zeta"))
        zt = r[zkey]["best_ms"]
        for impl, t in r.items():
            ratio = t["best_ms"] / zt
            print(
                f"{case:<22} {impl:<24} {t['best_ms']:>10.3f} {t['median_ms']:>10.3f} {ratio:>7.1f}x"
            )
        one = single["results"][case][zkey]
        print(
            f"{case:<22} {zkey + ' 1 thread':<24} {one['best_ms']:>10.3f} {one['median_ms']:>10.3f}"
        )

    def ratio(case: str, base: str, res: Dict[str, Any], ref: Dict[str, Any]) -> float:
        zkey = next(k for k in res[case] if k.startswith("zeta"))
        return ref[case][base]["best_ms"] / res[case][zkey]["best_ms"]

    goals = {
        "argsort_x_numpy": {
            "case": "argsort_u64_1M",
            "goal": GOAL_ARGSORT_X_NUMPY,
            "value": ratio("argsort_u64_1M", "numpy.argsort", results, results),
            "per_core": ratio("argsort_u64_1M", "numpy.argsort", single["results"], results),
        },
        "searchsorted_x_numpy": {
            "case": "searchsorted_1M_1M",
            "goal": GOAL_SEARCH_X_NUMPY,
            "value": ratio("searchsorted_1M_1M", "numpy.searchsorted", results, results),
            "per_core": ratio(
                "searchsorted_1M_1M", "numpy.searchsorted", single["results"], results
            ),
        },
    }
    print()
    for name, g in goals.items():
        g["met"] = bool(g["value"] >= g["goal"])
        print(
            f"goal {name} >= {g['goal']:.0f}x ({g['case']}): {g['value']:.1f}x "
            f"({'met' if g['met'] else 'missed'}); per core {g['per_core']:.1f}x"
        )

    date = _dt.date.today().isoformat()
    report = {
        "date": date,
        "machine": {
            "tag": machine_tag(),
            "cpu": cpu_model(),
            "cpu_id": cpu_id(),
            "cores": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch_version,
            "zeta": zeta.__version__,
            "loadavg_start": load0,
            "loadavg_end": loadavg(),
        },
        "config": {
            "quick": args.quick,
            "n": N,
            "batch": list(BATCH),
            "few_queries": FEW_QUERIES,
            "zeta_threads": zeta_threads,
            "torch_threads": torch_threads,
            "codes": "uint64 below 2**63 (3-D Morton, 21 bits), uint32 below 2**30",
            "timing": "best and median wall ms of several calls after a warm-up call",
        },
        "verified": ok,
        "results": results,
        "single_thread": {
            "note": "ZETA_NUM_THREADS=1 and torch.set_num_threads(1), in a subprocess",
            "results": single["results"],
        },
        "goals": goals,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sort_search-{machine_tag()}-{date}"
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    try:
        make_plot(report, stem.with_suffix(".png"))
        print(f"\nwrote {stem.with_suffix('.json')} and .png")
    except ImportError:
        print(f"\nwrote {stem.with_suffix('.json')} (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
