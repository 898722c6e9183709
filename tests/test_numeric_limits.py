"""Finite inputs never give a NaN output: coordinates and gamma are checked against limits
within which no squared distance overflows and no query's Cauchy scores are all 0.

Before these limits, float32 coordinates of ~1e19 (all of a query's candidates at an inf
distance) and gamma >= ~2e19 (gamma^2 = inf) gave 0 / 0 = NaN outputs on every backend.
"""

import numpy as np
import pytest

import zeta
from zeta._validate import GAMMA_MAX, GAMMA_MIN, coord_limit

torch = pytest.importorskip("torch")

DK = 3
L32 = coord_limit(np.float32, DK)


def _far_apart(dtype=np.float32, lim=L32, n=40, dv=4):
    """Queries at the +lim corner, keys at the -lim corner (every distance the largest one
    within the limit), a few keys and queries elsewhere inside; values in [-1, 1]."""
    rng = np.random.default_rng(0)
    q = np.full((1, 2, n, DK), lim, dtype=dtype)
    k = np.full((1, 2, n, DK), -lim, dtype=dtype)
    q[:, :, ::7] = (rng.uniform(-1, 1, q[:, :, ::7].shape) * lim).astype(dtype)
    k[:, :, 3::5] = (rng.uniform(-1, 1, k[:, :, 3::5].shape) * lim).astype(dtype)
    assert np.abs(q).max() <= lim and np.abs(k).max() <= lim
    v = rng.uniform(-1, 1, (1, 2, n, dv)).astype(dtype)
    return q, k, v


def _just_beyond(x, dtype):
    return np.nextafter(dtype(x), dtype(np.inf), dtype=dtype)


def test_python_limit_is_the_float32_formula():
    f = np.float32
    assert L32 == float(np.sqrt(f(np.finfo(f).max) / f(3)) / f(4))
    assert 2.6e18 < L32 < 2.7e18
    # Within it, the largest squared distance is a quarter of float32's range.
    d2 = np.float32(DK) * np.float32(2 * L32) ** 2
    assert np.isfinite(d2) and d2 <= np.finfo(np.float32).max / 3.9
    assert coord_limit(np.float64, DK) > 1e153
    assert coord_limit("torch.float64", DK) == coord_limit(np.float64, DK)
    assert coord_limit(np.float16, DK) == L32  # half inputs are computed in float32


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
@pytest.mark.parametrize("exact", [True, False])
def test_outputs_finite_at_the_limits(backend, kind, exact):
    q, k, v = _far_apart()
    args = (q, k, v) if kind == "numpy" else tuple(map(torch.from_numpy, (q, k, v)))
    for gamma, mean_token in ((1.0, False), (GAMMA_MAX, True), (GAMMA_MAX, False)):
        o = zeta.attention(
            *args, topk=8, gamma=gamma, mean_token=mean_token, exact=exact, backend=backend
        )
        o = np.asarray(o)
        assert np.isfinite(o).all(), (gamma, mean_token)
        # A weighted mean of values in [-1, 1].
        assert np.abs(o).max() <= 1 + 1e-5
    idx, d2 = zeta.knn(*args[:2], topk=8, exact=exact, backend=backend)
    assert np.isfinite(np.asarray(d2)[np.asarray(idx) >= 0]).all()


def test_backward_finite_at_the_limits():
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in _far_apart())
    for gamma in (1.0, GAMMA_MAX):
        for t in (q, k, v):
            t.grad = None
        o = zeta.attention(q, k, v, topk=8, gamma=gamma, backend="rust")
        o.square().sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all(), gamma


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
@pytest.mark.parametrize("which", ["q", "k"])
def test_a_coordinate_past_the_limit_is_refused_by_name(backend, kind, which):
    q, k, v = _far_apart()
    arrs = {"q": q, "k": k}
    arrs[which][0, 1, 5, 2] = -_just_beyond(L32, np.float32)
    args = (q, k, v) if kind == "numpy" else tuple(map(torch.from_numpy, (q, k, v)))
    with pytest.raises(ValueError, match=rf"^{which}: coordinate .* beyond .*overflow float32"):
        zeta.attention(*args, topk=8, backend=backend)


