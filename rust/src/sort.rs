//! Stable argsort of codes along the last axis (rows independent).
//!
//! Algorithm: MSD radix sort of items that carry the key and the original index, so the
//! result is stable whatever the leaf sort does. An item is one u64 `key_field << idx_bits |
//! idx` when the keys' varying bits (`varying_bits`: the OR of `k ^ k[0]`) fit beside the
//! index (every u32 row; u64 rows of narrow codes), else a `[key, idx]` pair. Each pass
//! skips digits that all its items share and picks its width so that the passes still to
//! come leave about one item per bucket (at most 10 bits out of cache, 11 in cache); after
//! the last pass one branchless bubble sweep plus an insertion sort finish the short
//! buckets. Long rows: the first pass counts and scatters in parallel (per-chunk
//! histograms, disjoint destination ranges), then the top-level buckets are sorted in
//! parallel, each in a warm per-thread buffer, and their indices written out right away.
//! Many rows: rows in parallel. Rows of <= 32 keys: insertion sort.
//!
//! PERFORMANCE NOTES (2 vCPU AMD EPYC VM, heavily shared while tuned: numbers are the best
//! process CPU time of 15-40 calls, 1 thread, 1M random keys unless said; wall time was
//! 1.5-2x that under the load)
//! - Baseline (std stable sort of u32 indices by key): u64 74.6 ms, u32 49.1 ms, 1024 rows x
//!   1024 u64 28.7 ms. numpy.argsort on the same machine: u64 63 ms, u32 49 ms CPU.
//! - First MSD version (11-bit digits, insertion-sort leaves of ~4 items, fresh buffers):
//!   57-65 ms. Fresh memory is the problem here: every first touch of a 4 KiB page faults
//!   (2-6 us each on this VM) and a reused heap block is memset by calloc. Buffers now come
//!   from a cache (`Scratch`): the first pass went from 44 ms to 10-16 ms.
//! - 11-bit digits on a pass over 1M items: 5.2-8.7 ms per count+scatter vs 2.2-3.8 ms at
//!   8-10 bits (2048 destination pages at once overflow the second-level TLB); software
//!   write-combining buffers (with or without non-temporal stores) 4.8-5.5 ms. So: 10 bits
//!   when the pass is over more than 64K words, 11 in cache.
//! - Leaves: ~4 items per bucket + insertion sort mispredicts ~14 cycles per item. Digits
//!   for ~1 item per bucket, then one branchless bubble sweep (fixes all pairs) and an
//!   insertion sort that rarely mispredicts: 17 -> 11-12 ms; 1024-rows 9 -> 6.5 ms.
//! - Passes split evenly (ceil(l / passes) bits, not max bits then a tiny pass): 32768-key
//!   rows 18 -> 13 ms (per-bucket call overhead).
//! - Sorting each top-level bucket into a warm per-thread buffer and writing its indices
//!   at once (rather than ping-ponging with the cold row-sized buffer and a final pass):
//!   15 -> 11 ms.
//! - Tried, no gain: scattering packed items straight into `out` (no scratch): same for
//!   1M, slower for mid-size rows (scatter into cold memory); truncating wide keys to the
//!   bits that fit beside the index (8-byte items instead of 16) and re-sorting ties by the
//!   full key: 11.6 vs 11.3 ms, worse for 1024-rows (the work is latency- and
//!   mispredict-bound, not bandwidth-bound).
//! - Now (1 thread, CPU): u64 11.2-11.5 ms (5.5x numpy.argsort), u32 9.9-11 ms, 1024 x 1024
//!   u64 6.5-7.3 ms, 16384 x 64 7.2 ms. See benches/bench_sort_search.py for wall times.
//! - Peer crates (2026-11-30, a scratch program, not kept: 1M random 63-bit keys, best of 15,
//!   2 threads, wall time; each result checked equal to this sort's): this sort 4.1 ms;
//!   `rdst` 0.20 `radix_sort_unstable` on `key << 32 | index` as u128 16.9 ms, on a
//!   (key, index) struct with 12 byte levels 44.9 ms; `voracious_radix_sort` 1.2 on the u128
//!   items 7.1 ms (`voracious_mt_sort(2)`), 12.6 ms on one thread. numpy.argsort (AVX-512
//!   x86-simd-sort on this VM) 14.9 ms.
use crate::morton::Code;
use rayon::prelude::*;
use std::ops::Range;

/// Rows this short are sorted by insertion sort straight from the keys.
const SMALL_ROW: usize = 32;
/// Buckets this short are finished by insertion sort.
const LEAF: usize = 24;
/// Widest radix digit for passes over data that fits in cache.
const MAX_DIGIT_BITS: u32 = 11;
/// Widest radix digit for passes over more than `BIG_PASS_WORDS` words: 2048 buckets
/// means 2048 pages written at once, more than the second-level TLB holds.
const BIG_DIGIT_BITS: u32 = 10;
const BIG_PASS_WORDS: usize = 1 << 16;
/// Buckets (and rows) at least this long count and scatter in parallel.
const PAR_LEN: usize = 1 << 16;

