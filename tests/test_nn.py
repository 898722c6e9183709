"""Tests of zeta.nn: ZetaAttention / ZetaBlock (shapes, gamma, GQA, training, torch.compile,
constructor checks, two-process DDP)."""

from __future__ import annotations

import math
import os
import sys

import pytest

torch = pytest.importorskip("torch")
import zeta  # noqa: E402
from zeta.nn import ZetaAttention, ZetaBlock  # noqa: E402


def _x(b=2, n=24, e=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, e, generator=g, dtype=dtype)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_kv_heads=2),
        dict(num_kv_heads=1, key_dim=2),
        dict(topk=100, mean_token=True, n_sink=2, chunk=4),
    ],
)
def test_shapes(kw):
    torch.manual_seed(0)
    m = ZetaAttention(16, 4, topk=8, **kw) if "topk" not in kw else ZetaAttention(16, 4, **kw)
    x = _x()
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    blk = ZetaBlock(16, 4, topk=8)
    assert blk(x).shape == x.shape
    assert m.gamma.shape == (4,)


def test_forward_matches_functional():
    """The layer is projections + zeta.attention + out_proj (an independent re-computation)."""
    torch.manual_seed(1)
    m = ZetaAttention(16, 4, key_dim=3, num_kv_heads=2, topk=6, gamma_init=0.7, chunk=4, n_sink=1)
    x = _x(seed=1)
    b, n, e = x.shape
    q = m.q_proj(x).view(b, n, 4, 3).transpose(1, 2)
    k = m.k_proj(x).view(b, n, 2, 3).transpose(1, 2)
    v = m.v_proj(x).view(b, n, 2, 4).transpose(1, 2)
    o = zeta.attention(q, k, v, topk=6, gamma=torch.full((4,), 0.7), chunk=4, n_sink=1)
    want = m.out_proj(o.transpose(1, 2).reshape(b, n, e))
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.gamma, torch.full((4,), 0.7), rtol=1e-6, atol=0)


def test_gamma_positive_and_trainable():
    torch.manual_seed(2)
    m = ZetaAttention(16, 4, topk=8, gamma_init=0.5)
    assert (m.gamma > 0).all()
    torch.testing.assert_close(m.gamma, torch.full((4,), 0.5))
    opt = torch.optim.SGD(m.parameters(), lr=10.0)  # a huge step: gamma must stay positive
    before = m.gamma.detach().clone()
    x = _x(seed=2)
    for _ in range(3):
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        gp = [p for n_, p in m.named_parameters() if "gamma" in n_]
        assert gp and all(p.grad is not None and torch.isfinite(p.grad).all() for p in gp)
        assert any(float(p.grad.abs().sum()) > 0 for p in gp)
        opt.step()
    assert not torch.equal(m.gamma.detach(), before)
    assert (m.gamma > 0).all()


def test_gqa_num_kv_heads():
    torch.manual_seed(3)
    m = ZetaAttention(24, 6, num_kv_heads=3, key_dim=3, topk=5)
    assert m.k_proj.out_features == 3 * 3 and m.v_proj.out_features == 3 * 4
    assert m.q_proj.out_features == 6 * 3
    x = _x(e=24, seed=3)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape
    assert m.k_proj.weight.grad is not None and m.k_proj.weight.grad.abs().sum() > 0
    # a GQA layer equals an MHA layer whose kv projections are the repeated GQA projections
    mha = ZetaAttention(24, 6, key_dim=3, topk=5)
    with torch.no_grad():
        mha.q_proj.load_state_dict(m.q_proj.state_dict())
        mha.out_proj.load_state_dict(m.out_proj.state_dict())
        mha.log_gamma.copy_(m.log_gamma)
        kw = m.k_proj.weight.view(3, 3, 24).repeat_interleave(2, 0).reshape(18, 24)
        kb = m.k_proj.bias.view(3, 3).repeat_interleave(2, 0).reshape(18)
        vw = m.v_proj.weight.view(3, 4, 24).repeat_interleave(2, 0).reshape(24, 24)
        vb = m.v_proj.bias.view(3, 4).repeat_interleave(2, 0).reshape(24)
        mha.k_proj.weight.copy_(kw)
        mha.k_proj.bias.copy_(kb)
        mha.v_proj.weight.copy_(vw)
        mha.v_proj.bias.copy_(vb)
    torch.testing.assert_close(mha(x), y, rtol=1e-5, atol=1e-6)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, e=16, heads=2, layers=2, **kw):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, e)
        self.blocks = torch.nn.ModuleList(
            [ZetaBlock(e, heads, mlp_ratio=2, **kw) for _ in range(layers)]
        )
        self.head = torch.nn.Linear(e, vocab)

    def forward(self, tok):
        x = self.emb(tok)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _lm_batch(seed=0, b=4, n=32, vocab=11):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (b, 1), generator=g)
    tok = (start + torch.arange(n + 1)) % vocab  # a learnable pattern: next = prev + 1
    return tok[:, :-1], tok[:, 1:]


