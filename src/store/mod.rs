//! Persistence: users, identities bound to them, and audit events, behind the
//! `Store` seam. Postgres for production, SQLite as the embedded default; one
//! conformance suite (`conformance`, feature `test-util`) runs against both.

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
mod postgres;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::domain::{AuditEvent, Binding, Identity, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the connection; retryable.
    #[error("the store is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The URL in `[database] url` is not one we can use.
    #[error("invalid database url: {0}")]
    InvalidUrl(String),
    /// Anything else: a bug or a broken schema.
    #[error("store failure")]
    Internal(#[source] anyhow::Error),
}

/// Filter for reading audit events back (newest first).
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub provider: Option<String>,
    pub user_id: Option<String>,
    /// At most this many events; 0 means the default of 100.
    pub limit: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Brings the schema up to date (refinery migrations). Idempotent.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap round trip to the database, for health checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The `auto_create` binding, in one transaction: if `(provider, subject)`
    /// is bound, refresh its profile and `last_login_at` and return
    /// `SignedIn`; otherwise create a user, bind the identity and return
    /// `UserCreated`. Concurrent first logins of one identity create exactly
    /// one user and all return it. Records `user_created` (when it applies)
    /// and `login_succeeded` audit events in the same transaction.
    async fn bind_login(
        &self,
        identity: &Identity,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(Outcome, Binding), StoreError>;

    /// Appends one audit event (e.g. a failed login).
    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;

    async fn find_binding(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Binding>, StoreError>;

    /// The stored profile of an identity, as of its last login.
    async fn find_identity(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<Identity>, StoreError>;

    async fn count_users(&self) -> Result<u64, StoreError>;

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;
}

/// Opens the store named by `[database] url`: `postgres://…`/`postgresql://…`,
/// `sqlite://PATH` or `sqlite::memory:`.
pub async fn open(url: &str, pool_size: usize) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url, pool_size)?))
    } else if url == "sqlite::memory:" {
        Ok(Arc::new(SqliteStore::open_in_memory()?))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::InvalidUrl("sqlite:// needs a path".into()));
        }
        Ok(Arc::new(SqliteStore::open(std::path::Path::new(path))?))
    } else {
        Err(StoreError::InvalidUrl(
            "expected postgres://…, sqlite://PATH or sqlite::memory:".into(),
        ))
    }
}
