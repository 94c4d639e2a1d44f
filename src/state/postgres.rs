//! `StateStore` on Postgres: pending logins and link tickets in one table
//! that every replica shares, so a login begun on one replica completes on
//! any other and survives restarts. The schema is `migrations/state-postgres`
//! with its own refinery history (`authbroker_state_migrations`), because
//! `[state] url` may name another server than `database.url`.
//!
//! # The table
//!
//! `pending_states`, one row per token:
//!
//! | column        | holds                                                              |
//! |---------------|--------------------------------------------------------------------|
//! | `key`         | `seal::lookup_key`: SHA-256 of a label, the kind and the token      |
//! | `kind`        | `login` or `ticket`                                                |
//! | `status`      | `pending`, `claimed` or `finished`                                 |
//! | `expires_at`  | when a pending entry stops being claimable                         |
//! | `evict_at`    | when the row is forgotten: expiry + grace, and at least the end of the retry window once claimed |
//! | `fingerprint` | SHA-256 of what the claiming attempt presented (`Fingerprint`)      |
//! | `attempt`     | claims so far: 0 while pending                                     |
//! | `lease_until` | until then a retry hears "in progress"; NULL once released         |
//! | `sealed`      | the entry, sealed under a key derived from the token (`seal`)       |
//! | `progress`    | what the last released attempt recorded, sealed the same way        |
//!
//! A finished row keeps only `key`, `kind`, `status`, the two times and
//! `attempt`: a tombstone, so a replay hears "already used" until the row's
//! deadline. A row past `evict_at` is absent to every operation, whether or
//! not the sweep has deleted it yet, so answers never depend on its timing.
//!
//! # What a reader of the table learns
//!
//! How many logins and link tickets are in flight, when each expires and is
//! forgotten, whether it was claimed, how often, and whether it finished.
//! Not the token (only a hash of it), and nothing inside an entry: provider,
//! redirect URI, scopes, `return_to`, PKCE verifier, nonce, a ticket's
//! identity and provider tokens and an attempt's progress are sealed under a
//! key only the token yields (`seal`). A claimed row's fingerprint is a hash
//! of the authorization code or of the provider's error: it reveals neither
//! the code nor, short of guessing an error text, anything else. So a reader
//! cannot complete a login, and a writer can at worst refuse one (a row it
//! forges or alters does not open, and is answered as unknown).
//!
//! # One statement per transition
//!
//! Each transition is a single conditional `UPDATE` (or `INSERT`): under
//! READ COMMITTED, concurrent updates of one row queue on its lock and each
//! re-checks the condition on the row its predecessor left, so of any number
//! of concurrent claims exactly one matches. A claim or cancel that matches
//! nothing costs a second statement that finds out why (a claim's also
//! finishes an expired entry); the successful path is one round trip. Times come from the
//! caller's `now` (for expiry) and this replica's clock (leases, deadlines),
//! never from the server's `now()`, so every backend keeps one clock.
//!
//! # The sweep
//!
//! A background task (started by `connect`, ended when the store is
//! dropped) deletes rows past their deadline every second, at most
//! `SWEEP_BATCH` rows a statement and `SWEEP_BATCHES` statements a round.
//! It picks rows `FOR UPDATE SKIP LOCKED`, so replicas sweeping together
//! share the work instead of queueing on each other. The table therefore
//! holds the entries issued in the last `state_ttl + grace` (a little
//! longer for one claimed late: its retry window), plus at most one
//! round's backlog.
//!
//! # Capacity
//!
//! `capacity` bounds the pending and claimed rows of all replicas together.
//! Counting them on every put would make BeginLogin pay a table scan, so each
//! replica keeps an estimate (`Ledger`): the rows live at its last count,
//! plus its own puts and minus its own frees (finish, cancel, an expired
//! claim) that count did not see. The sweep counts again every second, and a
//! put that finds the estimate at the bound counts again before refusing
//! with `Full`: one count at a time, shared by the puts refused meanwhile,
//! and none for a second after a count that found the bound reached. In one
//! process the bound is exact: the count's snapshot tells exactly which of
//! this replica's own changes it saw. Across replicas it may be overshot by
//! the logins other replicas began since this one last counted (about a
//! second's worth), and a place another replica freed, or that expired, is
//! learnt at the next count.
//!
//! # Durability
//!
//! The connections set `synchronous_commit = off`: a commit returns before
//! its WAL reaches disk. A pending login lives for minutes and is cheap to
//! redo (the user presses "Log in" again), while waiting for the disk on
//! every BeginLogin would cap throughput at the WAL's flush rate. If Postgres
//! itself crashes, the changes of its last few hundred milliseconds (three
//! times `wal_writer_delay` at most) are lost: a login begun then hears
//! `STATE_UNKNOWN` at its callback, and one claimed or finished then may be
//! claimed again, where the provider still refuses a code used twice.
//! Nothing else on the server is affected: the setting is per session.
//!
//! Needs Postgres 13 or newer (`pg_current_xact_id`, `pg_current_snapshot`).

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use time::OffsetDateTime;
use tokio::time::MissedTickBehavior;
use tokio_postgres::{
    Row,
    types::{FromSql, ToSql},
};

