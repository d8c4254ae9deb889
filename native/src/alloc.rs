//! The module's allocator: small blocks kept per thread for reuse, in front of the C library's
//! allocator (Envoy's tcmalloc, since the module lives in Envoy's process).
//!
//! Why: the filter allocates about 90 times per streamed request (the SDK's buffers for host
//! reads, shared-data keys and values, the pick's lists). Each `malloc`/`free` pair through the
//! dynamic symbol costs Envoy's allocator about 220 instructions, a sixth of the module's whole
//! cost per request (`l7_instr`, `bench/results/`). A block popped from a per-thread list of its
//! size class costs a few dozen.
//!
//! How:
//! - Sizes up to [`MAX_CACHED`] with an alignment up to 16 round up to a power of two (a class).
//!   Such a block comes from the C allocator at its class size, and when freed goes on the
//!   freeing thread's list for its class, unless that list holds [`CACHE_BYTES`] already (then it
//!   goes back to the C allocator). Anything else goes straight to the C allocator.
//! - A block may be freed on another thread than the one that allocated it (shared data, the
//!   configuration): blocks of a class are interchangeable, so it joins that thread's list.
//! - Each thread keeps at most `CACHE_BYTES` per class: 9 classes × 64 KiB, a bound on what it
//!   holds back from the C allocator.
//! - The lists are `const`-initialised thread-locals without destructors: usable at any point
//!   of a thread's life. A thread's lists are not given back when it ends (Envoy's threads live
//!   as long as the process).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// The smallest class, in bytes (it holds the list's link).
const MIN_CLASS: usize = 16;
/// The largest size kept per thread.
pub const MAX_CACHED: usize = 4096;
/// Classes 16, 32, …, 4096.
const CLASSES: usize = (MAX_CACHED / MIN_CLASS).trailing_zeros() as usize + 1;
/// What one thread keeps of one class, at most.
const CACHE_BYTES: usize = 64 * 1024;
/// The alignment every class block has (the C allocator's for these sizes on x86-64/aarch64).
const ALIGN: usize = 16;

/// The class of `layout`, if it is one this allocator keeps.
fn class(layout: Layout) -> Option<usize> {
    let size = layout.size();
    if size > MAX_CACHED || layout.align() > ALIGN {
        return None;
    }
    let rounded = size.max(MIN_CLASS).next_power_of_two();
    Some((rounded / MIN_CLASS).trailing_zeros() as usize)
}

fn class_size(c: usize) -> usize {
    MIN_CLASS << c
}

fn class_layout(c: usize) -> Layout {
    // A power of two of at most MAX_CACHED with a power-of-two alignment below it: valid.
    Layout::from_size_align(class_size(c), ALIGN)
        .unwrap_or_else(|_| unreachable!("class sizes are powers of two"))
}

/// A cached block's first word: the next block of its list.
struct Free {
    next: *mut Free,
}

/// One class's list on one thread.
struct List {
    head: Cell<*mut Free>,
    len: Cell<usize>,
}

thread_local! {
    static LISTS: [List; CLASSES] = const { [const { List { head: Cell::new(ptr::null_mut()), len: Cell::new(0) } }; CLASSES] };
}

pub struct Cached;

