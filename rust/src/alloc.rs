//! The extension module's allocator: mimalloc, or the system's (`ZETA_ALLOCATOR=system`).
//!
//! Only the Rust code's allocations go through it; Python and numpy keep their own.
//!
//! Perf note (2-core VM, interleaved builds): with glibc malloc the index buffers of every
//! call were fresh pages (a freed block of a worker thread's arena is trimmed back to the
//! kernel): 211k page faults in 21 `zeta.knn` calls at N = 64k on one thread, 7.9k with
//! mimalloc, which keeps freed pages for reuse. `zeta.attention` at N = 32k, H = 8: defaults
//! 653-671 -> 541-546 ms, `exact=True` 439-466 -> 385-393 ms; exact `knn` at 64k on one thread
//! 200-208 -> 175-178 ms.
//!
//! A block that `realloc` grows to 128 MiB or more moves to the system allocator: glibc
//! grows such a block in place (`mremap`) where mimalloc copies it into fresh pages, which
//! made the KV cache's `extend` (its key, value and index arrays grow by doubling) 2x slower:
//! 1M tokens, 8 heads, d_v = 128, blocks of 8,192 tokens, interleaved runs: 92-114k tokens/s
//! with mimalloc for every block, 178-253k with the move, 220-238k with glibc alone. Fresh
//! blocks of any size stay mimalloc's: until 2026-11-30 every block of 128 MiB or more came
//! from glibc, which maps such a block afresh and unmaps it when freed, so that the 256 MB
//! output of `zeta.attention` at N = 128k, H = 8, d_v = 64 faulted its pages in on every call
//! (7% of the call in `clear_page_erms`): 1.67-1.71 -> 1.48 s per call (32k: the same, its
//! 64 MB output was mimalloc's already). Which allocator owns a block of 128 MiB or more is
//! asked of mimalloc's page map (`mi_is_in_heap_region`, a lookup); smaller blocks are
//! always mimalloc's (a block shrunk below 128 MiB moves back).
//!
//! `ZETA_ALLOCATOR=system` (read at the first allocation, i.e. when the module is imported)
//! keeps glibc's: mimalloc reserves address space in 1 GiB arenas and 32 MiB segments, so an
//! address-space limit (`RLIMIT_AS`) does not see each allocation; the tests that sweep such
//! limits across every allocation site run with the system allocator.
//!
//! A block that is *made* at `BIG` bytes or more by a [`growable`] call (the KV cache's
//! key, value and code arrays) comes from the system allocator at once: a cache filled by
//! one large `extend` (a prefill) has arrays of exactly its length, and the next token's
//! `realloc` would otherwise copy them (mimalloc to glibc) into fresh pages. Measured
//! (1M tokens, 8 heads, d_v = 128, float32, 2-core Zen 4 VM, three runs of each build
//! alternated): the first one-token `extend` after one `extend` of 1M tokens took 9.4-9.6 s
//! (4 GB of values copied into faulted-in pages), now 0.88-0.93 s (the index's merge at 2^20
//! tokens, 80% of it the kernel clearing fresh pages); the 1M-token `extend` 7.8-8.5 s, now
//! 5.4-7.3 s.
#[cfg(feature = "python")]
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
#[cfg(feature = "python")]
use std::sync::atomic::{AtomicU8, Ordering};

thread_local! {
    /// Set while this thread runs [`growable`].
    static GROWABLE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the blocks it makes at `BIG` (128 MiB) or more taken from the system
/// allocator, which grows them in place (`mremap`) when they are `realloc`ed later: for
/// arrays that keep growing (the KV cache's). Without the module's allocator (the `rlib`
/// of `cargo test`), just `f()`.
pub fn growable<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the flag back, also if `f` unwinds.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GROWABLE.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GROWABLE.with(|g| g.replace(true)));
    f()
}

