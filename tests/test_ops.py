"""Tests of the functional API (zeta.knn / zeta.attention / zeta.exact_knn / zeta.recall /
zeta.backends) on the Rust backend, against the torch reference (zeta.backends.torch_ref),
the dense oracle (torch_ref.dense_topk_attention) and numpy brute force written here."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import zeta  # noqa: E402
from zeta._validate import default_window  # noqa: E402
from zeta.backends import torch_ref as T  # noqa: E402

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_qkv(b=1, h=2, hkv=1, n=12, s=None, dk=3, dv=4, dtype=torch.float64, seed=0):
    s = n if s is None else s
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, dk, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, s, dk, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, s, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(fn, inputs, weight_seed=123):
    """Gradients of sum(out * w) for a fixed random w, w.r.t. each input."""
    out = fn(*inputs)
    g = torch.Generator().manual_seed(weight_seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in inputs]


def np_brute_knn(q, k, topk, causal):
    """numpy brute force: (d2, position) order, -1 / +inf padding. q, k float64 arrays."""
    b, h, n, dk = q.shape
    hkv, s = k.shape[1], k.shape[2]
    grp = h // hkv
    idx = np.full((b, h, n, topk), -1, dtype=np.int64)
    d2 = np.full((b, h, n, topk), np.inf, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            kk = k[bi, hi // grp]
            for i in range(n):
                last = s - n + i if causal else s - 1
                diff = q[bi, hi, i][None, :] - kk[: last + 1]
                # left-to-right sum over dimensions, as the library specifies
                dist = diff[:, 0] * diff[:, 0]
                for j in range(1, dk):
                    dist = dist + diff[:, j] * diff[:, j]
                order = np.lexsort((np.arange(last + 1), dist))[:topk]
                idx[bi, hi, i, : len(order)] = order
                d2[bi, hi, i, : len(order)] = dist[order]
    return idx, d2


# ---------------------------------------------------------------------------------------------
# the option grid: a Latin-hypercube-like sample (every value of every axis appears)
# ---------------------------------------------------------------------------------------------

AXES = {
    "causal": [True, False],
    "chunk": [1, 4, 16, 64],
    "window": ["small", "large", None],
    "curves": ["one", "two", "max"],
    "n_sink": [0, 3],
    "mean_token": [False, True],
    "heads": [(1, 1), (4, 2), (4, 1)],
    "extra": [0, 7],  # S - N (bottom-right alignment)
    "batch": [1, 2],
    "dk": [1, 3, 8],
    "dtype": [torch.float64, torch.float32],
    "gamma": ["float", "tensor"],
    "exact": [False, True],  # the window search (its options matter) and the exact default
}
N_CASES = 36


def _grid():
    rng = random.Random(2024)
    cols = {}
    for name, vals in AXES.items():
        col = [vals[i % len(vals)] for i in range(N_CASES)]
        rng.shuffle(col)
        cols[name] = col
    cases = []
    for i in range(N_CASES):
        c = {name: cols[name][i] for name in AXES}
        c["seed"] = i
        cases.append(c)
    return cases


CASES = _grid()


def _case_id(c):
    return (
        f"{'c' if c['causal'] else 'nc'}-ch{c['chunk']}-w{c['window']}-{c['curves']}-s{c['n_sink']}"
        f"-m{int(c['mean_token'])}-h{c['heads'][0]}x{c['heads'][1]}-x{c['extra']}-b{c['batch']}"
        f"-dk{c['dk']}-{str(c['dtype'])[6:]}-{c['gamma']}{'-exact' if c['exact'] else ''}"
    )


def setup_case(c):
    h, hkv = c["heads"]
    n = 40
    s = n + c["extra"]
    dk = c["dk"]
    q, k, v = make_qkv(c["batch"], h, hkv, n, s, dk, 3, c["dtype"], seed=c["seed"])
    topk = 5
    window = {"small": 1, "large": s, None: None}[c["window"]]
    n_curves = {"one": 1, "two": 2, "max": dk + 1}[c["curves"]]
    if c["gamma"] == "float":
        gamma = 0.7
    else:
        gamma = torch.linspace(0.5, 1.5, h, dtype=c["dtype"])
    idx_kw = dict(
        causal=c["causal"],
        chunk=c["chunk"],
        window=window,
        n_curves=n_curves,
        n_sink=c["n_sink"],
        exact=c["exact"],
    )
    return q, k, v, topk, gamma, idx_kw


@pytest.mark.parametrize("c", CASES, ids=[_case_id(c) for c in CASES])
def test_rust_matches_torch_reference(c):
    q, k, v, topk, gamma, kw = setup_case(c)
    f64 = c["dtype"] == torch.float64
    tol = dict(rtol=1e-10, atol=1e-12) if f64 else dict(rtol=1e-4, atol=1e-5)

    # knn: indices identical, distances equal
    i_r, d_r = zeta.knn(q, k, topk, backend="rust", **kw)
    i_t, d_t = zeta.knn(q, k, topk, backend="torch", **kw)
    assert i_r.dtype == torch.int64 and i_r.shape == (q.shape[0], q.shape[1], q.shape[2], topk)
    assert torch.equal(i_r, i_t)
    torch.testing.assert_close(d_r, d_t, **tol)
    # the Rust indices also match the reference module called directly
    win = default_window(topk, kw["exact"]) if kw["window"] is None else kw["window"]
    i_direct, _ = T.knn(q, k, topk, **{**kw, "window": win})
    assert torch.equal(i_r, i_direct)

    # forward (and, in float64, gradients of q, k, v and a tensor gamma)
    mt = c["mean_token"]
    if f64:
        ins = leaf(q, k, v) + ([leaf(gamma)[0]] if torch.is_tensor(gamma) else [])

        def run(backend):
            xs = leaf(*ins)

            def fn(qq, kk, vv, *g):
                return zeta.attention(
                    qq,
                    kk,
                    vv,
                    topk=topk,
                    gamma=g[0] if g else gamma,
                    mean_token=mt,
                    backend=backend,
                    **kw,
                )

            return grads_of(fn, xs)

        o_r, g_r = run("rust")
        o_t, g_t = run("torch")
        torch.testing.assert_close(o_r, o_t, **tol)
        for a, b_, nm in zip(g_r, g_t, "qkvg"):
            torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11, msg=f"grad {nm}")
    else:
        o_r = zeta.attention(q, k, v, topk=topk, gamma=gamma, mean_token=mt, backend="rust", **kw)
        o_t = zeta.attention(q, k, v, topk=topk, gamma=gamma, mean_token=mt, backend="torch", **kw)
        assert o_r.dtype == q.dtype
        torch.testing.assert_close(o_r, o_t, **tol)

    # numpy input gives the same numbers
    o_np = zeta.attention(
        q.numpy(),
        k.numpy(),
        v.numpy(),
        topk=topk,
        gamma=gamma.numpy() if torch.is_tensor(gamma) else gamma,
        mean_token=mt,
        **kw,
    )
    assert isinstance(o_np, np.ndarray) and o_np.dtype == q.numpy().dtype
    np.testing.assert_allclose(o_np, o_r.detach().numpy(), rtol=1e-12 if f64 else 1e-6, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(chunk=4, window=2, exact=False),
        dict(chunk=1, window=1, n_curves=3, n_sink=2, exact=False),
        dict(causal=False, window=2, n_curves=2, exact=False),
        dict(
            chunk=8, window=3, bits=3, exact=False
        ),  # coarse grid: many equal codes, ties by position
        dict(chunk=2, window=2, scale=0.05, n_curves=2, exact=False),
    ],
    ids=["c4", "c1-curves-sink", "noncausal", "coarse-bits", "scale"],
)
@pytest.mark.parametrize("data,dtype", [("ties", np.float32), ("scaled", np.float64)])
def test_knn_long_sequences_match_reference(kw, data, dtype):
    """Deep run levels (S=600), equal distances/codes and extreme magnitudes."""
    rng = np.random.default_rng(len(str(kw)))
    if data == "ties":
        q = rng.integers(-2, 3, size=(2, 2, 200, 2)).astype(dtype)
        k = rng.integers(-2, 3, size=(2, 1, 600, 2)).astype(dtype)
    else:
        q = (rng.standard_normal((1, 4, 600, 3)) * 1e-3).astype(dtype)
        k = (rng.standard_normal((1, 2, 600, 3)) * 1e3).astype(dtype)
    i_r, d_r = zeta.knn(q, k, 7, **kw)
    i_t, d_t = zeta.knn(q, k, 7, backend="torch", **kw)
    np.testing.assert_array_equal(i_r, i_t)
    np.testing.assert_array_equal(d_r, d_t)
    assert zeta.recall(q, k, i_r, causal=kw.get("causal", True)) < 1.0 or data == "ties"


@pytest.mark.parametrize("c", [c for c in CASES if c["causal"]][:12], ids=_case_id)
def test_causality(c):
    """Changing keys/values after position p never changes the outputs of queries at <= p."""
    q, k, v, topk, gamma, kw = setup_case(c)
    n, s = q.shape[2], k.shape[2]
    rng = np.random.default_rng(c["seed"])
    base = zeta.attention(q, k, v, topk=topk, gamma=gamma, mean_token=c["mean_token"], **kw)
    base_idx, _ = zeta.knn(q, k, topk, **kw)
    for p in sorted({s - n, s - n + int(rng.integers(0, n - 1)), s - 2}):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, p + 1 :] = torch.randn_like(k2[:, :, p + 1 :]) * 3
        v2[:, :, p + 1 :] = torch.randn_like(v2[:, :, p + 1 :]) * 3
        out = zeta.attention(q, k2, v2, topk=topk, gamma=gamma, mean_token=c["mean_token"], **kw)
        idx, _ = zeta.knn(q, k2, topk, **kw)
        upto = p - (s - n) + 1  # queries at positions <= p
        assert torch.equal(out[:, :, :upto], base[:, :, :upto]), p
        assert torch.equal(idx[:, :, :upto], base_idx[:, :, :upto]), p
        if p == s - n:  # many keys changed: the later outputs do see it (the test can fail)
            assert not torch.equal(out[:, :, upto:], base[:, :, upto:])
        assert int(idx[:, :, :upto].max()) <= p


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


EDGE = {
    "N1-S1": (dict(shape=(1, 1, 1, 1, 3)), dict(topk=1)),
    "sink>S": (dict(shape=(2, 1, 5, 5, 3)), dict(topk=5, n_sink=50, mean_token=True)),
    "chunk>S": (dict(shape=(2, 1, 9, 9, 3)), dict(topk=3, chunk=1000)),
    "window-huge": (dict(shape=(2, 1, 9, 9, 3)), dict(topk=3, window=10**9, exact=False)),
    "bits1": (dict(shape=(2, 1, 30, 30, 3)), dict(topk=3, bits=1, chunk=2, window=1, exact=False)),
    "noncausal-S<N": (
        dict(shape=(2, 1, 30, 10, 3)),
        dict(topk=3, causal=False, window=1, mean_token=True, exact=False),
    ),
    "dk8-9curves": (
        dict(shape=(2, 1, 30, 40, 8)),
        dict(topk=3, n_curves=9, chunk=2, window=1, exact=False),
    ),
    "equal-keys": (
        dict(shape=(2, 1, 30, 30, 3), zero_k=True),
        dict(topk=4, chunk=4, window=1, exact=False),
    ),
    "q==k-tiny-gamma": (dict(shape=(1, 1, 20, 20, 3), k_is_q=True), dict(topk=3, gamma=1e-6)),
    "scalar-tensor-gamma": (
        dict(shape=(2, 2, 12, 12, 3), tensor_gamma=True),
        dict(topk=3, chunk=4),
    ),
}


@pytest.mark.parametrize("name", list(EDGE))
def test_edge_cases_match_reference(name):
    spec, kw = EDGE[name]
    h, hkv, n, s, dk = spec["shape"]
    q, k, v = _r(1, h, n, dk, seed=1), _r(1, hkv, s, dk, seed=2), _r(1, hkv, s, 2, seed=3)
    if spec.get("zero_k"):
        k = torch.zeros_like(k)
    if spec.get("k_is_q"):
        k = q.clone()
    extra = [torch.tensor(0.7, dtype=torch.float64)] if spec.get("tensor_gamma") else []

    def run(backend):
        xs = leaf(q, k, v, *extra)

        def fn(qq, kk, vv, *g):
            return zeta.attention(
                qq, kk, vv, backend=backend, **({"gamma": g[0]} if g else {}), **kw
            )

        return grads_of(fn, xs)

    o_r, g_r = run("rust")
    o_t, g_t = run("torch")
    assert torch.isfinite(o_r).all()
    torch.testing.assert_close(o_r, o_t, rtol=1e-10, atol=1e-12)
    for a, b_ in zip(g_r, g_t):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# exactness with a window >= S: the dense oracle, exact_knn, numpy brute force
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,chunk,n_curves,n_sink,mean_token,heads,extra,dk",
    [
        (True, 4, 1, 0, False, (2, 2), 0, 3),
        (True, 1, 2, 3, True, (4, 2), 5, 3),
        (True, 16, 1, 0, True, (4, 1), 3, 1),
        (True, 64, 3, 3, False, (2, 1), 0, 2),
        (False, 4, 1, 0, True, (2, 2), 0, 3),
        (False, 8, 2, 3, False, (4, 2), 6, 8),
    ],
)
def test_full_window_is_exact(causal, chunk, n_curves, n_sink, mean_token, heads, extra, dk):
    h, hkv = heads
    n = 18
    s = n + extra
    topk = 6
    q, k, v = make_qkv(2, h, hkv, n, s, dk, 3, torch.float64, seed=dk + extra)
    gamma = torch.linspace(0.4, 1.2, h, dtype=torch.float64)
    kw = dict(causal=causal, chunk=chunk, window=s, n_curves=n_curves, n_sink=n_sink, exact=False)

    def ours(qq, kk, vv, gg):
        return zeta.attention(qq, kk, vv, topk=topk, gamma=gg, mean_token=mean_token, **kw)

    def dense(qq, kk, vv, gg):
        return T.dense_topk_attention(
            qq, kk, vv, topk=topk, gamma=gg, causal=causal, mean_token=mean_token
        )

    o1, g1 = grads_of(ours, leaf(q, k, v, gamma))
    o2, g2 = grads_of(dense, leaf(q, k, v, gamma))
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
    for a, b_, nm in zip(g1, g2, "qkvg"):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11, msg=f"grad {nm}")

    idx, d2 = zeta.knn(q, k, topk, **kw)
    ex_i, ex_d = zeta.exact_knn(q, k, topk, causal=causal)
    bf_i, bf_d = np_brute_knn(q.numpy(), k.numpy(), topk, causal)
    assert torch.equal(idx, ex_i)
    np.testing.assert_array_equal(idx.numpy(), bf_i)
    np.testing.assert_array_equal(d2.numpy(), bf_d)
    np.testing.assert_array_equal(ex_d.numpy(), bf_d)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_knn_ties_and_padding_match_brute_force(causal, dtype):
    """Integer-valued coordinates make many equal distances: ties must break by position.
    Causal queries early in the sequence have fewer than topk keys: -1 / +inf padding."""
    rng = np.random.default_rng(7)
    n, s, topk = 24, 24, 9
    q = rng.integers(-2, 3, size=(2, 2, n, 2)).astype(dtype)
    k = rng.integers(-2, 3, size=(2, 1, s, 2)).astype(dtype)
    idx, d2 = zeta.knn(q, k, topk, causal=causal, window=s, chunk=4, exact=False)
    ex_i, ex_d = zeta.exact_knn(q, k, topk, causal=causal)
    bf_i, bf_d = np_brute_knn(q, k, topk, causal)
    assert idx.dtype == np.int64 and d2.dtype == dtype
    np.testing.assert_array_equal(idx, bf_i)
    np.testing.assert_array_equal(d2, bf_d)
    np.testing.assert_array_equal(ex_i, bf_i)
    np.testing.assert_array_equal(ex_d, bf_d)
    di, dd = zeta.knn(q, k, topk, causal=causal, chunk=4)  # the default: exact search
    np.testing.assert_array_equal(di, bf_i)
    np.testing.assert_array_equal(dd, bf_d)
    if causal:
        assert (idx[:, :, 0, 1:] == -1).all() and np.isinf(d2[:, :, 0, 1:]).all()


# ---------------------------------------------------------------------------------------------
# gradcheck, GQA, opcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(mean_token=True),
        dict(n_sink=2, chunk=2),
        dict(n_curves=3, window=2, chunk=4, exact=False),
        dict(causal=False, mean_token=True, n_curves=2, window=1, n_sink=1, exact=False),
        dict(mean_token=True, n_sink=3, n_curves=4, chunk=1, window=3, exact=False),
    ],
    ids=["plain", "mean", "sink", "curves", "noncausal", "all"],
)
def test_gradcheck(kw):
    q, k, v = make_qkv(1, 2, 1, 6, 9, 3, 2, torch.float64, seed=11)
    gamma = torch.tensor([0.6, 1.3], dtype=torch.float64)
    ins = leaf(q, k, v, gamma)

    def fn(qq, kk, vv, gg):
        return zeta.attention(qq, kk, vv, topk=3, gamma=gg, backend="rust", **kw)

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("mean_token", [False, True])
def test_gqa_equals_repeated_kv(hkv, mean_token):
    h = 4
    q, k, v = make_qkv(2, h, hkv, 16, 20, 3, 5, torch.float64, seed=3)
    gamma = torch.tensor([0.5, 0.8, 1.1, 1.4], dtype=torch.float64)
    kw = dict(topk=6, chunk=4, window=3, n_curves=2, n_sink=1, mean_token=mean_token, exact=False)
    q1, k1, v1 = leaf(q, k, v)
    o1 = zeta.attention(q1, k1, v1, gamma=gamma, **kw)
    q2, k2, v2 = leaf(q, k, v)
    rep = h // hkv
    o2 = zeta.attention(
        q2, k2.repeat_interleave(rep, 1), v2.repeat_interleave(rep, 1), gamma=gamma, **kw
    )
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-13)
    w = torch.randn_like(o1)
    (o1 * w).sum().backward()
    (o2 * w).sum().backward()
    for a, b_ in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-10, atol=1e-12)
    i1, _ = zeta.knn(q, k, 6, chunk=4, window=3, n_curves=2, n_sink=1, exact=False)
    i2, _ = zeta.knn(
        q, k.repeat_interleave(rep, 1), 6, chunk=4, window=3, n_curves=2, n_sink=1, exact=False
    )
    assert torch.equal(i1, i2)


# opcheck's fake-tensor copy (torch/_subclasses/meta_utils.py) reads .grad of non-leaf
# tensors itself and warns about it; nothing of ours touches .grad.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_opcheck_attention_fwd():
    import zeta._torch_ops  # noqa: F401  (registers the ops)

    for dtype, mean_token, causal in ((torch.float64, True, True), (torch.float32, False, False)):
        q, k, v = make_qkv(1, 2, 1, 8, 10, 3, 4, dtype, seed=5)
        q, k, v = leaf(q, k, v)
        gamma = torch.tensor([0.7, 1.2], dtype=torch.float64, requires_grad=True)
        for exact in (False, True):
            args = (q, k, v, gamma, 3, mean_token, 4, 3, 2, 1, causal, 10, 1.0, exact)
            torch.library.opcheck(torch.ops.zeta.attention_fwd.default, args)


# ---------------------------------------------------------------------------------------------
# dtypes and container kinds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half,atol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs(half, atol):
    q, k, v = make_qkv(2, 2, 1, 16, 16, 3, 4, torch.float32, seed=9)
    qh, kh, vh = q.to(half), k.to(half), v.to(half)
    out = zeta.attention(qh, kh, vh, topk=5, gamma=0.8)
    assert out.dtype == half and out.shape == (2, 2, 16, 4)
    ref = zeta.attention(qh.float(), kh.float(), vh.float(), topk=5, gamma=0.8)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol)
    idx, d2 = zeta.knn(qh, kh, 5)
    assert idx.dtype == torch.int64 and d2.dtype == half
    # gradients flow back in the input dtype
    qg = qh.clone().requires_grad_(True)
    zeta.attention(qg, kh, vh, topk=5, gamma=0.8).sum().backward()
    assert qg.grad.dtype == half and torch.isfinite(qg.grad.float()).all()
    if half == torch.float16:  # numpy float16 too
        o_np = zeta.attention(qh.numpy(), kh.numpy(), vh.numpy(), topk=5, gamma=0.8)
        assert o_np.dtype == np.float16
        np.testing.assert_allclose(o_np.astype(np.float32), ref.numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mean_token,exact", [(False, False), (True, False), (False, True)])
def test_half_values_read_natively_equal_the_widened_values(half, mean_token, exact):
    """The core reads float16/bfloat16 values in their dtype (q, k widened to float32): the
    result is bit for bit that of widening v to float32 first, forward and gradients."""
    q, k, v = make_qkv(2, 4, 2, 40, 300, 3, 24, torch.float32, seed=21)
    qh, kh, vh = q.to(half), k.to(half), v.to(half)
    kw = dict(topk=7, gamma=torch.tensor([0.5, 0.8, 1.1, 1.4]), mean_token=mean_token, exact=exact)
    out = zeta.attention(qh, kh, vh, **kw)
    wide = zeta.attention(qh.float(), kh.float(), vh.float(), **kw).to(half)
    assert out.dtype == half and torch.equal(out, wide)
    if half == torch.float16:  # numpy float16: the same path
        o_np = zeta.attention(qh.numpy(), kh.numpy(), vh.numpy(), **kw)
        assert o_np.dtype == np.float16 and np.array_equal(o_np, wide.numpy())
    # gradients: v widened inside the backward, dv back in v's dtype
    grads = []
    for widen in (False, True):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (qh, kh, vh))
        if widen:
            o = zeta.attention(qg.float(), kg.float(), vg.float(), **kw).to(half)
        else:
            o = zeta.attention(qg, kg, vg, **kw)
        (o.float() * torch.linspace(-1, 1, o.shape[-1])).sum().backward()
        grads.append((qg.grad, kg.grad, vg.grad))
    for a, b in zip(*grads):
        assert a.dtype == half and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_opcheck_attention_fwd_half_values():
    import zeta._torch_ops  # noqa: F401  (registers the ops)

    q, k, v = make_qkv(1, 2, 1, 8, 10, 3, 4, torch.float32, seed=6)
    for half in (torch.float16, torch.bfloat16):
        vh = v.to(half)
        q1, k1, v1 = leaf(q, k, vh)
        gamma = torch.tensor([0.7, 1.2], dtype=torch.float64, requires_grad=True)
        args = (q1, k1, v1, gamma, 3, False, 4, 3, 2, 1, True, 10, 1.0, False)
        torch.library.opcheck(torch.ops.zeta.attention_fwd.default, args)


def test_half_values_bad_input():
    q, k, v = make_qkv(1, 2, 1, 8, 10, 3, 4, torch.float32, seed=7)
    vh = v.to(torch.bfloat16)
    vh[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="v: contains NaN or inf"):
        zeta.attention(q.bfloat16(), k.bfloat16(), vh, topk=3)
    from zeta import _core

    with pytest.raises(ValueError, match="v_dtype"):
        _core.attention_forward_half(
            q.numpy(),
            k.numpy(),
            v.half().numpy().view(np.uint16),
            "float8",
            np.ones(2),
            3,
            False,
            {
                "chunk": 4,
                "window": 3,
                "n_curves": 1,
                "n_sink": 0,
                "causal": True,
                "bits": 10,
                "scale": 1.0,
            },
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_kinds(dtype):
    q, k, v = make_qkv(1, 2, 2, 10, 10, 3, 4, torch.float64, seed=1)
    qn, kn, vn = (t.numpy().astype(dtype) for t in (q, k, v))
    o = zeta.attention(qn, kn, vn, topk=4)
    assert isinstance(o, np.ndarray) and o.dtype == dtype and o.shape == (1, 2, 10, 4)
    i, d = zeta.knn(qn, kn, 4)
    assert isinstance(i, np.ndarray) and i.dtype == np.int64 and d.dtype == dtype
    ei, ed = zeta.exact_knn(qn, kn, 4)
    assert isinstance(ei, np.ndarray) and ei.dtype == np.int64
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    qt, kt, vt = (torch.from_numpy(a) for a in (qn, kn, vn))
    ot = zeta.attention(qt, kt, vt, topk=4)
    assert torch.is_tensor(ot) and ot.dtype == tdt
    np.testing.assert_array_equal(ot.numpy(), o)
    it, dt = zeta.knn(qt, kt, 4)
    assert torch.is_tensor(it) and it.dtype == torch.int64 and dt.dtype == tdt
    np.testing.assert_array_equal(it.numpy(), i)
    # non-contiguous torch inputs give the same result
    qnc = qt.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qnc.is_contiguous()
    np.testing.assert_array_equal(zeta.attention(qnc, kt, vt, topk=4).numpy(), o)


@pytest.mark.parametrize("vdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_torch_forward_without_grad_equals_the_differentiable_one(vdtype):
    """With no backward to follow (grad off, or no input requiring it) the torch path skips
    the custom op's indices; the output is the differentiable call's, bit for bit, for every
    value dtype, and the grad path still differentiates."""
    q, k, v = make_qkv(1, 2, 2, 300, 300, 3, 16, torch.float32, seed=3)
    q, k, v = q.to(vdtype), k.to(vdtype), v.to(vdtype)
    kw = dict(topk=8, mean_token=True)
    with torch.no_grad():
        o_nograd = zeta.attention(q, k, v, **kw)
    o_plain = zeta.attention(q, k, v, **kw)  # grad on, nothing requires it
    qg = q.clone().requires_grad_()
    o_grad = zeta.attention(qg, k, v, **kw)  # the custom op, with its indices
    assert o_grad.requires_grad
    assert not o_nograd.requires_grad and not o_plain.requires_grad
    assert o_nograd.dtype == o_grad.dtype == vdtype
    assert torch.equal(o_nograd, o_grad.detach()) and torch.equal(o_plain, o_nograd)
    o_grad.float().sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


# ---------------------------------------------------------------------------------------------
# recall
# ---------------------------------------------------------------------------------------------


def test_recall_full_window_and_range():
    q, k, _ = make_qkv(2, 2, 1, 40, 40, 3, 1, torch.float64, seed=4)
    idx, _ = zeta.knn(q, k, 8, window=40, exact=False)
    assert zeta.recall(q, k, idx) == 1.0
    assert zeta.recall(q.numpy(), k.numpy(), idx.numpy()) == 1.0
    idx_nc, _ = zeta.knn(q, k, 8, window=40, causal=False, exact=False)
    assert zeta.recall(q, k, idx_nc, causal=False) == 1.0
    small, _ = zeta.knn(q, k, 8, window=1, chunk=16, exact=False)
    r = zeta.recall(q, k, small)
    assert 0.0 <= r <= 1.0
    bogus = torch.full_like(idx, -1)
    assert zeta.recall(q, k, bogus) == 0.0


def test_recall_equals_manual_count():
    rng = np.random.default_rng(0)
    b, h, n, s, topk = 1, 2, 10, 10, 3
    q = rng.standard_normal((b, h, n, 3))
    k = rng.standard_normal((b, 1, s, 3))
    ex, _ = np_brute_knn(q, k, topk, causal=True)
    # a guess: keep the exact neighbours of even queries, replace the rest with key 0
    guess = ex.copy()
    guess[:, :, 1::2, 1:] = -1
    guess[:, :, 1::2, 0] = 0
    hits = total = 0
    for hi in range(h):
        for i in range(n):
            real = {int(t) for t in ex[0, hi, i] if t >= 0}
            got = {int(t) for t in guess[0, hi, i] if t >= 0}
            hits += len(real & got)
            total += len(real)
    want = hits / total
    assert 0 < want < 1
    assert zeta.recall(q, k, guess) == pytest.approx(want, abs=1e-12)
    assert zeta.recall(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(guess)
    ) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


def test_backends_is_both_the_report_and_the_subpackage():
    """zeta.backends() reports; the reference module stays importable by its dotted path."""
    import importlib

    ref = importlib.import_module("zeta.backends.torch_ref")
    import zeta.backends.torch_ref as T2

    assert T2 is ref is T
    assert callable(zeta.backends) and zeta.backends.torch_ref is ref
    assert zeta.backends() == zeta.backends.report()


def test_backends_report_and_forcing():
    rep = zeta.backends()
    assert set(rep) >= {"rust", "torch", "cupy"}
    for name, info in rep.items():
        assert isinstance(info["available"], bool) and isinstance(info["reason"], str), name
        assert info["available"] == (info["reason"] == ""), name
    assert rep["rust"]["available"] and rep["torch"]["available"]
    assert not rep["cupy"]["available"] and rep["cupy"]["reason"]
    q, k, v = make_qkv(1, 1, 1, 6, 6, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="^backend") as e:
        zeta.attention(q, k, v, topk=2, backend="cupy")
    assert rep["cupy"]["reason"] in str(e.value)
    with pytest.raises(ValueError, match="^backend"):
        zeta.knn(q.numpy(), k.numpy(), 2, backend="cupy")
    with pytest.raises(ValueError, match="^backend"):
        zeta.attention(q, k, v, topk=2, backend="bogus")
    with pytest.raises(ValueError, match="^backend"):
        zeta.knn(q, k, 2, backend="bogus")


# ---------------------------------------------------------------------------------------------
# bad input: every error names the argument
# ---------------------------------------------------------------------------------------------


def _np_qkv(**kw):
    q, k, v = make_qkv(
        **{"b": 1, "h": 2, "hkv": 1, "n": 8, "s": 8, "dk": 3, "dv": 2, "dtype": torch.float32, **kw}
    )
    return q.numpy(), k.numpy(), v.numpy()


def _with(a, pos, val):
    a = a.copy() if isinstance(a, np.ndarray) else a.clone()
    a[pos] = val
    return a


def _bad_cases():
    q, k, v = _np_qkv()
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    A = zeta.attention
    cases = {
        "q-3d": (lambda: A(q[0], k, v, topk=2), ValueError, "q"),
        "k-3d": (lambda: A(q, k[0], v, topk=2), ValueError, "k"),
        "v-3d": (lambda: A(q, k, v[0], topk=2), ValueError, "v"),
        "k-batch": (
            lambda: A(q, np.concatenate([k, k]), np.concatenate([v, v]), topk=2),
            ValueError,
            "k",
        ),
        "k-dim": (lambda: A(q, k[..., :2].copy(), v, topk=2), ValueError, "k"),
        "v-len": (lambda: A(q, k, v[:, :, :5].copy(), topk=2), ValueError, "v"),
        "gqa": (
            lambda: A(
                np.concatenate([q, q[:, :1]], 1),
                np.concatenate([k, k], 1),
                np.concatenate([v, v], 1),
                topk=2,
            ),
            ValueError,
            "k",
        ),
        "topk0": (lambda: A(q, k, v, topk=0), ValueError, "topk"),
        "topk-neg": (lambda: zeta.knn(q, k, -1), ValueError, "topk"),
        "topk-float": (lambda: A(q, k, v, topk=2.0), TypeError, "topk"),
        "chunk0": (lambda: A(q, k, v, topk=2, chunk=0), ValueError, "chunk"),
        "window0": (lambda: A(q, k, v, topk=2, window=0), ValueError, "window"),
        "knn-window0": (lambda: zeta.knn(q, k, 2, window=0), ValueError, "window"),
        "nan-q": (lambda: A(_with(q, (0, 0, 0, 0), np.nan), k, v, topk=2), ValueError, "q"),
        "inf-k": (lambda: A(q, _with(k, (0, 0, 3, 1), np.inf), v, topk=2), ValueError, "k"),
        "nan-v": (lambda: A(q, k, _with(v, (0, 0, 7, 1), np.nan), topk=2), ValueError, "v"),
        "knn-nan-q": (lambda: zeta.knn(_with(q, (0, 1, 2, 2), np.nan), k, 2), ValueError, "q"),
        "knn-inf-k": (lambda: zeta.knn(q, _with(k, (0, 0, 0, 0), -np.inf), 2), ValueError, "k"),
        "t-nan-q": (
            lambda: A(_with(tq, (0, 0, 0, 0), float("nan")), tk, tv, topk=2),
            ValueError,
            "q",
        ),
        "t-inf-k": (
            lambda: A(tq, _with(tk, (0, 0, 3, 1), float("inf")), tv, topk=2),
            ValueError,
            "k",
        ),
        "t-nan-v": (
            lambda: A(tq, tk, _with(tv, (0, 0, 7, 1), float("nan")), topk=2),
            ValueError,
            "v",
        ),
        "t-nan-q-torchbe": (
            lambda: A(_with(tq, (0, 0, 0, 0), float("nan")), tk, tv, topk=2, backend="torch"),
            ValueError,
            "q",
        ),
        "t-knn-nan-k": (
            lambda: zeta.knn(tq, _with(tk, (0, 0, 1, 1), float("nan")), 2),
            ValueError,
            "k",
        ),
        "gamma0": (lambda: A(q, k, v, topk=2, gamma=0.0), ValueError, "gamma"),
        "gamma-neg": (lambda: A(q, k, v, topk=2, gamma=-1.0), ValueError, "gamma"),
        "gamma-nan": (lambda: A(q, k, v, topk=2, gamma=float("nan")), ValueError, "gamma"),
        "gamma-shape": (lambda: A(q, k, v, topk=2, gamma=np.ones(3)), ValueError, "gamma"),
        "t-gamma0": (lambda: A(tq, tk, tv, topk=2, gamma=0.0), ValueError, "gamma"),
        "t-gamma-tensor-neg": (
            lambda: A(tq, tk, tv, topk=2, gamma=torch.tensor([1.0, -1.0])),
            ValueError,
            "gamma",
        ),
        "t-gamma-tensor-nan": (
            lambda: A(tq, tk, tv, topk=2, gamma=torch.tensor([1.0, float("nan")])),
            ValueError,
            "gamma",
        ),
        "t-gamma-tensor-shape": (
            lambda: A(tq, tk, tv, topk=2, gamma=torch.ones(3)),
            ValueError,
            "gamma",
        ),
        "t-gamma-tensor-neg-torchbe": (
            lambda: A(tq, tk, tv, topk=2, gamma=torch.tensor([1.0, 0.0]), backend="torch"),
            ValueError,
            "gamma",
        ),
        "dk9": (lambda: A(*_np_qkv(dk=9), topk=2), ValueError, "q"),
        "dk0": (lambda: A(*_np_qkv(dk=0), topk=2), ValueError, "q"),
        "knn-dk9": (lambda: zeta.knn(*_np_qkv(dk=9)[:2], 2), ValueError, "q"),
        "t-dk9": (
            lambda: A(*(torch.from_numpy(a) for a in _np_qkv(dk=9)), topk=2),
            ValueError,
            "q",
        ),
        "mixed-kinds": (lambda: A(q, tk, v, topk=2), TypeError, "q"),
        "mixed-kinds-knn": (lambda: zeta.knn(tq, k, 2), TypeError, "q"),
        "mixed-dtypes": (lambda: A(q, k.astype(np.float64), v, topk=2), TypeError, "k"),
        "mixed-dtypes-t": (lambda: A(tq, tk, tv.double(), topk=2), TypeError, "v"),
        "int-dtype": (
            lambda: A(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32), topk=2),
            TypeError,
            "q",
        ),
        "S0": (
            lambda: A(q, k[:, :, :0].copy(), v[:, :, :0].copy(), topk=1, causal=False),
            ValueError,
            "k",
        ),
        "kv-heads0": (lambda: A(q, k[:, :0].copy(), v[:, :0].copy(), topk=2), ValueError, "k"),
        "t-S0": (
            lambda: A(tq, tk[:, :, :0], tv[:, :, :0], topk=1, causal=False, backend="torch"),
            ValueError,
            "k",
        ),
        "empty-bad-chunk": (lambda: A(q[:, :, :0], k, v, topk=2, chunk=0), ValueError, "chunk"),
        "empty-bad-gamma": (lambda: A(q[:0], k[:0], v[:0], gamma=np.ones(3)), ValueError, "gamma"),
        "causal-S<N": (
            lambda: A(q, k[:, :, :5].copy(), v[:, :, :5].copy(), topk=2),
            ValueError,
            "k",
        ),
        "knn-causal-S<N": (lambda: zeta.knn(q, k[:, :, :5].copy(), 2), ValueError, "k"),
        "curves>dk+1": (lambda: A(q, k, v, topk=2, n_curves=5), ValueError, "n_curves"),
        "curves0": (lambda: A(q, k, v, topk=2, n_curves=0), ValueError, "n_curves"),
        "knn-curves": (lambda: zeta.knn(q, k, 2, n_curves=5), ValueError, "n_curves"),
        "n_sink-neg": (lambda: A(q, k, v, topk=2, n_sink=-1), ValueError, "n_sink"),
        "bits-big": (lambda: A(q, k, v, topk=2, bits=11), ValueError, "bits"),
        "bits0": (lambda: zeta.knn(q, k, 2, bits=0), ValueError, "bits"),
        "scale0": (lambda: A(q, k, v, topk=2, scale=0.0), ValueError, "scale"),
        "causal-str": (lambda: A(q, k, v, topk=2, causal="yes"), TypeError, "causal"),
        "mean-str": (lambda: A(q, k, v, topk=2, mean_token="yes"), TypeError, "mean_token"),
        "q-list": (lambda: A(q.tolist(), k, v, topk=2), TypeError, "q"),
        "k-str": (lambda: A(q, "k", v, topk=2), TypeError, "k"),
        "v-none": (lambda: A(q, k, None, topk=2), TypeError, "v"),
        "knn-list": (lambda: zeta.knn(q, k.tolist(), 2), TypeError, "k"),
        "meta": (lambda: A(*(t.to("meta") for t in (tq, tk, tv)), topk=2), ValueError, "q"),
        "knn-meta": (lambda: zeta.knn(tq.to("meta"), tk.to("meta"), 2), ValueError, "q"),
        "exact-nan": (
            lambda: zeta.exact_knn(_with(q, (0, 0, 1, 1), np.nan), k, 2),
            ValueError,
            "q",
        ),
        "exact-topk0": (lambda: zeta.exact_knn(q, k, 0), ValueError, "topk"),
        "recall-shape": (
            lambda: zeta.recall(q, k, np.zeros((1, 2, 8), np.int64)),
            ValueError,
            "indices",
        ),
        "recall-float": (lambda: zeta.recall(q, k, np.zeros((1, 2, 8, 2))), TypeError, "indices"),
        "recall-big": (lambda: zeta.recall(q, k, np.full((1, 2, 8, 2), 8)), ValueError, "indices"),
    }
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_argument(name):
    fn, exc, arg = BAD[name]
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert msg.startswith(arg + ":") or msg.startswith(arg + ","), msg


def test_valid_edge_cases_are_accepted():
    """Things that look odd but are allowed: non-causal S < N, topk == S, dk 1 and 8."""
    q, k, v = _np_qkv(n=8, s=5)
    out = zeta.attention(q, k, v, topk=5, causal=False)
    assert out.shape == (1, 2, 8, 2) and np.isfinite(out).all()
    q, k, v = _np_qkv(dk=8)
    assert zeta.attention(q, k, v, topk=8).shape == (1, 2, 8, 2)
    q, k, v = _np_qkv(dk=1)
    assert zeta.attention(q, k, v, topk=1, n_curves=2).shape == (1, 2, 8, 2)


# ---------------------------------------------------------------------------------------------
# fewer keys than topk, and empty inputs: ordinary input, the same answer on every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s", [1, 10])
def test_topk_larger_than_s_attends_to_the_keys_there_are(backend, causal, s):
    """A one-token prefill or a 10-token sequence with the default topk=32, as a user calls it:
    the output is exact top-S (= dense) attention, and knn pads the extra slots."""
    n = 1 if s == 1 else 7
    q, k, v = make_qkv(2, 4, 2, n, s, 3, 5, torch.float64, seed=s)
    gamma = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
    kw = dict(causal=causal, backend=backend)
    o1, g1 = grads_of(lambda *a: zeta.attention(*a[:3], gamma=a[3], **kw), leaf(q, k, v, gamma))
    dense = lambda *a: T.dense_topk_attention(*a[:3], topk=s, gamma=a[3], causal=causal)  # noqa: E731
    o2, g2 = grads_of(dense, leaf(q, k, v, gamma))
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
    for a, b_, nm in zip(g1, g2, "qkvg"):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11, msg=f"grad {nm}")
    on = zeta.attention(q.numpy(), k.numpy(), v.numpy(), topk=32, gamma=gamma.numpy(), **kw)
    np.testing.assert_allclose(on, o2.numpy(), rtol=1e-10, atol=1e-12)

    idx, d2 = zeta.knn(q.numpy(), k.numpy(), 32, causal=causal, backend=backend)
    bf_i, bf_d = np_brute_knn(q.numpy(), k.numpy(), 32, causal)
    assert idx.shape == (2, 4, n, 32) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, bf_i)
    np.testing.assert_array_equal(d2, bf_d)
    assert (idx[..., s:] == -1).all() and np.isinf(d2[..., s:]).all()
    ex_i, _ = zeta.exact_knn(q.numpy(), k.numpy(), 32, causal=causal)
    np.testing.assert_array_equal(ex_i, bf_i)


def test_layer_cache_and_function_agree_on_a_short_prompt():
    """The three surfaces take a 3-token prompt with topk=32 and give one answer."""
    q, k, v = make_qkv(1, 2, 2, 3, 3, 3, 4, torch.float32, seed=5)
    ref = T.dense_topk_attention(q, k, v, topk=3, gamma=1.0)
    out = zeta.attention(q, k, v, topk=32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    cache = zeta.KVCache(2, 3, 4)
    cache.extend(k, v)
    torch.testing.assert_close(cache.attend(q, topk=32), ref, rtol=1e-5, atol=1e-6)


def _empty_cases():
    q, k, v = _np_qkv(b=2, h=4, hkv=2, n=6, s=6, dv=5)
    return {
        # name: (q, k, v, causal, expected output shape: SDPA's (B, H, N, d_v))
        "N0": (q[:, :, :0], k, v, True, (2, 4, 0, 5)),
        "N0-noncausal": (q[:, :, :0], k, v, False, (2, 4, 0, 5)),
        "B0": (q[:0], k[:0], v[:0], True, (0, 4, 6, 5)),
        "H0": (q[:, :0], k, v, True, (2, 0, 6, 5)),
        "H0-Hkv0": (q[:, :0], k[:, :0], v[:, :0], True, (2, 0, 6, 5)),
        "dv0": (q, k, v[..., :0], True, (2, 4, 6, 0)),
        "S0-N0": (q[:, :, :0], k[:, :, :0], v[:, :, :0], True, (2, 4, 0, 5)),
    }


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(_empty_cases()))
def test_empty_inputs_give_empty_outputs(name, kind, backend):
    q, k, v, causal, shape = _empty_cases()[name]
    knn_shape = shape[:3] + (3,)
    if kind == "torch":
        q, k, v = leaf(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v)))
    out = zeta.attention(q, k, v, topk=3, causal=causal, backend=backend)
    assert tuple(out.shape) == shape and out.dtype == q.dtype and type(out) is type(q)
    idx, d2 = zeta.knn(q, k, 3, causal=causal, backend=backend)
    assert tuple(idx.shape) == knn_shape and tuple(d2.shape) == knn_shape
    assert d2.dtype == q.dtype and str(idx.dtype).endswith("int64")
    if kind == "torch":  # part of the graph: backward runs and gives zero gradients
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_knn_with_no_keys_has_only_missing_slots(backend):
    q, k, _ = _np_qkv(n=4, s=4)
    idx, d2 = zeta.knn(q, k[:, :, :0], 3, causal=False, backend=backend)
    assert idx.shape == (1, 2, 4, 3) and (idx == -1).all() and np.isinf(d2).all()
    idx, d2 = zeta.exact_knn(q, k[:, :, :0], 3, causal=False)
    assert idx.shape == (1, 2, 4, 3) and (idx == -1).all() and np.isinf(d2).all()


@pytest.mark.parametrize("fn", [zeta.knn, zeta.exact_knn], ids=["knn", "exact_knn"])
def test_knn_topk_beyond_any_memory_names_topk(fn):
    """knn returns topk slots per query: a topk no buffer holds is refused naming topk (it
    used to reach the core as an OverflowError, or numpy's unnamed 'array is too big')."""
    q, k, _ = _np_qkv(n=4, s=4)
    for topk in (2**64, 2**63, 2**62, 2**59 + 1):
        with pytest.raises(ValueError, match="^topk"):
            fn(q, k, topk, causal=False)
        # no queries: still no int64 axis that long (numpy's unnamed 'array is too big')
        with pytest.raises(ValueError, match="^topk"):
            fn(q[:, :, :0], k, topk, causal=False)
    with pytest.raises(MemoryError, match="^topk"):
        fn(q, k[:, :, :0], 2**58, causal=False)
    # attention attends to the keys there are: a huge topk is fine there
    v = np.ones(k.shape[:3] + (2,), np.float32)
    assert zeta.attention(q, k, v, topk=2**64, causal=False).shape == q.shape[:3] + (2,)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("vdtype", ["float32", "float64", "float16", "bfloat16"])
def test_forward_without_indices_gives_the_same_output(vdtype, exact):
    """indices=False (numpy inputs: no backward follows) skips the (B, H, N, topk) array:
    the output is the same bits, the indices None."""
    from zeta import _core

    rng = np.random.default_rng(3)
    dt = np.float64 if vdtype == "float64" else np.float32
    q = rng.standard_normal((2, 4, 50, 3)).astype(dt)
    k = rng.standard_normal((2, 2, 70, 3)).astype(dt)
    v = rng.standard_normal((2, 2, 70, 5)).astype(dt)
    p = {"chunk": 4, "window": 3, "n_curves": 2, "n_sink": 1, "causal": True, "bits": 10}
    p.update(scale=1.0, exact=exact)
    gamma = np.array([0.5, 1.0, 1.5, 2.0])
    if vdtype in ("float16", "bfloat16"):
        vb = torch.from_numpy(v).to(getattr(torch, vdtype)).view(torch.int16).numpy()
        vb = vb.view(np.uint16)
        full = _core.attention_forward_half(q, k, vb, vdtype, gamma, 6, True, p)
        bare = _core.attention_forward_half(q, k, vb, vdtype, gamma, 6, True, p, indices=False)
    else:
        full = _core.attention_forward(q, k, v, gamma, 6, True, p)
        bare = _core.attention_forward(q, k, v, gamma, 6, True, p, indices=False)
    assert full[1].shape == (2, 4, 50, 6) and bare[1] is None
    np.testing.assert_array_equal(bare[0], full[0])
