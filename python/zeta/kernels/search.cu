// Per-query search of the Z-order index, exact rerank to the top-k, and the Cauchy forward.
//
// One warp per query. Candidates (the rules of zeta/backends/torch_ref.py):
//   causal: for every curve and every set bit l of the query's chunk c = p / chunk, the run
//   (c >> l) - 1 of level l: the `window` entries on each side of the lower bound of the
//   query's code; plus the own chunk [c*chunk, p]; non-causal: one run of all keys per curve.
//   Sinks [0, min(n_sink, last visible + 1)) are always candidates.
// Selection: key = bits(d2) << 32 | position, the topk smallest distinct keys. The warp keeps
// its current best list sorted in shared memory and a queue of keys below the current k-th
// best; a full queue is merged by a bitonic sort of (best ++ queue), then duplicates (a
// position found by several curves, or also a sink) are dropped. The k-th best only falls,
// so most candidates of a long scan are rejected by one compare.
// Exact search (exact = 1): after the windows, the k-th best so far is a radius; every run
// of curve 0 that holds the query's keys is then scanned leaf by leaf (LEAF entries, boxes
// from index.cu's exact_boxes_kernel), skipping the leaves whose box is farther than the
// current k-th best. Distances and the box bound round the same way, so nothing that could
// enter the top-k is skipped: the result is the brute-force top-k by (d2, position).
#include "common.cuh"

// Blocks of 128 threads kept resident per SM: caps registers at 65536 / (128 * n).
#ifndef ZETA_MIN_BLOCKS
#define ZETA_MIN_BLOCKS 8
#endif
#if ZETA_MIN_BLOCKS > 0
#define ZETA_SEARCH_BOUNDS __launch_bounds__(128, ZETA_MIN_BLOCKS)
#else
#define ZETA_SEARCH_BOUNDS
#endif

/// Entries per leaf box (zeta/_cuda/index.py LEAF, which passes -DZETA_LEAF when it is not 64).
#ifndef ZETA_LEAF
#define ZETA_LEAF 64
#endif

namespace zeta {

// The kernels take the search settings as plain scalars (what every launcher passes
// easily) and gather them here.
#define ZETA_SEARCH_PARAMS                                                                   \
    const float *__restrict__ a_q, const float *__restrict__ a_k,                             \
        const uint32_t *__restrict__ a_qcodes, const uint64_t *__restrict__ a_levels,         \
        long long a_n, long long a_s,                                                          \
        long long a_n_full, int a_b, int a_h, int a_hkv, int a_dk, int a_chunk, int a_window, \
        int a_n_curves, int a_n_sink, int a_causal, int a_n_levels, int a_topk, int a_kp,     \
        const long long *__restrict__ a_order, int a_use_order, int a_exact,                   \
        const float *__restrict__ a_boxes, const long long *__restrict__ a_box_offs,           \
        const int *__restrict__ a_leaf_st, const Pt4 *__restrict__ a_pts
#define ZETA_SEARCH_ARGS                                                                       \
    SearchArgs{a_q,   a_k,     a_qcodes, a_levels, a_n, a_s, a_n_full,          \
               a_b,   a_h,     a_hkv,    a_dk,     a_chunk,     a_window, a_n_curves,         \
               a_n_sink, a_causal, a_n_levels, a_topk, a_kp, a_order, a_use_order,           \
               a_exact, a_boxes, a_box_offs, a_leaf_st, a_pts}

/// The leaves of one run of curve 0 for the exact search: leaf t is entries [start(t),
/// start(t + 1)); `st` (index.cu exact_leaf_starts_kernel: leaves that follow the Z-order
/// cells) or, null, fixed leaves of ZETA_LEAF entries. `box`: the leaves' boxes, or null
/// (a short run: scanned whole). `sbox`: the boxes of its groups of 32 leaves (index.cu
/// exact_super_boxes_kernel).
struct Leaves {
    const float* box;
    const float* sbox;
    const int* st;
    int n, run_len;

    __device__ __forceinline__ int start(int t) const {
        if (t >= n) return run_len;
        if (st != nullptr) return st[t];
        const long long e = static_cast<long long>(t) * ZETA_LEAF;
        return e < run_len ? static_cast<int>(e) : run_len;
    }
};

struct SearchArgs {
    const float* q;            // (B, H, N, dk)
    const float* k;            // (B, Hkv, S, dk)
    const uint32_t* qcodes;    // (B, H, C, N)
    const uint64_t* levels;    // level l of every slice, level after level (see index.cu)
    long long n, s, n_full;
    int b, h, hkv, dk, chunk, window, n_curves, n_sink, causal, n_levels, topk, kp;
    const long long* order;  // use_order: warp j handles query order[j] (queries in Z-order)
    int use_order;
    int exact;                  // exact search: prune-scan every run through its leaf boxes
    const float* boxes;         // leaf boxes of curve 0 (index.cu exact_boxes_kernel)
    const long long* box_offs;  // per level: first float of its boxes; -1: no boxes (short runs)
    const int* leaf_st;         // per leaf box its first entry (run-local), or null: fixed leaves
    const Pt4* pts;             // beside each entry of `levels` its point (d_k = 3), or null

