//! Exact search (DESIGN 1.9): the brute-force top-k by (d2, position) at window cost.
//!
//! Each sorted run of the index is a spatial hierarchy: the entries whose codes share a
//! prefix form an octree cell. [`ExactIndex`] keeps, for every run of every level of the
//! curve-0 tree, a binary radix tree of the boxes of those cells ([`BoxTree`]: a node's
//! box covers its children's). A causal query searches few runs: the smallest aligned block
//! of the index that holds every key it may see (most queries: one run, the prefix `[0, 2^l chunks)`),
//! with the positions after its own dropped, or, where that block is not a run (the tail of
//! a length that is not a power of two), the whole runs before it and then such a block.
//! The window of the first run gives a k-th distance `r`; then, in every run, the query
//! descends the box tree and scans only the blocks whose box lies within `r` (nearer child
//! first, `r` shrinking as it goes). The forward and knn walk the tree once for a group of
//! queries that share their run ([`ExactIndex::search_group`]).
//!
//! Exactness: every visible key lies in a searched run (or the own chunk, scanned whole when
//! no run holds it), a key is dropped only for its position, and a block is skipped
//! only when the lower bound of its box exceeds `r` (strictly: a key at distance exactly `r`
//! can still win its tie by position). The bound is computed with the same float operations
//! in the same order as the distance itself (`((0 + g0*g0) + g1*g1) + ...`, `g` the gap from
//! the query to the box per coordinate): rounding is monotone, every key's per-coordinate
//! difference is at least the gap, so the bound never exceeds the float distance of any key
//! in the box, whatever the scale (overflow to +inf included). No margin is needed.
//!
//! Only curve 0 is searched, and sinks are not offered apart: both are covered by the exact
//! scan, so `n_curves` and `n_sink` do not change the answer (only the work).
//!
//! Perf notes: see [`ExactIndex::search`].
use crate::error::{numel, try_vec, try_with_capacity, Result};
use crate::index::{
    offer_rows, scan_probes_ranges, unpack_pos, CurveTree, KeyIndex, Offer, Probe, RunView, FENCE,
};
use crate::morton::with_dims;
use crate::quantize::Real;
use crate::topk::TopK;
use num_traits::Float;
use rayon::prelude::*;

/// Boxes of one level's sorted runs, as one binary radix tree per run: a node covers the
/// entries whose codes share a prefix and splits them at the next bit where they differ
/// (an octree cell, halved one coordinate at a time), down to leaves of at most `leaf`
/// entries (equal codes: halved by count). Each node stores the tight box of its points as
/// `lo[0..dk], hi[0..dk]`, its entries and its children (adjacent; none for a leaf).
///
/// Perf note (N = 64k causal Gaussian, top-32, each query's final k-th distance as the
/// radius; the `exact_leaf_census` test): the ball meets 13.5 leaves (1,730 keys) per query
/// with the fixed blocks of 128 entries this replaced (a block that straddles a cell
/// boundary has that cell's width) and 6.9 leaves (601 keys) with radix leaves of at most
/// 128; at 192: 12.1 (2,275) and 5.7 (748).
#[derive(Clone, Debug, PartialEq)]
pub struct BoxTree<T> {
    /// Per node: `lo[0..dk], hi[0..dk]`.
    boxes: Vec<T>,
    /// Per node: first entry, end entry, first child (`LEAF_NODE`: a leaf).
    nodes: Vec<[u32; 3]>,
    /// The root of each run of `run_len` entries.
    roots: Vec<u32>,
    run_len: usize,
}

/// [`BoxTree`]'s child link of a leaf (node 0 is a root, never a child).
const LEAF_NODE: u32 = 0;

/// One run's nodes and boxes (node indices local to the run).
type RunNodes<T> = (Vec<[u32; 3]>, Vec<T>);

