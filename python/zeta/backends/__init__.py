"""Backends. ``zeta.backends()`` reports what is available here and why not the rest.

Each backend declares what it supports and says why it cannot take a call.

One dispatcher (:func:`select`) walks them in priority order; when none fits, the error
lists every backend's reasons. ``backend=`` forces one. No torch import happens here.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .._validate import MAX_KEY_DIM


@dataclass
class CallInfo:
    """What a backend needs to know about a call."""

    kind: str  # "numpy", "torch" or "cupy"
    device: str  # "cpu", "cuda", ...
    dtype: str  # "float32", ...
    key_dim: int
    requires_grad: bool = False
    topk: int = 0  # 0: not a top-k call


class Backend:
    name = "?"
    devices: Tuple[str, ...] = ()
    dtypes: Tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    max_key_dim = MAX_KEY_DIM

    def unavailable_reason(self) -> Optional[str]:
        return None

    def not_supported_reasons(self, info: CallInfo) -> List[str]:
        r = []
        why = self.unavailable_reason()
        if why:
            r.append(why)
        if self.devices and info.device not in self.devices:
            r.append(f"device {info.device} not supported (supports {', '.join(self.devices)})")
        if info.dtype not in self.dtypes:
            r.append(f"dtype {info.dtype} not supported (supports {', '.join(self.dtypes)})")
        if not 1 <= info.key_dim <= self.max_key_dim:
            r.append(f"key_dim {info.key_dim} not in 1..{self.max_key_dim}")
        return r


class RustBackend(Backend):
    """The Rust core (rayon, CPU). float16/bfloat16 are computed in float32."""

    name = "rust"
    devices = ("cpu",)

    def unavailable_reason(self):
        try:
            from .. import _core  # noqa: F401
        except ImportError as e:  # pragma: no cover - the wheel always ships it
            return f"extension not importable: {e}"
        return None

    def not_supported_reasons(self, info):
        r = super().not_supported_reasons(info)
        if info.kind == "torch" and "torch" not in sys.modules:
            r.append("torch not imported")
        if info.kind == "cupy":
            r.append("cupy arrays live on a GPU")
        return r


class TorchBackend(Backend):
    """The readable reference in plain torch ops: any device, autograd by construction."""

    name = "torch"
    devices = ()  # any

    def unavailable_reason(self):
        if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
            return None
        return "torch is not installed (pip install zeta-attention[torch])"

    def not_supported_reasons(self, info):
        r = super().not_supported_reasons(info)
        if info.kind == "cupy":
            r.append("takes numpy arrays and torch tensors, not cupy arrays")
        return r


class CupyBackend(Backend):
    """CUDA RawKernels through CuPy (``zeta/kernels/*.cu``): torch CUDA tensors and cupy arrays."""

    name = "cupy"
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    _why: Optional[str] = None
    _checked = False

    def unavailable_reason(self):
        if not CupyBackend._checked:
            if importlib.util.find_spec("cupy") is None:
                CupyBackend._why = (
                    "cupy is not installed (pip install zeta-attention[cuda12] or [cuda13])"
                )
            else:
                from .cupy_backend import unavailable_reason

                CupyBackend._why = unavailable_reason()
            CupyBackend._checked = True
        return CupyBackend._why

    def not_supported_reasons(self, info):
        r = super().not_supported_reasons(info)
        if info.kind == "numpy":
            r.append("takes torch CUDA tensors and cupy arrays, not numpy arrays")
        if info.topk > 256:
            r.append(
                f"topk {info.topk} > 256 (the kernels keep the top-k of a query in shared memory)"
            )
        return r


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
