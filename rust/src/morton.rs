//! Morton (Z-order) encode/decode for d = 1..8 dimensions.
//!
//! Bit `b` of coordinate `j` lands at bit `b*d + j` of the code (coordinate 0 lowest), as in
//! pymorton and libmorton. Codes are u32 when `d*bits <= 32`, else u64.
//!
//! # Paths
//!
//! The batch functions take a [`Path`]; [`checked`] turns it into one this CPU can run
//! (`Bmi2` -> `Avx2` -> `Portable`), so a wrong request never executes a missing instruction.
//! - `Bmi2`: one `pdep` (encode) / `pext` (decode) per coordinate with the mask
//!   `SPREAD[d].masks[0] << j`.
//! - `Avx2`: the shift-and-mask spread of [`spread`] on 4 u64 lanes. Coordinates are spread
//!   where they lie (row-major, 4 consecutive values per vector: the spread is the same for
//!   every coordinate), shifted by `j` with `vpsllvq`, then the `d` pieces of a row are OR-ed.
//! - `Portable`: [`spread`] / [`compact`] per coordinate, plain Rust.
//!
//! Every kernel is monomorphised for `d` (const generic `D`), so masks and shift counts are
//! immediates and the per-row loops unroll.
//!
//! # Performance notes
//!
//! Zen 3 EPYC, KVM guest with 2 vCPUs shared with other jobs (so +-20 % noise; best of 200
//! interleaved runs), one thread, n = 65536, 3-D, bits = 21, u64 codes; ns per code, Rust
//! side (`benches/bench_morton.py` has the Python-level numbers):
//!
//! ```text
//!                                          encode   decode   zorder f32 (scale 1 / 0.7)
//! first version: runtime d, per-row code    10.8      8.5     34-38  (libm floor per value)
//! portable, const D (current)                5.1      2.9      9.0 / 10.1
//! avx2 (4 lanes, spread in place)            2.3      2.0      4.8 /  5.9
//! bmi2 pdep/pext                             1.4      1.1      2.4 /  3.3   <- default
//! ```
//!
//! What was tried, and what won:
//! - Const-generic `D` for every kernel (masks and shift counts become immediates, rows
//!   unroll): 2-3x on the portable path by itself.
//! - The range check (`value < 2^bits`) was a `position` scan, which LLVM cannot vectorise
//!   (early exit). Now an OR-reduction per block of 512 rows inside the parallel loop, while
//!   the block is in L1; only on failure does a serial scan find the index for the message.
//! - BMI2: `pdep` is 1/cycle on Zen 3 and Intel (3 cycles latency), so 3-D encode is bound
//!   at 3 cycles/code (measured `pdep` alone: 1.0 ns/code); the loop LLVM emits is the ideal
//!   load/pdep/or/store sequence. On Zen 1/2 `pdep` is microcoded (~20-250 cycles, data
//!   dependent): [`crate::simd::selected`] picks AVX2 there.
//! - AVX2: spreading the `4*D` values of 4 rows where they lie (the spread is the same for
//!   every coordinate: no transpose), `vpsllvq` by `flat % D`, then OR-ing each row's `D`
//!   pieces from an L1 array beat the portable path 2.2x but not `pdep`.
//! - zorder (float -> code) is bound by the f64 divide of the softsign, `vdivpd ymm` being
//!   ~5 cycles per 4 values (llvm-mca znver3: 5.0; measured 0.35 ns/value): 3.75 cycles per
//!   3-D code before any interleaving. Measured: cell map alone 1.47 ns/code, `pdep` alone
//!   1.0 ns/code. `x / scale` becomes `x * (1/scale)` when that is exact (scale a power of
//!   two; skipped for scale 1), saving the second divide. `floor` + `as u64` became one
//!   `vcvttpd2dq` (cells < 2^31 for bits <= 32), and the clamp a `vpminud`.
//! - Fusing the cell map with `pdep`: two passes over blocks of rows (cells to an L1 u32
//!   buffer, then `pdep` per row) at 32-128 rows/block measured 2.1 ns/code; 4-8 rows 2.6
//!   (the OoO window fills with divides either way); one fused loop of 4 rows with lane
//!   extracts 2.3; a software-pipelined ring buffer 2.3. Two passes of 64 rows won.
//! - Replacing the divide by `rcpps` + Newton + an exactness check (fallback near cell
//!   boundaries) was costed at ~12 more vector ops per 4 values: more than the divide's
//!   5 cycles on the otherwise ~70 % busy FP pipes, so not done.
//! - Portable zorder: the same two-pass shape with a flat cell loop that SSE2/NEON vectorise
//!   (f64 clamp before an unchecked `as i32`, no 64-bit integer min): 38 -> 9 ns/code.
use crate::error::{Result, ZetaError};
use crate::simd::Path;
use rayon::prelude::*;

