"""Point sets for exact-search tests (numpy only): ties, equal keys, grid-cell edges,
clusters, heavy tails, huge and tiny scales."""

from __future__ import annotations

import numpy as np


def points(kind, shape, rng):
    """Inputs that break heuristics: ties, equal keys, grid-cell edges, clusters, heavy tails,
    huge and tiny scales."""
    if kind == "gauss":
        x = rng.standard_normal(shape)
    elif kind == "duplicates":
        x = rng.integers(-1, 2, size=shape).astype(float)
    elif kind == "all_equal":
        x = np.full(shape, 0.3)
    elif kind == "cell_edges":  # multiples of 1/4: edges of the index grid's cells
        x = rng.integers(-4, 5, size=shape) / 4.0
    elif kind == "clusters":
        centre = rng.integers(0, 4, size=shape[:-1] + (1,)) * 5.0
        x = centre + 1e-4 * rng.standard_normal(shape)
    elif kind == "heavy_tail":
        x = rng.standard_cauchy(shape)
    elif kind == "huge":  # squared distances overflow float32 to inf
        x = rng.standard_normal(shape) * 1e20
    elif kind == "tiny":  # squared distances underflow to 0 (all ties)
        x = rng.standard_normal(shape) * 1e-25
    else:
        raise ValueError(kind)
    return x


KINDS = [
    "gauss",
    "duplicates",
    "all_equal",
    "cell_edges",
    "clusters",
    "heavy_tail",
    "huge",
    "tiny",
]
