//! k-selection: the `topk` nearest candidates by (squared distance, position).
//!
//! [`TopK`] keeps the best k of a stream of candidates (the window search offers a few
//! hundred per query); [`select_topk`] does the same for a materialised list (the brute-force
//! oracle). Both order by (d2, position), so ties break by the smaller position.
use crate::quantize::Real;
use crate::simd::{KEYS_PAD, SCAN_BLOCK};
use num_traits::Float;

/// [`TopK::drain_sorted`] sorts all kept keys instead of selecting the best `k * mult`
/// first when there are at most this many more.
const SORT_ALL_SLACK: usize = 16;

/// Slots of [`TopK`]'s buffer past `cap`: the slot the next push writes, and a block of the
/// fused scan with its padding ([`TopK::push_rows3`]).
const ROWS3_ROOM: usize = 1 + SCAN_BLOCK + KEYS_PAD;

/// Top-k by (d2, position) of a stream of candidates.
///
/// Perf notes (N = 32k, H = 8, top-32, one thread; a query offers ~350 candidates): a
/// `BinaryHeap` of the best k spent 31% of the time in `push` (about k*ln(M/k) of M
/// candidates are accepted, each a pop + push); appending every candidate and one select at
/// the end was no faster than filtering. Now each candidate is one integer key (see
/// [`Real::key`]: a float compare plus a position tie-break made the selects and sorts a
/// quarter of the forward), written to the buffer and kept by a branchless compare with the
/// k-th best known so far (an unpredictable accept/reject branch cost more than the store).
/// When `cap` keys are kept the buffer is cut back to the best k, which sets the threshold.
///
/// The cut: where the CPU has AVX2 or AVX-512F and `k * mult <= 64` the best keys stay
/// ascending in `buf[..sorted]` and a cut merges the new ones in with sorting networks
/// ([`crate::sortnet::merge_sorted`]: ~30 comparator layers per 16 new keys with AVX-512);
/// otherwise a select (`select_nth_unstable`, 85-215 ns over 40-128 u64 keys). The AVX-512
/// merge made the grouped exact search 26% faster per query (1.80 -> 1.33 us, N = 64k,
/// top-32) and `zeta.attention` at N = 32k 20% faster (322-332 -> 261-268 ms); the AVX2
/// merge (`ZETA_SIMD=avx2` on the same CPU) 1.80 -> 1.66-1.68 us (the 1-curve window-32
/// search: 1.20-1.24 us with either cut). Selecting the new keys' best k before merging
/// when there are more than 32 / 48 / 64 of them was slower on both paths.
pub struct TopK<T: Real> {
    k: usize,
    mult: usize,
    /// Keys are cut back to the best k when this many are kept.
    cap: usize,
    /// `cap + 1` slots; `buf[..n]` are kept (the slot at `n` takes the next offer).
    buf: Vec<T::Key>,
    n: usize,
    /// Keys >= this are rejected: k better distinct items are known.
    thresh: T::Key,
    /// Cuts merge the new keys into the best ones kept ascending in `buf[..sorted]` with
    /// [`Real::merge_sorted`] (the vector merge of `sortnet.rs`) instead of a select.
    merge: bool,
    sorted: usize,
}

impl<T: Float + Real> TopK<T> {
    /// `mult`: how many times one position may be offered at most (several curves, sinks);
    /// 1 when positions never repeat.
    pub fn new(k: usize, mult: usize) -> Self {
        let k = k.max(1);
        let merge = T::merge_fast(k.saturating_mul(mult.max(1)));
        Self::with_merge(k, mult, merge)
    }

    /// [`TopK::new`], with the vector merge (`merge`, where [`Real::merge_fast`]) or the
    /// select.
    fn with_merge(k: usize, mult: usize, merge: bool) -> Self {
        let k = k.max(1);
        let mult = mult.max(1);
        let cap = k
            .saturating_mul(4 * mult)
            .clamp(64, isize::MAX as usize / 16);
        TopK {
            k,
            mult,
            cap,
            // Up to 4 k mult keys per thread: out of memory unwinds to the entry point. Past
            // `cap`: one block of the fused scan ([`TopK::push_rows3`]).
            buf: crate::error::vec_or_unwind(T::KEY_MAX, cap + ROWS3_ROOM, "top-k buffer"),
            n: 0,
            thresh: T::KEY_MAX,
            merge,
            sorted: 0,
        }
    }
    pub fn clear(&mut self) {
        self.n = 0;
        self.sorted = 0;
        self.thresh = T::KEY_MAX;
    }
    /// Offers a candidate; `d2` must be >= 0 (a squared distance).
    #[inline(always)]
    pub fn push(&mut self, pos: u32, d2: T) {
        let key = d2.key(pos);
        self.buf[self.n] = key;
        self.n += usize::from(key < self.thresh);
        if self.n == self.cap {
            self.compact();
        }
    }
    /// [`TopK::push`] when `ok`, else nothing (branchless).
    #[inline(always)]
    pub fn push_if(&mut self, pos: u32, d2: T, ok: bool) {
        let key = d2.key(pos);
        self.buf[self.n] = key;
        self.n += usize::from(ok & (key < self.thresh));
        if self.n == self.cap {
            self.compact();
        }
    }

