"""Fuzz the cache file parser and the public API: nothing may take the interpreter down.

Usage: python benches/fuzz.py --inputs 100000 [--seed 0] [--mem-mb 1024]

Inputs (chosen at random per input, reproducible from ``--seed`` and the input's number):
  file-random   random bytes, sometimes with the right magic/version and a valid CRC32
  file-mutate   a valid cache file (several dtypes/settings/lengths), mutated: bit flips,
                header fields set to edge values (0, 1, 2^k, 2^64-1, ...), truncation,
                appended garbage; the checksum is repaired for 3 in 4 of them. What loads
                is then used: attend, extend, save, load again, same_contents.
  api           zeta.attention / knn / exact_knn / recall / morton_encode / morton_decode /
                zorder / argsort / searchsorted / KVCache(...).extend/attend with random
                shapes (zero sizes included), dtypes, strides (transposed, reversed,
                broadcast zero-stride), options (huge, zero, negative, wrong type),
                NaN/inf, numpy or torch (torch attention inputs half of the time with
                requires_grad, then a backward through the output). An attention or
                attend call that accepts its inputs must return no NaN (nor gradients with
                NaN): a finding otherwise.

Inputs run in child processes under an address-space limit (``--mem-mb`` above what the
child holds after import), so a huge size meets a real allocation failure instead of the
machine's memory. A child that dies (signal, abort, non-zero exit) is a crash: it is
recorded with the input's number and the fuzzing goes on in a new child from the next
input. Outcomes per input: ok, an expected exception (ValueError, TypeError, MemoryError,
OSError), or "unexpected" (any other exception type: recorded, not a crash).

Writes ``benches/results/fuzz-<machine tag>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

EXPECTED = (ValueError, TypeError, MemoryError, OSError)
HEAD = 8 + 4 + 10 * 8 + 8 + 1
NAMED = re.compile(r"^[A-Za-z_][\w ,.'()\[\]-]*: ")
EDGE_U64 = [
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    63,
    64,
    65,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**38,
    2**40,
    2**40 + 1,
    2**48,
    2**63 - 1,
    2**63,
    2**64 - 1,
]
EDGE_INT = [
    0,
    1,
    2,
    3,
    -1,
    -(2**63),
    7,
    8,
    9,
    31,
    32,
    33,
    64,
    1 << 20,
    2**31,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    2**100,
]


# ---------------------------------------------------------------------------------------------
# the cache file parser
# ---------------------------------------------------------------------------------------------


def valid_files(tmp: str) -> List[bytes]:
    """A few valid cache files: dtypes, settings, empty and non-empty, several groups."""
    import zeta

    out = []
    rng = np.random.default_rng(0)
    for i, (dtype, b, hkv, dk, dv, t, kw) in enumerate(
        [
            ("float32", 1, 1, 3, 4, 0, dict(chunk=4)),
            ("float32", 1, 2, 3, 4, 11, dict(chunk=4, n_curves=2, n_sink=1)),
            ("float16", 2, 1, 2, 3, 9, dict(chunk=2, window=3)),
            ("bfloat16", 1, 1, 8, 2, 5, dict(chunk=1, bits=4)),
            ("float32", 1, 1, 1, 1, 70, dict(chunk=8, n_curves=2)),
        ]
    ):
        c = zeta.KVCache(hkv, dk, dv, batch=b, dtype=dtype, **kw)
        if t:
            c.extend(
                rng.standard_normal((b, hkv, t, dk)).astype(np.float32),
                (rng.standard_normal((b, hkv, t, dv)) * 100).astype(np.float32),
            )
        p = os.path.join(tmp, f"valid{i}.zkv")
        c.save(p)
        out.append(Path(p).read_bytes())
    return out


def fix_crc(b: bytearray) -> None:
    if len(b) >= 4:
        b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))


def mutate_file(r: random.Random, base: bytes) -> bytes:
    b = bytearray(base)
    for _ in range(r.randint(1, 3)):
        op = r.randrange(6)
        if op == 0 and b:
            for _ in range(r.randint(1, 8)):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        elif op == 1 and len(b) >= HEAD:
            f = r.randrange(10)
            v = r.choice(EDGE_U64) if r.random() < 0.7 else r.getrandbits(64)
            b[12 + 8 * f : 20 + 8 * f] = struct.pack("<Q", v)
        elif op == 2:
            del b[r.randrange(len(b) + 1) :]
        elif op == 3:
            b += bytes(r.getrandbits(8) for _ in range(r.randint(1, 64)))
        elif op == 4 and len(b) >= HEAD:
            b[100] = r.randrange(256) if r.random() < 0.3 else r.randrange(4)
        elif op == 5 and len(b) >= HEAD:
            b[92:100] = struct.pack(
                "<d", r.choice([0.0, -1.0, 1e-300, 1e300, float("nan"), float("inf"), 2.5])
            )
    if r.random() < 0.75:
        fix_crc(b)
    return bytes(b)


def random_file(r: random.Random) -> bytes:
    n = r.choice([0, 1, 4, 8, 12, 50, 104, 105, 200, r.randrange(1000)])
    b = bytearray(r.getrandbits(8) for _ in range(n))
    if r.random() < 0.5 and n >= 12:
        b[:12] = b"ZETAKV\0\0" + struct.pack("<I", 1)
    if r.random() < 0.5:
        fix_crc(b)
    return bytes(b)


def use_loaded(c: Any, r: random.Random, tmp: str) -> None:
    """Whatever loads must work like any cache."""
    import zeta

    n = len(c)
    if n:
        q = (
            np.random.default_rng(r.getrandbits(32))
            .standard_normal((c.batch, c.num_kv_heads, min(n, r.randint(1, 3)), c.key_dim))
            .astype(np.float32)
        )
        c.attend(
            q,
            topk=r.choice([1, 4, 2**40]),
            mean_token=r.random() < 0.5,
            exact=r.random() < 0.5,
        )
    k = np.ones((c.batch, c.num_kv_heads, 2, c.key_dim), np.float32)
    v = np.ones((c.batch, c.num_kv_heads, 2, c.value_dim), np.float32)
    c.extend(k, v)
    p = os.path.join(tmp, "resaved.zkv")
    c.save(p)
    if not zeta.KVCache.load(p).same_contents(c):
        raise AssertionError("a loaded cache did not survive save/load")


def file_case(r: random.Random, tmp: str, bases: List[bytes]) -> Tuple[str, Callable[[], None]]:
    import zeta

    if r.random() < 0.3:
        kind, blob = "file-random", random_file(r)
    else:
        kind, blob = "file-mutate", mutate_file(r, r.choice(bases))
    path = os.path.join(tmp, "fuzz.zkv")

    def go() -> None:
        Path(path).write_bytes(blob)
        use_loaded(zeta.KVCache.load(path), r, tmp)

    return kind, go


# ---------------------------------------------------------------------------------------------
# the public API
# ---------------------------------------------------------------------------------------------


class Dice:
    """Per-input choices: most inputs are valid calls (the core must run on them), the rest
    carry one or two wrong things (a dtype, a shape, a value, an option)."""

    def __init__(self, r: random.Random):
        self.r = r
        self.bad = r.random() < 0.45
        self.dtype = r.choice([np.float32] * 5 + [np.float64] * 2 + [np.float16])
        self.torch = r.random() < 0.2

    def wrong(self, p: float) -> bool:
        return self.bad and self.r.random() < p


def some_int(d: Dice, lo: int = 1, hi: int = 9) -> Any:
    r = d.r
    if not d.wrong(0.3):
        return r.randint(lo, hi)
    if r.random() < 0.7:
        return r.choice(EDGE_INT)
    return r.choice([None, 2.5, "3", True, float("nan"), np.int64(4), np.uint8(3)])


def array(d: Dice, shape: Tuple[int, ...], kind: str = "f") -> Any:
    """An array of `shape`: layout at random (every layout is valid input); a wrong dtype,
    NaN/inf or a list only when the input is meant to be bad."""
    r = d.r
    g = np.random.default_rng(r.getrandbits(32))
    if kind == "f":
        dt = d.dtype
        if d.wrong(0.1):
            dt = r.choice([np.int32, np.bool_, np.complex64, np.float64, np.float16])
        a = (g.standard_normal(shape) * r.choice([1.0, 1.0, 1e-30, 1e30, 3.0])).astype(dt)
        if a.size and a.dtype.kind == "f" and d.wrong(0.15):
            a.flat[r.randrange(a.size)] = r.choice([np.nan, np.inf, -np.inf])
    else:
        dt = r.choice([np.uint32, np.uint64] * 3 + [np.uint8, np.uint16])
        if d.wrong(0.15):
            dt = r.choice([np.int64, np.float32, np.int8])
        hi = 255 if dt in (np.uint8, np.int8) else 2**16 if dt == np.uint16 else 2**31
        a = g.integers(0, hi, size=shape).astype(dt)
    lay = r.random()
    if lay < 0.1 and a.ndim >= 2:
        a = np.swapaxes(np.ascontiguousarray(np.swapaxes(a, -1, -2)), -1, -2)  # non-contiguous
    elif lay < 0.18 and a.ndim >= 1 and a.shape[-1] > 0:
        a = a[..., ::-1]
    elif lay < 0.24 and a.ndim >= 1 and a.size:
        a = np.broadcast_to(a[..., :1], a.shape)  # zero stride, read-only
    if kind == "f" and d.torch:
        import torch

        a = torch.from_numpy(np.array(a))
    elif d.wrong(0.05) and a.size < 50:
        a = a.tolist()
    return a


def _float_tensor(t: Any) -> bool:
    return hasattr(t, "is_floating_point") and t.is_floating_point()


def shape4(d: Dice, b: int, h: int, n: int, dd: int) -> Tuple[int, ...]:
    s = [b, h, n, dd]
    if d.wrong(0.15):
        s[d.r.randrange(4)] = d.r.choice([0, 1, 2, 9])
    if d.wrong(0.05):
        s = s[: d.r.randrange(1, 4)] if d.r.random() < 0.5 else s + [2]
    return tuple(s)


def api_case(r: random.Random) -> Tuple[str, Callable[[], None]]:
    import zeta

    d = Dice(r)
    fn = r.choice(
        [
            "attention",
            "attention",
            "knn",
            "knn",
            "exact_knn",
            "recall",
            "morton_encode",
            "morton_decode",
            "zorder",
            "argsort",
            "searchsorted",
            "cache",
            "cache",
        ]
    )
    b, hkv = r.randint(1, 2), r.randint(1, 2)
    h = hkv * r.randint(1, 2)
    s = r.choice([r.randint(1, 40), r.randint(40, 300)])
    n = r.randint(1, s) if r.random() < 0.7 else s
    dk, dv = (r.randint(1, 8) if r.random() < 0.3 else 3), r.randint(1, 9)
    opts: Dict[str, Any] = {}
    for name, gen in [
        ("chunk", lambda: some_int(d, 1, 16)),
        ("window", lambda: some_int(d, 1, 8)),
        ("n_curves", lambda: some_int(d, 1, dk + 1)),
        ("bits", lambda: some_int(d, 1, max(1, 32 // dk))),
        ("n_sink", lambda: some_int(d, 0, 4)),
        ("causal", lambda: r.choice([True, False]) if not d.wrong(0.3) else None),
        ("exact", lambda: r.choice([True, False]) if not d.wrong(0.2) else 1),
    ]:
        if r.random() < 0.35:
            opts[name] = gen()
    if opts.get("causal") is False:
        n = s if r.random() < 0.5 else n
    topk = some_int(d, 1, min(s, 12))

    if fn == "attention":
        q, k, v = (
            array(d, shape4(d, b, h, n, dk)),
            array(d, shape4(d, b, hkv, s, dk)),
            array(d, shape4(d, b, hkv, s, dv)),
        )
        if r.random() < 0.3:
            opts["mean_token"] = r.choice([True, False])
        if r.random() < 0.3:
            opts["gamma"] = (
                # the accepted range's ends too: [2^-24, 2^62]
                r.choice([0.5, 2.0, np.linspace(0.5, 1, h), 2.0**-24, 2.0**62])
                if not d.wrong(0.5)
                else r.choice(
                    [0.0, -1.0, float("nan"), float("inf"), np.ones(h + 1), "x", 1e-12, 1e30]
                )
            )
        # torch inputs: half of the time through autograd too (forward indices into the
        # backward custom op, with every shape and option the forward accepted)
        grad = d.torch and r.random() < 0.5

        def go():
            args = [q, k, v]
            if grad:
                args = [t.detach().requires_grad_() if _float_tensor(t) else t for t in args]
            out = zeta.attention(*args, topk=topk, **opts)
            _check_output(out)
            if getattr(out, "requires_grad", False):
                out.float().sum().backward()
                for a in args:
                    if getattr(a, "grad", None) is not None:
                        _check_output(a.grad)

        return fn, go
    if fn in ("knn", "exact_knn"):
        q, k = array(d, shape4(d, b, h, n, dk)), array(d, shape4(d, b, hkv, s, dk))
        if fn == "exact_knn":
            cz = {"causal": opts["causal"]} if "causal" in opts else {}
            return fn, lambda: zeta.exact_knn(q, k, topk, **cz)
        return fn, lambda: zeta.knn(q, k, topk, **opts)
    if fn == "recall":
        q, k = array(d, shape4(d, b, h, n, dk)), array(d, shape4(d, b, hkv, s, dk))
        lo = -1 if not d.wrong(0.5) else -3
        idx = np.random.default_rng(r.getrandbits(32)).integers(
            lo, s + (3 if d.bad else 0), size=(b, h, n, r.randint(1, 5))
        )
        return fn, lambda: zeta.recall(q, k, idx)
    rows = r.choice([0, 1, 5, 33, 300]) if d.bad else r.choice([1, 5, 33, 300])
    if fn == "morton_encode":
        c = array(d, (rows, r.randint(1, 8) if not d.wrong(0.3) else r.choice([0, 9])), kind="u")
        bits = some_int(d, 1, 8) if r.random() < 0.7 else None
        return fn, lambda: zeta.morton_encode(c, bits=bits)
    if fn == "morton_decode":
        c = array(d, (rows,), kind="u")
        dims, bits = some_int(d, 1, 8), some_int(d, 1, 8) if r.random() < 0.7 else None
        return fn, lambda: zeta.morton_decode(c, dims, bits=bits)
    if fn == "zorder":
        x = array(d, (rows, r.randint(1, 8) if not d.wrong(0.3) else r.choice([0, 9])))
        bits, shift = (some_int(d, 1, 8) if r.random() < 0.7 else None), some_int(d, 0, 9)
        return fn, lambda: zeta.zorder(x, bits=bits, shift=shift)
    if fn == "argsort":
        c = array(d, tuple(r.randint(1, 40) for _ in range(r.randint(1, 3))), kind="u")
        return fn, lambda: zeta.argsort(c)
    if fn == "searchsorted":
        m = r.randint(1, 3)
        sc = np.sort(array(d, (m, r.randint(1, 50)), kind="u"), axis=-1)
        qq = array(d, (m if not d.wrong(0.3) else m + 1, r.randint(1, 9)), kind="u")
        if isinstance(qq, np.ndarray) and qq.dtype != sc.dtype and not d.bad:
            qq = qq.astype(sc.dtype)
        side = r.choice(["left", "right"]) if not d.wrong(0.3) else r.choice(["middle", None])
        return fn, lambda: zeta.searchsorted(sc, qq, side=side)

    # the KV cache: constructor arguments, then a few extends/attends
    ctor: Dict[str, Any] = dict(batch=b)
    for name in ("chunk", "window", "n_curves", "bits", "n_sink"):
        if name in opts:
            ctor[name] = opts[name]
    if r.random() < 0.3:
        ctor["dtype"] = r.choice(["float16", "bfloat16", "float32"]) if not d.wrong(0.5) else "int8"
    args = [hkv, dk, dv]
    if d.wrong(0.3):
        big = r.choice(EDGE_INT)
        which = r.randrange(4)
        if which < 3:
            args[which] = big
        else:
            ctor["batch"] = big
    steps = [(r.random() < 0.5, r.randint(1, 70)) for _ in range(r.randint(1, 5))]

    def go() -> None:
        c = zeta.KVCache(*args, **ctor)
        for is_extend, t in steps:
            if is_extend or len(c) == 0:
                c.extend(
                    array(d, shape4(d, c.batch, c.num_kv_heads, t, c.key_dim)),
                    array(d, shape4(d, c.batch, c.num_kv_heads, t, c.value_dim)),
                )
            elif r.random() < 0.25:
                # The fused decode call ZetaAttention makes (private: the layer hands it a
                # contiguous float32 (B, T, W) array and ints, so only shapes and values vary).
                sizes = [x for x in EDGE_INT if 0 <= x < 2**63]  # a layer's head count: 64 bits
                hq = c.num_kv_heads * r.randint(1, 2) if not d.wrong(0.2) else r.choice(sizes)
                small = 0 <= hq <= 64
                w = ((hq if small else 1) + c.num_kv_heads) * c.key_dim
                w += c.num_kv_heads * c.value_dim + (r.choice([-1, 1]) if d.wrong(0.2) else 0)
                g = np.random.default_rng(r.getrandbits(32))
                qkv = g.standard_normal((c.batch, t, w)).astype(np.float32)
                if d.wrong(0.15) and qkv.size:
                    qkv.flat[r.randrange(qkv.size)] = r.choice([np.nan, np.inf])
                c._c.decode_packed(
                    qkv,
                    hq,
                    r.choice([1, 4, 2**40]),
                    np.full(hq if small else 1, 0.9),
                    r.random() < 0.3,
                    r.choice([None, 1, 4, 2**40]),
                    r.random() < 0.3,
                )
            else:
                hq = c.num_kv_heads * r.randint(1, 2)
                _check_output(
                    c.attend(
                        array(d, shape4(d, c.batch, hq, min(t, len(c)), c.key_dim)),
                        topk=some_int(d, 1, 12),
                        mean_token=r.random() < 0.3,
                        gamma=r.choice([1.0, 0.5, 2.0**-24, 2.0**62])
                        if not d.wrong(0.2)
                        else r.choice([-1.0, 1e-12]),
                        exact=r.random() < 0.3 if not d.wrong(0.1) else "yes",
                    )
                )

    return fn, go


def _check_output(out: Any) -> None:
    """A call that accepted its inputs (all finite) returns no NaN: a finding otherwise (an
    AssertionError is no expected exception)."""
    a = out.detach().float().numpy() if hasattr(out, "detach") else np.asarray(out)
    if a.size and np.isnan(a).any():
        raise AssertionError(f"NaN in an output of shape {a.shape} from finite inputs")


def make_case(r: random.Random, tmp: str, bases: List[bytes]) -> Tuple[str, Callable[[], None]]:
    """One fuzz input from `r`: (kind, the call). Also used by tests/test_fuzz.py."""
    if r.random() < 0.5:
        return file_case(r, tmp, bases)
    kind, go = api_case(r)
    return "api-" + kind, go


def run_one(r: random.Random, tmp: str, bases: List[bytes]) -> Tuple[str, str, str]:
    """(kind, outcome, detail): outcome ok, an expected exception's name, or 'unexpected'."""
    try:
        kind, go = make_case(r, tmp, bases)
    except EXPECTED as e:  # building the input itself (e.g. torch refusing a dtype)
        return "setup", type(e).__name__, ""
    try:
        go()
        return kind, "ok", ""
    except EXPECTED as e:
        name, msg = type(e).__name__, str(e)
    except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
        return kind, "unexpected", f"{type(e).__name__}: {str(e)[:200]}"
    # Out of the except block: the traceback and the inputs it holds are gone. Bad input gets
    # a message that names the argument ("q: ...", "out of memory: ..."); numpy's own
    # "Unable to allocate ..." while the harness builds a huge input is not zeta's message.
    try:
        named = msg.startswith("Unable to allocate") or NAMED.match(msg) is not None
    except MemoryError:  # the harness itself short of memory: not a finding about zeta
        named = True
    return kind, name, "" if named else f"unnamed {name}: {msg[:200]}"


