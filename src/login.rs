//! The use cases: begin a login, complete it. No protobuf, no SQL: this layer
//! speaks `Provider`, `StateStore` and `Store`.

use std::{collections::HashMap, sync::Arc, time::Instant};

use time::OffsetDateTime;
use url::Url;

use crate::{
    config::{LoginSettings, Policy, Settings, parse_origin},
    domain::{AuditEvent, AuditKind, Binding, Identity, Outcome, now_micros},
    provider::{ProviderError, Registry, TokenSet, registry::Lookup},
    state::{Expiring, PendingLogin, SingleUse, StateError, StateStore, StateToken},
    store::{BindPolicy, BindResult, Conflict, Store, StoreError},
    tokens::TokenService,
    vault::VaultError,
};

/// Input limits. Generous for real values, small enough that nobody can make
/// us hold or forward megabytes.
pub mod limits {
    pub const PROVIDER: usize = 64;
    pub const URL: usize = 2048;
    pub const SCOPES: usize = 32;
    pub const SCOPE: usize = 256;
    pub const CODE: usize = 2048;
    pub const ERROR: usize = 256;
    pub const ERROR_DESCRIPTION: usize = 2048;
    pub const USER_ID: usize = 128;
}

#[derive(Clone, Debug, Default)]
pub struct BeginLogin {
    pub provider: String,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    pub return_to: String,
}

#[derive(Clone, Debug)]
pub struct BegunLogin {
    pub authorize_url: String,
    pub state: StateToken,
    pub expires_at: OffsetDateTime,
}

#[derive(Clone, Default)]
pub struct CompleteLogin {
    pub state: String,
    pub code: String,
    pub error: String,
    pub error_description: String,
}

#[derive(Clone, Debug)]
pub struct CompletedLogin {
    pub outcome: Outcome,
    /// `None` only with `Outcome::LinkRequired`.
    pub binding: Option<Binding>,
    pub identity: Identity,
    pub return_to: Option<String>,
    /// Only with `Outcome::LinkRequired`: redeem with `link`.
    pub link_ticket: Option<StateToken>,
}

#[derive(Clone, Default)]
pub struct LinkIdentity {
    pub link_ticket: String,
    pub user_id: String,
}

#[derive(Clone, Debug)]
pub struct LinkedIdentity {
    pub binding: Binding,
    pub identity: Identity,
    pub return_to: Option<String>,
}

/// What a `link_required` login leaves for `LinkIdentity`: in memory only,
/// single use, like a pending login.
#[derive(Clone)]
struct LinkTicket {
    identity: Identity,
    /// Kept only when the provider stores tokens.
    tokens: Option<TokenSet>,
    return_to: Option<String>,
    expires_at: OffsetDateTime,
}

impl Expiring for LinkTicket {
    fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }
}

/// The binding policy of every provider, from `[login]` and its per-provider
/// overrides.
pub fn bind_policies(settings: &Settings) -> HashMap<String, BindPolicy> {
    let login = &settings.login;
    settings
        .providers
        .iter()
        .map(|(name, p)| {
            let union = p.link_by_union_id.unwrap_or(login.link_by_union_id);
            let union_group = match (&p.union_group, union) {
                (Some(group), true) => settings
                    .providers
                    .iter()
                    .filter(|(_, q)| q.union_group.as_ref() == Some(group))
                    .map(|(n, _)| n.clone())
                    .collect(),
                _ => Vec::new(),
            };
            let policy = BindPolicy {
                create_user: p.policy.unwrap_or(login.policy) == Policy::AutoCreate,
                union_group,
                link_verified_email: p
                    .link_by_verified_email
                    .unwrap_or(login.link_by_verified_email),
            };
            (name.clone(), policy)
        })
        .collect()
}

