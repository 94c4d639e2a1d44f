//! `Store` on Postgres: a deadpool pool of tokio-postgres connections, over
//! TLS as the URL's `sslmode` and `sslrootcert` ask (`tls`), schema managed
//! by refinery (`migrations/postgres`).
//!
//! Concurrency: every write that decides from what it read runs in one READ
//! COMMITTED transaction and locks what the decision rests on — the identity
//! row (`FOR UPDATE`) for returning logins, the target user row for anything
//! that adds an identity to an existing user or removes one. A first login
//! that loses a race to bind the same identity sees `ON CONFLICT DO NOTHING`
//! insert nothing, rolls back and goes round again; the next attempt then
//! finds the winner's binding.

use std::ops::DerefMut;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use time::OffsetDateTime;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use self::one_statement::Applied;
use super::filter;

use super::{
    AuditLog, AuditQuery, AuditRecord, BindPolicy, BindResult, BindingStore, COMMITTED_LOGIN_SQL,
    CommittedLogin, Conflict, Database, LoginRecord, StoreError, TokenRow, TokenStore,
    UserDirectory, UserQuery,
};
use tracing::Instrument;

use crate::domain::binding::{self, Candidate, Decide, Facts, UserChoice};
use crate::domain::{AuditEvent, AuditKind, Binding, Identity, LinkedIdentity, SealedToken, User};
use crate::telemetry::trace::store_span;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

mod one_statement;
mod tls;
pub(crate) use tls::{MakeTls, parse_url};

/// How long a caller may wait for a pooled connection, for a new connection to
/// be made, or for a stale one to be checked. An outage must surface quickly
/// as `Unavailable` (and a retryable gRPC status) rather than hang logins.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// A write retries when a concurrent transaction bound the same identity
/// first; the next attempt then finds that binding. More than a couple of
/// attempts means something other than that race is going on.
const BIND_ATTEMPTS: usize = 5;

/// Key of the session advisory lock that serialises `migrate` across replicas
/// (refinery does no locking of its own). Arbitrary but fixed: "authbrkr".
const MIGRATION_LOCK_KEY: i64 = 0x6175_7468_6272_6b72;

/// Reads with `limit == 0` get this many rows, so an unset page size never
/// means "the whole table".
const DEFAULT_PAGE: u32 = 100;

/// Constraint names from `migrations/postgres/V1__initial.sql`, to tell the
/// two unique violations on `identities` apart.
const IDENTITIES_PKEY: &str = "identities_pkey";
const IDENTITIES_USER_PROVIDER_KEY: &str = "identities_user_provider_key";
/// From `V3__login_ids.sql`: one `login_succeeded` per login id.
const AUDIT_LOGIN_ID_KEY: &str = "audit_events_login_id_key";

/// A user with each of their identities, one row per identity (a single row
/// with NULL identity columns for a user who has none). `fold_users` reads it.
const USER_COLUMNS: &str = "u.id, u.created_at, i.provider, i.subject, i.union_id, i.username, \
     i.display_name, i.avatar_url, i.email, i.email_verified, i.created_at, i.last_login_at, \
     t.usable";
const USER_JOINS: &str = "LEFT JOIN identities i ON i.user_id = u.id \
     LEFT JOIN provider_tokens t ON t.provider = i.provider AND t.subject = i.subject";

const TOKEN_COLUMNS: &str = "key_id, nonce, ciphertext, version, usable, updated_at";

pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    // The pool's config holds the password; show only its size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool_max_size", &self.pool.status().max_size)
            .finish()
    }
}

/// One attempt at a write that may lose a race: `Retry` rolls it back and
/// runs it again.
enum Step<T> {
    Done(T),
    Retry,
}

/// A pool that makes its connections lazily, so building it succeeds while
/// the server is down (the first query then reports it). Shared with the
/// Postgres state backend, which adds its session options to `config` first;
/// both take `config` and `tls` from [`parse_url`].
pub(crate) fn pool(
    mut config: tokio_postgres::Config,
    tls: MakeTls,
    pool_size: usize,
) -> Result<Pool, deadpool_postgres::BuildError> {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(POOL_TIMEOUT);
    }
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            // A broken connection is noticed by its (closed) socket; a
            // test query on every checkout would double the round trips.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .build()
}

/// Runs `runner` under the advisory lock that serialises migrations across
/// replicas. Shared with the Postgres state backend, whose schema keeps its
/// own history table.
pub(crate) async fn migrate_locked(
    pool: &Pool,
    runner: &refinery::Runner,
    doing: &'static str,
) -> Result<(), StoreError> {
    async {
        // Taken out of the pool and closed afterwards: if this future is
        // dropped between lock and unlock, closing the session is what
        // releases the advisory lock, instead of a pooled connection
        // holding it forever.
        let mut client = Object::take(pool.get().await?);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        // ClientWrapper derefs to the tokio-postgres Client refinery drives.
        let pg: &mut tokio_postgres::Client = client.deref_mut();
        let result = runner.run_async(pg).await;
        // Best effort: the session ends right after, which also unlocks.
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
            .await;
        result?;
        Ok::<_, Failure>(())
    }
    .await
    .map_err(|e| e.into_store_error(doing))
}

