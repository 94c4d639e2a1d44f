//! Identity providers. `Provider` is the seam; almost every provider is the
//! one spec-driven OAuth2 engine ([`engine`]) fed a [`spec::ProviderSpec`]
//! from a preset data file under `providers/` ([`presets`]). Code exists
//! only for what data cannot say: OpenID Connect's discovery and ID-token
//! checks ([`oidc`]), and the RSA signatures on a signed gateway's
//! requests and answers ([`signing`], a spec's `[signing]`). Each preset's
//! wire format is described in `docs/providers.md`, one section per preset.
//!
//! Imports run one way: `spec`, `body` and `signing` know nothing else
//! here; `engine` reads specs; `oidc` builds engines; `presets` parses the
//! files into either schema; `registry` builds providers from presets and
//! config.

pub mod body;
pub mod claims;
pub mod client_auth;
pub mod engine;
mod observe;
pub mod oidc;
pub mod preset_options;
pub mod presets;
pub mod registry;
pub mod signed_secret;
pub mod signing;
pub mod spec;
pub mod tenant;

pub use registry::Registry;

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::{
    domain::Identity,
    http::{HttpError, TlsFailure},
    state::PendingLogin,
};

/// What a provider handed back for a code. The raw document is kept because
/// some providers put the user id in it (AcWing, WeChat `openid`).
#[derive(Clone)]
pub struct TokenSet {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub token_type: Option<String>,
    pub expires_in: Option<Duration>,
    /// Scopes the provider says it granted (or, if it does not say, those requested).
    pub scopes: Vec<String>,
    pub(crate) raw: serde_json::Value,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// A `TokenSet` as the state store keeps it between a failed attempt and its
/// retry, or in a link ticket. The shared backends seal it (`state::seal`);
/// no `Debug`, so it cannot reach a log line.
#[derive(Serialize, Deserialize)]
pub struct StoredTokenSet {
    access_token: String,
    refresh_token: Option<String>,
    token_type: Option<String>,
    expires_in_secs: Option<u64>,
    scopes: Vec<String>,
    raw: serde_json::Value,
}

impl From<&TokenSet> for StoredTokenSet {
    fn from(t: &TokenSet) -> Self {
        StoredTokenSet {
            access_token: t.access_token.expose_secret().to_string(),
            refresh_token: t
                .refresh_token
                .as_ref()
                .map(|r| r.expose_secret().to_string()),
            token_type: t.token_type.clone(),
            expires_in_secs: t.expires_in.map(|d| d.as_secs()),
            scopes: t.scopes.clone(),
            raw: t.raw.clone(),
        }
    }
}

impl From<StoredTokenSet> for TokenSet {
    fn from(t: StoredTokenSet) -> Self {
        TokenSet {
            access_token: SecretString::from(t.access_token),
            refresh_token: t.refresh_token.map(SecretString::from),
            token_type: t.token_type,
            expires_in: t.expires_in_secs.map(Duration::from_secs),
            scopes: t.scopes,
            raw: t.raw,
        }
    }
}

/// What a BeginLogin may ask of the provider's authorize page, passed on
/// by providers that take it (OIDC Core §3.1.2.1) and dropped by others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizeParams {
    /// `prompt`, e.g. `consent` (needed at most IdPs for a refresh token)
    /// or `select_account`.
    pub prompt: Option<String>,
    pub login_hint: Option<String>,
    /// Seconds since the user last authenticated, at most.
    pub max_age: Option<u32>,
}

impl AuthorizeParams {
    /// Names the `[authorize] request_params` of a spec may list.
    pub const NAMES: &[&str] = &["prompt", "login_hint", "max_age"];

    /// The set ones, by their wire names.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("prompt", self.prompt.clone()),
            ("login_hint", self.login_hint.clone()),
            ("max_age", self.max_age.map(|s| s.to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.prompt.is_none() && self.login_hint.is_none() && self.max_age.is_none()
    }
}

/// The callback's parameters other than `code` and `state`, as the web app
/// received them (query or form post): RFC 9207's `iss`, Apple's first-login
/// `user`, anything a provider may need later. Values are the provider's
/// and may carry personal data: never logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CallbackParams(pub std::collections::BTreeMap<String, String>);

impl fmt::Debug for CallbackParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl CallbackParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// Static facts about a configured provider.
#[derive(Clone, Debug)]
pub struct ProviderInfo {
    /// Configured name (`[providers.NAME]`).
    pub name: Arc<str>,
    /// Preset or kind it was built from.
    pub kind: String,
    pub display_name: String,
    pub redirect_uris: Vec<Arc<str>>,
    /// Scopes every login asks for.
    pub scopes: Arc<[String]>,
    /// Extra scopes a caller may add.
    pub allowed_scopes: Vec<String>,
    pub pkce: bool,
    /// Send an OIDC `nonce` and check it in the ID token.
    pub nonce: bool,
    /// Callback `error` values meaning the user said no.
    pub denied: Vec<String>,
    /// Refresh tokens work once (the answer carries the next one).
    pub refresh_token_single_use: bool,
}

/// Why a provider call failed. Messages never contain tokens, codes, or the
/// provider's free-text descriptions (some echo the code back). `Clone` so a
/// failure shared by coalesced callers (OIDC discovery) reaches each intact.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider said no: bad, expired or reused code, bad client
    /// credentials, revoked token. Retrying the same call will not help.
    #[error("{provider} rejected the {step} request (provider error {code:?})")]
    Rejected {
        provider: String,
        step: String,
        code: String,
    },
    /// Timeout, refused connection, 5xx: worth retrying later.
    #[error("{provider} is unavailable during the {step} request: {cause}")]
    Unavailable {
        provider: String,
        step: String,
        cause: Unavailable,
    },
    /// The provider's HTTPS certificate (or handshake) was refused: a
    /// trust configuration to fix, not an outage to wait out.
    #[error("the TLS handshake with {provider} failed during the {step} request: {failure}")]
    Tls {
        provider: String,
        step: String,
        failure: TlsFailure,
    },
    /// The provider answered something we cannot use.
    #[error("{provider} sent a malformed {step} answer: {what}")]
    BadResponse {
        provider: String,
        step: String,
        what: String,
    },
    /// An OIDC ID token failed verification (signature, issuer, audience,
    /// expiry or nonce): possibly an attack, never to be trusted.
    #[error("{provider} sent an ID token that fails verification: {why}")]
    InvalidIdToken { provider: String, why: String },
    /// RFC 9207: the callback's `iss` is missing where discovery promised
    /// it, or names another issuer (a mix-up attack, or a misrouted
    /// callback). The code is not sent anywhere.
    #[error("the callback's issuer (iss) {why}")]
    IssuerMismatch { provider: String, why: String },
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("timed out")]
    Timeout,
    #[error("connection failed")]
    Connect,
    #[error("HTTP {0}")]
    Status(u16),
    /// The transport error's whole cause chain (it never holds the URL).
    #[error("transport error: {0}")]
    Transport(String),
}