/// Every way a login can fail. `reason()` is the stable string callers see
/// in `ErrorInfo` and operators see in audit events.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{field}: {problem}")]
    InvalidField {
        field: &'static str,
        problem: String,
    },
    #[error("{field} is required")]
    MissingField { field: &'static str },
    #[error("{field} is longer than {limit} bytes")]
    FieldTooLong { field: &'static str, limit: usize },
    #[error("provider is not configured; configured providers: {known}")]
    UnknownProvider { known: String },
    #[error("provider is disabled in configuration")]
    ProviderDisabled,
    #[error("redirect_uri is not one of the provider's configured redirect_uris")]
    RedirectUriNotAllowed,
    #[error("scope {scope:?} is not allowed for this provider (see allowed_scopes)")]
    ScopeNotAllowed { scope: String },
    #[error("return_to {0}")]
    ReturnToNotAllowed(&'static str),
    #[error("the state is unknown: it was never issued by this service or was forgotten")]
    StateUnknown,
    #[error("the state has expired; start the login again")]
    StateExpired,
    #[error("the state was already used; start the login again")]
    StateAlreadyUsed,
    #[error("too many logins are pending; try again shortly")]
    TooManyPendingLogins,
    #[error("the link ticket is unknown: it was never issued by this service or was forgotten")]
    LinkTicketUnknown,
    #[error("the link ticket has expired; start the login again")]
    LinkTicketExpired,
    #[error("the link ticket was already used; start the login again")]
    LinkTicketUsed,
    #[error("the identity is already bound to another user")]
    IdentityLinkedElsewhere,
    #[error("the user already has an identity at this provider; unlink it first")]
    ProviderAlreadyLinked,
    #[error("provider tokens cannot be sealed")]
    Vault(#[source] VaultError),
    #[error("the user denied the request at the provider")]
    AccessDenied,
    #[error("the provider redirected back with error {error:?}")]
    ProviderAuthorizeError { error: String },
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("pending-login state is unavailable")]
    StateUnavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LoginError {
    pub fn reason(&self) -> &'static str {
        match self {
            LoginError::InvalidField { .. } => "INVALID_FIELD",
            LoginError::MissingField { .. } => "MISSING_FIELD",
            LoginError::FieldTooLong { .. } => "FIELD_TOO_LONG",
            LoginError::UnknownProvider { .. } => "UNKNOWN_PROVIDER",
            LoginError::ProviderDisabled => "PROVIDER_DISABLED",
            LoginError::RedirectUriNotAllowed => "REDIRECT_URI_NOT_ALLOWED",
            LoginError::ScopeNotAllowed { .. } => "SCOPE_NOT_ALLOWED",
            LoginError::ReturnToNotAllowed(_) => "RETURN_TO_NOT_ALLOWED",
            LoginError::StateUnknown => "STATE_UNKNOWN",
            LoginError::StateExpired => "STATE_EXPIRED",
            LoginError::StateAlreadyUsed => "STATE_ALREADY_USED",
            LoginError::TooManyPendingLogins => "TOO_MANY_PENDING_LOGINS",
            LoginError::LinkTicketUnknown => "LINK_TICKET_UNKNOWN",
            LoginError::LinkTicketExpired => "LINK_TICKET_EXPIRED",
            LoginError::LinkTicketUsed => "LINK_TICKET_ALREADY_USED",
            LoginError::IdentityLinkedElsewhere => "IDENTITY_LINKED_ELSEWHERE",
            LoginError::ProviderAlreadyLinked => "PROVIDER_ALREADY_LINKED",
            LoginError::Vault(_) => "INTERNAL",
            LoginError::AccessDenied => "ACCESS_DENIED",
            LoginError::ProviderAuthorizeError { .. } => "PROVIDER_AUTHORIZE_ERROR",
            LoginError::Provider(p) => provider_reason(p),
            LoginError::StateUnavailable(_) => "STATE_STORE_UNAVAILABLE",
            LoginError::Store(StoreError::Unavailable(_)) => "STORE_UNAVAILABLE",
            LoginError::Store(_) => "INTERNAL",
        }
    }

    /// Maps a link-ticket lookup failure to its own reasons.
    fn from_ticket(e: StateError) -> Self {
        match e {
            StateError::Unknown => LoginError::LinkTicketUnknown,
            StateError::Expired => LoginError::LinkTicketExpired,
            StateError::AlreadyUsed => LoginError::LinkTicketUsed,
            other => other.into(),
        }
    }

    /// The request field at fault, for a `BadRequest` field violation.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            LoginError::InvalidField { field, .. }
            | LoginError::MissingField { field }
            | LoginError::FieldTooLong { field, .. } => Some(field),
            LoginError::UnknownProvider { .. } | LoginError::ProviderDisabled => Some("provider"),
            LoginError::RedirectUriNotAllowed => Some("redirect_uri"),
            LoginError::ScopeNotAllowed { .. } => Some("scopes"),
            LoginError::ReturnToNotAllowed(_) => Some("return_to"),
            LoginError::LinkTicketUnknown
            | LoginError::LinkTicketExpired
            | LoginError::LinkTicketUsed => Some("link_ticket"),
            _ => None,
        }
    }
}

/// The reason for a provider failure, wherever it surfaces.
pub fn provider_reason(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Rejected { .. } => "PROVIDER_REJECTED",
        ProviderError::Unavailable { .. } => "PROVIDER_UNAVAILABLE",
        ProviderError::BadResponse { .. } => "PROVIDER_BAD_RESPONSE",
        ProviderError::InvalidIdToken { .. } => "ID_TOKEN_INVALID",
    }
}

