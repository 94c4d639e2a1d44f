//! The operator use cases behind `AdminService`. Each call is recorded as an
//! `admin_call` audit event (actor, RPC, provider, user, outcome). No
//! protobuf, no SQL.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use time::OffsetDateTime;

use crate::{
    config::ApiKeyConfig,
    domain::{AuditEvent, AuditKind, User, now_micros},
    login::{LoginError, check_user_id},
    provider::Registry,
    reason::Reason,
    state::{Kind, StateError, StateStore, StateToken},
    store::{AuditLog, AuditQuery, AuditRecord, Conflict, StoreError, UserDirectory, UserQuery},
    tokens::{FreshToken, TokenError, TokenService},
};

/// Page sizes: 0 means the default; more than the maximum is refused.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

/// What `ListProviders` shows about a provider. Never a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderSummary {
    pub name: String,
    pub kind: String,
    pub display_name: String,
    pub enabled: bool,
    pub scopes: Vec<String>,
    pub allowed_scopes: Vec<String>,
    pub redirect_uris: Vec<String>,
    pub pkce: bool,
    pub refresh: bool,
    pub revoke: bool,
    pub policy: String,
    pub store_tokens: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad input, with the same reasons as LoginService's.
    #[error(transparent)]
    Input(LoginError),
    #[error("page_token is not one this service issued for this listing")]
    InvalidPageToken,
    #[error("page_size must be between 0 and {MAX_PAGE}")]
    InvalidPageSize,
    #[error("no such user")]
    UserNotFound,
    #[error("no identity with that provider and subject")]
    IdentityNotFound,
    #[error("the user has no identity at this provider")]
    NotLinked,
    #[error("this is the user's last identity; pass force = true to remove it anyway")]
    LastIdentity,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(Conflict::LastIdentity) => AdminError::LastIdentity,
            other => AdminError::Store(other),
        }
    }
}

/// What `DeleteUser` did with the user's stored tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeletedUser {
    /// Providers that revoked the token.
    pub revoked_at: Vec<String>,
    /// Providers that refused or could not be reached; their tokens were
    /// forgotten with the user all the same.
    pub revocation_failed_at: Vec<String>,
}

/// A page of results and the token for the next one (`None` on the last).
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

/// An instant as the caller sent it (a protobuf `Timestamp`'s fields),
/// checked by the use case like every other input (`Moment::check`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moment {
    pub seconds: i64,
    pub nanos: i32,
}

impl Moment {
    /// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the range of a
    /// protobuf `Timestamp`, which both stores hold exactly.
    pub const MIN_SECONDS: i64 = -62_135_596_800;
    pub const MAX_SECONDS: i64 = 253_402_300_799;

    /// The instant, or `INVALID_FIELD` naming `field` when it is outside
    /// the range above (never silently dropped: a dropped bound would
    /// widen a listing to everything).
    pub fn check(
        field: &'static str,
        moment: Option<Moment>,
    ) -> Result<Option<OffsetDateTime>, AdminError> {
        let Some(Moment { seconds, nanos }) = moment else {
            return Ok(None);
        };
        let invalid = || {
            AdminError::Input(LoginError::InvalidField {
                field,
                problem: "must be a timestamp from 0001-01-01T00:00:00Z to \
                          9999-12-31T23:59:59.999999999Z"
                    .into(),
            })
        };
        if !(Self::MIN_SECONDS..=Self::MAX_SECONDS).contains(&seconds)
            || !(0..1_000_000_000).contains(&nanos)
        {
            return Err(invalid());
        }
        OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(seconds) * 1_000_000_000 + i128::from(nanos),
        )
        .map(Some)
        .map_err(|_| invalid())
    }
}

#[derive(Clone, Debug, Default)]
pub struct UserFilter {
    pub provider: Option<String>,
    pub created_after: Option<Moment>,
    pub created_before: Option<Moment>,
    pub page_size: u32,
    pub page_token: String,
}

#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub user_id: Option<String>,
    pub provider: Option<String>,
    pub kind: Option<String>,
    pub after: Option<Moment>,
    pub before: Option<Moment>,
    pub page_size: u32,
    pub page_token: String,
}

pub struct AdminService {
    users: Arc<dyn UserDirectory>,
    audit: Arc<dyn AuditLog>,
    providers: Registry,
    summaries: Vec<ProviderSummary>,
    states: Arc<dyn StateStore>,
    tokens: Arc<TokenService>,
    /// Every name a login can be stored under (`StateToken::owned_by`):
    /// no key (open mode), then each configured API key.
    login_owners: Vec<Option<String>>,
}

