"""Exact search through the KV cache: ``KVCache.attend(exact=True)`` gives the brute-force
top-k attention by (distance, position) at every decode step and for multi-token attends, on
inputs that break heuristics; the parallel ``zeta.attention(exact=True)`` agrees; the window
search (the default) does not always; save/load keeps it; the fused decode call
(``decode_packed``, used by ZetaAttention) changes nothing when it fails; extends that run in
zeta's pool build the same cache as token-by-token extends."""

from __future__ import annotations

import numpy as np
import pytest
from adversarial import KINDS, brute_attention, points  # tests/ is on sys.path under pytest

import zeta

TOL = 1e-5


def _data(kind, b, h, hkv, t, dk, dv, seed):
    rng = np.random.default_rng(seed)
    q = points(kind, (b, h, t, dk), rng).astype(np.float32)
    k = points(kind, (b, hkv, t, dk), rng).astype(np.float32)
    v = rng.standard_normal((b, hkv, t, dv)).astype(np.float32)
    return q, k, v


# (index settings, (H, H_kv), batch, T, topk): chunks on and off the fence stride, one and
# several curves, sinks, GQA, tiny windows, topk > T.
SETTINGS = [
    (dict(chunk=4, window=1), (2, 1), 1, 90, 5),
    (dict(chunk=16, window=2, n_curves=2, n_sink=2), (4, 2), 2, 70, 8),
    (dict(chunk=64, window=1), (2, 2), 1, 200, 16),
    (dict(chunk=3, window=4, n_curves=3), (2, 1), 1, 40, 50),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("si", range(len(SETTINGS)))
def test_exact_decode_equals_parallel_exact(kind, si):
    kw, (h, hkv), b, t, topk = SETTINGS[si]
    q, k, v = _data(kind, b, h, hkv, t, 3, 4, seed=si)
    cache = zeta.KVCache(hkv, 3, 4, batch=b, **kw)
    if kind == "huge":
        # Squared distances overflow float32 (all of a query's scores 0: 0 / 0): both refuse
        # the coordinates by name (tests/test_numeric_limits.py has the limits).
        with pytest.raises(ValueError, match=r"^q: coordinate .* overflow float32"):
            zeta.attention(q, k, v, topk=topk, gamma=0.7, exact=True, **kw)
        with pytest.raises(ValueError, match=r"^k: coordinate .* overflow float32"):
            cache.extend(k, v)
        assert len(cache) == 0
        return
    full = zeta.attention(q, k, v, topk=topk, gamma=0.7, exact=True, **kw)
    outs = []
    for i in range(t):
        cache.extend(k[:, :, i : i + 1], v[:, :, i : i + 1])
        outs.append(cache.attend(q[:, :, i : i + 1], topk=topk, gamma=0.7, exact=True))
    dec = np.concatenate(outs, axis=2)
    np.testing.assert_allclose(dec, full, rtol=0, atol=TOL)
    assert np.isfinite(dec).all()


@pytest.mark.parametrize("si", range(len(SETTINGS)))
def test_exact_decode_equals_numpy_brute_force(si):
    """An oracle that shares no code with zeta: brute-force top-k attention in numpy."""
    kw, (h, hkv), b, t, topk = SETTINGS[si]
    q, k, v = _data("duplicates" if si % 2 else "gauss", b, h, hkv, t, 3, 4, seed=10 + si)
    cache = zeta.KVCache(hkv, 3, 4, batch=b, **kw)
    worst = 0.0
    for i in range(t):
        cache.extend(k[:, :, i : i + 1], v[:, :, i : i + 1])
        out = cache.attend(q[:, :, i : i + 1], topk=topk, gamma=0.7, exact=True)
        want = brute_attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], topk, 0.7)
        worst = max(worst, float(np.abs(out - want).max()))
    assert worst <= 1e-5


def test_window_search_misses_what_exact_finds():
    """The oracle can fail: with window 1 the window search is not the brute force."""
    kw = dict(chunk=4, window=1)
    q, k, v = _data("gauss", 1, 2, 1, 300, 3, 4, seed=3)
    cache = zeta.KVCache(1, 3, 4, **kw)
    cache.extend(k, v)
    want = brute_attention(q[:, :, -1:], k, v, 16, 1.0)
    approx = cache.attend(q[:, :, -1:], topk=16, exact=False)
    exact = cache.attend(q[:, :, -1:], topk=16, exact=True)
    assert np.abs(approx - want).max() > 1e-3
    assert np.abs(exact - want).max() <= TOL


