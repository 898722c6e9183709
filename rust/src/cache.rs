//! The incremental Z-order KV cache for decoding.
//!
//! Per (batch, kv-head) group the cache keeps keys (f32, tiny: d_k ~ 3), values in the
//! cache's dtype (f32, f16 or bf16) and the same dyadic-run index as the parallel forward,
//! built incrementally: the chunk holding the newest token is the *tail* (searched
//! exhaustively); when a token starts a new chunk, the full tail becomes a sorted run of one
//! chunk and equal-sized runs merge like a binary counter. After `T` tokens the runs are
//! exactly the binary decomposition of the tail's chunk index, i.e. the runs the parallel
//! forward searches for the newest token, so decoding step by step gives the same candidates
//! and the same output as one parallel call (tested). `extend` costs amortised
//! O(log T) per token; `attend` for the newest token searches every run plus the tail.
//!
//! Exact search (`attend(exact=True)`) needs no such match: any runs that hold the indexed
//! chunks give the brute-force answer. The cache keeps curve 0 of the same chunks a second
//! time as levelled runs (fan-out [`EXACT_FANOUT`]: at most 6 runs at 1M tokens, against
//! up to 14 dyadic ones) and an exact decode searches whichever list has fewer runs, after
//! scanning the newest [`BRUTE_KEYS`] keys row by row. At S = 1M, just before 2^20 tokens
//! (14 dyadic runs), that took an exact step from 20-31 to 13-14 us per head (interleaved
//! runs of both builds; `bench_decode`'s runs at 1M vary 2x on the VM measured) and from
//! 1.24-1.36x to 0.93-0.97x the window search's time there; it costs ~4% more bytes per
//! token and 5-15% of `extend`'s throughput.
//!
//! Queries that lie in an older chunk than the tail (a multi-token `attend` that spans
//! chunks, e.g. a prefill) need the runs of their own chunk index, which the counter has
//! merged on; the call makes those from the counter's runs (cut out of a run that contains
//! them, or merged from halves), so its work grows with the new tokens, not the cache.
use crate::error::{numel, probe_bytes, try_vec, try_with_capacity, Result, ZetaError};
use crate::exact::{search_runs, BoxTree, Scratch, RUN_LEAF as EXACT_LEAF};

/// Exact search in the cache: the most recent keys, up to this many (whole runs and the
/// own chunk), are scanned row by row instead of searched run by run.
const BRUTE_KEYS: usize = 4096;
use crate::index::{
    fence_of, gather_coords, merge_with_coords, offer_own_and_sinks, offer_rows, sorted_entries,
    sq_dist, unpack_pos, Offer, Params, Probe, ProbeList, RunView, TopK,
};
use crate::quantize::{check_coords, coord_limit, first_bad_coord, first_non_finite, Grid};
use crate::score::{combine, ValueRows};
use crate::simd::RowsEnd;
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::Path;

/// Storage of values.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Values {
    pub fn new(dtype: &str) -> Result<Values> {
        match dtype {
            "float32" => Ok(Values::F32(Vec::new())),
            "float16" => Ok(Values::F16(Vec::new())),
            "bfloat16" => Ok(Values::BF16(Vec::new())),
            _ => Err(ZetaError::value(
                "dtype",
                format!("must be 'float32', 'float16' or 'bfloat16', got {dtype:?}"),
            )),
        }
    }
    pub fn dtype(&self) -> &'static str {
        match self {
            Values::F32(_) => "float32",
            Values::F16(_) => "float16",
            Values::BF16(_) => "bfloat16",
        }
    }
    fn code(&self) -> u8 {
        match self {
            Values::F32(_) => 0,
            Values::F16(_) => 1,
            Values::BF16(_) => 2,
        }
    }
    fn from_code(c: u8) -> Result<Values> {
        match c {
            0 => Ok(Values::F32(Vec::new())),
            1 => Ok(Values::F16(Vec::new())),
            2 => Ok(Values::BF16(Vec::new())),
            _ => Err(ZetaError::Corrupt(format!("unknown value dtype code {c}"))),
        }
    }
    pub fn elem_size(&self) -> usize {
        match self {
            Values::F32(_) => 4,
            _ => 2,
        }
    }
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::BF16(v) => v.len(),
        }
    }
    fn try_reserve(&mut self, n: usize) -> Result<()> {
        let r = match self {
            Values::F32(v) => v.try_reserve(n),
            Values::F16(v) => v.try_reserve(n),
            Values::BF16(v) => v.try_reserve(n),
        };
        r.map_err(|_| ZetaError::Alloc {
            what: "KV cache values",
            n,
        })
    }
    fn truncate(&mut self, n: usize) {
        match self {
            Values::F32(v) => v.truncate(n),
            Values::F16(v) => v.truncate(n),
            Values::BF16(v) => v.truncate(n),
        }
    }
    fn extend_from_f32(&mut self, src: &[f32]) {
        match self {
            Values::F32(v) => v.extend_from_slice(src),
            Values::F16(v) => v.extend(src.iter().map(|&x| f16::from_f32(x))),
            Values::BF16(v) => v.extend(src.iter().map(|&x| bf16::from_f32(x))),
        }
    }
}

impl ValueRows<f32> for Values {
    #[inline]
    fn prefetch_row(&self, pos: usize, dv: usize) {
        match self {
            Values::F32(v) => v[..].prefetch_row(pos, dv),
            Values::F16(v) => v[..].prefetch_row(pos, dv),
            Values::BF16(v) => v[..].prefetch_row(pos, dv),
        }
    }
    #[inline]
    fn axpy_rows(
        &self,
        rows: &[(f32, u32)],
        acc: &mut [f32],
        fresh: bool,
        end: Option<RowsEnd<'_, f32>>,
    ) {
        match self {
            Values::F32(v) => v[..].axpy_rows(rows, acc, fresh, end),
            Values::F16(v) => v[..].axpy_rows(rows, acc, fresh, end),
            Values::BF16(v) => v[..].axpy_rows(rows, acc, fresh, end),
        }
    }
}

impl Values {
    fn get_f64(&self, i: usize) -> f64 {
        match self {
            Values::F32(v) => v[i] as f64,
            Values::F16(v) => v[i].to_f64(),
            Values::BF16(v) => v[i].to_f64(),
        }
    }
    fn write_le(&self, w: &mut Vec<u8>) {
        match self {
            Values::F32(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
            Values::F16(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
            Values::BF16(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
        }
    }
    fn read_le(&mut self, b: &[u8]) {
        match self {
            Values::F32(v) => v.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Values::F16(v) => v.extend(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]))),
            Values::BF16(v) => {
                v.extend(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])))
            }
        }
    }
}

/// A sorted run of whole chunks: per curve, packed entries and their coordinates.
#[derive(Clone, Debug)]
struct Run {
    n_chunks: usize,
    /// Per curve: sorted entries, their coordinates, the entries' fence.
    curves: Vec<(Vec<u64>, Vec<f32>, Vec<u32>)>,
    /// Boxes of curve 0's blocks (exact search).
    boxes: BoxTree<f32>,
}

impl Run {
    fn new(n_chunks: usize, curves: Vec<(Vec<u64>, Vec<f32>, Vec<u32>)>, dk: usize) -> Result<Run> {
        let boxes = BoxTree::build_serial(&curves[0].0, &curves[0].1, dk, EXACT_LEAF)?;
        Ok(Run {
            n_chunks,
            curves,
            boxes,
        })
    }
}

#[derive(Clone, Debug)]
struct Group {
    keys: Vec<f32>,
    values: Values,
    /// Codes of every key, per curve (u32; the index packs them with positions).
    codes: Vec<Vec<u32>>,
    runs: Vec<Run>,
    /// The exact search's runs: curve 0 of the same chunks as `runs`, in fewer runs (see
    /// [`exact_level`]).
    xruns: Vec<Run>,
    /// Chunks already in runs.
    indexed_chunks: usize,
    ksum: Vec<f64>,
    vsum: Vec<f64>,
}

/// What an `extend` does to one group's runs, computed before anything changes: keep the
/// first `keep` runs, then append `fresh`; `indexed` chunks are in runs afterwards.
#[derive(Clone, Debug)]
struct IndexPlan {
    keep: usize,
    fresh: Vec<Run>,
    /// The same for `xruns`.
    xkeep: usize,
    xfresh: Vec<Run>,
    indexed: usize,
}

/// The exact search's runs are levelled with this fan-out: a run of `n` chunks is at level
/// `floor(log_R n)` and the levels decrease strictly along the list (a new run is merged
/// into the last one while that one's level is not higher). So a cache of `c` chunks has
/// at most `log_R c + 1` of them (6 at 1M tokens, against up to 14 dyadic runs that the
/// window search needs to match the parallel index), and every chunk is merged about
/// `R / 2` times per level.
const EXACT_FANOUT: usize = 8;