/// An item being sorted: the key bits (compared as an unsigned word) plus the original index.
///
/// `Packed` items are one u64 `key_field << idx_bits | idx`, so equal keys compare by index;
/// pair items are `[key, idx]`. Either way the radix passes only look at `bits()`.
pub(crate) trait Item: Copy + Send + Sync + 'static {
    /// u64 words per item.
    const WORDS: usize;
    /// The word holding the sort key.
    fn bits(self) -> u64;
    /// Views `WORDS * n` words as `n` items.
    fn from_words(w: &mut [u64]) -> &mut [Self];
    /// `if c { a } else { b }` without a branch.
    fn select(c: bool, a: Self, b: Self) -> Self;
}
impl Item for u64 {
    const WORDS: usize = 1;
    #[inline(always)]
    fn bits(self) -> u64 {
        self
    }
    fn from_words(w: &mut [u64]) -> &mut [u64] {
        w
    }
    #[inline(always)]
    fn select(c: bool, a: u64, b: u64) -> u64 {
        let m = (c as u64).wrapping_neg();
        b ^ ((a ^ b) & m)
    }
}
impl Item for [u64; 2] {
    const WORDS: usize = 2;
    #[inline(always)]
    fn bits(self) -> u64 {
        self[0]
    }
    fn from_words(w: &mut [u64]) -> &mut [[u64; 2]] {
        let n = w.len() / 2;
        // SAFETY: [u64; 2] has the size of two u64 and the same alignment, every bit pattern
        // is valid, and the new slice covers the first 2n words of `w`, which it borrows.
        unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<[u64; 2]>(), n) }
    }
    #[inline(always)]
    fn select(c: bool, a: [u64; 2], b: [u64; 2]) -> [u64; 2] {
        let m = (c as u64).wrapping_neg();
        [b[0] ^ ((a[0] ^ b[0]) & m), b[1] ^ ((a[1] ^ b[1]) & m)]
    }
}

/// Scratch buffers, reused across calls.
///
/// Fresh memory is expensive here: each first touch of a 4 KiB page is a page fault (2-6 us
/// on the VM this was tuned on, i.e. more than sorting the page's items), and glibc's
/// calloc of a reused heap block memsets it. So buffers go back to a cache when dropped:
/// per thread for small rows, process-wide (capped) for large ones.
mod scratch {
    use std::cell::Cell;
    use std::sync::Mutex;

    /// Buffers up to this many words (2 MiB) live in the thread-local cache.
    const LOCAL_WORDS: usize = 1 << 18;
    /// Buffers kept per thread.
    const LOCAL_COUNT: usize = 4;
    /// The process-wide cache keeps at most this many words (256 MiB).
    const GLOBAL_WORDS: usize = 1 << 25;

    thread_local! {
        static LOCAL: Cell<Vec<Vec<u64>>> = const { Cell::new(Vec::new()) };
    }
    static GLOBAL: Mutex<Vec<Vec<u64>>> = Mutex::new(Vec::new());

    /// A buffer of u64 words that goes back to a cache on drop.
    pub(crate) struct Scratch(Vec<u64>);

    /// Takes the smallest buffer of at least `words` from `list`, else its largest.
    fn pick(list: &mut Vec<Vec<u64>>, words: usize) -> Vec<u64> {
        let fit = (0..list.len())
            .filter(|&i| list[i].len() >= words)
            .min_by_key(|&i| list[i].len());
        let i = fit.or_else(|| (0..list.len()).max_by_key(|&i| list[i].len()));
        i.map(|i| list.swap_remove(i)).unwrap_or_default()
    }

    impl Scratch {
        /// A buffer with room for at least `words` (more is allocated on demand).
        pub(crate) fn new(words: usize) -> Scratch {
            let v = if words <= LOCAL_WORDS {
                LOCAL.with(|c| {
                    // Take the list out of the cell while choosing: a nested call cannot
                    // observe it half-updated, it just finds fewer buffers.
                    let mut list = c.take();
                    let v = pick(&mut list, words);
                    c.set(list);
                    v
                })
            } else {
                // try_lock: after a fork the lock may be held by a thread that no longer
                // exists in this process; then allocate.
                match GLOBAL.try_lock() {
                    Ok(mut g) => pick(&mut g, words),
                    Err(_) => Vec::new(),
                }
            };
            let mut s = Scratch(v);
            s.words(words);
            s
        }

        /// The first `words` words, growing the buffer if needed.
        pub(crate) fn words(&mut self, words: usize) -> &mut [u64] {
            if self.0.len() < words {
                if self.0.capacity() < words {
                    // Fresh memory rather than copying the old contents; out of memory
                    // unwinds to the entry point (MemoryError), never aborts.
                    self.0 = crate::error::vec_or_unwind(0u64, words, "sort scratch");
                } else {
                    self.0.resize(words, 0);
                }
            }
            &mut self.0[..words]
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let v = std::mem::take(&mut self.0);
            if v.is_empty() {
                return;
            }
            if v.len() <= LOCAL_WORDS {
                LOCAL.with(|c| {
                    let mut list = c.take();
                    list.push(v);
                    if list.len() > LOCAL_COUNT {
                        let i = (0..list.len()).min_by_key(|&i| list[i].len()).unwrap_or(0);
                        list.swap_remove(i);
                    }
                    c.set(list);
                });
                return;
            }
            if v.len() > GLOBAL_WORDS {
                return;
            }
            if let Ok(mut g) = GLOBAL.try_lock() {
                g.push(v);
                // Keep the cache under its cap, dropping the smallest buffers first.
                g.sort_by_key(|v| std::cmp::Reverse(v.len()));
                let mut total = 0usize;
                g.retain(|v| {
                    total += v.len();
                    total <= GLOBAL_WORDS
                });
            }
        }
    }