    /// The points beside the run that starts at `run` (an address in `levels`), or null.
    __device__ __forceinline__ const Pt4* points_of(const uint64_t* run) const {
        return pts == nullptr ? nullptr : pts + (run - levels);
    }

    /// The leaves of run m (of run_len entries) of kv slice g's curve 0 at level l (slice
    /// width `width`; non-causal: l = 0, one run). Exact searches only.
    __device__ __forceinline__ Leaves leaves_of(int l, long long g, long long m, long long width,
                                                long long run_len) const {
        Leaves lv;
        const long long bo = box_offs[l];
        lv.n = static_cast<int>((run_len + ZETA_LEAF - 1) / ZETA_LEAF);
        lv.run_len = static_cast<int>(run_len);
        const long long n_runs = width / run_len;
        const long long first = (g * n_runs + m) * lv.n;  // its first leaf in the level
        lv.box = bo >= 0 ? boxes + bo + first * 2 * dk : nullptr;
        lv.st = bo >= 0 && leaf_st != nullptr ? leaf_st + bo / (2 * dk) + first : nullptr;
        // the level's super boxes follow its leaf boxes (zeta/_cuda/index.py exact_boxes)
        const long long n_groups = (lv.n + 31) / 32;
        lv.sbox = bo >= 0 ? boxes + bo +
                                (static_cast<long long>(b) * hkv * n_runs * lv.n +
                                 (g * n_runs + m) * n_groups) * 2 * dk
                          : nullptr;
        return lv;
    }
};

__device__ __forceinline__ uint64_t umin64(uint64_t a, uint64_t b) { return a < b ? a : b; }
__device__ __forceinline__ uint64_t umax64(uint64_t a, uint64_t b) { return a < b ? b : a; }

/// Bitonic merge of a bitonic sequence held one key per lane -> ascending across lanes.
__device__ __forceinline__ uint64_t warp_merge32(uint64_t x, unsigned lane) {
#pragma unroll
    for (int j = 16; j > 0; j >>= 1) {
        uint64_t y = __shfl_xor_sync(ZETA_FULL_MASK, x, j);
        x = (lane & j) == 0 ? umin64(x, y) : umax64(x, y);
    }
    return x;
}

/// Bitonic sort of one key per lane -> ascending across lanes (shuffles, no shared memory).
__device__ __forceinline__ uint64_t warp_sort32(uint64_t x, unsigned lane) {
#pragma unroll
    for (int k = 2; k <= 32; k <<= 1) {
#pragma unroll
        for (int j = k >> 1; j > 0; j >>= 1) {
            uint64_t y = __shfl_xor_sync(ZETA_FULL_MASK, x, j);
            bool keep_min = ((lane & j) == 0) == ((lane & k) == 0);
            x = keep_min ? umin64(x, y) : umax64(x, y);
        }
    }
    return x;
}

/// ZETA_FLUSH_NOINLINE=1: WarpSelect::flush is a call instead of being inlined at every offer
/// site. Inlined, forward_kernel<bf16, 3> is ~34k SASS instructions for sm_90 with ~36 copies
/// of the 32-key sort (1,800 SHFL.BFLY; NVRTC + cuobjdump, 2026-11-30), far beyond the
/// instruction caches; a flush is rare next to the offers around it. Off by default until
/// measured on a GPU (benches/gpu_variants.py times it).
#ifndef ZETA_FLUSH_NOINLINE
#define ZETA_FLUSH_NOINLINE 0
#endif
#if ZETA_FLUSH_NOINLINE && !defined(ZETA_CPU_SHIM)
#define ZETA_FLUSH_ATTR __device__ __noinline__
#else
#define ZETA_FLUSH_ATTR __device__
#endif

/// The running top-k of one warp's query. Shared memory per warp: 2*kp u64 keys.
struct WarpSelect {
    uint64_t* work;  // [0, kp): best (sorted, distinct, NONE-padded); [kp, 2kp): queue
    int kp, topk, qn;
    uint64_t kth;   // current k-th best key (NONE while fewer than topk)
    uint64_t best;  // kp == 32: this lane's entry of the best list (work[lane] after a flush)

    __device__ void init(uint64_t* w, int kp_, int topk_) {
        work = w;
        kp = kp_;
        topk = topk_;
        qn = 0;
        kth = ZETA_KEY_NONE;
        best = ZETA_KEY_NONE;
        for (int i = lane_id(); i < 2 * kp; i += 32) work[i] = ZETA_KEY_NONE;
        __syncwarp();
    }