fn exact_level(n_chunks: usize) -> u32 {
    n_chunks.max(1).ilog(EXACT_FANOUT)
}

/// An `attend` with fewer (batch, head, query) rows than this runs on the calling thread:
/// waking zeta's pool costs more than a few decode queries' work (measured: a one-token
/// `attend` of 2 heads, 2 curves took 17.6 us through the pool, see `benches/bench_generate.py`).
const PARALLEL_MIN_QUERIES: usize = 8;
/// An `extend` that sorts/merges fewer rows than this (over all groups) runs on the calling
/// thread, for the same reason.
const PARALLEL_MIN_ROWS: usize = 4096;
/// An `append` of at least this many tokens computes their codes with the batched SIMD
/// encode ([`crate::quantize::zorder`], in zeta's pool) rather than per key.
const BATCHED_CODES: usize = 4096;

/// `batch * kv_heads` above this is refused (ValueError), in the constructor and in files.
pub const MAX_GROUPS: usize = 1 << 24;
/// `value_dim` above this is refused (ValueError): 16M floats per value row.
pub const MAX_VALUE_DIM: usize = 1 << 24;

fn oom(what: &'static str, n: usize) -> impl Fn(std::collections::TryReserveError) -> ZetaError {
    move |_| ZetaError::Alloc { what, n }
}

/// The KV cache: `batch * kv_heads` groups, all of the same length.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub batch: usize,
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub params: Params,
    grids: Vec<Grid>,
    len: usize,
    groups: Vec<Group>,
    /// [`BRUTE_KEYS`] (tests set less, to search runs that small caches would scan).
    brute_keys: usize,
}

const MAGIC: &[u8; 8] = b"ZETAKV\0\0";
const VERSION: u32 = 1;
/// Header bytes: magic, version, ten u64 fields, scale (f64), dtype code.
const HEAD: usize = 8 + 4 + 10 * 8 + 8 + 1;