    /// Frees the cached scratch buffers: the process-wide cache and this thread's.
    pub fn release() {
        if let Ok(mut g) = GLOBAL.try_lock() {
            g.clear();
        }
        LOCAL.with(|c| drop(c.take()));
    }
}
pub use scratch::release as release_scratch;
use scratch::Scratch;

/// How keys and indices are stored in items.
pub(crate) trait Codec: Sync {
    type It: Item;
    fn make(&self, key: u64, idx: usize) -> Self::It;
    fn idx(&self, it: Self::It) -> usize;
    fn key(&self, it: Self::It) -> u64;
}

/// Keys whose varying bits `[low, low+span)` fit beside the index in one u64.
pub(crate) struct Packed {
    idx_bits: u32,
    low: u32,
    field_mask: u64,
    /// The key bits outside the varying span (the same in every key).
    base: u64,
}
impl Codec for Packed {
    type It = u64;
    #[inline(always)]
    fn make(&self, key: u64, idx: usize) -> u64 {
        (((key >> self.low) & self.field_mask) << self.idx_bits) | idx as u64
    }
    #[inline(always)]
    fn idx(&self, it: u64) -> usize {
        (it & ((1u64 << self.idx_bits) - 1)) as usize
    }
    #[inline(always)]
    fn key(&self, it: u64) -> u64 {
        self.base | ((it >> self.idx_bits) << self.low)
    }
}

/// `[key, idx]` items, for keys too wide to pack.
pub(crate) struct Pairs;
impl Codec for Pairs {
    type It = [u64; 2];
    #[inline(always)]
    fn make(&self, key: u64, idx: usize) -> [u64; 2] {
        [key, idx as u64]
    }
    #[inline(always)]
    fn idx(&self, it: [u64; 2]) -> usize {
        it[1] as usize
    }
    #[inline(always)]
    fn key(&self, it: [u64; 2]) -> u64 {
        it[0]
    }
}

/// What happens to a run of sorted items: they go to their place in the home buffer or the
/// output.
pub(crate) trait Finish<It>: Sync {
    /// Per-position output beside the home buffer (`()` when there is none).
    type Out: Send;
    fn finish(&self, sorted: &[It], home: &mut [It], out: &mut [Self::Out]);
    /// `finish` for items sorted in `home` itself.
    fn finish_in_place(&self, home: &mut [It], out: &mut [Self::Out]);
}

/// Writes the original indices into the output (the argsort).
struct IdxOut<'a, C>(&'a C);
impl<C: Codec> Finish<C::It> for IdxOut<'_, C> {
    type Out = i64;
    #[inline]
    fn finish(&self, sorted: &[C::It], _: &mut [C::It], out: &mut [i64]) {
        for (o, &it) in out.iter_mut().zip(sorted) {
            *o = self.0.idx(it) as i64;
        }
    }
    fn finish_in_place(&self, home: &mut [C::It], out: &mut [i64]) {
        for (o, &it) in out.iter_mut().zip(home.iter()) {
            *o = self.0.idx(it) as i64;
        }
    }
}

/// Copies the sorted items into the home buffer.
struct Keep;
impl<It: Item> Finish<It> for Keep {
    type Out = ();
    #[inline]
    fn finish(&self, sorted: &[It], home: &mut [It], _: &mut [()]) {
        home.copy_from_slice(sorted);
    }
    fn finish_in_place(&self, _: &mut [It], _: &mut [()]) {}
}

/// A raw pointer that rayon tasks may share; every use writes disjoint positions.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: the pointer is only used to write disjoint positions of one live buffer from
// different tasks (argued at each use); `T: Send` values may move between threads.
unsafe impl<T: Send> Send for SyncPtr<T> {}
// SAFETY: as above; no two tasks touch the same element.
unsafe impl<T: Send> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// A method, so closures capture the whole (Sync) wrapper and not the raw field.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Items read during a pass: already-built items, or keys turned into items on the fly.
trait Source<It>: Sync {
    fn len(&self) -> usize;
    fn first(&self) -> It;
    fn for_each(&self, r: Range<usize>, f: impl FnMut(It));
}
struct SliceSrc<'a, It>(&'a [It]);
impl<It: Item> Source<It> for SliceSrc<'_, It> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn first(&self) -> It {
        self.0[0]
    }
    #[inline(always)]
    fn for_each(&self, r: Range<usize>, f: impl FnMut(It)) {
        self.0[r].iter().copied().for_each(f)
    }
}
struct KeySrc<'a, K, C> {
    keys: &'a [K],
    c: &'a C,
}
impl<K: Code, C: Codec> Source<C::It> for KeySrc<'_, K, C> {
    fn len(&self) -> usize {
        self.keys.len()
    }
    fn first(&self) -> C::It {
        self.c.make(self.keys[0].to_u64(), 0)
    }
    #[inline(always)]
    fn for_each(&self, r: Range<usize>, mut f: impl FnMut(C::It)) {
        let s = r.start;
        for (i, k) in self.keys[r].iter().enumerate() {
            f(self.c.make(k.to_u64(), s + i));
        }
    }
}

