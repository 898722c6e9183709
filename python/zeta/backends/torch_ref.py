"""The readable reference implementation of ZETA top-k attention, in plain torch ops.

This module is the oracle every fast path (Rust CPU, CUDA) is tested against, and the fallback
backend. It runs on any device and is differentiable by construction: the neighbour *selection*
happens under ``torch.no_grad`` (indices are constants), then keys and values are gathered with
those indices and the Cauchy scores are computed with ordinary torch ops, so autograd gives the
gradients with respect to ``q``, ``k``, ``v`` and ``gamma``.

Clarity beats speed here; the only loops in Python are over Morton bits, dimensions, index
levels, curves and (in :func:`exact_knn`) blocks of queries, never over single queries.

Notation (shapes as torch SDPA)::

    q      (B, H,   N, dk)   queries; dk in 1..8, usually 3
    k      (B, Hkv, S, dk)   keys
    v      (B, Hkv, S, dv)   values
    H % Hkv == 0; query head h reads kv head h // (H // Hkv)   (GQA)

Query ``i`` (0..N-1) sits at absolute position ``p_i = S - N + i`` (bottom-right alignment, like
flash-attn); causal attention needs ``S >= N`` and query ``i`` sees keys ``0..p_i``.

The semantics, which the Rust path implements with bit-identical candidate sets:

1. Quantize (in float64): ``y = x/scale; u = 0.5 + 0.5*y/(1+|y|); half = 2**(bits-1);
   g = min(floor(u*half), half-1); q = g + (shift*half)//m`` with the odd denominator
   ``m = dk+1`` when that is odd, else ``dk+2`` (so no two curves' shifts coincide).
2. Morton code: bit ``b`` of grid coordinate ``j`` goes to bit ``b*dk + j``.
3. Causal candidates of the query at position ``p`` (chunk size ``C``, ``c = p // C``): for each
   set bit ``l`` of ``c`` (from the highest down) the "run" of chunks ``[start, start + 2**l)``
   (``start`` grows by ``2**l`` per run); within a run keys are ordered by (code, position),
   ``s`` = number of run keys with code < the query code, and the keys at sorted ranks
   ``[max(0, s-w), min(len, s+w))`` are candidates. Plus the own chunk ``[c*C, p]``.
   Non-causal: one single run of all ``S`` keys, no own chunk.
4. ``n_curves``: union of the candidates of curves ``shift = 0..n_curves-1``.
5. ``n_sink``: positions ``[0, min(n_sink, p+1))`` are always candidates.
6. Rerank by squared distance ``d2`` (in the input dtype, summed over dimensions left to right,
   no fused multiply-add); keep the ``topk`` smallest by (d2, position), sorted that way;
   missing slots are index -1 and d2 +inf.
7. Cauchy scores ``s_j = 1/(d2_j + gamma**2)``, ``a_j = s_j / sum(s)``, ``o = sum_j a_j v_j``;
   optionally one extra "mean token" (mean of the visible keys/values) in the same sum.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .._validate import (
    DEFAULT_EXACT,
    INDEX_CODE_BITS,
    MAX_KEY_DIM,
    check_bits,
    check_dims,
    default_index_bits,
    default_n_curves,
    default_window,
    default_zorder_bits,
)

__all__ = [
    "INDEX_CODE_BITS",
    "MAX_DIMS",
    "attention",
    "candidate_lists",
    "candidates",
    "default_bits",
    "dense_topk_attention",
    "exact_knn",
    "knn",
    "morton_encode",
    "quantize",
    "recall",
    "sq_dist",
    "zorder",
]

#: Dimensions 1..MAX_DIMS (shared with the Rust path). The Z-order index of :func:`candidates`
#: / :func:`knn` / :func:`attention` sorts codes of at most ``INDEX_CODE_BITS`` bits.
MAX_DIMS = MAX_KEY_DIM

Gamma = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Quantization and Morton codes
# --------------------------------------------------------------------------------------------


def default_bits(d: int) -> int:
    """Default bits per coordinate for :func:`quantize` / :func:`zorder`.

    ``32 // d`` when that is at least 8 (32-bit codes, d <= 4), else ``64 // d`` (64-bit codes).
    The index (knn / attention) instead defaults to ``32 // d``, the most it accepts.
    """
    check_dims("x", d)
    return default_zorder_bits(d)


def _check_scale(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")


def quantize(x: torch.Tensor, bits: int, shift: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Grid coordinates of points: the fixed, data-independent float -> integer map.

    Args:
        x: (..., d) float tensor, finite; d in 1..8.
        bits: bits per coordinate, 1..=64 // d.
        shift: curve index 0..=d; curve ``j`` offsets every coordinate by ``(j*half)//m``,
            ``m`` = d+1 when that is odd, else d+2.
        scale: finite > 0; inputs are divided by it before the squash.

    Returns:
        (..., d) int64 grid coordinates (in ``[0, 2**bits)``; for ``bits == 64`` the uint64 bit
        pattern reinterpreted as int64). Computed in float64 whatever the input dtype, bit
        identical to the Rust ``Grid::cell``.
    """
    d = x.shape[-1]
    check_dims("x", d)
    check_bits(bits, d)
    if not isinstance(shift, int) or not 0 <= shift <= d:
        raise ValueError(f"shift: curve index must be 0..={d} for {d} dimensions, got {shift!r}")
    _check_scale(scale)
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating point tensor, got {x.dtype}")
    xd = x.detach().to(torch.float64)
    if not bool(torch.isfinite(xd).all()):
        raise ValueError("x: contains NaN or inf")
    half = 1 << (bits - 1)
    y = xd / float(scale)
    u = 0.5 + 0.5 * y / (1.0 + y.abs())  # softsign squash into (0, 1); same op order as Rust
    g_float = torch.floor(u * float(half))  # exact integer-valued float64
    # g = min(g_float, half - 1), done in integers: half - 1 is not a float64 for bits > 53, and
    # g_float can be exactly `half` (u rounds to 1.0), which overflows int64 when bits == 64.
    at_top = g_float >= float(half)
    g = torch.where(at_top, torch.zeros_like(g_float), g_float).to(torch.int64)
    g = torch.where(at_top, torch.full_like(g, _as_int64(half - 1)), g)
    m = d + 1 if (d + 1) % 2 == 1 else d + 2  # odd denominator of the curve shifts j/m
    offset = (shift * half) // m
    return g + _as_int64(offset)  # wraps like uint64 only when bits == 64


