"""Small knn / forward / backward calls through the cupy backend, for compute-sanitizer.

Usage: compute-sanitizer --tool memcheck python benches/gpu_sanitize.py
"""

import torch

import zeta

torch.manual_seed(0)
for causal, dtype, mean_token in (
    (True, torch.float32, True),
    (False, torch.bfloat16, False),
    (True, torch.float16, False),
):
    q = torch.randn(2, 4, 300, 3, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 300, 3, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 300, 40, device="cuda", dtype=dtype, requires_grad=True)
    kw = dict(causal=causal, chunk=16, window=8, n_curves=2, n_sink=3)
    idx, d2 = zeta.knn(q, k, 70, exact=False, **kw)  # topk > 64: the larger best list
    out = zeta.attention(q, k, v, topk=20, mean_token=mean_token, exact=False, **kw)
    out.float().square().sum().backward()
    zeta.knn(q, k, 40, exact=True, **kw)  # the exact search's leaf boxes and pruned scans
    out = zeta.attention(q, k, v, topk=20, mean_token=mean_token, exact=True, **kw)
    out.float().square().sum().backward()
    codes = zeta.zorder(q.detach().float())
    zeta.argsort(codes)
    zeta.searchsorted(zeta.zorder(torch.sort(q.detach().float(), dim=-2).values), codes)
torch.cuda.synchronize()
print("sanitize workload done")
