"""The benchmark suites in benches/ run end to end (tiny sizes) and write their JSON, so
they cannot drift from the API between `make bench` runs."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"

# suite -> settings that make it take a few seconds
TINY = {
    "attention": dict(
        ATTN_N_QUICK=[2048],
        SDPA_MAX_N_QUICK={"fwd": 2048, "fwdbwd": 2048},
        ATTN_EXACT_N_QUICK=[2048],
    ),
    "recall": dict(RECALL_N_QUICK=2048, WINDOWS=[8, 32], CURVES=[1, 2]),
    "knn": dict(KNN_N_QUICK=2048, WINDOWS=[8], CURVES=[1], HNSW_BUILDS=[(8, 32)], HNSW_EFS=[10]),
    "decode": dict(DEC_S_QUICK=[2048], DEC_STEPS=3, GOAL_DEC_S=2048, _VBLOCK=1024),
}


@pytest.fixture
def suite_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))

    def load(name):
        mod = importlib.import_module(f"bench_{name}")
        for attr, value in TINY[name].items():
            assert hasattr(mod, attr), attr
            monkeypatch.setattr(mod, attr, value)
        return mod

    yield load
    for name in list(sys.modules):
        if name == "_common" or name.startswith("bench_"):
            del sys.modules[name]


@pytest.mark.parametrize("name", list(TINY))
def test_suite_runs_and_writes_json(name, suite_module, tmp_path, capsys):
    pytest.importorskip("torch")
    rep = suite_module(name).main(["--quick", "--out", str(tmp_path)])
    files = list(tmp_path.glob(f"{name}-*.json"))
    assert len(files) == 1, files
    saved = json.loads(files[0].read_text())
    assert saved["suite"] == name and saved["quick"] is True
    assert saved["machine"]["tag"] and saved["load_avg"]["end"] is not None
    assert rep["wall_s"] > 0
    assert "goal:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "script,args", [("bench_morton.py", ["--sizes", "2000"]), ("bench_sort_search.py", [])]
)
def test_primitive_suites_run_and_write_json(script, args, tmp_path):
    import subprocess

    cmd = [sys.executable, str(BENCHES / script), "--quick", "--out", str(tmp_path), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=240)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["machine"]["tag"]


def test_zeta_bench_outside_a_checkout_says_how_to_run(tmp_path, monkeypatch, capsys):
    from zeta.cli import BENCH_SUITES, main

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "make bench" in err and all(s in err for s in BENCH_SUITES)
    assert sorted(f"bench_{s}.py" for s in BENCH_SUITES) == sorted(
        p.name for p in BENCHES.glob("bench_*.py")
    )


def test_mqar_plain_setting_runs_every_variant():
    """benches/mqar.py --setting: the plain-transformer sweep runs (tiny) and prints its table."""
    pytest.importorskip("torch")
    import subprocess

    cmd = [sys.executable, str(BENCHES / "mqar.py"), "--setting", "B", "--steps", "3"]
    cmd += ["--seeds", "0,1", "--variants", "zeta,softmax,zeta-v-default", "--jobs", "1"]
    out = subprocess.run(
        cmd + ["--no-save"], check=True, capture_output=True, text=True, timeout=240
    ).stdout
    assert "setting B: seq 128, 8 pairs, vocab 128" in out
    for v in ("| zeta |", "| softmax |", "| zeta-v-default |"):
        assert v in out and "(s0) /" in out.split(v)[1].splitlines()[0]


def test_mqar_plain_setting_refuses_options_it_would_ignore():
    import subprocess

    cmd = [sys.executable, str(BENCHES / "mqar.py"), "--setting", "A", "--topk", "16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--topk do not apply" in r.stderr


def test_tinylm_user_init_keeps_zeta_attention_init(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(BENCHES))
    import _models as M
    from mqar import multiquery_ar

    from zeta.nn import VALUE_INIT_STD

    torch.manual_seed(0)
    e = 128
    user = M.TinyLM(100, 32, "zeta", e, 1, 2, init="user", zeta_kwargs={"topk": 4})
    gpt2 = M.TinyLM(100, 32, "zeta", e, 1, 2, init="gpt2", zeta_kwargs={"topk": 4})
    a, g = user.blocks[0].attn, gpt2.blocks[0].attn
    assert a.v_proj.weight.std().item() == pytest.approx(VALUE_INIT_STD / e**0.5, rel=0.1)
    assert a.q_proj.weight.std().item() == pytest.approx(1 / (3 * e) ** 0.5, rel=0.1)
    assert g.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert user.blocks[0].mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert user.tok.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert user.head.weight is user.tok.weight
    # the generator takes vocab <= seq_len (setting B) and still answers from the pairs
    x, y = multiquery_ar(128, 8, 128, 8, seed=0)
    assert x.shape == (8, 128) and ((y == -100) | (y >= 64)).all() and (y != -100).sum() == 64
    for name in [m for m in sys.modules if m in ("mqar", "_models")]:
        del sys.modules[name]


def test_gpu_opmix_counts_the_kernel_events():
    """benches/gpu_opmix.py runs the search kernel on the CPU shim and reports its events."""
    import re
    import subprocess

    cmd = [sys.executable, str(BENCHES / "gpu_opmix.py"), "--n", "1024", "--queries", "64"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    exact, window = out.split("window search (exact=False")
    counts = {
        m.group(2): float(m.group(1)) for m in re.finditer(r"^\s+([0-9.]+)\s+(\S.*)$", exact, re.M)
    }
    assert counts["offer rounds"] > 0 and counts["flushes"] >= 1
    assert counts["leaves scanned (exact pass)"] > 0  # the exact pass ran
    assert "leaves scanned (exact pass)" in window
    assert re.search(r"^\s+0\.00\s+leaves scanned", window, re.M)  # no exact pass there


def test_gpu_check_script_parses():
    """benches/gpu_check.sh runs only on a GPU machine: here at least bash parses it."""
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    r = subprocess.run([bash, "-n", str(BENCHES / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_leaf_census_partitions(monkeypatch):
    """benches/leaf_census.py: every partition covers the run with non-empty leaves, and on
    Gaussian keys leaves that follow the cells need fewer keys per query than fixed blocks
    (the reason the CUDA exact search's leaves are snapped)."""
    monkeypatch.syspath_prepend(str(BENCHES))
    import leaf_census

    res = leaf_census.census(n=4096, queries=60, topk=16)
    assert set(res) == set(leaf_census.PARTITIONS)
    assert res["snapped 64"]["leaves"] == res["fixed 64"]["leaves"] == 64
    assert res["snapped 64"]["largest"] <= 127 and res["radix <= 64"]["largest"] <= 64
    assert res["snapped 64"]["keys_per_query"] < 0.7 * res["fixed 64"]["keys_per_query"]
    assert leaf_census.main(["--n", "512", "--queries", "8"]) == 0
    sys.modules.pop("leaf_census", None)


def test_stress_exact_runs_and_writes_json(tmp_path):
    """benches/stress_exact.py: a few seconds of random configurations, none mismatched."""
    import subprocess

    cmd = [sys.executable, str(BENCHES / "stress_exact.py"), "--seconds", "4"]
    r = subprocess.run(cmd + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = tmp_path.glob("stress_exact-*.json")
    rep = json.loads(path.read_text())
    assert rep["mismatches"] == [] and rep["machine"]["simd_path"]
    assert rep["counts"]["knn"]["ok"] > 0 and rep["counts"]["cache"]["ok"] > 0


def test_stress_exact_oracle_sees_a_wrong_neighbour(monkeypatch):
    """The stress oracle is strict: a result with one neighbour swapped is a mismatch."""
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCHES))
    import stress_exact as S

    real = S.zeta.knn

    def off_by_one(q, k, topk, **kw):
        idx, d2 = real(q, k, topk, **kw)
        idx = idx.copy()
        idx[..., -1, 0] = idx[..., -1, 0] ^ 1  # the last query's nearest neighbour changed
        return idx, d2

    monkeypatch.setattr(S.zeta, "knn", off_by_one)
    rng = np.random.default_rng(3)
    outcomes = {S.knn_case(rng)[0] for _ in range(40)}
    assert "mismatch" in outcomes and "ok" not in outcomes
    for name in [m for m in sys.modules if m in ("stress_exact", "_common", "adversarial")]:
        del sys.modules[name]