pub const MAX_DIMS: usize = 8;

/// Rows per rayon task in batch calls.
const PAR_CHUNK: usize = 1 << 14;

/// Rows per range-check block inside a rayon task (the OR-reduction runs on this many rows
/// before they are encoded, while they are in L1).
const CHECK_BLOCK: usize = 512;

/// The most bits per coordinate that fit a 64-bit code.
pub fn max_bits(d: usize) -> u32 {
    (64 / d.max(1)) as u32
}

pub fn check_dims(arg: &'static str, d: usize) -> Result<()> {
    if d == 0 || d > MAX_DIMS {
        return Err(ZetaError::value(
            arg,
            format!("the number of dimensions must be 1..={MAX_DIMS}, got {d}"),
        ));
    }
    Ok(())
}

pub fn check_bits(d: usize, bits: u32) -> Result<()> {
    if bits == 0 || bits > max_bits(d) {
        return Err(ZetaError::value(
            "bits",
            format!(
                "must be 1..={} for {d} dimensions (d*bits <= 64), got {bits}",
                max_bits(d)
            ),
        ));
    }
    Ok(())
}

/// An unsigned integer coordinate type.
pub trait Coord: Copy + Send + Sync + 'static {
    fn to_u64(self) -> u64;
    fn from_u64(x: u64) -> Self;
}
/// A code type: u32 or u64.
pub trait Code: Copy + Send + Sync + Ord + Default + 'static {
    const BITS: u32;
    fn to_u64(self) -> u64;
    fn from_u64(x: u64) -> Self;
}
macro_rules! impl_uint {
    ($($t:ty),*) => {$(
        impl Coord for $t {
            #[inline(always)]
            fn to_u64(self) -> u64 { self as u64 }
            #[inline(always)]
            fn from_u64(x: u64) -> Self { x as $t }
        }
    )*};
}
impl_uint!(u8, u16, u32, u64);
impl Code for u32 {
    const BITS: u32 = 32;
    #[inline(always)]
    fn to_u64(self) -> u64 {
        self as u64
    }
    #[inline(always)]
    fn from_u64(x: u64) -> Self {
        x as u32
    }
}
impl Code for u64 {
    const BITS: u32 = 64;
    #[inline(always)]
    fn to_u64(self) -> u64 {
        self
    }
    #[inline(always)]
    fn from_u64(x: u64) -> Self {
        x
    }
}

/// Masks for spreading the bits of one coordinate with stride `d` by shift-and-mask steps.
///
/// Steps go over k = 32, 16, .., 1: bits whose index has bit k set move up by k*(d-1).
/// After the step for k, bit i sits at `i + (i & !(k-1)) * (d-1)`; `masks[s]` keeps those
/// positions (s = log2 k). `masks[6]` is the input mask (the low `max_bits(d)` bits).
#[derive(Clone, Copy, Debug)]
pub struct SpreadMasks {
    pub d: u32,
    pub masks: [u64; 7],
}

pub const fn spread_masks(d: usize) -> SpreadMasks {
    let nb = 64 / d; // bits per coordinate that fit
    let mut masks = [0u64; 7];
    let mut s = 0;
    while s < 7 {
        let k = 1usize << s; // 1..64
        let mut m = 0u64;
        let mut i = 0;
        while i < nb {
            let pos = if s == 6 {
                i
            } else {
                i + (i & !(k - 1)) * (d - 1)
            };
            if pos < 64 {
                m |= 1u64 << pos;
            }
            i += 1;
        }
        masks[s] = m;
        s += 1;
    }
    SpreadMasks { d: d as u32, masks }
}

pub const SPREAD: [SpreadMasks; MAX_DIMS + 1] = [
    spread_masks(1),
    spread_masks(1),
    spread_masks(2),
    spread_masks(3),
    spread_masks(4),
    spread_masks(5),
    spread_masks(6),
    spread_masks(7),
    spread_masks(8),
];

/// Spreads the low bits of `x` to positions `i*d` (portable shift-and-mask).
#[inline(always)]
pub fn spread(x: u64, m: &SpreadMasks) -> u64 {
    let d1 = (m.d - 1) as u64;
    if d1 == 0 {
        return x;
    }
    let mut x = x & m.masks[6];
    let mut s = 5i32;
    while s >= 0 {
        let k = 1u64 << s;
        let sh = k * d1;
        if sh < 64 {
            x = (x | (x << sh)) & m.masks[s as usize];
        } else {
            x &= m.masks[s as usize];
        }
        s -= 1;
    }
    x
}

