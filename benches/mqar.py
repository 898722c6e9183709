"""MQAR (multi-query associative recall, Zoology) with softmax attention vs ZETA attention.

    python benches/mqar.py --quick             # 2 CPU cores: ~15 min wall, both attentions
    python benches/mqar.py --full --device cuda
    python benches/mqar.py --setting A --seeds 0,1,2   # plain transformer, no convolution

``--setting A|B|C|D|E``: a plain pre-norm transformer as a user would assemble it (no short
convolution, GPT-2-style N(0, 0.02^2) init of the model's own modules while ZetaAttention keeps
its own init), trained on one length (no mix), batch 64, AdamW lr 1e-3, weight decay 0.1, OneCycle; several seeds and
variants (``--variants``: softmax, zeta = ZetaAttention's defaults, and ablations of them) in
parallel single-threaded processes. Writes benches/results/mqar-plain-<setting>-....

The data follow Zoology's ``multiquery_ar`` (Arora et al. 2023): keys from the lower half of
the vocabulary, values from the upper half, ``num_kv`` distinct key-value pairs at the start
of the sequence, then the keys again as queries at power-law distributed gaps (``power_a``),
all other positions random tokens; the loss and the accuracy count only the answers (the
value that follows each query). As in Zoology, training mixes shorter sequences with fewer
pairs with the target configuration (``train_mix``); the test set is the target
(``seq_len``, ``num_kv``), other lengths are reported too.

The model (``_models.TinyLM``): tied token embedding/head, learned positions, pre-norm blocks
of [short causal depthwise conv] + attention + MLP. Only the attention differs: softmax
(``scaled_dot_product_attention``, causal, head width d_model/heads) or
``zeta.nn.ZetaAttention`` (key_dim 3, top-32, learnable gamma, ``n_curves`` shifted Z-curves).
Same data, seeds, batches and steps for both. On CPU the two attentions train in two
single-threaded processes at once (``--jobs``). Writes
benches/results/mqar-<machine>-<date>.{json,md,png}.

Why these choices: with untied embeddings, or (on CPU budgets) without the short conv, the
loss stays on its plateau for thousands of steps for BOTH attentions; vocab 8192 (Zoology's)
needs far more steps than ``--quick`` allows, hence vocab 512 there and 8192 in ``--full``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _models as M  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

# train_mix: "seq_len:num_kv:share,...": like Zoology, training mixes short sequences with few
# pairs (where the lookup is learnt fast) with the target length; every batch comes from
# one entry (no padding). The test set is the target (seq_len, num_kv).
QUICK = dict(
    vocab=512,
    seq_len=256,
    num_kv=16,
    train_mix="64:4:0.4,128:8:0.2,256:16:0.4",
    n_curves=2,
    d_model=64,
    n_layers=2,
    n_heads=2,
    conv=3,
    batch=32,
    steps=3000,
    lr=3e-3,
    warmup=50,
    weight_decay=0.1,
    n_train=64_000,
    n_test=1_000,
    eval_every=150,
)
FULL = dict(
    vocab=8192,
    seq_len=512,
    num_kv=64,
    train_mix="64:4:0.3,128:8:0.1,256:16:0.1,256:32:0.1,256:64:0.1,512:64:0.3",
    n_curves=2,
    d_model=256,
    n_layers=2,
    n_heads=4,
    conv=3,
    batch=64,
    steps=20_000,
    lr=1e-3,
    warmup=1000,
    weight_decay=0.1,
    n_train=256_000,
    n_test=3_000,
    eval_every=500,
)


# Plain-transformer settings (no convolution); A-C as first reported, D-E added.
PLAIN_COMMON = dict(
    n_layers=2,
    conv=0,
    batch=64,
    lr=1e-3,
    weight_decay=0.1,
    n_train=100_000,
    n_test=1_000,
    eval_every=250,
    n_curves=1,
    topk=32,
)
PLAIN = {
    "A": dict(vocab=128, seq_len=64, num_kv=8, d_model=64, n_heads=2, steps=3000),
    "B": dict(vocab=128, seq_len=128, num_kv=8, d_model=128, n_heads=4, steps=3000),
    "C": dict(vocab=256, seq_len=256, num_kv=16, d_model=64, n_heads=2, steps=6000),
    "D": dict(vocab=256, seq_len=256, num_kv=16, d_model=64, n_heads=2, steps=3000),
    "E": dict(vocab=256, seq_len=128, num_kv=16, d_model=64, n_heads=2, steps=3000),
}


def _reinit(model, fn) -> None:
    from zeta.nn import ZetaAttention

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ZetaAttention):
                fn(m)


def _small_qk(m) -> None:
    m.v_proj.reset_parameters()
    for lin in (m.q_proj, m.k_proj):
        torch.nn.init.normal_(lin.weight, std=0.16 / m.embed_dim**0.5)
        torch.nn.init.zeros_(lin.bias)


def _zero_out(m) -> None:
    m.v_proj.reset_parameters()
    torch.nn.init.zeros_(m.out_proj.weight)
    torch.nn.init.zeros_(m.out_proj.bias)


# name -> (attention, ZetaAttention kwargs, change made after construction, what it tests)
VARIANTS = {
    "softmax": ("softmax", {}, None, "SDPA, head width d_model/heads"),
    "zeta": ("zeta", {}, None, "ZetaAttention's defaults"),
    "zeta-v-default": (
        "zeta",
        {},
        lambda m: m.v_proj.reset_parameters(),
        "v_proj at PyTorch's default init (the defaults before issue 13)",
    ),
    "zeta-small-qk": (
        "zeta",
        {},
        _small_qk,
        "v default; q/k weights N(0, 0.16^2/E), small distances",
    ),
    "zeta-zero-out": ("zeta", {}, _zero_out, "v default; out_proj zero (branch starts at 0)"),
    "zeta-gpt2-init": (
        "zeta",
        {},
        lambda m: m.apply(M._init),
        "every ZetaAttention Linear N(0, 0.02^2) like the rest of the model",
    ),
    "zeta-gamma0.1": ("zeta", {"gamma_init": 0.1}, None, "defaults with gamma_init 0.1"),
    "zeta-mean-token": ("zeta", {"mean_token": True}, None, "defaults with the mean token"),
}


def plain_cfg(setting: str) -> dict:
    if setting not in PLAIN:
        raise SystemExit(f"--setting: expected one of {', '.join(PLAIN)}, got {setting!r}")
    return {**PLAIN_COMMON, **PLAIN[setting], "setting": setting}


def plain_worker(variant: str, cfg: dict, seed: int, position: int, threads: int = 1) -> Dict:
    """Train one (variant, seed) of a plain setting in this process (``threads`` threads)."""
    M.set_threads(threads)
    attn, zkw, change, _ = VARIANTS[variant]
    xtr, ytr = multiquery_ar(cfg["vocab"], cfg["n_train"], cfg["seq_len"], cfg["num_kv"], seed)
    xte, yte = multiquery_ar(
        cfg["vocab"], cfg["n_test"], cfg["seq_len"], cfg["num_kv"], seed + 10_000
    )
    M.seed_all(seed)
    zeta_kwargs = {"topk": cfg["topk"], "n_curves": cfg["n_curves"], **zkw}
    model = M.TinyLM(
        cfg["vocab"],
        cfg["seq_len"],
        attn,
        cfg["d_model"],
        cfg["n_layers"],
        cfg["n_heads"],
        conv_kernel=0,
        zeta_kwargs=zeta_kwargs if attn == "zeta" else None,
        init="user",
    )
    if change is not None:
        _reinit(model, change)
    device = cfg.get("device", "cpu")
    model.to(device)
    steps, bs = cfg["steps"], cfg["batch"]
    opt = M.make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.time()
    bar = tqdm(
        range(steps),
        desc=f"{cfg['setting']} {variant} s{seed}",
        dynamic_ncols=True,
        mininterval=5.0,
        position=position,
        leave=False,
    )
    for step in bar:
        ib = torch.randint(0, len(xtr), (bs,), generator=gen)
        loss = train_step(model, opt, xtr[ib].to(device), ytr[ib].to(device))
        sched.step()
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            curve.append(eval_point(model, xte, yte, device, step + 1, loss, t0))
            bar.set_postfix(acc=f"{curve[-1]['test_acc']:.3f}")
    out = {
        "variant": variant,
        "seed": seed,
        "attn": attn,
        "params": M.n_params(model),
        "train_seconds": time.time() - t0,
        "curve": curve,
        "final_test_acc": curve[-1]["test_acc"],
    }
    if attn == "zeta":
        out["gamma"] = [[round(float(g), 4) for g in b.attn.gamma.detach()] for b in model.blocks]
    return out


def plain_table(cfg: dict, runs) -> str:
    lines = [
        f"MQAR, plain transformer (no convolution), setting {cfg['setting']}: seq {cfg['seq_len']}, "
        f"{cfg['num_kv']} pairs, vocab {cfg['vocab']}, d_model {cfg['d_model']}, {cfg['n_heads']} heads, "
        f"{cfg['n_layers']} layers, {cfg['steps']} steps x batch {cfg['batch']}, AdamW lr {cfg['lr']} "
        f"wd {cfg['weight_decay']}, OneCycle; ZETA top-{cfg['topk']}, {cfg['n_curves']} curve",
        "",
        "| variant | what | final test accuracy per seed | mean | min |",
        "|---|---|---|---:|---:|",
    ]
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        accs = [100 * r["final_test_acc"] for r in rs]
        per = " / ".join(f"{a:.2f}% (s{r['seed']})" for a, r in zip(accs, rs))
        lines.append(
            f"| {v} | {VARIANTS[v][3]} | {per} | {np.mean(accs):.2f}% | {min(accs):.2f}% |"
        )
    return "\n".join(lines)


def run_plain(args) -> int:
    cfg = plain_cfg(args.setting)
    if args.steps:
        cfg["steps"] = args.steps
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg["device"] = args.device
    jobs = [
        (v, cfg, s, i % max(1, args.jobs or 2))
        for i, (v, s) in enumerate((v, s) for v in variants for s in seeds)
    ]
    procs = args.jobs or min(len(jobs), os.cpu_count() or 1)
    if args.device != "cpu":
        procs = 1  # one GPU: the runs take turns
    print(f"setting {args.setting}: {cfg}; {len(jobs)} runs in {procs} process(es)")
    t0 = time.time()
    runs = M.run_jobs(plain_worker, jobs, procs)
    md = plain_table(cfg, runs)
    print(md)
    if args.no_save:
        return 0
    stem = args.out or f"mqar-plain-{args.setting}-{M.machine_tag()}-{M.today()}"
    payload = {
        "benchmark": "mqar-plain",
        "config": cfg,
        "seeds": seeds,
        "variants": variants,
        "machine": M.machine_tag(),
        "env": {**M.env_info(), "processes": procs},
        "total_seconds": time.time() - t0,
        "argv": sys.argv[1:],
        "runs": runs,
    }
    mean_curves = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        mean_curves[f"{v} (mean of {len(rs)})"] = {
            "curve": [
                {
                    "step": c["step"],
                    "test_acc": float(np.mean([r["curve"][i]["test_acc"] for r in rs])),
                }
                for i, c in enumerate(rs[0]["curve"])
            ]
        }
    return save(stem, payload, md, mean_curves)


# --------------------------------------------------------------------------- data
def multiquery_ar(
    vocab: int,
    num_examples: int,
    seq_len: int,
    num_kv: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zoology's MQAR: (inputs (n, seq_len) int64, labels (n, seq_len) int64, -100 = no loss).

    Vectorised and seeded (numpy Generator); sampling without replacement (keys, values,
    query gaps with p_i ~ i^(power_a - 1)) uses the Gumbel-top-k trick, which draws from the
    same distribution as ``np.random.choice(replace=False, p=...)``.
    """
    if seq_len % 2 or 4 * num_kv > seq_len or num_kv >= vocab // 2:
        raise ValueError("need even seq_len, 4 * num_kv <= seq_len and num_kv < vocab // 2")
    rng = np.random.default_rng(seed)
    context = 2 * num_kv
    key_vocab = vocab // 2
    space = (seq_len - context) // 2
    logp = np.log(power_a * np.arange(1, space + 1) ** (power_a - 1))
    inputs = np.empty((num_examples, seq_len), dtype=np.int64)
    labels = np.full((num_examples, seq_len), -100, dtype=np.int64)
    rows = np.arange(min(num_examples, 2048))[:, None]
    for s in range(0, num_examples, 2048):
        n = min(2048, num_examples - s)
        r = rows[:n]
        keys = np.argpartition(rng.random((n, key_vocab - 1)), num_kv, axis=1)[:, :num_kv] + 1
        values = (
            np.argpartition(rng.random((n, vocab - key_vocab)), num_kv, axis=1)[:, :num_kv]
            + key_vocab
        )
        gumbel = logp[None, :] - np.log(-np.log(rng.random((n, space))))
        gaps = np.argsort(-gumbel, axis=1)[:, :num_kv]
        ex = np.zeros((n, seq_len + 1), dtype=np.int64)
        ex[:, 0:context:2] = keys
        ex[:, 1:context:2] = values
        ex[r, context + 2 * gaps] = keys
        lab = np.full((n, seq_len + 1), -100, dtype=np.int64)
        lab[r, context + 2 * gaps + 1] = values
        x = ex[:, :-1]
        if random_non_queries:
            noise = rng.integers(0, vocab, size=x.shape)
            x = np.where(x == 0, noise, x)
        inputs[s : s + n] = x
        labels[s : s + n] = lab[:, 1:]
    return torch.from_numpy(inputs), torch.from_numpy(labels)


