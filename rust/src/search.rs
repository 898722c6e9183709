//! Batched `searchsorted` of codes along the last axis (rows independent).
//!
//! Two strategies per row. Many queries against a large row: radix-sort the queries (with
//! their indices, `sort::sort_items`), sweep them along the row in parallel chunks (each
//! chunk binary-searches its first query, then advances by a branch-light count over the
//! next 8 items, galloping when the gap is longer) and scatter each answer to its query's
//! slot: O(n + m). Otherwise: branchless binary searches, 16 interleaved so their cache
//! misses overlap, query chunks in parallel. Rows in parallel.
//!
//! PERFORMANCE NOTES (2 vCPU AMD EPYC VM under heavy shared load; best CPU time per query,
//! 1 thread, u64, random queries)
//! - Baseline (`partition_point` per query), n = m = 1M: 403 ms (384 ns/query);
//!   numpy.searchsorted 450 ms CPU.
//! - Branchless binary search: LLVM's cmov-to-branch conversion turned both `if` and mask
//!   arithmetic into a jump (52 ns/query at n = 1024, 134 at 1M); `asm!` cmov: 7-8 ns at
//!   n = 1024, 15 at 32K, 40-70 at 1M. 16 searches interleaved vs 8: 40 vs 45 ns (n = 1M,
//!   m = 1K), vs 32: equal; one search at a time: 99 ns. Prefetching the next probe: no
//!   gain (slightly worse), dropped.
//! - Sort + sweep, n = m = 1M: 25-35 ns/query (sort ~15 ns) vs 100-160 ns binary. Where it
//!   pays: n = 1M, m = 64K: 31-36 vs 75-134 ns; m = 16K: 61-67 vs 51-118 (binary, warm);
//!   n = 131K, m = n: 24 vs 29; n = 4M, m = 64K: 139 vs 136 (even); n = 32K: binary
//!   15 vs 20-25. Hence: sort + sweep when the row is >= 1 MiB, m >= 4096 and m >= n / 32.
//! - Now, n = m = 1M: 25-32 ns/query, 1 thread (~15x numpy); m = 1K: 44 ns/query.
use crate::morton::Code;
use crate::sort::{sort_items, Codec, SortedVisitor, SyncPtr};
use rayon::prelude::*;

/// Binary searches run interleaved in groups of this many queries.
const GROUP: usize = 16;
/// A row's sorted queries are swept in tasks of at least this many.
const PAR_QUERIES: usize = 1 << 13;
/// Binary searches per task times levels per search, at least.
const BSEARCH_TASK_LEVELS: usize = 1 << 13;
/// The sort-and-sweep strategy needs at least this many queries,
const MERGE_MIN_QUERIES: usize = 1 << 12;
/// a sorted row of at least this many bytes,
const MERGE_MIN_BYTES: usize = 1 << 20;
/// and at least one query per this many sorted items.
const MERGE_MAX_GAP: usize = 32;

/// `x` goes before the insertion point of `q` (side='left': x < q; 'right': x <= q).
#[inline(always)]
fn before<K: Code, const RIGHT: bool>(x: K, q: K) -> bool {
    if RIGHT {
        x <= q
    } else {
        x < q
    }
}

/// `b + half` if `before(x, q)`, else `b`, by a conditional move.
///
/// Written in `asm!` on x86-64: LLVM's cmov-to-branch conversion turns every plain-Rust
/// form of this select (`if`, mask arithmetic) into a jump, which mispredicts half the time
/// (3x slower searches when measured).
#[inline(always)]
fn step<K: Code, const RIGHT: bool>(b: usize, half: usize, x: K, q: K) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let (x, q) = (x.to_u64(), q.to_u64());
        let mut r = b;
        let nb = b + half;
        // SAFETY: a register-only compare and conditional move; no memory, no stack.
        unsafe {
            if RIGHT {
                std::arch::asm!(
                    "cmp {x}, {q}",
                    "cmovbe {r}, {nb}",
                    x = in(reg) x, q = in(reg) q, r = inout(reg) r, nb = in(reg) nb,
                    options(pure, nomem, nostack),
                );
            } else {
                std::arch::asm!(
                    "cmp {x}, {q}",
                    "cmovb {r}, {nb}",
                    x = in(reg) x, q = in(reg) q, r = inout(reg) r, nb = in(reg) nb,
                    options(pure, nomem, nostack),
                );
            }
        }
        r
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let take = (before::<K, RIGHT>(x, q) as usize).wrapping_neg();
        b + (half & take)
    }
}

