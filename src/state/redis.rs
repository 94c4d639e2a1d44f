//! The `StateStore` on Redis, shared by every replica that uses the same
//! server and key prefix.
//!
//! # Key layout
//! Under the configured prefix `P` (one per deployment sharing a server):
//! - `P e:<hex>`, one hash per entry, where `<hex>` is `seal::lookup_key`
//!   (SHA-256 of the token under a per-kind label), never the token. Fields:
//!   `status` (`pending`, `claimed`, `finished`), `expires_at_us` (the
//!   entry's expiry, µs since the epoch), `evict_at_ms` (when Redis drops
//!   it), `sealed` (`seal::seal_pending`), and once claimed `fingerprint`,
//!   `attempt`, `lease_until_ms` and `progress` (`seal::seal_progress`).
//!   Each hash carries `PEXPIREAT evict_at_ms`: the expiry plus
//!   `limits.grace` while pending, at least the first claim plus
//!   `limits.retry_window` once claimed. A finished entry shrinks to a
//!   tombstone (`status` and `evict_at_ms`) that lives to the same deadline,
//!   so a replay hears "already used" rather than "unknown".
//! - `P live:login` and `P live:ticket`, sorted sets of the live (pending or
//!   claimed) entry keys of each kind, scored by `evict_at_ms`. They carry
//!   the capacity bound, and expire with their last member.
//!
//! Nothing else is written, and every key expires on its own.
//!
//! # What a reader of the keys learns
//! Lookup hashes, expiry and eviction times, whether each entry is pending,
//! claimed or finished, how many attempts a claim has seen, and the
//! fingerprint (a SHA-256) of what the claiming attempt presented. Nothing
//! that completes a login: the token is not derivable from its hash, and
//! every value (provider, redirect URI, scopes, `return_to`, the PKCE
//! verifier, the nonce, a ticket's payload, an attempt's progress) is sealed
//! under a key derived from the token (`seal`).
//!
//! # Capacity
//! `limits.capacity` bounds the live entries of each kind *globally*: every
//! replica using this server and prefix counts against the same sorted set,
//! as the memory backend bounds each kind within its one process. `put`
//! first drops the members whose deadline has passed, then refuses when
//! `capacity` remain; `finish`, `cancel` and a claim that finds its entry
//! expired remove the member at once, so a finished login frees its place
//! immediately.
//!
//! # One script per transition
//! Each of `put`, `claim`, `release`, `finish` and `cancel` is a single Lua
//! script: Redis runs a script with nothing interleaved, so reading an
//! entry, deciding and writing it back (and the capacity check with the
//! insert) is atomic without WATCH/MULTI retry loops, and takes one round
//! trip. The scripts decide nothing a caller could not: they implement
//! exactly the transitions of `memory.rs`, in the order the `StateStore`
//! docs give. Times come from the client (the caller's `now` for expiry,
//! this process's clock for leases and deadlines), never from the Redis
//! server, so all backends and replicas judge by one kind of clock; Redis's
//! own clock only decides when an expired key is physically dropped.
//!
//! Every key a script touches is one of its `KEYS`, so a Redis Cluster would
//! accept the scripts if the prefix held a hash tag (`{authbroker}:`),
//! placing all of a deployment's keys in one slot; the client here speaks
//! to a single server (or a Sentinel-managed primary's address) only.
//!
//! # Why the `redis` crate
//! redis-rs is the most used Redis client for Rust, maintained by the
//! redis-rs organisation and released often. Its `ConnectionManager`
//! multiplexes every call over one connection and reconnects on its own
//! after a failure, with connection and response timeouts, so a Redis that
//! is down answers `Unavailable` in bounded time instead of hanging; its
//! `Script` sends EVALSHA and loads the script on NOSCRIPT by itself (after a
//! Redis restart, say). The alternative, `fred`, is capable but smaller in
//! use; a pool (`deadpool-redis`, `bb8`) adds nothing over a multiplexed
//! connection for calls as short as ours.

