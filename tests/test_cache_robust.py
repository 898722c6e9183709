"""The interpreter survives untrusted cache files, absurd sizes and real allocation failures
(each checked in a child process, under an address-space limit where it matters), and one
KVCache serves many threads: concurrent attends, serialised extends, results equal to a
serial order of the calls."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import zeta

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="rlimits and /proc: Linux only")

HEAD = 8 + 4 + 10 * 8 + 8 + 1


def crafted(fields, dcode=0, body=b"", version=1):
    """A cache file with the given header fields (batch, kv_heads, key_dim, value_dim, chunk,
    window, n_curves, n_sink, bits, length) and a valid checksum."""
    w = b"ZETAKV\0\0" + struct.pack("<I", version) + struct.pack("<10Q", *fields)
    w += struct.pack("<d", 1.0) + bytes([dcode]) + body
    return w + struct.pack("<I", zlib.crc32(w))


# The issue's files: 105 bytes, valid checksum, batch 2^20 x kv heads 2^10, length 0 (the old
# loader allocated 172 GB for that), and the same with value_dim 2^38.
ISSUE_FILES = {
    "groups-2^30": [1 << 20, 1 << 10, 3, 4, 64, 0, 1, 0, 10, 0],
    "value_dim-2^38": [1, 1, 3, 1 << 38, 64, 0, 1, 0, 10, 0],
}

CHILD_PRELUDE = """
import os, resource, signal, sys
import numpy as np
import zeta
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
def limit_as(extra):
    lim = vm_bytes() + extra
    resource.setrlimit(resource.RLIMIT_AS, (lim, resource.getrlimit(resource.RLIMIT_AS)[1]))
def outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as e:  # the type is the result
        return type(e).__name__
