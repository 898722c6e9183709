//! Top-k Cauchy-softmax attention over the Z-order index: forward, backward, and knn.
//!
//! Layouts (row-major, like torch SDPA): q (B, H, N, dk), k (B, Hkv, S, dk),
//! v (B, Hkv, S, dv), out (B, H, N, dv); query head h reads kv head h / (H / Hkv).
//! Query i sits at absolute position S - N + i (bottom-right alignment).
//!
//! Scores: s_j = 1 / (||q - k_j||^2 + gamma^2), a_j = s_j / sum(s), o = sum a_j v_j.
//! With `mean_token`, one extra item per query: the running means of k and v over
//! positions <= p (non-causal: over all keys).
//!
//! Work splits over (batch, kv-head) groups, and inside a group over queries; the index of
//! a group is built once and shared by its H / Hkv query heads. The backward is two passes:
//! per query (dq, dgamma and per-slot coefficients), then per key through an inverse index
//! (CSR of which query slots picked each key), so dK/dV are gathers, race-free and
//! bit-reproducible whatever the thread count.
use crate::error::{numel, try_vec, try_with_capacity, vec_or_unwind, Result, ZetaError};
use crate::exact::{ExactIndex, Scratch};
use crate::index::{prefetch, select_topk, sq_dist, KeyIndex, Params, TopK};
use crate::quantize::{first_non_finite, Real};
use num_traits::Float;
use rayon::prelude::*;

/// Problem shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub n: usize,
    pub s: usize,
    pub dk: usize,
    pub dv: usize,
}

impl Shape {
    pub fn group(&self) -> usize {
        self.h / self.hkv
    }
    pub fn check(&self, causal: bool) -> Result<()> {
        if self.b == 0 || self.h == 0 || self.hkv == 0 {
            return Err(ZetaError::value("q", "batch and head counts must be >= 1"));
        }
        if self.h % self.hkv != 0 {
            return Err(ZetaError::value(
                "k",
                format!(
                    "query heads ({}) must be a multiple of kv heads ({})",
                    self.h, self.hkv
                ),
            ));
        }
        if self.n == 0 {
            return Err(ZetaError::value("q", "empty sequence (N = 0)"));
        }
        if self.s == 0 {
            return Err(ZetaError::value("k", "empty sequence (S = 0)"));
        }
        if causal && self.s < self.n {
            return Err(ZetaError::value(
                "k",
                format!(
                    "causal attention needs at least as many keys as queries (S={} < N={})",
                    self.s, self.n
                ),
            ));
        }
        if self.dk == 0 || self.dk > crate::morton::MAX_DIMS {
            return Err(ZetaError::value(
                "q",
                format!("key_dim must be 1..=8, got {}", self.dk),
            ));
        }
        Ok(())
    }
}

fn check_len(arg: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(ZetaError::value(
            arg,
            format!("has {got} elements, expected {want}"),
        ));
    }
    Ok(())
}

fn check_finite<T: Real>(arg: &'static str, x: &[T]) -> Result<()> {
    if let Some(p) = first_non_finite(x) {
        return Err(ZetaError::value(
            arg,
            format!("contains NaN or inf (flat index {p})"),
        ));
    }
    Ok(())
}

fn check_gamma(gamma: &[f64], h: usize) -> Result<()> {
    if gamma.len() != h {
        return Err(ZetaError::value(
            "gamma",
            format!("needs one value per query head ({h}), got {}", gamma.len()),
        ));
    }
    if let Some(g) = gamma.iter().find(|g| !(g.is_finite() && **g > 0.0)) {
        return Err(ZetaError::value(
            "gamma",
            format!("must be finite and > 0, got {g}"),
        ));
    }
    Ok(())
}

/// Prefix sums (f64) of rows: out[(p+1)*d..] = sum of rows 0..=p; out[0..d] = 0.
fn prefix_sums<T: Real>(x: &[T], d: usize) -> Result<Vec<f64>> {
    let s = x.len() / d;
    let mut out = try_vec(0.0f64, (s + 1) * d, "mean_token prefix sums")?;
    for p in 0..s {
        for j in 0..d {
            out[(p + 1) * d + j] = out[p * d + j] + x[p * d + j].to_f64();
        }
    }
    Ok(out)
}

