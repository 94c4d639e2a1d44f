//! The default `StateStore`: bounded in-process moka caches, one per kind
//! (pending logins, link tickets). Nothing survives a restart and nothing is
//! shared between replicas; see `postgres` and `redis` for that.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::{Expiry, ops::compute::Op, policy::EvictionPolicy, sync::Cache};
use time::OffsetDateTime;

use super::{Claimed, Fingerprint, Kind, Pending, StateError, StateLimits, StateStore, StateToken};

/// How close to its eviction deadline an entry is removed rather than
/// replaced (see `Slots::transition`).
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// Room moka gets above `capacity`. `Count` admits at most `capacity`
/// entries, but it learns of a removal an instant before moka applies it,
/// so a burst of finishing logins could let a few more in; moka must never
/// evict a live entry to make room for them.
const MOKA_SLACK: u64 = 4_096;

/// A live entry: pending, or claimed by an attempt.
enum Slot {
    Pending(Arc<Pending>, Instant),
    Claimed(Arc<Claim>),
}

struct Claim {
    pending: Arc<Pending>,
    fingerprint: Fingerprint,
    attempt: u32,
    /// Until then a retry hears "in progress"; `release` sets it to now.
    lease_until: Instant,
    /// When the entry is dropped (end of the retry window, at the earliest
    /// the pending entry's own deadline).
    evict_at: Instant,
    progress: Option<Arc<[u8]>>,
}

impl Clone for Slot {
    fn clone(&self) -> Self {
        match self {
            Slot::Pending(v, at) => Slot::Pending(v.clone(), *at),
            Slot::Claimed(c) => Slot::Claimed(c.clone()),
        }
    }
}

impl Slot {
    fn evict_at(&self) -> Instant {
        match self {
            Slot::Pending(_, at) => *at,
            Slot::Claimed(c) => c.evict_at,
        }
    }
}

/// moka's per-entry expiry for live slots and tombstones alike.
trait Deadline {
    fn deadline(&self) -> Instant;
}

impl Deadline for Slot {
    fn deadline(&self) -> Instant {
        self.evict_at()
    }
}

impl Deadline for Instant {
    fn deadline(&self) -> Instant {
        *self
    }
}

struct EvictAt;

impl<V: Deadline> Expiry<StateToken, V> for EvictAt {
    fn expire_after_create(&self, _: &StateToken, v: &V, now: Instant) -> Option<Duration> {
        Some(v.deadline().saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &StateToken,
        v: &V,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.deadline().saturating_duration_since(now))
    }
}

/// The keys are 32 bytes from the OS RNG, so any 8 of them are already a
/// uniform hash; SipHash over all 32 was a measurable share of BeginLogin.
#[derive(Clone, Default)]
struct RandomKeyHasher(u64);

impl std::hash::Hasher for RandomKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Fold everything in, so a non-random key still hashes sanely.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

type KeyHasher = std::hash::BuildHasherDefault<RandomKeyHasher>;

/// An upper bound on the live entries, so a burst can never push moka over
/// its capacity and make it evict someone's in-flight login.
///
/// moka's own `entry_count` lags behind inserts, and the exact alternative,
/// an eviction listener, makes moka take a per-key lock on every insert
/// (a quarter of BeginLogin's time in the state store). So inserts are
/// counted here, finished entries are counted as they go, and expiries are
/// learnt only when the bound is reached: `reconcile` lets moka catch up and
/// credits what it has dropped.
#[derive(Default)]
struct Count {
    /// Inserts allowed so far, finished or not.
    claimed: AtomicU64,
    /// Inserts that have returned (their write is queued for moka).
    finished: AtomicU64,
    /// Entries we removed ourselves (finish, cancel, expired claim),
    /// counted when the removal is decided, just before moka applies it.
    taken: AtomicU64,
    /// Entries known to have expired: never more than really have.
    expired: AtomicU64,
    /// Reconciliations completed, so callers refused together share one.
    generation: AtomicU64,
    /// One reconciliation at a time.
    reconciling: Mutex<()>,
}

/// Room claimed for one insert; dropping it marks the insert finished, so
/// a claim is never lost, even if the insert panics.
struct Reservation<'a>(&'a Count);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl Count {
    fn gone(&self) -> u64 {
        self.taken.load(Ordering::SeqCst) + self.expired.load(Ordering::SeqCst)
    }