impl PostgresStore {
    /// Builds the pool; connections are made lazily, so this succeeds even if
    /// the server is down (the first query then reports `Unavailable`).
    pub fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        // Parse errors name the bad option, never the password.
        let (config, tls) = parse_url(url).map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
        let pool = pool(config, tls.counting_round_trips(), pool_size).map_err(|e| {
            StoreError::Internal(anyhow::Error::new(e).context("building the pool"))
        })?;
        Ok(PostgresStore { pool })
    }

    async fn client(&self) -> Result<Object, Failure> {
        Ok(self.pool.get().await?)
    }

    async fn bind_login_inner(
        &self,
        identity: &Identity,
        policy: &BindPolicy,
        decide: Decide,
        record: LoginRecord<'_>,
    ) -> Result<BindResult, Failure> {
        let record = LoginRecord {
            now: truncate_to_micros(record.now),
            ..record
        };
        let mut client = self.client().await?;
        if let Some(key) = record.login.filter(|k| k.retry)
            && let Some(done) = committed_login(&client, key.id).await?
        {
            return Ok(done);
        }
        let login_id = record.login.map(|k| k.id);
        for _ in 0..BIND_ATTEMPTS {
            // One round trip for the common logins; the rest fall through.
            let fast = one_statement::bind(&client, identity, policy, decide, record);
            match fast.await {
                Ok(Applied::Done(result)) => return Ok(result),
                Ok(Applied::Raced) => continue,
                Ok(Applied::Declined) => {}
                Err(Failure::Db(e)) if is_login_id_taken(&e) => {
                    return already_committed(&client, login_id, e).await;
                }
                Err(e) => return Err(e),
            }
            let tx = client.transaction().await?;
            // An error drops `tx`, which rolls it back.
            let attempt = bind_attempt(&tx, identity, policy, decide, record);
            let step = match attempt.await {
                Err(Failure::Db(e)) if is_login_id_taken(&e) => {
                    drop(tx);
                    return already_committed(&client, login_id, e).await;
                }
                other => other?,
            };
            match step {
                Step::Done(BindResult::LinkRequired) => {
                    // Nothing was written; this only releases row locks.
                    tx.rollback().await?;
                    return Ok(BindResult::LinkRequired);
                }
                Step::Done(result) => {
                    tx.commit().await?;
                    return Ok(result);
                }
                Step::Retry => tx.rollback().await?,
            }
        }
        Err(Failure::Contention)
    }

    async fn link_identity_inner(
        &self,
        user_id: &str,
        identity: &Identity,
        tokens: Option<&SealedToken>,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Binding, Failure> {
        let now = truncate_to_micros(now);
        let mut client = self.client().await?;
        for _ in 0..BIND_ATTEMPTS {
            let tx = client.transaction().await?;
            let attempt = link_attempt(&tx, user_id, identity, tokens, actor, now).await;
            match attempt {
                Ok(Step::Done(binding)) => {
                    tx.commit().await?;
                    return Ok(binding);
                }
                Ok(Step::Retry) => tx.rollback().await?,
                // A concurrent transaction bound the identity (primary key) or
                // gave the user an identity at the provider after we looked;
                // the constraint says which. Binders to an existing user lock
                // it first, as we did, so the identity's new owner cannot be
                // `user_id`: the primary key means "elsewhere".
                Err(Failure::Db(e)) => {
                    return Err(unique_conflict(&e).map_or(Failure::Db(e), Failure::Conflict));
                }
                // Dropping `tx` rolls back, including a user row made just now.
                Err(e) => return Err(e),
            }
        }
        Err(Failure::Contention)
    }

    async fn unlink_identity_inner(
        &self,
        user_id: &str,
        provider: &str,
        force: bool,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<User, Failure> {
        let now = truncate_to_micros(now);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Locking the user serialises unlinks (and links) of one user, so two
        // concurrent unlinks cannot each see "not the last" and remove both.
        if !lock_user(&tx, user_id).await? {
            return Err(Failure::NotFound);
        }
        let stmt = tx
            .prepare_cached("SELECT subject FROM identities WHERE user_id = $1 AND provider = $2")
            .await?;
        let Some(row) = tx.query_opt(&stmt, &[&user_id, &provider]).await? else {
            return Err(Failure::NotFound);
        };
        let subject: String = row.try_get(0)?;
        let stmt = tx
            .prepare_cached("SELECT count(*) FROM identities WHERE user_id = $1")
            .await?;
        let count: i64 = tx.query_one(&stmt, &[&user_id]).await?.try_get(0)?;
        if count <= 1 && !force {
            return Err(Failure::Conflict(Conflict::LastIdentity));
        }
        // The token goes with it (ON DELETE CASCADE).
        let stmt = tx
            .prepare_cached("DELETE FROM identities WHERE provider = $1 AND subject = $2")
            .await?;
        tx.execute(&stmt, &[&provider, &subject]).await?;
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
        )
        .await?;
        let user = load_user(&tx, user_id)
            .await?
            .ok_or_else(|| Failure::Corrupt("the locked user vanished".into()))?;
        tx.commit().await?;
        Ok(user)
    }

    async fn delete_user_inner(
        &self,
        user_id: &str,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), Failure> {
        let now = truncate_to_micros(now);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Identities and their tokens go through the cascade; audit rows have
        // no foreign key and stay.
        let stmt = tx.prepare_cached("DELETE FROM users WHERE id = $1").await?;
        if tx.execute(&stmt, &[&user_id]).await? == 0 {
            return Err(Failure::NotFound);
        }
        insert_audit(
            &tx,
            &AuditEvent {
                at: now,
                kind: AuditKind::UserDeleted,
                actor: actor.map(str::to_owned),
                provider: None,
                subject: None,
                user_id: Some(user_id.to_owned()),
                reason: None,
                detail: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_binding_inner(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Binding>, Failure> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT user_id, created_at, last_login_at FROM identities \
                 WHERE provider = $1 AND subject = $2",
            )
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&provider, &subject]).await? else {
            return Ok(None);
        };
        Ok(Some(Binding {
            user_id: row.try_get(0)?,
            provider: provider.to_owned(),
            subject: subject.to_owned(),
            created_at: row.try_get(1)?,
            last_login_at: row.try_get(2)?,
        }))
    }

    async fn find_identity_inner(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Identity>, Failure> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT union_id, username, display_name, avatar_url, email, email_verified \
                 FROM identities WHERE provider = $1 AND subject = $2",
            )
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&provider, &subject]).await? else {
            return Ok(None);
        };
        Ok(Some(Identity {
            provider: provider.to_owned(),
            subject: subject.to_owned(),
            union_id: row.try_get(0)?,
            username: row.try_get(1)?,
            display_name: row.try_get(2)?,
            avatar_url: row.try_get(3)?,
            email: row.try_get(4)?,
            email_verified: row.try_get(5)?,
        }))
    }

    async fn find_user_by_identity_inner(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<User>, Failure> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users u {USER_JOINS} \
                 WHERE u.id = (SELECT user_id FROM identities \
                               WHERE provider = $1 AND subject = $2) \
                 ORDER BY i.provider"
            ))
            .await?;
        let rows = client.query(&stmt, &[&provider, &subject]).await?;
        Ok(fold_users(&rows)?.into_iter().next())
    }

    async fn list_users_inner(&self, query: &UserQuery) -> Result<Vec<User>, Failure> {
        let filter = filter::users(query);
        let (clause, next) = filter.render(|n| format!("${n}"));
        let values = pg_values(&filter.values);
        let limit = page_size(query.limit);
        let mut params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect();
        params.push(&limit);
        // The page of users first, then their identities in the same
        // statement: no query per user.
        let sql = format!(
            "WITH page AS (SELECT id, created_at FROM users {clause} \
                           ORDER BY created_at DESC, id DESC LIMIT ${next}) \
             SELECT {USER_COLUMNS} FROM page u {USER_JOINS} \
             ORDER BY u.created_at DESC, u.id DESC, i.provider"
        );
        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await?;
        let rows = client.query(&stmt, &params).await?;
        fold_users(&rows)
    }

    async fn count_users_inner(&self) -> Result<u64, Failure> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT count(*) FROM users").await?;
        let count: i64 = client.query_one(&stmt, &[]).await?.try_get(0)?;
        u64::try_from(count).map_err(|_| Failure::Corrupt(format!("negative user count {count}")))
    }

    async fn get_token_inner(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<SealedToken>, Failure> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM provider_tokens WHERE provider = $1 AND subject = $2"
            ))
            .await?;
        client
            .query_opt(&stmt, &[&provider, &subject])
            .await?
            .map(|row| token_from_row(&row, 0))
            .transpose()
    }

    async fn put_token_inner(
        &self,
        provider: &str,
        subject: &str,
        token: &SealedToken,
        expected_version: Option<i64>,
    ) -> Result<i64, Failure> {
        let client = self.client().await?;
        let Some(expected) = expected_version else {
            return match upsert_token(&client, provider, subject, token).await {
                Ok(Some(version)) => Ok(version),
                Ok(None) => Err(Failure::NotFound),
                // The identity was deleted between the upsert's read of it and
                // its foreign key check.
                Err(Failure::Db(e)) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                    Err(Failure::NotFound)
                }
                Err(e) => Err(e),
            };
        };
        let stmt = client
            .prepare_cached(
                "UPDATE provider_tokens SET key_id = $3, nonce = $4, ciphertext = $5, \
                 version = version + 1, usable = TRUE, updated_at = $6 \
                 WHERE provider = $1 AND subject = $2 AND version = $7 RETURNING version",
            )
            .await?;
        let updated = client
            .query_opt(
                &stmt,
                &[
                    &provider,
                    &subject,
                    &token.key_id,
                    &token.nonce,
                    &token.ciphertext,
                    &truncate_to_micros(token.updated_at),
                    &expected,
                ],
            )
            .await?;
        match updated {
            Some(row) => Ok(row.try_get(0)?),
            // The identity exists but its token is not at that version (or is
            // gone): the caller's read is stale.
            None if identity_exists(&client, provider, subject).await? => {
                Err(Failure::Conflict(Conflict::StaleToken))
            }
            None => Err(Failure::NotFound),
        }
    }

    async fn mark_token_unusable_inner(
        &self,
        provider: &str,
        subject: &str,
        expected_version: i64,
    ) -> Result<(), Failure> {
        let client = self.client().await?;
        // The version stays: it names the sealed bytes, which are unchanged,
        // and a refresher that did succeed with them may still store its
        // result with a compare-and-swap on that version.
        let stmt = client
            .prepare_cached(
                "UPDATE provider_tokens SET usable = FALSE \
                 WHERE provider = $1 AND subject = $2 AND version = $3",
            )
            .await?;
        if client
            .execute(&stmt, &[&provider, &subject, &expected_version])
            .await?
            == 1
        {
            return Ok(());
        }
        let stmt = client
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM provider_tokens WHERE provider = $1 AND subject = $2)",
            )
            .await?;
        let exists: bool = client
            .query_one(&stmt, &[&provider, &subject])
            .await?
            .try_get(0)?;
        Err(if exists {
            Failure::Conflict(Conflict::StaleToken)
        } else {
            Failure::NotFound
        })
    }

    async fn delete_token_inner(&self, provider: &str, subject: &str) -> Result<bool, Failure> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("DELETE FROM provider_tokens WHERE provider = $1 AND subject = $2")
            .await?;
        Ok(client.execute(&stmt, &[&provider, &subject]).await? > 0)
    }

    async fn list_tokens_inner(
        &self,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<TokenRow>, Failure> {
        let limit = page_size(limit);
        let client = self.client().await?;
        let rows = match after {
            Some((provider, subject)) => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT provider, subject, {TOKEN_COLUMNS} FROM provider_tokens \
                         WHERE (provider, subject) > ($1, $2) \
                         ORDER BY provider, subject LIMIT $3"
                    ))
                    .await?;
                client.query(&stmt, &[&provider, &subject, &limit]).await?
            }
            None => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT provider, subject, {TOKEN_COLUMNS} FROM provider_tokens \
                         ORDER BY provider, subject LIMIT $1"
                    ))
                    .await?;
                client.query(&stmt, &[&limit]).await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(TokenRow {
                    provider: row.try_get(0)?,
                    subject: row.try_get(1)?,
                    token: token_from_row(row, 2)?,
                })
            })
            .collect()
    }

    async fn list_audit_events_inner(
        &self,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, Failure> {
        let filter = filter::audit_events(query);
        let (clause, next) = filter.render(|n| format!("${n}"));
        let values = pg_values(&filter.values);
        let limit = page_size(query.limit);
        let mut params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect();
        params.push(&limit);
        // Newest first by id: the id is the paging cursor, and within one
        // transaction (which shares `at`) it keeps the order of writing.
        let sql = format!(
            "SELECT id, at, kind, actor, provider, subject, user_id, reason, detail \
             FROM audit_events {clause} ORDER BY id DESC LIMIT ${next}"
        );

        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await?;
        let rows = client.query(&stmt, &params).await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get(2)?;
                Ok(AuditRecord {
                    id: row.try_get(0)?,
                    event: AuditEvent {
                        at: row.try_get(1)?,
                        kind: AuditKind::parse(&kind).ok_or_else(|| {
                            Failure::Corrupt(format!("unknown audit kind {kind:?}"))
                        })?,
                        actor: row.try_get(3)?,
                        provider: row.try_get(4)?,
                        subject: row.try_get(5)?,
                        user_id: row.try_get(6)?,
                        reason: row.try_get(7)?,
                        detail: row.try_get(8)?,
                    },
                })
            })
            .collect()
    }
}

