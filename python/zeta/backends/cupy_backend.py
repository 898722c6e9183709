"""The CUDA backend: CuPy RawKernels (``zeta/kernels/*.cu``) on torch CUDA tensors and CuPy arrays.

torch tensors cross to CuPy as views of their memory (no copy), the kernels run on torch's current
stream, and scratch memory comes from torch's caching allocator (so it shows in
``torch.cuda.max_memory_allocated`` and is reused by torch). float16/bfloat16 values are read
natively by the kernels (as raw 16-bit arrays); queries and keys are computed in float32.

Autograd goes through the ``torch.library`` custom ops of :mod:`zeta._torch_ops`, whose CUDA
kernels are registered here (:func:`register_torch_kernels`), so ``torch.compile`` and
``opcheck`` see one op on every device.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from typing import Any, Optional, Tuple

import numpy as np

from .._cuda.search import MAX_TOPK
from .base import Backend, CallInfo

MIN_COMPUTE_CAPABILITY = (7, 0)


def is_cupy(x: Any) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def unavailable_reason() -> Optional[str]:
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install zeta-attention[cuda12] or [cuda13])"
    except Exception as e:  # a broken CUDA install raises other errors at import
        return f"cupy does not import: {e}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device usable by cupy ({type(e).__name__}: {e})"
    if n < 1:
        return "no CUDA device visible to cupy"
    try:
        cc = cupy.cuda.Device(0).compute_capability  # "90"
        major, minor = int(cc[:-1]), int(cc[-1])
    except Exception as e:
        return f"cannot read the device's compute capability: {e}"
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        return f"compute capability {major}.{minor} < 7.0 (the kernels need Volta or newer)"
    return None


# ---- torch <-> cupy ---------------------------------------------------------------------------

_SIGNED = {np.dtype(np.uint32): np.int32, np.dtype(np.uint64): np.int64}


class TorchRuntime:
    """A :class:`zeta._cuda.runtime.CupyRuntime` whose scratch arrays are torch allocations."""

    def __new__(cls, device):
        import torch

        from .._cuda.runtime import CupyRuntime

        def empty(shape, dtype):
            dt = np.dtype(dtype)
            signed = _SIGNED.get(dt, dt)
            t = torch.empty(
                tuple(int(s) for s in shape), dtype=_torch_dtype(np.dtype(signed)), device=device
            )
            a = _cupy_view(t)
            return a.view(dt) if signed is not dt else a

        def zeros(shape, dtype):
            a = empty(shape, dtype)
            a.fill(0)
            return a

        return CupyRuntime(empty=empty, zeros=zeros)


def _torch_dtype(dt: np.dtype):
    import torch

    return {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.float16): torch.float16,
        np.dtype(np.int16): torch.int16,
        np.dtype(np.int32): torch.int32,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.uint8): torch.uint8,
    }[dt]


_NUMPY_OF_TORCH: dict = {}


def _cupy_view(t):
    """A torch CUDA tensor as a cupy array (no copy); 16-bit floats as int16.

    The array points at the tensor's memory (``cupy.cuda.UnownedMemory``, which keeps the
    tensor alive) instead of going through DLPack: torch's ``__dlpack__`` builds stream
    objects and events on every call, which cost ~1 ms of host time per attention call
    (about 12 conversions) on an H200 machine (cProfile, N = 4k). No stream handshake is
    needed: every caller runs its kernels on torch's current stream (:class:`_Stream`).
    """
    import cupy
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    t = t.detach()
    if not _NUMPY_OF_TORCH:
        _NUMPY_OF_TORCH.update(
            {
                torch.float32: np.float32,
                torch.float64: np.float64,
                torch.int16: np.int16,
                torch.int32: np.int32,
                torch.int64: np.int64,
                torch.uint8: np.uint8,
                torch.bool: np.bool_,
            }
        )
    dt = _NUMPY_OF_TORCH.get(t.dtype)
    if dt is None or t.numel() == 0 or any(st < 0 for st in t.stride()):
        return cupy.from_dlpack(t)
    item = t.element_size()
    span = (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * item
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), span, t, t.device.index)
    return cupy.ndarray(
        tuple(t.shape),
        dtype=dt,
        memptr=cupy.cuda.MemoryPointer(mem, 0),
        strides=tuple(st * item for st in t.stride()),
    )


def _torch_of(a, like_dtype=None):
    """A cupy array as a torch tensor (no copy); int16 back to ``like_dtype`` if 16-bit float."""
    import torch

    t = torch.from_dlpack(a)
    if like_dtype is not None and like_dtype in (torch.bfloat16, torch.float16):
        t = t.view(like_dtype)
    return t


def _vdtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Stream:
    """Runs cupy work on torch's current stream of ``device`` (and on that device)."""

    def __init__(self, device):
        import cupy
        import torch

        idx = device.index if device.index is not None else torch.cuda.current_device()
        self.dev = cupy.cuda.Device(idx)
        ts = torch.cuda.current_stream(idx)
        try:  # cupy >= 14 and a torch whose streams speak the CUDA stream protocol
            self.stream = cupy.cuda.Stream.from_external(ts)
        except (AttributeError, TypeError, ValueError):
            with warnings.catch_warnings():  # deprecated in cupy 14, the only way before it
                warnings.simplefilter("ignore", DeprecationWarning)
                self.stream = cupy.cuda.ExternalStream(ts.cuda_stream, idx)

    def __enter__(self):
        self.dev.__enter__()
        self.stream.__enter__()
        return self

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.dev.__exit__(*exc)


