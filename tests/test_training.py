"""Training with ZetaAttention's defaults works where it used to stall (issue 13).

Setting A of ``benches/mqar.py --setting``: a plain 2-layer pre-norm transformer without a
short convolution (GPT-2-style init of the model's own modules, ZetaAttention's own init),
MQAR with 8 pairs at length 64, 3000 steps. With the defaults before the fix (PyTorch's
default value init) this run ends at 15.7% (seeds 1, 2: 16.8%, 14.6%); softmax and the current
defaults reach ~100% (benches/results/mqar-plain-A-*).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
BENCHES = Path(__file__).resolve().parent.parent / "benches"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_plain_transformer_learns_mqar_with_the_defaults(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.setenv("ZETA_NUM_THREADS", "2")  # restored afterwards
    threads = torch.get_num_threads()
    try:
        import mqar

        res = mqar.plain_worker("zeta", mqar.plain_cfg("A"), seed=0, position=0, threads=2)
    finally:
        torch.set_num_threads(threads)
        for name in [m for m in sys.modules if m in ("mqar", "_models")]:
            del sys.modules[name]
    accs = [round(c["test_acc"], 4) for c in res["curve"]]
    assert res["final_test_acc"] >= 0.99, accs
