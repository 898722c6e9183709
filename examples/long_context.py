"""From a trained model to long-context generation on the CPU, end to end.

1. Train a small char-level ZetaForCausalLM (2 layers, E=64, ZetaAttention top-32 with
   key_dim 3, 2 curves, causal conv 3, no position embeddings) on the Python documentation
   that ships with CPython (``pydoc_data.topics``, the corpus of benches/charlm.py), or load
   the checkpoint an earlier run saved (``save_pretrained`` / ``from_pretrained``).
2. Prefill a long prompt (default 256k characters of that corpus, ``--tokens`` up to 1M:
   the corpus repeats) into a ZetaCache, with a progress bar.
3. Generate (sampling), print the text, the prefill time, the per-token decode latency and
   the cache's bytes per token.
4. Beside it, the same-size model with softmax attention and a dense KV cache decodes at the
   same context length (benches/bench_generate.py's dense twin, filled with random keys and
   values: a dense prefill at 256k costs O(N^2)). Both are timed on the same greedy step
   (model through its cache + argmax; ZETA through ``ZetaForCausalLM.decode``, the loop above
   adds sampling); both latencies and bytes per token go to
   ``benches/results/long_context-<machine>-<date>.json`` and ``.png``.

    python examples/long_context.py                    # ~1-2 minutes on 2 cores (first run trains)
    python examples/long_context.py --tokens 1000000   # 1M-character prompt
    python examples/long_context.py --retrain --steps 1500

Needs torch and transformers: ``pip install -e ".[hf,bench]"`` (or ``make generate``).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import bench_generate as BG  # noqa: E402
from _common import RESULTS, fmt_s, fmt_x, print_goals, write  # noqa: E402

from zeta.hf import ZetaCache, ZetaConfig, ZetaForCausalLM  # noqa: E402

DEFAULT_DIR = Path(tempfile.gettempdir()) / "zeta-long-context-model"


def corpus() -> str:
    """The pydoc topics joined in sorted key order (as benches/charlm.py)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def train(text: str, args) -> ZetaForCausalLM:
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lut[c] for c in text])
    split = int(0.9 * len(ids))
    tr, va = ids[:split], ids[split:]
    cfg = ZetaConfig(
        **{**BG.MODEL, "vocab_size": len(chars)},
        chars="".join(chars),  # the tokenizer: one token per character
    )
    torch.manual_seed(args.seed)
    model = ZetaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    n, bs = args.seq_len, args.batch
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        st = torch.randint(0, len(tr) - n - 1, (bs,), generator=g)
        x = torch.stack([tr[i : i + n] for i in st])
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = 3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, args.steps // 5) == 0 or step + 1 == args.steps:
            print(
                f"  step {step + 1:5d}/{args.steps}  train {float(loss.detach()) / math.log(2):.3f} bits/char"
                f"  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    model.eval()
    with torch.no_grad():
        x = torch.stack([va[i : i + n] for i in range(0, 8 * n, n)])
        val = float(model(x, labels=x).loss) / math.log(2)
    print(f"  held-out: {val:.3f} bits/char")
    model.config.val_bits_per_char = val
    return model


def sample(logits: torch.Tensor, temperature: float, g: torch.Generator) -> torch.Tensor:
    """(1, V) logits -> (1, 1) token: greedy when temperature is 0, else softmax sampling."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    p = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(p, 1, generator=g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=262_144, help="prompt length (characters)")
    ap.add_argument("--new", type=int, default=300, help="characters to generate")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, help="checkpoint folder")
    ap.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    ap.add_argument("--steps", type=int, default=500, help="training steps")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (zeta's core: all)")
    ap.add_argument("--save-cache", type=Path, help="save the prefilled ZetaCache here")
    ap.add_argument("--load-cache", type=Path, help="reuse a ZetaCache saved by --save-cache")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense comparison")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens: must be >= 2")
    torch.set_num_threads(args.threads)
    text = corpus()
    t_all = time.perf_counter()

    # 1. train (or reuse), save, load on the CPU
    if args.retrain or not (args.model_dir / "config.json").exists():
        print(f"training a char-level ZETA model on pydoc_data.topics ({len(text):,} chars)")
        model = train(text, args)
        model.save_pretrained(args.model_dir)
        print(f"saved to {args.model_dir}")
    model = ZetaForCausalLM.from_pretrained(args.model_dir).to("cpu").eval()
    chars = model.config.chars
    lut = {c: i for i, c in enumerate(chars)}
    print(f"loaded {args.model_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)")

    # 2. prefill a long prompt
    reps = -(-args.tokens // len(text))
    prompt_text = (text * reps)[: args.tokens]
    prompt = torch.tensor([[lut.get(c, 0) for c in prompt_text]])
    if args.load_cache:
        cache = ZetaCache.load(args.load_cache)
        if cache.get_seq_length() != args.tokens - 1:
            raise SystemExit(
                f"--load-cache: holds {cache.get_seq_length()} tokens, expected {args.tokens - 1}"
            )
        prefill_s = None
        print(f"loaded the prefilled cache from {args.load_cache}")
    else:
        cache = model.make_cache(batch=1)
        prefill_s = BG.prefill(model, prompt[:, :-1], cache)
        print(
            f"prefill: {args.tokens - 1:,} tokens in {prefill_s:.1f} s "
            f"({(args.tokens - 1) / prefill_s:,.0f} tokens/s)"
        )
        if args.save_cache:
            cache.save(args.save_cache)
            print(f"saved the prefilled cache to {args.save_cache}")

    # 3. generate
    g = torch.Generator().manual_seed(args.seed)
    tok, out, times = prompt[:, -1:], [], []
    with torch.no_grad():
        for _ in range(args.new):
            t0 = time.perf_counter()
            logits = model.decode(tok, cache)[:, -1]  # = model(tok, cache=cache).logits
            tok = sample(logits, args.temperature, g)
            times.append(time.perf_counter() - t0)
            out.append(chars[int(tok)])
    gen_tok = BG.med(times)
    zeta_bpt = cache.nbytes / cache.get_seq_length()
    print("\n--- prompt (last 200 of", f"{args.tokens:,} characters) ---")
    print(prompt_text[-200:])
    print("--- generated ---")
    print("".join(out))
    print("---")
    print(
        f"generate: {fmt_s(gen_tok)} per token (median of {args.new}, sampling included), "
        f"cache {zeta_bpt:,.0f} bytes/token ({cache.nbytes / 2**20:,.1f} MiB at "
        f"{cache.get_seq_length():,} tokens)"
    )
    # The comparison times what the dense twin's is timed on: a greedy step (the model
    # through its cache, then argmax), BG.STEPS of them after 3 warm-up tokens.
    steps = min(args.new, BG.STEPS)
    zeta_tok = BG.med(BG.decode_times(lambda t: model.decode(t, cache), tok, steps))
    print(f"decode: {fmt_s(zeta_tok)} per token (greedy step, median of {steps})")

    # 4. the dense twin at the same context
    row = {
        "context": args.tokens,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": None if prefill_s is None else (args.tokens - 1) / prefill_s,
        "zeta_s_per_token": zeta_tok,
        "zeta_s_per_token_generate": gen_tok,
        "zeta_bytes_per_token": zeta_bpt,
        "generated": "".join(out),
    }
    if not args.no_dense:
        print(f"dense twin: softmax attention over {args.tokens:,} cached tokens ({steps} steps)")
        row.update(BG.dense_decode(model.config, args.tokens, steps, prompt[:, -1:]))
        row["speedup"] = BG.ratio(row["dense_s_per_token"], zeta_tok)
        print(
            f"dense: {fmt_s(row['dense_s_per_token'])} per token, "
            f"{row['dense_bytes_per_token']:,} bytes/token -> ZETA {fmt_x(row['speedup'])} faster"
        )
        rep = BG.report(
            [row],
            "long_context",
            False,
            {
                "prompt": f"pydoc_data.topics, {args.tokens:,} characters",
                "trained": {
                    "steps": args.steps,
                    "seq_len": args.seq_len,
                    "batch": args.batch,
                    "val_bits_per_char": getattr(model.config, "val_bits_per_char", None),
                },
                "temperature": args.temperature,
                "torch_threads": args.threads,
            },
        )
        rep["wall_s"] = time.perf_counter() - t_all
        print_goals(rep["goals"])
        write(rep, args.out, BG.plot)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