#[async_trait]
impl Database for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let runner = embedded::migrations::runner();
        migrate_locked(&self.pool, &runner, "running postgres migrations").await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        async {
            let client = self.client().await?;
            client.simple_query("SELECT 1").await?;
            Ok::<_, Failure>(())
        }
        .await
        .map_err(|e| e.into_store_error("pinging postgres"))
    }

    fn pool_status(&self) -> Option<super::PoolStatus> {
        let s = self.pool.status();
        Some(super::PoolStatus {
            max: s.max_size,
            open: s.size,
            idle: s.available,
        })
    }
}

#[async_trait]
impl BindingStore for PostgresStore {
    async fn bind_login(
        &self,
        identity: &Identity,
        policy: &BindPolicy,
        decide: Decide,
        record: LoginRecord<'_>,
    ) -> Result<BindResult, StoreError> {
        traced(
            "binding a login",
            self.bind_login_inner(identity, policy, decide, record),
        )
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
        traced(
            "linking an identity",
            self.link_identity_inner(user_id, identity, tokens, actor, now),
        )
        .await
    }

    async fn find_binding(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Binding>, StoreError> {
        traced(
            "finding a binding",
            self.find_binding_inner(provider, subject),
        )
        .await
    }

    async fn find_identity(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Identity>, StoreError> {
        traced(
            "finding an identity",
            self.find_identity_inner(provider, subject),
        )
        .await
    }
}

#[async_trait]
impl TokenStore for PostgresStore {
    async fn get_token(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<SealedToken>, StoreError> {
        traced("reading a token", self.get_token_inner(provider, subject)).await
    }

    async fn put_token(
        &self,
        provider: &str,
        subject: &str,
        token: &SealedToken,
        expected_version: Option<i64>,
    ) -> Result<i64, StoreError> {
        traced(
            "writing a token",
            self.put_token_inner(provider, subject, token, expected_version),
        )
        .await
    }

    async fn mark_token_unusable(
        &self,
        provider: &str,
        subject: &str,
        expected_version: i64,
    ) -> Result<(), StoreError> {
        traced(
            "marking a token unusable",
            self.mark_token_unusable_inner(provider, subject, expected_version),
        )
        .await
    }

    async fn delete_token(&self, provider: &str, subject: &str) -> Result<bool, StoreError> {
        traced(
            "deleting a token",
            self.delete_token_inner(provider, subject),
        )
        .await
    }

    async fn list_tokens(
        &self,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<TokenRow>, StoreError> {
        traced("listing tokens", self.list_tokens_inner(after, limit)).await
    }
}

#[async_trait]
impl AuditLog for PostgresStore {
    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let work = async {
            let client = self.client().await?;
            insert_audit(&client, event).await
        };
        traced("recording an audit event", work).await
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        traced("listing audit events", self.list_audit_events_inner(query)).await
    }
}

#[async_trait]
impl UserDirectory for PostgresStore {
    async fn get_user(&self, user_id: &str) -> Result<Option<User>, StoreError> {
        let work = async {
            let client = self.client().await?;
            load_user(&client, user_id).await
        };
        traced("reading a user", work).await
    }

    async fn find_user_by_identity(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<User>, StoreError> {
        traced(
            "finding a user by identity",
            self.find_user_by_identity_inner(provider, subject),
        )
        .await
    }

    async fn list_users(&self, query: &UserQuery) -> Result<Vec<User>, StoreError> {
        traced("listing users", self.list_users_inner(query)).await
    }

    async fn unlink_identity(
        &self,
        user_id: &str,
        provider: &str,
        force: bool,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<User, StoreError> {
        traced(
            "unlinking an identity",
            self.unlink_identity_inner(user_id, provider, force, actor, now),
        )
        .await
    }

    async fn delete_user(
        &self,
        user_id: &str,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        traced(
            "deleting a user",
            self.delete_user_inner(user_id, actor, now),
        )
        .await
    }

    async fn count_users(&self) -> Result<u64, StoreError> {
        traced("counting users", self.count_users_inner()).await
    }
}

/// An earlier attempt of this login committed while this one was binding
/// (its acknowledgement was lost, not its commit): answer with what it did.
/// `taken` is the unique violation that said so.
async fn already_committed<C: GenericClient>(
    client: &C,
    login_id: Option<&str>,
    taken: tokio_postgres::Error,
) -> Result<BindResult, Failure> {
    match committed_login(client, login_id.unwrap_or("")).await? {
        Some(done) => Ok(done),
        None => Err(Failure::Db(taken)),
    }
}

/// What `gather` read, with when the identity was bound if it is.
struct Gathered {
    facts: Facts,
    bound_since: Option<OffsetDateTime>,
}

/// One try at `bind_login` inside `tx`: gather the facts, decide, apply.
/// `Retry` means a concurrent transaction bound this identity (or deleted a
/// candidate user) after we looked.
async fn bind_attempt<C: GenericClient>(
    tx: &C,
    identity: &Identity,
    policy: &BindPolicy,
    decide: Decide,
    record: LoginRecord<'_>,
) -> Result<Step<BindResult>, Failure> {
    let LoginRecord {
        tokens, actor, now, ..
    } = record;
    let login_id = record.login.map(|k| k.id);
    let Step::Done(gathered) = gather(tx, identity, policy).await? else {
        return Ok(Step::Retry);
    };
    let decision = decide(identity, policy, &gathered.facts);
    let user_id = match &decision.user {
        UserChoice::Existing(user_id) => user_id.clone(),
        UserChoice::New => {
            // Time-ordered ids keep the users primary key append-mostly.
            let user_id = uuid::Uuid::now_v7().to_string();
            let insert_user = tx
                .prepare_cached("INSERT INTO users (id, created_at) VALUES ($1, $2)")
                .await?;
            tx.execute(&insert_user, &[&user_id, &now]).await?;
            user_id
        }
        UserChoice::LinkRequired => {
            // A concurrent login may have bound the identity since our first
            // look (e.g. by the rule whose candidate we then found taken by
            // that very binding); it is then a returning login.
            return Ok(
                if identity_exists(tx, &identity.provider, &identity.subject).await? {
                    Step::Retry
                } else {
                    Step::Done(BindResult::LinkRequired)
                },
            );
        }
    };
    if !decision.binds_identity() {
        update_profile(tx, identity, Some(now)).await?;
    } else if !insert_identity(tx, &user_id, identity, now).await? {
        // A concurrent first login inserted this identity since our SELECT
        // found nothing. ON CONFLICT waited for that transaction and, as it
        // committed, inserted nothing: we roll back (dropping any user we
        // made) and go round again to find its binding.
        return Ok(Step::Retry);
    }
    let binding = binding::binding_after(identity, user_id, gathered.bound_since, now);
    if let Some(token) = tokens {
        store_token(tx, identity, token).await?;
    }
    for event in decision.audit_events(&binding, actor) {
        insert_audit_for(tx, &event, login_id).await?;
    }
    Ok(Step::Done(super::applied(&decision, binding)))
}

/// Reads what `decide` needs and locks what it rests on until commit: the
/// identity row (`FOR UPDATE`, so concurrent returning logins of one
/// identity do not interleave their profile and token updates) or, for an
/// unbound identity, each candidate's user row. Every path that adds an
/// identity to an existing user takes that lock first, so a candidate's
/// "has an identity at this provider" stays true until we commit.
async fn gather<C: GenericClient>(
    tx: &C,
    identity: &Identity,
    policy: &BindPolicy,
) -> Result<Step<Gathered>, Failure> {
    let select = tx
        .prepare_cached(
            "SELECT user_id, created_at FROM identities \
             WHERE provider = $1 AND subject = $2 FOR UPDATE",
        )
        .await?;
    if let Some(row) = tx
        .query_opt(&select, &[&identity.provider, &identity.subject])
        .await?
    {
        return Ok(Step::Done(Gathered {
            facts: Facts {
                bound_to: Some(row.try_get(0)?),
                ..Facts::default()
            },
            bound_since: Some(row.try_get(1)?),
        }));
    }
    let union = match policy.union_lookup(identity) {
        Some(lookup) => {
            let sql = "SELECT user_id, provider FROM identities \
                       WHERE provider = ANY($1) AND union_id = $2 \
                       ORDER BY created_at, provider, subject LIMIT 1";
            find_candidate(tx, sql, &[&lookup.providers, &lookup.value]).await?
        }
        None => None,
    };
    let email = match policy.email_lookup(identity) {
        Some(lookup) => {
            // Expression and predicate as in identities_verified_email_idx.
            let sql = "SELECT user_id, provider FROM identities \
                       WHERE email_verified AND lower(email) = lower($1) \
                       AND provider = ANY($2) ORDER BY created_at, provider, subject LIMIT 1";
            find_candidate(tx, sql, &[&lookup.value, &lookup.providers]).await?
        }
        None => None,
    };
    // Locked in one order, by user id, so that two logins locking the same
    // two users never wait for each other.
    let mut users: Vec<&str> = union
        .iter()
        .chain(&email)
        .map(|(user_id, _)| user_id.as_str())
        .collect();
    users.sort_unstable();
    users.dedup();
    for user_id in users {
        if !lock_user(tx, user_id).await? {
            // Deleted since the lookup found them.
            return Ok(Step::Retry);
        }
    }
    let (Step::Done(union_candidate), Step::Done(email_candidate)) = (
        candidate(tx, union, identity).await?,
        candidate(tx, email, identity).await?,
    ) else {
        return Ok(Step::Retry);
    };
    Ok(Step::Done(Gathered {
        facts: Facts {
            bound_to: None,
            union_candidate,
            email_candidate,
        },
        bound_since: None,
    }))
}

/// The `(user_id, provider)` of the identity a lookup's `sql` finds.
async fn find_candidate<C: GenericClient>(
    tx: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<(String, String)>, Failure> {
    let stmt = tx.prepare_cached(sql).await?;
    match tx.query_opt(&stmt, params).await? {
        Some(row) => Ok(Some((row.try_get(0)?, row.try_get(1)?))),
        None => Ok(None),
    }
}

/// A found (and locked) user as a `Candidate`. `Retry` if their identity at
/// the login's provider is the login's own: a concurrent login bound it
/// after our first look.
async fn candidate<C: GenericClient>(
    tx: &C,
    found: Option<(String, String)>,
    identity: &Identity,
) -> Result<Step<Option<Candidate>>, Failure> {
    let Some((user_id, provider)) = found else {
        return Ok(Step::Done(None));
    };
    let stmt = tx
        .prepare_cached("SELECT subject FROM identities WHERE user_id = $1 AND provider = $2")
        .await?;
    let has_provider_identity = match tx.query_opt(&stmt, &[&user_id, &identity.provider]).await? {
        None => false,
        Some(row) if row.try_get::<_, String>(0)? == identity.subject => return Ok(Step::Retry),
        Some(_) => true,
    };
    Ok(Step::Done(Some(Candidate {
        user_id,
        provider,
        has_provider_identity,
    })))
}

/// One try at `link_identity` inside `tx`. Conflicts are errors (the caller
/// rolls back); unique violations reach the caller as database errors.
async fn link_attempt<C: GenericClient>(
    tx: &C,
    user_id: &str,
    identity: &Identity,
    tokens: Option<&SealedToken>,
    actor: Option<&str>,
    now: OffsetDateTime,
) -> Result<Step<Binding>, Failure> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO users (id, created_at) VALUES ($1, $2) \
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .await?;
    let created = tx.query_opt(&stmt, &[&user_id, &now]).await?.is_some();
    if !lock_user(tx, user_id).await? {
        // It existed when we inserted and was deleted since.
        return Ok(Step::Retry);
    }

    let stmt = tx
        .prepare_cached(
            "SELECT user_id, created_at, last_login_at FROM identities \
             WHERE provider = $1 AND subject = $2 FOR UPDATE",
        )
        .await?;
    if let Some(row) = tx
        .query_opt(&stmt, &[&identity.provider, &identity.subject])
        .await?
    {
        let owner: String = row.try_get(0)?;
        if owner != user_id {
            return Err(Failure::Conflict(Conflict::IdentityLinkedElsewhere));
        }
        // Linking is not a login: the profile is refreshed, last_login_at
        // is kept.
        update_profile(tx, identity, None).await?;
        if let Some(token) = tokens {
            store_token(tx, identity, token).await?;
        }
        return Ok(Step::Done(Binding {
            user_id: owner,
            provider: identity.provider.clone(),
            subject: identity.subject.clone(),
            created_at: row.try_get(1)?,
            last_login_at: row.try_get(2)?,
        }));
    }

    let stmt = tx
        .prepare_cached("SELECT 1 FROM identities WHERE user_id = $1 AND provider = $2")
        .await?;
    if tx
        .query_opt(&stmt, &[&user_id, &identity.provider])
        .await?
        .is_some()
    {
        return Err(Failure::Conflict(Conflict::ProviderAlreadyLinked));
    }
    // No ON CONFLICT: a concurrent binding of this identity (by a first
    // login that made a new user, or a link to another user) surfaces as a
    // unique violation on the primary key, which the caller maps by name.
    let stmt = tx
        .prepare_cached(
            "INSERT INTO identities (provider, subject, user_id, union_id, username, \
             display_name, avatar_url, email, email_verified, created_at, last_login_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
        )
        .await?;
    tx.execute(&stmt, &identity_params(identity, &user_id, &now))
        .await?;
    let binding = Binding {
        user_id: user_id.to_owned(),
        provider: identity.provider.clone(),
        subject: identity.subject.clone(),
        created_at: now,
        last_login_at: now,
    };
    if let Some(token) = tokens {
        store_token(tx, identity, token).await?;
    }
    if created {
        insert_audit(
            tx,
            &AuditEvent::about(AuditKind::UserCreated, &binding, actor, None),
        )
        .await?;
    }
    insert_audit(
        tx,
        &AuditEvent::about(AuditKind::IdentityLinked, &binding, actor, None),
    )
    .await?;
    Ok(Step::Done(binding))
}

/// `FOR UPDATE` on the user row; false if there is no such user.
async fn lock_user<C: GenericClient>(tx: &C, user_id: &str) -> Result<bool, Failure> {
    let stmt = tx
        .prepare_cached("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
        .await?;
    Ok(tx.query_opt(&stmt, &[&user_id]).await?.is_some())
}

async fn identity_exists<C: GenericClient>(
    client: &C,
    provider: &str,
    subject: &str,
) -> Result<bool, Failure> {
    let stmt = client
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM identities WHERE provider = $1 AND subject = $2)",
        )
        .await?;
    Ok(client
        .query_one(&stmt, &[&provider, &subject])
        .await?
        .try_get(0)?)
}

/// Inserts the identity for `user_id` unless it is already bound; false if
/// it was (after waiting for a concurrent binder to commit).
async fn insert_identity<C: GenericClient>(
    tx: &C,
    user_id: &str,
    identity: &Identity,
    now: OffsetDateTime,
) -> Result<bool, Failure> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO identities (provider, subject, user_id, union_id, username, \
             display_name, avatar_url, email, email_verified, created_at, last_login_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
             ON CONFLICT (provider, subject) DO NOTHING RETURNING user_id",
        )
        .await?;
    Ok(tx
        .query_opt(&stmt, &identity_params(identity, &user_id, &now))
        .await?
        .is_some())
}

fn identity_params<'a>(
    identity: &'a Identity,
    user_id: &'a &'a str,
    now: &'a OffsetDateTime,
) -> [&'a (dyn ToSql + Sync); 10] {
    [
        &identity.provider,
        &identity.subject,
        user_id,
        &identity.union_id,
        &identity.username,
        &identity.display_name,
        &identity.avatar_url,
        &identity.email,
        &identity.email_verified,
        now,
    ]
}

/// Overwrites the stored profile; `last_login_at` only when given.
async fn update_profile<C: GenericClient>(
    tx: &C,
    identity: &Identity,
    last_login_at: Option<OffsetDateTime>,
) -> Result<(), Failure> {
    let stmt = tx
        .prepare_cached(
            "UPDATE identities SET union_id = $3, username = $4, display_name = $5, \
             avatar_url = $6, email = $7, email_verified = $8, \
             last_login_at = COALESCE($9, last_login_at) \
             WHERE provider = $1 AND subject = $2",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &identity.provider,
            &identity.subject,
            &identity.union_id,
            &identity.username,
            &identity.display_name,
            &identity.avatar_url,
            &identity.email,
            &identity.email_verified,
            &last_login_at,
        ],
    )
    .await?;
    Ok(())
}

/// `upsert_token` for an identity this transaction has just bound or locked.
async fn store_token<C: GenericClient>(
    tx: &C,
    identity: &Identity,
    token: &SealedToken,
) -> Result<(), Failure> {
    match upsert_token(tx, &identity.provider, &identity.subject, token).await? {
        Some(_) => Ok(()),
        None => Err(Failure::Corrupt(
            "the identity being bound has no row for its token".into(),
        )),
    }
}

/// Writes the token unconditionally: version 1 when new, else the stored
/// version plus one; usable. `None` if the identity does not exist (the
/// INSERT … SELECT then has no row to insert).
async fn upsert_token<C: GenericClient>(
    client: &C,
    provider: &str,
    subject: &str,
    token: &SealedToken,
) -> Result<Option<i64>, Failure> {
    // The casts type the parameters, which a SELECT list leaves unknown.
    let stmt = client
        .prepare_cached(
            "INSERT INTO provider_tokens \
             (provider, subject, key_id, nonce, ciphertext, version, usable, updated_at) \
             SELECT provider, subject, $3::text, $4::bytea, $5::bytea, 1, TRUE, $6::timestamptz \
             FROM identities WHERE provider = $1 AND subject = $2 \
             ON CONFLICT (provider, subject) DO UPDATE SET key_id = EXCLUDED.key_id, \
             nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext, \
             version = provider_tokens.version + 1, usable = TRUE, \
             updated_at = EXCLUDED.updated_at \
             RETURNING version",
        )
        .await?;
    let row = client
        .query_opt(
            &stmt,
            &[
                &provider,
                &subject,
                &token.key_id,
                &token.nonce,
                &token.ciphertext,
                &truncate_to_micros(token.updated_at),
            ],
        )
        .await?;
    row.map(|row| row.try_get(0))
        .transpose()
        .map_err(Failure::from)
}

/// A token from `TOKEN_COLUMNS` starting at column `first`.
fn token_from_row(row: &Row, first: usize) -> Result<SealedToken, Failure> {
    Ok(SealedToken {
        key_id: row.try_get(first)?,
        nonce: row.try_get(first + 1)?,
        ciphertext: row.try_get(first + 2)?,
        version: row.try_get(first + 3)?,
        usable: row.try_get(first + 4)?,
        updated_at: row.try_get(first + 5)?,
    })
}

async fn load_user<C: GenericClient>(client: &C, user_id: &str) -> Result<Option<User>, Failure> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM users u {USER_JOINS} WHERE u.id = $1 ORDER BY i.provider"
        ))
        .await?;
    let rows = client.query(&stmt, &[&user_id]).await?;
    Ok(fold_users(&rows)?.into_iter().next())
}