use std::{sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::{
    Client, FromRedisValue, Script, ScriptInvocation,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use time::OffsetDateTime;

use super::{
    Claimed, Fingerprint, Kind, Pending, StateError, StateLimits, StateStore, StateToken, seal,
};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

/// How long Redis may take to answer a command on a live connection. The
/// scripts are O(log n), so anything near this means Redis is in trouble.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// The hard bound on every operation, whatever the reconnection logic is
/// doing: a login waits no longer than this to hear "unavailable".
const OPERATION_TIMEOUT: Duration = Duration::from_millis(2_000);

/// Reconnection attempts after a failure before the pending calls are
/// failed (the next call starts another round). Few and quick, so a call
/// made while Redis is down fails within `OPERATION_TIMEOUT`.
const RECONNECT_RETRIES: usize = 1;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(200);

/// Lua shared by the scripts; concatenated in front of each, since Redis
/// scripts cannot call one another.
macro_rules! lua_prelude {
    () => {
        r#"
-- Counts `entry` as live until `evict`, and keeps the live set itself
-- until its latest member's deadline, so an idle prefix disappears.
local function keep_live(live, entry, evict)
  redis.call('ZADD', live, evict, entry)
  local last = redis.call('ZRANGE', live, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', live, last[2])
end

-- Finishes `entry`: a tombstone until its deadline, and no longer live.
local function finish(entry, live)
  redis.call('HDEL', entry, 'expires_at_us', 'sealed', 'fingerprint', 'attempt',
    'lease_until_ms', 'progress')
  redis.call('HSET', entry, 'status', 'finished')
  redis.call('ZREM', live, entry)
end

-- Drops `entry` without a tombstone: its deadline has passed by our clock,
-- and Redis's would drop it any moment (memory.rs does the same).
local function drop(entry, live)
  redis.call('DEL', entry)
  redis.call('ZREM', live, entry)
end
"#
    };
}

/// KEYS: entry, live set. ARGV: clock_ms, capacity, expires_at_us,
/// evict_at_ms, sealed. Returns 1 when stored, 0 when full.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_prelude!(),
        r#"
local clock = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', clock)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return 0
end
-- Past its deadline already: gone at once, as if evicted.
if tonumber(ARGV[4]) <= clock then
  return 1
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'status', 'pending', 'expires_at_us', ARGV[3],
  'evict_at_ms', ARGV[4], 'sealed', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
keep_live(KEYS[2], KEYS[1], ARGV[4])
return 1
"#
    ))
});

/// KEYS: entry, live set. ARGV: now_us (the caller's), clock_ms,
/// fingerprint, lease_until_ms, window_end_ms. Returns `{answer}`, or
/// `{'claimed', attempt, expires_at_us, sealed, progress or ''}`.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_prelude!(),
        r#"
local e = redis.call('HMGET', KEYS[1], 'status', 'expires_at_us', 'evict_at_ms',
  'fingerprint', 'attempt', 'lease_until_ms', 'sealed', 'progress')
local status, evict, clock = e[1], e[3], tonumber(ARGV[2])
if not status then
  return {'unknown'}
end
if status == 'finished' then
  return {'used'}
end
if status == 'pending' then
  if tonumber(e[2]) <= tonumber(ARGV[1]) then
    finish(KEYS[1], KEYS[2])
    return {'expired'}
  end
elseif e[4] ~= ARGV[3] then
  return {'used'}
elseif tonumber(e[6]) > clock then
  return {'in_progress'}
end
-- A claim would be granted, but not past the deadline.
if tonumber(evict) <= clock then
  drop(KEYS[1], KEYS[2])
  return {'used'}
end
if status == 'pending' then
  if tonumber(ARGV[5]) > tonumber(evict) then
    evict = ARGV[5]
  end
  redis.call('HSET', KEYS[1], 'status', 'claimed', 'fingerprint', ARGV[3],
    'attempt', '1', 'lease_until_ms', ARGV[4], 'evict_at_ms', evict)
  redis.call('PEXPIREAT', KEYS[1], evict)
  keep_live(KEYS[2], KEYS[1], evict)
  return {'claimed', '1', e[2], e[7], ''}