impl ProviderError {
    /// Whether the authorization code certainly never reached the provider:
    /// the exchange failed while discovering where to send it, or could not
    /// connect to the token endpoint. Only then may a retry exchange the
    /// code again: a provider that did see it refuses a second exchange,
    /// and RFC 6749 §4.1.2 lets it revoke every token issued from the code.
    pub fn code_never_sent(&self) -> bool {
        matches!(self, ProviderError::Unavailable { step, cause, .. }
            if step == "discovery" || (step == "token" && matches!(cause, Unavailable::Connect)))
    }

    /// The provider's own error code, when it gave one.
    pub fn provider_code(&self) -> Option<&str> {
        match self {
            ProviderError::Rejected { code, .. } => Some(code),
            _ => None,
        }
    }

    pub(crate) fn from_http(provider: &str, step: &str, e: HttpError) -> Self {
        let provider = provider.to_string();
        let step = step.to_string();
        match e {
            HttpError::Timeout => ProviderError::Unavailable {
                provider,
                step,
                cause: Unavailable::Timeout,
            },
            HttpError::Connect => ProviderError::Unavailable {
                provider,
                step,
                cause: Unavailable::Connect,
            },
            HttpError::Transport(e) => ProviderError::Unavailable {
                provider,
                step,
                cause: Unavailable::Transport(crate::telemetry::cause_chain(&e)),
            },
            HttpError::Tls(failure) => ProviderError::Tls {
                provider,
                step,
                failure,
            },
            HttpError::TooLarge { limit } => ProviderError::BadResponse {
                provider,
                step,
                what: format!("answer larger than {limit} bytes"),
            },
        }
    }
}

/// A login provider. Optional capabilities are separate traits, reached
/// through `refresher()` and `revoker()`, rather than methods that answer
/// "not supported".
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    fn info(&self) -> &ProviderInfo;

    /// Where to send the browser for this pending login. Async because OIDC
    /// providers learn their endpoints from discovery. A string, not a
    /// `Url`: it is only handed on, and parsing it back cost BeginLogin time.
    /// `params` are the caller's optional authorize parameters; a provider
    /// that does not take one leaves it out.
    async fn authorize_url(
        &self,
        login: &PendingLogin,
        params: &AuthorizeParams,
    ) -> Result<String, ProviderError>;

    /// Trades the code from the callback for tokens. `callback` holds the
    /// callback's other parameters (OIDC checks RFC 9207's `iss` first).
    async fn exchange_code(
        &self,
        code: &str,
        login: &PendingLogin,
        callback: &CallbackParams,
    ) -> Result<TokenSet, ProviderError>;

    /// Reads the stable user id and profile with the tokens. `login` carries
    /// what the answers are checked against (OIDC nonce); `callback` what
    /// only the callback says (Apple's first-login `user`).
    async fn fetch_identity(
        &self,
        tokens: &TokenSet,
        login: &PendingLogin,
        callback: &CallbackParams,
    ) -> Result<Identity, ProviderError>;

    fn refresher(&self) -> Option<&dyn Refresh> {
        None
    }

    fn revoker(&self) -> Option<&dyn Revoke> {
        None
    }

    /// Whether revocation can work now: a revoker, and for OIDC a
    /// revocation endpoint that discovery (or config) names. What
    /// ListProviders reports, and what decides whether a token is revoked
    /// or only forgotten.
    async fn can_revoke(&self) -> bool {
        self.revoker().is_some()
    }

    /// What only the network can tell about this provider's configuration
    /// (`check-config --online`): one line per problem, none if it is fine.
    async fn preflight(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Providers with a refresh-token grant.
#[async_trait]
pub trait Refresh: Send + Sync {
    /// New tokens for a refresh token. `scopes` are those granted before,
    /// used when the answer does not list any.
    async fn refresh(
        &self,
        refresh_token: &SecretString,
        scopes: &[String],
    ) -> Result<TokenSet, ProviderError>;
}

/// Providers that can revoke an access token.
#[async_trait]
pub trait Revoke: Send + Sync {
    /// `Ok(true)`: revoked. `Ok(false)`: this provider turned out to have
    /// no revocation (an OIDC issuer whose discovery names no endpoint).
    async fn revoke(&self, access_token: &SecretString) -> Result<bool, ProviderError>;
}