/// Mean over positions 0..=p (causal) or all (non-causal) from prefix sums.
fn mean_row<T: Float>(pre: &[f64], d: usize, p: usize, causal: bool, s: usize, out: &mut [T]) {
    let upto = if causal { p + 1 } else { s };
    let inv = 1.0 / upto as f64;
    for j in 0..d {
        out[j] = T::from(pre[upto * d + j] * inv).unwrap();
    }
}

/// Options of one attention call beyond the index parameters.
#[derive(Clone, Copy, Debug)]
pub struct AttnOpts {
    pub topk: usize,
    pub mean_token: bool,
}

fn validate<T: Real>(
    sh: &Shape,
    prm: &Params,
    q: &[T],
    k: &[T],
    v: Option<&[T]>,
    topk: usize,
) -> Result<()> {
    sh.check(prm.causal)?;
    prm.check(sh.dk)?;
    if topk == 0 {
        return Err(ZetaError::value("topk", "must be >= 1"));
    }
    check_len("q", q.len(), sh.b * sh.h * sh.n * sh.dk)?;
    check_len("k", k.len(), sh.b * sh.hkv * sh.s * sh.dk)?;
    check_finite("q", q)?;
    check_finite("k", k)?;
    if let Some(v) = v {
        check_len("v", v.len(), sh.b * sh.hkv * sh.s * sh.dv)?;
        check_finite("v", v)?;
    }
    if sh.s > u32::MAX as usize {
        return Err(ZetaError::value("k", "sequence longer than 2^32"));
    }
    Ok(())
}

/// Mutable rows of an output buffer, written from several threads by row index.
struct Rows<T> {
    ptr: *mut T,
    width: usize,
    n: usize,
}
// SAFETY: `Rows` is only a pointer into a buffer borrowed mutably for its whole life; rows
// are handed out by index and every index is visited by exactly one task (see `row`).
unsafe impl<T: Send> Send for Rows<T> {}
// SAFETY: as above: shared access never touches the same row from two threads.
unsafe impl<T: Send> Sync for Rows<T> {}

impl<T> Rows<T> {
    fn new(buf: &mut [T], width: usize) -> Self {
        Rows {
            ptr: buf.as_mut_ptr(),
            width,
            n: buf.len() / width.max(1),
        }
    }
    /// SAFETY: the caller visits each row index at most once across all threads (the rows
    /// come from a permutation), so no two live `&mut` alias.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize) -> &mut [T] {
        assert!(i < self.n);
        std::slice::from_raw_parts_mut(self.ptr.add(i * self.width), self.width)
    }
}

/// The group's queries ordered by their curve-0 code: neighbouring queries then search the
/// same parts of the runs and gather the same values, which keeps them in cache.
///
/// Perf note: at N = 32k, H = 8 this made the forward ~1.6x faster than position order
/// (value rows and run entries were the cache misses).
fn query_order<T: Float + Real>(index: &KeyIndex<T>, qg: &[T], dk: usize) -> Result<Vec<u32>> {
    let g0 = &index.grids[0];
    let n = qg.len() / dk;
    let mut keys = try_vec(0u64, n, "query order")?;
    keys.par_iter_mut()
        .zip(qg.par_chunks_exact(dk))
        .enumerate()
        .for_each(|(i, (o, x))| *o = (g0.code(x) << 32) | i as u64);
    keys.par_sort_unstable();
    let mut order = try_vec(0u32, n, "query order")?;
    order
        .par_iter_mut()
        .zip(keys.par_iter())
        .for_each(|(o, &e)| *o = e as u32);
    Ok(order)
}

/// Queries handed to one rayon task.
const QUERY_BLOCK: usize = 256;

/// How the candidates of a query are found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Search {
    /// `window` entries on each side of the query's code in every run, on every curve
    /// (plus the own chunk and sinks): approximate.
    #[default]
    Window,
    /// The window, then every block whose box meets the k-th distance's ball
    /// ([`crate::exact`]): the brute-force top-k by (d2, position), always.
    Exact,
}

/// The index of one group's keys, and how to search it.
struct Searcher<T> {
    index: KeyIndex<T>,
    exact: Option<ExactIndex<T>>,
    mult: usize,
}

