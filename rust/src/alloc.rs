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
//! `ZETA_ALLOCATOR=system` (read at the first allocation, i.e. when the module is imported)
//! keeps glibc's: mimalloc reserves address space in 1 GiB arenas and 32 MiB segments, so an
//! address-space limit (`RLIMIT_AS`) does not see each allocation; the tests that sweep such
//! limits across every allocation site run with the system allocator.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

pub struct ZetaAlloc;

/// 0: not chosen yet, 1: mimalloc, 2: the system's.
static CHOICE: AtomicU8 = AtomicU8::new(0);

extern "C" {
    fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
}

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

/// The allocator in use: "mimalloc" or "system".
pub fn name() -> &'static str {
    if system() {
        "system"
    } else {
        "mimalloc"
    }
}

// SAFETY: every method forwards to one allocator, the same for the whole process (`system`
// never changes its answer once made), so blocks are freed / resized by their allocator.
unsafe impl GlobalAlloc for ZetaAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if system() {
            System.alloc(layout)
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if system() {
            System.alloc_zeroed(layout)
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if system() {
            System.dealloc(ptr, layout)
        } else {
            mimalloc::MiMalloc.dealloc(ptr, layout)
        }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if system() {
            System.realloc(ptr, layout, new_size)
        } else {
            mimalloc::MiMalloc.realloc(ptr, layout, new_size)
        }
    }
}