impl<T: Float + Send + Sync> BoxTree<T> {
    /// The trees over `entries` (sorted runs of `run_len` packed `(code, position)` entries;
    /// a shorter last run) and their `coords` (`dk` per entry, in entry order), leaves of at
    /// most `leaf` entries; with `keep`, only the runs `r` with `keep[r]` (the others: an
    /// empty tree, and `coords` need not cover them). Runs in parallel (call it inside
    /// zeta's pool).
    pub fn build(
        entries: &[u64],
        coords: &[T],
        dk: usize,
        leaf: usize,
        run_len: usize,
        keep: Option<&[bool]>,
    ) -> Result<Self> {
        let run_len = run_len.max(1);
        let n_runs = entries.len().div_ceil(run_len);
        let runs = (0..n_runs)
            .into_par_iter()
            .map(|r| {
                let (a, b) = (r * run_len, ((r + 1) * run_len).min(entries.len()));
                if keep.is_some_and(|kp| !kp[r]) {
                    // A run the search never reads (its coordinates were not gathered): one
                    // empty leaf, whose box (lo = +inf, hi = -inf) is within no radius.
                    return build_run(&entries[a..a], &[], dk, leaf);
                }
                build_run(&entries[a..b], &coords[a * dk..b * dk], dk, leaf)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::join(runs, dk, run_len)
    }

    /// [`BoxTree::build`] of one run, on the calling thread (the KV cache builds one per run
    /// it makes, and parallelises over its groups instead).
    pub fn build_serial(entries: &[u64], coords: &[T], dk: usize, leaf: usize) -> Result<Self> {
        let run = build_run(entries, coords, dk, leaf)?;
        Self::join(vec![run], dk, entries.len().max(1))
    }

    fn join(runs: Vec<RunNodes<T>>, dk: usize, run_len: usize) -> Result<Self> {
        let total: usize = runs.iter().map(|r| r.0.len()).sum();
        let mut nodes = try_with_capacity(total, "exact-search boxes")?;
        let mut boxes = try_with_capacity(
            numel(&[total, 2 * dk], "exact-search boxes")?,
            "exact-search boxes",
        )?;
        let mut roots = try_with_capacity(runs.len(), "exact-search boxes")?;
        for (r, (rn, rb)) in runs.into_iter().enumerate() {
            // Node and entry numbers from run-local to the level's.
            let base = nodes.len() as u32;
            let first = (r * run_len) as u32;
            roots.push(base);
            nodes.extend(rn.iter().map(|&[s0, s1, c]| {
                let c = if c == LEAF_NODE { LEAF_NODE } else { c + base };
                [s0 + first, s1 + first, c]
            }));
            boxes.extend_from_slice(&rb);
        }
        Ok(BoxTree {
            boxes,
            nodes,
            roots,
            run_len,
        })
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.boxes.len() * std::mem::size_of::<T>()
            + self.nodes.len() * std::mem::size_of::<[u32; 3]>()
            + self.roots.len() * 4
    }

    /// Calls `leaf(st, box, s0, s1)` for every leaf `s0..s1` (clipped to `a..b`) of the runs
    /// that meet entries `a..b` whose bound `lb(box)` does not exceed `radius(st)` (boxes of
    /// `w` values). Depth-first, nearer child first: it walks down the nearer child and
    /// pushes the farther one with its bound, checked again when popped (the radius may
    /// have shrunk since).
    ///
    /// Perf note (KV cache at 1M tokens, 14 runs, exact decode, one thread; a Zen 3 VM,
    /// 2026-12-03): the descents miss the cache at every level. Prefetching the children's
    /// node records along with reading their boxes took the descent of one query over the
    /// runs from 11.4-13.0 to 10.6-12.0 us (-7%, six windows of 20,000 calls, with and
    /// without the prefetch alternating every token in one process). The forward's grouped
    /// search (its trees mostly in L2) measured the same within noise.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn walk<S>(
        &self,
        (a, b): (usize, usize),
        w: usize,
        stack: &mut Vec<(usize, T)>,
        st: &mut S,
        lb: impl Fn(&[T]) -> T,
        radius: impl Fn(&S) -> T,
        mut leaf: impl FnMut(&mut S, &[T], usize, usize),
    ) {
        let bx = |node: usize| &self.boxes[node * w..(node + 1) * w];
        stack.clear();
        if a >= b || self.roots.is_empty() {
            return;
        }
        let last = ((b - 1) / self.run_len).min(self.roots.len().saturating_sub(1));
        for r in (a / self.run_len..=last).rev() {
            let root = self.roots[r] as usize;
            stack.push((root, lb(bx(root))));
        }
        while let Some((mut node, l)) = stack.pop() {
            let r = radius(st);
            if l > r {
                continue;
            }
            loop {
                let [s0, s1, c] = self.nodes[node];
                if c == LEAF_NODE {
                    let (s0, s1) = (a.max(s0 as usize), b.min(s1 as usize));
                    if s0 < s1 {
                        leaf(st, bx(node), s0, s1);
                    }
                    break;
                }
                let (c0, c1) = (c as usize, c as usize + 1);
                // The children's node records, fetched while their boxes are read: the next
                // step down reads one of them, a second dependent miss per level otherwise.
                crate::index::prefetch(&self.nodes[c0..=c0]);
                crate::index::prefetch(&self.nodes[c1..=c1]);
                let (lb0, lb1) = (lb(bx(c0)), lb(bx(c1)));
                let ((far, lf), (near, ln)) = if lb0 <= lb1 {
                    ((c1, lb1), (c0, lb0))
                } else {
                    ((c0, lb0), (c1, lb1))
                };
                if ln > r {
                    break;
                }
                if lf <= r {
                    stack.push((far, lf));
                }
                node = near;
            }
        }
    }
}

/// The radix tree of one sorted run (see [`BoxTree`]): nodes in creation order (a parent
/// before its children, so boxes are filled children first by a reverse pass).
fn build_run<T: Float>(
    entries: &[u64],
    coords: &[T],
    dk: usize,
    leaf: usize,
) -> Result<RunNodes<T>> {
    let n = entries.len();
    let leaf = leaf.max(1);
    if n > u32::MAX as usize {
        return Err(crate::error::ZetaError::value(
            "k",
            "more than 2^32 - 1 entries in one run",
        ));
    }
    // Radix leaves hold ~leaf / 3 entries on average for Gaussian keys (2 nodes per leaf);
    // the vector grows past that if it must.
    let mut nodes: Vec<[u32; 3]> =
        try_with_capacity(6 * n.div_ceil(leaf) + 1, "exact-search boxes")?;
    nodes.push([0, n as u32, LEAF_NODE]);
    let mut i = 0;
    while i < nodes.len() {
        let [s0, s1, _] = nodes[i];
        let (s0u, s1u) = (s0 as usize, s1 as usize);
        if s1u - s0u > leaf {
            let (c0, c1) = (entries[s0u] >> 32, entries[s1u - 1] >> 32);
            let m = if c0 == c1 {
                s0u + (s1u - s0u) / 2
            } else {
                // The first entry whose code has the highest differing bit set: both sides
                // are non-empty (the first code has it clear, the last set).
                let bit = 63 - (c0 ^ c1).leading_zeros();
                let split = (c1 >> bit) << bit << 32;
                s0u + entries[s0u..s1u].partition_point(|&e| e < split)
            } as u32;
            // Fallible growth: running out of memory is a MemoryError, not an abort.
            nodes
                .try_reserve(2)
                .map_err(|_| crate::error::ZetaError::Alloc {
                    what: "exact-search boxes",
                    n: 2 * nodes.len() + 2,
                })?;
            nodes[i][2] = nodes.len() as u32;
            nodes.push([s0, m, LEAF_NODE]);
            nodes.push([m, s1, LEAF_NODE]);
        }
        i += 1;
    }
    let w = 2 * dk;
    let mut boxes = try_vec(
        T::zero(),
        numel(&[nodes.len(), w], "exact-search boxes")?,
        "exact-search boxes",
    )?;
    for (i, nd) in nodes.iter().enumerate().rev() {
        let (head, tail) = boxes.split_at_mut((i + 1) * w);
        let node = &mut head[i * w..];
        node[..dk].fill(T::infinity());
        node[dk..].fill(T::neg_infinity());
        if nd[2] == LEAF_NODE {
            leaf_box(node, &coords[nd[0] as usize * dk..nd[1] as usize * dk], dk);
        } else {
            let c = (nd[2] as usize - i - 1) * w;
            let (x, y) = tail[c..c + 2 * w].split_at(w);
            for j in 0..dk {
                node[j] = x[j].min(y[j]);
                node[dk + j] = x[dk + j].max(y[dk + j]);
            }
        }
    }
    Ok((nodes, boxes))
}

/// The box `lo[0..dk], hi[0..dk]` of the points `block` (already set to the empty box).
fn leaf_box<T: Float>(node: &mut [T], block: &[T], dk: usize) {
    for x in block.chunks_exact(dk) {
        for j in 0..dk {
            node[j] = node[j].min(x[j]);
            node[dk + j] = node[dk + j].max(x[j]);
        }
    }
}

/// A lower bound of the float squared distance from `q` to every point of the box
/// `bx = lo[0..D], hi[0..D]`, in the distance's own operation order (see the module notes).
#[inline(always)]
fn box_lb<T: Float, const D: usize>(q: &[T; D], bx: &[T]) -> T {
    // lo - q > 0 below the box, q - hi > 0 above it, both <= 0 inside; -fl(a - b) is
    // fl(b - a), so the square is that of the key's difference at the box's face.
    box_box_lb(q, q, bx)
}

/// The exact-search companion of a [`KeyIndex`]: block boxes of every level of curve 0.
pub struct ExactIndex<T> {
    trees: Vec<BoxTree<T>>,
}

/// Most runs of one query: levels of a u32-sized index (chunk 1, 2^32 keys) plus one.
const MAX_RUNS: usize = 34;

/// Most entries per leaf box of the forward's and knn's index (searched in groups). Perf
/// note: see [`ExactIndex::search`].
pub const LEAF: usize = 192;

/// Most entries per leaf box of the KV cache's runs (one query at a time). With the fixed
/// blocks of before, 64 beat 128 there (8-head exact decode step at S = 1M 38-39 us against
/// 40-43 us); with radix leaves, per head at S = 1M - 64 and 1M (two interleaved rounds):
/// 64: 8.3-8.6 / 8.9-9.0 us, 128: 7.8-8.1 / 8.3-8.5 us, 192: 7.4-7.8 / 7.1-7.6 us (the fixed
/// blocks of 64: 9.0-9.2 / 9.2-9.8 us).
pub const RUN_LEAF: usize = 192;

/// The k-th distance is brought up to date after a leaf once this many more than k
/// candidates are kept (a merge of the new keys into the sorted best, or a select over
/// ~k + SLACK keys without AVX2). With the merge (grouped `exact_timing`, per query,
/// two interleaved rounds): SLACK 0 / 8 / 16 / 32: 1.30-1.31 / 1.29-1.31 / 1.33-1.34 /
/// 1.37 us; with the select 16 had won.
const SLACK: usize = 8;

/// Per-thread scratch of [`ExactIndex::search`] (the descent's stack), reused across queries.
pub struct Scratch<T> {
    stack: Vec<(usize, T)>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            stack: Vec::with_capacity(160),
        }
    }
}

/// Most queries searched together by [`ExactIndex::search_group`].
///
/// Perf note (2026-12-04, a Zen 3 VM): 32 against 16, grouped `exact_timing` (N = 64k, window
/// 64, leaf 192, three alternated runs of two test binaries) 2.41-2.47 -> 2.34-2.42 us per
/// query; `zeta.attention` at N = 32k, H = 8 (both sizes in one process, alternated per
/// call, outputs equal): paired time ratio 0.969 / 0.993 (two runs of 16 pairs, 2 threads),
/// 0.987 (10 pairs, one thread). The wider group box prunes fewer nodes, but one walk serves
/// twice the queries.
pub const GROUP: usize = 32;
const _: () = assert!(GROUP <= 32, "a group's leaf hits are a u32 mask");

