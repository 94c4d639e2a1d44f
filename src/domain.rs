//! Value types shared by the login use cases, the providers and the stores.
//! They know nothing of protobuf or SQL.

use time::OffsetDateTime;

/// What a provider told us about the person who just logged in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// The identity was already bound.
    SignedIn,
    /// First login: a user was created for the identity.
    UserCreated,
}

/// Kinds of audit events. The string form is stored and is part of the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditKind {
    LoginSucceeded,
    LoginFailed,
    UserCreated,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::LoginSucceeded => "login_succeeded",
            AuditKind::LoginFailed => "login_failed",
            AuditKind::UserCreated => "user_created",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "login_succeeded" => AuditKind::LoginSucceeded,
            "login_failed" => AuditKind::LoginFailed,
            "user_created" => AuditKind::UserCreated,
            _ => return None,
        })
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
    /// For failures, the stable error reason (e.g. `PROVIDER_REJECTED`).
    pub reason: Option<String>,
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
