"""The ``zeta`` command: ``info``, ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

#: The suites in a source checkout's benches/ (not shipped in the wheel), in `make bench` order.
BENCH_SUITES = ("morton", "sort_search", "attention", "recall", "knn", "decode", "generate")


def info() -> None:
    """Version, backends, CPU features, threads, GPU."""
    import zeta

    from . import _core

    print(f"zeta {zeta.__version__} (python {platform.python_version()}, {platform.machine()})")
    feats = _core.cpu_features()
    print(
        f"cpu: avx2={feats['avx2']} avx512f={feats['avx512f']} f16c={feats['f16c']} "
        f"popcnt={feats['popcnt']} "
        f"bmi2={feats['bmi2']} slow_pdep={feats['slow_pdep']}; Morton paths "
        f"{', '.join(feats['paths'])}, in use: {_core.simd_path()}; vector kernels "
        f"{', '.join(feats['vectors'])}, in use: {feats['scan']} (ZETA_SIMD overrides)"
    )
    print(
        f"threads: {_core.num_threads()} (ZETA_NUM_THREADS overrides); allocator: "
        f"{_core.allocator()} (ZETA_ALLOCATOR=system at import for the system's)"
    )
    gpu = "none"
    try:
        import torch

        print(f"torch: {torch.__version__}")
        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        print("torch: not installed (numpy-only; pip install zeta-attention[torch])")
    print(f"gpu: {gpu}")
    print("backends:")
    for name, b in zeta.backends().items():
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        print(f"  {name:6s} {state}; devices {', '.join(b['devices'])}")


def bench(argv) -> int:
    """Runs benches/bench_<suite>.py of the source checkout in the current directory."""
    ap = argparse.ArgumentParser(
        prog="zeta bench",
        description="Run the benchmark suites of a zeta source checkout (JSON + PNG into "
        "benches/results/). Run it from the checkout's top folder.",
    )
    ap.add_argument(
        "--only", action="append", choices=BENCH_SUITES, help="this suite only (repeatable)"
    )
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--out", help="output folder (default benches/results)")
    a = ap.parse_args(argv)
    benches = Path.cwd() / "benches"
    if not (benches / "_common.py").is_file():
        print(
            "zeta bench: the benchmark suites live in benches/ of zeta's source tree, not in the "
            "installed package.\nFrom a checkout: `make bench` (all six suites), "
            "`zeta bench [--only SUITE] [--quick]` or `python benches/bench_<suite>.py [--quick]`; "
            f"suites: {', '.join(BENCH_SUITES)}.",
            file=sys.stderr,
        )
        return 2
    extra = (["--quick"] if a.quick else []) + (["--out", a.out] if a.out else [])
    for suite in [s for s in BENCH_SUITES if s in a.only] if a.only else BENCH_SUITES:
        rc = subprocess.call([sys.executable, str(benches / f"bench_{suite}.py"), *extra])
        if rc != 0:
            print(f"zeta bench: {suite} failed (exit {rc})", file=sys.stderr)
            return rc
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="zeta", description="ZETA Z-order top-k attention")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("info", help="version, backends, CPU features, threads, GPU")
    sub.add_parser(
        "demo", help="long-context CPU decode on a synthetic needle task", add_help=False
    )
    sub.add_parser(
        "bench", help="benchmark suites of a source checkout (JSON + PNG)", add_help=False
    )
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        info()
    elif cmd == "demo":
        from .demo import main as demo_main

        demo_main(rest)
    elif cmd == "bench":
        return bench(rest)
    else:
        ap.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