    /// [`TopK::push_if`] of the rows `j` whose bit is set in `m` (ascending), at `pos(j)`
    /// with `d2[j]`, kept when `pos(j) <= lim`. The count and the threshold stay in
    /// registers across the rows (per-row `push`es store and reload them: a chain through
    /// memory from one candidate to the next).
    #[inline(always)]
    pub fn push_mask(&mut self, mut m: u64, d2: &[T], pos: impl Fn(usize) -> u32, lim: u32) {
        let (mut n, mut thresh) = (self.n, self.thresh);
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            m &= m - 1;
            let p = pos(j);
            let key = d2[j].key(p);
            self.buf[n] = key;
            n += usize::from((key < thresh) & (p <= lim));
            if n == self.cap {
                self.n = n;
                self.compact();
                (n, thresh) = (self.n, self.thresh);
            }
        }
        self.n = n;
    }

    /// Offers the 3-D rows `coords` at the positions of `entries` (packed index entries),
    /// kept when the position is at most `lim`, through the fused distance-and-key kernel
    /// ([`Real::dist3_keys`]: keys built, filtered and compressed in vector registers), a
    /// block of [`SCAN_BLOCK`] rows per call with a cut whenever `cap` keys are kept. False
    /// (nothing offered) where this type or CPU has no such kernel.
    ///
    /// Perf note (`zeta.attention` at N = 32k, H = 8, top-32, the defaults; a Zen 5 VM, AMD
    /// family 26, best of 6-10 per process, interleaved rounds): the per-row loop over the
    /// scan's mask ([`TopK::push_mask`], a store, a compare and a bounds check per row
    /// under the bound) was ~16% of the forward's samples; with this kernel the forward went
    /// 228-242 -> 208-212 ms (AVX-512), 284-303 -> 264-271 ms (`ZETA_SIMD=avx2`).
    #[inline]
    pub fn push_rows3(&mut self, q: &[T; 3], coords: &[T], entries: &[u64], lim: u32) -> bool {
        let n = entries.len();
        debug_assert_eq!(coords.len(), 3 * n);
        let mut r = 0;
        while r < n {
            let e = (r + SCAN_BLOCK).min(n);
            // `n < cap` here (every push cuts at `cap`), so `cap + ROWS3_ROOM - n` slots
            // hold a block and its padding.
            let got = T::dist3_keys(
                q,
                &coords[3 * r..3 * e],
                &entries[r..e],
                lim,
                self.thresh,
                &mut self.buf[self.n..],
            );
            let Some(c) = got else {
                debug_assert_eq!(r, 0, "the kernel is there or not for the whole process");
                return false;
            };
            self.n += c;
            if self.n >= self.cap {
                self.compact();
            }
            r = e;
        }
        true
    }

    /// The k-th smallest d2 known so far (+inf until k distinct candidates are known): no
    /// candidate with a larger d2 can enter, one with an equal d2 still may (smaller
    /// position). Only as tight as the last cut; see [`TopK::tighten`].
    #[inline(always)]
    pub fn bound(&self) -> T {
        if self.thresh == T::KEY_MAX {
            T::infinity()
        } else {
            T::from_key(self.thresh).0
        }
    }

    /// Cuts the buffer to the best k now, so that [`TopK::bound`] is the current k-th d2.
    #[inline]
    pub fn tighten(&mut self) {
        if self.merge {
            if self.n > self.sorted && self.n >= self.k * self.mult {
                self.compact();
            }
        } else if self.n > self.k || (self.n == self.k && self.thresh == T::KEY_MAX) {
            self.compact();
        }
    }

    /// [`TopK::tighten`] once more than `k + slack` keys are kept.
    #[inline(always)]
    pub fn tighten_over(&mut self, slack: usize) {
        if self.n > self.k + slack {
            self.compact();
        }
    }

    /// Cuts the buffer back and tightens the threshold.
    fn compact(&mut self) {
        if self.merge {
            // The m smallest keys, repeats included, as the select below keeps.
            let m = self.k * self.mult;
            let kept = T::merge_sorted(&mut self.buf, self.sorted, self.n, m);
            (self.sorted, self.n) = (kept, kept);
            if kept == m {
                self.thresh = self.buf[kept - 1];
            }
            return;
        }
        let m = self.k * self.mult;
        if self.n > m {
            // The m-th smallest key: a key repeats at most `mult` times, so at least k
            // distinct keys are <= it and a larger one cannot be among the best k. With
            // mult = 1 that is the k-th best itself; with several curves it is a little
            // looser than the k-th distinct key but needs no sort and no dedupe (which made
            // the cuts of a 2-curve search ~2x dearer).
            let v = &mut self.buf[..self.n];
            v.select_nth_unstable(m - 1);
            self.thresh = v[m - 1];
            self.n = m;
            return;
        }
        self.best_k();
        if self.n == self.k {
            self.thresh = self.buf[self.k - 1];
        }
    }

    /// Leaves the best k distinct keys in `buf[..n]`, ascending. A key repeats at most `mult`
    /// times, so the first k distinct keys are among the `k * mult` smallest: select those,
    /// then sort and dedupe only them.
    fn best_k(&mut self) {
        let m = self.k * self.mult;
        if self.merge {
            // After the merge `buf[..n]` holds the m smallest, ascending.
            if self.n > self.sorted {
                self.compact();
            }
        } else {
            let v = &mut self.buf[..self.n];
            // Up to ~m + 16 keys one sort is cheaper than a select and a sort of m (top-32
            // of u64 keys here: 104 vs 152 ns at 40 keys, 135 vs 167 at 48, even at 56).
            if v.len() > m + SORT_ALL_SLACK {
                v.select_nth_unstable(m - 1);
                v[..m].sort_unstable();
            } else {
                v.sort_unstable();
            }
        }
        let v = &mut self.buf[..self.n.min(m)];
        let mut u = v.len().min(1);
        if self.mult > 1 {
            // A repeated position has the same d2, so the same key: duplicates are equal.
            for i in 1..v.len() {
                if v[i] != v[u - 1] {
                    v[u] = v[i];
                    u += 1;
                }
            }
        } else {
            u = v.len();
        }
        self.n = u.min(self.k);
    }

    /// The kept candidates, ascending by (d2, position), into `out` (cleared first).
    pub fn drain_sorted(&mut self, out: &mut Vec<(T, u32)>) {
        self.best_k();
        out.clear();
        out.extend(self.buf[..self.n].iter().map(|&key| T::from_key(key)));
        self.clear();
    }
}

