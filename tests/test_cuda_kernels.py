"""The CUDA kernels' logic, run on the CPU (no GPU needed).

The package's own launch code (zeta._cuda: index build, search, forward, backward, primitives)
runs against a numpy runtime whose kernels are the same .cu sources compiled by g++ with the
shim of tests/cuda_shim (threads as fibers, real block/warp barriers, real shuffles/ballots).
Oracles: the Rust core (bit-identical indices and distances), the torch reference in float64
(forward and gradients), pymorton/numpy for the primitives.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zeta
from zeta._cuda import attention as cuda_attention
from zeta._cuda import index as cuda_index
from zeta._cuda import primitives as cuda_prim
from zeta._cuda import search
from zeta._validate import index_params
from zeta.backends import torch_ref

sys.path.insert(0, str(Path(__file__).parent))
from cuda_shim import shim_runtime  # noqa: E402


@pytest.fixture(scope="module")
def rt():
    return shim_runtime.ShimRuntime(shim_runtime.build())


def _qk(rng, b, h, hkv, n, s, dk, kind="normal"):
    q = rng.standard_normal((b, h, n, dk)).astype(np.float32)
    k = rng.standard_normal((b, hkv, s, dk)).astype(np.float32)
    if kind == "duplicates":  # many equal keys: ties broken by position
        k = np.round(k * 2) / 2
        q = np.round(q * 2) / 2
    elif kind == "equal":
        k[:] = 0.25
    elif kind == "clustered":
        k = (k * 1e-3 + rng.integers(0, 3, (b, hkv, s, 1))).astype(np.float32)
    elif kind == "huge":
        k = (k * 1e6).astype(np.float32)
        q = (q * 1e6).astype(np.float32)
    return q, k


CASES = [
    # b, h, hkv, n, s, dk, topk, chunk, window, n_curves, n_sink, causal, kind
    (1, 2, 1, 50, 70, 3, 8, 8, 4, 1, 0, True, "normal"),
    (2, 2, 2, 40, 40, 3, 5, 4, 3, 2, 3, True, "normal"),
    (1, 1, 1, 33, 33, 2, 40, 4, 2, 3, 2, True, "normal"),  # topk > S: padding
    (1, 2, 1, 30, 45, 3, 6, 8, 4, 2, 2, False, "normal"),
    (1, 4, 2, 64, 64, 3, 16, 4, 2, 4, 0, True, "duplicates"),
    (1, 1, 1, 40, 40, 3, 7, 8, 8, 1, 0, True, "equal"),
    (1, 1, 1, 60, 60, 1, 9, 4, 3, 2, 1, True, "clustered"),
    (1, 2, 2, 20, 37, 8, 4, 3, 2, 1, 5, True, "huge"),
    (1, 1, 1, 30, 30, 5, 3, 64, 32, 1, 0, True, "normal"),  # one chunk: own chunk only
    (1, 1, 1, 8, 300, 3, 70, 16, 40, 1, 0, True, "normal"),  # topk > 64: larger best list
]


@pytest.mark.parametrize("case", CASES)
def test_knn_matches_rust_bit_for_bit(rt, case):
    b, h, hkv, n, s, dk, topk, chunk, window, nc, ns, causal, kind = case
    rng = np.random.default_rng(hash(case) % 2**32)
    q, k = _qk(rng, b, h, hkv, n, s, dk, kind)
    p = index_params(
        dk, topk, causal=causal, chunk=chunk, window=window, n_curves=nc, n_sink=ns, exact=False
    )
    idx, d2 = search.knn(rt, q, k, (b, h, hkv, n, s, dk), p, topk)
    ridx, rd2 = zeta.knn(
        q,
        k,
        topk,
        causal=causal,
        chunk=chunk,
        window=window,
        n_curves=nc,
        n_sink=ns,
        exact=False,
        backend="rust",
    )
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(d2, rd2)
    # and the torch reference, the readable oracle
    tidx, _ = torch_ref.knn(
        torch.from_numpy(q),
        torch.from_numpy(k),
        topk,
        causal=causal,
        chunk=chunk,
        window=window,
        n_curves=nc,
        n_sink=ns,
        exact=False,
    )
    np.testing.assert_array_equal(idx, tidx.numpy())


def test_knn_with_a_window_covering_everything_is_exact(rt):
    rng = np.random.default_rng(3)
    b, h, n, s, dk, topk = 1, 2, 48, 48, 3, 6
    q, k = _qk(rng, b, h, h, n, s, dk)
    p = index_params(dk, topk, chunk=4, window=s, exact=False)
    idx, d2 = search.knn(rt, q, k, (b, h, h, n, s, dk), p, topk)
    eidx, ed2 = zeta.exact_knn(q, k, topk)
    np.testing.assert_array_equal(idx, eidx)
    np.testing.assert_array_equal(d2, ed2)


from adversarial import KINDS, points  # noqa: E402

EXACT_CASES = [
    # b, h, hkv, n, s, dk, topk, chunk, window, n_curves, causal
    (1, 2, 1, 300, 300, 3, 8, 8, 2, 1, True),  # runs up to 256 entries: several leaves each
    (1, 1, 1, 150, 700, 3, 16, 4, 1, 1, True),  # n < s, the largest run has 512 entries
    (1, 2, 2, 80, 400, 2, 5, 16, 3, 2, False),  # one run of 400 keys per slice
    (2, 4, 2, 60, 260, 5, 7, 1, 2, 1, True),  # any-d_k kernel, chunk 1: single-entry runs
    (1, 1, 1, 100, 100, 3, 40, 64, 4, 1, True),  # two chunks; topk > 32
    (1, 2, 1, 30, 30, 3, 5, 64, 2, 1, True),  # one chunk: no level, the own chunk only
    (1, 1, 1, 40, 60, 4, 6, 8, 2, 1, False),  # one run of <= 64 keys: no boxes
    (1, 1, 1, 40, 2600, 3, 8, 16, 2, 1, True),  # runs of 2048 keys: 32 leaves, taken on round
    (1, 1, 1, 20, 3000, 3, 8, 64, 2, 1, False),  # from the query's leaf
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", EXACT_CASES)
def test_exact_knn_is_brute_force(rt, case, kind):
    """exact=True on the device: the brute-force top-k by (d2, position), bit for bit, on the
    adversarial point sets (ties, equal keys, cell edges, clusters, heavy tails, overflow)."""
    b, h, hkv, n, s, dk, topk, chunk, window, nc, causal = case
    rng = np.random.default_rng(abs(hash((case, kind))) % 2**32)
    q = points(kind, (b, h, n, dk), rng).astype(np.float32)
    k = points(kind, (b, hkv, s, dk), rng).astype(np.float32)
    shape = (b, h, hkv, n, s, dk)
    p = index_params(dk, topk, causal=causal, chunk=chunk, window=window, n_curves=nc, exact=True)
    idx, d2 = search.knn(rt, q, k, shape, p, topk)
    eidx, ed2 = zeta.exact_knn(q, k, topk, causal=causal)
    np.testing.assert_array_equal(idx, eidx)
    np.testing.assert_array_equal(d2, ed2)
    if kind == "gauss" and s > 64:  # windows alone are not the answer: the leaf scans made it
        wp = index_params(
            dk, topk, causal=causal, chunk=chunk, window=window, n_curves=nc, exact=False
        )
        widx, _ = search.knn(rt, q, k, shape, wp, topk)
        assert not np.array_equal(widx, eidx)


@pytest.mark.parametrize("first_window", [-1, 0, 1, 8, 100])
@pytest.mark.parametrize("case", [EXACT_CASES[0], EXACT_CASES[2], EXACT_CASES[7]])
def test_exact_knn_does_not_depend_on_the_first_window(rt, case, first_window, monkeypatch):
    """The first pass's window (search.EXACT_WINDOW; -1: the call's) only sets the first
    radius and which leaves the leaf scan skips: the answer stays the brute-force top-k."""
    monkeypatch.setattr(search, "EXACT_WINDOW", first_window)
    b, h, hkv, n, s, dk, topk, chunk, window, nc, causal = case
    rng = np.random.default_rng(7 + abs(hash(case)) % 1000)
    q = points("gauss", (b, h, n, dk), rng).astype(np.float32)
    k = points("gauss", (b, hkv, s, dk), rng).astype(np.float32)
    p = index_params(dk, topk, causal=causal, chunk=chunk, window=window, n_curves=nc, exact=True)
    idx, d2 = search.knn(rt, q, k, (b, h, hkv, n, s, dk), p, topk)
    eidx, ed2 = zeta.exact_knn(q, k, topk, causal=causal)
    np.testing.assert_array_equal(idx, eidx)
    np.testing.assert_array_equal(d2, ed2)


def _cell_split(a, b):
    """Highest differing bit + 1 of two entries' codes (0: equal codes)."""
    x = int(a >> np.uint64(32)) ^ int(b >> np.uint64(32))
    return x.bit_length()