end
local attempt = tostring(tonumber(e[5]) + 1)
redis.call('HSET', KEYS[1], 'attempt', attempt, 'lease_until_ms', ARGV[4])
return {'claimed', attempt, e[2], e[7], e[8] or ''}
"#
    ))
});

/// KEYS: entry. ARGV: attempt, clock_ms, sealed progress ('' for none).
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local e = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if e[1] ~= 'claimed' or e[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until_ms', ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'progress')
else
  redis.call('HSET', KEYS[1], 'progress', ARGV[3])
end
return 1
"#,
    )
});

/// KEYS: entry, live set. ARGV: attempt.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_prelude!(),
        r#"
local e = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if e[1] == 'claimed' and e[2] == ARGV[1] then
  finish(KEYS[1], KEYS[2])
end
return 1
"#
    ))
});

/// KEYS: entry, live set. ARGV: now_us (the caller's). Returns the answer.
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_prelude!(),
        r#"
local e = redis.call('HMGET', KEYS[1], 'status', 'expires_at_us')
if not e[1] then
  return 'unknown'
end
if e[1] == 'finished' then
  return 'used'
end
finish(KEYS[1], KEYS[2])
if e[1] == 'pending' and tonumber(e[2]) <= tonumber(ARGV[1]) then
  return 'expired'
end
return 'done'
"#
    ))
});

/// KEYS: the live sets. ARGV: clock_ms. Returns how many entries are live.
static HELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local held = 0
for _, live in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', live, '-inf', ARGV[1])
  held = held + redis.call('ZCARD', live)
end
return held
"#,
    )
});

/// Pending logins and link tickets on a Redis server that replicas share.
///
/// No `Debug`: the connection's client holds the URL, password included.
pub struct RedisStateStore {
    /// Cheap to clone: every clone multiplexes over the same connection.
    conn: ConnectionManager,
    prefix: String,
    limits: StateLimits,
}

impl RedisStateStore {
    /// Makes the store and checks that Redis answers, so a wrong URL,
    /// password or a server that is down is reported at start.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        limits: StateLimits,
    ) -> Result<Self, StateError> {
        let store = Self::lazy(url, key_prefix, limits)?;
        store.ping().await?;
        Ok(store)
    }

    /// Makes the store without a round trip: it connects on first use, and
    /// every operation answers `Unavailable` (within a couple of seconds)
    /// until Redis does. Fails only on a URL that does not parse, or when
    /// called outside a Tokio runtime (the connection's task needs one).
    pub fn lazy(url: &str, key_prefix: &str, limits: StateLimits) -> Result<Self, StateError> {
        // The URL may hold a password: it never appears in an error or log,
        // and redis-rs's own errors for a bad URL do not repeat it.
        let client = Client::open(url).map_err(|e| {
            StateError::Unavailable(anyhow::Error::new(e).context("the Redis URL is not valid"))
        })?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StateError::Unavailable(anyhow::anyhow!(
                "the Redis state store must be made inside a Tokio runtime"
            )));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            StateError::Unavailable(
                anyhow::Error::new(e).context("setting up the Redis connection"),
            )
        })?;
        Ok(RedisStateStore {
            conn,
            prefix: key_prefix.to_string(),
            limits,
        })
    }

    fn entry_key(&self, kind: Kind, token: &StateToken) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hash = seal::lookup_key(kind, token);
        let mut key = String::with_capacity(self.prefix.len() + 2 + 2 * hash.len());
        key.push_str(&self.prefix);
        key.push_str("e:");
        for b in hash {
            key.push(char::from(HEX[usize::from(b >> 4)]));
            key.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        key
    }

    fn live_key(&self, kind: Kind) -> String {
        format!("{}live:{}", self.prefix, kind.as_str())
    }

    /// Runs one script with the hard time bound; any failure, or no answer
    /// in time, is `Unavailable` (the script may or may not have run).
    async fn run<T: FromRedisValue>(
        &self,
        what: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn.clone();
        bounded(what, invocation.invoke_async(&mut conn)).await
    }
}

