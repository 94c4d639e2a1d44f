//! `Store` on an embedded SQLite file (the zero-setup default), schema managed
//! by refinery (`migrations/sqlite`). Timestamps are stored as INTEGER unix
//! microseconds.
//!
//! Concurrency: every write that decides from what it read runs in an
//! IMMEDIATE transaction, which holds SQLite's single write lock from its
//! first statement; nothing can change between the read and the write, so
//! unlike Postgres no attempt ever has to be retried.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::filter;
use async_trait::async_trait;
use rusqlite::types::ToSql;
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, ffi, params,
    params_from_iter,
};
use time::OffsetDateTime;
use tracing::Instrument;

use super::{
    AuditLog, AuditQuery, AuditRecord, BindPolicy, BindResult, BindingStore, COMMITTED_LOGIN_SQL,
    CommittedLogin, Conflict, Database, LoginKey, LoginRecord, StoreError, TokenRow, TokenStore,
    UserDirectory, UserQuery,
};
use crate::domain::binding::{self, Candidate, Decide, Facts, Lookup, UserChoice};
use crate::domain::{AuditEvent, AuditKind, Binding, Identity, LinkedIdentity, SealedToken, User};

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

/// How long a statement waits for another process's write lock (e.g. an
/// `authbroker migrate` run beside the server) before reporting `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads with `limit == 0` get this many rows, so an unset page size never
/// means "the whole table". Same as the Postgres store.
const DEFAULT_PAGE: u32 = 100;

/// A user with each of their identities, one row per identity (a single row
/// with NULL identity columns for a user who has none). `fold_users` reads it.
const USER_COLUMNS: &str = "u.id, u.created_at, i.provider, i.subject, i.union_id, i.username, \
     i.display_name, i.avatar_url, i.email, i.email_verified, i.created_at, i.last_login_at, \
     t.usable";
const USER_JOINS: &str = "LEFT JOIN identities i ON i.user_id = u.id \
     LEFT JOIN provider_tokens t ON t.provider = i.provider AND t.subject = i.subject";

const TOKEN_COLUMNS: &str = "key_id, nonce, ciphertext, version, usable, updated_at";

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
            // Off by default in SQLite; identities and tokens rely on the
            // cascades.
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
        .instrument(crate::telemetry::trace::store_span(doing))
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
impl Database for SqliteStore {
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
}

#[async_trait]
impl BindingStore for SqliteStore {
    async fn bind_login(
        &self,
        identity: &Identity,
        policy: &BindPolicy,
        decide: Decide,
        record: LoginRecord<'_>,
    ) -> Result<BindResult, StoreError> {
        let identity = identity.clone();
        let policy = policy.clone();
        let tokens = record.tokens.cloned();
        let actor = record.actor.map(str::to_owned);
        let login = record.login.map(|k| (k.id.to_owned(), k.retry));
        let now = record.now;
        self.run("binding a login", move |conn| {
            let record = LoginRecord {
                tokens: tokens.as_ref(),
                actor: actor.as_deref(),
                now,
                login: login
                    .as_ref()
                    .map(|(id, retry)| LoginKey { id, retry: *retry }),
            };
            bind_login(conn, &identity, &policy, decide, record)
        })
        .await
    }

