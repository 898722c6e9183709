//! Backward of top-k Cauchy-softmax attention (layouts and scores: [`crate::attention`]).
//!
//! Per (batch, kv-head) group, with the forward's selected indices:
//! 1. [`InverseIndex`]: for each key, the queries that selected it (CSR), and where each
//!    (query, slot) pair sits in that order.
//! 2. [`query_pass`], per query: dq, dgamma, and per-pair coefficients (`a_j`, for dV, and
//!    `dL/d(d2_j)`, for dK) stored in the inverse index's order; with `mean_token` the same
//!    for the mean item.
//! 3. [`key_pass`], per key: dV and dK as gathers over its pairs, whose coefficients are
//!    contiguous: race-free and bit-reproducible whatever the thread count.
//! 4. [`mean_token_grads`]: the mean item's gradients spread over the keys it averages.
use crate::attention::{
    check_finite, check_gamma, check_len, mean_row, prefix_sums, AttnOpts, Rows, Shape,
};
use crate::error::{try_vec, try_vec_par, try_with_capacity, vec_or_unwind, Result, ZetaError};
use crate::index::{prefetch, sq_dist, Params};
use crate::morton::with_dims;
use crate::quantize::Real;
use num_traits::Float;
use rayon::prelude::*;

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
    if topk == 0 {
        return Err(ZetaError::value("topk", "must be >= 1"));
    }
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
    let mut dq = try_vec_par(T::zero(), q.len(), "dq")?;
    let mut dkk = try_vec_par(T::zero(), k.len(), "dk")?;
    let mut dvv = try_vec_par(T::zero(), v.len(), "dv")?;
    let mut dgamma_q = try_vec_par(0.0f64, sh.b * sh.h * n, "dgamma")?;

    dq.par_chunks_mut(g * n * dk)
        .zip(dkk.par_chunks_mut(s * dk))
        .zip(dvv.par_chunks_mut(s * dv))
        .zip(dgamma_q.par_chunks_mut(g * n))
        .enumerate()
        .try_for_each(|(gi, (((dq_g, dk_g), dv_g), dgam_g))| -> Result<()> {
            let (b, hkv) = (gi / sh.hkv, gi % sh.hkv);
            let rows = (b * sh.h + hkv * g) * n;
            let kk = &k[gi * s * dk..(gi + 1) * s * dk];
            let vv = &v[gi * s * dv..(gi + 1) * s * dv];
            let (pk, pv) = if opts.mean_token {
                (prefix_sums(kk, dk)?, prefix_sums(vv, dv)?)
            } else {
                (Vec::new(), Vec::new())
            };
            let grp = Group {
                sh,
                causal: prm.causal,
                mean_token: opts.mean_token,
                topk,
                hkv,
                q: &q[rows * dk..][..g * n * dk],
                dout: &dout[rows * dv..][..g * n * dv],
                idx: &idx[rows * topk..][..g * n * topk],
                k: kk,
                v: vv,
                pk: &pk,
                pv: &pv,
            };
            let inv = InverseIndex::build(grp.idx, s, topk)?;
            let coefs = query_pass(&grp, gamma, &inv, dq_g, dgam_g)?;
            key_pass(&grp, &coefs, &inv, dk_g, dv_g);
            if opts.mean_token {
                mean_token_grads(&grp, &coefs, dk_g, dv_g)?;
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

/// One (batch, kv-head) group's inputs: its `g = H / H_kv` query heads' rows (q, dO,
/// indices; query `qi` = head `qi / N`, position `qi % N`), its keys and values, and their
/// prefix sums when `mean_token`.
struct Group<'a, T> {
    sh: &'a Shape,
    causal: bool,
    mean_token: bool,
    topk: usize,
    hkv: usize,
    q: &'a [T],
    dout: &'a [T],
    idx: &'a [i32],
    k: &'a [T],
    v: &'a [T],
    pk: &'a [f64],
    pv: &'a [f64],
}

/// Per (query, slot) pair that selected a key: the attention weight `a` and `gd =
/// dL/d(d2)`, in the inverse index's order (the key pass reads a key's pairs in sequence);
/// per query, the same for the mean item.
struct Coefs<T> {
    a_gd: Vec<[T; 2]>,
    mean_a: Vec<T>,
    mean_gd: Vec<T>,
}

/// Pass 1, per query: dq and dgamma (written into `dq_g`, `dgam_g`), and the coefficients
/// the key pass needs, each stored at its pair's place in `inv`.
fn query_pass<T: Float + Real>(
    grp: &Group<'_, T>,
    gamma: &[f64],
    inv: &InverseIndex,
    dq_g: &mut [T],
    dgam_g: &mut [f64],
) -> Result<Coefs<T>> {
    let (dk, dv, n, s, topk) = (grp.sh.dk, grp.sh.dv, grp.sh.n, grp.sh.s, grp.topk);
    let rows = grp.q.len() / dk;
    let mut c = Coefs {
        a_gd: try_vec([T::zero(); 2], inv.qis.len(), "backward scratch")?,
        mean_a: try_vec(T::zero(), rows, "backward scratch")?,
        mean_gd: try_vec(T::zero(), rows, "backward scratch")?,
    };
    let two = T::from(2.0).unwrap();
    let g = grp.sh.group();
    // Written at `inv.at` of each pair: scattered, one element per pair.
    let coefs = Rows::new(&mut c.a_gd, 1);
    dq_g.par_chunks_mut(dk)
        .zip(inv.at.par_chunks(topk))
        .zip(dgam_g.par_iter_mut())
        .zip(c.mean_a.par_iter_mut())
        .zip(c.mean_gd.par_iter_mut())
        .enumerate()
        .for_each_init(
            || {
                (
                    vec_or_unwind(T::zero(), topk, "backward scratch"),
                    vec_or_unwind(T::zero(), topk, "backward scratch"),
                    vec_or_unwind(T::zero(), dk, "backward scratch"),
                    vec_or_unwind(T::zero(), dv, "backward scratch"),
                    vec_or_unwind(0u32, topk, "backward scratch"),
                    vec_or_unwind(T::zero(), topk, "backward scratch"),
                    vec_or_unwind(T::zero(), topk, "backward scratch"),
                )
            },
            |(sc, da, kbar, vbar, rows, dots, gds), (qi, ((((dqr, at), dgam), ma), mg))| {
                let (h, p) = (grp.hkv * g + qi / n, s - n + qi % n);
                let qr = &grp.q[qi * dk..(qi + 1) * dk];
                let dor = &grp.dout[qi * dv..(qi + 1) * dv];
                let ir = &grp.idx[qi * topk..(qi + 1) * topk];
                let gm = T::from(gamma[h]).unwrap();
                let g2 = gm * gm;
                let mut z = T::zero();
                // The rows are scattered: ask for all of them before the first use.
                for &j in ir.iter().filter(|&&j| j >= 0) {
                    let j = j as usize;
                    prefetch(&grp.v[j * dv..(j + 1) * dv]);
                    prefetch(&grp.k[j * dk..(j + 1) * dk]);
                }
                let mut nr = 0;
                for (slot, &j) in ir.iter().enumerate() {
                    if j < 0 {
                        sc[slot] = T::zero();
                        continue;
                    }
                    rows[nr] = j as u32;
                    nr += 1;
                    let j = j as usize;
                    sc[slot] = T::one() / (sq_dist(qr, &grp.k[j * dk..(j + 1) * dk]) + g2);
                    z = z + sc[slot];
                }
                // da_j = v_j . dO for the filled slots, in one call (dO stays in cache).
                T::dots(dor, grp.v, &rows[..nr], &mut dots[..nr]);
                let mut filled = dots[..nr].iter();
                for (slot, &j) in ir.iter().enumerate() {
                    da[slot] = if j < 0 {
                        T::zero()
                    } else {
                        *filled.next().unwrap()
                    };
                }
                let (mut sm, mut dam) = (T::zero(), T::zero());
                if grp.mean_token {
                    mean_row(grp.pk, dk, p, grp.causal, s, kbar);
                    mean_row(grp.pv, dv, p, grp.causal, s, vbar);
                    sm = T::one() / (sq_dist(qr, kbar) + g2);
                    z = z + sm;
                    dam = crate::simd::dot8_portable(vbar, dor);
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
                        continue;
                    }
                    // dL/d(d2_j) = -(da_j - t) / z * s_j^2, taken as -(da_j - t) * a_j * s_j
                    // (a_j <= 1): 1 / z alone overflows where every score is tiny (keys far
                    // off or a huge gamma), and s_j^2 underflows, which made it inf * 0 = NaN.
                    let a = sc[slot] * invz;
                    let gd = -(da[slot] - t) * a * sc[slot];
                    // SAFETY: `inv.at` is injective over the filled slots (each pair has its
                    // own place) and each query is visited by one task, once: no other task
                    // writes this element.
                    unsafe { coefs.row(at[slot] as usize)[0] = [a, gd] };
                    dgs = dgs + gd;
                    gds[slot] = gd;
                }
                // dq = sum 2 gd (q - k_j) over the filled slots in order, in registers.
                with_dims!(dk, D => dq_sum::<T, D>(qr, grp.k, ir, gds, two, dqr));
                if grp.mean_token {
                    let am = sm * invz;
                    let gd = -(dam - t) * am * sm;
                    dgs = dgs + gd;
                    *ma = am;
                    *mg = gd;
                    for d in 0..dk {
                        dqr[d] = dqr[d] + two * gd * (qr[d] - kbar[d]);
                    }
                }
                *dgam = (dgs * two * gm).to_f64();
            },
        );
    Ok(c)
}

/// For each key `j`, the queries whose pairs selected it: `qis[start[j]..start[j + 1]]`, in
/// pair order (query, then slot); `at[e]`: the place of pair `e` (= query * topk + slot) in
/// that order (`u32::MAX` for an empty slot).
///
/// Perf note (N = 16k, H = 8, top-32, one thread; 2026-12-01, a Zen 4 VM): the key pass used
/// to read each pair's coefficients at `e`, a cache miss per pair (38% of its samples on that
/// load, prefetched or not): 16.1-17.1 ms per head. Stored in this order by the query pass
/// (whose writes scatter instead: 16.1-17.1 -> 18.2-19.3 ms), the key pass reads them in
/// sequence: 10.5 ms. Both passes in the curve order of queries / keys instead of position
/// order (neighbours share value and dO rows, as in the forward) were slower: 23-26 and
/// 12-15.6 ms.
struct InverseIndex {
    start: Vec<u32>,
    qis: Vec<u32>,
    at: Vec<u32>,
}

impl InverseIndex {
    fn build(idx: &[i32], s: usize, topk: usize) -> Result<Self> {
        let mut start = try_vec(0u32, s + 1, "backward inverse index")?;
        for &j in idx {
            if j >= 0 {
                start[j as usize + 1] += 1;
            }
        }
        for j in 0..s {
            start[j + 1] += start[j];
        }
        let mut fill = try_with_capacity(s + 1, "backward inverse index")?;
        fill.extend_from_slice(&start);
        let mut qis = try_vec(0u32, start[s] as usize, "backward inverse index")?;
        let mut at = try_vec(u32::MAX, idx.len(), "backward inverse index")?;
        for (e, &j) in idx.iter().enumerate() {
            if j >= 0 {
                let f = &mut fill[j as usize];
                qis[*f as usize] = (e / topk) as u32;
                at[e] = *f;
                *f += 1;
            }
        }
        Ok(InverseIndex { start, qis, at })
    }

    /// Where key `j`'s pairs sit in `qis` (and in the coefficients).
    fn range(&self, j: usize) -> std::ops::Range<usize> {
        self.start[j] as usize..self.start[j + 1] as usize
    }
}

/// `dqr[d] = dqr[d] + two * gd * (q[d] - k_j[d])` for the filled slots `j = idx[slot] >= 0`
/// in order (`gd = gds[slot]`); the sums in registers, `dqr` written once.
///
/// Perf note (backward at N = 16k, H = 8, top-32, 2 threads; 2026-12-03, a Zen 3 VM): the
/// sum was a loop over `dqr` in memory inside the slot loop (each add waited for the last
/// one's store, reloaded past the coefficient store that may alias it): 12% of the query
/// pass's samples on that store. In registers, both builds in one process (rounds
/// interleaved, best of 3 per round, outputs equal bit for bit): median of 10 rounds
/// 131.4 -> 122.2 ms, faster in 9.
#[inline(always)]
fn dq_sum<T: Float, const D: usize>(
    qr: &[T],
    k: &[T],
    idx: &[i32],
    gds: &[T],
    two: T,
    dqr: &mut [T],
) {
    let mut acc: [T; D] = std::array::from_fn(|d| dqr[d]);
    let q: [T; D] = std::array::from_fn(|d| qr[d]);
    for (&j, &gd) in idx.iter().zip(gds) {
        if j < 0 {
            continue;
        }
        let kr = &k[j as usize * D..(j as usize + 1) * D];
        for d in 0..D {
            acc[d] = acc[d] + two * gd * (q[d] - kr[d]);
        }
    }
    dqr[..D].copy_from_slice(&acc);
}

/// `dkr[d] = dkr[d] - two * gd * (q[d] - kr[d])` for each pair `(qi, [_, gd])` in order, `q`
/// the pair's query row (D values); the sums in registers, `dkr` written once.
#[inline(always)]
fn dk_sum<T: Float, const D: usize>(
    q: &[T],
    kr: &[T],
    qis: &[u32],
    coefs: &[[T; 2]],
    two: T,
    dkr: &mut [T],
) {
    let mut acc: [T; D] = std::array::from_fn(|d| dkr[d]);
    let k: [T; D] = std::array::from_fn(|d| kr[d]);
    for (&qi, &[_, gd]) in qis.iter().zip(coefs) {
        let qr = &q[qi as usize * D..(qi as usize + 1) * D];
        for d in 0..D {
            acc[d] = acc[d] - two * gd * (qr[d] - k[d]);
        }
    }
    dkr[..D].copy_from_slice(&acc);
}

/// Dv rows summed per [`Real::axpy_rows`] call in the key pass.
const ROWS_AT_ONCE: usize = 64;

/// Pass 2, per key: dv_j = sum a dO, dk_j = sum -2 gd (q - k_j) over the pairs that
/// selected key j.
fn key_pass<T: Float + Real>(
    grp: &Group<'_, T>,
    c: &Coefs<T>,
    inv: &InverseIndex,
    dk_g: &mut [T],
    dv_g: &mut [T],
) {
    let (dk, dv) = (grp.sh.dk, grp.sh.dv);
    let two = T::from(2.0).unwrap();
    dk_g.par_chunks_mut(dk)
        .zip(dv_g.par_chunks_mut(dv))
        .enumerate()
        .for_each(|(j, (dkr, dvr))| {
            let kr = &grp.k[j * dk..(j + 1) * dk];
            let r = inv.range(j);
            let (qis, coefs) = (&inv.qis[r.clone()], &c.a_gd[r]);
            // The dO and q rows are scattered: ask for all of them before the first use.
            for &qi in qis {
                let qi = qi as usize;
                prefetch(&grp.dout[qi * dv..(qi + 1) * dv]);
                prefetch(&grp.q[qi * dk..(qi + 1) * dk]);
            }
            // dk_j = sum -2 gd (q - k_j) over the pairs in order (D = d_k, checked 1..=8 by
            // the shape: the sums stay in registers).
            with_dims!(dk, D => dk_sum::<T, D>(grp.q, kr, qis, coefs, two, dkr));
            // dv_j = sum a dO over the pairs in order (each product and sum rounded), up to
            // ROWS_AT_ONCE rows per kernel call (`dvr` stays in registers across them).
            let mut rows = [(T::zero(), 0u32); ROWS_AT_ONCE];
            for (part, (qc, cc)) in qis
                .chunks(ROWS_AT_ONCE)
                .zip(coefs.chunks(ROWS_AT_ONCE))
                .enumerate()
            {
                for (i, (&qi, &[a, _])) in qc.iter().zip(cc).enumerate() {
                    rows[i] = (a, qi);
                }
                T::axpy_rows(dvr, grp.dout, &rows[..qc.len()], part == 0, None);
            }
        });
}

/// The mean item's gradients: d mean_p / d x_j = 1/(p+1) for j <= p (causal), 1/S for all
/// keys (non-causal); per query, d mean_k = -2 gd (q - kbar) and d mean_v = a dO.
fn mean_token_grads<T: Float + Real>(
    grp: &Group<'_, T>,
    c: &Coefs<T>,
    dk_g: &mut [T],
    dv_g: &mut [T],
) -> Result<()> {
    let (dk, dv, n, s) = (grp.sh.dk, grp.sh.dv, grp.sh.n, grp.sh.s);
    let rows = grp.q.len() / dk;
    let two = T::from(2.0).unwrap();
    let mut acc_k = try_vec(0.0f64, dk, "backward scratch")?;
    let mut acc_v = try_vec(0.0f64, dv, "backward scratch")?;
    let mut kbar = try_vec(T::zero(), dk, "backward scratch")?;
    let mean_grads = |qi: usize, kbar: &mut [T], gk: &mut [f64], gv: &mut [f64], w: f64| {
        mean_row(grp.pk, dk, s - n + qi % n, grp.causal, s, kbar);
        let qr = &grp.q[qi * dk..(qi + 1) * dk];
        let dor = &grp.dout[qi * dv..(qi + 1) * dv];
        for d in 0..dk {
            gk[d] += (-two * c.mean_gd[qi] * (qr[d] - kbar[d])).to_f64() * w;
        }
        for d in 0..dv {
            gv[d] += (c.mean_a[qi] * dor[d]).to_f64() * w;
        }
    };
    let add_row = |dk_g: &mut [T], dv_g: &mut [T], j: usize, ak: &[f64], av: &[f64]| {
        for d in 0..dk {
            dk_g[j * dk + d] = dk_g[j * dk + d] + T::from(ak[d]).unwrap();
        }
        for d in 0..dv {
            dv_g[j * dv + d] = dv_g[j * dv + d] + T::from(av[d]).unwrap();
        }
    };
    if grp.causal {
        // Key j gets the per-query mean gradients / (p+1) of the queries at positions >= j.
        let mut per_pos_k = try_vec(0.0f64, n * dk, "backward scratch")?;
        let mut per_pos_v = try_vec(0.0f64, n * dv, "backward scratch")?;
        for qi in 0..rows {
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
            add_row(dk_g, dv_g, j, &acc_k, &acc_v);
        }
    } else {
        let w = 1.0 / s as f64;
        for qi in 0..rows {
            mean_grads(qi, &mut kbar, &mut acc_k, &mut acc_v, w);
        }
        for j in 0..s {
            add_row(dk_g, dv_g, j, &acc_k, &acc_v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::{reference_forward, small_case};
    use crate::attention::{forward, tests_points as points};

    /// Every filled pair sits in its key's range, at `at`, with its query; ranges keep pair
    /// order; empty slots have no place.
    #[test]
    fn inverse_index_places_every_pair_in_its_keys_range() {
        let (topk, s) = (3, 5);
        let idx = [4, 0, -1, 0, 4, 2, -1, -1, -1, 2, 0, 4];
        let inv = InverseIndex::build(&idx, s, topk).unwrap();
        assert_eq!(inv.qis.len(), 8);
        for j in 0..s {
            let want: Vec<u32> = (0..idx.len())
                .filter(|&e| idx[e] == j as i32)
                .map(|e| (e / topk) as u32)
                .collect();
            assert_eq!(&inv.qis[inv.range(j)], &want[..], "key {j}");
        }
        for (e, &j) in idx.iter().enumerate() {
            if j < 0 {
                assert_eq!(inv.at[e], u32::MAX);
            } else {
                let a = inv.at[e] as usize;
                assert!(inv.range(j as usize).contains(&a), "pair {e}");
                assert_eq!(inv.qis[a], (e / topk) as u32);
            }
        }
    }

    /// Gradients equal central differences of the brute-force reference forward (an
    /// independent implementation), for q, k, v and gamma: causal or not, with and without
    /// the mean item, GQA, S > N.
    #[test]
    fn backward_equals_finite_differences_of_the_reference() {
        for causal in [true, false] {
            for mean_token in [false, true] {
                let (sh, prm) = small_case(causal);
                let q = points(sh.b * sh.h * sh.n * sh.dk, 7);
                let k = points(sh.b * sh.hkv * sh.s * sh.dk, 8);
                let v = points(sh.b * sh.hkv * sh.s * sh.dv, 9);
                let w = points(sh.b * sh.h * sh.n * sh.dv, 10); // dL/d out
                let gamma = vec![0.7, 1.1, 0.9, 1.4];
                let topk = 5;
                let opts = AttnOpts { topk, mean_token };
                let (_, idx) = forward(&sh, &prm, &opts, &q, &k, &v, &gamma).unwrap();
                let (dq, dk, dv, dg) =
                    backward(&sh, &prm, &opts, &q, &k, &v, &gamma, &idx, &w).unwrap();
                let loss = |q: &[f64], k: &[f64], v: &[f64], g: &[f64]| -> f64 {
                    reference_forward(&sh, causal, topk, mean_token, q, k, v, g)
                        .iter()
                        .zip(&w)
                        .map(|(a, b)| a * b)
                        .sum()
                };
                let eps = 1e-6;
                let fd = |x: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
                    let (mut a, mut b) = (x.to_vec(), x.to_vec());
                    a[i] += eps;
                    b[i] -= eps;
                    (f(&a) - f(&b)) / (2.0 * eps)
                };
                let close = |got: f64, want: f64, what: &str| {
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{what}: {got} vs {want} (causal={causal}, mean={mean_token})"
                    );
                };
                for i in (0..q.len()).step_by(7) {
                    close(dq[i], fd(&q, i, &|x| loss(x, &k, &v, &gamma)), "dq");
                }
                for i in (0..k.len()).step_by(5) {
                    close(dk[i], fd(&k, i, &|x| loss(&q, x, &v, &gamma)), "dk");
                }
                for i in (0..v.len()).step_by(9) {
                    close(dv[i], fd(&v, i, &|x| loss(&q, &k, x, &gamma)), "dv");
                }
                for (i, &g) in dg.iter().enumerate() {
                    close(g, fd(&gamma, i, &|x| loss(&q, &k, &v, x)), "dgamma");
                }
            }
        }
    }

    /// Bad inputs are errors: indices out of range, topk 0, a wrong-sized grad_out.
    #[test]
    fn backward_rejects_bad_inputs() {
        let (sh, prm) = small_case(true);
        let q = points(sh.b * sh.h * sh.n * sh.dk, 1);
        let k = points(sh.b * sh.hkv * sh.s * sh.dk, 2);
        let v = points(sh.b * sh.hkv * sh.s * sh.dv, 3);
        let w = points(sh.b * sh.h * sh.n * sh.dv, 4);
        let g = [1.0; 4];
        let opts = AttnOpts {
            topk: 3,
            mean_token: false,
        };
        let (_, idx) = forward(&sh, &prm, &opts, &q, &k, &v, &g).unwrap();
        let mut bad = idx.clone();
        bad[5] = sh.s as i32;
        assert!(backward(&sh, &prm, &opts, &q, &k, &v, &g, &bad, &w).is_err());
        let o0 = AttnOpts { topk: 0, ..opts };
        assert!(backward(&sh, &prm, &o0, &q, &k, &v, &g, &[], &w).is_err());
        assert!(backward(&sh, &prm, &opts, &q, &k, &v, &g, &idx, &w[1..]).is_err());
        assert!(backward(&sh, &prm, &opts, &q, &k, &v, &g, &idx, &w).is_ok());
    }
}
