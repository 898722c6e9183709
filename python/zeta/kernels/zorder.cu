// Z-order primitives: fused quantize + Morton encode (several shifted curves in one pass),
// Morton encode/decode of integer coordinates, and a batched searchsorted.
#include "common.cuh"

namespace zeta {

/// Codes of `rows` points of `d` float32 coordinates for curves 0..n_curves-1.
///
/// x: (rows, d). Row r = outer * inner + i writes out[(outer * n_curves + c) * inner + i], so
/// keys (G, S, d) give codes (G, C, S) and a plain call (inner = rows, C = 1) gives (rows,).
/// Curve c is shifted by curve_offset(shift0 + c) cells.
template <class Out>
__global__ void zorder_kernel(const float* __restrict__ x, Out* __restrict__ out, long long rows,
                              int d, int bits, long long inner, int n_curves, double scale,
                              int shift0) {
    long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const double half = static_cast<double>(1ull << (bits - 1));
    const uint64_t hm1 = (1ull << (bits - 1)) - 1ull;
    uint64_t cells[ZETA_MAX_DK];
    long long outer = r / inner, i = r % inner;
    for (int c = 0; c < n_curves; ++c) {
        const uint64_t off = curve_offset(shift0 + c, d, bits);
        for (int j = 0; j < d; ++j)
            cells[j] = grid_cell(static_cast<double>(x[r * d + j]), scale, half, hm1, off);
        out[(outer * n_curves + c) * inner + i] = static_cast<Out>(morton_interleave(cells, d, bits));
    }
}

/// Morton codes of integer coordinates: coords (rows, d) as uint64 -> codes (rows,).
template <class Out>
__global__ void morton_encode_kernel(const unsigned long long* __restrict__ coords,
                                     Out* __restrict__ out, long long rows, int d, int bits) {
    long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    uint64_t cells[ZETA_MAX_DK];
    const uint64_t mask = bits >= 64 ? ~0ull : ((1ull << bits) - 1ull);
    for (int j = 0; j < d; ++j) cells[j] = coords[r * d + j] & mask;
    out[r] = static_cast<Out>(morton_interleave(cells, d, bits));
}

/// Inverse of morton_encode_kernel: codes (rows,) -> coords (rows, d) of the codes' type.
template <class Code>
__global__ void morton_decode_kernel(const Code* __restrict__ codes, Code* __restrict__ out,
                                     long long rows, int d, int bits) {
    long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const uint64_t c = static_cast<uint64_t>(codes[r]);
    for (int j = 0; j < d; ++j) {
        uint64_t v = 0;
        for (int b = 0; b < bits; ++b) v |= ((c >> (b * d + j)) & 1ull) << b;
        out[r * d + j] = static_cast<Code>(v);
    }
}

/// Row-wise searchsorted: sorted (rows, n), queries (rows, m) -> (rows, m) int64.
/// right = 0: first index with a[i] >= q; right = 1: first index with a[i] > q.
template <class Code>
__global__ void searchsorted_kernel(const Code* __restrict__ sorted, const Code* __restrict__ queries,
                                    long long* __restrict__ out, long long rows, long long n,
                                    long long m, int right) {
    long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= rows * m) return;
    const Code* a = sorted + (t / m) * n;
    const Code key = queries[t];
    long long lo = 0, hi = n;
    while (lo < hi) {
        long long mid = lo + ((hi - lo) >> 1);
        bool go_right = right ? !(key < a[mid]) : (a[mid] < key);
        if (go_right)
            lo = mid + 1;
        else
            hi = mid;
    }
    out[t] = lo;
}

}  // namespace zeta