/// Insertion points of `qs` in `s` (non-empty), branchless binary searches `GROUP` at a
/// time so their cache misses overlap.
fn bsearch_rows<K: Code, const RIGHT: bool>(s: &[K], qs: &[K], out: &mut [i64]) {
    let n = s.len();
    debug_assert!(n > 0);
    let mut qc = qs.chunks_exact(GROUP);
    let mut oc = out.chunks_exact_mut(GROUP);
    for (q, o) in (&mut qc).zip(&mut oc) {
        let q: &[K; GROUP] = q.try_into().expect("chunk of GROUP");
        let mut base = [0usize; GROUP];
        let mut len = n;
        while len > 1 {
            let half = len / 2;
            for k in 0..GROUP {
                let b = base[k];
                // SAFETY: base + len <= n holds throughout (it starts as 0 + n, and each
                // step either keeps base and shrinks len to len - half, or moves base up by
                // half with the same end), so b + half < b + len <= n.
                let x = unsafe { *s.get_unchecked(b + half) };
                base[k] = step::<K, RIGHT>(b, half, x, q[k]);
            }
            len -= half;
        }
        for k in 0..GROUP {
            // SAFETY: base[k] < n (base + 1 <= n at the end).
            let x = unsafe { *s.get_unchecked(base[k]) };
            o[k] = (base[k] + before::<K, RIGHT>(x, q[k]) as usize) as i64;
        }
    }
    for (q, o) in qc.remainder().iter().zip(oc.into_remainder()) {
        *o = s.partition_point(|&x| before::<K, RIGHT>(x, *q)) as i64;
    }
}

/// The insertion point of `q` at or after `j`, for `j` at or below it: a branch-light
/// count over the next 8 items (the common case when queries are dense), then galloping.
#[inline(always)]
fn advance<K: Code, const RIGHT: bool>(s: &[K], mut j: usize, q: K) -> usize {
    let n = s.len();
    if let Some(block) = s.get(j..j + 8) {
        let block: &[K; 8] = block.try_into().expect("8 items");
        let mut c = 0usize;
        for &x in block {
            c += before::<K, RIGHT>(x, q) as usize;
        }
        if c < 8 {
            return j + c;
        }
        j += 8;
        let mut step = 16usize;
        while j + step <= n && before::<K, RIGHT>(s[j + step - 1], q) {
            j += step;
            step *= 2;
        }
        let hi = (j + step).min(n);
        return j + s[j..hi].partition_point(|&x| before::<K, RIGHT>(x, q));
    }
    j + s[j..].partition_point(|&x| before::<K, RIGHT>(x, q))
}

/// Sweeps sorted queries along the sorted row, writing each answer to its query's slot.
struct Sweep<'a, K> {
    s: &'a [K],
    out: SyncPtr<i64>,
    len: usize,
    right: bool,
}

impl<K: Code> SortedVisitor for Sweep<'_, K> {
    type R = ();
    fn visit<C: Codec>(self, c: &C, items: &[C::It]) {
        if self.right {
            self.run::<C, true>(c, items)
        } else {
            self.run::<C, false>(c, items)
        }
    }
}

impl<K: Code> Sweep<'_, K> {
    fn run<C: Codec, const RIGHT: bool>(&self, c: &C, items: &[C::It]) {
        let s = self.s;
        let chunk = (items.len() / (4 * rayon::current_num_threads())).max(PAR_QUERIES);
        items.par_chunks(chunk).for_each(|ch| {
            let out = self.out;
            let first = K::from_u64(c.key(ch[0]));
            let mut j = s.partition_point(|&x| before::<K, RIGHT>(x, first));
            for &it in ch {
                j = advance::<K, RIGHT>(s, j, K::from_u64(c.key(it)));
                let i = c.idx(it);
                assert!(i < self.len);
                // SAFETY: i < len = the output row's length (checked), and the items'
                // indices are a permutation of 0..len, so no other task writes slot i; the
                // row outlives this parallel loop.
                unsafe { out.get().add(i).write(j as i64) };
            }
        });
    }
}

/// Whether sorting the `m` queries and sweeping them along the `n` sorted items beats `m`
/// binary searches: only when the sorted row is larger than the L2 cache (below that a
/// binary search costs 8-30 ns, about what sorting a query costs) and the queries are
/// dense enough that the sweep's gallops stay short.
fn use_merge<K>(n: usize, m: usize) -> bool {
    m >= MERGE_MIN_QUERIES
        && n.saturating_mul(std::mem::size_of::<K>()) >= MERGE_MIN_BYTES
        && m.saturating_mul(MERGE_MAX_GAP) >= n
}