use super::{
    Claimed, Fingerprint, Kind, Pending, StateError, StateLimits, StateStore, StateToken,
    seal::{lookup_key, open_pending, open_progress, seal_pending, seal_progress},
};
use crate::store::postgres::{migrate_locked, parse_url, pool};

mod embedded {
    refinery::embed_migrations!("migrations/state-postgres");
}

/// refinery's history table for this schema, apart from the user store's,
/// so both can live in one database or on different servers.
const MIGRATION_TABLE: &str = "authbroker_state_migrations";

/// How often the sweep runs, and so how stale the capacity estimate's view
/// of other replicas and of expiries can be.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Rows one sweep statement deletes at most: short transactions, short
/// row locks, whatever the backlog.
const SWEEP_BATCH: i64 = 5_000;

/// Statements per sweep round at most: 100,000 rows a second, far above the
/// rate at which logins can be begun, so the sweep keeps up without ever
/// turning into one long delete.
const SWEEP_BATCHES: usize = 20;

/// A refused put trusts a count this young that found the table full by
/// itself, so a flood of puts at the bound costs at most one count a
/// second. (A count that found room is not trusted: the estimate then
/// reached the bound through this replica's own puts since, while other
/// replicas may have freed places.)
const COUNT_REUSE: Duration = Duration::from_secs(1);

/// What finishing leaves of a row: a tombstone that says "used" until its
/// deadline and holds nothing sealed.
macro_rules! finished {
    () => {
        "status = 'finished', fingerprint = NULL, lease_until = NULL, sealed = NULL, progress = NULL"
    };
}

/// $1 key, $2 kind, $3 expires_at, $4 evict_at, $5 sealed. Returns the
/// transaction id, for the capacity ledger.
const PUT: &str = "INSERT INTO pending_states (key, kind, status, expires_at, evict_at, sealed) \
     VALUES ($1, $2, 'pending', $3, $4, $5) \
     RETURNING pg_current_xact_id()::text";

/// $1 key, $2 fingerprint, $3 the caller's now, $4 clock, $5 lease end,
/// $6 retry window end. Takes a pending entry that has not expired, or
/// resumes a claim with the same fingerprint whose lease is free; the first
/// claim keeps the row at least until the retry window ends.
const CLAIM: &str = "UPDATE pending_states SET \
         status = 'claimed', \
         fingerprint = $2, \
         attempt = attempt + 1, \
         lease_until = $5, \
         evict_at = CASE WHEN status = 'pending' THEN greatest(evict_at, $6) ELSE evict_at END \
     WHERE key = $1 AND evict_at > $4 \
       AND ((status = 'pending' AND expires_at > $3) \
         OR (status = 'claimed' AND fingerprint = $2 \
             AND (lease_until IS NULL OR lease_until <= $4))) \
     RETURNING attempt, expires_at, sealed, progress";

