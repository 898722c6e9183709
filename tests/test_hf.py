"""Tests of zeta.hf: generate equals a loop of full parallel forwards (greedy), sampling runs
through the cache one token per step, a prefilled ZetaCache is reused, save/load round trip
is exact, the Trainer trains, and a missing transformers gives a clear ImportError."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'zeta-attention[hf]')"
)
from zeta.hf import _OUT_CACHE, ZetaCache, ZetaConfig, ZetaForCausalLM  # noqa: E402

V = 23


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=V,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        topk=4,
        chunk=4,
        n_curves=2,
        n_sink=1,
        conv_kernel=3,
    )
    cfg.update(kw)
    m = ZetaForCausalLM(ZetaConfig(**cfg)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: argmax ties are then unlikely
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(20.0)
    return m


def _argmax_loop(model, ids, steps):
    """The oracle: each token is the argmax of a full parallel forward (no cache)."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    return seq


@pytest.mark.parametrize(
    "kw", [dict(), dict(mean_token=True, conv_kernel=0, num_key_value_heads=None)], ids=str
)
def test_generate_greedy_equals_argmax_loop(kw):
    model = _model(**kw)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    want = _argmax_loop(model, ids, 20)
    assert torch.equal(out, want)


def test_generate_feeds_one_token_per_step_through_the_cache():
    model = _model(seed=2)
    lengths = []
    h = model.layers[0].attn.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(
            (args[0].shape[1], kwargs.get("cache") is not None)
        ),
        with_kwargs=True,
    )
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=5, temperature=0.8)
    h.remove()
    assert out.shape == (1, 18)
    assert lengths == [(12, True)] + [(1, True)] * 5


def test_generate_from_a_prefilled_cache(tmp_path):
    model = _model(seed=4)
    ids = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(5))
    cache = model.make_cache()
    with torch.no_grad():
        model(ids[:, :-1], **{_OUT_CACHE: cache})
    assert cache.get_seq_length() == 29 and cache.nbytes > 0
    cache.save(tmp_path / "prompt")
    loaded = ZetaCache.load(tmp_path / "prompt")
    out = model.generate(ids, max_new_tokens=8, do_sample=False, **{_OUT_CACHE: loaded})
    assert torch.equal(out, _argmax_loop(model, ids, 8))
    full = model.make_cache()
    with torch.no_grad():
        model(ids, **{_OUT_CACHE: full})
    with pytest.raises(ValueError, match="cache"):  # nothing left to feed
        model.generate(ids, max_new_tokens=2, **{_OUT_CACHE: full})


@pytest.mark.parametrize("kw", [dict(), dict(exact=True, conv_kernel=0)], ids=["default", "exact"])
def test_decode_equals_forward_and_the_parallel_logits(kw, monkeypatch):
    """model.decode (the lean decode loop: no ModelOutput, no submodule calls per layer)
    gives the parallel forward's logits, token by token; a hooked module is still called."""
    model = _model(seed=6, **kw)
    ids = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    cache = model.make_cache(batch=2)
    steps = [model.decode(ids[:, :20], cache)]
    # one-token steps take the lean path: the layers' forward is never called
    from zeta.hf import ZetaDecoderLayer

    def boom(*a, **k):
        raise AssertionError("the lean decode step was not taken")

    with monkeypatch.context() as mp:
        mp.setattr(ZetaDecoderLayer, "forward", boom)
        steps += [model.decode(ids[:, i : i + 1], cache) for i in range(20, 25)]
    seen = []
    hook = model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(1))
    steps += [model.decode(ids[:, i : i + 1], cache) for i in range(25, 30)]
    hook.remove()
    assert len(seen) == 5
    out = torch.cat(steps, 1)
    assert (out - full).abs().max().item() <= 1e-4 * full.abs().max().item()
    with pytest.raises(TypeError, match="cache"):
        model.decode(ids[:, :1], [])
    with pytest.raises(ValueError, match="input_ids"):
        model.decode(ids[0], cache)


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = _model(seed=6, bits=8, window=6)
    model.save_pretrained(tmp_path / "m")
    back = ZetaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.bits == 8 and back.config.window == 6 and back.config.n_curves == 2
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.lm_head.weight.data_ptr() == back.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_trainer_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(8)
    model = ZetaForCausalLM(ZetaConfig(vocab_size=V, hidden_size=16, topk=4, chunk=4))
    g = torch.Generator().manual_seed(9)
    rows = [torch.arange(24) * (int(torch.randint(1, 4, (1,), generator=g))) % V for _ in range(64)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=100,
        disable_tqdm=True,
    )
    with torch.no_grad():
        before = float(model(torch.stack(rows[:8]), labels=torch.stack(rows[:8])).loss)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    with torch.no_grad():
        after = float(model(torch.stack(rows[:8]), labels=torch.stack(rows[:8])).loss)
    assert after < 0.7 * before


def test_bad_inputs_raise_clear_errors():
    model = _model(seed=10)
    ids = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="input_ids"):
        model()
    with pytest.raises(ValueError, match="cache"):
        model(ids, **{_OUT_CACHE: ZetaCache(model.make_cache(2).kv[:1])})
    with pytest.raises(NotImplementedError, match="beam"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(TypeError, match="kv_caches"):
        ZetaCache([])
    cache = model.make_cache(2)
    with torch.no_grad():
        model(ids, **{_OUT_CACHE: cache})
    nbytes = cache.nbytes
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes < nbytes
    assert cache.kv[0].settings == model.make_cache().kv[0].settings


def test_missing_transformers_gives_a_clear_import_error():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None  # as if it were not installed
        import zeta
        try:
            zeta.hf
        except ImportError as e:
            assert "zeta-attention[hf]" in str(e), str(e)
        else:
            raise SystemExit("no ImportError")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


BENCHES = Path(__file__).resolve().parent.parent / "benches"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_bench_generate_and_long_context_example_run(tmp_path, monkeypatch, capsys):
    """Both scripts run end to end at tiny sizes and write their JSON (so they cannot drift)."""
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import bench_generate
    import long_context

    monkeypatch.setattr(bench_generate, "CONTEXTS_QUICK", [300])
    monkeypatch.setattr(bench_generate, "STEPS", 3)
    monkeypatch.setattr(bench_generate, "GOAL_CONTEXT", 300)
    rep = bench_generate.main(["--quick", "--out", str(tmp_path)])
    row = rep["results"][0]
    assert row["context"] == 300 and row["zeta_s_per_token"] > 0 and row["dense_s_per_token"] > 0
    assert row["dense_bytes_per_token"] == 2 * 2 * 64 * 4  # 2 layers x (K + V) x E x float32
    assert len(list(tmp_path.glob("generate-*.json"))) == 1
    args = ["--tokens", "700", "--new", "4", "--steps", "2", "--seq-len", "32", "--batch", "2"]
    args += ["--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "r")]
    assert long_context.main([*args, "--save-cache", str(tmp_path / "c")]) == 0
    assert long_context.main([*args, "--load-cache", str(tmp_path / "c"), "--no-dense"]) == 0
    saved = json.loads(next((tmp_path / "r").glob("long_context-*.json")).read_text())
    assert saved["results"][0]["context"] == 700 and len(saved["results"][0]["generated"]) == 4
    assert "decode:" in capsys.readouterr().out
    for name in ("_common", "bench_generate", "long_context"):
        sys.modules.pop(name, None)