/// Inverse of [`spread`]: gathers bits at positions `i*d` to the low bits.
#[inline(always)]
pub fn compact(x: u64, m: &SpreadMasks) -> u64 {
    let d1 = (m.d - 1) as u64;
    if d1 == 0 {
        return x;
    }
    let mut x = x & m.masks[0];
    let mut s = 0u32;
    while s < 6 {
        let k = 1u64 << s;
        let sh = k * d1;
        if sh < 64 {
            x = (x | (x >> sh)) & m.masks[(s + 1) as usize];
        } else {
            x &= m.masks[(s + 1) as usize];
        }
        s += 1;
    }
    x
}

/// Largest step `s` (k = 2^s) that moves any bit when spreading `max_bits(d)`-bit values:
/// steps above it only re-apply the input mask. Spread runs s = top..=0, compact 0..=top.
#[inline(always)]
const fn top_step(d: usize) -> u32 {
    let nb = 64 / d;
    if nb <= 1 {
        0
    } else {
        63 - ((nb - 1) as u64).leading_zeros()
    }
}

/// [`spread`] for a compile-time `D`, input already `< 2^max_bits(D)`.
#[inline(always)]
fn spread_const<const D: usize>(x: u64) -> u64 {
    if D == 1 {
        return x;
    }
    let m = &SPREAD[D].masks;
    let mut x = x;
    let mut s = top_step(D) as i32;
    while s >= 0 {
        x = (x | (x << ((1u64 << s) * (D as u64 - 1)))) & m[s as usize];
        s -= 1;
    }
    x
}

/// [`compact`] for a compile-time `D`.
#[inline(always)]
fn compact_const<const D: usize>(x: u64) -> u64 {
    if D == 1 {
        return x;
    }
    let m = &SPREAD[D].masks;
    let mut x = x & m[0];
    let mut s = 0;
    while s <= top_step(D) {
        x = (x | (x >> ((1u64 << s) * (D as u64 - 1)))) & m[s as usize + 1];
        s += 1;
    }
    x
}

/// Slow, obvious reference: one bit at a time.
pub fn encode_point_ref(coords: &[u64], bits: u32) -> u64 {
    let d = coords.len() as u32;
    let mut code = 0u64;
    for b in 0..bits {
        for (j, &c) in coords.iter().enumerate() {
            code |= ((c >> b) & 1) << (b * d + j as u32);
        }
    }
    code
}

/// Encodes one point (portable path). `coords.len()` is d; values must be < 2^bits.
#[inline(always)]
pub fn encode_point(coords: &[u64]) -> u64 {
    let m = &SPREAD[coords.len()];
    let mut code = 0u64;
    for (j, &c) in coords.iter().enumerate() {
        code |= spread(c, m) << j;
    }
    code
}

/// A [`Path`] this CPU can run; only [`checked`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked(Path);

/// The portable path (runs everywhere).
pub const PORTABLE: Checked = Checked(Path::Portable);

impl Checked {
    pub fn path(self) -> Path {
        self.0
    }
}

/// The path that runs for a request of `path`: the request if this CPU has it, else the next
/// one down (`Bmi2` -> `Avx2` -> `Portable`).
pub fn checked(path: Path) -> Checked {
    let f = crate::simd::features();
    Checked(match path {
        Path::Bmi2 if f.bmi2 => Path::Bmi2,
        Path::Bmi2 | Path::Avx2 if f.avx2 => Path::Avx2,
        _ => Path::Portable,
    })
}

/// Runs `$body` with a `const $D: usize` equal to the runtime `$d` (1..=8).
macro_rules! with_dims {
    ($d:expr, $D:ident => $body:expr) => {
        match $d {
            1 => {
                const $D: usize = 1;
                $body
            }
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
            5 => {
                const $D: usize = 5;
                $body
            }
            6 => {
                const $D: usize = 6;
                $body
            }
            7 => {
                const $D: usize = 7;
                $body
            }
            8 => {
                const $D: usize = 8;
                $body
            }
            _ => unreachable!("d checked to be 1..=8"),
        }
    };
}
pub(crate) use with_dims;