#[inline(always)]
fn range_mask(lo: u32, hi: u32) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    (u64::MAX >> (64 - (hi - lo))) << lo
}

/// Digit width for a pass over `n` items of `words` words with `avail` key bits left.
///
/// Aims at about one item per bucket after the passes still to come, split evenly: `l`
/// bits take `ceil(l / max)` passes of at most `max` bits each.
#[inline]
fn digit_bits(n: usize, words: usize, avail: u32) -> u32 {
    let max = if n * words > BIG_PASS_WORDS {
        BIG_DIGIT_BITS
    } else {
        MAX_DIGIT_BITS
    };
    let l = (usize::BITS - (n - 1).leading_zeros()).max(1);
    let passes = l.div_ceil(max);
    l.div_ceil(passes).min(avail)
}

/// Stable insertion sort by `bits()`.
#[inline]
fn insertion_sort<It: Item>(v: &mut [It]) {
    for i in 1..v.len() {
        let x = v[i];
        let mut j = i;
        while j > 0 && v[j - 1].bits() > x.bits() {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
}

/// One branchless bubble-sort sweep (stable: only strictly greater items move right).
///
/// After a radix pass with about one item per bucket, most buckets hold 0-2 items and a
/// single sweep sorts them; the insertion sort that follows then rarely mispredicts.
#[inline]
fn bubble_sweep<It: Item>(v: &mut [It]) {
    let Some(&first) = v.first() else {
        return;
    };
    let mut carry = first;
    for i in 1..v.len() {
        let x = v[i];
        let gt = carry.bits() > x.bits();
        v[i - 1] = It::select(gt, x, carry);
        carry = It::select(gt, carry, x);
    }
    let last = v.len() - 1;
    v[last] = carry;
}

/// Adds the digit counts of `src[r]` to `hist`; returns the OR of `bits ^ first`.
#[inline(always)]
fn count<It: Item, S: Source<It>>(
    src: &S,
    r: Range<usize>,
    first: u64,
    shift: u32,
    mask: u64,
    hist: &mut [usize],
) -> u64 {
    assert!((mask as usize) < hist.len());
    let mut diff = 0u64;
    src.for_each(r, |x| {
        let b = x.bits();
        diff |= b ^ first;
        let d = ((b >> shift) & mask) as usize;
        // SAFETY: d <= mask < hist.len() (asserted above).
        unsafe { *hist.get_unchecked_mut(d) += 1 };
    });
    diff
}

/// Scatters `src[r]` by digit: an item with digit d goes to `dst[pos[d]]`, then `pos[d] += 1`.
///
/// # Safety
/// `mask < pos.len()`, and for each digit d the positions `pos[d]..pos[d] + (count of d in
/// src[r])` are in bounds of `dst` and written by nobody else meanwhile.
#[inline(always)]
unsafe fn scatter<It: Item, S: Source<It>>(
    src: &S,
    r: Range<usize>,
    dst: *mut It,
    shift: u32,
    mask: u64,
    pos: &mut [usize],
) {
    src.for_each(r, |x| {
        let d = ((x.bits() >> shift) & mask) as usize;
        // SAFETY: d <= mask < pos.len(); pos[d] is in bounds of dst and ours (caller's
        // contract).
        unsafe {
            let p = pos.get_unchecked_mut(d);
            dst.add(*p).write(x);
            *p += 1;
        }
    });
}

/// Outcome of one counting-and-scatter pass.
enum Pass {
    /// All keys equal within the bucket: the items are already in index order.
    Equal,
    /// Scattered into `dst`; `ends[d]` is the end of digit d's bucket; children sort
    /// key bits `lo..shift`.
    Split {
        ends: Vec<usize>,
        lo: u32,
        shift: u32,
    },
}

/// Finds a digit that splits `src` (skipping digits all items share), counts it, and
/// scatters `src` into `dst` stably by that digit. Key bits above `hi` are equal in `src`.
fn pass<It: Item, S: Source<It>>(src: &S, dst: &mut [It], mut lo: u32, mut hi: u32) -> Pass {
    let n = src.len();
    debug_assert_eq!(dst.len(), n);
    let first = src.first().bits();
    let par = n >= PAR_LEN && rayon::current_num_threads() > 1;
    let chunks = if par {
        (rayon::current_num_threads() * 4)
            .min(n / (PAR_LEN / 8))
            .max(2)
    } else {
        1
    };
    let chunk = n.div_ceil(chunks);
    loop {
        let w = digit_bits(n, It::WORDS, hi - lo);
        let shift = hi - w;
        let nb = 1usize << w;
        let mask = (nb - 1) as u64;
        let (hists, diff): (Vec<Vec<usize>>, u64) = if par {
            let parts: Vec<(Vec<usize>, u64)> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    let r = (c * chunk).min(n)..((c + 1) * chunk).min(n);
                    let mut h = vec![0usize; nb];
                    let d = count(src, r, first, shift, mask, &mut h);
                    (h, d)
                })
                .collect();
            let diff = parts.iter().fold(0, |a, p| a | p.1);
            (parts.into_iter().map(|p| p.0).collect(), diff)
        } else {
            let mut h = vec![0usize; nb];
            let d = count(src, 0..n, first, shift, mask, &mut h);
            (vec![h], d)
        };
        let diff = diff & range_mask(lo, hi);
        if diff == 0 {
            return Pass::Equal;
        }
        let top = 64 - diff.leading_zeros();
        lo = lo.max(diff.trailing_zeros());
        if top <= shift {
            // This digit is the same for every item: skip straight to the varying bits.
            hi = top;
            continue;
        }
        // Per-chunk start positions, bucket-major so chunk order (index order) is kept.
        let mut starts = hists;
        let mut ends = vec![0usize; nb];
        let mut run = 0usize;
        for (d, end) in ends.iter_mut().enumerate() {
            for h in starts.iter_mut() {
                let c = h[d];
                h[d] = run;
                run += c;
            }
            *end = run;
        }
        let out = SyncPtr(dst.as_mut_ptr());
        if par {
            starts.into_par_iter().enumerate().for_each(|(c, mut pos)| {
                let r = (c * chunk).min(n)..((c + 1) * chunk).min(n);
                // SAFETY: chunk c's items of digit d go to [pos[d], pos[d] + count), ranges
                // that partition 0..n over (d, c); no other task writes them, and `dst`
                // outlives this parallel loop.
                unsafe { scatter(src, r, out.get(), shift, mask, &mut pos) };
            });
        } else {
            // SAFETY: as above with a single chunk: bucket ranges partition 0..n = dst.
            unsafe { scatter(src, 0..n, out.get(), shift, mask, &mut starts[0]) };
        }
        return Pass::Split { ends, lo, shift };
    }
}

