//! The fixed, data-independent float -> grid map, and `zorder` (quantize + Morton encode).
//!
//! Definition (the torch reference `zeta.backends.torch_ref.quantize` must match it bit for
//! bit; it is computed in f64 whatever the input dtype):
//!
//! ```text
//! y    = x / scale
//! u    = 0.5 + 0.5 * y / (1 + |y|)          softsign squash: monotone, (0, 1), no data stats
//! half = 2^(bits-1)
//! g    = min(floor(u * half), half - 1)     the data uses the lower half of the grid
//! m    = d + 1 if d + 1 is odd, else d + 2
//! q    = g + (shift * half) / m                integer division; shift = curve index 0..=d
//! ```
//!
//! The data lives in half the grid so that each shifted copy still fits `bits` bits; the same
//! key gets the same code whatever `n_curves` is. The shifts are j/m of the range with m odd
//! (Chan 1998 states the lemma for odd d+1): with m = 4 (d = 3) the shifts 1/4, 2/4, 3/4 are
//! dyadic, so curves 2 and 3 had exactly the local structure of curves 0 and 1 and added no
//! recall (measured: N=16k Gaussian 3-D, window 128: recall 0.856 with 2 curves, 0.862 with 4).
use crate::error::{Result, ZetaError};
use crate::morton::{check_bits, check_dims, encode_point, Code, MAX_DIMS};
#[cfg(target_arch = "x86_64")]
use crate::morton::{checked, Checked};
use crate::morton::{encode_rows, with_dims, PORTABLE};
use crate::simd::Path;
use rayon::prelude::*;

/// The odd denominator m of the curve shifts j/m (d + 1, or d + 2 when d + 1 is even).
pub fn shift_denominator(d: usize) -> u64 {
    let m = d as u64 + 1;
    if m % 2 == 1 {
        m
    } else {
        m + 1
    }
}