    fn upper_bound(&self) -> u64 {
        self.claimed
            .load(Ordering::SeqCst)
            .saturating_sub(self.gone())
    }

    /// Claims room for one insert, exactly: concurrent callers race on one
    /// compare-and-swap, so the last free place goes to exactly one of them.
    fn try_reserve(&self, capacity: u64) -> Option<Reservation<'_>> {
        self.claimed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |claimed| {
                let held = claimed.saturating_sub(self.gone());
                (held < capacity).then_some(claimed + 1)
            })
            .ok()
            .map(|_| Reservation(self))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Reconciles; with `unless_since`, not if another reconciliation
    /// finished after the caller read that generation: a flood of refused
    /// inserts then runs moka's housekeeping once per wave, not per caller.
    fn reconcile(&self, cache: &Cache<StateToken, Slot, KeyHasher>, unless_since: Option<u64>) {
        let _one = self
            .reconciling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if unless_since.is_none_or(|seen| seen == self.generation()) {
            self.reconcile_locked(cache);
        }
    }

    /// Runs moka's housekeeping and credits the expiries it proves. Every
    /// insert counted in `before` had queued its write and housekeeping
    /// applies every queued write, so at most `held` of them are still in
    /// the cache: at least `before - held` are gone. Of those, at most
    /// `taken` (read afterwards, and counted before moka applies each
    /// removal) went by our own hand; the rest expired.
    fn reconcile_locked(&self, cache: &Cache<StateToken, Slot, KeyHasher>) {
        let before = self.finished.load(Ordering::SeqCst);
        cache.run_pending_tasks();
        let held = cache.entry_count();
        let taken = self.taken.load(Ordering::SeqCst);
        self.expired.fetch_max(
            before.saturating_sub(held).saturating_sub(taken),
            Ordering::SeqCst,
        );
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a transition decided, for the caller to turn into an answer.
enum Outcome {
    Claimed(Box<Claimed>),
    Done,
    Expired,
    AlreadyUsed,
    InProgress,
    /// No live entry; the tombstones decide between unknown and used.
    Missing,
}

/// The entries of one kind: live ones bounded by `capacity`, finished ones
/// as tombstones in a cache of their own, so that finishing a login frees
/// its place at once while a replay still hears "already used".
struct Slots {
    live: Cache<StateToken, Slot, KeyHasher>,
    /// Finished entries until their grace ends. Bounded by `capacity` too;
    /// when full the oldest tombstone goes first, and a replay of that
    /// state hears "unknown" instead of "already used": both refuse it.
    used: Cache<StateToken, Instant, KeyHasher>,
    count: Count,
    limits: StateLimits,
}

impl Slots {
    fn new(limits: StateLimits, presize: bool) -> Self {
        let mut builder = Cache::builder()
            // A hard bound: memory never grows past it. LRU rather than
            // TinyLFU, whose admission filter could silently drop a state
            // we just handed out. `Count` keeps us below it, so moka never
            // has to evict anything but expired entries.
            .max_capacity(limits.capacity.saturating_add(MOKA_SLACK))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EvictAt);
        if presize {
            // Allocated for `capacity` entries up front: 8 B per slot, two
            // slots per entry rounded up to a power of two, so 16 MiB at the
            // default million. Growing it instead meant rehashing every
            // table twice as large under load, a measurable share of
            // BeginLogin while logins pile up (BENCHMARKS.md).
            builder =
                builder.initial_capacity(usize::try_from(limits.capacity).unwrap_or(usize::MAX));
        }
        Slots {
            live: builder.build_with_hasher(KeyHasher::default()),
            used: Cache::builder()
                .max_capacity(limits.capacity)
                .eviction_policy(EvictionPolicy::lru())
                .expire_after(EvictAt)
                .build_with_hasher(KeyHasher::default()),
            count: Count::default(),
            limits,
        }
    }

    fn instant_of(&self, at: OffsetDateTime) -> Instant {
        let remaining = at - OffsetDateTime::now_utc();
        let remaining = Duration::try_from(remaining).unwrap_or(Duration::ZERO);
        Instant::now() + remaining
    }

    fn put(&self, token: &StateToken, pending: Pending) -> Result<(), StateError> {
        // Refuse rather than evict: evicting would turn someone's in-flight
        // login into STATE_UNKNOWN without telling anyone.
        let seen = self.count.generation();
        let reservation = match self.count.try_reserve(self.limits.capacity) {
            Some(r) => r,
            None => {
                // Expired entries only leave during moka's housekeeping;
                // let it run before saying no.
                self.count.reconcile(&self.live, Some(seen));
                self.count
                    .try_reserve(self.limits.capacity)
                    .ok_or(StateError::Full {
                        capacity: self.limits.capacity,
                    })?
            }
        };
        let evict_at = self.instant_of(pending.expires_at()) + self.limits.grace;
        self.live
            .insert(*token, Slot::Pending(Arc::new(pending), evict_at));
        drop(reservation);
        Ok(())
    }

    /// Runs `decide` on the live entry under moka's per-key lock, so exactly
    /// one concurrent caller sees any given state of it. `decide` returns
    /// the new slot (`None` finishes the entry) and the answer.
    fn transition(
        &self,
        token: &StateToken,
        decide: impl FnOnce(&Slot, Instant) -> (Option<Option<Slot>>, Outcome),
    ) -> Outcome {
        let mut outcome = Outcome::Missing;
        self.live.entry(*token).and_compute_with(|current| {
            let Some(slot) = current.map(|e| e.into_value()) else {
                return Op::Nop;
            };
            let now = Instant::now();
            let (change, answer) = decide(&slot, now);
            outcome = answer;
            match change {
                None => Op::Nop,
                Some(None) => {
                    // Counted before moka applies it: see `Count::reconcile_locked`.
                    self.count.taken.fetch_add(1, Ordering::SeqCst);
                    // The tombstone goes in while this entry is still locked:
                    // a claim that finds the entry gone must find the
                    // tombstone, or a replay racing the finish is told
                    // STATE_UNKNOWN instead of STATE_ALREADY_USED.
                    self.used
                        .insert(*token, slot.evict_at().max(now + DEADLINE_MARGIN));
                    Op::Remove
                }
                // Housekeeping does not wait for this closure: if it dropped
                // the entry at its deadline in the meantime, a Put would add
                // an entry nobody reserved room for. So at the deadline the
                // entry is finished instead, as it would be a moment later.
                Some(Some(_)) if slot.evict_at() <= now + DEADLINE_MARGIN => {
                    self.count.taken.fetch_add(1, Ordering::SeqCst);
                    outcome = Outcome::AlreadyUsed;
                    Op::Remove
                }
                Some(Some(next)) => Op::Put(next),
            }
        });
        outcome
    }

    fn answer(&self, token: &StateToken, outcome: Outcome) -> Result<Option<Claimed>, StateError> {
        match outcome {
            Outcome::Claimed(c) => Ok(Some(*c)),
            Outcome::Done => Ok(None),
            Outcome::Expired => Err(StateError::Expired),
            Outcome::AlreadyUsed => Err(StateError::AlreadyUsed),
            Outcome::InProgress => Err(StateError::InProgress),
            Outcome::Missing if self.used.contains_key(token) => Err(StateError::AlreadyUsed),
            Outcome::Missing => Err(StateError::Unknown),
        }
    }

    fn claim(
        &self,
        token: &StateToken,
        fingerprint: &Fingerprint,
        now: OffsetDateTime,
    ) -> Result<Claimed, StateError> {
        let limits = self.limits;
        let outcome = self.transition(token, |slot, at| match slot {
            Slot::Pending(pending, _) if pending.expires_at() <= now => {
                (Some(None), Outcome::Expired)
            }
            Slot::Pending(pending, evict_at) => {
                let claim = Claim {
                    pending: pending.clone(),
                    fingerprint: *fingerprint,
                    attempt: 1,
                    lease_until: at + limits.lease,
                    evict_at: (*evict_at).max(at + limits.retry_window),
                    progress: None,
                };
                let answer = Outcome::Claimed(Box::new(Claimed {
                    pending: Pending::clone(pending),
                    attempt: 1,
                    progress: None,
                }));
                (Some(Some(Slot::Claimed(Arc::new(claim)))), answer)
            }
            Slot::Claimed(c) if c.fingerprint != *fingerprint => (None, Outcome::AlreadyUsed),
            Slot::Claimed(c) if c.lease_until > at => (None, Outcome::InProgress),
            Slot::Claimed(c) => {
                let next = Claim {
                    pending: c.pending.clone(),
                    fingerprint: c.fingerprint,
                    attempt: c.attempt + 1,
                    lease_until: at + limits.lease,
                    evict_at: c.evict_at,
                    progress: c.progress.clone(),
                };
                let answer = Outcome::Claimed(Box::new(Claimed {
                    pending: Pending::clone(&c.pending),
                    attempt: next.attempt,
                    progress: c.progress.as_deref().map(<[u8]>::to_vec),
                }));
                (Some(Some(Slot::Claimed(Arc::new(next)))), answer)
            }
        });
        self.answer(token, outcome)?.ok_or(StateError::Unknown)
    }

    fn release(&self, token: &StateToken, attempt: u32, progress: Option<Vec<u8>>) {
        let progress: Option<Arc<[u8]>> = progress.map(Arc::from);
        self.transition(token, |slot, at| match slot {
            Slot::Claimed(c) if c.attempt == attempt => {
                let next = Claim {
                    pending: c.pending.clone(),
                    fingerprint: c.fingerprint,
                    attempt,
                    lease_until: at,
                    evict_at: c.evict_at,
                    progress,
                };
                (Some(Some(Slot::Claimed(Arc::new(next)))), Outcome::Done)
            }
            _ => (None, Outcome::Done),
        });
    }

    fn finish(&self, token: &StateToken, attempt: u32) {
        self.transition(token, |slot, _| match slot {
            Slot::Claimed(c) if c.attempt == attempt => (Some(None), Outcome::Done),
            _ => (None, Outcome::Done),
        });
    }

    fn cancel(&self, token: &StateToken, now: OffsetDateTime) -> Result<(), StateError> {
        let outcome = self.transition(token, |slot, _| match slot {
            Slot::Pending(pending, _) if pending.expires_at() <= now => {
                (Some(None), Outcome::Expired)
            }
            _ => (Some(None), Outcome::Done),
        });
        self.answer(token, outcome).map(|_| ())
    }

    fn held(&self) -> u64 {
        self.count.reconcile(&self.live, None);
        self.count.upper_bound()
    }
}