/// Encodes rows (`coords.len() == out.len() * D`, values `< 2^max_bits(D)`).
#[inline]
pub(crate) fn encode_rows<C: Coord, O: Code, const D: usize>(
    coords: &[C],
    out: &mut [O],
    path: Checked,
) {
    debug_assert_eq!(coords.len(), out.len() * D);
    match path.0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Checked` holds `Bmi2` only when the CPU reports BMI2 (see `checked`).
        Path::Bmi2 => unsafe { x86::encode_bmi2::<C, O, D>(coords, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Checked` holds `Avx2` only when the CPU reports AVX2 (see `checked`).
        Path::Avx2 => unsafe { x86::encode_avx2::<C, O, D>(coords, out) },
        _ => encode_portable::<C, O, D>(coords, out),
    }
}

#[inline(always)]
fn encode_portable<C: Coord, O: Code, const D: usize>(coords: &[C], out: &mut [O]) {
    for (row, slot) in coords.chunks_exact(D).zip(out.iter_mut()) {
        let mut code = 0u64;
        for (j, &c) in row.iter().enumerate() {
            code |= spread_const::<D>(c.to_u64()) << j;
        }
        *slot = O::from_u64(code);
    }
}

#[inline(always)]
fn decode_portable<O: Code, C: Coord, const D: usize>(codes: &[O], out: &mut [C]) {
    for (&c, row) in codes.iter().zip(out.chunks_exact_mut(D)) {
        let c = c.to_u64();
        for (j, slot) in row.iter_mut().enumerate() {
            *slot = C::from_u64(compact_const::<D>(c >> j));
        }
    }
}