/// A float input type.
pub trait Real: crate::score::ValueElem + Copy + Send + Sync + 'static {
    /// An integer that orders (d2, position) pairs like (d2, then position).
    type Key: Copy + Ord + Send + Sync + std::fmt::Debug;
    /// Larger than every key of a finite or infinite d2.
    const KEY_MAX: Self::Key;
    fn to_f64(self) -> f64;
    /// `self` must be >= 0 (+0.0, not -0.0) and not NaN: the bits of such floats order like
    /// their values, so `(bits << 32) | pos` orders by d2 and then by position.
    fn key(self, pos: u32) -> Self::Key;
    fn from_key(key: Self::Key) -> (Self, u32);
    /// Whether [`Real::dist3_mask`] is the SIMD scan (f32) rather than absent.
    const DIST3: bool = false;
    /// [`crate::simd::dist3_mask`] for this type (only called when [`Real::DIST3`]).
    #[inline(always)]
    fn dist3_mask(
        _q: &[Self; 3],
        _coords: &[Self],
        _bound: Self,
        _d2: &mut [Self; crate::simd::SCAN_BLOCK],
    ) -> u64 {
        unreachable!("no 3-D scan kernel for this type")
    }
    /// [`crate::simd::dist3_keys`] for this type: the keys of the rows of `coords` below
    /// `thresh` with positions at most `lim`, into `out`; None where there is no such kernel
    /// (this type, or this CPU).
    #[inline(always)]
    fn dist3_keys(
        _q: &[Self; 3],
        _coords: &[Self],
        _entries: &[u64],
        _lim: u32,
        _thresh: Self::Key,
        _out: &mut [Self::Key],
    ) -> Option<usize> {
        None
    }
    /// Whether [`Real::merge_sorted`] is the vector merge of [`crate::sortnet`] for top-`k`.
    #[inline]
    fn merge_fast(_k: usize) -> bool {
        false
    }
    /// [`crate::sortnet::merge_sorted`] for this type's keys (only called when
    /// [`Real::merge_fast`]).
    fn merge_sorted(_buf: &mut [Self::Key], _s: usize, _n: usize, _k: usize) -> usize {
        unreachable!("no vector merge for this type")
    }
    /// `acc[i] = acc[i] + s * row[i]` (the value sum of [`Real::axpy_rows`]).
    #[inline(always)]
    fn axpy(acc: &mut [Self], row: &[Self], s: Self)
    where
        Self: num_traits::Float,
    {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a = *a + s * x;
        }
    }
    /// `out[i]` = the dot product of row `rows[i]` of `vals` (rows of `x.len()` values) with
    /// `x`, as [`crate::simd::dot8_portable`] (8 interleaved partial sums;
    /// [`crate::simd::dots_f32`], the same bits, for f32).
    #[inline(always)]
    fn dots(x: &[Self], vals: &[Self], rows: &[u32], out: &mut [Self])
    where
        Self: num_traits::Float,
    {
        let dv = x.len();
        for (o, &pos) in out.iter_mut().zip(rows) {
            let p = pos as usize * dv;
            *o = crate::simd::dot8_portable(&vals[p..p + dv], x);
        }
    }
    /// [`Real::axpy`] with each `(s, pos)` of `rows` in order, row `pos` of `vals` (rows of
    /// `acc.len()` values), from `acc = 0` when `fresh`, then `end`'s steps
    /// ([`crate::simd::axpy_rows_f32`], the f32 kernels, has the same bits).
    #[inline(always)]
    fn axpy_rows(
        acc: &mut [Self],
        vals: &[Self],
        rows: &[(Self, u32)],
        fresh: bool,
        end: Option<crate::simd::RowsEnd<'_, Self>>,
    ) where
        Self: num_traits::Float,
    {
        let dv = acc.len();
        if fresh {
            acc.fill(Self::zero());
        }
        for &(s, pos) in rows {
            let p = pos as usize * dv;
            Self::axpy(acc, &vals[p..p + dv], s);
        }
        if let Some(end) = end {
            if let Some((s, m)) = end.mean {
                Self::axpy(acc, &m[..dv], s);
            }
            for a in acc.iter_mut() {
                *a = *a * end.scale;
            }
        }
    }
}
impl Real for f32 {
    type Key = u64;
    const KEY_MAX: u64 = u64::MAX;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn key(self, pos: u32) -> u64 {
        debug_assert!(self.is_sign_positive() && !self.is_nan());
        ((self.to_bits() as u64) << 32) | pos as u64
    }
    #[inline(always)]
    fn from_key(key: u64) -> (f32, u32) {
        (f32::from_bits((key >> 32) as u32), key as u32)
    }
    const DIST3: bool = true;
    #[inline(always)]
    fn dist3_mask(
        q: &[f32; 3],
        coords: &[f32],
        bound: f32,
        d2: &mut [f32; crate::simd::SCAN_BLOCK],
    ) -> u64 {
        crate::simd::dist3_mask(q, coords, bound, d2)
    }
    #[inline(always)]
    fn dist3_keys(
        q: &[f32; 3],
        coords: &[f32],
        entries: &[u64],
        lim: u32,
        thresh: u64,
        out: &mut [u64],
    ) -> Option<usize> {
        crate::simd::dist3_keys(q, coords, entries, lim, thresh, out)
    }
    #[inline]
    fn merge_fast(k: usize) -> bool {
        k <= crate::sortnet::MERGE_MAX && crate::sortnet::merge_fast()
    }
    #[inline]
    fn merge_sorted(buf: &mut [u64], s: usize, n: usize, k: usize) -> usize {
        crate::sortnet::merge_sorted(buf, s, n, k)
    }
    #[inline(always)]
    fn dots(x: &[f32], vals: &[f32], rows: &[u32], out: &mut [f32]) {
        crate::simd::dots_f32(x, vals, rows, out)
    }
    #[inline(always)]
    fn axpy_rows(
        acc: &mut [f32],
        vals: &[f32],
        rows: &[(f32, u32)],
        fresh: bool,
        end: Option<crate::simd::RowsEnd<'_, f32>>,
    ) {
        crate::simd::axpy_rows_f32(acc, vals, rows, fresh, end)
    }
}
impl Real for f64 {
    type Key = u128;
    const KEY_MAX: u128 = u128::MAX;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn key(self, pos: u32) -> u128 {
        debug_assert!(self.is_sign_positive() && !self.is_nan());
        ((self.to_bits() as u128) << 32) | pos as u128
    }
    #[inline(always)]
    fn from_key(key: u128) -> (f64, u32) {
        (f64::from_bits((key >> 32) as u64), key as u32)
    }
}

/// Default bits per coordinate: u32 codes for d <= 4, else as many as fit u64.
pub fn default_bits(d: usize) -> u32 {
    let b32 = (32 / d.max(1)) as u32;
    if b32 >= 8 {
        b32
    } else {
        (64 / d.max(1)) as u32
    }
}

/// Everything `zorder` needs, checked once.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub d: usize,
    pub bits: u32,
    pub shift: u32,
    pub scale: f64,
    /// `1/scale` when `scale` is a power of two (then `x * inv == x / scale` for every x:
    /// both are the correctly rounded value of the same real number), else 0.
    inv: f64,
    half: f64,
    half_minus_one: u64,
    offset: u64,
}

/// Whether `1/scale` is exact: `scale = 2^k` (normal, mantissa 0), `2^-k` is representable
/// (`2^-1023` is subnormal but exact).
fn exact_inverse(scale: f64) -> Option<f64> {
    (scale.is_normal() && scale.to_bits() & ((1u64 << 52) - 1) == 0).then(|| 1.0 / scale)
}