/// Who is calling, for the audit trail.
#[derive(Clone, Copy, Debug, Default)]
pub struct Actor<'a>(pub Option<&'a str>);

impl AdminService {
    pub fn new(
        users: Arc<dyn UserDirectory>,
        audit: Arc<dyn AuditLog>,
        providers: Registry,
        summaries: Vec<ProviderSummary>,
        states: Arc<dyn StateStore>,
        tokens: Arc<TokenService>,
        api_keys: &[ApiKeyConfig],
    ) -> Self {
        let login_owners = std::iter::once(None)
            .chain(api_keys.iter().map(|k| Some(k.name.clone())))
            .collect();
        AdminService {
            users,
            audit,
            providers,
            summaries,
            states,
            tokens,
            login_owners,
        }
    }

    /// Records the call, then hands its result back.
    async fn audited<T>(
        &self,
        rpc: &str,
        actor: Actor<'_>,
        provider: Option<&str>,
        user_id: Option<&str>,
        result: Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        let mut event = AuditEvent::new(AuditKind::AdminCall);
        event.actor = actor.0.map(str::to_string);
        event.detail = Some(rpc.to_string());
        // A value refused as input is not written either: a store may not
        // be able to hold it, and the call's own record would be lost.
        event.provider = provider
            .filter(|p| !p.is_empty() && check_text("provider", p).is_ok())
            .map(str::to_string);
        event.user_id = user_id
            .filter(|u| !u.is_empty() && check_user_id(u).is_ok())
            .map(str::to_string);
        event.reason = result.as_ref().err().map(|e| e.reason().to_string());
        if let Err(e) = self.audit.record_audit(&event).await {
            tracing::warn!(error = %crate::telemetry::cause_chain(&e), rpc, "could not record an admin call");
        }
        result
    }

    pub async fn list_providers(&self, actor: Actor<'_>) -> Vec<ProviderSummary> {
        let mut summaries = self.summaries.clone();
        // Revocation is asked of the provider now: an OIDC issuer says in
        // discovery whether it has an endpoint.
        for summary in &mut summaries {
            if let Ok(p) = self.providers.get(&summary.name) {
                summary.revoke = p.can_revoke().await;
            }
        }
        let _ = self
            .audited::<()>("ListProviders", actor, None, None, Ok(()))
            .await;
        summaries
    }

    pub async fn get_user(&self, actor: Actor<'_>, user_id: &str) -> Result<User, AdminError> {
        let result = async {
            check_user_id(user_id).map_err(AdminError::Input)?;
            self.users
                .get_user(user_id)
                .await?
                .ok_or(AdminError::UserNotFound)
        }
        .await;
        self.audited("GetUser", actor, None, Some(user_id), result)
            .await
    }

    pub async fn find_user_by_identity(
        &self,
        actor: Actor<'_>,
        provider: &str,
        subject: &str,
    ) -> Result<User, AdminError> {
        let result = async {
            required("provider", provider)?;
            required("subject", subject)?;
            self.users
                .find_user_by_identity(provider, subject)
                .await?
                .ok_or(AdminError::IdentityNotFound)
        }
        .await;
        let user_id = result.as_ref().ok().map(|u| u.id.clone());
        self.audited(
            "FindUserByIdentity",
            actor,
            Some(provider),
            user_id.as_deref(),
            result,
        )
        .await
    }

    pub async fn list_users(
        &self,
        actor: Actor<'_>,
        filter: UserFilter,
    ) -> Result<Page<User>, AdminError> {
        let result = async {
            let limit = page_size(filter.page_size)?;
            optional_text("provider", filter.provider.as_deref())?;
            let created_after = Moment::check("created_after", filter.created_after)?;
            let created_before = Moment::check("created_before", filter.created_before)?;
            let after = if filter.page_token.is_empty() {
                None
            } else {
                Some(decode_user_cursor(&filter.page_token)?)
            };
            let mut users = self
                .users
                .list_users(&UserQuery {
                    provider: filter.provider.clone(),
                    created_after,
                    created_before,
                    limit: limit + 1,
                    after,
                })
                .await?;
            let next = (users.len() > limit as usize).then(|| {
                users.truncate(limit as usize);
                users
                    .last()
                    .map(|u| encode_user_cursor(u.created_at, &u.id))
            });
            Ok(Page {
                items: users,
                next_page_token: next.flatten(),
            })
        }
        .await;
        self.audited("ListUsers", actor, filter.provider.as_deref(), None, result)
            .await
    }