/// Why `CLAIM` matched nothing. $1 key, $2 the caller's now, $3 clock,
/// $4 fingerprint. Finishes the entry if it was pending past its expiry
/// (returning the transaction id), and reports the row as it stood.
const REFUSED: &str = concat!(
    "WITH expired AS (UPDATE pending_states SET ",
    finished!(),
    " WHERE key = $1 AND status = 'pending' AND expires_at <= $2 AND evict_at > $3 \
       RETURNING pg_current_xact_id()::text AS xid) \
     SELECT s.status, s.fingerprint = $4, s.evict_at > $3, s.expires_at <= $2, \
            (SELECT xid FROM expired) \
     FROM pending_states s WHERE s.key = $1"
);

/// $1 key, $2 attempt, $3 clock, $4 sealed progress or NULL.
const RELEASE: &str = "UPDATE pending_states SET lease_until = NULL, progress = $4 \
     WHERE key = $1 AND status = 'claimed' AND attempt = $2 AND evict_at > $3";

/// $1 key, $2 attempt, $3 clock.
const FINISH: &str = concat!(
    "UPDATE pending_states SET ",
    finished!(),
    " WHERE key = $1 AND status = 'claimed' AND attempt = $2 AND evict_at > $3 \
     RETURNING pg_current_xact_id()::text"
);

/// $1 key, $2 the caller's now, $3 clock. Reports whether the entry was
/// pending past its expiry (`attempt` is 0 only while pending).
const CANCEL: &str = concat!(
    "UPDATE pending_states SET ",
    finished!(),
    " WHERE key = $1 AND status <> 'finished' AND evict_at > $3 \
     RETURNING attempt = 0 AND expires_at <= $2, pg_current_xact_id()::text"
);

/// Whether a row that `CANCEL` left alone is there (finished) at all.
/// $1 key, $2 clock.
const PRESENT: &str = "SELECT evict_at > $2 FROM pending_states WHERE key = $1";

/// The live rows of every replica, with the snapshot they were counted in.
/// $1 clock.
const COUNT: &str = "SELECT count(*), pg_current_snapshot()::text FROM pending_states \
     WHERE status <> 'finished' AND evict_at > $1";

/// $1 clock, $2 batch size.
const SWEEP: &str = "DELETE FROM pending_states WHERE key IN ( \
         SELECT key FROM pending_states WHERE evict_at <= $1 \
         ORDER BY evict_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Pending logins and link tickets in a Postgres table shared by replicas.
pub struct PostgresStateStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStateStore {
    // The pool's config holds the password; show only its size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStateStore")
            .field("pool_max_size", &self.inner.pool.status().max_size)
            .finish()
    }
}

/// What the store and its sweep task share; the task holds it weakly.
struct Inner {
    pool: Pool,
    limits: StateLimits,
    places: Places,
}

impl PostgresStateStore {
    /// Builds the pool and starts the sweep. Connections are made lazily, so
    /// this succeeds while the server is down; every operation then answers
    /// `Unavailable` within the pool's timeouts. Must run inside a Tokio
    /// runtime, which the sweep task is spawned on.
    pub fn connect(url: &str, pool_size: usize, limits: StateLimits) -> Result<Self, StateError> {
        // Parse errors name the bad option, never the password. TLS as the
        // URL's sslmode and sslrootcert ask, as for the user store.
        let (mut config, tls) =
            parse_url(url).or_unavailable("parsing the postgres state backend's url")?;
        // See "Durability" above: pending logins trade the last few hundred
        // milliseconds of a server crash for not waiting on the disk.
        let options = match config.get_options() {
            Some(given) => format!("{given} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_string(),
        };
        config.options(options);
        let pool =
            pool(config, tls, pool_size).or_unavailable("building the state backend's pool")?;
        let runtime = tokio::runtime::Handle::try_current()
            .or_unavailable("starting the state sweep (needs a Tokio runtime)")?;
        let inner = Arc::new(Inner {
            pool,
            limits,
            places: Places::default(),
        });
        runtime.spawn(sweep_until_dropped(Arc::downgrade(&inner)));
        Ok(PostgresStateStore { inner })
    }

    /// Creates or updates the table; safe to run from every replica at once
    /// (the migrations run under the same advisory lock as the user store's).
    /// Ends with a count, so the capacity estimate starts from the truth.
    pub async fn migrate(&self) -> Result<(), StateError> {
        let mut runner = embedded::migrations::runner();
        runner.set_migration_table_name(MIGRATION_TABLE);
        migrate_locked(&self.inner.pool, &runner, "running the state migrations")
            .await
            .map_err(|e| StateError::Unavailable(anyhow::Error::new(e)))?;
        self.inner.count(None).await.map(drop)
    }
}

impl Inner {
    async fn client(&self, doing: &'static str) -> Result<Object, StateError> {
        self.pool.get().await.or_unavailable(doing)
    }