/// Per-thread state of [`ExactIndex::search_block`].
pub struct Batch<T: Real> {
    /// The top-k of each query of a group.
    tks: Vec<TopK<T>>,
    sc: Scratch<T>,
    /// (level of the run, query id, last visible position) of a block's grouped queries.
    plan: Vec<(u32, u32, u32)>,
    qs: Vec<T>,
    lims: Vec<u32>,
}

impl<T: Float + Real> Batch<T> {
    /// For top-`k` searches (multiplicity 1).
    pub fn new(k: usize) -> Self {
        Batch {
            tks: (0..GROUP).map(|_| TopK::new(k, 1)).collect(),
            sc: Scratch::default(),
            plan: Vec::new(),
            qs: Vec::new(),
            lims: Vec::new(),
        }
    }
}

/// The lower bound of [`box_lb`] for every query inside the box `qlo..=qhi` at once: per
/// coordinate the gap to the nearest query, which is no larger (in floats too: subtraction
/// rounds monotonically) than any one query's gap.
#[inline(always)]
fn box_box_lb<T: Float, const D: usize>(qlo: &[T; D], qhi: &[T; D], bx: &[T]) -> T {
    let mut s = T::zero();
    for i in 0..D {
        let (a, b) = (bx[i] - qhi[i], qlo[i] - bx[D + i]);
        let g = if a > b { a } else { b };
        let g = if g > T::zero() { g } else { T::zero() };
        s = s + g * g;
    }
    s
}

impl<T: Float + Real> ExactIndex<T> {
    pub fn build(ix: &KeyIndex<T>) -> Result<Self> {
        Self::build_with(ix, LEAF)
    }