    pub async fn unlink_identity(
        &self,
        actor: Actor<'_>,
        user_id: &str,
        provider: &str,
        force: bool,
    ) -> Result<User, AdminError> {
        let result = async {
            check_user_id(user_id).map_err(AdminError::Input)?;
            required("provider", provider)?;
            match self
                .users
                .unlink_identity(user_id, provider, force, actor.0, now_micros())
                .await
            {
                Err(StoreError::NotFound) => {
                    // Say which: no user, or no identity there.
                    if self.users.get_user(user_id).await?.is_none() {
                        Err(AdminError::UserNotFound)
                    } else {
                        Err(AdminError::NotLinked)
                    }
                }
                other => Ok(other?),
            }
        }
        .await;
        self.audited(
            "UnlinkIdentity",
            actor,
            Some(provider),
            Some(user_id),
            result,
        )
        .await
    }

    /// Deletes the user after revoking their stored tokens at providers that
    /// can revoke. A provider that is down or refuses does not keep a user
    /// from being deleted, and the tokens go with the user; the answer
    /// names where revocation failed (never a silent success), and each
    /// failure is audited as a `token_revoked` event with its reason.
    pub async fn delete_user(
        &self,
        actor: Actor<'_>,
        user_id: &str,
    ) -> Result<DeletedUser, AdminError> {
        let result = async {
            check_user_id(user_id).map_err(AdminError::Input)?;
            let user = self
                .users
                .get_user(user_id)
                .await?
                .ok_or(AdminError::UserNotFound)?;
            let mut revoked = Vec::new();
            let mut failed = Vec::new();
            for linked in user.identities.iter().filter(|i| i.token.is_some()) {
                let name = &linked.identity.provider;
                let Ok(provider) = self.providers.get(name) else {
                    continue;
                };
                let outcome = self
                    .tokens
                    .revoke_subject(&**provider, &linked.identity.subject)
                    .await;
                let (detail, reason) = match outcome {
                    Ok(true) => {
                        revoked.push(name.clone());
                        ("at_provider", None)
                    }
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(
                            provider = %name,
                            error = %crate::telemetry::cause_chain(&e),
                            "could not revoke a token of a deleted user"
                        );
                        failed.push(name.clone());
                        ("forgotten", Some(AdminError::Token(e).reason().to_string()))
                    }
                };
                let mut event = AuditEvent::new(AuditKind::TokenRevoked);
                event.actor = actor.0.map(str::to_string);
                event.provider = Some(name.clone());
                event.subject = Some(linked.identity.subject.clone());
                event.user_id = Some(user_id.to_string());
                event.detail = Some(detail.into());
                event.reason = reason;
                if let Err(e) = self.audit.record_audit(&event).await {
                    tracing::warn!(error = %crate::telemetry::cause_chain(&e), "could not record a revocation");
                }
            }
            match self.users.delete_user(user_id, actor.0, now_micros()).await {
                Err(StoreError::NotFound) => Err(AdminError::UserNotFound),
                other => other.map_err(AdminError::from).map(|()| DeletedUser {
                    revoked_at: revoked,
                    revocation_failed_at: failed,
                }),
            }
        }
        .await;
        self.audited("DeleteUser", actor, None, Some(user_id), result)
            .await
    }

    pub async fn get_provider_token(
        &self,
        actor: Actor<'_>,
        user_id: &str,
        provider: &str,
    ) -> Result<FreshToken, AdminError> {
        let result = async {
            check_user_id(user_id).map_err(AdminError::Input)?;
            required("provider", provider)?;
            Ok(self.tokens.fresh_token(user_id, provider, actor.0).await?)
        }
        .await;
        self.audited(
            "GetProviderToken",
            actor,
            Some(provider),
            Some(user_id),
            result,
        )
        .await
    }

    pub async fn revoke_provider_token(
        &self,
        actor: Actor<'_>,
        user_id: &str,
        provider: &str,
    ) -> Result<bool, AdminError> {
        let result = async {
            check_user_id(user_id).map_err(AdminError::Input)?;
            required("provider", provider)?;
            Ok(self.tokens.revoke(user_id, provider, actor.0).await?)
        }
        .await;
        self.audited(
            "RevokeProviderToken",
            actor,
            Some(provider),
            Some(user_id),
            result,
        )
        .await
    }

    pub async fn list_audit_events(
        &self,
        actor: Actor<'_>,
        filter: AuditFilter,
    ) -> Result<Page<AuditRecord>, AdminError> {
        let result = async {
            let limit = page_size(filter.page_size)?;
            optional_text("provider", filter.provider.as_deref())?;
            if let Some(user_id) = filter.user_id.as_deref() {
                check_user_id(user_id).map_err(AdminError::Input)?;
            }
            let after = Moment::check("after", filter.after)?;
            let before = Moment::check("before", filter.before)?;
            let kind = match filter.kind.as_deref() {
                None | Some("") => None,
                Some(k) => Some(AuditKind::parse(k).ok_or_else(|| {
                    AdminError::Input(LoginError::InvalidField {
                        field: "kind",
                        problem: format!(
                            "unknown kind; one of {}",
                            AuditKind::ALL.map(AuditKind::as_str).join(", ")
                        ),
                    })
                })?),
            };
            let before_id = if filter.page_token.is_empty() {
                None
            } else {
                Some(decode_audit_cursor(&filter.page_token)?)
            };
            let mut events = self
                .audit
                .list_audit_events(&AuditQuery {
                    provider: filter.provider.clone(),
                    user_id: filter.user_id.clone(),
                    kind,
                    after,
                    before,
                    limit: limit + 1,
                    before_id,
                })
                .await?;
            let next = (events.len() > limit as usize).then(|| {
                events.truncate(limit as usize);
                events.last().map(|e| encode_audit_cursor(e.id))
            });
            Ok(Page {
                items: events,
                next_page_token: next.flatten(),
            })
        }
        .await;
        // Recorded after reading, so a page never contains its own call.
        self.audited(
            "ListAuditEvents",
            actor,
            filter.provider.as_deref(),
            filter.user_id.as_deref(),
            result,
        )
        .await
    }

    /// Forgets a pending login so its state can no longer complete,
    /// whichever API key began it: a login is stored under its key's name
    /// (`StateToken::owned_by`), so each configured name is tried.
    pub async fn cancel_login(&self, actor: Actor<'_>, state: &str) -> Result<(), AdminError> {
        let result = async {
            let token =
                StateToken::parse(state).ok_or(AdminError::Input(LoginError::InvalidField {
                    field: "state",
                    problem: "is not a state issued by BeginLogin (43 base64url characters)".into(),
                }))?;
            let now = OffsetDateTime::now_utc();
            for owner in &self.login_owners {
                let key = token.owned_by(owner.as_deref());
                match self.states.cancel(Kind::Login, &key, now).await {
                    Err(StateError::Unknown) => continue,
                    // An expired login is as cancelled as it gets.
                    Ok(_) | Err(StateError::Expired) => return Ok(()),
                    Err(e) => return Err(AdminError::Input(e.into())),
                }
            }
            Err(AdminError::Input(LoginError::StateUnknown))
        }
        .await;
        self.audited("CancelLogin", actor, None, None, result).await
    }
}

