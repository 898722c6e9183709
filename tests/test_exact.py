"""Exact search (``exact=True`` on zeta.knn / zeta.attention / ZetaAttention): the result is
the brute-force top-k by (distance, position) on any input, on every backend, forward and
backward; the CUDA backend declines it (the torch reference takes the call)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from adversarial import KINDS, points  # noqa: E402
from adversarial import brute_knn as brute  # noqa: E402

import zeta  # noqa: E402
import zeta.nn  # noqa: E402
from zeta.backends import CallInfo  # noqa: E402
from zeta.backends import torch_ref as T  # noqa: E402
from zeta.backends.cupy_backend import CupyBackend  # noqa: E402

# (B, H, H_kv, N, S, d_k, topk, index options): chunks on and off the fence stride (64),
# one and several curves, sinks, S > N, GQA, tiny windows, topk > S.
CASES = [
    (1, 2, 1, 300, 300, 3, 8, dict(chunk=64, window=1)),
    (2, 4, 2, 150, 400, 3, 32, dict(chunk=8, window=2, n_curves=2, n_sink=2)),
    (1, 1, 1, 200, 200, 1, 5, dict(chunk=1, window=1)),
    (1, 2, 2, 90, 90, 8, 7, dict(chunk=16, window=3, n_curves=3)),
    (1, 1, 1, 40, 60, 2, 100, dict(chunk=4, window=1, bits=3, scale=0.01)),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_knn_equals_brute_force(kind, causal, dtype):
    rng = np.random.default_rng(KINDS.index(kind) * 4 + 2 * causal + (dtype == np.float64))
    for b, h, hkv, n, s, dk, topk, kw in CASES:
        q = points(kind, (b, h, n, dk), rng).astype(dtype)
        k = points(kind, (b, hkv, s, dk), rng).astype(dtype)
        if kind == "duplicates":  # queries on the keys themselves: distance-0 ties
            q[..., : n // 2, :] = np.repeat(k, h // hkv, axis=1)[..., s - n : s - n // 2, :]
        want_i, want_d = brute(q, k, topk, causal)
        got_i, got_d = zeta.knn(q, k, topk, causal=causal, exact=True, **kw)
        np.testing.assert_array_equal(got_i, want_i, err_msg=f"{kind} {kw}")
        np.testing.assert_array_equal(got_d, want_d, err_msg=f"{kind} {kw}")
        # the torch backend (brute force in blocks) gives the same answer
        ti, td = zeta.knn(
            torch.from_numpy(q),
            torch.from_numpy(k),
            topk,
            causal=causal,
            exact=True,
            backend="torch",
            **kw,
        )
        np.testing.assert_array_equal(ti.numpy(), want_i)
        np.testing.assert_array_equal(td.numpy(), want_d)


def test_exact_beats_the_window_where_the_window_misses():
    """Keys far apart in the curve but near in space: the window search's defaults miss some
    true neighbours, exact search (the default) finds all (the test can fail: recall < 1
    without exact)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4096, 3)).astype(np.float32)
    k = rng.standard_normal((1, 1, 4096, 3)).astype(np.float32)
    ex_i, _ = zeta.exact_knn(q, k, 32)
    win_i, _ = zeta.knn(q, k, 32, exact=False)
    got_i, _ = zeta.knn(q, k, 32, exact=True)
    assert not np.array_equal(win_i, ex_i)
    np.testing.assert_array_equal(got_i, ex_i)
    assert zeta.recall(q, k, got_i) == 1.0
    np.testing.assert_array_equal(zeta.knn(q, k, 32)[0], ex_i)  # the default


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(mean_token=True),
        dict(n_sink=2, chunk=2, n_curves=2),
        dict(causal=False, mean_token=True, window=1),
    ],
    ids=["plain", "mean", "sink-curves", "noncausal"],
)
@pytest.mark.parametrize("kind", ["gauss", "duplicates"])
def test_exact_attention_forward_and_backward_equal_dense(kw, kind):
    rng = np.random.default_rng(5)
    b, h, hkv, n, s, dk, dv, topk = 2, 4, 2, 40, 50, 3, 5, 6
    causal = kw.get("causal", True)
    q, k = (torch.from_numpy(points(kind, sh, rng)) for sh in ((b, h, n, dk), (b, hkv, s, dk)))
    v = torch.from_numpy(rng.standard_normal((b, hkv, s, dv)))
    gamma = torch.linspace(0.4, 1.2, h, dtype=torch.float64)
    mean_token = kw.get("mean_token", False)
    opts = {key: val for key, val in kw.items() if key not in ("mean_token",)}

    def run(fn):
        ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v, gamma)]
        out = fn(*ins)
        w = torch.from_numpy(np.random.default_rng(9).standard_normal(out.shape))
        (out * w).sum().backward()
        return out.detach(), [t.grad for t in ins]

    dense = run(
        lambda qq, kk, vv, gg: T.dense_topk_attention(
            qq, kk, vv, topk=topk, gamma=gg, causal=causal, mean_token=mean_token
        )
    )
    for backend in ("rust", "torch"):
        ours = run(
            lambda qq, kk, vv, gg, be=backend: zeta.attention(
                qq,
                kk,
                vv,
                topk=topk,
                gamma=gg,
                mean_token=mean_token,
                exact=True,
                backend=be,
                **opts,
            )
        )
        torch.testing.assert_close(ours[0], dense[0], rtol=1e-10, atol=1e-12)
        for a, d, nm in zip(ours[1], dense[1], "qkvg"):
            torch.testing.assert_close(a, d, rtol=1e-9, atol=1e-11, msg=f"{backend} grad {nm}")


