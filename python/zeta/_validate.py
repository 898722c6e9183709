"""Argument checks shared by the functional API, the nn module and the KV cache.

Every failure is a ValueError/TypeError whose message starts with the argument's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    from ._core import _Params

#: Dimensions of a key / Morton point: 1..MAX_KEY_DIM (rust/src/morton.rs ``MAX_DIMS``).
MAX_KEY_DIM = 8
#: The causal index sorts codes of at most this many bits (``key_dim * bits <= 32``).
INDEX_CODE_BITS = 32


def check_dims(name: str, d: int) -> int:
    """``d`` (a key_dim or a point's last axis) in 1..MAX_KEY_DIM, else ValueError naming ``name``."""
    if not 1 <= d <= MAX_KEY_DIM:
        raise ValueError(f"{name}: the dimensions (last axis) must be 1..{MAX_KEY_DIM}, got {d}")
    return int(d)


def check_bits(bits: Any, d: int, code_bits: int = 64) -> int:
    """``bits`` per coordinate as an int in 1..code_bits // d, else TypeError/ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits: expected an int, got {type(bits).__name__}")
    bits = int(bits)
    top = code_bits // d
    if not 1 <= bits <= top:
        raise ValueError(
            f"bits: must be 1..{top} for {d} dimensions (d*bits <= {code_bits}), got {bits}"
        )
    return bits


def default_zorder_bits(d: int) -> int:
    """Default grid bits per coordinate for ``zorder``: ``32 // d`` (uint32 codes) when that is
    at least 8 (d <= 4), else ``64 // d`` (uint64 codes)."""
    b32 = 32 // d
    return b32 if b32 >= 8 else 64 // d


def default_index_bits(d: int) -> int:
    """Default grid bits of the causal index (knn, attention, KVCache): the most it accepts."""
    return INDEX_CODE_BITS // d


#: Shifted Z-curves searched by default (window search). With ``window = 4 * topk`` the
#: cheapest setting measured with recall@32 >= 0.9 that every backend runs natively
#: (benches/bench_recall.py, Gaussian 3-D keys, causal, N = 64k: 0.94; 1 curve with
#: window = topk, the defaults before: 0.56). Valid for every key_dim (n_curves <= d_k + 1).
DEFAULT_N_CURVES = 2

#: Exact search unless asked otherwise (issue 10): at its cost goal (1.4-1.5x the 1-curve
#: window-32 search per query, N = 64k, benches/bench_recall.py) and the cheapest measured
#: setting with recall@32 >= 0.9 (~0.56x the window search's defaults' time on the CPU).
DEFAULT_EXACT = True

#: Default window of the window search, in multiples of topk.
DEFAULT_WINDOW_PER_TOPK = 4

#: Default window of the exact search (its first k-th distance), in multiples of topk.
EXACT_WINDOW_PER_TOPK = 2


def default_window(topk: int, exact: bool = DEFAULT_EXACT) -> int:
    """Default candidates taken on each side of the query in every run.

    ``4 * topk`` for the window search (with 2 curves, recall@32 0.94 at N = 64k, 0.92 at
    256k on Gaussian 3-D keys); ``2 * topk`` for the exact search, where the window only gives
    the first k-th distance (N = 64k, top-32, one thread, `exact_timing` in rust/src/exact.rs
    with ZETA_EXACT_TIMING=32:64,64:64,128:64: windows 32 / 64 / 128 took 2.72 / 2.46 / 2.72
    us per query alone, 2.60 / 2.23 / 2.22 us in groups; the KV cache's exact step was no
    slower with 64 than with 32).
    """
    return (EXACT_WINDOW_PER_TOPK if exact else DEFAULT_WINDOW_PER_TOPK) * int(topk)


def default_n_curves(exact: bool = DEFAULT_EXACT) -> int:
    """Default number of curves: :data:`DEFAULT_N_CURVES` for the window search, 1 for the
    exact search (it searches curve 0 only; more curves would cost memory and time)."""
    return 1 if exact else DEFAULT_N_CURVES


def _int(name: str, x: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    x = int(x)
    if x < lo or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name}: must be {rng}, got {x}")
    return x


@dataclass(frozen=True)
class IndexParams:
    """Resolved index settings; :meth:`as_dict` is what ``_core`` receives (``_core._Params``)
    and also the keyword arguments of the torch reference (``torch_ref.knn``/``attention``)."""

    chunk: int
    window: int
    n_curves: int
    n_sink: int
    causal: bool
    bits: int
    scale: float
    exact: bool = DEFAULT_EXACT

    def as_dict(self) -> _Params:
        return {
            "chunk": self.chunk,
            "window": self.window,
            "n_curves": self.n_curves,
            "n_sink": self.n_sink,
            "causal": self.causal,
            "bits": self.bits,
            "scale": self.scale,
            "exact": self.exact,
        }


_MAX_SPAN = 2**31 - 1


def index_params(
    key_dim: int,
    topk: int,
    *,
    causal: bool = True,
    chunk: int = 64,
    window: Optional[int] = None,
    n_curves: Optional[int] = None,
    n_sink: int = 0,
    bits: Optional[int] = None,
    scale: float = 1.0,
    exact: bool = DEFAULT_EXACT,
) -> IndexParams:
    key_dim = _int("key_dim", key_dim, 1, MAX_KEY_DIM)
    topk = _int("topk", topk, 1)
    chunk = _int("chunk", chunk, 1, 1 << 30)
    if not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact: expected a bool, got {type(exact).__name__}")
    window = default_window(topk, exact) if window is None else _int("window", window, 1)
    n_curves = (
        default_n_curves(exact) if n_curves is None else _int("n_curves", n_curves, 1, key_dim + 1)
    )
    n_sink = _int("n_sink", n_sink, 0)
    # Beyond 2^31 - 1 both mean "all keys" (no head holds more): clamp so every backend,
    # and the torch custom-op schema (int64), takes them.
    window, n_sink = min(window, _MAX_SPAN), min(n_sink, _MAX_SPAN)
    bits = (
        default_index_bits(key_dim) if bits is None else check_bits(bits, key_dim, INDEX_CODE_BITS)
    )
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be finite and > 0, got {scale}")
    return IndexParams(chunk, window, n_curves, n_sink, bool(causal), bits, scale, bool(exact))


def check_qkv_shapes(q_shape, k_shape, v_shape=None, *, causal: bool):
    """Checks SDPA-layout shapes; returns (B, H, H_kv, N, S, dk, dv).

    Empty axes are valid input (B, H, N or d_v = 0: an empty output, as SDPA), and so is
    ``topk > S`` (callers attend to the keys there are). Non-empty queries with no keys at
    all (S = 0, N > 0) are an error for attention (``v_shape`` given): nothing to attend to.
    """
    if len(q_shape) != 4:
        raise ValueError(f"q: expected 4 axes (B, H, N, key_dim), got shape {tuple(q_shape)}")
    if len(k_shape) != 4:
        raise ValueError(f"k: expected 4 axes (B, H_kv, S, key_dim), got shape {tuple(k_shape)}")
    b, h, n, dk = q_shape
    bk, hkv, s, dkk = k_shape
    if bk != b:
        raise ValueError(f"k: batch {bk} does not match q's {b}")
    if dkk != dk:
        raise ValueError(f"k: key_dim {dkk} does not match q's {dk}")
    check_dims("q", dk)
    if hkv == 0 and h != 0:
        raise ValueError(f"k: no kv heads (H_kv = 0) for {h} query heads")
    if hkv != 0 and h % hkv != 0:
        raise ValueError(f"k: query heads ({h}) must be a multiple of kv heads ({hkv}) (GQA)")
    if causal and s < n:
        raise ValueError(
            f"k: causal attention needs S >= N (queries are the last N positions), got S={s}, N={n}"
        )
    dv = None
    if v_shape is not None:
        if len(v_shape) != 4:
            raise ValueError(
                f"v: expected 4 axes (B, H_kv, S, value_dim), got shape {tuple(v_shape)}"
            )
        if tuple(v_shape[:3]) != (b, hkv, s):
            raise ValueError(
                f"v: shape {tuple(v_shape)} does not match k's (B, H_kv, S) = {(b, hkv, s)}"
            )
        dv = v_shape[3]
        if s == 0 and b * h * n > 0:
            raise ValueError(f"k: no keys (S = 0) for the N = {n} queries to attend to")
    return b, h, hkv, n, s, dk, dv


#: The largest gamma (2^62; the Rust core's ``GAMMA_MAX``): gamma^2 plus the largest squared
#: distance within :func:`coord_limit` is still a finite float32, so no query's scores are all 0.
GAMMA_MAX = float(2**62)
#: The smallest gamma (2^-24; the Rust core's ``GAMMA_MIN``): a score ``1 / (d2 + gamma^2)`` is at
#: most 2^48 and its square (in the gradients) 2^96, far from float32's overflow, even for keys
#: that sit on their queries (below ~1e-10 the torch backend's gradients were NaN there).
GAMMA_MIN = float(2**-24)
#: The error text for a gamma outside [GAMMA_MIN, GAMMA_MAX] (the Rust core's too).
GAMMA_RANGE = "must be in [2^-24, 2^62] (5.96e-8 .. 4.61e18)"


def gamma_array(gamma: Any, h: int) -> np.ndarray:
    """gamma (float or (H,) array/tensor) -> float64 array (H,), checked in [GAMMA_MIN, GAMMA_MAX]."""
    if isinstance(gamma, (float, int)) and not isinstance(gamma, bool):
        if not (GAMMA_MIN <= gamma <= GAMMA_MAX):
            raise ValueError(f"gamma: {GAMMA_RANGE}, got {gamma}")
        return np.full(h, float(gamma))
    if hasattr(gamma, "detach"):
        gamma = gamma.detach().cpu().double().numpy()
    g = np.asarray(gamma, dtype=np.float64)
    if g.ndim == 0:
        g = np.full(h, float(g))
    if g.shape != (h,):
        raise ValueError(
            f"gamma: expected a float or shape ({h},) (one per query head), got shape {g.shape}"
        )
    if not np.all((g >= GAMMA_MIN) & (g <= GAMMA_MAX)):
        raise ValueError(f"gamma: {GAMMA_RANGE}, got {g.tolist()}")
    return np.ascontiguousarray(g)


def coord_limit(dtype: Any, dk: int) -> float:
    """The largest |coordinate| of queries and keys (the Rust core's ``coord_limit``).

    Any two points within it lie at a squared distance of at most a quarter of the float's
    largest value, so no distance overflows to inf and, with gamma <= GAMMA_MAX, every Cauchy
    score ``1 / (d2 + gamma^2)`` is > 0 (float32: 2.66e18 at d_k = 3). float64 arrays get
    float64's limit, all others float32's (half-precision q and k are computed in float32).
    Computed in that float type, so the limit is the Rust core's to the bit.
    """
    f = np.float64 if "float64" in str(dtype) else np.float32
    return float(np.sqrt(f(np.finfo(f).max) / f(max(int(dk), 1))) / f(4))


def _module_of(a: Any):
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        import torch

        return torch
    if mod == "cupy":
        import cupy

        return cupy
    return np


def coords_ok_flag(a: Any) -> Any:
    """A 0-d boolean on ``a``'s device: every coordinate finite and within :func:`coord_limit`
    (the last axis is d_k). NaN fails the compare, so one flag covers both."""
    xp = _module_of(a)
    if xp.__name__ == "torch":
        a = a.detach()
        if a.dtype in (xp.float16, xp.bfloat16):
            a = a.float()
    elif a.dtype == xp.float16:
        # numpy / cupy: a float16 array would compare in float16, where the limit is inf.
        a = a.astype(xp.float32)
    return (abs(a) <= coord_limit(a.dtype, a.shape[-1])).all()


def coords_error(a: Any, name: str) -> ValueError:
    """The error for q or k ``a`` whose :func:`coords_ok_flag` is False (the Rust core's
    wording)."""
    xp = _module_of(a)
    lim = coord_limit(a.dtype, a.shape[-1])
    width = "float64" if "float64" in str(a.dtype) else "float32"
    if xp.__name__ == "torch":
        a = a.detach().double()
    if not bool(xp.isfinite(a).all()):
        return ValueError(f"{name}: contains NaN or inf")
    big = float(abs(a).max())
    return ValueError(
        f"{name}: coordinate {big:e} is beyond +-{lim:.3e}: squared distances between such "
        f"points overflow {width}; rescale the queries and keys"
    )


def check_coords(a: Any, name: str) -> None:
    """ValueError naming ``name`` unless every coordinate of ``a`` (numpy, torch or cupy; last
    axis d_k) is finite and within :func:`coord_limit` (one device sync)."""
    if not bool(coords_ok_flag(a)):
        raise coords_error(a, name)


def check_values_torch(q: Any, k: Any, v: Any, gamma: Any = None) -> None:
    """torch q, k, v and gamma, with one device sync: q and k finite and within
    :func:`coord_limit`, v finite, gamma in [GAMMA_MIN, GAMMA_MAX] (a tensor or None)."""
    import torch

    flags = [coords_ok_flag(q), coords_ok_flag(k), torch.isfinite(v.detach()).all()]
    if gamma is not None:
        g = gamma.detach()
        flags.append(((g >= GAMMA_MIN) & (g <= GAMMA_MAX)).all())
    ok = torch.stack(flags).tolist()
    for good, a, nm in zip(ok, (q, k), ("q", "k")):
        if not good:
            raise coords_error(a, nm)
    if not ok[2]:
        raise ValueError("v: contains NaN or inf")
    if gamma is not None and not ok[3]:
        gamma_array(gamma, gamma.shape[0])  # raises with the values