    /// best ++ queue -> the kp smallest distinct keys, sorted, in work[0, kp).
    ZETA_FLUSH_ATTR void flush() {
        ZETA_STAT(2);
        if (kp == 32)
            flush32();
        else
            flush_shared();
        qn = 0;
        __syncwarp();
        kth = work[topk - 1];
    }

    /// kp == 32 (topk <= 32): sort the queue in registers, merge it with the best list
    /// (both 32 long), drop repeats, keep the first 32.
    __device__ void flush32() {
        const unsigned lane = lane_id();
        uint64_t q = static_cast<int>(lane) < qn ? work[32 + lane] : ZETA_KEY_NONE;
        q = warp_sort32(q, lane);
        const uint64_t qr = __shfl_sync(ZETA_FULL_MASK, q, 31 - lane);
        uint64_t lo = warp_merge32(umin64(best, qr), lane);  // the 32 smallest, sorted
        uint64_t hi = warp_merge32(umax64(best, qr), lane);  // the 32 largest, sorted
        const uint64_t lo_prev = __shfl_sync(ZETA_FULL_MASK, lo, (lane + 31) & 31);
        const uint64_t hi_prev = __shfl_sync(ZETA_FULL_MASK, hi, (lane + 31) & 31);
        const bool keep_lo = lo != ZETA_KEY_NONE && (lane == 0 || lo != lo_prev);
        const bool keep_hi = hi != ZETA_KEY_NONE && hi != (lane == 0 ? lo_prev : hi_prev);
        const unsigned mlo = __ballot_sync(ZETA_FULL_MASK, keep_lo);
        const unsigned mhi = __ballot_sync(ZETA_FULL_MASK, keep_hi);
        const unsigned lt = (1u << lane) - 1u;
        const int rlo = __popc(mlo & lt), rhi = __popc(mlo) + __popc(mhi & lt);
        const int kept = __popc(mlo) + __popc(mhi);
        __syncwarp();
        if (keep_lo) work[rlo] = lo;
        if (keep_hi && rhi < 32) work[rhi] = hi;
        if (static_cast<int>(lane) >= kept) work[lane] = ZETA_KEY_NONE;
        __syncwarp();
        best = work[lane];
    }

    /// Any kp: bitonic sort of work[0, 2kp) in shared memory, then in-place compaction.
    __device__ void flush_shared() {
        const int p = 2 * kp;
        const unsigned lane = lane_id();
        for (int i = kp + qn + lane; i < p; i += 32) work[i] = ZETA_KEY_NONE;
        __syncwarp();
        for (int size = 2; size <= p; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int t = lane; t < p / 2; t += 32) {
                    // stride is a power of two: the pair of t without a division
                    int i = ((t & ~(stride - 1)) << 1) | (t & (stride - 1));
                    int j = i + stride;
                    uint64_t a = work[i], c = work[j];
                    bool up = (i & size) == 0;
                    if ((a > c) == up) {
                        work[i] = c;
                        work[j] = a;
                    }
                }
                __syncwarp();
            }
        }
        // Compact the distinct keys in place, 32 at a time. Safe without a copy: an entry's
        // new slot is <= its index, and within a round every lane reads (its key and the one
        // before it) before the ballot and writes after it; the key before a round's first
        // entry can only have been rewritten by itself (no drops so far), i.e. unchanged.
        int base = 0;
        for (int r = 0; r < p / 32; ++r) {
            const int i = r * 32 + lane;
            const uint64_t val = work[i];
            const bool keep = val != ZETA_KEY_NONE && (i == 0 || work[i - 1] != val);
            const unsigned m = __ballot_sync(ZETA_FULL_MASK, keep);
            const int rank = base + __popc(m & ((1u << lane) - 1u));
            __syncwarp();  // the ballot orders these reads before the writes; say so to racecheck
            if (keep && rank < kp) work[rank] = val;
            base += __popc(m);
            __syncwarp();
        }
        for (int i = base + lane; i < kp; i += 32) work[i] = ZETA_KEY_NONE;
    }

    /// Offers one key per lane (valid = false: nothing). Every lane of the warp calls this.
    __device__ __forceinline__ void offer(uint64_t key, bool valid) {
        ZETA_STAT(0);
        if (valid) ZETA_STAT(8);  // per lane: candidates
        bool pass = valid && key < kth;
        unsigned m = __ballot_sync(ZETA_FULL_MASK, pass);
        if (m == 0) return;
        ZETA_STAT(1);
        int cnt = __popc(m);
        if (qn + cnt > kp) {
            flush();
            pass = valid && key < kth;
            m = __ballot_sync(ZETA_FULL_MASK, pass);
            cnt = __popc(m);
        }
        if (pass) work[kp + qn + __popc(m & ((1u << lane_id()) - 1u))] = key;
        qn += cnt;
        __syncwarp();
    }
};