/// Groups `USER_COLUMNS` rows (ordered by user, then provider) into users.
fn fold_users(rows: &[Row]) -> Result<Vec<User>, Failure> {
    let mut users: Vec<User> = Vec::new();
    for row in rows {
        let id: String = row.try_get(0)?;
        if users.last().is_none_or(|user| user.id != id) {
            users.push(User {
                id,
                created_at: row.try_get(1)?,
                identities: Vec::new(),
            });
        }
        // NULL: the LEFT JOIN found no identity for this user.
        let Some(provider) = row.try_get::<_, Option<String>>(2)? else {
            continue;
        };
        if let Some(user) = users.last_mut() {
            user.identities.push(LinkedIdentity {
                identity: Identity {
                    provider,
                    subject: row.try_get(3)?,
                    union_id: row.try_get(4)?,
                    username: row.try_get(5)?,
                    display_name: row.try_get(6)?,
                    avatar_url: row.try_get(7)?,
                    email: row.try_get(8)?,
                    email_verified: row.try_get(9)?,
                },
                created_at: row.try_get(10)?,
                last_login_at: row.try_get(11)?,
                token: row.try_get(12)?,
            });
        }
    }
    Ok(users)
}

async fn insert_audit<C: GenericClient>(client: &C, event: &AuditEvent) -> Result<(), Failure> {
    insert_audit_for(client, event, None).await
}

