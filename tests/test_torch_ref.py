"""Tests of the torch reference implementation (zeta.backends.torch_ref), the oracle of all
fast paths. The slow pure-Python versions below pin the semantics independently."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("zeta.backends.torch_ref")

# ---------------------------------------------------------------------------------------------
# Pure-Python versions of quantize / Morton / candidate sets (one query at a time, Python ints)
# ---------------------------------------------------------------------------------------------


def py_quantize(x: float, bits: int, shift: int, d: int, scale: float = 1.0) -> int:
    y = x / scale
    u = 0.5 + 0.5 * y / (1.0 + abs(y))
    half = 1 << (bits - 1)
    g = min(math.floor(u * half), half - 1)
    m = d + 1 if (d + 1) % 2 == 1 else d + 2  # odd shift denominator, as in quantize.rs
    return g + (shift * half) // m


def py_morton(coords, bits: int) -> int:
    d = len(coords)
    code = 0
    for b in range(bits):
        for j, c in enumerate(coords):
            code |= ((c >> b) & 1) << (b * d + j)
    return code


def py_code(point, bits, shift, scale=1.0) -> int:
    return py_morton([py_quantize(float(x), bits, shift, len(point), scale) for x in point], bits)


def py_candidates(q, k, *, causal, chunk, window, n_curves, n_sink, bits, scale=1.0):
    """Rules 4-6 literally. q: list of N points, k: list of S points. Returns list of sets."""
    N, S = len(q), len(k)
    out = []
    for i in range(N):
        p = S - N + i
        cand = set()
        for curve in range(n_curves):
            kc = [py_code(pt, bits, curve, scale) for pt in k]
            qc = py_code(q[i], bits, curve, scale)
            runs = []
            if causal:
                c = p // chunk
                start = 0
                for level in reversed(range(c.bit_length())):
                    if (c >> level) & 1:
                        runs.append(range(start * chunk, (start + 2**level) * chunk))
                        start += 2**level
            else:
                runs.append(range(S))
            for run in runs:
                ordered = sorted(run, key=lambda t: (kc[t], t))
                s = sum(1 for t in run if kc[t] < qc)
                cand |= set(ordered[max(0, s - window) : min(len(ordered), s + window)])
        if causal:
            c = p // chunk
            cand |= set(range(c * chunk, p + 1))
            cand |= set(range(min(n_sink, p + 1)))
        else:
            cand |= set(range(min(n_sink, S)))
        out.append(cand)
    return out


def u64(t: torch.Tensor):
    """int64 tensor -> list of Python ints read as uint64."""
    return [int(x) % (1 << 64) for x in t.reshape(-1).tolist()]


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


# ---------------------------------------------------------------------------------------------
# quantize / zorder
# ---------------------------------------------------------------------------------------------


SPECIAL = [
    0.0,
    -0.0,
    1e-300,
    -1e-300,
    0.5,
    -0.5,
    1.0,
    -1.0,
    3.0,
    1e8,
    -1e8,
    1e30,
    -1e30,
    1e300,
    -1e300,
]


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8])
def test_zorder_matches_python_bit_loop(d):
    rng = random.Random(d)
    pts = [[rng.gauss(0, 2) for _ in range(d)] for _ in range(40)]
    pts += [[SPECIAL[(i + j) % len(SPECIAL)] for j in range(d)] for i in range(len(SPECIAL))]
    x = torch.tensor(pts, dtype=torch.float64)
    for bits in sorted({1, 2, 5, 32 // d, T.default_bits(d), 64 // d}):
        for shift in sorted({0, 1, d}):
            for scale in (1.0, 0.3):
                got = u64(T.zorder(x, bits, shift=shift, scale=scale))
                want = [py_code(pt, bits, shift, scale) for pt in pts]
                assert got == want, (d, bits, shift, scale)
                # every shifted copy still fits `bits` bits per coordinate
                assert all(c < (1 << (d * bits)) for c in got)


def test_quantize_float32_input_is_computed_in_float64():
    x32 = torch.tensor([[0.1, -0.7, 2.5]], dtype=torch.float32)
    x64 = x32.to(torch.float64)
    assert torch.equal(T.quantize(x32, 10, 1), T.quantize(x64, 10, 1))
    want = [py_quantize(float(v), 10, 1, 3) for v in x64[0].tolist()]
    assert T.quantize(x32, 10, 1)[0].tolist() == want


def test_zorder_matches_pymorton():
    pymorton = pytest.importorskip("pymorton")
    # pymorton.interleave3(x, y, z) puts bit b of x at 3b, of y at 3b+1, of z at 3b+2, i.e. its
    # first argument is our coordinate 0 (the lowest bit of each triple): zorder(p) ==
    # interleave3(g[0], g[1], g[2]). pymorton keeps only 10 bits per coordinate.
    assert pymorton.interleave3(1, 0, 0) == 1 and pymorton.interleave3(0, 1, 0) == 2
    assert pymorton.interleave3(0, 0, 1) == 4 and pymorton.interleave3(2, 0, 0) == 8
    x = rand(300, 3, seed=3, scale=2.0)
    for bits in (1, 4, 10):
        for shift in range(4):
            g = T.quantize(x, bits, shift).tolist()
            want = [pymorton.interleave3(*c) for c in g]
            assert T.zorder(x, bits, shift).tolist() == want
            assert T.morton_encode(torch.tensor(g), bits).tolist() == want


def test_quantize_monotone_and_validation():
    x = torch.linspace(-50, 50, 2001, dtype=torch.float64)[:, None]
    g = T.quantize(x, 8)[:, 0]
    assert bool((g[1:] >= g[:-1]).all()) and int(g.min()) >= 0 and int(g.max()) <= 127
    with pytest.raises(ValueError, match="bits"):
        T.zorder(rand(4, 3), 22)
    with pytest.raises(ValueError, match="shift"):
        T.zorder(rand(4, 3), 8, shift=4)
    with pytest.raises(ValueError, match="scale"):
        T.zorder(rand(4, 3), 8, scale=0.0)
    with pytest.raises(ValueError, match="x"):
        T.zorder(torch.tensor([[float("nan"), 0.0, 0.0]]), 8)


# ---------------------------------------------------------------------------------------------
# candidate sets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,N,S,chunk,window,n_curves,n_sink,bits",
    [
        (True, 50, 50, 4, 2, 2, None, None),
        (
            True,
            50,
            50,
            4,
            2,
            2,
            3,
            3,
        ),  # 3 bits/coord: many equal codes, (code, position) order matters
        (True, 23, 61, 3, 1, 4, 0, 2),
        (True, 40, 40, 1, 3, 1, 5, 4),
        (False, 30, 45, 4, 2, 2, 2, None),
        (False, 50, 20, 4, 3, 3, 0, 2),  # non-causal allows N > S
        (False, 12, 14, 4, 1, 1, 20, None),  # n_sink > S: every key
        (True, 12, 14, 4, 1, 1, 20, None),
    ],
)
def test_candidates_match_slow_python(causal, N, S, chunk, window, n_curves, n_sink, bits):
    n_sink = n_sink or 0
    q = rand(1, 2, N, 3, seed=1)
    k = rand(1, 1, S, 3, seed=2)  # GQA: both query heads read kv head 0
    mask = T.candidates(
        q, k, causal=causal, chunk=chunk, window=window, n_curves=n_curves, n_sink=n_sink, bits=bits
    )
    assert mask.shape == (1, 2, N, S) and mask.dtype == torch.bool
    b = 32 // 3 if bits is None else bits
    for h in range(2):
        want = py_candidates(
            q[0, h].tolist(),
            k[0, 0].tolist(),
            causal=causal,
            chunk=chunk,
            window=window,
            n_curves=n_curves,
            n_sink=n_sink,
            bits=b,
        )
        got = [set(torch.nonzero(mask[0, h, i]).flatten().tolist()) for i in range(N)]
        assert got == want
    # the list form holds the same sets, distinct and ascending (with -1 = empty slots)
    lists = T.candidate_lists(
        q, k, causal=causal, chunk=chunk, window=window, n_curves=n_curves, n_sink=n_sink, bits=bits
    )
    for row, m in zip(lists.reshape(-1, lists.shape[-1]).tolist(), mask.reshape(-1, S)):
        real = [t for t in row if t >= 0]
        assert real == sorted(set(real)) and all(t >= -1 for t in row)
        assert real == torch.nonzero(m).flatten().tolist()


def test_candidates_bits_are_limited_to_the_32_bit_index():
    q, k = rand(1, 1, 8, 5), rand(1, 1, 8, 5)
    T.knn(q, k, 2, bits=6)  # 5 * 6 = 30 bits: fine; default is 32 // 5 = 6
    T.knn(q, k, 2)
    for exact in (True, False):
        with pytest.raises(ValueError, match="bits"):
            T.knn(q, k, 2, bits=7, exact=exact)
        with pytest.raises(ValueError, match="n_curves"):
            T.knn(q, k, 2, n_curves=7, exact=exact)


# ---------------------------------------------------------------------------------------------
# knn / attention against the dense oracle
# ---------------------------------------------------------------------------------------------


def dense_knn_by_sort(q, k, topk, causal):
    """(d2, position) top-k of every query by a stable sort of its whole row (tiny inputs)."""
    B, H, N, _ = q.shape
    S = k.shape[2]
    kh = k.repeat_interleave(H // k.shape[1], dim=1)
    d2 = T.sq_dist(q, kh)
    pos = torch.arange(S)
    vis = pos[None, :] <= (pos[-N:] if causal else torch.full((N,), S))[:, None]
    d2 = torch.where(vis, d2, torch.inf)
    srt, order = torch.sort(d2, dim=-1, stable=True)
    srt, order = srt[..., :topk], order[..., :topk]
    order = torch.where(torch.isinf(srt), -1, order)
    if topk > S:
        pad = topk - S
        order = torch.cat([order, order.new_full((B, H, N, pad), -1)], -1)
        srt = torch.cat([srt, srt.new_full((B, H, N, pad), torch.inf)], -1)
    return order, srt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_knn_full_window_is_exact(dtype, causal):
    q, k = rand(2, 4, 37, 3, dtype=dtype, seed=5), rand(2, 2, 41, 3, dtype=dtype, seed=6)
    for topk in (1, 7, 50):
        idx, d2 = T.knn(q, k, topk, causal=causal, chunk=4, window=41, n_curves=2, exact=False)
        e_idx, e_d2 = T.exact_knn(q, k, topk, causal=causal, block_elems=3000)  # several blocks
        s_idx, s_d2 = dense_knn_by_sort(q, k, topk, causal)
        assert idx.shape == (2, 4, 37, topk) and d2.dtype == dtype
        assert torch.equal(idx, e_idx) and torch.equal(d2, e_d2)
        assert torch.equal(idx, s_idx) and torch.equal(d2, s_d2)


def test_ties_are_broken_by_position():
    # integer coordinates: many equal distances
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-2, 3, (1, 2, 30, 3), generator=g).double()
    k = torch.randint(-2, 3, (1, 1, 30, 3), generator=g).double()
    for causal in (True, False):
        s_idx, s_d2 = dense_knn_by_sort(q, k, 6, causal)
        e_idx, e_d2 = T.exact_knn(q, k, 6, causal=causal, block_elems=100)
        f_idx, f_d2 = T.knn(q, k, 6, causal=causal, chunk=2, window=30, exact=False)
        assert torch.equal(e_idx, s_idx) and torch.equal(e_d2, s_d2)
        assert torch.equal(f_idx, s_idx) and torch.equal(f_d2, s_d2)


def test_padding_when_fewer_candidates_than_topk():
    q, k = rand(1, 1, 5, 3), rand(1, 1, 5, 3, seed=1)
    idx, d2 = T.knn(q, k, 8, chunk=2, window=1, exact=False)
    e_idx, e_d2 = T.exact_knn(q, k, 8)
    for i in range(5):  # query i sees i + 1 keys
        assert (idx[0, 0, i] >= 0).sum() <= i + 1
        assert e_idx[0, 0, i, : i + 1].sort().values.tolist() == list(range(i + 1))
        assert e_idx[0, 0, i, i + 1 :].eq(-1).all() and torch.isinf(e_d2[0, 0, i, i + 1 :]).all()
        assert torch.isinf(d2[0, 0, i][idx[0, 0, i] < 0]).all()
    assert idx[0, 0, 0].tolist() == [0] + [-1] * 7


CASES = [
    dict(causal=True, n_sink=0, mean_token=False, hkv=4, gamma="float"),
    dict(causal=True, n_sink=3, mean_token=True, hkv=2, gamma="tensor"),
    dict(causal=True, n_sink=0, mean_token=True, hkv=1, gamma="float"),
    dict(causal=False, n_sink=2, mean_token=True, hkv=2, gamma="tensor"),
    dict(causal=False, n_sink=0, mean_token=False, hkv=1, gamma="float"),
]


@pytest.mark.parametrize("case", CASES)
def test_attention_full_window_equals_dense(case):
    B, H, N, S, dk, dv, topk = 2, 4, 13, 19, 3, 5, 6
    q = rand(B, H, N, dk, seed=11).requires_grad_()
    k = rand(B, case["hkv"], S, dk, seed=12).requires_grad_()
    v = rand(B, case["hkv"], S, dv, seed=13).requires_grad_()
    gamma = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    gam = gamma if case["gamma"] == "tensor" else 0.7
    kw = dict(causal=case["causal"], mean_token=case["mean_token"])
    out = T.attention(
        q,
        k,
        v,
        topk=topk,
        gamma=gam,
        chunk=4,
        window=S,
        n_curves=2,
        n_sink=case["n_sink"],
        exact=False,
        **kw,
    )
    ref = T.dense_topk_attention(q, k, v, topk=topk, gamma=gam, **kw)
    assert out.shape == (B, H, N, dv)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = rand(B, H, N, dv, seed=14)
    inputs = [q, k, v] + ([gamma] if case["gamma"] == "tensor" else [])
    g_out = torch.autograd.grad((out * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dense_oracle_against_explicit_loop():
    """The oracle itself, against a per-query loop (tiny)."""
    q, k, v = rand(1, 2, 6, 3, seed=1), rand(1, 1, 9, 3, seed=2), rand(1, 1, 9, 2, seed=3)
    gamma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = T.dense_topk_attention(q, k, v, topk=3, gamma=gamma, causal=True, mean_token=True)
    for h in range(2):
        for i in range(6):
            p = 9 - 6 + i
            d2 = ((q[0, h, i] - k[0, 0, : p + 1]) ** 2).sum(-1)
            top = sorted(range(p + 1), key=lambda t: (float(d2[t]), t))[:3]
            s = [1 / (float(d2[t]) + float(gamma[h]) ** 2) for t in top]
            kbar, vbar = k[0, 0, : p + 1].mean(0), v[0, 0, : p + 1].mean(0)
            sm = 1 / (float(((q[0, h, i] - kbar) ** 2).sum()) + float(gamma[h]) ** 2)
            want = (sum(si * v[0, 0, t] for si, t in zip(s, top)) + sm * vbar) / (sum(s) + sm)
            torch.testing.assert_close(out[0, h, i], want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# structural properties
# ---------------------------------------------------------------------------------------------


def test_causality():
    B, H, N, S, dk, dv = 1, 2, 40, 48, 3, 4
    q, k, v = rand(B, H, N, dk, seed=1), rand(B, 1, S, dk, seed=2), rand(B, 1, S, dv, seed=3)
    options = [
        dict(chunk=4, window=2, n_curves=1, n_sink=0, mean_token=False, exact=False),
        dict(
            chunk=3,
            window=1,
            n_curves=4,
            n_sink=3,
            mean_token=True,
            gamma=torch.tensor([0.5, 1.5], dtype=torch.float64),
            exact=False,
        ),
        dict(chunk=1, window=3, n_curves=2, n_sink=1, mean_token=True, bits=2, exact=False),
    ]
    for opt in options:
        out = T.attention(q, k, v, topk=5, **opt)
        idx, _ = T.knn(
            q, k, 5, **{a: b for a, b in opt.items() if a not in ("mean_token", "gamma")}
        )
        for cut in (8, 20, 31, 46):  # keep positions 0..cut, scramble the rest
            k2, v2 = k.clone(), v.clone()
            k2[:, :, cut + 1 :] = rand(B, 1, S - cut - 1, dk, seed=cut) * 3
            v2[:, :, cut + 1 :] = rand(B, 1, S - cut - 1, dv, seed=cut + 1) * 3
            out2 = T.attention(q, k2, v2, topk=5, **opt)
            rows = cut - (S - N) + 1  # queries at positions <= cut
            assert torch.equal(out[:, :, :rows], out2[:, :, :rows])
            if opt["mean_token"]:  # the mean token sees the scrambled keys: later rows change
                assert not torch.equal(out[:, :, rows:], out2[:, :, rows:])
        pos = torch.arange(S - N, S)[:, None]
        assert bool((idx <= pos).all())


def test_gqa_equals_repeated_kv():
    B, H, Hkv, N, S = 2, 6, 2, 20, 24
    q, k, v = rand(B, H, N, 3, seed=1), rand(B, Hkv, S, 3, seed=2), rand(B, Hkv, S, 4, seed=3)
    gamma = torch.linspace(0.5, 2.0, H, dtype=torch.float64)
    kw = dict(
        topk=4, gamma=gamma, chunk=4, window=2, n_curves=2, n_sink=1, mean_token=True, exact=False
    )
    kr, vr = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    assert torch.equal(T.attention(q, k, v, **kw), T.attention(q, kr, vr, **kw))
    w = dict(chunk=4, window=2, exact=False)
    assert torch.equal(T.knn(q, k, 4, **w)[0], T.knn(q, kr, 4, **w)[0])
    # and query head h really reads kv head h // 3
    single = T.attention(q[:, 4:5], k[:, 1:2], v[:, 1:2], **{**kw, "gamma": gamma[4:5]})
    assert torch.equal(T.attention(q, k, v, **kw)[:, 4:5], single)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(causal):
    q = rand(1, 2, 4, 3, seed=1).requires_grad_()
    k = rand(1, 1, 6, 3, seed=2).requires_grad_()
    v = rand(1, 1, 6, 2, seed=3).requires_grad_()
    gamma = torch.tensor([0.8, 1.3], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, gamma):
        return T.attention(
            q,
            k,
            v,
            topk=3,
            gamma=gamma,
            causal=causal,
            chunk=2,
            window=1,
            n_curves=2,
            n_sink=1,
            mean_token=True,
            exact=False,
        )

    assert torch.autograd.gradcheck(f, (q, k, v, gamma), eps=1e-6, atol=1e-7)


def test_recall():
    q, k = rand(1, 2, 60, 3, seed=1), rand(1, 1, 64, 3, seed=2)
    full, _ = T.knn(q, k, 8, chunk=4, window=64, exact=False)
    assert T.recall(q, k, full) == 1.0
    approx, _ = T.knn(q, k, 8, chunk=4, window=1, exact=False)
    r = T.recall(q, k, approx)
    exact, _ = T.exact_knn(q, k, 8)
    rows = zip(approx.reshape(-1, 8).tolist(), exact.reshape(-1, 8).tolist())
    found = sum(len((set(a) & set(e)) - {-1}) for a, e in rows)
    real = int((exact >= 0).sum())  # the first queries see fewer than 8 keys
    assert real < exact.numel() and 0.0 <= r < 1.0 and r == found / real
    # fewer real neighbours than slots: the denominator counts only real ones; -1 is ignored
    q1, k1 = rand(1, 1, 3, 3), rand(1, 1, 3, 3, seed=1)
    idx = torch.tensor([[[[0, -1, -1, -1], [-1, -1, -1, -1], [2, 1, -1, -1]]]])
    assert T.recall(q1, k1, idx) == 3 / 6  # 1 + 2 + 3 real neighbours, found 1 + 0 + 2
    assert T.recall(q1, k1, T.exact_knn(q1, k1, 4)[0]) == 1.0


def test_validation():
    q, k, v = rand(1, 4, 8, 3), rand(1, 2, 8, 3), rand(1, 2, 8, 2)
    with pytest.raises(ValueError, match="k:"):
        T.attention(q, rand(1, 3, 8, 3), rand(1, 3, 8, 2))  # H % Hkv
    with pytest.raises(ValueError, match="k:"):
        T.knn(q, rand(1, 2, 6, 3), 2)  # causal S < N
    T.knn(q, rand(1, 2, 6, 3), 2, causal=False)
    with pytest.raises(ValueError, match="v:"):
        T.attention(q, k, rand(1, 2, 7, 2))
    with pytest.raises(ValueError, match="q:"):
        T.knn(q[0], k, 2)
    with pytest.raises(ValueError, match="k:"):
        T.knn(q, rand(1, 2, 8, 2), 2)
    with pytest.raises(ValueError, match="gamma"):
        T.attention(q, k, v, gamma=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="gamma"):
        T.attention(q, k, v, gamma=0.0)
    for exact in (True, False):  # the exact search checks the index settings too
        with pytest.raises(ValueError, match="window"):
            T.knn(q, k, 2, window=0, exact=exact)
    with pytest.raises(ValueError, match="topk"):
        T.knn(q, k, 0)
