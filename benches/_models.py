"""Small shared pieces for the quality benchmarks (``mqar.py``, ``charlm.py``).

One decoder-only transformer, ``TinyLM``, whose token mixer is switchable between standard
softmax attention (``torch.nn.functional.scaled_dot_product_attention``, causal) and
``zeta.nn.ZetaAttention``; embeddings, positions, norms, MLPs and the head are identical.
Plus helpers: seeding, a machine tag, tqdm and a collector of learned queries/keys.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- mixers
class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention (the baseline). forward((B, N, E)) -> (B, N, E)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, e = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, e))


def make_mixer(
    attn: str, embed_dim: int, num_heads: int, zeta_kwargs: Optional[dict] = None
) -> nn.Module:
    if attn == "softmax":
        return SoftmaxAttention(embed_dim, num_heads)
    if attn == "zeta":
        from zeta.nn import ZetaAttention

        return ZetaAttention(embed_dim, num_heads, **(zeta_kwargs or {}))
    raise ValueError(f"attn: expected 'softmax' or 'zeta', got {attn!r}")


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over the sequence (optional, off by default)."""

    def __init__(self, embed_dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(embed_dim, embed_dim, kernel, groups=embed_dim, padding=kernel - 1)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :n].transpose(1, 2)


class Block(nn.Module):
    """Pre-norm block: [x + conv(norm(x))], x + mixer(norm(x)), x + mlp(norm(x))."""

    def __init__(
        self,
        attn: str,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: int = 4,
        conv_kernel: int = 0,
        zeta_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        self.conv = None
        if conv_kernel > 0:
            self.norm0 = nn.LayerNorm(embed_dim)
            self.conv = ShortConv(embed_dim, conv_kernel)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = make_mixer(attn, embed_dim, num_heads, zeta_kwargs)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_ratio * embed_dim),
            nn.GELU(),
            nn.Linear(mlp_ratio * embed_dim, embed_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = x + self.conv(self.norm0(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token + learned absolute position embeddings, ``n_layers`` blocks, final norm, head
    (tied to the token embedding by default).

    ``init="gpt2"``: every Linear/Embedding N(0, 0.02^2), the ZetaAttention layers' too;
    ``init="user"``: the same for the model's own modules (embeddings, MLPs, the softmax
    baseline's projections) while ZetaAttention keeps its own init, as when a user builds a
    GPT-2-style model around the library's layer.

    forward(idx (B, N) int64, select=None) -> logits (B, N, vocab), or, with a boolean mask
    ``select`` (B, N), logits of the selected positions only (M, vocab): MQAR computes the
    head only where there is a label.
    """

    def __init__(
        self,
        vocab: int,
        max_len: int,
        attn: str = "softmax",
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 2,
        mlp_ratio: int = 4,
        conv_kernel: int = 0,
        zeta_kwargs: Optional[dict] = None,
        tie_embeddings: bool = True,
        init: str = "gpt2",
    ):
        super().__init__()
        self.attn_kind = attn
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            Block(attn, d_model, n_heads, mlp_ratio, conv_kernel, zeta_kwargs)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        if init == "gpt2":  # every Linear and Embedding N(0, 0.02^2), biases 0
            self.apply(_init)
        elif init == "user":  # N(0, 0.02^2) except inside library layers (ZetaAttention)
            lib = {
                id(p)
                for m in self.modules()
                if type(m).__name__ == "ZetaAttention"
                for p in m.parameters()
            }
            for m in self.modules():
                if any(id(p) in lib for p in m.parameters(recurse=False)):
                    continue
                _init(m)
        else:
            raise ValueError(f"init: expected 'gpt2' or 'user', got {init!r}")
        if tie_embeddings:  # as in Zoology: copying a token is then easy to express
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor, select: Optional[Tensor] = None) -> Tensor:
        n = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(n, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if select is not None:
            x = x[select]
        return self.head(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings' positions or ZETA's log_gamma."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "pos." not in name else no_decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_threads(n: Optional[int]) -> int:
    """Torch intra-op threads and ZETA_NUM_THREADS (read when zeta's pool starts); returns n."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    os.environ["ZETA_NUM_THREADS"] = str(n)
    return n


def run_jobs(worker, jobs: List[tuple], n_procs: int) -> List:
    """``[worker(*job) for job in jobs]``, in ``n_procs`` spawned processes when > 1.

    Two single-threaded processes (one per attention) use 2 cores better than one process
    with 2 threads; each worker rebuilds its (seeded, deterministic) data itself.
    """
    if n_procs <= 1 or len(jobs) <= 1:
        return [worker(*job) for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=n_procs, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(worker, *job) for job in jobs]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------- learned q/k
class QKRecorder:
    """Captures each ZetaAttention layer's projected queries and keys during a forward.

    Use as a context manager; ``qk[layer] = (q (B, H, N, d_k), k (B, H_kv, N, d_k))``.
    """

    def __init__(self, model: nn.Module):
        from zeta.nn import ZetaAttention

        self.layers = [m for m in model.modules() if isinstance(m, ZetaAttention)]
        self.raw: Dict[int, Dict[str, Tensor]] = {}
        self.handles: List = []

    def __enter__(self) -> QKRecorder:
        for i, layer in enumerate(self.layers):
            self.raw[i] = {}
            for name in ("q_proj", "k_proj"):

                def hook(_mod, _inp, out, i=i, name=name):
                    self.raw[i][name] = out.detach()

                self.handles.append(getattr(layer, name).register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @property
    def qk(self) -> Dict[int, tuple]:
        out = {}
        for i, layer in enumerate(self.layers):
            q, k = self.raw[i]["q_proj"], self.raw[i]["k_proj"]
            b, n, _ = q.shape
            out[i] = (
                q.view(b, n, layer.num_heads, layer.key_dim).transpose(1, 2).contiguous(),
                k.view(b, n, layer.num_kv_heads, layer.key_dim).transpose(1, 2).contiguous(),
            )
        return out


def learned_key_recall(model: nn.Module, batch_fn, zeta_kwargs: dict, topk: int) -> List[dict]:
    """Recall@topk of the Z-order index vs exact kNN on each ZETA layer's learned q/k.

    ``batch_fn()`` runs a forward of ``model`` (no grad). Returns one dict per layer with
    recall of the configured index and of a few index variants, for comparison.
    """
    import zeta

    with QKRecorder(model) as rec, torch.no_grad():
        batch_fn()
    idx_kw = {
        k: v
        for k, v in zeta_kwargs.items()
        if k in ("chunk", "window", "n_curves", "n_sink", "bits", "scale")
    }
    idx_kw["exact"] = False  # the window search's recall (exact search finds all: 1.0)
    rows = []
    for layer, (q, k) in rec.qk.items():
        q, k = q.float().cpu(), k.float().cpu()
        row = {"layer": layer, "q_abs_max": float(q.abs().max()), "k_abs_max": float(k.abs().max())}
        variants = {
            "configured": idx_kw,
            "n_curves=1": {**idx_kw, "n_curves": 1},
            "n_curves=d+1": {**idx_kw, "n_curves": q.shape[-1] + 1},
            "window=2*topk": {**idx_kw, "window": 2 * topk},
        }
        for name, kw in variants.items():
            ind, _ = zeta.knn(q, k, topk, causal=True, **kw)
            row[f"recall_{name}"] = zeta.recall(q, k, ind, causal=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- reporting
def machine_tag() -> str:
    """platform.machine() + CPU model + logical cores, lower case: 'x86_64-amd-epyc-2c'.

    Same convention as the other benches' result files.
    """
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or "cpu"
    model = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-").lower() or "cpu"
    return f"{platform.machine().lower()}-{model}-{os.cpu_count()}c"


def device_tag(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        return machine_tag() + "-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return machine_tag()


def today() -> str:
    return datetime.date.today().isoformat()


def write_results(stem: str, payload: dict, table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    return path


def env_info() -> dict:
    import zeta

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zeta": getattr(zeta, "__version__", "?"),
        "torch_threads": torch.get_num_threads(),
        "zeta_threads": os.environ.get("ZETA_NUM_THREADS"),
    }


# ---------------------------------------------------------------------------------------------
# the command line shared by mqar.py and charlm.py
# ---------------------------------------------------------------------------------------------


def make_parser(doc: str, quick: dict, full: dict, name: str):
    """The options both training scripts take; ``quick``/``full`` keys become overrides."""
    import argparse

    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small CPU configuration (default)")
    g.add_argument("--full", action="store_true", help="larger configuration, meant for a GPU")
    p.add_argument("--attn", choices=["both", "softmax", "zeta"], default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="torch / ZETA threads (default: all cores)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes, one per attention (CPU; default: min(2, threads))",
    )
    p.add_argument("--seed", type=int, default=0)
    for k in quick:
        p.add_argument(
            "--" + k.replace("_", "-"),
            type=type(quick[k]),
            default=None,
            help=f"override (quick {quick[k]}, full {full[k]})",
        )
    p.add_argument(
        "--init",
        choices=["gpt2", "user"],
        default="gpt2",
        help="gpt2: N(0, 0.02^2) everywhere, ZetaAttention too; user: ZetaAttention keeps its own init",
    )
    p.add_argument("--key-dim", type=int, default=3)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--gamma-init", type=float, default=1.0)
    p.add_argument("--n-sink", type=int, default=0)
    p.add_argument("--mean-token", action="store_true")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument(
        "--window", type=int, default=0, help="index window (0: zeta's default for the search)"
    )
    p.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exact top-k search, zeta's default; --no-exact: the window search (the README's"
        " MQAR / char-LM numbers up to 2026-11-30 are window-search runs)",
    )
    p.add_argument(
        "--out", default=None, help=f"result file stem (default {name}-<machine>-<date>)"
    )
    p.add_argument("--no-save", action="store_true")
    return p


def plan(args, quick: dict, full: dict):
    """(config with overrides, attentions to train, processes, threads per process)."""
    cfg = dict(full if args.full else quick)
    for k in quick:
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    attns = ["softmax", "zeta"] if args.attn == "both" else [args.attn]
    threads = args.threads or os.cpu_count() or 1
    procs = min(len(attns), threads, args.jobs or threads) if args.device == "cpu" else 1
    per_job = max(1, threads // procs)
    set_threads(per_job)
    return cfg, attns, procs, per_job


def zeta_kwargs_from(args, cfg: dict) -> dict:
    """ZetaAttention keyword arguments from the command line."""
    kw = dict(
        key_dim=args.key_dim,
        topk=args.topk,
        gamma_init=args.gamma_init,
        n_sink=args.n_sink,
        mean_token=args.mean_token,
        n_curves=cfg["n_curves"],
        chunk=args.chunk,
        exact=args.exact,
    )
    if args.window:
        kw["window"] = args.window
    return kw


def plot_curves(
    path, results: Dict[str, Dict], title: str, key: str, ylabel: str, scale: float = 1.0, ylim=None
) -> None:
    """One line per attention: ``scale * curve[key]`` against the training step."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, r in results.items():
        ax.plot(
            [c["step"] for c in r["curve"]],
            [scale * c[key] for c in r["curve"]],
            marker="o",
            ms=3,
            label=name,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 90), fontsize=7)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