/// An audit event of the login `login_id` (see `LoginKey`).
async fn insert_audit_for<C: GenericClient>(
    client: &C,
    event: &AuditEvent,
    login_id: Option<&str>,
) -> Result<(), Failure> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO audit_events \
             (at, kind, actor, provider, subject, user_id, reason, detail, login_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &truncate_to_micros(event.at),
                &event.kind.as_str(),
                &event.actor,
                &event.provider,
                &event.subject,
                &event.user_id,
                &event.reason,
                &event.detail,
                &login_id,
            ],
        )
        .await?;
    Ok(())
}

/// What the login `login_id` committed, if it did.
async fn committed_login<C: GenericClient>(
    client: &C,
    login_id: &str,
) -> Result<Option<BindResult>, Failure> {
    let stmt = client.prepare_cached(COMMITTED_LOGIN_SQL).await?;
    let Some(row) = client.query_opt(&stmt, &[&login_id]).await? else {
        return Ok(None);
    };
    Ok(Some(
        CommittedLogin {
            user_id: row.try_get(0)?,
            provider: row.try_get(1)?,
            subject: row.try_get(2)?,
            at: row.try_get(3)?,
            user_created: row.try_get(4)?,
            linked_by: row.try_get(5)?,
            identity_created_at: row.try_get(6)?,
        }
        .into_result(),
    ))
}