    /// Room for one put, by this replica's estimate; `Full` only after a
    /// recent count agrees.
    async fn reserve(&self) -> Result<Reservation<'_>, StateError> {
        let capacity = self.limits.capacity;
        let seen = match self.places.try_reserve(capacity) {
            Ok(reservation) => return Ok(reservation),
            Err(seen) => seen,
        };
        // Rows may have expired, or other replicas freed theirs, since the
        // last count: look again before saying no.
        if !self.places.counted_full_within(capacity, COUNT_REUSE) {
            self.count(Some(seen)).await?;
        }
        self.places
            .try_reserve(capacity)
            .map_err(|_| StateError::Full { capacity })
    }

    /// Counts the live rows of every replica and resets the estimate from
    /// the count. With `unless_since`, nothing is done if a count finished
    /// after the caller read that generation: callers refused together, or
    /// the sweep next to them, share one count. `None` when skipped.
    async fn count(&self, unless_since: Option<u64>) -> Result<Option<u64>, StateError> {
        const DOING: &str = "counting pending states";
        // A tokio mutex: it is held across the count's round trip.
        let _one = self.places.counting.lock().await;
        if unless_since.is_some_and(|seen| seen != self.places.generation()) {
            return Ok(None);
        }
        let client = self.client(DOING).await?;
        let statement = client.prepare_cached(COUNT).await.or_unavailable(DOING)?;
        // From here until it is applied, changes answered are kept aside:
        // the count may or may not have seen them.
        let counting = self.places.count_started();
        let row = client
            .query_one(&statement, &[&OffsetDateTime::now_utc()])
            .await
            .or_unavailable(DOING)?;
        let live: i64 = get(&row, 0, DOING)?;
        let snapshot: &str = get(&row, 1, DOING)?;
        let snapshot = Snapshot::parse(snapshot).ok_or_else(|| no_row("reading a snapshot"))?;
        let live = u64::try_from(live).unwrap_or(0);
        counting.finished(live, snapshot);
        Ok(Some(live))
    }

    /// One sweep round: delete what is past its deadline, then count.
    async fn sweep(&self) -> Result<u64, StateError> {
        const DOING: &str = "sweeping expired states";
        let mut removed = 0;
        {
            let client = self.client(DOING).await?;
            let statement = client.prepare_cached(SWEEP).await.or_unavailable(DOING)?;
            for _ in 0..SWEEP_BATCHES {
                let clock = OffsetDateTime::now_utc();
                let batch = client
                    .execute(&statement, &[&clock, &SWEEP_BATCH])
                    .await
                    .or_unavailable(DOING)?;
                removed += batch;
                if batch < SWEEP_BATCH as u64 {
                    break;
                }
            }
        }
        let seen = self.places.generation();
        self.count(Some(seen)).await?;
        Ok(removed)
    }
}

/// Sweeps every `SWEEP_EVERY` until the store is dropped. Failures are
/// logged once per outage, not once a second.
async fn sweep_until_dropped(store: Weak<Inner>) {
    // The first round waits a period: `migrate` has just counted, and the
    // table may not exist before it has run.
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        match inner.sweep().await {
            Ok(removed) => {
                if failing {
                    tracing::info!("the postgres state sweep works again");
                }
                failing = false;
                tracing::debug!(removed, "swept expired states");
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = %crate::telemetry::cause_chain(&e),
                        "the postgres state sweep failed; retrying every second"
                    );
                }
                failing = true;
            }
        }
    }
}