impl<T: Float + Real> Searcher<T> {
    fn build(k: &[T], dk: usize, prm: &Params, search: Search) -> Result<Self> {
        Ok(match search {
            Search::Window => Searcher {
                index: KeyIndex::build(k, dk, prm)?,
                exact: None,
                mult: prm.multiplicity(),
            },
            Search::Exact => {
                // Curve 0 alone, no sinks: the exact scan covers what they would add.
                let p1 = Params {
                    n_curves: 1,
                    n_sink: 0,
                    ..*prm
                };
                let index = KeyIndex::build(k, dk, &p1)?;
                let exact = Some(ExactIndex::build(&index)?);
                Searcher {
                    index,
                    exact,
                    mult: 1,
                }
            }
        })
    }

    /// Per-thread state of [`Searcher::run`].
    fn topk(&self, topk: usize) -> (TopK<T>, Scratch<T>) {
        (TopK::new(topk, self.mult), Scratch::default())
    }

    /// Fills `tk` (cleared first) with the query's candidates.
    #[inline]
    fn run(&self, q: &[T], p: usize, k: &[T], (tk, sc): &mut (TopK<T>, Scratch<T>)) {
        tk.clear();
        match &self.exact {
            Some(ex) => ex.search(&self.index, q, p, k, tk, sc),
            None => self
                .index
                .for_each_candidate(q, p, k, |pos, d2| tk.push(pos, d2)),
        }
    }
}

/// Exact top-k among the index candidates: indices (B, H, N, topk) as int64 (-1 = missing)
/// and squared distances (+inf = missing).
pub fn knn<T: Float + Real>(
    sh: &Shape,
    prm: &Params,
    topk: usize,
    q: &[T],
    k: &[T],
) -> Result<(Vec<i64>, Vec<T>)> {
    knn_with(sh, prm, Search::Window, topk, q, k)
}

/// [`knn`] with a choice of search (`Search::Exact`: the brute-force answer).
pub fn knn_with<T: Float + Real>(
    sh: &Shape,
    prm: &Params,
    search: Search,
    topk: usize,
    q: &[T],
    k: &[T],
) -> Result<(Vec<i64>, Vec<T>)> {
    validate(sh, prm, q, k, None, topk)?;
    let total = numel(&[sh.b, sh.h, sh.n, topk], "knn indices")?;
    let mut idx = try_vec(-1i64, total, "knn indices")?;
    let mut dist = try_vec(T::infinity(), total, "knn distances")?;
    let g = sh.group();
    let per_group = g * sh.n * topk;
    idx.par_chunks_mut(per_group)
        .zip(dist.par_chunks_mut(per_group))
        .enumerate()
        .try_for_each(|(gi, (idx_g, dist_g))| -> Result<()> {
            let kk = &k[gi * sh.s * sh.dk..(gi + 1) * sh.s * sh.dk];
            let sr = Searcher::build(kk, sh.dk, prm, search)?;
            let (b, hkv) = (gi / sh.hkv, gi % sh.hkv);
            let qg = &q[(b * sh.h + hkv * g) * sh.n * sh.dk..][..g * sh.n * sh.dk];
            let order = query_order(&sr.index, qg, sh.dk)?;
            let (irows, drows) = (Rows::new(idx_g, topk), Rows::new(dist_g, topk));
            order.par_chunks(QUERY_BLOCK).for_each_init(
                // No more than S distinct keys can be kept, whatever topk asks for.
                || (sr.topk(topk.min(sh.s)), Vec::new()),
                |(tk, cands), block| {
                    for &qi in block {
                        let qi = qi as usize;
                        let qrow = &qg[qi * sh.dk..(qi + 1) * sh.dk];
                        let p = sh.s - sh.n + qi % sh.n;
                        sr.run(qrow, p, kk, tk);
                        tk.0.drain_sorted(cands);
                        // SAFETY: `order` is a permutation: each row is written by one task.
                        let (io, dout) = unsafe { (irows.row(qi), drows.row(qi)) };
                        for (slot, &(d2, pos)) in cands.iter().enumerate() {
                            io[slot] = pos as i64;
                            dout[slot] = d2;
                        }
                    }
                },
            );
            Ok(())
        })?;
    Ok((idx, dist))
}

/// Forward. Returns (out (B, H, N, dv), indices (B, H, N, topk) int32 with -1 padding: half
/// the memory of int64 for what the backward keeps; S < 2^31 per head).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Float + Real>(
    sh: &Shape,
    prm: &Params,
    opts: &AttnOpts,
    q: &[T],
    k: &[T],
    v: &[T],
    gamma: &[f64],
) -> Result<(Vec<T>, Vec<i32>)> {
    forward_with(sh, prm, Search::Window, opts, q, k, v, gamma)
}