@pytest.mark.parametrize(
    "s, chunk, causal, kind",
    [
        (700, 4, True, "gauss"),
        (3000, 64, False, "gauss"),
        (900, 8, True, "all_equal"),
        (1000, 16, True, "duplicates"),
        (333, 1, False, "clusters"),
    ],
)
def test_leaf_starts_follow_the_cells(rt, s, chunk, causal, kind):
    """exact_leaf_starts_kernel against a numpy re-derivation: leaf j > 0 starts in [j*L - L/2,
    j*L + L/2) at the entry after the largest code change there (ties: nearest j*L, the lower
    first), so leaves are non-empty and increasing; every box is its leaf's min / max."""
    rng = np.random.default_rng(s)
    dk = 3
    k = points(kind, (1, 1, s, dk), rng).astype(np.float32)
    p = index_params(dk, 8, causal=causal, chunk=chunk)
    kcodes = cuda_index.codes(rt, k, dk, p.bits, s, 1, p.scale)
    levels, _, _ = cuda_index.build(rt, kcodes, 1, s, chunk, causal)
    boxes, offs, starts = cuda_index.exact_boxes(rt, levels, k, 1, 1, s, chunk, causal)
    L = cuda_index.LEAF
    level_off, checked = 0, 0
    for lv, (width, run_len) in enumerate(cuda_index.level_layout(s, chunk, causal)):
        if offs[lv] >= 0:
            n_leaves = -(-run_len // L)
            for m in range(width // run_len):
                run = levels[level_off + m * run_len : level_off + (m + 1) * run_len]
                first = int(offs[lv]) // (2 * dk) + m * n_leaves
                got = starts[first : first + n_leaves]
                want = [0]
                for j in range(1, n_leaves):
                    a0, a1 = max(1, j * L - L // 2), min(run_len, j * L + L // 2)
                    cand = [
                        (-_cell_split(run[i - 1], run[i]), abs(i - j * L), i) for i in range(a0, a1)
                    ]
                    want.append(min(cand)[2] if cand else j * L)
                np.testing.assert_array_equal(got, want)
                ends = list(want[1:]) + [run_len]
                assert all(e > b for b, e in zip(want, ends))
                pos = (run & np.uint64(0xFFFFFFFF)).astype(np.int64)
                for j in range(n_leaves):
                    pts = k[0, 0, pos[want[j] : ends[j]]]
                    bx = boxes[(first + j) * 2 * dk : (first + j + 1) * 2 * dk]
                    np.testing.assert_array_equal(bx, np.concatenate([pts.min(0), pts.max(0)]))
                checked += n_leaves
        level_off += width
    assert checked > 0


@pytest.mark.parametrize("kind", ["gauss", "all_equal", "cell_edges", "duplicates"])
@pytest.mark.parametrize("case", [EXACT_CASES[0], EXACT_CASES[2], EXACT_CASES[7]])
def test_exact_knn_with_fixed_or_cell_leaves(rt, case, kind, monkeypatch):
    """Fixed leaves (ZETA_CUDA_CELL_LEAVES=0) and leaves that follow the cells change the work,
    not the answer: both are the brute-force top-k."""
    b, h, hkv, n, s, dk, topk, chunk, window, nc, causal = case
    rng = np.random.default_rng(5 + abs(hash((case, kind))) % 1000)
    q = points(kind, (b, h, n, dk), rng).astype(np.float32)
    k = points(kind, (b, hkv, s, dk), rng).astype(np.float32)
    p = index_params(dk, topk, causal=causal, chunk=chunk, window=window, n_curves=nc, exact=True)
    eidx, ed2 = zeta.exact_knn(q, k, topk, causal=causal)
    for cell in (False, True):
        monkeypatch.setattr(cuda_index, "CELL_LEAVES", cell)
        idx, d2 = search.knn(rt, q, k, (b, h, hkv, n, s, dk), p, topk)
        np.testing.assert_array_equal(idx, eidx)
        np.testing.assert_array_equal(d2, ed2)


@pytest.mark.parametrize("mean_token", [False, True])
@pytest.mark.parametrize("case", [EXACT_CASES[0], EXACT_CASES[2], EXACT_CASES[3]])
def test_exact_forward_and_backward(rt, case, mean_token):
    """The exact forward against the Rust core's exact forward and the torch reference's
    (brute force, float64), and its gradients (the backward only sees the indices)."""
    b, h, hkv, n, s, dk, topk, chunk, window, nc, causal = case
    rng = np.random.default_rng(31 + abs(hash(case)) % 1000)
    q, k = _qk(rng, b, h, hkv, n, s, dk)
    dv = 6
    v = rng.standard_normal((b, hkv, s, dv)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, h)
    kw = dict(causal=causal, chunk=chunk, window=window, n_curves=nc, exact=True)
    idx = _forward_backward_checks(rt, rng, q, k, v, gamma, topk, mean_token, kw)
    eidx, _ = zeta.exact_knn(q, k, topk, causal=causal)
    np.testing.assert_array_equal(idx, eidx.astype(np.int32))


def _torch64(*xs):
    return [torch.from_numpy(np.asarray(x, dtype=np.float64)).requires_grad_() for x in xs]


@pytest.mark.parametrize("mean_token", [False, True])
@pytest.mark.parametrize("case", CASES[:5])
def test_forward_and_backward_match_the_reference(rt, case, mean_token):
    b, h, hkv, n, s, dk, topk, chunk, window, nc, ns, causal, kind = case
    rng = np.random.default_rng(7 + hash(case) % 1000)
    q, k = _qk(rng, b, h, hkv, n, s, dk, kind)
    dv = 5
    v = rng.standard_normal((b, hkv, s, dv)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, h)
    kw = dict(causal=causal, chunk=chunk, window=window, n_curves=nc, n_sink=ns, exact=False)
    idx = _forward_backward_checks(rt, rng, q, k, v, gamma, topk, mean_token, kw)
    ridx, _ = zeta.knn(q, k, topk, **kw)
    np.testing.assert_array_equal(idx, ridx.astype(np.int32))


def _forward_backward_checks(rt, rng, q, k, v, gamma, topk, mean_token, kw):
    """The device forward against the Rust core and the torch reference (float64), and the
    device backward against the reference's autograd; returns the forward's indices."""
    (b, h, n, dk), (hkv, s, dv) = q.shape, v.shape[1:]
    p = index_params(dk, topk, **kw)
    shape = (b, h, hkv, n, s, dk)
    out, idx = cuda_attention.forward(rt, q, k, v, "float32", gamma, shape, dv, p, topk, mean_token)
    rust = zeta.attention(
        q, k, v, topk=topk, gamma=gamma, mean_token=mean_token, backend="rust", **kw
    )
    np.testing.assert_allclose(out, rust, rtol=2e-6, atol=2e-6)
    qt, kt, vt, gt = _torch64(q, k, v, gamma)
    ref = torch_ref.attention(qt, kt, vt, topk=topk, gamma=gt, mean_token=mean_token, **kw)
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    grad = rng.standard_normal(out.shape).astype(np.float32)
    ref.backward(torch.from_numpy(grad).double())
    dq, dk_, dv_, dg = cuda_attention.backward(
        rt, q, k, v, "float32", gamma, idx, grad, shape, dv, p, mean_token
    )
    for got, want in ((dq, qt.grad), (dk_, kt.grad), (dv_, vt.grad), (dg, gt.grad)):
        want = want.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))
    return idx


@pytest.mark.parametrize("vdtype", ["float16", "bfloat16"])
def test_half_values_are_read_natively(rt, vdtype):
    rng = np.random.default_rng(11)
    b, h, n, s, dk, dv, topk = 1, 2, 40, 40, 3, 33, 6
    q, k = _qk(rng, b, h, h, n, s, dk)
    vt = torch.randn(b, h, s, dv, dtype=getattr(torch, vdtype))
    raw = vt.view(torch.int16).numpy()
    gamma = np.array([0.7, 1.3])
    p = index_params(dk, topk, chunk=4, window=3, exact=False)
    out, idx = cuda_attention.forward(
        rt, q, k, raw, vdtype, gamma, (b, h, h, n, s, dk), dv, p, topk, False
    )
    got = torch.from_numpy(out).view(getattr(torch, vdtype)).float().numpy()
    want = zeta.attention(
        q, k, vt.float().numpy(), topk=topk, gamma=gamma, chunk=4, window=3, exact=False
    )
    # computed in float32 like the float32 path, rounded once to the value dtype
    want_rounded = torch.from_numpy(want).to(getattr(torch, vdtype)).float().numpy()
    np.testing.assert_array_equal(got, want_rounded)
    grad = torch.randn(b, h, n, dv, dtype=getattr(torch, vdtype))
    dq, dk_, dv_, dg = cuda_attention.backward(
        rt,
        q,
        k,
        raw,
        vdtype,
        gamma,
        idx,
        grad.view(torch.int16).numpy(),
        (b, h, h, n, s, dk),
        dv,
        p,
        False,
    )
    qt, kt, v64, gt = _torch64(q, k, vt.float().numpy(), gamma)
    ref = torch_ref.attention(qt, kt, v64, topk=topk, gamma=gt, chunk=4, window=3, exact=False)
    ref.backward(grad.double())
    np.testing.assert_allclose(dv_, v64.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dq, qt.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "d,bits,shift",
    [(3, 10, 0), (3, 10, 2), (2, 16, 1), (1, 32, 1), (3, 21, 3), (8, 8, 5), (1, 64, 0), (4, 16, 4)],
)
def test_zorder_matches_cpu(rt, d, bits, shift):
    rng = np.random.default_rng(d * 100 + bits)
    x = (rng.standard_normal((7, 13, d)) * rng.choice([1e-3, 1, 1e3], (7, 13, 1))).astype(
        np.float32
    )
    x[0, 0] = 0.0
    x[0, 1] = -0.0
    got = cuda_prim.zorder(rt, x, d, bits, shift, 1.0)
    want = zeta.zorder(x, bits, shift)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    got = cuda_prim.zorder(rt, x, d, bits, shift, 2.5)
    np.testing.assert_array_equal(got, zeta.zorder(x, bits, shift, scale=2.5))


def test_morton_encode_decode_match_pymorton(rt):
    pm = pytest.importorskip("pymorton")
    rng = np.random.default_rng(5)
    c = rng.integers(0, 1 << 10, (50, 3), dtype=np.uint64).astype(np.uint32)
    codes = cuda_prim.morton_encode(rt, c, 10)
    assert codes.dtype == np.uint32
    assert [int(x) for x in codes] == [pm.interleave3(*map(int, row)) for row in c]
    np.testing.assert_array_equal(cuda_prim.morton_decode(rt, codes, 3, 10), c)
    c2 = rng.integers(0, 1 << 32, (20, 2), dtype=np.uint64)
    w = cuda_prim.morton_encode(rt, c2, 32)
    assert w.dtype == np.uint64
    np.testing.assert_array_equal(w, zeta.morton_encode(c2, 32))
    np.testing.assert_array_equal(cuda_prim.morton_decode(rt, w, 2, 32), c2)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_searchsorted_matches_numpy(rt, dtype):
    rng = np.random.default_rng(9)
    s = np.sort(rng.integers(0, 50, (4, 30)).astype(dtype), axis=-1)
    q = rng.integers(0, 55, (4, 17)).astype(dtype)
    for side in ("left", "right"):
        got = cuda_prim.searchsorted(rt, s, q, side == "right")
        want = np.stack([np.searchsorted(s[i], q[i], side=side) for i in range(4)])
        np.testing.assert_array_equal(got, want)


def test_shim_detects_divergent_barriers(rt, monkeypatch):
    """The shim is not a rubber stamp: a warp that skips a shuffle deadlocks and is reported."""
    import zeta._cuda.search as S

    rng = np.random.default_rng(0)
    q, k = _qk(rng, 1, 1, 1, 5, 5, 3)
    p = index_params(3, 2, chunk=4, window=2, exact=False)
    # kp below topk breaks the kernel's shared-memory layout assumption; instead make one
    # launch with a block that is not whole warps, which the shim refuses at the first barrier.
    monkeypatch.setattr(S, "WARPS", 1)
    orig = rt.launch

    def bad_launch(file, name, grid, block, args, shared_mem=0):
        if name.startswith("zeta::knn_kernel"):
            block = 20
        return orig(file, name, grid, block, args, shared_mem)

    monkeypatch.setattr(rt, "launch", bad_launch)
    with pytest.raises(RuntimeError, match="warp"):
        S.knn(rt, q, k, (1, 1, 1, 5, 5, 3), p, 2)


@pytest.fixture
def shim_device(rt, monkeypatch):
    """The cupy backend's torch glue with the device swapped for the shim: CPU tensors in,
    numpy views for the kernels (16-bit floats as int16, as on the GPU)."""
    import contextlib

    from zeta.backends import cupy_backend as cb

    def view(t):
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        return t.contiguous().numpy()

    def back(a, like=None):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.view(like) if like in (torch.bfloat16, torch.float16) else t

    monkeypatch.setattr(cb, "_Stream", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(cb, "TorchRuntime", lambda dev: rt)
    monkeypatch.setattr(cb, "_cupy_view", view)
    monkeypatch.setattr(cb, "_torch_of", back)
    return cb


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mean_token", [False, True])
def test_torch_glue_of_the_custom_op_runs_on_the_shim(shim_device, dtype, mean_token, exact):
    """The CUDA kernels of zeta::attention_fwd/bwd (torch <-> device arrays, dtypes, gamma, the
    mean token's gradients) with the device swapped for the shim: CPU tensors, numpy views."""
    cb = shim_device
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 50, 3, generator=g)
    k = torch.randn(1, 2, 60, 3, generator=g)
    v = torch.randn(1, 2, 60, 16, generator=g).to(dtype)
    gamma = torch.tensor([0.6, 0.9, 1.1, 1.5], dtype=torch.float32)
    p = index_params(3, 8, chunk=8, window=4, n_curves=2, n_sink=2, exact=exact)
    out, idx = cb.torch_attention_fwd(q, k, v, gamma, 8, mean_token, p)
    assert out.dtype == dtype and idx.dtype == torch.int32
    kw = dict(chunk=8, window=4, n_curves=2, n_sink=2, mean_token=mean_token, exact=exact)
    want = zeta.attention(q, k, v.float(), topk=8, gamma=gamma.double(), backend="rust", **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    grad = torch.randn(1, 4, 50, 16, generator=g).to(dtype)
    dq, dk, dv, dg = cb.torch_attention_bwd(q, k, v, gamma, idx, grad, mean_token, p)
    assert (dq.dtype, dk.dtype, dv.dtype, dg.dtype) == (q.dtype, k.dtype, dtype, gamma.dtype)
    qq, kk, vv = (t.detach().clone().float().requires_grad_() for t in (q, k, v))
    gg = gamma.detach().double().requires_grad_()
    ref = zeta.attention(qq, kk, vv, topk=8, gamma=gg, backend="rust", **kw)
    ref.backward(grad.float())
    for got, want in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad), (dg, gg.grad)):
        torch.testing.assert_close(got.double(), want.double(), rtol=10 * tol, atol=10 * tol)


