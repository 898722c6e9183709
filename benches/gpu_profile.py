"""Where the time of one zeta.attention call goes on a GPU (torch profiler over every kernel).

Usage: python benches/gpu_profile.py [--n 32768] [--dtype bfloat16] [--ncu]
(--ncu: one forward and one backward call only, for ``ncu --launch-skip ... python ...``).
"""

import argparse

import torch

import zeta

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=32768)
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--ncu", action="store_true")
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
if not args.ncu:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    )