/// [`forward`] with a choice of search (`Search::Exact`: the brute-force top-k).
#[allow(clippy::too_many_arguments)]
pub fn forward_with<T: Float + Real>(
    sh: &Shape,
    prm: &Params,
    search: Search,
    opts: &AttnOpts,
    q: &[T],
    k: &[T],
    v: &[T],
    gamma: &[f64],
) -> Result<(Vec<T>, Vec<i32>)> {
    let topk = opts.topk;
    validate(sh, prm, q, k, Some(v), topk)?;
    check_gamma(gamma, sh.h)?;
    let (dk, dv) = (sh.dk, sh.dv);
    let n_out = numel(&[sh.b, sh.h, sh.n, dv], "attention output")?;
    let mut out = try_vec(T::zero(), n_out, "attention output")?;
    if sh.s > i32::MAX as usize {
        return Err(ZetaError::value("k", "more than 2^31 - 1 keys per head"));
    }
    let n_idx = numel(&[sh.b, sh.h, sh.n, topk], "attention indices")?;
    let mut idx = try_vec(-1i32, n_idx, "attention indices")?;
    let g = sh.group();
    out.par_chunks_mut(g * sh.n * dv)
        .zip(idx.par_chunks_mut(g * sh.n * topk))
        .enumerate()
        .try_for_each(|(gi, (out_g, idx_g))| -> Result<()> {
            let kk = &k[gi * sh.s * dk..(gi + 1) * sh.s * dk];
            let vv = &v[gi * sh.s * dv..(gi + 1) * sh.s * dv];
            let sr = Searcher::build(kk, dk, prm, search)?;
            let (pk, pv) = if opts.mean_token {
                (prefix_sums(kk, dk)?, prefix_sums(vv, dv)?)
            } else {
                (Vec::new(), Vec::new())
            };
            let (b, hkv) = (gi / sh.hkv, gi % sh.hkv);
            let qg = &q[(b * sh.h + hkv * g) * sh.n * dk..][..g * sh.n * dk];
            let order = query_order(&sr.index, qg, dk)?;
            let (orows, irows) = (Rows::new(out_g, dv), Rows::new(idx_g, topk));
            order.par_chunks(QUERY_BLOCK).for_each_init(
                || {
                    (
                        sr.topk(topk.min(sh.s)),
                        Vec::new(),
                        vec_or_unwind(T::zero(), dk, "attention scratch"),
                        vec_or_unwind(T::zero(), dv, "attention scratch"),
                    )
                },
                |(tk, cands, kbar, vbar), block| {
                    for &qi in block {
                        let qi = qi as usize;
                        let h = hkv * g + qi / sh.n;
                        let qrow = &qg[qi * dk..(qi + 1) * dk];
                        let p = sh.s - sh.n + qi % sh.n;
                        let g2 = T::from(gamma[h] * gamma[h]).unwrap();
                        sr.run(qrow, p, kk, tk);
                        tk.0.drain_sorted(cands);
                        // SAFETY: `order` is a permutation: each row is written by one task.
                        let (o, io) = unsafe { (orows.row(qi), irows.row(qi)) };
                        let mut z = T::zero();
                        // The rows are scattered: ask for all of them before the first use.
                        for &(_, pos) in cands.iter() {
                            prefetch(&vv[pos as usize * dv..(pos as usize + 1) * dv]);
                        }
                        for (slot, &(d2, pos)) in cands.iter().enumerate() {
                            io[slot] = pos as i32;
                            let s = T::one() / (d2 + g2);
                            z = z + s;
                            let vr = &vv[pos as usize * dv..(pos as usize + 1) * dv];
                            for (a, &x) in o.iter_mut().zip(vr) {
                                *a = *a + s * x;
                            }
                        }
                        if opts.mean_token {
                            mean_row(&pk, dk, p, prm.causal, sh.s, kbar);
                            mean_row(&pv, dv, p, prm.causal, sh.s, vbar);
                            let s = T::one() / (sq_dist(qrow, kbar) + g2);
                            z = z + s;
                            for (a, &x) in o.iter_mut().zip(vbar.iter()) {
                                *a = *a + s * x;
                            }
                        }
                        let inv = T::one() / z;
                        for a in o.iter_mut() {
                            *a = *a * inv;
                        }
                    }
                },
            );
            Ok(())
        })?;
    Ok((out, idx))
}

