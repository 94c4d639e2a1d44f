//! What the sandbox remembers: the codes and tokens it issued, each with its
//! own deadline, in bounded in-memory caches.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use moka::{future::Cache, policy::EvictionPolicy};
use rand::RngCore;
use url::Url;

pub(super) const CODE_TTL: Duration = Duration::from_secs(60);
pub(super) const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub(super) const REFRESH_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const CACHE_CAPACITY: u64 = 100_000;
pub(super) const ACCESS_TOKEN_PREFIX: &str = "sbx_at_";
pub(super) const REFRESH_TOKEN_PREFIX: &str = "sbx_rt_";

/// Everything the server remembers. Entries carry their own deadline because
/// moka's TTL bounds memory but is not a promise about what `remove` returns.
pub(super) struct Sandbox {
    /// `base_url` without the trailing slash, for building avatar URLs.
    pub(super) origin: String,
    pub(super) codes: Cache<[u8; 32], Arc<CodeGrant>>,
    pub(super) access_tokens: Cache<[u8; 32], Arc<AccessGrant>>,
    pub(super) refresh_tokens: Cache<[u8; 32], Arc<RefreshGrant>>,
}

pub(super) struct CodeGrant {
    pub(super) user: Arc<str>,
    pub(super) client_id: Arc<str>,
    pub(super) redirect_uri: Box<str>,
    pub(super) scope: Arc<str>,
    pub(super) challenge: Option<Box<str>>,
    pub(super) expires_at: Instant,
}

pub(super) struct AccessGrant {
    pub(super) user: Arc<str>,
    pub(super) expires_at: Instant,
}

pub(super) struct RefreshGrant {
    pub(super) user: Arc<str>,
    pub(super) client_id: Arc<str>,
    pub(super) scope: Arc<str>,
    pub(super) expires_at: Instant,
}

impl Sandbox {
    pub(super) fn new(base_url: &Url) -> Self {
        Sandbox {
            origin: base_url.as_str().trim_end_matches('/').to_owned(),
            codes: bounded_cache(CODE_TTL),
            access_tokens: bounded_cache(ACCESS_TOKEN_TTL),
            refresh_tokens: bounded_cache(REFRESH_TOKEN_TTL),
        }
    }
}

/// LRU rather than moka's default TinyLFU: when a load test fills the cache,
/// TinyLFU may refuse to admit a brand-new token, which would fail the very
/// login that just received it. LRU always keeps the newest entries.
fn bounded_cache<V: Clone + Send + Sync + 'static>(ttl: Duration) -> Cache<[u8; 32], V> {
    Cache::builder()
        .max_capacity(CACHE_CAPACITY)
        .time_to_live(ttl)
        .eviction_policy(EvictionPolicy::lru())
        .build()
}

/// 32 bytes from the thread-local CSPRNG (ChaCha, seeded and reseeded from
/// the OS): as unguessable as `OsRng` and without a syscall per login.
pub(super) fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Parses the text form of a key we issued (after its prefix, if any).
pub(super) fn parse_key(text: &str) -> Option<[u8; 32]> {
    if text.len() != 43 {
        return None;
    }
    URL_SAFE_NO_PAD.decode(text).ok()?.try_into().ok()
}
