//! The rayon pool zeta runs in: sized by `ZETA_NUM_THREADS`, rebuilt after `fork()`.
//!
//! rayon's global pool does not survive `fork()`: the child has the pool's state but none of
//! its threads, so the first parallel call would wait forever. The Python module registers
//! [`forget_after_fork`] with `os.register_at_fork(after_in_child=...)`; the child then drops
//! (leaks) the parent's pool and lazily builds its own.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Set in a forked child whose pool mutex was held at fork time: never touch the mutex again.
static FRESH_EACH_CALL: AtomicBool = AtomicBool::new(false);
static POOL: Mutex<Option<Arc<rayon::ThreadPool>>> = Mutex::new(None);

/// Threads from `ZETA_NUM_THREADS` (>= 1), else rayon's default (the number of CPUs).
pub fn configured_threads() -> usize {
    std::env::var("ZETA_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

fn build_pool() -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(configured_threads())
            .thread_name(|i| format!("zeta-{i}"))
            .build()
            .unwrap_or_else(|_| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread rayon pool")
            }),
    )
}

fn pool() -> Arc<rayon::ThreadPool> {
    if FRESH_EACH_CALL.load(Ordering::Relaxed) {
        return build_pool();
    }
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = guard.as_ref() {
        return p.clone();
    }
    let p = build_pool();
    *guard = Some(p.clone());
    p
}

/// Runs `f` inside zeta's pool (its `par_iter`s use that pool).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// Number of threads of zeta's pool.
pub fn current_threads() -> usize {
    pool().current_num_threads()
}

/// Called in a forked child: the parent's worker threads do not exist here, so the pool is
/// leaked (never joined) and a new one is built on next use.
pub fn forget_after_fork() {
    // The mutex may have been held by a parent thread at fork time; take it without waiting.
    if let Ok(mut g) = POOL.try_lock() {
        if let Some(p) = g.take() {
            std::mem::forget(p);
        }
    } else {
        // Locked by a thread that does not exist in this process: never wait on it.
        FRESH_EACH_CALL.store(true, Ordering::Relaxed);
    }
}