impl KvCache {
    pub fn new(
        batch: usize,
        kv_heads: usize,
        key_dim: usize,
        value_dim: usize,
        params: Params,
        dtype: &str,
    ) -> Result<KvCache> {
        if batch == 0 {
            return Err(ZetaError::value("batch", "must be >= 1"));
        }
        if kv_heads == 0 {
            return Err(ZetaError::value("num_kv_heads", "must be >= 1"));
        }
        if key_dim == 0 || key_dim > crate::morton::MAX_DIMS {
            return Err(ZetaError::value(
                "key_dim",
                format!("must be 1..=8, got {key_dim}"),
            ));
        }
        if value_dim == 0 {
            return Err(ZetaError::value("value_dim", "must be >= 1"));
        }
        if !params.causal {
            return Err(ZetaError::value("causal", "a KV cache is causal"));
        }
        // window 0 = "unset": each attend passes one (the runs do not depend on it).
        Params {
            window: params.window.max(1),
            ..params
        }
        .check(key_dim)?;
        let values = Values::new(dtype)?;
        let grids = params.grids(key_dim)?;
        if batch > MAX_GROUPS {
            return Err(ZetaError::value(
                "batch",
                format!("must be <= {MAX_GROUPS}, got {batch}"),
            ));
        }
        let n_groups = batch
            .checked_mul(kv_heads)
            .filter(|&g| g <= MAX_GROUPS)
            .ok_or_else(|| {
                ZetaError::value(
                    "num_kv_heads",
                    format!(
                        "batch * num_kv_heads = {batch} * {kv_heads} is more than {MAX_GROUPS} \
                         (batch, kv head) pairs"
                    ),
                )
            })?;
        if value_dim > MAX_VALUE_DIM {
            return Err(ZetaError::value(
                "value_dim",
                format!("must be <= {MAX_VALUE_DIM}, got {value_dim}"),
            ));
        }
        // An empty cache still holds per-group sums and lists: ask for the total at once
        // (see `probe_bytes`) rather than discover it piece by piece.
        let per_group = std::mem::size_of::<Group>()
            + 8 * (key_dim + value_dim)
            + params.n_curves * std::mem::size_of::<Vec<u32>>()
            + 3 * 32; // three small heap blocks per group, with the allocator's overhead

        // Twice the estimate: the small blocks fragment the heap, and a cache that needs
        // half of what is left before its first token would leave the caller (Python
        // itself) nothing to run on (the fuzzer found that edge: zeta raised MemoryError,
        // then the interpreter could not format it).
        probe_bytes(
            numel(&[n_groups, per_group, 2], "KV cache")?,
            "an empty KV cache",
        )?;
        let mut groups = try_with_capacity(n_groups, "KV cache groups")?;
        for _ in 0..n_groups {
            groups.push(Group {
                keys: Vec::new(),
                values: values.clone(),
                codes: try_vec(Vec::new(), params.n_curves, "KV cache codes")?,
                runs: Vec::new(),
                xruns: Vec::new(),
                indexed_chunks: 0,
                ksum: try_vec(0.0, key_dim, "KV cache key sums")?,
                vsum: try_vec(0.0, value_dim, "KV cache value sums")?,
            });
        }
        Ok(KvCache {
            batch,
            kv_heads,
            key_dim,
            value_dim,
            params,
            grids,
            len: 0,
            groups,
            brute_keys: BRUTE_KEYS,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> &'static str {
        self.groups[0].values.dtype()
    }

    /// Bytes held: keys, values, codes, run entries and coordinates (both lists), boxes, sums.
    pub fn nbytes(&self) -> usize {
        let mut n = std::mem::size_of::<Self>();
        for g in &self.groups {
            n += g.keys.capacity() * 4 + g.values.len() * g.values.elem_size();
            n += g.codes.iter().map(|c| c.capacity() * 4).sum::<usize>();
            for r in g.runs.iter().chain(&g.xruns) {
                for (e, c, fe) in &r.curves {
                    n += e.capacity() * 8 + c.capacity() * 4 + fe.capacity() * 4;
                }
                n += r.boxes.nbytes();
            }
            n += (g.ksum.len() + g.vsum.len()) * 8;
        }
        n
    }

    /// Appends T tokens: k (B, H_kv, T, key_dim), v (B, H_kv, T, value_dim), row-major f32.
    /// Checks everything before changing anything.
    pub fn extend(&mut self, k: &[f32], v: &[f32], t: usize) -> Result<()> {
        let (dk, dv) = (self.key_dim, self.value_dim);
        let ng = self.groups.len();
        if k.len() != ng * t * dk {
            return Err(ZetaError::value(
                "k",
                format!(
                    "has {} elements, expected B*H_kv*T*key_dim = {}",
                    k.len(),
                    ng * t * dk
                ),
            ));
        }
        if v.len() != ng * t * dv {
            return Err(ZetaError::value(
                "v",
                format!(
                    "has {} elements, expected B*H_kv*T*value_dim = {}",
                    v.len(),
                    ng * t * dv
                ),
            ));
        }
        if t == 0 {
            return Ok(());
        }
        check_coords("k", k, self.key_dim)?;
        check_values("v", v, &self.groups[0].values)?;
        self.append(k, t, |gi, vals| {
            vals.extend_from_f32(&v[gi * t * dv..(gi + 1) * t * dv])
        })
    }

    /// Appends `t` tokens to every group: keys from `k` (groups x t x key_dim), values by
    /// `fill(group, values)` (exactly t x value_dim of them). All or nothing: everything
    /// that can fail (allocations, the new runs of the index) happens before the first
    /// visible change, and a failure rolls the appended rows back.
    fn append<F: Fn(usize, &mut Values) + Sync>(
        &mut self,
        k: &[f32],
        t: usize,
        fill: F,
    ) -> Result<()> {
        let (dk, dv) = (self.key_dim, self.value_dim);
        let new_len = self
            .len
            .checked_add(t)
            .filter(|&n| n <= u32::MAX as usize)
            .ok_or_else(|| ZetaError::value("k", "the cache would exceed 2^32 tokens"))?;
        // The arrays keep growing: blocks of 128 MiB or more from the allocator that grows
        // them in place (a first block of a prefill's exact size would be copied into fresh
        // pages by the next token's reserve: see `crate::alloc`).
        crate::alloc::growable(|| -> Result<()> {
            for g in self.groups.iter_mut() {
                g.keys
                    .try_reserve(t * dk)
                    .map_err(oom("KV cache keys", t * dk))?;
                g.values.try_reserve(t * dv)?;
                for c in g.codes.iter_mut() {
                    c.try_reserve(t).map_err(oom("KV cache codes", t))?;
                }
            }
            Ok(())
        })?;
        let old = self.len;
        let mut plans: Vec<Option<IndexPlan>> =
            try_vec(None, self.groups.len(), "KV cache index update")?;
        let (grids, params) = (&self.grids, &self.params);
        let plan_group = |gi: usize, g: &mut Group, plan: &mut Option<IndexPlan>| -> Result<()> {
            let kk = &k[gi * t * dk..(gi + 1) * t * dk];
            // Within the reserved capacity: these cannot fail.
            g.keys.extend_from_slice(kk);
            fill(gi, &mut g.values);
            for (c, grid) in g.codes.iter_mut().zip(grids) {
                if t >= BATCHED_CODES {
                    // The batched SIMD encode (the bits of `Grid::code`), in zeta's pool
                    // (inline when this already runs there).
                    let at = c.len();
                    c.resize(at + t, 0);
                    crate::pool::install(|| crate::quantize::zorder(kk, grid, &mut c[at..]))?;
                } else {
                    c.extend(kk.chunks_exact(dk).map(|x| grid.code(x) as u32));
                }
            }
            *plan = Some(g.plan_index(new_len, params, dk)?);
            Ok(())
        };
        let commit = |g: &mut Group, plan: Option<IndexPlan>| {
            if let Some(plan) = plan {
                g.commit(plan, old, new_len, dk, dv);
            }
        };
        let parallel = self.groups.len() > 1 && crate::pool::current_threads() > 1 && {
            // Entries this call sorts or merges per group: the new rows plus the runs the
            // binary counter merges (chunk i completing merges lowbit(i) chunks).
            let chunk = params.chunk;
            let done = self.groups[0].indexed_chunks;
            let target = (new_len - 1) / chunk;
            let merged: usize = (done + 1..=target)
                .take(64)
                .map(|i| (i & i.wrapping_neg()) * chunk)
                .sum();
            (t + merged) * self.groups.len() >= PARALLEL_MIN_ROWS
        };
        let planned = if parallel {
            crate::pool::install(|| {
                self.groups
                    .par_iter_mut()
                    .zip(plans.par_iter_mut())
                    .enumerate()
                    .try_for_each(|(gi, (g, plan))| plan_group(gi, g, plan))
            })
        } else {
            self.groups
                .iter_mut()
                .zip(plans.iter_mut())
                .enumerate()
                .try_for_each(|(gi, (g, plan))| plan_group(gi, g, plan))
        };
        if let Err(e) = planned {
            for g in self.groups.iter_mut() {
                g.keys.truncate(old * dk);
                g.values.truncate(old * dv);
                for c in g.codes.iter_mut() {
                    c.truncate(old);
                }
            }
            return Err(e);
        }
        // Commit: nothing below allocates or fails.
        if parallel {
            crate::pool::install(|| {
                self.groups
                    .par_iter_mut()
                    .zip(plans.into_par_iter())
                    .for_each(|(g, plan)| commit(g, plan))
            });
        } else {
            for (g, plan) in self.groups.iter_mut().zip(plans) {
                commit(g, plan);
            }
        }
        self.len = new_len;
        Ok(())
    }

    /// Attends T_q queries (the last T_q positions): q (B, H, T_q, key_dim) f32 row-major,
    /// H % H_kv == 0, gamma (H,). Returns (B, H, T_q, value_dim) f32.
    /// `window` overrides the cache's window for this call (the runs do not depend on it).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &[f32],
        h: usize,
        tq: usize,
        topk: usize,
        gamma: &[f64],
        mean_token: bool,
        window: Option<usize>,
        exact: bool,
    ) -> Result<Vec<f32>> {
        let (dk, dv, s) = (self.key_dim, self.value_dim, self.len);
        if s == 0 {
            return Err(ZetaError::value(
                "q",
                "the cache is empty: extend it before attend",
            ));
        }
        if h == 0 || !h.is_multiple_of(self.kv_heads) {
            return Err(ZetaError::value(
                "q",
                format!(
                    "query heads ({h}) must be a multiple of the cache's kv heads ({})",
                    self.kv_heads
                ),
            ));
        }
        if tq == 0 || tq > s {
            return Err(ZetaError::value(
                "q",
                format!("T_q must be 1..=len(cache) = {s}, got {tq}"),
            ));
        }
        if q.len() != self.batch * h * tq * dk {
            return Err(ZetaError::value(
                "q",
                format!(
                    "has {} elements, expected B*H*T_q*key_dim = {}",
                    q.len(),
                    self.batch * h * tq * dk
                ),
            ));
        }
        check_topk_gamma(topk, gamma, h)?;
        check_coords("q", q, dk)?;
        let grp = h / self.kv_heads;
        let n_out = numel(&[self.batch, h, tq, dv], "attend output")?;
        let mut out = try_vec(0.0f32, n_out, "attend output")?;
        let chunk = self.params.chunk;
        let mut prm = self.params;
        if let Some(w) = window {
            if w == 0 {
                return Err(ZetaError::value("window", "must be >= 1"));
            }
            prm.window = w;
        }
        if prm.window == 0 {
            return Err(ZetaError::value(
                "window",
                "this cache has no window set: pass one to attend",
            ));
        }
        let prm = &prm;
        let first = s - tq;
        // Fast path: every query in the tail chunk sees exactly the counter's runs. Queries
        // in older chunks (a multi-token attend spanning chunks) need the runs of their own
        // chunk index, made for the call from the counter's runs (see `Group::runs_for`).
        let (c_lo, c_hi) = (first / chunk, (s - 1) / chunk);
        let needs_more = c_lo < self.groups[0].indexed_chunks;
        let n_queries = self.groups.len() * grp * tq;
        // A one-thread pool would only hand the call to its worker (a wake-up per call: 89 vs
        // 27 us for an 8-head step at S = 16k on a 2-core VM): run it here instead.
        let parallel =
            (needs_more || n_queries >= PARALLEL_MIN_QUERIES) && crate::pool::current_threads() > 1;
        // No more than s distinct keys can be kept, whatever topk asks for. Exact search
        // offers each position once; the window search once per curve (and sinks).
        let mult = if exact { 1 } else { prm.multiplicity() };
        let init = || (TopK::new(topk.min(s), mult), Vec::new(), Scratch::default());
        let one_group = |gi: usize, out_g: &mut [f32]| -> Result<()> {
            let g = &self.groups[gi];
            let (b, hkv) = (gi / self.kv_heads, gi % self.kv_heads);
            let made = if needs_more {
                g.runs_for(c_lo, c_hi, chunk, dk)?
            } else {
                HashMap::new()
            };
            // Per query chunk: its runs (high level first) and where its own chunk starts.
            // Exact search takes whichever list covers the indexed chunks in fewer runs
            // (the counter's right after 2^k chunks, the levelled ones elsewhere).
            let counter: Vec<&Run> = if exact && g.xruns.len() < g.runs.len() {
                &g.xruns
            } else {
                &g.runs
            }
            .iter()
            .collect();
            let mut lists: Vec<Vec<&Run>> = Vec::new();
            if needs_more {
                // One list per query chunk (at most one run per bit of the chunk index).
                lists = try_with_capacity(c_hi - c_lo + 1, "attend run lists")?;
                for c in c_lo..=c_hi {
                    let list = decomposition(c)
                        .map(|key| g.run_at(key).or_else(|| made.get(&key)))
                        .collect::<Option<Vec<&Run>>>()
                        .ok_or_else(|| ZetaError::Internal("a run was not made".into()))?;
                    lists.push(list);
                }
            }
            // Means at positions >= first: total minus the keys after p.
            let (kbar, vbar) = if mean_token {
                g.suffix_means(first, s, dk, dv)?
            } else {
                (Vec::new(), Vec::new())
            };
            let one_query = |(tk, cands, sc): &mut (TopK<f32>, Vec<(f32, u32)>, Scratch<f32>),
                             (qi, o): (usize, &mut [f32])| {
                let (hl, i) = (qi / tq, qi % tq);
                let hq = hkv * grp + hl;
                let qr = &q[((b * h + hq) * tq + i) * dk..][..dk];
                let p = first + i;
                let (runs, own) = if needs_more {
                    let c = p / chunk;
                    (&lists[c - c_lo][..], c * chunk..p + 1)
                } else {
                    (&counter[..], g.indexed_chunks * chunk..p + 1)
                };
                tk.clear();
                if exact {
                    let brute = self.brute_keys;
                    g.exact_candidates(runs, own, brute, &self.grids[0], prm, qr, tk, sc)
                } else {
                    g.for_each_candidate(runs, own, &self.grids, prm, qr, p, tk)
                }
                tk.drain_sorted(cands);
                let g2 = (gamma[hq] * gamma[hq]) as f32;
                let mean = if mean_token {
                    let kb = &kbar[i * dk..(i + 1) * dk];
                    Some((sq_dist(qr, kb), &vbar[i * dv..(i + 1) * dv]))
                } else {
                    None
                };
                combine(cands, g2, &g.values, mean, o, |_, _| {});
            };
            if parallel {
                out_g
                    .par_chunks_mut(dv)
                    .enumerate()
                    .for_each_init(init, one_query);
            } else {
                let mut st = init();
                for qo in out_g.chunks_mut(dv).enumerate() {
                    one_query(&mut st, qo);
                }
            }
            Ok(())
        };
        let per_group = grp * tq * dv;
        if parallel {
            crate::pool::install(|| {
                out.par_chunks_mut(per_group)
                    .enumerate()
                    .try_for_each(|(gi, og)| one_group(gi, og))
            })?;
        } else {
            for (gi, og) in out.chunks_mut(per_group).enumerate() {
                one_group(gi, og)?;
            }
        }
        Ok(out)
    }

    /// One decode call on a fused projection: `qkv` (B, T, W) row-major, each row the
    /// T-th token's `h` query heads, then its kv heads' keys, then their values
    /// (W = h*key_dim + H_kv*key_dim + H_kv*value_dim, what one linear layer over the three
    /// stacked projections gives). Appends the T tokens' keys and values, then attends
    /// their queries as [`KvCache::attend`]. Returns (B, T, h*value_dim): the heads side by
    /// side, the layout an output projection takes.
    ///
    /// Everything the attend checks is checked before the extend, so a bad call changes
    /// nothing; only running out of memory inside the attend leaves the tokens appended.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_packed(
        &mut self,
        qkv: &[f32],
        t: usize,
        h: usize,
        topk: usize,
        gamma: &[f64],
        mean_token: bool,
        window: Option<usize>,
        exact: bool,
    ) -> Result<Vec<f32>> {
        let (b, hkv, dk, dv) = (self.batch, self.kv_heads, self.key_dim, self.value_dim);
        if h == 0 || !h.is_multiple_of(hkv) {
            return Err(ZetaError::value(
                "num_heads",
                format!("{h} query heads are not a multiple of the cache's {hkv} kv heads"),
            ));
        }
        let w = h
            .checked_add(hkv)
            .and_then(|x| x.checked_mul(dk))
            .and_then(|x| x.checked_add(hkv * dv))
            .ok_or_else(|| ZetaError::value("num_heads", format!("{h} heads is too many")))?;
        if t == 0 || qkv.len() != numel(&[b, t, w], "qkv")? {
            return Err(ZetaError::value(
                "qkv",
                format!(
                    "has {} elements, expected B*T*(H*key_dim + H_kv*(key_dim + value_dim)) = \
                     {b}*T*{w} with T >= 1",
                    qkv.len()
                ),
            ));
        }
        check_topk_gamma(topk, gamma, h)?;
        if window == Some(0) || (window.is_none() && self.params.window == 0) {
            return Err(ZetaError::value("window", "must be >= 1"));
        }
        // qkv holds b*t*w >= each of these: no overflow below.
        let mut q = try_vec(0.0f32, b * h * t * dk, "decode queries")?;
        let mut k = try_vec(0.0f32, b * hkv * t * dk, "decode keys")?;
        let mut v = try_vec(0.0f32, b * hkv * t * dv, "decode values")?;
        for (row, x) in qkv.chunks_exact(w).enumerate() {
            let (bi, ti) = (row / t, row % t);
            let (xq, rest) = x.split_at(h * dk);
            let (xk, xv) = rest.split_at(hkv * dk);
            for (hi, src) in xq.chunks_exact(dk).enumerate() {
                q[((bi * h + hi) * t + ti) * dk..][..dk].copy_from_slice(src);
            }
            for (hi, src) in xk.chunks_exact(dk).enumerate() {
                k[((bi * hkv + hi) * t + ti) * dk..][..dk].copy_from_slice(src);
            }
            for (hi, src) in xv.chunks_exact(dv).enumerate() {
                v[((bi * hkv + hi) * t + ti) * dv..][..dv].copy_from_slice(src);
            }
        }
        // Checked before the extend (which checks keys and values again): a bad call changes
        // nothing, and the error names the argument the caller passed.
        for (x, what) in [(&q, "queries"), (&k, "keys")] {
            if let Err(ZetaError::Value { msg, .. }) = check_coords("qkv", x, dk) {
                return Err(ZetaError::value(
                    "qkv",
                    format!("{what}: {msg} (a flat index into (B, H, T, key_dim))"),
                ));
            }
        }
        if let Err(ZetaError::Value { msg, .. }) = check_values("qkv", &v, &self.groups[0].values) {
            return Err(ZetaError::value(
                "qkv",
                format!("values: {msg} (a flat index into (B, H_kv, T, value_dim))"),
            ));
        }
        self.extend(&k, &v, t)?;
        let o = self.attend(&q, h, t, topk, gamma, mean_token, window, exact)?;
        // (B, H, T, dv) -> (B, T, H*dv)
        let mut out = try_vec(0.0f32, o.len(), "decode output")?;
        for (i, src) in o.chunks_exact(dv).enumerate() {
            let (bi, hi, ti) = (i / (h * t), (i / t) % h, i % t);
            out[((bi * t + ti) * h + hi) * dv..][..dv].copy_from_slice(src);
        }
        Ok(out)
    }

