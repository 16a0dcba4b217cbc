//! Pipes' allocator: mimalloc, through its plain entry points wherever its
//! blocks are aligned enough by themselves.
//!
//! The `mimalloc` crate passes every allocation to `mi_malloc_aligned`. Its
//! fast path only takes a block from the page's free list; when that list is
//! empty (the blocks freed since wait on the page's other lists, which
//! `mi_malloc` collects), a block whose size is not a power of two is served
//! from a larger block it then offsets into — mimalloc's slowest path — for
//! an alignment of 8 as much as for 128. Every block of mimalloc's is
//! aligned to 8, and to 16 when its size is a multiple of 16 (blocks of a
//! page are laid out from a 16-aligned start in sizes that are multiples of
//! a word; above 64 bytes, of two), so those go to `mi_malloc`, as the
//! standard library sends them to `malloc`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The global allocator of the `pipes` binary (and of the benches' bare
/// proxy, so both are measured alike).
pub struct Allocator;

/// Whether mimalloc's own blocks of `size` bytes are aligned to `align`.
fn plain(size: usize, align: usize) -> bool {
    align <= 8 || (align == 16 && size.is_multiple_of(16))
}

// SAFETY: blocks come from mimalloc, aligned as asked (by `plain`'s rule or
// by the aligned entry points), and are freed and resized by mimalloc, which
// finds a block's size and alignment from its pointer.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: FFI calls without preconditions beyond a valid alignment.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from mimalloc and is freed once (the caller's contract).
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc with `layout`; the block it
        // returns is aligned as `layout` asks, by the same rule as `alloc`.
        unsafe {
            if plain(new_size, layout.align()) {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_as_asked_through_reallocation() {
        let a = Allocator;
        let mut held = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 16, 24, 40, 48, 72, 96, 200, 400, 4000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is written within its
                // size, resized and freed once, with the layout it has.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null() && (p as usize).is_multiple_of(align), "{size} aligned to {align}");
                    p.write_bytes(7, size);
                    let q = a.realloc(p, layout, size * 3 + 8);
                    assert!(!q.is_null() && (q as usize).is_multiple_of(align), "{size} aligned to {align}, grown");
                    assert_eq!(*q.add(size - 1), 7);
                    let z = a.alloc_zeroed(layout);
                    assert!((z as usize).is_multiple_of(align) && *z.add(size - 1) == 0);
                    // Kept until the end, so later blocks come from partly used pages.
                    held.push((q, Layout::from_size_align(size * 3 + 8, align).unwrap()));
                    held.push((z, layout));
                }
            }
        }
        for (p, layout) in held {
            // SAFETY: each block was allocated above with this layout.
            unsafe { a.dealloc(p, layout) }
        }
    }
}