/// Whether a fresh block of `size` bytes comes from the system allocator because of
/// [`growable`] (a constant-initialised thread-local without destructor: no allocation,
/// readable at any time; `false` if it were not).
#[cfg(feature = "python")]
#[inline]
fn growable_block(size: usize) -> bool {
    size >= BIG && GROWABLE.try_with(|g| g.get()).unwrap_or(false)
}

#[cfg(feature = "python")]
pub struct ZetaAlloc;

#[cfg(feature = "python")]
/// 0: not chosen yet, 1: mimalloc, 2: the system's.
static CHOICE: AtomicU8 = AtomicU8::new(0);

#[cfg(feature = "python")]
extern "C" {
    fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
}

#[cfg(feature = "python")]
/// Whether the system allocator is in use (fixed at the first call: every block is freed by
/// the allocator that made it).
#[inline]
pub fn system() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            // SAFETY: `getenv` takes a NUL-terminated name and returns null or a
            // NUL-terminated string that is only read here (no allocation: this runs inside
            // the allocator). Two threads racing here read the same variable and agree.
            let sys = unsafe {
                let v = getenv(c"ZETA_ALLOCATOR".as_ptr());
                !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == b"system"
            };
            CHOICE.store(if sys { 2 } else { 1 }, Ordering::Relaxed);
            sys
        }
    }
}

#[cfg(feature = "python")]
/// The allocator in use: "mimalloc" or "system".
pub fn name() -> &'static str {
    if system() {
        "system"
    } else {
        "mimalloc"
    }
}

#[cfg(feature = "python")]
/// A block that `realloc` grows to at least this many bytes moves to the system allocator,
/// and one made this large inside [`growable`] comes from it (see the notes at the top);
/// smaller blocks are always mimalloc's.
const BIG: usize = 128 << 20;

#[cfg(feature = "python")]
/// Whether the block at `ptr` of `size` bytes belongs to the system allocator: every block
/// under [`BIG`] is mimalloc's (with mimalloc in use); a larger one is the system's when
/// mimalloc's page map does not know it.
#[inline]
fn by_system(ptr: *mut u8, size: usize) -> bool {
    // SAFETY: `mi_is_in_heap_region` only looks `ptr` up in mimalloc's page map.
    system() || (size >= BIG && !unsafe { libmimalloc_sys::mi_is_in_heap_region(ptr.cast()) })
}

#[cfg(feature = "python")]
// SAFETY: fresh blocks come from mimalloc (or, with `ZETA_ALLOCATOR=system`, from the system
// allocator for the whole process), except blocks of `BIG` bytes or more made inside
// `growable`, which come from the system allocator; `realloc` moves a block to the system
// allocator when it grows it to `BIG` bytes or more, and back when it shrinks below. So a
// block under `BIG` is mimalloc's, a larger one is the system's exactly when mimalloc's page
// map does not hold it (`by_system`), and each block is freed and resized by the allocator
// that made it.
unsafe impl GlobalAlloc for ZetaAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if system() || growable_block(layout.size()) {
            System.alloc(layout)
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if system() || growable_block(layout.size()) {
            System.alloc_zeroed(layout)
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if by_system(ptr, layout.size()) {
            System.dealloc(ptr, layout)
        } else {
            mimalloc::MiMalloc.dealloc(ptr, layout)
        }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if system() {
            return System.realloc(ptr, layout, new_size);
        }
        let old_sys = by_system(ptr, layout.size());
        // Growing to BIG or more: glibc grows the block in place from then on (mremap).
        let new_sys = new_size >= BIG && (old_sys || new_size > layout.size());
        if old_sys == new_sys {
            return if new_sys {
                System.realloc(ptr, layout, new_size)
            } else {
                mimalloc::MiMalloc.realloc(ptr, layout, new_size)
            };
        }
        // To the other allocator: a new block there, the bytes copied over.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = if new_sys {
            System.alloc(new_layout)
        } else {
            mimalloc::MiMalloc.alloc(new_layout)
        };
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}
