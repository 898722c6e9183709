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
