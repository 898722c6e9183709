"""Runs against the installed wheel in a venv WITHOUT torch: numpy users are first-class."""

import sys

import numpy as np

import zeta

assert "torch" not in sys.modules, "zeta imported torch"
rng = np.random.default_rng(0)

c = rng.integers(0, 1 << 10, (1000, 3), dtype=np.uint32)
codes = zeta.morton_encode(c, bits=10)
assert codes.dtype == np.uint32
np.testing.assert_array_equal(zeta.morton_decode(codes, 3, bits=10), c)
ref = np.zeros(1000, np.uint64)
for b in range(10):
    for j in range(3):
        ref |= ((c[:, j].astype(np.uint64) >> b) & 1) << np.uint64(3 * b + j)
np.testing.assert_array_equal(codes, ref)

x = rng.standard_normal((5000, 3)).astype(np.float32)
z = zeta.zorder(x)
np.testing.assert_array_equal(zeta.argsort(z), np.argsort(z, kind="stable"))
s = np.sort(z)
np.testing.assert_array_equal(zeta.searchsorted(s, z), np.searchsorted(s, z))

q = rng.standard_normal((1, 2, 200, 3)).astype(np.float32)
k = rng.standard_normal((1, 1, 200, 3)).astype(np.float32)
v = rng.standard_normal((1, 1, 200, 8)).astype(np.float32)
out = zeta.attention(q, k, v, topk=8, window=10_000)
assert isinstance(out, np.ndarray) and out.shape == (1, 2, 200, 8)
# exact top-k Cauchy attention in plain numpy
for h in range(2):
    for i in range(200):
        d2 = ((k[0, 0, : i + 1] - q[0, h, i]) ** 2).sum(-1)
        sel = np.lexsort((np.arange(i + 1), d2))[:8]
        w = 1.0 / (d2[sel] + 1.0)
        np.testing.assert_allclose(
            out[0, h, i], (w[:, None] * v[0, 0, sel]).sum(0) / w.sum(), rtol=1e-4, atol=1e-5
        )

cache = zeta.KVCache(1, 3, 8)
cache.extend(k, v)
np.testing.assert_allclose(
    cache.attend(q[:, :, -1:], topk=8, window=10_000), out[:, :, -1:], atol=1e-6
)
# a one-token prefill with the default topk=32 attends to the one key; empty in, empty out
one = zeta.attention(q[:, :, :1], k[:, :, :1], v[:, :, :1])
np.testing.assert_allclose(one, np.broadcast_to(v[:, :, :1], one.shape), rtol=1e-6)
assert zeta.morton_encode(np.zeros((0, 3), np.uint32)).shape == (0,)
assert zeta.attention(q[:, :, :0], k, v).shape == (1, 2, 0, 8)
assert "torch" not in sys.modules, "zeta imported torch"
assert "cupy" not in sys.modules, "zeta imported cupy"
rep = zeta.backends()  # says why the GPU and torch backends are not here, without importing them
assert rep["rust"]["available"] and not rep["cupy"]["available"] and rep["cupy"]["reason"], rep
assert "torch" not in sys.modules and "cupy" not in sys.modules
print("smoke: 1 passed, 0 failed")  # numpy-only wheel check