def test_knn_still_ranks_huge_coordinates_like_brute_force():
    """knn has no output to break: past the limit (even at inf distances) it is still the
    brute-force top-k by (float32 d2, position)."""
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((1, 2, 60, DK)) * 1e20).astype(np.float32)
    k = (rng.standard_normal((1, 1, 60, DK)) * 1e20).astype(np.float32)
    want_i, want_d = zeta.exact_knn(q, k, 8)
    assert np.isinf(want_d).any()
    for backend in ("rust", "torch"):
        args = (q, k) if backend == "rust" else (torch.from_numpy(q), torch.from_numpy(k))
        got_i, got_d = zeta.knn(*args, topk=8, backend=backend)
        np.testing.assert_array_equal(np.asarray(got_i), want_i)
        np.testing.assert_array_equal(np.asarray(got_d), want_d)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_float64_inputs_have_float64_limits(backend):
    q, k, v = _far_apart(np.float64, lim=1e20)
    o = np.asarray(zeta.attention(q, k, v, topk=8, backend=backend))
    assert o.dtype == np.float64 and np.isfinite(o).all()
    q[0, 0, 0, 0] = _just_beyond(coord_limit(np.float64, DK), np.float64)
    with pytest.raises(ValueError, match=r"^q: coordinate .*overflow float64"):
        zeta.attention(q, k, v, topk=8, backend=backend)