def _as_int64(n: int) -> int:
    """A Python int in [0, 2**64) as the int64 with the same bit pattern."""
    return n - (1 << 64) if n >= (1 << 63) else n


def morton_encode(coords: torch.Tensor, bits: int) -> torch.Tensor:
    """Interleave grid coordinates: bit ``b`` of coordinate ``j`` -> bit ``b*d + j`` of the code.

    Args:
        coords: (..., d) int64 grid coordinates (only the low ``bits`` bits are used).
        bits: bits per coordinate, 1..=64 // d.

    Returns:
        (..., ) int64 codes (uint64 bit pattern when ``d*bits == 64``).
    """
    d = coords.shape[-1]
    check_dims("coords", d)
    check_bits(bits, d)
    b = torch.arange(bits, device=coords.device)[:, None]  # (bits, 1)
    j = torch.arange(d, device=coords.device)[None, :]  # (1, d)
    bit = (coords[..., None, :] >> b) & 1  # (..., bits, d): bit b of coordinate j
    # The placed bits are disjoint, so their sum is their OR (int64 wraps like uint64 when
    # the top bit is used).
    return (bit << (b * d + j)).sum(dim=(-2, -1))


def zorder(x: torch.Tensor, bits: int, shift: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Morton codes of points: ``morton_encode(quantize(x, bits, shift, scale), bits)``.

    Args:
        x: (..., d) float tensor, finite; d in 1..8.
        bits: bits per coordinate, 1..=64 // d.
        shift: curve index 0..=d.
        scale: finite > 0.

    Returns:
        (...,) int64 codes.
    """
    return morton_encode(quantize(x, bits, shift, scale), bits)


# --------------------------------------------------------------------------------------------
# Input checks and small helpers
# --------------------------------------------------------------------------------------------


def _check_qk(
    q: torch.Tensor, k: torch.Tensor, causal: bool, v: Optional[torch.Tensor] = None
) -> None:
    """Light shape/dtype validation. Raises ValueError naming the offending argument."""
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (B, H, N, dk), got {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k: expected shape (B, Hkv, S, dk), got {tuple(k.shape)}")
    B, H, N, dk = q.shape
    Bk, Hkv, S, dkk = k.shape
    if q.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"q: dtype must be float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype:
        raise ValueError(f"k: dtype {k.dtype} differs from q's {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"k: device {k.device} differs from q's {q.device}")
    check_dims("q", dk)
    if dkk != dk:
        raise ValueError(f"k: last dimension {dkk} differs from q's {dk}")
    if Bk != B:
        raise ValueError(f"k: batch size {Bk} differs from q's {B}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"k: the number of query heads H={H} must be a multiple of the kv heads Hkv={Hkv}"
        )
    if S < 1 or N < 1:
        raise ValueError(f"k: need at least one key and one query, got S={S}, N={N}")
    if causal and S < N:
        raise ValueError(
            f"k: causal attention needs S >= N (queries are the last N positions), got S={S} < N={N}"
        )
    if v is not None:
        if v.dim() != 4 or tuple(v.shape[:3]) != (B, Hkv, S):
            raise ValueError(f"v: expected shape ({B}, {Hkv}, {S}, dv), got {tuple(v.shape)}")
        if v.dtype != q.dtype:
            raise ValueError(f"v: dtype {v.dtype} differs from q's {q.dtype}")
        if v.device != q.device:
            raise ValueError(f"v: device {v.device} differs from q's {q.device}")


def _check_positive_int(arg: str, x: int, lo: int = 1) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x < lo:
        raise ValueError(f"{arg}: must be an int >= {lo}, got {x!r}")


def _per_query_head(t: torch.Tensor, H: int) -> torch.Tensor:
    """(B, Hkv, S, ...) -> (B, H, S, ...): query head h reads kv head h // (H // Hkv)."""
    return t.repeat_interleave(H // t.shape[1], dim=1)


def _positions(N: int, S: int, device: torch.device) -> torch.Tensor:
    """(N,) int64 absolute positions ``S - N + i`` of the queries (bottom-right aligned)."""
    return torch.arange(S - N, S, device=device)


def _visible(N: int, S: int, causal: bool, device: torch.device) -> torch.Tensor:
    """(N, S) bool: key t is visible to query i (t <= p_i when causal, else everything)."""
    if not causal:
        return torch.ones(N, S, dtype=torch.bool, device=device)
    return torch.arange(S, device=device)[None, :] <= _positions(N, S, device)[:, None]


def sq_dist(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, summed over dimensions left to right (no FMA).

    Args:
        q: (..., N, dk).
        k: (..., S, dk) (broadcastable leading dims).

    Returns:
        (..., N, S) in the input dtype: ``((q0-k0)**2 + (q1-k1)**2) + ...``.
    """
    diff = q[..., :, None, 0] - k[..., None, :, 0]
    d2 = diff * diff
    for j in range(1, q.shape[-1]):
        diff = q[..., :, None, j] - k[..., None, :, j]
        d2 = d2 + diff * diff
    return d2


def _gamma_sq(gamma: Gamma, H: int, ref: torch.Tensor) -> Union[float, torch.Tensor]:
    """gamma**2 as a float or a (1, H, 1) tensor broadcasting against (B, H, N)."""
    if isinstance(gamma, torch.Tensor):
        if gamma.shape != (H,):
            raise ValueError(
                f"gamma: a tensor gamma must have shape (H,) = ({H},), got {tuple(gamma.shape)}"
            )
        if not bool((gamma.detach() > 0).all()):
            raise ValueError("gamma: must be > 0")
        return (gamma.to(device=ref.device, dtype=ref.dtype) ** 2).view(1, H, 1)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma: must be a finite number > 0 or a (H,) tensor, got {gamma!r}")
    return float(gamma) ** 2


def _select_topk(
    d2: torch.Tensor, pos: torch.Tensor, topk: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` smallest entries of each row by (d2, position), sorted that way.

    ``torch.topk`` finds the k-th smallest value; rows where values equal to it straddle the
    cut (or with fewer than ``topk`` candidates) are redone by :func:`_take_in_column_order`,
    so no full sort of a row is ever needed.

    Args:
        d2: (..., M) squared distances.
        pos: (..., M) int64 key position of each column, -1 = not a candidate. The valid
            positions of a row must be distinct and ascending in column order, so that column
            order is position order.
        topk: number of slots (>= 1).

    Returns:
        indices (..., topk) int64 key positions (-1 in missing slots) and d2 (..., topk) (+inf).
    """
    M = d2.shape[-1]
    kk = min(topk, M)
    valid = pos >= 0
    inf = torch.tensor(float("inf"), dtype=d2.dtype, device=d2.device)
    d2v = torch.where(valid, d2, inf)
    vals, cols = torch.topk(d2v, kk, dim=-1, largest=False, sorted=False)
    kth = vals.amax(-1, keepdim=True)  # the k-th smallest value of each row
    # topk's choice is the (d2, position) choice unless values equal to kth straddle the cut.
    clean = ((valid & (d2v <= kth)).sum(-1) == kk) & torch.isfinite(kth[..., 0])
    if not bool(clean.all()):
        redo = ~clean
        cols[redo] = _take_in_column_order(d2v[redo], valid[redo], kth[redo], kk)
    # Order the chosen columns by position (-1 = empty last), then stably by d2: (d2, position).
    cols = torch.where(cols >= 0, cols, M).sort(dim=-1).values
    present = cols < M
    cols = cols.clamp(max=M - 1)
    sel = torch.where(present, d2v.gather(-1, cols), inf)
    idx = torch.where(present, pos.gather(-1, cols), -1)
    sel, order = torch.sort(sel, dim=-1, stable=True)
    idx = idx.gather(-1, order)
    if kk < topk:
        pad = topk - kk
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], pad), -1)], dim=-1)
        sel = torch.cat([sel, sel.new_full((*sel.shape[:-1], pad), float("inf"))], dim=-1)
    return idx, sel


