//! `Store` on an embedded SQLite file (the zero-setup default), schema managed
//! by refinery (`migrations/sqlite`). Timestamps are stored as INTEGER unix
//! microseconds.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::ToSql;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{AuditQuery, Store, StoreError};
use crate::domain::{AuditEvent, AuditKind, Binding, Identity, Outcome};

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

/// How long a statement waits for another process's write lock (e.g. an
/// `authbroker migrate` run beside the server) before reporting `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Audit reads with `limit == 0` get this many rows, so an unset page size
/// never means "the whole table". Same as the Postgres store.
const DEFAULT_AUDIT_LIMIT: u32 = 100;

/// One connection behind a std `Mutex`. SQLite admits a single writer at a
/// time anyway, so a pool would only add lock contention inside SQLite; a
/// std (not tokio) mutex is enough because it is only ever locked inside
/// `spawn_blocking`, never held across an `.await`, and keeps the blocking
/// file I/O off the async workers.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, and its parent
    /// directories.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(
                    anyhow::Error::new(e)
                        .context(format!("creating the directory {}", parent.display())),
                )
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| Failure::Sqlite(e).into_store_error("opening the sqlite database"))?;
        Self::configure(conn)
    }

    /// A private database that lives as long as this store (tests, demos).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|e| {
            Failure::Sqlite(e).into_store_error("opening an in-memory sqlite database")
        })?;
        Self::configure(conn)
    }

    fn configure(conn: Connection) -> Result<Self, StoreError> {
        let setup = || -> Result<(), rusqlite::Error> {
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // WAL lets readers in other processes (backups, sqlite3 shell) run
            // beside the writer. An in-memory database answers "memory",
            // which is fine.
            let _mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
            // Off by default in SQLite; identities rely on the cascade.
            conn.pragma_update(None, "foreign_keys", true)?;
            Ok(())
        };
        setup().map_err(|e| Failure::Sqlite(e).into_store_error("configuring sqlite"))?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<T, F>(&self, doing: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Failure> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let joined = tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection may be
            // mid-way through something, so refuse rather than guess.
            let mut conn = conn.lock().map_err(|_| Failure::Poisoned)?;
            f(&mut conn)
        })
        .await;
        match joined {
            Ok(result) => result.map_err(|e| e.into_store_error(doing)),
            Err(join) => Err(StoreError::Internal(
                anyhow::Error::new(join).context(doing),
            )),
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.run("running sqlite migrations", |conn| {
            embedded::migrations::runner().run(conn)?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run("pinging sqlite", |conn| {
            conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0))?;
            Ok(())
        })
        .await
    }

    async fn bind_login(
        &self,
        identity: &Identity,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(Outcome, Binding), StoreError> {
        let identity = identity.clone();
        let actor = actor.map(str::to_owned);
        self.run("binding a login", move |conn| {
            bind_login(conn, &identity, actor.as_deref(), now)
        })
        .await
    }

    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let event = event.clone();
        self.run("recording an audit event", move |conn| {
            insert_audit(conn, &event)
        })
        .await
    }

    async fn find_binding(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Binding>, StoreError> {
        let (provider, subject) = (provider.to_owned(), subject.to_owned());
        self.run("finding a binding", move |conn| {
            let row = conn
                .prepare_cached(
                    "SELECT user_id, created_at, last_login_at FROM identities \
                     WHERE provider = ?1 AND subject = ?2",
                )?
                .query_row(params![provider, subject], |row| {
                    Ok(Binding {
                        user_id: row.get(0)?,
                        provider: provider.clone(),
                        subject: subject.clone(),
                        created_at: time_column(row, 1)?,
                        last_login_at: time_column(row, 2)?,
                    })
                })
                .optional()?;
            Ok(row)
        })
        .await
    }

    async fn find_identity(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Identity>, StoreError> {
        let (provider, subject) = (provider.to_owned(), subject.to_owned());
        self.run("finding an identity", move |conn| {
            let identity = conn
                .prepare_cached(
                    "SELECT union_id, username, display_name, avatar_url, email, email_verified \
                     FROM identities WHERE provider = ?1 AND subject = ?2",
                )?
                .query_row(params![provider, subject], |row| {
                    Ok(Identity {
                        provider: provider.clone(),
                        subject: subject.clone(),
                        union_id: row.get(0)?,
                        username: row.get(1)?,
                        display_name: row.get(2)?,
                        avatar_url: row.get(3)?,
                        email: row.get(4)?,
                        email_verified: row.get(5)?,
                    })
                })
                .optional()?;
            Ok(identity)
        })
        .await
    }

    async fn count_users(&self) -> Result<u64, StoreError> {
        self.run("counting users", |conn| {
            let count: i64 = conn
                .prepare_cached("SELECT count(*) FROM users")?
                .query_row([], |row| row.get(0))?;
            u64::try_from(count)
                .map_err(|_| Failure::Corrupt(format!("negative user count {count}")))
        })
        .await
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let query = query.clone();
        self.run("listing audit events", move |conn| {
            list_audit_events(conn, &query)
        })
        .await
    }
}

fn bind_login(
    conn: &mut Connection,
    identity: &Identity,
    actor: Option<&str>,
    now: OffsetDateTime,
) -> Result<(Outcome, Binding), Failure> {
    let now_us = to_micros(now);
    let now = from_micros(now_us).map_err(|e| Failure::Corrupt(e.to_string()))?;
    // IMMEDIATE takes the write lock up front: with a deferred transaction,
    // two processes could both read "not bound" and then one would fail
    // to upgrade its read lock instead of waiting for the other.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing = tx
        .prepare_cached(
            "SELECT user_id, created_at FROM identities WHERE provider = ?1 AND subject = ?2",
        )?
        .query_row(params![identity.provider, identity.subject], |row| {
            Ok((row.get::<_, String>(0)?, time_column(row, 1)?))
        })
        .optional()?;

    let (outcome, binding) = match existing {
        Some((user_id, created_at)) => {
            tx.prepare_cached(
                "UPDATE identities SET union_id = ?3, username = ?4, display_name = ?5, \
                 avatar_url = ?6, email = ?7, email_verified = ?8, last_login_at = ?9 \
                 WHERE provider = ?1 AND subject = ?2",
            )?
            .execute(params![
                identity.provider,
                identity.subject,
                identity.union_id,
                identity.username,
                identity.display_name,
                identity.avatar_url,
                identity.email,
                identity.email_verified,
                now_us,
            ])?;
            let binding = Binding {
                user_id,
                provider: identity.provider.clone(),
                subject: identity.subject.clone(),
                created_at,
                last_login_at: now,
            };
            (Outcome::SignedIn, binding)
        }
        None => {
            // Time-ordered ids keep the users primary key append-mostly.
            let user_id = uuid::Uuid::now_v7().to_string();
            tx.prepare_cached("INSERT INTO users (id, created_at) VALUES (?1, ?2)")?
                .execute(params![user_id, now_us])?;
            // The write lock is ours, so the identity cannot have appeared
            // since the SELECT: a conflict here is a real error.
            tx.prepare_cached(
                "INSERT INTO identities (provider, subject, user_id, union_id, username, \
                 display_name, avatar_url, email, email_verified, created_at, last_login_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
            )?
            .execute(params![
                identity.provider,
                identity.subject,
                user_id,
                identity.union_id,
                identity.username,
                identity.display_name,
                identity.avatar_url,
                identity.email,
                identity.email_verified,
                now_us,
            ])?;
            let binding = Binding {
                user_id,
                provider: identity.provider.clone(),
                subject: identity.subject.clone(),
                created_at: now,
                last_login_at: now,
            };
            insert_audit(
                &tx,
                &login_event(AuditKind::UserCreated, &binding, actor, now),
            )?;
            (Outcome::UserCreated, binding)
        }
    };
    insert_audit(
        &tx,
        &login_event(AuditKind::LoginSucceeded, &binding, actor, now),
    )?;
    tx.commit()?;
    Ok((outcome, binding))
}

fn list_audit_events(conn: &Connection, query: &AuditQuery) -> Result<Vec<AuditEvent>, Failure> {
    let mut sql = String::from(
        "SELECT at, kind, actor, provider, subject, user_id, reason FROM audit_events",
    );
    let mut params: Vec<&dyn ToSql> = Vec::new();
    let mut conditions = Vec::new();
    if let Some(provider) = &query.provider {
        params.push(provider);
        conditions.push(format!("provider = ?{}", params.len()));
    }
    if let Some(user_id) = &query.user_id {
        params.push(user_id);
        conditions.push(format!("user_id = ?{}", params.len()));
    }
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    let limit = if query.limit == 0 {
        DEFAULT_AUDIT_LIMIT
    } else {
        query.limit
    };
    params.push(&limit);
    // Events of one transaction share `at`; the id keeps insertion order.
    sql.push_str(&format!(
        " ORDER BY at DESC, id DESC LIMIT ?{}",
        params.len()
    ));

    let mut stmt = conn.prepare_cached(&sql)?;
    let events = stmt
        .query_map(&*params, |row| {
            let kind: String = row.get(1)?;
            Ok(AuditEvent {
                at: time_column(row, 0)?,
                kind: AuditKind::parse(&kind).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        1,
                        rusqlite::types::Type::Text,
                        format!("unknown audit kind {kind:?}").into(),
                    )
                })?,
                actor: row.get(2)?,
                provider: row.get(3)?,
                subject: row.get(4)?,
                user_id: row.get(5)?,
                reason: row.get(6)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(events)
}

fn insert_audit(conn: &Connection, event: &AuditEvent) -> Result<(), Failure> {
    conn.prepare_cached(
        "INSERT INTO audit_events (at, kind, actor, provider, subject, user_id, reason) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        to_micros(event.at),
        event.kind.as_str(),
        event.actor,
        event.provider,
        event.subject,
        event.user_id,
        event.reason,
    ])?;
    Ok(())
}

fn login_event(
    kind: AuditKind,
    binding: &Binding,
    actor: Option<&str>,
    at: OffsetDateTime,
) -> AuditEvent {
    AuditEvent {
        at,
        kind,
        actor: actor.map(str::to_owned),
        provider: Some(binding.provider.clone()),
        subject: Some(binding.subject.clone()),
        user_id: Some(binding.user_id.clone()),
        reason: None,
    }
}

/// Unix microseconds, rounded down (like Postgres' timestamptz, which keeps
/// microseconds). Every `OffsetDateTime` (years ±9999) fits in an i64.
fn to_micros(t: OffsetDateTime) -> i64 {
    let micros = t.unix_timestamp_nanos().div_euclid(1_000);
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

fn from_micros(micros: i64) -> Result<OffsetDateTime, time::error::ComponentRange> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
}

/// Reads a microseconds column; an out-of-range value is a conversion error
/// like any other wrongly typed column.
fn time_column(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<OffsetDateTime> {
    let micros: i64 = row.get(idx)?;
    from_micros(micros).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Integer, Box::new(e))
    })
}

