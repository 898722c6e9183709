"""Morton / Z-order throughput: zeta's SIMD paths against pymorton, numpy and zCurve.

Usage: python benches/bench_morton.py [--quick] [--out DIR]

Measures, in ns per code:
  - ``zeta.zorder(x, bits=21)``: 3-D float32 -> uint64 (quantize + interleave, fused);
  - ``zeta.morton_encode(coords, bits=21)``: 3-D uint32 -> uint64;
for every SIMD path this CPU has (``ZETA_SIMD=portable|avx2|bmi2``, one subprocess each, as
the path and the pool size are read from the environment), with ``ZETA_NUM_THREADS=1`` and
with the default thread count; against a per-point ``pymorton.interleave3`` loop (on a
subsample), a vectorised numpy magic-bits implementation (below) and ``zCurve.interlace``
(per point, on a subsample). Every implementation's codes are checked against zeta's.

Writes ``benches/results/morton-<machine tag>-<date>.json`` and a ``.png`` bar chart.
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
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from _common import (  # one machine tag for every result file
    RESULTS,
    cpu_id,
    cpu_model,
    machine_tag,
    save_figure,
)

HERE = Path(__file__).resolve().parent
D = 3
BITS = 21
SEED = 1234

# goals (printed as met / missed)
GOAL_NS_PER_CODE_PER_CORE = 1.5  # 3-D float32 -> u64, zeta.zorder
GOAL_X_PYMORTON = 50.0


# --------------------------------------------------------------------------------------
# data and the numpy reference (magic bits)
# --------------------------------------------------------------------------------------


def make_data(n: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((n, D), dtype=np.float32)
    coords = rng.integers(0, 1 << BITS, size=(n, D), dtype=np.uint32)
    return {"x": x, "coords": coords}


def spread_masks(d: int) -> List[Tuple[int, int]]:
    """The shift-and-mask steps of rust/src/morton.rs (`spread_masks`), k = 32, 16, .., 1."""
    nb = 64 // d
    steps: List[Tuple[int, int]] = []
    for s in range(5, -1, -1):
        k = 1 << s
        if k >= nb:  # moves nothing
            continue
        m = 0
        for i in range(nb):
            pos = i + (i & ~(k - 1)) * (d - 1)
            if pos < 64:
                m |= 1 << pos
        steps.append((k * (d - 1), m))
    return steps


_STEPS = {d: spread_masks(d) for d in range(2, 9)}


def np_spread(v: np.ndarray, d: int) -> np.ndarray:
    """Magic-bits spread of uint64 values (< 2**(64//d)) to stride d, vectorised."""
    x = v.astype(np.uint64, copy=True)
    for sh, m in _STEPS[d]:
        x |= x << np.uint64(sh)
        x &= np.uint64(m)
    return x


def np_morton_encode(coords: np.ndarray) -> np.ndarray:
    n, d = coords.shape
    code = np.zeros(n, dtype=np.uint64)
    for j in range(d):
        code |= np_spread(coords[:, j], d) << np.uint64(j)
    return code


def np_quantize(x: np.ndarray, bits: int, shift: int = 0, scale: float = 1.0) -> np.ndarray:
    """The grid map of rust/src/quantize.rs, in float64, vectorised."""
    d = x.shape[-1]
    y = x.astype(np.float64) / scale
    u = 0.5 + 0.5 * y / (1.0 + np.abs(y))
    half = 1 << (bits - 1)
    g = np.minimum(np.floor(u * half).astype(np.uint64), np.uint64(half - 1))
    return g + np.uint64((shift * half) // (d + 1))


def np_zorder(x: np.ndarray, bits: int) -> np.ndarray:
    return np_morton_encode(np_quantize(x, bits))


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def best_time(fn: Callable[[], Any], reps: int, min_total: float = 0.0) -> float:
    """Best wall time of `reps` calls (more if the total stays under `min_total` s)."""
    fn()  # warm up (page faults, pool start)
    best = float("inf")
    total = 0.0
    i = 0
    while i < reps or total < min_total:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        total += dt
        i += 1
        if i > 10000:
            break
    return best


def reps_for(n: int, quick: bool) -> int:
    if n >= 1_000_000:
        return 3 if quick else 10
    return 5 if quick else 20


# --------------------------------------------------------------------------------------
# worker: one SIMD path / thread count, in its own process
# --------------------------------------------------------------------------------------


def worker(sizes: List[int], quick: bool) -> Dict[str, Any]:
    import zeta
    from zeta import _core

    nmax = max(sizes)
    data = make_data(nmax)
    # correctness on a subsample, against numpy
    m = min(nmax, 200_000)
    z = zeta.zorder(data["x"][:m], bits=BITS)
    e = zeta.morton_encode(data["coords"][:m], bits=BITS)
    ok_z = bool(np.array_equal(z, np_zorder(data["x"][:m], BITS)))
    ok_e = bool(np.array_equal(e, np_morton_encode(data["coords"][:m])))
    assert z.dtype == np.uint64 and e.dtype == np.uint64
    res: Dict[str, Any] = {
        "path": _core.simd_path(),
        "threads": _core.num_threads(),
        "verified_zorder": ok_z,
        "verified_encode": ok_e,
        "zorder_ns": {},
        "encode_ns": {},
    }
    for n in sizes:
        x = data["x"][:n]
        c = data["coords"][:n]
        r = reps_for(n, quick)
        # best of many: on a shared machine the minimum is the run that was not preempted
        min_total = 0.1 if quick else 0.4
        tz = best_time(partial(zeta.zorder, x, bits=BITS), r, min_total=min_total)
        te = best_time(partial(zeta.morton_encode, c, bits=BITS), r, min_total=min_total)
        res["zorder_ns"][str(n)] = tz * 1e9 / n
        res["encode_ns"][str(n)] = te * 1e9 / n
    return res


def run_worker(path: str, threads: Optional[int], sizes: List[int], quick: bool) -> Dict[str, Any]:
    env = dict(os.environ)
    env["ZETA_SIMD"] = path
    if threads is None:
        env.pop("ZETA_NUM_THREADS", None)
    else:
        env["ZETA_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--sizes",
        ",".join(map(str, sizes)),
    ]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker ZETA_SIMD={path} threads={threads} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------


def bench_pymorton(coords: np.ndarray, quick: bool) -> Dict[str, Any]:
    try:
        import pymorton  # type: ignore[import-untyped]
    except ImportError:
        return {"available": False, "note": "pymorton is not installed (pip install pymorton)"}
    import zeta

    # pymorton.interleave3 masks each coordinate to 10 bits (30-bit codes): it cannot do
    # bits=21. It is timed (and checked) on 10-bit coordinates; the per-point cost is the
    # same Python-level loop whatever the bit count.
    m = 5_000 if quick else 50_000
    c10 = (coords[:m] & np.uint32((1 << 10) - 1)).astype(np.uint32)
    pts = [tuple(int(v) for v in row) for row in c10]
    f = pymorton.interleave3
    t = best_time(lambda: [f(a, b, c) for a, b, c in pts], 3 if quick else 5)
    got = np.array([f(a, b, c) for a, b, c in pts], dtype=np.uint64)
    ok = bool(np.array_equal(got, zeta.morton_encode(c10, bits=10).astype(np.uint64)))
    return {
        "available": True,
        "ns": t * 1e9 / m,
        "points": m,
        "verified": ok,
        "note": "per-point Python loop over pymorton.interleave3; pymorton's 3-D codes are "
        "limited to 10 bits per coordinate, so it is timed on 10-bit coordinates",
    }


def bench_numpy(data: Dict[str, np.ndarray], n: int, quick: bool) -> Dict[str, Any]:
    import zeta

    x = data["x"][:n]
    c = data["coords"][:n]
    r = 3 if quick else 5
    tz = best_time(lambda: np_zorder(x, BITS), r)
    te = best_time(lambda: np_morton_encode(c), r)
    m = min(n, 200_000)
    ok_z = bool(np.array_equal(np_zorder(x[:m], BITS), zeta.zorder(x[:m], bits=BITS)))
    ok_e = bool(np.array_equal(np_morton_encode(c[:m]), zeta.morton_encode(c[:m], bits=BITS)))
    return {
        "zorder_ns": tz * 1e9 / n,
        "encode_ns": te * 1e9 / n,
        "verified_zorder": ok_z,
        "verified_encode": ok_e,
        "n": n,
    }


def bench_zcurve(coords: np.ndarray, quick: bool) -> Dict[str, Any]:
    try:
        import zCurve  # type: ignore[import-untyped]
    except ImportError:
        return {"available": False, "note": "zCurve is not installed (pip install zCurve)"}
    import zeta

    # zCurve.interlace(*point, dims, bits_per_dim) encodes one point (gmpy2 bit slices);
    # any bit count works. par_interlace is the same function over a multiprocessing pool.
    # No array API and no float quantization: for zorder it needs the grid map first.
    m = 5_000 if quick else 20_000
    pts = [tuple(int(v) for v in row) for row in coords[:m]]
    f = zCurve.interlace
    t = best_time(lambda: [f(*p, dims=D, bits_per_dim=BITS) for p in pts], 3 if quick else 5)
    got = np.array([f(*p, dims=D, bits_per_dim=BITS) for p in pts], dtype=np.uint64)
    ok = bool(np.array_equal(got, zeta.morton_encode(coords[:m], bits=BITS)))
    return {
        "available": True,
        "ns": t * 1e9 / m,
        "points": m,
        "verified": ok,
        "note": "per-point zCurve.interlace(x, y, z, dims=3, bits_per_dim=21); no "
        "vectorised/array API (par_interlace = the same per point over a process pool)",
    }


# --------------------------------------------------------------------------------------
# machine tag, report, plot
# --------------------------------------------------------------------------------------


def fmt_ratio(a: float, b: float) -> str:
    r = b / a
    return f"{r:,.0f}x" if r >= 10 else f"{r:.1f}x"


def make_plot(report: Dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = str(report["headline_n"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, kind, title in (
        (axes[0], "zorder", f"zorder: 3-D float32 -> u64 (bits={BITS})"),
        (axes[1], "encode", f"morton_encode: 3-D uint32 -> u64 (bits={BITS})"),
    ):
        labels, vals, colors = [], [], []
        for w in report["zeta"]:
            labels.append(f"zeta {w['path']}\n{w['threads']} thr")
            vals.append(w[f"{kind}_ns"][n])
            colors.append("tab:blue" if w["threads"] == 1 else "tab:cyan")
        labels.append("numpy\nmagic bits")
        vals.append(report["numpy"][f"{kind}_ns"])
        colors.append("tab:orange")
        if report["pymorton"].get("available"):
            labels.append("pymorton\nloop" + ("\n(ints)" if kind == "zorder" else ""))
            vals.append(report["pymorton"]["ns"])
            colors.append("tab:red")
        if report["zcurve"].get("available"):
            labels.append("zCurve\ninterlace" + ("\n(ints)" if kind == "zorder" else ""))
            vals.append(report["zcurve"]["ns"])
            colors.append("tab:purple")
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_yscale("log")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("ns per code (log)")
        ax.set_title(title, fontsize=10)
        for b, v in zip(bars, vals):
            ax.text(
                b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7
            )
        if kind == "zorder":
            ax.axhline(GOAL_NS_PER_CODE_PER_CORE, color="green", ls="--", lw=1)
    fig.suptitle(
        f"zeta Morton codes, n = {int(n):,} ({report['machine']['tag']}, "
        f"{report['date']}); pymorton/zCurve: integer encode per point on a "
        "subsample (no float quantization); dashed: 1.5 ns/code goal",
        fontsize=9,
    )
    save_figure(fig, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")
    ap.add_argument("--sizes", default=None, help="comma-separated n (default per mode)")
    args = ap.parse_args()

    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [10_000, 1_000_000] if args.quick else [10_000, 100_000, 1_000_000, 4_000_000]
    if args.worker:
        print(json.dumps(worker(sizes, args.quick)))
        return

    import zeta
    from zeta import _core

    headline = 1_000_000 if 1_000_000 in sizes else max(sizes)
    feats: Dict[str, Any] = _core.cpu_features()
    paths = [str(p) for p in feats["paths"]]
    default_path = _core.simd_path() if "ZETA_SIMD" not in os.environ else None
    if default_path is None:
        env = {k: v for k, v in os.environ.items() if k != "ZETA_SIMD"}
        default_path = subprocess.run(
            [sys.executable, "-c", "from zeta import _core; print(_core.simd_path())"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    ncpu = os.cpu_count() or 1
    print(
        f"machine: {machine_tag()} ({cpu_id()}) | paths {', '.join(paths)} (default {default_path}) | "
        f"threads: 1 and default ({ncpu} CPUs) | sizes {sizes}"
    )

    runs = []
    for p in paths:
        for thr in (1, None):
            r = run_worker(p, thr, sizes, args.quick)
            runs.append(r)
            print(
                f"  zeta {p:8s} threads={r['threads']:<3d} zorder "
                + "  ".join(f"n={int(n):>9,}: {v:6.2f}" for n, v in r["zorder_ns"].items())
                + " ns/code"
                + (
                    ""
                    if r["verified_zorder"] and r["verified_encode"]
                    else "   CODES DIFFER FROM NUMPY"
                )
            )
    data = make_data(headline)
    np_res = bench_numpy(data, headline, args.quick)
    pym = bench_pymorton(data["coords"], args.quick)
    zc = bench_zcurve(data["coords"], args.quick)

    hn = str(headline)
    best1 = {r["path"]: r for r in runs if r["threads"] == 1}
    bestn = {r["path"]: r for r in runs if r["threads"] != 1} or best1
    dflt1 = best1.get(default_path, runs[0])
    dfltn = bestn.get(default_path, dflt1)

    print()
    print(
        f"n = {headline:,}, ns per code (lower is better); ratios = how many times faster "
        f"zeta ({default_path}) is"
    )
    hdr = f"{'implementation':38s} {'zorder f32->u64':>16s} {'encode u32->u64':>16s}"
    print(hdr)
    print("-" * len(hdr))
    for r in runs:
        name = f"zeta {r['path']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''})"
        print(f"{name:38s} {r['zorder_ns'][hn]:16.3f} {r['encode_ns'][hn]:16.3f}")
    print(
        f"{'numpy magic bits (vectorised)':38s} {np_res['zorder_ns']:16.3f} "
        f"{np_res['encode_ns']:16.3f}"
    )
    if pym.get("available"):
        print(f"{'pymorton.interleave3 loop (per point)':38s} {'-':>16s} {pym['ns']:16.1f}")
    if zc.get("available"):
        print(f"{'zCurve.interlace (per point)':38s} {'-':>16s} {zc['ns']:16.1f}")
    print()
    zt1, ztn = dflt1["zorder_ns"][hn], dfltn["zorder_ns"][hn]
    et1, etn = dflt1["encode_ns"][hn], dfltn["encode_ns"][hn]
    print(
        f"zeta zorder vs numpy: {fmt_ratio(zt1, np_res['zorder_ns'])} (1 thread), "
        f"{fmt_ratio(ztn, np_res['zorder_ns'])} ({dfltn['threads']} threads); "
        f"encode vs numpy: {fmt_ratio(et1, np_res['encode_ns'])} / "
        f"{fmt_ratio(etn, np_res['encode_ns'])}"
    )
    if pym.get("available"):
        print(
            f"zeta zorder is {fmt_ratio(zt1, pym['ns'])} pymorton (1 thread), "
            f"{fmt_ratio(ztn, pym['ns'])} ({dfltn['threads']} threads); encode is "
            f"{fmt_ratio(et1, pym['ns'])} / {fmt_ratio(etn, pym['ns'])} pymorton"
        )
        print(f"  ({pym['note']})")
    else:
        print(f"pymorton: {pym['note']}")
    if zc.get("available"):
        print(
            f"zeta encode is {fmt_ratio(et1, zc['ns'])} zCurve (1 thread), "
            f"{fmt_ratio(etn, zc['ns'])} ({dfltn['threads']} threads)"
        )
        print(f"  (zCurve: {zc['note']})")
    else:
        print(f"zCurve: {zc['note']}")
    for r in runs:
        if not (r["verified_zorder"] and r["verified_encode"]):
            print(f"WARNING: zeta {r['path']} codes differ from the numpy reference")
    for name, res in (("numpy", np_res), ("pymorton", pym), ("zCurve", zc)):
        for key in ("verified", "verified_zorder", "verified_encode"):
            if key in res and not res[key]:
                print(f"WARNING: {name} codes differ from zeta's ({key})")

    per_core = zt1  # one thread = one core
    goals = {
        "zorder_ns_per_code_per_core": {
            "goal": f"<= {GOAL_NS_PER_CODE_PER_CORE}",
            "value": per_core,
            "met": per_core <= GOAL_NS_PER_CODE_PER_CORE,
        },
        "zorder_x_pymorton": {
            "goal": f">= {GOAL_X_PYMORTON}",
            "value": (pym["ns"] / ztn) if pym.get("available") else None,
            "met": bool(pym.get("available") and pym["ns"] / ztn >= GOAL_X_PYMORTON),
        },
    }
    print()
    g = goals["zorder_ns_per_code_per_core"]
    print(
        f"goal: zorder 3-D f32 -> u64 <= {GOAL_NS_PER_CODE_PER_CORE} ns/code per core: "
        f"{'MET' if g['met'] else 'MISSED'} ({per_core:.2f} ns/code on 1 thread, "
        f"{default_path})"
    )
    g = goals["zorder_x_pymorton"]
    print(
        f"goal: >= {GOAL_X_PYMORTON:.0f}x pymorton loop: {'MET' if g['met'] else 'MISSED'}"
        + (f" ({g['value']:,.0f}x, {dfltn['threads']} threads)" if g["value"] else "")
    )

    date = _dt.date.today().isoformat()
    report = {
        "date": date,
        "machine": {
            "tag": machine_tag(),
            "machine": platform.machine(),
            "cpu": cpu_model(),
            "cpu_id": cpu_id(),
            "cpus": ncpu,
            "features": feats,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "zeta": getattr(zeta, "__version__", None),
        },
        "config": {
            "d": D,
            "bits": BITS,
            "sizes": sizes,
            "quick": args.quick,
            "default_path": default_path,
        },
        "headline_n": headline,
        "zeta": runs,
        "numpy": np_res,
        "pymorton": pym,
        "zcurve": zc,
        "goals": goals,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"morton-{machine_tag()}-{date}"
    js = args.out / f"{stem}.json"
    png = args.out / f"{stem}.png"
    js.write_text(json.dumps(report, indent=2) + "\n")
    try:
        make_plot(report, png)
        print(f"\nwrote {os.path.relpath(js)} and {os.path.relpath(png)}")
    except ImportError:
        print(f"\nwrote {os.path.relpath(js)} (matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