def _take_in_column_order(
    d2v: torch.Tensor, valid: torch.Tensor, kth: torch.Tensor, kk: int
) -> torch.Tensor:
    """Columns of the ``kk`` smallest valid entries of each row, ties at ``kth`` by column.

    Args: d2v (R, M), valid (R, M) bool, kth (R, 1) the k-th smallest value, kk <= M.
    Returns: (R, kk) int64 columns ascending, -1 in missing slots (fewer valid entries).
    """
    below = valid & (d2v < kth)
    tie = valid & (d2v == kth)
    need = kk - below.sum(-1, keepdim=True)
    take = below | (tie & (tie.cumsum(-1) <= need))  # ties at kth: lowest columns win
    # Write the taken columns (ascending) into slots 0, 1, ...; the rest go to a dump slot kk.
    slot = torch.where(take, take.cumsum(-1) - 1, kk)
    out = torch.full((d2v.shape[0], kk + 1), -1, dtype=torch.int64, device=d2v.device)
    out.scatter_(-1, slot, torch.arange(d2v.shape[-1], device=d2v.device).expand(d2v.shape))
    return out[:, :kk]


# --------------------------------------------------------------------------------------------
# Candidate sets (the Z-order index)
# --------------------------------------------------------------------------------------------


def _run_window(
    key_codes: torch.Tensor,
    query_codes: torch.Tensor,
    key_run: torch.Tensor,
    query_run: torch.Tensor,
    run_len: int,
    window: int,
) -> torch.Tensor:
    """Window candidates of one level of runs (or of the single non-causal run).

    The keys are split into runs of ``run_len`` consecutive positions (run ``m`` holds positions
    ``[m*run_len, (m+1)*run_len)``); query ``i`` searches run ``query_run[i]`` (-1: none at this
    level). Within a run keys are ranked by (code, position); with ``s`` the number of run keys
    whose code is < the query code (the lower bound), the keys at ranks
    ``[max(0, s - window), min(run_len, s + window))`` are candidates.

    Args:
        key_codes: (B, Hkv, S) int64 codes (< 2**32).
        query_codes: (B, H, N) int64 codes.
        key_run: (S,) int64 run of each key position.
        query_run: (N,) int64 run searched by each query, -1 for none.
        run_len: positions per run; every run a query searches is full (run_len keys).
        window: keys taken on each side of the lower bound.

    Returns:
        (B, H, N, min(2*window, run_len)) int64 key positions, -1 where there is none.
    """
    H = query_codes.shape[1]
    # Sort each row by (run, code, position): a stable sort of run * 2**32 + code keeps runs
    # contiguous, so run m occupies sorted places [m*run_len, (m+1)*run_len).
    composite = key_run * (1 << INDEX_CODE_BITS) + key_codes
    sorted_composite, order = torch.sort(composite, dim=-1, stable=True)
    sorted_composite, order = (
        _per_query_head(sorted_composite, H),
        _per_query_head(order, H),
    )  # (B, H, S)
    has_run = query_run >= 0
    run = query_run.clamp(min=0)
    run_start = run * run_len  # (N,) first sorted place of the searched run
    # s = lower bound of the query code within its run, as a rank inside the run.
    s = (
        torch.searchsorted(sorted_composite, run * (1 << INDEX_CODE_BITS) + query_codes) - run_start
    )  # (B, H, N)
    lo = (s - window).clamp(min=0)[..., None]
    hi = (s + window).clamp(max=run_len)[..., None]
    rank = lo + torch.arange(min(2 * window, run_len), device=s.device)  # (B, H, N, width)
    ok = (rank < hi) & has_run[:, None]
    places = (run_start[:, None] + rank).clamp(0, order.shape[-1] - 1)
    positions = order.gather(-1, places.flatten(2)).view(rank.shape)
    return torch.where(ok, positions, -1)