# ---- torch custom-op kernels (autograd lives in zeta._torch_ops) --------------------------------


def _torch_call(q, k, v, gamma):
    """(runtime, q f32, k f32, v, gamma f64, shape, dv) as cupy views for the custom-op kernels."""
    b, h, n, dk = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    rt = TorchRuntime(q.device)
    qf, kf = (_cupy_view(x.detach().float().contiguous()) for x in (q, k))
    vc = _cupy_view(v.detach().contiguous())
    g = _cupy_view(gamma.detach().double().contiguous())
    return rt, qf, kf, vc, g, (b, h, hkv, n, s, dk), dv


def torch_attention_fwd(q, k, v, gamma, topk, mean_token, p) -> Tuple[Any, Any]:
    """CUDA kernel of ``zeta::attention_fwd``: -> out (B,H,N,dv) v.dtype, idx int32."""
    from .._cuda import attention as A

    with _Stream(q.device):
        rt, qf, kf, vc, g, shape, dv = _torch_call(q, k, v, gamma)
        out, idx = A.forward(
            rt, qf, kf, vc, _vdtype_name(v.dtype), g, shape, dv, p, topk, bool(mean_token)
        )
        return _torch_of(out, v.dtype), _torch_of(idx)


def torch_attention_bwd(q, k, v, gamma, idx, grad_out, mean_token, p):
    """CUDA kernel of ``zeta::attention_bwd``: -> dq, dk, dv, dgamma (the inputs' dtypes)."""
    from .._cuda import attention as A

    with _Stream(q.device):
        rt, qf, kf, vc, g, shape, dv = _torch_call(q, k, v, gamma)
        go = _cupy_view(grad_out.detach().to(v.dtype).contiguous())
        ic = _cupy_view(idx.contiguous())
        dq, dkk, dvv, dg = A.backward(
            rt, qf, kf, vc, _vdtype_name(v.dtype), g, ic, go, shape, dv, p, bool(mean_token)
        )
        return (
            _torch_of(dq).to(q.dtype),
            _torch_of(dkk).to(k.dtype),
            _torch_of(dvv).to(v.dtype),
            _torch_of(dg).to(gamma.dtype),
        )


# ---- calls without autograd (cupy arrays, and torch tensors for knn / primitives) -------------


def _as_cupy(x):
    """(cupy array, to_output): a cupy view of a torch CUDA tensor or cupy array, and the
    function that turns a cupy result back into the input's kind."""
    if is_cupy(x):
        import cupy

        return cupy.ascontiguousarray(x), (lambda a, like=None: a)
    return _cupy_view(x.contiguous()), (lambda a, like=None: _torch_of(a, like))


def _runtime_for(x):
    if is_cupy(x):
        from .._cuda.runtime import CupyRuntime

        return CupyRuntime()
    return TorchRuntime(x.device)


class _On:
    """The device/stream context of an input: torch's current stream, or cupy's current one."""

    def __init__(self, x):
        self.ctx = None if is_cupy(x) else _Stream(x.device)
        if is_cupy(x):
            import cupy

            self.ctx = cupy.cuda.Device(x.device.id)

    def __enter__(self):
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def _knn(q, k, topk: int, p) -> Tuple[Any, Any]:
    """(B,H,N,topk) int64 indices and squared distances in q's dtype."""
    from .._cuda import search

    b, h, n, dk = q.shape
    hkv, s = k.shape[1], k.shape[2]
    with _On(q):
        rt = _runtime_for(q)
        q32 = q if is_cupy(q) else q.detach().float()
        k32 = k if is_cupy(k) else k.detach().float()
        qc, back = _as_cupy(q32)
        kc, _ = _as_cupy(k32)
        qc, kc = qc.astype(np.float32, copy=False), kc.astype(np.float32, copy=False)
        idx, d2 = search.knn(rt, qc, kc, (b, h, hkv, n, s, dk), p, topk)
        idx_o, d2_o = back(idx), back(d2)
        if is_cupy(q):
            return idx_o, d2_o.astype(q.dtype, copy=False)
        return idx_o, d2_o.to(q.dtype)


