//! Heap allocations made on the server's threads, with `--count-allocs`:
//! mimalloc (the binary's allocator) behind a wrapper that counts what the
//! threads of the app's runtime ask for. Off by default, because two cores
//! adding to one shared counter cost CPU the server figure would include;
//! a counting run is for allocations per call, not for CPU.

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
};

pub struct Counting;

static ENABLED: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // No destructor, so reading it is safe inside the allocator, even
    // while the thread is being torn down.
    static SERVER_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// From now on, allocations on server threads are counted.
pub fn enable() {
    ENABLED.store(true, Relaxed);
}

/// Marks the calling thread as one of the app's (a runtime's
/// `on_thread_start`).
pub fn mark_server_thread() {
    SERVER_THREAD.with(|s| s.set(true));
}

/// (allocations, bytes) so far; `None` when counting is off.
pub fn totals() -> Option<(u64, u64)> {
    ENABLED
        .load(Relaxed)
        .then(|| (ALLOCS.load(Relaxed), BYTES.load(Relaxed)))
}

fn count(size: usize) {
    if ENABLED.load(Relaxed) && SERVER_THREAD.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(size as u64, Relaxed);
    }
}

// SAFETY: every call is passed unchanged to mimalloc, which upholds
// GlobalAlloc's contract; counting touches no memory the caller owns.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}
