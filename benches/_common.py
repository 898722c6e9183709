"""Shared pieces of the benchmark suites in ``benches/``: machine tag, load average, timing,
formatting, goals, the JSON + PNG writer, the progress bar and each suite's command line.

Every suite writes ``<suite>-<machine tag>-<date>.json`` and ``.png`` into ``--out``
(default ``benches/results``). Timings on a shared machine are noisy: compare the ratios
(measured in the same run), and see ``load_avg`` in the JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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

from zeta._progress import progress  # noqa: F401  (one progress bar for zeta demo and benches)

RESULTS = Path(__file__).resolve().parent / "results"
TOPK = 32
DK = 3
SEED = 1234


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


def cpu_id() -> Optional[str]:
    """``family F model M stepping S`` of an x86 CPU (None elsewhere): the model name of a
    cloud VM ("AMD EPYC") hides the generation, and peers' speed can depend on it (numpy's
    AVX-512 sort is slow on AMD family 25 = Zen 4, whose memory-destination compress
    instructions are microcoded)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, val = line.partition(":")
                fields[key.strip()] = val.strip()
    except OSError:
        return None
    if "cpu family" not in fields:
        return None
    return (
        f"family {fields['cpu family']} model {fields.get('model', '?')} "
        f"stepping {fields.get('stepping', '?')}"
    )


def machine_tag() -> str:
    """``<arch>-<cpu model>-<n>c``, the same tag as benches/bench_morton.py."""
    model = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-").lower() or "cpu"
    return f"{platform.machine().lower()}-{model}-{os.cpu_count()}c"


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def mem_available() -> Optional[int]:
    """Bytes the kernel says are available (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def optional(name: str) -> Tuple[Any, Optional[str]]:
    """(module, None) or (None, why it is missing)."""
    try:
        return __import__(name), None
    except ImportError as e:
        return (
            None,
            f"{name} is not installed ({e}); pip install {name if name != 'faiss' else 'faiss-cpu'}",
        )


def time_calls(fn: Callable[[], Any], reps: int, budget_s: float = float("inf")) -> List[float]:
    """Wall times of up to `reps` calls; stops early (after one) once `budget_s` is spent."""
    out: List[float] = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if sum(out) > budget_s:
            break
    return out


def med(xs: List[float]) -> Optional[float]:
    return float(np.median(xs)) if xs else None


def fmt_s(t: Optional[float]) -> str:
    if t is None:
        return "not run"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def fmt_x(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2f}x"


def ratio(slow: Optional[float], fast: Optional[float]) -> Optional[float]:
    return slow / fast if slow and fast else None


def save_figure(fig: Any, png: Any) -> None:
    """Lays out, writes (120 dpi) and closes a matplotlib figure: every suite's PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def kib(n: int) -> str:
    return f"{n // 1024}k" if n < 1 << 20 else f"{n >> 20}M"


def goal(desc: str, value: Optional[float], met: Optional[bool], note: str) -> Dict[str, Any]:
    return {"goal": desc, "value": value, "met": met, "note": note}


def print_goals(goals: Dict[str, Dict[str, Any]]) -> None:
    for g in goals.values():
        state = "NOT RUN" if g["met"] is None else "MET" if g["met"] else "MISSED"
        print(f"  goal: {g['goal']}: {state} ({g['note']})")


def gauss(n: int, seed: int = SEED) -> Tuple[np.ndarray, np.ndarray]:
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


def true_d2(q: np.ndarray, k: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float64 squared distances of (N, d) queries to their (N, k) neighbours in (S, d) keys."""
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    return ((k64[idx] - q64[:, None, :]) ** 2).sum(-1)


def core_hash() -> Optional[str]:
    """First 12 hex digits of the loaded Rust extension's sha256 (tells builds apart)."""
    import hashlib

    from zeta import _core

    try:
        with open(_core.__file__, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except (OSError, AttributeError, TypeError):
        return None


def pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def base_report(suite: str, quick: bool, config: Dict[str, Any]) -> Dict[str, Any]:
    import zeta
    from zeta import _core

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zeta": zeta.__version__,
        "zeta_core_sha256": core_hash(),
    }
    for name in ("torch", "faiss", "hnswlib", "matplotlib"):
        mod, _ = optional(name)
        versions[name] = getattr(mod, "__version__", "installed") if mod is not None else None
    return {
        "suite": suite,
        "date": _dt.date.today().isoformat(),
        "quick": quick,
        "machine": {
            "tag": machine_tag(),
            "machine": platform.machine(),
            "cpu": cpu_model(),
            "cpu_id": cpu_id(),
            "cpus": os.cpu_count(),
            "zeta_threads": _core.num_threads(),
            "simd_path": _core.simd_path(),
            "versions": versions,
        },
        "load_avg": {"start": loadavg()},
        "config": config,
    }


def write(report: Dict[str, Any], out: Path, plot: Callable[[Dict[str, Any], Path], bool]) -> None:
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


def suite_main(
    name: str,
    run: Callable[[bool], Dict[str, Any]],
    plot: Callable[[Dict[str, Any], Path], bool],
    doc: str,
    argv: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """The command line every suite shares: ``[--quick] [--out DIR]``; runs, prints, writes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")
    a = ap.parse_args(argv)
    import zeta

    print(
        f"zeta {zeta.__version__} bench {name}{' (quick)' if a.quick else ''} | "
        f"machine {machine_tag()} ({cpu_id()}) | load avg {loadavg()} | out {os.path.relpath(a.out)}"
    )
    for peer in ("torch", "faiss", "hnswlib", "matplotlib"):
        if optional(peer)[0] is None:
            print(f"  {peer} missing: its comparisons/plots are skipped")
    t0 = time.perf_counter()
    rep = run(a.quick)
    rep["wall_s"] = time.perf_counter() - t0
    write(rep, a.out, plot)
    return rep