/// Key of the candidate at `pos`. DK > 0: d_k known at compile time; DK == 0: `dk` at run time.
template <int DK>
__device__ __forceinline__ uint64_t cand_key(const float* kg, int pos, const float* qv, int dk) {
    const float* kr = kg + static_cast<long long>(pos) * (DK > 0 ? DK : dk);
    float s = 0.0f;
    if (DK > 0) {
#pragma unroll
        for (int j = 0; j < DK; ++j) {
            float d = __fsub_rn(qv[j], kr[j]);
            s = __fadd_rn(s, __fmul_rn(d, d));
        }
    } else {
        for (int j = 0; j < dk; ++j) {
            float d = __fsub_rn(qv[j], kr[j]);
            s = __fadd_rn(s, __fmul_rn(d, d));
        }
    }
    return pack_key(s, static_cast<uint32_t>(pos));
}

/// Candidates per lane loaded before any is offered: the loads of UNROLL batches overlap
/// instead of queueing behind each other. Measured on an H200 (N=32k, bf16, top-32): 1 is
/// fastest (3.29 ms forward) against 2 (3.48) and 4; the kernel is bound by issued
/// instructions, not latency, once 8 blocks of 128 threads are resident (64 registers).
#ifndef ZETA_UNROLL
#define ZETA_UNROLL 1
#endif

/// Key of a point stored beside its entry: the same float operations as cand_key<3>.
__device__ __forceinline__ uint64_t point_key(const Pt4& pt, const float* qv) {
    const float d0 = __fsub_rn(qv[0], pt.x), d1 = __fsub_rn(qv[1], pt.y), d2 = __fsub_rn(qv[2], pt.z);
    float s = __fadd_rn(0.0f, __fmul_rn(d0, d0));
    s = __fadd_rn(s, __fmul_rn(d1, d1));
    s = __fadd_rn(s, __fmul_rn(d2, d2));
    return pack_key(s, static_cast<uint32_t>(pt.pos));
}

/// Offers the run entries r[lo, hi) (positions in the low 32 bits; hi - lo < 2^31). `pr`: the
/// points beside r (d_k = 3), read instead of r and the keys; null: not stored.
template <int DK>
__device__ __forceinline__ void scan_entries(const uint64_t* r, const Pt4* pr, int lo, int hi,
                                             const float* kg, const float* qv, int dk,
                                             WarpSelect& ws) {
    const int lane = static_cast<int>(lane_id());
    if (DK == 3 && pr != nullptr) {
        for (int x = lo; x < hi; x += 32) {
            const int e = x + lane;
            const uint64_t key = e < hi ? point_key(pr[e], qv) : 0;
            ws.offer(key, e < hi);
        }
        return;
    }
    for (int x = lo; x < hi; x += 32 * ZETA_UNROLL) {
        int pos[ZETA_UNROLL];
#pragma unroll
        for (int u = 0; u < ZETA_UNROLL; ++u) {
            int e = x + u * 32 + lane;
            pos[u] = e < hi ? static_cast<int>(r[e] & 0xffffffffull) : -1;
        }
        uint64_t key[ZETA_UNROLL];
#pragma unroll
        for (int u = 0; u < ZETA_UNROLL; ++u) key[u] = pos[u] >= 0 ? cand_key<DK>(kg, pos[u], qv, dk) : 0;
#pragma unroll
        for (int u = 0; u < ZETA_UNROLL; ++u)
            if (x + u * 32 < hi) ws.offer(key[u], pos[u] >= 0);  // warp-uniform condition
    }
}

/// Offers the positions [lo, hi).
template <int DK>
__device__ __forceinline__ void scan_range(int lo, int hi, const float* kg, const float* qv, int dk,
                                           WarpSelect& ws) {
    const int lane = static_cast<int>(lane_id());
    for (int x = lo; x < hi; x += 32 * ZETA_UNROLL) {
        uint64_t key[ZETA_UNROLL];
#pragma unroll
        for (int u = 0; u < ZETA_UNROLL; ++u) {
            int pos = x + u * 32 + lane;
            key[u] = pos < hi ? cand_key<DK>(kg, pos, qv, dk) : 0;
        }
#pragma unroll
        for (int u = 0; u < ZETA_UNROLL; ++u)
            if (x + u * 32 < hi) ws.offer(key[u], x + u * 32 + lane < hi);
    }
}

/// Squared distance from q to the nearest point of the box (lo[d], hi[d]), rounded as the
/// distances are: per coordinate the gap max(lo - q, q - hi, 0) is no larger than |q - k|
/// for any key k in the box (subtraction rounds monotonically), so the bound is no larger
/// than the key's d2 in floats too.
template <int DK>
__device__ __forceinline__ float box_lb(const float* qv, const float* bx, int dk) {
    const int d = DK > 0 ? DK : dk;
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < (DK > 0 ? DK : ZETA_MAX_DK); ++j) {
        if (DK > 0 || j < d) {
            const float a = __fsub_rn(bx[j], qv[j]), b = __fsub_rn(qv[j], bx[d + j]);
            float g = a > b ? a : b;
            g = g > 0.0f ? g : 0.0f;
            s = __fadd_rn(s, __fmul_rn(g, g));
        }
    }
    return s;
}

