//! The agent's global allocator: the C library's `malloc`, with a cheap path for
//! over-aligned blocks.
//!
//! Why: tokio's task cell and its I/O registration (`ScheduledIo`) are 128-byte aligned on
//! x86_64 (`#[repr(align(128))]` against false sharing), so every proxied connection
//! makes three aligned allocations (its task, one registration per socket). Rust's
//! `System` allocator sends those to `posix_memalign`, whose glibc implementation
//! (`_int_memalign`) allocates `size + align + MINSIZE`, then splits a leading and a
//! trailing chunk off and frees them: about 890 instructions a call by callgrind (2,660 a
//! connection), against about 90 for the `malloc` this module makes instead.
//!
//! What this does instead, for `MIN_ALIGN < align <= MAX_ALIGN`: a plain `malloc` of
//! `size + align`, the first `align`-aligned address at least `MIN_ALIGN` bytes in
//! handed out, and the pointer `malloc` returned kept in the word just before it. `dealloc`
//! receives the same `Layout`, so it knows which path a block took and finds `malloc`'s
//! pointer there. The price: `align` bytes more per aligned block than it needs (128 for
//! a task cell); `posix_memalign` splits its gaps off instead, yet the footprint suite
//! measured a held connection (a task and two registrations: three such blocks) at the
//! same RSS either way (docs/benchmarks.md), and a proxied connection costs about 2,650
//! instructions fewer (callgrind). Alignments up to `MIN_ALIGN` go to `malloc` untouched;
//! larger than `MAX_ALIGN` (page-aligned buffers and up, rare) to `posix_memalign` as
//! before, where wasting up to `align` bytes would cost more than the instructions saved.

use std::alloc::{GlobalAlloc, Layout};

/// What `malloc` guarantees of every pointer it returns: `alignof(max_align_t)`, 16 on
/// 64-bit glibc and musl (two words).
const MIN_ALIGN: usize = 2 * size_of::<usize>();

/// The largest alignment served by over-allocation: a page. Above it (rare: page-aligned
/// buffers and up) the waste of up to `align` bytes a block outweighs the
/// instructions saved, and `posix_memalign` gives the leading gap back.
const MAX_ALIGN: usize = 4096;

/// The agent's `#[global_allocator]` (set in main.rs).
pub struct Allocator;

/// Whether a layout takes the over-allocating path.
#[inline]
fn over_aligned(layout: Layout) -> bool {
    layout.align() > MIN_ALIGN && layout.align() <= MAX_ALIGN
}

/// A block of `layout` (`MIN_ALIGN < align <= MAX_ALIGN`) carved out of one `malloc`.
///
/// # Safety
/// `layout` must be over-aligned (see `over_aligned`).
#[inline]
unsafe fn alloc_aligned(layout: Layout) -> *mut u8 {
    let align = layout.align();
    // `size + align` cannot overflow in practice (a Layout's size rounded up to its align
    // fits isize); checked anyway: an overflow is a failed allocation.
    let Some(total) = layout.size().checked_add(align) else {
        return std::ptr::null_mut();
    };
    // SAFETY: malloc has no preconditions; a null result is returned as the failure.
    let raw = unsafe { libc::malloc(total) }.cast::<u8>();
    if raw.is_null() {
        return raw;
    }
    // `raw` is MIN_ALIGN-aligned and `align` a larger power of two, so the first
    // `align`-aligned address past `raw` lies in [raw + MIN_ALIGN, raw + align]: room
    // for the word before it, and `size` bytes after it within `total`.
    let offset = align - (raw as usize & (align - 1));
    // SAFETY: offset <= align, so `user .. user + size` lies within the `total` bytes
    // malloc returned; `user - size_of::<usize>()` >= raw + MIN_ALIGN - 8 >= raw, and is
    // word-aligned (user is align-aligned), so the write is in bounds and aligned.
    unsafe {
        let user = raw.add(offset);
        user.cast::<*mut u8>().sub(1).write(raw);
        user
    }
}

/// Frees a block from `alloc_aligned`.
///
/// # Safety
/// `ptr` must come from `alloc_aligned` and not be freed yet.
#[inline]
unsafe fn dealloc_aligned(ptr: *mut u8) {
    // SAFETY: alloc_aligned stored malloc's pointer in the word before `ptr`.
    unsafe { libc::free(ptr.cast::<*mut u8>().sub(1).read().cast()) }
}

