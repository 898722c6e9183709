"""The cupy backend on a real GPU (skipped, with the reason, where there is none).

Oracles: the Rust CPU path on the same float32 input (bit-identical indices and distances,
outputs and gradients within float32 tolerance), the torch reference in float64.
"""

import numpy as np
import pytest
import torch

import zeta
from zeta.backends import BACKENDS

_why = BACKENDS["cupy"].unavailable_reason()
pytestmark = [
    pytest.mark.cuda,
    # torch's own compile/opcheck internals use deprecated torch.jit APIs
    pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning"),
    pytest.mark.skipif(
        not torch.cuda.is_available() or _why is not None,
        reason=f"needs a CUDA device and cupy: {_why or 'torch sees no CUDA device'}",
    ),
]

CONFIGS = [
    dict(causal=True, chunk=64, window=32, n_curves=1, n_sink=0, exact=False),
    dict(causal=True, chunk=16, window=8, n_curves=3, n_sink=4, exact=False),
    dict(causal=False, chunk=64, window=16, n_curves=2, n_sink=2, exact=False),
    dict(causal=True, chunk=16),  # the default: exact search
]


def _qkv(b, h, hkv, n, s, dk, dv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, dk, generator=g)
    k = torch.randn(b, hkv, s, dk, generator=g)
    v = torch.randn(b, hkv, s, dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize(
    "shape", [(1, 4, 2, 3000, 3000, 3), (2, 2, 2, 700, 1000, 2), (1, 2, 1, 500, 500, 8)]
)
def test_knn_matches_cpu_bit_for_bit(kw, shape):
    b, h, hkv, n, s, dk = shape
    if not kw["causal"] and n != s:
        n = s
    q, k, _ = _qkv(b, h, hkv, n, s, dk, 1)
    idx, d2 = zeta.knn(q.cuda(), k.cuda(), 32, **kw)
    assert idx.device.type == "cuda" and idx.dtype == torch.int64
    ridx, rd2 = zeta.knn(q, k, 32, backend="rust", **kw)
    assert torch.equal(idx.cpu(), ridx)
    assert torch.equal(d2.cpu(), rd2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 4, 2, 5000, 5000, 3), (2, 2, 1, 900, 2000, 2)])
def test_exact_knn_is_brute_force(shape, causal):
    """exact=True runs the CUDA kernels (no fallback) and returns the brute-force top-k."""
    from zeta.backends import CallInfo, select

    b, h, hkv, n, s, dk = shape
    n = n if causal else s
    q, k, _ = _qkv(b, h, hkv, n, s, dk, 1, seed=12)
    info = CallInfo("torch", "cuda", "float32", dk, topk=32, op="knn", exact=True)
    assert select(info, "auto").name == "cupy"
    idx, d2 = zeta.knn(q.cuda(), k.cuda(), 32, causal=causal, exact=True)
    eidx, ed2 = zeta.exact_knn(q.numpy(), k.numpy(), 32, causal=causal)
    np.testing.assert_array_equal(idx.cpu().numpy(), eidx)
    np.testing.assert_array_equal(d2.cpu().numpy(), ed2)


def test_exact_attention_matches_cpu():
    q, k, v = _qkv(1, 4, 2, 3000, 3000, 3, 64, seed=13)
    outs = {}
    for dev in ("cpu", "cuda"):
        qq, kk, vv = (x.detach().clone().to(dev).requires_grad_() for x in (q, k, v))
        o = zeta.attention(qq, kk, vv, topk=32, exact=True)
        o.square().sum().backward()
        outs[dev] = [t.detach().cpu() for t in (o, qq.grad, kk.grad, vv.grad)]
    for a, b_ in zip(outs["cuda"], outs["cpu"]):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mean_token", [False, True])
