// The dyadic-run Z-order index on the GPU: a merge-sort tree over chunks of keys.
//
// Entries are u64 keys `code << 32 | position`, unique within a (batch, kv head, curve) slice,
// so a run sorted by entry is sorted by (code, position), as in the Rust index. Level 0 sorts
// each full chunk (rank by counting: a chunk is small); level l+1 merges pairs of level-l runs
// (every entry finds its place by one binary search in the sibling run: rank in own run +
// number of sibling entries below it). Slice gc of level l is `width_l` entries long, width_l =
// (n_full >> l << l) * chunk: only complete runs, the only ones a query ever searches.

#include "common.cuh"

namespace zeta {

/// pts[t] for entry e of slice gc (kv slice gc / n_curves of keys (G, S, 3)); no-op when pts
/// is null.
__device__ __forceinline__ void put_point(Pt4* pts, long long t, uint64_t e, const float* keys,
                                          long long gc, int n_curves, long long s) {
    if (pts == nullptr) return;
    const long long pos = static_cast<long long>(e & 0xffffffffull);
    const float* kp = keys + ((gc / n_curves) * s + pos) * 3;
    Pt4 pt;
    pt.x = kp[0];
    pt.y = kp[1];
    pt.z = kp[2];
    pt.pos = static_cast<int>(pos);
    pts[t] = pt;
}

/// codes (GC, S) u32 -> level0 (GC, width0) u64 sorted within each chunk (and, with `pts`,
/// the points beside them: keys (GC / n_curves, S, 3) f32).
__global__ void index_level0_kernel(const uint32_t* __restrict__ codes, uint64_t* __restrict__ level0,
                                    long long gc_count, long long s, long long width0, int chunk,
                                    const float* __restrict__ keys, Pt4* __restrict__ pts,
                                    int n_curves) {
    long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= gc_count * width0) return;
    long long gc = t / width0, p = t % width0;
    const uint32_t* c = codes + gc * s;
    const uint64_t key = (static_cast<uint64_t>(c[p]) << 32) | static_cast<uint64_t>(p);
    const long long start = p - p % chunk;
    uint32_t rank = 0;
    for (long long j = start; j < start + chunk; ++j) {
        const uint64_t other = (static_cast<uint64_t>(c[j]) << 32) | static_cast<uint64_t>(j);
        rank += other < key ? 1u : 0u;
    }
    level0[gc * width0 + start + rank] = key;
    put_point(pts, gc * width0 + start + rank, key, keys, gc, n_curves, s);
}

/// Level l (runs of run_len entries, slices of width_in) -> level l+1 (runs of 2*run_len,
/// slices of width_out = complete pairs only), and with `pts` the points beside them.
__global__ void index_merge_kernel(const uint64_t* __restrict__ src, uint64_t* __restrict__ dst,
                                   long long gc_count, long long width_in, long long width_out,
                                   long long run_len, const float* __restrict__ keys,
                                   Pt4* __restrict__ pts, int n_curves, long long s) {
    long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= gc_count * width_out) return;
    long long gc = t / width_out, r = t % width_out;
    long long pair = r / (2 * run_len), o = r % (2 * run_len);
    long long which = o / run_len, i = o % run_len;
    const uint64_t* base = src + gc * width_in + pair * 2 * run_len;
    const uint64_t e = base[o];
    const uint64_t* sib = base + (1 - which) * run_len;
    uint32_t rank = lower_bound_u64(sib, static_cast<uint32_t>(run_len), e);
    dst[gc * width_out + pair * 2 * run_len + i + rank] = e;
    put_point(pts, gc * width_out + pair * 2 * run_len + i + rank, e, keys, gc, n_curves, s);
}

/// The points beside a whole level of slices of `width` entries (the non-causal index).
__global__ void index_points_kernel(const uint64_t* __restrict__ level, long long gc_count,
                                    long long width, const float* __restrict__ keys,
                                    Pt4* __restrict__ pts, int n_curves, long long s) {
    long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= gc_count * width) return;
    put_point(pts, t, level[t], keys, t / width, n_curves, s);
}

/// The leaf of this thread in a level's exact-search leaves: t = (g * runs + m) * leaves + j,
/// leaf j of run m of kv slice g (curve 0: level slice g * n_curves); valid: t in range.
struct LeafOf {
    long long n_leaves, t, g, j;
    const uint64_t* run;
    bool valid;

    __device__ LeafOf(const uint64_t* level, long long g_count, int n_curves, long long width,
                      long long run_len, int leaf) {
        const long long n_runs = width / run_len;
        n_leaves = (run_len + leaf - 1) / leaf;
        t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
        valid = t < g_count * n_runs * n_leaves;
        g = t / (n_runs * n_leaves);
        const long long rest = t % (n_runs * n_leaves), m = rest / n_leaves;
        j = rest % n_leaves;
        run = level + g * n_curves * width + m * run_len;
    }
};

/// Highest differing bit + 1 of the codes of two entries (0: equal codes): the size of the
/// smallest aligned Z-order cell holding both, in bits.
__device__ __forceinline__ int cell_split(uint64_t a, uint64_t b) {
    const uint32_t x = static_cast<uint32_t>(a >> 32) ^ static_cast<uint32_t>(b >> 32);
    return x == 0u ? 0 : 32 - __clz(static_cast<int>(x));
}