impl Grid {
    pub fn new(d: usize, bits: u32, shift: u32, scale: f64) -> Result<Grid> {
        check_dims("x", d)?;
        check_bits(d, bits)?;
        if shift as usize > d {
            return Err(ZetaError::value(
                "shift",
                format!("curve index must be 0..={d} for {d} dimensions (d+1 shifted curves), got {shift}"),
            ));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(ZetaError::value(
                "scale",
                format!("must be a finite number > 0, got {scale}"),
            ));
        }
        let half_u = 1u64 << (bits - 1);
        Ok(Grid {
            d,
            bits,
            shift,
            scale,
            inv: exact_inverse(scale).unwrap_or(0.0),
            half: half_u as f64,
            half_minus_one: half_u - 1,
            offset: (shift as u64 * half_u) / shift_denominator(d),
        })
    }

    /// `u * half` of the definition (`x / scale` as a multiply when that is exact).
    #[inline(always)]
    fn w(&self, x: f64) -> f64 {
        let y = if self.inv != 0.0 {
            x * self.inv
        } else {
            x / self.scale
        };
        let u = 0.5 + 0.5 * y / (1.0 + y.abs());
        u * self.half
    }

    /// Grid coordinate of one float (assumed finite).
    #[inline(always)]
    pub fn cell(&self, x: f64) -> u64 {
        // u >= 0, so floor == truncation (`as` truncates; NaN -> 0 either way): no libm
        // `floor` call on baseline x86-64, which has no SSE4.1 `roundsd`.
        let g = self.w(x) as u64;
        g.min(self.half_minus_one) + self.offset
    }

    /// [`Grid::cell`] for `bits <= 32`, the same value: clamped in f64 first (NaN -> 0 as
    /// `as` does; `min(trunc(w), m) == trunc(min(w, m))` for an integer m), so that the
    /// loop vectorises with SSE2 alone (no 64-bit integer min, no f64 -> u64 convert).
    #[inline(always)]
    fn cell_narrow(&self, x: f64) -> u64 {
        if self.bits > 32 {
            return self.cell(x);
        }
        let w = self.w(x);
        let w = if w >= 0.0 { w } else { 0.0 };
        let m = self.half_minus_one as f64;
        let w = if w < m { w } else { m };
        // SAFETY: 0 <= w <= half - 1 < 2^31 (bits <= 32; NaN became 0 above): in range for i32, so the
        // unchecked truncation is the plain `cvttpd2dq` (`as` adds a scalar saturation fix-up).
        let g = unsafe { w.to_int_unchecked::<i32>() };
        g as u64 + self.offset
    }

    /// Code of one point (`x.len() == d`, finite).
    #[inline(always)]
    pub fn code<T: Real>(&self, x: &[T]) -> u64 {
        let mut buf = [0u64; MAX_DIMS];
        for (b, &v) in buf.iter_mut().zip(x) {
            *b = self.cell(v.to_f64());
        }
        encode_point(&buf[..self.d])
    }
}

/// Index of the first non-finite value, if any. Long inputs are checked in parallel chunks
/// when called on a worker of zeta's pool (the attention's values: 64 MB at N = 32k, H = 8,
/// d_v = 64, ~1% of a call's samples on one thread while the other waited); the index is
/// still the first one.
pub fn first_non_finite<T: crate::score::ValueElem>(x: &[T]) -> Option<usize> {
    use rayon::prelude::*;
    const CHUNK: usize = crate::error::PAR_FILL;
    if x.len() <= CHUNK || rayon::current_thread_index().is_none() {
        return x.iter().position(|v| !v.value_finite());
    }
    x.par_chunks(CHUNK).enumerate().find_map_first(|(i, c)| {
        c.iter()
            .position(|v| !v.value_finite())
            .map(|p| i * CHUNK + p)
    })
}

/// The largest coordinate magnitude of queries and keys in `T` with `dk` coordinates per
/// point: any two points within it are at a squared distance of at most a quarter of `T`'s
/// largest value (`dk * (2 lim)^2 = max / 4`), so no distance overflows to inf, and with
/// gamma <= 2^62 (`attention::GAMMA_MAX`) `d2 + gamma^2` stays finite: every Cauchy score
/// `1 / (d2 + gamma^2)` is > 0 (for float32: a limit of 2.66e18 at d_k = 3). Past it a query
/// whose candidates all lie at an inf distance would get the output 0 / 0.
pub fn coord_limit<T: num_traits::Float>(dk: usize) -> T {
    let dk = T::from(dk.max(1)).unwrap_or_else(T::one);
    (T::max_value() / dk).sqrt() / T::from(4.0).unwrap_or_else(T::one)
}

/// Index of the first coordinate that is NaN, infinite or beyond `lim` in magnitude (see
/// [`coord_limit`]), if any; parallel like [`first_non_finite`].
pub fn first_bad_coord<T: num_traits::Float + Send + Sync>(x: &[T], lim: T) -> Option<usize> {
    use rayon::prelude::*;
    const CHUNK: usize = crate::error::PAR_FILL;
    let bad = |v: &T| v.is_nan() || v.abs() > lim;
    if x.len() <= CHUNK || rayon::current_thread_index().is_none() {
        return x.iter().position(bad);
    }
    x.par_chunks(CHUNK)
        .enumerate()
        .find_map_first(|(i, c)| c.iter().position(bad).map(|p| i * CHUNK + p))
}

