//! The top-k's merge in vector registers: the best keys kept sorted, new keys merged in by
//! sorting networks (AVX-512F: eight u64 keys per register; AVX2: four).
//!
//! [`merge_sorted`] takes a buffer whose first `s` keys are ascending (the best known) and
//! whose keys `s..n` are new, unordered, and leaves the smallest `min(n, k)` ascending at the
//! front. The AVX-512 path holds the sorted keys in `R = k / 8` registers (rounded up to a
//! power of two, k <= [`MERGE_MAX`]); per 16 new keys: two 8-key sorting networks (Batcher's
//! odd-even merge sort, 19 comparators in 6 layers), one bitonic merge of the two, then the
//! lowest `8R` of both sets from `min(best[i], new[8R - 1 - i])` (a bitonic sequence) and a
//! bitonic merge of the `R` registers. A layer of comparators is one permute, one min, one
//! max and one blend. The AVX2 path is the same with registers of four keys, 16 new keys per
//! step (four 4-key networks, merged pairwise), and signed compares of keys with their top
//! bit flipped.
//!
//! Perf (grouped exact search, N = 64k, top-32, `exact_timing`, four interleaved rounds):
//! steps of 16 new keys in four AVX2 registers against 8 in two: even (1.60-1.67 us both);
//! the 1-curve window-32 search (cuts of ~100 keys) 1.13-1.22 vs 1.16-1.20 us. Written as
//! one generic step (`sort_regs` + `fold`) the AVX-512 path measured 1.27-1.32 against
//! 1.33-1.36 us for the two-register code before it. Without AVX2 (or with
//! `ZETA_SIMD=portable`) the top-k keeps its select (see `topk.rs`), and
//! [`merge_sorted_portable`] is the reference the tests compare with.

/// Most keys [`merge_sorted`] keeps: eight registers of eight keys.
pub const MERGE_MAX: usize = 64;

/// Whether [`merge_sorted`] runs a vector path on this CPU (and under `ZETA_SIMD`).
pub fn merge_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::vector() >= crate::simd::Vector::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Registers of `lanes` keys that hold `k` keys, rounded up to a power of two.
fn regs(k: usize, lanes: usize) -> usize {
    k.div_ceil(lanes).next_power_of_two()
}

/// Slots [`merge_sorted`] may write (the buffer must be at least this long, and `n`).
pub fn merge_slots(k: usize) -> usize {
    8 * regs(k, 8)
}

/// `buf[..s]` ascending (`s <= k`), `buf[s..n]` any order: leaves the smallest `min(n, k)`
/// keys of `buf[..n]` ascending in `buf[..min(n, k)]` (slots after them up to
/// [`merge_slots`] may change) and returns that count. `1 <= k <= MERGE_MAX`,
/// `buf.len() >= max(n, merge_slots(k))`.
pub fn merge_sorted(buf: &mut [u64], s: usize, n: usize, k: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    let v = crate::simd::vector();
    #[cfg(not(target_arch = "x86_64"))]
    let v = crate::simd::Vector::Portable;
    merge_on(v, buf, s, n, k)
}

/// [`merge_sorted`] with the kernel `v` (one this CPU has: see
/// [`crate::simd::available_vectors`]).
fn merge_on(v: crate::simd::Vector, buf: &mut [u64], s: usize, n: usize, k: usize) -> usize {
    use crate::simd::Vector;
    assert!((1..=MERGE_MAX).contains(&k) && s <= k && s <= n);
    assert!(buf.len() >= n.max(merge_slots(k)));
    // The CPU has the kernel (what `available_vectors` lists, without building the list).
    let f = crate::simd::features();
    assert!(match v {
        Vector::Avx512 => f.avx512f,
        Vector::Avx2 => f.avx2,
        Vector::Portable => true,
    });
    match v {
        // SAFETY: the CPU has AVX-512F (asserted: `v` is available); the bounds the kernel
        // needs (s <= 8R, n and 8R within `buf`) are asserted above.
        #[cfg(target_arch = "x86_64")]
        Vector::Avx512 => unsafe {
            match regs(k, 8) {
                1 => avx512::merge::<1>(buf, s, n),
                2 => avx512::merge::<2>(buf, s, n),
                4 => avx512::merge::<4>(buf, s, n),
                _ => avx512::merge::<8>(buf, s, n),
            }
        },
        // SAFETY: the CPU has AVX2 (asserted as above); the kernel checks its bounds
        // (s <= 4R, n and 4R within `buf`; 4R <= merge_slots(k)).
        #[cfg(target_arch = "x86_64")]
        Vector::Avx2 => unsafe {
            match regs(k, 4) {
                1 => avx2::merge::<1>(buf, s, n),
                2 => avx2::merge::<2>(buf, s, n),
                4 => avx2::merge::<4>(buf, s, n),
                8 => avx2::merge::<8>(buf, s, n),
                _ => avx2::merge::<16>(buf, s, n),
            }
        },
        _ => return merge_sorted_portable(buf, s, n, k),
    }
    n.min(k)
}

