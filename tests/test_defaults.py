"""The defaults (issue 10): exact search, since it met its cost goal (<= 1.5x the 1-curve
window-32 search per query, and cheaper than the window search's defaults on the CPU), with 1
curve and window 2 * topk (they change only its speed); the window search (``exact=False``)
keeps 2 curves and window 4 * topk (recall@32 >= 0.9 on the recall benchmark). The same on
every entry point and backend."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import zeta
from zeta._validate import DEFAULT_EXACT, default_n_curves, default_window, index_params


def _gauss(n, seed=0, h=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, h, n, 3), dtype=np.float32)
    k = rng.standard_normal((1, h, n, 3), dtype=np.float32)
    return q, k


def test_resolved_defaults():
    assert DEFAULT_EXACT is True
    p = index_params(3, 32)
    assert (p.n_curves, p.window, p.exact) == (1, 64, True)
    p = index_params(3, 32, exact=False)
    assert (p.n_curves, p.window, p.exact) == (2, 128, False)
    assert index_params(3, 10).window == 20  # scales with topk
    assert index_params(3, 10, exact=False).window == 40
    # valid for every key_dim (n_curves <= d_k + 1)
    assert index_params(1, 32, exact=False).n_curves == 2
    assert default_n_curves() == 1 and default_window(32) == 64
    assert default_n_curves(False) == 2 and default_window(32, False) == 128


def test_every_entry_point_defaults_to_exact():
    from zeta import demo
    from zeta.backends import torch_ref

    fns = [zeta.knn, zeta.attention, zeta.KVCache.attend, demo.run, torch_ref.knn]
    fns.append(torch_ref.attention)
    for fn in fns:
        assert inspect.signature(fn).parameters["exact"].default is DEFAULT_EXACT, fn


def test_knn_and_attention_defaults_are_the_documented_settings():
    q, k = _gauss(3000, seed=1, h=2)
    v = np.random.default_rng(2).standard_normal((1, 2, 3000, 8), dtype=np.float32)
    i_def, d_def = zeta.knn(q, k, 32)
    i_bf, d_bf = zeta.exact_knn(q, k, 32)
    np.testing.assert_array_equal(i_def, i_bf)  # the default is the brute-force top-k
    np.testing.assert_array_equal(d_def, d_bf)
    i_set, _ = zeta.knn(q, k, 32, exact=True, n_curves=1, window=64)
    np.testing.assert_array_equal(i_def, i_set)
    # the window search's own defaults
    i_win, _ = zeta.knn(q, k, 32, exact=False)
    i_win_set, _ = zeta.knn(q, k, 32, exact=False, n_curves=2, window=128)
    np.testing.assert_array_equal(i_win, i_win_set)
    assert not np.array_equal(i_win, i_def)  # it is approximate: the default changed the answer
    o_def = zeta.attention(q, k, v, topk=16)
    np.testing.assert_array_equal(o_def, zeta.attention(q, k, v, topk=16, exact=True))
    o_win = zeta.attention(q, k, v, topk=16, exact=False)
    np.testing.assert_array_equal(o_win, zeta.attention(q, k, v, topk=16, exact=False, window=64))


@pytest.mark.parametrize("n", [8192, 20000])
def test_default_recall(n):
    q, k = _gauss(n, seed=3)
    idx, _ = zeta.knn(q, k, 32)
    assert zeta.recall(q, k, idx) == 1.0
    # the window search's defaults: >= 0.9 but not all
    idx_w, _ = zeta.knn(q, k, 32, exact=False)
    assert 0.9 <= zeta.recall(q, k, idx_w) < 1.0
    # what the defaults before (1 curve, window topk) found: far less
    idx1, _ = zeta.knn(q, k, 32, n_curves=1, window=32, exact=False)
    assert zeta.recall(q, k, idx1) < 0.75


def test_cache_defaults_match_attention_defaults():
    q, k = _gauss(5000, seed=5, h=2)
    v = np.random.default_rng(6).standard_normal((1, 2, 5000, 4), dtype=np.float32)
    cache = zeta.KVCache(2, 3, 4)
    # a standalone cache keeps the window search's 2 curves, so that either kind of attend
    # gives zeta.attention's answer with the same kind
    assert cache._c.config()[4]["n_curves"] == 2
    cache.extend(k, v)
    for exact in (True, False):
        got = cache.attend(q[:, :, -7:], topk=32, exact=exact)
        want = zeta.attention(q[:, :, -7:], k, v, topk=32, exact=exact)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        cache.attend(q[:, :, -7:], topk=32), cache.attend(q[:, :, -7:], topk=32, exact=True)
    )


def test_layer_caches_follow_the_layer():
    nn = pytest.importorskip("zeta.nn")
    # an exact layer (the default) searches curve 0 only: its cache holds one curve
    assert nn.ZetaAttention(16, 2).make_cache()._c.config()[4]["n_curves"] == 1
    assert nn.ZetaAttention(16, 2, exact=True).make_cache()._c.config()[4]["n_curves"] == 1
    assert nn.ZetaAttention(16, 2, exact=False).make_cache()._c.config()[4]["n_curves"] == 2
    assert nn.ZetaAttention(16, 2, n_curves=3).make_cache()._c.config()[4]["n_curves"] == 3


def test_layer_default_is_exact():
    torch = pytest.importorskip("torch")
    nn = pytest.importorskip("zeta.nn")
    torch.manual_seed(0)
    layer = nn.ZetaAttention(16, 2, key_dim=3, topk=4, chunk=4)
    twin = nn.ZetaAttention(16, 2, key_dim=3, topk=4, chunk=4, exact=True)
    win = nn.ZetaAttention(16, 2, key_dim=3, topk=4, chunk=4, exact=False, window=1)
    twin.load_state_dict(layer.state_dict())
    win.load_state_dict(layer.state_dict())
    x = torch.randn(1, 300, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), twin(x))
        assert not torch.equal(layer(x), win(x))  # the window search differs here


def test_demo_defaults_to_exact_and_no_exact_runs_the_window_search():
    from zeta import demo

    small = ["--tokens", "3000", "--queries", "4", "--heads", "2", "--no-dense"]
    tiny_index = ["--window", "1", "--n-curves", "1"]
    r = demo.main(small + tiny_index)  # the default: exact, whatever the window
    assert r["median_rel_err_vs_exact_topk"] <= 1e-5
    r = demo.main(small + tiny_index + ["--no-exact"])  # the window search with window 1
    assert r["median_rel_err_vs_exact_topk"] > 1e-3