/// Leaves [l0, l1) of a run of `run_len` entries that the exact search's first pass scans around
/// the lower bound `at` of the query's code: those that would hold entries [at - window, at +
/// window] if leaves were ZETA_LEAF entries each (leaves that follow the cells start within
/// half a leaf of that; any choice is exact: the pruned scan skips just these leaves).
__device__ __forceinline__ void first_leaves(long long at, long long window, long long run_len,
                                             long long& l0, long long& l1) {
    const long long n_leaves = (run_len + ZETA_LEAF - 1) / ZETA_LEAF;
    const long long a0 = at - window > 0 ? at - window : 0;
    const long long a1 = at + window < run_len - 1 ? at + window : run_len - 1;
    l0 = a0 / ZETA_LEAF;
    l1 = a1 / ZETA_LEAF + 1;
    l1 = l1 < n_leaves ? l1 : n_leaves;
    l0 = l0 < l1 ? l0 : l1;
}

/// One round of 32 leaves (lane: leaf t; t = lv.n: none): the leaves whose box bound is below
/// the k-th best key, except [skip0, skip1), are scanned, each tested again just before its
/// scan (the k-th best only falls).
template <int DK>
__device__ __forceinline__ void leaf_round(const uint64_t* run, const Pt4* prun, const Leaves& lv,
                                           int t, const float* kg, const float* qv, int dk,
                                           int skip0, int skip1, WarpSelect& ws) {
    const int d = DK > 0 ? DK : dk;
    t = t < skip0 || t >= skip1 ? t : lv.n;
    // Any key of the leaf is >= (bits(bound) << 32): positions only add low bits.
    const uint64_t lb =
        t < lv.n
            ? static_cast<uint64_t>(__float_as_uint(box_lb<DK>(qv, lv.box + static_cast<long long>(t) * 2 * d, dk))) << 32
            : ZETA_KEY_NONE;
    unsigned m = __ballot_sync(ZETA_FULL_MASK, lb < ws.kth);
    ZETA_STAT(3);
    if (m == 0u) return;
    const int lo = t < lv.n ? lv.start(t) : 0, hi = t < lv.n ? lv.start(t + 1) : 0;
    while (m != 0u) {
        const int j = __ffs(static_cast<int>(m)) - 1;
        m &= m - 1u;
        const uint64_t lbj = __shfl_sync(ZETA_FULL_MASK, lb, j);
        if (lbj >= ws.kth) continue;  // warp-uniform: kth is read from the shared list
        ZETA_STAT(4);
        scan_entries<DK>(run, prun, __shfl_sync(ZETA_FULL_MASK, lo, j),
                         __shfl_sync(ZETA_FULL_MASK, hi, j), kg, qv, dk, ws);
    }
}

/// Exact search of one sorted run: offers every entry of each leaf whose box bound is below
/// the current k-th best key (a leaf is tested again just before its scan: the k-th best
/// only falls), except the leaves [skip0, skip1) that the first pass scanned whole. `at`: the
/// lower bound of the query's code in the run. `lv.box` null: offer the whole run (but the
/// skipped leaves). A run of at most 32 leaves: one round of their boxes, from the 16 before
/// the query's code on round the run. Longer runs: the boxes of their groups of 32 leaves
/// first (32 groups a round), then the groups within the k-th best, nearest first (its
/// nearest keys are most likely there, so the k-th best falls early), a round of 32 leaf
/// boxes each.
template <int DK>
__device__ void scan_run_pruned(const uint64_t* run, const Pt4* prun, const Leaves& lv,
                                const float* kg, const float* qv, int dk, int at, int skip0,
                                int skip1, WarpSelect& ws) {
    const int run_len = lv.run_len;
    if (lv.box == nullptr) {
        const int e0 = lv.start(skip0), e1 = lv.start(skip1);
        scan_entries<DK>(run, prun, 0, e0, kg, qv, dk, ws);
        scan_entries<DK>(run, prun, e1 > e0 ? e1 : e0, run_len, kg, qv, dk, ws);
        return;
    }
    const int d = DK > 0 ? DK : dk;
    const int n_leaves = lv.n;
    const int lane = static_cast<int>(lane_id());
    if (n_leaves <= 32) {  // one group: its leaves, from the 16 before the query's code on
        int first = at / ZETA_LEAF - 16;
        first = first < 0 ? 0 : first;
        for (int base = 0; base < n_leaves; base += 32) {
            int t = first + base + lane;  // leaves first .. n_leaves - 1, then 0 .. first - 1
            t = t >= n_leaves ? t - n_leaves : t;
            leaf_round<DK>(run, prun, lv, base + lane < n_leaves ? t : n_leaves, kg, qv, dk,
                           skip0, skip1, ws);
        }
        return;
    }
    // Groups of 32 leaves: each group's box first, then the leaves of the groups within the
    // k-th best, nearest group first (the k-th best falls fastest), 32 groups at a time.
    const int n_groups = (n_leaves + 31) / 32;
    for (int gb = 0; gb < n_groups; gb += 32) {
        const int grp = gb + lane;
        const uint64_t glb =
            grp < n_groups
                ? static_cast<uint64_t>(__float_as_uint(box_lb<DK>(qv, lv.sbox + static_cast<long long>(grp) * 2 * d, dk))) << 32
                : ZETA_KEY_NONE;
        ZETA_STAT(9);
        unsigned gm = __ballot_sync(ZETA_FULL_MASK, glb < ws.kth);
        while (gm != 0u) {
            uint64_t v = (gm >> lane) & 1u ? glb : ZETA_KEY_NONE;  // the nearest group left
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v = umin64(v, __shfl_xor_sync(ZETA_FULL_MASK, v, o));
            if (v >= ws.kth) break;  // and so are the rest
            const int j = __ffs(static_cast<int>(__ballot_sync(ZETA_FULL_MASK, ((gm >> lane) & 1u) && glb == v))) - 1;
            gm &= ~(1u << j);
            const int t = (gb + j) * 32 + lane;
            leaf_round<DK>(run, prun, lv, t < n_leaves ? t : n_leaves, kg, qv, dk, skip0, skip1, ws);
        }
    }
}