// SAFETY: every block handed out is either the C allocator's, allocated for a layout at least as
// large and as aligned as asked (a class block: its class size, 16-aligned), or a class block
// that was handed out and freed before (off a list, where nothing else refers to it). Blocks go
// back where they came from: to a list (class blocks) or to the C allocator with the layout they
// were allocated with (the class layout for class blocks, the caller's otherwise).
unsafe impl GlobalAlloc for Cached {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            // SAFETY: the caller's layout, as given.
            return unsafe { System.alloc(layout) };
        };
        let popped = LISTS.with(|l| {
            let list = &l[c];
            let head = list.head.get();
            if !head.is_null() {
                // SAFETY: a block on the list: it holds its link and nothing else uses it.
                list.head.set(unsafe { (*head).next });
                list.len.set(list.len.get() - 1);
            }
            head
        });
        if popped.is_null() {
            // SAFETY: a valid non-zero class layout.
            unsafe { System.alloc(class_layout(c)) }
        } else {
            popped.cast()
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some(c) = class(layout) else {
            // SAFETY: allocated by `System` with this layout (the same `class` said `None` then).
            return unsafe { System.dealloc(p, layout) };
        };
        let kept = LISTS.with(|l| {
            let list = &l[c];
            if list.len.get() * class_size(c) >= CACHE_BYTES {
                return false;
            }
            let block = p.cast::<Free>();
            // SAFETY: a class block the caller is done with: at least 16 bytes, 16-aligned.
            unsafe {
                block.write(Free {
                    next: list.head.get(),
                })
            };
            list.head.set(block);
            list.len.set(list.len.get() + 1);
            true
        });
        if !kept {
            // SAFETY: a class block: allocated by `System` with its class layout.
            unsafe { System.dealloc(p, class_layout(c)) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract: `new_size` is valid for `layout.align()`.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new)) {
            // Still fits its block.
            (Some(a), Some(b)) if a == b => p,
            // Both the C allocator's: it may grow in place.
            // SAFETY: allocated by `System` with `layout`.
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            _ => {
                // SAFETY: `new` is valid and non-zero (the caller's contract).
                let q = unsafe { self.alloc(new) };
                if !q.is_null() {
                    // SAFETY: both blocks hold at least the smaller size and do not overlap.
                    unsafe {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classes() {
        let l = |s, a| Layout::from_size_align(s, a).unwrap();
        assert_eq!(class(l(1, 1)), Some(0));
        assert_eq!(class(l(16, 8)), Some(0));
        assert_eq!(class(l(17, 8)), Some(1));
        assert_eq!(class(l(4096, 16)), Some(CLASSES - 1));
        assert_eq!(class(l(4097, 1)), None);
        assert_eq!(class(l(64, 32)), None, "over-aligned: the C allocator's");
        assert_eq!(CLASSES, 9);
        for c in 0..CLASSES {
            assert_eq!(class(class_layout(c)), Some(c));
        }
    }

    /// One step of a random program against the allocator: allocate (size, alignment), free
    /// the n-th live block, or resize it.
    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize, usize),
        Free(usize),
        Realloc(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let size = prop_oneof![1usize..64, 1usize..5000, 4000usize..9000];
        prop_oneof![
            (
                size.clone(),
                prop::sample::select(vec![1usize, 8, 16, 32, 64])
            )
                .prop_map(|(s, a)| Op::Alloc(s, a)),
            any::<usize>().prop_map(Op::Free),
            (any::<usize>(), size).prop_map(|(i, s)| Op::Realloc(i, s)),
        ]
    }

    /// Runs `ops`; every live block is filled with its own byte and checked before it goes.
    fn run(ops: &[Op], tag: u8) -> Vec<(usize, Layout, u8)> {
        let a = Cached;
        let mut live: Vec<(usize, Layout, u8)> = Vec::new();
        let check = |p: usize, l: Layout, b: u8| {
            // SAFETY: a live block of this layout, filled with `b`.
            let s = unsafe { std::slice::from_raw_parts(p as *const u8, l.size()) };
            assert!(s.iter().all(|x| *x == b), "a live block was overwritten");
            assert_eq!(p % l.align(), 0, "misaligned");
        };
        for (k, o) in ops.iter().enumerate() {
            let b = tag.wrapping_add(k as u8);
            match *o {
                Op::Alloc(s, al) => {
                    let l = Layout::from_size_align(s, al).unwrap();
                    // SAFETY: non-zero size.
                    let p = unsafe { a.alloc(l) };
                    assert!(!p.is_null());
                    // SAFETY: a fresh block of `s` bytes.
                    unsafe { p.write_bytes(b, s) };
                    live.push((p as usize, l, b));
                }
                Op::Free(i) if !live.is_empty() => {
                    let (p, l, b) = live.swap_remove(i % live.len());
                    check(p, l, b);
                    // SAFETY: live, with this layout.
                    unsafe { a.dealloc(p as *mut u8, l) };
                }
                Op::Realloc(i, s) if !live.is_empty() => {
                    let i = i % live.len();
                    let (p, l, old) = live[i];
                    check(p, l, old);
                    // SAFETY: live, with this layout; `s` is non-zero.
                    let q = unsafe { a.realloc(p as *mut u8, l, s) };
                    assert!(!q.is_null());
                    let nl = Layout::from_size_align(s, l.align()).unwrap();
                    // The old bytes moved with it.
                    // SAFETY: a live block of `s` bytes.
                    let kept = unsafe { std::slice::from_raw_parts(q, s.min(l.size())) };
                    assert!(kept.iter().all(|x| *x == old), "realloc lost bytes");
                    // SAFETY: as above.
                    unsafe { q.write_bytes(b, s) };
                    live[i] = (q as usize, nl, b);
                }
                _ => {}
            }
        }
        live
    }

    proptest! {
        /// No live block overlaps another or is overwritten, every block has its alignment,
        /// and resizing keeps the bytes: on one thread, then with blocks freed on other threads
        /// (as shared data is).
        #[test]
        fn blocks_stay_whole(ops in proptest::collection::vec(op(), 0..300), more in proptest::collection::vec(op(), 0..300)) {
            let live = run(&ops, 1);
            let mut spans: Vec<(usize, usize)> = live.iter().map(|(p, l, _)| (*p, p + l.size())).collect();
            spans.sort_unstable();
            prop_assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "live blocks overlap");
            // Freed on another thread, which then allocates from what it got.
            let handed = live.clone();
            std::thread::spawn(move || {
                for (p, l, b) in handed {
                    // SAFETY: live blocks of that layout, filled with `b`.
                    let s = unsafe { std::slice::from_raw_parts(p as *const u8, l.size()) };
                    assert!(s.iter().all(|x| *x == b));
                    // SAFETY: as above; not used again on the first thread.
                    unsafe { Cached.dealloc(p as *mut u8, l) };
                }
                let left = run(&more, 2);
                for (p, l, _) in left {
                    // SAFETY: live, with this layout.
                    unsafe { Cached.dealloc(p as *mut u8, l) };
                }
            })
            .join()
            .unwrap();
        }
    }

    #[test]
    fn a_thread_keeps_at_most_its_cap() {
        let l = Layout::from_size_align(4096, 8).unwrap();
        // SAFETY: non-zero sizes; every block freed once with its layout.
        let blocks: Vec<*mut u8> = (0..64).map(|_| unsafe { Cached.alloc(l) }).collect();
        for b in blocks {
            // SAFETY: as above.
            unsafe { Cached.dealloc(b, l) };
        }
        let kept = LISTS.with(|lists| lists[CLASSES - 1].len.get());
        assert_eq!(kept, CACHE_BYTES / 4096);
    }
}