/// Checks the query or key coordinates `x` (`dk` per point): finite and within
/// [`coord_limit`]. The error names `arg`.
pub fn check_coords<T: num_traits::Float + Send + Sync>(
    arg: &'static str,
    x: &[T],
    dk: usize,
) -> crate::error::Result<()> {
    let lim = coord_limit::<T>(dk);
    match first_bad_coord(x, lim) {
        None => Ok(()),
        Some(p) if !x[p].is_finite() => Err(ZetaError::value(
            arg,
            format!("contains NaN or inf (flat index {p})"),
        )),
        Some(p) => Err(ZetaError::value(
            arg,
            format!(
                "coordinate {:.4e} at flat index {p} is beyond +-{:.3e}: squared distances \
                 between such points overflow {}; rescale the queries and keys",
                x[p].to_f64().unwrap_or(f64::NAN),
                lim.to_f64().unwrap_or(f64::NAN),
                if std::mem::size_of::<T>() == 4 {
                    "float32"
                } else {
                    "float64"
                }
            ),
        )),
    }
}

fn non_finite_error<T: Real>(x: &[T]) -> ZetaError {
    let p = first_non_finite(x).unwrap_or(0);
    ZetaError::value("x", format!("contains NaN or inf (flat index {p})"))
}

/// `zorder` over `n = x.len()/d` points, parallel, on the path [`crate::simd::selected`]
/// picks (`ZETA_SIMD`, else the best this CPU has).
pub fn zorder<T: Real, O: Code>(x: &[T], grid: &Grid, out: &mut [O]) -> Result<()> {
    zorder_with_path(x, grid, out, crate::simd::selected())
}

/// [`zorder`] on a requested SIMD path (a path this CPU lacks falls back, see
/// [`crate::morton::checked`]). All paths give bit-identical codes. On error (NaN/inf in
/// `x`) `out` may be partly written.
pub fn zorder_with_path<T: Real, O: Code>(
    x: &[T],
    grid: &Grid,
    out: &mut [O],
    path: Path,
) -> Result<()> {
    let d = grid.d;
    if (d as u32) * grid.bits > O::BITS {
        return Err(ZetaError::value(
            "bits",
            format!(
                "d*bits = {} does not fit a {}-bit code",
                d as u32 * grid.bits,
                O::BITS
            ),
        ));
    }
    if x.len() != out.len() * d {
        return Err(ZetaError::value("x", "length is not n*d"));
    }
    #[cfg(target_arch = "x86_64")]
    {
        let path = checked(path);
        // The vector kernels need AVX2 for the f64 math, and `bits <= 32` (u32 cells; only
        // d = 1 can ask for more).
        if path.path() != Path::Portable && crate::simd::features().avx2 && grid.bits <= 32 {
            return with_dims!(d, D => zorder_x86::<T, O, D>(x, grid, out, path));
        }
    }
    let _ = path;
    zorder_portable(x, grid, out)
}

/// The portable path: blocks of rows go through [`Grid::cell`] as one flat loop (which the
/// compiler vectorises where the target allows: SSE2 `divpd`, NEON), into an L1 buffer,
/// then the rows are interleaved with the const-`D` shift-and-mask spread.
fn zorder_portable<T: Real, O: Code>(x: &[T], grid: &Grid, out: &mut [O]) -> Result<()> {
    let ok = with_dims!(grid.d, D => zorder_portable_d::<T, O, D>(x, grid, out));
    if ok {
        Ok(())
    } else {
        Err(non_finite_error(x))
    }
}

fn zorder_portable_d<T: Real, O: Code, const D: usize>(
    x: &[T],
    grid: &Grid,
    out: &mut [O],
) -> bool {
    const BLOCK: usize = 64;
    out.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK * D))
        .all(|(o, xc)| {
            let mut buf = [0u64; BLOCK * MAX_DIMS];
            let mut finite = true;
            for (ob, xb) in o.chunks_mut(BLOCK).zip(xc.chunks(BLOCK * D)) {
                let cells = &mut buf[..xb.len()];
                if grid.bits <= 32 {
                    for (c, &v) in cells.iter_mut().zip(xb) {
                        let v = v.to_f64();
                        finite &= v.is_finite();
                        *c = grid.cell_narrow(v);
                    }
                } else {
                    for (c, &v) in cells.iter_mut().zip(xb) {
                        let v = v.to_f64();
                        finite &= v.is_finite();
                        *c = grid.cell(v);
                    }
                }
                encode_rows::<u64, O, D>(cells, ob, PORTABLE);
            }
            finite
        })
}

const PAR_CHUNK: usize = 1 << 13;