#[inline]
fn decode_rows<O: Code, C: Coord, const D: usize>(codes: &[O], out: &mut [C], path: Checked) {
    debug_assert_eq!(out.len(), codes.len() * D);
    match path.0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Checked` holds `Bmi2` only when the CPU reports BMI2 (see `checked`).
        Path::Bmi2 => unsafe { x86::decode_bmi2::<O, C, D>(codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Checked` holds `Avx2` only when the CPU reports AVX2 (see `checked`).
        Path::Avx2 => unsafe { x86::decode_avx2::<O, C, D>(codes, out) },
        _ => decode_portable::<O, C, D>(codes, out),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The BMI2 and AVX2 kernels. Each is `unsafe` only because of `#[target_feature]`:
    //! callers must have checked the CPU feature; the bodies index slices safely.
    use super::{compact_const, spread_const, top_step, Code, Coord, SPREAD};
    use std::arch::x86_64::*;

    #[target_feature(enable = "bmi2")]
    pub(super) unsafe fn encode_bmi2<C: Coord, O: Code, const D: usize>(
        coords: &[C],
        out: &mut [O],
    ) {
        if D == 1 {
            for (&c, slot) in coords.iter().zip(out.iter_mut()) {
                *slot = O::from_u64(c.to_u64());
            }
            return;
        }
        let m0 = SPREAD[D].masks[0];
        for (row, slot) in coords.chunks_exact(D).zip(out.iter_mut()) {
            let mut code = 0u64;
            for (j, &c) in row.iter().enumerate() {
                code |= _pdep_u64(c.to_u64(), m0 << j);
            }
            *slot = O::from_u64(code);
        }
    }

    #[target_feature(enable = "bmi2")]
    pub(super) unsafe fn decode_bmi2<O: Code, C: Coord, const D: usize>(
        codes: &[O],
        out: &mut [C],
    ) {
        if D == 1 {
            for (&c, slot) in codes.iter().zip(out.iter_mut()) {
                *slot = C::from_u64(c.to_u64());
            }
            return;
        }
        let m0 = SPREAD[D].masks[0];
        for (&c, row) in codes.iter().zip(out.chunks_exact_mut(D)) {
            let c = c.to_u64();
            for (j, slot) in row.iter_mut().enumerate() {
                *slot = C::from_u64(_pext_u64(c, m0 << j));
            }
        }
    }

    /// Spread of 4 lanes, each `< 2^max_bits(D)` (see [`super::spread`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn spread4<const D: usize>(x: __m256i) -> __m256i {
        let m = &SPREAD[D].masks;
        let mut x = x;
        let mut s = top_step(D) as i32;
        while s >= 0 {
            let sh = _mm_cvtsi64_si128(((1i64) << s) * (D as i64 - 1));
            let mask = _mm256_set1_epi64x(m[s as usize] as i64);
            x = _mm256_and_si256(_mm256_or_si256(x, _mm256_sll_epi64(x, sh)), mask);
            s -= 1;
        }
        x
    }

    /// Compact of 4 lanes (see [`super::compact`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn compact4<const D: usize>(x: __m256i) -> __m256i {
        let m = &SPREAD[D].masks;
        let mut x = _mm256_and_si256(x, _mm256_set1_epi64x(m[0] as i64));
        let mut s = 0;
        while s <= top_step(D) {
            let sh = _mm_cvtsi64_si128(((1i64) << s) * (D as i64 - 1));
            let mask = _mm256_set1_epi64x(m[s as usize + 1] as i64);
            x = _mm256_and_si256(_mm256_or_si256(x, _mm256_srl_epi64(x, sh)), mask);
            s += 1;
        }
        x
    }

    /// Four consecutive coordinates as u64 lanes.
    #[inline(always)]
    fn lanes<C: Coord>(c: &[C]) -> [u64; 4] {
        [c[0].to_u64(), c[1].to_u64(), c[2].to_u64(), c[3].to_u64()]
    }

    /// AVX2 encode. Rows are taken 4 at a time: their `4*D` values (contiguous) are spread
    /// in place, 4 per vector, each lane shifted by its coordinate index `(flat % D)`, then
    /// the `D` pieces of each row are OR-ed.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn encode_avx2<C: Coord, O: Code, const D: usize>(
        coords: &[C],
        out: &mut [O],
    ) {
        if D == 1 {
            for (&c, slot) in coords.iter().zip(out.iter_mut()) {
                *slot = O::from_u64(c.to_u64());
            }
            return;
        }
        let full = out.len() / 4 * 4;
        let (c_main, c_tail) = coords.split_at(full * D);
        let (o_main, o_tail) = out.split_at_mut(full);
        // Lane shift (flat index % D) for vector v of a group of 4 rows: lane i of vector v
        // holds flat value 4v+i.
        let mut shifts = [[0i64; 4]; D];
        for (v, sv) in shifts.iter_mut().enumerate() {
            for (i, s) in sv.iter_mut().enumerate() {
                *s = ((4 * v + i) % D) as i64;
            }
        }
        let mut pieces = [[0u64; 4]; D];
        for (rows, o) in c_main.chunks_exact(4 * D).zip(o_main.chunks_exact_mut(4)) {
            for v in 0..D {
                let l = lanes(&rows[4 * v..4 * v + 4]);
                // SAFETY: `[u64; 4]` / `[i64; 4]` are 32 bytes, unaligned loads and stores.
                let x = _mm256_loadu_si256(l.as_ptr() as *const __m256i);
                let sh = _mm256_loadu_si256(shifts[v].as_ptr() as *const __m256i);
                let y = _mm256_sllv_epi64(spread4::<D>(x), sh);
                _mm256_storeu_si256(pieces[v].as_mut_ptr() as *mut __m256i, y);
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
        for (row, slot) in c_tail.chunks_exact(D).zip(o_tail.iter_mut()) {
            let mut code = 0u64;
            for (j, &c) in row.iter().enumerate() {
                code |= spread_const::<D>(c.to_u64()) << j;
            }
            *slot = O::from_u64(code);
        }
    }

    /// AVX2 decode: 4 codes per vector, one compact per coordinate.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_avx2<O: Code, C: Coord, const D: usize>(
        codes: &[O],
        out: &mut [C],
    ) {
        if D == 1 {
            for (&c, slot) in codes.iter().zip(out.iter_mut()) {
                *slot = C::from_u64(c.to_u64());
            }
            return;
        }
        let full = codes.len() / 4 * 4;
        let (k_main, k_tail) = codes.split_at(full);
        let (o_main, o_tail) = out.split_at_mut(full * D);
        let mut vals = [[0u64; 4]; D];
        for (k, o) in k_main.chunks_exact(4).zip(o_main.chunks_exact_mut(4 * D)) {
            let l = [k[0].to_u64(), k[1].to_u64(), k[2].to_u64(), k[3].to_u64()];
            // SAFETY: `[u64; 4]` is 32 bytes; unaligned load.
            let x = _mm256_loadu_si256(l.as_ptr() as *const __m256i);
            for (j, vj) in vals.iter_mut().enumerate() {
                let y = compact4::<D>(_mm256_srl_epi64(x, _mm_cvtsi64_si128(j as i64)));
                // SAFETY: `[u64; 4]` is 32 bytes; unaligned store.
                _mm256_storeu_si256(vj.as_mut_ptr() as *mut __m256i, y);
            }
            for (r, row) in o.chunks_exact_mut(D).enumerate() {
                for (j, slot) in row.iter_mut().enumerate() {
                    *slot = C::from_u64(vals[j][r]);
                }
            }
        }
        for (&c, row) in k_tail.iter().zip(o_tail.chunks_exact_mut(D)) {
            let c = c.to_u64();
            for (j, slot) in row.iter_mut().enumerate() {
                *slot = C::from_u64(compact_const::<D>(c >> j));
            }
        }
    }
}

