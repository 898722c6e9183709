//! Runtime CPU feature detection and the `ZETA_SIMD` override.
//!
//! `ZETA_SIMD=portable` forces the plain-Rust paths (what a baseline x86-64 wheel runs on a
//! CPU without AVX2); `ZETA_SIMD=avx2` / `bmi2` ask for one path if the CPU has it.
//!
//! The vector kernels of the search and the scoring (3-D float32 distance scans, the value
//! sums over float32 / bfloat16 / float16 rows) have their own choice, [`vector`]: AVX-512
//! where the CPU has it, else AVX2, else portable loops, fixed at the first use;
//! `ZETA_SIMD=portable` / `avx2` / `avx512` then cap it. Every kernel rounds each operation
//! on its own, in the portable loop's order (no fused multiply-add), so all of them give the
//! same bits.
use half::{bf16, f16};
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Portable,
    Avx2,
    Bmi2,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Bmi2 => "bmi2",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    pub avx2: bool,
    pub bmi2: bool,
    /// BMI2 present but `pdep`/`pext` microcoded (AMD before Zen 3): slower than shifts.
    pub slow_pdep: bool,
    pub avx512f: bool,
    /// Half-precision conversions (`vcvtph2ps`) in AVX registers.
    pub f16c: bool,
    /// The `popcnt` instruction (every AVX2 CPU has it; the vector paths require it).
    pub popcnt: bool,
}

pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    let bmi2 = std::arch::is_x86_feature_detected!("bmi2");
    Features {
        avx2,
        bmi2,
        slow_pdep: bmi2 && amd_before_zen3(),
        avx512f: std::arch::is_x86_feature_detected!("avx512f"),
        f16c: std::arch::is_x86_feature_detected!("f16c"),
        popcnt: std::arch::is_x86_feature_detected!("popcnt"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

#[cfg(target_arch = "x86_64")]
fn amd_before_zen3() -> bool {
    let v = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [v.ebx, v.edx, v.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    if &vendor[..] != b"AuthenticAMD" {
        return false;
    }
    let l1 = std::arch::x86_64::__cpuid(1);
    let base_family = (l1.eax >> 8) & 0xf;
    let ext_family = (l1.eax >> 20) & 0xff;
    let family = if base_family == 0xf {
        base_family + ext_family
    } else {
        base_family
    };
    // Zen 1/2 are family 0x17; Zen 3 and later are 0x19+ with fast pdep.
    family < 0x19
}

/// The paths this CPU can run, best last.
pub fn available_paths() -> Vec<Path> {
    let f = features();
    let mut v = vec![Path::Portable];
    if f.avx2 {
        v.push(Path::Avx2);
    }
    if f.bmi2 {
        v.push(Path::Bmi2);
    }
    v
}

/// The path in use: `ZETA_SIMD` if set to something this CPU has, else the best one.
pub fn selected() -> Path {
    let f = features();
    match std::env::var("ZETA_SIMD").ok().as_deref().map(str::trim) {
        Some("portable") => return Path::Portable,
        Some("avx2") if f.avx2 => return Path::Avx2,
        Some("bmi2") if f.bmi2 => return Path::Bmi2,
        _ => {}
    }
    if f.bmi2 && !f.slow_pdep {
        Path::Bmi2
    } else if f.avx2 {
        Path::Avx2
    } else {
        Path::Portable
    }
}

/// The kernels of the distance scans and value sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vector {
    Portable,
    Avx2,
    Avx512,
}

impl Vector {
    pub fn name(self) -> &'static str {
        match self {
            Vector::Portable => "portable",
            Vector::Avx2 => "avx2",
            Vector::Avx512 => "avx512",
        }
    }
}

/// The vector kernels this CPU can run, best last.
pub fn available_vectors() -> Vec<Vector> {
    let f = features();
    let mut v = vec![Vector::Portable];
    // The kernels count kept keys with `popcnt` (without it, a count is a multiply-and-shift
    // sequence on the scan's critical path).
    if f.avx2 && f.popcnt {
        v.push(Vector::Avx2);
    }
    if f.avx512f && f.popcnt {
        v.push(Vector::Avx512);
    }
    v
}

/// The vector kernels in use: the best this CPU has, capped by `ZETA_SIMD` (`portable`,
/// `avx2`, `avx512`; other values: no cap). Read once per process (the scans ask per block of
/// keys, the value sums per row).
pub fn vector() -> Vector {
    static S: OnceLock<Vector> = OnceLock::new();
    *S.get_or_init(|| {
        let best = *available_vectors().last().unwrap_or(&Vector::Portable);
        let cap = match std::env::var("ZETA_SIMD").ok().as_deref().map(str::trim) {
            Some("portable") => Vector::Portable,
            Some("avx2") => Vector::Avx2,
            _ => Vector::Avx512,
        };
        best.min(cap)
    })
}

/// Rows per call of [`dist3_mask`].
pub const SCAN_BLOCK: usize = 64;

/// Squared distances of up to [`SCAN_BLOCK`] 3-D rows `coords` (x, y, z per row) to `q`
/// into `d2[..n]`, and the mask of the rows with `d2 <= bound` (bit j: row j).
///
/// Every d2 is `((0 + dx*dx) + dy*dy) + dz*dz` with `dx = q.x - x`, each operation rounded
/// on its own (no fused multiply-add), the order of [`crate::index::sq_dist`]: the AVX2
/// kernel and the portable loop give the same bits, and so the same neighbours.
#[inline]
pub fn dist3_mask(q: &[f32; 3], coords: &[f32], bound: f32, d2: &mut [f32; SCAN_BLOCK]) -> u64 {
    let n = coords.len() / 3;
    assert!(n <= SCAN_BLOCK && coords.len() == 3 * n);
    #[cfg(target_arch = "x86_64")]
    match vector() {
        // SAFETY: the CPU has AVX-512F (checked at run time by `vector`); the slices' bounds
        // are asserted above and inside.
        Vector::Avx512 => return unsafe { avx512::dist3_mask(q, coords, bound, d2) },
        // SAFETY: the CPU has AVX2 (checked at run time by `vector`); bounds as above.
        Vector::Avx2 => return unsafe { avx2::dist3_mask(q, coords, bound, d2) },
        Vector::Portable => {}
    }
    dist3_mask_portable(q, coords, bound, d2)
}

/// Extra slots [`dist3_keys`] may write past its last kept key (whole 8-key stores).
pub const KEYS_PAD: usize = 8;

/// The fused scan of the exact search's leaves and windows: for each 3-D row j of `coords`
/// (at most [`SCAN_BLOCK`], `entries[j]` its packed entry, the position in its low 32 bits),
/// the key `(d2 bits << 32) | position` of [`crate::quantize::Real::key`], kept when it is
/// below `thresh` and the position is at most `lim`; the kept keys go to `out` in row order
/// and their count is returned. `d2` is [`dist3_mask`]'s, bit for bit. None: no kernel on this
/// CPU (then use [`dist3_mask`] and a per-row push). `out` must hold `rows + KEYS_PAD` keys.
#[inline]
pub fn dist3_keys(
    q: &[f32; 3],
    coords: &[f32],
    entries: &[u64],
    lim: u32,
    thresh: u64,
    out: &mut [u64],
) -> Option<usize> {
    let n = coords.len() / 3;
    assert!(n <= SCAN_BLOCK && coords.len() == 3 * n && entries.len() == n);
    assert!(out.len() >= n + KEYS_PAD);
    #[cfg(target_arch = "x86_64")]
    if vector() == Vector::Avx512 {
        // SAFETY: the CPU has AVX-512F and POPCNT (checked at run time by `vector`); the
        // slices' bounds are asserted above.
        return Some(unsafe { avx512::dist3_keys(q, coords, entries, lim, thresh, out) });
    }
    #[cfg(target_arch = "x86_64")]
    if vector() == Vector::Avx2 {
        // SAFETY: the CPU has AVX2 and POPCNT (checked at run time by `vector`); bounds as
        // above.
        return Some(unsafe { avx2::dist3_keys(q, coords, entries, lim, thresh, out) });
    }
    None
}

/// How the row sums ([`axpy_rows_f32`] and its bf16 / f16 kinds) end:
/// `acc = (acc + s * mean) * scale` (`mean`: an extra row and its weight), the last steps of
/// the Cauchy-softmax value sum.
#[derive(Clone, Copy, Debug)]
pub struct RowsEnd<'a, T> {
    pub mean: Option<(T, &'a [T])>,
    pub scale: T,
}

/// A row-sum entry point: checks the rows, then the kernel [`vector`] chose (`$avx2_ok`: what
/// the AVX2 kernel needs beyond AVX2), else `$portable` (the per-row loop).
macro_rules! axpy_rows_dispatch {
    ($(#[$doc:meta])* $name:ident, $elem:ty, $portable:ident, $avx2_ok:expr) => {
        $(#[$doc])*
        pub fn $name(
            acc: &mut [f32],
            vals: &[$elem],
            rows: &[(f32, u32)],
            fresh: bool,
            end: Option<RowsEnd<'_, f32>>,
        ) {
            let dv = acc.len();
            for &(_, pos) in rows {
                let e = (pos as usize + 1).checked_mul(dv);
                assert!(e.is_some_and(|e| e <= vals.len()), "value row out of range");
            }
            if let Some(RowsEnd { mean: Some((_, m)), .. }) = end {
                assert!(m.len() >= dv, "mean row shorter than acc");
            }
            #[cfg(target_arch = "x86_64")]
            match vector() {
                // SAFETY: the CPU has AVX-512F (checked by `vector`); every row lies inside
                // `vals` and the mean row holds dv values (checked above).
                Vector::Avx512 => return unsafe { avx512::$name(acc, vals, rows, fresh, end) },
                // SAFETY: the CPU has AVX2 (checked by `vector`) and what `$avx2_ok` checks;
                // rows checked as above.
                Vector::Avx2 if $avx2_ok => {
                    return unsafe { avx2::$name(acc, vals, rows, fresh, end) }
                }
                _ => {}
            }
            axpy_rows_portable(acc, vals, dv, 0, rows, fresh, end, $portable);
        }
    };
}

axpy_rows_dispatch!(
    /// `acc = acc + s * vals[pos]` for each `(s, pos)` of `rows` in order (`vals` holds rows
    /// of `acc.len()` values), from `acc = 0` when `fresh` (its old values are then not
    /// read), then `end`'s steps: `acc += s * row` once per row and the end's products and
    /// sums, each rounded in this order, so the same bits as those loops. The vector kernels keep
    /// up to 64 values of `acc` in registers across all of it and store them once, instead of
    /// a store and a reload per row (a chain through store forwarding) and a reload of a fresh
    /// output row (a miss).
    axpy_rows_f32, f32, axpy_f32_portable, true
);
axpy_rows_dispatch!(
    /// [`axpy_rows_f32`] over bfloat16 value rows (widened exactly: a shift).
    axpy_rows_bf16, bf16, axpy_bf16_portable, true
);
axpy_rows_dispatch!(
    /// [`axpy_rows_f32`] over float16 value rows (widened exactly; the AVX2 kernel needs
    /// F16C).
    axpy_rows_f16, f16, axpy_f16_portable, features().f16c
);

/// The portable loop of the row sums over values `c0..` of `acc` (rows of `dv` values; also
/// the vector kernels' tail), `axpy` the per-row loop of the element type.
#[allow(clippy::too_many_arguments)]
fn axpy_rows_portable<E>(
    acc: &mut [f32],
    vals: &[E],
    dv: usize,
    c0: usize,
    rows: &[(f32, u32)],
    fresh: bool,
    end: Option<RowsEnd<'_, f32>>,
    axpy: fn(&mut [f32], &[E], f32),
) {
    let acc = &mut acc[c0..dv];
    if fresh {
        acc.fill(0.0);
    }
    for &(s, pos) in rows {
        let p = pos as usize * dv;
        axpy(acc, &vals[p + c0..p + dv], s);
    }
    if let Some(end) = end {
        if let Some((s, m)) = end.mean {
            axpy_f32_portable(acc, &m[c0..dv], s);
        }
        for a in acc.iter_mut() {
            *a *= end.scale;
        }
    }
}

/// `out[i]` = the dot product of row `rows[i]` of `vals` (rows of `x.len()` values) with `x`,
/// in 8 interleaved partial sums (lane l sums the products l, l + 8, ... in order, each product
/// and sum rounded; then the lanes are added in order to 0): the bits of
/// [`dot8_portable`] on every path. The AVX2 kernel (also taken on AVX-512 CPUs) does the 8
/// lanes in one register.
pub fn dots_f32(x: &[f32], vals: &[f32], rows: &[u32], out: &mut [f32]) {
    let dv = x.len();
    assert!(out.len() >= rows.len(), "out shorter than rows");
    for &pos in rows {
        let e = (pos as usize + 1).checked_mul(dv);
        assert!(e.is_some_and(|e| e <= vals.len()), "value row out of range");
    }
    #[cfg(target_arch = "x86_64")]
    if vector() != Vector::Portable && features().avx2 {
        // SAFETY: the CPU has AVX2 (checked); every row lies inside `vals` (checked above).
        return unsafe { avx2::dots_f32(x, vals, rows, out) };
    }
    for (o, &pos) in out.iter_mut().zip(rows) {
        let p = pos as usize * dv;
        *o = dot8_portable(&vals[p..p + dv], x);
    }
}

/// Dot product in 8 interleaved partial sums (lane l sums the products l, l + 8, ...; then
/// the lanes are added in order, from 0): the products vectorise and no chain of `n` dependent
/// additions serialises the sum. Perf note (the backward's query pass, which takes a dot of
/// each selected value row with dO; `zeta.attention(exact=True)`, N = 16k, H = 8, d_v = 64):
/// against one chain, 227-237 -> 193-205 ms on one thread, 125-128 -> 107-114 ms on two; the
/// AVX2 kernel of [`dots_f32`] against this loop (SSE on a baseline build), two threads,
/// 2026-12-01, a Zen 4 VM: 123-124 -> 107-114 ms for the whole backward.
#[inline]
pub fn dot8_portable<T: num_traits::Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    for (i, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i] = acc[i] + x * y;
    }
    acc.iter().fold(T::zero(), |s, &x| s + x)
}

/// `acc[i] += s * row[i]`: [`axpy_rows_f32`]'s loop per row (also the vector kernels' tail).
fn axpy_f32_portable(acc: &mut [f32], row: &[f32], s: f32) {
    for (a, &x) in acc.iter_mut().zip(row) {
        *a += s * x;
    }
}

/// The portable loop of [`axpy_rows_bf16`] per row (also the vector kernels' tail).
fn axpy_bf16_portable(acc: &mut [f32], row: &[bf16], s: f32) {
    for (a, &x) in acc.iter_mut().zip(row) {
        *a += s * x.to_f32();
    }
}

/// The portable loop of [`axpy_rows_f16`] per row: float16 -> float32 one value at a time is
/// a software conversion (or a feature check per value); `half` converts a slice with F16C
/// where the CPU has it (one check per call), into a block on the stack.
fn axpy_f16_portable(acc: &mut [f32], row: &[f16], s: f32) {
    use half::slice::HalfFloatSliceExt;
    let mut buf = [0.0f32; 64];
    for (src, dst) in row.chunks(64).zip(acc.chunks_mut(64)) {
        let b = &mut buf[..src.len()];
        src.convert_to_f32_slice(b);
        for (a, &x) in dst.iter_mut().zip(b.iter()) {
            *a += s * x;
        }
    }
}

/// One row-sum kernel ([`axpy_rows_f32`]): `$blocks` registers of `$lanes` values of `acc`
/// (`$widen` loads a block of a row from `$p` as floats) summed over all the rows, the end's
/// steps, one store; then single registers over what is left of `acc`, then the portable loop
/// (`$tail`, the element's per-row loop) for the last `< $lanes` values.
#[cfg(target_arch = "x86_64")]
macro_rules! axpy_rows_kernel {
    ($(#[$doc:meta])* $name:ident, $elem:ty, $feat:literal, $lanes:literal, $blocks:literal,
     [$vt:ty, $zero:ident, $set1:ident, $load:ident, $store:ident, $add:ident, $mul:ident],
     |$p:ident| $widen:expr, $tail:path) => {
        $(#[$doc])*
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            acc: &mut [f32],
            vals: &[$elem],
            rows: &[(f32, u32)],
            fresh: bool,
            end: Option<super::RowsEnd<'_, f32>>,
        ) {
            let dv = acc.len();
            let mut c0 = 0;
            // `$nb` registers from value c0 on. SAFETY (of every load and store): c0 + $nb *
            // $lanes <= dv, the length of `acc`, of each row (inside `vals`) and of the mean
            // row (both checked by the caller).
            macro_rules! chunk {
                ($nb:literal) => {{
                    let pa = acc.as_mut_ptr().add(c0);
                    let mut a: [$vt; $nb] = [$zero(); $nb];
                    if !fresh {
                        for (i, ai) in a.iter_mut().enumerate() {
                            *ai = $load(pa.add($lanes * i));
                        }
                    }
                    for &(s, pos) in rows {
                        let sv = $set1(s);
                        let pr = vals.as_ptr().add(pos as usize * dv + c0);
                        for (i, ai) in a.iter_mut().enumerate() {
                            let $p = pr.add($lanes * i);
                            *ai = $add(*ai, $mul(sv, $widen));
                        }
                    }
                    if let Some(end) = end {
                        if let Some((s, mr)) = end.mean {
                            let sv = $set1(s);
                            for (i, ai) in a.iter_mut().enumerate() {
                                let x = $load(mr.as_ptr().add(c0 + $lanes * i));
                                *ai = $add(*ai, $mul(sv, x));
                            }
                        }
                        let sc = $set1(end.scale);
                        for ai in a.iter_mut() {
                            *ai = $mul(*ai, sc);
                        }
                    }
                    for (i, ai) in a.iter().enumerate() {
                        $store(pa.add($lanes * i), *ai);
                    }
                    c0 += $nb * $lanes;
                }};
            }
            while c0 + $blocks * $lanes <= dv {
                chunk!($blocks);
            }
            while c0 + $lanes <= dv {
                chunk!(1);
            }
            if c0 < dv {
                super::axpy_rows_portable(acc, vals, dv, c0, rows, fresh, end, $tail);
            }
        }
    };
}

/// The portable loop of [`dist3_mask`].
#[inline]
pub fn dist3_mask_portable(
    q: &[f32; 3],
    coords: &[f32],
    bound: f32,
    d2: &mut [f32; SCAN_BLOCK],
) -> u64 {
    dist3_rows(q, coords, bound, d2, 0)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::SCAN_BLOCK;
    use std::arch::x86_64::*;

    /// [`super::dist3_mask`] with AVX2: 8 rows at a time, de-interleaved with shuffles.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dist3_mask(
        q: &[f32; 3],
        coords: &[f32],
        bound: f32,
        d2: &mut [f32; SCAN_BLOCK],
    ) -> u64 {
        let n = coords.len() / 3;
        assert!(n <= SCAN_BLOCK);
        let (qx, qy, qz) = (
            _mm256_set1_ps(q[0]),
            _mm256_set1_ps(q[1]),
            _mm256_set1_ps(q[2]),
        );
        let b = _mm256_set1_ps(bound);
        let mut m = 0u64;
        let mut j = 0;
        while j + 8 <= n {
            let p = coords.as_ptr().add(3 * j);
            // SAFETY (of the loads): rows j..j+8 are 24 floats inside `coords` (j + 8 <= n).
            let lo0 = _mm_loadu_ps(p); // x0 y0 z0 x1
            let lo1 = _mm_loadu_ps(p.add(4)); // y1 z1 x2 y2
            let lo2 = _mm_loadu_ps(p.add(8)); // z2 x3 y3 z3
            let m03 =
                _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo0), _mm_loadu_ps(p.add(12)));
            let m14 =
                _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo1), _mm_loadu_ps(p.add(16)));
            let m25 =
                _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo2), _mm_loadu_ps(p.add(20)));
            // per 128-bit lane (rows r..r+4: a = x0 y0 z0 x1, b = y1 z1 x2 y2, c = z2 x3 y3 z3)
            let xy = _mm256_shuffle_ps::<0b10_01_11_10>(m14, m25); // x2 y2 x3 y3
            let yz = _mm256_shuffle_ps::<0b01_00_10_01>(m03, m14); // y0 z0 y1 z1
            let x = _mm256_shuffle_ps::<0b10_00_11_00>(m03, xy); // x0 x1 x2 x3
            let y = _mm256_shuffle_ps::<0b11_01_10_00>(yz, xy); // y0 y1 y2 y3
            let z = _mm256_shuffle_ps::<0b11_00_11_01>(yz, m25); // z0 z1 z2 z3
            let dx = _mm256_sub_ps(qx, x);
            let dy = _mm256_sub_ps(qy, y);
            let dz = _mm256_sub_ps(qz, z);
            let s = _mm256_add_ps(
                _mm256_add_ps(_mm256_mul_ps(dx, dx), _mm256_mul_ps(dy, dy)),
                _mm256_mul_ps(dz, dz),
            );
            _mm256_storeu_ps(d2.as_mut_ptr().add(j), s);
            let k = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(s, b)) as u32 as u64;
            m |= k << j;
            j += 8;
        }
        if j < n {
            m |= super::dist3_rows(q, &coords[3 * j..], bound, d2, j);
        }
        m
    }

    /// Lane indices (32-bit) of `_mm256_permutevar8x32_epi32` that move the 64-bit lanes set
    /// in a 4-bit mask to the front, in order: the compress AVX2 lacks.
    const COMPRESS4: [[i32; 8]; 16] = {
        let mut t = [[0i32; 8]; 16];
        let mut m = 0;
        while m < 16 {
            let mut o = 0;
            let mut l = 0usize;
            while l < 4 {
                if m >> l & 1 == 1 {
                    t[m][2 * o] = (2 * l) as i32;
                    t[m][2 * o + 1] = (2 * l + 1) as i32;
                    o += 1;
                }
                l += 1;
            }
            m += 1;
        }
        t
    };

    /// [`super::dist3_keys`] with AVX2: [`dist3_mask`] with the threshold's distance as the
    /// bound, then the keys of each 4 rows with a row under the bound built, compared and
    /// compressed in registers (a table of lane permutes).
    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn dist3_keys(
        q: &[f32; 3],
        coords: &[f32],
        entries: &[u64],
        lim: u32,
        thresh: u64,
        out: &mut [u64],
    ) -> usize {
        let n = coords.len() / 3;
        assert!(n <= SCAN_BLOCK && entries.len() == n && out.len() >= n + super::KEYS_PAD);
        let bound = if thresh == u64::MAX {
            f32::INFINITY
        } else {
            f32::from_bits((thresh >> 32) as u32)
        };
        let mut d2 = [0f32; SCAN_BLOCK];
        // Rows with d2 <= bound: a superset of the rows whose key is below `thresh`.
        let mut m = dist3_mask(q, coords, bound, &mut d2);
        let sign = _mm256_set1_epi64x(i64::MIN);
        let low = _mm256_set1_epi64x(0xFFFF_FFFF);
        let th = _mm256_xor_si256(_mm256_set1_epi64x(thresh as i64), sign);
        let lm = _mm256_set1_epi64x(lim as i64);
        let o = out.as_mut_ptr();
        let mut kept = 0usize;
        while m != 0 {
            let g = (m.trailing_zeros() & !3) as usize;
            let bits = (m >> g) as u32 & 15;
            m &= !(15u64 << g);
            // Rows past n have no bit in `m` (dist3_mask's mask): load only the rows with one.
            let lanes = _mm256_set_epi64x(
                -i64::from(bits >> 3 & 1),
                -i64::from(bits >> 2 & 1),
                -i64::from(bits >> 1 & 1),
                -i64::from(bits & 1),
            );
            // SAFETY: a masked load reads only lanes whose row is below n (their bit is in
            // `m`); the pointer is formed with `wrapping_add`. d2 lanes g..g + 4 lie inside
            // the array (g is a multiple of 4 below SCAN_BLOCK).
            let e = _mm256_maskload_epi64(entries.as_ptr().wrapping_add(g) as *const i64, lanes);
            let pos = _mm256_and_si256(e, low);
            let d = _mm_loadu_si128(d2.as_ptr().add(g) as *const __m128i);
            let key = _mm256_or_si256(_mm256_slli_epi64::<32>(_mm256_cvtepu32_epi64(d)), pos);
            // key < thresh (unsigned: both with the sign bit flipped), pos <= lim (both
            // below 2^32: a signed compare).
            let below = _mm256_cmpgt_epi64(th, _mm256_xor_si256(key, sign));
            let over = _mm256_cmpgt_epi64(pos, lm);
            let ok = _mm256_and_si256(_mm256_andnot_si256(over, below), lanes);
            let k = _mm256_movemask_pd(_mm256_castsi256_pd(ok)) as usize;
            let perm = _mm256_loadu_si256(COMPRESS4[k].as_ptr() as *const __m256i);
            // SAFETY: kept <= g rows so far, so slots kept .. kept + 4 lie within `out`
            // (out.len() >= n + KEYS_PAD).
            _mm256_storeu_si256(
                o.add(kept) as *mut __m256i,
                _mm256_permutevar8x32_epi32(key, perm),
            );
            kept += k.count_ones() as usize;
        }
        kept
    }

    axpy_rows_kernel!(
        /// [`super::axpy_rows_f32`]: 64 values of `acc` in eight registers.
        axpy_rows_f32, f32, "avx2", 8, 8,
        [__m256, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps,
         _mm256_add_ps, _mm256_mul_ps],
        |p| _mm256_loadu_ps(p),
        super::axpy_f32_portable
    );
    axpy_rows_kernel!(
        /// [`super::axpy_rows_bf16`]: 64 values of `acc` in eight registers.
        axpy_rows_bf16, super::bf16, "avx2", 8, 8,
        [__m256, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps,
         _mm256_add_ps, _mm256_mul_ps],
        |p| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p as *const __m128i)
        ))),
        super::axpy_bf16_portable
    );
    axpy_rows_kernel!(
        /// [`super::axpy_rows_f16`]: 64 values of `acc` in eight registers (F16C).
        axpy_rows_f16, super::f16, "avx2,f16c", 8, 8,
        [__m256, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps,
         _mm256_add_ps, _mm256_mul_ps],
        |p| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        super::axpy_f16_portable
    );

    /// [`super::dots_f32`]: the 8 partial sums of a row in one register.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dots_f32(x: &[f32], vals: &[f32], rows: &[u32], out: &mut [f32]) {
        let dv = x.len();
        let full = dv / 8 * 8;
        for (o, &pos) in out.iter_mut().zip(rows) {
            let row = &vals[pos as usize * dv..][..dv];
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < full {
                // SAFETY: c + 8 <= full <= dv, the length of `row` and of `x`.
                let v = _mm256_loadu_ps(row.as_ptr().add(c));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(v, _mm256_loadu_ps(x.as_ptr().add(c))));
                c += 8;
            }
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            for (l, (&v, &y)) in lanes.iter_mut().zip(row[full..].iter().zip(&x[full..])) {
                *l += v * y;
            }
            *o = lanes.iter().fold(0.0f32, |s, &l| s + l);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::SCAN_BLOCK;
    use std::arch::x86_64::*;

    /// Lane j of `perm(a, b)` for the rows' de-interleave: 16 rows (x, y, z) are 48 floats in
    /// three registers a, b, c; coordinate `c0` of row r is float 3r + c0.
    const fn idx_ab(c0: usize) -> [i32; 16] {
        // lanes of rows whose coordinate lies in a or b (float < 32), their float index
        let mut v = [0i32; 16];
        let mut r = 0;
        while r < 16 {
            let f = 3 * r + c0;
            v[r] = if f < 32 { f as i32 } else { 0 };
            r += 1;
        }
        v
    }
    const fn idx_c(c0: usize) -> [i32; 16] {
        // keep the lanes from a/b (0..16 of the first source), take the rest from c
        let mut v = [0i32; 16];
        let mut r = 0;
        while r < 16 {
            let f = 3 * r + c0;
            v[r] = if f < 32 {
                r as i32
            } else {
                (f - 32 + 16) as i32
            };
            r += 1;
        }
        v
    }

    #[inline(always)]
    unsafe fn coord(a: __m512, b: __m512, c: __m512, iab: &[i32; 16], ic: &[i32; 16]) -> __m512 {
        // SAFETY (of the index loads): both arrays are 16 i32 (64 bytes).
        let ab = _mm512_permutex2var_ps(a, _mm512_loadu_si512(iab.as_ptr() as *const _), b);
        _mm512_permutex2var_ps(ab, _mm512_loadu_si512(ic.as_ptr() as *const _), c)
    }

    /// The squared distances of the `r <= 16` rows at `p` (x, y, z each) to `(qx, qy, qz)`,
    /// lane j for row j (lanes past `r`: of zero rows), as [`super::dist3_mask`] computes
    /// them.
    ///
    /// SAFETY: floats `p .. p + 3r` must be readable; a masked load reads only those, and
    /// the pointers past them are formed with `wrapping_add` (never an out-of-bounds offset).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dist_rows(q: (__m512, __m512, __m512), p: *const f32, r: usize) -> __m512 {
        let lanes = |from: usize| ((1u32 << (3 * r).saturating_sub(from).min(16)) - 1) as __mmask16;
        dist_regs(
            q,
            _mm512_maskz_loadu_ps(lanes(0), p),
            _mm512_maskz_loadu_ps(lanes(16), p.wrapping_add(16)),
            _mm512_maskz_loadu_ps(lanes(32), p.wrapping_add(32)),
        )
    }

    /// The squared distances of the 16 rows held in `a, b, c` (48 floats, x y z per row) to
    /// `q`, lane j for row j, as [`super::dist3_mask`] computes them.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dist_regs(q: (__m512, __m512, __m512), a: __m512, b: __m512, c: __m512) -> __m512 {
        const IX: ([i32; 16], [i32; 16]) = (idx_ab(0), idx_c(0));
        const IY: ([i32; 16], [i32; 16]) = (idx_ab(1), idx_c(1));
        const IZ: ([i32; 16], [i32; 16]) = (idx_ab(2), idx_c(2));
        let dx = _mm512_sub_ps(q.0, coord(a, b, c, &IX.0, &IX.1));
        let dy = _mm512_sub_ps(q.1, coord(a, b, c, &IY.0, &IY.1));
        let dz = _mm512_sub_ps(q.2, coord(a, b, c, &IZ.0, &IZ.1));
        _mm512_add_ps(
            _mm512_add_ps(_mm512_mul_ps(dx, dx), _mm512_mul_ps(dy, dy)),
            _mm512_mul_ps(dz, dz),
        )
    }

    /// The squared distances of the 16 rows at `p` to `(qx, qy, qz)`, lane j for row j: the
    /// operations of [`dist_rows`] on plain loads.
    ///
    /// SAFETY: floats `p .. p + 48` must be readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dist16(q: (__m512, __m512, __m512), p: *const f32) -> __m512 {
        dist_regs(
            q,
            _mm512_loadu_ps(p),
            _mm512_loadu_ps(p.add(16)),
            _mm512_loadu_ps(p.add(32)),
        )
    }

    /// [`super::dist3_mask`] with AVX-512: 16 rows at a time, de-interleaved by two
    /// two-source permutes per coordinate; the last < 16 rows the same way on masked loads.
    /// Perf note (`zeta.attention` at N = 32k, H = 8, top-32; 2026-12-01, a Zen 4 VM, best of
    /// 5, three interleaved rounds): the exact search scans leaves and window pieces of any
    /// length, whose last rows went through the scalar loop; on masked loads 282-286 ->
    /// 277-281 ms.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dist3_mask(
        q: &[f32; 3],
        coords: &[f32],
        bound: f32,
        d2: &mut [f32; SCAN_BLOCK],
    ) -> u64 {
        let n = coords.len() / 3;
        assert!(n <= SCAN_BLOCK);
        let (qx, qy, qz) = (
            _mm512_set1_ps(q[0]),
            _mm512_set1_ps(q[1]),
            _mm512_set1_ps(q[2]),
        );
        let b = _mm512_set1_ps(bound);
        let mut m = 0u64;
        let mut j = 0;
        while j + 16 <= n {
            // SAFETY: rows j..j+16 are 48 floats inside `coords` (j + 16 <= n).
            let s = dist16((qx, qy, qz), coords.as_ptr().add(3 * j));
            _mm512_storeu_ps(d2.as_mut_ptr().add(j), s);
            let k = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(s, b) as u64;
            m |= k << j;
            j += 16;
        }
        if j < n {
            // The last r < 16 rows: the same steps on masked loads (3r floats; lanes past
            // them read as 0 and are dropped from the mask). Their d2 lanes are stored too:
            // j + 16 <= SCAN_BLOCK, since j is a multiple of 16 below n <= SCAN_BLOCK.
            let r = n - j;
            // SAFETY: floats 3j .. 3n lie inside `coords`.
            let s = dist_rows((qx, qy, qz), coords.as_ptr().add(3 * j), r);
            // SAFETY: d2 lanes j..j + 16 <= SCAN_BLOCK (above).
            _mm512_storeu_ps(d2.as_mut_ptr().add(j), s);
            let k = (_mm512_cmp_ps_mask::<_CMP_LE_OQ>(s, b) as u64) & ((1u64 << r) - 1);
            m |= k << j;
        }
        m
    }

    /// [`super::dist3_keys`] with AVX-512: the distances as in [`dist3_mask`], 16 rows at a
    /// time, then their keys built, compared and compressed 8 at a time in registers (no d2
    /// array, no per-row loop over a mask).
    ///
    /// Perf notes (grouped exact search, `exact_timing` with `ZETA_EXACT_TIMING=64:192`,
    /// N = 64k, top-32; 2026-12-03, a Zen 5 VM, six interleaved runs of three test binaries,
    /// best 1.088 / 1.021 / 0.976 us per query):
    /// - compiled with POPCNT: without it the count of kept keys (the next store's address)
    ///   was a multiply-and-shift sequence after each compress, the kernel's top samples;
    /// - whole blocks of 16 rows on plain loads ([`dist16`]) instead of masked loads whose
    ///   masks are computed per block.
    ///
    /// `zeta.attention` at N = 32k, H = 8 (both in one process, 12 calls each, two orders):
    /// best 194.7 / 199.7 -> 183.0 / 183.8 ms. Not kept: skipping the entries (or a whole
    /// block) of rows whose d2 is above the threshold's (1.12 -> 1.17-1.30 us: the branch
    /// mispredicts; the masked loads alone saved nothing).
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn dist3_keys(
        q: &[f32; 3],
        coords: &[f32],
        entries: &[u64],
        lim: u32,
        thresh: u64,
        out: &mut [u64],
    ) -> usize {
        let n = coords.len() / 3;
        assert!(n <= SCAN_BLOCK && entries.len() == n && out.len() >= n + super::KEYS_PAD);
        let (qx, qy, qz) = (
            _mm512_set1_ps(q[0]),
            _mm512_set1_ps(q[1]),
            _mm512_set1_ps(q[2]),
        );
        let low = _mm512_set1_epi64(0xFFFF_FFFF);
        let th = _mm512_set1_epi64(thresh as i64);
        let lm = _mm512_set1_epi64(lim as i64);
        let o = out.as_mut_ptr();
        let mut kept = 0usize;
        let mut j = 0;
        while j < n {
            let r = (n - j).min(16);
            let p = coords.as_ptr().add(3 * j);
            // SAFETY: floats 3j .. 3(j + r) lie inside `coords` (plain loads when r = 16).
            let s = _mm512_castps_si512(if r == 16 {
                dist16((qx, qy, qz), p)
            } else {
                dist_rows((qx, qy, qz), p, r)
            });
            for h in 0..2 {
                let c = r.saturating_sub(8 * h).min(8);
                if c == 0 {
                    break;
                }
                let valid = ((1u32 << c) - 1) as __mmask8;
                // SAFETY: a masked load reads entries j + 8h .. j + 8h + c, inside `entries`
                // (c <= n - j - 8h); the pointer is formed with `wrapping_add`.
                let e = _mm512_maskz_loadu_epi64(
                    valid,
                    entries.as_ptr().wrapping_add(j + 8 * h) as *const _,
                );
                let pos = _mm512_and_si512(e, low);
                let half = if h == 0 {
                    _mm512_castsi512_si256(s)
                } else {
                    _mm512_extracti64x4_epi64::<1>(s)
                };
                let key =
                    _mm512_or_si512(_mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(half)), pos);
                let k = _mm512_mask_cmplt_epu64_mask(valid, key, th);
                let k = _mm512_mask_cmple_epu64_mask(k, pos, lm);
                // SAFETY: kept <= j + 8h rows so far, so slots kept .. kept + 8 lie within
                // `out` (out.len() >= n + KEYS_PAD, asserted above).
                _mm512_storeu_si512(o.add(kept) as *mut _, _mm512_maskz_compress_epi64(k, key));
                kept += k.count_ones() as usize;
            }
            j += 16;
        }
        kept
    }

    axpy_rows_kernel!(
        /// [`super::axpy_rows_f32`]: 64 values of `acc` in four registers.
        axpy_rows_f32, f32, "avx512f", 16, 4,
        [__m512, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
         _mm512_add_ps, _mm512_mul_ps],
        |p| _mm512_loadu_ps(p),
        super::axpy_f32_portable
    );
    axpy_rows_kernel!(
        /// [`super::axpy_rows_bf16`]: 64 values of `acc` in four registers.
        axpy_rows_bf16, super::bf16, "avx512f", 16, 4,
        [__m512, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
         _mm512_add_ps, _mm512_mul_ps],
        |p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p as *const __m256i)
        ))),
        super::axpy_bf16_portable
    );
    axpy_rows_kernel!(
        /// [`super::axpy_rows_f16`]: 64 values of `acc` in four registers.
        axpy_rows_f16, super::f16, "avx512f", 16, 4,
        [__m512, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
         _mm512_add_ps, _mm512_mul_ps],
        |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        super::axpy_f16_portable
    );
}

