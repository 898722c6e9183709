"""Tests of decoding through zeta.nn: ZetaAttention.forward(x, cache=...) equals the parallel
forward (random and trained weights, every layer option), make_caches / save_caches /
load_caches, bad caches, and the lazy ``zeta.nn`` attribute."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import zeta  # noqa: E402
from zeta.nn import (  # noqa: E402
    ZetaAttention,
    ZetaBlock,
    load_caches,
    make_caches,
    save_caches,
)

TOL = 1e-5


class Stack(torch.nn.Module):
    """Two ZetaBlocks: (B, N, E) -> (B, N, E); caches[i] goes to block i."""

    def __init__(self, e=16, h=4, **kw):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ZetaBlock(e, h, **kw) for _ in range(2))

    def forward(self, x, caches=None):
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache=None if caches is None else caches[i])
        return x


def _x(b=2, n=40, e=16, seed=0):
    return torch.randn(b, n, e, generator=torch.Generator().manual_seed(seed))


def _decode(model, x, caches, steps):
    """Feed x in pieces of the given sizes through the caches; concat the outputs."""
    outs, at = [], 0
    with torch.no_grad():
        for s in steps:
            outs.append(model(x[:, at : at + s], caches))
            at += s
    assert at == x.shape[1]
    return torch.cat(outs, dim=1)


OPTIONS = [
    dict(topk=8, chunk=4),
    dict(topk=8, chunk=4, num_kv_heads=2),
    dict(topk=8, chunk=4, num_kv_heads=1, key_dim=2),
    dict(topk=6, chunk=4, n_curves=3, exact=False),
    dict(topk=6, chunk=4, n_sink=3, exact=False),
    dict(topk=6, chunk=4, mean_token=True),
    dict(topk=5, chunk=8, window=3, gamma_init=0.6, exact=False),
    dict(topk=100, chunk=4, n_curves=2, n_sink=1, mean_token=True, num_kv_heads=2, exact=False),
    dict(topk=6, chunk=4, window=1, n_curves=2, exact=True, num_kv_heads=2),
]


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_layer_prefill_then_decode_equals_parallel(kw):
    torch.manual_seed(0)
    layer = ZetaAttention(16, 4, **kw)
    x = _x()
    with torch.no_grad():
        full = layer(x)
    cache = layer.make_cache(batch=2)
    steps = [17] + [1] * 20 + [3]
    out = _decode(lambda xs, c: layer(xs, cache=c), x, cache, steps)
    assert len(cache) == x.shape[1]
    assert out.shape == full.shape
    assert (out - full).abs().max().item() <= TOL


@pytest.mark.parametrize("kw", [OPTIONS[1], OPTIONS[-1]], ids=["gqa", "all-options"])
def test_model_token_by_token_equals_parallel(kw):
    torch.manual_seed(1)
    model = Stack(**kw)
    x = _x(b=1, n=33, seed=1)
    with torch.no_grad():
        full = model(x)
    caches = make_caches(model, batch=1)
    assert len(caches) == 2
    out = _decode(model, x, caches, [1] * 33)
    assert (out - full).abs().max().item() <= TOL


def test_trained_weights_decode_equals_parallel():
    """After training (gamma, projections moved away from init) decode still matches."""
    torch.manual_seed(2)
    kw = dict(topk=6, chunk=4, n_curves=2, num_kv_heads=2, mean_token=True)
    model = Stack(**kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):  # learn to output the input shifted by 3 (needs attention)
        x = torch.randn(4, 24, 16, generator=g)
        y = torch.roll(x, 3, dims=1)
        loss = ((model(x)[:, 3:] - y[:, 3:]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gammas = torch.stack([b.attn.gamma for b in model.blocks]).detach()
    assert (gammas - 1.0).abs().max() > 1e-3  # training did move the weights
    x = _x(b=2, n=30, seed=4)
    with torch.no_grad():
        full = model(x)
    out = _decode(model, x, make_caches(model, batch=2), [10, 1, 1, 1, 5] + [1] * 12)
    assert (out - full).abs().max().item() <= TOL


def test_hooked_or_replaced_projection_takes_the_module_path():
    """The lean decode step skips submodule calls; a hook (or a replaced projection) must
    still run, so the layer then calls its modules. Same outputs either way."""
    torch.manual_seed(5)
    layer = ZetaAttention(16, 4, topk=6, chunk=4, num_kv_heads=2)
    x = _x(b=2, n=25, seed=6)
    with torch.no_grad():
        full = layer(x)
    seen = []
    hook = layer.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    out = _decode(lambda xs, c: layer(xs, cache=c), x, layer.make_cache(batch=2), [9] + [1] * 16)
    hook.remove()
    assert seen == [9] + [1] * 16  # the hook saw every call
    assert (out - full).abs().max().item() <= TOL
    # a hook on every module (register_module_forward_hook) sees the projections too
    names = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: names.append(type(m).__name__)
    )
    try:
        out = _decode(
            lambda xs, c: layer(xs, cache=c), x[:, :10], layer.make_cache(batch=2), [9, 1]
        )
    finally:
        hook.remove()
    assert names.count("Linear") == 2 * 4
    assert (out - full[:, :10]).abs().max().item() <= TOL

    class Scaled(torch.nn.Linear):  # a subclass may compute something else: not "plain"
        def forward(self, x):
            return 2.0 * super().forward(x)

    scaled = Scaled(16, 16)
    with torch.no_grad():
        scaled.weight.copy_(layer.out_proj.weight / 2)
        scaled.bias.copy_(layer.out_proj.bias / 2)
    layer.out_proj = scaled
    out = _decode(lambda xs, c: layer(xs, cache=c), x, layer.make_cache(batch=2), [9] + [1] * 16)
    assert (out - full).abs().max().item() <= TOL


def test_lean_step_follows_weight_updates():
    """The fused q/k/v weight is rebuilt when a projection changes in place."""
    torch.manual_seed(6)
    layer = ZetaAttention(16, 4, topk=6, chunk=4)
    x = _x(b=1, n=12, seed=7)
    with torch.no_grad():
        _decode(lambda xs, c: layer(xs, cache=c), x, layer.make_cache(), [11, 1])
        layer.k_proj.weight.mul_(-0.5)
        layer.v_proj.bias.add_(1.0)
        layer.log_gamma.add_(0.3)
        full = layer(x)
    out = _decode(lambda xs, c: layer(xs, cache=c), x, layer.make_cache(), [11, 1])
    assert (out - full).abs().max().item() <= TOL


def test_decode_with_a_layer_built_in_inference_mode():
    """Inference tensors have no version counter: the lean step then rebuilds its memos."""
    with torch.inference_mode():
        torch.manual_seed(7)
        layer = ZetaAttention(16, 4, topk=6, chunk=4)
        x = _x(b=1, n=12, seed=8)
        full = layer(x)
        out = _decode(lambda xs, c: layer(xs, cache=c), x, layer.make_cache(), [7] + [1] * 5)
    assert (out - full).abs().max().item() <= TOL


def test_decode_without_the_cache_extension_would_differ():
    """The oracle can fail: a cache that misses the prompt gives other outputs."""
    torch.manual_seed(3)
    layer = ZetaAttention(16, 4, topk=8, chunk=4)
    x = _x(b=1, n=20, seed=5)
    with torch.no_grad():
        full = layer(x)
        cache = layer.make_cache()
        layer(x[:, 10:19], cache=cache)  # the first 10 positions never went in
        last = layer(x[:, 19:], cache=cache)
    assert (last[:, 0] - full[:, 19]).abs().max().item() > 1e-3


def test_save_load_caches_reuses_a_prefill(tmp_path):
    torch.manual_seed(4)
    model = Stack(topk=6, chunk=4, n_sink=2)
    x = _x(b=1, n=40, seed=6)
    with torch.no_grad():
        full = model(x)
        caches = make_caches(model)
        model(x[:, :30], caches)
    save_caches(caches, tmp_path / "prompt")
    loaded = load_caches(tmp_path / "prompt")
    assert [len(c) for c in loaded] == [30, 30]
    assert all(a.same_contents(b) for a, b in zip(caches, loaded))
    out = _decode(model, x[:, 30:], loaded, [1] * 10)
    assert (out - full[:, 30:]).abs().max().item() <= TOL
    # saving fewer caches into the same folder drops the stale files
    save_caches(caches[:1], tmp_path / "prompt")
    assert len(load_caches(tmp_path / "prompt")) == 1


def test_load_caches_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        load_caches(tmp_path)
    layer = ZetaAttention(16, 4, topk=4)
    layer.make_cache().save(tmp_path / "layer-1.zkv")
    with pytest.raises(ValueError, match="directory"):
        load_caches(tmp_path)
    with pytest.raises(TypeError, match="caches"):
        save_caches([object()], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_caches_raise_clear_errors():
    layer = ZetaAttention(16, 4, topk=4, chunk=4)
    x = _x(b=2, n=5)
    with pytest.raises(TypeError, match="cache"):
        layer(x, cache=object())
    with pytest.raises(ValueError, match="cache"):
        layer(x, cache=layer.make_cache(batch=1))  # wrong batch
    with pytest.raises(ValueError, match="cache"):
        layer(x, cache=zeta.KVCache(4, 3, 4, batch=2, chunk=8))  # other index settings
    with pytest.raises(ValueError, match="cache"):
        ZetaAttention(16, 4, causal=False).make_cache()
    with pytest.raises(ValueError, match="model"):
        make_caches(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        make_caches("not a model")
    cache = layer.make_cache(batch=2)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 5, 8), cache=cache)
    assert len(cache) == 0  # a failed call left it empty


def test_make_caches_shapes_and_dtype():
    model = Stack(num_kv_heads=2, key_dim=2, topk=4, chunk=16, n_curves=2)
    caches = make_caches(model, batch=3, dtype="bfloat16")
    for c in caches:
        assert (c.batch, c.num_kv_heads, c.key_dim, c.value_dim) == (3, 2, 2, 4)
        assert c.dtype == "bfloat16" and c.settings["chunk"] == 16
        assert c.settings["n_curves"] == 2


def test_lazy_nn_attribute_and_numpy_only_import():
    code = (
        "import sys, zeta\n"
        "assert 'torch' not in sys.modules, 'import zeta imported torch'\n"
        "m = zeta.nn.ZetaAttention(8, 2, topk=4)\n"
        "assert 'torch' in sys.modules and zeta.nn.make_caches\n"
        "try:\n"
        "    zeta.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