    /// Serialises to bytes: header, keys and values per group, CRC32 of all that.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let esz = self.groups[0].values.elem_size();
        let body = numel(
            &[
                self.groups.len(),
                self.len,
                4 * self.key_dim + esz * self.value_dim,
            ],
            "KV cache file",
        )?;
        let mut w = try_with_capacity(HEAD + body + 4, "KV cache file")?;
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        for x in [
            self.batch,
            self.kv_heads,
            self.key_dim,
            self.value_dim,
            self.params.chunk,
            self.params.window,
            self.params.n_curves,
            self.params.n_sink,
            self.params.bits as usize,
            self.len,
        ] {
            w.extend_from_slice(&(x as u64).to_le_bytes());
        }
        w.extend_from_slice(&self.params.scale.to_le_bytes());
        w.push(self.groups[0].values.code());
        for g in &self.groups {
            g.keys
                .iter()
                .for_each(|x| w.extend_from_slice(&x.to_le_bytes()));
            g.values.write_le(&mut w);
        }
        let crc = crc32fast::hash(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        Ok(w)
    }

    /// Parses [`to_bytes`]' format; rebuilds the index (deterministic, so the result equals
    /// the saved cache bit for bit).
    ///
    /// The file is untrusted: every size in the header is checked against the file's own
    /// length (or against [`MAX_GROUPS`] / [`MAX_VALUE_DIM`] / the constructor's limits
    /// where the body says nothing, e.g. an empty cache) before anything is allocated.
    pub fn from_bytes(b: &[u8]) -> Result<KvCache> {
        let head = HEAD;
        if b.len() < 8 || &b[..8] != MAGIC {
            return Err(ZetaError::Corrupt(
                "not a zeta KV cache file (bad magic)".into(),
            ));
        }
        if b.len() < head + 4 {
            return Err(ZetaError::Corrupt("truncated header".into()));
        }
        let rd8 = |i: usize| -> [u8; 8] {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            a
        };
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != VERSION {
            return Err(ZetaError::Corrupt(format!(
                "unsupported version {version} (this zeta reads version {VERSION})"
            )));
        }
        let crc = u32::from_le_bytes([
            b[b.len() - 4],
            b[b.len() - 3],
            b[b.len() - 2],
            b[b.len() - 1],
        ]);
        if crc32fast::hash(&b[..b.len() - 4]) != crc {
            return Err(ZetaError::Corrupt("checksum mismatch".into()));
        }
        let mut fields = [0u64; 10];
        for (i, f) in fields.iter_mut().enumerate() {
            *f = u64::from_le_bytes(rd8(12 + 8 * i));
        }
        let scale = f64::from_le_bytes(rd8(92));
        let dcode = b[100];
        let to_usize = |x: u64, what: &str| -> Result<usize> {
            if x > (1u64 << 40) {
                return Err(ZetaError::Corrupt(format!("implausible {what} {x}")));
            }
            Ok(x as usize)
        };
        let batch = to_usize(fields[0], "batch")?;
        let kvh = to_usize(fields[1], "kv heads")?;
        let dk = to_usize(fields[2], "key_dim")?;
        let dv = to_usize(fields[3], "value_dim")?;
        let len = to_usize(fields[9], "length")?;
        let params = Params {
            chunk: to_usize(fields[4], "chunk")?,
            window: to_usize(fields[5], "window")?,
            n_curves: to_usize(fields[6], "n_curves")?,
            n_sink: to_usize(fields[7], "n_sink")?,
            causal: true,
            bits: u32::try_from(fields[8]).map_err(|_| ZetaError::Corrupt("bits".into()))?,
            scale,
        };
        let values = Values::from_code(dcode)?;
        let esz = values.elem_size();
        // All in u64 from fields <= 2^40: products of two fit; checked beyond that.
        let body = batch
            .checked_mul(kvh)
            .and_then(|g| g.checked_mul(len))
            .and_then(|n| n.checked_mul(dk * 4 + dv * esz))
            .ok_or_else(|| ZetaError::Corrupt("sizes overflow".into()))?;
        if b.len() - head - 4 != body {
            return Err(ZetaError::Corrupt(format!(
                "truncated or padded: {} bytes, expected {}",
                b.len(),
                head.saturating_add(body).saturating_add(4)
            )));
        }
        // The body bounds every size when len > 0; `new` bounds the rest (group count,
        // value_dim, key_dim, settings), still before any allocation that scales with them.
        let dtype = values.dtype();
        let mut cache = KvCache::new(batch, kvh, dk, dv, params, dtype).map_err(|e| match e {
            ZetaError::Memory(_) => e,
            _ => ZetaError::Corrupt(format!("bad header: {e}")),
        })?;
        let ng = batch * kvh;
        let (kbytes, vbytes) = (len * dk * 4, len * dv * esz);
        let mut ks = try_vec(0.0f32, ng * len * dk, "KV cache keys")?;
        for (gi, kg) in ks.chunks_exact_mut((len * dk).max(1)).enumerate().take(ng) {
            let kb = &b[head + gi * (kbytes + vbytes)..][..kbytes];
            for (x, c) in kg.iter_mut().zip(kb.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        if first_bad_coord(&ks, coord_limit::<f32>(dk)).is_some() {
            return Err(ZetaError::Corrupt(
                "keys that are not finite or beyond the coordinate limit".into(),
            ));
        }
        // Values are stored as they are (a float16 value may be inf: a finite float32 out
        // of float16's range); `append` sums what is stored, as `extend` does.
        cache.append(&ks, len, |gi, vals| {
            let off = head + gi * (kbytes + vbytes) + kbytes;
            vals.read_le(&b[off..off + vbytes]);
        })?;
        Ok(cache)
    }

    /// Atomic save: write a temporary file beside `path`, fsync, rename over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| ZetaError::value("path", "has no file name"))?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let res = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(ZetaError::Io(format!(
                "saving KV cache to {}: {e}",
                path.display()
            )));
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<KvCache> {
        let io = |e: std::io::Error| {
            ZetaError::Io(format!("loading KV cache from {}: {e}", path.display()))
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        // Room for the whole file first, fallibly: a file larger than memory is a
        // MemoryError, not an abort inside read_to_end.
        let size = f.metadata().map_err(io)?.len();
        let size = usize::try_from(size)
            .map_err(|_| ZetaError::Memory(format!("a {size}-byte KV cache file")))?;
        let mut b: Vec<u8> = try_with_capacity(size, "KV cache file")?;
        f.read_to_end(&mut b).map_err(io)?;
        KvCache::from_bytes(&b)
    }

    /// Exact equality of contents (keys, values, settings, index). The exact search's
    /// levelled runs depend on how the tokens were appended (a loaded cache has one) and
    /// are not compared: they hold the same keys and give the same answers.
    pub fn same_contents(&self, other: &KvCache) -> Result<bool> {
        Ok(self.to_bytes()? == other.to_bytes()?
            && self.groups.iter().zip(&other.groups).all(|(a, b)| {
                a.runs.len() == b.runs.len()
                    && a.runs
                        .iter()
                        .zip(&b.runs)
                        .all(|(x, y)| x.curves == y.curves)
            }))
    }
}

