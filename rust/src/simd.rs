//! Runtime CPU feature detection and the `ZETA_SIMD` override.
//!
//! `ZETA_SIMD=portable` forces the plain-Rust paths (what a baseline x86-64 wheel runs on a
//! CPU without AVX2); `ZETA_SIMD=avx2` / `bmi2` ask for one path if the CPU has it.
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

/// Whether the distance scans use their AVX2 kernel: the CPU has AVX2 and `ZETA_SIMD` does
/// not ask for the portable paths. Read once (the scans ask per block of keys).
pub fn scan_avx2() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| features().avx2 && selected() != Path::Portable)
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
    if scan_avx2() {
        // SAFETY: the CPU has AVX2 (checked at run time by `scan_avx2`); the slices' bounds
        // are asserted above and inside.
        return unsafe { avx2::dist3_mask(q, coords, bound, d2) };
    }
    dist3_mask_portable(q, coords, bound, d2)
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

    /// The AVX2 kernel (where the CPU has it) and the portable loop give the same distance
    /// bits and masks as `index::sq_dist`, for every block length, scale and bound.
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
                    assert_eq!(dist3_mask(&q, &c, bound, &mut dp), mp);
                }
            }
        }
    }
}