def test_exact_gradcheck():
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.standard_normal((1, 2, 6, 3)))
    k = torch.from_numpy(rng.standard_normal((1, 1, 9, 3)))
    v = torch.from_numpy(rng.standard_normal((1, 1, 9, 2)))
    gamma = torch.tensor([0.6, 1.3], dtype=torch.float64)
    ins = [t.requires_grad_(True) for t in (q, k, v, gamma)]

    def fn(qq, kk, vv, gg):
        return zeta.attention(qq, kk, vv, topk=3, gamma=gg, exact=True, window=1, chunk=2)

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_exact_decode_equals_parallel(causal):
    """Query i alone over keys 0..i (what a decode step computes) equals row i of the
    parallel forward over the whole sequence."""
    rng = np.random.default_rng(3)
    n, topk = 200, 8
    q = rng.standard_normal((1, 2, n, 3)).astype(np.float32)
    k = rng.standard_normal((1, 1, n, 3)).astype(np.float32)
    v = rng.standard_normal((1, 1, n, 4)).astype(np.float32)
    kw = dict(topk=topk, chunk=8, window=1, exact=True)
    full = zeta.attention(q, k, v, causal=True, **kw)
    for i in (0, 7, 8, 63, 64, 130, n - 1):
        step = zeta.attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], **kw)
        np.testing.assert_array_equal(step[:, :, 0], full[:, :, i])
    if not causal:
        out = zeta.attention(q, k, v, causal=False, **kw)
        ref = zeta.attention(q, k, v, causal=False, topk=topk, window=n)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_zeta_attention_module_takes_exact():
    torch.manual_seed(0)
    m = zeta.nn.ZetaAttention(16, 2, key_dim=3, topk=4, exact=True, window=1, chunk=4)
    ref = zeta.nn.ZetaAttention(16, 2, key_dim=3, topk=4, window=10_000, chunk=4)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 37, 16, dtype=torch.float32)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-6)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_cuda_backend_takes_exact():
    """The CUDA kernels have the exact search (tests/test_cuda_kernels.py runs it on the CPU)."""
    info = CallInfo("torch", "cuda", "float32", 3, topk=32, op="attention", exact=True)
    assert not any("exact" in r for r in CupyBackend().not_supported_reasons(info))


@pytest.mark.parametrize("fn", ["knn", "attention"])
def test_exact_must_be_a_bool(fn):
    q = np.zeros((1, 1, 4, 3), np.float32)
    args = (q, q, 2) if fn == "knn" else (q, q, q)
    with pytest.raises(TypeError, match="^exact"):
        getattr(zeta, fn)(*args, exact="yes")