@pytest.mark.parametrize("kw", CONFIGS)
def test_attention_forward_backward_match_cpu(kw, mean_token):
    q, k, v = _qkv(2, 4, 2, 1500, 1500, 3, 64, seed=3)
    gamma = torch.tensor([0.5, 0.8, 1.0, 1.7], dtype=torch.float64)
    grad = torch.randn(2, 4, 1500, 64)
    outs = {}
    for dev in ("cpu", "cuda"):
        qq, kk, vv = (x.detach().clone().to(dev).requires_grad_() for x in (q, k, v))
        gg = gamma.detach().clone().to(dev).requires_grad_()
        o = zeta.attention(qq, kk, vv, topk=32, gamma=gg, mean_token=mean_token, **kw)
        o.backward(grad.to(dev))
        outs[dev] = [t.detach().cpu() for t in (o, qq.grad, kk.grad, vv.grad, gg.grad)]
    for a, b_ in zip(outs["cuda"][:4], outs["cpu"][:4]):
        torch.testing.assert_close(a.to(b_.dtype), b_, rtol=1e-4, atol=1e-5)
    # d gamma (per head) is a sum over B * N * topk float32 terms that the two devices add in
    # different orders (seen on an H200: 1.4e-4 relative); its value is checked against the
    # float64 reference in test_gradients_match_the_float64_reference
    torch.testing.assert_close(outs["cuda"][4], outs["cpu"][4], rtol=1e-3, atol=1e-5)


def test_gradients_match_the_float64_reference():
    """A gradcheck-style check: the CUDA float32 gradients against the torch reference's
    float64 autograd over the same selection."""
    from zeta.backends import torch_ref

    q, k, v = _qkv(1, 2, 1, 300, 300, 3, 16, seed=8)
    gamma = torch.tensor([0.6, 1.4], dtype=torch.float64)
    kw = dict(chunk=16, window=8, n_curves=2, n_sink=1, mean_token=True, exact=False)
    qc, kc, vc = (x.cuda().requires_grad_() for x in (q, k, v))
    gc = gamma.cuda().requires_grad_()
    o = zeta.attention(qc, kc, vc, topk=12, gamma=gc, **kw)
    w = torch.randn_like(o)
    (o * w).sum().backward()
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    g64 = gamma.clone().requires_grad_()
    r = torch_ref.attention(q64, k64, v64, topk=12, gamma=g64, **kw)
    (r * w.cpu().double()).sum().backward()
    torch.testing.assert_close(o.detach().cpu().double(), r.detach(), rtol=1e-5, atol=1e-6)
    for a, b_ in ((qc, q64), (kc, k64), (vc, v64), (gc, g64)):
        torch.testing.assert_close(a.grad.cpu().double(), b_.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_values(dtype):
    q, k, v = _qkv(1, 2, 2, 800, 800, 3, 64, seed=4, dtype=dtype)
    out = zeta.attention(q.cuda(), k.cuda(), v.cuda(), topk=16)
    assert out.dtype == dtype
    ref = zeta.attention(q.float(), k.float(), v.float(), topk=16)
    torch.testing.assert_close(out.cpu().float(), ref.to(dtype).float(), rtol=0, atol=0)


def test_cupy_arrays_in_cupy_out():
    import cupy

    q, k, v = _qkv(1, 2, 1, 400, 400, 3, 8, seed=6)
    qc, kc, vc = (cupy.asarray(x.numpy()) for x in (q, k, v))
    out = zeta.attention(qc, kc, vc, topk=8, gamma=0.9)
    assert isinstance(out, cupy.ndarray) and out.shape == (1, 2, 400, 8)
    ref = zeta.attention(q.numpy(), k.numpy(), v.numpy(), topk=8, gamma=0.9)
    np.testing.assert_allclose(cupy.asnumpy(out), ref, rtol=1e-5, atol=1e-6)
    idx, d2 = zeta.knn(qc, kc, 8)
    ridx, rd2 = zeta.knn(q.numpy(), k.numpy(), 8)
    np.testing.assert_array_equal(cupy.asnumpy(idx), ridx)
    np.testing.assert_array_equal(cupy.asnumpy(d2), rd2)


def test_primitives_on_cuda_tensors():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1000, 3, generator=g)
    for bits, shift in ((10, 0), (10, 3), (21, 1)):
        got = zeta.zorder(x.cuda(), bits, shift)
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), zeta.zorder(x.numpy(), bits, shift))
    codes = zeta.zorder(x.numpy(), 10)
    dup = (codes >> 20).astype(np.uint32)  # many equal codes: stability matters
    got = zeta.argsort(torch.from_numpy(dup).cuda())
    np.testing.assert_array_equal(got.cpu().numpy(), np.argsort(dup, axis=-1, kind="stable"))
    s = np.sort(codes, axis=-1)
    qq = zeta.zorder(np.random.default_rng(0).standard_normal((5, 300, 3)).astype(np.float32), 10)
    for side in ("left", "right"):
        got = zeta.searchsorted(torch.from_numpy(s).cuda(), torch.from_numpy(qq).cuda(), side=side)
        np.testing.assert_array_equal(got.cpu().numpy(), zeta.searchsorted(s, qq, side=side))
    coords = np.random.default_rng(1).integers(0, 1 << 10, (100, 3)).astype(np.uint32)
    enc = zeta.morton_encode(torch.from_numpy(coords).cuda(), 10)
    np.testing.assert_array_equal(enc.cpu().numpy(), zeta.morton_encode(coords, 10))
    dec = zeta.morton_decode(enc, 3, 10)
    np.testing.assert_array_equal(dec.cpu().numpy(), coords)