    async fn link_identity(
        &self,
        user_id: &str,
        identity: &Identity,
        tokens: Option<&SealedToken>,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Binding, StoreError> {
        let user_id = user_id.to_owned();
        let identity = identity.clone();
        let tokens = tokens.cloned();
        let actor = actor.map(str::to_owned);
        self.run("linking an identity", move |conn| {
            link_identity(
                conn,
                &user_id,
                &identity,
                tokens.as_ref(),
                actor.as_deref(),
                now,
            )
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
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn get_token(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<SealedToken>, StoreError> {
        let (provider, subject) = (provider.to_owned(), subject.to_owned());
        self.run("reading a token", move |conn| {
            let token = conn
                .prepare_cached(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM provider_tokens \
                     WHERE provider = ?1 AND subject = ?2"
                ))?
                .query_row(params![provider, subject], |row| token_from_row(row, 0))
                .optional()?;
            Ok(token)
        })
        .await
    }

    async fn put_token(
        &self,
        provider: &str,
        subject: &str,
        token: &SealedToken,
        expected_version: Option<i64>,
    ) -> Result<i64, StoreError> {
        let (provider, subject) = (provider.to_owned(), subject.to_owned());
        let token = token.clone();
        self.run("writing a token", move |conn| {
            put_token(conn, &provider, &subject, &token, expected_version)
        })
        .await
    }

    async fn mark_token_unusable(
        &self,
        provider: &str,
        subject: &str,
        expected_version: i64,
    ) -> Result<(), StoreError> {
        let (provider, subject) = (provider.to_owned(), subject.to_owned());
        self.run("marking a token unusable", move |conn| {
            // The version stays: it names the sealed bytes, which are
            // unchanged, and a refresher that did succeed with them may still
            // store its result with a compare-and-swap on that version.
            let changed = conn
                .prepare_cached(
                    "UPDATE provider_tokens SET usable = 0 \
                     WHERE provider = ?1 AND subject = ?2 AND version = ?3",
                )?
                .execute(params![provider, subject, expected_version])?;
            if changed == 1 {
                return Ok(());
            }
            let exists: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM provider_tokens \
                     WHERE provider = ?1 AND subject = ?2)",
                )?
                .query_row(params![provider, subject], |row| row.get(0))?;
            Err(if exists {
                Failure::Conflict(Conflict::StaleToken)
            } else {
                Failure::NotFound
            })
        })
        .await
    }

    async fn delete_token(&self, provider: &str, subject: &str) -> Result<bool, StoreError> {
        let (provider, subject) = (provider.to_owned(), subject.to_owned());
        self.run("deleting a token", move |conn| {
            let deleted = conn
                .prepare_cached("DELETE FROM provider_tokens WHERE provider = ?1 AND subject = ?2")?
                .execute(params![provider, subject])?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn list_tokens(
        &self,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<TokenRow>, StoreError> {
        let after = after.map(|(p, s)| (p.to_owned(), s.to_owned()));
        self.run("listing tokens", move |conn| {
            let limit = page_size(limit);
            let map = |row: &Row<'_>| {
                Ok(TokenRow {
                    provider: row.get(0)?,
                    subject: row.get(1)?,
                    token: token_from_row(row, 2)?,
                })
            };
            let tokens = match &after {
                Some((provider, subject)) => conn
                    .prepare_cached(&format!(
                        "SELECT provider, subject, {TOKEN_COLUMNS} FROM provider_tokens \
                         WHERE (provider, subject) > (?1, ?2) \
                         ORDER BY provider, subject LIMIT ?3"
                    ))?
                    .query_map(params![provider, subject, limit], map)?
                    .collect::<Result<Vec<_>, _>>()?,
                None => conn
                    .prepare_cached(&format!(
                        "SELECT provider, subject, {TOKEN_COLUMNS} FROM provider_tokens \
                         ORDER BY provider, subject LIMIT ?1"
                    ))?
                    .query_map(params![limit], map)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            Ok(tokens)
        })
        .await
    }
}

#[async_trait]
impl AuditLog for SqliteStore {
    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let event = event.clone();
        self.run("recording an audit event", move |conn| {
            insert_audit(conn, &event)
        })
        .await
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let query = query.clone();
        self.run("listing audit events", move |conn| {
            list_audit_events(conn, &query)
        })
        .await
    }
}

#[async_trait]
impl UserDirectory for SqliteStore {
    async fn get_user(&self, user_id: &str) -> Result<Option<User>, StoreError> {
        let user_id = user_id.to_owned();
        self.run("reading a user", move |conn| load_user(conn, &user_id))
            .await
    }

    async fn find_user_by_identity(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<User>, StoreError> {
        let (provider, subject) = (provider.to_owned(), subject.to_owned());
        self.run("finding a user by identity", move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users u {USER_JOINS} \
                 WHERE u.id = (SELECT user_id FROM identities \
                               WHERE provider = ?1 AND subject = ?2) \
                 ORDER BY i.provider"
            ))?;
            let users = fold_users(stmt.query(params![provider, subject])?)?;
            Ok(users.into_iter().next())
        })
        .await
    }

    async fn list_users(&self, query: &UserQuery) -> Result<Vec<User>, StoreError> {
        let query = query.clone();
        self.run("listing users", move |conn| list_users(conn, &query))
            .await
    }

    async fn unlink_identity(
        &self,
        user_id: &str,
        provider: &str,
        force: bool,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<User, StoreError> {
        let (user_id, provider) = (user_id.to_owned(), provider.to_owned());
        let actor = actor.map(str::to_owned);
        self.run("unlinking an identity", move |conn| {
            unlink_identity(conn, &user_id, &provider, force, actor.as_deref(), now)
        })
        .await
    }

    async fn delete_user(
        &self,
        user_id: &str,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let user_id = user_id.to_owned();
        let actor = actor.map(str::to_owned);
        self.run("deleting a user", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Identities and their tokens go through the cascade; audit rows
            // have no foreign key and stay.
            if tx
                .prepare_cached("DELETE FROM users WHERE id = ?1")?
                .execute(params![user_id])?
                == 0
            {
                return Err(Failure::NotFound);
            }
            insert_audit(
                &tx,
                &AuditEvent {
                    at: now,
                    kind: AuditKind::UserDeleted,
                    actor,
                    provider: None,
                    subject: None,
                    user_id: Some(user_id),
                    reason: None,
                    detail: None,
                },
            )?;
            tx.commit()?;
            Ok(())
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
}

/// One `bind_login`: gather the facts, decide, apply, all in one IMMEDIATE
/// transaction.
fn bind_login(
    conn: &mut Connection,
    identity: &Identity,
    policy: &BindPolicy,
    decide: Decide,
    record: LoginRecord<'_>,
) -> Result<BindResult, Failure> {
    let LoginRecord {
        tokens,
        actor,
        now,
        login,
    } = record;
    let now_us = to_micros(now);
    let now = from_micros(now_us).map_err(|e| Failure::Corrupt(e.to_string()))?;
    // IMMEDIATE takes the write lock up front: with a deferred transaction,
    // two processes could both read "not bound" and then one would fail
    // to upgrade its read lock instead of waiting for the other.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Under the write lock, an earlier attempt's commit is either visible
    // here or never happened. Looked up even on a first attempt: in process
    // it costs one index probe, and it spares SQLite the unique-violation
    // path that Postgres needs for a commit still in flight.
    if let Some(key) = login
        && let Some(done) = committed_login(&tx, key.id)?
    {
        return Ok(done);
    }
    let login_id = login.map(|k| k.id);
    let (facts, bound_since) = gather(&tx, identity, policy)?;
    let decision = decide(identity, policy, &facts);
    let user_id = match &decision.user {
        UserChoice::Existing(user_id) => user_id.clone(),
        UserChoice::New => {
            // Time-ordered ids keep the users primary key append-mostly.
            let user_id = uuid::Uuid::now_v7().to_string();
            tx.prepare_cached("INSERT INTO users (id, created_at) VALUES (?1, ?2)")?
                .execute(params![user_id, now_us])?;
            user_id
        }
        // Dropping `tx` rolls back; nothing was written anyway.
        UserChoice::LinkRequired => return Ok(BindResult::LinkRequired),
    };
    if decision.binds_identity() {
        // The write lock is ours, so the identity cannot have appeared since
        // `gather`: a conflict here is a real error.
        insert_identity(&tx, &user_id, identity, now_us)?;
    } else {
        update_profile(&tx, identity, Some(now_us))?;
    }
    let binding = binding::binding_after(identity, user_id, bound_since, now);
    if let Some(token) = tokens {
        store_token(&tx, identity, token)?;
    }
    for event in decision.audit_events(&binding, actor) {
        insert_audit_for(&tx, &event, login_id)?;
    }
    tx.commit()?;
    Ok(super::applied(&decision, binding))
}

/// Reads what `decide` needs, with when the identity was bound if it is.
/// The caller holds the write lock, so nothing read here can change before
/// it commits.
fn gather(
    conn: &Connection,
    identity: &Identity,
    policy: &BindPolicy,
) -> Result<(Facts, Option<OffsetDateTime>), Failure> {
    let existing = conn
        .prepare_cached(
            "SELECT user_id, created_at FROM identities WHERE provider = ?1 AND subject = ?2",
        )?
        .query_row(params![identity.provider, identity.subject], |row| {
            Ok((row.get::<_, String>(0)?, time_column(row, 1)?))
        })
        .optional()?;
    if let Some((user_id, created_at)) = existing {
        let facts = Facts {
            bound_to: Some(user_id),
            ..Facts::default()
        };
        return Ok((facts, Some(created_at)));
    }
    let union_candidate = match policy.union_lookup(identity) {
        Some(lookup) => find_candidate(
            conn,
            "union_id = ?1 AND provider IN ({providers})",
            lookup,
            identity,
        )?,
        None => None,
    };
    let email_candidate = match policy.email_lookup(identity) {
        // Expression and predicate as in identities_verified_email_idx.
        // SQLite's lower() folds ASCII letters only.
        Some(lookup) => find_candidate(
            conn,
            "email_verified = 1 AND lower(email) = lower(?1) AND provider IN ({providers})",
            lookup,
            identity,
        )?,
        None => None,
    };
    let facts = Facts {
        bound_to: None,
        union_candidate,
        email_candidate,
    };
    Ok((facts, None))
}

/// The user of the oldest identity matching `condition`, where `?1` is the
/// lookup's value and `{providers}` its providers (bound as ?2, ?3, …).
fn find_candidate(
    conn: &Connection,
    condition: &str,
    lookup: Lookup<'_>,
    identity: &Identity,
) -> Result<Option<Candidate>, Failure> {
    let placeholders = (2..lookup.providers.len() + 2)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut values: Vec<&dyn ToSql> = vec![&lookup.value];
    values.extend(lookup.providers.iter().map(|p| p as &dyn ToSql));
    let found: Option<(String, String)> = conn
        .prepare_cached(&format!(
            "SELECT user_id, provider FROM identities WHERE {} \
             ORDER BY created_at, provider, subject LIMIT 1",
            condition.replace("{providers}", &placeholders)
        ))?
        .query_row(params_from_iter(values), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    let Some((user_id, provider)) = found else {
        return Ok(None);
    };
    let has_provider_identity = has_identity_at(conn, &user_id, &identity.provider)?;
    Ok(Some(Candidate {
        user_id,
        provider,
        has_provider_identity,
    }))
}

/// The user already has an identity at `provider`.
fn has_identity_at(conn: &Connection, user_id: &str, provider: &str) -> Result<bool, Failure> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM identities WHERE user_id = ?1 AND provider = ?2")?
        .exists(params![user_id, provider])?)
}

fn link_identity(
    conn: &mut Connection,
    user_id: &str,
    identity: &Identity,
    tokens: Option<&SealedToken>,
    actor: Option<&str>,
    now: OffsetDateTime,
) -> Result<Binding, Failure> {
    let now_us = to_micros(now);
    let now = from_micros(now_us).map_err(|e| Failure::Corrupt(e.to_string()))?;
    // Conflicts return early, dropping `tx`, which rolls back (including a
    // user row made just now): nothing is written.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let created = tx
        .prepare_cached(
            "INSERT INTO users (id, created_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?
        .execute(params![user_id, now_us])?
        == 1;

    let existing = tx
        .prepare_cached(
            "SELECT user_id, created_at, last_login_at FROM identities \
             WHERE provider = ?1 AND subject = ?2",
        )?
        .query_row(params![identity.provider, identity.subject], |row| {
            Ok((
                row.get::<_, String>(0)?,
                time_column(row, 1)?,
                time_column(row, 2)?,
            ))
        })
        .optional()?;
    if let Some((owner, created_at, last_login_at)) = existing {
        if owner != user_id {
            return Err(Failure::Conflict(Conflict::IdentityLinkedElsewhere));
        }
        // Linking is not a login: the profile is refreshed, last_login_at
        // is kept.
        update_profile(&tx, identity, None)?;
        if let Some(token) = tokens {
            store_token(&tx, identity, token)?;
        }
        tx.commit()?;
        return Ok(Binding {
            user_id: owner,
            provider: identity.provider.clone(),
            subject: identity.subject.clone(),
            created_at,
            last_login_at,
        });
    }
    if has_identity_at(&tx, user_id, &identity.provider)? {
        return Err(Failure::Conflict(Conflict::ProviderAlreadyLinked));
    }
    // Cannot collide under the write lock after the checks above; if it did,
    // the constraint names the conflict (see `constraint_conflict`).
    insert_identity(&tx, user_id, identity, now_us)?;
    let binding = Binding {
        user_id: user_id.to_owned(),
        provider: identity.provider.clone(),
        subject: identity.subject.clone(),
        created_at: now,
        last_login_at: now,
    };
    if let Some(token) = tokens {
        store_token(&tx, identity, token)?;
    }
    if created {
        insert_audit(
            &tx,
            &AuditEvent::about(AuditKind::UserCreated, &binding, actor, None),
        )?;
    }
    insert_audit(
        &tx,
        &AuditEvent::about(AuditKind::IdentityLinked, &binding, actor, None),
    )?;
    tx.commit()?;
    Ok(binding)
}

fn unlink_identity(
    conn: &mut Connection,
    user_id: &str,
    provider: &str,
    force: bool,
    actor: Option<&str>,
    now: OffsetDateTime,
) -> Result<User, Failure> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let subject: Option<String> = tx
        .prepare_cached("SELECT subject FROM identities WHERE user_id = ?1 AND provider = ?2")?
        .query_row(params![user_id, provider], |row| row.get(0))
        .optional()?;
    // No such user, or none of theirs at this provider.
    let Some(subject) = subject else {
        return Err(Failure::NotFound);
    };
    let count: i64 = tx
        .prepare_cached("SELECT count(*) FROM identities WHERE user_id = ?1")?
        .query_row(params![user_id], |row| row.get(0))?;
    if count <= 1 && !force {
        return Err(Failure::Conflict(Conflict::LastIdentity));
    }
    // The token goes with it (ON DELETE CASCADE).
    tx.prepare_cached("DELETE FROM identities WHERE provider = ?1 AND subject = ?2")?
        .execute(params![provider, subject])?;
    insert_audit(
        &tx,
        &AuditEvent {
            at: now,
            kind: AuditKind::IdentityUnlinked,
            actor: actor.map(str::to_owned),
            provider: Some(provider.to_owned()),
            subject: Some(subject),
            user_id: Some(user_id.to_owned()),
            reason: None,
            detail: None,
        },
    )?;
    let user = load_user(&tx, user_id)?
        .ok_or_else(|| Failure::Corrupt("the user vanished inside the transaction".into()))?;
    tx.commit()?;
    Ok(user)
}

/// Inserts a new binding; the caller has checked it is not bound.
fn insert_identity(
    conn: &Connection,
    user_id: &str,
    identity: &Identity,
    now_us: i64,
) -> Result<(), Failure> {
    let inserted = conn
        .prepare_cached(
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
        ]);
    match inserted {
        Ok(_) => Ok(()),
        Err(e) => Err(constraint_conflict(&e).map_or(Failure::Sqlite(e), Failure::Conflict)),
    }
}

/// Overwrites the stored profile; `last_login_at` only when given.
fn update_profile(
    conn: &Connection,
    identity: &Identity,
    last_login_us: Option<i64>,
) -> Result<(), Failure> {
    conn.prepare_cached(
        "UPDATE identities SET union_id = ?3, username = ?4, display_name = ?5, \
         avatar_url = ?6, email = ?7, email_verified = ?8, \
         last_login_at = COALESCE(?9, last_login_at) \
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
        last_login_us,
    ])?;
    Ok(())
}

/// `upsert_token` for an identity this transaction has just bound or found.
fn store_token(conn: &Connection, identity: &Identity, token: &SealedToken) -> Result<(), Failure> {
    match upsert_token(conn, &identity.provider, &identity.subject, token)? {
        Some(_) => Ok(()),
        None => Err(Failure::Corrupt(
            "the identity being bound has no row for its token".into(),
        )),
    }
}

/// Writes the token unconditionally: version 1 when new, else the stored
/// version plus one; usable. `None` if the identity does not exist (the
/// INSERT … SELECT then has no row to insert).
fn upsert_token(
    conn: &Connection,
    provider: &str,
    subject: &str,
    token: &SealedToken,
) -> Result<Option<i64>, Failure> {
    // The WHERE clause also keeps SQLite from reading ON CONFLICT as part of
    // the SELECT's join.
    let version = conn
        .prepare_cached(
            "INSERT INTO provider_tokens \
             (provider, subject, key_id, nonce, ciphertext, version, usable, updated_at) \
             SELECT provider, subject, ?3, ?4, ?5, 1, 1, ?6 \
             FROM identities WHERE provider = ?1 AND subject = ?2 \
             ON CONFLICT (provider, subject) DO UPDATE SET key_id = excluded.key_id, \
             nonce = excluded.nonce, ciphertext = excluded.ciphertext, \
             version = provider_tokens.version + 1, usable = 1, \
             updated_at = excluded.updated_at \
             RETURNING version",
        )?
        .query_row(
            params![
                provider,
                subject,
                token.key_id,
                token.nonce,
                token.ciphertext,
                to_micros(token.updated_at),
            ],
            |row| row.get(0),
        )
        .optional()?;
    Ok(version)
}

fn put_token(
    conn: &mut Connection,
    provider: &str,
    subject: &str,
    token: &SealedToken,
    expected_version: Option<i64>,
) -> Result<i64, Failure> {
    let Some(expected) = expected_version else {
        return upsert_token(conn, provider, subject, token)?.ok_or(Failure::NotFound);
    };
    let updated: Option<i64> = conn
        .prepare_cached(
            "UPDATE provider_tokens SET key_id = ?3, nonce = ?4, ciphertext = ?5, \
             version = version + 1, usable = 1, updated_at = ?6 \
             WHERE provider = ?1 AND subject = ?2 AND version = ?7 RETURNING version",
        )?
        .query_row(
            params![
                provider,
                subject,
                token.key_id,
                token.nonce,
                token.ciphertext,
                to_micros(token.updated_at),
                expected,
            ],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(version) = updated {
        return Ok(version);
    }
    let identity_exists = conn
        .prepare_cached("SELECT 1 FROM identities WHERE provider = ?1 AND subject = ?2")?
        .exists(params![provider, subject])?;
    // The identity exists but its token is not at that version (or is gone):
    // the caller's read is stale.
    Err(if identity_exists {
        Failure::Conflict(Conflict::StaleToken)
    } else {
        Failure::NotFound
    })
}

/// A token from `TOKEN_COLUMNS` starting at column `first`.
fn token_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<SealedToken> {
    Ok(SealedToken {
        key_id: row.get(first)?,
        nonce: row.get(first + 1)?,
        ciphertext: row.get(first + 2)?,
        version: row.get(first + 3)?,
        usable: row.get(first + 4)?,
        updated_at: time_column(row, first + 5)?,
    })
}

fn load_user(conn: &Connection, user_id: &str) -> Result<Option<User>, Failure> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {USER_COLUMNS} FROM users u {USER_JOINS} WHERE u.id = ?1 ORDER BY i.provider"
    ))?;
    let users = fold_users(stmt.query(params![user_id])?)?;
    Ok(users.into_iter().next())
}

fn list_users(conn: &Connection, query: &UserQuery) -> Result<Vec<User>, Failure> {
    let filter = filter::users(query);
    let (clause, next) = filter.render(|n| format!("?{n}"));
    let limit = page_size(query.limit);
    let mut params = sqlite_values(&filter.values);
    params.push(Box::new(limit));
    // The page of users first, then their identities in the same statement:
    // no query per user.
    let sql = format!(
        "WITH page AS (SELECT id, created_at FROM users {clause} \
                       ORDER BY created_at DESC, id DESC LIMIT ?{next}) \
         SELECT {USER_COLUMNS} FROM page u {USER_JOINS} \
         ORDER BY u.created_at DESC, u.id DESC, i.provider"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    fold_users(stmt.query(rusqlite::params_from_iter(params.iter()))?)
}

/// Groups `USER_COLUMNS` rows (ordered by user, then provider) into users.
fn fold_users(mut rows: rusqlite::Rows<'_>) -> Result<Vec<User>, Failure> {
    let mut users: Vec<User> = Vec::new();
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        if users.last().is_none_or(|user| user.id != id) {
            users.push(User {
                id,
                created_at: time_column(row, 1)?,
                identities: Vec::new(),
            });
        }
        // NULL: the LEFT JOIN found no identity for this user.
        let Some(provider) = row.get::<_, Option<String>>(2)? else {
            continue;
        };
        if let Some(user) = users.last_mut() {
            user.identities.push(LinkedIdentity {
                identity: Identity {
                    provider,
                    subject: row.get(3)?,
                    union_id: row.get(4)?,
                    username: row.get(5)?,
                    display_name: row.get(6)?,
                    avatar_url: row.get(7)?,
                    email: row.get(8)?,
                    email_verified: row.get(9)?,
                },
                created_at: time_column(row, 10)?,
                last_login_at: time_column(row, 11)?,
                token: row.get(12)?,
            });
        }
    }
    Ok(users)
}

fn list_audit_events(conn: &Connection, query: &AuditQuery) -> Result<Vec<AuditRecord>, Failure> {
    let filter = filter::audit_events(query);
    let (clause, next) = filter.render(|n| format!("?{n}"));
    let limit = page_size(query.limit);
    let mut params = sqlite_values(&filter.values);
    params.push(Box::new(limit));
    // Newest first by id: the id is the paging cursor, and within one
    // transaction (which shares `at`) it keeps the order of writing.
    let sql = format!(
        "SELECT id, at, kind, actor, provider, subject, user_id, reason, detail \
         FROM audit_events {clause} ORDER BY id DESC LIMIT ?{next}"
    );

    let mut stmt = conn.prepare_cached(&sql)?;
    let events = stmt
        .query_map(rusqlite::params_from_iter(params.iter()), |row| {
            let kind: String = row.get(2)?;
            Ok(AuditRecord {
                id: row.get(0)?,
                event: AuditEvent {
                    at: time_column(row, 1)?,
                    kind: AuditKind::parse(&kind).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            format!("unknown audit kind {kind:?}").into(),
                        )
                    })?,
                    actor: row.get(3)?,
                    provider: row.get(4)?,
                    subject: row.get(5)?,
                    user_id: row.get(6)?,
                    reason: row.get(7)?,
                    detail: row.get(8)?,
                },
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(events)
}

fn insert_audit(conn: &Connection, event: &AuditEvent) -> Result<(), Failure> {
    insert_audit_for(conn, event, None)
}

/// An audit event of the login `login_id` (see `LoginKey`).
fn insert_audit_for(
    conn: &Connection,
    event: &AuditEvent,
    login_id: Option<&str>,
) -> Result<(), Failure> {
    conn.prepare_cached(
        "INSERT INTO audit_events \
         (at, kind, actor, provider, subject, user_id, reason, detail, login_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        to_micros(event.at),
        event.kind.as_str(),
        event.actor,
        event.provider,
        event.subject,
        event.user_id,
        event.reason,
        event.detail,
        login_id,
    ])?;
    Ok(())
}

/// What the login `login_id` committed, if it did.
fn committed_login(conn: &Connection, login_id: &str) -> Result<Option<BindResult>, Failure> {
    let found = conn
        .prepare_cached(COMMITTED_LOGIN_SQL)?
        .query_row(params![login_id], |row| {
            Ok(CommittedLogin {
                user_id: row.get(0)?,
                provider: row.get(1)?,
                subject: row.get(2)?,
                at: time_column(row, 3)?,
                user_created: row.get(4)?,
                linked_by: row.get(5)?,
                identity_created_at: row
                    .get::<_, Option<i64>>(6)?
                    .map(|_| time_column(row, 6))
                    .transpose()?,
            })
        })
        .optional()?;
    Ok(found.map(CommittedLogin::into_result))
}

/// The binding rule a constraint violation on `identities` means: the
/// primary key is the identity bound elsewhere, the other unique key a second
/// identity at one provider for one user.
fn constraint_conflict(e: &rusqlite::Error) -> Option<Conflict> {
    match e {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.extended_code {
            ffi::SQLITE_CONSTRAINT_PRIMARYKEY => Some(Conflict::IdentityLinkedElsewhere),
            ffi::SQLITE_CONSTRAINT_UNIQUE => Some(Conflict::ProviderAlreadyLinked),
            _ => None,
        },
        _ => None,
    }
}

fn page_size(limit: u32) -> u32 {
    if limit == 0 { DEFAULT_PAGE } else { limit }
}

/// Unix microseconds, rounded down (like Postgres' timestamptz, which keeps
/// microseconds). Every `OffsetDateTime` (years ±9999) fits in an i64.
/// The shared filter's values as SQLite parameters (times as microseconds).
fn sqlite_values<'a>(values: &[filter::Value<'a>]) -> Vec<Box<dyn ToSql + 'a>> {
    values
        .iter()
        .map(|v| -> Box<dyn ToSql + 'a> {
            match *v {
                filter::Value::Text(s) => Box::new(s),
                filter::Value::Time(t) => Box::new(ceil_micros(t)),
                filter::Value::Int(i) => Box::new(i),
            }
        })
        .collect()
}