/// OR of all values (vectorises; no early exit).
#[inline(always)]
fn or_all<T: Copy>(x: &[T], f: impl Fn(T) -> u64) -> u64 {
    x.iter().fold(0u64, |a, &v| a | f(v))
}

fn coords_error<C: Coord>(coords: &[C], bits: u32) -> ZetaError {
    let lim = 1u64 << bits;
    let pos = coords.iter().position(|c| c.to_u64() >= lim).unwrap_or(0);
    ZetaError::value(
        "coords",
        format!(
            "value {} at flat index {pos} does not fit in bits={bits} (must be < 2^{bits})",
            coords[pos].to_u64()
        ),
    )
}

fn check_out_fits<O: Code>(d: usize, bits: u32) -> Result<()> {
    if (d as u32) * bits > O::BITS {
        return Err(ZetaError::value(
            "bits",
            format!(
                "d*bits = {} does not fit a {}-bit code",
                d as u32 * bits,
                O::BITS
            ),
        ));
    }
    Ok(())
}

/// Encodes `n = coords.len()/d` points (row-major (n, d)) into `out` (n codes).
///
/// `path` is a request: a path this CPU lacks falls back (see [`checked`]). Values must be
/// `< 2^bits`; on that error `out` may be partly written.
pub fn encode<C: Coord, O: Code>(
    coords: &[C],
    d: usize,
    bits: u32,
    out: &mut [O],
    path: Path,
) -> Result<()> {
    check_dims("coords", d)?;
    check_bits(d, bits)?;
    check_out_fits::<O>(d, bits)?;
    if coords.len() != out.len() * d {
        return Err(ZetaError::value("coords", "length is not n*d"));
    }
    let path = checked(path);
    with_dims!(d, D => encode_par::<C, O, D>(coords, bits, out, path))
}

fn encode_par<C: Coord, O: Code, const D: usize>(
    coords: &[C],
    bits: u32,
    out: &mut [O],
    path: Checked,
) -> Result<()> {
    let ok = out
        .par_chunks_mut(PAR_CHUNK)
        .zip(coords.par_chunks(PAR_CHUNK * D))
        .all(|(o, c)| {
            for (ob, cb) in o.chunks_mut(CHECK_BLOCK).zip(c.chunks(CHECK_BLOCK * D)) {
                if bits < 64 && or_all(cb, C::to_u64) >> bits != 0 {
                    return false;
                }
                encode_rows::<C, O, D>(cb, ob, path);
            }
            true
        });
    if ok {
        Ok(())
    } else {
        Err(coords_error(coords, bits))
    }
}

/// Decodes codes into `out` (row-major (n, d)).
///
/// `path` as in [`encode`]. Codes must have no bits at or above `d*bits`; on that error `out`
/// may be partly written.
pub fn decode<O: Code, C: Coord>(
    codes: &[O],
    d: usize,
    bits: u32,
    out: &mut [C],
    path: Path,
) -> Result<()> {
    check_dims("dims", d)?;
    check_bits(d, bits)?;
    check_out_fits::<O>(d, bits)?;
    if out.len() != codes.len() * d {
        return Err(ZetaError::value("codes", "output length is not n*d"));
    }
    let path = checked(path);
    with_dims!(d, D => decode_par::<O, C, D>(codes, bits, out, path))
}