#[async_trait]
impl StateStore for PostgresStateStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn put(&self, token: &StateToken, pending: Pending) -> Result<(), StateError> {
        const DOING: &str = "adding a pending state";
        let kind = pending.kind();
        let expires_at = pending.expires_at();
        let evict_at = after(expires_at, self.inner.limits.grace);
        let sealed = seal_pending(token, &pending)?;
        let key = lookup_key(kind, token);
        // Reserve before taking a connection: a refusal may need one to count.
        let reservation = self.inner.reserve().await?;
        let client = self.inner.client(DOING).await?;
        let row = query_opt(
            &client,
            PUT,
            &[&&key[..], &kind.as_str(), &expires_at, &evict_at, &sealed],
            DOING,
        )
        .await?
        .ok_or_else(|| no_row(DOING))?;
        reservation.committed(xid(&row, 0, DOING)?);
        Ok(())
    }

    async fn claim(
        &self,
        kind: Kind,
        token: &StateToken,
        fingerprint: &Fingerprint,
        now: OffsetDateTime,
    ) -> Result<Claimed, StateError> {
        const DOING: &str = "claiming a state";
        let key = lookup_key(kind, token);
        let fingerprint = &fingerprint.as_bytes()[..];
        let clock = OffsetDateTime::now_utc();
        let lease_until = after(clock, self.inner.limits.lease);
        let window_end = after(clock, self.inner.limits.retry_window);
        let client = self.inner.client(DOING).await?;
        let params: [&(dyn ToSql + Sync); 6] = [
            &&key[..],
            &fingerprint,
            &now,
            &clock,
            &lease_until,
            &window_end,
        ];
        if let Some(row) = query_opt(&client, CLAIM, &params, DOING).await? {
            let attempt: i32 = get(&row, 0, DOING)?;
            let expires_at: OffsetDateTime = get(&row, 1, DOING)?;
            let sealed: Option<Vec<u8>> = get(&row, 2, DOING)?;
            let progress: Option<Vec<u8>> = get(&row, 3, DOING)?;
            // Only finished rows lose their sealed value, and CLAIM never
            // matches those.
            let sealed = sealed.ok_or_else(|| no_row("opening a claimed state"))?;
            return Ok(Claimed {
                pending: open_pending(kind, token, expires_at, &sealed)?,
                attempt: u32::try_from(attempt).or_unavailable(DOING)?,
                progress: progress
                    .map(|p| open_progress(kind, token, &p))
                    .transpose()?,
            });
        }

        let since = self.inner.places.generation();
        let Some(row) = query_opt(
            &client,
            REFUSED,
            &[&&key[..], &now, &clock, &fingerprint],
            DOING,
        )
        .await?
        else {
            return Err(StateError::Unknown);
        };
        let status: &str = get(&row, 0, DOING)?;
        let same_fingerprint: Option<bool> = get(&row, 1, DOING)?;
        let live: bool = get(&row, 2, DOING)?;
        let expired: bool = get(&row, 3, DOING)?;
        let finished_by_us: Option<&str> = get(&row, 4, DOING)?;
        if let Some(id) = finished_by_us {
            self.inner.places.freed(since, parse_xid(id, DOING)?);
            return Err(StateError::Expired);
        }
        Err(match status {
            _ if !live => StateError::Unknown,
            "finished" => StateError::AlreadyUsed,
            // CLAIM just found its lease held.
            "claimed" if same_fingerprint == Some(true) => StateError::InProgress,
            "claimed" => StateError::AlreadyUsed,
            // Pending and expired, yet not finished by us: a concurrent
            // claim or cancel finished it in between.
            _ if expired => StateError::AlreadyUsed,
            // Pending and claimable: it was added after CLAIM looked, so at
            // the time of the claim it did not exist.
            _ => StateError::Unknown,
        })
    }

    async fn release(
        &self,
        kind: Kind,
        token: &StateToken,
        attempt: u32,
        progress: Option<Vec<u8>>,
    ) -> Result<(), StateError> {
        const DOING: &str = "releasing a state";
        // No row ever reaches an attempt past i32::MAX, so nothing to release.
        let Ok(attempt) = i32::try_from(attempt) else {
            return Ok(());
        };
        let key = lookup_key(kind, token);
        let progress = progress
            .map(|p| seal_progress(kind, token, &p))
            .transpose()?;
        let clock = OffsetDateTime::now_utc();
        let client = self.inner.client(DOING).await?;
        let statement = client.prepare_cached(RELEASE).await.or_unavailable(DOING)?;
        client
            .execute(&statement, &[&&key[..], &attempt, &clock, &progress])
            .await
            .or_unavailable(DOING)?;
        Ok(())
    }

    async fn finish(&self, kind: Kind, token: &StateToken, attempt: u32) -> Result<(), StateError> {
        const DOING: &str = "finishing a state";
        let Ok(attempt) = i32::try_from(attempt) else {
            return Ok(());
        };
        let key = lookup_key(kind, token);
        let clock = OffsetDateTime::now_utc();
        let client = self.inner.client(DOING).await?;
        let since = self.inner.places.generation();
        if let Some(row) = query_opt(&client, FINISH, &[&&key[..], &attempt, &clock], DOING).await?
        {
            self.inner.places.freed(since, xid(&row, 0, DOING)?);
        }
        Ok(())
    }

    async fn cancel(
        &self,
        kind: Kind,
        token: &StateToken,
        now: OffsetDateTime,
    ) -> Result<(), StateError> {
        const DOING: &str = "cancelling a state";
        let key = lookup_key(kind, token);
        let clock = OffsetDateTime::now_utc();
        let client = self.inner.client(DOING).await?;
        let since = self.inner.places.generation();
        if let Some(row) = query_opt(&client, CANCEL, &[&&key[..], &now, &clock], DOING).await? {
            let expired: bool = get(&row, 0, DOING)?;
            self.inner.places.freed(since, xid(&row, 1, DOING)?);
            return if expired {
                Err(StateError::Expired)
            } else {
                Ok(())
            };
        }
        let present = query_opt(&client, PRESENT, &[&&key[..], &clock], DOING).await?;
        match present.map(|row| get::<bool>(&row, 0, DOING)).transpose()? {
            Some(true) => Err(StateError::AlreadyUsed),
            _ => Err(StateError::Unknown),
        }
    }

    /// Migrates the table (see `migrate`).
    async fn prepare(&self) -> Result<(), StateError> {
        self.migrate().await
    }

    async fn ping(&self) -> Result<(), StateError> {
        const DOING: &str = "pinging the postgres state backend";
        let client = self.inner.client(DOING).await?;
        client
            .simple_query("SELECT 1")
            .await
            .or_unavailable(DOING)?;
        Ok(())
    }

    /// An exact count of every replica's live rows (which also refreshes
    /// this replica's estimate).
    async fn held(&self) -> Result<u64, StateError> {
        Ok(self.inner.count(None).await?.unwrap_or(0))
    }
}

