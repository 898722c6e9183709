"""``KVCache``: the incremental Z-order KV cache for CPU decoding.

A tail buffer plus sorted runs that merge like a binary counter (the same dyadic-run index
as :func:`zeta.attention`), so ``extend`` is amortised O(log N) per token and ``attend`` for
the newest token searches every run plus the tail. Step-by-step decoding gives the same
output as one parallel :func:`zeta.attention` call with the same settings. For
``attend(exact=True)`` the cache also keeps the first curve's keys in a few levelled runs (at
most log8(chunks) + 1: 6 at 1M tokens, against up to 14 dyadic ones), so an exact decode step
searches the fewer of the two lists.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from . import _core
from ._arrays import is_torch
from ._validate import check_dims, default_window, gamma_array, index_params

_DTYPES = ("float32", "float16", "bfloat16")
# Larger ints cannot be sizes (the core takes them as 64-bit); the core bounds the rest.
_MAX_INT = 2**63 - 1


def _f32(x: Any, name: str) -> np.ndarray:
    if is_torch(x):
        if x.device.type != "cpu":
            raise TypeError(f"{name}: tensor on {x.device}; the KV cache runs on the CPU")
        x = x.detach().float().contiguous().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float array, got {x.dtype}")
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected 4 axes (B, heads, T, dim), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


class KVCache:
    """KV cache with a Z-order index, for top-k Cauchy attention while decoding.

    Args:
        num_kv_heads: H_kv.
        key_dim: d_k (1..8).
        value_dim: d_v.
        batch: B.
        chunk, window, n_curves, n_sink, bits, scale: the index settings, as in
            :func:`zeta.attention` (the same settings give the same outputs). ``window=None``
            takes :func:`zeta.attention`'s default for each ``attend``'s ``topk`` (and
            ``exact``); ``n_curves=None``: 2, the default of the window search, so that
            ``attend(..., exact=False)`` too gives ``zeta.attention``'s answer (a cache that
            only serves exact attends, the default, needs 1: less memory, faster ``extend``;
            a ZetaAttention layer's cache takes the layer's).
        dtype: storage of values: "float32", "float16" or "bfloat16" (keys are float32).

    Methods:
        extend(k (B, H_kv, T, d_k), v (B, H_kv, T, d_v)): append T tokens.
        attend(q (B, H, T_q, d_k), topk=32, gamma=1.0, mean_token=False, window=None,
            exact=True) -> (B, H, T_q, d_v):
            the last T_q positions' queries (T_q = 1 to decode), causal among them, GQA
            when H > H_kv. numpy in -> numpy out (float32); torch in -> torch out.

    ``len(cache)`` is the number of tokens; ``cache.nbytes`` the bytes it holds.
    A call that raises leaves the cache as it was.

    Threads: one cache serves many threads. ``attend`` calls run concurrently with each
    other; ``extend`` calls are serialised and wait (without holding the GIL) for running
    attends; every call sees the cache before or after each extend, never in between.
    Absurd sizes raise ValueError/MemoryError; a cache file is untrusted input and a
    malformed one raises ValueError.
    """

    def __init__(
        self,
        num_kv_heads: int,
        key_dim: int,
        value_dim: int,
        *,
        batch: int = 1,
        chunk: int = 64,
        window: Optional[int] = None,
        n_curves: Optional[int] = None,
        n_sink: int = 0,
        bits: Optional[int] = None,
        scale: float = 1.0,
        dtype: str = "float32",
        _core_cache: Any = None,
    ):
        if _core_cache is not None:
            self._c = _core_cache
            self._window = self._c.config()[4]["window"]  # 0: unset
            self._dims = tuple(self._c.config()[:4])
            return
        for nm, val in (
            ("num_kv_heads", num_kv_heads),
            ("key_dim", key_dim),
            ("value_dim", value_dim),
            ("batch", batch),
        ):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                raise TypeError(f"{nm}: expected an int, got {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{nm}: must be >= 1, got {val}")
            if val > _MAX_INT:
                raise ValueError(f"{nm}: {val} is too large")
        check_dims("key_dim", key_dim)
        for nm, val in (
            ("chunk", chunk),
            ("window", window),
            ("n_curves", n_curves),
            ("n_sink", n_sink),
            ("bits", bits),
        ):
            if (
                isinstance(val, (int, np.integer))
                and not isinstance(val, bool)
                and abs(int(val)) > _MAX_INT
            ):
                raise ValueError(f"{nm}: {val} is too large")
        dtype = str(dtype).replace("torch.", "")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {_DTYPES}, got {dtype!r}")
        p = index_params(
            int(key_dim),
            32,
            causal=True,
            chunk=chunk,
            window=window,
            n_curves=n_curves,
            n_sink=n_sink,
            bits=bits,
            scale=scale,
            # n_curves=None resolves to the window search's 2 curves: any attend may ask for
            # either search and get zeta.attention's answer with the same settings
            exact=False,
        )
        # window=None: resolved per attend() from topk, as zeta.attention does (the sorted
        # runs do not depend on the window). 0 marks "unset" in the stored settings.
        p = dataclasses.replace(p, window=0 if window is None else p.window)
        self._c = _core.KVCacheCore(
            int(batch), int(num_kv_heads), int(key_dim), int(value_dim), p.as_dict(), dtype
        )
        self._window = p.window
        self._dims = (int(batch), int(num_kv_heads), int(key_dim), int(value_dim))

    # -- shape facts -------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self._dims[0]

    @property
    def num_kv_heads(self) -> int:
        return self._dims[1]

    @property
    def key_dim(self) -> int:
        return self._dims[2]

    @property
    def value_dim(self) -> int:
        return self._dims[3]

    @property
    def settings(self) -> dict:
        """The index settings (chunk, window, n_curves, n_sink, bits, scale)."""
        if not hasattr(self, "_settings"):  # fixed at construction
            d = dict(self._c.config()[4])
            d.pop("causal", None)
            if d["window"] == 0:
                d["window"] = None  # resolved from topk at attend time
            self._settings = d
        return dict(self._settings)

    @property
    def dtype(self) -> str:
        return self._c.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: keys, values, codes, sorted runs (both lists), block boxes."""
        return self._c.nbytes

    def __len__(self) -> int:
        return len(self._c)

    def __repr__(self) -> str:
        b, hkv, dk, dv, _ = self._c.config()
        return (
            f"KVCache(len={len(self)}, batch={b}, num_kv_heads={hkv}, key_dim={dk}, value_dim={dv}, "
            f"dtype={self.dtype!r}, nbytes={self.nbytes})"
        )

    # -- the work ----------------------------------------------------------------------
    def extend(self, k: Any, v: Any) -> None:
        """Append T tokens: k (B, H_kv, T, key_dim), v (B, H_kv, T, value_dim).

        k's coordinates must be finite and within ``zeta._validate.coord_limit`` (float32:
        2.66e18 at key_dim 3), v finite; otherwise ValueError and the cache is unchanged.
        """
        kn, vn = _f32(k, "k"), _f32(v, "v")
        self._c.extend(kn, vn)

    def attend(
        self,
        q: Any,
        *,
        topk: int = 32,
        gamma: Any = 1.0,
        mean_token: bool = False,
        window: Optional[int] = None,
        exact: bool = True,
    ) -> Any:
        """Top-k Cauchy attention of the last T_q positions' queries over the cache.

        Args:
            q: (B, H, T_q, key_dim); H % H_kv == 0; T_q <= len(cache); coordinates as
                :meth:`extend`'s keys.
            topk: keys attended per query (>= 1; fewer keys than topk: all of them).
            gamma: float or per-head (H,), in [2^-24, 2^62].
            mean_token: as in :func:`zeta.attention`.
            window: overrides the cache's ``window`` for this call (the sorted runs do not
                depend on it); None: the cache's, else :func:`zeta.attention`'s default.
            exact: the brute-force top-k by (distance, position) (the default), as
                ``zeta.attention(..., exact=True)`` (every run keeps the block boxes it
                needs). Same output, bit for bit, whatever runs it searches. False: the
                window search.

        Returns:
            (B, H, T_q, value_dim): float32 numpy, or a torch tensor in q's dtype.
        """
        if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
            raise TypeError(f"topk: expected an int, got {type(topk).__name__}")
        if topk < 1:
            raise ValueError(f"topk: must be >= 1, got {topk}")
        topk = min(int(topk), _MAX_INT)  # more than the cache holds means all of them
        if not isinstance(exact, (bool, np.bool_)):
            raise TypeError(f"exact: expected a bool, got {type(exact).__name__}")
        if window is None:
            window = self._window if self._window > 0 else default_window(int(topk), bool(exact))
        elif isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window: must be an int >= 1, got {window!r}")
        qn = _f32(q, "q")
        g = gamma_array(gamma, qn.shape[1])
        b, h, tq, dk = qn.shape
        if h * tq == 0:  # empty in, empty out (as zeta.attention)
            if b != self.batch or dk != self.key_dim or h % self.num_kv_heads:
                raise ValueError(
                    f"q: shape {qn.shape} does not fit the cache (batch {self.batch}, a multiple "
                    f"of {self.num_kv_heads} heads, key_dim {self.key_dim})"
                )
            out = np.zeros((b, h, tq, self.value_dim), np.float32)
            return self._like_q(out, q)
        if len(self) == 0:
            raise ValueError("q: the cache is empty: extend it before attend")
        window = min(int(window), _MAX_INT)
        out = self._c.attend(qn, int(topk), g, bool(mean_token), int(window), bool(exact))
        return self._like_q(out, q)

    def _decode_packed(
        self,
        qkv: Any,
        num_heads: int,
        topk: int,
        gamma: np.ndarray,
        mean_token: bool,
        exact: bool,
    ) -> Any:
        """``extend`` then ``attend`` in one core call, for :class:`zeta.nn.ZetaAttention`'s
        decode step: ``qkv`` (B, T, H*key_dim + H_kv*(key_dim + value_dim)), each row a
        token's query heads, key heads and value heads side by side (a fused projection's
        output); ``gamma`` float64 (H,). Returns (B, T, H*value_dim) like ``qkv`` (torch in,
        torch out). The core checks every argument before it appends anything."""
        import torch

        x = qkv.detach()
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
            if x.device.type != "cpu":
                raise TypeError(f"qkv: tensor on {x.device}; the KV cache runs on the CPU")
            x = x.float().contiguous()
        window = self._window if self._window > 0 else default_window(topk, exact)
        out = self._c.decode_packed(x.numpy(), num_heads, topk, gamma, mean_token, window, exact)
        return torch.from_numpy(out).to(qkv.dtype)

    @staticmethod
    def _like_q(out: np.ndarray, q: Any) -> Any:
        if is_torch(q):
            import torch

            return torch.from_numpy(out).to(q.dtype)
        return out

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to ``path`` atomically (temporary file + rename), versioned, with
        a CRC32 checksum. A crash mid-save leaves an older file at ``path`` intact."""
        self._c.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> KVCache:
        """Read a cache written by :meth:`save` (bit-exact). Truncated, corrupt,
        wrong-version files raise ValueError; a missing file raises OSError."""
        return cls(0, 0, 0, _core_cache=_core.KVCacheCore.load(os.fspath(path)))

    def same_contents(self, other: KVCache) -> bool:
        """True when both caches hold bit-identical keys, values, settings and index."""
        return self._c.same_contents(other._c)