def _check_index_options(dk, chunk, window, n_curves, n_sink, bits, scale) -> int:
    """Validates the index settings (also for the exact search, which does not use them:
    a bad option raises whatever the mode); returns the resolved ``bits``."""
    bits = default_index_bits(dk) if bits is None else bits
    check_bits(bits, dk, INDEX_CODE_BITS)
    _check_positive_int("chunk", chunk)
    _check_positive_int("window", window)
    _check_positive_int("n_sink", n_sink, lo=0)
    if not isinstance(n_curves, int) or not 1 <= n_curves <= dk + 1:
        raise ValueError(f"n_curves: must be 1..={dk + 1} for dk={dk}, got {n_curves!r}")
    _check_scale(scale)
    return bits


def candidate_lists(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    chunk: int,
    window: int,
    n_curves: int,
    n_sink: int,
    bits: Optional[int],
    scale: float = 1.0,
) -> torch.Tensor:
    """The candidate set of every query as a padded list of key positions (rules 3-5).

    Args: as :func:`candidates`.

    Returns:
        (B, H, N, M) int64: the distinct key positions of each query's candidates in ascending
        order, interleaved with -1 (empty) slots. M bounds the candidate count: causal,
        n_curves * (sum over levels of min(2 * window, run length)) + chunk + n_sink;
        non-causal, n_curves * min(2 * window, S) + n_sink.
    """
    _check_qk(q, k, causal)
    B, H, N, dk = q.shape
    S = k.shape[2]
    bits = _check_index_options(dk, chunk, window, n_curves, n_sink, bits, scale)
    dev = q.device
    key_pos = torch.arange(S, device=dev)
    query_pos = _positions(N, S, dev)  # (N,)
    last_visible = query_pos if causal else torch.full((N,), S - 1, device=dev)

    parts = []  # each (B, H, N, *) or broadcastable, -1 = none
    with torch.no_grad():
        for curve in range(n_curves):
            key_codes = zorder(k, bits, shift=curve, scale=scale)  # (B, Hkv, S)
            query_codes = zorder(q, bits, shift=curve, scale=scale)  # (B, H, N)
            if not causal:
                all_keys = torch.zeros(S, dtype=torch.int64, device=dev)
                search_run = torch.zeros(N, dtype=torch.int64, device=dev)
                parts.append(_run_window(key_codes, query_codes, all_keys, search_run, S, window))
                continue
            query_chunk = query_pos // chunk
            max_chunk = (S - 1) // chunk
            for level in range(max_chunk.bit_length()):
                # Bit `level` of the query's chunk index c set -> it searches the run of 2**level
                # chunks just before its own aligned block of 2**level chunks: run index
                # (c >> level) - 1 at run size 2**level chunks, which is chunks
                # [start, start + 2**level) of the description (start = c with bits <= level cleared).
                run_len = chunk << level
                has_run = ((query_chunk >> level) & 1) == 1
                search_run = torch.where(has_run, (query_chunk >> level) - 1, -1)
                parts.append(
                    _run_window(
                        key_codes, query_codes, key_pos // run_len, search_run, run_len, window
                    )
                )
        if causal:  # own chunk: positions [c*C, p]
            own = (query_pos // chunk * chunk)[:, None] + torch.arange(chunk, device=dev)
            parts.append(torch.where(own <= query_pos[:, None], own, -1).expand(B, H, N, chunk))
        if n_sink > 0:  # sinks: positions [0, min(n_sink, p + 1))
            sink = torch.arange(n_sink, device=dev).expand(N, n_sink)
            parts.append(
                torch.where(sink <= last_visible[:, None], sink, -1).expand(B, H, N, n_sink)
            )
        # Union: sort (-1 first), then blank out repeats.
        lists = (
            torch.cat([p.expand(B, H, N, p.shape[-1]) for p in parts], dim=-1).sort(dim=-1).values
        )
        repeat = torch.zeros_like(lists, dtype=torch.bool)
        repeat[..., 1:] = lists[..., 1:] == lists[..., :-1]
        return torch.where(repeat, -1, lists)


def candidates(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    chunk: int,
    window: int,
    n_curves: int,
    n_sink: int,
    bits: Optional[int],
    scale: float = 1.0,
) -> torch.Tensor:
    """The candidate set of every query, as a mask (rules 3-5 of the module docstring).

    Args:
        q: (B, H, N, dk) queries.
        k: (B, Hkv, S, dk) keys.
        causal: causal index (runs of past chunks + own chunk) or one run of all keys.
        chunk: chunk size C >= 1 (only used when causal).
        window: keys taken on each side of the lower bound in each run, >= 1.
        n_curves: shifted curves 1..=dk+1 whose candidates are united.
        n_sink: the first ``n_sink`` (visible) positions are always candidates, >= 0.
        bits: bits per coordinate, 1..=32 // dk; None: 32 // dk.
        scale: quantization scale, finite > 0.

    Returns:
        (B, H, N, S) bool, True where key t is a candidate of query i (only visible keys).
    """
    lists = candidate_lists(
        q,
        k,
        causal=causal,
        chunk=chunk,
        window=window,
        n_curves=n_curves,
        n_sink=n_sink,
        bits=bits,
        scale=scale,
    )
    B, H, N, _ = q.shape
    S = k.shape[2]
    mask = torch.zeros(B, H, N, S + 1, dtype=torch.bool, device=q.device)  # column S: dump for -1
    mask.scatter_(-1, torch.where(lists >= 0, lists, S), True)
    return mask[..., :S]


# --------------------------------------------------------------------------------------------
# Top-k neighbours
# --------------------------------------------------------------------------------------------


def knn(
    q: torch.Tensor,
    k: torch.Tensor,
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k nearest keys: exact (brute force), or through the Z-order index (candidates, then
    exact rerank) with ``exact=False``.

    Args:
        q: (B, H, N, dk) queries, float32/float64.
        k: (B, Hkv, S, dk) keys, same dtype.
        topk: neighbours per query, >= 1.
        causal, chunk, window, n_curves, n_sink, bits, scale: see :func:`candidates`; None
            for ``window`` / ``n_curves``: zeta's defaults (window search: ``4 * topk``, 2
            curves).
        exact: the exact top-k (:func:`exact_knn`, brute force in blocks; the default, as for
            :func:`zeta.knn`): what the Rust index's exact search returns. The index settings
            are then checked but unused. False: the window search.

    Returns:
        indices: (B, H, N, topk) int64 key positions sorted by (d2, position); -1 in missing slots.
        sq_dists: (B, H, N, topk) squared distances in the input dtype; +inf in missing slots.
        Neither carries gradients.
    """
    _check_positive_int("topk", topk)
    window = default_window(topk, exact) if window is None else window
    n_curves = default_n_curves(exact) if n_curves is None else n_curves
    if exact:
        _check_qk(q, k, causal)
        _check_index_options(q.shape[-1], chunk, window, n_curves, n_sink, bits, scale)
        return exact_knn(q, k, topk, causal=causal)
    with torch.no_grad():
        lists = candidate_lists(
            q,
            k,
            causal=causal,
            chunk=chunk,
            window=window,
            n_curves=n_curves,
            n_sink=n_sink,
            bits=bits,
            scale=scale,
        )  # (B, H, N, M)
        B, H, N, M = lists.shape
        dk = q.shape[-1]
        kh = _per_query_head(k, H)
        cand_k = kh.gather(2, lists.clamp(min=0).view(B, H, N * M, 1).expand(-1, -1, -1, dk)).view(
            B, H, N, M, dk
        )
        d2 = sq_dist(q[..., None, :], cand_k)[..., 0, :]  # (B, H, N, M)
        return _select_topk(d2, lists, topk)


def exact_knn(
    q: torch.Tensor, k: torch.Tensor, topk: int, *, causal: bool = True, block_elems: int = 1 << 22
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Brute-force exact top-k over all visible keys, by (d2, position).

    Processes blocks of queries so that at most about ``block_elems`` distances exist at once
    (and, when causal, only the keys a block can see), never the whole N x S matrix.

    Args:
        q: (B, H, N, dk) queries.
        k: (B, Hkv, S, dk) keys.
        topk: neighbours per query, >= 1.
        causal: query i sees keys 0..S-N+i, else all keys.
        block_elems: memory knob, distances per block.

    Returns:
        indices (B, H, N, topk) int64 (-1 where fewer than topk keys are visible) and
        sq_dists (B, H, N, topk) in the input dtype (+inf there); same tie rule as :func:`knn`.
    """
    _check_qk(q, k, causal)
    _check_positive_int("topk", topk)
    B, H, N, _ = q.shape
    S = k.shape[2]
    kh = _per_query_head(k, H)
    rows = max(1, block_elems // max(1, B * H * S))
    idx_parts, d2_parts = [], []
    with torch.no_grad():
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            s_end = S - N + i1 if causal else S  # keys beyond the block's last position are unseen
            d2 = sq_dist(q[:, :, i0:i1], kh[:, :, :s_end])
            positions = torch.arange(s_end, device=q.device).expand(i1 - i0, s_end)
            if causal:  # key t is visible to query i iff t <= p_i
                p = _positions(N, S, q.device)[i0:i1, None]
                positions = torch.where(positions <= p, positions, -1)
            idx, sel = _select_topk(d2, positions.expand(d2.shape), topk)
            idx_parts.append(idx)
            d2_parts.append(sel)
    return torch.cat(idx_parts, dim=2), torch.cat(d2_parts, dim=2)


def recall(
    q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, *, causal: bool = True
) -> float:
    """Fraction of the exact top-k neighbours present in ``indices``.

    Args:
        q: (B, H, N, dk) queries.
        k: (B, Hkv, S, dk) keys.
        indices: (B, H, N, topk) int64 key positions, -1 = empty slot (ignored).
        causal: as for :func:`exact_knn`.

    Returns:
        (number of exact neighbours found) / (number of exact neighbours that exist), where the
        exact top-k has ``topk = indices.shape[-1]`` slots but only ``min(topk, visible keys)``
        real neighbours per query. 1.0 when nothing exists.
    """
    if indices.dim() != 4 or tuple(indices.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(
            f"indices: expected shape {tuple(q.shape[:3])} + (topk,), got {tuple(indices.shape)}"
        )
    exact, _ = exact_knn(q, k, indices.shape[-1], causal=causal)
    real = exact >= 0
    found = (exact[..., :, None] == indices[..., None, :]).any(-1) & real
    total = int(real.sum())
    return 1.0 if total == 0 else int(found.sum()) / total


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def _mean_kv(
    k: torch.Tensor, v: torch.Tensor, N: int, causal: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean token: means of k and v over the visible positions of each query.

    Args: k (B, Hkv, S, dk), v (B, Hkv, S, dv).
    Returns: kbar (B, Hkv, N, dk), vbar (B, Hkv, N, dv) (causal: prefix means over 0..p_i).
    """
    S = k.shape[2]
    if not causal:
        return (
            k.mean(2, keepdim=True).expand(-1, -1, N, -1),
            v.mean(2, keepdim=True).expand(-1, -1, N, -1),
        )
    count = (_positions(N, S, k.device) + 1).to(k.dtype)[:, None]  # (N, 1)
    return k.cumsum(2)[:, :, S - N :] / count, v.cumsum(2)[:, :, S - N :] / count


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: int = 32,
    gamma: Gamma = 1.0,
    causal: bool = True,
    chunk: int = 64,
    window: Optional[int] = None,
    n_curves: Optional[int] = None,
    n_sink: int = 0,
    mean_token: bool = False,
    bits: Optional[int] = None,
    scale: float = 1.0,
    exact: bool = DEFAULT_EXACT,
) -> torch.Tensor:
    """ZETA top-k attention with Adaptive Cauchy-Softmax scores.

    Neighbours come from :func:`knn` (no gradient); then, with ``d2_j = ||q - k_j||**2``,
    ``s_j = 1 / (d2_j + gamma**2)``, ``a = s / sum(s)``, ``o = sum_j a_j v_j``. With
    ``mean_token`` one more item (key/value = mean of the visible keys/values) joins the sum.

    Args:
        q: (B, H, N, dk) queries, float32/float64.
        k: (B, Hkv, S, dk) keys.
        v: (B, Hkv, S, dv) values.
        topk: neighbours per query, >= 1.
        gamma: > 0, a float or an (H,) tensor (per query head); may require grad.
        causal, chunk, window, n_curves, n_sink, bits, scale: see :func:`candidates`.
        exact: attend to the exact top-k (see :func:`knn`).
        mean_token: add the mean token.

    Returns:
        (B, H, N, dv), differentiable with respect to q, k, v and gamma.
    """
    _check_qk(q, k, causal, v)
    H, N = q.shape[1], q.shape[2]
    g2 = _gamma_sq(gamma, H, q)
    idx, _ = knn(
        q,
        k,
        topk,
        causal=causal,
        chunk=chunk,
        window=window,
        n_curves=n_curves,
        n_sink=n_sink,
        bits=bits,
        scale=scale,
        exact=exact,
    )
    return _cauchy_gather(q, k, v, idx, g2, causal, mean_token, N)


def _cauchy_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    g2: Union[float, torch.Tensor],
    causal: bool,
    mean_token: bool,
    N: int,
) -> torch.Tensor:
    """Cauchy attention over gathered neighbours (autograd through the gathers).

    Args: q (B, H, N, dk), k (B, Hkv, S, dk), v (B, Hkv, S, dv), idx (B, H, N, topk) with -1 =
    empty, g2 float or (1, H, 1). Returns (B, H, N, dv).
    """
    B, H, _, dk = q.shape
    dv = v.shape[-1]
    topk = idx.shape[-1]
    kh, vh = _per_query_head(k, H), _per_query_head(v, H)  # (B, H, S, .)
    present = idx >= 0
    flat = idx.clamp(min=0).reshape(B, H, N * topk, 1)
    k_sel = kh.gather(2, flat.expand(-1, -1, -1, dk)).reshape(B, H, N, topk, dk)
    v_sel = vh.gather(2, flat.expand(-1, -1, -1, dv)).reshape(B, H, N, topk, dv)
    d2 = sq_dist(q[..., None, :], k_sel)[..., 0, :]  # (B, H, N, topk)
    g2k = g2[..., None] if isinstance(g2, torch.Tensor) else g2
    # The weights a = s / sum(s), s = 1 / (d2 + g2), as a softmax of -log(d2 + g2): the same
    # values, and autograd stays finite where s / z's does not (a huge gamma or far keys make
    # every s tiny: z^2 underflows; the smallest gamma makes s^2 large). Then their value sum:
    # a <= 1, so it cannot overflow where the values do not (as in the Rust core).
    neg_inf = torch.full_like(d2, float("-inf"))
    logits = torch.where(present, -torch.log(d2 + g2k), neg_inf)  # (B, H, N, topk)
    if mean_token:
        kbar, vbar = (_per_query_head(t, H) for t in _mean_kv(k, v, N, causal))
        d2m = sq_dist(q[..., None, :], kbar[..., None, :])[..., 0, 0]  # (B, H, N)
        logits = torch.cat([logits, -torch.log(d2m + g2)[..., None]], dim=-1)
    a = torch.softmax(logits, dim=-1)
    out = (a[..., :topk, None] * v_sel).sum(-2)  # (B, H, N, dv)
    if mean_token:
        out = out + a[..., topk:] * vbar
    return out


def dense_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: int,
    gamma: Gamma,
    causal: bool = True,
    mean_token: bool = False,
) -> torch.Tensor:
    """The independent oracle: exact top-k from the full N x S distance matrix, then Cauchy.

    Selection is a stable full sort of each row of the masked distance matrix (not the
    topk + tie-break of :func:`knn`); the scores are a dense masked (B, H, N, S) matrix and the
    mean token uses an explicit averaging matrix (not a cumsum). Small inputs only.

    Args:
        q: (B, H, N, dk); k: (B, Hkv, S, dk); v: (B, Hkv, S, dv).
        topk: neighbours per query, >= 1.
        gamma: > 0, float or (H,) tensor.
        causal: query i sees keys 0..S-N+i.
        mean_token: add the mean-of-visible-keys/values token.

    Returns:
        (B, H, N, dv), differentiable with respect to q, k, v and gamma.
    """
    _check_qk(q, k, causal, v)
    _check_positive_int("topk", topk)
    B, H, N, _ = q.shape
    S = k.shape[2]
    g2 = _gamma_sq(gamma, H, q)  # float or (1, H, 1)
    g2s = g2[..., None] if isinstance(g2, torch.Tensor) else g2  # float or (1, H, 1, 1)
    kh, vh = _per_query_head(k, H), _per_query_head(v, H)
    visible = _visible(N, S, causal, q.device)  # (N, S)
    d2 = sq_dist(q, kh)  # (B, H, N, S)
    with torch.no_grad():
        masked = torch.where(visible, d2, torch.full_like(d2, float("inf")))
        order = torch.sort(masked, dim=-1, stable=True).indices[..., :topk]  # (d2, position) order
        n_visible = visible.sum(-1)[:, None]  # (N, 1)
        keep = torch.arange(order.shape[-1], device=q.device) < n_visible  # only real keys
        selected = torch.zeros_like(visible.expand_as(d2)).scatter(-1, order, keep.expand_as(order))
    scores = torch.where(selected, 1.0 / (d2 + g2s), torch.zeros_like(d2))  # (B, H, N, S)
    den = scores.sum(-1)
    if mean_token:
        avg = visible.to(q.dtype) / visible.sum(-1, keepdim=True).to(
            q.dtype
        )  # (N, S) rows sum to 1
        kbar, vbar = avg @ kh, avg @ vh  # (B, H, N, .)
        s_mean = 1.0 / (((q - kbar) ** 2).sum(-1) + g2)
        den = den + s_mean
    out = (scores / den[..., None]) @ vh  # the weights first, as `attention`
    if mean_token:
        out = out + (s_mean / den)[..., None] * vbar
    return out
