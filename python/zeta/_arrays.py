"""numpy / torch interop: take either, compute on C-contiguous numpy, give back the input's type.

CPU torch tensors are viewed as numpy arrays without a copy (``Tensor.numpy()``) when they are
contiguous, and results come back through ``torch.from_numpy`` (no copy either).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def _torch():
    """torch if it is already imported (never import it just to check a type)."""
    return sys.modules.get("torch")


def is_torch(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def refuse_meta(t: Any, name: str) -> None:
    """A ValueError naming ``name`` for a meta tensor: it has shapes but no values to search
    (torch.compile traces shapes through the custom ops' fake kernels, not meta tensors)."""
    if t.device.type == "meta":
        raise ValueError(f"{name}: a meta tensor holds no values; pass CPU or CUDA tensors")


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Array-like -> numpy array (no copy when possible). Raises TypeError naming ``name``."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        if x.device.type != "cpu":
            raise TypeError(
                f"{name}: tensor is on {x.device}; this function runs on the CPU "
                "(move it with .cpu(), or use zeta.attention which dispatches to GPU backends)"
            )
        if x.requires_grad:
            x = x.detach()
        t = _torch()
        if x.dtype in (t.bfloat16,):
            x = x.float()
        return x.numpy()
    if isinstance(x, (list, tuple, int, float)) or hasattr(x, "__array__"):
        try:
            return np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{name}: cannot be read as an array ({e})") from None
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags["C_CONTIGUOUS"] else np.ascontiguousarray(a)


def like(out: np.ndarray, template: Any) -> Any:
    """Return ``out`` as the same kind of object as ``template`` (numpy or torch on CPU)."""
    if is_torch(template):
        # torch.uint32 / torch.uint64 keep the codes' order (sort, searchsorted work on them).
        return _torch().from_numpy(out)
    return out