/// Values `v` to store in `store` (the cache's values, any group: they share the dtype):
/// finite, and finite in that dtype too (a float32 beyond float16's 65504 would be stored as
/// inf, and the outputs that weigh it would be inf or NaN). The error names `arg`.
fn check_values(arg: &'static str, v: &[f32], store: &Values) -> Result<()> {
    if let Some(p) = first_non_finite(v) {
        return Err(ZetaError::value(
            arg,
            format!("contains NaN or inf (flat index {p})"),
        ));
    }
    let overflow = match store {
        Values::F16(_) => v.iter().position(|&x| f16::from_f32(x).is_infinite()),
        Values::BF16(_) => v.iter().position(|&x| bf16::from_f32(x).is_infinite()),
        Values::F32(_) => None,
    };
    let dtype = store.dtype();
    match overflow {
        None => Ok(()),
        Some(p) => Err(ZetaError::value(
            arg,
            format!(
                "value {:.4e} at flat index {p} is beyond this cache's {dtype} range (it \
                 would be stored as inf); use a float32 cache or rescale the values",
                v[p]
            ),
        )),
    }
}

/// `topk >= 1`, and one gamma in [`crate::attention::GAMMA_MIN`, `GAMMA_MAX`] per query head.
fn check_topk_gamma(topk: usize, gamma: &[f64], h: usize) -> Result<()> {
    if topk == 0 {
        return Err(ZetaError::value("topk", "must be >= 1"));
    }
    if gamma.len() != h || !gamma.iter().all(|&g| crate::attention::gamma_ok(g)) {
        return Err(ZetaError::value(
            "gamma",
            format!(
                "{} (one per query head, {h} of them)",
                crate::attention::GAMMA_RANGE
            ),
        ));
    }
    Ok(())
}

/// The runs (level, first chunk) a query in chunk `c` searches: the binary decomposition of
/// chunks `0..c`, the largest first (the parallel index's runs for that chunk).
fn decomposition(c: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut start = 0usize;
    (0..usize::BITS as usize).rev().filter_map(move |l| {
        if (c >> l) & 1 == 1 {
            let key = (l, start);
            start += 1 << l;
            Some(key)
        } else {
            None
        }
    })
}

/// The run of chunks `first..end` cut out of `r`, which contains them: its entries at those
/// positions (filtering keeps the sort order).
fn cut_run(r: &Run, first: usize, end: usize, chunk: usize, dk: usize) -> Result<Run> {
    let (lo, hi) = (first * chunk, end * chunk);
    let mut curves = try_with_capacity(r.curves.len(), "KV cache runs")?;
    for (e, c, _) in &r.curves {
        let n = e
            .iter()
            .filter(|&&x| (lo..hi).contains(&(unpack_pos(x) as usize)))
            .count();
        let mut ne = try_with_capacity(n, "KV cache run entries")?;
        let mut nc = try_with_capacity(n * dk, "KV cache run coordinates")?;
        for (x, xc) in e.iter().zip(c.chunks_exact(dk)) {
            if (lo..hi).contains(&(unpack_pos(*x) as usize)) {
                ne.push(*x);
                nc.extend_from_slice(xc);
            }
        }
        let fe = fence_of(&ne)?;
        curves.push((ne, nc, fe));
    }
    Run::new(end - first, curves, dk)
}

/// Two runs of disjoint positions merged into one (every curve they have).
fn merge_runs(a: &Run, b: &Run, dk: usize) -> Result<Run> {
    let mut curves = try_with_capacity(a.curves.len(), "KV cache runs")?;
    for ((ea, ca, _), (eb, cb, _)) in a.curves.iter().zip(&b.curves) {
        let mut e = try_vec(0u64, ea.len() + eb.len(), "KV cache run entries")?;
        let mut co = try_vec(0.0f32, e.len() * dk, "KV cache run coordinates")?;
        merge_with_coords((ea, ca), (eb, cb), dk, &mut e, &mut co);
        let fe = fence_of(&e)?;
        curves.push((e, co, fe));
    }
    Run::new(a.n_chunks + b.n_chunks, curves, dk)
}

/// The list `old[..keep]` then `fresh`: merges its last two runs while `merge(a, b)` says
/// so, without touching `old` (a merge that takes one of its runs lowers `keep`).
fn merge_last(
    old: &[Run],
    keep: &mut usize,
    fresh: &mut Vec<Run>,
    dk: usize,
    merge: impl Fn(&Run, &Run) -> bool,
) -> Result<()> {
    loop {
        let n = *keep + fresh.len();
        if n < 2 {
            return Ok(());
        }
        let at = |i: usize| {
            if i < *keep {
                &old[i]
            } else {
                &fresh[i - *keep]
            }
        };
        let (a, b) = (at(n - 2), at(n - 1));
        if !merge(a, b) {
            return Ok(());
        }
        let merged = merge_runs(a, b, dk)?;
        // The top run is always a fresh one, so the push below reuses its slot.
        for _ in 0..2 {
            if fresh.pop().is_none() {
                *keep -= 1;
            }
        }
        fresh.push(merged);
    }
}