/// The exact part of a search (after the first pass): every run of curve 0 that holds keys the
/// query sees, prune-scanned. `w`: the query, `g`: kv slice, `cq`: chunk index (causal).
/// `sidx`: lane t holds the lower bound of the query's code in the run of probe t of curve 0
/// (the set bits of cq, lowest first; non-causal: the one run), found by the first pass,
/// which scanned that run's first_leaves() whole.
template <int DK>
__device__ void search_exact(const SearchArgs& a, long long w, long long g, long long cq,
                             const float* kg, const float* qv, long long sidx, WarpSelect& ws) {
    ws.flush();  // the first pass's k-th best: the first radius
    const long long slices = static_cast<long long>(a.b) * a.hkv * a.n_curves;
    if (!a.causal) {  // one run of all keys per slice
        const long long at = __shfl_sync(ZETA_FULL_MASK, sidx, 0);
        long long l0, l1;
        first_leaves(at, a.window, a.s, l0, l1);
        const uint64_t* run = a.levels + g * a.n_curves * a.s;
        scan_run_pruned<DK>(run, a.points_of(run), a.leaves_of(0, g, 0, a.s, a.s), kg, qv, a.dk,
                            static_cast<int>(at), static_cast<int>(l0), static_cast<int>(l1), ws);
        return;
    }
    long long off = 0;  // start of level l: the levels below it, all slices
    int nth = 0;        // probe of curve 0 = index of the set bit among cq's set bits
    for (int l = 0; l < a.n_levels; ++l) {
        const long long width = ((a.n_full >> l) << l) * a.chunk;
        if ((cq >> l) & 1) {
            const long long run_len = static_cast<long long>(a.chunk) << l;
            const long long m = (cq >> l) - 1;
            const uint64_t* run = a.levels + off + g * a.n_curves * width + m * run_len;
            const long long at = __shfl_sync(ZETA_FULL_MASK, sidx, nth++);
            long long l0, l1;
            first_leaves(at, a.window, run_len, l0, l1);
            scan_run_pruned<DK>(run, a.points_of(run), a.leaves_of(l, g, m, width, run_len), kg,
                                qv, a.dk, static_cast<int>(at), static_cast<int>(l0),
                                static_cast<int>(l1), ws);
        }
        off += slices * width;
    }
}

