//! One error type for the crate; `py.rs` maps it to Python exceptions in one place.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZetaError {
    /// A bad value for a named argument (maps to `ValueError`).
    Value { arg: &'static str, msg: String },
    /// A bad type/dtype for a named argument (maps to `TypeError`).
    Type { arg: &'static str, msg: String },
    /// An allocation that would not fit (maps to `MemoryError`).
    Memory(String),
    /// An allocation that failed (maps to `MemoryError`). Holds no heap data: building it
    /// needs no memory, at the moment there may be none (the message is formatted later,
    /// after the partial work has been dropped).
    Alloc { what: &'static str, n: usize },
    /// File-system failure (maps to `OSError`).
    Io(String),
    /// A file that is not a valid zeta file (maps to `ValueError`).
    Corrupt(String),
    /// A bug in zeta, e.g. a caught panic (maps to `RuntimeError`, "please report").
    Internal(String),
}

pub type Result<T> = std::result::Result<T, ZetaError>;

impl ZetaError {
    pub fn value(arg: &'static str, msg: impl Into<String>) -> Self {
        ZetaError::Value {
            arg,
            msg: msg.into(),
        }
    }
    pub fn type_(arg: &'static str, msg: impl Into<String>) -> Self {
        ZetaError::Type {
            arg,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for ZetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZetaError::Value { arg, msg } | ZetaError::Type { arg, msg } => {
                write!(f, "{arg}: {msg}")
            }
            ZetaError::Memory(m) => write!(f, "out of memory: {m}"),
            ZetaError::Alloc { what, n } => write!(f, "out of memory: {what} (n = {n})"),
            ZetaError::Io(m) => write!(f, "{m}"),
            ZetaError::Corrupt(m) => write!(f, "corrupt zeta file: {m}"),
            ZetaError::Internal(m) => write!(f, "zeta internal error (please report): {m}"),
        }
    }
}

impl std::error::Error for ZetaError {}

impl From<std::io::Error> for ZetaError {
    fn from(e: std::io::Error) -> Self {
        ZetaError::Io(e.to_string())
    }
}

// Allocation policy: every buffer whose size follows an argument or a file field is
// allocated through the helpers below (or `try_reserve`), so running out of memory is a
// `MemoryError` in Python, never `handle_alloc_error` aborting the interpreter. What is left
// infallible is bounded by a constant (n_curves <= 9 per-curve lists, SIMD path lists) or
// by a size already held by a fallible allocation of the same call. Deep inside the radix
// sort, where no `Result` can get out of a rayon closure, `vec_or_unwind` unwinds instead
// and the entry points catch it (`catch_oom`).

/// `vec![x; n]` that reports allocation failure instead of aborting the process.
pub fn try_vec<T: Clone>(x: T, n: usize, what: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| ZetaError::Alloc { what, n })?;
    v.resize(n, x);
    Ok(v)
}

/// Elements per task of [`try_vec_par`] (and below which it fills on the calling thread).
pub const PAR_FILL: usize = 1 << 16;

/// [`try_vec`] for the large outputs, filled by the thread pool's workers in chunks of
/// [`PAR_FILL`] elements when called on a worker of zeta's pool (elsewhere: on the calling
/// thread, so that no other pool is started).
///
/// Perf note (`zeta.attention` at N = 32k, H = 8, d_v = 64, 2 threads, Zen 3 VM): the 64 MB
/// output's fill on one thread, with the page faults it takes (mimalloc hands its freed
/// pages back to the kernel between calls), was ~4% of the call's samples while the other
/// thread waited.
pub fn try_vec_par<T: Copy + Send + Sync>(x: T, n: usize, what: &'static str) -> Result<Vec<T>> {
    use rayon::prelude::*;
    if n <= PAR_FILL || rayon::current_thread_index().is_none() {
        return try_vec(x, n, what);
    }
    let mut v = try_with_capacity(n, what)?;
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(PAR_FILL)
        .for_each(|c| c.iter_mut().for_each(|e| _ = e.write(x)));
    // SAFETY: the capacity is at least n and its first n slots were all written just above.
    unsafe { v.set_len(n) };
    Ok(v)
}

/// An empty vector with room for `n` elements, or `MemoryError`.
pub fn try_with_capacity<T>(n: usize, what: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| ZetaError::Alloc { what, n })?;
    Ok(v)
}

/// The product of `dims` (an element count), or `MemoryError` when it overflows `usize`.
pub fn numel(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| ZetaError::Memory(format!("{what}: {dims:?} elements overflow usize")))
}

/// Asks the allocator whether `bytes` could be had at all (reserved, never touched, freed
/// at once). Used before building many small pieces whose total is the real cost: the
/// kernel refuses a single mapping larger than what it could ever back (and any mapping
/// over `ulimit -v`), which the small pieces alone would only find out at the OOM killer.
pub fn probe_bytes(bytes: usize, what: &'static str) -> Result<()> {
    let mut v: Vec<u8> = Vec::new();
    let r = v.try_reserve_exact(bytes);
    // The buffer escapes: without this the optimiser may elide an unused allocation and
    // take it as granted (it did, in the unit test).
    std::hint::black_box(&mut v);
    r.map_err(|_| ZetaError::Alloc { what, n: bytes })
}

/// The payload of an allocation failure deep inside parallel code (see [`vec_or_unwind`]).
#[derive(Debug)]
pub struct OutOfMemory {
    pub what: &'static str,
    pub n: usize,
}

/// `vec![x; n]` for buffers allocated inside rayon closures and sort internals, where a
/// `Result` cannot get out: on failure it unwinds with an [`OutOfMemory`] payload
/// (`resume_unwind`: no panic message), which rayon carries to the caller and
/// [`catch_oom`] (or the Python entry points) turns back into [`ZetaError::Memory`].
pub fn vec_or_unwind<T: Clone>(x: T, n: usize, what: &'static str) -> Vec<T> {
    match try_vec(x, n, what) {
        Ok(v) => v,
        Err(_) => std::panic::resume_unwind(Box::new(OutOfMemory { what, n })),
    }
}

/// Runs `f`; an [`OutOfMemory`] unwind becomes `Err(ZetaError::Memory)`, any other panic
/// goes on unwinding.
pub fn catch_oom<R>(f: impl FnOnce() -> R) -> Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        match p.downcast::<OutOfMemory>() {
            Ok(m) => ZetaError::Alloc {
                what: m.what,
                n: m.n,
            },
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_allocations_are_errors_not_aborts() {
        let huge = usize::MAX / 4;
        assert!(matches!(
            try_vec(0u64, huge, "x"),
            Err(ZetaError::Alloc { what: "x", .. })
        ));
        assert!(try_with_capacity::<u32>(huge, "x").is_err());
        assert!(probe_bytes(huge, "x").is_err());
        assert!(numel(&[huge, 8], "x").is_err());
        // Deep inside parallel code: unwinds through rayon, caught as an error.
        let r = catch_oom(|| {
            use rayon::prelude::*;
            (0..4).into_par_iter().for_each(|i| {
                let v = vec_or_unwind(0u8, if i == 3 { huge } else { 8 }, "scratch");
                assert!(v.len() <= 8);
            })
        });
        assert!(matches!(
            r,
            Err(ZetaError::Alloc {
                what: "scratch",
                ..
            })
        ));
        assert!(catch_oom(|| 7).unwrap() == 7);
    }
}
