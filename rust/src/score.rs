//! The scoring step shared by the parallel forward ([`crate::attention`]) and the KV cache
//! ([`crate::cache`]): a query's Cauchy-softmax weights over its top-k candidates (and the
//! optional mean item) and the weighted sum of their value rows.
use crate::index::prefetch;
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
pub trait ValueRows<T> {
    /// Hints the CPU to load row `pos` (of `dv` values).
    fn prefetch_row(&self, pos: usize, dv: usize);
    /// `acc += s * row(pos)`, `acc.len()` values.
    fn axpy_row(&self, pos: usize, s: T, acc: &mut [T]);
}

impl<T: Float + crate::quantize::Real> ValueRows<T> for [T] {
    #[inline]
    fn prefetch_row(&self, pos: usize, dv: usize) {
        prefetch(&self[pos * dv..(pos + 1) * dv]);
    }
    #[inline]
    fn axpy_row(&self, pos: usize, s: T, acc: &mut [T]) {
        let dv = acc.len();
        T::axpy(acc, &self[pos * dv..(pos + 1) * dv], s);
    }
}

impl ValueRows<f32> for [bf16] {
    #[inline]
    fn prefetch_row(&self, pos: usize, dv: usize) {
        prefetch(&self[pos * dv..(pos + 1) * dv]);
    }
    #[inline]
    fn axpy_row(&self, pos: usize, s: f32, acc: &mut [f32]) {
        let dv = acc.len();
        crate::simd::axpy_bf16(acc, &self[pos * dv..(pos + 1) * dv], s);
    }
}

impl ValueRows<f32> for [f16] {
    #[inline]
    fn prefetch_row(&self, pos: usize, dv: usize) {
        prefetch(&self[pos * dv..(pos + 1) * dv]);
    }
    #[inline]
    fn axpy_row(&self, pos: usize, s: f32, acc: &mut [f32]) {
        // Perf note (attention forward, N = 32k, H = 8, d_v = 64): float16 converted per
        // value 1,105 ms, per block of 64 (`half`'s slice conversion) 642 ms as float32; now
        // the AVX2 (F16C) / AVX-512 kernels convert in registers (`simd::axpy_f16`).
        let dv = acc.len();
        crate::simd::axpy_f16(acc, &self[pos * dv..(pos + 1) * dv], s);
    }
}

/// `o = (sum_j s_j v_j + s_m vbar) / (sum_j s_j + s_m)` with `s = 1 / (d2 + g2)`, over the
/// candidates `(d2, position)` in order and, with `mean = Some((d2, vbar))`, the mean item.
/// `o` (d_v values) must start at zero; `on_slot(slot, position)` sees each candidate.
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
    let mut z = T::zero();
    for (slot, &(d2, pos)) in cands.iter().enumerate() {
        on_slot(slot, pos);
        let s = T::one() / (d2 + g2);
        z = z + s;
        vals.axpy_row(pos as usize, s, o);
    }
    if let Some((d2, vbar)) = mean {
        let s = T::one() / (d2 + g2);
        z = z + s;
        for (a, &x) in o.iter_mut().zip(vbar) {
            *a = *a + s * x;
        }
    }
    let inv = T::one() / z;
    for a in o.iter_mut() {
        *a = *a * inv;
    }
}
