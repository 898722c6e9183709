"""zeta: Z-order top-k attention (ZETA, arXiv 2501.14577) with a Rust core.

Queries and keys live in a tiny space (d_k ~ 3); each query attends only to its ``topk``
nearest keys, found through a causal Z-order (Morton) index instead of an N x N score
matrix. numpy in -> numpy out, torch in -> torch out.
"""

from __future__ import annotations

import os as _os

from . import (
    _core,
    backends,  # a callable module: zeta.backends() reports, see backends/__init__
)
from .cache import KVCache
from .ops import attention, exact_knn, knn, recall
from .primitives import argsort, morton_decode, morton_encode, searchsorted, zorder

__version__ = _core.__version__


def _check_thread_env() -> None:
    """Says so when ZETA_NUM_THREADS is set but unusable (the core then uses every CPU)."""
    raw = _os.environ.get("ZETA_NUM_THREADS")
    if raw is None or raw.strip() == "":
        return
    try:
        ok = int(raw) >= 1
    except ValueError:
        ok = False
    if not ok:
        import warnings

        warnings.warn(
            f"ZETA_NUM_THREADS={raw!r} is not a positive integer; zeta uses all "
            f"CPU threads ({_os.cpu_count()})",
            RuntimeWarning,
            stacklevel=2,
        )


_check_thread_env()

# rayon's pool does not survive fork(): the child builds a fresh one on first use.
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_core._after_fork_in_child)


def __getattr__(name: str):
    """``zeta.nn`` and ``zeta.hf`` import on first use: ``import zeta`` stays numpy-only."""
    if name in ("nn", "hf"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "KVCache",
    "argsort",
    "attention",
    "backends",
    "exact_knn",
    "knn",
    "recall",
    "morton_decode",
    "morton_encode",
    "searchsorted",
    "zorder",
]
