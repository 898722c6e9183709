//! The causal dyadic-run Z-order index (a merge-sort tree over chunks of keys).
//!
//! Positions split into chunks of `chunk` keys. Level `l` holds, for every aligned run of
//! `2^l` full chunks, that run's keys sorted by (code, position), packed as
//! `code << 32 | position` in one u64 (so ties break by position and one integer compare
//! orders entries); the keys' coordinates are stored beside them in the same order, so the
//! distance loop over a window reads memory sequentially instead of gathering.
//!
//! A query at position `p` lies in chunk `c = p / chunk`. The past full chunks `[0, c)`
//! split by the binary digits of `c` into at most `log2(c) + 1` runs (high bit first); in
//! each, the query's code is binary-searched and `window` entries on each side become
//! candidates. Every key of the own chunk at positions `<= p` is a candidate too, so
//! causality is exact at token level. Non-causal: one run holding all keys.
//!
//! Only even-indexed runs are ever searched, but odd ones are needed to merge the level above;
//! building all levels costs `O(S log(S/chunk))` time and memory.
use crate::error::{try_vec, try_with_capacity, Result, ZetaError};
use crate::morton::with_dims;
use crate::quantize::{Grid, Real};
use crate::simd::SCAN_BLOCK;
use num_traits::Float;
use rayon::prelude::*;
use std::ops::Range;

pub use crate::topk::{select_topk, TopK};

/// Settings shared by the index, knn, attention and the KV cache.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub chunk: usize,
    pub window: usize,
    pub n_curves: usize,
    pub n_sink: usize,
    pub causal: bool,
    pub bits: u32,
    pub scale: f64,
}

impl Params {
    pub fn check(&self, dk: usize) -> Result<()> {
        if self.chunk == 0 {
            return Err(ZetaError::value("chunk", "must be >= 1"));
        }
        if self.chunk > u32::MAX as usize / 2 {
            return Err(ZetaError::value("chunk", "too large"));
        }
        if self.window == 0 {
            return Err(ZetaError::value("window", "must be >= 1"));
        }
        if self.n_curves == 0 || self.n_curves > dk + 1 {
            return Err(ZetaError::value(
                "n_curves",
                format!(
                    "must be 1..={} for key_dim {dk} (d+1 shifted curves)",
                    dk + 1
                ),
            ));
        }
        let maxb = (32 / dk) as u32;
        if self.bits == 0 || self.bits > maxb {
            return Err(ZetaError::value(
                "bits",
                format!("must be 1..={maxb} for key_dim {dk} (the index packs codes into 32 bits), got {}", self.bits),
            ));
        }
        Grid::new(dk, self.bits, 0, self.scale)?;
        Ok(())
    }

    pub fn grids(&self, dk: usize) -> Result<Vec<Grid>> {
        (0..self.n_curves)
            .map(|c| Grid::new(dk, self.bits, c as u32, self.scale))
            .collect()
    }

    /// How many times one position can appear among candidates (curves, plus sinks).
    pub fn multiplicity(&self) -> usize {
        self.n_curves + usize::from(self.n_sink > 0)
    }
}

#[inline(always)]
pub fn pack(code: u32, pos: u32) -> u64 {
    ((code as u64) << 32) | pos as u64
}

#[inline(always)]
pub fn unpack_pos(e: u64) -> u32 {
    e as u32
}

#[inline(always)]
pub fn sq_dist<T: Float>(a: &[T], b: &[T]) -> T {
    let mut s = T::zero();
    for (x, y) in a.iter().zip(b) {
        let d = *x - *y;
        s = s + d * d;
    }
    s
}

/// `$body` with the const `$D` = `$d` for d_k 2, 3 and 4 (what the method is for), else
/// `$other` (any d_k, runtime-sized loops).
macro_rules! small_dims {
    ($d:expr, $D:ident => $body:expr, else $other:block) => {
        match $d {
            2 => {
                const $D: usize = 2;
                $body
            }
            3 => {
                const $D: usize = 3;
                $body
            }
            4 => {
                const $D: usize = 4;
                $body
            }
            _ => $other,
        }
    };
}

/// Where the scans send candidates `(position, d2)`: any closure, or a [`TopK`], whose
/// [`Offer::bound`] lets a scan skip, 8 at a time, the keys that cannot enter.
pub trait Offer<T: Float> {
    fn offer(&mut self, pos: u32, d2: T);
    /// A candidate with `d2 > bound()` would be rejected (+inf: take every one).
    #[inline(always)]
    fn bound(&self) -> T {
        T::infinity()
    }
    /// [`Offer::offer`] of the rows `j` whose bit is set in `m`, in ascending order, at
    /// `pos(j)` with `d2[j]`.
    #[inline(always)]
    fn offer_mask(&mut self, mut m: u64, d2: &[T], pos: impl Fn(usize) -> u32) {
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            self.offer(pos(j), d2[j]);
            m &= m - 1;
        }
    }
    /// The 3-D rows `coords` at the positions of `entries` (packed index entries; only
    /// called when [`Real::DIST3`]): [`offer_block`]'s scan. The top-k (and the exact
    /// search's filter of it) take them through the fused kernel where there is one.
    #[inline(always)]
    fn offer_rows3(&mut self, q: &[T; 3], coords: &[T], entries: &[u64])
    where
        T: Real,
    {
        offer_block::<T, 3>(q, coords, |j| unpack_pos(entries[j]), self)
    }
}