def test_tiny_model_trains():
    torch.manual_seed(4)
    model = TinyLM(topk=8, chunk=8, mean_token=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _lm_batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def _compile_check(fullgraph: bool):
    torch.manual_seed(5)
    m = ZetaAttention(16, 4, num_kv_heads=2, topk=6, chunk=4, mean_token=True)
    x = _x(seed=5).requires_grad_(True)
    eager = m(x)
    g_eager = torch.autograd.grad(eager.sum(), [x, m.log_gamma])
    torch._dynamo.reset()
    # aot_eager traces through the custom op's fake kernel and autograd formula (what
    # inductor sees too) without a C++ toolchain or a minute of codegen.
    cm = torch.compile(m, backend="aot_eager", fullgraph=fullgraph)
    out = cm(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    g_comp = torch.autograd.grad(out.sum(), [x, m.log_gamma])
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # another batch reuses the graph and is still right
    x2 = _x(seed=6)
    torch.testing.assert_close(cm(x2), m(x2), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    _compile_check(fullgraph=False)


@pytest.mark.slow
def test_torch_compile_fullgraph_no_graph_break():
    _compile_check(fullgraph=True)


@pytest.mark.parametrize(
    "args,kw,arg",
    [
        ((15, 4), {}, "embed_dim"),
        ((16, 4), dict(num_kv_heads=3), "num_kv_heads"),
        ((16, 4), dict(num_kv_heads=0), "num_kv_heads"),
        ((16, 4), dict(key_dim=0), "key_dim"),
        ((16, 4), dict(key_dim=9), "key_dim"),
        ((16, 4), dict(topk=0), "topk"),
        ((16, 4), dict(gamma_init=0.0), "gamma_init"),
        ((16, 4), dict(gamma_init=-1.0), "gamma_init"),
    ],
)
def test_bad_constructor_args(args, kw, arg):
    with pytest.raises((ValueError, TypeError)) as e:
        ZetaAttention(*args, **kw)
    assert str(e.value).startswith(arg), str(e.value)


def test_bad_forward_input():
    m = ZetaAttention(16, 4, topk=4)
    with pytest.raises(ValueError, match="^x"):
        m(torch.randn(2, 8, 15))
    with pytest.raises(ValueError, match="^x"):
        m(torch.randn(8, 16))
    with pytest.raises(TypeError, match="^x: expected a torch tensor"):
        m(torch.randn(2, 8, 16).numpy())
    # a bad zeta option passed through is reported by name at the first call
    bad = ZetaAttention(16, 4, topk=4, chunk=0)
    with pytest.raises(ValueError, match="^chunk"):
        bad(torch.randn(1, 8, 16))


# ---------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo), replicas must stay identical
# ---------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, store: str, q) -> None:
    """One DDP replica. Reports (rank, same, moved, maxdiff) or (rank, error) on ``q``.

    Teardown is made deterministic: a FileStore (no TCPStore server thread in rank 0), a
    barrier so that no rank tears down gloo while the other still talks to it, and
    ``os._exit`` so that no C++ static destructor races with torch's worker threads at
    interpreter exit (an intermittent SIGABRT seen on loaded machines, not a zeta error).
    """
    import torch.distributed as dist

    code = 1
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        torch.manual_seed(0)  # same init on every rank (DDP also broadcasts rank 0's)
        model = TinyLM(layers=1, topk=6, chunk=4, n_sink=1)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        init = [p.detach().clone() for p in model.parameters()]
        for step in range(3):
            x, y = _lm_batch(seed=100 * rank + step, b=2, n=16)  # different data per rank
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        moved = any(not torch.equal(a, p) for a, p in zip(init, model.parameters()))
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        maxdiff = float((gathered[0] - gathered[1]).abs().max())
        dist.barrier()
        dist.destroy_process_group()
        q.put((rank, same, moved, maxdiff))
        code = 0
    except BaseException as e:  # report instead of dying silently
        q.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@pytest.mark.slow
def test_ddp_two_processes_replicas_identical(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    store = str(tmp_path / "ddp_store")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, store, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    reports = []
    while not q.empty():
        reports.append(q.get())
    assert not alive, f"DDP workers hung; reports: {reports}"
    assert all(p.exitcode == 0 for p in procs), ([p.exitcode for p in procs], reports)
    assert len(reports) == 2 and all(len(r) == 4 for r in reports), reports
    for rank, same, moved, maxdiff in reports:
        assert moved, f"rank {rank}: training did not change the parameters"
        assert same, f"rank {rank}: replicas differ after training (max abs diff {maxdiff})"


def test_empty_and_one_token_sequences():
    """N = 0 gives an empty output that backward runs through; N = 1 (topk 32 > 1 key) is
    exact attention to that one key: out_proj(v_proj(x))."""
    m = ZetaAttention(16, 2)
    x = torch.zeros(2, 0, 16, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 0, 16)
    out.sum().backward()
    assert m.q_proj.weight.grad is not None and not m.q_proj.weight.grad.any()
    x1 = _x(2, 1, 16)
    torch.testing.assert_close(m(x1), m.out_proj(m.v_proj(x1)))


def test_init_values_small_rest_pytorch_default():
    """reset_parameters: v_proj ~ N(0, VALUE_INIT_STD^2 / E) with zero bias (issue 13's fix);
    q/k/out keep nn.Linear's default (uniform, std 1/sqrt(3E)); log_gamma = log(gamma_init)."""
    from zeta.nn import VALUE_INIT_STD

    torch.manual_seed(0)
    e = 256
    m = ZetaAttention(e, 8, key_dim=3, gamma_init=0.3)
    assert m.v_proj.weight.std().item() == pytest.approx(VALUE_INIT_STD / math.sqrt(e), rel=0.05)
    assert m.v_proj.weight.mean().abs().item() < 0.1 * VALUE_INIT_STD / math.sqrt(e)
    assert torch.count_nonzero(m.v_proj.bias) == 0
    for lin in (m.q_proj, m.k_proj, m.out_proj):
        assert lin.weight.std().item() == pytest.approx(1 / math.sqrt(3 * e), rel=0.1)
        assert lin.weight.abs().max().item() <= 1 / math.sqrt(e)
    torch.testing.assert_close(m.gamma, torch.full((8,), 0.3))
    # reset_parameters undoes training-time changes, and only draws fresh values
    with torch.no_grad():
        m.log_gamma.fill_(5.0)
        m.v_proj.weight.fill_(1.0)
    m.reset_parameters()
    torch.testing.assert_close(m.gamma, torch.full((8,), 0.3))
    assert m.v_proj.weight.std().item() == pytest.approx(VALUE_INIT_STD / math.sqrt(e), rel=0.05)
    # without biases the init still works
    m2 = ZetaAttention(e, 8, bias=False)
    assert m2.v_proj.bias is None
    assert m2.v_proj.weight.std().item() == pytest.approx(VALUE_INIT_STD / math.sqrt(e), rel=0.05)
