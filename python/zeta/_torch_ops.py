"""torch integration of the Rust backend: ``torch.library`` custom ops with fake kernels and
autograd, so ``zeta.attention`` works under autograd, ``torch.compile`` and ``opcheck``.

Layers (as flash-attn's interface): ``zeta::attention_fwd`` / ``zeta::attention_bwd`` wrap the
raw Rust calls on CPU tensors; ``register_fake`` gives shapes; ``register_autograd`` ties the
backward op to the forward. Only imported when a torch tensor reaches zeta.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _core
from ._validate import DEFAULT_EXACT, IndexParams


def _params(chunk, window, n_curves, n_sink, causal, bits, scale, exact=DEFAULT_EXACT):
    """The custom ops take the settings as scalars (a schema has no dicts); back to ``_Params``."""
    return IndexParams(chunk, window, n_curves, n_sink, causal, bits, scale, exact).as_dict()


def _np(t: Tensor):
    return t.detach().contiguous().numpy()


_HALF = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _bits(t: Tensor):
    """A float16/bfloat16 tensor's bits as a uint16 numpy array (numpy has no bfloat16)."""
    import numpy as np

    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


@torch.library.custom_op("zeta::attention_fwd", mutates_args=(), device_types="cpu")
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    topk: int,
    mean_token: bool,
    chunk: int,
    window: int,
    n_curves: int,
    n_sink: int,
    causal: bool,
    bits: int,
    scale: float,
    exact: bool,
) -> Tuple[Tensor, Tensor]:
    """q (B,H,N,dk), k (B,Hkv,S,dk), v (B,Hkv,S,dv), gamma (H,) -> out (B,H,N,dv), idx (B,H,N,topk) int32.

    On the CPU, v may be float16/bfloat16 with float32 q and k: read natively, summed in
    float32 (out float32)."""
    out, idx = _forward(
        q,
        k,
        v,
        gamma,
        topk,
        mean_token,
        _params(chunk, window, n_curves, n_sink, causal, bits, scale, exact),
        True,
    )
    return torch.from_numpy(out), torch.from_numpy(idx)


@attention_fwd.register_fake
def _(
    q, k, v, gamma, topk, mean_token, chunk, window, n_curves, n_sink, causal, bits, scale, exact
):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D")
    torch._check(
        q.dtype == k.dtype
        and (v.dtype == q.dtype or (v.dtype in _HALF and q.dtype == torch.float32)),
        lambda: "q, k, v must share a dtype (or, on the CPU, float32 q/k with half v)",
    )
    torch._check(q.shape[3] == k.shape[3], lambda: "q and k must share key_dim")
    torch._check(gamma.dim() == 1 and gamma.shape[0] == q.shape[1], lambda: "gamma must be (H,)")
    b, h, n, _ = q.shape
    out = q.new_empty((b, h, n, v.shape[3]))
    idx = q.new_empty((b, h, n, topk), dtype=torch.int32)
    return out, idx


