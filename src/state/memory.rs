//! The default `StateStore`: a bounded in-process moka cache. The cache
//! itself (`SingleUse`) also keeps link tickets: both are single-use values
//! with a deadline, keyed by 32 random bytes.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::{
    Expiry,
    ops::compute::{CompResult, Op},
    policy::EvictionPolicy,
    sync::Cache,
};
use time::OffsetDateTime;

use super::{PendingLogin, StateError, StateStore, StateToken};

/// A value with a deadline after which taking it is "expired".
pub trait Expiring {
    fn expires_at(&self) -> OffsetDateTime;
}

impl Expiring for PendingLogin {
    fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }
}

/// How close to its eviction deadline a taken entry is removed rather than
/// replaced by a tombstone (see `SingleUse::take`).
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// What the cache holds per key. A taken value leaves a tombstone so a
/// replay is answered "already used" rather than "unknown".
enum Entry<V> {
    Pending(Arc<V>, Instant),
    Consumed(Instant),
}

// Not derived: a derive would demand `V: Clone`, but only the Arc is cloned.
impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        match self {
            Entry::Pending(v, at) => Entry::Pending(v.clone(), *at),
            Entry::Consumed(at) => Entry::Consumed(*at),
        }
    }
}

impl<V> Entry<V> {
    fn evict_at(&self) -> Instant {
        match self {
            Entry::Pending(_, at) | Entry::Consumed(at) => *at,
        }
    }
}

struct EvictAt;