/// Gradients of the forward: (dq, dk, dv, dgamma (H,)).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn backward<T: Float + Real>(
    sh: &Shape,
    prm: &Params,
    opts: &AttnOpts,
    q: &[T],
    k: &[T],
    v: &[T],
    gamma: &[f64],
    idx: &[i32],
    dout: &[T],
) -> Result<(Vec<T>, Vec<T>, Vec<T>, Vec<f64>)> {
    let topk = opts.topk;
    sh.check(prm.causal)?;
    check_gamma(gamma, sh.h)?;
    let (dk, dv, n, s) = (sh.dk, sh.dv, sh.n, sh.s);
    check_len("q", q.len(), sh.b * sh.h * n * dk)?;
    check_len("k", k.len(), sh.b * sh.hkv * s * dk)?;
    check_len("v", v.len(), sh.b * sh.hkv * s * dv)?;
    check_len("indices", idx.len(), sh.b * sh.h * n * topk)?;
    check_len("grad_out", dout.len(), sh.b * sh.h * n * dv)?;
    check_finite("grad_out", dout)?;
    if let Some(bad) = idx.iter().find(|&&j| j < -1 || j as i64 >= s as i64) {
        return Err(ZetaError::value(
            "indices",
            format!("index {bad} out of range for S={s}"),
        ));
    }
    let g = sh.group();
    if g * n * topk > u32::MAX as usize {
        return Err(ZetaError::value(
            "topk",
            "too many (query, slot) pairs in one kv-head group",
        ));
    }
    let mut dq = try_vec(T::zero(), q.len(), "dq")?;
    let mut dkk = try_vec(T::zero(), k.len(), "dk")?;
    let mut dvv = try_vec(T::zero(), v.len(), "dv")?;
    let mut dgamma_q = try_vec(0.0f64, sh.b * sh.h * n, "dgamma")?;
    let two = T::from(2.0).unwrap();

    dq.par_chunks_mut(g * n * dk)
        .zip(dkk.par_chunks_mut(s * dk))
        .zip(dvv.par_chunks_mut(s * dv))
        .zip(dgamma_q.par_chunks_mut(g * n))
        .enumerate()
        .try_for_each(|(gi, (((dq_g, dk_g), dv_g), dgam_g))| -> Result<()> {
            let (b, hkv) = (gi / sh.hkv, gi % sh.hkv);
            let kk = &k[gi * s * dk..(gi + 1) * s * dk];
            let vv = &v[gi * s * dv..(gi + 1) * s * dv];
            let q_g = &q[(b * sh.h + hkv * g) * n * dk..][..g * n * dk];
            let do_g = &dout[(b * sh.h + hkv * g) * n * dv..][..g * n * dv];
            let idx_g = &idx[(b * sh.h + hkv * g) * n * topk..][..g * n * topk];
            let (pk, pv) = if opts.mean_token {
                (prefix_sums(kk, dk)?, prefix_sums(vv, dv)?)
            } else {
                (Vec::new(), Vec::new())
            };
            // Pass 1, per query: dq, dgamma, and per-slot coefficients a (for dv) and
            // gd = dL/d(d2) (for dk). Mean-token gradients per query go to mk/mv.
            let mut coef_a = try_vec(T::zero(), g * n * topk, "backward scratch")?;
            let mut coef_g = try_vec(T::zero(), g * n * topk, "backward scratch")?;
            let mut mean_a = try_vec(T::zero(), g * n, "backward scratch")?;
            let mut mean_g = try_vec(T::zero(), g * n, "backward scratch")?;
            dq_g.par_chunks_mut(dk)
                .zip(coef_a.par_chunks_mut(topk))
                .zip(coef_g.par_chunks_mut(topk))
                .zip(dgam_g.par_iter_mut())
                .zip(mean_a.par_iter_mut())
                .zip(mean_g.par_iter_mut())
                .enumerate()
                .for_each_init(
                    || {
                        (
                            vec_or_unwind(T::zero(), topk, "backward scratch"),
                            vec_or_unwind(T::zero(), topk, "backward scratch"),
                            vec_or_unwind(T::zero(), dk, "backward scratch"),
                            vec_or_unwind(T::zero(), dv, "backward scratch"),
                        )
                    },
                    |(sc, da, kbar, vbar), (qi, (((((dqr, ca), cg), dgam), ma), mg))| {
                        let hl = qi / n;
                        let i = qi % n;
                        let h = hkv * g + hl;
                        let p = s - n + i;
                        let qr = &q_g[qi * dk..(qi + 1) * dk];
                        let dor = &do_g[qi * dv..(qi + 1) * dv];
                        let ir = &idx_g[qi * topk..(qi + 1) * topk];
                        let gm = T::from(gamma[h]).unwrap();
                        let g2 = gm * gm;
                        let mut z = T::zero();
                        // The rows are scattered: ask for all of them before the first use.
                        for &j in ir.iter().filter(|&&j| j >= 0) {
                            prefetch(&vv[j as usize * dv..(j as usize + 1) * dv]);
                        }
                        for (slot, &j) in ir.iter().enumerate() {
                            if j < 0 {
                                sc[slot] = T::zero();
                                da[slot] = T::zero();
                                continue;
                            }
                            let j = j as usize;
                            let d2 = sq_dist(qr, &kk[j * dk..(j + 1) * dk]);
                            sc[slot] = T::one() / (d2 + g2);
                            z = z + sc[slot];
                            let vr = &vv[j * dv..(j + 1) * dv];
                            da[slot] = vr
                                .iter()
                                .zip(dor)
                                .fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                        }
                        let (mut sm, mut dam) = (T::zero(), T::zero());
                        if opts.mean_token {
                            mean_row(&pk, dk, p, prm.causal, s, kbar);
                            mean_row(&pv, dv, p, prm.causal, s, vbar);
                            sm = T::one() / (sq_dist(qr, kbar) + g2);
                            z = z + sm;
                            dam = vbar
                                .iter()
                                .zip(dor)
                                .fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                        }
                        let invz = T::one() / z;
                        // t = sum_j a_j da_j = o . dO
                        let mut t = sm * invz * dam;
                        for slot in 0..topk {
                            t = t + sc[slot] * invz * da[slot];
                        }
                        let mut dgs = T::zero();
                        for (slot, &j) in ir.iter().enumerate() {
                            if j < 0 {
                                ca[slot] = T::zero();
                                cg[slot] = T::zero();
                                continue;
                            }
                            let j = j as usize;
                            let a = sc[slot] * invz;
                            let ds = (da[slot] - t) * invz;
                            let gd = -ds * sc[slot] * sc[slot];
                            ca[slot] = a;
                            cg[slot] = gd;
                            dgs = dgs + gd;
                            let kr = &kk[j * dk..(j + 1) * dk];
                            for d in 0..dk {
                                dqr[d] = dqr[d] + two * gd * (qr[d] - kr[d]);
                            }
                        }
                        if opts.mean_token {
                            let a = sm * invz;
                            let ds = (dam - t) * invz;
                            let gd = -ds * sm * sm;
                            dgs = dgs + gd;
                            *ma = a;
                            *mg = gd;
                            for d in 0..dk {
                                dqr[d] = dqr[d] + two * gd * (qr[d] - kbar[d]);
                            }
                        }
                        *dgam = (dgs * two * gm).to_f64();
                    },
                );
            // Inverse index: for each key, the (query, slot) pairs that selected it.
            let mut start = try_vec(0u32, s + 1, "backward inverse index")?;
            for &j in idx_g {
                if j >= 0 {
                    start[j as usize + 1] += 1;
                }
            }
            for j in 0..s {
                start[j + 1] += start[j];
            }
            let mut fill = try_with_capacity(s + 1, "backward inverse index")?;
            fill.extend_from_slice(&start);
            let mut pairs = try_vec(0u32, start[s] as usize, "backward inverse index")?;
            for (e, &j) in idx_g.iter().enumerate() {
                if j >= 0 {
                    let f = &mut fill[j as usize];
                    pairs[*f as usize] = e as u32;
                    *f += 1;
                }
            }
            // Pass 2, per key: dv_j = sum a dO, dk_j = sum -2 gd (q - k_j).
            dk_g.par_chunks_mut(dk)
                .zip(dv_g.par_chunks_mut(dv))
                .enumerate()
                .for_each(|(j, (dkr, dvr))| {
                    let kr = &kk[j * dk..(j + 1) * dk];
                    let mine = &pairs[start[j] as usize..start[j + 1] as usize];
                    // The dO rows are scattered: ask for all of them before the first use.
                    for &e in mine {
                        let qi = e as usize / topk;
                        prefetch(&do_g[qi * dv..(qi + 1) * dv]);
                    }
                    for &e in mine {
                        let e = e as usize;
                        let qi = e / topk;
                        let a = coef_a[e];
                        let gd = coef_g[e];
                        let dor = &do_g[qi * dv..(qi + 1) * dv];
                        for (x, &y) in dvr.iter_mut().zip(dor) {
                            *x = *x + a * y;
                        }
                        let qr = &q_g[qi * dk..(qi + 1) * dk];
                        for d in 0..dk {
                            dkr[d] = dkr[d] - two * gd * (qr[d] - kr[d]);
                        }
                    }
                });
            if opts.mean_token {
                // d mean_p / d x_j = 1/(p+1) for j <= p (causal), 1/S for all (non-causal).
                let mut acc_k = try_vec(0.0f64, dk, "backward scratch")?;
                let mut acc_v = try_vec(0.0f64, dv, "backward scratch")?;
                let mut kbar = try_vec(T::zero(), dk, "backward scratch")?;
                // Per query: d mean_k = -2 gd (q - kbar), d mean_v = a dO.
                let mean_grads =
                    |qi: usize, kbar: &mut [T], gk: &mut [f64], gv: &mut [f64], w: f64| {
                        let i = qi % n;
                        mean_row(&pk, dk, s - n + i, prm.causal, s, kbar);
                        let qr = &q_g[qi * dk..(qi + 1) * dk];
                        let dor = &do_g[qi * dv..(qi + 1) * dv];
                        for d in 0..dk {
                            gk[d] += (-two * mean_g[qi] * (qr[d] - kbar[d])).to_f64() * w;
                        }
                        for d in 0..dv {
                            gv[d] += (mean_a[qi] * dor[d]).to_f64() * w;
                        }
                    };
                if prm.causal {
                    // Sum of per-query mean gradients / (p+1) over queries at positions >= j.
                    let mut per_pos_k = try_vec(0.0f64, n * dk, "backward scratch")?;
                    let mut per_pos_v = try_vec(0.0f64, n * dv, "backward scratch")?;
                    for qi in 0..g * n {
                        let i = qi % n;
                        let w = 1.0 / (s - n + i + 1) as f64;
                        let (gk, gv) = (
                            &mut per_pos_k[i * dk..(i + 1) * dk],
                            &mut per_pos_v[i * dv..(i + 1) * dv],
                        );
                        mean_grads(qi, &mut kbar, gk, gv, w);
                    }
                    for j in (0..s).rev() {
                        if j >= s - n {
                            let i = j - (s - n);
                            for d in 0..dk {
                                acc_k[d] += per_pos_k[i * dk + d];
                            }
                            for d in 0..dv {
                                acc_v[d] += per_pos_v[i * dv + d];
                            }
                        }
                        for d in 0..dk {
                            dk_g[j * dk + d] = dk_g[j * dk + d] + T::from(acc_k[d]).unwrap();
                        }
                        for d in 0..dv {
                            dv_g[j * dv + d] = dv_g[j * dv + d] + T::from(acc_v[d]).unwrap();
                        }
                    }
                } else {
                    let w = 1.0 / s as f64;
                    for qi in 0..g * n {
                        mean_grads(qi, &mut kbar, &mut acc_k, &mut acc_v, w);
                    }
                    for j in 0..s {
                        for d in 0..dk {
                            dk_g[j * dk + d] = dk_g[j * dk + d] + T::from(acc_k[d]).unwrap();
                        }
                        for d in 0..dv {
                            dv_g[j * dv + d] = dv_g[j * dv + d] + T::from(acc_v[d]).unwrap();
                        }
                    }
                }
            }
            Ok(())
        })?;
    let mut dgamma = try_vec(0.0f64, sh.h, "dgamma")?;
    for b in 0..sh.b {
        for h in 0..sh.h {
            dgamma[h] += dgamma_q[(b * sh.h + h) * n..(b * sh.h + h + 1) * n]
                .iter()
                .sum::<f64>();
        }
    }
    Ok((dq, dkk, dvv, dgamma))
}