/// Leaf starts of one level for the exact search: every run of curve 0 of each kv slice (level
/// slice g * n_curves) is cut into ceil(run_len / leaf) leaves, and leaf j > 0 starts in the
/// window [j*leaf - leaf/2, j*leaf + leaf/2) (clipped to the run) at the entry that begins the
/// largest Z-order cell there: the highest bit at which its code differs from the entry
/// before it (ties: the entry nearest j*leaf; leaf 0 starts at 0). The windows of
/// neighbouring leaves are disjoint and ordered, so leaves are non-empty and at most
/// 2*leaf - 1 long; a leaf that follows the cells has a box of about one cell, where a leaf
/// of fixed entries straddles cells (a box up to their union). N = 32k Gaussian keys, one
/// run, top-32 (benches/leaf_census.py): the leaves whose box meets a query's final k-th
/// ball hold 439 keys per query, against 1,098 for fixed leaves of 64 (the same leaf count).
/// starts (G, runs, leaves) int32, run-local.
__global__ void exact_leaf_starts_kernel(const uint64_t* __restrict__ level, int* __restrict__ starts,
                                         long long g_count, int n_curves, long long width,
                                         long long run_len, int leaf) {
    const LeafOf lf(level, g_count, n_curves, width, run_len, leaf);
    if (!lf.valid) return;
    const long long t = lf.t, j = lf.j;
    const uint64_t* run = lf.run;
    const long long mid = j * leaf;
    long long a0 = mid - leaf / 2, a1 = mid + leaf / 2;
    a0 = a0 > 1 ? a0 : 1;
    a1 = a1 < run_len ? a1 : run_len;
    long long best = mid;
    if (j > 0 && a0 < a1) {
        int top = -1;
        long long dist = 0;
        for (long long i = a0; i < a1; ++i) {
            const int c = cell_split(run[i - 1], run[i]);
            const long long di = i > mid ? i - mid : mid - i;
            if (c > top || (c == top && di < dist)) {
                top = c;
                dist = di;
                best = i;
            }
        }
    }
    starts[t] = static_cast<int>(j == 0 ? 0 : best);
}

/// Leaf boxes of one level for the exact search: per leaf of curve 0's runs (leaf j of a run
/// is entries [starts[j], starts[j + 1]) of it, the last one ending at the run's end; `starts`
/// null: fixed leaves [j*leaf, (j+1)*leaf)) the per-coordinate min and max of its keys: boxes
/// (G, runs, leaves, 2, dk) f32, runs = width / run_len, leaves = ceil(run_len / leaf).
/// keys (G, S, dk) f32.
__global__ void exact_boxes_kernel(const uint64_t* __restrict__ level, const float* __restrict__ keys,
                                   const int* __restrict__ starts, float* __restrict__ boxes,
                                   long long g_count, int n_curves, long long width,
                                   long long run_len, long long s, int dk, int leaf) {
    const LeafOf lf(level, g_count, n_curves, width, run_len, leaf);
    if (!lf.valid) return;
    const long long t = lf.t, g = lf.g, j = lf.j, n_leaves = lf.n_leaves;
    const uint64_t* run = lf.run;
    const float* kg = keys + g * s * dk;
    long long lo = j * leaf, hi = lo + leaf < run_len ? lo + leaf : run_len;
    if (starts != nullptr) {
        lo = starts[t];
        hi = j + 1 < n_leaves ? starts[t + 1] : run_len;
    }
    float* bx = boxes + t * 2 * dk;
    for (int d = 0; d < dk; ++d) {
        float mn = kg[static_cast<long long>(run[lo] & 0xffffffffull) * dk + d], mx = mn;
        for (long long e = lo + 1; e < hi; ++e) {
            const float x = kg[static_cast<long long>(run[e] & 0xffffffffull) * dk + d];
            mn = x < mn ? x : mn;
            mx = x > mx ? x : mx;
        }
        bx[d] = mn;
        bx[dk + d] = mx;
    }
}

/// Super boxes: per run, the box of every group of 32 consecutive leaves (the last group
/// shorter), from the leaf boxes `boxes` (runs, leaves, 2, dk) into `sboxes` (runs, groups, 2,
/// dk), groups = ceil(leaves / 32). The search tests a group's box before its 32 leaf boxes.
__global__ void exact_super_boxes_kernel(const float* __restrict__ boxes, float* __restrict__ sboxes,
                                         long long n_runs, long long n_leaves, int dk) {
    const long long n_groups = (n_leaves + 31) / 32;
    long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= n_runs * n_groups) return;
    const long long r = t / n_groups, grp = t % n_groups;
    const long long l0 = grp * 32, l1 = l0 + 32 < n_leaves ? l0 + 32 : n_leaves;
    const float* b = boxes + (r * n_leaves + l0) * 2 * dk;
    float* o = sboxes + t * 2 * dk;
    for (int d = 0; d < dk; ++d) {
        float mn = b[d], mx = b[dk + d];
        for (long long j = 1; j < l1 - l0; ++j) {
            const float lo = b[j * 2 * dk + d], hi = b[j * 2 * dk + dk + d];
            mn = lo < mn ? lo : mn;
            mx = hi > mx ? hi : mx;
        }
        o[d] = mn;
        o[dk + d] = mx;
    }
}

}  // namespace zeta