/// [`merge_sorted`] in plain Rust (a sort of the new keys and a merge).
pub fn merge_sorted_portable(buf: &mut [u64], s: usize, n: usize, k: usize) -> usize {
    let (old, new) = buf[..n].split_at_mut(s);
    new.sort_unstable();
    let mut out = Vec::with_capacity(k.min(n));
    let (mut i, mut j) = (0, 0);
    while out.len() < k && (i < old.len() || j < new.len()) {
        if j == new.len() || (i < old.len() && old[i] <= new[j]) {
            out.push(old[i]);
            i += 1;
        } else {
            out.push(new[j]);
            j += 1;
        }
    }
    buf[..out.len()].copy_from_slice(&out);
    out.len()
}

/// The merge of one kernel module, over that module's helpers: `$w` keys per register of type
/// `$v`, up to `$nb` registers of new keys per step, `fill` (all `u64::MAX`), `load` (up to
/// `$w` keys from a pointer, the rest `u64::MAX`), `store` (`$w` keys to a pointer), `sortw`
/// (sorts a register), `mergew` (sorts a bitonic register), `rev`, `min`, `max` (lane by
/// lane, unsigned order).
#[cfg(target_arch = "x86_64")]
macro_rules! merge_kernel {
    ($feat:literal, $v:ty, $w:literal, $nb:literal) => {
        /// Sorts a bitonic sequence held in `R` registers: registers d apart, then inside
        /// each register.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn bitonic<const R: usize>(a: &mut [$v]) {
            let mut d = R / 2;
            while d >= 1 {
                for i in 0..R {
                    if i & d == 0 {
                        let (lo, hi) = (a[i], a[i + d]);
                        a[i] = min(lo, hi);
                        a[i + d] = max(lo, hi);
                    }
                }
                d /= 2;
            }
            for x in a[..R].iter_mut() {
                *x = mergew(*x);
            }
        }

        /// Sorts the keys of `B` registers (each sorted, then runs of 1, 2, .. registers
        /// merged pairwise: the second run reversed, a half-cleaner, two bitonic merges).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn sort_regs<const B: usize>(x: &mut [$v; B]) {
            // Runs of up to 4 registers are merged below (B is 1, 2 or `$nb` <= 4; 8 works).
            assert!(B.is_power_of_two() && B <= 8);
            for r in x.iter_mut() {
                *r = sortw(*r);
            }
            let mut w = 1;
            while w < B {
                let mut b = 0;
                while b < B {
                    let (lo, hi) = x[b..b + 2 * w].split_at_mut(w);
                    hi.reverse();
                    for i in 0..w {
                        let y = rev(hi[i]);
                        (lo[i], hi[i]) = (min(lo[i], y), max(lo[i], y));
                    }
                    match w {
                        1 => {
                            bitonic::<1>(lo);
                            bitonic::<1>(hi);
                        }
                        2 => {
                            bitonic::<2>(lo);
                            bitonic::<2>(hi);
                        }
                        _ => {
                            bitonic::<4>(lo);
                            bitonic::<4>(hi);
                        }
                    }
                    b += 2 * w;
                }
                w *= 2;
            }
        }

        /// Folds the ascending new keys `x` into the best `a`: the smallest R W of both are
        /// min(a[i], new[R W - 1 - i]) (a bitonic sequence), then sorted.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn fold<const R: usize>(a: &mut [$v; R], x: &[$v]) {
            for (j, &xr) in x.iter().enumerate().take(R) {
                a[R - 1 - j] = min(a[R - 1 - j], rev(xr));
            }
            bitonic::<R>(a);
        }

        /// `B` registers of new keys from `p` (`len <= B W` of them).
        ///
        /// SAFETY: `p..p + len` must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load_regs<const B: usize>(p: *const u64, len: usize) -> [$v; B] {
            let mut x = [fill(); B];
            for (j, xr) in x.iter_mut().enumerate() {
                if $w * j < len {
                    *xr = load(p.add($w * j), (len - $w * j).min($w));
                }
            }
            x
        }

        /// [`super::merge_sorted`] with `R` registers (`s <= R * W`, `buf` at least
        /// `max(n, R * W)` long; W keys per register).
        #[target_feature(enable = $feat)]
        pub unsafe fn merge<const R: usize>(buf: &mut [u64], s: usize, n: usize) {
            assert!(s <= $w * R && s <= n && buf.len() >= n.max($w * R));
            let p = buf.as_mut_ptr();
            let mut a = [fill(); R];
            for (r, ar) in a.iter_mut().enumerate() {
                let at = $w * r;
                if at < s {
                    // SAFETY: keys at..min(at + W, s) lie inside `buf` (s <= n <= its len).
                    *ar = load(p.add(at), (s - at).min($w));
                }
            }
            let mut c = s;
            while c < n {
                let len = (n - c).min($nb * $w);
                // SAFETY (of the loads): keys c..c + len lie inside `buf` (c + len <= n).
                if len <= $w {
                    let mut x = load_regs::<1>(p.add(c), len);
                    sort_regs(&mut x);
                    fold(&mut a, &x);
                } else if len <= 2 * $w || $nb == 2 {
                    let mut x = load_regs::<2>(p.add(c), len);
                    sort_regs(&mut x);
                    fold(&mut a, &x);
                } else {
                    let mut x = load_regs::<$nb>(p.add(c), len);
                    sort_regs(&mut x);
                    fold(&mut a, &x);
                }
                c += len;
            }
            for (r, ar) in a.iter().enumerate() {
                // SAFETY: slots W r..W (r + 1) lie inside `buf` (R W <= its len, asserted);
                // every load is done.
                store(p.add($w * r), *ar);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// One layer of comparators: lane i meets lane `idx[i]`; the lanes in `hi` keep the
    /// larger key, the others the smaller.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn layer(x: __m512i, idx: __m512i, hi: __mmask8) -> __m512i {
        let p = _mm512_permutexvar_epi64(idx, x);
        _mm512_mask_blend_epi64(hi, _mm512_min_epu64(x, p), _mm512_max_epu64(x, p))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn idx(i: [i64; 8]) -> __m512i {
        _mm512_set_epi64(i[7], i[6], i[5], i[4], i[3], i[2], i[1], i[0])
    }

    /// Sorts the eight keys of `x` (Batcher's odd-even merge sort).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sort8(x: __m512i) -> __m512i {
        let x = layer(x, idx([1, 0, 3, 2, 5, 4, 7, 6]), 0xAA);
        let x = layer(x, idx([2, 3, 0, 1, 6, 7, 4, 5]), 0xCC);
        let x = layer(x, idx([0, 2, 1, 3, 4, 6, 5, 7]), 0x44);
        let x = layer(x, idx([4, 5, 6, 7, 0, 1, 2, 3]), 0xF0);
        let x = layer(x, idx([0, 1, 4, 5, 2, 3, 6, 7]), 0x30);
        layer(x, idx([0, 2, 1, 4, 3, 6, 5, 7]), 0x54)
    }

    /// Sorts a bitonic sequence of eight keys.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn merge8(x: __m512i) -> __m512i {
        let x = layer(x, idx([4, 5, 6, 7, 0, 1, 2, 3]), 0xF0);
        let x = layer(x, idx([2, 3, 0, 1, 6, 7, 4, 5]), 0xCC);
        layer(x, idx([1, 0, 3, 2, 5, 4, 7, 6]), 0xAA)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rev(x: __m512i) -> __m512i {
        _mm512_permutexvar_epi64(idx([7, 6, 5, 4, 3, 2, 1, 0]), x)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn min(a: __m512i, b: __m512i) -> __m512i {
        _mm512_min_epu64(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn max(a: __m512i, b: __m512i) -> __m512i {
        _mm512_max_epu64(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fill() -> __m512i {
        _mm512_set1_epi64(-1)
    }

    /// `len <= 8` keys from `p`, the rest `u64::MAX`.
    ///
    /// SAFETY: `p..p + len` must be readable; the masked-off lanes are not read.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const u64, len: usize) -> __m512i {
        debug_assert!(len <= 8);
        let m = ((1u32 << len) - 1) as __mmask8;
        _mm512_mask_loadu_epi64(fill(), m, p as *const i64)
    }

    /// SAFETY: `p..p + 8` must be writable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut u64, x: __m512i) {
        _mm512_storeu_si512(p as *mut __m512i, x)
    }

    use merge8 as mergew;
    use sort8 as sortw;

    merge_kernel!("avx512f", __m512i, 8, 2);
}

/// The same merge with AVX2: four keys per register, compared as signed integers after
/// their top bit is flipped (AVX2 has no unsigned 64-bit compare); 8 new keys per step.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Flips the top bit: unsigned order becomes signed order (and back).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn flip(x: __m256i) -> __m256i {
        _mm256_xor_si256(x, _mm256_set1_epi64x(i64::MIN))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn min(a: __m256i, b: __m256i) -> __m256i {
        _mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(a, b))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn max(a: __m256i, b: __m256i) -> __m256i {
        _mm256_blendv_epi8(b, a, _mm256_cmpgt_epi64(a, b))
    }

    /// One layer of comparators: lane i meets lane `P`'s i-th selector; the 32-bit lanes in
    /// `HI` keep the larger key.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn layer<const P: i32, const HI: i32>(x: __m256i) -> __m256i {
        let p = _mm256_permute4x64_epi64::<P>(x);
        // A lane takes its partner's key when that one is the smaller (a lane that keeps
        // the smaller key) or the larger (a lane in `HI`): one blend, not min, max and a
        // blend of both. Equal keys are the same key either way.
        let hi = _mm256_blend_epi32::<HI>(_mm256_setzero_si256(), _mm256_set1_epi64x(-1));
        let take = _mm256_xor_si256(_mm256_cmpgt_epi64(x, p), hi);
        _mm256_blendv_epi8(x, p, take)
    }

    /// Sorts four keys: (0,1)(2,3), (0,2)(1,3), (1,2).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sort4(x: __m256i) -> __m256i {
        let x = layer::<0xB1, 0xCC>(x);
        let x = layer::<0x4E, 0xF0>(x);
        layer::<0xD8, 0x30>(x)
    }

    /// Sorts a bitonic sequence of four keys.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn merge4(x: __m256i) -> __m256i {
        let x = layer::<0x4E, 0xF0>(x);
        layer::<0xB1, 0xCC>(x)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn rev(x: __m256i) -> __m256i {
        _mm256_permute4x64_epi64::<0x1B>(x)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn fill() -> __m256i {
        flip(_mm256_set1_epi64x(-1))
    }

    /// `len <= 4` keys from `p`, the rest `u64::MAX`, top bits flipped.
    ///
    /// SAFETY: `p..p + len` must be readable; the masked-off lanes are not read.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(p: *const u64, len: usize) -> __m256i {
        debug_assert!(len <= 4);
        // Lanes below `len` (a masked load reads no others: a copy into a stack array was
        // a `memcpy` call per load, ~1% of `zeta.attention`'s samples on a Zen 3).
        let m = _mm256_cmpgt_epi64(
            _mm256_set1_epi64x(len as i64),
            _mm256_setr_epi64x(0, 1, 2, 3),
        );
        let x = _mm256_maskload_epi64(p as *const i64, m);
        flip(_mm256_blendv_epi8(_mm256_set1_epi64x(-1), x, m))
    }

    /// Four keys to `p`, top bits flipped back.
    ///
    /// SAFETY: `p..p + 4` must be writable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store(p: *mut u64, x: __m256i) {
        _mm256_storeu_si256(p as *mut __m256i, flip(x))
    }

    use merge4 as mergew;
    use sort4 as sortw;

    merge_kernel!("avx2", __m256i, 4, 4);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 63-bit linear congruential stream from `seed`.
    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut st = seed;
        move || {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            st >> 1
        }
    }

    fn check(buf0: &[u64], s: usize, k: usize) {
        let n = buf0.len();
        let slots = n.max(merge_slots(k));
        let mut want = buf0.to_vec();
        want.resize(slots, 0);
        let mut got = want.clone();
        let w = merge_sorted_portable(&mut want, s, n, k);
        let mut all = buf0.to_vec();
        all.sort_unstable();
        all.truncate(k);
        assert_eq!(w, all.len());
        assert_eq!(&want[..w], &all[..], "portable s={s} n={n} k={k}");
        for v in crate::simd::available_vectors() {
            let mut b = got.clone();
            let g = merge_on(v, &mut b, s, n, k);
            assert_eq!(g, w);
            assert_eq!(&b[..g], &all[..], "{} s={s} n={n} k={k}", v.name());
        }
        let g = merge_sorted(&mut got, s, n, k);
        assert_eq!(&got[..g], &all[..], "merge_sorted s={s} n={n} k={k}");
    }

    /// Every kernel this CPU has, every key count, prefix length and k against a plain sort, on random keys, on keys
    /// with many equal values, and on all 0/1 sequences of eight and sixteen new keys (the
    /// 0-1 principle: a comparator network that sorts them sorts everything).
    #[test]
    fn merge_matches_a_sort() {
        let mut next = lcg(5);
        for k in [1usize, 5, 8, 9, 16, 17, 31, 32, 33, 48, 63, 64] {
            for s in [0, 1, k / 2, k] {
                for extra in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 40, 100] {
                    for modulo in [u64::MAX, 3, 1 << 20] {
                        let mut v: Vec<u64> = (0..s + extra)
                            .map(|_| {
                                let x = next();
                                if modulo == u64::MAX {
                                    x
                                } else {
                                    x % modulo
                                }
                            })
                            .collect();
                        v[..s].sort_unstable();
                        check(&v, s, k);
                    }
                }
            }
        }
        for bits in 0u32..1 << 16 {
            let v: Vec<u64> = (0..16).map(|i| u64::from(bits >> i & 1)).collect();
            check(&v, 0, 16);
            if bits < 1 << 8 {
                check(&v[..8], 0, 8);
                check(&v[..8], 0, 4);
            }
        }
        // Keys near the top of the range (the padding is u64::MAX itself).
        let v = vec![u64::MAX, u64::MAX - 1, 0, u64::MAX, 7, u64::MAX - 2];
        check(&v, 0, 4);
        check(&v, 0, 8);
    }

    /// Time of one merge of `extra` new keys into the best 32 (top-32, as the exact search
    /// cuts), one merge after another on the same buffer (each depends on the one before, as
    /// in a query), per kernel this CPU has: `cargo test --release merge_timing -- --ignored
    /// --nocapture`.
    ///
    /// 2026-12-03, a Zen 5 VM, AVX-512: 4 / 16 / 32 / 96 new keys 32 / 30 / 59 / 170 ns
    /// (AVX2 28 / 61 / 123 / 329 ns). The grouped exact search (N = 64k, top-32) cuts ~3.7
    /// times per query with ~36 new keys each (~133 per query; the first window's 96 keys
    /// are the costliest cut): ~15% of the forward's samples. A layer as a max and a masked
    /// min (two operations instead of a min, a max and a blend) measured the same (three
    /// interleaved runs) and was not kept.
    #[test]
    #[ignore]
    fn merge_timing() {
        let mut next = lcg(9);
        let k = 32;
        let pool: Vec<u64> = (0..1 << 16).map(|_| next()).collect();
        for v in crate::simd::available_vectors() {
            for extra in [4usize, 16, 32, 96] {
                let mut buf = vec![0u64; (k + extra).max(merge_slots(k))];
                let mut best = f64::INFINITY;
                for _ in 0..5 {
                    let t0 = std::time::Instant::now();
                    let mut s = 0;
                    let mut at = 0;
                    for _ in 0..20_000 {
                        // Random new keys (the networks' work does not depend on them).
                        buf[s..s + extra].copy_from_slice(&pool[at..at + extra]);
                        at = (at + extra) % (pool.len() - extra);
                        s = merge_on(v, &mut buf, s, s + extra, k);
                    }
                    std::hint::black_box(&buf);
                    best = best.min(t0.elapsed().as_secs_f64() * 1e9 / 20_000.0);
                }
                println!("{}: {extra} new keys into {k}: {best:.1} ns", v.name());
            }
        }
    }
}