impl AdminError {
    pub fn reason(&self) -> Reason {
        match self {
            AdminError::Input(e) => e.reason(),
            AdminError::InvalidPageToken => Reason::InvalidPageToken,
            AdminError::InvalidPageSize => Reason::InvalidField,
            AdminError::UserNotFound => Reason::UserNotFound,
            AdminError::IdentityNotFound | AdminError::NotLinked => Reason::IdentityNotFound,
            AdminError::LastIdentity => Reason::LastIdentity,
            AdminError::Token(e) => match e {
                TokenError::UnknownProvider => Reason::UnknownProvider,
                TokenError::UserNotFound => Reason::UserNotFound,
                TokenError::IdentityNotFound => Reason::IdentityNotFound,
                TokenError::NotStored => Reason::TokenNotStored,
                TokenError::Unusable => Reason::TokenUnusable,
                TokenError::Expired => Reason::TokenExpired,
                TokenError::RefreshRejected(_) => Reason::RefreshTokenRejected,
                TokenError::RevocationRefused(_) => Reason::RevocationRefused,
                TokenError::Vault(_) => Reason::VaultKeyMissing,
                TokenError::Provider(p) => crate::login::provider_reason(p),
                TokenError::Store(e) => store_reason(e),
            },
            AdminError::Store(e) => store_reason(e),
        }
    }
}