/// Splits `v` into consecutive pieces of the bucket lengths given by `ends` (prefix ends),
/// skipping empty buckets.
fn split_buckets<'a, T>(mut v: &'a mut [T], ends: &[usize]) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(ends.len());
    let mut start = 0usize;
    for &end in ends {
        let len = end - start;
        start = end;
        if len > 0 {
            let (b, rest) = std::mem::take(&mut v).split_at_mut(len);
            v = rest;
            parts.push(b);
        }
    }
    parts
}

/// Counts and scatters `src` into `dst` by one digit (in one thread): `None` if all keys
/// are equal (then `dst` is untouched), else `Some((lo, shift))` with the bucket ends in
/// `hist` (cleared if no bucket is longer than `LEAF`). The digit is wide enough for about
/// one item per bucket after the passes still to come (`digit_bits`).
fn small_pass<It: Item, S: Source<It>>(
    src: &S,
    dst: &mut [It],
    mut lo: u32,
    mut hi: u32,
    hist: &mut Vec<usize>,
) -> Option<(u32, u32)> {
    let n = src.len();
    let first = src.first().bits();
    loop {
        let w = digit_bits(n, It::WORDS, hi - lo);
        let shift = hi - w;
        let nb = 1usize << w;
        let mask = (nb - 1) as u64;
        hist.clear();
        hist.resize(nb, 0);
        let diff = count(src, 0..n, first, shift, mask, hist) & range_mask(lo, hi);
        if diff == 0 {
            return None;
        }
        let top = 64 - diff.leading_zeros();
        lo = lo.max(diff.trailing_zeros());
        if top <= shift {
            hi = top;
            continue;
        }
        let mut run = 0usize;
        let mut max = 0usize;
        for h in hist.iter_mut() {
            let c = *h;
            *h = run;
            run += c;
            max = max.max(c);
        }
        // SAFETY: the bucket ranges [start[d], start[d] + count[d]) partition 0..n = dst.
        unsafe { scatter(src, 0..n, dst.as_mut_ptr(), shift, mask, hist) };
        if max <= LEAF {
            // No bucket needs a recursive pass: tell `small_finish` so.
            hist.clear();
        }
        return Some((lo, shift));
    }
}

/// Finishes sorting `dst` after `small_pass` (bucket ends `ends`, empty when no bucket is
/// longer than `LEAF`; key bits `lo..hi` left): long buckets are sorted recursively (with
/// `spare`, same length, as scratch), then a bubble sweep and an insertion sort finish the
/// short buckets.
fn small_finish<It: Item>(dst: &mut [It], spare: &mut [It], ends: &[usize], lo: u32, hi: u32) {
    let mut start = 0usize;
    if lo < hi {
        let mut hist = Vec::new();
        for &end in ends {
            if end - start > LEAF {
                let (d, s) = (&mut dst[start..end], &mut spare[start..end]);
                if let Some((lo2, hi2)) = small_pass(&SliceSrc(&*d), s, lo, hi, &mut hist) {
                    let ends2 = std::mem::take(&mut hist);
                    small_finish(s, d, &ends2, lo2, hi2);
                    d.copy_from_slice(s);
                    hist = ends2;
                }
            }
            start = end;
        }
    }
    bubble_sweep(dst);
    insertion_sort(dst);
}