impl From<StateError> for LoginError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Unknown => LoginError::StateUnknown,
            StateError::Expired => LoginError::StateExpired,
            StateError::AlreadyUsed => LoginError::StateAlreadyUsed,
            StateError::Full { .. } => LoginError::TooManyPendingLogins,
            StateError::Unavailable(e) => LoginError::StateUnavailable(e),
        }
    }
}

pub struct LoginService {
    providers: Registry,
    states: Arc<dyn StateStore>,
    store: Arc<dyn Store>,
    tokens: Arc<TokenService>,
    policies: HashMap<String, BindPolicy>,
    tickets: SingleUse<LinkTicket>,
    settings: LoginSettings,
    return_to_origins: Vec<url::Origin>,
}

/// Everything `LoginService::new` needs.
pub struct LoginParts {
    pub providers: Registry,
    pub states: Arc<dyn StateStore>,
    pub store: Arc<dyn Store>,
    pub tokens: Arc<TokenService>,
    pub policies: HashMap<String, BindPolicy>,
    pub settings: LoginSettings,
}

fn check_len(field: &'static str, value: &str, limit: usize) -> Result<(), LoginError> {
    if value.len() > limit {
        Err(LoginError::FieldTooLong { field, limit })
    } else {
        Ok(())
    }
}

fn record_phase(phase: &'static str, started: Instant) {
    metrics::histogram!("authbroker_login_phase_seconds", "phase" => phase)
        .record(started.elapsed().as_secs_f64());
}

impl LoginService {
    pub fn new(parts: LoginParts) -> Self {
        let settings = parts.settings;
        // Config validation already rejected bad origins; skipping them here
        // can only make the allowlist stricter.
        let return_to_origins = settings
            .return_to_origins
            .iter()
            .filter_map(|o| parse_origin(o).ok())
            .collect();
        // Tickets share the pending-login bound: each stems from one login.
        let tickets = SingleUse::new(settings.max_pending, settings.link_ticket_ttl);
        LoginService {
            providers: parts.providers,
            states: parts.states,
            store: parts.store,
            tokens: parts.tokens,
            policies: parts.policies,
            tickets,
            settings,
            return_to_origins,
        }
    }

    pub fn states(&self) -> &Arc<dyn StateStore> {
        &self.states
    }

    pub fn providers(&self) -> &Registry {
        &self.providers
    }

    pub async fn begin(&self, req: BeginLogin) -> Result<BegunLogin, LoginError> {
        check_len("provider", &req.provider, limits::PROVIDER)?;
        check_len("redirect_uri", &req.redirect_uri, limits::URL)?;
        check_len("return_to", &req.return_to, limits::URL)?;
        if req.scopes.len() > limits::SCOPES {
            return Err(LoginError::InvalidField {
                field: "scopes",
                problem: format!("at most {} scopes", limits::SCOPES),
            });
        }
        for s in &req.scopes {
            check_len("scopes", s, limits::SCOPE)?;
        }
        if req.provider.is_empty() {
            return Err(LoginError::MissingField { field: "provider" });
        }
        let provider = self.providers.get(&req.provider).map_err(|e| match e {
            Lookup::Disabled => LoginError::ProviderDisabled,
            Lookup::Unknown => LoginError::UnknownProvider {
                known: self.providers.names().join(", "),
            },
        })?;
        let info = provider.info();

        let redirect_uri = if req.redirect_uri.is_empty() {
            // Registry::build guarantees at least one redirect URI.
            info.redirect_uris
                .first()
                .cloned()
                .ok_or(LoginError::RedirectUriNotAllowed)?
        } else {
            info.redirect_uris
                .iter()
                .find(|u| ***u == *req.redirect_uri)
                .cloned()
                .ok_or(LoginError::RedirectUriNotAllowed)?
        };

        let extra: Vec<&String> = req
            .scopes
            .iter()
            .filter(|s| !info.scopes.contains(s))
            .collect();
        let scopes = if extra.is_empty() {
            info.scopes.clone()
        } else {
            let mut all = info.scopes.to_vec();
            for s in extra {
                if !info.allowed_scopes.contains(s) {
                    return Err(LoginError::ScopeNotAllowed { scope: s.clone() });
                }
                if !all.contains(s) {
                    all.push(s.clone());
                }
            }
            Arc::from(all)
        };

        let return_to = self.check_return_to(&req.return_to)?;
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(self.settings.state_ttl)
            .unwrap_or(time::Duration::minutes(10));
        // One draw for every secret of this login (see state::entropy).
        let (state, pkce, nonce) = crate::state::login_secrets()?;
        let login = PendingLogin {
            state,
            provider: info.name.clone(),
            redirect_uri,
            scopes,
            return_to: return_to.map(String::into_boxed_str),
            pkce: info.pkce.then_some(pkce),
            nonce: info.nonce.then_some(nonce),
            created_at: now,
            expires_at: now + ttl,
        };
        let authorize_url = provider.authorize_url(&login).await?;
        let (state, expires_at) = (login.state, login.expires_at);
        self.states.put(login).await?;
        Ok(BegunLogin {
            authorize_url,
            state,
            expires_at,
        })
    }