impl<T: Float, F: FnMut(u32, T)> Offer<T> for F {
    #[inline(always)]
    fn offer(&mut self, pos: u32, d2: T) {
        self(pos, d2)
    }
}

impl<T: Float + Real> Offer<T> for TopK<T> {
    #[inline(always)]
    fn offer(&mut self, pos: u32, d2: T) {
        self.push(pos, d2)
    }
    #[inline(always)]
    fn bound(&self) -> T {
        TopK::bound(self)
    }
    #[inline(always)]
    fn offer_mask(&mut self, m: u64, d2: &[T], pos: impl Fn(usize) -> u32) {
        self.push_mask(m, d2, pos, u32::MAX)
    }
    #[inline(always)]
    fn offer_rows3(&mut self, q: &[T; 3], coords: &[T], entries: &[u64]) {
        if !self.push_rows3(q, coords, entries, u32::MAX) {
            offer_block::<T, 3>(q, coords, |j| unpack_pos(entries[j]), self)
        }
    }
}

/// Candidates whose distances are computed before any is offered (the portable path, d_k other
/// than 3, f64): the offers then happen only for the lanes within the bound (a mask).
///
/// Perf note (attention forward, N = 32k, H = 8, the defaults: 2 curves, window 128, ~2,000
/// candidates per query, 2 threads): offering every candidate to [`TopK::push`] 847 ms; with
/// the 3-D f32 blocks of 64 rows through [`crate::simd::dist3_mask`] (distances and the
/// bound's mask, then offers only for set bits): 786 ms portable, 658 ms with AVX2.
const LANES: usize = 8;

/// The squared distance of `c` (D coordinates) to `q`, in the order every path uses.
#[inline(always)]
fn dist<T: Float, const D: usize>(q: &[T; D], c: &[T]) -> T {
    let mut s = T::zero();
    for i in 0..D {
        let d = q[i] - c[i];
        s = s + d * d;
    }
    s
}

/// Offers the rows `coords` (D coordinates each, at positions `pos(j)`) to `f`, LANES at a
/// time, skipping the lanes farther than `f`'s bound.
#[inline(always)]
pub(crate) fn offer_block<T: Float + Real, const D: usize>(
    q: &[T; D],
    coords: &[T],
    pos: impl Fn(usize) -> u32,
    f: &mut (impl Offer<T> + ?Sized),
) {
    let n = coords.len() / D;
    if D == 3 && T::DIST3 {
        // f32, 3-D (the method's case): the SIMD kernel, a block of rows per call.
        let q3: [T; 3] = std::array::from_fn(|i| q[i.min(D - 1)]);
        let mut d2 = [T::zero(); SCAN_BLOCK];
        for r in (0..n).step_by(SCAN_BLOCK) {
            let e = (r + SCAN_BLOCK).min(n);
            let m = T::dist3_mask(&q3, &coords[r * 3..e * 3], f.bound(), &mut d2);
            f.offer_mask(m, &d2, |j| pos(r + j));
        }
        return;
    }
    let mut r = 0;
    while r + LANES <= n {
        let c = &coords[r * D..(r + LANES) * D];
        let d: [T; LANES] = std::array::from_fn(|j| dist::<T, D>(q, &c[j * D..(j + 1) * D]));
        let b = f.bound();
        let mut m = 0u32;
        for (j, x) in d.iter().enumerate() {
            m |= u32::from(*x <= b) << j;
        }
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            f.offer(pos(r + j), d[j]);
            m &= m - 1;
        }
        r += LANES;
    }
    for j in r..n {
        f.offer(pos(j), dist::<T, D>(q, &coords[j * D..(j + 1) * D]));
    }
}

/// Offers `f` the keys at positions `rows` with their squared distance to `q` (row-major
/// keys of `q.len()` coordinates): the parts of the sequence that are scanned whole.
#[inline]
pub fn offer_rows<T: Float + Real>(
    q: &[T],
    k: &[T],
    rows: Range<usize>,
    f: &mut (impl Offer<T> + ?Sized),
) {
    let dk = q.len();
    if rows.is_empty() {
        return;
    }
    let start = rows.start;
    let block = &k[rows.start * dk..rows.end * dk];
    small_dims!(dk, D => {
        let qa: [T; D] = std::array::from_fn(|i| q[i]);
        offer_block::<T, D>(&qa, block, |j| (start + j) as u32, f)
    }, else {
        for (j, c) in block.chunks_exact(dk).enumerate() {
            f.offer((start + j) as u32, sq_dist(q, c));
        }
    })
}

