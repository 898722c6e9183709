"""Codes and the dyadic-run index on the device (kernels in ``kernels/zorder.cu``, ``index.cu``).

Level ``l`` holds, for each (batch, kv head, curve) slice, the runs of ``2**l`` full chunks
sorted by ``code << 32 | position``; slice width ``(n_full >> l << l) * chunk``. Level 0 sorts
every chunk; level ``l + 1`` merges pairs of level-``l`` runs. Non-causal: one sorted run of all
keys per slice.

For the exact search, :func:`exact_boxes` cuts curve 0's runs into leaves of about
:data:`LEAF` entries that follow the Z-order cells (:data:`CELL_LEAVES`) and adds the bounding
box of every leaf.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np

from .runtime import Runtime, blocks, env_int

THREADS = 256

#: Entries per leaf slot of the exact search (``ZETA_LEAF`` in kernels/search.cu): a run of
#: ``run_len`` entries has ``ceil(run_len / LEAF)`` leaves and boxes; with :data:`CELL_LEAVES`
#: a leaf holds 1 to ``2 * LEAF - 1`` entries, else ``LEAF`` (the Rust core's radix leaves hold
#: at most 192; the leaves change only the speed, never the answer). Runs of at most this many
#: entries get no boxes: the exact search scans them whole. ``ZETA_CUDA_LEAF`` overrides it for
#: measurements (the kernels are then compiled with the same ``-DZETA_LEAF``, see
#: runtime.extra_options): on the CPU shim, N = 32k, top-32, queries at the last 2048
#: positions (benches/gpu_opmix.py), fixed leaves of 64 / 32 / 16 entries took 92 / 60 / 70
#: offer rounds, 10.6 / 9.1 / 8.1 flushes and 17 / 33 / 63 box rounds per query (before the
#: probe order of 2026-11-30); not yet timed on a GPU.
LEAF = env_int("ZETA_CUDA_LEAF", 64, 1)
#: Leaves that follow the Z-order cells (``exact_leaf_starts_kernel``: leaf j starts within
#: half a leaf of entry ``j * LEAF``, where the largest cell there begins) instead of fixed
#: runs of LEAF entries (ZETA_CUDA_CELL_LEAVES=0), the same number of leaves and boxes. On
#: the CPU shim (benches/gpu_opmix.py --n 32768 --queries 2048, top-32, exact default) per
#: query: candidates 2,943 -> 1,546, leaves scanned 37.6 -> 14.6, offer rounds 92.5 -> 58.7,
#: box rounds 17 either way (2026-12-01; the group boxes then cut those to 3 + 7.7); not yet
#: timed on a GPU (gpu_variants.py times both).
CELL_LEAVES = os.environ.get("ZETA_CUDA_CELL_LEAVES", "1") != "0"


def codes(
    rt: Runtime,
    x: Any,
    d: int,
    bits: int,
    inner: int,
    n_curves: int,
    scale: float,
    wide: bool = False,
) -> Any:
    """Codes of float32 points ``x`` (rows * d,) for curves 0..n_curves-1.

    Row ``r = outer * inner + i`` lands at ``(outer, curve, i)``: (G, inner, d) -> (G, C, inner).
    """
    rows = x.size // d
    out = rt.empty((rows * n_curves,), np.uint64 if wide else np.uint32)
    if rows == 0:
        return out
    name = (
        "zeta::zorder_kernel<unsigned long long>" if wide else "zeta::zorder_kernel<unsigned int>"
    )
    rt.launch(
        "zorder.cu",
        name,
        blocks(rows, THREADS),
        THREADS,
        (
            x,
            out,
            np.int64(rows),
            np.int32(d),
            np.int32(bits),
            np.int64(inner),
            np.int32(n_curves),
            np.float64(scale),
            np.int32(0),
        ),
    )
    return out


#: A null pointer argument of a kernel (8 zero bytes).
NULL = np.uint64(0)


def n_levels(s: int, chunk: int) -> int:
    """Levels a causal search can probe: bit_length of the last chunk index."""
    return ((s - 1) // chunk).bit_length() if s > 0 else 0


def build(
    rt: Runtime,
    kcodes: Any,
    gc: int,
    s: int,
    chunk: int,
    causal: bool,
    keys: Any = None,
    n_curves: int = 1,
) -> Tuple[Any, int, Any]:
    """The index of ``kcodes`` ((gc, s) uint32, flat): (levels u64, n_full, points).

    ``levels`` holds level 0 of every slice, then level 1, ... (the kernels recompute where
    each level starts from the widths). ``keys``: the (gc / n_curves, s, 3) float32 keys, or
    None; given, ``points`` is (len(levels), 4) float32: beside each entry its key's x, y, z and
    its position (int32 bits), which the search kernels read instead of the entry and the key
    (one aligned 16-byte load); else ``points`` is None."""
    xp = rt.xp
    if not causal:
        keys_u = (kcodes.astype(np.uint64) << np.uint64(32)).reshape(gc, s)
        keys_u |= xp.arange(s, dtype=np.uint64)[None, :]
        levels = xp.sort(keys_u, axis=-1).reshape(-1)
        pts = None
        if keys is not None and gc * s > 0:
            pts = rt.empty((gc * s, 4), np.float32)
            rt.launch(
                "index.cu",
                "zeta::index_points_kernel",
                blocks(gc * s, THREADS),
                THREADS,
                (levels, np.int64(gc), np.int64(s), keys, pts, np.int32(n_curves), np.int64(s)),
            )
        return levels, 0, pts
    n_full = s // chunk
    widths: List[int] = [w for w, _ in level_layout(s, chunk, causal)]
    offs = np.zeros(max(1, len(widths)), dtype=np.int64)
    for lv in range(1, len(widths)):
        offs[lv] = offs[lv - 1] + gc * widths[lv - 1]
    total = int(offs[-1] + gc * widths[-1]) if widths else 0
    levels = rt.empty((max(total, 1),), np.uint64)
    pts = rt.empty((max(total, 1), 4), np.float32) if keys is not None else None
    kk = keys if keys is not None else NULL
    if widths and widths[0] > 0:
        rt.launch(
            "index.cu",
            "zeta::index_level0_kernel",
            blocks(gc * widths[0], THREADS),
            THREADS,
            (
                kcodes,
                levels,
                np.int64(gc),
                np.int64(s),
                np.int64(widths[0]),
                np.int32(chunk),
                kk,
                pts if pts is not None else NULL,
                np.int32(n_curves),
            ),
        )
    for lv in range(len(widths) - 1):
        w_in, w_out = widths[lv], widths[lv + 1]
        if w_out == 0:
            break
        src = levels[int(offs[lv]) : int(offs[lv]) + gc * w_in]
        dst = levels[int(offs[lv + 1]) : int(offs[lv + 1]) + gc * w_out]
        pdst = NULL if pts is None else pts[int(offs[lv + 1]) : int(offs[lv + 1]) + gc * w_out]
        rt.launch(
            "index.cu",
            "zeta::index_merge_kernel",
            blocks(gc * w_out, THREADS),
            THREADS,
            (
                src,
                dst,
                np.int64(gc),
                np.int64(w_in),
                np.int64(w_out),
                np.int64(chunk << lv),
                kk,
                pdst,
                np.int32(n_curves),
                np.int64(s),
            ),
        )
    return levels, n_full, pts


def level_layout(s: int, chunk: int, causal: bool) -> List[Tuple[int, int]]:
    """(slice width, run length) of every level :func:`build` makes (non-causal: one level of
    one run of all keys)."""
    if not causal:
        return [(s, s)]
    n_full = s // chunk
    return [(((n_full >> lv) << lv) * chunk, chunk << lv) for lv in range(n_levels(s, chunk))]


def exact_boxes(
    rt: Runtime, levels: Any, k: Any, g: int, n_curves: int, s: int, chunk: int, causal: bool
) -> Tuple[Any, Any, Any]:
    """Leaves of curve 0 for the exact search: (boxes f32, box_offs int64 per level, starts).

    ``levels`` from :func:`build` over ``g * n_curves`` slices, ``k`` the (g, s, dk) float32
    keys. Level ``l``'s boxes start at ``box_offs[l]`` floats ((g, runs, leaves, 2, dk), see
    ``exact_boxes_kernel``), followed by the boxes of every run's groups of 32 leaves ((g,
    runs, groups, 2, dk), ``exact_super_boxes_kernel``); -1: its runs are at most
    :data:`LEAF` entries, no boxes.
    ``starts``: int32, each leaf's first entry in its run (leaf ``i`` of the level's boxes at
    ``box_offs[l] // (2 * dk) + i``), or :data:`NULL` when leaves are fixed (``CELL_LEAVES``).
    """
    dk = k.size // max(1, g * s)
    layout = level_layout(s, chunk, causal)
    offs = np.full(max(1, len(layout)), -1, dtype=np.int64)
    sizes = []
    total = 0
    level_off = 0
    for lv, (width, run_len) in enumerate(layout):
        n_runs = n_leaves = n_groups = 0
        if run_len > LEAF and width > 0:
            n_runs = g * (width // run_len)
            n_leaves = (run_len + LEAF - 1) // LEAF  # per run
            n_groups = n_runs * ((n_leaves + 31) // 32)
            offs[lv] = total
        sizes.append((level_off, n_runs, n_leaves, n_groups))
        total += (n_runs * n_leaves + n_groups) * 2 * dk  # leaf boxes, then the super boxes
        level_off += g * n_curves * width
    boxes = rt.empty((max(total, 1),), np.float32)
    starts = rt.empty((max(total // (2 * dk), 1),), np.int32) if CELL_LEAVES else None
    for lv, (width, run_len) in enumerate(layout):
        level_off, n_runs, n_leaves, n_groups = sizes[lv]
        n_boxes = n_runs * n_leaves
        if n_boxes == 0:
            continue
        src = levels[level_off : level_off + g * n_curves * width]
        dst = boxes[int(offs[lv]) : int(offs[lv]) + n_boxes * 2 * dk]
        st: Any = NULL
        if starts is not None:
            first = int(offs[lv]) // (2 * dk)
            st = starts[first : first + n_boxes]
            rt.launch(
                "index.cu",
                "zeta::exact_leaf_starts_kernel",
                blocks(n_boxes, THREADS),
                THREADS,
                (
                    src,
                    st,
                    np.int64(g),
                    np.int32(n_curves),
                    np.int64(width),
                    np.int64(run_len),
                    np.int32(LEAF),
                ),
            )
        rt.launch(
            "index.cu",
            "zeta::exact_boxes_kernel",
            blocks(n_boxes, THREADS),
            THREADS,
            (
                src,
                k,
                st,
                dst,
                np.int64(g),
                np.int32(n_curves),
                np.int64(width),
                np.int64(run_len),
                np.int64(s),
                np.int32(dk),
                np.int32(LEAF),
            ),
        )
        sup = boxes[
            int(offs[lv]) + n_boxes * 2 * dk : int(offs[lv]) + (n_boxes + n_groups) * 2 * dk
        ]
        rt.launch(
            "index.cu",
            "zeta::exact_super_boxes_kernel",
            blocks(n_groups, THREADS),
            THREADS,
            (dst, sup, np.int64(n_runs), np.int64(n_leaves), np.int32(dk)),
        )
    return boxes, _device_constant(rt, offs), starts if starts is not None else NULL


_CONSTANTS: Dict[Tuple[Any, ...], Any] = {}


def _device_constant(rt: Runtime, a: np.ndarray) -> Any:
    """``a`` on the device, uploaded once per (device, values): a copy from pageable host
    memory waits for the stream's queued work, and the index's small tables repeat."""
    xp = rt.xp
    dev = xp.cuda.Device().id if hasattr(xp, "cuda") else -1
    key = (id(xp), dev, a.dtype.str, tuple(a.tolist()))
    out = _CONSTANTS.get(key)
    if out is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        out = _CONSTANTS[key] = xp.asarray(a)
    return out