// SAFETY: every block is either malloc's own (alignment up to MIN_ALIGN, which malloc
// guarantees), an aligned window of a malloc'd block at least `size` long (see
// alloc_aligned), or posix_memalign's; each is freed by the path that made it, which the
// Layout given back to dealloc/realloc names. Zero sizes (which GlobalAlloc's callers
// must not pass) still give a unique, freeable block: malloc(0) returns one, the aligned
// path allocates `align` bytes.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            // SAFETY: malloc has no preconditions.
            unsafe { libc::malloc(layout.size()).cast() }
        } else if over_aligned(layout) {
            // SAFETY: the layout is over-aligned.
            unsafe { alloc_aligned(layout) }
        } else {
            let mut out = std::ptr::null_mut();
            // SAFETY: align is a power of two and a multiple of the word size (> 4096);
            // `out` is written only on success.
            let rc = unsafe { libc::posix_memalign(&mut out, layout.align(), layout.size()) };
            if rc == 0 {
                out.cast()
            } else {
                std::ptr::null_mut()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            // SAFETY: calloc has no preconditions.
            unsafe { libc::calloc(layout.size(), 1).cast() }
        } else {
            // SAFETY: forwarded contract; the block, if any, has `size` writable bytes.
            unsafe {
                let p = self.alloc(layout);
                if !p.is_null() {
                    p.write_bytes(0, layout.size());
                }
                p
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if over_aligned(layout) {
            // SAFETY: the caller passes the layout the block was allocated with, so it
            // came from alloc_aligned.
            unsafe { dealloc_aligned(ptr) }
        } else {
            // SAFETY: from malloc, calloc, realloc or posix_memalign, all freed by free.
            unsafe { libc::free(ptr.cast()) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            // realloc(p, 0) would free the block and return null: a zero size (which
            // callers must not pass) keeps a live block instead.
            // SAFETY: `ptr` is malloc's (the layout says so); on failure realloc leaves it
            // untouched and returns null, as GlobalAlloc::realloc must.
            unsafe { libc::realloc(ptr.cast(), new_size.max(1)).cast() }
        } else {
            // Over-aligned (ours or posix_memalign's): a new block, the bytes both hold,
            // then the old one freed. Left alone on failure.
            // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid
            // layout; both blocks are live and distinct while copying.
            unsafe {
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

// The library's own unit tests run on it too: every test allocates through it.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: Allocator = Allocator;

#[cfg(test)]
mod tests {
    use super::*;

    const ALIGNS: &[usize] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192, 65536];
    const SIZES: &[usize] = &[
        0, 1, 7, 8, 15, 16, 17, 31, 63, 64, 100, 127, 128, 129, 1000, 4095, 4096, 4097, 70000,
    ];

    /// Fills a block with a pattern that depends on the seed and the offset.
    fn fill(p: *mut u8, n: usize, seed: u8) {
        for i in 0..n {
            // SAFETY: the tests pass blocks of at least n bytes.
            unsafe { p.add(i).write(seed.wrapping_add(i as u8).wrapping_mul(31)) }
        }
    }

    fn holds(p: *const u8, n: usize, seed: u8) -> bool {
        // SAFETY: as fill.
        (0..n).all(|i| unsafe { p.add(i).read() } == seed.wrapping_add(i as u8).wrapping_mul(31))
    }

    #[test]
    fn every_size_and_alignment_is_aligned_and_whole() {
        let a = Allocator;
        let mut live = Vec::new();
        for (k, &align) in ALIGNS.iter().enumerate() {
            for (j, &size) in SIZES.iter().enumerate() {
                let l = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a valid layout (zero sizes included on purpose: see below).
                let p = unsafe { a.alloc(l) };
                assert!(!p.is_null(), "{l:?}");
                assert_eq!(p as usize % align, 0, "{l:?}");
                let seed = (k * 31 + j) as u8;
                fill(p, size, seed);
                live.push((p, l, seed));
            }
        }
        // All live at once: no block overlaps another, none overwrote a neighbour's
        // bytes or the word kept before an aligned block.
        for &(p, l, seed) in &live {
            assert!(holds(p, l.size(), seed), "{l:?}");
        }
        let mut spans: Vec<(usize, usize)> = live
            .iter()
            .map(|&(p, l, _)| (p as usize, p as usize + l.size()))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0 || w[0].0 == w[0].1, "{w:?} overlap");
        }
        for (p, l, _) in live {
            // SAFETY: allocated above with this layout, freed once.
            unsafe { a.dealloc(p, l) };
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_at_every_alignment() {
        let a = Allocator;
        for &align in ALIGNS {
            for &size in SIZES {
                let l = Layout::from_size_align(size, align).unwrap();
                // Dirty the heap first so a zero is not luck.
                // SAFETY: valid layout; freed right away.
                unsafe {
                    let d = a.alloc(l);
                    fill(d, size, 0xa5);
                    a.dealloc(d, l);
                    let p = a.alloc_zeroed(l);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0);
                    assert!((0..size).all(|i| p.add(i).read() == 0), "{l:?}");
                    a.dealloc(p, l);
                }
            }
        }
    }

    #[test]
    fn realloc_keeps_the_content_growing_and_shrinking() {
        let a = Allocator;
        for &align in ALIGNS {
            for &(from, to) in &[
                (1, 2),
                (16, 300),
                (100, 5000),
                (5000, 100),
                (4096, 4097),
                (300, 300),
                (70000, 17),
                (17, 70000),
                (0, 64),
                (64, 0),
            ] {
                let l = Layout::from_size_align(from, align).unwrap();
                // SAFETY: valid layouts; each block freed once with its current layout.
                unsafe {
                    let p = a.alloc(l);
                    fill(p, from, 7);
                    let q = a.realloc(p, l, to);
                    assert!(!q.is_null(), "{l:?} -> {to}");
                    assert_eq!(q as usize % align, 0, "{l:?} -> {to}");
                    assert!(holds(q, from.min(to), 7), "{l:?} -> {to}");
                    // The whole new block is writable.
                    fill(q, to, 9);
                    assert!(holds(q, to, 9));
                    a.dealloc(q, Layout::from_size_align(to, align).unwrap());
                }
            }
        }
    }

    #[test]
    fn the_aligned_path_keeps_mallocs_pointer_just_before_the_block() {
        let a = Allocator;
        let l = Layout::from_size_align(200, 128).unwrap();
        // SAFETY: valid layout, freed once.
        unsafe {
            let p = a.alloc(l);
            let raw = p.cast::<*mut u8>().sub(1).read();
            assert!(raw < p && p as usize - raw as usize <= 128, "{raw:?} {p:?}");
            assert_eq!(raw as usize % MIN_ALIGN, 0);
            a.dealloc(p, l);
        }
        assert!(!over_aligned(Layout::from_size_align(8, 16).unwrap()));
        assert!(over_aligned(Layout::from_size_align(8, 32).unwrap()));
        assert!(over_aligned(Layout::from_size_align(8, 4096).unwrap()));
        assert!(!over_aligned(Layout::from_size_align(8, 8192).unwrap()));
    }

    #[test]
    fn std_collections_and_threads_run_on_it() {
        // Types whose alignment takes the aligned path, through Box and Vec growth.
        #[repr(align(128))]
        struct Padded([u8; 200]);
        let mut v: Vec<Padded> = Vec::new();
        for i in 0..1000 {
            v.push(Padded([i as u8; 200]));
        }
        assert!(v.iter().enumerate().all(|(i, p)| p.0[199] == i as u8));
        assert_eq!(v.as_ptr() as usize % 128, 0);
        v.truncate(3);
        v.shrink_to_fit();
        assert_eq!(v.as_ptr() as usize % 128, 0);
        assert_eq!(v[2].0[0], 2);
        let hs: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let b: Vec<Box<Padded>> = (0..500)
                        .map(|i| Box::new(Padded([(t * i) as u8; 200])))
                        .collect();
                    b.iter().enumerate().all(|(i, p)| {
                        let addr = std::ptr::from_ref::<Padded>(p) as usize;
                        p.0[7] == (t * i) as u8 && addr.is_multiple_of(128)
                    })
                })
            })
            .collect();
        assert!(hs.into_iter().all(|h| h.join().unwrap()));
    }
}
