//! The scoring step shared by the parallel forward ([`crate::attention`]) and the KV cache
//! ([`crate::cache`]): a query's Cauchy-softmax weights over its top-k candidates (and the
//! optional mean item) and the weighted sum of their value rows.
use crate::index::prefetch;
use crate::simd::RowsEnd;
use half::{bf16, f16};
use num_traits::Float;

/// An element of a value array: the queries' float type, or float16 / bfloat16 values read
/// natively (half the bytes gathered) and summed in float32.
pub trait ValueElem: Copy + Send + Sync + 'static {
    fn value_f64(self) -> f64;
    fn value_finite(self) -> bool;
}

macro_rules! value_elem {
    ($($t:ty),*) => {$(
        impl ValueElem for $t {
            #[inline(always)]
            fn value_f64(self) -> f64 {
                f64::from(self)
            }
            #[inline(always)]
            fn value_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    )*};
}
value_elem!(f32, f64, f16, bf16);

/// Value rows a weighted sum reads: a plain slice, or the cache's f32/f16/bf16 store.
pub trait ValueRows<T: Float> {
    /// Hints the CPU to load row `pos` (of `dv` values).
    fn prefetch_row(&self, pos: usize, dv: usize);
    /// `acc += s * row(pos)` (`acc.len()` values per row) for each `(s, pos)` of `rows`, in
    /// order, from `acc = 0` when
    /// `fresh`, then `end`'s steps (`acc = (acc + s * mean) * scale`), each rounded in this
    /// order: the bits of those loops ([`crate::quantize::Real::axpy_rows`]), whatever kernel
    /// runs.
    fn axpy_rows(&self, rows: &[(T, u32)], acc: &mut [T], fresh: bool, end: Option<RowsEnd<'_, T>>);
}

impl<T: Float + crate::quantize::Real> ValueRows<T> for [T] {
    #[inline]
    fn prefetch_row(&self, pos: usize, dv: usize) {
        prefetch(&self[pos * dv..(pos + 1) * dv]);
    }
    #[inline]
    fn axpy_rows(
        &self,
        rows: &[(T, u32)],
        acc: &mut [T],
        fresh: bool,
        end: Option<RowsEnd<'_, T>>,
    ) {
        T::axpy_rows(acc, self, rows, fresh, end);
    }
}

/// [`ValueRows`] of half-precision value rows (`$elem`), summed in float32 by the `simd`
/// kernel `$rows`.
macro_rules! half_value_rows {
    ($(#[$doc:meta])* $elem:ty, $rows:ident) => {
        $(#[$doc])*
        impl ValueRows<f32> for [$elem] {
            #[inline]
            fn prefetch_row(&self, pos: usize, dv: usize) {
                prefetch(&self[pos * dv..(pos + 1) * dv]);
            }
            #[inline]
            fn axpy_rows(
                &self,
                rows: &[(f32, u32)],
                acc: &mut [f32],
                fresh: bool,
                end: Option<RowsEnd<'_, f32>>,
            ) {
                crate::simd::$rows(acc, self, rows, fresh, end);
            }
        }
    };
}

half_value_rows!(
    /// bfloat16 values, widened exactly (a shift).
    bf16, axpy_rows_bf16
);
half_value_rows!(
    /// float16 values. Perf note (attention forward, N = 32k, H = 8, d_v = 64): float16
    /// converted per value 1,105 ms, per block of 64 (`half`'s slice conversion) 642 ms as
    /// float32; now the AVX2 (F16C) / AVX-512 kernels convert in registers (`simd::axpy_rows_f16`).
    f16, axpy_rows_f16
);

/// Candidates whose value rows [`combine`] sums in one [`ValueRows::axpy_rows`] call.
///
/// Perf note (`zeta.attention` at N = 32k, H = 8, d_v = 64, top-32, numpy float32;
/// 2026-12-01, a Zen 4 VM, best of 5, three interleaved rounds against the previous build):
/// one `axpy_f32` per row (a load, add and store of `o` per row, then a pass for the mean and
/// one for 1/z) was 15.8% of the samples, most of it on the first load of the fresh output
/// row (a miss). The rows' sum in registers: 2-3% faster; `o` also not read when fresh and the
/// mean and 1/z applied before the one store: 315-318 -> 294-304 ms (`axpy_rows_f32` 6.6%
/// of the samples). The bits are the loop's (`simd::tests::axpy_rows_paths_agree_bit_for_bit`).
const ROWS_AT_ONCE: usize = 64;

/// `o = sum_j a_j v_j + a_m vbar` with `a = s / (sum_j s_j + s_m)` and `s = 1 / (d2 + g2)`
/// (the weights normalised before they multiply the values), over the candidates
/// `(d2, position)` in order and, with `mean = Some((d2, vbar))`, the mean item.
/// `o` (d_v values) is overwritten (its old values are not read); `on_slot(slot, position)`
/// sees each candidate.
#[inline]
pub fn combine<T: Float, V: ValueRows<T> + ?Sized>(
    cands: &[(T, u32)],
    g2: T,
    vals: &V,
    mean: Option<(T, &[T])>,
    o: &mut [T],
    mut on_slot: impl FnMut(usize, u32),
) {
    let dv = o.len();
    // The rows are scattered: ask for all of them before the first use.
    for &(_, pos) in cands {
        vals.prefetch_row(pos as usize, dv);
    }
    // The weights `a = s / z` first, then their value sum: `a` <= 1, so the sum cannot
    // overflow where the values do not (`s v` could: s is up to 2^48 with the smallest gamma
    // and a key on its query, and outputs were inf or NaN with values ~1e30).
    let s_mean = mean.map(|(d2, vbar)| (T::one() / (d2 + g2), vbar));
    let mut rows = [(T::zero(), 0u32); ROWS_AT_ONCE];
    let end = |a_mean| RowsEnd {
        mean: a_mean,
        scale: T::one(),
    };
    if cands.len() <= ROWS_AT_ONCE {
        // One call (the usual topk): the scores once, into the rows, then scaled by 1 / z.
        let mut z = T::zero();
        for (i, &(d2, pos)) in cands.iter().enumerate() {
            on_slot(i, pos);
            let s = T::one() / (d2 + g2);
            z = z + s;
            rows[i] = (s, pos);
        }
        if let Some((s, _)) = s_mean {
            z = z + s;
        }
        let inv_z = T::one() / z;
        let rows = &mut rows[..cands.len()];
        for r in rows.iter_mut() {
            r.0 = r.0 * inv_z;
        }
        let a_mean = s_mean.map(|(s, vbar)| (s * inv_z, vbar));
        vals.axpy_rows(rows, o, true, Some(end(a_mean)));
        return;
    }
    // More rows than one call takes: z first, then the weights part by part (the same bits).
    let mut z = T::zero();
    for &(d2, _) in cands {
        z = z + T::one() / (d2 + g2);
    }
    if let Some((s, _)) = s_mean {
        z = z + s;
    }
    let inv_z = T::one() / z;
    let a_mean = s_mean.map(|(s, vbar)| (s * inv_z, vbar));
    let n_parts = cands.len().div_ceil(ROWS_AT_ONCE);
    for (c, part) in cands.chunks(ROWS_AT_ONCE).enumerate() {
        for (i, &(d2, pos)) in part.iter().enumerate() {
            on_slot(c * ROWS_AT_ONCE + i, pos);
            rows[i] = ((T::one() / (d2 + g2)) * inv_z, pos);
        }
        let last = (c + 1 == n_parts).then(|| end(a_mean));
        vals.axpy_rows(&rows[..part.len()], o, c == 0, last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `combine` against the formula in f64, for one call's worth of rows and more (the two
    /// paths), with and without the mean item, and with the largest scores there are (a key
    /// on its query, the smallest gamma) times values of 1e30: a weighted mean, finite.
    #[test]
    fn combine_is_the_normalised_weighted_mean() {
        let dv = 5;
        let mut x = 12345u64;
        let mut rnd = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let g2_min = (2f32.powi(-24)) * (2f32.powi(-24));
        for &(n, vscale, g2, d2scale) in &[
            (0usize, 1.0f32, 1.0f32, 1.0f32),
            (1, 1.0, 0.49, 1.0),
            (ROWS_AT_ONCE - 1, 1.0, 0.49, 1.0),
            (ROWS_AT_ONCE, 3.0, 2.0, 0.1),
            (ROWS_AT_ONCE + 1, 1.0, 0.49, 1.0),
            (2 * ROWS_AT_ONCE + 7, 1.0, 1.0, 10.0),
            (40, 1e30, g2_min, 0.0),
            (150, 1e30, g2_min, 0.0),
        ] {
            let vals: Vec<f32> = (0..n.max(1) * dv).map(|_| rnd() * vscale).collect();
            let cands: Vec<(f32, u32)> = (0..n)
                .map(|i| ((rnd().abs() * d2scale), i as u32))
                .collect();
            let vbar: Vec<f32> = (0..dv).map(|_| rnd() * vscale).collect();
            for with_mean in [false, true] {
                if n == 0 && !with_mean {
                    continue;
                }
                let mean = with_mean.then_some((0.3f32 * d2scale, &vbar[..]));
                let mut o = vec![f32::NAN; dv];
                let mut seen = Vec::new();
                combine(&cands, g2, &vals[..], mean, &mut o, |slot, pos| {
                    seen.push((slot, pos))
                });
                assert_eq!(seen, (0..n).map(|i| (i, i as u32)).collect::<Vec<_>>());
                let s: Vec<f64> = cands
                    .iter()
                    .map(|c| 1.0 / (c.0 as f64 + g2 as f64))
                    .collect();
                let sm = mean.map_or(0.0, |(d2, _)| 1.0 / (d2 as f64 + g2 as f64));
                let z: f64 = s.iter().sum::<f64>() + sm;
                for (c, &oc) in o.iter().enumerate() {
                    let mut want = sm / z * mean.map_or(0.0, |(_, vb)| vb[c] as f64);
                    for (j, &sj) in s.iter().enumerate() {
                        want += sj / z * vals[j * dv + c] as f64;
                    }
                    let tol = 1e-5 * vscale as f64;
                    assert!(
                        oc.is_finite() && (oc as f64 - want).abs() <= tol,
                        "n {n} mean {with_mean} col {c}: {oc} vs {want}"
                    );
                }
            }
        }
    }
}
