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
