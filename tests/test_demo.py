"""``zeta demo`` on small inputs: it runs, its numbers mean what they say."""

from __future__ import annotations

import pytest

from zeta import demo


def test_demo_small_runs_and_finds_needles():
    r = demo.run(tokens=3000, heads=2, queries=4, topk=8, dense=True, quiet=True)
    assert r["tokens"] == 3000 and r["queries"] == 4
    assert r["zeta_us_per_token"] > 0 and r["dense_ms_per_token"] > 0
    assert 0.0 <= r["needle_hit_rate"] <= 1.0
    assert r["needle_hit_rate"] >= 0.75  # a needle query sits 1e-3 from its key


def test_demo_with_a_window_over_everything_is_exact_top_k():
    # window >= S: every past key is a candidate, so zeta's output is exact top-k attention
    r = demo.run(tokens=2000, heads=2, queries=3, topk=8, window=4096, dense=False, quiet=True)
    assert r["median_rel_err_vs_exact_topk"] < 1e-4
    assert r["share_within_1pct_of_exact_topk"] == 1.0


def test_demo_cli_rejects_bad_options(capsys):
    for argv in (["--n-curves", "9"], ["--window", "0"], ["--tokens", "0"]):
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2
    assert "n_curves" in capsys.readouterr().err
