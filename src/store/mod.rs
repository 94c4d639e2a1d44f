//! Persistence: users, identities bound to them, provider tokens and audit
//! events, behind one seam per capability (`BindingStore`, `TokenStore`,
//! `AuditLog`, `UserDirectory`, and `Database` for schema and health) that
//! `Store` sums up. Postgres for production, SQLite as the embedded default;
//! one conformance suite (`conformance`, feature `test-util`) runs against
//! both.
//!
//! A login's binding is not decided here: `bind_login` is handed the
//! decision function (`domain::binding::Decide`; the login use case passes
//! `login::binding::decide`), and each backend gathers its `Facts` under its
//! locks, calls it, and applies the `Decision` in the same transaction —
//! dex's updater functions. So `store` imports `domain`, never `login`.

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
mod filter;
#[cfg(any(test, feature = "test-util"))]
pub mod interposed;
pub(crate) mod postgres;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

pub use crate::domain::binding::{BindPolicy, Decide};
use crate::domain::binding::{Decision, Rule};
use crate::domain::{AuditEvent, AuditKind, Binding, Identity, Outcome, SealedToken, User};

/// Counter of the flights of messages the Postgres store sends its server
/// (BEGIN, a statement or a pipelined batch, COMMIT): its round trips,
/// counted where every message passes (the connection's TLS stream).
pub const ROUND_TRIPS: &str = "authbroker_store_round_trips_total";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the connection; retryable.
    #[error("the store is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The URL in `[database] url` is not one we can use.
    #[error("invalid database url: {0}")]
    InvalidUrl(String),
    /// The user, identity or token does not exist.
    #[error("not found")]
    NotFound,
    /// The change would break a binding rule; nothing was written.
    #[error("{0}")]
    Conflict(Conflict),
    /// Anything else: a bug or a broken schema.
    #[error("store failure")]
    Internal(#[source] anyhow::Error),
}

/// Binding rules a write can run into (dex's `ErrAlreadyExists`, refined).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// The identity is bound to another user.
    #[error("the identity is bound to another user")]
    IdentityLinkedElsewhere,
    /// The user already has an identity at this provider.
    #[error("the user already has an identity at this provider")]
    ProviderAlreadyLinked,
    /// Unlinking would leave the user with no identity (needs `force`).
    #[error("this is the user's last identity")]
    LastIdentity,
    /// The stored token changed since it was read (someone else refreshed).
    #[error("the stored token changed concurrently")]
    StaleToken,
}

/// What `bind_login` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindResult {
    Bound {
        outcome: Outcome,
        binding: Binding,
        /// The rule that bound a new identity to an existing user:
        /// `"union_id"` or `"verified_email"` (`Rule::linked_by`).
        linked_by: Option<&'static str>,
    },
    /// The identity is not bound and the policy did not bind it; nothing
    /// was written.
    LinkRequired,
}

/// Names the login a bind belongs to (a hash of its state, never the state
/// itself), written on the bind's audit events. `retry` says an earlier
/// attempt of this login may have committed: the store then answers with
/// what that attempt committed rather than binding again, so a retried
/// CompleteLogin returns the same result whether or not the first commit's
/// acknowledgement was lost.
#[derive(Clone, Copy, Debug)]
pub struct LoginKey<'a> {
    pub id: &'a str,
    pub retry: bool,
}

/// What a login writes besides the binding: the provider token that
/// replaces the identity's stored one, who asked, when, and the login's key
/// (see `LoginKey`). One value because every backend carries all four to
/// the same statements.
#[derive(Clone, Copy, Debug)]
pub struct LoginRecord<'a> {
    pub tokens: Option<&'a SealedToken>,
    pub actor: Option<&'a str>,
    pub now: OffsetDateTime,
    pub login: Option<LoginKey<'a>>,
}

impl<'a> LoginRecord<'a> {
    /// A login at `now` that stores no token and names no actor or key.
    pub fn at(now: OffsetDateTime) -> LoginRecord<'a> {
        LoginRecord {
            tokens: None,
            actor: None,
            now,
            login: None,
        }
    }
}