fn decode_par<O: Code, C: Coord, const D: usize>(
    codes: &[O],
    bits: u32,
    out: &mut [C],
    path: Checked,
) -> Result<()> {
    let total = D as u32 * bits;
    let ok = out
        .par_chunks_mut(PAR_CHUNK * D)
        .zip(codes.par_chunks(PAR_CHUNK))
        .all(|(o, k)| {
            for (ob, kb) in o.chunks_mut(CHECK_BLOCK * D).zip(k.chunks(CHECK_BLOCK)) {
                if total < 64 && or_all(kb, O::to_u64) >> total != 0 {
                    return false;
                }
                decode_rows::<O, C, D>(kb, ob, path);
            }
            true
        });
    if ok {
        return Ok(());
    }
    let lim = 1u64 << total;
    let pos = codes.iter().position(|c| c.to_u64() >= lim).unwrap_or(0);
    Err(ZetaError::value(
        "codes",
        format!(
            "code {} at flat index {pos} has bits above dims*bits = {total}",
            codes[pos].to_u64()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::available_paths;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^ (z >> 31)
        }
        fn below_bits(&mut self, bits: u32) -> u64 {
            let x = self.next();
            if bits >= 64 {
                x
            } else {
                x & ((1u64 << bits) - 1)
            }
        }
    }

    fn all_paths() -> [Path; 3] {
        [Path::Portable, Path::Avx2, Path::Bmi2]
    }

    #[test]
    fn spread_matches_reference_all_dims() {
        let mut s = 0x9e3779b97f4a7c15u64;
        for d in 1..=MAX_DIMS {
            let bits = max_bits(d);
            for _ in 0..2000 {
                let mut c = [0u64; MAX_DIMS];
                for x in c.iter_mut().take(d) {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    *x = if bits == 64 {
                        s
                    } else {
                        s & ((1u64 << bits) - 1)
                    };
                }
                let code = encode_point(&c[..d]);
                assert_eq!(code, encode_point_ref(&c[..d], bits), "d={d}");
                for (j, &cj) in c.iter().enumerate().take(d) {
                    assert_eq!(compact(code >> j, &SPREAD[d]), cj, "d={d} j={j}");
                }
            }
        }
    }

    #[test]
    fn const_spread_matches_runtime() {
        let mut r = Rng(1);
        fn one<const D: usize>(r: &mut Rng) {
            for _ in 0..2000 {
                let x = r.below_bits(max_bits(D));
                assert_eq!(spread_const::<D>(x), spread(x, &SPREAD[D]), "d={D}");
                let y = r.next();
                assert_eq!(compact_const::<D>(y), compact(y, &SPREAD[D]), "d={D}");
            }
        }
        for d in 1..=MAX_DIMS {
            with_dims!(d, D => one::<D>(&mut r));
        }
    }

    #[test]
    fn known_values_3d() {
        // x=1 -> bit 0, y=1 -> bit 1, z=1 -> bit 2
        assert_eq!(encode_point(&[1, 0, 0]), 1);
        assert_eq!(encode_point(&[0, 1, 0]), 2);
        assert_eq!(encode_point(&[0, 0, 1]), 4);
        assert_eq!(encode_point(&[2, 0, 0]), 8);
        for p in all_paths() {
            let mut o = [0u64; 4];
            encode(&[1u32, 0, 0, 0, 1, 0, 0, 0, 1, 2, 0, 0], 3, 21, &mut o, p).unwrap();
            assert_eq!(o, [1, 2, 4, 8], "{p:?}");
        }
    }

    /// Random (n, d) coords below 2^bits, n not a multiple of 4 (exercises SIMD tails).
    fn random_coords(r: &mut Rng, n: usize, d: usize, bits: u32) -> Vec<u64> {
        (0..n * d).map(|_| r.below_bits(bits)).collect()
    }

    fn check_paths_for<C: Coord, O: Code>(d: usize, bits: u32, n: usize, r: &mut Rng) {
        let cbits = bits.min(8 * std::mem::size_of::<C>() as u32);
        let raw = random_coords(r, n, d, cbits);
        let coords: Vec<C> = raw.iter().map(|&x| C::from_u64(x)).collect();
        let want: Vec<u64> = raw
            .chunks(d)
            .map(|row| encode_point_ref(row, bits))
            .collect();
        for &p in available_paths().iter() {
            assert_eq!(checked(p).path(), p, "checked() demoted an available path");
            let mut out = vec![O::default(); n];
            encode(&coords, d, bits, &mut out, p).unwrap();
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert_eq!(g.to_u64(), w, "encode {p:?} d={d} bits={bits} row {i}");
            }
            let mut back = vec![C::from_u64(0); n * d];
            decode(&out, d, bits, &mut back, p).unwrap();
            for (i, (&g, &w)) in back.iter().zip(&coords).enumerate() {
                assert_eq!(
                    g.to_u64(),
                    w.to_u64(),
                    "decode {p:?} d={d} bits={bits} @{i}"
                );
            }
        }
    }

    #[test]
    fn every_available_path_matches_reference() {
        let mut r = Rng(42);
        for d in 1..=MAX_DIMS {
            let mb = max_bits(d);
            for bits in [mb, mb - 1, (mb / 2).max(1), 1] {
                for n in [0usize, 1, 3, 4, 5, 1031] {
                    check_paths_for::<u64, u64>(d, bits, n, &mut r);
                    check_paths_for::<u32, u64>(d, bits, n, &mut r);
                    check_paths_for::<u8, u64>(d, bits, n, &mut r);
                    if d as u32 * bits <= 32 {
                        check_paths_for::<u16, u32>(d, bits, n, &mut r);
                        check_paths_for::<u32, u32>(d, bits, n, &mut r);
                    }
                }
            }
            // u32 codes at the most bits that fit 32
            let b32 = (32 / d) as u32;
            check_paths_for::<u32, u32>(d, b32, 1027, &mut r);
        }
    }

    #[test]
    fn large_parallel_batch_matches_portable() {
        // several rayon chunks and check blocks, odd length
        let mut r = Rng(7);
        let n = 2 * PAR_CHUNK + 777;
        for d in [2usize, 3, 5] {
            let bits = max_bits(d);
            let coords: Vec<u64> = random_coords(&mut r, n, d, bits);
            let mut want = vec![0u64; n];
            encode(&coords, d, bits, &mut want, Path::Portable).unwrap();
            for (i, row) in coords.chunks(d).enumerate().step_by(97) {
                assert_eq!(want[i], encode_point_ref(row, bits));
            }
            for p in available_paths() {
                let mut got = vec![0u64; n];
                encode(&coords, d, bits, &mut got, p).unwrap();
                assert_eq!(got, want, "{p:?} d={d}");
                let mut back = vec![0u64; n * d];
                decode(&got, d, bits, &mut back, p).unwrap();
                assert_eq!(back, coords, "{p:?} d={d}");
            }
        }
    }

    #[test]
    fn value_too_large_is_an_error_on_every_path() {
        let n = PAR_CHUNK + 100;
        for p in all_paths() {
            for bad in [0usize, 5, 3 * (PAR_CHUNK + 50) + 2] {
                let mut coords = vec![1u32; 3 * n];
                coords[bad] = 1 << 10;
                let mut out = vec![0u64; n];
                let e = encode(&coords, 3, 10, &mut out, p).unwrap_err();
                let msg = e.to_string();
                assert!(msg.contains(&format!("flat index {bad}")), "{msg}");
                assert!(msg.contains("1024"), "{msg}");
                // just below the limit is fine
                coords[bad] = (1 << 10) - 1;
                encode(&coords, 3, 10, &mut out, p).unwrap();
            }
            // codes with bits above d*bits
            let mut codes = vec![0u32; 10];
            codes[7] = 1 << 30;
            let mut back = vec![0u32; 30];
            let e = decode(&codes, 3, 10, &mut back, p).unwrap_err();
            assert!(e.to_string().contains("flat index 7"), "{e}");
        }
    }

    #[test]
    fn argument_errors() {
        let mut o32 = [0u32; 1];
        let mut o64 = [0u64; 1];
        // 3 * 11 = 33 bits do not fit u32 codes
        assert!(encode(&[0u32; 3], 3, 11, &mut o32, Path::Portable).is_err());
        assert!(encode(&[0u32; 3], 3, 11, &mut o64, Path::Portable).is_ok());
        assert!(encode(&[0u32; 3], 3, 22, &mut o64, Path::Portable).is_err());
        assert!(encode(&[0u32; 3], 3, 0, &mut o64, Path::Portable).is_err());
        assert!(encode(&[0u32; 9], 9, 7, &mut o64, Path::Portable).is_err());
        assert!(encode(&[0u32; 4], 3, 7, &mut o64, Path::Portable).is_err());
        assert!(decode(&[0u64; 1], 3, 7, &mut [0u32; 4], Path::Portable).is_err());
        assert!(decode(&[0u64; 1], 0, 7, &mut [0u32; 0], Path::Portable).is_err());
        // d = 1, bits = 64: every u64 value is valid
        let mut o = [0u64; 2];
        encode(&[u64::MAX, 5], 1, 64, &mut o, Path::Bmi2).unwrap();
        assert_eq!(o, [u64::MAX, 5]);
    }

    #[test]
    fn path_fallback_never_exceeds_cpu() {
        let f = crate::simd::features();
        for p in all_paths() {
            let c = checked(p).path();
            match c {
                Path::Bmi2 => assert!(f.bmi2 && p == Path::Bmi2),
                Path::Avx2 => assert!(f.avx2 && p != Path::Portable),
                Path::Portable => {}
            }
            if p == Path::Portable {
                assert_eq!(c, Path::Portable);
            }
        }
        assert_eq!(checked(Path::Bmi2).path() == Path::Bmi2, f.bmi2);
        assert_eq!(checked(Path::Avx2).path() == Path::Avx2, f.avx2);
        // what simd::selected() picks is always runnable
        assert_eq!(
            checked(crate::simd::selected()).path(),
            crate::simd::selected()
        );
    }
}