@pytest.mark.parametrize("kind", ["gauss", "duplicates", "clusters"])
def test_exact_multi_token_attend_spanning_chunks(kind):
    """Queries in older chunks than the tail (a prefill's attend) take the full index path."""
    kw = dict(chunk=8, window=2, n_curves=2)
    q, k, v = _data(kind, 2, 4, 2, 150, 3, 5, seed=4)
    cache = zeta.KVCache(2, 3, 5, batch=2, **kw)
    cache.extend(k, v)
    for tq in (150, 37, 9, 1):
        out = cache.attend(q[:, :, -tq:], topk=6, gamma=1.3, exact=True)
        want = zeta.attention(q[:, :, -tq:], k, v, topk=6, gamma=1.3, exact=True, **kw)
        np.testing.assert_allclose(out, want, rtol=0, atol=TOL)
    want = brute_attention(q[:1, :, -20:], k[:1], v[:1], 6, 1.3)
    np.testing.assert_allclose(
        cache.attend(q, topk=6, gamma=1.3, exact=True)[:1, :, -20:], want, atol=TOL
    )


def test_exact_with_mean_token_and_half_values():
    kw = dict(chunk=16, window=2)
    q, k, v = _data("gauss", 1, 2, 1, 120, 3, 8, seed=5)
    for dtype in ("float32", "bfloat16"):
        cache = zeta.KVCache(1, 3, 8, dtype=dtype, **kw)
        cache.extend(k[:, :, :100], v[:, :, :100])
        stored = v if dtype == "float32" else v.astype(np.float32)
        outs = [cache.attend(q[:, :, 99:100], topk=7, mean_token=True, exact=True)]
        for i in range(100, 120):
            cache.extend(k[:, :, i : i + 1], v[:, :, i : i + 1])
            outs.append(cache.attend(q[:, :, i : i + 1], topk=7, mean_token=True, exact=True))
        if dtype == "float32":
            full = zeta.attention(q, k, stored, topk=7, mean_token=True, exact=True, **kw)
            np.testing.assert_allclose(np.concatenate(outs, 2), full[:, :, 99:], atol=TOL)
        else:
            assert all(np.isfinite(o).all() for o in outs)


def test_exact_after_save_and_load(tmp_path):
    """The block boxes are rebuilt on load: exact attends agree before and after."""
    kw = dict(chunk=4, window=1, n_curves=2)
    q, k, v = _data("cell_edges", 1, 2, 2, 333, 3, 4, seed=6)
    cache = zeta.KVCache(2, 3, 4, **kw)
    cache.extend(k, v)
    before = cache.attend(q[:, :, -5:], topk=9, exact=True)
    cache.save(tmp_path / "c.zkv")
    loaded = zeta.KVCache.load(tmp_path / "c.zkv")
    assert loaded.same_contents(cache)
    np.testing.assert_array_equal(loaded.attend(q[:, :, -5:], topk=9, exact=True), before)


def test_exact_argument_is_checked():
    cache = zeta.KVCache(1, 3, 4)
    q, k, v = _data("gauss", 1, 1, 1, 5, 3, 4, seed=0)
    cache.extend(k, v)
    with pytest.raises(TypeError, match="exact"):
        cache.attend(q[:, :, -1:], exact="yes")


# --------------------------------------------------------------------------- decode_packed
def _packed(q, k, v):
    """(B, H, T, dk), (B, Hkv, T, dk), (B, Hkv, T, dv) -> (B, T, H*dk + Hkv*dk + Hkv*dv)."""
    b, _, t, _ = q.shape
    parts = [x.transpose(0, 2, 1, 3).reshape(b, t, -1) for x in (q, k, v)]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1))


@pytest.mark.parametrize("exact", [False, True])
def test_decode_packed_equals_extend_then_attend(exact):
    kw = dict(chunk=4, window=2, n_curves=2, n_sink=1)
    q, k, v = _data("gauss", 2, 4, 2, 60, 3, 5, seed=7)
    a = zeta.KVCache(2, 3, 5, batch=2, **kw)
    c = zeta.KVCache(2, 3, 5, batch=2, **kw)
    g = np.linspace(0.5, 1.5, 4)
    at = 0
    for n in [13, 1, 1, 2, 1, 30, 1, 11]:
        sl = slice(at, at + n)
        a.extend(k[:, :, sl], v[:, :, sl])
        want = a.attend(q[:, :, sl], topk=5, gamma=g, mean_token=True, exact=exact)
        got = c._c.decode_packed(
            _packed(q[:, :, sl], k[:, :, sl], v[:, :, sl]), 4, 5, g, True, 2, exact
        )
        np.testing.assert_array_equal(got, want.transpose(0, 2, 1, 3).reshape(2, n, -1))
        at += n
    assert a.same_contents(c)