# --------------------------------------------------------------------------- train / eval
def evaluate(model, x, y, device, batch=250) -> Tuple[float, float]:
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            xb, yb = x[s : s + batch].to(device), y[s : s + batch].to(device)
            sel = yb != -100
            logits = model(xb, select=sel)
            tgt = yb[sel]
            loss_sum += float(F.cross_entropy(logits.float(), tgt, reduction="sum"))
            correct += int((logits.argmax(-1) == tgt).sum())
            total += int(tgt.numel())
    model.train()
    return correct / total, loss_sum / total


def save(stem: str, payload: dict, md: str, curves: Dict[str, Dict]) -> int:
    """benches/results/<stem>.json, .md and .png (test accuracy per curve)."""
    path = M.write_results(stem, payload, md)
    M.plot_curves(
        path.with_suffix(".png"),
        curves,
        md.splitlines()[0],
        "test_acc",
        "test accuracy (%)",
        scale=100,
        ylim=(0, 101),
    )
    print(f"wrote {path}, {path.with_suffix('.md').name}, {path.with_suffix('.png').name}")
    return 0


def train_step(model, opt, xb, yb) -> torch.Tensor:
    """One AdamW step on the answers of a batch (gradient norm clipped at 1); the loss."""
    sel = yb != -100
    loss = F.cross_entropy(model(xb, select=sel).float(), yb[sel])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def eval_point(model, x, y, device, step: int, loss, t0: float) -> dict:
    """A learning-curve point: test accuracy/loss after ``step`` steps."""
    acc, tl = evaluate(model, x, y, device)
    return {
        "step": step,
        "train_loss": float(loss),
        "test_loss": tl,
        "test_acc": acc,
        "seconds": time.time() - t0,
    }


