//! Value types shared by the login use cases, the providers and the stores.
//! They know nothing of protobuf or SQL. `binding`: the binding policy's
//! types (`BindPolicy`, `Facts`, `Decision`, `Decide`) that a store applies.

pub mod binding;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What a provider told us about the person who just logged in. Serde is
/// for link tickets and resumable logins in the state store, which seals
/// them on shared backends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Configured provider name (e.g. `github`), not the preset kind.
    pub provider: String,
    /// The provider's stable user id; never a mutable login name or an email.
    pub subject: String,
    pub union_id: Option<String>,
    pub username: Option<String>,
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
    pub email: Option<String>,
    pub email_verified: bool,
}

/// The persisted link between an identity and a local user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub user_id: String,
    pub provider: String,
    pub subject: String,
    pub created_at: OffsetDateTime,
    pub last_login_at: OffsetDateTime,
}

/// How a login ended for the binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The identity was already bound, or was just bound to an existing user
    /// by a linking rule (union id, verified email).
    SignedIn,
    /// First login: a user was created for the identity.
    UserCreated,
    /// The `link_required` policy: nothing was bound; the app links the
    /// identity to its own user with the link ticket. Only the login use
    /// case produces this; stores never do.
    LinkRequired,
}

/// A local user and every identity bound to them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub created_at: OffsetDateTime,
    pub identities: Vec<LinkedIdentity>,
}

/// An identity as bound to a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkedIdentity {
    pub identity: Identity,
    pub created_at: OffsetDateTime,
    pub last_login_at: OffsetDateTime,
    /// `None`: no provider token stored; `Some(usable)` otherwise.
    pub token: Option<bool>,
}

/// Provider tokens as the vault sealed them: the store keeps these bytes and
/// never sees plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedToken {
    /// Which vault key encrypted it.
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    /// Bumped on every write; writers compare it to avoid lost updates.
    pub version: i64,
    /// False once the provider refused to refresh it.
    pub usable: bool,
    pub updated_at: OffsetDateTime,
}

impl std::fmt::Debug for SealedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedToken")
            .field("key_id", &self.key_id)
            .field("version", &self.version)
            .field("usable", &self.usable)
            .finish_non_exhaustive()
    }
}

/// Kinds of audit events. The string form is stored and is part of the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditKind {
    LoginSucceeded,
    LoginFailed,
    UserCreated,
    IdentityLinked,
    IdentityUnlinked,
    UserDeleted,
    TokenRefreshed,
    TokenRevoked,
    AdminCall,
}

impl AuditKind {
    pub const ALL: [AuditKind; 9] = [
        AuditKind::LoginSucceeded,
        AuditKind::LoginFailed,
        AuditKind::UserCreated,
        AuditKind::IdentityLinked,
        AuditKind::IdentityUnlinked,
        AuditKind::UserDeleted,
        AuditKind::TokenRefreshed,
        AuditKind::TokenRevoked,
        AuditKind::AdminCall,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::LoginSucceeded => "login_succeeded",
            AuditKind::LoginFailed => "login_failed",
            AuditKind::UserCreated => "user_created",
            AuditKind::IdentityLinked => "identity_linked",
            AuditKind::IdentityUnlinked => "identity_unlinked",
            AuditKind::UserDeleted => "user_deleted",
            AuditKind::TokenRefreshed => "token_refreshed",
            AuditKind::TokenRevoked => "token_revoked",
            AuditKind::AdminCall => "admin_call",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        AuditKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One audit record. Never holds a secret, token, code or state value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub at: OffsetDateTime,
    pub kind: AuditKind,
    /// Name of the API key that made the call, when known.
    pub actor: Option<String>,
    pub provider: Option<String>,
    pub subject: Option<String>,
    pub user_id: Option<String>,
    /// For failures, the stable error reason (e.g. `PROVIDER_REJECTED`);
    /// `None` means success.
    pub reason: Option<String>,
    /// For admin calls, the RPC name; otherwise free for context that is
    /// never secret (e.g. "union_id" for how an identity was linked).
    pub detail: Option<String>,
}

impl AuditEvent {
    pub fn new(kind: AuditKind) -> Self {
        AuditEvent {
            at: OffsetDateTime::now_utc(),
            kind,
            actor: None,
            provider: None,
            subject: None,
            user_id: None,
            reason: None,
            detail: None,
        }
    }
}

impl AuditEvent {
    /// A successful event about `binding`, at its `last_login_at` (the time
    /// of the transaction that wrote it).
    pub fn about(
        kind: AuditKind,
        binding: &Binding,
        actor: Option<&str>,
        detail: Option<&str>,
    ) -> Self {
        AuditEvent {
            at: binding.last_login_at,
            kind,
            actor: actor.map(str::to_owned),
            provider: Some(binding.provider.clone()),
            subject: Some(binding.subject.clone()),
            user_id: Some(binding.user_id.clone()),
            reason: None,
            detail: detail.map(str::to_owned),
        }
    }
}

/// Database timestamps have microsecond precision; truncating here keeps values
/// equal across a round trip through either store.
pub fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let nanos = now.nanosecond();
    now.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(now)
}