# opcheck's fake-tensor copy reads .grad of non-leaf tensors itself and warns (as in test_ops)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_opcheck_cuda():
    import zeta._torch_ops  # noqa: F401

    q, k, v = _qkv(1, 2, 1, 40, 50, 3, 8, seed=5)
    q, k, v = (x.cuda().requires_grad_() for x in (q, k, v))
    gamma = torch.tensor([0.7, 1.2], dtype=torch.float64, device="cuda", requires_grad=True)
    for mean_token, causal in ((True, True), (False, False)):
        for exact in (False, True):
            args = (q, k, v, gamma, 5, mean_token, 8, 4, 2, 1, causal, 10, 1.0, exact)
            torch.library.opcheck(torch.ops.zeta.attention_fwd.default, args)


def test_torch_compile_fullgraph_cuda():
    from zeta.nn import ZetaAttention

    torch.manual_seed(0)
    m = ZetaAttention(64, 4, num_kv_heads=2, topk=8, chunk=16, mean_token=True).cuda()
    x = torch.randn(2, 256, 64, device="cuda", requires_grad=True)
    eager = m(x)
    ge = torch.autograd.grad(eager.sum(), [x, m.log_gamma])
    torch._dynamo.reset()
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = cm(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    gc = torch.autograd.grad(out.sum(), [x, m.log_gamma])
    for a, b_ in zip(gc, ge):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


def test_autocast_bf16_trains():
    from zeta.nn import ZetaAttention

    torch.manual_seed(1)
    m = ZetaAttention(64, 4, topk=8).cuda()
    x = torch.randn(2, 512, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_bad_input_on_cuda():
    q, k, v = _qkv(1, 2, 1, 64, 64, 3, 8)
    q[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="q"):
        zeta.attention(q.cuda(), k.cuda(), v.cuda(), topk=4)
    q, k, v = _qkv(1, 2, 1, 64, 64, 3, 8)
    with pytest.raises(ValueError, match="backend"):
        zeta.attention(
            q.cuda().double(), k.cuda().double(), v.cuda().double(), topk=4, backend="cupy"
        )
    out = zeta.attention(q.cuda().double(), k.cuda().double(), v.cuda().double(), topk=4)
    assert out.dtype == torch.float64  # float64 falls back to the torch reference


def test_cupy_views_of_torch_tensors():
    """The zero-copy views the kernels read: every layout the launchers can pass."""
    import cupy

    from zeta.backends.cupy_backend import _cupy_view

    base = torch.randn(6, 5, 7, device="cuda")
    for t in (
        base,
        base[1:4, :, 2:],  # an offset and gaps
        base.transpose(0, 2),  # non-contiguous
        base[:, :1].expand(6, 9, 7),  # stride 0
        base.to(torch.bfloat16),
        base.to(torch.float16)[2],
        base.to(torch.int64),
        base[:0],  # empty
    ):
        a = _cupy_view(t)
        assert a.shape == tuple(t.shape)
        ref = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        np.testing.assert_array_equal(cupy.asnumpy(a), ref.cpu().numpy())
    a = _cupy_view(base)
    a[0, 0, 0] = 42.0  # a view, not a copy
    assert base[0, 0, 0].item() == 42.0
