"""Tests of zeta.KVCache: decoding step by step equals one parallel zeta.attention call,
half-precision storage, size accounting, save/load, and failed calls leaving it unchanged."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import zeta

TOL = 1e-5


def data(b=2, h=4, hkv=2, t=40, dk=3, dv=5, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, t, dk)).astype(np.float32)
    k = rng.standard_normal((b, hkv, t, dk)).astype(np.float32)
    v = rng.standard_normal((b, hkv, t, dv)).astype(np.float32)
    return q, k, v


def gamma_for(h, per_head):
    return np.linspace(0.5, 1.5, h) if per_head else 0.8


SETTINGS = [
    # (index settings, heads (H, H_kv), batch, T, topk, mean_token, per-head gamma)
    (dict(chunk=4), (1, 1), 1, 40, 4, False, False),
    (dict(chunk=4, window=2), (4, 2), 2, 40, 6, False, True),
    (dict(chunk=16, n_curves=3, n_sink=3), (4, 2), 2, 60, 5, True, False),
    (dict(chunk=64, window=3, n_curves=2), (2, 1), 1, 150, 8, False, True),
    (dict(chunk=4, n_sink=2, window=1), (4, 4), 2, 45, 3, True, True),
    (dict(chunk=16, n_curves=4), (2, 2), 1, 50, 7, False, False),
    (dict(chunk=1, window=2, n_curves=2, n_sink=1), (4, 2), 1, 30, 4, True, False),
]


def _id(s):
    kw, heads, b, t, topk, mt, gh = s
    return (
        "-".join(f"{a}{v}" for a, v in kw.items())
        + f"-h{heads[0]}x{heads[1]}-b{b}-t{t}-k{topk}-m{int(mt)}-g{int(gh)}"
    )


def _parallel(q, k, v, kw, topk, gamma, mt, exact):
    return zeta.attention(q, k, v, topk=topk, gamma=gamma, mean_token=mt, exact=exact, **kw)


# the window search (where the index settings decide the answer) and the exact default
EXACT = pytest.mark.parametrize("exact", [False, True], ids=["window", "exact"])


@EXACT
@pytest.mark.parametrize("s", SETTINGS, ids=_id)
def test_decode_equals_parallel(s, exact):
    kw, (h, hkv), b, t, topk, mt, per_head = s
    dk = 3
    q, k, v = data(b, h, hkv, t, dk, 5, seed=t)
    gamma = gamma_for(h, per_head)
    full = _parallel(q, k, v, kw, topk, gamma, mt, exact)
    cache = zeta.KVCache(hkv, dk, 5, batch=b, **kw)
    assert len(cache) == 0
    worst = 0.0
    for i in range(t):
        cache.extend(k[:, :, i : i + 1], v[:, :, i : i + 1])
        assert len(cache) == i + 1
        out = cache.attend(q[:, :, i : i + 1], topk=topk, gamma=gamma, mean_token=mt, exact=exact)
        assert out.shape == (b, h, 1, 5) and out.dtype == np.float32
        worst = max(worst, float(np.abs(out[:, :, 0] - full[:, :, i]).max()))
    assert worst <= TOL


@EXACT
@pytest.mark.parametrize("s", SETTINGS[1:4], ids=_id)
def test_prefill_equals_parallel(s, exact):
    kw, (h, hkv), b, t, topk, mt, per_head = s
    q, k, v = data(b, h, hkv, t, 3, 4, seed=1)
    gamma = gamma_for(h, per_head)
    cache = zeta.KVCache(hkv, 3, 4, batch=b, **kw)
    cache.extend(k, v)
    assert len(cache) == t
    for tq in (t, 7, 1):
        out = cache.attend(q[:, :, t - tq :], topk=topk, gamma=gamma, mean_token=mt, exact=exact)
        want = _parallel(q[:, :, t - tq :], k, v, kw, topk, gamma, mt, exact)
        assert out.shape == want.shape
        assert np.abs(out - want).max() <= TOL, tq


@EXACT
@pytest.mark.parametrize("s", SETTINGS[:4], ids=_id)
def test_random_sized_extends(s, exact):
    kw, (h, hkv), b, t, topk, mt, per_head = s
    q, k, v = data(b, h, hkv, t, 3, 4, seed=2)
    gamma = gamma_for(h, per_head)
    full = _parallel(q, k, v, kw, topk, gamma, mt, exact)
    cache = zeta.KVCache(hkv, 3, 4, batch=b, **kw)
    rng = np.random.default_rng(t)
    i = 0
    while i < t:
        n = int(min(t - i, rng.integers(1, 20)))
        cache.extend(k[:, :, i : i + n], v[:, :, i : i + n])
        i += n
        assert len(cache) == i
        out = cache.attend(q[:, :, i - n : i], topk=topk, gamma=gamma, mean_token=mt, exact=exact)
        assert np.abs(out - full[:, :, i - n : i]).max() <= TOL, i
    # an empty extend is a no-op
    before = cache.nbytes
    cache.extend(k[:, :, :0], v[:, :, :0])
    assert len(cache) == t and cache.nbytes == before


@pytest.mark.parametrize(
    "dk,kw,t,topk,mt",
    [
        (1, dict(chunk=2, window=1, n_curves=2), 300, 3, True),
        (2, dict(chunk=1, window=2, bits=4), 257, 5, False),
        (8, dict(chunk=3, n_curves=9, n_sink=4, window=1), 200, 4, True),
        (3, dict(chunk=5, scale=0.1), 333, 6, True),
    ],
    ids=["dk1", "dk2-chunk1-bits4", "dk8-9curves", "scale"],
)
@EXACT
def test_decode_deep_levels_and_key_dims(dk, kw, t, topk, mt, exact):
    """Many merge levels; and token-by-token extends build the same cache as one extend."""
    q, k, v = data(1, 2, 1, t, dk, 3, seed=dk)
    full = _parallel(q, k, v, kw, topk, 0.9, mt, exact)
    c = zeta.KVCache(1, dk, 3, **kw)
    worst = 0.0
    for i in range(t):
        c.extend(k[:, :, i : i + 1], v[:, :, i : i + 1])
        o = c.attend(q[:, :, i : i + 1], topk=topk, gamma=0.9, mean_token=mt, exact=exact)
        worst = max(worst, float(np.abs(o[:, :, 0] - full[:, :, i]).max()))
    assert worst <= TOL
    once = zeta.KVCache(1, dk, 3, **kw)
    once.extend(np.repeat(k, 2, axis=2)[:, :, ::2], v)  # a non-contiguous view
    assert once.same_contents(c)
    out = once.attend(q[:, :, t - 50 :], topk=topk, gamma=0.9, mean_token=mt, exact=exact)
    assert np.abs(out - full[:, :, t - 50 :]).max() <= TOL


def _round(v, dtype):
    import torch

    t = torch.from_numpy(v)
    return (t.half() if dtype == "float16" else t.bfloat16()).float().numpy()


def _half_caches(dtype, mean_token):
    q, k, v = data(2, 4, 2, 50, 3, 6, seed=3)
    kw = dict(chunk=4, n_sink=1)
    c32 = zeta.KVCache(2, 3, 6, batch=2, **kw)
    c16 = zeta.KVCache(2, 3, 6, batch=2, dtype=dtype, **kw)
    c32r = zeta.KVCache(2, 3, 6, batch=2, **kw)  # float32 cache fed pre-rounded values
    assert c16.dtype == dtype and c32.dtype == "float32"
    outs = []
    for i in range(0, 50, 5):
        c32.extend(k[:, :, i : i + 5], v[:, :, i : i + 5])
        c16.extend(k[:, :, i : i + 5], v[:, :, i : i + 5])
        c32r.extend(k[:, :, i : i + 5], _round(v[:, :, i : i + 5], dtype))
        qi = q[:, :, i + 4 : i + 5]
        outs.append(tuple(c.attend(qi, topk=6, mean_token=mean_token) for c in (c32, c16, c32r)))
    return c32, c16, outs


@pytest.mark.parametrize("dtype,loose", [("float16", 3e-3), ("bfloat16", 3e-2)])
def test_half_cache(dtype, loose):
    for mean_token in (False, True):
        c32, c16, outs = _half_caches(dtype, mean_token)
        for o32, o16, o32r in outs:
            assert o16.dtype == np.float32
            np.testing.assert_allclose(o16, o32, rtol=0, atol=loose)
            if not mean_token:
                # the half cache is exactly a float32 cache holding the rounded values
                np.testing.assert_allclose(o16, o32r, rtol=0, atol=1e-6)
    assert c16.nbytes < c32.nbytes
    assert c32.nbytes - c16.nbytes >= 2 * 2 * 50 * 6 * 2  # two bytes saved per value element


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_cache_mean_token_uses_stored_values(dtype):
    """The mean token averages the values the cache holds (as after save/load)."""
    _, _, outs = _half_caches(dtype, True)
    for _, o16, o32r in outs:
        np.testing.assert_allclose(o16, o32r, rtol=0, atol=1e-6)


def test_len_and_nbytes_grow():
    q, k, v = data(1, 2, 2, 300, 3, 8, seed=4)
    c = zeta.KVCache(2, 3, 8, chunk=16)
    sizes = [c.nbytes]
    for stop in (10, 100, 300):
        c.extend(k[:, :, len(c) : stop], v[:, :, len(c) : stop])
        assert len(c) == stop
        sizes.append(c.nbytes)
        # at least the raw keys and values
        assert c.nbytes >= 2 * stop * (3 + 8) * 4
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert "len=300" in repr(c)


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    q, k, v = data(1, 2, 1, 20, 3, 4, seed=5)
    c = zeta.KVCache(1, 3, 4, chunk=4)
    c.extend(torch.from_numpy(k), torch.from_numpy(v).double())
    out = c.attend(torch.from_numpy(q[:, :, -3:]), topk=5)
    assert torch.is_tensor(out) and out.dtype == torch.float32
    want = zeta.attention(q[:, :, -3:], k, v, topk=5, chunk=4)
    assert np.abs(out.numpy() - want).max() <= TOL
    out64 = c.attend(torch.from_numpy(q[:, :, -1:]).double(), topk=5)
    assert out64.dtype == torch.float64
    # requires_grad tensors are fine too (the cache is inference only)
    qg = torch.from_numpy(q[:, :, -1:]).requires_grad_(True)
    assert c.attend(qg, topk=5).shape == (1, 2, 1, 4)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _filled(dtype="float32", t=37, seed=6):
    q, k, v = data(2, 4, 2, t, 3, 5, seed=seed)
    c = zeta.KVCache(2, 3, 5, batch=2, chunk=4, window=3, n_curves=2, n_sink=1, dtype=dtype)
    c.extend(k, v)
    return c, q


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_save_load_round_trip(tmp_path, dtype):
    c, q = _filled(dtype)
    path = tmp_path / "c.zkv"
    c.save(path)
    d = zeta.KVCache.load(path)
    assert d.same_contents(c) and c.same_contents(d)
    assert len(d) == len(c) and d.dtype == dtype and d.settings == c.settings
    assert (d.batch, d.num_kv_heads, d.key_dim, d.value_dim) == (2, 2, 3, 5)
    assert d.nbytes > 0
    for tq in (1, 5):
        a = c.attend(q[:, :, -tq:], topk=4)
        b = d.attend(q[:, :, -tq:], topk=4)
        assert np.array_equal(a, b)
    # keep decoding both identically
    q2, k2, v2 = data(2, 4, 2, 9, 3, 5, seed=99)
    for i in range(9):
        c.extend(k2[:, :, i : i + 1], v2[:, :, i : i + 1])
        d.extend(k2[:, :, i : i + 1], v2[:, :, i : i + 1])
        assert np.array_equal(
            c.attend(q2[:, :, i : i + 1], topk=4), d.attend(q2[:, :, i : i + 1], topk=4)
        )
    assert d.same_contents(c)
    # and a cache that differs is not "the same"
    d.extend(k2[:, :, :1], v2[:, :, :1])
    assert not d.same_contents(c)
    # str paths work too
    c.save(str(tmp_path / "s.zkv"))
    assert zeta.KVCache.load(str(tmp_path / "s.zkv")).same_contents(c)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_save_load_round_trip_mean_token(tmp_path, dtype):
    c, q = _filled(dtype)
    c.save(tmp_path / "c.zkv")
    d = zeta.KVCache.load(tmp_path / "c.zkv")
    for tq in (1, 5):
        a = c.attend(q[:, :, -tq:], topk=4, mean_token=True)
        b = d.attend(q[:, :, -tq:], topk=4, mean_token=True)
        assert np.array_equal(a, b), tq


def test_save_load_empty_cache(tmp_path):
    c = zeta.KVCache(1, 2, 3, chunk=8)
    c.save(tmp_path / "e")
    d = zeta.KVCache.load(tmp_path / "e")
    assert len(d) == 0 and d.same_contents(c)


def _corrupt_cases(raw: bytes):
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    magic = bytearray(raw)
    magic[0] ^= 0xFF
    version = bytearray(raw)
    version[8:12] = (2).to_bytes(4, "little")
    version_crc = bytearray(version)  # also with a valid checksum: only the version is wrong
    version_crc[-4:] = zlib.crc32(bytes(version_crc[:-4])).to_bytes(4, "little")
    return {
        "truncated-half": (raw[: len(raw) // 2], None),
        "truncated-4": (raw[:-4], None),
        "truncated-1": (raw[:-1], None),
        "header-only": (raw[:12], None),
        "tiny": (raw[:5], None),
        "empty": (b"", None),
        "flipped-byte": (bytes(flipped), None),
        "wrong-magic": (bytes(magic), "magic"),
        "wrong-version": (bytes(version), "version"),
        "wrong-version-valid-crc": (bytes(version_crc), "version"),
        "trailing-garbage": (raw + b"\0\0\0\0", None),
    }


def test_corrupt_files_raise_value_error(tmp_path):
    c, _ = _filled()
    path = tmp_path / "c.zkv"
    c.save(path)
    raw = path.read_bytes()
    assert raw[:6] == b"ZETAKV" and int.from_bytes(raw[8:12], "little") == 1
    assert zlib.crc32(raw[:-4]) == int.from_bytes(raw[-4:], "little")
    for name, (blob, word) in _corrupt_cases(raw).items():
        bad = tmp_path / f"{name}.zkv"
        bad.write_bytes(blob)
        with pytest.raises(ValueError) as e:
            zeta.KVCache.load(bad)
        if word:
            assert word in str(e.value), (name, str(e.value))


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        zeta.KVCache.load(tmp_path / "nope.zkv")
    c, _ = _filled()
    with pytest.raises(OSError):
        c.save(tmp_path / "no_such_dir" / "c.zkv")


def test_save_replaces_atomically(tmp_path):
    a, _ = _filled(t=20, seed=1)
    b, _ = _filled(t=50, seed=2)
    path = tmp_path / "c.zkv"
    a.save(path)
    b.save(path)
    assert os.listdir(tmp_path) == ["c.zkv"]
    got = zeta.KVCache.load(path)
    assert got.same_contents(b) and not got.same_contents(a)
    a.save(path)  # and back to the smaller one: no stale tail from the bigger file
    assert zeta.KVCache.load(path).same_contents(a)
    assert os.listdir(tmp_path) == ["c.zkv"]


# ---------------------------------------------------------------------------------------------
# failed calls leave the cache as it was
# ---------------------------------------------------------------------------------------------


def _nan(a, idx):
    a = a.copy()
    a[idx] = np.nan
    return a


def test_bad_input_leaves_cache_unchanged(tmp_path):
    c, q = _filled(t=23)
    snap = tmp_path / "snap.zkv"
    c.save(snap)
    ref = zeta.KVCache.load(snap)
    n0, nb0 = len(c), c.nbytes
    out0 = c.attend(q[:, :, -3:], topk=4, mean_token=True)
    _, k, v = data(2, 4, 2, 4, 3, 5, seed=7)
    kbad_inf = k.copy()
    kbad_inf[1, 1, 3, 2] = np.inf
    cases = [
        ("k-heads", lambda: c.extend(k[:, :1], v[:, :1]), "k"),
        ("k-batch", lambda: c.extend(k[:1], v[:1]), "k"),
        ("k-dim", lambda: c.extend(k[..., :2].copy(), v), "k"),
        ("k-3d", lambda: c.extend(k[0], v), "k"),
        ("v-dim", lambda: c.extend(k, v[..., :4].copy()), "v"),
        ("v-len", lambda: c.extend(k, v[:, :, :3].copy()), "v"),
        ("v-heads", lambda: c.extend(k, np.concatenate([v, v], 1)), "v"),
        ("k-nan-last", lambda: c.extend(_nan(k, (1, 1, 3, 0)), v), "k"),
        ("k-inf", lambda: c.extend(kbad_inf, v), "k"),
        ("v-nan-last", lambda: c.extend(k, _nan(v, (1, 1, 3, 4))), "v"),
        ("k-int", lambda: c.extend(k.astype(np.int32), v), "k"),
        ("k-list", lambda: c.extend(k.tolist(), v), "k"),
        ("q-nan", lambda: c.attend(_nan(q[:, :, -1:], (0, 0, 0, 0)), topk=4), "q"),
        ("q-inf", lambda: c.attend(np.full((2, 4, 1, 3), np.inf, np.float32), topk=4), "q"),
        ("q-heads", lambda: c.attend(q[:, :3, -1:].copy(), topk=4), "q"),
        ("q-batch", lambda: c.attend(q[:1, :, -1:].copy(), topk=4), "q"),
        ("q-dim", lambda: c.attend(q[..., :2].copy(), topk=4), "q"),
        ("q-3d", lambda: c.attend(q[0], topk=4), "q"),
        ("q-too-long", lambda: c.attend(np.zeros((2, 4, 24, 3), np.float32), topk=4), "q"),
        ("topk0", lambda: c.attend(q[:, :, -1:], topk=0), "topk"),
        ("topk-float", lambda: c.attend(q[:, :, -1:], topk=2.5), "topk"),
        ("gamma0", lambda: c.attend(q[:, :, -1:], topk=4, gamma=0.0), "gamma"),
        (
            "gamma-neg",
            lambda: c.attend(q[:, :, -1:], topk=4, gamma=np.array([1, 1, -1, 1.0])),
            "gamma",
        ),
        ("gamma-nan", lambda: c.attend(q[:, :, -1:], topk=4, gamma=float("nan")), "gamma"),
        ("gamma-shape", lambda: c.attend(q[:, :, -1:], topk=4, gamma=np.ones(3)), "gamma"),
    ]
    for name, fn, arg in cases:
        with pytest.raises((ValueError, TypeError)) as e:
            fn()
        assert str(e.value).startswith(arg + ":"), (name, str(e.value))
        assert len(c) == n0 and c.nbytes == nb0, name
        assert c.same_contents(ref), name
    assert np.array_equal(c.attend(q[:, :, -3:], topk=4, mean_token=True), out0)
    # it still works afterwards, exactly like the untouched copy
    c.extend(k, v)
    ref.extend(k, v)
    assert c.same_contents(ref)


def test_attend_empty_and_bad_constructor():
    c = zeta.KVCache(2, 3, 4)
    with pytest.raises(ValueError, match="^q"):
        c.attend(np.zeros((1, 2, 1, 3), np.float32))
    assert len(c) == 0
    for kw, arg in [
        (dict(dtype="float64"), "dtype"),
        (dict(dtype="int8"), "dtype"),
        (dict(chunk=0), "chunk"),
        (dict(window=0), "window"),
        (dict(n_curves=5), "n_curves"),
        (dict(bits=11), "bits"),
        (dict(batch=0), "batch"),
    ]:
        with pytest.raises((ValueError, TypeError)) as e:
            zeta.KVCache(2, 3, 4, **kw)
        assert str(e.value).startswith(arg), (kw, str(e.value))
    for args, arg in [
        ((0, 3, 4), "num_kv_heads"),
        ((2, 9, 4), "key_dim"),
        ((2, 0, 4), "key_dim"),
        ((2, 3, 0), "value_dim"),
        ((2.0, 3, 4), "num_kv_heads"),
    ]:
        with pytest.raises((ValueError, TypeError)) as e:
            zeta.KVCache(*args)
        assert str(e.value).startswith(arg), (args, str(e.value))


def test_attend_with_no_queries_is_empty():
    c = zeta.KVCache(2, 3, 4)
    for cache_len in (0, 5):
        if cache_len:
            c.extend(np.ones((1, 2, cache_len, 3), np.float32), np.ones((1, 2, 5, 4), np.float32))
        out = c.attend(np.zeros((1, 4, 0, 3), np.float32))
        assert out.shape == (1, 4, 0, 4) and out.dtype == np.float32
    with pytest.raises(ValueError, match="^q"):
        c.attend(np.zeros((1, 3, 0, 3), np.float32))  # 3 heads: not a multiple of 2
    with pytest.raises(ValueError, match="^q"):
        c.attend(np.zeros((1, 2, 0, 2), np.float32))  # key_dim 2 != 3
