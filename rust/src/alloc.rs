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
//! Blocks of 128 MiB and more come from the system allocator all the same: glibc grows such a
//! block in place (`mremap`) where mimalloc copies it into fresh pages, which made the KV
//! cache's `extend` (its key, value and index arrays grow by doubling) 2x slower: 1M tokens,
//! 8 heads, d_v = 128, blocks of 8,192 tokens, interleaved runs: 92-114k tokens/s with
//! mimalloc for every size, 178-253k with the split at 32 or 128 MiB, 220-238k with glibc
//! alone; the split at 128 MiB keeps `zeta.attention(exact=True)` at N = 32k, H = 8 at mimalloc's
//! speed (356-360 vs 358-392 ms; 410-431 ms with the split at 32 MiB, where its 64 MB output
//! is a fresh mmap each call). A block's allocator is a function of its size, so a block
//! that is resized across the split is moved (copied once).
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

/// Blocks of at least this many bytes come from the system allocator even with mimalloc
/// (see the perf note at the top).
const BIG: usize = 128 << 20;

/// Whether a block of `size` bytes belongs to the system allocator.
#[inline]
fn by_system(size: usize) -> bool {
    system() || size >= BIG
}

// SAFETY: a block's allocator is a function of its size alone (`by_system`, fixed for the
// process), and every method is given the block's current size, so each block is freed and
// resized by the allocator that made it; a resize across the threshold moves the block.
unsafe impl GlobalAlloc for ZetaAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if by_system(layout.size()) {
            System.alloc(layout)
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if by_system(layout.size()) {
            System.alloc_zeroed(layout)
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if by_system(layout.size()) {
            System.dealloc(ptr, layout)
        } else {
            mimalloc::MiMalloc.dealloc(ptr, layout)
        }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_sys, new_sys) = (by_system(layout.size()), by_system(new_size));
        if old_sys && new_sys {
            return System.realloc(ptr, layout, new_size);
        }
        if !old_sys && !new_sys {
            return mimalloc::MiMalloc.realloc(ptr, layout, new_size);
        }
        // Across the threshold: a new block from the other allocator, the bytes copied over.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}
