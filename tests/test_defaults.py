"""The default index settings (issue 10): 2 curves and window 4 * topk for the window search,
chosen so that recall@32 is >= 0.9 on the recall benchmark; 1 curve and window 2 * topk for the
exact search (they change only its speed). The same on every entry point."""

from __future__ import annotations

import numpy as np
import pytest

import zeta
from zeta._validate import default_n_curves, default_window, index_params


def _gauss(n, seed=0, h=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, h, n, 3), dtype=np.float32)
    k = rng.standard_normal((1, h, n, 3), dtype=np.float32)
    return q, k


def test_resolved_defaults():
    p = index_params(3, 32)
    assert (p.n_curves, p.window, p.exact) == (2, 128, False)
    p = index_params(3, 10)
    assert p.window == 40  # scales with topk
    p = index_params(3, 32, exact=True)
    assert (p.n_curves, p.window, p.exact) == (1, 64, True)
    # valid for every key_dim (n_curves <= d_k + 1)
    assert index_params(1, 32).n_curves == 2
    assert default_n_curves() == 2 and default_window(32) == 128


def test_knn_and_attention_defaults_are_the_documented_settings():
    q, k = _gauss(3000, seed=1, h=2)
    v = np.random.default_rng(2).standard_normal((1, 2, 3000, 8), dtype=np.float32)
    i_def, d_def = zeta.knn(q, k, 32)
    i_set, d_set = zeta.knn(q, k, 32, n_curves=2, window=128)
    np.testing.assert_array_equal(i_def, i_set)
    i_old, _ = zeta.knn(q, k, 32, n_curves=1, window=32)
    assert not np.array_equal(i_def, i_old)  # the defaults changed what is searched
    o_def = zeta.attention(q, k, v, topk=16)
    o_set = zeta.attention(q, k, v, topk=16, n_curves=2, window=64)
    np.testing.assert_array_equal(o_def, o_set)


@pytest.mark.parametrize("n", [8192, 20000])
def test_default_recall_is_at_least_0_9(n):
    q, k = _gauss(n, seed=3)
    idx, _ = zeta.knn(q, k, 32)
    assert zeta.recall(q, k, idx) >= 0.9
    # what the defaults before (1 curve, window topk) found: far less
    idx1, _ = zeta.knn(q, k, 32, n_curves=1, window=32)
    assert zeta.recall(q, k, idx1) < 0.75


def test_exact_defaults_and_answer():
    q, k = _gauss(4000, seed=4)
    i_x, d_x = zeta.knn(q, k, 32, exact=True)
    i_b, d_b = zeta.exact_knn(q, k, 32)
    np.testing.assert_array_equal(i_x, i_b)
    # the exact search's own defaults (1 curve, window 2 * topk) are what it resolves to
    i_s, _ = zeta.knn(q, k, 32, exact=True, n_curves=1, window=64)
    np.testing.assert_array_equal(i_x, i_s)


def test_cache_defaults_match_attention_defaults():
    q, k = _gauss(5000, seed=5, h=2)
    v = np.random.default_rng(6).standard_normal((1, 2, 5000, 4), dtype=np.float32)
    cache = zeta.KVCache(2, 3, 4)
    assert cache._c.config()[4]["n_curves"] == 2
    cache.extend(k, v)
    got = cache.attend(q[:, :, -7:], topk=32)
    want = zeta.attention(q[:, :, -7:], k, v, topk=32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got_x = cache.attend(q[:, :, -7:], topk=32, exact=True)
    want_x = zeta.attention(q[:, :, -7:], k, v, topk=32, exact=True)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)


def test_layer_caches_follow_the_layer():
    nn = pytest.importorskip("zeta.nn")
    assert nn.ZetaAttention(16, 2).make_cache()._c.config()[4]["n_curves"] == 2
    # an exact layer searches curve 0 only: its cache holds one curve
    assert nn.ZetaAttention(16, 2, exact=True).make_cache()._c.config()[4]["n_curves"] == 1
    assert nn.ZetaAttention(16, 2, n_curves=3).make_cache()._c.config()[4]["n_curves"] == 3
