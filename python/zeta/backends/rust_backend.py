"""The Rust core on the CPU (rayon, GIL released): numpy arrays and CPU torch tensors.

float16/bfloat16 inputs: queries and keys in float32, values read in their dtype (half the
bytes gathered) and summed in float32. torch tensors go through the
``torch.library`` custom ops of :mod:`zeta._torch_ops` (autograd, torch.compile).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import numpy as np

from .._arrays import contiguous, like, to_numpy
from .base import Backend, CallInfo


def _np_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    return np.ascontiguousarray(a)


def _codes_2d(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype.type in (np.uint8, np.uint16):
        a = a.astype(np.uint32)
    if a.dtype.type not in (np.uint32, np.uint64):
        raise TypeError(f"{name}: expected unsigned integer codes (uint32/uint64), got {a.dtype}")
    rows = int(np.prod(a.shape[:-1], dtype=np.int64))  # not -1: ambiguous when n == 0
    return contiguous(a.reshape(rows, a.shape[-1]))


class RustBackend(Backend):
    """The Rust core (rayon, CPU). float16/bfloat16: q/k in float32, values read natively."""

    name = "rust"
    devices = ("cpu",)

    def unavailable_reason(self) -> Optional[str]:
        try:
            from .. import _core  # noqa: F401
        except ImportError as e:  # pragma: no cover - the wheel always ships it
            return f"extension not importable: {e}"
        return None

    def not_supported_reasons(self, info: CallInfo):
        r = super().not_supported_reasons(info)
        if info.kind == "torch" and "torch" not in sys.modules:
            r.append("torch not imported")
        return r

    # ---- attention and knn ----------------------------------------------------------------

    def knn(self, q, k, topk, p) -> Tuple[Any, Any]:
        from .. import _core

        if isinstance(q, np.ndarray):
            idx, d2 = _core.knn(_np_float(q), _np_float(k), topk, p.as_dict())
            return idx, d2.astype(q.dtype, copy=False)
        import torch

        half = (torch.float16, torch.bfloat16)
        qn = q.detach().float() if q.dtype in half else q.detach()
        kn = k.detach().float() if k.dtype in half else k.detach()
        idx, d2 = _core.knn(qn.contiguous().numpy(), kn.contiguous().numpy(), topk, p.as_dict())
        return torch.from_numpy(idx), torch.from_numpy(d2).to(q.dtype)

    def attention(self, q, k, v, gamma, topk, mean_token, p):
        if isinstance(q, np.ndarray):
            from .. import _core

            qn, kn = _np_float(q), _np_float(k)
            if v.dtype == np.float16:  # read natively by the core: half the bytes gathered
                vb = np.ascontiguousarray(v).view(np.uint16)
                out, _ = _core.attention_forward_half(
                    qn, kn, vb, "float16", gamma, topk, mean_token, p.as_dict(), indices=False
                )
            else:
                # no backward follows: the (B, H, N, topk) indices are not even allocated
                out, _ = _core.attention_forward(
                    qn, kn, _np_float(v), gamma, topk, mean_token, p.as_dict(), indices=False
                )
            return out.astype(q.dtype, copy=False)
        from .. import _torch_ops

        return _torch_ops.attention(q, k, v, gamma, topk, mean_token, p)

    # ---- primitives ---------------------------------------------------------------------------

    def zorder(self, x, d, bits, shift, scale):
        from .. import _core

        a = to_numpy(x, "x")
        if a.dtype == np.float16:
            a = a.astype(np.float32)
        lead = a.shape[:-1]
        out = _core.zorder(contiguous(a.reshape(-1, d)), bits, int(shift), scale, d * bits > 32)
        return like(out.reshape(lead), x)

    def morton_encode(self, coords, bits):
        from .. import _core

        a = to_numpy(coords, "coords")
        d = a.shape[-1]
        out = _core.morton_encode(contiguous(a.reshape(-1, d)), bits, d * bits > 32)
        return like(out.reshape(a.shape[:-1]), coords)

    def morton_decode(self, codes, dims, bits):
        from .. import _core

        a = to_numpy(codes, "codes")
        out = _core.morton_decode(contiguous(a.reshape(-1)), int(dims), bits)
        return like(out.reshape(a.shape + (int(dims),)), codes)

    def argsort(self, codes):
        from .. import _core

        a = to_numpy(codes, "codes")
        out = _core.argsort(_codes_2d(a, "codes"))
        return like(out.reshape(a.shape), codes)

    def searchsorted(self, sorted_codes, queries, right):
        from .. import _core

        s = to_numpy(sorted_codes, "sorted_codes")
        q = to_numpy(queries, "queries")
        if q.dtype != s.dtype:
            if q.dtype.kind == "u" and np.can_cast(q.dtype, s.dtype):
                q = q.astype(s.dtype)
            elif s.dtype.kind == "u" and q.dtype.kind == "u":
                s = s.astype(np.uint64)
                q = q.astype(np.uint64)
            else:
                raise TypeError(f"queries: dtype {q.dtype} does not match sorted_codes' {s.dtype}")
        s2 = _codes_2d(s, "sorted_codes")
        q2 = _codes_2d(q, "queries")
        if s2.shape[0] != q2.shape[0]:
            s2 = s2.reshape(q2.shape[0], -1)
        out = _core.searchsorted(s2, q2, right)
        return like(out.reshape(q.shape), queries)
