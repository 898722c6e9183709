"""CUDA kernels of the cupy backend: launch code, one small module per op.

Nothing here imports cupy at import time; a :class:`~zeta._cuda.runtime.Runtime` carries the
array module and the kernel launcher (cupy on a GPU, a CPU shim in the test suite).
"""