@torch.library.custom_op("zeta::attention_bwd", mutates_args=(), device_types="cpu")
def attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    idx: Tensor,
    grad_out: Tensor,
    mean_token: bool,
    chunk: int,
    window: int,
    n_curves: int,
    n_sink: int,
    causal: bool,
    bits: int,
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dgamma) for :func:`attention_fwd`'s output, given its indices
    (a half-precision v, as the forward took it, is widened here; dv comes back in its dtype)."""
    dq, dk, dv, dg = _core.attention_backward(
        _np(q),
        _np(k),
        _np(v.float() if v.dtype != q.dtype else v),
        _np(gamma.to(torch.float64)),
        _np(idx),
        _np(grad_out.to(q.dtype)),
        mean_token,
        _params(chunk, window, n_curves, n_sink, causal, bits, scale),
    )
    return (
        torch.from_numpy(dq),
        torch.from_numpy(dk),
        torch.from_numpy(dv).to(v.dtype),
        torch.from_numpy(dg).to(gamma.dtype),
    )


@attention_bwd.register_fake
def _(
    q, k, v, gamma, idx, grad_out, mean_token, chunk, window, n_curves, n_sink, causal, bits, scale
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gamma)


_SCALARS = (
    "topk",
    "mean_token",
    "chunk",
    "window",
    "n_curves",
    "n_sink",
    "causal",
    "bits",
    "scale",
    "exact",
)


def _setup_context(ctx, inputs, output):
    q, k, v, gamma = inputs[:4]
    ctx.scalars = dict(zip(_SCALARS, inputs[4:]))
    ctx.save_for_backward(q, k, v, gamma, output[1])


def _backward(ctx, grad_out, _grad_idx):
    q, k, v, gamma, idx = ctx.saved_tensors
    s = ctx.scalars
    dq, dk, dv, dg = attention_bwd(
        q,
        k,
        v,
        gamma,
        idx,
        grad_out.contiguous(),
        s["mean_token"],
        s["chunk"],
        s["window"],
        s["n_curves"],
        s["n_sink"],
        s["causal"],
        s["bits"],
        s["scale"],
    )
    return (dq, dk, dv, dg) + (None,) * len(_SCALARS)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _index_params(chunk, window, n_curves, n_sink, causal, bits, scale, exact=DEFAULT_EXACT):
    from ._validate import IndexParams

    return IndexParams(chunk, window, n_curves, n_sink, causal, bits, scale, exact)


@attention_fwd.register_kernel("cuda")
def _(
    q, k, v, gamma, topk, mean_token, chunk, window, n_curves, n_sink, causal, bits, scale, exact
):
    from .backends import cupy_backend

    p = _index_params(chunk, window, n_curves, n_sink, causal, bits, scale, exact)
    return cupy_backend.torch_attention_fwd(q, k, v, gamma, topk, mean_token, p)


@attention_bwd.register_kernel("cuda")
def _(
    q, k, v, gamma, idx, grad_out, mean_token, chunk, window, n_curves, n_sink, causal, bits, scale
):
    from .backends import cupy_backend

    p = _index_params(chunk, window, n_curves, n_sink, causal, bits, scale)
    return cupy_backend.torch_attention_bwd(q, k, v, gamma, idx, grad_out, mean_token, p)


def _eager_no_grad(*ts: Tensor) -> bool:
    """Plain CPU tensors, run eagerly, with no backward to follow (grad off, or no input
    requires it): the forward may skip the indices the backward would need."""
    if torch.compiler.is_compiling():
        return False
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in ts):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def _forward(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, topk, mean_token, params, indices):
    """The core's forward on CPU tensors (a half-precision v read natively with float32 q, k):
    -> out, idx (None unless ``indices``)."""
    g = _np(gamma.detach().to(torch.float64))
    if v.dtype in _HALF and q.dtype == torch.float32:
        return _core.attention_forward_half(
            _np(q), _np(k), _bits(v), _HALF[v.dtype], g, topk, mean_token, params, indices=indices
        )
    return _core.attention_forward(
        _np(q), _np(k), _np(v), g, topk, mean_token, params, indices=indices
    )


def _attention_values(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, topk, mean_token, p):
    """:func:`attention_fwd`'s output alone: the core neither allocates nor fills the
    (B, H, N, topk) indices (33.5 MB at N = 32k, H = 8, top-32)."""
    out, _ = _forward(q, k, v, gamma, topk, mean_token, p.as_dict(), False)
    return torch.from_numpy(out)


def attention(
    q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, topk: int, mean_token: bool, p
) -> Tensor:
    """The custom op: Rust on CPU tensors, the CUDA kernels on CUDA tensors; on both, half
    precisions compute queries/keys in float32 and read the values in their dtype."""
    dtype = q.dtype
    if dtype in _HALF and q.device.type == "cpu":
        q, k = q.float(), k.float()
    if _eager_no_grad(q, k, v, gamma):
        return _attention_values(q, k, v, gamma, topk, mean_token, p).to(dtype)
    out, _ = attention_fwd(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        gamma,
        topk,
        mean_token,
        p.chunk,
        p.window,
        p.n_curves,
        p.n_sink,
        p.causal,
        p.bits,
        p.scale,
        p.exact,
    )
    return out.to(dtype)
