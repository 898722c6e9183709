"""Character-level language model: bits per character of softmax attention vs ZETA attention.

    python benches/charlm.py --quick             # 2 CPU cores: ~10 min wall, both attentions
    python benches/charlm.py --full --device cuda

Corpus: the Python documentation that ships with CPython itself, ``pydoc_data.topics``
(the language reference / library topics that ``help()`` shows; ~465k characters of English
prose and code samples in Python 3.11). The topics are joined in sorted key order, so the
corpus is reproducible for a given Python version; its length and SHA-256 go into the JSON.
The last 10% is held out; validation bits/char are averaged over every position of
``eval_windows`` disjoint windows. The model is ``_models.TinyLM`` (as in ``mqar.py``); same
seed, batches and steps for both attentions; only the token mixer differs. On CPU the two
attentions train in two single-threaded processes at once (``--jobs``). Writes
benches/results/charlm-<machine>-<date>.{json,md,png}.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from typing import Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _models as M  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

QUICK = dict(
    seq_len=1024,
    n_curves=2,
    d_model=64,
    n_layers=2,
    n_heads=2,
    conv=3,
    batch=8,
    steps=1200,
    lr=3e-3,
    warmup=50,
    weight_decay=0.1,
    eval_every=200,
    eval_windows=32,
)
FULL = dict(
    seq_len=2048,
    n_curves=2,
    d_model=256,
    n_layers=4,
    n_heads=4,
    conv=3,
    batch=32,
    steps=10_000,
    lr=1e-3,
    warmup=500,
    weight_decay=0.1,
    eval_every=500,
    eval_windows=128,
)


def load_corpus() -> Tuple[str, dict]:
    """The pydoc topics text, and a description (source, Python version, length, sha256)."""
    import platform
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    info = {
        "source": "pydoc_data.topics (CPython stdlib), topics joined in sorted key order",
        "python": platform.python_version(),
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    return text, info


def encode(text: str) -> Tuple[torch.Tensor, list]:
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lut[c] for c in text], dtype=torch.long), chars


def evaluate(model, val: torch.Tensor, cfg: dict, device, batch: int = 8) -> float:
    """Bits per character over ``eval_windows`` disjoint windows (every position scored)."""
    n = cfg["seq_len"]
    count = min(cfg["eval_windows"], (len(val) - 1) // n)
    starts = torch.linspace(0, len(val) - n - 1, count).long()
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for s in range(0, count, batch):
            st = starts[s : s + batch]
            x = torch.stack([val[i : i + n] for i in st]).to(device)
            y = torch.stack([val[i + 1 : i + n + 1] for i in st]).to(device)
            logits = model(x)
            nll += float(
                F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                )
            )
            tokens += y.numel()
    model.train()
    return nll / tokens / math.log(2)


def make_data():
    text, corpus = load_corpus()
    ids, chars = encode(text)
    split = int(0.9 * len(ids))
    return (ids[:split], ids[split:]), chars, corpus


def worker(attn: str, cfg: dict, args, threads: int, position: int) -> Dict:
    """One attention in its own process."""
    M.set_threads(threads)
    data, chars, _ = make_data()
    return train_one(attn, cfg, args, data, len(chars), args.device, position)


def train_one(attn: str, cfg: dict, args, data, vocab: int, device, position: int = 0) -> Dict:
    train, val = data
    M.seed_all(args.seed)
    zkw = M.zeta_kwargs_from(args, cfg)
    model = M.TinyLM(
        vocab,
        cfg["seq_len"],
        attn,
        cfg["d_model"],
        cfg["n_layers"],
        cfg["n_heads"],
        conv_kernel=cfg["conv"],
        zeta_kwargs=zkw if attn == "zeta" else None,
        init=args.init,
    ).to(device)
    opt = M.make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    gen = torch.Generator().manual_seed(args.seed)
    n, bs, steps = cfg["seq_len"], cfg["batch"], cfg["steps"]
    curve = []
    t0 = time.time()
    bar = tqdm(
        range(steps),
        desc=f"charlm {attn:7s}",
        dynamic_ncols=True,
        mininterval=2.0,
        position=position,
    )
    for step in bar:
        st = torch.randint(0, len(train) - n - 1, (bs,), generator=gen)
        x = torch.stack([train[i : i + n] for i in st]).to(device)
        y = torch.stack([train[i + 1 : i + n + 1] for i in st]).to(device)
        for g in opt.param_groups:
            g["lr"] = M.lr_at(step, steps, cfg["lr"], cfg["warmup"])
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            bpc = evaluate(model, val, cfg, device)
            tl = float(loss.detach()) / math.log(2)
            curve.append(
                {"step": step + 1, "train_bpc": tl, "val_bpc": bpc, "seconds": time.time() - t0}
            )
            bar.set_postfix(train_bpc=f"{tl:.3f}", val_bpc=f"{bpc:.3f}")
    res = {
        "attn": attn,
        "params": M.n_params(model),
        "train_seconds": time.time() - t0,
        "curve": curve,
        "final_val_bpc": curve[-1]["val_bpc"],
    }
    if attn == "zeta":
        res["zeta_kwargs"] = zkw
        res["gamma"] = [
            [round(float(g), 4) for g in blk.attn.gamma.detach()] for blk in model.blocks
        ]
        x = torch.stack([val[i : i + n] for i in range(0, 4 * n, n)]).to(device)
        idx_kw = {k: v for k, v in zkw.items() if k not in ("key_dim", "topk", "gamma_init")}
        res["learned_key_recall"] = M.learned_key_recall(model, lambda: model(x), idx_kw, args.topk)
    return res


def table(cfg: dict, corpus: dict, results: Dict[str, Dict]) -> str:
    lines = [
        f"char-LM on pydoc_data.topics (Python {corpus['python']}, {corpus['chars']:,} chars, "
        f"last 10% held out), seq len {cfg['seq_len']}, d_model {cfg['d_model']}, "
        f"{cfg['n_layers']} layers, {cfg['n_heads']} heads, short conv {cfg['conv']}, "
        f"{cfg['steps']} steps x batch {cfg['batch']}",
        "",
        "| attention | params | val bits/char | vs softmax | train time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    base = results.get("softmax", {}).get("final_val_bpc")
    for name, r in results.items():
        label = (
            "softmax (SDPA)"
            if name == "softmax"
            else (f"ZETA (key_dim {r['zeta_kwargs']['key_dim']}, top-{r['zeta_kwargs']['topk']})")
        )
        rel = f"{100 * (r['final_val_bpc'] / base - 1):+.2f}%" if base else "-"
        lines.append(
            f"| {label} | {r['params']:,} | {r['final_val_bpc']:.4f} | {rel} | {r['train_seconds']:.0f} |"
        )
    z = results.get("zeta")
    if z and "learned_key_recall" in z:
        rec = ", ".join(
            f"layer {r['layer']} {100 * r['recall_configured']:.1f}% "
            f"(1 curve {100 * r['recall_n_curves=1']:.1f}%, {z['zeta_kwargs']['key_dim'] + 1} curves "
            f"{100 * r['recall_n_curves=d+1']:.1f}%)"
            for r in z["learned_key_recall"]
        )
        lines.append("")
        lines.append(
            f"ZETA index recall@top-{z['zeta_kwargs']['topk']} vs exact kNN on the learned validation "
            f"keys/queries, window search with {z['zeta_kwargs']['n_curves']} curves (trained "
            f"{'with exact search' if z['zeta_kwargs'].get('exact', True) else 'so'}): {rec}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = M.make_parser(__doc__, QUICK, FULL, "charlm")
    args = p.parse_args(argv)

    cfg, attns, procs, per_job = M.plan(args, QUICK, FULL)
    data, chars, corpus = make_data()
    print(f"config: {cfg}  device={args.device}  {procs} process(es) x {per_job} thread(s)")
    print(f"corpus: {corpus}, vocab {len(chars)}")
    t_all = time.time()
    if procs > 1:
        out = M.run_jobs(worker, [(a, cfg, args, per_job, i) for i, a in enumerate(attns)], procs)
    else:
        out = [train_one(a, cfg, args, data, len(chars), args.device) for a in attns]
    results = dict(zip(attns, out))
    for a, r in results.items():
        print(f"{a}: val bpc {r['final_val_bpc']:.4f}  ({r['train_seconds']:.0f}s)")
    md = table(cfg, corpus, results)
    print()
    print(md)
    if args.no_save:
        return 0
    stem = args.out or f"charlm-{M.device_tag(args.device)}-{M.today()}"
    payload = {
        "benchmark": "charlm",
        "config": cfg,
        "mode": "full" if args.full else "quick",
        "seed": args.seed,
        "device": args.device,
        "machine": M.device_tag(args.device),
        "corpus": {**corpus, "vocab": len(chars)},
        "env": M.env_info(),
        "total_seconds": time.time() - t_all,
        "argv": sys.argv[1:],
        "results": results,
    }
    path = M.write_results(stem, payload, md)
    M.plot_curves(
        path.with_suffix(".png"),
        results,
        md.splitlines()[0],
        "val_bpc",
        "validation bits per character",
    )
    print(f"wrote {path}, {path.with_suffix('.md').name}, {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