/// One row; `merge` forces a strategy (tests and benchmarks), else `use_merge` picks.
fn search_row<K: Code>(s: &[K], qs: &[K], right: bool, out: &mut [i64], merge: Option<bool>) {
    let n = s.len();
    let m = qs.len();
    if m == 0 {
        return;
    }
    if n == 0 {
        out.fill(0);
        return;
    }
    if merge.unwrap_or_else(|| use_merge::<K>(n, m)) {
        let sweep = Sweep {
            s,
            out: SyncPtr(out.as_mut_ptr()),
            len: m,
            right,
        };
        sort_items(qs, sweep);
        return;
    }
    // Tasks of at least ~20 us (a search costs ~1-3 ns per level), at most 4 per thread.
    let levels = (usize::BITS - n.leading_zeros()) as usize;
    let min_chunk = (BSEARCH_TASK_LEVELS / levels).max(GROUP);
    let tasks = m
        .div_ceil(min_chunk)
        .min(4 * rayon::current_num_threads())
        .max(1);
    let chunk = m.div_ceil(tasks).next_multiple_of(GROUP);
    out.par_chunks_mut(chunk)
        .zip(qs.par_chunks(chunk))
        .for_each(|(o, q)| {
            if right {
                bsearch_rows::<K, true>(s, q, o)
            } else {
                bsearch_rows::<K, false>(s, q, o)
            }
        });
}

/// For each row r: `out[r, i]` = insertion point of `queries[r, i]` in `sorted[r, :]`
/// (`right`: after equal elements, else before), as numpy.searchsorted.
///
/// The rows of `sorted` must be sorted (ascending); otherwise the results are unspecified
/// (but in range, and nothing panics or misbehaves).
pub fn searchsorted_rows<K: Code>(
    sorted: &[K],
    row_len: usize,
    queries: &[K],
    q_row_len: usize,
    right: bool,
    out: &mut [i64],
) {
    searchsorted_rows_with(sorted, row_len, queries, q_row_len, right, out, None)
}