/// Sorts the items of `src` into `dst` (key bits `lo..hi` may differ, bits above `hi` are
/// equal); `src` is clobbered. Parallel for long runs.
fn sort_into<It: Item>(src: &mut [It], dst: &mut [It], lo: u32, hi: u32) {
    let n = src.len();
    if n <= LEAF || lo >= hi {
        insertion_sort(src);
        dst.copy_from_slice(src);
        return;
    }
    if n < PAR_LEN {
        let mut hist = Vec::new();
        match small_pass(&SliceSrc(&*src), dst, lo, hi, &mut hist) {
            None => dst.copy_from_slice(src),
            Some((lo, shift)) => small_finish(dst, src, &hist, lo, shift),
        }
        return;
    }
    match pass(&SliceSrc(&*src), dst, lo, hi) {
        Pass::Equal => dst.copy_from_slice(src),
        Pass::Split { ends, lo, shift } => {
            let a = split_buckets(dst, &ends);
            let b = split_buckets(src, &ends);
            a.into_par_iter()
                .zip(b)
                .with_max_len(16)
                .for_each(|(d, s)| {
                    sort_into(d, s, lo, shift);
                    d.copy_from_slice(s);
                });
        }
    }
}

/// Sorts the row `keys` into items with codec `c` and hands them to `fin` with `home`
/// (`keys.len()` items, also scratch) and `out` (as long).
fn sort_keys<K: Code, C: Codec, F: Finish<C::It>>(
    keys: &[K],
    c: &C,
    lo: u32,
    hi: u32,
    home: &mut [C::It],
    out: &mut [F::Out],
    fin: &F,
) {
    let n = keys.len();
    let src = KeySrc { keys, c };
    if n < PAR_LEN {
        let mut hist = Vec::new();
        let Some((lo, shift)) = small_pass(&src, home, lo, hi, &mut hist) else {
            // Unreachable for a row with varying keys; index order is right all the same.
            let mut i = 0;
            src.for_each(0..n, |x| {
                home[i] = x;
                i += 1;
            });
            return fin.finish_in_place(home, out);
        };
        if hist.is_empty() {
            // About one item per bucket: two sweeps finish the row.
            bubble_sweep(home);
            insertion_sort(home);
            return fin.finish_in_place(home, out);
        }
        let mut ts = Scratch::new(0);
        let homes = split_buckets(home, &hist);
        let outs = split_buckets(out, &hist);
        for (h, o) in homes.into_iter().zip(outs) {
            let words = h.len() * C::It::WORDS;
            let tmp = C::It::from_words(ts.words(words));
            sort_into(h, tmp, lo, shift);
            fin.finish(tmp, h, o);
        }
        return;
    }
    match pass(&src, home, lo, hi) {
        Pass::Equal => {
            // Unreachable for a row with varying keys; index order is right all the same.
            let mut v = crate::error::vec_or_unwind(src.first(), n, "sort scratch");
            let mut i = 0;
            src.for_each(0..n, |x| {
                v[i] = x;
                i += 1;
            });
            fin.finish(&v, home, out);
        }
        Pass::Split { ends, lo, shift } => {
            let homes = split_buckets(home, &ends);
            let outs = split_buckets(out, &ends);
            homes
                .into_par_iter()
                .zip(outs)
                .with_max_len(16)
                .for_each_init(
                    || Scratch::new(0),
                    |ts, (h, o)| {
                        let words = h.len() * C::It::WORDS;
                        let tmp = C::It::from_words(ts.words(words));
                        sort_into(h, tmp, lo, shift);
                        fin.finish(tmp, h, o);
                    },
                );
        }
    }
}

/// OR of `k ^ keys[0]` over the row (the bits that vary), in parallel for long rows.
fn varying_bits<K: Code>(keys: &[K]) -> u64 {
    let first = keys[0].to_u64();
    let f = |s: &[K]| s.iter().fold(0u64, |a, k| a | (k.to_u64() ^ first));
    if keys.len() >= PAR_LEN && rayon::current_num_threads() > 1 {
        keys.par_chunks(PAR_LEN / 4)
            .map(f)
            .reduce(|| 0, |a, b| a | b)
    } else {
        f(keys)
    }
}

/// Called back with the item layout chosen for a row, and the key bits to sort.
pub(crate) trait WithCodec {
    type R;
    fn packed(self, c: &Packed, lo: u32, hi: u32) -> Self::R;
    fn pairs(self, lo: u32, hi: u32) -> Self::R;
}