#[cfg(target_arch = "x86_64")]
fn zorder_x86<T: Real, O: Code, const D: usize>(
    x: &[T],
    grid: &Grid,
    out: &mut [O],
    path: Checked,
) -> Result<()> {
    use x86::Scale;
    let k = x86::Consts::new(grid);
    let bmi2 = path.path() == Path::Bmi2;
    let ok = out
        .par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK * D))
        .all(|(o, xc)| {
            // SAFETY: the caller checked AVX2; `Checked` holds `Bmi2` only with BMI2.
            let clean = unsafe {
                match (bmi2, k.mode) {
                    (true, Scale::One) => x86::zorder_bmi2::<T, O, D, 0>(xc, &k, grid, o),
                    (true, Scale::Mul) => x86::zorder_bmi2::<T, O, D, 1>(xc, &k, grid, o),
                    (true, Scale::Div) => x86::zorder_bmi2::<T, O, D, 2>(xc, &k, grid, o),
                    (false, Scale::One) => x86::zorder_avx2::<T, O, D, 0>(xc, &k, grid, o),
                    (false, Scale::Mul) => x86::zorder_avx2::<T, O, D, 1>(xc, &k, grid, o),
                    (false, Scale::Div) => x86::zorder_avx2::<T, O, D, 2>(xc, &k, grid, o),
                }
            };
            // A NaN softsign comes from a non-finite input, or from `x / scale` overflowing
            // for a tiny scale; the latter is valid, and the kernels already map it like
            // `Grid::cell` does (NaN -> cell 0).
            clean || first_non_finite(xc).is_none()
        });
    if ok {
        Ok(())
    } else {
        Err(non_finite_error(x))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The fused quantize + encode kernels (`bits <= 32`, so a cell fits u32). The cell map
    //! runs on 4 f64 lanes: it is [`Grid::cell`] operation for operation (same IEEE ops in
    //! the same order, so the same roundings), then `floor` + `as u64` is one truncating
    //! `vcvttpd2dq` (u >= 0; `max(w, 0)` first maps NaN to 0 as `as u64` does; 2^31 comes
    //! out as 0x8000_0000 = 2^31, which the unsigned min clamps like the scalar code).
    //! `unsafe` only for `#[target_feature]`: callers check the features.
    use super::{Grid, Real};
    use crate::morton::{x86::spread4, Code, MAX_DIMS, SPREAD};
    use std::arch::x86_64::*;

    /// Rows per block of the BMI2 kernel (cells to an L1 buffer, then `pdep` per row).
    const BLOCK: usize = 64;

    /// How `y = x / scale` is computed: `One` (scale == 1: y = x), `Mul` (scale a power of
    /// two: `x * (1/scale)`, the same double as `x / scale`), `Div`.
    #[derive(Clone, Copy)]
    pub(super) enum Scale {
        One,
        Mul,
        Div,
    }

    /// The cell map's constants (see [`Grid::cell`]).
    pub(super) struct Consts {
        pub(super) mode: Scale,
        scale: f64,
        inv: f64,
        half: f64,
        half_minus_one: u32,
        offset: u32,
    }

    impl Consts {
        /// `g.bits <= 32` (the caller checks).
        pub(super) fn new(g: &Grid) -> Consts {
            // `g.inv` is nonzero only when `x * inv == x / scale` exactly (see `Grid::inv`)
            let mode = if g.scale == 1.0 {
                Scale::One
            } else if g.inv != 0.0 {
                Scale::Mul
            } else {
                Scale::Div
            };
            debug_assert!(g.bits <= 32);
            Consts {
                mode,
                scale: g.scale,
                inv: g.inv,
                half: g.half,
                half_minus_one: g.half_minus_one as u32,
                // offset < half <= 2^31 and cell + offset < 2^bits <= 2^32
                offset: g.offset as u32,
            }
        }
    }

    /// Cells (u32) of 4 values; sets lanes of `nan` where the softsign is NaN.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn cells4<T: Real, const S: u8>(x: &[T], k: &Consts, nan: &mut __m256d) -> __m128i {
        let a = [x[0].to_f64(), x[1].to_f64(), x[2].to_f64(), x[3].to_f64()];
        // SAFETY: `[f64; 4]` is 32 bytes; unaligned load.
        let v = _mm256_loadu_pd(a.as_ptr());
        let y = match S {
            0 => v,
            1 => _mm256_mul_pd(v, _mm256_set1_pd(k.inv)),
            _ => _mm256_div_pd(v, _mm256_set1_pd(k.scale)),
        };
        let abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(i64::MAX));
        // u = 0.5 + 0.5 * y / (1 + |y|), in this order
        let h = _mm256_set1_pd(0.5);
        let den = _mm256_add_pd(_mm256_set1_pd(1.0), _mm256_and_pd(y, abs_mask));
        let u = _mm256_add_pd(h, _mm256_div_pd(_mm256_mul_pd(h, y), den));
        *nan = _mm256_or_pd(*nan, _mm256_cmp_pd::<_CMP_UNORD_Q>(u, u));
        // max_pd returns its second operand (0) when w is NaN
        let w = _mm256_max_pd(
            _mm256_mul_pd(u, _mm256_set1_pd(k.half)),
            _mm256_setzero_pd(),
        );
        let g = _mm_min_epu32(
            _mm256_cvttpd_epi32(w),
            _mm_set1_epi32(k.half_minus_one as i32),
        );
        _mm_add_epi32(g, _mm_set1_epi32(k.offset as i32))
    }

    /// Scalar rows after the last full group of 4 (non-finite values flagged as NaN).
    fn tail<T: Real, O: Code>(x: &[T], grid: &Grid, out: &mut [O]) -> bool {
        for (row, slot) in x.chunks_exact(grid.d).zip(out.iter_mut()) {
            *slot = O::from_u64(grid.code(row));
        }
        x.iter().all(|v| v.to_f64().is_finite())
    }

    /// Fused zorder with `pdep`: blocks of rows go through the cell map into an L1 buffer,
    /// then each row is `D` `pdep`s. False if a softsign was NaN.
    #[target_feature(enable = "avx2,bmi2")]
    pub(super) unsafe fn zorder_bmi2<T: Real, O: Code, const D: usize, const S: u8>(
        x: &[T],
        k: &Consts,
        grid: &Grid,
        out: &mut [O],
    ) -> bool {
        let full = out.len() / 4 * 4;
        let (x_main, x_tail) = x.split_at(full * D);
        let (o_main, o_tail) = out.split_at_mut(full);
        let m0 = SPREAD[D].masks[0];
        let mut nan = _mm256_setzero_pd();
        let mut buf = [0u32; BLOCK * MAX_DIMS];
        // BLOCK and `full` are multiples of 4, so every block is 4k rows = 4kD values
        for (xs, o) in x_main.chunks(BLOCK * D).zip(o_main.chunks_mut(BLOCK)) {
            let cells = &mut buf[..xs.len()];
            for (xv, cv) in xs.chunks_exact(4).zip(cells.chunks_exact_mut(4)) {
                let c = cells4::<T, S>(xv, k, &mut nan);
                // SAFETY: `cv` is 4 u32 = 16 bytes; unaligned store.
                _mm_storeu_si128(cv.as_mut_ptr() as *mut __m128i, c);
            }
            for (row, slot) in cells.chunks_exact(D).zip(o.iter_mut()) {
                let mut code = 0u64;
                for (j, &c) in row.iter().enumerate() {
                    code |= if D == 1 {
                        c as u64
                    } else {
                        _pdep_u64(c as u64, m0 << j)
                    };
                }
                *slot = O::from_u64(code);
            }
        }
        // both halves always run: a NaN flag must not skip the tail rows
        let tail_clean = tail(x_tail, grid, o_tail);
        _mm256_movemask_pd(nan) == 0 && tail_clean
    }

    /// Fused zorder with the shift-and-mask spread on 4 lanes: 4 rows at a time, their
    /// `4*D` values (contiguous) are spread where they lie, each lane shifted by its
    /// coordinate index, then the `D` pieces of a row OR-ed. False if a softsign was NaN.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn zorder_avx2<T: Real, O: Code, const D: usize, const S: u8>(
        x: &[T],
        k: &Consts,
        grid: &Grid,
        out: &mut [O],
    ) -> bool {
        let full = out.len() / 4 * 4;
        let (x_main, x_tail) = x.split_at(full * D);
        let (o_main, o_tail) = out.split_at_mut(full);
        // lane i of vector v holds flat value 4v+i, coordinate (4v+i) % D
        let mut shifts = [[0i64; 4]; D];
        for (v, sv) in shifts.iter_mut().enumerate() {
            for (i, s) in sv.iter_mut().enumerate() {
                *s = ((4 * v + i) % D) as i64;
            }
        }
        let mut nan = _mm256_setzero_pd();
        let mut pieces = [[0u64; 4]; D];
        for (xs, o) in x_main.chunks_exact(4 * D).zip(o_main.chunks_exact_mut(4)) {
            for v in 0..D {
                let c = _mm256_cvtepu32_epi64(cells4::<T, S>(&xs[4 * v..4 * v + 4], k, &mut nan));
                // SAFETY: `[i64; 4]` / `[u64; 4]` are 32 bytes; unaligned load and store.
                let sh = _mm256_loadu_si256(shifts[v].as_ptr() as *const __m256i);
                let p = _mm256_sllv_epi64(spread4::<D>(c), sh);
                _mm256_storeu_si256(pieces[v].as_mut_ptr() as *mut __m256i, p);
            }
            let flat = pieces.as_flattened();
            for (r, slot) in o.iter_mut().enumerate() {
                let mut code = 0u64;
                for p in &flat[r * D..r * D + D] {
                    code |= *p;
                }
                *slot = O::from_u64(code);
            }
        }
        // both halves always run: a NaN flag must not skip the tail rows
        let tail_clean = tail(x_tail, grid, o_tail);
        _mm256_movemask_pd(nan) == 0 && tail_clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_within_the_limit_never_overflow_a_distance() {
        for dk in [1usize, 2, 3, 8, 100] {
            let lim = coord_limit::<f32>(dk);
            // The farthest two points within the limit: opposite corners.
            let (a, b) = (vec![lim; dk], vec![-lim; dk]);
            let d2 = crate::index::sq_dist(&a, &b);
            assert!(d2.is_finite() && d2 <= f32::MAX / 3.9, "dk {dk}: {d2}");
            // Plus the largest gamma^2, still finite: no Cauchy score of 0.
            let g = crate::attention::GAMMA_MAX as f32;
            assert!((d2 + g * g).is_finite() && 1.0 / (d2 + g * g) > 0.0);
            let just_past = f32::from_bits(lim.to_bits() + 1);
            assert!(check_coords("k", &a, dk).is_ok());
            let mut x = vec![0.5f32; 4 * dk];
            x[2] = -just_past;
            let e = check_coords("k", &x, dk).unwrap_err().to_string();
            assert!(
                e.starts_with("k: coordinate") && e.contains("index 2"),
                "{e}"
            );
            x[1] = f32::NAN;
            let e = check_coords("q", &x, dk).unwrap_err().to_string();
            assert!(
                e.starts_with("q: contains NaN or inf (flat index 1)"),
                "{e}"
            );
        }
        assert!(coord_limit::<f64>(3) > 1e153);
        // Long inputs are checked in parallel chunks: still the first bad index.
        let mut x = vec![1.0f32; 3 * crate::error::PAR_FILL + 7];
        x[2 * crate::error::PAR_FILL + 5] = 1e30;
        x[3 * crate::error::PAR_FILL + 1] = f32::INFINITY;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let got = pool.install(|| first_bad_coord(&x, coord_limit::<f32>(3)));
        assert_eq!(got, Some(2 * crate::error::PAR_FILL + 5));
    }

    #[test]
    fn monotone_and_in_range() {
        let g = Grid::new(3, 10, 0, 1.0).unwrap();
        let mut prev = 0;
        for i in -2000..2000 {
            let c = g.cell(i as f64 * 0.01);
            assert!(c >= prev);
            assert!(c < 512);
            prev = c;
        }
        assert_eq!(g.cell(0.0), 256);
        assert_eq!(g.cell(1e300), 511);
    }

    #[test]
    fn shifts_fit() {
        for d in 1..=8 {
            let bits = default_bits(d);
            for s in 0..=d as u32 {
                let g = Grid::new(d, bits, s, 1.0).unwrap();
                assert!(g.cell(1e300) < (1u64 << bits));
            }
            assert!(Grid::new(d, bits, d as u32 + 1, 1.0).is_err());
        }
    }

    use crate::morton::{encode_point_ref, max_bits};
    use crate::simd::available_paths;

    /// The definition in the module docs, literally (floor, then min), one bit at a time.
    fn code_ref(x: &[f64], g: &Grid) -> u64 {
        let half_u = 1u64 << (g.bits - 1);
        let cells: Vec<u64> = x
            .iter()
            .map(|&v| {
                let y = v / g.scale;
                let u = 0.5 + 0.5 * y / (1.0 + y.abs());
                let c = ((u * half_u as f64).floor() as u64).min(half_u - 1);
                c + (g.shift as u64 * half_u) / shift_denominator(g.d)
            })
            .collect();
        encode_point_ref(&cells, g.bits)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^ (z >> 31)
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// A mix of ordinary values, extremes, subnormals, zeros and exact cell boundaries.
        fn value(&mut self, g: &Grid) -> f64 {
            match self.next() % 10 {
                0 => 0.0,
                1 => -0.0,
                2 => f64::from_bits(self.next() & 0x000f_ffff_ffff_ffff), // subnormal
                3 => {
                    f64::from_bits(self.next() & !(1u64 << 63) & 0x7fef_ffff_ffff_ffff)
                        * if self.next() & 1 == 0 { 1.0 } else { -1.0 }
                }
                4 => {
                    // the x whose u*half is (about) the integer c: boundaries of the grid
                    let half = (1u64 << (g.bits - 1)) as f64;
                    let c = (self.next() % (1u64 << (g.bits - 1))) as f64;
                    let u = c / half;
                    let t = (2.0 * u - 1.0).clamp(-0.999, 0.999); // y / (1 + |y|)
                    g.scale * t / (1.0 - t.abs())
                }
                5 => f32::MAX as f64 * (self.unit() - 0.5) * 2.0,
                _ => (self.unit() - 0.5) * 8.0 * g.scale,
            }
        }
    }

    #[test]
    fn cell_is_the_documented_floor_definition() {
        let mut r = Rng(3);
        for d in 1..=8 {
            for bits in [1, 2, default_bits(d), max_bits(d)] {
                for scale in [1.0, 0.37, 8.0, 1e-300] {
                    let g = Grid::new(d, bits, d as u32, scale).unwrap();
                    for _ in 0..200 {
                        let x: Vec<f64> = (0..d).map(|_| r.value(&g)).collect();
                        assert_eq!(g.code(&x), code_ref(&x, &g), "d={d} bits={bits} {x:?}");
                    }
                }
            }
        }
    }

    fn check_all_paths<T: Real + std::fmt::Debug, O: Code + std::fmt::Debug>(x: &[T], g: &Grid) {
        let n = x.len() / g.d;
        let mut want = vec![O::default(); n];
        zorder_with_path(x, g, &mut want, Path::Portable).unwrap();
        for (i, row) in x.chunks(g.d).enumerate() {
            let xf: Vec<f64> = row.iter().map(|v| v.to_f64()).collect();
            assert_eq!(want[i].to_u64(), code_ref(&xf, g), "row {i} {xf:?}");
        }
        for p in available_paths() {
            let mut got = vec![O::default(); n];
            zorder_with_path(x, g, &mut got, p).unwrap();
            if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
                panic!(
                    "{p:?} d={} bits={} shift={} scale={}: row {i} {:?}: {:?} != {:?}",
                    g.d,
                    g.bits,
                    g.shift,
                    g.scale,
                    &x[i * g.d..(i + 1) * g.d],
                    got[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn every_path_is_bit_identical() {
        let mut r = Rng(11);
        for d in 1..=8 {
            let mut bit_choices = vec![1, 2, default_bits(d), max_bits(d)];
            if d == 1 {
                bit_choices.extend([32, 33, 53]);
            }
            for bits in bit_choices {
                for scale in [1.0, 0.25, 4.0, 0.7, 3.3, 1e-300] {
                    for shift in [0, d as u32] {
                        let g = Grid::new(d, bits, shift, scale).unwrap();
                        for n in [0usize, 1, 3, 4, 7, 300] {
                            let x: Vec<f64> = (0..n * d).map(|_| r.value(&g)).collect();
                            let x32: Vec<f32> = x
                                .iter()
                                .map(|&v| (v as f32).clamp(f32::MIN, f32::MAX))
                                .collect();
                            check_all_paths::<f64, u64>(&x, &g);
                            check_all_paths::<f32, u64>(&x32, &g);
                            if d as u32 * bits <= 32 {
                                check_all_paths::<f32, u32>(&x32, &g);
                                check_all_paths::<f64, u32>(&x, &g);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn large_batch_3d_float32() {
        // several rayon chunks, a tail that is not a multiple of 4
        let mut r = Rng(5);
        let n = 3 * PAR_CHUNK + 5;
        let x: Vec<f32> = (0..n * 3)
            .map(|_| ((r.unit() - 0.5) * 6.0) as f32)
            .collect();
        for scale in [1.0, 0.5, 0.7] {
            let g = Grid::new(3, 21, 1, scale).unwrap();
            check_all_paths::<f32, u64>(&x, &g);
        }
    }

    #[test]
    fn non_finite_is_an_error_on_every_path() {
        let n = PAR_CHUNK + 9;
        let g = Grid::new(3, 21, 0, 1.0).unwrap();
        let tiny = Grid::new(3, 21, 0, 1e-300).unwrap();
        for p in [Path::Portable, Path::Avx2, Path::Bmi2] {
            for bad in [0usize, 13, 3 * PAR_CHUNK + 1, 3 * n - 1] {
                for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut x = vec![0.5f32; 3 * n];
                    x[bad] = v;
                    let mut out = vec![0u64; n];
                    let e = zorder_with_path(&x, &g, &mut out, p).unwrap_err();
                    assert!(e.to_string().contains(&format!("flat index {bad}")), "{e}");
                }
                // finite but x / scale overflows: valid, and every path agrees
                let mut x = vec![0.5f64; 3 * n];
                x[bad] = 1e300;
                let mut want = vec![0u64; n];
                zorder_with_path(&x, &tiny, &mut want, Path::Portable).unwrap();
                let mut out = vec![0u64; n];
                zorder_with_path(&x, &tiny, &mut out, p).unwrap();
                let diff = (0..n).find(|&i| out[i] != want[i]);
                assert!(diff.is_none(), "{p:?} bad={bad} row {diff:?}");
            }
        }
        let mut o32 = vec![0u32; 1];
        // 3 * 21 bits do not fit u32 codes
        assert!(zorder(&[0.0f32; 3], &g, &mut o32).is_err());
        assert!(zorder(&[0.0f32; 4], &g, &mut [0u64; 1]).is_err());
    }
}
