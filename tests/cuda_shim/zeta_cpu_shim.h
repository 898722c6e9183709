// A CPU model of the CUDA features zeta's kernels use, so that the same .cu sources run in
// the test suite on machines without a GPU (-DZETA_CPU_SHIM, g++ -std=c++20).
//
// Every thread of a block is a fiber (ucontext) on one OS thread; blocks run one after the
// other. __syncthreads is a real barrier over the block's threads and __syncwarp / the warp
// intrinsics are real barriers over the warp's 32 lanes: a fiber that reaches one waits until
// all the others have, so values written to shared memory before a barrier are seen after it,
// and a shuffle reads what the other lane passed. A barrier some thread never reaches (a
// divergent __syncthreads, a warp intrinsic called by part of a warp) is reported as a
// deadlock instead of hanging. Static __shared__ variables are function statics: shared by the
// threads of the (one) running block. Float math follows IEEE with contraction off
// (-ffp-contract=off), like the module's --fmad=false.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

namespace zeta_shim {

struct Barrier {
    int arrived = 0;
    unsigned generation = 0;
};

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    dim3 tid;
    bool done = false;
    Barrier* waiting = nullptr;
    unsigned wait_generation = 0;
};

struct Block {
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<uint64_t> exchange;  // 32 slots per warp
    std::vector<unsigned char> dyn_smem;
    int current = 0;
    int nthreads = 0;
    std::string error;  // an exception thrown inside a fiber, rethrown by the scheduler
};

inline Block*& block() {
    static Block* b = nullptr;
    return b;
}

inline dim3& thread_idx() {
    static dim3 d;
    return d;
}
inline dim3& block_idx() {
    static dim3 d;
    return d;
}
inline dim3& block_dim() {
    static dim3 d;
    return d;
}
inline dim3& grid_dim() {
    static dim3 d;
    return d;
}

inline void* dynamic_smem() { return block()->dyn_smem.data(); }

inline int linear_tid() {
    const dim3& t = thread_idx();
    const dim3& d = block_dim();
    return static_cast<int>(t.x + d.x * (t.y + d.y * t.z));
}

/// Arrive at `b`, expecting `expected` arrivals; yields until they are all there.
inline void arrive(Barrier& b, int expected) {
    Block* blk = block();
    if (++b.arrived == expected) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    Fiber& f = blk->fibers[blk->current];
    f.waiting = &b;
    f.wait_generation = b.generation;
    swapcontext(&f.ctx, &blk->scheduler);
}

inline void sync_block() { arrive(block()->block_barrier, block()->nthreads); }

inline void sync_warp() {
    Block* blk = block();
    if (blk->nthreads % 32 != 0) throw std::logic_error("warp barrier in a block that is not whole warps");
    arrive(blk->warp_barriers[linear_tid() / 32], 32);
}

