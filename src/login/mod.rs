//! The use cases: begin a login, complete it. No protobuf, no SQL: this layer
//! speaks `Provider`, `StateStore` and the store's `BindingStore` and
//! `AuditLog`. Which user a login binds to is `binding::decide`, which this
//! layer hands to `BindingStore::bind_login` to apply inside the store's
//! transaction (the store never imports `login`).

pub mod binding;

use std::{collections::HashMap, sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use url::Url;

use crate::domain::binding::BindPolicy;
use crate::{
    config::{LoginSettings, Policy, Settings, parse_origin},
    domain::{AuditEvent, AuditKind, Binding, Identity, Outcome, now_micros},
    provider::{
        AuthorizeParams, CallbackParams, Provider, ProviderError, Registry, StoredTokenSet,
        TokenSet, registry::Lookup,
    },
    reason::Reason,
    state::{
        Claimed, Fingerprint, Kind, Pending, PendingLogin, StateError, StateStore, StateToken,
    },
    store::{AuditLog, BindResult, BindingStore, Conflict, LoginKey, LoginRecord, StoreError},
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
    pub const CALLBACK_PARAMS: usize = 32;
}

#[derive(Clone, Debug, Default)]
pub struct BeginLogin {
    pub provider: String,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    pub return_to: String,
    /// Optional `prompt`, `login_hint`, `max_age` for the authorize page.
    pub authorize: AuthorizeParams,
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
    /// The callback's other parameters (`iss`, Apple's `user` …).
    pub callback_params: CallbackParams,
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

/// What a `link_required` login leaves for `LinkIdentity`, in the state
/// store under the ticket (sealed there on shared backends), so any replica
/// can redeem it.
#[derive(Serialize, Deserialize)]
struct LinkTicket {
    identity: Identity,
    /// Kept only when the provider stores tokens.
    tokens: Option<StoredTokenSet>,
    return_to: Option<String>,
}

/// How far a failed CompleteLogin attempt got, kept with its claim so that
/// a retry of the same state and code resumes there rather than repeating
/// a step that must happen once (the code exchange) or may have happened
/// (the commit).
#[derive(Serialize, Deserialize)]
enum Progress {
    /// The code never reached the provider; the retry exchanges it.
    NotExchanged,
    /// The provider issued tokens; the retry fetches the identity.
    Exchanged { tokens: StoredTokenSet },
    /// The retry binds (or finds what an earlier bind committed).
    Identified {
        tokens: StoredTokenSet,
        identity: Identity,
    },
}

/// A failed attempt: the error, and where a retry may resume (`None`: it
/// may not, and the state is finished).
struct Failed {
    error: LoginError,
    resume: Option<Progress>,
}

impl Failed {
    fn fatal(error: impl Into<LoginError>) -> Self {
        Failed {
            error: error.into(),
            resume: None,
        }
    }

    /// Resumable at `progress` if the error is one a retry can get past.
    fn at(error: impl Into<LoginError>, progress: impl FnOnce() -> Progress) -> Self {
        let error = error.into();
        let resume = error.retryable_in_place().then(progress);
        Failed { error, resume }
    }
}

/// The binding policy of every provider, from `[login]` and its per-provider
/// overrides.
pub fn bind_policies(settings: &Settings) -> HashMap<String, BindPolicy> {
    let login = &settings.login;
    let trusts_email = |p: &crate::config::ProviderConfig| {
        p.link_by_verified_email
            .unwrap_or(login.link_by_verified_email)
    };
    // A verified email may only lead to identities whose own email the
    // operator trusts: otherwise one untrusted provider that reports an
    // address as verified takes over the account of its owner.
    let email_trusted: Vec<String> = settings
        .providers
        .iter()
        .filter(|(_, p)| trusts_email(p))
        .map(|(n, _)| n.clone())
        .collect();
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
                verified_email_providers: if trusts_email(p) {
                    email_trusted.clone()
                } else {
                    Vec::new()
                },
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
    #[error("another call with this state and code is still in progress; retry in a moment")]
    LoginInProgress,
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
    pub fn reason(&self) -> Reason {
        match self {
            LoginError::InvalidField { .. } => Reason::InvalidField,
            LoginError::MissingField { .. } => Reason::MissingField,
            LoginError::FieldTooLong { .. } => Reason::FieldTooLong,
            LoginError::UnknownProvider { .. } => Reason::UnknownProvider,
            LoginError::ProviderDisabled => Reason::ProviderDisabled,
            LoginError::RedirectUriNotAllowed => Reason::RedirectUriNotAllowed,
            LoginError::ScopeNotAllowed { .. } => Reason::ScopeNotAllowed,
            LoginError::ReturnToNotAllowed(_) => Reason::ReturnToNotAllowed,
            LoginError::StateUnknown => Reason::StateUnknown,
            LoginError::StateExpired => Reason::StateExpired,
            LoginError::StateAlreadyUsed => Reason::StateAlreadyUsed,
            LoginError::TooManyPendingLogins => Reason::TooManyPendingLogins,
            LoginError::LoginInProgress => Reason::LoginInProgress,
            LoginError::LinkTicketUnknown => Reason::LinkTicketUnknown,
            LoginError::LinkTicketExpired => Reason::LinkTicketExpired,
            LoginError::LinkTicketUsed => Reason::LinkTicketAlreadyUsed,
            LoginError::IdentityLinkedElsewhere => Reason::IdentityLinkedElsewhere,
            LoginError::ProviderAlreadyLinked => Reason::ProviderAlreadyLinked,
            LoginError::Vault(_) => Reason::Internal,
            LoginError::AccessDenied => Reason::AccessDenied,
            LoginError::ProviderAuthorizeError { .. } => Reason::ProviderAuthorizeError,
            LoginError::Provider(p) => provider_reason(p),
            LoginError::StateUnavailable(_) => Reason::StateStoreUnavailable,
            LoginError::Store(StoreError::Unavailable(_)) => Reason::StoreUnavailable,
            LoginError::Store(_) => Reason::Internal,
        }
    }

    /// Failures that a retry of the same call can get past, because the
    /// attempt keeps its claim and records how far it got.
    fn retryable_in_place(&self) -> bool {
        matches!(
            self,
            LoginError::Provider(ProviderError::Unavailable { .. })
                | LoginError::Store(StoreError::Unavailable(_))
                | LoginError::StateUnavailable(_)
                | LoginError::TooManyPendingLogins
        )
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
pub fn provider_reason(e: &ProviderError) -> Reason {
    match e {
        ProviderError::Rejected { .. } => Reason::ProviderRejected,
        ProviderError::Unavailable { .. } => Reason::ProviderUnavailable,
        ProviderError::BadResponse { .. } => Reason::ProviderBadResponse,
        ProviderError::Tls { .. } => Reason::ProviderTlsError,
        ProviderError::InvalidIdToken { .. } => Reason::IdTokenInvalid,
        ProviderError::IssuerMismatch { .. } => Reason::CallbackIssuerMismatch,
    }
}

impl From<StateError> for LoginError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Unknown => LoginError::StateUnknown,
            StateError::Expired => LoginError::StateExpired,
            StateError::AlreadyUsed => LoginError::StateAlreadyUsed,
            StateError::Full { .. } => LoginError::TooManyPendingLogins,
            StateError::InProgress => LoginError::LoginInProgress,
            StateError::Unavailable(e) => LoginError::StateUnavailable(e),
        }
    }
}

pub struct LoginService {
    providers: Registry,
    states: Arc<dyn StateStore>,
    bindings: Arc<dyn BindingStore>,
    audit: Arc<dyn AuditLog>,
    tokens: Arc<TokenService>,
    policies: HashMap<String, BindPolicy>,
    settings: LoginSettings,
    return_to_origins: Vec<url::Origin>,
}

/// Everything `LoginService::new` needs.
pub struct LoginParts {
    pub providers: Registry,
    pub states: Arc<dyn StateStore>,
    pub bindings: Arc<dyn BindingStore>,
    pub audit: Arc<dyn AuditLog>,
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
        LoginService {
            providers: parts.providers,
            states: parts.states,
            bindings: parts.bindings,
            audit: parts.audit,
            tokens: parts.tokens,
            policies: parts.policies,
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

    /// Starts a login for `actor` (the calling API key's name; `None` in
    /// open mode): only the same key can complete it (`StateToken::owned_by`).
    pub async fn begin(
        &self,
        req: BeginLogin,
        actor: Option<&str>,
    ) -> Result<BegunLogin, LoginError> {
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
        if let Some(prompt) = &req.authorize.prompt {
            check_len("prompt", prompt, limits::SCOPE)?;
        }
        if let Some(hint) = &req.authorize.login_hint {
            check_len("login_hint", hint, limits::SCOPE)?;
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
        let authorize_url = provider.authorize_url(&login, &req.authorize).await?;
        let (state, expires_at) = (login.state, login.expires_at);
        self.states
            .put(&state.owned_by(actor), Pending::Login(login))
            .await?;
        Ok(BegunLogin {
            authorize_url,
            state,
            expires_at,
        })
    }

    /// `return_to` is either a path on the app's own origin or an absolute
    /// URL on an allowlisted origin; anything else could be an open redirect.
    fn check_return_to(&self, s: &str) -> Result<Option<String>, LoginError> {
        check_return_to(s, &self.return_to_origins)
    }

    /// Completes a login begun by the same `actor`. Another key's state is
    /// unknown to this one (`StateToken::owned_by`), whatever its role: an
    /// admin key gets no exception, so no key can finish, or learn of,
    /// another key's logins.
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
        if req.callback_params.0.len() > limits::CALLBACK_PARAMS {
            return Err(LoginError::InvalidField {
                field: "callback_params",
                problem: format!("at most {} parameters", limits::CALLBACK_PARAMS),
            });
        }
        for (k, v) in &req.callback_params.0 {
            check_len("callback_params", k, limits::ERROR)?;
            check_len("callback_params", v, limits::CODE)?;
        }

        // The retry of an attempt must present what it presented; anything
        // else with this state is a replay.
        let fingerprint = if req.error.is_empty() {
            Fingerprint::of(&["code", &req.code])
        } else {
            Fingerprint::of(&["error", &req.error])
        };
        let key = state.owned_by(actor);
        let started = Instant::now();
        let claimed = self
            .states
            .claim(Kind::Login, &key, &fingerprint, OffsetDateTime::now_utc())
            .await;
        record_phase("state", started);
        let (login, attempt, progress) = match claimed {
            Ok(Claimed {
                pending: Pending::Login(mut login),
                attempt,
                progress,
            }) => {
                // Shared backends hand back the key it was stored under.
                login.state = state;
                (login, attempt, progress)
            }
            // The kinds are separate namespaces on every backend.
            Ok(Claimed { .. }) => return Err(LoginError::StateUnknown),
            Err(e) => {
                // Which provider a dead state belonged to is no longer known.
                let e = LoginError::from(e);
                self.audit_failure(None, actor, &e).await;
                return Err(e);
            }
        };
        let progress = match progress.as_deref().map(serde_json::from_slice::<Progress>) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                // Only we write it; if we cannot read it, do not guess.
                tracing::error!(error = %e, "a login's recorded progress cannot be read");
                None
            }
        };

        let result = self
            .attempt(&state, &login, &req, actor, attempt, progress)
            .await;
        match result {
            Ok(done) => {
                self.end(Kind::Login, &key, attempt).await;
                crate::metrics::login_completed(&login.provider, done.outcome);
                Ok(done)
            }
            Err(Failed { error, resume }) => {
                match resume.map(|p| serde_json::to_vec(&p)) {
                    Some(Ok(progress)) => {
                        // Best effort: if this fails too, the claim's lease
                        // runs out and a retry then hears "already used".
                        if let Err(e) = self
                            .states
                            .release(Kind::Login, &key, attempt, Some(progress))
                            .await
                        {
                            tracing::warn!(
                                error = %crate::telemetry::cause_chain(&e),
                                "could not record a failed login's progress; it cannot be retried"
                            );
                        }
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "a login's progress cannot be encoded");
                        self.end(Kind::Login, &key, attempt).await;
                    }
                    None => self.end(Kind::Login, &key, attempt).await,
                }
                self.audit_failure(Some(&login.provider), actor, &error)
                    .await;
                Err(error)
            }
        }
    }

    /// Finishes an entry whose attempt is over. Best effort: an entry that
    /// stays claimed is refused to anyone but a retry of the same attempt,
    /// and dropped when its retry window ends.
    async fn end(&self, kind: Kind, token: &StateToken, attempt: u32) {
        if let Err(e) = self.states.finish(kind, token, attempt).await {
            tracing::warn!(
                error = %crate::telemetry::cause_chain(&e),
                kind = kind.as_str(),
                "could not mark a finished login as used"
            );
        }
    }

    /// A failed login is audited with its reason; losing the audit write
    /// must not hide the login's own error.
    async fn audit_failure(&self, provider: Option<&str>, actor: Option<&str>, e: &LoginError) {
        let mut event = AuditEvent::new(AuditKind::LoginFailed);
        event.actor = actor.map(str::to_string);
        event.provider = provider.map(str::to_string);
        event.reason = Some(e.reason().to_string());
        crate::metrics::login_failed(provider, e.reason().as_str());
        if let Err(audit_err) = self.audit.record_audit(&event).await {
            tracing::warn!(
                error = %crate::telemetry::cause_chain(&audit_err),
                "could not record a failed login"
            );
        }
    }

    /// One attempt at a claimed login, from where `progress` says an earlier
    /// attempt stopped.
    async fn attempt(
        &self,
        state: &StateToken,
        login: &PendingLogin,
        req: &CompleteLogin,
        actor: Option<&str>,
        attempt: u32,
        progress: Option<Progress>,
    ) -> Result<CompletedLogin, Failed> {
        let provider = self.providers.get(&login.provider).map_err(|_| {
            Failed::fatal(LoginError::UnknownProvider {
                known: self.providers.names().join(", "),
            })
        })?;
        if !req.error.is_empty() {
            return Err(Failed::fatal(
                if provider.info().denied.contains(&req.error) {
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
                },
            ));
        }

        let (tokens, identity) = match progress {
            // A claim without progress after the first attempt: that attempt
            // died, or lost its lease, with its code exchange in flight. A
            // second exchange would be refused (and may revoke what the
            // first one got), so the login cannot be resumed.
            None if attempt > 1 => return Err(Failed::fatal(LoginError::StateAlreadyUsed)),
            None | Some(Progress::NotExchanged) => {
                let tokens = self.exchange(&**provider, req, login).await?;
                let identity = self.identify(&**provider, &tokens, login, req).await?;
                (tokens, identity)
            }
            Some(Progress::Exchanged { tokens }) => {
                let tokens = TokenSet::from(tokens);
                let identity = self.identify(&**provider, &tokens, login, req).await?;
                (tokens, identity)
            }
            Some(Progress::Identified { tokens, identity }) => (TokenSet::from(tokens), identity),
        };
        let resume = || Progress::Identified {
            tokens: StoredTokenSet::from(&tokens),
            identity: identity.clone(),
        };

        let sealed = self
            .tokens
            .seal_for_login(&login.provider, &identity.subject, &tokens)
            .map_err(|e| Failed::fatal(LoginError::Vault(e)))?;
        let auto_create = BindPolicy {
            create_user: true,
            ..BindPolicy::default()
        };
        let policy = self.policies.get(&*login.provider).unwrap_or(&auto_create);
        let login_id = login_id(state);
        let started = Instant::now();
        let bound = self
            .bindings
            .bind_login(
                &identity,
                policy,
                binding::decide,
                LoginRecord {
                    tokens: sealed.as_ref(),
                    actor,
                    now: now_micros(),
                    login: Some(LoginKey {
                        id: &login_id,
                        retry: attempt > 1,
                    }),
                },
            )
            .await;
        record_phase("store", started);
        let return_to = login.return_to.as_deref().map(str::to_string);
        match bound.map_err(|e| Failed::at(e, resume))? {
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
                let ticket = self
                    .issue_ticket(
                        &identity,
                        sealed.is_some().then_some(&tokens),
                        &return_to,
                        actor,
                    )
                    .await
                    .map_err(|e| Failed::at(e, resume))?;
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

    async fn exchange(
        &self,
        provider: &dyn Provider,
        req: &CompleteLogin,
        login: &PendingLogin,
    ) -> Result<TokenSet, Failed> {
        let started = Instant::now();
        let tokens = provider
            .exchange_code(&req.code, login, &req.callback_params)
            .await;
        record_phase("exchange", started);
        tokens.map_err(|e| {
            if e.code_never_sent() {
                Failed::at(e, || Progress::NotExchanged)
            } else {
                Failed::fatal(e)
            }
        })
    }

    async fn identify(
        &self,
        provider: &dyn Provider,
        tokens: &TokenSet,
        login: &PendingLogin,
        req: &CompleteLogin,
    ) -> Result<Identity, Failed> {
        let started = Instant::now();
        let identity = provider
            .fetch_identity(tokens, login, &req.callback_params)
            .await;
        record_phase("identity", started);
        identity.map_err(|e| {
            Failed::at(e, || Progress::Exchanged {
                tokens: StoredTokenSet::from(tokens),
            })
        })
    }

    /// A ticket that only `owner`, who completed the login, can redeem.
    async fn issue_ticket(
        &self,
        identity: &Identity,
        tokens: Option<&TokenSet>,
        return_to: &Option<String>,
        owner: Option<&str>,
    ) -> Result<StateToken, LoginError> {
        let ticket = StateToken::generate()?;
        let ttl = time::Duration::try_from(self.settings.link_ticket_ttl)
            .unwrap_or(time::Duration::minutes(15));
        let payload = serde_json::to_vec(&LinkTicket {
            identity: identity.clone(),
            tokens: tokens.map(StoredTokenSet::from),
            return_to: return_to.clone(),
        })
        .map_err(|e| {
            LoginError::StateUnavailable(anyhow::Error::new(e).context("encoding a link ticket"))
        })?;
        self.states
            .put(
                &ticket.owned_by(owner),
                Pending::Ticket {
                    expires_at: OffsetDateTime::now_utc() + ttl,
                    payload: Arc::from(payload),
                },
            )
            .await?;
        Ok(ticket)
    }

    /// Finishes a `link_required` login: binds the ticket's identity to the
    /// app's user, creating the user row if authbroker does not know it.
    /// A retry with the same ticket and user id after a retryable failure
    /// redeems it; any other use of a redeemed ticket is refused. Only the
    /// key that completed the login can redeem its ticket; to any other it
    /// is unknown.
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
        let ticket_id = ticket_id.owned_by(actor);
        let claimed = self
            .states
            .claim(
                Kind::Ticket,
                &ticket_id,
                &Fingerprint::of(&["user", &req.user_id]),
                OffsetDateTime::now_utc(),
            )
            .await
            .map_err(LoginError::from_ticket)?;
        let Pending::Ticket { payload, .. } = &claimed.pending else {
            return Err(LoginError::LinkTicketUnknown);
        };
        let result = self.redeem(payload, &req.user_id, actor).await;
        match &result {
            Err(e) if e.retryable_in_place() => {
                // Linking is idempotent for one user, so the retry needs
                // nothing but the claim.
                if let Err(e) = self
                    .states
                    .release(Kind::Ticket, &ticket_id, claimed.attempt, None)
                    .await
                {
                    tracing::warn!(
                        error = %crate::telemetry::cause_chain(&e),
                        "could not release a link ticket for its retry"
                    );
                }
            }
            _ => self.end(Kind::Ticket, &ticket_id, claimed.attempt).await,
        }
        result
    }

    async fn redeem(
        &self,
        payload: &[u8],
        user_id: &str,
        actor: Option<&str>,
    ) -> Result<LinkedIdentity, LoginError> {
        let ticket: LinkTicket = serde_json::from_slice(payload).map_err(|e| {
            LoginError::StateUnavailable(anyhow::Error::new(e).context("reading a link ticket"))
        })?;
        let identity = ticket.identity;
        let tokens = ticket.tokens.map(TokenSet::from);
        let sealed = match &tokens {
            Some(tokens) => self
                .tokens
                .seal_for_login(&identity.provider, &identity.subject, tokens)
                .map_err(LoginError::Vault)?,
            None => None,
        };
        let binding = self
            .bindings
            .link_identity(user_id, &identity, sealed.as_ref(), actor, now_micros())
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

/// `return_to` is either a path on the app's own origin or an absolute URL
/// on one of `origins`; anything else could be an open redirect. Nothing is
/// accepted that a normalising app could turn into another target: no dot
/// segments and no encoded dots, slashes or backslashes in the path, so
/// what is accepted is already its own normal form (`/.//evil.example`
/// would otherwise become `//evil.example`, another host).
pub fn check_return_to(s: &str, origins: &[url::Origin]) -> Result<Option<String>, LoginError> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.chars().any(|c| c.is_control() || c == '\\') {
        return Err(LoginError::ReturnToNotAllowed(
            "must not contain control characters or backslashes",
        ));
    }
    check_return_to_path(s)?;
    if s.starts_with('/') {
        if s.starts_with("//") {
            return Err(LoginError::ReturnToNotAllowed(
                "must not start with // (that is another host)",
            ));
        }
        // Belt and braces: resolving against a base must stay on it, and
        // must not leave a path that is itself another host.
        let base = Url::parse("https://return-to.invalid/")
            .map_err(|_| LoginError::ReturnToNotAllowed("could not be checked"))?;
        return match base.join(s) {
            Ok(u) if u.origin() == base.origin() && !u.path().starts_with("//") => {
                Ok(Some(s.to_string()))
            }
            _ => Err(LoginError::ReturnToNotAllowed(
                "is not a valid relative path",
            )),
        };
    }
    // `https:app.example.com` parses as an absolute URL, but a browser on
    // an https page reads it as the relative path `app.example.com`.
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(LoginError::ReturnToNotAllowed(
            "must be a relative path starting with / or an absolute URL starting with \
             http:// or https://",
        ));
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
    if !origins.contains(&url.origin()) {
        return Err(LoginError::ReturnToNotAllowed(
            "points at an origin not in login.return_to_origins",
        ));
    }
    // `https://app.example.com//evil.example` is on the app's origin, but an
    // app that redirects to its path alone sends the browser to another host.
    if url.path().starts_with("//") {
        return Err(LoginError::ReturnToNotAllowed(
            "must not have a path starting with // (that is another host)",
        ));
    }
    Ok(Some(s.to_string()))
}

/// The path (what comes before `?` or `#`) has no `.` or `..` segment (nor
/// one with `;parameters`, which some servers strip) and no `%2e`, `%2f` or
/// `%5c` in any case.
fn check_return_to_path(s: &str) -> Result<(), LoginError> {
    let path = s.split(['?', '#']).next().unwrap_or_default();
    let dot_segment = path.split('/').any(|segment| {
        let name = segment.split(';').next().unwrap_or_default();
        name == "." || name == ".."
    });
    if dot_segment {
        return Err(LoginError::ReturnToNotAllowed(
            "must not contain . or .. path segments",
        ));
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return Err(LoginError::ReturnToNotAllowed(
            "must not contain encoded dots, slashes or backslashes (%2e, %2f, %5c) in its path",
        ));
    }
    Ok(())
}

/// The id a login's audit events carry (`LoginKey`): a hash of its state,
/// so the database never holds a state, and a retry finds its own commit.
fn login_id(state: &StateToken) -> String {
    let mut h = Sha256::new();
    h.update(b"authbroker/login-id/v1\0");
    h.update(state.as_bytes());
    hex::encode(h.finalize())
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