/// Runs the candidate search of query w = (b, h, i) and leaves its top-k in ws.work[0, topk).
template <int DK>
__device__ void search_query(const SearchArgs& a, long long w, const float* qv, WarpSelect& ws) {
    const unsigned lane = lane_id();
    const long long i = w % a.n;
    const long long bh = w / a.n;  // b * H + h
    const int h = static_cast<int>(bh % a.h);
    const long long bb = bh / a.h;
    const long long g = bb * a.hkv + h / (a.h / a.hkv);  // kv slice
    const float* kg = a.k + g * a.s * a.dk;
    const long long p = a.s - a.n + i;  // absolute position
    const long long cq = a.causal ? p / a.chunk : 0;
    const int bits_set = a.causal ? __popcll(static_cast<unsigned long long>(cq)) : 1;
    const int n_probes = a.n_curves * bits_set;
    const long long slices = static_cast<long long>(a.b) * a.hkv * a.n_curves;

    ZETA_STAT(7);
    long long sidx0 = 0;  // lane t: lower bound of probe t (curve 0's probes are 0 .. bits_set-1)
    for (int base = 0; base < n_probes; base += 32) {
        // Lane t finds the window of probe base + t (the searches run side by side).
        long long lo = 0, hi = 0;
        const uint64_t* run = a.levels;
        int pr = base + static_cast<int>(lane);
        if (pr < n_probes) {
            int c = pr / bits_set, nth = pr % bits_set;
            uint32_t qcode = a.qcodes[(bh * a.n_curves + c) * a.n + i];
            long long run_len, width, m = 0;
            int l = 0;
            if (a.causal) {
                for (int seen = -1;; ++l) {  // the nth set bit of cq, lowest first
                    if ((cq >> l) & 1) {
                        if (++seen == nth) break;
                    }
                }
                long long off = 0;  // start of level l: the levels below it, all slices
                for (int j = 0; j < l; ++j) off += slices * (((a.n_full >> j) << j) * a.chunk);
                run_len = static_cast<long long>(a.chunk) << l;
                width = ((a.n_full >> l) << l) * a.chunk;
                m = (cq >> l) - 1;
                run = a.levels + off + (g * a.n_curves + c) * width + m * run_len;
            } else {
                run_len = width = a.s;
                run = a.levels + (g * a.n_curves + c) * a.s;
            }
            long long sidx = lower_bound_u64(run, static_cast<uint32_t>(run_len),
                                             static_cast<uint64_t>(qcode) << 32);
            if (a.exact && c == 0) {  // whole leaves, which the exact pass then skips
                long long l0, l1;
                first_leaves(sidx, a.window, run_len, l0, l1);
                const Leaves lv = a.leaves_of(l, g, m, width, run_len);
                lo = lv.start(static_cast<int>(l0));
                hi = lv.start(static_cast<int>(l1));
            } else {
                lo = sidx - a.window > 0 ? sidx - a.window : 0;
                hi = sidx + a.window < run_len ? sidx + a.window : run_len;
            }
            if (base == 0) sidx0 = sidx;
        }
        int cnt = n_probes - base < 32 ? n_probes - base : 32;
        // The probes' windows from the last lane down, i.e. the longest runs first: they hold
        // the most keys, so the k-th best falls fastest and fewer later candidates enter the
        // queue. Counted on the CPU shim (benches/gpu_opmix.py, N = 32k, last 2048 queries,
        // top-32): flushes per query 10.6 -> 5.7 (exact), 12.5 -> 7.6 (window search), the
        // same candidates; the result does not depend on the order.
        for (int t = cnt - 1; t >= 0; --t) {
            ZETA_STAT(5);
            long long tlo = __shfl_sync(ZETA_FULL_MASK, lo, t);
            long long thi = __shfl_sync(ZETA_FULL_MASK, hi, t);
            unsigned long long trun =
                __shfl_sync(ZETA_FULL_MASK, reinterpret_cast<unsigned long long>(run), t);
            const uint64_t* r = reinterpret_cast<const uint64_t*>(trun);
            scan_entries<DK>(r, a.points_of(r), static_cast<int>(tlo), static_cast<int>(thi), kg,
                             qv, a.dk, ws);
        }
    }
    // The own chunk and the sinks before the exact pass: they are candidates either way, and
    // the exact pass prunes with the k-th best found before it (the result does not depend on
    // the order in which candidates are offered).
    if (a.causal)  // own chunk [c*chunk, p]
        scan_range<DK>(static_cast<int>(cq * a.chunk), static_cast<int>(p + 1), kg, qv, a.dk, ws);
    if (a.n_sink > 0) {  // sinks [0, min(n_sink, last + 1))
        long long last = a.causal ? p : a.s - 1;
        scan_range<DK>(0, static_cast<int>(a.n_sink < last + 1 ? a.n_sink : last + 1), kg, qv, a.dk, ws);
    }
    if (a.exact) search_exact<DK>(a, w, g, cq, kg, qv, sidx0, ws);
    ws.flush();
}

/// The query of this warp (w = (b*H + h)*N + i), or false for a warp past the last query.
__device__ __forceinline__ bool warp_query(const SearchArgs& a, long long& w) {
    w = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (w >= static_cast<long long>(a.b) * a.h * a.n) return false;
    if (a.use_order) w = a.order[w];
    return true;
}

__device__ __forceinline__ void load_query(const SearchArgs& a, long long w, float* qv) {
#pragma unroll
    for (int j = 0; j < ZETA_MAX_DK; ++j) qv[j] = j < a.dk ? a.q[w * a.dk + j] : 0.0f;
}