"""


# zeta's Rust code allocates through mimalloc, which reserves address space in 1 GiB arenas
# and 32 MiB segments: an address-space limit does not see each allocation. The sweeps across
# every allocation site run with the system allocator (the error paths are the same code).
SYSTEM_ALLOCATOR = {"ZETA_ALLOCATOR": "system"}


def run_child(body: str, timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    """Runs `body` in a fresh interpreter (2 zeta threads); the test asserts it exits 0."""
    env = dict(os.environ, ZETA_NUM_THREADS="2", PYTHONFAULTHANDLER="1", **env_extra)
    code = CHILD_PRELUDE + textwrap.dedent(body)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert r.returncode == 0, f"child died (rc {r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
    return r


def results(r: subprocess.CompletedProcess) -> dict:
    out = {}
    for line in r.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------
# untrusted files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ISSUE_FILES))
def test_issue_files_raise_value_error_in_process(tmp_path, name):
    blob = crafted(ISSUE_FILES[name])
    assert len(blob) == 105
    p = tmp_path / "x.zkv"
    p.write_bytes(blob)
    with pytest.raises(ValueError, match="corrupt zeta file"):
        zeta.KVCache.load(p)


def test_crafted_headers_raise(tmp_path):
    cases = {
        "overflowing-product": [1 << 40, 1 << 40, 3, 4, 64, 0, 1, 0, 10, 1 << 40],
        "length-beyond-body": [1, 1, 3, 4, 64, 0, 1, 0, 10, 1 << 30],
        "key_dim-0": [1, 1, 0, 4, 64, 0, 1, 0, 10, 0],
        "key_dim-9": [1, 1, 9, 4, 64, 0, 1, 0, 10, 0],
        "chunk-0": [1, 1, 3, 4, 0, 0, 1, 0, 10, 0],
        "batch-0": [0, 1, 3, 4, 64, 0, 1, 0, 10, 0],
        "n_curves-0": [1, 1, 3, 4, 64, 0, 0, 0, 10, 0],
        "bits-2^33": [1, 1, 3, 4, 64, 0, 1, 0, 1 << 33, 0],
        "huge-u64": [2**64 - 1] * 10,
    }
    for name, fields in cases.items():
        p = tmp_path / f"{name}.zkv"
        p.write_bytes(crafted(fields))
        with pytest.raises(ValueError, match="corrupt zeta file"):
            zeta.KVCache.load(p)
    p = tmp_path / "dtype.zkv"
    p.write_bytes(crafted([1, 1, 3, 4, 64, 0, 1, 0, 10, 0], dcode=7))
    with pytest.raises(ValueError, match="dtype"):
        zeta.KVCache.load(p)
    # A well-formed crafted file loads, and holds what it says.
    body = np.arange(2 * 3 * 5 * (3 + 2), dtype=np.float32)
    keys_vals = b"".join(body[g * 25 : (g + 1) * 25].tobytes() for g in range(6))
    p = tmp_path / "ok.zkv"
    p.write_bytes(crafted([2, 3, 3, 2, 4, 0, 1, 0, 10, 5], body=keys_vals))
    c = zeta.KVCache.load(p)
    assert len(c) == 5 and (c.batch, c.num_kv_heads, c.key_dim, c.value_dim) == (2, 3, 3, 2)


def test_issue_files_in_a_child_under_an_address_space_limit(tmp_path):
    paths = []
    for name, fields in ISSUE_FILES.items():
        p = tmp_path / f"{name}.zkv"
        p.write_bytes(crafted(fields))
        paths.append(str(p))
    r = run_child(f"""
        limit_as(1 << 30)
        for p in {paths!r}:
            print(p, "=", outcome(lambda: zeta.KVCache.load(p)))
    """)
    got = results(r)
    assert list(got.values()) == ["ValueError"] * len(paths), got


# ---------------------------------------------------------------------------------------------
# absurd sizes
# ---------------------------------------------------------------------------------------------


def test_absurd_constructor_arguments_raise():
    for args, kw, arg in [
        ((1 << 20, 3, 4), dict(batch=1 << 10), "num_kv_heads"),
        ((1, 3, 1 << 40), {}, "value_dim"),
        ((1, 3, 4), dict(batch=1 << 62), "batch"),
        ((2**64, 3, 4), {}, "num_kv_heads"),
        ((1, 3, 2**100), {}, "value_dim"),
        ((1, 3, 4), dict(batch=2**70), "batch"),
        ((1, 3, 4), dict(window=2**64), "window"),
        ((1, 3, 4), dict(n_sink=2**100), "n_sink"),
    ]:
        with pytest.raises(ValueError) as e:
            zeta.KVCache(*args, **kw)
        assert str(e.value).startswith(arg + ":"), (args, kw, str(e.value))


def test_huge_topk_and_window_are_not_errors():
    c = zeta.KVCache(2, 3, 4, chunk=4)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 10, 3)).astype(np.float32)
    v = rng.standard_normal((1, 2, 10, 4)).astype(np.float32)
    c.extend(k, v)
    q = rng.standard_normal((1, 2, 1, 3)).astype(np.float32)
    want = c.attend(q, topk=10, window=64)
    for topk, window in [(1 << 40, None), (2**80, 2**80), (10, 2**63)]:
        got = c.attend(q, topk=topk, window=window)
        assert np.array_equal(got, want), (topk, window)


def test_absurd_sizes_in_a_child_under_an_address_space_limit():
    # Each call either succeeds or raises MemoryError/ValueError; the child must live.
    r = run_child("""
        limit_as(1 << 30)
        Z = zeta.KVCache
        cases = {
            "issue-groups": lambda: Z(num_kv_heads=1 << 20, key_dim=3, value_dim=4, batch=1 << 10),
            "issue-value_dim": lambda: Z(num_kv_heads=1, key_dim=3, value_dim=1 << 40),
            "groups-2^24": lambda: Z(4096, 3, 4, batch=4096),
            "value_dim-2^24": lambda: Z(1, 3, 1 << 24, batch=1 << 10),
            "value_dim-2^24-one": lambda: Z(1, 3, 1 << 24),
        }
        for name, fn in cases.items():
            print(name, "=", outcome(fn))
    """)
    got = results(r)
    assert got["issue-groups"] == "ValueError", got
    assert got["issue-value_dim"] == "ValueError", got
    assert got["groups-2^24"] == "MemoryError", got
    assert got["value_dim-2^24"] == "MemoryError", got
    assert got["value_dim-2^24-one"] == "ok", got


def test_constructor_at_every_memory_limit():
    # Regression (fuzz input 93142): with room for the size check but not for the small
    # per-group blocks, building the error message itself aborted. Sweep the limit across
    # the cache's footprint: each try is a cache or a MemoryError, never an abort.
    r = run_child(
        """
        import gc
        base = vm_bytes()
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        seen = set()
        # up to 640 MB: the cache needs ~200 MB and its size check probes twice that
        for mb in range(0, 640, 8):
            resource.setrlimit(resource.RLIMIT_AS, (base + (mb << 20), hard))
            seen.add(outcome(lambda: zeta.KVCache(1 << 17, 5, 9, batch=2)))
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
            gc.collect()
        print("seen", "=", sorted(seen))
    """,
        **SYSTEM_ALLOCATOR,
    )
    assert results(r)["seen"] == "['MemoryError', 'ok']", r.stdout


def test_real_allocation_failures_raise_memory_error_and_change_nothing():
    # Inputs that fit under the limit, work that does not: the index, outputs, cache growth.
    r = run_child(
        """
        rng = np.random.default_rng(0)
        c = zeta.KVCache(1, 3, 64, chunk=64)
        k0 = rng.standard_normal((1, 1, 300, 3)).astype(np.float32)
        v0 = rng.standard_normal((1, 1, 300, 64)).astype(np.float32)
        c.extend(k0, v0)
        q1 = rng.standard_normal((1, 1, 1, 3)).astype(np.float32)
        before = c.attend(q1, topk=8)
        S = 4_000_000
        k = rng.standard_normal((1, 1, S, 3)).astype(np.float32)
        v = np.ones((1, 1, S, 64), np.float32)   # 1 GB
        q = rng.standard_normal((1, 1, S, 3)).astype(np.float32)
        limit_as(300 << 20)   # room for small work, not for a copy of v or an index over S
        print("extend", "=", outcome(lambda: c.extend(k, v)))
        print("len", "=", len(c))
        print("same", "=", bool(np.array_equal(c.attend(q1, topk=8), before)))
        print("attention", "=", outcome(lambda: zeta.attention(q, k, v, topk=8)))
        print("knn", "=", outcome(lambda: zeta.knn(q, k, 64)))
        print("attend_prefill", "=", outcome(lambda: c.attend(q[:, :, :300], topk=8, mean_token=True)))
        # and it still works once memory is back
        resource.setrlimit(resource.RLIMIT_AS, (resource.getrlimit(resource.RLIMIT_AS)[1],) * 2)
        c.extend(k0[:, :, :10], v0[:, :, :10])
        print("after", "=", len(c))
    """,
        timeout=300,
    )
    got = results(r)
    assert got["extend"] == "MemoryError", got
    assert got["len"] == "300" and got["same"] == "True", got
    for name in ("attention", "knn"):
        assert got[name] == "MemoryError", (name, got)
    assert got["attend_prefill"] in ("ok", "MemoryError"), got
    assert got["after"] == "310", got


def test_save_under_a_file_size_limit_keeps_the_old_file(tmp_path):
    r = run_child(f"""
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails: EFBIG
        rng = np.random.default_rng(0)
        def filled(t):
            c = zeta.KVCache(2, 3, 16, chunk=8)
            c.extend(rng.standard_normal((1, 2, t, 3)).astype(np.float32),
                     rng.standard_normal((1, 2, t, 16)).astype(np.float32))
            return c
        small, big = filled(10), filled(5000)
        path = {str(tmp_path / "c.zkv")!r}
        small.save(path)
        old = open(path, "rb").read()
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        print("save", "=", outcome(lambda: big.save(path)))
        print("intact", "=", open(path, "rb").read() == old)
        print("files", "=", sorted(os.listdir(os.path.dirname(path))))
        print("loads", "=", zeta.KVCache.load(path).same_contents(small))
    """)
    got = results(r)
    assert got == {"save": "OSError", "intact": "True", "files": "['c.zkv']", "loads": "True"}, got


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


def _cache_keys(cache, tmp_path, name):
    """The cache's keys per group, read back from its saved file (format: header, then per
    group keys (len x key_dim f32) and values)."""
    p = tmp_path / name
    cache.save(p)
    raw = p.read_bytes()
    n = len(cache)
    b, hkv, dk, dv = cache.batch, cache.num_kv_heads, cache.key_dim, cache.value_dim
    per = n * (dk * 4 + dv * 4)
    return [
        np.frombuffer(raw[HEAD + g * per : HEAD + g * per + n * dk * 4], np.float32).reshape(n, dk)
        for g in range(b * hkv)
    ]


def test_one_cache_many_threads_equals_a_serial_order(tmp_path):
    rng = np.random.default_rng(5)
    b, hkv, h, dk, dv = 1, 2, 4, 3, 8
    kw = dict(batch=b, chunk=4, n_curves=2)
    cache = zeta.KVCache(hkv, dk, dv, **kw)
    k0 = rng.standard_normal((b, hkv, 7, dk)).astype(np.float32)
    v0 = rng.standard_normal((b, hkv, 7, dv)).astype(np.float32)
    cache.extend(k0, v0)
    n_ext, n_att = 20, 100
    blocks = {}  # (writer, i) -> (k, v)
    for w in range(2):
        for i in range(n_ext):
            t = int(rng.integers(1, 9))
            blocks[w, i] = (
                rng.standard_normal((b, hkv, t, dk)).astype(np.float32),
                rng.standard_normal((b, hkv, t, dv)).astype(np.float32),
            )
    queries = [rng.standard_normal((b, h, 1, dk)).astype(np.float32) for _ in range(4)]
    errors, attended = [], []
    start = threading.Barrier(6)

    def writer(w):
        start.wait()
        for i in range(n_ext):
            try:
                cache.extend(*blocks[w, i])
            except Exception as e:  # noqa: BLE001 - every failure counts
                errors.append(repr(e))

    def reader(r):
        start.wait()
        for _ in range(n_att):
            try:
                attended.append((r, cache.attend(queries[r], topk=6, mean_token=r % 2 == 1)))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [], errors[:5]
    assert len(attended) == 4 * n_att
    # The order the extends took effect, read off the final keys; each writer's own order kept.
    keys = _cache_keys(cache, tmp_path, "final.zkv")[0]
    pos, order = 7, []
    while pos < len(keys):
        hit = [
            wi
            for wi, (kb, _) in blocks.items()
            if wi not in order
            and pos + kb.shape[2] <= len(keys)
            and np.array_equal(keys[pos : pos + kb.shape[2]], kb[0, 0])
        ]
        assert len(hit) == 1, (pos, hit)
        order.append(hit[0])
        pos += blocks[hit[0]][0].shape[2]
    assert sorted(order) == sorted(blocks)
    for w in range(2):
        assert [i for ww, i in order if ww == w] == list(range(n_ext))
    # Serial replay in that order: the same cache, and every attend equals the serial
    # output at one of the states the replay passes through.
    replay = zeta.KVCache(hkv, dk, dv, **kw)
    replay.extend(k0, v0)
    states = [[replay.attend(q, topk=6, mean_token=r % 2 == 1) for r, q in enumerate(queries)]]
    for wi in order:
        replay.extend(*blocks[wi])
        states.append(
            [replay.attend(q, topk=6, mean_token=r % 2 == 1) for r, q in enumerate(queries)]
        )
    assert replay.same_contents(cache)
    seen = set()
    for r, out in attended:
        match = [s for s, st in enumerate(states) if np.array_equal(st[r], out)]
        assert match, f"reader {r}: an attend equal to no serial state"
        seen.add(match[0])
    print("serial states seen by attends:", len(seen), "of", len(states))


def test_failed_extend_under_threads_changes_nothing():
    c = zeta.KVCache(1, 3, 4, chunk=4)
    rng = np.random.default_rng(1)
    good = [
        (
            rng.standard_normal((1, 1, 3, 3)).astype(np.float32),
            rng.standard_normal((1, 1, 3, 4)).astype(np.float32),
        )
        for _ in range(30)
    ]
    bad_k = good[0][0].copy()
    bad_k[0, 0, 1, 1] = np.nan

    def work(i):
        if i % 2:
            with pytest.raises(ValueError, match="^k"):
                c.extend(bad_k, good[0][1])
        else:
            c.extend(*good[i // 2])

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(work, range(60)))
    assert len(c) == 90


def test_attention_and_knn_from_many_threads_equal_serial():
    rng = np.random.default_rng(3)
    inputs = []
    for i in range(8):
        n = 100 + 37 * i
        q = rng.standard_normal((1, 4, n, 3)).astype(np.float32)
        k = rng.standard_normal((1, 2, n, 3)).astype(np.float32)
        v = rng.standard_normal((1, 2, n, 16)).astype(np.float32)
        inputs.append((q, k, v))

    def attn(x):
        return zeta.attention(*x, topk=8, chunk=16, n_curves=2, mean_token=True)

    def knn(x):
        return zeta.knn(x[0], x[1], 8, chunk=16)

    want_a = [attn(x) for x in inputs]
    want_k = [knn(x) for x in inputs]
    with ThreadPoolExecutor(8) as ex:
        for _ in range(3):
            got_a = list(ex.map(attn, inputs))
            got_k = list(ex.map(knn, inputs))
            for a, b in zip(got_a, want_a):
                assert np.array_equal(a, b)
            for (i1, d1), (i2, d2) in zip(got_k, want_k):
                assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_every_entry_point_at_every_memory_limit(tmp_path):
    step = int(os.environ.get("ZETA_MEM_SWEEP_MB", "8"))  # 1: the thorough sweep
    # Each call's allocations fail one after another as the limit rises through its need:
    # a result or a Python exception (MemoryError), never an abort. This is how the
    # allocation sites were swept, kept as a test.
    r = run_child(
        f"""
        import gc, torch
        rng = np.random.default_rng(0)
        N, S = 3000, 6000
        q = rng.standard_normal((1, 2, N, 3)).astype(np.float32)
        k = rng.standard_normal((1, 1, S, 3)).astype(np.float32)
        v = rng.standard_normal((1, 1, S, 32)).astype(np.float32)
        codes = rng.integers(0, 2**40, (4, 50_000)).astype(np.uint64)
        scodes = np.sort(codes, axis=-1)
        path = {str(tmp_path / "c.zkv")!r}
        small = zeta.KVCache(1, 3, 32, chunk=16)
        small.extend(k, v)
        small.save(path)
        def backward():
            qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
            zeta.attention(qt, kt, vt, topk=8, mean_token=True).sum().backward()
        def cache_roundtrip():
            c = zeta.KVCache(1, 3, 32, chunk=16)
            c.extend(k, v)
            c.attend(q[:, :, -500:], topk=8, mean_token=True)
            c.save(path + ".2")
            zeta.KVCache.load(path)
        calls = {{
            "attention": lambda: zeta.attention(q, k, v, topk=8, mean_token=True, n_curves=2),
            "backward": backward,
            "knn": lambda: zeta.knn(q, k, 16, n_curves=3),
            "exact_knn": lambda: zeta.exact_knn(q, k, 16),
            "argsort": lambda: zeta.argsort(codes),
            "searchsorted": lambda: zeta.searchsorted(scodes, codes),
            "zorder": lambda: zeta.zorder(np.tile(k.reshape(-1, 3), (40, 1))),
            "morton": lambda: zeta.morton_decode(zeta.morton_encode(codes.reshape(-1, 2) % 1024), 2),
            "cache": cache_roundtrip,
        }}
        import ctypes
        trim = ctypes.CDLL("libc.so.6").malloc_trim
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        for fn in calls.values():
            fn()  # warm: lazy imports and caches of numpy/torch are not what is measured
        for name, fn in calls.items():
            seen = set()
            for mb in list(range(0, 64, {step})) + list(range(64, 400, 6 * {step})):
                trim(0)  # freed heap back to the system: the limit is what the call may add
                resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (mb << 20), hard))
                seen.add(outcome(fn))
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
                gc.collect()
            print(name, "=", sorted(seen))
        """,
        timeout=600,
        # One malloc arena, large blocks mapped and unmapped at once: what a call allocates
        # is what the limit sees (per-thread arenas hold reserved address space).
        MALLOC_ARENA_MAX="1",
        MALLOC_MMAP_THRESHOLD_="65536",
        **SYSTEM_ALLOCATOR,
    )
    got = results(r)
    assert len(got) == 9, r.stdout
    for name, seen in got.items():
        # The child lived through every limit; each call ran somewhere and failed cleanly
        # below that (torch's autograd may raise its own errors first, also cleanly).
        assert "ok" in seen and "MemoryError" in seen, (name, seen, r.stdout)
