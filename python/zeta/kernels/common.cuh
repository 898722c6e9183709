// Shared definitions of zeta's CUDA kernels (compiled by NVRTC through cupy.RawModule).
//
// The same sources also compile as C++ on a CPU, through the test suite's shim header
// (tests/cuda_shim/zeta_cpu_shim.h, -DZETA_CPU_SHIM), which runs every thread of a block as a
// fiber with real barriers and warp exchanges. Kernels therefore use only what the shim models:
// threadIdx/blockIdx/blockDim/gridDim, static and dynamic shared memory, __syncthreads,
// __syncwarp, __shfl_sync / __shfl_xor_sync / __ballot_sync over full warps (every lane of a
// warp calls every warp intrinsic), atomicAdd on float/int, and the _rn float intrinsics.
//
// Numerics that must match the Rust core bit for bit (selected indices):
// - the quantizer runs in float64 with IEEE division, in the Rust order of operations;
// - squared distances are float32 sums left to right without fused multiply-add (the module
//   is compiled with --fmad=false, and the sums use __fmul_rn/__fadd_rn anyway);
// - candidates are ordered by (d2, position) through one u64 key: the float bits of d2 >= 0
//   order like the float, so key = bits(d2) << 32 | position.
#pragma once

#ifdef ZETA_CPU_SHIM
#include "zeta_cpu_shim.h"
#define ZETA_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(zeta_shim::dynamic_smem())
#else
#define ZETA_DYN_SMEM(T, name)                                   \
    extern __shared__ __align__(16) unsigned char zeta_smem_raw[]; \
    T* name = reinterpret_cast<T*>(zeta_smem_raw)
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef long long int64_t;
#endif

// Event counters for the CPU shim (tests/cuda_shim): no code on the device.
#ifdef ZETA_CPU_SHIM
#define ZETA_STAT(i) zeta_shim::stat(i)
#else
#define ZETA_STAT(i) ((void)0)
#endif

#define ZETA_FULL_MASK 0xffffffffu
#define ZETA_MAX_DK 8
#define ZETA_KEY_NONE 0xffffffffffffffffull

namespace zeta {

// ---- value types: float32, float16 and bfloat16 stored as raw 16-bit patterns ----------
// No cuda_fp16.h: NVRTC finds no toolkit headers on a bare machine, so the conversions are
// spelled out (bfloat16 by bit shifts, float16 by the PTX cvt instruction on the device).

struct f16 {
    unsigned short bits;
};
struct bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) {
    return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
__device__ __forceinline__ float to_float(f16 x) {
#ifdef ZETA_CPU_SHIM
    return zeta_shim::half_to_float(x.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
    // Round to nearest even (inputs are finite).
    uint32_t u = __float_as_uint(x);
    u += 0x7fffu + ((u >> 16) & 1u);
    bf16 r;
    r.bits = static_cast<unsigned short>(u >> 16);
    return r;
}
template <>
__device__ __forceinline__ f16 from_float<f16>(float x) {
    f16 r;
#ifdef ZETA_CPU_SHIM
    r.bits = zeta_shim::float_to_half(x);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
    return r;
}

// ---- warp helpers --------------------------------------------------------------------------

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(ZETA_FULL_MASK, x, o);
    return x;
}

// ---- distances -----------------------------------------------------------------------------

/// ((q0-k0)^2 + (q1-k1)^2) + ... in float32, no FMA: the Rust core's sum. The loops run to
/// the fixed ZETA_MAX_DK with a guard so that arrays stay in registers (static indices).
__device__ __forceinline__ float sq_dist(const float* q, const float* k, int dk) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < ZETA_MAX_DK; ++j) {
        if (j < dk) {
            float d = __fsub_rn(q[j], k[j]);
            s = __fadd_rn(s, __fmul_rn(d, d));
        }
    }
    return s;
}

__device__ __forceinline__ uint64_t pack_key(float d2, uint32_t pos) {
    return (static_cast<uint64_t>(__float_as_uint(d2)) << 32) | pos;
}

// ---- the fixed quantizer (Rust `Grid::cell`, torch_ref.quantize) ----------------------------

/// Grid cell of one coordinate: u = 0.5 + 0.5*y/(1+|y|), y = x/scale, cell = min(trunc(u*half),
/// half-1) + offset, all in float64 in this order.
__device__ __forceinline__ uint64_t grid_cell(double x, double scale, double half,
                                              uint64_t half_minus_one, uint64_t offset) {
    double y = (scale == 1.0) ? x : __ddiv_rn(x, scale);
    double den = __dadd_rn(1.0, fabs(y));
    double u = __dadd_rn(0.5, __ddiv_rn(__dmul_rn(0.5, y), den));
    double w = __dmul_rn(u, half);
    uint64_t g = (w >= 0.0) ? static_cast<uint64_t>(w) : 0ull;  // u >= 0: trunc == floor
    if (g > half_minus_one) g = half_minus_one;
    return g + offset;
}

/// Grid offset of curve c: (c * half) / m, m = d+1 when odd, else d+2 (Chan's shifts).
__device__ __forceinline__ uint64_t curve_offset(int c, int d, int bits) {
    const uint64_t m = ((d + 1) % 2 == 1) ? static_cast<uint64_t>(d + 1) : static_cast<uint64_t>(d + 2);
    return (static_cast<uint64_t>(c) * (1ull << (bits - 1))) / m;
}

/// Bit b of coordinate j -> bit b*d + j of the code.
__device__ __forceinline__ uint64_t morton_interleave(const uint64_t* cells, int d, int bits) {
    uint64_t code = 0;
    for (int b = 0; b < bits; ++b)
        for (int j = 0; j < d; ++j) code |= ((cells[j] >> b) & 1ull) << (b * d + j);
    return code;
}

/// The point of an index entry, stored beside it (d_k = 3): its key's coordinates and
/// position, so a scan reads one aligned 16-byte row per entry instead of the entry and then
/// three scattered coordinates of the key it names. A points array parallels the levels.
struct __align__(16) Pt4 {
    float x, y, z;
    int pos;
};

/// Number of entries of the sorted `a[0..n)` that are < key.
__device__ __forceinline__ uint32_t lower_bound_u64(const uint64_t* a, uint32_t n, uint64_t key) {
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + ((hi - lo) >> 1);
        if (a[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

}  // namespace zeta
