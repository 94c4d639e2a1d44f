//! The default `StateStore`: a bounded in-process moka cache.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::{
    Expiry,
    future::Cache,
    ops::compute::{CompResult, Op},
    policy::EvictionPolicy,
};
use time::OffsetDateTime;

use super::{PendingLogin, StateError, StateStore, StateToken};

/// What the cache holds per state. A finished login leaves a tombstone so a
/// replay is answered "already used" rather than "unknown".
#[derive(Clone)]
enum Entry {
    Pending(Arc<PendingLogin>, Instant),
    Consumed(Instant),
}

impl Entry {
    fn evict_at(&self) -> Instant {
        match self {
            Entry::Pending(_, at) | Entry::Consumed(at) => *at,
        }
    }
}

struct EvictAt;

impl Expiry<StateToken, Entry> for EvictAt {
    fn expire_after_create(&self, _: &StateToken, v: &Entry, now: Instant) -> Option<Duration> {
        Some(v.evict_at().saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &StateToken,
        v: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.evict_at().saturating_duration_since(now))
    }
}

/// Entries outlive their TTL by `grace` so that a late CompleteLogin gets
/// "expired" (the user was too slow) instead of "unknown" (possible forgery).
pub struct MemoryStateStore {
    cache: Cache<StateToken, Entry>,
    capacity: u64,
    grace: Duration,
}

impl MemoryStateStore {
    pub fn new(capacity: u64, grace: Duration) -> Self {
        let cache = Cache::builder()
            // A hard bound: memory never grows past `capacity` entries. LRU
            // rather than TinyLFU, whose admission filter could silently drop
            // a state we just handed out.
            .max_capacity(capacity)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EvictAt)
            .build();
        MemoryStateStore {
            cache,
            capacity,
            grace,
        }
    }

    fn instant_of(&self, at: OffsetDateTime) -> Instant {
        let remaining = at - OffsetDateTime::now_utc();
        let remaining = Duration::try_from(remaining).unwrap_or(Duration::ZERO);
        Instant::now() + remaining + self.grace
    }

    /// Runs moka's deferred housekeeping; the load generator calls it before
    /// measuring memory.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    async fn put(&self, login: PendingLogin) -> Result<(), StateError> {
        // Refuse rather than evict: evicting would turn someone's in-flight
        // login into STATE_UNKNOWN without telling anyone.
        if self.cache.entry_count() >= self.capacity {
            self.cache.run_pending_tasks().await;
            if self.cache.entry_count() >= self.capacity {
                return Err(StateError::Full {
                    capacity: self.capacity,
                });
            }
        }
        let evict_at = self.instant_of(login.expires_at);
        self.cache
            .insert(login.state, Entry::Pending(Arc::new(login), evict_at))
            .await;
        Ok(())
    }

    async fn take(
        &self,
        state: &StateToken,
        now: OffsetDateTime,
    ) -> Result<PendingLogin, StateError> {
        // and_compute_with runs the closure under a per-key lock, so exactly
        // one concurrent caller sees `Pending` and leaves the tombstone.
        let mut taken = None;
        let result = self
            .cache
            .entry(*state)
            .and_compute_with(|current| {
                let op = match current.map(|e| e.into_value()) {
                    Some(Entry::Pending(login, evict_at)) => {
                        taken = Some(login);
                        Op::Put(Entry::Consumed(evict_at))
                    }
                    Some(Entry::Consumed(_)) | None => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        match taken {
            Some(login) if login.expires_at <= now => Err(StateError::Expired),
            Some(login) => Ok(Arc::unwrap_or_clone(login)),
            None => match result {
                CompResult::Unchanged(e) if matches!(e.value(), Entry::Consumed(_)) => {
                    Err(StateError::AlreadyUsed)
                }
                _ => Err(StateError::Unknown),
            },
        }
    }

    fn len(&self) -> u64 {
        self.cache.entry_count()
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
        assert!(matches!(store.take(&s, later).await, Err(StateError::Expired)));
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
    }
}
