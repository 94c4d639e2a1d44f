//! `Store` on Postgres: a deadpool pool of tokio-postgres connections, schema
//! managed by refinery (`migrations/postgres`).

use std::ops::DerefMut;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use time::OffsetDateTime;
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::{AuditQuery, Store, StoreError};
use crate::domain::{AuditEvent, AuditKind, Binding, Identity, Outcome};

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// How long a caller may wait for a pooled connection, for a new connection to
/// be made, or for a stale one to be checked. An outage must surface quickly
/// as `Unavailable` (and a retryable gRPC status) rather than hang logins.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// A first login retries when a concurrent transaction bound the same identity
/// first; the second attempt then finds that binding. More than a couple of
/// attempts means something other than that race is going on.
const BIND_ATTEMPTS: usize = 5;

/// Key of the session advisory lock that serialises `migrate` across replicas
/// (refinery does no locking of its own). Arbitrary but fixed: "authbrkr".
const MIGRATION_LOCK_KEY: i64 = 0x6175_7468_6272_6b72;

/// Audit reads with `limit == 0` get this many rows, so an unset page size
/// never means "the whole table".
const DEFAULT_AUDIT_LIMIT: u32 = 100;

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

impl PostgresStore {
    /// Builds the pool; connections are made lazily, so this succeeds even if
    /// the server is down (the first query then reports `Unavailable`).
    pub fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        // tokio-postgres parse errors name the bad option, never the password.
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_TIMEOUT);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // A broken connection is noticed by its (closed) socket; a
                // test query on every checkout would double the round trips.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| {
                StoreError::Internal(anyhow::Error::new(e).context("building the pool"))
            })?;
        Ok(PostgresStore { pool })
    }

    async fn client(&self) -> Result<Object, Failure> {
        Ok(self.pool.get().await?)
    }

    async fn migrate_inner(&self) -> Result<(), Failure> {
        // Taken out of the pool and closed afterwards: if this future is
        // dropped between lock and unlock, closing the session is what
        // releases the advisory lock, instead of a pooled connection
        // holding it forever.
        let mut client = Object::take(self.client().await?);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        // ClientWrapper derefs to the tokio-postgres Client refinery drives.
        let pg: &mut tokio_postgres::Client = client.deref_mut();
        let result = embedded::migrations::runner().run_async(pg).await;
        // Best effort: the session ends right after, which also unlocks.
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
            .await;
        result?;
        Ok(())
    }

    async fn bind_login_inner(
        &self,
        identity: &Identity,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(Outcome, Binding), Failure> {
        let now = truncate_to_micros(now);
        let mut client = self.client().await?;
        for _ in 0..BIND_ATTEMPTS {
            let tx = client.transaction().await?;

            // FOR UPDATE serialises concurrent returning logins of one
            // identity, so profile updates do not interleave.
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
                let user_id: String = row.try_get(0)?;
                let created_at: OffsetDateTime = row.try_get(1)?;
                let update = tx
                    .prepare_cached(
                        "UPDATE identities SET union_id = $3, username = $4, display_name = $5, \
                         avatar_url = $6, email = $7, email_verified = $8, last_login_at = $9 \
                         WHERE provider = $1 AND subject = $2",
                    )
                    .await?;
                tx.execute(
                    &update,
                    &[
                        &identity.provider,
                        &identity.subject,
                        &identity.union_id,
                        &identity.username,
                        &identity.display_name,
                        &identity.avatar_url,
                        &identity.email,
                        &identity.email_verified,
                        &now,
                    ],
                )
                .await?;
                let binding = Binding {
                    user_id,
                    provider: identity.provider.clone(),
                    subject: identity.subject.clone(),
                    created_at,
                    last_login_at: now,
                };
                insert_audit(
                    &tx,
                    &login_event(AuditKind::LoginSucceeded, &binding, actor, now),
                )
                .await?;
                tx.commit().await?;
                return Ok((Outcome::SignedIn, binding));
            }

            // Time-ordered ids keep the users primary key append-mostly.
            let user_id = uuid::Uuid::now_v7().to_string();
            let insert_user = tx
                .prepare_cached("INSERT INTO users (id, created_at) VALUES ($1, $2)")
                .await?;
            tx.execute(&insert_user, &[&user_id, &now]).await?;

            // A concurrent first login may have inserted this identity since
            // our SELECT found nothing. ON CONFLICT waits for that transaction
            // and, if it committed, inserts nothing: we roll back (dropping our
            // user) and go round again to find its binding. Only the primary
            // key is a tolerated conflict; UNIQUE (user_id, provider) cannot
            // clash for a user created just now, and would be a real error.
            let insert_identity = tx
                .prepare_cached(
                    "INSERT INTO identities (provider, subject, user_id, union_id, username, \
                     display_name, avatar_url, email, email_verified, created_at, last_login_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
                     ON CONFLICT (provider, subject) DO NOTHING RETURNING user_id",
                )
                .await?;
            let inserted = tx
                .query_opt(
                    &insert_identity,
                    &[
                        &identity.provider,
                        &identity.subject,
                        &user_id,
                        &identity.union_id,
                        &identity.username,
                        &identity.display_name,
                        &identity.avatar_url,
                        &identity.email,
                        &identity.email_verified,
                        &now,
                    ],
                )
                .await?;
            if inserted.is_none() {
                tx.rollback().await?;
                continue;
            }

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
            )
            .await?;
            insert_audit(
                &tx,
                &login_event(AuditKind::LoginSucceeded, &binding, actor, now),
            )
            .await?;
            tx.commit().await?;
            return Ok((Outcome::UserCreated, binding));
        }
        Err(Failure::Contention)
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

    async fn count_users_inner(&self) -> Result<u64, Failure> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT count(*) FROM users").await?;
        let count: i64 = client.query_one(&stmt, &[]).await?.try_get(0)?;
        u64::try_from(count).map_err(|_| Failure::Corrupt(format!("negative user count {count}")))
    }

    async fn list_audit_events_inner(
        &self,
        query: &AuditQuery,
    ) -> Result<Vec<AuditEvent>, Failure> {
        // One statement per filter combination rather than `$1 IS NULL OR
        // provider = $1`, which a cached generic plan cannot serve from an index.
        let mut sql = String::from(
            "SELECT at, kind, actor, provider, subject, user_id, reason FROM audit_events",
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        let mut conditions = Vec::new();
        if let Some(provider) = &query.provider {
            params.push(provider);
            conditions.push(format!("provider = ${}", params.len()));
        }
        if let Some(user_id) = &query.user_id {
            params.push(user_id);
            conditions.push(format!("user_id = ${}", params.len()));
        }
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        let limit = i64::from(if query.limit == 0 {
            DEFAULT_AUDIT_LIMIT
        } else {
            query.limit
        });
        params.push(&limit);
        // Events of one transaction share `at`; the id keeps insertion order.
        sql.push_str(&format!(
            " ORDER BY at DESC, id DESC LIMIT ${}",
            params.len()
        ));

        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await?;
        let rows = client.query(&stmt, &params).await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get(1)?;
                Ok(AuditEvent {
                    at: row.try_get(0)?,
                    kind: AuditKind::parse(&kind)
                        .ok_or_else(|| Failure::Corrupt(format!("unknown audit kind {kind:?}")))?,
                    actor: row.try_get(2)?,
                    provider: row.try_get(3)?,
                    subject: row.try_get(4)?,
                    user_id: row.try_get(5)?,
                    reason: row.try_get(6)?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_inner()
            .await
            .map_err(|e| e.into_store_error("running postgres migrations"))
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

    async fn bind_login(
        &self,
        identity: &Identity,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(Outcome, Binding), StoreError> {
        self.bind_login_inner(identity, actor, now)
            .await
            .map_err(|e| e.into_store_error("binding a login"))
    }

    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        async {
            let client = self.client().await?;
            insert_audit(&client, event).await
        }
        .await
        .map_err(|e| e.into_store_error("recording an audit event"))
    }

    async fn find_binding(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Binding>, StoreError> {
        self.find_binding_inner(provider, subject)
            .await
            .map_err(|e| e.into_store_error("finding a binding"))
    }

    async fn find_identity(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Identity>, StoreError> {
        self.find_identity_inner(provider, subject)
            .await
            .map_err(|e| e.into_store_error("finding an identity"))
    }

    async fn count_users(&self) -> Result<u64, StoreError> {
        self.count_users_inner()
            .await
            .map_err(|e| e.into_store_error("counting users"))
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.list_audit_events_inner(query)
            .await
            .map_err(|e| e.into_store_error("listing audit events"))
    }
}

async fn insert_audit<C: GenericClient>(client: &C, event: &AuditEvent) -> Result<(), Failure> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO audit_events (at, kind, actor, provider, subject, user_id, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
            ],
        )
        .await?;
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

/// timestamptz keeps microseconds; truncating up front makes the value we
/// return equal to the one later read back.
fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let nanos = t.nanosecond();
    t.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(t)
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
    #[error("first login kept conflicting after {BIND_ATTEMPTS} attempts")]
    Contention,
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
}

impl Failure {
    fn into_store_error(self, doing: &'static str) -> StoreError {
        let unavailable = match &self {
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
    fn bad_url_is_invalid_url() {
        let err = PostgresStore::connect("postgres://u@h:notaport/db", 2).unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
    }
}