/// Bounds `call` by `OPERATION_TIMEOUT` and maps its failure, naming the
/// operation but no key or value.
async fn bounded<T>(
    what: &'static str,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StateError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(StateError::Unavailable(
            anyhow::Error::new(e).context(format!("Redis state store: {what}")),
        )),
        Err(_) => Err(StateError::Unavailable(anyhow::anyhow!(
            "Redis state store: {what}: no answer within {OPERATION_TIMEOUT:?}"
        ))),
    }
}

/// Milliseconds since the epoch, the unit of Redis expiry and our deadlines.
fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).unwrap_or(i64::MAX)
}

/// Microseconds since the epoch, the precision an entry's expiry keeps.
fn unix_us(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000)).unwrap_or(i64::MAX)
}

fn after_ms(clock_ms: i64, d: Duration) -> i64 {
    clock_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What a script said that is not one of its answers: a script or key
/// written by something else.
fn garbled(what: &'static str) -> StateError {
    StateError::Unavailable(anyhow::anyhow!(
        "Redis state store: {what}: an unexpected reply"
    ))
}

fn number<T: std::str::FromStr>(what: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| garbled(what))
}

#[async_trait]
impl StateStore for RedisStateStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn put(&self, token: &StateToken, pending: Pending) -> Result<(), StateError> {
        let kind = pending.kind();
        let sealed = seal::seal_pending(token, &pending)?;
        let expires_at = pending.expires_at();
        let evict_at = expires_at + self.limits.grace;
        let mut script = PUT.prepare_invoke();
        script
            .key(self.entry_key(kind, token))
            .key(self.live_key(kind))
            .arg(unix_ms(OffsetDateTime::now_utc()))
            .arg(self.limits.capacity)
            .arg(unix_us(expires_at))
            .arg(unix_ms(evict_at))
            .arg(sealed);
        match self.run::<i64>("put", &script).await? {
            1 => Ok(()),
            0 => Err(StateError::Full {
                capacity: self.limits.capacity,
            }),
            _ => Err(garbled("put")),
        }
    }

    async fn claim(
        &self,
        kind: Kind,
        token: &StateToken,
        fingerprint: &Fingerprint,
        now: OffsetDateTime,
    ) -> Result<Claimed, StateError> {
        // The caller's `now` judges expiry (as in memory.rs); this
        // process's clock sets the lease and the retry window.
        let clock = unix_ms(OffsetDateTime::now_utc());
        let mut script = CLAIM.prepare_invoke();
        script
            .key(self.entry_key(kind, token))
            .key(self.live_key(kind))
            .arg(unix_us(now))
            .arg(clock)
            .arg(fingerprint.as_bytes().as_slice())
            .arg(after_ms(clock, self.limits.lease))
            .arg(after_ms(clock, self.limits.retry_window));
        let reply: Vec<Vec<u8>> = self.run("claim", &script).await?;
        match reply.as_slice() {
            [answer] => Err(match answer.as_slice() {
                b"unknown" => StateError::Unknown,
                b"used" => StateError::AlreadyUsed,
                b"expired" => StateError::Expired,
                b"in_progress" => StateError::InProgress,
                _ => garbled("claim"),
            }),
            [answer, attempt, expires_at_us, sealed, progress] if answer == b"claimed" => {
                let expires_at_us: i64 = number("claim", expires_at_us)?;
                let expires_at =
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(expires_at_us) * 1_000)
                        .map_err(|_| garbled("claim"))?;
                let progress = match progress.as_slice() {
                    [] => None,
                    sealed => Some(seal::open_progress(kind, token, sealed)?),
                };
                Ok(Claimed {
                    pending: seal::open_pending(kind, token, expires_at, sealed)?,
                    attempt: number("claim", attempt)?,
                    progress,
                })
            }
            _ => Err(garbled("claim")),
        }
    }

    async fn release(
        &self,
        kind: Kind,
        token: &StateToken,
        attempt: u32,
        progress: Option<Vec<u8>>,
    ) -> Result<(), StateError> {
        // A sealed value is never empty (it carries its nonce and tag), so
        // the empty string can stand for "no progress".
        let progress = match progress {
            Some(p) => seal::seal_progress(kind, token, &p)?,
            None => Vec::new(),
        };
        let mut script = RELEASE.prepare_invoke();
        script
            .key(self.entry_key(kind, token))
            .arg(attempt)
            .arg(unix_ms(OffsetDateTime::now_utc()))
            .arg(progress);
        self.run::<i64>("release", &script).await.map(drop)
    }

    async fn finish(&self, kind: Kind, token: &StateToken, attempt: u32) -> Result<(), StateError> {
        let mut script = FINISH.prepare_invoke();
        script
            .key(self.entry_key(kind, token))
            .key(self.live_key(kind))
            .arg(attempt);
        self.run::<i64>("finish", &script).await.map(drop)
    }

    async fn cancel(
        &self,
        kind: Kind,
        token: &StateToken,
        now: OffsetDateTime,
    ) -> Result<(), StateError> {
        let mut script = CANCEL.prepare_invoke();
        script
            .key(self.entry_key(kind, token))
            .key(self.live_key(kind))
            .arg(unix_us(now));
        let answer: Vec<u8> = self.run("cancel", &script).await?;
        match answer.as_slice() {
            b"done" => Ok(()),
            b"unknown" => Err(StateError::Unknown),
            b"used" => Err(StateError::AlreadyUsed),
            b"expired" => Err(StateError::Expired),
            _ => Err(garbled("cancel")),
        }
    }

    async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        bounded("ping", redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }

    async fn held(&self) -> Result<u64, StateError> {
        let mut script = HELD.prepare_invoke();
        script
            .key(self.live_key(Kind::Login))
            .key(self.live_key(Kind::Ticket))
            .arg(unix_ms(OffsetDateTime::now_utc()));
        self.run("held", &script).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_hold_the_lookup_hash_not_the_token() {
        let store =
            RedisStateStore::lazy("redis://127.0.0.1:1", "p:", StateLimits::with_capacity(1))
                .unwrap();
        let token = StateToken::generate().unwrap();
        let key = store.entry_key(Kind::Login, &token);
        assert!(key.starts_with("p:e:"));
        assert_eq!(key.len(), "p:e:".len() + 64);
        assert!(!key.contains(&token.as_str()));
        assert_ne!(key, store.entry_key(Kind::Ticket, &token));
        assert_eq!(store.live_key(Kind::Ticket), "p:live:ticket");
    }

    #[test]
    fn a_bad_url_is_refused_without_repeating_it() {
        let Err(StateError::Unavailable(err)) =
            RedisStateStore::lazy("redis://:hunter2@", "p:", StateLimits::with_capacity(1))
        else {
            panic!("an unparseable URL was accepted")
        };
        assert!(!format!("{err:#}").contains("hunter2"));
        assert!(!format!("{err:?}").contains("hunter2"));
    }

    #[test]
    fn outside_a_runtime_it_says_so() {
        assert!(matches!(
            RedisStateStore::lazy("redis://127.0.0.1", "p:", StateLimits::with_capacity(1)),
            Err(StateError::Unavailable(_))
        ));
    }

    #[test]
    fn times_convert_exactly() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_733_212_345_678_901_234).unwrap();
        assert_eq!(unix_ms(t), 1_733_212_345_678);
        assert_eq!(unix_us(t), 1_733_212_345_678_901);
        assert_eq!(after_ms(1_000, Duration::from_secs(2)), 3_000);
        assert_eq!(after_ms(i64::MAX - 1, Duration::from_secs(2)), i64::MAX);
    }
}