def test_cupy_backend_ops_run_on_the_shim(shim_device):
    """CupyBackend's knn and primitives (what zeta.knn / zeta.zorder / ... call for CUDA
    tensors) through the shim, against the Rust core."""
    be = shim_device.CupyBackend()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 70, 3, generator=g)
    k = torch.randn(2, 2, 90, 3, generator=g)
    p = index_params(3, 12, chunk=8, window=4, n_curves=2, n_sink=1, exact=False)
    idx, d2 = be.knn(q, k, 12, p)
    ridx, rd2 = zeta.knn(
        q, k, 12, chunk=8, window=4, n_curves=2, n_sink=1, exact=False, backend="rust"
    )
    assert torch.equal(idx, ridx) and torch.equal(d2, rd2)
    bad = q.clone()
    bad[1, 2, 3, 0] = float("inf")
    with pytest.raises(ValueError, match="q: contains NaN or inf"):
        be.knn(bad, k, 12, p)
    x = torch.randn(5, 40, 3, generator=g)
    for bits, shift in ((10, 0), (10, 2), (21, 1)):
        np.testing.assert_array_equal(
            be.zorder(x, 3, bits, shift, 1.0).numpy(), zeta.zorder(x.numpy(), bits, shift)
        )
    coords = torch.from_numpy(
        np.random.default_rng(2).integers(0, 1 << 10, (30, 3)).astype(np.uint32)
    )
    enc = be.morton_encode(coords, 10)
    np.testing.assert_array_equal(enc.numpy(), zeta.morton_encode(coords.numpy(), 10))
    np.testing.assert_array_equal(be.morton_decode(enc, 3, 10).numpy(), coords.numpy())
    codes = zeta.zorder(x.numpy(), 10)
    dup = torch.from_numpy(codes >> np.uint32(24))
    np.testing.assert_array_equal(
        be.argsort(dup).numpy(), np.argsort(dup.numpy(), -1, kind="stable")
    )
    s_ = torch.from_numpy(np.sort(codes, axis=-1))
    for right in (False, True):
        got = be.searchsorted(s_, torch.from_numpy(codes), right)
        want = zeta.searchsorted(s_.numpy(), codes, side="right" if right else "left")
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("seed", range(8))
def test_random_configs_points_and_first_windows(rt, seed, monkeypatch):
    """Random shapes and settings: with the points stored beside the entries or not, and any
    first-pass window, the exact search returns the brute-force top-k and the window search
    returns the same indices either way (the points only change how keys are read)."""
    rng = np.random.default_rng(1000 + seed)
    b, hkv = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    h = hkv * int(rng.integers(1, 3))
    causal = bool(rng.integers(0, 2))
    s = int(rng.integers(1, 500))
    n = int(rng.integers(1, s + 1)) if causal else s
    dk = int(rng.choice([2, 3, 3, 3, 5]))
    topk = int(rng.integers(1, 41))
    chunk = int(rng.choice([1, 4, 16, 64]))
    window = int(rng.integers(0, 100))
    nc = int(rng.integers(1, min(dk + 1, 3) + 1))
    n_sink = int(rng.integers(0, 4))
    kind = str(rng.choice(["normal", "duplicates", "clustered"]))
    q, k = _qk(rng, b, h, hkv, n, s, dk, kind)
    shape = (b, h, hkv, n, s, dk)
    got = {}
    for pts in (True, False):
        monkeypatch.setattr(search, "POINTS", pts)
        monkeypatch.setattr(search, "EXACT_WINDOW", int(rng.choice([-1, 0, 3, 8, 200])))
        kw = dict(causal=causal, chunk=chunk, window=window, n_curves=nc, n_sink=n_sink)
        idx, d2 = search.knn(rt, q, k, shape, index_params(dk, topk, exact=True, **kw), topk)
        eidx, ed2 = zeta.exact_knn(q, k, topk, causal=causal)
        np.testing.assert_array_equal(idx, eidx)
        np.testing.assert_array_equal(d2, ed2)
        got[pts] = search.knn(rt, q, k, shape, index_params(dk, topk, exact=False, **kw), topk)
    np.testing.assert_array_equal(got[True][0], got[False][0])
    np.testing.assert_array_equal(got[True][1], got[False][1])