/// `searchsorted_rows` with the strategy forced: `Some(true)` sorts the queries and sweeps,
/// `Some(false)` binary-searches each, `None` picks by size (what `searchsorted_rows` does).
#[doc(hidden)]
pub fn searchsorted_rows_with<K: Code>(
    sorted: &[K],
    row_len: usize,
    queries: &[K],
    q_row_len: usize,
    right: bool,
    out: &mut [i64],
    merge: Option<bool>,
) {
    if q_row_len == 0 {
        return;
    }
    assert_eq!(
        queries.len(),
        out.len(),
        "searchsorted_rows: queries and out lengths differ"
    );
    let rows = queries.len() / q_row_len;
    assert!(
        sorted.len() >= rows * row_len,
        "searchsorted_rows: sorted has fewer rows than queries"
    );
    let min_rows = (PAR_QUERIES / q_row_len).max(1);
    out.par_chunks_mut(q_row_len)
        .zip(queries.par_chunks(q_row_len))
        .enumerate()
        .with_min_len(min_rows)
        .for_each(|(r, (o, q))| {
            search_row(&sorted[r * row_len..(r + 1) * row_len], q, right, o, merge)
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn reference<K: Code>(
        sorted: &[K],
        row_len: usize,
        queries: &[K],
        q_row_len: usize,
        right: bool,
    ) -> Vec<i64> {
        let mut out = Vec::with_capacity(queries.len());
        if q_row_len == 0 {
            return out;
        }
        for (r, qs) in queries.chunks(q_row_len).enumerate() {
            let row = &sorted[r * row_len..(r + 1) * row_len];
            for &q in qs {
                let p = if right {
                    row.partition_point(|&x| x <= q)
                } else {
                    row.partition_point(|&x| x < q)
                };
                out.push(p as i64);
            }
        }
        out
    }

    fn check<K: Code + std::fmt::Debug>(
        sorted: &[K],
        row_len: usize,
        queries: &[K],
        q_row_len: usize,
    ) {
        for right in [false, true] {
            let want = reference(sorted, row_len, queries, q_row_len, right);
            for merge in [None, Some(false), Some(true)] {
                let mut o = vec![-1i64; queries.len()];
                searchsorted_rows_with(sorted, row_len, queries, q_row_len, right, &mut o, merge);
                assert_eq!(
                    o, want,
                    "row_len {row_len} q_row_len {q_row_len} right {right} {merge:?}"
                );
            }
        }
    }

    /// `rows` sorted rows of `n` keys below `range` (so duplicates when range is small) and
    /// `m` queries per row, a mix of present keys, random values and the extremes.
    fn case(rng: &mut Rng, rows: usize, n: usize, m: usize, range: u64) -> (Vec<u64>, Vec<u64>) {
        let mut sorted = Vec::with_capacity(rows * n);
        let mut queries = Vec::with_capacity(rows * m);
        for _ in 0..rows {
            let mut row: Vec<u64> = (0..n).map(|_| rng.next() % range).collect();
            row.sort_unstable();
            for i in 0..m {
                queries.push(match rng.next() % 5 {
                    0 if n > 0 => row[(rng.next() % n as u64) as usize],
                    1 => 0,
                    2 => range,
                    _ => rng.next() % range.saturating_add(1),
                });
                let _ = i;
            }
            sorted.extend(row);
        }
        (sorted, queries)
    }

    #[test]
    fn small_and_edge_cases() {
        check::<u64>(&[], 0, &[], 0);
        check::<u64>(&[], 0, &[1, 2, 3], 3);
        check::<u64>(&[5], 1, &[4, 5, 6], 3);
        check::<u32>(&[1, 1, 1, 2, 2, 3], 6, &[0, 1, 2, 3, 4], 5);
        check::<u64>(&[0, u64::MAX], 2, &[0, u64::MAX, 7], 3);
    }

    #[test]
    fn many_sizes_both_strategies() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let sizes = [1usize, 2, 3, 7, 16, 17, 100, 1000, 5000, 70_000];
        let qsizes = [1usize, 15, 16, 17, 33, 1000, 4096, 5000, 20_000];
        for &n in &sizes {
            for &m in &qsizes {
                for range in [3u64, 1000, u64::MAX - 1] {
                    let (s, q) = case(&mut rng, 1, n, m, range);
                    check(&s, n, &q, m);
                    let s32: Vec<u32> = s.iter().map(|&x| x.min(u32::MAX as u64) as u32).collect();
                    let q32: Vec<u32> = q.iter().map(|&x| x.min(u32::MAX as u64) as u32).collect();
                    check(&s32, n, &q32, m);
                }
            }
        }
    }

    #[test]
    fn multi_row() {
        let mut rng = Rng(42);
        for &(rows, n, m) in &[
            (3, 10, 5),
            (64, 100, 50),
            (7, 1000, 9000),
            (200, 33, 1),
            (5, 0, 4),
        ] {
            for range in [10u64, 1 << 40] {
                let (s, q) = case(&mut rng, rows, n, m, range);
                check(&s, n, &q, m);
            }
        }
    }

    #[test]
    fn large_parallel_rows() {
        let mut rng = Rng(7);
        for &(n, m) in &[
            (300_000, 300_000),
            (300_000, 5_000),
            (1000, 300_000),
            (300_000, 100),
        ] {
            for range in [1000u64, u64::MAX - 1] {
                let (s, q) = case(&mut rng, 1, n, m, range);
                check(&s, n, &q, m);
            }
        }
        // Queries clustered in a narrow range (galloping, long runs of equal answers).
        let (s, _) = case(&mut rng, 1, 200_000, 0, u64::MAX - 1);
        let q: Vec<u64> = (0..100_000).map(|i| s[100_000] + (i % 7)).collect();
        check(&s, 200_000, &q, 100_000);
    }

    #[test]
    fn unsorted_input_does_not_panic() {
        let mut rng = Rng(3);
        let s: Vec<u64> = (0..50_000).map(|_| rng.next()).collect();
        let q: Vec<u64> = (0..50_000).map(|_| rng.next()).collect();
        for merge in [Some(false), Some(true)] {
            let mut o = vec![0i64; q.len()];
            searchsorted_rows_with(&s, s.len(), &q, q.len(), false, &mut o, merge);
            assert!(o.iter().all(|&x| (0..=s.len() as i64).contains(&x)));
        }
        let mut o = vec![0i64; 100];
        searchsorted_rows(&s, s.len(), &q[..100], 100, true, &mut o);
        assert!(o.iter().all(|&x| (0..=s.len() as i64).contains(&x)));
    }
}