/// The capacity estimate and the lock that keeps counts one at a time.
#[derive(Default)]
struct Places {
    /// A std mutex: it is never held across an `.await`, only for a few
    /// arithmetic steps, so it costs BeginLogin next to nothing.
    ledger: Mutex<Ledger>,
    counting: tokio::sync::Mutex<()>,
}

impl Places {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The ledger is plain numbers, consistent after every statement, so
        // a panic elsewhere while it was locked leaves nothing half-done.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn generation(&self) -> u64 {
        self.ledger().generation
    }

    /// Whether the last count, less than `age` ago, found `capacity` live
    /// rows or more on its own.
    fn counted_full_within(&self, capacity: u64, age: Duration) -> bool {
        let ledger = self.ledger();
        ledger.counted_live >= capacity && ledger.counted_at.is_some_and(|at| at.elapsed() < age)
    }

    fn try_reserve(&self, capacity: u64) -> Result<Reservation<'_>, u64> {
        let mut ledger = self.ledger();
        if ledger.held() < capacity {
            ledger.reserved += 1;
            Ok(Reservation {
                places: self,
                since: ledger.generation,
            })
        } else {
            Err(ledger.generation)
        }
    }

    /// A row this replica finished, in transaction `xid`; `since` is the
    /// generation read before the statement was sent.
    fn freed(&self, since: u64, xid: u64) {
        self.ledger().apply(since, xid, -1);
    }

    fn count_started(&self) -> Counting<'_> {
        self.ledger().during_count = Some(Vec::new());
        Counting(self)
    }
}

