"""The ``zeta`` command: ``info``, ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import platform
import sys


def info() -> None:
    """Version, backends, CPU features, threads, GPU."""
    import zeta

    from . import _core

    print(f"zeta {zeta.__version__} (python {platform.python_version()}, {platform.machine()})")
    feats = _core.cpu_features()
    print(
        f"cpu: avx2={feats['avx2']} bmi2={feats['bmi2']} slow_pdep={feats['slow_pdep']}; "
        f"paths {', '.join(feats['paths'])}; in use: {_core.simd_path()} (ZETA_SIMD overrides)"
    )
    print(f"threads: {_core.num_threads()} (ZETA_NUM_THREADS overrides)")
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="zeta", description="ZETA Z-order top-k attention")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("info", help="version, backends, CPU features, threads, GPU")
    sub.add_parser(
        "demo", help="long-context CPU decode on a synthetic needle task", add_help=False
    )
    sub.add_parser("bench", help="benchmark suite (JSON + PNG)", add_help=False)
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
        from .benchmarks import main as bench_main

        bench_main(rest)
    else:
        ap.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