# ---------------------------------------------------------------------------------------------
# driver: children under an address-space limit, crash = child death
# ---------------------------------------------------------------------------------------------


def worker(seed: int, start: int, end: int, mem_mb: int) -> None:
    import resource

    import torch  # noqa: F401 - imported before the limit (torch inputs are part of the mix)

    import zeta  # noqa: F401

    tmp = tempfile.mkdtemp(prefix="zeta-fuzz-")
    bases = valid_files(tmp)
    vm = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            vm = int(line.split()[1]) * 1024
    lim = vm + (mem_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (lim, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = sys.stdout
    for i in range(start, end):
        out.write(f"B {i}\n")
        out.flush()
        kind, outcome, detail = run_one(random.Random(seed * 1_000_003 + i), tmp, bases)
        out.write("R " + json.dumps([i, kind, outcome, detail]) + "\n")
    out.flush()


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space a child may add")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", nargs=2, type=int, metavar=("START", "END"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.seed, a.worker[0], a.worker[1], a.mem_mb)
        return 0
    env = dict(os.environ, ZETA_NUM_THREADS=os.environ.get("ZETA_NUM_THREADS", "1"))
    t0 = time.time()
    counts: Counter = Counter()
    per_kind: Dict[str, Counter] = {}
    crashes: List[Dict[str, Any]] = []
    unexpected: Dict[str, Dict[str, Any]] = {}
    unnamed: Dict[str, Dict[str, Any]] = {}
    i = 0
    while i < a.inputs:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--seed",
            str(a.seed),
            "--mem-mb",
            str(a.mem_mb),
            "--worker",
            str(i),
            str(a.inputs),
        ]
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert p.stdout is not None and p.stderr is not None
        current = None
        for line in p.stdout:
            if line.startswith("B "):
                current = int(line[2:])
            elif line.startswith("R "):
                j, kind, outcome, detail = json.loads(line[2:])
                counts[outcome] += 1
                per_kind.setdefault(kind, Counter())[outcome] += 1
                if detail.startswith("unnamed"):
                    u = unnamed.setdefault(
                        detail[:120], {"first_input": j, "kind": kind, "count": 0}
                    )
                    u["count"] += 1
                elif outcome == "unexpected":
                    u = unexpected.setdefault(
                        detail[:120], {"first_input": j, "kind": kind, "count": 0}
                    )
                    u["count"] += 1
                current, i = None, j + 1
                done = i
                if done % 5000 == 0:
                    print(
                        f"  {done}/{a.inputs} inputs, {len(crashes)} crashes, "
                        f"{time.time() - t0:.0f} s",
                        flush=True,
                    )
        err = p.stderr.read()
        rc = p.wait()
        if rc != 0 or current is not None:
            bad = current if current is not None else i
            crashes.append({"input": bad, "returncode": rc, "stderr_tail": err[-1500:]})
            print(f"CRASH at input {bad} (rc {rc}): {err[-300:]}", flush=True)
            counts["crash"] += 1
            i = bad + 1
    secs = time.time() - t0
    print(
        f"{a.inputs} inputs in {secs:.0f} s: {dict(counts)}; crashes: {len(crashes)}; "
        f"unexpected exception kinds: {len(unexpected)}"
    )
    for k, v in sorted(per_kind.items()):
        print(f"  {k:22s} {dict(v)}")
    for d, u in unexpected.items():
        print(f"  unexpected x{u['count']} ({u['kind']}, first input {u['first_input']}): {d}")
    for d, u in unnamed.items():
        print(f"  message without an argument name x{u['count']} ({u['kind']}): {d}")
    if not a.no_save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import machine_tag

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"fuzz-{machine_tag()}-{datetime.date.today().isoformat()}.json"
        path.write_text(
            json.dumps(
                {
                    "command": "python benches/fuzz.py " + " ".join(argv),
                    "inputs": a.inputs,
                    "seed": a.seed,
                    "mem_mb": a.mem_mb,
                    "seconds": round(secs, 1),
                    "outcomes": dict(counts),
                    "per_kind": {k: dict(v) for k, v in per_kind.items()},
                    "crashes": crashes,
                    "unexpected": unexpected,
                    "unnamed_messages": unnamed,
                },
                indent=1,
            )
        )
        print(f"wrote {path}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
