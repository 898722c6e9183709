"""Backends. ``zeta.backends()`` reports what is available here and why not the rest.

Each backend (``rust_backend``, ``cupy_backend``, ``torch_backend``) declares what it supports,
says why it cannot take a call, and implements the operations it supports (``base.Backend``).
One dispatcher (:func:`select`) walks them in priority order; when none fits, the error lists
every backend's reasons. ``backend=`` forces one. No torch or cupy import happens here.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict

from .base import Backend, CallInfo
from .cupy_backend import CupyBackend
from .rust_backend import RustBackend
from .torch_backend import TorchBackend

__all__ = ["BACKENDS", "Backend", "CallInfo", "report", "select"]

BACKENDS: Dict[str, Backend] = {b.name: b for b in (RustBackend(), CupyBackend(), TorchBackend())}


def select(info: CallInfo, backend: str = "auto") -> Backend:
    """The first backend (priority order) that supports ``info``, or the forced one."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(
                f"backend: unknown {backend!r}; choose from 'auto', {', '.join(map(repr, BACKENDS))}"
            )
        b = BACKENDS[backend]
        reasons = b.not_supported_reasons(info)
        if reasons:
            raise ValueError(f"backend: {backend!r} cannot run this call: {'; '.join(reasons)}")
        return b
    all_reasons = []
    for b in BACKENDS.values():
        reasons = b.not_supported_reasons(info)
        if not reasons:
            return b
        all_reasons.append(f"{b.name}: {'; '.join(reasons)}")
    raise ValueError("no zeta backend supports this call:\n  " + "\n  ".join(all_reasons))


def report() -> Dict[str, Dict[str, Any]]:
    """Each backend: available or not (and why), devices, dtypes."""
    out = {}
    for b in BACKENDS.values():
        why = b.unavailable_reason()
        out[b.name] = {
            "available": why is None,
            "reason": why or "",
            "devices": list(b.devices) or ["any"],
            "dtypes": list(b.dtypes),
        }
    return out


class _CallableModule(types.ModuleType):
    """``zeta.backends`` is this package *and* the function of the public API.

    ``zeta.backends()`` reports the backends; ``zeta.backends.torch_ref`` is the reference
    module. (A plain function bound to ``zeta.backends`` would hide the subpackage, so that
    ``import zeta.backends.torch_ref as T`` failed.)
    """

    def __call__(self) -> Dict[str, Dict[str, Any]]:
        """What is available here and why not the rest: {name: {available, reason, devices, dtypes}}."""
        return report()


sys.modules[__name__].__class__ = _CallableModule