/// A place held for one put until its INSERT is answered. Dropping it
/// (an error, or the caller gave up) gives the place back; if the INSERT
/// committed all the same, the next count finds its row.
struct Reservation<'a> {
    places: &'a Places,
    since: u64,
}

impl Reservation<'_> {
    /// The row is in, in transaction `xid`.
    fn committed(self, xid: u64) {
        // Counted before the reservation is dropped: never under, for a moment over.
        self.places.ledger().apply(self.since, xid, 1);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut ledger = self.places.ledger();
        ledger.reserved = ledger.reserved.saturating_sub(1);
    }
}

/// A count under way. If it fails or is abandoned, the changes kept aside
/// are dropped: each was applied to the estimate as it came.
struct Counting<'a>(&'a Places);

impl Counting<'_> {
    fn finished(self, live: u64, snapshot: Snapshot) {
        self.0
            .ledger()
            .count_finished(live, snapshot, Instant::now());
    }
}

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.0.ledger().during_count = None;
    }
}

/// This replica's estimate of the places taken across all replicas.
///
/// A count sees exactly the transactions that committed before its
/// snapshot. This replica's own puts and frees each return their
/// transaction id, so whether the last count saw one is known, not guessed:
/// each is applied once, whether it committed just before the count, during
/// it or after it.
#[derive(Default)]
struct Ledger {
    /// Live rows at the last count, plus this replica's puts and minus its
    /// frees that the count did not see. Never below zero: a replica may
    /// free rows another one put after its count, and no count is negative.
    taken: i64,
    /// Puts sent and not yet answered: each holds a place meanwhile.
    reserved: u64,
    /// Counts completed.
    generation: u64,
    /// The last count: its snapshot, what it found, and when it finished.
    snapshot: Option<Snapshot>,
    counted_live: u64,
    counted_at: Option<Instant>,
    /// While a count runs: the changes answered meanwhile (transaction id,
    /// change), which the count may or may not have seen.
    during_count: Option<Vec<(u64, i64)>>,
}

impl Ledger {
    fn held(&self) -> u64 {
        u64::try_from(self.taken).unwrap_or(0) + self.reserved
    }

    /// Applies one committed change. A statement sent before the last count
    /// finished (`since` is older) may have committed before its snapshot,
    /// and then the count has it already.
    fn apply(&mut self, since: u64, xid: u64, change: i64) {
        let counted =
            since != self.generation && self.snapshot.as_ref().is_some_and(|s| s.saw(xid));
        if !counted {
            self.taken = (self.taken + change).max(0);
        }
        if let Some(aside) = &mut self.during_count {
            aside.push((xid, change));
        }
    }

    fn count_finished(&mut self, live: u64, snapshot: Snapshot, at: Instant) {
        let unseen: i64 = self
            .during_count
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|(xid, _)| !snapshot.saw(*xid))
            .map(|(_, change)| change)
            .sum();
        self.taken = (i64::try_from(live).unwrap_or(i64::MAX) + unseen).max(0);
        self.snapshot = Some(snapshot);
        self.counted_live = live;
        self.counted_at = Some(at);
        self.generation += 1;
    }
}

/// A `pg_snapshot`: which transactions had committed when it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    /// Every transaction below this had finished.
    xmin: u64,
    /// None from here on had.
    xmax: u64,
    /// Those in between still running, sorted.
    running: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form `xmin:xmax:xip,xip,…`.
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let mut running = parts
            .next()?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<u64>, _>>()
            .ok()?;
        running.sort_unstable();
        Some(Snapshot {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether a transaction known to have committed had done so when this
    /// snapshot was taken.
    fn saw(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.running.binary_search(&xid).is_err())
    }
}