/// Everything that can go wrong inside this module, classified once into
/// `StoreError` at the trait boundary.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Migrate(#[from] refinery::Error),
    #[error("the connection lock was poisoned by a panic")]
    Poisoned,
    #[error("unexpected value: {0}")]
    Corrupt(String),
}

impl Failure {
    fn into_store_error(self, doing: &'static str) -> StoreError {
        let unavailable = match &self {
            Failure::Sqlite(e) => is_unavailable(e),
            Failure::Migrate(e) => match e.kind() {
                refinery::error::Kind::Connection(_, source) => source
                    .downcast_ref::<rusqlite::Error>()
                    .is_some_and(is_unavailable),
                _ => false,
            },
            Failure::Poisoned | Failure::Corrupt(_) => false,
        };
        let error = anyhow::Error::new(self).context(doing);
        if unavailable {
            StoreError::Unavailable(error)
        } else {
            StoreError::Internal(error)
        }
    }
}

/// Whether the failure is about reaching the file (lock held elsewhere, file
/// cannot be opened, I/O or a full disk) rather than a bad query or schema.
fn is_unavailable(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_round_trip_and_round_down() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(to_micros(t), 1_700_000_000_123_456);
        assert_eq!(
            from_micros(to_micros(t)).unwrap().unix_timestamp_nanos(),
            1_700_000_000_123_456_000
        );
        let before_epoch = OffsetDateTime::from_unix_timestamp_nanos(-1_500).unwrap();
        assert_eq!(to_micros(before_epoch), -2);
    }

    #[test]
    fn busy_is_unavailable_and_syntax_is_not() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(is_unavailable(&busy));
        let conn = Connection::open_in_memory().unwrap();
        let syntax = conn.execute("SELEKT", []).unwrap_err();
        assert!(!is_unavailable(&syntax));
    }
}