/// knn: indices (B, H, N, topk) int64 (-1 missing) and d2 (B, H, N, topk) float32 (+inf).
/// DK: d_k at compile time (2, 3, 4), or 0 for any d_k.
template <int DK>
__global__ void ZETA_SEARCH_BOUNDS knn_kernel(ZETA_SEARCH_PARAMS, long long* __restrict__ out_idx, float* __restrict__ out_d2) {
    const SearchArgs a = ZETA_SEARCH_ARGS;
    ZETA_DYN_SMEM(uint64_t, smem);
    long long w;
    if (!warp_query(a, w)) return;
    WarpSelect ws;
    ws.init(smem + static_cast<long long>(threadIdx.x / 32) * 2 * a.kp, a.kp, a.topk);
    float qv[ZETA_MAX_DK];
    load_query(a, w, qv);
    search_query<DK>(a, w, qv, ws);
    for (int j = lane_id(); j < a.topk; j += 32) {
        uint64_t key = ws.work[j];
        bool ok = key != ZETA_KEY_NONE;
        out_idx[w * a.topk + j] = ok ? static_cast<long long>(key & 0xffffffffull) : -1;
        out_d2[w * a.topk + j] = ok ? __uint_as_float(static_cast<uint32_t>(key >> 32))
                                    : __uint_as_float(0x7f800000u);
    }
}

/// Forward: out (B, H, N, dv) and the selected positions (B, H, N, topk) int32 (-1 missing),
/// which is all the backward keeps. kbar/vbar: (B, Hkv, N, dk|dv) float32 means of the visible
/// keys/values (mean_token), else unused.
template <class V, int DK>
__global__ void ZETA_SEARCH_BOUNDS forward_kernel(ZETA_SEARCH_PARAMS, const V* __restrict__ v, int dv,
                               const double* __restrict__ gamma, const float* __restrict__ kbar,
                               const float* __restrict__ vbar, int mean_token, V* __restrict__ out,
                               int* __restrict__ out_idx) {
    const SearchArgs a = ZETA_SEARCH_ARGS;
    ZETA_DYN_SMEM(uint64_t, smem);
    long long w;
    if (!warp_query(a, w)) return;
    // Per warp: 2*kp keys, kp scores, kp positions.
    uint64_t* mine = smem + static_cast<long long>(threadIdx.x / 32) * 3 * a.kp;
    float* sc = reinterpret_cast<float*>(mine + 2 * a.kp);
    int* ps = reinterpret_cast<int*>(sc + a.kp);
    WarpSelect ws;
    ws.init(mine, a.kp, a.topk);
    float qv[ZETA_MAX_DK];
    load_query(a, w, qv);
    search_query<DK>(a, w, qv, ws);

    const unsigned lane = lane_id();
    const long long i = w % a.n, bh = w / a.n;
    const int h = static_cast<int>(bh % a.h);
    const long long g = (bh / a.h) * a.hkv + h / (a.h / a.hkv);
    const float g2 = static_cast<float>(gamma[h] * gamma[h]);  // as the Rust core: f64 square, f32
    for (int j = lane; j < a.topk; j += 32) {
        uint64_t key = ws.work[j];
        bool ok = key != ZETA_KEY_NONE;
        float d2 = __uint_as_float(static_cast<uint32_t>(key >> 32));
        sc[j] = ok ? __fdiv_rn(1.0f, __fadd_rn(d2, g2)) : 0.0f;
        ps[j] = ok ? static_cast<int>(key & 0xffffffffull) : -1;
        out_idx[w * a.topk + j] = ps[j];
    }
    __syncwarp();
    int count = 0;
    float z = 0.0f;
    for (int j = 0; j < a.topk && ps[j] >= 0; ++j, ++count) z = __fadd_rn(z, sc[j]);
    float sm = 0.0f;
    if (mean_token) {
        sm = __fdiv_rn(1.0f, __fadd_rn(sq_dist(qv, kbar + (g * a.n + i) * a.dk, a.dk), g2));
        z = __fadd_rn(z, sm);
    }
    // The weights a = s / z first, then their value sum (as the Rust core's `combine`): a <= 1,
    // so the sum cannot overflow where the values do not (s v could: s is up to 2^48).
    const float inv = __fdiv_rn(1.0f, z);
    __syncwarp();  // every lane has read sc[] for z
    for (int j = lane; j < count; j += 32) sc[j] = __fmul_rn(sc[j], inv);
    __syncwarp();
    const float am = __fmul_rn(sm, inv);
    const V* vg = v + g * a.s * dv;
    for (int col = lane; col < dv; col += 32) {
        float acc = 0.0f;
        for (int j = 0; j < count; ++j)
            acc = __fadd_rn(acc, __fmul_rn(sc[j], to_float(vg[static_cast<long long>(ps[j]) * dv + col])));
        if (mean_token) acc = __fadd_rn(acc, __fmul_rn(am, vbar[(g * a.n + i) * dv + col]));
        out[w * dv + col] = from_float<V>(acc);
    }
}

}  // namespace zeta
