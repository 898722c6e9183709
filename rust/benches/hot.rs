//! Criterion benches of the Rust hot loops, with no Python in the way:
//! `cargo bench --bench hot` (all), `cargo bench --bench hot -- attention` (one group).
//!
//! Sizes follow benches/*.py (d_k = 3, topk = 32, causal, chunk 64) but stay small enough
//! for a laptop; the pool size is rayon's default (`ZETA_NUM_THREADS` does not apply here).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use zeta::attention::{forward, knn, AttnOpts, Shape};
use zeta::index::{KeyIndex, Params};
use zeta::morton::encode;
use zeta::simd::selected;
use zeta::sort::argsort_rows;

const DK: usize = 3;
const TOPK: usize = 32;

/// Deterministic pseudo-random floats in (-2, 2) (xorshift; no rand dependency).
fn points(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn params() -> Params {
    Params {
        chunk: 64,
        window: TOPK,
        n_curves: 1,
        n_sink: 0,
        causal: true,
        bits: 10,
        scale: 1.0,
    }
}

fn bench_morton(c: &mut Criterion) {
    let mut g = c.benchmark_group("morton_encode_3d_u64");
    for n in [1usize << 16, 1 << 20] {
        let coords: Vec<u32> = points(n * DK, 1)
            .iter()
            .map(|f| ((f + 2.0) * 500_000.0) as u32 & ((1 << 21) - 1))
            .collect();
        let mut out = vec![0u64; n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| encode(black_box(&coords), DK, 21, &mut out, selected()).unwrap())
        });
    }
    g.finish();
}

fn bench_argsort(c: &mut Criterion) {
    let mut g = c.benchmark_group("argsort_u32");
    for (rows, len) in [(1usize, 1usize << 20), (64, 1 << 14)] {
        let keys: Vec<u32> = points(rows * len, 2).iter().map(|f| f.to_bits()).collect();
        let mut out = vec![0i64; rows * len];
        g.throughput(Throughput::Elements((rows * len) as u64));
        g.bench_function(format!("{rows}x{len}"), |b| {
            b.iter(|| argsort_rows(black_box(&keys), len, &mut out))
        });
    }
    g.finish();
}

fn bench_index(c: &mut Criterion) {
    let mut g = c.benchmark_group("index");
    g.sample_size(10);
    let prm = params();
    for n in [1usize << 13, 1 << 15] {
        let k = points(n * DK, 3);
        let q = points(n * DK, 4);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("build", n), &n, |b, _| {
            b.iter(|| KeyIndex::build(black_box(&k), DK, &prm).unwrap())
        });
        let sh = shape(n, 1);
        g.bench_with_input(BenchmarkId::new("knn_top32", n), &n, |b, _| {
            b.iter(|| knn(&sh, &prm, TOPK, black_box(&q), &k).unwrap())
        });
    }
    g.finish();
}

fn shape(n: usize, dv: usize) -> Shape {
    Shape {
        b: 1,
        h: 1,
        hkv: 1,
        n,
        s: n,
        dk: DK,
        dv,
    }
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention_forward_dv64");
    g.sample_size(10);
    let prm = params();
    let opts = AttnOpts {
        topk: TOPK,
        mean_token: false,
    };
    for n in [1usize << 13, 1 << 15] {
        let (q, k, v) = (points(n * DK, 5), points(n * DK, 6), points(n * 64, 7));
        let sh = shape(n, 64);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| forward(&sh, &prm, &opts, black_box(&q), &k, &v, &[1.0]).unwrap())
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_morton,
    bench_argsort,
    bench_index,
    bench_attention
);
criterion_main!(benches);