def parse_mix(spec: str):
    """'64:4:0.4,256:16:0.6' -> [(64, 4, 0.4), (256, 16, 0.6)] (shares normalised)."""
    out = []
    for part in spec.split(","):
        n, kv, w = part.split(":")
        out.append((int(n), int(kv), float(w)))
    tot = sum(w for _, _, w in out)
    return [(n, kv, w / tot) for n, kv, w in out]


def make_data(cfg: dict, seed: int):
    """{'train': [(x, y, share), ...], 'test': (x, y), 'test_mix': {name: (x, y)}} (seeded)."""
    mix = parse_mix(cfg["train_mix"])
    train = []
    for i, (n, kv, w) in enumerate(mix):
        x, y = multiquery_ar(
            cfg["vocab"], max(cfg["batch"], int(cfg["n_train"] * w)), n, kv, seed=seed + i
        )
        train.append((x, y, w))
    test = multiquery_ar(
        cfg["vocab"], cfg["n_test"], cfg["seq_len"], cfg["num_kv"], seed=seed + 10_000
    )
    test_mix = {
        f"{n}/{kv}": multiquery_ar(cfg["vocab"], cfg["n_test"], n, kv, seed=seed + 10_001 + i)
        for i, (n, kv, _) in enumerate(mix)
        if (n, kv) != (cfg["seq_len"], cfg["num_kv"])
    }
    return {"train": train, "test": test, "test_mix": test_mix}


