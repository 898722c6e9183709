"""``zeta demo``: long-context CPU decode on a synthetic needle-retrieval task.

A KV cache of S tokens (default 262,144; ``--tokens 1048576`` for 1M) is filled with random
3-D keys and 64-wide values (haystack). ``--queries`` needles were planted at random earlier
positions: their keys are ordinary-looking points, their values carry a unique signature.
Each decode step appends one token and attends a query equal to one needle's key plus a
little noise. Reported per decoded token (all heads):

- latency of zeta's decode (``KVCache.attend``, T_q = 1), against dense attention over the
  same cache in numpy (all S keys scored, the way an N x N kernel decodes) and an exact
  brute-force top-k in numpy (what zeta's exact search, the default, returns);
- needle hits: the output is nearer (cosine) to its needle's signature than to any other;
- agreement with exact top-k Cauchy attention (brute-force neighbours): the median relative
  error ||zeta - exact|| / ||exact|| over heads and steps, and the share of outputs within 1%.
  The default is the exact search (the brute-force top-k, error 0 up to float rounding);
  ``--no-exact`` runs the approximate window search, where `window` and `n_curves` trade
  speed for recall (see `zeta bench --only recall`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ._progress import progress
from ._validate import DEFAULT_EXACT, default_n_curves, default_window
from .cache import KVCache


def _cauchy(q, keys, values, gamma, idx=None):
    """Cauchy attention of one query q (dk,) over keys[idx] (all when idx is None)."""
    if idx is not None:
        keys, values = keys[idx], values[idx]
    d2 = ((keys - q) ** 2).sum(-1)
    s = 1.0 / (d2 + gamma * gamma)
    return (s[:, None] * values).sum(0) / s.sum()


def run(
    tokens: int = 262_144,
    heads: int = 8,
    key_dim: int = 3,
    value_dim: int = 64,
    queries: int = 32,
    topk: int = 32,
    gamma: float = 0.01,
    noise: float = 1e-3,
    seed: int = 0,
    block: int = 8192,
    dense: bool = True,
    quiet: bool = False,
    n_curves=None,
    window=None,
    exact: bool = DEFAULT_EXACT,
) -> dict:
    rng = np.random.default_rng(seed)
    S, H, dk, dv = tokens, heads, key_dim, value_dim
    total = S + queries
    if n_curves is None:
        n_curves = default_n_curves(exact)
    say = (lambda *a: None) if quiet else print
    say(
        f"zeta demo: KV cache of {S:,} tokens x {H} heads, key_dim {dk}, value_dim {dv}, topk {topk}"
        + (
            ", exact search"
            if exact
            else f", n_curves {n_curves}, window {window or default_window(topk)}"
        )
    )

    # Haystack, with needle signatures planted at random positions (distinct per head).
    keys = rng.standard_normal((H, total, dk), dtype=np.float32)
    values = rng.standard_normal((H, total, dv), dtype=np.float32) / np.sqrt(dv)
    sig = rng.standard_normal((H, queries, dv)).astype(np.float32)
    sig /= np.linalg.norm(sig, axis=-1, keepdims=True)
    needle_pos = np.stack([rng.choice(int(S * 0.95), queries, replace=False) for _ in range(H)])
    for h in range(H):
        values[h, needle_pos[h]] = sig[h]

    cache = KVCache(H, dk, dv, batch=1, n_curves=n_curves, window=window)
    t0 = time.perf_counter()
    with progress(S, "building cache", "tok", disable=quiet) as bar:
        for a in range(0, S, block):
            b = min(S, a + block)
            cache.extend(keys[None, :, a:b], values[None, :, a:b])
            bar.update(b - a)
    t_build = time.perf_counter() - t0
    say(
        f"  extend: {S / t_build:,.0f} tokens/s ({t_build:.2f} s), {cache.nbytes / S:,.0f} bytes/token held"
    )

    lat_z, lat_dense, lat_exact = [], [], []
    hits, rel = 0, []
    # Decode every step first, then the numpy baselines: numpy's BLAS threads keep spinning
    # after a call and would inflate zeta's timings if the two were interleaved.
    qs, outs = [], []
    with progress(queries, "decoding", "tok", disable=quiet) as bar:
        for i in range(queries):
            p = S + i
            cache.extend(keys[None, :, p : p + 1], values[None, :, p : p + 1])
            qv = keys[np.arange(H), needle_pos[:, i]] + noise * rng.standard_normal((H, dk)).astype(
                np.float32
            )
            t = time.perf_counter()
            outs.append(
                cache.attend(qv[None, :, None, :], topk=topk, gamma=gamma, exact=exact)[0, :, 0]
            )  # (H, dv)
            lat_z.append(time.perf_counter() - t)
            qs.append(qv)
            bar.update(1)

    with progress(queries, "exact baselines", "tok", disable=quiet) as bar:
        for i, (qv, out) in enumerate(zip(qs, outs)):
            n = S + i + 1
            t = time.perf_counter()
            ref = np.empty((H, dv), np.float32)
            for h in range(H):
                d2 = ((keys[h, :n] - qv[h]) ** 2).sum(-1)
                idx = np.argpartition(d2, topk - 1)[:topk]
                ref[h] = _cauchy(qv[h], keys[h, :n], values[h, :n], gamma, idx)
            lat_exact.append(time.perf_counter() - t)
            if dense:
                t = time.perf_counter()
                for h in range(H):
                    _cauchy(qv[h], keys[h, :n], values[h, :n], gamma)
                lat_dense.append(time.perf_counter() - t)
            cos = np.einsum("hd,hqd->hq", out / np.linalg.norm(out, axis=-1, keepdims=True), sig)
            hits += int((cos.argmax(-1) == i).sum())
            rel.extend((np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).tolist())
            bar.update(1)

    us = 1e6 * float(np.median(lat_z))
    res = {
        "tokens": S,
        "heads": H,
        "key_dim": dk,
        "value_dim": dv,
        "topk": topk,
        "queries": queries,
        "extend_tokens_per_s": S / t_build,
        "bytes_per_token": cache.nbytes / len(cache),
        "zeta_us_per_token": us,
        "zeta_us_per_token_per_head": us / H,
        "exact_topk_ms_per_token": 1e3 * float(np.median(lat_exact)),
        "dense_ms_per_token": 1e3 * float(np.median(lat_dense)) if lat_dense else None,
        "needle_hit_rate": hits / (queries * H),
        "median_rel_err_vs_exact_topk": float(np.median(rel)),
        "share_within_1pct_of_exact_topk": float(np.mean(np.asarray(rel) <= 0.01)),
    }
    say(f"  zeta decode:      {us:9.1f} us/token ({us / H:.1f} us per head), median of {queries}")
    say(
        f"  exact top-k (np): {res['exact_topk_ms_per_token'] * 1e3:9.1f} us/token  "
        f"-> zeta is {res['exact_topk_ms_per_token'] * 1e3 / us:,.0f}x faster"
    )
    if lat_dense:
        say(
            f"  dense attn (np):  {res['dense_ms_per_token'] * 1e3:9.1f} us/token  "
            f"-> zeta is {res['dense_ms_per_token'] * 1e3 / us:,.0f}x faster"
        )
    say(f"  needles retrieved: {hits}/{queries * H} ({100 * res['needle_hit_rate']:.1f}%)")
    say(
        f"  vs exact top-k attention: median relative error {res['median_rel_err_vs_exact_topk']:.3f}, "
        f"{100 * res['share_within_1pct_of_exact_topk']:.1f}% of outputs within 1%"
    )
    if not exact:
        say(
            "  (the window search is approximate: with its defaults, 2 curves and window 4 * topk,"
            " it finds ~94% of the exact top-32 neighbours of a random query at 64k keys;"
            " the exact search, the default, finds all of them)"
        )
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="zeta demo", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tokens", type=int, default=262_144, help="cache length (default 262144; try 1048576)"
    )
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--queries", type=int, default=32, help="decode steps (needle queries)")
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--value-dim", type=int, default=64)
    ap.add_argument(
        "--n-curves", type=int, default=None, help="shifted Z-curves (default 1; 2 with --no-exact)"
    )
    ap.add_argument(
        "--window",
        type=int,
        default=None,
        help="index window per run (default: 2 * topk; 4 * topk with --no-exact)",
    )
    ap.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_EXACT,
        help="exact top-k search, the brute-force neighbours (default); --no-exact: the"
        " approximate window search",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    for nm in ("tokens", "heads", "queries", "topk", "value_dim"):
        if getattr(a, nm) < 1:
            ap.error(f"--{nm.replace('_', '-')} must be >= 1")
    if a.window is not None and a.window < 1:
        ap.error("--window must be >= 1")
    try:
        KVCache(1, 3, 1, n_curves=a.n_curves, window=a.window)  # option errors before any work
    except ValueError as e:
        ap.error(str(e))
    res = run(
        a.tokens,
        a.heads,
        3,
        a.value_dim,
        a.queries,
        a.topk,
        seed=a.seed,
        dense=not a.no_dense,
        n_curves=a.n_curves,
        window=a.window,
        exact=a.exact,
    )
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res
