"""Where the time of one zeta.attention call goes on a GPU (torch profiler over every kernel).

Usage: python benches/gpu_profile.py [--n 32768] [--dtype bfloat16] [--ncu | --host]
(--ncu: one forward and one backward call only, for ``ncu --launch-skip ... python ...``;
--host: where the host's time of a call goes, cProfile over 20 calls, for small N).
"""

import argparse

import torch

import zeta

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=32768)
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--ncu", action="store_true")
ap.add_argument("--host", action="store_true")
args = ap.parse_args()
dt = getattr(torch, args.dtype)
q = torch.randn(1, 8, args.n, 3, device="cuda").to(dt).requires_grad_()
k = torch.randn(1, 8, args.n, 3, device="cuda").to(dt).requires_grad_()
v = torch.randn(1, 8, args.n, 64, device="cuda").to(dt).requires_grad_()
g = torch.randn(1, 8, args.n, 64, device="cuda").to(dt)


def step():
    zeta.attention(q, k, v, topk=32).backward(g)


for _ in range(2 if args.ncu else 3):
    step()
torch.cuda.synchronize()
if args.host:
    import cProfile
    import pstats
    import time

    for name, fn in (
        ("forward", lambda: zeta.attention(q.detach(), k.detach(), v.detach(), topk=32)),
        ("forward+backward", step),
    ):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - t) / 20 * 1e3:.3f} ms per call (wall, N={args.n})")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
elif not args.ncu:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    )
