"""``ZetaAttention``: a multi-head attention layer that uses ZETA top-k attention.

Queries and keys are projected to a tiny ``key_dim`` (default 3) per head, values keep the
full head width; each query attends to its ``topk`` nearest keys with Adaptive
Cauchy-Softmax scores and a learnable, positive per-head ``gamma``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._validate import check_dims
from .ops import attention


class ZetaAttention(nn.Module):
    """Multi-head (or grouped-query) ZETA attention.

    Args:
        embed_dim: model width E.
        num_heads: query heads H (E % H == 0; value head width E // H).
        key_dim: width of each head's queries and keys (1..8, default 3).
        num_kv_heads: key/value heads H_kv (H % H_kv == 0); default H.
        topk: keys attended per query.
        gamma_init: initial gamma of every head.
        bias: bias in the projections.
        **zeta_kwargs: passed to :func:`zeta.attention` (causal, chunk, window, n_curves,
            n_sink, mean_token, bits, scale, exact, backend).

    Shapes:
        forward(x: (B, N, E)) -> (B, N, E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        key_dim: int = 3,
        num_kv_heads: Optional[int] = None,
        topk: int = 32,
        gamma_init: float = 1.0,
        bias: bool = True,
        **zeta_kwargs,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim: {embed_dim} is not a multiple of num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads: {num_heads} query heads are not a multiple of {num_kv_heads}"
            )
        check_dims("key_dim", key_dim)
        if topk < 1:
            raise ValueError(f"topk: must be >= 1, got {topk}")
        if not gamma_init > 0:
            raise ValueError(f"gamma_init: must be > 0, got {gamma_init}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.key_dim, self.topk = key_dim, topk
        self.head_dim = embed_dim // num_heads
        self.zeta_kwargs = zeta_kwargs
        self.q_proj = nn.Linear(embed_dim, num_heads * key_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * key_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # gamma = exp(log_gamma) stays positive whatever the optimiser does.
        self.log_gamma = nn.Parameter(torch.full((num_heads,), math.log(gamma_init)))

    @property
    def gamma(self) -> Tensor:
        """Per-head gamma, shape (H,)."""
        return self.log_gamma.exp()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.key_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.key_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # topk > n is fine: zeta.attention attends to the keys there are.
        o = attention(q, k, v, topk=self.topk, gamma=self.gamma.to(q.dtype), **self.zeta_kwargs)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, self.embed_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"key_dim={self.key_dim}, topk={self.topk}"
        )


class ZetaBlock(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Shapes: forward(x: (B, N, E)) -> (B, N, E).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, mlp_ratio: int = 4, **attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = ZetaAttention(embed_dim, num_heads, **attn_kwargs)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_ratio * embed_dim),
            nn.GELU(),
            nn.Linear(mlp_ratio * embed_dim, embed_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
