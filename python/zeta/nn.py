"""``ZetaAttention``: a multi-head attention layer that uses ZETA top-k attention.

Queries and keys are projected to a tiny ``key_dim`` (default 3) per head, values keep the
full head width; each query attends to its ``topk`` nearest keys with Adaptive
Cauchy-Softmax scores and a learnable, positive per-head ``gamma``.

Decoding: ``make_caches(model)`` gives one :class:`zeta.KVCache` per ``ZetaAttention`` layer;
``layer(x, cache=c)`` appends this call's keys/values to ``c`` and attends through it (a
prompt in one call, then a token or a few per call), with the same output as the parallel
forward over the whole sequence.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import (
    DEFAULT_EXACT,
    GAMMA_MAX,
    GAMMA_MIN,
    GAMMA_RANGE,
    check_dims,
    default_n_curves,
    gamma_array,
)
from .cache import KVCache
from .ops import attention

# v_proj's weights start at std VALUE_INIT_STD / sqrt(embed_dim) (see reset_parameters).
VALUE_INIT_STD = 0.16

# zeta_kwargs that describe the index; a KVCache must be built with the same ones.
_INDEX_KEYS = ("chunk", "window", "n_curves", "n_sink", "bits", "scale")


#: log_gamma's clamp: 1e-4 inside log(GAMMA_MIN) and log(GAMMA_MAX), so that exp() of it in
#: float32 (relative error ~1e-7) stays within the accepted range.
_LOG_GAMMA_MIN = math.log(GAMMA_MIN) + 1e-4
_LOG_GAMMA_MAX = math.log(GAMMA_MAX) - 1e-4


class ZetaAttention(nn.Module):
    """Multi-head (or grouped-query) ZETA attention.

    Args:
        embed_dim: model width E.
        num_heads: query heads H (E % H == 0; value head width E // H).
        key_dim: width of each head's queries and keys (1..8, default 3: the paper's; the
            Z-order index is made for tiny key spaces).
        num_kv_heads: key/value heads H_kv (H % H_kv == 0); default H.
        topk: keys attended per query (default 32: the paper's; MQAR and the char-LM learn
            as softmax does with it).
        gamma_init: initial gamma of every head (default 1.0; 0.1 measured worse: MQAR
            settings D / E 7.8% / 11.4% vs 68.3% / 97.6%).
        bias: bias in the projections.
        **zeta_kwargs: passed to :func:`zeta.attention` (causal, chunk, window, n_curves,
            n_sink, mean_token, bits, scale, exact, backend), with its defaults: the exact
            search (the brute-force top-k; 1 curve); ``exact=False`` for the window search
            (2 curves and window ``4 * topk`` by default: recall@32 ~0.94 on Gaussian 3-D
            keys at 64k). ``mean_token`` is off by default: it gained nothing on MQAR
            (README, "Quality").

    Shapes:
        forward(x: (B, N, E), cache=None) -> (B, N, E).

    Initialisation (:meth:`reset_parameters`): PyTorch's defaults except ``v_proj``, whose
    weights start small (std ``VALUE_INIT_STD / sqrt(embed_dim)``). Measured reason: in a plain
    transformer without a short convolution, top-k Cauchy attention with PyTorch's default
    value scale stays on the MQAR plateau where softmax attention learns; with small values it
    learns (``benches/mqar.py --setting A``; the README's "Training" table has the ablation).
    A model-wide init (``model.apply(...)``) replaces this, as it does for any layer.

    With ``cache`` (a :class:`zeta.KVCache` from :meth:`make_cache` or :func:`make_caches`),
    ``x`` holds the next N positions of the sequence: their keys/values are appended to the
    cache and their queries attend through it. Calling with a prompt, then one token per call,
    gives the output of the parallel forward over the whole sequence. This is inference: the
    cache stores detached float32 keys/values on the CPU, so nothing flows back into the
    attention weights (use it under ``torch.no_grad()``).
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
        if not GAMMA_MIN <= gamma_init <= GAMMA_MAX:
            raise ValueError(f"gamma_init: {GAMMA_RANGE}, got {gamma_init}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.key_dim, self.topk = key_dim, topk
        self.head_dim = embed_dim // num_heads
        self.zeta_kwargs = zeta_kwargs
        self.q_proj = nn.Linear(embed_dim, num_heads * key_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * key_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # gamma = exp(log_gamma) stays positive whatever the optimiser does.
        self.gamma_init = float(gamma_init)
        self.log_gamma = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the layer (called by the constructor).

        q_proj, k_proj, out_proj: PyTorch's ``nn.Linear`` default. v_proj: weights
        N(0, VALUE_INIT_STD^2 / embed_dim), bias 0, i.e. values start at about 0.28x the
        scale PyTorch's default would give them (0.16 per component for a unit-variance input).
        Why: with the default value scale, a plain 2-layer transformer without convolution
        stays on the MQAR plateau (setting A of ``benches/mqar.py``: 15-17% vs 100% with small
        values, all else equal); small q/k, normalised q/k and a zero out_proj did not help
        (README, "Training"). log_gamma: log(gamma_init).
        """
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            lin.reset_parameters()
        nn.init.normal_(self.v_proj.weight, std=VALUE_INIT_STD / math.sqrt(self.embed_dim))
        if self.v_proj.bias is not None:
            nn.init.zeros_(self.v_proj.bias)
        with torch.no_grad():
            self.log_gamma.fill_(math.log(self.gamma_init))

    @property
    def gamma(self) -> Tensor:
        """Per-head gamma, shape (H,): exp(log_gamma), log_gamma clamped to just inside the
        range the attention accepts, [2^-24, 2^62] (``zeta._validate.GAMMA_MIN`` /
        ``GAMMA_MAX``; outside it the float32 scores or their gradients overflow), so no
        optimiser step makes the layer fail. The gradient of log_gamma is 0 while it sits
        outside."""
        return self.log_gamma.clamp(_LOG_GAMMA_MIN, _LOG_GAMMA_MAX).exp()

    def make_cache(self, *, batch: int = 1, dtype: str = "float32") -> KVCache:
        """An empty :class:`zeta.KVCache` that fits this layer (heads, dims, index settings).

        ``dtype`` is the storage of the cached values ("float32", "float16", "bfloat16")."""
        if not self.zeta_kwargs.get("causal", True):
            raise ValueError(
                "cache: a KV cache needs causal attention; this layer has causal=False"
            )
        index = {k: v for k, v in self.zeta_kwargs.items() if k in _INDEX_KEYS}
        # An exact layer searches curve 0 only: its cache needs no second curve.
        if index.get("n_curves") is None:
            index["n_curves"] = default_n_curves(bool(self.zeta_kwargs.get("exact", DEFAULT_EXACT)))
        return KVCache(
            self.num_kv_heads, self.key_dim, self.head_dim, batch=batch, dtype=dtype, **index
        )

    def _check_cache(self, cache: Any, x: Tensor) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a zeta.KVCache, got {type(cache).__name__}")
        if x.device.type != "cpu":
            raise ValueError(
                f"x: on {x.device}; decoding through a zeta.KVCache runs on the CPU "
                "(move the model there: model.cpu())"
            )
        want = (x.shape[0], self.num_kv_heads, self.key_dim, self.head_dim)
        got = (cache.batch, cache.num_kv_heads, cache.key_dim, cache.value_dim)
        if got != want:
            raise ValueError(
                f"cache: made for (batch, num_kv_heads, key_dim, value_dim) = {got}, this call "
                f"needs {want}; build caches with zeta.nn.make_caches(model, batch=...)"
            )
        if not hasattr(self, "_cache_settings"):
            self._cache_settings = self.make_cache().settings
        if cache.settings != self._cache_settings:
            raise ValueError(
                f"cache: index settings {cache.settings} differ from this layer's "
                f"{self._cache_settings}; build caches with zeta.nn.make_caches(model)"
            )

    def _gamma_f64(self) -> Any:
        """gamma as a float64 numpy array (H,), recomputed only when log_gamma changes
        (in-place updates bump its version): a decode step needs it every call."""
        p = self._parameters["log_gamma"]
        key = _version_key(p)
        memo = self.__dict__.get("_gamma_memo")
        if key is None or memo is None or memo[0] != key:
            memo = (key, gamma_array(self.gamma.detach().float(), self.num_heads))
            self._gamma_memo = memo
        return memo[1]

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch tensor, got {type(x).__name__}")
        if cache is not None:
            o = self._decode_step(x, cache)
            if o is not None:
                return o
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        if cache is not None:
            self._check_cache(cache, x)
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.key_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.key_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is None:
            # topk > n is fine: zeta.attention attends to the keys there are.
            o = attention(q, k, v, topk=self.topk, gamma=self.gamma.to(q.dtype), **self.zeta_kwargs)
        elif n == 0:
            o = q.new_zeros(b, self.num_heads, 0, self.head_dim)
        else:  # a projection is hooked or replaced: the public cache calls
            cache.extend(k, v)
            o = cache.attend(
                q,
                topk=self.topk,
                gamma=self._gamma_f64(),
                mean_token=bool(self.zeta_kwargs.get("mean_token", False)),
                exact=bool(self.zeta_kwargs.get("exact", DEFAULT_EXACT)),
            )
        return self.out_proj(o.transpose(1, 2).reshape(b, n, self.embed_dim))

    def _decode_step(self, x: Tensor, cache: KVCache) -> Optional[Tensor]:
        """The cache path of :meth:`forward`: one fused q/k/v projection, one core call
        (append, then attend) and no submodule calls, since a one-token step of a small model
        is dominated by per-call overhead (``benches/bench_generate.py``). Returns None when a
        projection is not a plain, unhooked ``nn.Linear`` or a global module hook exists;
        :meth:`forward` then takes the module-by-module path (same result)."""
        m = self._modules
        qp, kp, vp, op = m["q_proj"], m["k_proj"], m["v_proj"], m["out_proj"]
        if not all(_plain(lin, nn.Linear) for lin in (qp, kp, vp, op)) or _global_hooks():
            return None
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        self._check_cache(cache, x)
        b, n, e = x.shape
        if n == 0:
            return op(x.new_zeros(b, 0, e))
        w, bias = self._qkv_weight(qp._parameters, kp._parameters, vp._parameters)
        kw = self.zeta_kwargs
        o = cache._decode_packed(
            F.linear(x, w, bias),
            self.num_heads,
            self.topk,
            self._gamma_f64(),
            bool(kw.get("mean_token", False)),
            bool(kw.get("exact", DEFAULT_EXACT)),
        )
        po = op._parameters
        return F.linear(o, po["weight"], po["bias"])

    def _qkv_weight(self, *params: dict) -> tuple:
        """q/k/v weights (and biases) stacked, rebuilt only when one of them changes (an
        in-place update bumps a tensor's version; ``.to()`` changes its storage)."""
        ts = [p[nm] for nm in ("weight", "bias") for p in params if p[nm] is not None]
        key = [_version_key(t) for t in ts]
        memo = self.__dict__.get("_qkv_memo")
        if None in key or memo is None or memo[0] != key:
            with torch.no_grad():
                w = torch.cat([p["weight"] for p in params], 0)
                bias = (
                    None if params[0]["bias"] is None else torch.cat([p["bias"] for p in params], 0)
                )
            memo = (key, w, bias)
            self._qkv_memo = memo
        return memo[1], memo[2]

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"key_dim={self.key_dim}, topk={self.topk}"
        )


class ZetaBlock(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Shapes: forward(x: (B, N, E), cache=None) -> (B, N, E); ``cache`` goes to the attention.

    No short convolution by default: with ZetaAttention's defaults a plain 2-layer model
    learns MQAR without one (``benches/mqar.py --setting A|B``), and where a task needs one
    (the ``--quick`` MQAR), softmax attention needs it just as much, so it is a model choice
    (``zeta.hf.ZetaConfig(conv_kernel=...)`` has it), not a ZETA one.
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

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache=cache)
        return x + self.mlp(self.norm2(x))


def _version_key(t: Tensor) -> Optional[tuple]:
    """What identifies a tensor's contents for a memo: its version counter (bumped by
    in-place updates) and storage (changed by ``.to()``); None for an inference tensor,
    which has no version counter (the memo is then rebuilt every call)."""
    try:
        return (t._version, t.data_ptr())
    except RuntimeError:
        return None


def _plain(m: Any, cls: type) -> bool:
    """``m`` is exactly a ``cls`` (not a subclass that may compute something else) and has no
    forward hooks: a lean path may then do its work without calling it."""
    return type(m) is cls and not (m._forward_hooks or m._forward_pre_hooks)


def _global_hooks() -> bool:
    """Forward hooks registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as M

    return bool(M._global_forward_hooks or M._global_forward_pre_hooks)


def zeta_layers(model: nn.Module) -> List[ZetaAttention]:
    """Every ZetaAttention layer of ``model``, in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, ZetaAttention)]


def make_caches(model: nn.Module, *, batch: int = 1, dtype: str = "float32") -> List[KVCache]:
    """One empty :class:`zeta.KVCache` per ZetaAttention layer of ``model``, in
    ``model.modules()`` order (pass ``caches[i]`` to the i-th layer's forward).

    Args:
        model: a module containing ZetaAttention layers (or one such layer).
        batch: B, the batch of the sequences to decode.
        dtype: storage of the cached values ("float32", "float16", "bfloat16").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = zeta_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no ZetaAttention layer")
    return [layer.make_cache(batch=batch, dtype=dtype) for layer in layers]


def save_caches(caches: Sequence[KVCache], directory: str | os.PathLike) -> None:
    """Write ``caches`` (from :func:`make_caches`) as ``layer-<i>.zkv`` files in ``directory``
    (created if needed), so a long prompt is prefilled once and reused."""
    for i, c in enumerate(caches):
        if not isinstance(c, KVCache):
            raise TypeError(f"caches: item {i} is a {type(c).__name__}, not a zeta.KVCache")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for stale in _layer_files(d):  # from an earlier, deeper save
        if _index(stale) >= len(caches):
            stale.unlink()
    for i, c in enumerate(caches):
        c.save(d / f"layer-{i}.zkv")


def load_caches(directory: str | os.PathLike) -> List[KVCache]:
    """The caches written by :func:`save_caches`, in layer order."""
    d = Path(directory)
    found = _layer_files(d)
    if not found:
        raise FileNotFoundError(f"directory: no layer-<i>.zkv cache files in {os.fspath(d)!r}")
    names = [f.name for f in found]
    if names != [f"layer-{i}.zkv" for i in range(len(found))]:
        raise ValueError(
            f"directory: layer files {names} are not layer-0 .. layer-{len(found) - 1}"
        )
    return [KVCache.load(f) for f in found]


def _layer_files(d: Path) -> List[Path]:
    """``layer-<i>.zkv`` files in ``d``, sorted by i."""
    return sorted((f for f in d.glob("layer-*.zkv") if _index(f) >= 0), key=_index)


def _index(f: Path) -> int:
    tail = f.stem[len("layer-") :]
    return int(tail) if tail.isdigit() else -1