/// The committed result of the login whose `login_succeeded` event carries
/// `$1` as its login id, with what tells its outcome apart: whether the same
/// login created the user, the rule that linked it, and the identity's
/// creation time. One text for both stores (SQLite reads `$1` as the first
/// parameter).
pub(crate) const COMMITTED_LOGIN_SQL: &str = "SELECT s.user_id, s.provider, s.subject, s.at, \
       EXISTS (SELECT 1 FROM audit_events c WHERE c.user_id = s.user_id \
               AND c.login_id = s.login_id AND c.kind = 'user_created'), \
       (SELECT l.detail FROM audit_events l WHERE l.user_id = s.user_id \
               AND l.login_id = s.login_id AND l.kind = 'identity_linked' LIMIT 1), \
       (SELECT i.created_at FROM identities i \
               WHERE i.provider = s.provider AND i.subject = s.subject) \
     FROM audit_events s WHERE s.login_id = $1 AND s.kind = 'login_succeeded'";

/// One row of `COMMITTED_LOGIN_SQL`, as the `BindResult` it was.
pub(crate) struct CommittedLogin {
    pub user_id: String,
    pub provider: String,
    pub subject: String,
    pub at: OffsetDateTime,
    pub user_created: bool,
    pub linked_by: Option<String>,
    pub identity_created_at: Option<OffsetDateTime>,
}

impl CommittedLogin {
    pub fn into_result(self) -> BindResult {
        let linked_by = self
            .linked_by
            .as_deref()
            .and_then(Rule::from_linked_by)
            .and_then(Rule::linked_by);
        BindResult::Bound {
            outcome: if self.user_created {
                Outcome::UserCreated
            } else {
                Outcome::SignedIn
            },
            binding: Binding {
                user_id: self.user_id,
                provider: self.provider,
                subject: self.subject,
                // Unlinked since: the login's own time is the best we know.
                created_at: self.identity_created_at.unwrap_or(self.at),
                last_login_at: self.at,
            },
            linked_by,
        }
    }
}

/// What a store answers once it has applied a binding `decision`, leaving
/// the identity bound as `binding`.
pub(crate) fn applied(decision: &Decision, binding: Binding) -> BindResult {
    BindResult::Bound {
        outcome: decision.outcome(),
        binding,
        linked_by: decision.linked_by(),
    }
}

/// Filter and page for `list_users` (newest first).
#[derive(Clone, Debug, Default)]
pub struct UserQuery {
    /// Only users with an identity at this provider.
    pub provider: Option<String>,
    pub created_after: Option<OffsetDateTime>,
    pub created_before: Option<OffsetDateTime>,
    /// At most this many; 0 means the default of 100.
    pub limit: u32,
    /// Keyset cursor: users strictly after this `(created_at, id)` in
    /// newest-first order.
    pub after: Option<(OffsetDateTime, String)>,
}

/// Filter and page for `list_audit_events` (newest first).
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub provider: Option<String>,
    pub user_id: Option<String>,
    pub kind: Option<AuditKind>,
    /// Events at or after / strictly before these instants.
    pub after: Option<OffsetDateTime>,
    pub before: Option<OffsetDateTime>,
    /// At most this many events; 0 means the default of 100.
    pub limit: u32,
    /// Keyset cursor: only events with an id below this.
    pub before_id: Option<i64>,
}

/// An audit event as stored, with its id (the paging cursor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: i64,
    pub event: AuditEvent,
}

/// A stored token with the identity it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub provider: String,
    pub subject: String,
    pub token: SealedToken,
}

/// How many pooled connections exist, and how many of them are idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    pub max: usize,
    pub open: usize,
    pub idle: usize,
}

/// The database behind every capability: its schema and its liveness.
#[async_trait]
pub trait Database: Send + Sync + 'static {
    /// Brings the schema up to date (refinery migrations). Idempotent.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap round trip to the database, for health checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The connection pool's occupancy, for metrics; `None` without a pool
    /// (SQLite holds one connection).
    fn pool_status(&self) -> Option<PoolStatus> {
        None
    }
}