def test_decode_packed_bad_input_changes_nothing():
    q, k, v = _data("gauss", 1, 2, 1, 10, 3, 4, seed=8)
    cache = zeta.KVCache(1, 3, 4, chunk=4)
    cache.extend(k[:, :, :9], v[:, :, :9])
    ref = zeta.KVCache(1, 3, 4, chunk=4)
    ref.extend(k[:, :, :9], v[:, :, :9])
    x = _packed(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:])
    g = np.ones(2)
    bad_q = x.copy()
    bad_q[0, 0, 1] = np.nan  # a query component
    bad_k = x.copy()
    bad_k[0, 0, 6] = np.inf  # the key
    for args, err in [
        ((bad_q, 2, 4, g, False), "qkv"),
        ((bad_k, 2, 4, g, False), "k"),
        ((x, 0, 4, g, False), "num_heads"),
        ((x, 3, 4, g, False), "qkv"),  # 3 heads: the rows are too short
        ((x[:, :, :-1].copy(), 2, 4, g, False), "qkv"),
        ((x, 2, 0, g, False), "topk"),
        ((x, 2, 4, np.array([1.0, -1.0]), False), "gamma"),
        ((x, 2, 4, np.ones(3), False), "gamma"),
    ]:
        with pytest.raises(ValueError, match=err):
            cache._c.decode_packed(*args, 4)
        assert len(cache) == 9 and cache.same_contents(ref)
    for w in (0, None):  # this cache has no window of its own: the call must give one
        with pytest.raises(ValueError, match="window"):
            cache._c.decode_packed(x, 2, 4, g, False, w)
    assert cache.same_contents(ref)
    cache._c.decode_packed(x, 2, 4, g, False, 4)  # the same call, valid: it appends
    assert len(cache) == 10


def test_big_extend_in_the_pool_equals_token_by_token():
    """An extend big enough to run in zeta's pool (many groups, large merges) builds the
    same cache, bit for bit, as one token at a time on the calling thread."""
    rng = np.random.default_rng(9)
    b, hkv, t = 2, 3, 5000
    k = rng.standard_normal((b, hkv, t, 3)).astype(np.float32)
    v = rng.standard_normal((b, hkv, t, 2)).astype(np.float32)
    big = zeta.KVCache(hkv, 3, 2, batch=b, chunk=8, n_curves=2)
    big.extend(k[:, :, :4000], v[:, :, :4000])
    big.extend(k[:, :, 4000:], v[:, :, 4000:])
    small = zeta.KVCache(hkv, 3, 2, batch=b, chunk=8, n_curves=2)
    for i in range(t):
        small.extend(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert big.same_contents(small)
    q = rng.standard_normal((b, 2 * hkv, 1, 3)).astype(np.float32)
    np.testing.assert_array_equal(big.attend(q, topk=8), small.attend(q, topk=8))


@pytest.mark.parametrize("exact", [False, True])
def test_pool_and_calling_thread_attends_agree(exact):
    """A decode call with few (batch, head) rows runs on the calling thread, one with many
    in zeta's pool: a batch of 4 sequences (8 rows, the pool) gives, bit for bit, what each
    sequence gives alone (2 rows, the calling thread)."""
    kw = dict(chunk=8, window=2, n_curves=2, n_sink=1)
    q, k, v = _data("gauss", 4, 2, 2, 300, 3, 6, seed=11)
    both = zeta.KVCache(2, 3, 6, batch=4, **kw)
    both.extend(k[:, :, :-1], v[:, :, :-1])
    alone = [zeta.KVCache(2, 3, 6, **kw) for _ in range(4)]
    for i, c in enumerate(alone):
        c.extend(k[i : i + 1, :, :-1], v[i : i + 1, :, :-1])
    both.extend(k[:, :, -1:], v[:, :, -1:])
    got = both.attend(q[:, :, -1:], topk=7, mean_token=True, exact=exact)
    for i, c in enumerate(alone):
        c.extend(k[i : i + 1, :, -1:], v[i : i + 1, :, -1:])
        one = c.attend(q[i : i + 1, :, -1:], topk=7, mean_token=True, exact=exact)
        np.testing.assert_array_equal(got[i : i + 1], one)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_multi_token_attends_across_many_counter_merges(chunk, exact):
    """Extends of random sizes, each followed by an attend of all its tokens: the runs
    those queries need are cut out of the counter's bigger runs or merged for the call;
    the outputs equal one parallel call over the whole sequence."""
    kw = dict(chunk=chunk, window=2, n_curves=2, n_sink=1)
    t = 1500
    q, k, v = _data("gauss", 1, 4, 2, t, 3, 3, seed=12 + chunk)
    full = zeta.attention(q, k, v, topk=5, gamma=0.9, exact=exact, mean_token=True, **kw)
    cache = zeta.KVCache(2, 3, 3, **kw)
    rng = np.random.default_rng(chunk)
    at = 0
    while at < t:
        n = int(min(t - at, rng.choice([1, 2, 7, 40, 129, 300])))
        cache.extend(k[:, :, at : at + n], v[:, :, at : at + n])
        got = cache.attend(q[:, :, at : at + n], topk=5, gamma=0.9, exact=exact, mean_token=True)
        np.testing.assert_allclose(got, full[:, :, at : at + n], rtol=0, atol=TOL)
        at += n