/// The rows `rows` (3-D) as rows `at..` of a block: their d2 into `d2[at..]`, their mask bits
/// shifted to `at`.
#[inline]
fn dist3_rows(
    q: &[f32; 3],
    rows: &[f32],
    bound: f32,
    d2: &mut [f32; SCAN_BLOCK],
    at: usize,
) -> u64 {
    let mut m = 0u64;
    for (j, c) in rows.chunks_exact(3).enumerate() {
        let s = crate::index::sq_dist(q, c);
        d2[at + j] = s;
        m |= u64::from(s <= bound) << (at + j);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::lcg;

    /// The AVX2 and AVX-512 kernels (where the CPU has them; AVX-512's last rows on masked
    /// loads) and the portable loop give the same distance bits and masks as
    /// `index::sq_dist`, for every block length, scale and bound.
    #[test]
    fn dist3_mask_paths_agree_bit_for_bit() {
        let mut s = 11u64;
        for &scale in &[1.0f32, 1e-20, 1e19, 3e38] {
            for n in 0..=SCAN_BLOCK {
                let c: Vec<f32> = (0..3 * n).map(|_| lcg(&mut s) * scale).collect();
                let q = [
                    lcg(&mut s) * scale,
                    lcg(&mut s) * scale,
                    lcg(&mut s) * scale,
                ];
                for &bound in &[f32::INFINITY, 0.0, scale * scale, f32::MAX] {
                    let mut dp = [f32::NAN; SCAN_BLOCK];
                    let mp = dist3_mask_portable(&q, &c, bound, &mut dp);
                    for j in 0..n {
                        let want = crate::index::sq_dist(&q, &c[3 * j..3 * j + 3]);
                        assert_eq!(dp[j].to_bits(), want.to_bits(), "n={n} j={j}");
                        assert_eq!(mp >> j & 1 == 1, want <= bound);
                    }
                    assert_eq!(mp >> n.min(63) >> usize::from(n == 64), 0);
                    #[cfg(target_arch = "x86_64")]
                    if features().avx2 {
                        let mut da = [f32::NAN; SCAN_BLOCK];
                        // SAFETY: the CPU has AVX2 (checked just above).
                        let ma = unsafe { avx2::dist3_mask(&q, &c, bound, &mut da) };
                        assert_eq!(ma, mp, "n={n} scale={scale} bound={bound}");
                        for j in 0..n {
                            assert_eq!(da[j].to_bits(), dp[j].to_bits(), "n={n} j={j}");
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    if features().avx512f {
                        let mut da = [f32::NAN; SCAN_BLOCK];
                        // SAFETY: the CPU has AVX-512F (checked just above).
                        let ma = unsafe { avx512::dist3_mask(&q, &c, bound, &mut da) };
                        assert_eq!(ma, mp, "avx512 n={n} scale={scale} bound={bound}");
                        for j in 0..n {
                            assert_eq!(da[j].to_bits(), dp[j].to_bits(), "avx512 n={n} j={j}");
                        }
                    }
                    assert_eq!(dist3_mask(&q, &c, bound, &mut dp), mp);
                }
            }
        }
    }

    /// The fused key scan keeps exactly the rows whose key `(sq_dist bits << 32) | pos` is
    /// below the threshold and whose position is at most the limit, in row order, for every
    /// block length (its 8-key stores past the kept keys stay inside the padding), scale,
    /// threshold and limit; positions come from the low 32 bits of the entries. Coordinates
    /// are finite, as the index's are (at 1e38 the differences overflow to +inf: never NaN).
    #[test]
    fn dist3_keys_matches_the_per_row_keys() {
        let mut s = 5u64;
        for &scale in &[1.0f32, 1e-20, 1e19, 1e38] {
            for n in 0..=SCAN_BLOCK {
                let c: Vec<f32> = (0..3 * n).map(|_| lcg(&mut s) * scale).collect();
                let q = [
                    lcg(&mut s) * scale,
                    lcg(&mut s) * scale,
                    lcg(&mut s) * scale,
                ];
                let entries: Vec<u64> = (0..n)
                    .map(|j| {
                        let code = (lcg(&mut s).abs() * 4e9) as u64;
                        code << 32 | (j as u64 * 7919 % 1000) // positions out of order
                    })
                    .collect();
                let keys: Vec<u64> = (0..n)
                    .map(|j| {
                        let d = crate::index::sq_dist(&q, &c[3 * j..3 * j + 3]);
                        (d.to_bits() as u64) << 32 | (entries[j] & 0xFFFF_FFFF)
                    })
                    .collect();
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                let mid = sorted.get(n / 2).copied().unwrap_or(0);
                for &thresh in &[u64::MAX, 0, mid, mid + 1] {
                    for &lim in &[u32::MAX, 0, 500] {
                        let want: Vec<u64> = keys
                            .iter()
                            .copied()
                            .filter(|&k| k < thresh && (k & 0xFFFF_FFFF) as u32 <= lim)
                            .collect();
                        // Each kernel into a buffer one slot longer than it may write.
                        let run = |name: &str, f: &dyn Fn(&mut [u64]) -> Option<usize>| {
                            let mut out = vec![7u64; n + KEYS_PAD + 1];
                            if let Some(got) = f(&mut out[..n + KEYS_PAD]) {
                                assert_eq!(&out[..got], &want[..], "{name} n={n} scale={scale}");
                                assert_eq!(out[n + KEYS_PAD], 7, "{name} wrote past its padding");
                                return true;
                            }
                            false
                        };
                        let args = (&q, &c[..], &entries[..]);
                        let any = run("dispatch", &|o| {
                            dist3_keys(args.0, args.1, args.2, lim, thresh, o)
                        });
                        assert_eq!(any, vector() != Vector::Portable);
                        #[cfg(target_arch = "x86_64")]
                        if features().avx2 && features().popcnt {
                            // SAFETY: the CPU has AVX2 and POPCNT (checked just above).
                            run("avx2", &|o| {
                                Some(unsafe {
                                    avx2::dist3_keys(args.0, args.1, args.2, lim, thresh, o)
                                })
                            });
                        }
                        #[cfg(target_arch = "x86_64")]
                        if features().avx512f && features().popcnt {
                            // SAFETY: the CPU has AVX-512F and POPCNT (checked just above).
                            run("avx512", &|o| {
                                Some(unsafe {
                                    avx512::dist3_keys(args.0, args.1, args.2, lim, thresh, o)
                                })
                            });
                        }
                    }
                }
            }
        }
    }

    /// The row-sum kernels give the bits of the loop they replace (one `acc + s * x` per row
    /// in order, then the mean row and the scale), fresh or not, for every width (register
    /// chunks, single registers and the portable tail), f32, bf16 and f16 rows.
    #[test]
    fn axpy_rows_paths_agree_bit_for_bit() {
        let mut s = 11u64;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for dv in (0..=70usize).chain([127, 128, 129, 192, 200]) {
            let n_rows = 9;
            let vals: Vec<f32> = (0..n_rows * dv).map(|_| lcg(&mut s) * 1e3).collect();
            let vb: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
            let vh: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x / 1e3)).collect();
            let mean: Vec<f32> = (0..dv).map(|_| lcg(&mut s)).collect();
            let rows: Vec<(f32, u32)> = (0..7)
                .map(|i| (lcg(&mut s), (i * 5 % n_rows) as u32))
                .collect();
            let acc0: Vec<f32> = (0..dv).map(|_| lcg(&mut s)).collect();
            for fresh in [false, true] {
                for end in [
                    None,
                    Some(RowsEnd {
                        mean: None,
                        scale: 0.37,
                    }),
                    Some(RowsEnd {
                        mean: Some((1.7f32, &mean[..])),
                        scale: 3.1,
                    }),
                ] {
                    // The loop, over rows already widened to f32.
                    let want = |v: &[f32]| {
                        let mut w = if fresh {
                            vec![0.0f32; dv]
                        } else {
                            acc0.clone()
                        };
                        for &(c, p) in &rows {
                            for (a, &x) in w.iter_mut().zip(&v[p as usize * dv..]) {
                                *a += c * x;
                            }
                        }
                        if let Some(e) = end {
                            if let Some((c, m)) = e.mean {
                                for (a, &x) in w.iter_mut().zip(m) {
                                    *a += c * x;
                                }
                            }
                            for a in w.iter_mut() {
                                *a *= e.scale;
                            }
                        }
                        bits(&w)
                    };
                    let wf = want(&vals);
                    let wb = want(&vb.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
                    let wh = want(&vh.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
                    let run = |k: &dyn Fn(&mut [f32])| {
                        let mut got = acc0.clone();
                        k(&mut got);
                        bits(&got)
                    };
                    let (f, b, h) = (
                        run(&|g| axpy_rows_f32(g, &vals, &rows, fresh, end)),
                        run(&|g| axpy_rows_bf16(g, &vb, &rows, fresh, end)),
                        run(&|g| axpy_rows_f16(g, &vh, &rows, fresh, end)),
                    );
                    assert_eq!((f, b, h), (wf.clone(), wb.clone(), wh.clone()), "dv={dv}");
                    let p = run(&|g| {
                        axpy_rows_portable(g, &vals, dv, 0, &rows, fresh, end, axpy_f32_portable)
                    });
                    assert_eq!(p, wf, "portable dv={dv}");
                    #[cfg(target_arch = "x86_64")]
                    for v in available_vectors() {
                        // SAFETY (of every call below): the CPU has the vector's features
                        // (available_vectors; F16C checked); rows in range.
                        let got = match v {
                            Vector::Portable => continue,
                            Vector::Avx2 => unsafe {
                                (
                                    run(&|g| avx2::axpy_rows_f32(g, &vals, &rows, fresh, end)),
                                    run(&|g| avx2::axpy_rows_bf16(g, &vb, &rows, fresh, end)),
                                    if features().f16c {
                                        run(&|g| avx2::axpy_rows_f16(g, &vh, &rows, fresh, end))
                                    } else {
                                        wh.clone()
                                    },
                                )
                            },
                            Vector::Avx512 => unsafe {
                                (
                                    run(&|g| avx512::axpy_rows_f32(g, &vals, &rows, fresh, end)),
                                    run(&|g| avx512::axpy_rows_bf16(g, &vb, &rows, fresh, end)),
                                    run(&|g| avx512::axpy_rows_f16(g, &vh, &rows, fresh, end)),
                                )
                            },
                        };
                        assert_eq!(
                            got,
                            (wf.clone(), wb.clone(), wh.clone()),
                            "{} dv={dv}",
                            v.name()
                        );
                    }
                }
            }
        }
    }

    /// The dot kernel gives the portable 8-lane dot's bits for every width.
    #[test]
    fn dots_paths_agree_bit_for_bit() {
        let mut s = 17u64;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for dv in (0..=70usize).chain([128, 131]) {
            let vals: Vec<f32> = (0..6 * dv).map(|_| lcg(&mut s) * 1e3).collect();
            let x: Vec<f32> = (0..dv).map(|_| lcg(&mut s)).collect();
            let rows = [5u32, 0, 3, 3, 1];
            let want: Vec<f32> = rows
                .iter()
                .map(|&r| dot8_portable(&vals[r as usize * dv..(r as usize + 1) * dv], &x))
                .collect();
            let mut got = vec![0.0f32; rows.len()];
            dots_f32(&x, &vals, &rows, &mut got);
            assert_eq!(bits(&got), bits(&want), "dispatched dv={dv}");
            #[cfg(target_arch = "x86_64")]
            if features().avx2 {
                let mut got = vec![0.0f32; rows.len()];
                // SAFETY: the CPU has AVX2; rows in range.
                unsafe { avx2::dots_f32(&x, &vals, &rows, &mut got) };
                assert_eq!(bits(&got), bits(&want), "avx2 dv={dv}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "value row out of range")]
    fn axpy_rows_rejects_a_row_outside_the_values() {
        let mut acc = [0.0f32; 4];
        axpy_rows_f32(&mut acc, &[1.0; 8], &[(1.0, 2)], true, None);
    }

    /// The bfloat16 / float16 per-row loops (the row kernels' tails and their portable path;
    /// the kernels themselves: `axpy_rows_paths_agree_bit_for_bit`) widen exactly, for every
    /// length.
    #[test]
    fn half_row_loops_widen_exactly() {
        let mut s = 5u64;
        for n in 0..=70usize {
            for &scale in &[1.0f32, 1e-30, 1e30] {
                let row: Vec<f32> = (0..n).map(|_| lcg(&mut s) * scale).collect();
                let rb: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
                let rh: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
                let acc0: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
                let w = lcg(&mut s) * 3.0;
                let want = |r: &[f32]| -> Vec<u32> {
                    acc0.iter()
                        .zip(r)
                        .map(|(&a, &x)| (a + w * x).to_bits())
                        .collect()
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let mut got = acc0.clone();
                axpy_bf16_portable(&mut got, &rb, w);
                let wb: Vec<f32> = rb.iter().map(|x| x.to_f32()).collect();
                assert_eq!(bits(&got), want(&wb), "bf16 n={n}");
                let mut got = acc0.clone();
                axpy_f16_portable(&mut got, &rh, w);
                let wh: Vec<f32> = rh.iter().map(|x| x.to_f32()).collect();
                assert_eq!(bits(&got), want(&wh), "f16 n={n}");
            }
        }
    }
}