    /// With leaves of at most `leaf` entries (0 counts as 1).
    pub fn build_with(ix: &KeyIndex<T>, leaf: usize) -> Result<Self> {
        let dk = ix.dk;
        let tree = &ix.curves[0];
        let causal = ix.params.causal;
        let chunk = ix.params.chunk;
        let n_chunks = tree.levels.first().map_or(0, |e| e.len() / chunk);
        let trees = tree
            .levels
            .par_iter()
            .zip(tree.coords.par_iter())
            .enumerate()
            .map(|(l, (e, c))| {
                // A causal level holds runs of 2^l chunks, of which the search reads few;
                // without causality, one run.
                if causal {
                    let keep = exact_runs(n_chunks, l);
                    BoxTree::build(e, c, dk, leaf, chunk << l, Some(&keep))
                } else {
                    BoxTree::build(e, c, dk, leaf, e.len(), None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ExactIndex { trees })
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.trees.iter().map(BoxTree::nbytes).sum()
    }

    /// Offers `tk` every key that can be among the `topk` nearest of a query at absolute
    /// position `p` (causal) or of all keys, by (d2, position), so that `tk` ends up holding
    /// exactly the brute-force answer. `tk` must be empty; positions are offered at most
    /// once (multiplicity 1).
    ///
    /// Perf notes (N = 64k causal Gaussian, d_k = 3, top-32, one thread, `exact_timing`
    /// below; the window search with window 32 took 1.3-1.9 us per query in the same runs):
    /// - ~5.5 us per query, ~4x the window search: ~150 tree nodes and ~40 leaves of 32
    ///   entries (~1,300 distances, against ~650 for the window) per query. Most of them are
    ///   in the largest runs: the box of a Z-order block is wider than a cell, and the ball
    ///   of the window's k-th distance (1.3x the final radius with window 32, 1.6x with 16,
    ///   2.2x with 8) meets several.
    /// - leaf 32 beat 16 (more nodes, fewer distances: +10%) and 8 (+35%); 64 was even.
    ///   Node visits, not distances, dominate: a node is two box bounds and a hard-to-predict
    ///   branch. Since the AVX2 distance scan (`simd::dist3_mask`) leaf 64 beats 32:
    ///   3.8 vs 4.3 us here, 617-626 vs 673-698 ms for `zeta.attention(exact=True)` at
    ///   N = 32k, H = 8 (interleaved runs); 128 was within noise of 64.
    /// - windows 8 / 16 / 32: 6.0 / 5.6 / 5.5 us: a tighter first radius pays for itself.
    /// - bringing the k-th distance up to date after every leaf (a select over k + SLACK
    ///   keys) cut leaves by 15% but the selects cost as much; SLACK = 16 won by ~5%.
    /// - the descent's stack in per-thread scratch instead of a zeroed array per run: -5%.
    /// - walking down the nearer child instead of pushing both children and popping one:
    ///   -15% (5.7-5.9 -> 4.9-5.1 us; leaf 32 still beat 16 and 64 after it).
    ///
    /// - one run with its invisible keys dropped (the smallest aligned block that holds the
    ///   query's keys) instead of the ~log2(c) dyadic runs of its chunk index `c` plus the
    ///   own chunk, the window on that run only: 4.1 -> 2.8 us (window 64, leaf 64; ~20
    ///   leaves and ~55 nodes per query); `zeta.attention(exact=True)` at N = 32k, H = 8:
    ///   ~600 -> ~470 ms. The wider window pays now that there is one: windows 32 / 64 / 128
    ///   (leaf 64, final code) 2.72 / 2.46 / 2.72 us alone, 2.60 / 2.23 / 2.22 us in groups;
    ///   no window (the descent from r = inf): 5.7 us.
    /// - a top-k kept sorted (insertion per accepted key, always the tightest r) instead of
    ///   the select once k + SLACK are kept: 4% fewer leaves, no faster.
    /// - queries in groups ([`ExactIndex::search_group`], the forward and knn): see
    ///   `Searcher::run_block` in attention.rs; 2.46 -> 2.2 us.
    /// - leaves cut at Morton cell boundaries (32-64 entries, cut where the code changes in
    ///   its highest bit: a fixed block that crosses a high cell boundary has a box as wide
    ///   as that cell): 25% fewer leaves and 43% fewer keys scanned per query, but no faster,
    ///   alone or in groups (interleaved runs); not kept. Only ~6 of the ~20 leaves a query
    ///   scans improve its k-th distance.
    /// - the select once k + SLACK keys are kept: SLACK 8 / 16 / 32 / 64 all within noise.
    /// - a leaf's bounds for all members of a group in one pass over the members' coordinates
    ///   by dimension (vectorised; the same float operations as [`box_lb`]) and the members'
    ///   k-th distances kept in an array (the group radius a max over it): groups of 16,
    ///   window 64: leaf 64 2.35 -> 2.12 us, leaf 128 2.19 -> 2.05 us per query (interleaved
    ///   binaries); with it leaf 128 beats 64 / 96 / 192 / 256 (2.09 vs 2.12 / 2.20 / 2.13 /
    ///   2.14 us), and window 64 beats 32 / 48 / 96 (2.43 / 2.17 / 2.16 us). Of the 2.1 us,
    ///   the windows (scan, lower bound, selects) take 0.75 us; selects and the final sort
    ///   are ~30% of the whole.
    /// - not kept after it: leaves of 32 or 64 keys tested in one pass per walk leaf of 128
    ///   or 256 (finer pruning without more tree nodes): 2.42-2.48 / 2.18-2.26 us vs 2.18-2.20;
    ///   a top-k cut at 48 / 64 / 96 kept keys instead of 128: 2.33 / 2.18 / 2.12 vs 2.06 us;
    ///   the first bound from the inner window's largest kept key (no select): no faster.
    ///
    /// - radix leaves ([`BoxTree`]: split at the highest differing code bit, leaves of at
    ///   most `leaf` entries) instead of fixed blocks in a complete tree: per query 8.2 leaves
    ///   and 712 keys scanned instead of 15.6 and 2,001 (leaf 128; counted once by counters
    ///   in the group's leaf callback, not kept), and the group search
    ///   2.05-2.07 -> 1.82-1.84 us (leaf 128), 1.74-1.80 us (leaf 192; 256: 1.75 us; 64:
    ///   1.94 us); alone 2.55 -> 2.14-2.21 us. `zeta.attention` at N = 32k, H = 8
    ///   (interleaved `.so` builds): 350-362 -> 331-339 ms (leaf 192), 335-352 ms (128).
    ///   Fewer keys did not pay 1:1: the windows and the selects are now most of a query.
    /// - the top-k's cuts as a merge of the new keys into the best 32 kept sorted in
    ///   AVX-512 registers (sorting networks, `sortnet.rs`) instead of a select over ~48
    ///   keys: grouped 1.80 -> 1.33 us per query, the 1-curve window-32 search 1.28-1.34 ->
    ///   0.95-0.97 us (interleaved test binaries, two rounds). After it, windows 32 / 48 /
    ///   64 / 96: 1.26 / 1.25 / 1.29 / 1.34 us; leaves 128 / 192 / 256: 1.33 / 1.29 /
    ///   1.29 us (window 64 and leaf 192 kept: within 3%).
    ///
    /// - coordinates and boxes built only for the runs the search reads
    ///   ([`exact_runs`]: the prefix block of each level, plus the tail's blocks when the
    ///   chunk count is not a power of two) instead of every run of every level; the entries
    ///   of every run are still merged (a level is made from the one below). One head of
    ///   N = 32k, one thread (`exact_index_build_timing`, 2026-12-03, a Zen 5 VM): key index
    ///   4.5 -> 2.95 ms, boxes 1.9 -> 0.44 ms. `zeta.attention` at N = 32k, H = 8, the two
    ///   builds interleaved in one process (15 calls each, both orders, outputs equal; with
    ///   the branch-free merge of the commit before): best 202-205 -> 189-195 ms, median
    ///   211 -> 197-199 ms.
    ///
    /// Not tried yet: SIMD box bounds (AVX2, 8 children per node); the prefix blocks sorted
    /// directly instead of merged up from every run (the merges are ~1.7 ms of the 2.95).
    pub fn search(
        &self,
        ix: &KeyIndex<T>,
        q: &[T],
        p: usize,
        k: &[T],
        tk: &mut TopK<T>,
        sc: &mut Scratch<T>,
    ) {
        let st = &mut sc.stack;
        with_dims!(q.len(), D => self.search_d::<D>(ix, q, p, k, tk, st))
    }

    fn search_d<const D: usize>(
        &self,
        ix: &KeyIndex<T>,
        q: &[T],
        p: usize,
        k: &[T],
        tk: &mut TopK<T>,
        stack: &mut Vec<(usize, T)>,
    ) {
        debug_assert_eq!(q.len(), D);
        let prm = &ix.params;
        let tree = &ix.curves[0];
        let qa: [T; D] = std::array::from_fn(|i| q[i]);
        let qcode = ix.grids[0].code(q) as u32;
        let mut run =
            |(l, a, b, lim): (usize, usize, usize, u32), first: bool, tk: &mut TopK<T>| {
                let level = RunView {
                    entries: &tree.levels[l],
                    coords: &tree.coords[l],
                    fence: &[],
                };
                // The first run's window gives a first k-th distance (the rest start from it).
                let mut win = (b, b);
                if first && prm.window > 0 {
                    let probe = [Probe {
                        run: run_view(tree, l, a, b, D),
                        qcode,
                    }];
                    let mut f = Upto { tk: &mut *tk, lim };
                    scan_probes_ranges(&probe, q, prm.window, &mut f, |_, lo, hi| {
                        win = (a + lo, a + hi)
                    });
                    tk.tighten();
                }
                Self::descend::<D>(&self.trees[l], &level, &qa, (a, b), win, lim, tk, stack);
            };
        if !prm.causal {
            if !tree.levels.is_empty() {
                run((0, 0, tree.levels[0].len(), u32::MAX), true, tk);
            }
            return;
        }
        // The runs that hold the visible keys, as (level, first entry, end, last visible
        // position); the own chunk scanned whole when no run holds it.
        let chunk = prm.chunk;
        let c = p / chunk;
        let n_chunks = tree.levels.first().map_or(0, |e| e.len() / chunk);
        let mut first = true;
        let holds_own = visible_blocks(c, n_chunks, |l, a, b, own| {
            let lim = if own { p as u32 } else { u32::MAX };
            run((l, a * chunk, b * chunk, lim), first, tk);
            first = false;
        });
        if !holds_own {
            offer_rows(q, k, c * chunk..p + 1, &mut Upto { tk, lim: u32::MAX });
        }
    }

    /// The level `l` of the one run that holds every key a query at position `p` may see,
    /// [`ExactIndex::prefix_run`]`(l)`, and the last visible position, when the index has
    /// that run (the first choice of [`ExactIndex::search`]); None: search the query alone.
    pub fn single_run(&self, ix: &KeyIndex<T>, p: usize) -> Option<(usize, u32)> {
        let tree = &ix.curves[0];
        let prm = &ix.params;
        if !prm.causal {
            return (!tree.levels.is_empty()).then_some((0, u32::MAX));
        }
        let c = p / prm.chunk;
        if c == 0 {
            return None;
        }
        let l = (usize::BITS - c.leading_zeros()) as usize;
        let end = (1usize << l) * prm.chunk;
        (l < tree.levels.len() && end <= tree.levels[l].len()).then_some((l, p as u32))
    }

    /// The run `(level, first entry, end)` of [`ExactIndex::single_run`]'s level `l`: the
    /// first block of that level (the whole sorted keys without causality).
    fn prefix_run(ix: &KeyIndex<T>, l: usize) -> (usize, usize, usize) {
        let prm = &ix.params;
        if prm.causal {
            (l, 0, (1usize << l) * prm.chunk)
        } else {
            (0, 0, ix.curves[0].levels[0].len())
        }
    }

    /// [`ExactIndex::search`] of the queries `ids` (`query(id)` = its coordinates and
    /// position), calling `f(id, top-k)` with each one's brute-force top-k. Queries whose
    /// keys lie in one run are searched in groups of [`GROUP`] with the same run, in the
    /// order of `ids` otherwise (pass them in curve order: a group then shares its blocks).
    pub fn search_block<'q>(
        &self,
        ix: &KeyIndex<T>,
        ids: &[u32],
        query: impl Fn(u32) -> (&'q [T], usize),
        k: &[T],
        bt: &mut Batch<T>,
        mut f: impl FnMut(u32, &mut TopK<T>),
    ) where
        T: 'q,
    {
        let Batch {
            tks,
            sc,
            plan,
            qs,
            lims,
        } = bt;
        plan.clear();
        for &id in ids {
            let (q, p) = query(id);
            match self.single_run(ix, p) {
                Some((l, lim)) => plan.push((l as u32, id, lim)),
                None => {
                    tks[0].clear();
                    self.search(ix, q, p, k, &mut tks[0], sc);
                    f(id, &mut tks[0]);
                }
            }
        }
        plan.sort_by_key(|x| x.0); // stable: curve order within a run
        let dk = ix.dk;
        for same in plan.chunk_by(|x, y| x.0 == y.0) {
            let run = Self::prefix_run(ix, same[0].0 as usize);
            for grp in same.chunks(GROUP) {
                qs.clear();
                lims.clear();
                for &(_, id, lim) in grp {
                    qs.extend_from_slice(&query(id).0[..dk]);
                    lims.push(lim);
                }
                self.search_group(ix, run, qs, lims, tks, sc);
                for (&(_, id, _), tk) in grp.iter().zip(tks.iter_mut()) {
                    f(id, tk);
                }
            }
        }
    }

    /// [`ExactIndex::search`] of up to [`GROUP`] queries whose keys all lie in one run
    /// (`run` and their `lims`, from [`ExactIndex::single_run`]): `qs` holds their
    /// coordinates (d_k each), `tks[i]` ends up with query i's brute-force top-k. Each query
    /// takes its own window, then the box tree is walked once for the group (a node is left
    /// when its bound to the group's box exceeds every query's k-th distance) and each leaf
    /// is scanned for the queries whose own bound it meets.
    pub fn search_group(
        &self,
        ix: &KeyIndex<T>,
        run: (usize, usize, usize),
        qs: &[T],
        lims: &[u32],
        tks: &mut [TopK<T>],
        sc: &mut Scratch<T>,
    ) {
        let st = &mut sc.stack;
        with_dims!(ix.dk, D => self.search_group_d::<D>(ix, run, qs, lims, tks, st))
    }

    fn search_group_d<const D: usize>(
        &self,
        ix: &KeyIndex<T>,
        (l, a, b): (usize, usize, usize),
        qs: &[T],
        lims: &[u32],
        tks: &mut [TopK<T>],
        stack: &mut Vec<(usize, T)>,
    ) {
        let g = lims.len();
        assert!(g <= GROUP && qs.len() == g * D && tks.len() >= g);
        let tree = &ix.curves[0];
        let prm = &ix.params;
        let mut wins = [(b, b); GROUP];
        let mut qa = [[T::zero(); D]; GROUP];
        let mut qlo = [T::infinity(); D];
        let mut qhi = [T::neg_infinity(); D];
        let view = run_view(tree, l, a, b, D);
        for i in 0..g {
            let q = &qs[i * D..(i + 1) * D];
            for j in 0..D {
                qa[i][j] = q[j];
                qlo[j] = if q[j] < qlo[j] { q[j] } else { qlo[j] };
                qhi[j] = if q[j] > qhi[j] { q[j] } else { qhi[j] };
            }
            let tk = &mut tks[i];
            tk.clear();
            if prm.window > 0 {
                let probe = [Probe {
                    run: view,
                    qcode: ix.grids[0].code(q) as u32,
                }];
                let lim = lims[i];
                let mut f = Upto { tk: &mut *tk, lim };
                let inner = (prm.window / 4).max(1);
                let (mut lo, mut hi) = (0, 0);
                scan_probes_ranges(&probe, q, inner, &mut f, |_, l0, h0| (lo, hi) = (l0, h0));
                tk.tighten();
                let ext = prm.window - inner;
                let (lo2, hi2) = (lo.saturating_sub(ext), (hi + ext).min(b - a));
                let mut f = Upto { tk: &mut *tk, lim };
                view.scan_range(q, lo2, lo, &mut f);
                view.scan_range(q, hi, hi2, &mut f);
                tk.tighten();
                wins[i] = (a + lo2, a + hi2);
            }
        }
        let bt = &self.trees[l];
        let level = RunView {
            entries: &tree.levels[l],
            coords: &tree.coords[l],
            fence: &[],
        };
        // The members' coordinates by dimension and their k-th distances (slots past `g`:
        // -inf, so that no box is ever within their radius), for a leaf's bounds of all
        // members in one vectorisable pass.
        let mut qt = [[T::zero(); GROUP]; D];
        let mut rad = [T::neg_infinity(); GROUP];
        for i in 0..g {
            for j in 0..D {
                qt[j][i] = qa[i][j];
            }
            rad[i] = tks[i].bound();
        }
        // The largest k-th distance of the group: a node farther than it from the group's
        // box holds no key for any of them.
        let radius = |st: &(&mut [TopK<T>], [T; GROUP])| {
            st.1.iter()
                .fold(T::neg_infinity(), |m, &r| if r > m { r } else { m })
        };
        let mut st = (tks, rad);
        bt.walk(
            (a, b),
            2 * D,
            stack,
            &mut st,
            |bx| box_box_lb(&qlo, &qhi, bx),
            radius,
            |(tks, rad), bx, s0, s1| {
                // Every member's bound to the leaf's box ([`box_lb`], the same operations).
                let mut lb = [T::zero(); GROUP];
                for j in 0..D {
                    let (lo, hi) = (bx[j], bx[D + j]);
                    for i in 0..GROUP {
                        let (x, y) = (lo - qt[j][i], qt[j][i] - hi);
                        let gp = if x > y { x } else { y };
                        let gp = if gp > T::zero() { gp } else { T::zero() };
                        lb[i] = lb[i] + gp * gp;
                    }
                }
                // Inputs are finite: no bound is NaN (an empty box's is +inf).
                let mut hit = 0u32;
                for i in 0..GROUP {
                    hit |= u32::from(lb[i] <= rad[i]) << i;
                }
                while hit != 0 {
                    let i = hit.trailing_zeros() as usize;
                    hit &= hit - 1;
                    let tk = &mut tks[i];
                    let (wlo, whi) = wins[i];
                    let q = &qs[i * D..(i + 1) * D];
                    let mut f = Upto {
                        tk: &mut *tk,
                        lim: lims[i],
                    };
                    level.scan_range(q, s0, s1.min(wlo).max(s0), &mut f);
                    level.scan_range(q, whi.max(s0).min(s1), s1, &mut f);
                    tk.tighten_over(SLACK);
                    rad[i] = tk.bound();
                }
            },
        );
    }

    /// Scans the blocks of entries `a..b` of one level that can hold a top-k key, except
    /// the entries `wlo..whi` (already offered), dropping the positions after `lim`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn descend<const D: usize>(
        bt: &BoxTree<T>,
        level: &RunView<'_, T>,
        q: &[T; D],
        (a, b): (usize, usize),
        (wlo, whi): (usize, usize),
        lim: u32,
        tk: &mut TopK<T>,
        stack: &mut Vec<(usize, T)>,
    ) {
        bt.walk(
            (a, b),
            2 * D,
            stack,
            tk,
            |bx| box_lb(q, bx),
            |tk| tk.bound(),
            |tk, _, s0, s1| {
                // Most keys of a leaf at the ball's edge lie outside it: the scan compares
                // them with the k-th distance known now (`tk`'s bound) before the top-k's
                // store (which filters again, exactly, with ties by position).
                let mut f = Upto { tk: &mut *tk, lim };
                level.scan_range(q, s0, s1.min(wlo).max(s0), &mut f);
                level.scan_range(q, whi.max(s0).min(s1), s1, &mut f);
                tk.tighten_over(SLACK);
            },
        );
    }
}

/// Exact search over separate sorted runs, each with its own box tree (the KV cache's runs
/// of curve 0): the window of every run and `own` (the keys outside the runs, offered to
/// `tk` by the caller) give a first k-th distance, then every block whose box meets its
/// ball is scanned. `tk` must be empty (multiplicity 1) and ends up holding the brute-force
/// top-k of the runs' keys and `own`'s, by (d2, position). At most [`MAX_RUNS`] runs.
#[allow(clippy::too_many_arguments)]
pub fn search_runs<T: Float + Real>(
    runs: &[(RunView<'_, T>, &BoxTree<T>)],
    qcode: u32,
    q: &[T],
    window: usize,
    own: impl FnOnce(&mut TopK<T>),
    tk: &mut TopK<T>,
    sc: &mut Scratch<T>,
) {
    with_dims!(q.len(), D => search_runs_d::<T, D>(runs, qcode, q, window, own, tk, sc))
}

fn search_runs_d<T: Float + Real, const D: usize>(
    runs: &[(RunView<'_, T>, &BoxTree<T>)],
    qcode: u32,
    q: &[T],
    window: usize,
    own: impl FnOnce(&mut TopK<T>),
    tk: &mut TopK<T>,
    sc: &mut Scratch<T>,
) {
    debug_assert_eq!(q.len(), D);
    assert!(
        runs.len() <= MAX_RUNS,
        "more runs than a u32-sized cache has"
    );
    let nr = runs.len();
    let mut probes = [Probe {
        run: RunView {
            entries: &[],
            coords: &[],
            fence: &[],
        },
        qcode,
    }; MAX_RUNS];
    for (pr, (rv, _)) in probes.iter_mut().zip(runs) {
        pr.run = *rv;
    }
    let mut win = [(0usize, 0usize); MAX_RUNS];
    scan_probes_ranges(&probes[..nr], q, window, tk, |i, lo, hi| win[i] = (lo, hi));
    own(tk);
    let qa: [T; D] = std::array::from_fn(|i| q[i]);
    tk.tighten();
    for ((rv, bt), &w) in runs.iter().zip(&win[..nr]) {
        let level = RunView {
            entries: rv.entries,
            coords: rv.coords,
            fence: &[],
        };
        let n = rv.entries.len();
        ExactIndex::descend::<D>(bt, &level, &qa, (0, n), w, u32::MAX, tk, &mut sc.stack);
    }
}

/// The blocks of a causal index over `n_chunks` whole chunks that hold every key a query
/// in chunk `c` may see, as `f(level, first chunk, end chunk, own)`, in order from chunk 0:
/// the chunks before `c` split at the set bits of `c` (whole runs of their levels), except
/// that as soon as the aligned block of `2^l` chunks that holds all the rest (chunk `c`
/// included) is a run of the index, that block comes instead (`own`: it holds the query's
/// own chunk, so the positions after the query's must be dropped from it). More than
/// `2^(l-1)` of its chunks are visible, so at most half of its keys are scanned for
/// nothing, and one descent replaces up to `l + 1` of them. Returns whether the last block
/// holds chunk `c` (else the own chunk lies outside every block).
#[inline(always)]
fn visible_blocks(c: usize, n_chunks: usize, mut f: impl FnMut(usize, usize, usize, bool)) -> bool {
    let mut start = 0usize;
    while start < c {
        let rem = c - start;
        // 2^(l-1) <= rem < 2^l; `start` is a multiple of 2^l, so level l has a run there
        // when it ends inside the index.
        let l = (usize::BITS - rem.leading_zeros()) as usize;
        if start + (1 << l) <= n_chunks {
            f(l, start, start + (1 << l), true);
            return true;
        }
        let t = l - 1;
        f(t, start, start + (1 << t), false);
        start += 1 << t;
    }
    false
}

/// Which runs of level `l` of a causal index over `n_chunks` whole chunks the exact search
/// reads (`[j]` for run `j`, `n_chunks >> l` of them): run 0, and a run that starts where
/// the chunk count with its bits below some `m >= l` cleared does. A block of
/// [`visible_blocks`] that is not a prefix starts past whole blocks `[S, S + 2^t)` each with
/// `S + 2^(t+1) > n_chunks`, i.e. `S` is `n_chunks` rounded down to a multiple of `2^(t+1)`;
/// so at most `log2(n_chunks) + 2` runs per level, against `n_chunks >> l` (the
/// `visible_blocks_are_exact_runs` test checks every query chunk of every count to 1,100).
pub(crate) fn exact_runs(n_chunks: usize, l: usize) -> Vec<bool> {
    let n_runs = n_chunks.checked_shr(l as u32).unwrap_or(0);
    let mut keep = vec![false; n_runs];
    if n_runs == 0 {
        return keep;
    }
    keep[0] = true;
    for m in l..usize::BITS as usize {
        let j = (n_chunks >> m) << (m - l);
        if j < n_runs {
            keep[j] = true;
        }
    }
    keep
}

/// A [`TopK`] that drops the positions after `lim` (the invisible keys of a run that holds
/// the query's own chunk).
struct Upto<'a, T: Real> {
    tk: &'a mut TopK<T>,
    lim: u32,
}

impl<T: Float + Real> Offer<T> for Upto<'_, T> {
    #[inline(always)]
    fn offer(&mut self, pos: u32, d2: T) {
        self.tk.push_if(pos, d2, pos <= self.lim)
    }
    #[inline(always)]
    fn bound(&self) -> T {
        self.tk.bound()
    }
    #[inline(always)]
    fn offer_mask(&mut self, m: u64, d2: &[T], pos: impl Fn(usize) -> u32) {
        self.tk.push_mask(m, d2, pos, self.lim)
    }
    #[inline(always)]
    fn offer_rows3(&mut self, q: &[T; 3], coords: &[T], entries: &[u64]) {
        if !self.tk.push_rows3(q, coords, entries, self.lim) {
            crate::index::offer_block::<T, 3>(q, coords, |j| unpack_pos(entries[j]), self);
        }
    }
}

/// The run of entries `a..b` of level `l` (its fence when it starts on a fence stride).
fn run_view<T>(tree: &CurveTree<T>, l: usize, a: usize, b: usize, dk: usize) -> RunView<'_, T> {
    let fence: &[u32] = if a.is_multiple_of(FENCE) {
        &tree.fences[l][a / FENCE..b.div_ceil(FENCE)]
    } else {
        &[]
    };
    RunView {
        entries: &tree.levels[l][a..b],
        coords: &tree.coords[l][a * dk..b * dk],
        fence,
    }
}

#[cfg(test)]
mod tests {
    use crate::attention::{exact_knn, knn_with, Search, Shape};
    use crate::index::Params;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Uniform in [0, 1).
        fn unif(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.unif().max(1e-300), self.unif());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    /// Point sets that break heuristics: duplicates, all equal, grid points (on cell edges
    /// of the index's grid), clusters, heavy tails, huge and tiny scales.
    fn adversarial(kind: usize, n: usize, dk: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n * dk)
            .map(|i| {
                let x = match kind {
                    0 => rng.normal(),
                    1 => (rng.next() % 3) as f64 - 1.0, // few distinct values
                    2 => 0.25,                          // all keys equal
                    3 => (rng.next() % 9) as f64 / 4.0 - 1.0, // grid / cell edges
                    4 => ((i / dk) % 4) as f64 * 3.0 + 1e-3 * rng.normal(), // clusters
                    5 => rng.normal() / rng.unif().max(1e-6), // heavy tail (Cauchy-like)
                    6 => rng.normal() * 1e18,           // huge: d2 overflows to inf
                    7 => rng.normal() * 1e-20,          // tiny: d2 underflows to 0
                    _ => (rng.next() % 2) as f64 * 1e30, // huge and duplicate
                };
                x as f32
            })
            .collect()
    }

    /// Exact search equals brute force (indices and distances, ties by position) on every
    /// kind of input, causal and not, for chunk sizes on and off the fence stride.
    #[test]
    fn exact_equals_brute_force_on_adversarial_inputs() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut checked = 0;
        for kind in 0..9 {
            for &(dk, s, n, chunk, window, topk) in &[
                (3usize, 700usize, 700usize, 64usize, 4usize, 8usize),
                (3, 1000, 300, 8, 1, 32),
                (2, 513, 513, 100, 2, 5),
                (1, 300, 300, 1, 1, 3),
                (4, 400, 50, 64, 32, 64),
                (8, 200, 200, 16, 3, 7),
                (3, 130, 130, 64, 1, 200),
                // 16 chunks (the prefix blocks are runs up to the whole) and 17 plus a
                // partial chunk (the tail's queries search whole runs, then a block)
                (3, 1024, 1024, 64, 8, 32),
                (3, 1093, 1093, 64, 16, 16),
            ] {
                for causal in [true, false] {
                    let sh = Shape {
                        b: 1,
                        h: 2,
                        hkv: 1,
                        n,
                        s,
                        dk,
                        dv: 1,
                    };
                    let prm = Params {
                        chunk,
                        window,
                        n_curves: 2.min(dk + 1),
                        n_sink: 2,
                        causal,
                        bits: (32 / dk as u32).min(10),
                        scale: 1.0,
                    };
                    let k = adversarial(kind, s, dk, &mut rng);
                    let q = adversarial(kind, 2 * n, dk, &mut rng);
                    let (gi, gd) = knn_with(&sh, &prm, Search::Exact, topk, &q, &k).unwrap();
                    let (wi, wd) = exact_knn(&sh, causal, topk, &q, &k).unwrap();
                    assert_eq!(
                        gi, wi,
                        "kind={kind} dk={dk} s={s} chunk={chunk} causal={causal}"
                    );
                    let same = gd.iter().zip(&wd).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "distances differ: kind={kind} dk={dk} causal={causal}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 9 * 9 * 2);
    }

    /// The blocks every query chunk searches are runs of the index that
    /// [`super::exact_runs`] keeps (the only ones whose coordinates and boxes are built),
    /// and they cover exactly the chunks it may see.
    #[test]
    fn visible_blocks_are_exact_runs() {
        for n_chunks in 0..=1100usize {
            let keep: Vec<Vec<bool>> = (0..=12).map(|l| super::exact_runs(n_chunks, l)).collect();
            for (l, kp) in keep.iter().enumerate() {
                assert_eq!(kp.len(), n_chunks >> l);
                let kept = kp.iter().filter(|&&x| x).count();
                assert!(
                    kept <= 13,
                    "n_chunks {n_chunks} level {l}: {kept} runs kept"
                );
            }
            // Queries lie in chunks 0..=n_chunks (the last: a partial chunk past the index).
            for c in 0..=n_chunks {
                let mut next = 0;
                let holds = super::visible_blocks(c, n_chunks, |l, a, b, own| {
                    assert_eq!(a, next, "blocks in order, no gap");
                    assert_eq!(b - a, 1 << l);
                    assert_eq!(a % (1 << l), 0, "aligned: a run of level {l}");
                    assert!(b <= n_chunks, "inside the index");
                    assert!(
                        keep[l][a >> l],
                        "n_chunks {n_chunks}, c {c}: run {} of level {l}",
                        a >> l
                    );
                    assert_eq!(own, c < b, "own: the block holds chunk c");
                    assert!(own || b <= c);
                    next = b;
                });
                if holds {
                    assert!(next > c);
                } else {
                    assert_eq!(next, c, "whole blocks up to the own chunk");
                }
            }
        }
    }

    /// Every run's tree: leaves cover the run in order with at most `leaf` entries each, a
    /// node's box is the tight box of its entries, and an inner node splits its entries
    /// where their codes first differ (or, for equal codes, in halves).
    #[test]
    fn box_tree_splits_runs_into_cells() {
        let mut rng = Rng(5);
        let dk = 3;
        for (n, run_len, leaf, dup) in [
            (1000usize, 256usize, 16usize, false),
            (1000, 1000, 7, true),
            (777, 100, 1, false),
            (64, 64, 200, false),
        ] {
            let mut e: Vec<u64> = (0..n)
                .map(|p| {
                    let code = if dup {
                        (rng.next() % 3) as u32
                    } else {
                        rng.next() as u32
                    };
                    crate::index::pack(code, p as u32)
                })
                .collect();
            for r in e.chunks_mut(run_len) {
                r.sort_unstable();
            }
            let c: Vec<f32> = (0..n * dk).map(|_| rng.normal() as f32).collect();
            let t = super::BoxTree::build(&e, &c, dk, leaf, run_len, None).unwrap();
            assert_eq!(t.roots.len(), n.div_ceil(run_len));
            let w = 2 * dk;
            for (r, &root) in t.roots.iter().enumerate() {
                let (a, b) = (r * run_len, ((r + 1) * run_len).min(n));
                let mut next = a;
                let mut stack = vec![root as usize];
                while let Some(i) = stack.pop() {
                    let [s0, s1, ch] = t.nodes[i];
                    let (s0, s1) = (s0 as usize, s1 as usize);
                    let bx = &t.boxes[i * w..(i + 1) * w];
                    for j in 0..dk {
                        let xs = (s0..s1).map(|p| c[p * dk + j]);
                        assert_eq!(bx[j], xs.clone().fold(f32::INFINITY, f32::min));
                        assert_eq!(bx[dk + j], xs.fold(f32::NEG_INFINITY, f32::max));
                    }
                    if ch == super::LEAF_NODE {
                        assert!(s1 - s0 <= leaf && s0 == next && s0 < s1, "leaf {s0}..{s1}");
                        next = s1;
                        continue;
                    }
                    let ch = ch as usize;
                    let (l, h) = (t.nodes[ch], t.nodes[ch + 1]);
                    assert!(
                        s1 - s0 > leaf
                            && l[0] as usize == s0
                            && l[1] == h[0]
                            && h[1] as usize == s1
                    );
                    let m = l[1] as usize;
                    let code = |p: usize| (e[p] >> 32) as u32;
                    if code(s0) == code(s1 - 1) {
                        assert_eq!(m, s0 + (s1 - s0) / 2);
                    } else {
                        let bit = 31 - (code(s0) ^ code(s1 - 1)).leading_zeros();
                        assert!((s0..m).all(|p| code(p) >> bit & 1 == 0));
                        assert!((m..s1).all(|p| code(p) >> bit & 1 == 1));
                    }
                    stack.push(ch + 1);
                    stack.push(ch);
                }
                assert_eq!(next, b);
            }
        }
        let empty = super::BoxTree::<f32>::build(&[], &[], dk, 8, 64, None).unwrap();
        let mut hits = 0;
        empty.walk(
            (0, 0),
            6,
            &mut Vec::new(),
            &mut (),
            |_| 0.0,
            |_| 1.0,
            |_, _, _, _| hits += 1,
        );
        assert_eq!(hits, 0);
    }

    /// The bound never exceeds the float distance of a point in the box, even where the
    /// rounding of a difference or a square decides (coordinates a few ulps apart).
    #[test]
    fn box_bound_is_below_every_float_distance() {
        let mut rng = Rng(12345);
        for _ in 0..20_000 {
            let scale = [1e-30, 1e-3, 1.0, 3e3, 1e19][(rng.next() % 5) as usize];
            let mut pt = || {
                let x = (rng.normal() * scale) as f32;
                // a few ulps around x
                f32::from_bits((x.to_bits() as i64 + (rng.next() % 5) as i64 - 2) as u32)
            };
            let (a, b, c, q): ([f32; 3], [f32; 3], [f32; 3], [f32; 3]) = (
                std::array::from_fn(|_| pt()),
                std::array::from_fn(|_| pt()),
                std::array::from_fn(|_| pt()),
                std::array::from_fn(|_| pt()),
            );
            let mut bx = [0f32; 6];
            for j in 0..3 {
                bx[j] = a[j].min(b[j]).min(c[j]);
                bx[3 + j] = a[j].max(b[j]).max(c[j]);
            }
            let lb = super::box_lb::<f32, 3>(&q, &bx);
            for x in [a, b, c] {
                let d2 = crate::index::sq_dist(&q, &x);
                assert!(lb <= d2, "lb {lb} > d2 {d2} for q={q:?} x={x:?}");
            }
        }
    }

    /// The leaves a query's ball of its final k-th distance meets, per query, with the
    /// radix box trees and with fixed blocks of as many entries (what the trees replaced):
    /// N = 64k Gaussian 3-D causal, top-32, each query's prefix run. `ZETA_CENSUS_LEAF=128
    /// cargo test --release --lib exact_leaf_census -- --ignored --nocapture` (perf note of
    /// [`super::BoxTree`]).
    #[test]
    #[ignore]
    fn exact_leaf_census() {
        use crate::index::KeyIndex;
        let (n, dk, topk) = (65536usize, 3usize, 32usize);
        let mut rng = Rng(42);
        let k: Vec<f32> = (0..n * dk).map(|_| rng.normal() as f32).collect();
        let q: Vec<f32> = (0..n * dk).map(|_| rng.normal() as f32).collect();
        let prm = timing_params(64);
        let ix = KeyIndex::build(&k, dk, &prm).unwrap();
        let leaf: usize = std::env::var("ZETA_CENSUS_LEAF")
            .map(|v| v.parse().unwrap())
            .unwrap_or(super::LEAF);
        let ex = super::ExactIndex::build_with(&ix, leaf).unwrap();
        // Each query's final k-th distance.
        let ids: Vec<u32> = (0..n as u32).collect();
        let mut batch = super::Batch::new(topk);
        let mut rk = vec![f32::INFINITY; n];
        let mut out = Vec::new();
        let query = |id: u32| (&q[id as usize * dk..(id as usize + 1) * dk], id as usize);
        ex.search_block(&ix, &ids, query, &k, &mut batch, |id, tk| {
            tk.drain_sorted(&mut out);
            rk[id as usize] = out.last().map_or(f32::INFINITY, |x| x.0);
        });
        // Fixed blocks' boxes, per level.
        let blocks: Vec<Vec<f32>> = ix.curves[0]
            .coords
            .iter()
            .map(|c| {
                c.chunks(leaf * dk)
                    .flat_map(|b| {
                        let mut bx = [f32::INFINITY; 6];
                        bx[3..].fill(f32::NEG_INFINITY);
                        super::leaf_box(&mut bx, b, dk);
                        bx
                    })
                    .collect()
            })
            .collect();
        let (mut queries, mut stack) = (0usize, Vec::new());
        let (mut radix, mut fixed) = ([0usize; 2], [0usize; 2]);
        for i in 0..n {
            let Some((l, _)) = ex.single_run(&ix, i) else {
                continue;
            };
            queries += 1;
            let (l, a, b) = super::ExactIndex::<f32>::prefix_run(&ix, l);
            let qa: [f32; 3] = std::array::from_fn(|j| q[i * dk + j]);
            let r = rk[i];
            let lb = |bx: &[f32]| super::box_lb(&qa, bx);
            ex.trees[l].walk(
                (a, b),
                6,
                &mut stack,
                &mut (),
                lb,
                |_| r,
                |_, _, s0, s1| {
                    radix[0] += 1;
                    radix[1] += s1 - s0;
                },
            );
            for (bi, bx) in blocks[l].chunks(6).enumerate() {
                let (s0, s1) = (bi * leaf, ((bi + 1) * leaf).min(b));
                if s0 >= a && s0 < b && lb(bx) <= r {
                    fixed[0] += 1;
                    fixed[1] += s1 - s0;
                }
            }
        }
        let per = |x: usize| x as f64 / queries as f64;
        println!(
            "leaf {leaf}: per query, radix trees {:.2} leaves {:.0} keys; fixed blocks {:.2} \
             leaves {:.0} keys",
            per(radix[0]),
            per(radix[1]),
            per(fixed[0]),
            per(fixed[1])
        );
        assert!(radix[1] > 0 && fixed[1] > 0);
    }

    /// Timing of the exact search against the window search, one thread, N = 64k Gaussian
    /// 3-D causal, top-32, per leaf size and window: `cargo test --release exact_timing --
    /// --ignored --nocapture` (perf notes in [`super::ExactIndex::search`]).
    #[test]
    #[ignore]
    fn exact_timing() {
        use crate::index::KeyIndex;
        use crate::topk::TopK;
        let (n, dk, topk) = (65536usize, 3usize, 32usize);
        let mut rng = Rng(42);
        let k: Vec<f32> = (0..n * dk).map(|_| rng.normal() as f32).collect();
        let q: Vec<f32> = (0..n * dk).map(|_| rng.normal() as f32).collect();
        let prm = timing_params;
        let ix = KeyIndex::build(&k, dk, &prm(32)).unwrap();
        let mut order: Vec<(u64, usize)> = (0..n)
            .map(|i| (ix.grids[0].code(&q[i * dk..(i + 1) * dk]), i))
            .collect();
        order.sort_unstable();
        let mut tk = TopK::<f32>::new(topk, 1);
        let mut sc = super::Scratch::default();
        let mut out = Vec::new();
        // (window, leaf) pairs; ZETA_EXACT_TIMING="64:64,32:128" overrides. Best of 3
        // rounds, the configurations interleaved (this machine's speed drifts).
        let configs: Vec<(usize, usize)> = std::env::var("ZETA_EXACT_TIMING")
            .map(|v| {
                v.split(',')
                    .map(|c| {
                        let (w, l) = c.split_once(':').unwrap();
                        (w.parse().unwrap(), l.parse().unwrap())
                    })
                    .collect()
            })
            .unwrap_or_else(|_| vec![(32, 64), (64, 64), (64, 128), (128, 128)]);
        let built: Vec<_> = configs
            .iter()
            .map(|&(w, l)| {
                let ix = KeyIndex::build(&k, dk, &prm(w)).unwrap();
                let ex = super::ExactIndex::build_with(&ix, l).unwrap();
                (ix, ex)
            })
            .collect();
        let mut base = f64::INFINITY;
        let mut best = vec![(f64::INFINITY, f64::INFINITY); configs.len()];
        let ids: Vec<u32> = order.iter().map(|&(_, i)| i as u32).collect();
        let mut batch = super::Batch::new(topk);
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            for &(_, i) in &order {
                tk.clear();
                ix.for_each_candidate(&q[i * dk..(i + 1) * dk], i, &k, &mut tk);
                tk.drain_sorted(&mut out);
            }
            base = base.min(t0.elapsed().as_secs_f64() * 1e6 / n as f64);
            for ((ix, ex), b) in built.iter().zip(best.iter_mut()) {
                let t0 = std::time::Instant::now();
                // ZETA_EXACT_TIMING_GROUPS_ONLY=1: time only the grouped search.
                let alone = std::env::var("ZETA_EXACT_TIMING_GROUPS_ONLY").is_err();
                for &(_, i) in order.iter().filter(|_| alone) {
                    tk.clear();
                    ex.search(ix, &q[i * dk..(i + 1) * dk], i, &k, &mut tk, &mut sc);
                    tk.drain_sorted(&mut out);
                }
                b.0 = b.0.min(t0.elapsed().as_secs_f64() * 1e6 / n as f64);
                let t0 = std::time::Instant::now();
                for blk in ids.chunks(256) {
                    let query =
                        |id: u32| (&q[id as usize * dk..(id as usize + 1) * dk], id as usize);
                    ex.search_block(ix, blk, query, &k, &mut batch, |_, tk| {
                        tk.drain_sorted(&mut out)
                    });
                }
                b.1 = b.1.min(t0.elapsed().as_secs_f64() * 1e6 / n as f64);
            }
        }
        println!("window 32: {base:.3} us/query");
        for (&(window, leaf), &(t, tg)) in configs.iter().zip(&best) {
            println!(
                "exact window {window} leaf {leaf}: {t:.3} us/query ({:.2}x), in groups of {} {tg:.3} us/query ({:.2}x)",
                t / base,
                super::GROUP,
                tg / base
            );
        }
    }

    /// The causal index of the timing tests: chunk 64, one curve, 10 bits per coordinate.
    fn timing_params(window: usize) -> Params {
        Params {
            chunk: 64,
            window,
            n_curves: 1,
            n_sink: 0,
            causal: true,
            bits: 10,
            scale: 1.0,
        }
    }

    /// Build time of one head's exact-search index, N = 32k uniform 3-D keys, chunk 64,
    /// one thread, best of 40: the key index and box trees of every run of every level
    /// against those of only the runs the search reads: `cargo test --release
    /// exact_index_build_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn exact_index_build_timing() {
        use crate::index::KeyIndex;
        let (n, dk) = (32768usize, 3usize);
        let mut rng = Rng(42);
        let k: Vec<f32> = (0..n * dk).map(|_| rng.unif() as f32 - 0.5).collect();
        let prm = timing_params(64);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            let mut best = [[f64::INFINITY; 2]; 2];
            for _ in 0..40 {
                for (i, runs) in [
                    None,
                    Some(super::exact_runs as fn(usize, usize) -> Vec<bool>),
                ]
                .into_iter()
                .enumerate()
                {
                    let t0 = std::time::Instant::now();
                    let ix = KeyIndex::build_with_runs(&k, dk, &prm, runs).unwrap();
                    let t1 = std::time::Instant::now();
                    if runs.is_some() {
                        std::hint::black_box(super::ExactIndex::build(&ix).unwrap());
                    } else {
                        // What `ExactIndex::build` did before it kept only `exact_runs`.
                        let tree = &ix.curves[0];
                        for (l, (e, c)) in tree.levels.iter().zip(&tree.coords).enumerate() {
                            let run_len = prm.chunk << l;
                            let bt = super::BoxTree::build(e, c, dk, super::LEAF, run_len, None);
                            std::hint::black_box(bt.unwrap());
                        }
                    }
                    best[i][0] = best[i][0].min((t1 - t0).as_secs_f64() * 1e3);
                    best[i][1] = best[i][1].min(t1.elapsed().as_secs_f64() * 1e3);
                }
            }
            for (name, [a, b]) in ["every run", "exact runs"].iter().zip(best) {
                println!("{name}: key index {a:.2} ms, boxes {b:.2} ms");
            }
        });
    }
}