def attention_cupy(q, k, v, gamma: np.ndarray, topk: int, mean_token: bool, p):
    """Forward only, on cupy arrays: (B,H,N,dv) in v's dtype."""
    import cupy

    from .._cuda import attention as A
    from .._cuda.runtime import CupyRuntime

    b, h, n, dk = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    with cupy.cuda.Device(q.device.id):
        rt = CupyRuntime()
        qf = cupy.ascontiguousarray(q, dtype=np.float32)
        kf = cupy.ascontiguousarray(k, dtype=np.float32)
        vname = str(v.dtype)
        vc = cupy.ascontiguousarray(v)
        if vname == "float16":
            vc = vc.view(np.int16)
        out, _ = A.forward(
            rt,
            qf,
            kf,
            vc,
            vname,
            cupy.asarray(gamma, dtype=np.float64),
            (b, h, hkv, n, s, dk),
            dv,
            p,
            topk,
            bool(mean_token),
        )
        return out.view(v.dtype)


def _zorder(x, d: int, bits: int, shift: int, scale: float):
    from .._cuda import primitives as P

    with _On(x):
        xc, back = _as_cupy(x if is_cupy(x) else x.detach().float())
        return back(
            P.zorder(_runtime_for(x), xc.astype(np.float32, copy=False), d, bits, shift, scale)
        )


def _morton_encode(coords, bits: int):
    from .._cuda import primitives as P

    with _On(coords):
        cc, back = _as_cupy(coords)
        return back(P.morton_encode(_runtime_for(coords), cc, bits))


def _morton_decode(codes, dims: int, bits: int):
    from .._cuda import primitives as P

    with _On(codes):
        cc, back = _as_cupy(codes)
        return back(P.morton_decode(_runtime_for(codes), cc, dims, bits))


def _argsort(codes):
    from .._cuda import primitives as P

    with _On(codes):
        cc, back = _as_cupy(codes)
        return back(P.argsort(_runtime_for(codes), cc))


def _searchsorted(sorted_codes, queries, right: bool):
    from .._cuda import primitives as P

    with _On(queries):
        sc, back = _as_cupy(sorted_codes)
        qc, _ = _as_cupy(queries)
        return back(P.searchsorted(_runtime_for(queries), sc, qc, right))


class CupyBackend(Backend):
    """CUDA RawKernels through CuPy (``zeta/kernels/*.cu``): torch CUDA tensors and cupy arrays."""

    name = "cupy"
    devices = ("cuda",)
    kinds = ("torch", "cupy")
    dtypes = ("float16", "bfloat16", "float32")
    _why: Optional[str] = None
    _checked = False

    def unavailable_reason(self) -> Optional[str]:
        if not CupyBackend._checked:
            if importlib.util.find_spec("cupy") is None:
                CupyBackend._why = (
                    "cupy is not installed (pip install zeta-attention[cuda12] or [cuda13])"
                )
            else:
                CupyBackend._why = unavailable_reason()
            CupyBackend._checked = True
        return CupyBackend._why

    def not_supported_reasons(self, info: CallInfo):
        r = super().not_supported_reasons(info)
        if info.topk > MAX_TOPK:
            r.append(
                f"topk {info.topk} > {MAX_TOPK} (the kernels keep a query's top-k in shared memory)"
            )
        return r

    def knn(self, q, k, topk, p):
        _check_finite(q, k)
        return _knn(q, k, topk, p)

    def attention(self, q, k, v, gamma, topk, mean_token, p):
        if is_cupy(q):
            if not all(map(is_cupy, (q, k, v))):
                raise TypeError("q, k, v: pass cupy arrays together")
            _check_finite(q, k, v, coords=2)
            return attention_cupy(q, k, v, gamma, topk, mean_token, p)
        import torch

        from .. import _torch_ops

        if not torch.compiler.is_compiling():
            from .._validate import check_values_torch

            check_values_torch(q, k, v, gamma)
        return _torch_ops.attention(q, k, v, gamma, topk, mean_token, p)

    def zorder(self, x, d, bits, shift, scale):
        _check_finite(x, names=("x",))
        return _zorder(x, d, bits, shift, scale)

    def morton_encode(self, coords, bits):
        return _morton_encode(coords, bits)

    def morton_decode(self, codes, dims, bits):
        return _morton_decode(codes, dims, bits)

    def argsort(self, codes):
        return _argsort(codes)

    def searchsorted(self, sorted_codes, queries, right):
        return _searchsorted(sorted_codes, queries, right)


def _check_finite(*arrays, names=("q", "k", "v"), coords=0) -> None:
    """NaN/inf in device arrays, one sync for all of them; the first ``coords`` arrays are q
    and k, also checked against the coordinate limit (``_validate.coord_limit``)."""
    from .._validate import coords_error, coords_ok_flag

    if is_cupy(arrays[0]):
        import cupy as xp
    else:
        import torch as xp

        if xp.compiler.is_compiling():
            return
        arrays = tuple(a.detach() for a in arrays)
    flags = [
        coords_ok_flag(a) if i < coords else xp.isfinite(a).all() for i, a in enumerate(arrays)
    ]
    ok = xp.stack(flags).tolist()
    for i, (good, a, nm) in enumerate(zip(ok, arrays, names)):
        if not good:
            raise coords_error(a, nm) if i < coords else ValueError(f"{nm}: contains NaN or inf")