/// Every database failure is the backend being unavailable to the caller;
/// the cause chain says which.
trait OrUnavailable<T> {
    fn or_unavailable(self, doing: &'static str) -> Result<T, StateError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> OrUnavailable<T> for Result<T, E> {
    fn or_unavailable(self, doing: &'static str) -> Result<T, StateError> {
        self.map_err(|e| StateError::Unavailable(anyhow::Error::new(e).context(doing)))
    }
}

/// A statement answered in a shape the schema rules out: a bug, or a table
/// changed under us.
fn no_row(doing: &'static str) -> StateError {
    StateError::Unavailable(anyhow::anyhow!("unexpected answer from postgres").context(doing))
}

async fn query_opt(
    client: &Object,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    doing: &'static str,
) -> Result<Option<Row>, StateError> {
    let statement = client.prepare_cached(sql).await.or_unavailable(doing)?;
    client
        .query_opt(&statement, params)
        .await
        .or_unavailable(doing)
}

fn get<'a, T: FromSql<'a>>(
    row: &'a Row,
    column: usize,
    doing: &'static str,
) -> Result<T, StateError> {
    row.try_get(column).or_unavailable(doing)
}

/// A transaction id, returned as text (`xid8` has no Rust mapping).
fn xid(row: &Row, column: usize, doing: &'static str) -> Result<u64, StateError> {
    parse_xid(get(row, column, doing)?, doing)
}

fn parse_xid(text: &str, doing: &'static str) -> Result<u64, StateError> {
    text.parse().or_unavailable(doing)
}

/// `t + d`, saturating: limits come from configuration.
fn after(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    t.saturating_add(time::Duration::try_from(d).unwrap_or(time::Duration::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap()
    }

    #[test]
    fn snapshots_parse_and_see_what_had_committed() {
        let s = snapshot("100:110:107,103");
        assert_eq!(s.running, vec![103, 107]);
        assert!(s.saw(99));
        assert!(s.saw(104));
        assert!(!s.saw(103), "still running then");
        assert!(!s.saw(110), "started after");
        assert!(!s.saw(200));
        let empty = snapshot("5:5:");
        assert!(empty.saw(4) && !empty.saw(5));
        assert!(Snapshot::parse("5:x:").is_none());
        assert!(Snapshot::parse("5").is_none());
    }

    #[test]
    fn a_change_is_counted_once_whenever_it_committed() {
        let mut l = Ledger::default();
        // Before any count: applied.
        l.apply(0, 50, 1);
        assert_eq!(l.taken, 1);

        // A count runs. A put sent before it (since 0) and one sent during it
        // answer while it runs; the count saw 60 but not 70.
        l.during_count = Some(Vec::new());
        l.apply(0, 60, 1);
        l.apply(0, 70, 1);
        l.count_finished(2, snapshot("65:66:"), Instant::now());
        // 50 and 60 are in the count; 70 is not.
        assert_eq!(l.taken, 3);
        assert_eq!(l.generation, 1);

        // A free sent before the count, answered after it: seen, so not
        // applied again; one the count did not see is applied.
        l.apply(0, 64, -1);
        assert_eq!(l.taken, 3);
        l.apply(0, 80, -1);
        assert_eq!(l.taken, 2);
        // Sent after the count: applied, whatever its id.
        l.apply(1, 10, -1);
        assert_eq!(l.taken, 1);
    }

    #[test]
    fn reservations_hold_a_place_until_answered() {
        let places = Places::default();
        let one = places.try_reserve(2).unwrap();
        let two = places.try_reserve(2).unwrap();
        assert!(places.try_reserve(2).is_err());
        drop(two);
        one.committed(5);
        assert_eq!(places.ledger().held(), 1);
        assert!(places.try_reserve(2).is_ok());
    }

    #[test]
    fn an_abandoned_count_sets_nothing_aside() {
        let places = Places::default();
        drop(places.count_started());
        assert!(places.ledger().during_count.is_none());
        places.freed(0, 1);
        assert_eq!(places.ledger().taken, 0, "no count is negative");
    }

    #[test]
    fn deadlines_saturate() {
        let t = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(after(t, Duration::from_secs(1)), t + time::Duration::SECOND);
        assert!(after(t, Duration::MAX) > t);
    }
}