/// Picks the item layout for `n` keys (`n >= 2`) whose bits `diff` vary (`diff != 0`).
fn with_codec<W: WithCodec>(n: usize, first: u64, diff: u64, w: W) -> W::R {
    let low = diff.trailing_zeros();
    let high = 64 - diff.leading_zeros();
    let span = high - low;
    let idx_bits = usize::BITS - (n - 1).leading_zeros();
    if span + idx_bits <= 64 && idx_bits >= 1 {
        let field_mask = u64::MAX >> (64 - span);
        let c = Packed {
            idx_bits,
            low,
            field_mask,
            base: first & !(field_mask << low),
        };
        w.packed(&c, idx_bits, idx_bits + span)
    } else {
        w.pairs(low, high)
    }
}

/// Stable argsort of one short row by insertion sort.
fn small_argsort<K: Code>(keys: &[K], out: &mut [i64]) {
    let mut buf = [[0u64; 2]; SMALL_ROW];
    let v = &mut buf[..keys.len()];
    for (i, (x, k)) in v.iter_mut().zip(keys).enumerate() {
        *x = [k.to_u64(), i as u64];
    }
    insertion_sort(v);
    for (o, x) in out.iter_mut().zip(v.iter()) {
        *o = x[1] as i64;
    }
}

fn argsort_row<K: Code>(keys: &[K], out: &mut [i64]) {
    let n = keys.len();
    if n <= SMALL_ROW {
        return small_argsort(keys, out);
    }
    let diff = varying_bits(keys);
    if diff == 0 {
        for (i, o) in out.iter_mut().enumerate() {
            *o = i as i64;
        }
        return;
    }
    struct W<'a, K>(&'a [K], &'a mut [i64]);
    impl<K: Code> WithCodec for W<'_, K> {
        type R = ();
        fn packed(self, c: &Packed, lo: u32, hi: u32) {
            let (keys, out) = (self.0, self.1);
            // A scratch home (warm, reused) rather than `out` itself: the first pass scatters
            // into the home, and scattering into the cold output was slower.
            let words = keys.len();
            let mut a = Scratch::new(words);
            let home = u64::from_words(a.words(words));
            sort_keys(keys, c, lo, hi, home, out, &IdxOut(c));
        }
        fn pairs(self, lo: u32, hi: u32) {
            let (keys, out) = (self.0, self.1);
            let n = keys.len();
            let words = 2 * n;
            let mut a = Scratch::new(words);
            let home = <[u64; 2]>::from_words(a.words(words));
            sort_keys(keys, &Pairs, lo, hi, home, out, &IdxOut(&Pairs));
        }
    }
    with_codec(n, keys[0].to_u64(), diff, W(keys, out));
}

/// Called back with a sorted row: the codec and the items (each holds its key and its
/// original index), in stable order.
pub(crate) trait SortedVisitor {
    type R;
    fn visit<C: Codec>(self, c: &C, items: &[C::It]) -> Self::R;
}

/// Sorts one row of keys into items and calls `v` with them.
pub(crate) fn sort_items<K: Code, V: SortedVisitor>(keys: &[K], v: V) -> V::R {
    let n = keys.len();
    let diff = if n == 0 { 0 } else { varying_bits(keys) };
    if n <= SMALL_ROW || diff == 0 {
        let mut items = crate::error::vec_or_unwind([0u64; 2], n, "sort items");
        for (i, (x, k)) in items.iter_mut().zip(keys).enumerate() {
            *x = [k.to_u64(), i as u64];
        }
        if n <= SMALL_ROW {
            insertion_sort(&mut items);
        }
        return v.visit(&Pairs, &items);
    }
    fn run<K: Code, C: Codec, V: SortedVisitor>(keys: &[K], c: &C, lo: u32, hi: u32, v: V) -> V::R {
        let words = keys.len() * C::It::WORDS;
        let mut s = Scratch::new(words);
        let items = C::It::from_words(s.words(words));
        let mut units = vec![(); keys.len()];
        sort_keys(keys, c, lo, hi, items, &mut units, &Keep);
        v.visit(c, items)
    }
    struct W<'a, K, V>(&'a [K], V);
    impl<K: Code, V: SortedVisitor> WithCodec for W<'_, K, V> {
        type R = V::R;
        fn packed(self, c: &Packed, lo: u32, hi: u32) -> V::R {
            run(self.0, c, lo, hi, self.1)
        }
        fn pairs(self, lo: u32, hi: u32) -> V::R {
            run(self.0, &Pairs, lo, hi, self.1)
        }
    }
    with_codec(n, keys[0].to_u64(), diff, W(keys, v))
}