/// What a causal query at position `p` takes besides its runs: its own chunk `own`
/// (positions `..= p`) and the first `n_sink` positions (`<= p`).
#[inline]
pub fn offer_own_and_sinks<T: Float + Real>(
    q: &[T],
    k: &[T],
    own: Range<usize>,
    n_sink: usize,
    p: usize,
    f: &mut (impl Offer<T> + ?Sized),
) {
    offer_rows(q, k, own, f);
    offer_rows(q, k, 0..n_sink.min(p + 1), f);
}

/// A run of sorted entries and their coordinates (a view).
#[derive(Clone, Copy)]
pub struct RunView<'a, T> {
    pub entries: &'a [u64],
    pub coords: &'a [T],
    /// Codes of every `FENCE`-th entry (see [`fence_of`]), or empty.
    pub fence: &'a [u32],
}

/// Stride of the fence arrays.
pub const FENCE: usize = 64;

/// The codes of entries 0, FENCE, 2*FENCE, ...: a small array searched first, so a lookup in a
/// large run touches a few cache lines of the run instead of ~log2(n) scattered ones.
///
/// Perf note (KV cache, S = 64k, 8 heads, T_q = 1): the call cost ~100 us whatever the
/// window, nearly all of it cache misses of the binary searches in the runs.
pub fn fence_of(entries: &[u64]) -> Result<Vec<u32>> {
    let mut f = try_with_capacity(entries.len().div_ceil(FENCE), "index fence")?;
    f.extend(entries.iter().step_by(FENCE).map(|&e| (e >> 32) as u32));
    Ok(f)
}

/// Hints the CPU to load the cache lines of `s` (no effect on other architectures).
#[inline(always)]
pub fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(s);
        let p = s.as_ptr() as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is only a hint: it never faults and reads nothing into the
            // program, and `p + off` stays inside `s` (off < size of s in bytes).
            unsafe {
                std::arch::x86_64::_mm_prefetch(p.add(off), std::arch::x86_64::_MM_HINT_T0);
            }
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// Branchless lower bounds: `out[i]` = the number of items of `arrs[i]` (sorted) that are
/// `< keys[i]`, for every i. The searches advance
/// one step each per round, so that their cache misses are waited for together instead of one
/// search after the other (a decode step searches ~2 log2(S / chunk) cold runs).
#[inline]
fn lower_bounds<K: Copy + PartialOrd>(arrs: &[&[K]], keys: &[K], out: &mut [usize]) {
    let n = arrs.len();
    let mut base = [0usize; PROBE_LANES];
    let mut size = [0usize; PROBE_LANES];
    for i in 0..n {
        size[i] = arrs[i].len();
    }
    loop {
        let mut active = false;
        for i in 0..n {
            if size[i] > 1 {
                let half = size[i] / 2;
                base[i] = if arrs[i][base[i] + half] < keys[i] {
                    base[i] + half
                } else {
                    base[i]
                };
                size[i] -= half;
                active = true;
            }
        }
        if !active {
            break;
        }
    }
    for i in 0..n {
        out[i] = if arrs[i].is_empty() {
            0
        } else {
            base[i] + usize::from(arrs[i][base[i]] < keys[i])
        };
    }
}

/// One run to search for one query: the run and the query's code on the run's curve.
#[derive(Clone, Copy)]
pub struct Probe<'a, T> {
    pub run: RunView<'a, T>,
    pub qcode: u32,
}

/// Most probes handled in lock step. A query has `n_curves * (log2(S/chunk) + 1)` at most
/// (14 for one curve at S = 1M, chunk 64); more are scanned in batches. The list is
/// initialised for every query, so it is kept small.
pub const PROBE_LANES: usize = 32;