/// Brute-force exact top-k (no index): the oracle behind `zeta.recall`.
/// Same layout, tie rule (d2, position) and -1/+inf padding as [`knn`].
pub fn exact_knn<T: Float + Real>(
    sh: &Shape,
    causal: bool,
    topk: usize,
    q: &[T],
    k: &[T],
) -> Result<(Vec<i64>, Vec<T>)> {
    sh.check(causal)?;
    if topk == 0 {
        return Err(ZetaError::value("topk", "must be >= 1"));
    }
    check_len("q", q.len(), sh.b * sh.h * sh.n * sh.dk)?;
    check_len("k", k.len(), sh.b * sh.hkv * sh.s * sh.dk)?;
    check_finite("q", q)?;
    check_finite("k", k)?;
    let total = numel(&[sh.b, sh.h, sh.n, topk], "knn indices")?;
    let mut idx = try_vec(-1i64, total, "knn indices")?;
    let mut dist = try_vec(T::infinity(), total, "knn distances")?;
    let (g, dk) = (sh.group(), sh.dk);
    idx.par_chunks_mut(topk)
        .zip(dist.par_chunks_mut(topk))
        .enumerate()
        .for_each_init(Vec::new, |cands: &mut Vec<(T, u32)>, (row, (io, d_o))| {
            let (bh, i) = (row / sh.n, row % sh.n);
            let (b, h) = (bh / sh.h, bh % sh.h);
            let gi = b * sh.hkv + h / g;
            let kk = &k[gi * sh.s * dk..(gi + 1) * sh.s * dk];
            let qr = &q[row * dk..(row + 1) * dk];
            let upto = if causal { sh.s - sh.n + i + 1 } else { sh.s };
            cands.clear();
            // Keep a bounded buffer; once it has been cut to the best topk, only keys that
            // beat the current k-th distance can enter.
            let mut kth = T::infinity();
            let cap = topk.max(32).saturating_mul(8);
            for (j, kr) in kk.chunks_exact(dk).take(upto).enumerate() {
                let d2 = sq_dist(qr, kr);
                if d2 <= kth {
                    cands.push((d2, j as u32));
                    if cands.len() >= cap {
                        select_topk(cands, topk, 1);
                        kth = cands[cands.len() - 1].0;
                    }
                }
            }
            select_topk(cands, topk, 1);
            for (slot, &(d2, pos)) in cands.iter().enumerate() {
                io[slot] = pos as i64;
                d_o[slot] = d2;
            }
        });
    Ok((idx, dist))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
            })
            .collect()
    }

    /// Fewer keys than topk is ordinary input: knn and exact_knn fill the first S slots as
    /// with topk = S and pad the rest with -1 / +inf; the forward equals topk = S exactly.
    #[test]
    fn topk_above_key_count_pads_and_attends_to_the_keys_there_are() {
        for causal in [true, false] {
            let (n, s, dk, dv, big) = (3, 5, 3, 2, 32);
            let sh = Shape {
                b: 1,
                h: 2,
                hkv: 1,
                n,
                s,
                dk,
                dv,
            };
            let prm = Params {
                chunk: 2,
                window: 1,
                n_curves: 1,
                n_sink: 0,
                causal,
                bits: 10,
                scale: 1.0,
            };
            let (q, k, v) = (points(2 * n * dk, 1), points(s * dk, 2), points(s * dv, 3));
            let runs = [
                (knn(&sh, &prm, big, &q, &k), knn(&sh, &prm, s, &q, &k)),
                (
                    exact_knn(&sh, causal, big, &q, &k),
                    exact_knn(&sh, causal, s, &q, &k),
                ),
            ];
            for (wide, exact_s) in runs {
                let ((iw, dw), (is, ds)) = (wide.unwrap(), exact_s.unwrap());
                for row in 0..2 * n {
                    assert_eq!(iw[row * big..][..s], is[row * s..][..s]);
                    assert_eq!(dw[row * big..][..s], ds[row * s..][..s]);
                    assert!(iw[row * big + s..(row + 1) * big].iter().all(|&i| i == -1));
                    assert!(dw[row * big + s..(row + 1) * big]
                        .iter()
                        .all(|d| d.is_infinite()));
                }
            }
            let fwd = |topk| {
                let opts = AttnOpts {
                    topk,
                    mean_token: false,
                };
                forward(&sh, &prm, &opts, &q, &k, &v, &[1.0, 0.5])
                    .unwrap()
                    .0
            };
            assert_eq!(fwd(big), fwd(s), "causal={causal}");
        }
    }
}