impl<V> Expiry<StateToken, Entry<V>> for EvictAt {
    fn expire_after_create(&self, _: &StateToken, v: &Entry<V>, now: Instant) -> Option<Duration> {
        Some(v.evict_at().saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &StateToken,
        v: &Entry<V>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.evict_at().saturating_duration_since(now))
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

/// Bounded single-use values. moka's sync cache, not its future one: every
/// operation here is a short in-memory step that never waits on I/O, and the
/// async wrapper's per-call futures and housekeeping were a measurable share
/// of BeginLogin. Entries outlive their deadline by `grace` so
/// that a late taker gets "expired" (the user was too slow) instead of
/// "unknown" (possible forgery).
pub struct SingleUse<V> {
    cache: Cache<StateToken, Entry<V>, KeyHasher>,
    count: Count,
    capacity: u64,
    grace: Duration,
}

/// An upper bound on the entries the cache holds, so a burst can never
/// push moka over its capacity and make it evict someone's in-flight login.
///
/// moka's own `entry_count` lags behind inserts, and the exact alternative,
/// an eviction listener, makes moka take a per-key lock on every insert
/// (a quarter of BeginLogin's time in the state store). So inserts are
/// counted here, and removals are learnt only when the bound is reached:
/// `reconcile` lets moka catch up and credits what it has dropped.
#[derive(Default)]
struct Count {
    /// Inserts allowed so far, finished or not.
    claimed: AtomicU64,
    /// Inserts that have returned (their write is queued for moka).
    finished: AtomicU64,
    /// Entries known to be gone: never more than have really been removed.
    removed: AtomicU64,
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
    fn upper_bound(&self) -> u64 {
        let claimed = self.claimed.load(Ordering::SeqCst);
        claimed.saturating_sub(self.removed.load(Ordering::SeqCst))
    }

    /// Claims room for one insert, exactly: concurrent callers race on one
    /// compare-and-swap, so the last free place goes to exactly one of them.
    fn try_reserve(&self, capacity: u64) -> Option<Reservation<'_>> {
        self.claimed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |claimed| {
                let held = claimed.saturating_sub(self.removed.load(Ordering::SeqCst));
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
    fn reconcile<V>(
        &self,
        cache: &Cache<StateToken, Entry<V>, KeyHasher>,
        unless_since: Option<u64>,
    ) where
        V: Send + Sync + 'static,
    {
        let _one = self
            .reconciling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if unless_since.is_none_or(|seen| seen == self.generation()) {
            self.reconcile_locked(cache);
        }
    }

    /// Runs moka's housekeeping and credits the removals it proves: every
    /// insert counted in `before` had queued its write, housekeeping applies
    /// every queued write and drops expired entries, so at most `held` of
    /// those inserts are still in the cache and at least `before - held`
    /// are gone.
    fn reconcile_locked<V>(&self, cache: &Cache<StateToken, Entry<V>, KeyHasher>)
    where
        V: Send + Sync + 'static,
    {
        let before = self.finished.load(Ordering::SeqCst);
        cache.run_pending_tasks();
        let held = cache.entry_count();
        self.removed
            .fetch_max(before.saturating_sub(held), Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl<V: Expiring + Send + Sync + 'static> SingleUse<V> {
    /// The index grows with the entries.
    pub fn new(capacity: u64, grace: Duration) -> Self {
        Self::build(capacity, grace, None)
    }

    /// The index is allocated for `capacity` entries up front and is resident
    /// from the start: 8 B per slot, two slots per entry rounded up to a
    /// power of two, so 16 MiB at the default million.
    /// Growing it instead meant rehashing every table twice as large under
    /// load, a measurable share of BeginLogin while logins pile up
    /// (BENCHMARKS.md).
    pub fn presized(capacity: u64, grace: Duration) -> Self {
        Self::build(
            capacity,
            grace,
            Some(usize::try_from(capacity).unwrap_or(usize::MAX)),
        )
    }

    fn build(capacity: u64, grace: Duration, index_for: Option<usize>) -> Self {
        let mut builder = Cache::builder()
            // A hard bound: memory never grows past `capacity` entries. LRU
            // rather than TinyLFU, whose admission filter could silently drop
            // a state we just handed out. `Count` keeps us below it, so moka
            // never has to evict anything but expired entries.
            .max_capacity(capacity)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EvictAt);
        if let Some(entries) = index_for {
            builder = builder.initial_capacity(entries);
        }
        SingleUse {
            cache: builder.build_with_hasher(KeyHasher::default()),
            count: Count::default(),
            capacity,
            grace,
        }
    }

    fn instant_of(&self, at: OffsetDateTime) -> Instant {
        let remaining = at - OffsetDateTime::now_utc();
        let remaining = Duration::try_from(remaining).unwrap_or(Duration::ZERO);
        Instant::now() + remaining + self.grace
    }

    /// Runs moka's deferred housekeeping (expiry) and updates the count.
    pub fn run_pending_tasks(&self) {
        self.count.reconcile(&self.cache, None);
    }

    pub async fn put(&self, key: StateToken, value: V) -> Result<(), StateError> {
        // Refuse rather than evict: evicting would turn someone's in-flight
        // login into STATE_UNKNOWN without telling anyone.
        let seen = self.count.generation();
        let reservation = match self.count.try_reserve(self.capacity) {
            Some(r) => r,
            None => {
                // Expired entries only leave during moka's housekeeping;
                // let it run before saying no.
                self.count.reconcile(&self.cache, Some(seen));
                self.count
                    .try_reserve(self.capacity)
                    .ok_or(StateError::Full {
                        capacity: self.capacity,
                    })?
            }
        };
        let evict_at = self.instant_of(value.expires_at());
        self.cache
            .insert(key, Entry::Pending(Arc::new(value), evict_at));
        drop(reservation);
        Ok(())
    }

    /// Exactly one concurrent caller gets the value.
    pub async fn take(&self, key: &StateToken, now: OffsetDateTime) -> Result<V, StateError>
    where
        V: Clone,
    {
        // and_compute_with runs the closure under a per-key lock, so exactly
        // one concurrent caller sees `Pending` and leaves the tombstone.
        let mut taken = None;
        let result = self.cache.entry(*key).and_compute_with(|current| {
            match current.map(|e| e.into_value()) {
                Some(Entry::Pending(login, evict_at)) => {
                    taken = Some(login);
                    // Housekeeping does not wait for this closure: if it
                    // dropped the entry at its deadline in the meantime, a
                    // Put would add an entry nobody reserved room for. So at
                    // the deadline the entry is removed instead; a replay
                    // then hears "unknown", as it would a moment later.
                    if evict_at <= Instant::now() + DEADLINE_MARGIN {
                        Op::Remove
                    } else {
                        Op::Put(Entry::Consumed(evict_at))
                    }
                }
                Some(Entry::Consumed(_)) | None => Op::Nop,
            }
        });
        match taken {
            Some(value) if value.expires_at() <= now => Err(StateError::Expired),
            Some(value) => Ok(Arc::unwrap_or_clone(value)),
            None => match result {
                CompResult::Unchanged(e) if matches!(e.value(), Entry::Consumed(_)) => {
                    Err(StateError::AlreadyUsed)
                }
                _ => Err(StateError::Unknown),
            },
        }
    }

    /// Entries held, after letting moka drop the expired ones. Exact when
    /// no insert is under way; otherwise it may count those too.
    pub fn len(&self) -> u64 {
        self.count.reconcile(&self.cache, None);
        self.count.upper_bound()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pending logins in this process.
pub struct MemoryStateStore(SingleUse<PendingLogin>);

impl MemoryStateStore {
    /// Every BeginLogin inserts here, so its index is sized for `capacity`
    /// from the start (see `SingleUse::presized`).
    pub fn new(capacity: u64, grace: Duration) -> Self {
        MemoryStateStore(SingleUse::presized(capacity, grace))
    }

    /// Runs moka's deferred housekeeping; the load generator calls it before
    /// measuring memory.
    pub async fn run_pending_tasks(&self) {
        self.0.run_pending_tasks();
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    async fn put(&self, login: PendingLogin) -> Result<(), StateError> {
        self.0.put(login.state, login).await
    }

    async fn take(
        &self,
        state: &StateToken,
        now: OffsetDateTime,
    ) -> Result<PendingLogin, StateError> {
        self.0.take(state, now).await
    }

    fn len(&self) -> u64 {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PkceVerifier;

    fn login(ttl: time::Duration) -> PendingLogin {
        let now = OffsetDateTime::now_utc();
        PendingLogin {
            state: StateToken::generate().unwrap(),
            provider: "p".into(),
            redirect_uri: "https://app.example/cb".into(),
            scopes: Arc::from(Vec::<String>::new()),
            return_to: None,
            pkce: Some(PkceVerifier::generate().unwrap()),
            nonce: None,
            created_at: now,
            expires_at: now + ttl,
        }
    }

    #[tokio::test]
    async fn take_is_single_use() {
        let store = MemoryStateStore::new(10, Duration::from_secs(60));
        let l = login(time::Duration::minutes(10));
        let s = l.state;
        store.put(l).await.unwrap();
        let now = OffsetDateTime::now_utc();
        assert_eq!(store.take(&s, now).await.unwrap().state, s);
        assert!(matches!(
            store.take(&s, now).await,
            Err(StateError::AlreadyUsed)
        ));
        let other = StateToken::generate().unwrap();
        assert!(matches!(
            store.take(&other, now).await,
            Err(StateError::Unknown)
        ));
    }

    #[tokio::test]
    async fn expired_state_is_reported_as_expired_then_used() {
        let store = MemoryStateStore::new(10, Duration::from_secs(60));
        let l = login(time::Duration::minutes(1));
        let s = l.state;
        store.put(l).await.unwrap();
        let later = OffsetDateTime::now_utc() + time::Duration::minutes(2);
        assert!(matches!(
            store.take(&s, later).await,
            Err(StateError::Expired)
        ));
        // The expired attempt still consumed it.
        assert!(matches!(
            store.take(&s, later).await,
            Err(StateError::AlreadyUsed)
        ));
    }

    #[tokio::test]
    async fn concurrent_takes_have_one_winner() {
        let store = Arc::new(MemoryStateStore::new(10, Duration::from_secs(60)));
        let l = login(time::Duration::minutes(10));
        let s = l.state;
        store.put(l).await.unwrap();
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.take(&s, OffsetDateTime::now_utc()).await })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => wins += 1,
                Err(StateError::AlreadyUsed) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(wins, 1);
    }

    #[tokio::test]
    async fn refuses_when_full() {
        let store = MemoryStateStore::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            store.put(login(time::Duration::minutes(10))).await.unwrap();
        }
        assert!(matches!(
            store.put(login(time::Duration::minutes(10))).await,
            Err(StateError::Full { capacity: 3 })
        ));
        assert_eq!(store.len(), 3);
    }

    /// Many callers racing for the last places: exactly `capacity` win, and
    /// every winner's entry is still there (moka evicted nobody).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_bound_is_exact_under_contention() {
        const CAPACITY: u64 = 2_000;
        let store = Arc::new(MemoryStateStore::new(CAPACITY, Duration::from_secs(60)));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut won = Vec::new();
                    for _ in 0..500 {
                        let l = login(time::Duration::minutes(10));
                        let s = l.state;
                        match store.put(l).await {
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
        assert_eq!(store.len(), CAPACITY);
        let now = OffsetDateTime::now_utc();
        for s in &won {
            assert!(store.take(s, now).await.is_ok());
        }
    }

    /// Entries expiring while others arrive: places come back, and no
    /// accepted entry is lost before its deadline (moka's own bound would
    /// evict one silently if the count let the cache overflow).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_entries_make_room_under_load() {
        const CAPACITY: u64 = 50;
        let store = MemoryStateStore::new(CAPACITY, Duration::ZERO);
        let (mut accepted, mut refused) = (Vec::new(), 0);
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(3_500) {
            let l = login(time::Duration::milliseconds(1_500));
            let (s, deadline) = (l.state, Instant::now() + Duration::from_millis(1_400));
            match store.put(l).await {
                Ok(()) => accepted.push((s, deadline)),
                Err(StateError::Full { .. }) => refused += 1,
                Err(e) => panic!("unexpected {e}"),
            }
            store.0.cache.run_pending_tasks();
            // Every accepted entry still before its deadline is still there.
            let now = Instant::now();
            for (s, _) in accepted.iter().filter(|(_, d)| *d > now) {
                assert!(
                    store.0.cache.contains_key(s),
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

    /// A take within the margin of the entry's deadline removes it rather
    /// than leaving a tombstone that a racing eviction could turn into an
    /// entry nobody reserved; the replay hears "unknown".
    #[tokio::test]
    async fn a_take_at_the_deadline_leaves_no_extra_entry() {
        let store = MemoryStateStore::new(10, Duration::ZERO);
        // Taken "as of" before it was created, so a slow test machine cannot
        // turn this into an expired take; the margin check uses real time.
        let now = OffsetDateTime::now_utc();
        let l = login(time::Duration::milliseconds(50));
        let s = l.state;
        store.put(l).await.unwrap();
        // Within the margin of its deadline: removed, not tombstoned.
        assert!(store.take(&s, now).await.is_ok());
        store.0.cache.run_pending_tasks();
        assert!(!store.0.cache.contains_key(&s));
        assert!(matches!(
            store.take(&s, now).await,
            Err(StateError::Unknown)
        ));
    }

    #[tokio::test]
    async fn room_comes_back_when_entries_expire() {
        let store = MemoryStateStore::new(2, Duration::ZERO);
        for _ in 0..2 {
            store
                .put(login(time::Duration::milliseconds(50)))
                .await
                .unwrap();
        }
        assert!(store.put(login(time::Duration::minutes(1))).await.is_err());
        // moka's timer wheel has a granularity of about a second.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        store.put(login(time::Duration::minutes(1))).await.unwrap();
        assert_eq!(store.len(), 1);
    }
}
