//! Memory per pending login: the resident set grows by how much when a
//! million logins are pending? Measured in-process through `LoginService`
//! (no gRPC: the question is what the state store holds, not what a call
//! costs) on an app of its own, before any gRPC traffic, so the heap is fresh
//! and the delta cannot be hidden by memory an earlier run freed.
//!
//! The baseline is taken before the app is built, with `max_pending` equal
//! to the logins held: the state store sizes its index for its capacity when
//! it is created, and that index is part of what a million pending logins
//! cost.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::Context;
use authbroker::{
    app::Application,
    config::{Mode, Settings},
    login::BeginLogin,
    state::{PendingLogin, StateStore},
};

/// Used when sysconf cannot say (it always can on Linux).
const FALLBACK_PAGE_SIZE: u64 = 4096;

pub struct MemoryReport {
    pub requested: u64,
    /// What the state store reports holding after its housekeeping.
    pub entries: u64,
    pub page_size: u64,
    pub page_size_assumed: bool,
    /// Before the app exists.
    pub rss_start: u64,
    /// The app built, its state store (and index) created, nothing pending.
    pub rss_before: u64,
    pub rss_held: u64,
    pub rss_after_drop: u64,
    /// After `mi_collect(true)`: how much mimalloc was keeping for reuse.
    pub rss_after_trim: u64,
    pub elapsed: Duration,
    pub pending_login_size: usize,
}

impl MemoryReport {
    /// Everything the held logins cost, the index sized for them included.
    pub fn delta(&self) -> i64 {
        self.rss_held as i64 - self.rss_start as i64
    }

    /// What the app holds before any login: mostly the state store's index.
    pub fn startup(&self) -> i64 {
        self.rss_before as i64 - self.rss_start as i64
    }

    pub fn bytes_per_login(&self) -> f64 {
        self.delta() as f64 / self.entries.max(1) as f64
    }
}

pub async fn measure(mut settings: Settings, pending: u64) -> anyhow::Result<MemoryReport> {
    // Exactly as many as are held: the bound is exact, so none is refused.
    settings.login.max_pending = pending;
    let (page_size, page_size_assumed) = page_size();
    let rss_start = rss(page_size)?;
    let app = Application::build(settings, Mode::Serve)
        .await
        .context("cannot build the app for the memory measurement")?;
    let login = app.login_service();
    let states = app
        .memory_state_store()
        .context("the memory measurement needs state.backend = \"memory\"")?;

    states.run_pending_tasks();
    let rss_before = rss(page_size)?;
    let started = Instant::now();
    for i in 0..pending {
        let request = BeginLogin {
            provider: "sandbox".into(),
            ..Default::default()
        };
        login
            .begin(request, None)
            .await
            .with_context(|| format!("BeginLogin (in-process) number {i}"))?;
    }
    // moka applies inserts to its policy lazily; flush so the count and
    // the memory are those of a settled cache.
    states.run_pending_tasks();
    let elapsed = started.elapsed();
    let rss_held = rss(page_size)?;
    let entries = states.held().await?;

    drop((states, login, app));
    let rss_after_drop = rss(page_size)?;
    trim();
    let rss_after_trim = rss(page_size)?;
    Ok(MemoryReport {
        requested: pending,
        entries,
        page_size,
        page_size_assumed,
        rss_start,
        rss_before,
        rss_held,
        rss_after_drop,
        rss_after_trim,
        elapsed,
        pending_login_size: std::mem::size_of::<PendingLogin>(),
    })
}

/// Resident bytes: the second field of /proc/self/statm is in pages.
fn rss(page_size: u64) -> anyhow::Result<u64> {
    let statm = fs::read_to_string("/proc/self/statm").context("cannot read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("unexpected /proc/self/statm format")?;
    Ok(pages * page_size)
}

/// (page size, whether it was assumed rather than asked).
fn page_size() -> (u64, bool) {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    match u64::try_from(size) {
        Ok(s) if s > 0 => (s, false),
        _ => (FALLBACK_PAGE_SIZE, true),
    }
}

/// Asks mimalloc (the binary's allocator, and ours) to return the memory it
/// keeps for reuse to the kernel.
fn trim() {
    // SAFETY: mi_collect only walks mimalloc's own heaps; `true` forces it
    // to return what it can.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