/// Pending logins and link tickets in this process.
pub struct MemoryStateStore {
    logins: Slots,
    tickets: Slots,
}

impl MemoryStateStore {
    /// Every BeginLogin inserts a login, so that index is sized for
    /// `capacity` from the start; tickets are rare and grow theirs.
    pub fn new(limits: StateLimits) -> Self {
        MemoryStateStore {
            logins: Slots::new(limits, true),
            tickets: Slots::new(limits, false),
        }
    }

    fn slots(&self, kind: Kind) -> &Slots {
        match kind {
            Kind::Login => &self.logins,
            Kind::Ticket => &self.tickets,
        }
    }

    /// Runs moka's deferred housekeeping; the load generator calls it before
    /// measuring memory.
    pub fn run_pending_tasks(&self) {
        for slots in [&self.logins, &self.tickets] {
            slots.count.reconcile(&slots.live, None);
            slots.used.run_pending_tasks();
        }
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn put(&self, token: &StateToken, pending: Pending) -> Result<(), StateError> {
        self.slots(pending.kind()).put(token, pending)
    }

    async fn claim(
        &self,
        kind: Kind,
        token: &StateToken,
        fingerprint: &Fingerprint,
        now: OffsetDateTime,
    ) -> Result<Claimed, StateError> {
        self.slots(kind).claim(token, fingerprint, now)
    }

    async fn release(
        &self,
        kind: Kind,
        token: &StateToken,
        attempt: u32,
        progress: Option<Vec<u8>>,
    ) -> Result<(), StateError> {
        self.slots(kind).release(token, attempt, progress);
        Ok(())
    }

    async fn finish(&self, kind: Kind, token: &StateToken, attempt: u32) -> Result<(), StateError> {
        self.slots(kind).finish(token, attempt);
        Ok(())
    }

    async fn cancel(
        &self,
        kind: Kind,
        token: &StateToken,
        now: OffsetDateTime,
    ) -> Result<(), StateError> {
        self.slots(kind).cancel(token, now)
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }

    async fn held(&self) -> Result<u64, StateError> {
        Ok(self.logins.held() + self.tickets.held())
    }
}

#[cfg(test)]
mod tests {
    //! What only the memory backend has: moka's housekeeping and the count
    //! that keeps moka from ever evicting a live entry. The shared contract
    //! is `state::conformance`, run on every backend by `tests/service/state.rs`.
    use super::*;
    use crate::state::conformance;

