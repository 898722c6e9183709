"""Generation: per-token decode latency of a ZetaForCausalLM through its ZetaCache against the
same-size model with softmax attention and a dense KV cache, at long contexts.

Usage: python benches/bench_generate.py [--quick] [--out DIR]

Model (both): char-level size, 2 layers, E=64, 2 heads, MLP 4x, causal conv 3, tied head.
ZETA: key_dim 3, top-32, 2 curves, cache on the CPU. Dense: q/k/v of width E/H per head,
preallocated K/V buffers (no re-allocation while decoding) and SDPA of the new token over the
whole cache: the fastest dense decode torch offers on a CPU. Contexts 16k, 64k, 256k (quick:
4k, 16k). The ZETA cache is filled by a real prefill (random tokens, untrained weights); the
dense cache is filled with random keys/values (a dense prefill at 256k costs O(N^2): hours on
2 cores; the decode latency does not depend on the values). Reports the median per-token
latency over 32 greedy steps (the whole model: embeddings, convs, attention, MLPs, head,
argmax; after 3 warm-up tokens; ZETA through ``ZetaForCausalLM.decode``, the dense twin
through its own ``step``, neither building a transformers ModelOutput) and each cache's bytes
per token. The dense model runs with 1 torch thread and with all cores; the faster is the
baseline. ``examples/long_context.py`` runs the same comparison
with a trained model and a real 256k-character prompt.

Writes ``benches/results/generate-<machine tag>-<date>.json`` and a ``.png``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from _common import (
    base_report,
    fmt_s,
    fmt_x,
    goal,
    med,
    print_goals,
    progress,
    pyplot,
    ratio,
    save_figure,
    suite_main,
)
from torch import Tensor, nn

from zeta.hf import ZetaConfig, ZetaForCausalLM

MODEL = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    key_dim=3,
    topk=32,
    n_curves=2,
    conv_kernel=3,
)
# 262,080 = 2^18 - 64: its decode steps lie in the last chunk before 2^18, where the cache's
# past is 12 runs (the costliest place near 256k); right after 2^18 it is one run (the cheapest).
CONTEXTS, CONTEXTS_QUICK = [16384, 65536, 262144 - 64, 262144], [4096, 16384]
STEPS = 32
PIECE = 8192  # prefill tokens per forward call (262k prompt: 3.7 s; 2k: 4.0 s, 32k: 4.0 s)
GOAL_CONTEXT, GOAL_X = 262144, 50.0


# --------------------------------------------------------------------------- dense twin
class DenseCache:
    """Per layer: K and V buffers (B, H, capacity, E/H), the conv state; ``n`` tokens held."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, capacity: int):
        shape = (batch, heads, capacity, head_dim)
        self.k = [torch.zeros(shape) for _ in range(layers)]
        self.v = [torch.zeros(shape) for _ in range(layers)]
        self.conv: List[Optional[Tensor]] = [None] * layers
        self.n = 0

    @property
    def bytes_per_token(self) -> int:
        """Keys + values of one token over all layers and heads."""
        b, h, _, d = self.k[0].shape
        return 2 * len(self.k) * h * d * self.k[0].element_size()

    def fill_random(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for buf in self.k + self.v:
            buf[:, :, :n] = torch.randn(buf[:, :, :n].shape, generator=g)
        self.n = n


class DenseLM(nn.Module):
    """ZetaForCausalLM's layout with softmax attention (q/k width E/H): the dense twin.

    step(ids (B, T), cache: DenseCache) -> logits (B, T, V); appends T tokens to the cache.
    """

    def __init__(self, cfg: ZetaConfig):
        super().__init__()
        e, self.h = cfg.hidden_size, cfg.num_attention_heads
        self.hd = e // self.h
        self.embed = nn.Embedding(cfg.vocab_size, e)
        self.layers = nn.ModuleList()
        for _ in range(cfg.num_hidden_layers):
            blk = nn.Module()
            blk.norm0, blk.norm1, blk.norm2 = nn.LayerNorm(e), nn.LayerNorm(e), nn.LayerNorm(e)
            blk.conv = nn.Conv1d(e, e, cfg.conv_kernel, groups=e)
            blk.qkv, blk.out = nn.Linear(e, 3 * e), nn.Linear(e, e)
            blk.mlp = nn.Sequential(
                nn.Linear(e, cfg.mlp_ratio * e), nn.GELU(), nn.Linear(cfg.mlp_ratio * e, e)
            )
            self.layers.append(blk)
        self.norm = nn.LayerNorm(e)
        self.head = nn.Linear(e, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.kernel = cfg.conv_kernel

    def make_cache(self, batch: int, capacity: int) -> DenseCache:
        return DenseCache(len(self.layers), batch, self.h, self.hd, capacity)

    @torch.no_grad()
    def step(self, ids: Tensor, cache: DenseCache) -> Tensor:
        x = self.embed(ids)
        b, t, e = x.shape
        n = cache.n
        for i, blk in enumerate(self.layers):
            y = blk.norm0(x)
            st = cache.conv[i] if cache.conv[i] is not None else y.new_zeros(b, self.kernel - 1, e)
            full = torch.cat([st, y], 1)
            cache.conv[i] = full[:, -(self.kernel - 1) :]
            x = x + blk.conv(full.transpose(1, 2)).transpose(1, 2)
            q, k, v = blk.qkv(blk.norm1(x)).view(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
            cache.k[i][:, :, n : n + t] = k
            cache.v[i][:, :, n : n + t] = v
            kk, vv = cache.k[i][:, :, : n + t], cache.v[i][:, :, : n + t]
            if t == 1:
                o = F.scaled_dot_product_attention(q, kk, vv)
            else:  # bottom-right causal: query j sees keys <= n + j
                mask = torch.ones(t, n + t, dtype=torch.bool).tril(n)
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            x = x + blk.out(o.transpose(1, 2).reshape(b, t, e))
            x = x + blk.mlp(blk.norm2(x))
        cache.n = n + t
        return self.head(self.norm(x))


# --------------------------------------------------------------------------- measuring
def prefill(model: ZetaForCausalLM, ids: Tensor, cache: Any, piece: int = PIECE) -> float:
    """Feed ids (1, N) through ``model`` into ``cache`` in pieces, with a progress bar; seconds."""
    t0 = time.perf_counter()
    with torch.no_grad(), progress(ids.shape[1], desc="prefill", unit="tok") as bar:
        for s in range(0, ids.shape[1], piece):
            model(ids[:, s : s + piece], cache=cache)
            bar.update(min(piece, ids.shape[1] - s))
    return time.perf_counter() - t0


def decode_times(
    step: Callable[[Tensor], Tensor], first: Tensor, steps: int, warmup: int = 3
) -> List[float]:
    """Greedy decode ``warmup + steps`` tokens from ``first`` (1, 1); the wall time of each
    of the last ``steps``."""
    tok, out = first, []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = step(tok)
        tok = logits[:, -1:].argmax(-1)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def with_threads(n: int, fn: Callable[[], Any]) -> Any:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def dense_decode(cfg: ZetaConfig, context: int, steps: int, first: Tensor) -> Dict[str, Any]:
    """The dense twin's per-token latency at ``context`` cached tokens (1 thread, all cores)."""
    torch.manual_seed(1)
    dense = DenseLM(cfg).eval()
    res: Dict[str, Any] = {}

    def one(threads: int) -> Optional[float]:
        cache = dense.make_cache(1, context + steps + 4)
        cache.fill_random(context)
        res["dense_bytes_per_token"] = cache.bytes_per_token
        ts = with_threads(
            threads, lambda: decode_times(lambda t: dense.step(t, cache), first, steps)
        )
        return med(ts)

    for threads in sorted({1, os.cpu_count() or 1}):
        res[f"dense_s_per_token_{threads}t"] = one(threads)
    res["dense_s_per_token"] = min(v for k, v in res.items() if k.startswith("dense_s_per_token_"))
    return res


def compare(
    model: ZetaForCausalLM, prompt: Tensor, steps: int = STEPS, cache: Any = None
) -> Dict[str, Any]:
    """Prefill ``prompt`` (1, N) (unless ``cache`` already holds it), decode ``steps`` tokens
    with ZETA, then the dense twin at the same context. One row of the report."""
    n = prompt.shape[1]
    row: Dict[str, Any] = {"context": n}
    if cache is None:
        cache = model.make_cache(batch=1)
        row["prefill_s"] = with_threads(1, lambda: prefill(model, prompt, cache))
        row["prefill_tokens_per_s"] = n / row["prefill_s"]
    row["zeta_bytes_per_token"] = cache.nbytes / cache.get_seq_length()
    first = prompt[:, -1:]

    def zstep(t: Tensor) -> Tensor:
        return model.decode(t, cache)  # forward(t, cache=cache).logits, without the ModelOutput

    ts = with_threads(1, lambda: decode_times(zstep, first, steps))
    row["zeta_s_per_token"] = med(ts)
    row.update(dense_decode(model.config, n, steps, first))
    row["speedup"] = ratio(row["dense_s_per_token"], row["zeta_s_per_token"])
    return row


def model_config() -> ZetaConfig:
    return ZetaConfig(**MODEL)


def report(rows: List[Dict[str, Any]], suite: str, quick: bool, extra: Dict[str, Any]) -> Dict:
    rep = base_report(
        suite,
        quick,
        {
            "model": MODEL,
            "steps": STEPS,
            "prefill_piece": PIECE,
            "dense": "same layout, softmax attention (q/k width E/H), preallocated K/V, SDPA "
            "over the whole cache; filled with random K/V; best of 1 thread and all cores",
            "zeta_threads_torch": 1,
            "timing": "median wall time per generated token, whole model, greedy",
            **extra,
        },
    )
    rep["results"] = rows
    at = [r for r in rows if GOAL_CONTEXT - 64 <= r["context"] <= GOAL_CONTEXT]
    x = min(r["speedup"] for r in at) if at else None
    ran = ", ".join(f"{r['context']:,}: {fmt_x(r['speedup'])}" for r in rows)
    rep["goals"] = {
        "decode_speedup_256k": goal(
            f"per-token decode >= {GOAL_X:.0f}x faster than dense at {GOAL_CONTEXT:,} tokens",
            x,
            None if x is None else x >= GOAL_X,
            "whole-model latency, same run; "
            + ", ".join(f"{r['context']:,} tokens: {fmt_x(r['speedup'])}" for r in at)
            + " (the lower one counts)"
            if at
            else f"not run at {GOAL_CONTEXT:,} tokens (ran at {ran})",
        )
    }
    return rep


def print_rows(rows: List[Dict[str, Any]]) -> None:
    print(
        f"  {'context':>9} {'prefill':>9} {'zeta/token':>11} {'dense/token':>12} {'speedup':>8} "
        f"{'zeta B/tok':>10} {'dense B/tok':>11}"
    )
    for r in rows:
        print(
            f"  {r['context']:>9,} {fmt_s(r.get('prefill_s')):>9} {fmt_s(r['zeta_s_per_token']):>11} "
            f"{fmt_s(r['dense_s_per_token']):>12} {fmt_x(r['speedup']):>8} "
            f"{r['zeta_bytes_per_token']:>10.0f} {r['dense_bytes_per_token']:>11}"
        )


def plot(rep: Dict[str, Any], png) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = rep["results"]
    ctx = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(ctx, [1e3 * r["zeta_s_per_token"] for r in rows], "o-", label="ZETA (ZetaCache)")
    ax.plot(ctx, [1e3 * r["dense_s_per_token"] for r in rows], "s-", label="softmax, dense KV")
    for r in rows:
        ax.annotate(
            fmt_x(r["speedup"]),
            (r["context"], 1e3 * r["zeta_s_per_token"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens cached)")
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"{rep['suite']}: per-token decode, {rep['machine']['tag']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, png)
    return True


def run(quick: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = ZetaForCausalLM(model_config()).eval()
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in CONTEXTS_QUICK if quick else CONTEXTS:
        prompt = torch.randint(0, MODEL["vocab_size"], (1, n), generator=g)
        rows.append(compare(model, prompt))
    print_rows(rows)
    rep = report(rows, "generate", quick, {"prompt": "random tokens, untrained weights"})
    print_goals(rep["goals"])
    return rep


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return suite_main("generate", run, plot, __doc__, argv)


if __name__ == "__main__":
    main()