BAD_GAMMA = [
    _just_beyond(GAMMA_MAX, np.float64),
    1e30,
    float("inf"),
    float(np.nextafter(GAMMA_MIN, 0.0)),
    1e-12,
    0.0,
    -1.0,
    float("nan"),
]


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("gamma", BAD_GAMMA)
def test_gamma_past_the_limits_is_refused(backend, gamma):
    q, k, v = _far_apart()
    with pytest.raises(ValueError, match=r"^gamma: must be in \[2\^-24, 2\^62\]"):
        zeta.attention(q, k, v, topk=8, gamma=gamma, backend=backend)
    qt, kt, vt = map(torch.from_numpy, (q, k, v))
    g = torch.full((2,), float(gamma), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^gamma: "):
        zeta.attention(qt, kt, vt, topk=8, gamma=g, backend=backend)


def test_kv_cache_limits_and_a_refused_call_changes_nothing():
    q, k, v = _far_apart()
    c = zeta.KVCache(2, DK, v.shape[-1])
    c.extend(k, v)
    for exact in (True, False):
        o = c.attend(q[:, :, -1:], topk=8, gamma=GAMMA_MAX, exact=exact)
        assert np.isfinite(o).all()
    n = len(c)
    bad = k[:, :, :3].copy()
    bad[0, 0, 1, 0] = _just_beyond(L32, np.float32)
    with pytest.raises(ValueError, match=r"^k: coordinate"):
        c.extend(bad, v[:, :, :3])
    assert len(c) == n
    qb = q[:, :, -1:].copy()
    qb[0, 1, 0, 2] = -_just_beyond(L32, np.float32)
    with pytest.raises(ValueError, match=r"^q: coordinate"):
        c.attend(qb, topk=8)
    with pytest.raises(ValueError, match=r"^gamma: "):
        c.attend(q[:, :, -1:], topk=8, gamma=1e30)


@pytest.mark.parametrize("dtype, big", [("float16", 70000.0), ("bfloat16", 3.4e38)])
def test_cache_values_beyond_the_cache_dtype_are_refused(dtype, big):
    """A float32 value past float16's 65504 (bfloat16's ~3.39e38) would be stored as inf and
    give inf/NaN outputs: extend refuses it by name and changes nothing."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 2, 9, DK)).astype(np.float32)
    v = rng.standard_normal((1, 2, 9, 4)).astype(np.float32)
    c = zeta.KVCache(2, DK, 4, dtype=dtype)
    c.extend(k[:, :, :5], v[:, :, :5])
    v[0, 1, 7, 2] = -big
    with pytest.raises(ValueError, match=rf"^v: value .* beyond this cache's {dtype} range"):
        c.extend(k[:, :, 5:], v[:, :, 5:])
    assert len(c) == 5
    v[0, 1, 7, 2] = 60000.0  # within both ranges
    c.extend(k[:, :, 5:], v[:, :, 5:])
    o = c.attend(rng.standard_normal((1, 2, 3, DK)).astype(np.float32), topk=4)
    assert np.isfinite(o).all()
    # a float32 cache keeps the value as it is
    c32 = zeta.KVCache(2, DK, 4)
    v[0, 1, 7, 2] = -big
    c32.extend(k, v)
    assert len(c32) == 9


def test_fused_decode_call_names_qkv_and_changes_nothing():
    """The fused decode call (what ZetaAttention's cache path makes) checks the keys, queries
    and values it unpacks before it appends anything."""
    rng = np.random.default_rng(2)
    hkv, hq, dv = 2, 2, 4
    c = zeta.KVCache(hkv, DK, dv, dtype="float16")
    c.extend(
        rng.standard_normal((1, hkv, 3, DK)).astype(np.float32),
        rng.standard_normal((1, hkv, 3, dv)).astype(np.float32),
    )
    w = (hq + hkv) * DK + hkv * dv
    gamma = np.ones(hq)
    for col, what, val in (
        (0, "queries", 1e19),
        (hq * DK, "keys", -1e19),
        ((hq + hkv) * DK, "values", 1e5),
    ):
        x = rng.standard_normal((1, 1, w)).astype(np.float32)
        x[0, 0, col] = val
        with pytest.raises(ValueError, match=rf"^qkv: {what}: "):
            c._c.decode_packed(x, hq, 4, gamma, False, 8, True)
        assert len(c) == 3
    x = rng.standard_normal((1, 1, w)).astype(np.float32)
    o = c._c.decode_packed(x, hq, 4, gamma, False, 8, True)
    assert len(c) == 4 and np.isfinite(o).all()


def test_cuda_backend_checks_use_the_same_limits():
    """The cupy backend's one-sync check (torch tensors here; cupy arrays take the same code
    with cupy's functions): q and k against the coordinate limit for attention, only
    finiteness for knn."""
    from zeta.backends import cupy_backend as cb

    q, k, v = map(torch.from_numpy, _far_apart())
    cb._check_finite(q, k, v, coords=2)
    qb = q.clone()
    qb[0, 0, 1, 1] = float(_just_beyond(L32, np.float32))
    with pytest.raises(ValueError, match=r"^q: coordinate .* overflow float32"):
        cb._check_finite(qb, k, v, coords=2)
    cb._check_finite(qb, k)  # knn: any finite coordinates
    vb = v.clone()
    vb[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^v: contains NaN or inf"):
        cb._check_finite(q, k, vb, coords=2)
    kb = k.clone().bfloat16()
    kb[0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^k: contains NaN or inf"):
        cb._check_finite(q, kb, v, coords=2)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_smallest_gamma_with_keys_on_their_queries(backend):
    """Keys on their queries (d2 = 0) with the smallest gamma: the largest scores there are
    (2^48) and their squares in the gradients (2^96); outputs and gradients stay finite.
    Below it (gamma 1e-12) the torch backend's gradients were NaN, and below ~1e-19 the
    outputs too."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 60, DK, generator=g)
    k, v = q.clone(), torch.randn(1, 2, 60, 4, generator=g)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    gg = torch.full((2,), GAMMA_MIN, dtype=torch.float64, requires_grad=True)
    o = zeta.attention(qq, kk, vv, topk=8, gamma=gg, mean_token=True, backend=backend)
    assert torch.isfinite(o).all()
    o.square().sum().backward()
    for t in (qq, kk, vv, gg):
        assert torch.isfinite(t.grad).all()


def test_zeta_attention_clamps_its_learned_gamma():
    """ZetaAttention's gamma = exp(log_gamma) clamped to the accepted range: an optimiser
    that drives log_gamma far out still gets a forward and finite gradients."""
    from zeta.nn import ZetaAttention

    m = ZetaAttention(16, 2, topk=4)
    x = torch.randn(1, 20, 16, generator=torch.Generator().manual_seed(6))
    for lg in (-200.0, 200.0):
        with torch.no_grad():
            m.log_gamma.fill_(lg)
        gm = m.gamma.detach()
        assert GAMMA_MIN <= float(gm.min()) and float(gm.max()) <= GAMMA_MAX
        m.zero_grad()
        y = m(x)
        assert torch.isfinite(y).all()
        y.square().sum().backward()
        assert torch.isfinite(m.log_gamma.grad).all()
    with pytest.raises(ValueError, match=r"^gamma_init: must be in"):
        ZetaAttention(16, 2, gamma_init=1e-9)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_large_values_with_the_largest_scores_give_a_weighted_mean(backend):
    """Keys on their queries and the smallest gamma (scores of 2^48) with values of 1e30 of
    both signs: the weights are normalised before they multiply the values, so the output is
    a weighted mean (it was inf or NaN when the scores multiplied the values first)."""
    rng = np.random.default_rng(7)
    q = (rng.standard_normal((1, 2, 50, DK)) * 1e-30).astype(np.float32)
    k = q.copy()
    v = (rng.standard_normal((1, 2, 50, 3)) * 1e30).astype(np.float32)
    for mean_token in (False, True):
        o = np.asarray(
            zeta.attention(q, k, v, topk=6, gamma=GAMMA_MIN, mean_token=mean_token, backend=backend)
        )
        assert np.isfinite(o).all()
        assert np.abs(o).max() <= np.abs(v).max() * (1 + 1e-5)
    c = zeta.KVCache(2, DK, 3)
    c.extend(k, v)
    o = c.attend(q[:, :, -4:], topk=6, gamma=GAMMA_MIN)
    assert np.isfinite(o).all() and np.abs(o).max() <= np.abs(v).max() * (1 + 1e-5)


@pytest.mark.parametrize(
    "gamma, v_scale, qk_scale",
    [(GAMMA_MAX, 3.7e30, 1.0), (GAMMA_MIN, 1e20, 1e-30), (1.0, 1e30, 1.0), (1.0, 30.0, L32)],
    ids=["largest-gamma", "smallest-gamma", "large-values", "far-keys"],
)
def test_gradients_finite_and_backends_agree_at_the_extremes(gamma, v_scale, qk_scale):
    """Every score tiny (largest gamma, keys at the coordinate limit) or huge (smallest gamma,
    keys on their queries), with large values: gradients stay finite (1 / z overflowed and
    s^2 underflowed: inf * 0 = NaN, found by the fuzzer) and the Rust core's equal the torch
    reference's autograd."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 60, DK, generator=g) * qk_scale
    k = q.clone() if qk_scale < 1e-20 else torch.randn(1, 2, 60, DK, generator=g) * qk_scale
    q, k = q.clamp(-L32, L32), k.clamp(-L32, L32)
    v = torch.randn(1, 2, 60, 4, generator=g) * v_scale
    grads = {}
    for backend in ("rust", "torch"):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        gg = torch.full((2,), gamma, dtype=torch.float64, requires_grad=True)
        o = zeta.attention(*ins, topk=7, gamma=gg, mean_token=True, backend=backend)
        o.sum().backward()
        grads[backend] = [t.grad for t in (*ins, gg)]
        for t in grads[backend]:
            assert torch.isfinite(t).all(), backend
    # q, k, v (gamma's gradient is finite; here it is a sum that cancels to rounding noise:
    # sum_j a_j (g_j - G.o) = 0 when the scores are all equal, as with keys on the queries)
    for a, b in zip(grads["rust"][:3], grads["torch"][:3]):
        scale = float(b.abs().max()) or 1.0
        torch.testing.assert_close(a.double() / scale, b.double() / scale, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_float16_numpy_inputs_with_inf_or_nan_are_refused(backend, bad):
    """numpy float16 q: compared in float16 the coordinate limit is inf, and inf <= inf; the
    check upcasts first."""
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((1, 1, 10, d)).astype(np.float16) for d in (DK, DK, 2))
    q[0, 0, 3, 1] = bad
    with pytest.raises(ValueError, match=r"^q: contains NaN or inf"):
        zeta.attention(q, k, v, topk=4, backend=backend)