fn to_micros(t: OffsetDateTime) -> i64 {
    let micros = t.unix_timestamp_nanos().div_euclid(1_000);
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

/// Unix microseconds, rounded up: for range bounds on stored times, `at >= t`
/// and `at < t` select the same rows with `t` rounded up as with `t` itself.
fn ceil_micros(t: OffsetDateTime) -> i64 {
    let down = to_micros(t);
    if i128::from(down) * 1_000 == t.unix_timestamp_nanos() {
        down
    } else {
        down.saturating_add(1)
    }
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
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Conflict(Conflict),
    #[error("the connection lock was poisoned by a panic")]
    Poisoned,
    #[error("unexpected value: {0}")]
    Corrupt(String),
}

impl Failure {
    fn into_store_error(self, doing: &'static str) -> StoreError {
        let unavailable = match &self {
            Failure::NotFound => return StoreError::NotFound,
            Failure::Conflict(conflict) => return StoreError::Conflict(*conflict),
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
        assert_eq!(ceil_micros(t), 1_700_000_000_123_457);
        assert_eq!(
            from_micros(to_micros(t)).unwrap().unix_timestamp_nanos(),
            1_700_000_000_123_456_000
        );
        let before_epoch = OffsetDateTime::from_unix_timestamp_nanos(-1_500).unwrap();
        assert_eq!(to_micros(before_epoch), -2);
        assert_eq!(ceil_micros(before_epoch), -1);
        let exact = OffsetDateTime::from_unix_timestamp_nanos(-2_000).unwrap();
        assert_eq!(ceil_micros(exact), -2);
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

    #[test]
    fn identity_constraints_map_to_their_conflicts() {
        let mut conn = Connection::open_in_memory().unwrap();
        embedded::migrations::runner().run(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO users (id, created_at) VALUES ('u1', 0), ('u2', 0);
             INSERT INTO identities (provider, subject, user_id, created_at, last_login_at)
             VALUES ('gh', '1', 'u1', 0, 0);",
        )
        .unwrap();
        let insert = |subject: &str, user: &str| {
            conn.execute(
                "INSERT INTO identities (provider, subject, user_id, created_at, last_login_at) \
                 VALUES ('gh', ?1, ?2, 0, 0)",
                params![subject, user],
            )
            .unwrap_err()
        };
        assert_eq!(
            constraint_conflict(&insert("1", "u2")),
            Some(Conflict::IdentityLinkedElsewhere)
        );
        assert_eq!(
            constraint_conflict(&insert("2", "u1")),
            Some(Conflict::ProviderAlreadyLinked)
        );
        assert_eq!(
            constraint_conflict(&conn.execute("SELEKT", []).unwrap_err()),
            None
        );
    }

    #[test]
    fn v1_data_survives_the_v2_upgrade() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        embedded::migrations::runner()
            .set_target(refinery::Target::Version(1))
            .run(&mut conn)
            .unwrap();
        conn.execute_batch(
            "INSERT INTO users (id, created_at) VALUES ('u1', 7);
             INSERT INTO identities (provider, subject, user_id, email, email_verified,
                                     created_at, last_login_at)
             VALUES ('gh', '1', 'u1', 'a@b', 1, 7, 8);
             INSERT INTO audit_events (at, kind, user_id) VALUES (8, 'login_succeeded', 'u1');",
        )
        .unwrap();
        embedded::migrations::runner().run(&mut conn).unwrap();

        let user = load_user(&conn, "u1").unwrap().unwrap();
        assert_eq!(user.identities.len(), 1);
        assert_eq!(user.identities[0].token, None);
        assert_eq!(user.identities[0].last_login_at, from_micros(8).unwrap());
        let events = list_audit_events(&conn, &AuditQuery::default()).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event.detail, None);
        assert_eq!(events[0].event.kind, AuditKind::LoginSucceeded);
    }

    #[test]
    fn linking_queries_use_their_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        embedded::migrations::runner().run(&mut conn).unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map([], |row| row.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            rows.join("\n")
        };
        let email = plan(
            "SELECT user_id FROM identities WHERE email_verified = 1 \
             AND lower(email) = lower('a@b') ORDER BY created_at, provider, subject LIMIT 1",
        );
        assert!(email.contains("identities_verified_email_idx"), "{email}");
        let union = plan(
            "SELECT user_id FROM identities WHERE union_id = 'u' AND provider IN ('a', 'b') \
             ORDER BY created_at, provider, subject LIMIT 1",
        );
        assert!(union.contains("identities_union_id_idx"), "{union}");
    }
}