fn is_login_id_taken(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &SqlState::UNIQUE_VIOLATION && db.constraint() == Some(AUDIT_LOGIN_ID_KEY)
    })
}

/// The unique constraint a violation names, as the conflict it means.
fn unique_conflict(e: &tokio_postgres::Error) -> Option<Conflict> {
    let db = e.as_db_error()?;
    if db.code() != &SqlState::UNIQUE_VIOLATION {
        return None;
    }
    match db.constraint()? {
        IDENTITIES_PKEY => Some(Conflict::IdentityLinkedElsewhere),
        IDENTITIES_USER_PROVIDER_KEY => Some(Conflict::ProviderAlreadyLinked),
        _ => None,
    }
}

fn page_size(limit: u32) -> i64 {
    i64::from(if limit == 0 { DEFAULT_PAGE } else { limit })
}

/// timestamptz keeps microseconds; truncating up front makes the value we
/// return equal to the one later read back.
fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let nanos = t.nanosecond();
    t.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(t)
}

/// For range bounds on stored (whole-microsecond) times: `at >= t` and
/// `at < t` select the same rows as with `t` rounded up to the microsecond,
/// which the database can then compare exactly.
/// The shared filter's values as Postgres parameters.
fn pg_values<'a>(values: &[filter::Value<'a>]) -> Vec<Box<dyn ToSql + Sync + Send + 'a>> {
    values
        .iter()
        .map(|v| -> Box<dyn ToSql + Sync + Send + 'a> {
            match *v {
                filter::Value::Text(s) => Box::new(s),
                filter::Value::Time(t) => Box::new(ceil_to_micros(t)),
                filter::Value::Int(i) => Box::new(i),
            }
        })
        .collect()
}