/// Identities bound to users, as logins and links write and read them.
#[async_trait]
pub trait BindingStore: Send + Sync + 'static {
    /// A login, in one transaction: reads the `Facts` (the identity's
    /// binding; for an unbound one, the candidates of `policy`'s lookups),
    /// asks `decide` (the policy; `login` passes `login::binding::decide`),
    /// and applies its `Decision` in the same transaction. Bound:
    /// the profile and `last_login_at` are refreshed → `SignedIn`. Linked
    /// by a rule → `SignedIn` with `linked_by`; created → `UserCreated`;
    /// `LinkRequired` writes nothing. `record.tokens`, when given, replace
    /// the identity's stored token. Concurrent first logins of one identity
    /// make exactly one user and all return it. Writes the decision's audit
    /// events, each with `record.login`'s id; a login whose id already has a
    /// committed `login_succeeded` is answered with that result (see
    /// `LoginKey`).
    async fn bind_login(
        &self,
        identity: &Identity,
        policy: &BindPolicy,
        decide: Decide,
        record: LoginRecord<'_>,
    ) -> Result<BindResult, StoreError>;

    /// Binds `identity` to `user_id` (an app's own opaque id or an existing
    /// user; the user row is created if missing), in one transaction.
    /// Already bound to that user: refreshes the profile. Bound elsewhere:
    /// `Conflict::IdentityLinkedElsewhere`. The user already has another
    /// identity at the provider: `Conflict::ProviderAlreadyLinked`. Records
    /// `identity_linked` (and `user_created`).
    async fn link_identity(
        &self,
        user_id: &str,
        identity: &Identity,
        tokens: Option<&SealedToken>,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Binding, StoreError>;

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
}

/// Provider tokens as the vault sealed them, one per identity, versioned
/// so that concurrent refreshes and key rotation never overwrite each other.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    async fn get_token(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<SealedToken>, StoreError>;

    /// Writes the identity's token and returns its new version. With
    /// `expected_version`, only if the stored version still equals it
    /// (else `Conflict::StaleToken`); without, unconditionally. `NotFound`
    /// if the identity does not exist. The written token is usable.
    async fn put_token(
        &self,
        provider: &str,
        subject: &str,
        token: &SealedToken,
        expected_version: Option<i64>,
    ) -> Result<i64, StoreError>;

    /// Marks the token unusable (the provider refused to refresh it), if its
    /// version is still `expected_version` (else `Conflict::StaleToken`).
    async fn mark_token_unusable(
        &self,
        provider: &str,
        subject: &str,
        expected_version: i64,
    ) -> Result<(), StoreError>;

    /// Forgets the identity's token; false if there was none.
    async fn delete_token(&self, provider: &str, subject: &str) -> Result<bool, StoreError>;

    /// Stored tokens in `(provider, subject)` order, after the given key,
    /// for key rotation.
    async fn list_tokens(
        &self,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<TokenRow>, StoreError>;
}

/// The audit trail: appended to by every layer, read by operators.
#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    /// Appends one audit event (e.g. a failed login, an admin call).
    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Users as operators see them: lookup, listing, unlinking and deletion.
#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    async fn get_user(&self, user_id: &str) -> Result<Option<User>, StoreError>;

    async fn find_user_by_identity(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<Option<User>, StoreError>;

    async fn list_users(&self, query: &UserQuery) -> Result<Vec<User>, StoreError>;

    /// Removes the user's identity at `provider` (and its token).
    /// `NotFound` if the user has none there; `Conflict::LastIdentity` if
    /// it is their last and `force` is false. Records `identity_unlinked`.
    async fn unlink_identity(
        &self,
        user_id: &str,
        provider: &str,
        force: bool,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<User, StoreError>;

    /// Deletes the user with their identities and tokens. `NotFound` if
    /// there is no such user. Records `user_deleted`.
    async fn delete_user(
        &self,
        user_id: &str,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    async fn count_users(&self) -> Result<u64, StoreError>;
}

/// Every capability at once: what a backend implements and what the
/// application wires, while each user holds only the capabilities it needs
/// (an `Arc<dyn Store>` coerces to any of them).
pub trait Store: Database + BindingStore + TokenStore + AuditLog + UserDirectory {}

impl<T> Store for T where T: Database + BindingStore + TokenStore + AuditLog + UserDirectory + ?Sized
{}

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
