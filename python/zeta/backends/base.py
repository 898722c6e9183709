"""What every backend has: its declaration (devices, dtypes, ops, why not) and its operations.

A backend converts its inputs itself and returns the caller's kind (numpy, torch or cupy).
The public functions (``zeta.ops``, ``zeta.primitives``) validate the arguments, pick a backend
with :func:`zeta.backends.select`, and call the operation; they never branch on a backend's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, FrozenSet, List, Optional, Tuple

from .._validate import DEFAULT_EXACT, MAX_KEY_DIM

#: The operations a backend may implement.
FLOAT_OPS = frozenset({"knn", "attention"})
PRIMITIVE_OPS = frozenset({"zorder", "morton_encode", "morton_decode", "argsort", "searchsorted"})


@dataclass
class CallInfo:
    """What a backend needs to know about a call to say whether it can take it."""

    kind: str  # "numpy", "torch" or "cupy"
    device: str  # "cpu", "cuda", ...
    dtype: str  # "float32", ... (the points' or codes' dtype)
    key_dim: int  # d_k, or the points' dimensions (1 for codes)
    requires_grad: bool = False  # a torch input requires grad (the call must be differentiable)
    topk: int = 0  # 0: not a top-k call
    op: str = "attention"
    exact: bool = DEFAULT_EXACT  # exact search requested (knn, attention)


class Backend:
    name = "?"
    devices: Tuple[str, ...] = ()  # empty: any
    kinds: Tuple[str, ...] = ("numpy", "torch")
    dtypes: Tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    max_key_dim = MAX_KEY_DIM
    ops: FrozenSet[str] = FLOAT_OPS | PRIMITIVE_OPS
    #: ops whose torch results are differentiable (autograd)
    differentiable: FrozenSet[str] = frozenset({"attention"})

    def unavailable_reason(self) -> Optional[str]:
        return None

    def not_supported_reasons(self, info: CallInfo) -> List[str]:
        r = []
        why = self.unavailable_reason()
        if why:
            r.append(why)
        if info.op not in self.ops:
            r.append(f"{info.op} is not implemented here")
        if info.kind not in self.kinds:
            r.append(f"takes {' and '.join(self.kinds)} inputs, not {info.kind}")
        if self.devices and info.device not in self.devices:
            r.append(f"device {info.device} not supported (supports {', '.join(self.devices)})")
        if info.op in FLOAT_OPS and info.dtype not in self.dtypes:
            r.append(f"dtype {info.dtype} not supported (supports {', '.join(self.dtypes)})")
        if not 1 <= info.key_dim <= self.max_key_dim:
            r.append(f"key_dim {info.key_dim} not in 1..{self.max_key_dim}")
        if info.requires_grad and info.op not in self.differentiable:
            r.append(f"no backward for {info.op}")
        return r

    # ---- operations (arguments validated; inputs of one kind, device and dtype) ----------

    def knn(self, q: Any, k: Any, topk: int, p: Any) -> Tuple[Any, Any]:
        """(B,H,N,topk) int64 indices and squared distances in q's dtype."""
        raise NotImplementedError

    def attention(
        self, q: Any, k: Any, v: Any, gamma: Any, topk: int, mean_token: bool, p: Any
    ) -> Any:
        """(B,H,N,d_v). gamma: a float64 numpy (H,) array for numpy/cupy inputs, a torch (H,)
        tensor on q's device for torch inputs (may require grad)."""
        raise NotImplementedError

    def zorder(self, x: Any, d: int, bits: int, shift: int, scale: float) -> Any:
        raise NotImplementedError

    def morton_encode(self, coords: Any, bits: int) -> Any:
        raise NotImplementedError

    def morton_decode(self, codes: Any, dims: int, bits: int) -> Any:
        raise NotImplementedError

    def argsort(self, codes: Any) -> Any:
        raise NotImplementedError

    def searchsorted(self, sorted_codes: Any, queries: Any, right: bool) -> Any:
        raise NotImplementedError
