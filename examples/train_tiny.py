"""Train a tiny causal transformer with ZetaAttention on CPU and watch the loss fall.

Task: character-level language modelling on text that ships with Python itself (the
source of a few standard-library modules), so it runs offline anywhere. The model is
embedding + learned positions + 2 ZetaBlocks (key_dim 3, topk 16) + LM head.

    python examples/train_tiny.py             # ~1 minute on 2 cores
    python examples/train_tiny.py --steps 300
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from torch import nn

import zeta.nn


def corpus() -> str:
    import argparse as m1
    import json.decoder as m2
    import textwrap as m3

    return "\n".join(inspect.getsource(m) for m in (m1, m2, m3))


class TinyLM(nn.Module):
    """(B, N) token ids -> (B, N, V) logits."""

    def __init__(
        self,
        vocab: int,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        max_len: int = 256,
        topk: int = 16,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(
            zeta.nn.ZetaBlock(width, heads, key_dim=3, topk=topk) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    text = corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    gen = torch.Generator().manual_seed(a.seed)
    model = TinyLM(len(chars), max_len=a.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(
        f"{len(text):,} characters, vocabulary {len(chars)}; uniform loss would be {torch.tensor(len(chars)).log():.2f}"
    )
    t0 = time.time()
    for step in range(1, a.steps + 1):
        start = torch.randint(0, len(data) - a.seq - 1, (a.batch,), generator=gen)
        x = torch.stack([data[s : s + a.seq] for s in start])
        y = torch.stack([data[s + 1 : s + a.seq + 1] for s in start])
        loss = nn.functional.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
