"""Typed stubs for the Rust extension ``zeta._core`` (private: use the ``zeta`` API)."""

from os import PathLike
from typing import Any, Dict, List, Optional, Tuple, TypedDict, Union, final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
    "KVCacheCore",
    "__version__",
    "_after_fork_in_child",
    "allocator",
    "argsort",
    "attention_backward",
    "attention_forward",
    "attention_forward_half",
    "cpu_features",
    "exact_knn",
    "knn",
    "morton_decode",
    "morton_encode",
    "num_threads",
    "searchsorted",
    "simd_path",
    "zorder",
]

class _Params(TypedDict):
    """Index settings, built by ``zeta._validate.IndexParams.as_dict`` (checked there)."""

    chunk: int  # tokens per chunk, >= 1
    window: int  # candidates on each side in every run, >= 1 (KVCacheCore: 0 = unset)
    n_curves: int  # shifted curves, 1..key_dim + 1
    n_sink: int  # first positions always candidates, >= 0
    causal: bool
    bits: int  # grid bits per coordinate, 1..32 // key_dim
    scale: float  # the squash's scale, finite and > 0
    exact: bool  # exact search (knn, attention_forward); optional, default False

def morton_encode(coords: npt.NDArray[Any], bits: int, out64: bool) -> npt.NDArray[Any]:
    """(n, d) uint8/16/32/64 -> (n,) uint32 (out64=False) or uint64."""

def morton_decode(codes: npt.NDArray[Any], dims: int, bits: int) -> npt.NDArray[Any]:
    """(n,) uint32/uint64 -> (n, dims) of the codes' dtype."""

def zorder(
    x: npt.NDArray[Any], bits: int, shift: int, scale: float, out64: bool
) -> npt.NDArray[Any]:
    """(n, d) float32/float64 -> (n,) uint32/uint64 codes."""

def argsort(codes: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """(rows, n) uint32/uint64 -> (rows, n) int64, stable."""

def searchsorted(
    sorted: npt.NDArray[Any], queries: npt.NDArray[Any], right: bool
) -> npt.NDArray[np.int64]:
    """(rows, n), (rows, m) -> (rows, m) int64."""

def knn(
    q: npt.NDArray[Any], k: npt.NDArray[Any], topk: int, params: _Params
) -> Tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
    """(B,H,N,dk), (B,Hkv,S,dk) -> indices (B,H,N,topk), sq_dists (B,H,N,topk)."""

def exact_knn(
    q: npt.NDArray[Any], k: npt.NDArray[Any], topk: int, causal: bool
) -> Tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
    """Brute force; same layout as knn."""

def attention_forward(
    q: npt.NDArray[Any],
    k: npt.NDArray[Any],
    v: npt.NDArray[Any],
    gamma: npt.NDArray[np.float64],
    topk: int,
    mean_token: bool,
    params: _Params,
    indices: bool = True,
) -> Tuple[npt.NDArray[Any], Optional[npt.NDArray[np.int32]]]:
    """-> out (B,H,N,dv), indices (B,H,N,topk); None with indices=False (no backward: the
    array is then neither filled nor allocated)."""

def attention_forward_half(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.uint16],
    v_dtype: str,
    gamma: npt.NDArray[np.float64],
    topk: int,
    mean_token: bool,
    params: _Params,
    indices: bool = True,
) -> Tuple[npt.NDArray[np.float32], Optional[npt.NDArray[np.int32]]]:
    """v: the bits of float16 / bfloat16 values (``v_dtype``) -> out float32, indices (None
    with indices=False)."""

def attention_backward(
    q: npt.NDArray[Any],
    k: npt.NDArray[Any],
    v: npt.NDArray[Any],
    gamma: npt.NDArray[np.float64],
    indices: npt.NDArray[np.int32],
    grad_out: npt.NDArray[Any],
    mean_token: bool,
    params: _Params,
) -> Tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.float64]]:
    """-> dq, dk, dv, dgamma (H,)."""

def simd_path() -> str: ...
def cpu_features() -> Dict[str, Union[bool, str, List[str]]]: ...
def num_threads() -> int: ...
def allocator() -> str: ...
def _after_fork_in_child() -> None: ...

@final
class KVCacheCore:
    def __new__(
        cls, batch: int, kv_heads: int, key_dim: int, value_dim: int, params: _Params, dtype: str
    ) -> KVCacheCore: ...
    def extend(self, k: npt.NDArray[np.float32], v: npt.NDArray[np.float32]) -> None: ...
    def attend(
        self,
        q: npt.NDArray[np.float32],
        topk: int,
        gamma: npt.NDArray[np.float64],
        mean_token: bool,
        window: Optional[int] = None,
        exact: bool = False,
    ) -> npt.NDArray[np.float32]: ...
    def decode_packed(
        self,
        qkv: npt.NDArray[np.float32],
        num_heads: int,
        topk: int,
        gamma: npt.NDArray[np.float64],
        mean_token: bool,
        window: Optional[int] = None,
        exact: bool = False,
    ) -> npt.NDArray[np.float32]: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    def config(self) -> Tuple[int, int, int, int, _Params]: ...
    def save(self, path: Union[str, PathLike[str]]) -> None: ...
    @staticmethod
    def load(path: Union[str, PathLike[str]]) -> KVCacheCore: ...
    def same_contents(self, other: KVCacheCore) -> bool: ...
