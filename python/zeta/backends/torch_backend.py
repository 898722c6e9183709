"""The torch reference as a backend: plain torch ops (zeta.backends.torch_ref), any device.

Autograd comes by construction. The fallback for CUDA tensors without cupy, for float64 on a
GPU, and the oracle of the tests. float16/bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Optional, Tuple

import numpy as np

from .._validate import check_coords
from .base import Backend, CallInfo


def _ordered_int64(codes):
    """Unsigned codes as int64 with the same order (uint64: flip the top bit)."""
    import torch

    if codes.dtype == torch.uint64:
        return codes.view(torch.int64) ^ torch.iinfo(torch.int64).min
    return codes.to(torch.int64)


def _as_codes(c64, wide: bool):
    """int64 codes (uint64 bit patterns when wide) -> torch.uint64 / torch.uint32."""
    import torch

    return c64.view(torch.uint64) if wide else c64.to(torch.uint32)


class TorchBackend(Backend):
    """The readable reference in plain torch ops: any device, autograd by construction."""

    name = "torch"
    devices = ()  # any
    kinds = ("numpy", "torch")

    def unavailable_reason(self) -> Optional[str]:
        if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
            return None
        return "torch is not installed (pip install zeta-attention[torch])"

    def not_supported_reasons(self, info: CallInfo):
        r = super().not_supported_reasons(info)
        if info.op not in ("knn", "attention") and info.kind != "torch":
            r.append("runs the primitives on torch tensors only")
        return r

    def knn(self, q, k, topk, p) -> Tuple[Any, Any]:
        import torch

        from . import torch_ref

        numpy_in = isinstance(q, np.ndarray)
        qt = torch.from_numpy(q) if numpy_in else q.detach()
        kt = torch.from_numpy(k) if numpy_in else k.detach()
        if qt.dtype in (torch.float16, torch.bfloat16):
            qt, kt = qt.float(), kt.float()
        for t, nm in ((qt, "q"), (kt, "k")):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{nm}: contains NaN or inf")
        idx, d2 = torch_ref.knn(qt, kt, topk, **p.as_dict())
        if numpy_in:
            return idx.numpy(), d2.numpy().astype(q.dtype, copy=False)
        return idx, d2.to(q.dtype)

    def attention(self, q, k, v, gamma, topk, mean_token, p):
        import torch

        from . import torch_ref

        if isinstance(q, np.ndarray):
            check_coords(q, "q")
            check_coords(k, "k")
            if not np.isfinite(v).all():
                raise ValueError("v: contains NaN or inf")
            qq, kk, vv = (
                torch.from_numpy(np.asarray(a, dtype=np.promote_types(a.dtype, np.float32)))
                for a in (q, k, v)
            )
            out = torch_ref.attention(
                qq,
                kk,
                vv,
                topk=topk,
                gamma=torch.from_numpy(gamma),
                mean_token=mean_token,
                **p.as_dict(),
            )
            return out.numpy().astype(q.dtype, copy=False)
        if not torch.compiler.is_compiling():
            from .._validate import check_values_torch

            check_values_torch(q, k, v, gamma)
        qq, kk, vv = q, k, v
        if q.dtype in (torch.float16, torch.bfloat16):
            qq, kk, vv = q.float(), k.float(), v.float()
        out = torch_ref.attention(
            qq, kk, vv, topk=topk, gamma=gamma, mean_token=mean_token, **p.as_dict()
        )
        return out.to(q.dtype)

    # ---- primitives on torch tensors (any device) ----------------------------------------------

    def zorder(self, x, d, bits, shift, scale):
        import torch

        from . import torch_ref

        codes = torch_ref.zorder(x.detach().to(torch.float64), bits, shift=shift, scale=scale)
        return _as_codes(codes, d * bits > 32)

    def morton_encode(self, coords, bits):
        import torch

        from . import torch_ref

        d = coords.shape[-1]
        # the coordinates' bit patterns as int64 (uint64 viewed, narrower types widened)
        c = coords.view(torch.int64) if coords.dtype == torch.uint64 else coords.to(torch.int64)
        return _as_codes(torch_ref.morton_encode(c, bits), d * bits > 32)

    def morton_decode(self, codes, dims, bits):
        import torch

        wide = codes.dtype == torch.uint64
        c = codes.view(torch.int64) if wide else codes.to(torch.int64)
        out = torch.zeros(codes.shape + (dims,), dtype=torch.int64, device=codes.device)
        for b in range(bits):
            for j in range(dims):
                out[..., j] |= ((c >> (b * dims + j)) & 1) << b
        return out.view(torch.uint64) if wide else out.to(torch.uint32)

    def argsort(self, codes):
        import torch

        return torch.argsort(_ordered_int64(codes), dim=-1, stable=True)

    def searchsorted(self, sorted_codes, queries, right):
        import torch

        return torch.searchsorted(
            _ordered_int64(sorted_codes).contiguous(),
            _ordered_int64(queries).contiguous(),
            right=right,
        )
