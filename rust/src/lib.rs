//! zeta: Z-order (Morton) top-k attention.
//!
//! The crate is plain Rust; `py.rs` (behind the `python` feature) is the only file that
//! knows Python exists, so `cargo test` and `cargo bench` need no interpreter.
//!
//! Layout:
//! - [`morton`]: Morton encode/decode (BMI2 pdep, AVX2 and portable paths, runtime dispatch)
//! - [`quantize`]: the fixed float -> grid map and the fused `zorder`
//! - [`sort`]: stable radix argsort of codes, parallel over rows and within large rows
//! - [`search`]: batched searchsorted of codes
//! - [`index`]: the causal dyadic-run Z-order index (merge-sort tree)
//! - [`attention`]: candidate rerank, Cauchy-softmax forward, knn
//! - [`score`]: the Cauchy-softmax weighted sum shared by the forward and the cache
//! - [`backward`]: the gradients (per-query pass, inverse index, per-key pass)
//! - [`exact`]: exact top-k search over the index's block boxes
//! - [`topk`]: the k-selection
//! - [`simd`]: CPU feature detection and the AVX2 distance-scan kernel
//! - [`cache`]: the incremental KV cache for decoding, save/load
pub mod attention;
pub mod backward;
pub mod cache;
pub mod error;
pub mod exact;
pub mod index;
pub mod morton;
pub mod pool;
pub mod quantize;
pub mod score;
pub mod search;
pub mod simd;
pub mod sort;
pub mod sortnet;
pub mod topk;

#[cfg(feature = "python")]
mod py;

pub mod alloc;

#[cfg(feature = "python")]
#[global_allocator]
static GLOBAL: alloc::ZetaAlloc = alloc::ZetaAlloc;

pub use error::{Result, ZetaError};

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// A reproducible pseudo-random float in [-2, 2) (64-bit LCG).
    pub fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
}