impl Group {
    /// The runs that index every chunk before the newest token's chunk (binary-counter
    /// merges), computed without changing the group: `commit` applies them.
    fn plan_index(&mut self, len: usize, prm: &Params, dk: usize) -> Result<IndexPlan> {
        let chunk = prm.chunk;
        let target = if len == 0 { 0 } else { (len - 1) / chunk };
        let mut keep = self.runs.len();
        let mut fresh: Vec<Run> = Vec::new();
        let mut indexed = self.indexed_chunks;
        while indexed < target {
            let n = self.codes.len();
            let run = self.sorted_run(indexed * chunk, (indexed + 1) * chunk, chunk, n, dk)?;
            fresh.try_reserve(1).map_err(oom("KV cache runs", 1))?;
            fresh.push(run);
            indexed += 1;
            merge_last(&self.runs, &mut keep, &mut fresh, dk, |a, b| {
                a.n_chunks == b.n_chunks
            })?;
        }
        let need = (keep + fresh.len()).saturating_sub(self.runs.len());
        self.runs
            .try_reserve(need)
            .map_err(oom("KV cache runs", need))?;
        // The exact search's runs: the new chunks as one run, then levelled merges.
        let mut xkeep = self.xruns.len();
        let mut xfresh: Vec<Run> = Vec::new();
        if indexed > self.indexed_chunks {
            let (lo, hi) = (self.indexed_chunks * chunk, indexed * chunk);
            xfresh.try_reserve(1).map_err(oom("KV cache runs", 1))?;
            xfresh.push(self.sorted_run(lo, hi, chunk, 1, dk)?);
            merge_last(&self.xruns, &mut xkeep, &mut xfresh, dk, |a, b| {
                exact_level(a.n_chunks) <= exact_level(b.n_chunks)
            })?;
        }
        let need = (xkeep + xfresh.len()).saturating_sub(self.xruns.len());
        self.xruns
            .try_reserve(need)
            .map_err(oom("KV cache runs", need))?;
        Ok(IndexPlan {
            keep,
            fresh,
            xkeep,
            xfresh,
            indexed,
        })
    }

    /// Applies a plan and adds rows `old..new_len` to the running sums. Cannot fail.
    fn commit(&mut self, plan: IndexPlan, old: usize, new_len: usize, dk: usize, dv: usize) {
        self.runs.truncate(plan.keep);
        self.runs.extend(plan.fresh);
        self.xruns.truncate(plan.xkeep);
        self.xruns.extend(plan.xfresh);
        self.indexed_chunks = plan.indexed;
        for row in self.keys[old * dk..new_len * dk].chunks_exact(dk) {
            for (x, &y) in self.ksum.iter_mut().zip(row) {
                *x += y as f64;
            }
        }
        // Sum what is stored (f16/bf16 rounding included), in position order; the dtype is
        // matched once per call, not once per value.
        fn add_rows<E: Copy>(sum: &mut [f64], rows: &[E], dv: usize, f: impl Fn(E) -> f64) {
            for row in rows.chunks_exact(dv) {
                for (x, &y) in sum.iter_mut().zip(row) {
                    *x += f(y);
                }
            }
        }
        let (a, b) = (old * dv, new_len * dv);
        match &self.values {
            Values::F32(v) => add_rows(&mut self.vsum, &v[a..b], dv, |y| y as f64),
            Values::F16(v) => add_rows(&mut self.vsum, &v[a..b], dv, |y| y.to_f64()),
            Values::BF16(v) => add_rows(&mut self.vsum, &v[a..b], dv, |y| y.to_f64()),
        }
    }

    /// The sorted run of positions `[lo, hi)` (whole chunks) over the first `n_curves`
    /// curves.
    fn sorted_run(
        &self,
        lo: usize,
        hi: usize,
        chunk: usize,
        n_curves: usize,
        dk: usize,
    ) -> Result<Run> {
        let mut curves = try_with_capacity(n_curves, "KV cache runs")?;
        for codes in &self.codes[..n_curves] {
            let e = sorted_entries(codes, lo, hi)?;
            let mut co = try_vec(0.0f32, e.len() * dk, "KV cache run coordinates")?;
            gather_coords(&e, &self.keys, dk, &mut co);
            let fe = fence_of(&e)?;
            curves.push((e, co, fe));
        }
        Run::new((hi - lo) / chunk, curves, dk)
    }

    /// Candidates of a query at position `p`: the window of every run of `runs` (the binary
    /// decomposition of p's chunk index, as in the parallel index), its own chunk `own`
    /// (`..= p`) and the sinks.
    #[allow(clippy::too_many_arguments)]
    fn for_each_candidate(
        &self,
        runs: &[&Run],
        own: Range<usize>,
        grids: &[Grid],
        prm: &Params,
        q: &[f32],
        p: usize,
        f: &mut (impl Offer<f32> + ?Sized),
    ) {
        let mut probes = ProbeList::new();
        for (ci, g) in grids.iter().enumerate() {
            let qcode = g.code(q) as u32;
            for r in runs {
                let (e, c, fe) = &r.curves[ci];
                let run = RunView {
                    entries: e,
                    coords: c,
                    fence: fe,
                };
                probes.push(Probe { run, qcode }, q, prm.window, f);
            }
        }
        probes.flush(q, prm.window, f);
        offer_own_and_sinks(q, &self.keys, own, prm.n_sink, p, f);
    }