/// Keeps the `topk` smallest candidates by (d2, position), distinct positions, sorted.
///
/// `mult` bounds how often one position repeats; duplicates are equal (d2, position) pairs,
/// so after sorting they are adjacent and the first `topk * mult` entries hold the first
/// `topk` distinct ones.
pub fn select_topk<T: Float>(c: &mut Vec<(T, u32)>, topk: usize, mult: usize) {
    let cmp = |a: &(T, u32), b: &(T, u32)| {
        a.0.partial_cmp(&b.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
    };
    let m = topk.saturating_mul(mult.max(1));
    if c.len() > m {
        c.select_nth_unstable_by(m - 1, cmp);
        c.truncate(m);
    }
    c.sort_unstable_by(cmp);
    if mult > 1 {
        c.dedup_by_key(|x| x.1);
    }
    c.truncate(topk);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::lcg;

    #[test]
    fn topk_matches_sorting_with_and_without_duplicates() {
        let mut s = 7u64;
        for &dedupe in &[false, true] {
            for n in [0usize, 5, 31, 32, 33, 200, 1000] {
                let mut items: Vec<(f32, u32)> = (0..n as u32)
                    .map(|p| ((lcg(&mut s) * 8.0).round().abs(), p)) // d2 >= 0
                    .collect();
                if dedupe {
                    let dup: Vec<_> = items.iter().step_by(3).cloned().collect();
                    items.extend(dup);
                }
                let mut tk = TopK::<f32>::new(32, if dedupe { 2 } else { 1 });
                for &(d, p) in &items {
                    tk.push(p, d);
                }
                let mut got = Vec::new();
                tk.drain_sorted(&mut got);
                let mut want = items.clone();
                want.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
                want.dedup_by_key(|a| a.1);
                want.truncate(32);
                assert_eq!(got, want, "n={n} dedupe={dedupe}");
            }
        }
    }

    /// The fused scan ([`TopK::push_rows3`], where this CPU has a kernel) keeps what a push
    /// per row keeps: scans of any length (several blocks, past `cap` between cuts), with a
    /// position limit, mixed with tightening, for both cuts; the drain is the sorted top k of
    /// the visible rows by (d2, position).
    #[test]
    fn push_rows3_keeps_what_row_pushes_keep() {
        let mut s = 9u64;
        for &merge in &[false, true] {
            for k in [1usize, 7, 32, 64] {
                let mut tk = TopK::<f32>::with_merge(k, 1, merge && f32::merge_fast(k));
                let mut seen: Vec<(f32, u32)> = Vec::new();
                let mut next = 0u32;
                for scan in 0..40 {
                    let n = [0usize, 1, 15, 16, 17, 63, 64, 65, 200, 513][scan % 10];
                    let c: Vec<f32> = (0..3 * n).map(|_| (lcg(&mut s) * 4.0).round()).collect();
                    let q = [lcg(&mut s), lcg(&mut s), 0.5];
                    let entries: Vec<u64> = (0..n as u64)
                        .map(|j| {
                            (j.wrapping_mul(0x9E37_79B9) & 0xFFFF_FFFF) << 32
                                | (u64::from(next) + j)
                        })
                        .collect();
                    next += n as u32;
                    let lim = if scan % 3 == 0 {
                        next - (n as u32) / 2
                    } else {
                        u32::MAX
                    };
                    if !tk.push_rows3(&q, &c, &entries, lim) {
                        return; // no kernel on this CPU: the scan takes the per-row path
                    }
                    for j in 0..n {
                        let pos = entries[j] as u32;
                        if pos <= lim {
                            seen.push((crate::index::sq_dist(&q, &c[3 * j..3 * j + 3]), pos));
                        }
                    }
                    if scan % 4 == 1 {
                        tk.tighten_over(8);
                    }
                }
                let mut got = Vec::new();
                tk.drain_sorted(&mut got);
                seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
                seen.truncate(k);
                assert_eq!(got, seen, "merge={merge} k={k}");
            }
        }
    }

    /// Both cuts (the vector merge where the CPU has it, and the select) through pushes,
    /// filtered pushes, cuts and bounds in any order: the bound after `tighten` is the k-th
    /// smallest distinct d2 so far (mult = 1), the drain the sorted, deduped top k.
    #[test]
    fn merge_and_select_agree_with_a_sort() {
        let mut s = 3u64;
        let modes: Vec<bool> = if f32::merge_fast(64) {
            vec![false, true]
        } else {
            vec![false]
        };
        for &merge in &modes {
            for k in [1usize, 5, 8, 9, 31, 32, 33, 64, 65] {
                for mult in [1usize, 2, 3] {
                    for &grid in &[0.0f32, 4.0, 1e6] {
                        let mut tk = TopK::<f32>::with_merge(k, mult, merge && k * mult <= 64);
                        let mut seen: Vec<(f32, u32)> = Vec::new();
                        for step in 0..600u32 {
                            let pos = step / mult as u32;
                            let d = if grid == 0.0 {
                                1.0
                            } else {
                                (lcg(&mut s) * grid).round().abs()
                            };
                            // The same position repeats with the same d2 (several curves).
                            let d = seen.iter().find(|e| e.1 == pos).map_or(d, |e| e.0);
                            let ok = lcg(&mut s) > -0.8;
                            if step % 5 == 0 {
                                tk.push(pos, d);
                                seen.push((d, pos));
                            } else {
                                tk.push_if(pos, d, ok);
                                if ok {
                                    seen.push((d, pos));
                                }
                            }
                            if step % 37 == 0 {
                                tk.tighten_over(8);
                            }
                            if step % 53 == 0 && mult == 1 {
                                tk.tighten();
                                let mut v = seen.clone();
                                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                                let want = if v.len() >= k {
                                    v[k - 1].0
                                } else {
                                    f32::INFINITY
                                };
                                assert_eq!(tk.bound(), want, "merge={merge} k={k} step={step}");
                            }
                        }
                        let mut got = Vec::new();
                        tk.drain_sorted(&mut got);
                        seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
                        seen.dedup_by_key(|a| a.1);
                        seen.truncate(k);
                        assert_eq!(got, seen, "merge={merge} k={k} mult={mult} grid={grid}");
                    }
                }
            }
        }
    }
}