/// All 32 lanes pass `v`; each gets back what `src_of(lane)` passed.
template <class T, class F>
inline T exchange(T v, F src_of) {
    static_assert(sizeof(T) <= 8, "exchange of a value wider than 8 bytes");
    Block* blk = block();
    const int lt = linear_tid();
    const int warp = lt / 32, lane = lt % 32;
    uint64_t raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    blk->exchange[warp * 32 + lane] = raw;
    sync_warp();
    int src = src_of(lane);
    uint64_t got = blk->exchange[warp * 32 + (src & 31)];
    sync_warp();
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

inline float half_to_float(unsigned short h) {
    unsigned sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    float f;
    if (exp == 0)
        f = std::ldexp(static_cast<float>(man), -24);
    else if (exp == 31)
        f = man ? NAN : INFINITY;
    else
        f = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
    return sign ? -f : f;
}

inline unsigned short float_to_half(float x) {
    // Round to nearest even through double arithmetic on the exact value.
    unsigned short sign = std::signbit(x) ? 0x8000 : 0;
    double a = std::fabs(static_cast<double>(x));
    if (std::isnan(x)) return 0x7e00;
    if (a >= 65520.0) return sign | 0x7c00;
    if (a < std::ldexp(1.0, -14)) {  // subnormal: units of 2^-24
        double u = std::nearbyint(a * std::ldexp(1.0, 24));
        return sign | static_cast<unsigned short>(u);
    }
    int e;
    double m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    double u = std::nearbyint(m * 2048.0);  // 11 significant bits
    if (u >= 2048.0) {
        u /= 2.0;
        ++e;
    }
    unsigned exp = static_cast<unsigned>(e - 1 + 15);
    if (exp >= 31) return sign | 0x7c00;
    return sign | static_cast<unsigned short>((exp << 10) | (static_cast<unsigned>(u) & 0x3ffu));
}

struct KernelCall {
    virtual void run() = 0;
    virtual ~KernelCall() = default;
};

inline void fiber_entry(unsigned lo, unsigned hi) {
    KernelCall* call = reinterpret_cast<KernelCall*>((static_cast<uintptr_t>(hi) << 32) | lo);
    Block* blk = block();
    try {
        call->run();
    } catch (const std::exception& e) {
        blk->error = e.what();
    }
    blk->fibers[blk->current].done = true;
    swapcontext(&blk->fibers[blk->current].ctx, &blk->scheduler);
}

/// Runs `call` over the whole grid. Throws std::runtime_error on a barrier deadlock.
inline void launch(KernelCall* call, dim3 grid, dim3 blockd, size_t shmem) {
    const int nthreads = static_cast<int>(blockd.x * blockd.y * blockd.z);
    Block blk;
    blk.nthreads = nthreads;
    blk.fibers.resize(nthreads);
    blk.warp_barriers.resize((nthreads + 31) / 32);
    blk.exchange.assign(((nthreads + 31) / 32) * 32, 0);
    blk.dyn_smem.assign(shmem + 16, 0);
    for (auto& f : blk.fibers) f.stack.resize(1 << 17);
    block() = &blk;
    block_dim() = blockd;
    grid_dim() = grid;
    const uintptr_t cp = reinterpret_cast<uintptr_t>(call);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                block_idx() = dim3{bx, by, bz};
                blk.block_barrier = Barrier{};
                for (auto& wb : blk.warp_barriers) wb = Barrier{};
                for (int t = 0; t < nthreads; ++t) {
                    Fiber& f = blk.fibers[t];
                    f.done = false;
                    f.waiting = nullptr;
                    f.tid = dim3{static_cast<unsigned>(t % blockd.x),
                                 static_cast<unsigned>((t / blockd.x) % blockd.y),
                                 static_cast<unsigned>(t / (blockd.x * blockd.y))};
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_entry), 2,
                                static_cast<unsigned>(cp & 0xffffffffu), static_cast<unsigned>(cp >> 32));
                }
                int remaining = nthreads;
                while (remaining > 0) {
                    bool progress = false;
                    for (int t = 0; t < nthreads; ++t) {
                        Fiber& f = blk.fibers[t];
                        if (f.done) continue;
                        if (f.waiting && f.waiting->generation == f.wait_generation) continue;
                        f.waiting = nullptr;
                        blk.current = t;
                        thread_idx() = f.tid;
                        swapcontext(&blk.scheduler, &f.ctx);
                        if (!blk.error.empty()) {
                            block() = nullptr;
                            throw std::runtime_error(blk.error);
                        }
                        progress = true;
                        if (f.done) --remaining;
                    }
                    if (!progress) {
                        block() = nullptr;
                        throw std::runtime_error("barrier deadlock in block (" + std::to_string(bx) + "," +
                                                 std::to_string(by) + "," + std::to_string(bz) +
                                                 "): some threads never reach a __syncthreads/__syncwarp "
                                                 "or warp intrinsic that others wait at");
                    }
                }
            }
    block() = nullptr;
}

template <class... A>
struct Call : KernelCall {
    void (*fn)(A...);
    void** args;
    Call(void (*f)(A...), void** a) : fn(f), args(a) {}
    template <size_t... I>
    void run_impl(std::index_sequence<I...>) {
        fn(*static_cast<std::remove_reference_t<A>*>(args[I])...);
    }
    void run() override { run_impl(std::index_sequence_for<A...>{}); }
};

/// Launches `fn` with arguments passed as in cuLaunchKernel (an array of pointers to values).
/// Returns 0, or 1 with `err` filled.
template <class... A>
int launch_kernel(void (*fn)(A...), dim3 grid, dim3 blockd, size_t shmem, void** args, char* err,
                  size_t errlen) {
    Call<A...> call(fn, args);
    try {
        launch(&call, grid, blockd, shmem);
    } catch (const std::exception& e) {
        std::snprintf(err, errlen, "%s", e.what());
        return 1;
    }
    return 0;
}

/// Event counters of the kernels' ZETA_STAT(i) (common.cuh), summed over threads: a CPU
/// count of what a kernel does per query (benches/gpu_opmix.py); zeta_stats() reads them.
inline unsigned long long g_stats[16] = {};
inline void stat(int i) { ++g_stats[i & 15]; }

}  // namespace zeta_shim

#define threadIdx (zeta_shim::thread_idx())
#define blockIdx (zeta_shim::block_idx())
#define blockDim (zeta_shim::block_dim())
#define gridDim (zeta_shim::grid_dim())

inline void __syncthreads() { zeta_shim::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { zeta_shim::sync_warp(); }

template <class T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
    return zeta_shim::exchange(v, [src](int) { return src; });
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int m, int = 32) {
    return zeta_shim::exchange(v, [m](int lane) { return lane ^ m; });
}
inline unsigned __ballot_sync(unsigned, int pred) {
    zeta_shim::Block* blk = zeta_shim::block();
    const int lt = zeta_shim::linear_tid();
    const int warp = lt / 32;
    blk->exchange[warp * 32 + lt % 32] = pred ? 1u : 0u;
    zeta_shim::sync_warp();
    unsigned all = 0;
    for (int l = 0; l < 32; ++l) all |= static_cast<unsigned>(blk->exchange[warp * 32 + l]) << l;
    zeta_shim::sync_warp();
    return all;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

template <class T>
inline T atomicAdd(T* p, T v) {
    // One OS thread runs every fiber, and a fiber is never interrupted between two barriers.
    T old = *p;
    *p = old + v;
    return old;
}

using std::fabs;