    /// `return_to` is either a path on the app's own origin or an absolute
    /// URL on an allowlisted origin; anything else could be an open redirect.
    fn check_return_to(&self, s: &str) -> Result<Option<String>, LoginError> {
        if s.is_empty() {
            return Ok(None);
        }
        if s.chars().any(|c| c.is_control() || c == '\\') {
            return Err(LoginError::ReturnToNotAllowed(
                "must not contain control characters or backslashes",
            ));
        }
        if s.starts_with('/') {
            if s.starts_with("//") {
                return Err(LoginError::ReturnToNotAllowed(
                    "must not start with // (that is another host)",
                ));
            }
            // Belt and braces: resolving against a base must stay on it.
            let base = Url::parse("https://return-to.invalid/")
                .map_err(|_| LoginError::ReturnToNotAllowed("could not be checked"))?;
            return match base.join(s) {
                Ok(u) if u.origin() == base.origin() => Ok(Some(s.to_string())),
                _ => Err(LoginError::ReturnToNotAllowed(
                    "is not a valid relative path",
                )),
            };
        }
        let url = Url::parse(s).map_err(|_| {
            LoginError::ReturnToNotAllowed(
                "must be a relative path starting with / or an absolute http(s) URL",
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(LoginError::ReturnToNotAllowed("must use http or https"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(LoginError::ReturnToNotAllowed(
                "must not contain credentials",
            ));
        }
        if !self.return_to_origins.contains(&url.origin()) {
            return Err(LoginError::ReturnToNotAllowed(
                "points at an origin not in login.return_to_origins",
            ));
        }
        Ok(Some(s.to_string()))
    }

    pub async fn complete(
        &self,
        req: CompleteLogin,
        actor: Option<&str>,
    ) -> Result<CompletedLogin, LoginError> {
        if req.state.is_empty() {
            return Err(LoginError::MissingField { field: "state" });
        }
        let state = StateToken::parse(&req.state).ok_or(LoginError::InvalidField {
            field: "state",
            problem: "is not a state issued by BeginLogin (43 base64url characters)".into(),
        })?;
        check_len("code", &req.code, limits::CODE)?;
        check_len("error", &req.error, limits::ERROR)?;
        check_len(
            "error_description",
            &req.error_description,
            limits::ERROR_DESCRIPTION,
        )?;
        if req.code.is_empty() && req.error.is_empty() {
            return Err(LoginError::MissingField { field: "code" });
        }

        let started = Instant::now();
        let taken = self.states.take(&state, OffsetDateTime::now_utc()).await;
        record_phase("state", started);
        let login = match taken {
            Ok(login) => login,
            Err(e) => {
                // Which provider a dead state belonged to is no longer known.
                let e = LoginError::from(e);
                self.audit_failure(None, actor, &e).await;
                return Err(e);
            }
        };

        let result = self.finish(&login, &req, actor).await;
        if let Err(e) = &result {
            self.audit_failure(Some(&login.provider), actor, e).await;
        }
        result
    }

    /// A failed login is audited with its reason; losing the audit write
    /// must not hide the login's own error.
    async fn audit_failure(&self, provider: Option<&str>, actor: Option<&str>, e: &LoginError) {
        let mut event = AuditEvent::new(AuditKind::LoginFailed);
        event.actor = actor.map(str::to_string);
        event.provider = provider.map(str::to_string);
        event.reason = Some(e.reason().to_string());
        if let Err(audit_err) = self.store.record_audit(&event).await {
            tracing::warn!(
                error = %crate::telemetry::cause_chain(&audit_err),
                "could not record a failed login"
            );
        }
    }

    async fn finish(
        &self,
        login: &PendingLogin,
        req: &CompleteLogin,
        actor: Option<&str>,
    ) -> Result<CompletedLogin, LoginError> {
        let provider =
            self.providers
                .get(&login.provider)
                .map_err(|_| LoginError::UnknownProvider {
                    known: self.providers.names().join(", "),
                })?;
        if !req.error.is_empty() {
            return Err(if provider.info().denied.contains(&req.error) {
                LoginError::AccessDenied
            } else {
                LoginError::ProviderAuthorizeError {
                    error: req
                        .error
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                        .take(64)
                        .collect(),
                }
            });
        }
        let provider =
            self.providers
                .get(&login.provider)
                .map_err(|_| LoginError::UnknownProvider {
                    known: self.providers.names().join(", "),
                })?;

        let started = Instant::now();
        let tokens = provider.exchange_code(&req.code, login).await;
        record_phase("exchange", started);
        let tokens = tokens?;

        let started = Instant::now();
        let identity = provider.fetch_identity(&tokens, login).await;
        record_phase("identity", started);
        let identity = identity?;

        let sealed = self
            .tokens
            .seal_for_login(&login.provider, &identity.subject, &tokens)
            .map_err(LoginError::Vault)?;
        let auto_create = BindPolicy {
            create_user: true,
            ..BindPolicy::default()
        };
        let policy = self.policies.get(&*login.provider).unwrap_or(&auto_create);
        let started = Instant::now();
        let bound = self
            .store
            .bind_login(&identity, policy, sealed.as_ref(), actor, now_micros())
            .await;
        record_phase("store", started);
        let return_to = login.return_to.as_deref().map(str::to_string);
        match bound? {
            BindResult::Bound {
                outcome, binding, ..
            } => Ok(CompletedLogin {
                outcome,
                binding: Some(binding),
                identity,
                return_to,
                link_ticket: None,
            }),
            BindResult::LinkRequired => {
                let ticket = StateToken::generate()?;
                let ttl = time::Duration::try_from(self.settings.link_ticket_ttl)
                    .unwrap_or(time::Duration::minutes(15));
                let keep_tokens = sealed.is_some().then_some(tokens);
                self.tickets
                    .put(
                        ticket,
                        LinkTicket {
                            identity: identity.clone(),
                            tokens: keep_tokens,
                            return_to: return_to.clone(),
                            expires_at: OffsetDateTime::now_utc() + ttl,
                        },
                    )
                    .await?;
                Ok(CompletedLogin {
                    outcome: Outcome::LinkRequired,
                    binding: None,
                    identity,
                    return_to,
                    link_ticket: Some(ticket),
                })
            }
        }
    }

    /// Finishes a `link_required` login: binds the ticket's identity to the
    /// app's user, creating the user row if authbroker does not know it.
    pub async fn link(
        &self,
        req: LinkIdentity,
        actor: Option<&str>,
    ) -> Result<LinkedIdentity, LoginError> {
        if req.link_ticket.is_empty() {
            return Err(LoginError::MissingField {
                field: "link_ticket",
            });
        }
        let ticket_id = StateToken::parse(&req.link_ticket).ok_or(LoginError::InvalidField {
            field: "link_ticket",
            problem: "is not a ticket issued by CompleteLogin (43 base64url characters)".into(),
        })?;
        check_user_id(&req.user_id)?;
        let ticket = self
            .tickets
            .take(&ticket_id, OffsetDateTime::now_utc())
            .await
            .map_err(LoginError::from_ticket)?;
        let identity = ticket.identity;
        let sealed = match &ticket.tokens {
            Some(tokens) => self
                .tokens
                .seal_for_login(&identity.provider, &identity.subject, tokens)
                .map_err(LoginError::Vault)?,
            None => None,
        };
        let binding = self
            .store
            .link_identity(
                &req.user_id,
                &identity,
                sealed.as_ref(),
                actor,
                now_micros(),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(Conflict::IdentityLinkedElsewhere) => {
                    LoginError::IdentityLinkedElsewhere
                }
                StoreError::Conflict(Conflict::ProviderAlreadyLinked) => {
                    LoginError::ProviderAlreadyLinked
                }
                other => LoginError::Store(other),
            })?;
        Ok(LinkedIdentity {
            binding,
            identity,
            return_to: ticket.return_to,
        })
    }
}

/// An app's user id: any opaque string a person could not mistake for
/// something else — no control characters, no surrounding spaces.
pub fn check_user_id(user_id: &str) -> Result<(), LoginError> {
    if user_id.is_empty() {
        return Err(LoginError::MissingField { field: "user_id" });
    }
    check_len("user_id", user_id, limits::USER_ID)?;
    if user_id.chars().any(char::is_control) || user_id.trim() != user_id {
        return Err(LoginError::InvalidField {
            field: "user_id",
            problem: "must not contain control characters or surrounding spaces".into(),
        });
    }
    Ok(())
}