fn store_reason(e: &StoreError) -> Reason {
    match e {
        StoreError::Unavailable(_) => Reason::StoreUnavailable,
        StoreError::Conflict(Conflict::StaleToken) => Reason::ConcurrentUpdate,
        _ => Reason::Internal,
    }
}

impl AdminError {
    /// The request field at fault, for a `BadRequest` field violation.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            AdminError::Input(e) => e.field(),
            AdminError::InvalidPageToken => Some("page_token"),
            AdminError::InvalidPageSize => Some("page_size"),
            _ => None,
        }
    }

    /// Only store failures carry details worth hiding from callers.
    pub fn is_internal(&self) -> bool {
        self.reason() == Reason::Internal
    }
}

fn required(field: &'static str, value: &str) -> Result<(), AdminError> {
    if value.is_empty() {
        Err(AdminError::Input(LoginError::MissingField { field }))
    } else {
        check_text(field, value).map_err(AdminError::Input)
    }
}

fn optional_text(field: &'static str, value: Option<&str>) -> Result<(), AdminError> {
    match value {
        Some(v) if !v.is_empty() => check_text(field, v).map_err(AdminError::Input),
        _ => Ok(()),
    }
}

/// A name or id the caller looks something up by (provider, subject):
/// bounded, and free of control characters, NUL above all, which Postgres
/// cannot even compare and SQLite would; both stores answer alike.
fn check_text(field: &'static str, value: &str) -> Result<(), LoginError> {
    if value.len() > crate::login::limits::URL {
        Err(LoginError::FieldTooLong {
            field,
            limit: crate::login::limits::URL,
        })
    } else if value.chars().any(char::is_control) {
        Err(LoginError::InvalidField {
            field,
            problem: "must not contain control characters".into(),
        })
    } else {
        Ok(())
    }
}

fn page_size(requested: u32) -> Result<u32, AdminError> {
    match requested {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        _ => Err(AdminError::InvalidPageSize),
    }
}

// Page tokens are opaque to callers: base64url of a tagged cursor, so a
// token from one listing is refused by another.
fn encode_user_cursor(created_at: OffsetDateTime, id: &str) -> String {
    let micros = created_at.unix_timestamp_nanos() / 1_000;
    URL_SAFE_NO_PAD.encode(format!("u1|{micros}|{id}"))
}

fn decode_user_cursor(token: &str) -> Result<(OffsetDateTime, String), AdminError> {
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(AdminError::InvalidPageToken)?;
    let mut parts = text.splitn(3, '|');
    let (Some("u1"), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(AdminError::InvalidPageToken);
    };
    let micros: i64 = micros.parse().map_err(|_| AdminError::InvalidPageToken)?;
    // Only what encode_user_cursor can have written: an instant the stores
    // hold and a user id that passes the usual check.
    let at = Moment::check(
        "page_token",
        Some(Moment {
            seconds: micros.div_euclid(1_000_000),
            nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
        }),
    )
    .ok()
    .flatten()
    .ok_or(AdminError::InvalidPageToken)?;
    check_user_id(id).map_err(|_| AdminError::InvalidPageToken)?;
    Ok((at, id.to_string()))
}

fn encode_audit_cursor(id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("a1|{id}"))
}

fn decode_audit_cursor(token: &str) -> Result<i64, AdminError> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| t.strip_prefix("a1|").and_then(|n| n.parse().ok()))
        .ok_or(AdminError::InvalidPageToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_do_not_mix() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_795_270_095_201_940_000).unwrap();
        let token = encode_user_cursor(at, "user|with|bars");
        assert_eq!(
            decode_user_cursor(&token).unwrap(),
            (at, "user|with|bars".to_string())
        );
        assert_eq!(decode_audit_cursor(&encode_audit_cursor(42)).unwrap(), 42);
        assert!(matches!(
            decode_audit_cursor(&token),
            Err(AdminError::InvalidPageToken)
        ));
        assert!(matches!(
            decode_user_cursor(&encode_audit_cursor(1)),
            Err(AdminError::InvalidPageToken)
        ));
        assert!(matches!(
            decode_user_cursor("!!!"),
            Err(AdminError::InvalidPageToken)
        ));
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_size(500).unwrap(), 500);
        assert!(page_size(501).is_err());
    }
}