fn ceil_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let down = truncate_to_micros(t);
    if down == t {
        t
    } else {
        down.checked_add(time::Duration::MICROSECOND).unwrap_or(t)
    }
}

/// Everything that can go wrong inside this module, classified once into
/// `StoreError` at the trait boundary.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("could not get a connection from the pool")]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Migrate(#[from] refinery::Error),
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Conflict(Conflict),
    #[error("a write kept conflicting after {BIND_ATTEMPTS} attempts")]
    Contention,
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
}

/// One store operation as callers see it: inside its span, and with its
/// failure told as a `StoreError` that says what was being done.
async fn traced<T>(
    doing: &'static str,
    work: impl Future<Output = Result<T, Failure>>,
) -> Result<T, StoreError> {
    work.instrument(store_span(doing))
        .await
        .map_err(|e| e.into_store_error(doing))
}

impl Failure {
    fn into_store_error(self, doing: &'static str) -> StoreError {
        let unavailable = match &self {
            Failure::NotFound => return StoreError::NotFound,
            Failure::Conflict(conflict) => return StoreError::Conflict(*conflict),
            Failure::Pool(PoolError::Backend(e)) => is_unavailable(e),
            Failure::Pool(PoolError::Timeout(_) | PoolError::Closed) => true,
            Failure::Pool(_) => false,
            Failure::Db(e) => is_unavailable(e),
            Failure::Migrate(e) => match e.kind() {
                refinery::error::Kind::Connection(_, source) => source
                    .downcast_ref::<tokio_postgres::Error>()
                    .is_some_and(is_unavailable),
                _ => false,
            },
            Failure::Contention | Failure::Corrupt(_) => false,
        };
        let error = anyhow::Error::new(self).context(doing);
        if unavailable {
            StoreError::Unavailable(error)
        } else {
            StoreError::Internal(error)
        }
    }
}