    fn limits(capacity: u64, grace: Duration) -> StateLimits {
        StateLimits {
            capacity,
            grace,
            ..StateLimits::with_capacity(capacity)
        }
    }

    fn fp() -> Fingerprint {
        Fingerprint::of(&["code"])
    }

    /// Many callers racing for the last places: exactly `capacity` win, and
    /// every winner's entry is still there (moka evicted nobody).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_bound_is_exact_under_contention() {
        const CAPACITY: u64 = 2_000;
        let store = Arc::new(MemoryStateStore::new(limits(
            CAPACITY,
            Duration::from_secs(60),
        )));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut won = Vec::new();
                    for _ in 0..500 {
                        let (s, l) = conformance::login(time::Duration::minutes(10));
                        match store.put(&s, l).await {
                            Ok(()) => won.push(s),
                            Err(StateError::Full { capacity }) => assert_eq!(capacity, CAPACITY),
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        let mut won = Vec::new();
        for t in tasks {
            won.extend(t.await.unwrap());
        }
        assert_eq!(won.len() as u64, CAPACITY);
        assert_eq!(store.held().await.unwrap(), CAPACITY);
        let now = OffsetDateTime::now_utc();
        for s in &won {
            assert!(store.claim(Kind::Login, s, &fp(), now).await.is_ok());
        }
    }

    /// A replay racing the finish of the login it replays: the replay must
    /// see the login in progress or used, never an unknown state (the
    /// tombstone was once written after the entry was gone, and one replay
    /// in a few thousand read STATE_UNKNOWN in between).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_replay_racing_the_finish_is_never_unknown() {
        let store = Arc::new(MemoryStateStore::new(limits(
            100_000,
            Duration::from_secs(60),
        )));
        let replayer = Fingerprint::of(&["another code"]);
        for _ in 0..2_000 {
            let (s, l) = conformance::login(time::Duration::minutes(10));
            store.put(&s, l).await.unwrap();
            let now = OffsetDateTime::now_utc();
            let c = store.claim(Kind::Login, &s, &fp(), now).await.unwrap();
            let replay = {
                let (store, s) = (store.clone(), s);
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    for _ in 0..20 {
                        answers.push(store.claim(Kind::Login, &s, &replayer, now).await.err());
                        tokio::task::yield_now().await;
                    }
                    answers
                })
            };
            store.finish(Kind::Login, &s, c.attempt).await.unwrap();
            for answer in replay.await.unwrap() {
                assert!(
                    matches!(answer, Some(StateError::AlreadyUsed)),
                    "a replay got {answer:?}"
                );
            }
        }
    }

    /// Logins finishing while others arrive at capacity: each finish gives a
    /// place back at once, and no live entry is ever evicted to make room.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn finishing_under_load_frees_places_and_evicts_nobody() {
        const CAPACITY: u64 = 200;
        let store = Arc::new(MemoryStateStore::new(limits(
            CAPACITY,
            Duration::from_secs(60),
        )));
        let mut live = std::collections::VecDeque::new();
        for round in 0..5_000u32 {
            let (s, l) = conformance::login(time::Duration::minutes(10));
            store.put(&s, l).await.unwrap_or_else(|e| {
                panic!("round {round}: a finished login did not free its place: {e}")
            });
            live.push_back(s);
            if live.len() as u64 == CAPACITY {
                let done = live.pop_front().unwrap();
                let c = store
                    .claim(Kind::Login, &done, &fp(), OffsetDateTime::now_utc())
                    .await
                    .unwrap();
                store.finish(Kind::Login, &done, c.attempt).await.unwrap();
            }
        }
        store.logins.live.run_pending_tasks();
        for s in &live {
            assert!(
                store.logins.live.contains_key(s),
                "a live entry was evicted"
            );
        }
    }

    /// Entries expiring while others arrive: places come back, and no
    /// accepted entry is lost before its deadline (moka's own bound would
    /// evict one silently if the count let the cache overflow).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_entries_make_room_under_load() {
        const CAPACITY: u64 = 50;
        let store = MemoryStateStore::new(limits(CAPACITY, Duration::ZERO));
        let (mut accepted, mut refused) = (Vec::new(), 0);
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(3_500) {
            let (s, l) = conformance::login(time::Duration::milliseconds(1_500));
            let deadline = Instant::now() + Duration::from_millis(1_400);
            match store.put(&s, l).await {
                Ok(()) => accepted.push((s, deadline)),
                Err(StateError::Full { .. }) => refused += 1,
                Err(e) => panic!("unexpected {e}"),
            }
            store.logins.live.run_pending_tasks();
            // Every accepted entry still before its deadline is still there.
            let now = Instant::now();
            for (s, _) in accepted.iter().filter(|(_, d)| *d > now) {
                assert!(
                    store.logins.live.contains_key(s),
                    "an unexpired entry was evicted"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Roughly a second and a half per round of 50, plus moka's
        // timer granularity of about a second.
        assert!(
            accepted.len() as u64 > CAPACITY,
            "accepted {}",
            accepted.len()
        );
        assert!(refused > 0);
    }

    /// A claim within the margin of the entry's deadline finishes it rather
    /// than putting a claim that a racing eviction could turn into an entry
    /// nobody reserved; the caller hears "already used".
    #[tokio::test]
    async fn a_claim_at_the_deadline_leaves_no_extra_entry() {
        let store = MemoryStateStore::new(limits(10, Duration::ZERO));
        // Claimed "as of" before it was created, so a slow test machine
        // cannot turn this into an expired claim; the margin uses real time.
        let now = OffsetDateTime::now_utc();
        let (s, l) = conformance::login(time::Duration::milliseconds(50));
        store.put(&s, l).await.unwrap();
        let mut short = store.logins.limits;
        short.retry_window = Duration::ZERO;
        let store = MemoryStateStore {
            logins: Slots {
                limits: short,
                ..store.logins
            },
            tickets: store.tickets,
        };
        assert!(matches!(
            store.claim(Kind::Login, &s, &fp(), now).await,
            Err(StateError::AlreadyUsed)
        ));
        store.logins.live.run_pending_tasks();
        assert!(!store.logins.live.contains_key(&s));
        assert_eq!(store.held().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn room_comes_back_when_entries_expire() {
        let store = MemoryStateStore::new(limits(2, Duration::ZERO));
        for _ in 0..2 {
            let (s, l) = conformance::login(time::Duration::milliseconds(50));
            store.put(&s, l).await.unwrap();
        }
        let (s, l) = conformance::login(time::Duration::minutes(1));
        assert!(store.put(&s, l.clone()).await.is_err());
        // moka's timer wheel has a granularity of about a second.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        store.put(&s, l).await.unwrap();
        assert_eq!(store.held().await.unwrap(), 1);
    }

    /// Tombstones have their own bound: past it the oldest replay hears
    /// "unknown" rather than "already used", and live capacity is untouched.
    #[tokio::test]
    async fn tombstones_are_bounded_separately() {
        let store = MemoryStateStore::new(limits(3, Duration::from_secs(60)));
        let mut finished = Vec::new();
        for _ in 0..10 {
            let (s, l) = conformance::login(time::Duration::minutes(10));
            store.put(&s, l).await.unwrap();
            let c = store
                .claim(Kind::Login, &s, &fp(), OffsetDateTime::now_utc())
                .await
                .unwrap();
            store.finish(Kind::Login, &s, c.attempt).await.unwrap();
            finished.push(s);
        }
        store.logins.used.run_pending_tasks();
        assert!(store.logins.used.entry_count() <= 3);
        assert_eq!(store.held().await.unwrap(), 0);
        let last = finished.last().unwrap();
        assert!(matches!(
            store
                .claim(Kind::Login, last, &fp(), OffsetDateTime::now_utc())
                .await,
            Err(StateError::AlreadyUsed)
        ));
    }
}
