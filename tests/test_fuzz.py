"""Property-based fuzzing (hypothesis) of the cache file parser and the public API.

The same generators as ``benches/fuzz.py`` (which runs >= 100,000 inputs); here a few
thousand, in a child process under an address-space limit so that a huge size meets a real
allocation failure, and a crash shows as the child dying. ``ZETA_FUZZ_EXAMPLES`` scales the
counts (default 1: about 4,000 inputs).

Each crash found by fuzzing stays as a regression test (tests/test_cache_robust.py: the
issue's crafted files and constructor calls).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

BENCHES = Path(__file__).resolve().parent.parent / "benches"
SCALE = float(os.environ.get("ZETA_FUZZ_EXAMPLES", "1"))

CHILD = """
import importlib.util, os, random, resource, struct, sys, tempfile
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
spec = importlib.util.spec_from_file_location("zeta_fuzz", {fuzz!r})
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)
import torch  # noqa: F401 (before the limit: torch inputs are part of the mix)
import zeta

tmp = tempfile.mkdtemp(prefix="zeta-fuzz-test-")
BASES = fuzz.valid_files(tmp)
for line in open("/proc/self/status"):
    if line.startswith("VmSize:"):
        vm = int(line.split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
def CFG(n):
    return settings(max_examples=n, deadline=None, database=None, derandomize={derandomize},
                    suppress_health_check=list(HealthCheck))
EXPECTED = (ValueError, TypeError, MemoryError, OSError)
"""

FILES = """
field = st.tuples(st.integers(0, 9), st.one_of(st.sampled_from(fuzz.EDGE_U64), st.integers(0, 2**64 - 1)))

@CFG({n})
@given(base=st.integers(0, len(BASES) - 1),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=4),
       fields=st.lists(field, max_size=3),
       dtype=st.none() | st.integers(0, 255),
       cut=st.none() | st.integers(0, 10**6),
       garbage=st.binary(max_size=16),
       fix_crc=st.booleans(), seed=st.integers(0, 2**32 - 1))
def files(base, flips, fields, dtype, cut, garbage, fix_crc, seed):
    b = bytearray(BASES[base])
    for pos, bit in flips:
        b[pos % len(b)] ^= 1 << bit
    for f, v in fields:
        b[12 + 8 * f:20 + 8 * f] = struct.pack("<Q", v)
    if dtype is not None:
        b[100] = dtype
    if cut is not None:
        del b[cut % (len(b) + 1):]
    b += garbage
    if fix_crc:
        fuzz.fix_crc(b)
    p = os.path.join(tmp, "h.zkv")
    open(p, "wb").write(bytes(b))
    try:
        c = zeta.KVCache.load(p)
    except (ValueError, MemoryError):
        return
    fuzz.use_loaded(c, random.Random(seed), tmp)   # what loads must work

files()
print("files ok")

@CFG({n_bytes})
@given(blob=st.binary(max_size=400), magic=st.booleans(), fix_crc=st.booleans())
def raw_bytes(blob, magic, fix_crc):
    b = bytearray(blob)
    if magic and len(b) >= 12:
        b[:12] = b"ZETAKV\\0\\0" + struct.pack("<I", 1)
    if fix_crc:
        fuzz.fix_crc(b)
    p = os.path.join(tmp, "r.zkv")
    open(p, "wb").write(bytes(b))
    try:
        fuzz.use_loaded(zeta.KVCache.load(p), random.Random(0), tmp)
    except (ValueError, MemoryError):
        pass

raw_bytes()
print("bytes ok")

@CFG({n_api})
@given(r=st.randoms(use_true_random=False))
def api(r):
    kind, go = fuzz.api_case(r)
    try:
        go()
    except EXPECTED:
        pass

api()
print("api ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limit via /proc: Linux only")
def test_fuzz_files_and_api_in_a_child():
    n = max(1, int(2000 * SCALE))
    code = CHILD.format(fuzz=str(BENCHES / "fuzz.py"), derandomize=SCALE <= 1) + textwrap.dedent(
        FILES.format(n=n, n_bytes=max(1, int(500 * SCALE)), n_api=max(1, int(1500 * SCALE)))
    )
    env = dict(os.environ, ZETA_NUM_THREADS="2")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    assert r.stdout.split() == ["files", "ok", "bytes", "ok", "api", "ok"], r.stdout