/// Whether the failure is the database being unreachable or going away
/// (retryable) rather than a bad query or broken schema.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // No server error: I/O, connect, timeout or a closed connection. Type
        // conversion errors also land here, but every query in this module is
        // exercised by the conformance suite, so those do not reach production.
        None => true,
        Some(code) => {
            let code = code.code();
            // 08: connection exception; 53: insufficient resources (too many
            // connections, disk full); 57P01..03: admin/crash shutdown,
            // server still starting.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(code, "57P01" | "57P02" | "57P03")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_drops_sub_microseconds_only() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(
            truncate_to_micros(t).unix_timestamp_nanos(),
            1_700_000_000_123_456_000
        );
    }

    #[test]
    fn bounds_round_up_to_the_microsecond() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_001).unwrap();
        assert_eq!(
            ceil_to_micros(t).unix_timestamp_nanos(),
            1_700_000_000_123_457_000
        );
        let exact = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).unwrap();
        assert_eq!(ceil_to_micros(exact), exact);
    }

    #[test]
    fn bad_url_is_invalid_url() {
        let err = PostgresStore::connect("postgres://u@h:notaport/db", 2).unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
    }

    #[test]
    fn not_found_and_conflicts_keep_their_kind() {
        assert!(matches!(
            Failure::NotFound.into_store_error("x"),
            StoreError::NotFound
        ));
        assert!(matches!(
            Failure::Conflict(Conflict::StaleToken).into_store_error("x"),
            StoreError::Conflict(Conflict::StaleToken)
        ));
    }
}