_SMALL_LEAVES = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from adversarial import points
from cuda_shim import shim_runtime
import zeta
from zeta._cuda import index, search
from zeta._validate import index_params
assert index.LEAF == 4
rt = shim_runtime.ShimRuntime(shim_runtime.build())
for s, n, chunk, causal, kind in [(9000, 24, 64, False, "gauss"), (9000, 40, 64, True, "gauss"),
                                  (5000, 16, 32, True, "duplicates"), (6000, 16, 8, False, "clusters")]:
    rng = np.random.default_rng(s + n)
    q = points(kind, (1, 1, n, 3), rng).astype(np.float32)
    k = points(kind, (1, 1, s, 3), rng).astype(np.float32)
    for cell in (True, False):
        index.CELL_LEAVES = cell
        p = index_params(3, 12, causal=causal, chunk=chunk, exact=True)
        idx, d2 = search.knn(rt, q, k, (1, 1, 1, n, s, 3), p, 12)
        eidx, ed2 = zeta.exact_knn(q, k, 12, causal=causal)
        np.testing.assert_array_equal(idx, eidx)
        np.testing.assert_array_equal(d2, ed2)
print("ok")
"""


def test_exact_knn_over_many_groups_of_leaves():
    """Leaves of 4 entries (ZETA_CUDA_LEAF=4, compiled in a shim of its own): runs of 2048 to
    8192 entries have 16 to 64 groups of 32 leaves, so the search walks group boxes in more
    than one round, nearest group first; the answer stays the brute-force top-k."""
    import os
    import subprocess

    env = {**os.environ, "ZETA_CUDA_LEAF": "4"}
    tests_dir = str(Path(__file__).parent)
    r = subprocess.run(
        [sys.executable, "-c", _SMALL_LEAVES, tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