def worker(attn: str, cfg: dict, args, threads: int, position: int) -> Dict:
    """One attention in its own process: rebuild the seeded data, train, evaluate."""
    M.set_threads(threads)
    return train_one(attn, cfg, args, make_data(cfg, args.seed), args.device, position)


def train_one(attn: str, cfg: dict, args, data, device, position: int = 0) -> Dict:
    xte, yte = data["test"]
    M.seed_all(args.seed)
    zkw = M.zeta_kwargs_from(args, cfg)
    max_len = max(cfg["seq_len"], max(x.shape[1] for x, _, _ in data["train"]))
    model = M.TinyLM(
        cfg["vocab"],
        max_len,
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
    rng = np.random.default_rng(args.seed)
    steps, bs = cfg["steps"], cfg["batch"]
    shares = np.array([w for _, _, w in data["train"]])
    perms = [torch.randperm(len(x), generator=gen) for x, _, _ in data["train"]]
    ptr = [0] * len(perms)
    curve = []
    t0 = time.time()
    bar = tqdm(
        range(steps), desc=f"mqar {attn:7s}", dynamic_ncols=True, mininterval=2.0, position=position
    )
    for step in bar:
        j = int(rng.choice(len(shares), p=shares))
        xtr, ytr, _ = data["train"][j]
        if ptr[j] + bs > len(perms[j]):
            perms[j], ptr[j] = torch.randperm(len(xtr), generator=gen), 0
        ib = perms[j][ptr[j] : ptr[j] + bs]
        ptr[j] += bs
        for g in opt.param_groups:
            g["lr"] = M.lr_at(step, steps, cfg["lr"], cfg["warmup"])
        loss = train_step(model, opt, xtr[ib].to(device), ytr[ib].to(device))
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            curve.append(eval_point(model, xte, yte, device, step + 1, loss, t0))
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{curve[-1]['test_acc']:.4f}")
    train_s = time.time() - t0
    res = {
        "attn": attn,
        "params": M.n_params(model),
        "train_seconds": train_s,
        "curve": curve,
        "final_test_acc": curve[-1]["test_acc"],
        "best_test_acc": max(c["test_acc"] for c in curve),
        "final_test_loss": curve[-1]["test_loss"],
        "test_acc_other": {
            k: evaluate(model, x, y, device)[0] for k, (x, y) in data["test_mix"].items()
        },
    }
    if attn == "zeta":
        res["zeta_kwargs"] = zkw
        res["gamma"] = [
            [round(float(g), 4) for g in blk.attn.gamma.detach()] for blk in model.blocks
        ]
        idx_kw = {k: v for k, v in zkw.items() if k not in ("key_dim", "topk", "gamma_init")}
        nb = min(64, len(xte))
        res["learned_key_recall"] = M.learned_key_recall(
            model, lambda: model(xte[:nb].to(device)), idx_kw, args.topk
        )
        # Would a perfect index help? Evaluate the same weights with an exact top-k search.
        for blk in model.blocks:
            blk.attn.zeta_kwargs = {**blk.attn.zeta_kwargs, "window": cfg["seq_len"]}
        res["test_acc_exact_topk"], _ = evaluate(model, xte, yte, device)
        for blk in model.blocks:
            blk.attn.zeta_kwargs = {k: v for k, v in blk.attn.zeta_kwargs.items() if k != "window"}
            if "window" in zkw:
                blk.attn.zeta_kwargs["window"] = zkw["window"]
    return res


def table(cfg: dict, results: Dict[str, Dict]) -> str:
    lines = [
        f"MQAR (Zoology), vocab {cfg['vocab']}, test: seq len {cfg['seq_len']}, {cfg['num_kv']} KV pairs; "
        f"train mix (len:pairs:share) {cfg['train_mix']}; d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
        f"{cfg['n_heads']} heads, short conv {cfg['conv']}, {cfg['steps']} steps x batch {cfg['batch']}",
        "",
        "| attention | params | test accuracy | best accuracy | test loss | other lengths (len/pairs: acc) | train time (s) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in results.items():
        label = (
            "softmax (SDPA)"
            if name == "softmax"
            else (f"ZETA (key_dim {r['zeta_kwargs']['key_dim']}, top-{r['zeta_kwargs']['topk']})")
        )
        other = (
            ", ".join(f"{k}: {100 * v:.1f}%" for k, v in r.get("test_acc_other", {}).items()) or "-"
        )
        lines.append(
            f"| {label} | {r['params']:,} | {100 * r['final_test_acc']:.2f}% | "
            f"{100 * r['best_test_acc']:.2f}% | {r['final_test_loss']:.4f} | {other} | "
            f"{r['train_seconds']:.0f} |"
        )
    z = results.get("zeta")
    if z and "learned_key_recall" in z:
        lines.append("")
        nc = z["zeta_kwargs"]["n_curves"]
        lines.append(
            f"| ZETA layer | window search recall@top-{z['zeta_kwargs']['topk']}, {nc} curve(s) "
            f"(trained {'with exact search' if z['zeta_kwargs'].get('exact', True) else 'so'}) | "
            f"1 curve | {z['zeta_kwargs']['key_dim'] + 1} curves | window 2k |"
        )
        lines.append("|---|---:|---:|---:|---:|")
        for row in z["learned_key_recall"]:
            lines.append(
                f"| {row['layer']} | {100 * row['recall_configured']:.2f}% | "
                f"{100 * row['recall_n_curves=1']:.2f}% | {100 * row['recall_n_curves=d+1']:.2f}% | "
                f"{100 * row['recall_window=2*topk']:.2f}% |"
            )
        lines.append("")
        lines.append(
            f"ZETA accuracy with the same weights and an exact top-k search: "
            f"{100 * z['test_acc_exact_topk']:.2f}%"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = M.make_parser(__doc__, QUICK, FULL, "mqar")
    p.add_argument(
        "--setting",
        choices=sorted(PLAIN),
        default=None,
        help="plain transformer without convolution (see the module docstring)",
    )
    p.add_argument("--seeds", default="0,1,2", help="with --setting: comma-separated seeds")
    p.add_argument(
        "--variants",
        default="softmax,zeta",
        help=f"with --setting: comma-separated, from {', '.join(VARIANTS)}",
    )
    args = p.parse_args(argv)
    if args.setting:
        used = {"setting", "seeds", "variants", "steps", "jobs", "device", "out", "no_save"}
        ignored = [
            "--" + k.replace("_", "-")
            for k, v in vars(args).items()
            if k not in used and v != p.get_default(k)
        ]
        if ignored:
            p.error(
                f"--setting fixes the model and training; {', '.join(ignored)} do not apply "
                "(choose changes with --variants)"
            )
        return run_plain(args)

    cfg, attns, procs, per_job = M.plan(args, QUICK, FULL)
    print(f"config: {cfg}  device={args.device}  {procs} process(es) x {per_job} thread(s)")
    t_all = time.time()
    if procs > 1:
        out = M.run_jobs(worker, [(a, cfg, args, per_job, i) for i, a in enumerate(attns)], procs)
    else:
        t = time.time()
        data = make_data(cfg, args.seed)
        print(
            f"data: {sum(len(x) for x, _, _ in data['train'])} train / {len(data['test'][0])} test "
            f"examples in {time.time() - t:.1f}s"
        )
        out = [train_one(a, cfg, args, data, args.device) for a in attns]
    results = dict(zip(attns, out))
    for a, r in results.items():
        print(f"{a}: test acc {100 * r['final_test_acc']:.2f}%  ({r['train_seconds']:.0f}s)")
    md = table(cfg, results)
    print()
    print(md)
    if args.no_save:
        return 0
    stem = args.out or f"mqar-{M.device_tag(args.device)}-{M.today()}"
    payload = {
        "benchmark": "mqar",
        "config": cfg,
        "mode": "full" if args.full else "quick",
        "seed": args.seed,
        "device": args.device,
        "machine": M.device_tag(args.device),
        "env": {**M.env_info(), "processes": procs, "threads_per_process": per_job},
        "total_seconds": time.time() - t_all,
        "argv": sys.argv[1:],
        "results": results,
    }
    return save(stem, payload, md, results)


if __name__ == "__main__":
    sys.exit(main())