/// Calls `f(position, d2)` for the `window` entries on each side of each probe's code.
///
/// The probes' searches are independent, so they run in phases over all probes instead of
/// one run after the other: every fence search, then every in-block search, then a prefetch
/// of every window, then the distance scans. The cache misses of different runs then
/// overlap instead of queueing (perf: nearly all the time of a query is memory latency).
pub fn scan_probes<T: Float + Real>(
    probes: &[Probe<'_, T>],
    q: &[T],
    window: usize,
    f: &mut (impl Offer<T> + ?Sized),
) {
    scan_probes_ranges(probes, q, window, f, |_, _, _| {});
}

/// [`scan_probes`], also reporting `(probe, lo, hi)`: the entries `lo..hi` of the run that
/// were scanned for each probe.
pub fn scan_probes_ranges<T: Float + Real>(
    probes: &[Probe<'_, T>],
    q: &[T],
    window: usize,
    f: &mut (impl Offer<T> + ?Sized),
    mut ranges: impl FnMut(usize, usize, usize),
) {
    for (bi, batch) in probes.chunks(PROBE_LANES).enumerate() {
        let mut lo = [0usize; PROBE_LANES];
        let mut hi = [0usize; PROBE_LANES];
        let mut at = [0usize; PROBE_LANES];
        let nb = batch.len();
        // The fence searches of all probes in lock step (their cache misses overlap), then
        // the in-block searches the same way.
        let fences: [&[u32]; PROBE_LANES] = std::array::from_fn(|i| match batch.get(i) {
            Some(pr) => pr.run.fence,
            None => &[],
        });
        let codes: [u32; PROBE_LANES] =
            std::array::from_fn(|i| batch.get(i).map_or(0, |p| p.qcode));
        lower_bounds(&fences[..nb], &codes[..nb], &mut at[..nb]);
        for (i, pr) in batch.iter().enumerate() {
            let n = pr.run.entries.len();
            if pr.run.fence.is_empty() {
                hi[i] = n;
            } else {
                // Entry j*FENCE has code fence[j]: the lower bound lies after the last
                // fenced entry below the key and at or before the first one at/above it.
                let j = at[i];
                lo[i] = if j == 0 { 0 } else { (j - 1) * FENCE + 1 };
                hi[i] = (j * FENCE).min(n);
            }
        }
        let blocks: [&[u64]; PROBE_LANES] = std::array::from_fn(|i| match batch.get(i) {
            Some(pr) => &pr.run.entries[lo[i]..hi[i]],
            None => &[],
        });
        let keys: [u64; PROBE_LANES] = std::array::from_fn(|i| (codes[i] as u64) << 32);
        lower_bounds(&blocks[..nb], &keys[..nb], &mut at[..nb]);
        for (i, pr) in batch.iter().enumerate() {
            let e = pr.run.entries;
            let s = lo[i] + at[i];
            lo[i] = s.saturating_sub(window);
            hi[i] = (s + window).min(e.len());
            let dk = q.len();
            prefetch(&e[lo[i]..hi[i]]);
            prefetch(&pr.run.coords[lo[i] * dk..hi[i] * dk]);
        }
        for (i, pr) in batch.iter().enumerate() {
            pr.run.scan_range(q, lo[i], hi[i], f);
            ranges(bi * PROBE_LANES + i, lo[i], hi[i]);
        }
    }
}

impl<'a, T: Float + Real> RunView<'a, T> {
    /// Offers `f` entries `lo..hi` with their d2 to `q`.
    #[inline]
    pub fn scan_range(&self, q: &[T], lo: usize, hi: usize, f: &mut (impl Offer<T> + ?Sized)) {
        if lo >= hi {
            return;
        }
        let dk = q.len();
        let e = &self.entries[lo..hi];
        // d_k is tiny; a fixed-size loop lets the compiler unroll the distance.
        small_dims!(dk, D => {
            let c = &self.coords[lo * D..hi * D];
            if D == 3 && T::DIST3 {
                let q3: [T; 3] = std::array::from_fn(|i| q[i]);
                f.offer_rows3(&q3, c, e)
            } else {
                let qa: [T; D] = std::array::from_fn(|i| q[i]);
                offer_block::<T, D>(&qa, c, |j| unpack_pos(e[j]), f)
            }
        }, else {
            for (j, c) in self.coords[lo * dk..hi * dk].chunks_exact(dk).enumerate() {
                f.offer(unpack_pos(e[j]), sq_dist(q, c));
            }
        })
    }
}

/// Sorted entries of `keys` positions `[lo, hi)` for one curve.
pub fn sorted_entries(codes: &[u32], lo: usize, hi: usize) -> Result<Vec<u64>> {
    let mut e = try_with_capacity(hi - lo, "index entries")?;
    e.extend((lo..hi).map(|p| pack(codes[p], p as u32)));
    e.sort_unstable();
    Ok(e)
}

/// Coordinates of the entries, in entry order.
///
/// Perf note (one head of N = 32k keys, d_k = 3, the 10 levels of a causal index, one
/// thread; 2026-12-03, a Zen 5 VM): a row copy of a run-time `dk` was a `memcpy` call per
/// entry; with `dk` a constant: 2.3-2.4 -> 2.1-2.2 ms for the 10 levels.
pub fn gather_coords<T: Copy>(entries: &[u64], k: &[T], dk: usize, out: &mut [T]) {
    if !(1..=8).contains(&dk) {
        for (e, o) in entries.iter().zip(out.chunks_exact_mut(dk)) {
            let p = unpack_pos(*e) as usize;
            o.copy_from_slice(&k[p * dk..(p + 1) * dk]);
        }
        return;
    }
    with_dims!(dk, D => gather_coords_d::<T, D>(entries, k, out))
}

fn gather_coords_d<T: Copy, const D: usize>(entries: &[u64], k: &[T], out: &mut [T]) {
    for (e, o) in entries.iter().zip(out.chunks_exact_mut(D)) {
        let p = unpack_pos(*e) as usize;
        let row: &[T; D] = k[p * D..(p + 1) * D].try_into().unwrap();
        let o: &mut [T; D] = o.try_into().unwrap();
        *o = *row;
    }
}

/// Merges two sorted runs into `out`.
///
/// Branch-free while both runs last (the smaller head is picked with a conditional move and
/// both cursors advance by the comparison's 0 or 1): on random keys the branch of the plain
/// merge mispredicts about every other entry.
pub fn merge_into(a: &[u64], b: &[u64], out: &mut [u64]) {
    assert_eq!(
        a.len() + b.len(),
        out.len(),
        "merge_into: out must hold both runs"
    );
    let (mut i, mut j, mut o) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        let take_a = x <= y;
        out[o] = if take_a { x } else { y };
        i += usize::from(take_a);
        j += usize::from(!take_a);
        o += 1;
    }
    out[o..o + a.len() - i].copy_from_slice(&a[i..]);
    out[o + a.len() - i..].copy_from_slice(&b[j..]);
}

/// [`merge_into`] that carries each entry's `dk` coordinates along (`ca`, `cb` in the runs'
/// order into `co`): sequential reads, where gathering them by position from the keys
/// afterwards misses the cache once per entry on a long run.
///
/// Branch-free while both runs last, as [`merge_into`], for `dk` in 1..=8 (a row of
/// compile-time length, picked by a conditional move).
pub fn merge_with_coords<T: Copy>(
    (a, ca): (&[u64], &[T]),
    (b, cb): (&[u64], &[T]),
    dk: usize,
    out: &mut [u64],
    co: &mut [T],
) {
    assert!(
        a.len() + b.len() == out.len()
            && ca.len() == a.len() * dk
            && cb.len() == b.len() * dk
            && co.len() == out.len() * dk,
        "merge_with_coords: runs, coordinates and outputs disagree in length"
    );
    let (mut i, mut j) = (0, 0);
    if (1..=8).contains(&dk) {
        with_dims!(dk, D => {
            while i < a.len() && j < b.len() {
                let take_a = a[i] <= b[j];
                let ra: [T; D] = ca[i * D..(i + 1) * D].try_into().unwrap();
                let rb: [T; D] = cb[j * D..(j + 1) * D].try_into().unwrap();
                let o = i + j;
                out[o] = if take_a { a[i] } else { b[j] };
                co[o * D..(o + 1) * D].copy_from_slice(if take_a { &ra } else { &rb });
                i += usize::from(take_a);
                j += usize::from(!take_a);
            }
        });
    }
    // The rest (everything, for other `dk`): one run is empty or the plain merge.
    for (o, oc) in out[i + j..]
        .iter_mut()
        .zip(co[(i + j) * dk..].chunks_exact_mut(dk))
    {
        if j >= b.len() || (i < a.len() && a[i] <= b[j]) {
            *o = a[i];
            oc.copy_from_slice(&ca[i * dk..(i + 1) * dk]);
            i += 1;
        } else {
            *o = b[j];
            oc.copy_from_slice(&cb[j * dk..(j + 1) * dk]);
            j += 1;
        }
    }
}

/// One curve's merge-sort tree: `levels[l]` covers `(n_chunks >> l) << l` chunks.
pub struct CurveTree<T> {
    pub levels: Vec<Vec<u64>>,
    pub coords: Vec<Vec<T>>,
    /// `fence_of(levels[l])`.
    pub fences: Vec<Vec<u32>>,
}

/// The index of one (batch, kv-head) slice of keys.
pub struct KeyIndex<T> {
    pub grids: Vec<Grid>,
    pub curves: Vec<CurveTree<T>>,
    pub dk: usize,
    pub s: usize,
    pub params: Params,
}

impl<T: Float + Real> KeyIndex<T> {
    /// Builds the index over `k` (S x dk, row-major). Parallel over curves, chunks and runs.
    pub fn build(k: &[T], dk: usize, params: &Params) -> Result<Self> {
        Self::build_with_runs(k, dk, params, None)
    }

    /// [`KeyIndex::build`] whose coordinates are gathered only for some runs of a causal
    /// index: `runs(n_chunks, l)` says, per run of level `l` (`n_chunks >> l` of them), which
    /// ones are read; `coords[l]` then ends with the last of them, and holds zeros in the
    /// others. The entries (and fences) of every run are built all the same: a level is
    /// merged from the one below. The exact search reads at most `log2(n_chunks) + 2` runs
    /// per level ([`crate::exact::exact_runs`]).
    pub fn build_with_runs(
        k: &[T],
        dk: usize,
        params: &Params,
        runs: Option<fn(usize, usize) -> Vec<bool>>,
    ) -> Result<Self> {
        let s = k.len() / dk;
        if s > u32::MAX as usize {
            return Err(ZetaError::value("k", "more than 2^32 keys in one head"));
        }
        let grids = params.grids(dk)?;
        let chunk = params.chunk;
        // Every buffer here scales with S: all fallible (MemoryError, not an abort).
        let curves = grids
            .par_iter()
            .map(|g| -> Result<CurveTree<T>> {
                let mut codes = try_vec(0u32, s, "index codes")?;
                // The batched SIMD encode: the bits of `Grid::code`, ~5x faster per key.
                crate::quantize::zorder(k, g, &mut codes)?;
                if !params.causal {
                    let mut e = try_vec(0u64, s, "index entries")?;
                    // The crate's radix argsort of the codes (stable: ties by position, so
                    // the entries come out in `code << 32 | position` order as before). Perf
                    // note (zeta.knn, 1000 queries over 1M keys, non-causal: mostly this
                    // build; 12 interleaved rounds, one process, 2026-12-04, a Zen 3 VM):
                    // median 74.6 -> 69.2 ms on 2 threads, 107.1 -> 102.6 ms on one; the
                    // sort's share of the samples 38% -> 24% (coordinates' gather 22% and
                    // the box trees 18% are the rest).
                    let mut idx = try_vec(0i64, s, "index entries")?;
                    crate::sort::argsort_rows(&codes, s, &mut idx);
                    e.par_iter_mut()
                        .zip(idx.par_iter())
                        .for_each(|(o, &p)| *o = pack(codes[p as usize], p as u32));
                    let mut c = try_vec(T::zero(), e.len() * dk, "index coordinates")?;
                    gather_coords(&e, k, dk, &mut c);
                    let fences = vec![fence_of(&e)?];
                    return Ok(CurveTree {
                        levels: vec![e],
                        coords: vec![c],
                        fences,
                    });
                }
                let n_chunks = s / chunk;
                // At most log2(S) + 1 levels: bounded by a constant, plain Vecs.
                let mut levels: Vec<Vec<u64>> = Vec::new();
                let mut coords: Vec<Vec<T>> = Vec::new();
                if n_chunks > 0 {
                    let mut l0 = try_vec(0u64, n_chunks * chunk, "index level 0")?;
                    l0.par_chunks_mut(chunk).enumerate().for_each(|(ch, o)| {
                        for (r, slot) in o.iter_mut().enumerate() {
                            let p = ch * chunk + r;
                            *slot = pack(codes[p], p as u32);
                        }
                        o.sort_unstable();
                    });
                    levels.push(l0);
                    let mut l = 1;
                    while (n_chunks >> l) > 0 {
                        let run = chunk << l;
                        let n_runs = n_chunks >> l;
                        let prev = &levels[l - 1];
                        let mut cur = try_vec(0u64, n_runs * run, "index level")?;
                        cur.par_chunks_mut(run).enumerate().for_each(|(r, o)| {
                            let a = &prev[r * run..r * run + run / 2];
                            let b = &prev[r * run + run / 2..(r + 1) * run];
                            merge_into(a, b, o);
                        });
                        levels.push(cur);
                        l += 1;
                    }
                    for (l, lv) in levels.iter().enumerate() {
                        let run = chunk << l;
                        let keep = runs.map(|f| f(n_chunks, l));
                        let len = match &keep {
                            Some(kp) => kp.iter().rposition(|&x| x).map_or(0, |j| (j + 1) * run),
                            None => lv.len(),
                        };
                        let mut c = try_vec(T::zero(), len * dk, "index coordinates")?;
                        // Blocks of `chunk << l'` entries (~1024), none across a run boundary.
                        let mut blk = run;
                        while blk > 1024 && blk > chunk {
                            blk /= 2;
                        }
                        c.par_chunks_mut(dk * blk)
                            .zip(lv[..len].par_chunks(blk))
                            .enumerate()
                            .for_each(|(i, (o, e))| {
                                if keep.as_ref().is_none_or(|kp| kp[i * blk / run]) {
                                    gather_coords(e, k, dk, o)
                                }
                            });
                        coords.push(c);
                    }
                }
                let fences = levels
                    .iter()
                    .map(|l| fence_of(l))
                    .collect::<Result<Vec<_>>>()?;
                Ok(CurveTree {
                    levels,
                    coords,
                    fences,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyIndex {
            grids,
            curves,
            dk,
            s,
            params: *params,
        })
    }

    /// Calls `f(position, d2)` for every candidate of a query at absolute position `p`
    /// (a position may come more than once: once per curve, and again as a sink).
    pub fn for_each_candidate(&self, q: &[T], p: usize, k: &[T], f: &mut (impl Offer<T> + ?Sized)) {
        let dk = self.dk;
        let prm = &self.params;
        let w = prm.window;
        if !prm.causal {
            let mut probes = ProbeList::new();
            for (g, tree) in self.grids.iter().zip(&self.curves) {
                let run = RunView {
                    entries: &tree.levels[0],
                    coords: &tree.coords[0],
                    fence: &tree.fences[0],
                };
                probes.push(
                    Probe {
                        run,
                        qcode: g.code(q) as u32,
                    },
                    q,
                    w,
                    f,
                );
            }
            probes.flush(q, w, f);
            offer_rows(q, k, 0..prm.n_sink.min(self.s), f);
            return;
        }
        let chunk = prm.chunk;
        let c = p / chunk;
        if c > 0 {
            let mut probes = ProbeList::new();
            for (g, tree) in self.grids.iter().zip(&self.curves) {
                let qc = g.code(q) as u32;
                let mut start = 0usize;
                for l in (0..tree.levels.len()).rev() {
                    if (c >> l) & 1 == 1 {
                        let a = start * chunk;
                        let b = (start + (1 << l)) * chunk;
                        // The level's fence serves runs that start on a fence stride.
                        let fence: &[u32] = if a.is_multiple_of(FENCE) {
                            &tree.fences[l][a / FENCE..b.div_ceil(FENCE)]
                        } else {
                            &[]
                        };
                        let run = RunView {
                            entries: &tree.levels[l][a..b],
                            coords: &tree.coords[l][a * dk..b * dk],
                            fence,
                        };
                        probes.push(Probe { run, qcode: qc }, q, w, f);
                        start += 1 << l;
                    }
                }
            }
            probes.flush(q, w, f);
        }
        offer_own_and_sinks(q, k, c * chunk..p + 1, prm.n_sink, p, f);
    }
}

/// A fixed-capacity list of probes that scans itself when full (no allocation per query).
pub struct ProbeList<'a, T> {
    items: [Probe<'a, T>; PROBE_LANES],
    n: usize,
}

impl<'a, T: Float + Real> ProbeList<'a, T> {
    pub fn new() -> Self {
        let empty = Probe {
            run: RunView {
                entries: &[],
                coords: &[],
                fence: &[],
            },
            qcode: 0,
        };
        ProbeList {
            items: [empty; PROBE_LANES],
            n: 0,
        }
    }

    /// Adds a probe; a full list is scanned first.
    #[inline]
    pub fn push(
        &mut self,
        p: Probe<'a, T>,
        q: &[T],
        window: usize,
        f: &mut (impl Offer<T> + ?Sized),
    ) {
        if self.n == PROBE_LANES {
            self.flush(q, window, f);
        }
        self.items[self.n] = p;
        self.n += 1;
    }

    /// Scans every probe held and empties the list.
    pub fn flush(&mut self, q: &[T], window: usize, f: &mut (impl Offer<T> + ?Sized)) {
        scan_probes(&self.items[..self.n], q, window, f);
        self.n = 0;
    }
}

impl<T: Float + Real> Default for ProbeList<'_, T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::lcg;

    #[test]
    fn merge_into_equals_a_sort_of_both_runs() {
        let mut seed = 11u64;
        for (na, nb) in [
            (0, 0),
            (0, 5),
            (5, 0),
            (1, 1),
            (7, 300),
            (300, 7),
            (256, 256),
        ] {
            // Few distinct values: runs of equal keys across both sides too.
            let mut run = |n: usize| {
                let mut v: Vec<u64> = (0..n)
                    .map(|_| ((lcg(&mut seed) + 2.0) * 12.0) as u64)
                    .collect();
                v.sort_unstable();
                v
            };
            let (a, b) = (run(na), run(nb));
            let mut out = vec![u64::MAX; na + nb];
            merge_into(&a, &b, &mut out);
            let mut want = [a.clone(), b.clone()].concat();
            want.sort_unstable();
            assert_eq!(out, want, "na {na} nb {nb}");
        }
    }

    #[test]
    fn merge_with_coords_carries_each_row_with_its_entry() {
        let mut seed = 12u64;
        for dk in [1usize, 3, 8, 9] {
            for (na, nb) in [
                (0, 0),
                (0, 4),
                (4, 0),
                (1, 1),
                (9, 200),
                (200, 9),
                (128, 128),
            ] {
                // Entries `code << 32 | position`, few codes (ties), distinct positions; each
                // row holds its position in every coordinate.
                let mut pos = 0u64;
                let mut run = |n: usize| {
                    let mut e: Vec<u64> = (0..n)
                        .map(|_| {
                            pos += 1;
                            (((lcg(&mut seed) + 2.0) * 4.0) as u64) << 32 | pos
                        })
                        .collect();
                    e.sort_unstable();
                    let c: Vec<f32> = e.iter().flat_map(|&x| vec![x as u32 as f32; dk]).collect();
                    (e, c)
                };
                let ((a, ca), (b, cb)) = (run(na), run(nb));
                let mut out = vec![0u64; na + nb];
                let mut co = vec![-1.0f32; (na + nb) * dk];
                merge_with_coords((&a, &ca), (&b, &cb), dk, &mut out, &mut co);
                let mut want = [a.clone(), b.clone()].concat();
                want.sort_unstable();
                assert_eq!(out, want, "dk {dk} na {na} nb {nb}");
                for (e, row) in out.iter().zip(co.chunks_exact(dk)) {
                    assert!(
                        row.iter().all(|&x| x == *e as u32 as f32),
                        "dk {dk}: row of {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn lower_bounds_in_lock_step_equal_partition_point() {
        let mut seed = 5u64;
        let arrays: Vec<Vec<u32>> = (0..PROBE_LANES)
            .map(|i| {
                let n = [0usize, 1, 2, 3, 64, 65, 200, 1000][i % 8] + i;
                let mut a: Vec<u32> = (0..n)
                    .map(|_| (lcg(&mut seed) * 20.0) as i32 as u32)
                    .collect();
                a.sort_unstable();
                a
            })
            .collect();
        for probe in 0..50 {
            let refs: Vec<&[u32]> = arrays.iter().map(|a| &a[..]).collect();
            let keys: Vec<u32> = (0..PROBE_LANES)
                .map(|i| (lcg(&mut seed) * 25.0) as i32 as u32 + (probe + i) as u32 % 3)
                .collect();
            let mut out = vec![usize::MAX; PROBE_LANES];
            lower_bounds(&refs, &keys, &mut out);
            for i in 0..PROBE_LANES {
                assert_eq!(out[i], arrays[i].partition_point(|&x| x < keys[i]), "i={i}");
            }
        }
    }

    #[test]
    fn candidates_are_causal_and_cover_own_chunk() {
        let (s, dk) = (300usize, 3usize);
        let mut seed = 1u64;
        let k: Vec<f32> = (0..s * dk).map(|_| lcg(&mut seed)).collect();
        let prm = Params {
            chunk: 8,
            window: 2,
            n_curves: 2,
            n_sink: 1,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let ix = KeyIndex::build(&k, dk, &prm).unwrap();
        for p in [0usize, 7, 8, 63, 64, 200, 299] {
            let q = [0.1f32, -0.2, 0.3];
            let mut seen = vec![false; s];
            ix.for_each_candidate(&q, p, &k, &mut |pos, d2| {
                assert!((pos as usize) <= p, "non-causal candidate {pos} for p={p}");
                assert_eq!(
                    d2,
                    sq_dist(&q, &k[pos as usize * dk..(pos as usize + 1) * dk])
                );
                seen[pos as usize] = true;
            });
            for (j, &x) in seen.iter().enumerate().take(p + 1).skip((p / 8) * 8) {
                assert!(x, "own-chunk key {j} missing for p={p}");
            }
            assert!(seen[0], "sink missing");
        }
    }

    /// A non-causal index is one run per curve: the entries sorted by (code, position), ties
    /// included (many equal codes at 3 bits per coordinate), the coordinates in entry order.
    #[test]
    fn non_causal_index_sorts_by_code_then_position() {
        let dk = 3usize;
        let mut seed = 5u64;
        for (s, bits) in [(0usize, 10u32), (1, 10), (70_000, 3), (70_001, 10)] {
            let k: Vec<f32> = (0..s * dk).map(|_| lcg(&mut seed)).collect();
            let prm = Params {
                chunk: 64,
                window: 8,
                n_curves: 2,
                n_sink: 0,
                causal: false,
                bits,
                scale: 1.0,
            };
            let ix = KeyIndex::build(&k, dk, &prm).unwrap();
            for (g, tree) in ix.grids.iter().zip(&ix.curves) {
                let mut want: Vec<u64> = (0..s)
                    .map(|p| g.code(&k[p * dk..(p + 1) * dk]) << 32 | p as u64)
                    .collect();
                want.sort_unstable();
                assert_eq!(tree.levels.len(), 1);
                assert_eq!(tree.levels[0], want, "s={s} bits={bits}");
                for (j, &e) in want.iter().enumerate() {
                    let p = unpack_pos(e) as usize;
                    assert_eq!(
                        tree.coords[0][j * dk..(j + 1) * dk],
                        k[p * dk..(p + 1) * dk]
                    );
                }
            }
        }
    }

    #[test]
    fn huge_window_finds_every_past_key() {
        let (s, dk) = (257usize, 2usize);
        let mut seed = 3u64;
        let k: Vec<f32> = (0..s * dk).map(|_| lcg(&mut seed)).collect();
        let prm = Params {
            chunk: 4,
            window: 10_000,
            n_curves: 1,
            n_sink: 0,
            causal: true,
            bits: 16,
            scale: 1.0,
        };
        let ix = KeyIndex::build(&k, dk, &prm).unwrap();
        for p in 0..s {
            let mut n = 0;
            ix.for_each_candidate(&[0.0, 0.0], p, &k, &mut |_, _| n += 1);
            assert_eq!(n, p + 1);
        }
    }

    #[test]
    fn more_probes_than_lanes_are_all_scanned() {
        // chunk 1 and 3 curves: a query at position p has 3 * popcount(p) runs, up to 3 * 12 =
        // 36 > PROBE_LANES, so the probe list flushes in batches.
        let (s, dk) = (4096 + 1, 2usize);
        let mut seed = 9u64;
        let k: Vec<f32> = (0..s * dk).map(|_| lcg(&mut seed)).collect();
        let prm = Params {
            chunk: 1,
            window: 10_000,
            n_curves: 3,
            n_sink: 0,
            causal: true,
            bits: 16,
            scale: 1.0,
        };
        let ix = KeyIndex::build(&k, dk, &prm).unwrap();
        for p in [4095usize, 4094, 3071, 4096, 2047, 1, 0] {
            assert!(3 * p.count_ones() as usize <= 3 * 12);
            let mut seen = vec![0u32; s];
            ix.for_each_candidate(&[0.1, -0.2], p, &k, &mut |j, _| seen[j as usize] += 1);
            for (j, &c) in seen.iter().enumerate() {
                // every past key once per curve (its own position only once: own chunk)
                let want = if j < p {
                    3
                } else if j == p {
                    1
                } else {
                    0
                };
                assert_eq!(c, want, "p={p} j={j}");
            }
        }
        assert!(3 * 4095usize.count_ones() as usize > PROBE_LANES);
    }
}