/// Stable argsort of each row of `keys` (rows of `row_len`), writing int64 indices into `out`.
pub fn argsort_rows<K: Code>(keys: &[K], row_len: usize, out: &mut [i64]) {
    if row_len == 0 {
        return;
    }
    assert_eq!(
        keys.len(),
        out.len(),
        "argsort_rows: keys and out lengths differ"
    );
    let min_rows = (4096 / row_len).max(1);
    out.par_chunks_mut(row_len)
        .zip(keys.par_chunks(row_len))
        .with_min_len(min_rows)
        .for_each(|(o, k)| argsort_row(k, o));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small xorshift generator (no dev-dependencies).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn reference<K: Code>(keys: &[K], row_len: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(keys.len());
        for row in keys.chunks(row_len) {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by_key(|&i| row[i]);
            out.extend(idx.into_iter().map(|i| i as i64));
        }
        out
    }

    fn check<K: Code + std::fmt::Debug>(keys: &[K], row_len: usize) {
        let mut o = vec![-1i64; keys.len()];
        argsort_rows(keys, row_len, &mut o);
        assert_eq!(o, reference(keys, row_len), "row_len {row_len}");
    }

    /// Key generators: full-width random, few distinct values, narrow spans, shifted
    /// spans, sorted, reversed, constant.
    fn gen(rng: &mut Rng, n: usize, kind: usize, bits: u32) -> Vec<u64> {
        let top = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        (0..n as u64)
            .map(|i| match kind {
                0 => rng.next() & top,
                1 => (rng.next() % 7) * (top / 7),
                2 => (rng.next() % 1000) & top,
                3 => ((rng.next() & 0xfff) << (bits - 16)) & top,
                4 => i.min(top),
                5 => (top - i.min(top)) & top,
                6 => 42 & top,
                7 => (rng.next() & top) & 0xf0f0_f0f0_f0f0_f0f0,
                _ => (rng.next() % 3) & top | (top & !0xff),
            })
            .collect()
    }

    #[test]
    fn stable() {
        let k: Vec<u32> = vec![3, 1, 3, 0, 1];
        let mut o = vec![0i64; 5];
        argsort_rows(&k, 5, &mut o);
        assert_eq!(o, vec![3, 1, 4, 0, 2]);
    }

    #[test]
    fn empty_and_tiny() {
        let mut o: Vec<i64> = vec![];
        argsort_rows::<u64>(&[], 0, &mut o);
        argsort_rows::<u64>(&[], 5, &mut o);
        check::<u32>(&[7], 1);
        check::<u64>(&[9, 3, 9, 1], 1);
        check::<u64>(&[2, 1], 2);
    }

    #[test]
    fn many_sizes_u64_u32() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let sizes = [
            2, 3, 5, 16, 24, 25, 31, 32, 33, 40, 63, 64, 65, 100, 255, 256, 257, 1000, 1023, 1024,
            1025, 4096, 5000, 20_000, 65_535, 65_536, 70_000,
        ];
        for &n in &sizes {
            for kind in 0..9 {
                for bits in [17u32, 33, 64] {
                    let k = gen(&mut rng, n, kind, bits);
                    check(&k, n);
                }
                let k32: Vec<u32> = gen(&mut rng, n, kind, 32)
                    .into_iter()
                    .map(|x| x as u32)
                    .collect();
                check(&k32, n);
            }
        }
    }

    #[test]
    fn multi_row() {
        let mut rng = Rng(12345);
        for &(rows, len) in &[
            (1, 1000),
            (3, 7),
            (64, 33),
            (200, 100),
            (17, 3000),
            (1000, 1),
        ] {
            for kind in [0, 1, 2, 7] {
                let k = gen(&mut rng, rows * len, kind, 64);
                check(&k, len);
                let k32: Vec<u32> = gen(&mut rng, rows * len, kind, 32)
                    .into_iter()
                    .map(|x| x as u32)
                    .collect();
                check(&k32, len);
            }
        }
    }

    #[test]
    fn large_parallel_rows() {
        let mut rng = Rng(777);
        for kind in [0, 1, 2, 3, 7, 8] {
            let k = gen(&mut rng, 300_000, kind, 64);
            check(&k, 300_000);
            check(&k, 150_000);
            let k32: Vec<u32> = gen(&mut rng, 300_000, kind, 32)
                .into_iter()
                .map(|x| x as u32)
                .collect();
            check(&k32, 300_000);
        }
        // Skewed: most keys in one top-level bucket, so a child bucket is itself parallel.
        let k: Vec<u64> = (0..300_000u64)
            .map(|i| {
                if i % 10 == 0 {
                    rng.next()
                } else {
                    rng.next() >> 20
                }
            })
            .collect();
        check(&k, 300_000);
    }

    #[test]
    fn forced_single_thread_matches() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut rng = Rng(4242);
        let k = gen(&mut rng, 200_000, 0, 64);
        pool.install(|| check(&k, 200_000));
    }

    #[test]
    fn sort_items_roundtrip() {
        struct V;
        impl SortedVisitor for V {
            type R = Vec<(u64, usize)>;
            fn visit<C: Codec>(self, c: &C, items: &[C::It]) -> Self::R {
                items.iter().map(|&it| (c.key(it), c.idx(it))).collect()
            }
        }
        let mut rng = Rng(99);
        for &n in &[0usize, 1, 10, 33, 1000, 100_000] {
            for kind in [0, 1, 3, 6] {
                let k = gen(&mut rng, n, kind, 64);
                let got = sort_items(&k, V);
                let mut want: Vec<(u64, usize)> = k.iter().copied().zip(0..).collect();
                want.sort_by_key(|x| x.0);
                assert_eq!(got, want);
            }
        }
    }
}