    /// The exact top-k candidates of a query whose runs are `runs` and own chunk `own`: the
    /// brute-force answer over positions `..= own.end - 1` (see
    /// [`crate::exact::search_runs`]).
    #[allow(clippy::too_many_arguments)]
    fn exact_candidates(
        &self,
        runs: &[&Run],
        own: Range<usize>,
        brute: usize,
        grid0: &Grid,
        prm: &Params,
        q: &[f32],
        tk: &mut TopK<f32>,
        sc: &mut Scratch<f32>,
    ) {
        // `runs` hold consecutive positions, in order, up to `own.start`: the last (smallest)
        // ones hold the most recent keys. Up to `brute` keys of them and `own` are scanned
        // row by row (a few thousand hot keys cost less than a window and a box-tree descent
        // per run: ~10% of an exact decode step at 1M tokens).
        let (mut cut, mut lo) = (runs.len(), own.start);
        while cut > 0 && own.end - (lo - runs[cut - 1].curves[0].0.len()) <= brute {
            cut -= 1;
            lo -= runs[cut].curves[0].0.len();
        }
        let own = lo..own.end;
        let views: Vec<(RunView<'_, f32>, &BoxTree<f32>)> = runs[..cut]
            .iter()
            .map(|r| {
                let (e, c, fe) = &r.curves[0];
                let view = RunView {
                    entries: e,
                    coords: c,
                    fence: fe,
                };
                (view, &r.boxes)
            })
            .collect();
        let own = |tk: &mut TopK<f32>| {
            offer_rows(q, &self.keys, own, tk);
        };
        search_runs(&views, grid0.code(q) as u32, q, prm.window, own, tk, sc);
    }

    /// The counter's run covering chunks `start .. start + 2^l`, if it has that one.
    fn run_at(&self, (l, start): (usize, usize)) -> Option<&Run> {
        let mut at = 0;
        for r in &self.runs {
            if at == start {
                return (r.n_chunks == 1 << l).then_some(r);
            }
            at += r.n_chunks;
            if at > start {
                return None;
            }
        }
        None
    }

    /// The runs that the queries of chunks `c_lo..=c_hi` search and the counter does not hold
    /// (the counter holds the decomposition of its own chunk count only), keyed by
    /// (level, first chunk). A run inside one of the counter's runs is cut out of it (its
    /// entries filtered by position: still sorted), any other is merged from its halves
    /// (single chunks sorted at the bottom): work linear in what is made, no full rebuild.
    fn runs_for(
        &self,
        c_lo: usize,
        c_hi: usize,
        chunk: usize,
        dk: usize,
    ) -> Result<HashMap<(usize, usize), Run>> {
        let mut made = HashMap::new();
        for c in c_lo..=c_hi {
            for key in decomposition(c) {
                self.make_run(key, chunk, dk, &mut made)?;
            }
        }
        Ok(made)
    }

    fn make_run(
        &self,
        (l, start): (usize, usize),
        chunk: usize,
        dk: usize,
        made: &mut HashMap<(usize, usize), Run>,
    ) -> Result<()> {
        if made.contains_key(&(l, start)) || self.run_at((l, start)).is_some() {
            return Ok(());
        }
        let end = start + (1 << l);
        // A counter run that contains it: cut it out.
        let mut at = 0;
        for r in &self.runs {
            if at <= start && end <= at + r.n_chunks {
                let run = cut_run(r, start, end, chunk, dk)?;
                made.try_reserve(1).map_err(oom("KV cache runs", 1))?;
                made.insert((l, start), run);
                return Ok(());
            }
            at += r.n_chunks;
        }
        let run = if l == 0 {
            self.sorted_run(start * chunk, end * chunk, chunk, self.codes.len(), dk)?
        } else {
            let half = 1 << (l - 1);
            self.make_run((l - 1, start), chunk, dk, made)?;
            self.make_run((l - 1, start + half), chunk, dk, made)?;
            let get = |key| self.run_at(key).or_else(|| made.get(&key));
            match (get((l - 1, start)), get((l - 1, start + half))) {
                (Some(a), Some(b)) => merge_runs(a, b, dk)?,
                _ => return Err(ZetaError::Internal("a half run was not made".into())),
            }
        };
        made.try_reserve(1).map_err(oom("KV cache runs", 1))?;
        made.insert((l, start), run);
        Ok(())
    }

    /// Means of keys and values over positions 0..=p for p in first..s, rows (p - first).
    fn suffix_means(
        &self,
        first: usize,
        s: usize,
        dk: usize,
        dv: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = s - first;
        let mut kb = try_vec(0.0f32, n * dk, "mean_token key means")?;
        let mut vb = try_vec(0.0f32, n * dv, "mean_token value means")?;
        let mut ks = try_with_capacity(dk, "mean_token sums")?;
        ks.extend_from_slice(&self.ksum);
        let mut vs = try_with_capacity(dv, "mean_token sums")?;
        vs.extend_from_slice(&self.vsum);
        for p in (first..s).rev() {
            let i = p - first;
            let inv = 1.0 / (p + 1) as f64;
            for j in 0..dk {
                kb[i * dk + j] = (ks[j] * inv) as f32;
                ks[j] -= self.keys[p * dk + j] as f64;
            }
            for j in 0..dv {
                vb[i * dv + j] = (vs[j] * inv) as f32;
                vs[j] -= self.values.get_f64(p * dv + j);
            }
        }
        Ok((kb, vb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{forward_with, AttnOpts, Search, Shape};

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn decode_equals_parallel_forward() {
        let (hkv, h, s, dk, dv, topk) = (2usize, 4usize, 300usize, 3usize, 5usize, 6usize);
        let prm = Params {
            chunk: 8,
            window: 3,
            n_curves: 2,
            n_sink: 2,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let (q, k, v) = (
            data(h * s * dk, 1),
            data(hkv * s * dk, 2),
            data(hkv * s * dv, 3),
        );
        let gamma = vec![0.5, 0.7, 1.0, 1.3];
        for (mean_token, exact) in [(false, false), (true, false), (false, true), (true, true)] {
            let sh = Shape {
                b: 1,
                h,
                hkv,
                n: s,
                s,
                dk,
                dv,
            };
            let search = if exact { Search::Exact } else { Search::Window };
            let (want, _) = forward_with(
                &sh,
                &prm,
                search,
                &AttnOpts { topk, mean_token },
                &q,
                &k,
                &v,
                &gamma,
            )
            .unwrap();
            let mut c = KvCache::new(1, hkv, dk, dv, prm, "float32").unwrap();
            for t in 0..s {
                let kt: Vec<f32> = (0..hkv)
                    .flat_map(|g| k[(g * s + t) * dk..(g * s + t + 1) * dk].to_vec())
                    .collect();
                let vt: Vec<f32> = (0..hkv)
                    .flat_map(|g| v[(g * s + t) * dv..(g * s + t + 1) * dv].to_vec())
                    .collect();
                c.extend(&kt, &vt, 1).unwrap();
                let qt: Vec<f32> = (0..h)
                    .flat_map(|hh| q[(hh * s + t) * dk..(hh * s + t + 1) * dk].to_vec())
                    .collect();
                let got = c
                    .attend(&qt, h, 1, topk, &gamma, mean_token, None, exact)
                    .unwrap();
                for hh in 0..h {
                    let w = &want[(hh * s + t) * dv..(hh * s + t + 1) * dv];
                    let g = &got[hh * dv..(hh + 1) * dv];
                    for (a, b) in w.iter().zip(g) {
                        assert!(
                            (a - b).abs() <= 1e-6,
                            "t={t} h={hh} exact={exact}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The codes of an extend of at least `BATCHED_CODES` tokens (the batched encode) are the
    /// per-key `Grid::code`s of a smaller one, for every group and curve.
    #[test]
    fn large_extend_codes_equal_per_key_codes() {
        let (hkv, dk, dv) = (2usize, 3usize, 1usize);
        let prm = Params {
            chunk: 64,
            window: 8,
            n_curves: 3,
            n_sink: 0,
            causal: true,
            bits: 10,
            scale: 0.7,
        };
        let steps = [5usize, BATCHED_CODES + 37, 3];
        let total: usize = steps.iter().sum();
        let k = data(hkv * total * dk, 21);
        let v = data(hkv * total * dv, 22);
        let mut c = KvCache::new(1, hkv, dk, dv, prm, "float32").unwrap();
        let mut at = 0;
        for &t in &steps {
            let kt: Vec<f32> = (0..hkv)
                .flat_map(|g| k[(g * total + at) * dk..(g * total + at + t) * dk].to_vec())
                .collect();
            let vt: Vec<f32> = (0..hkv)
                .flat_map(|g| v[(g * total + at) * dv..(g * total + at + t) * dv].to_vec())
                .collect();
            c.extend(&kt, &vt, t).unwrap();
            at += t;
        }
        for (gi, g) in c.groups.iter().enumerate() {
            assert_eq!(g.codes.len(), prm.n_curves);
            for (codes, grid) in g.codes.iter().zip(&c.grids) {
                let want: Vec<u32> = k[gi * total * dk..(gi + 1) * total * dk]
                    .chunks_exact(dk)
                    .map(|x| grid.code(x) as u32)
                    .collect();
                assert_eq!(*codes, want, "group {gi}");
            }
        }
    }

    /// Exact decode over the levelled runs (`xruns`): equal to brute force (by (d2,
    /// position), ties included: the keys sit on a coarse grid) after extends of mixed sizes,
    /// with the recent-keys scan off, small and on; the runs keep their invariant.
    #[test]
    fn exact_decode_over_levelled_runs() {
        use crate::index::sq_dist;
        let (hkv, dk, dv, topk, chunk) = (2usize, 3usize, 2usize, 5usize, 4usize);
        let prm = Params {
            chunk,
            window: 2,
            n_curves: 2,
            n_sink: 0,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let steps = [
            1usize, 3, 1, 1, 17, 64, 1, 5, 130, 1, 1, 2, 300, 7, 1, 33, 1,
        ];
        let total: usize = steps.iter().sum();
        // Coordinates on a grid of 0.5: many equal distances.
        let k: Vec<f32> = data(hkv * total * dk, 7)
            .iter()
            .map(|x| (x * 2.0).round() * 0.5)
            .collect();
        let v = data(hkv * total * dv, 8);
        let gamma = vec![1.0, 1.0];
        for brute in [0usize, 9, BRUTE_KEYS] {
            let mut c = KvCache::new(1, hkv, dk, dv, prm, "float32").unwrap();
            c.brute_keys = brute;
            let mut at = 0;
            for (si, &t) in steps.iter().enumerate() {
                let slice = |x: &[f32], w: usize| -> Vec<f32> {
                    (0..hkv)
                        .flat_map(|g| x[(g * total + at) * w..(g * total + at + t) * w].to_vec())
                        .collect()
                };
                c.extend(&slice(&k, dk), &slice(&v, dv), t).unwrap();
                at += t;
                for g in &c.groups {
                    // Levels strictly decrease; the runs hold chunks 0..indexed, in order.
                    let lv: Vec<u32> = g.xruns.iter().map(|r| exact_level(r.n_chunks)).collect();
                    assert!(lv.windows(2).all(|w| w[0] > w[1]), "levels {lv:?}");
                    let mut first = 0;
                    for r in &g.xruns {
                        let (e, co, _) = &r.curves[0];
                        assert!(e.windows(2).all(|w| w[0] < w[1]));
                        let mut pos: Vec<usize> =
                            e.iter().map(|&x| unpack_pos(x) as usize).collect();
                        pos.sort_unstable();
                        let want: Vec<usize> =
                            (first * chunk..(first + r.n_chunks) * chunk).collect();
                        assert_eq!(pos, want);
                        for (x, xc) in e.iter().zip(co.chunks_exact(dk)) {
                            let p = unpack_pos(*x) as usize;
                            assert_eq!(xc, &g.keys[p * dk..(p + 1) * dk]);
                        }
                        first += r.n_chunks;
                    }
                    assert_eq!(first, g.indexed_chunks);
                }
                let q: Vec<f32> = data(hkv * dk, 100 + si as u64)
                    .iter()
                    .map(|x| (x * 2.0).round() * 0.5)
                    .collect();
                let got = c
                    .attend(&q, hkv, 1, topk, &gamma, false, None, true)
                    .unwrap();
                for hh in 0..hkv {
                    let (qr, kg) = (&q[hh * dk..(hh + 1) * dk], &c.groups[hh].keys);
                    let mut d: Vec<(f32, usize)> = (0..at)
                        .map(|p| (sq_dist(qr, &kg[p * dk..(p + 1) * dk]), p))
                        .collect();
                    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    d.truncate(topk);
                    // The output of these exact candidates: the forward's combine, in order.
                    let cands: Vec<(f32, u32)> = d.iter().map(|&(x, p)| (x, p as u32)).collect();
                    let mut want = vec![0.0f32; dv];
                    combine(
                        &cands,
                        1.0,
                        &c.groups[hh].values,
                        None,
                        &mut want,
                        |_, _| {},
                    );
                    assert_eq!(
                        &got[hh * dv..(hh + 1) * dv],
                        &want[..],
                        "brute {brute} step {si}"
                    );
                }
            }
        }
    }

    #[test]
    fn bytes_round_trip_and_corruption() {
        let prm = Params {
            chunk: 4,
            window: 2,
            n_curves: 1,
            n_sink: 0,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let mut c = KvCache::new(1, 1, 3, 2, prm, "float16").unwrap();
        c.extend(&data(30 * 3, 4), &data(30 * 2, 5), 30).unwrap();
        let b = c.to_bytes().unwrap();
        let d = KvCache::from_bytes(&b).unwrap();
        assert!(d.same_contents(&c).unwrap());
        let mut bad = b.clone();
        bad[120] ^= 1;
        assert!(matches!(
            KvCache::from_bytes(&bad),
            Err(ZetaError::Corrupt(_))
        ));
        assert!(KvCache::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(KvCache::from_bytes(b"nonsense").is_err());
    }

    #[test]
    fn failed_extend_changes_nothing() {
        let prm = Params {
            chunk: 4,
            window: 2,
            n_curves: 1,
            n_sink: 0,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let mut c = KvCache::new(1, 1, 3, 2, prm, "float32").unwrap();
        c.extend(&data(9, 1), &data(6, 2), 3).unwrap();
        let before = c.to_bytes().unwrap();
        let mut k = data(9, 3);
        k[4] = f32::NAN;
        assert!(c.extend(&k, &data(6, 4), 3).is_err());
        assert!(c.extend(&data(8, 3), &data(6, 4), 3).is_err());
        assert_eq!(c.to_bytes().unwrap(), before);
    }

    fn prm4() -> Params {
        Params {
            chunk: 4,
            window: 2,
            n_curves: 2,
            n_sink: 1,
            causal: true,
            bits: 10,
            scale: 1.0,
        }
    }

    /// A header with the given fields and a body of `body` zero bytes, checksum valid.
    fn crafted(fields: [u64; 10], dcode: u8, body: usize) -> Vec<u8> {
        let mut w = MAGIC.to_vec();
        w.extend_from_slice(&VERSION.to_le_bytes());
        for f in fields {
            w.extend_from_slice(&f.to_le_bytes());
        }
        w.extend_from_slice(&1.0f64.to_le_bytes());
        w.push(dcode);
        w.resize(w.len() + body, 0);
        let crc = crc32fast::hash(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        w
    }

    #[test]
    fn absurd_headers_are_refused_before_allocating() {
        // The files: 105 bytes, valid checksum, batch 2^20 x kv heads 2^10, length 0;
        // and value_dim 2^38.
        let a = crafted([1 << 20, 1 << 10, 3, 4, 64, 0, 1, 0, 10, 0], 0, 0);
        assert_eq!(a.len(), 105);
        assert!(matches!(
            KvCache::from_bytes(&a),
            Err(ZetaError::Corrupt(_))
        ));
        let b = crafted([1, 1, 3, 1 << 38, 64, 0, 1, 0, 10, 0], 0, 0);
        assert!(matches!(
            KvCache::from_bytes(&b),
            Err(ZetaError::Corrupt(_))
        ));
        // Sizes whose product overflows, a body that does not match, zero dims.
        for f in [
            [1 << 40, 1 << 40, 3, 4, 64, 0, 1, 0, 10, 1 << 40],
            [1, 1, 3, 4, 64, 0, 1, 0, 10, 1 << 30],
            [1, 1, 0, 4, 64, 0, 1, 0, 10, 0],
            [1, 1, 3, 4, 0, 0, 1, 0, 10, 0],
            [1, 1, 9, 4, 64, 0, 1, 0, 10, 0],
            [0, 1, 3, 4, 64, 0, 1, 0, 10, 0],
        ] {
            assert!(KvCache::from_bytes(&crafted(f, 0, 0)).is_err(), "{f:?}");
        }
        // A plausible empty cache still loads.
        let ok = crafted([2, 3, 3, 4, 64, 0, 1, 0, 10, 0], 1, 0);
        assert_eq!(KvCache::from_bytes(&ok).unwrap().len(), 0);
    }

    #[test]
    fn absurd_constructor_sizes_are_errors() {
        let e = KvCache::new(1 << 10, 1 << 20, 3, 4, prm4(), "float32").unwrap_err();
        assert!(
            matches!(
                e,
                ZetaError::Value {
                    arg: "num_kv_heads",
                    ..
                }
            ),
            "{e}"
        );
        let e = KvCache::new(1, 1, 3, 1 << 40, prm4(), "float32").unwrap_err();
        assert!(
            matches!(
                e,
                ZetaError::Value {
                    arg: "value_dim",
                    ..
                }
            ),
            "{e}"
        );
        let e = KvCache::new(usize::MAX, 2, 3, 4, prm4(), "float32").unwrap_err();
        assert!(matches!(e, ZetaError::Value { arg: "batch", .. }), "{e}");
        // Within the limits but far beyond any memory: MemoryError from the probe.
        let e = KvCache::new(1 << 12, 1 << 12, 3, 1 << 24, prm4(), "float32").unwrap_err();
        assert!(matches!(e, ZetaError::Alloc { .. }), "{e}");
        // A huge topk on a small cache is fine (clamped to the cache's length).
        let mut c = KvCache::new(1, 1, 3, 2, prm4(), "float32").unwrap();
        c.extend(&data(30, 1), &data(20, 2), 10).unwrap();
        let out = c
            .attend(&data(3, 3), 1, 1, usize::MAX, &[1.0], false, None, false)
            .unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn mutated_files_never_panic() {
        let mut c = KvCache::new(2, 1, 3, 2, prm4(), "bfloat16").unwrap();
        c.extend(&data(2 * 11 * 3, 4), &data(2 * 11 * 2, 5), 11)
            .unwrap();
        let good = c.to_bytes().unwrap();
        let mut s = 12345u64;
        let mut rnd = |m: usize| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as usize % m.max(1)
        };
        for i in 0..3000 {
            let mut b = good.clone();
            match i % 4 {
                0 => {
                    let j = rnd(b.len());
                    b[j] ^= 1 << rnd(8);
                }
                1 => {
                    // One header field set to a random power of two or small value.
                    let f = rnd(10);
                    let v: u64 = if rnd(2) == 0 {
                        1 << rnd(64)
                    } else {
                        rnd(20) as u64
                    };
                    b[12 + 8 * f..20 + 8 * f].copy_from_slice(&v.to_le_bytes());
                }
                2 => b.truncate(rnd(b.len())),
                _ => b[100] = rnd(4) as u8,
            }
            if rnd(4) != 0 && b.len() >= 4 {
                let n = b.len() - 4;
                let crc = crc32fast::hash(&b[..n]);
                b[n..].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(d) = KvCache::from_bytes(&b) {
                // Whatever loads must also work.
                let to = d.to_bytes().unwrap();
                assert!(KvCache::from_bytes(&to).unwrap().same_contents(&d).unwrap());
            }
        }
    }
}
