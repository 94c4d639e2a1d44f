//! Typed settings: a TOML file, then `AUTHBROKER__SECTION__KEY` environment
//! overrides (figment). `validate` reports every problem at once.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

mod token_auth;
mod vault;
pub use token_auth::{KeyAlg, TokenAuth};
pub use vault::{KeyMaterial, VAULT_KEY_LEN, VaultKeyConfig, VaultSettings};

/// Root of the configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub state: StateSettings,
    pub login: LoginSettings,
    pub auth: AuthSettings,
    pub http: HttpSettings,
    pub sandbox: SandboxSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub tracing: TracingSettings,
    pub vault: VaultSettings,
    pub providers: BTreeMap<String, ProviderConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// How long in-flight calls may take to finish after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// TLS on the gRPC listener; absent = plaintext.
    pub tls: Option<TlsSettings>,
    /// Open connections at once; a connection past this is closed as soon
    /// as it is accepted.
    pub max_connections: usize,
    /// HTTP/2 streams (calls, `Health/Watch` included) open at once on one
    /// connection; a client waits for a free one.
    pub max_concurrent_streams: u32,
    /// LoginService and AdminService calls in progress at once over all
    /// connections; one more is refused at once with `SERVER_OVERLOADED`.
    pub max_concurrent_calls: usize,
    /// A LoginService or AdminService call still running after this ends
    /// with `REQUEST_TIMEOUT`. At least 4 × `http.timeout`, what a
    /// CompleteLogin's provider calls may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP/2 PING sent on a connection this often ...
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// ... and the connection closed when its answer takes longer than this.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A connection this old is asked to go away (HTTP/2 GOAWAY), so that
    /// clients spread over new replicas; its calls get `request_timeout` to
    /// finish, then it is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Largest HTTP/2 header block a call may send, in bytes.
    pub max_header_list_size: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            shutdown_grace: Duration::from_secs(10),
            tls: None,
            max_connections: 10_000,
            max_concurrent_streams: 200,
            max_concurrent_calls: 1_000,
            request_timeout: Duration::from_secs(90),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(3600),
            max_header_list_size: 16 * 1024,
        }
    }
}

/// `[server.tls]`: the listener's certificate and, for mTLS, the CA its
/// clients' certificates must chain to. The files are re-read when they
/// change, without a restart.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM: the server's certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: CA certificates; when set, every client must present a
    /// certificate issued by one of them (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How `authbroker healthcheck` connects.
    #[serde(default)]
    pub healthcheck: HealthcheckTls,
}

/// `[server.tls.healthcheck]`: what `authbroker healthcheck` trusts and shows.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthcheckTls {
    /// PEM: the CA that issued `cert_file`; default: the certificates in
    /// `cert_file` themselves (a self-signed certificate, or a chain that
    /// includes its issuer).
    pub ca_file: Option<PathBuf>,
    /// The name to verify the server's certificate for; default: the first
    /// DNS name (else IP address) in `cert_file`.
    pub server_name: Option<String>,
    /// PEM client certificate and key, needed when `client_ca_file` is set.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://PATH`, `sqlite::memory:` or `postgres://user@host/db`.
    pub url: String,
    /// Postgres connection pool size.
    pub pool_size: usize,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: "sqlite://authbroker.db".into(),
            pool_size: 16,
        }
    }
}

/// Where pending logins and link tickets live between the calls.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    pub backend: StateBackend,
    /// `redis://…` for `redis` (required); `postgres://…` for `postgres`
    /// (optional: `database.url` when unset).
    pub url: Option<String>,
    /// Prefix of every Redis key, so deployments can share one server.
    pub key_prefix: String,
    /// Connections in the `postgres` backend's own pool.
    pub pool_size: usize,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            backend: StateBackend::Memory,
            url: None,
            key_prefix: "authbroker:".into(),
            pool_size: 16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// In this process: fastest, but one instance only and lost on restart.
    Memory,
    /// A table on a Postgres server that every replica reaches.
    Postgres,
    /// Keys on a Redis server that every replica reaches.
    Redis,
}

impl StateBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            StateBackend::Memory => "memory",
            StateBackend::Postgres => "postgres",
            StateBackend::Redis => "redis",
        }
    }
}

impl Settings {
    /// The URL the state backend connects to: `state.url`, or for
    /// `postgres` the database's own URL. `None` for `memory`, or when
    /// nothing usable is configured (`validate` says so).
    pub fn state_url(&self) -> Option<&str> {
        match self.state.backend {
            StateBackend::Memory => None,
            StateBackend::Redis => self.state.url.as_deref(),
            StateBackend::Postgres => Some(
                self.state
                    .url
                    .as_deref()
                    .unwrap_or(self.database.url.as_str()),
            ),
        }
    }

    /// How long a CompleteLogin may hold its state before a retry may take
    /// over: enough for every provider call it makes (token, user info,
    /// emails, keys) to time out, and for the store to answer.
    pub fn attempt_lease(&self) -> Duration {
        self.http.timeout * 4 + Duration::from_secs(30)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginSettings {
    /// How long a state from BeginLogin stays valid.
    #[serde(with = "humantime_serde")]
    pub state_ttl: Duration,
    /// Upper bound on logins pending at once (begun, not yet completed,
    /// cancelled or expired), and likewise on link tickets.
    pub max_pending: u64,
    /// How long after a CompleteLogin failed with a retryable reason the
    /// same state and code may be retried.
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
    /// Origins (`scheme://host[:port]`) an absolute `return_to` may point at.
    pub return_to_origins: Vec<String>,
    /// What a first login of an unbound identity does; per provider too.
    pub policy: Policy,
    /// How long a `link_ticket` from `OUTCOME_LINK_REQUIRED` stays valid.
    #[serde(with = "humantime_serde")]
    pub link_ticket_ttl: Duration,
    /// Bind a first login to the user of an identity with the same union id
    /// at a provider of the same `union_group` (QQ/WeChat apps of one
    /// developer account). Per provider too.
    pub link_by_union_id: bool,
    /// Bind a first login to the user of an identity with the same
    /// *verified* email. Off by default: see the README on takeover risk.
    /// Per provider too.
    pub link_by_verified_email: bool,
}

impl Default for LoginSettings {
    fn default() -> Self {
        LoginSettings {
            state_ttl: Duration::from_secs(600),
            max_pending: 1_000_000,
            retry_window: Duration::from_secs(300),
            return_to_origins: Vec::new(),
            policy: Policy::AutoCreate,
            link_ticket_ttl: Duration::from_secs(900),
            link_by_union_id: false,
            link_by_verified_email: false,
        }
    }
}

/// Binding policy for an identity seen for the first time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Create a user and bind the identity to it.
    AutoCreate,
    /// Persist nothing; return `OUTCOME_LINK_REQUIRED` and a `link_ticket`
    /// the app redeems with `LinkIdentity` once its user is signed in.
    LinkRequired,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::AutoCreate => "auto_create",
            Policy::LinkRequired => "link_required",
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub api_keys: Vec<ApiKeyConfig>,
    /// `serve` refuses to start without API keys unless this is set.
    pub allow_unauthenticated: bool,
    /// Open mode (the above, without keys) on an address other than
    /// loopback makes every caller on the network an admin; `serve` does
    /// that only when this is set too.
    pub allow_unauthenticated_remote: bool,
    /// With mTLS (`server.tls.client_ca_file`): client certificates that
    /// stand in for an API key.
    pub client_certs: Vec<ClientCertConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Shown in audit events as the actor.
    pub name: String,
    /// Lower-case hex SHA-256 of the key; the key itself is never stored.
    pub sha256: String,
    pub role: Role,
    /// Optional limit on this key's calls, e.g. `"200/s"` (see [`Rate`]).
    #[serde(default)]
    pub rate: Option<String>,
}

/// One `[[auth.client_certs]]`: a client certificate whose subject common
/// name is `subject_cn` authenticates as `name` with `role`, as an API key
/// would. A call that also sends an API key is judged by the key.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    /// The certificate's subject CN, compared exactly.
    pub subject_cn: String,
    /// Shown in audit events as the actor; may equal an API key's name.
    pub name: String,
    pub role: Role,
    /// Optional limit on this certificate's calls, like an API key's.
    #[serde(default)]
    pub rate: Option<String>,
}

/// A call rate: `N/s`, `N/m` or `N/h`, N from 1. Up to N calls may come
/// at once (the burst); after that one more every period / N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub calls: std::num::NonZeroU32,
    pub per: Duration,
}

impl Rate {
    pub fn parse(s: &str) -> Result<Rate, String> {
        let why = || format!("{s:?} is not a rate like \"200/s\", \"30/m\" or \"1000/h\"");
        let (n, unit) = s.trim().split_once('/').ok_or_else(why)?;
        let calls: std::num::NonZeroU32 = n.trim().parse().map_err(|_| why())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(why()),
        };
        if (per / calls.get()).is_zero() {
            return Err(format!("{s:?} is more than one call per nanosecond"));
        }
        Ok(Rate { calls, per })
    }
}

impl Settings {
    /// `[[auth.client_certs]]`: mTLS on, and each CN mapped once.
    fn validate_client_certs(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mtls = (self.server.tls.as_ref()).is_some_and(|t| t.client_ca_file.is_some());
        if !self.auth.client_certs.is_empty() && !mtls {
            problems.push(
                "auth.client_certs: needs server.tls.client_ca_file (mTLS); without it no \
                 client presents a certificate"
                    .into(),
            );
        }
        let mut subjects = std::collections::BTreeSet::new();
        for (i, cert) in self.auth.client_certs.iter().enumerate() {
            let at = format!("auth.client_certs[{i}]");
            if cert.subject_cn.trim().is_empty() {
                problems.push(format!("{at}.subject_cn: must not be empty"));
            } else if !subjects.insert(cert.subject_cn.as_str()) {
                problems.push(format!(
                    "{at}.subject_cn: {:?} is mapped twice",
                    cert.subject_cn
                ));
            }
            if cert.name.trim().is_empty() {
                problems.push(format!("{at}.name: must not be empty"));
            }
            if let Some(Err(why)) = cert.rate.as_deref().map(Rate::parse) {
                problems.push(format!("{at}.rate: {why}"));
            }
        }
        problems
    }

    /// `[server]`'s limits. Whether `[server.tls]`'s files make a working
    /// TLS setup is `check`'s to judge.
    fn validate_listener(&self) -> Vec<String> {
        let server = &self.server;
        let mut problems = Vec::new();
        for (key, value) in [
            ("max_connections", server.max_connections),
            (
                "max_concurrent_streams",
                server.max_concurrent_streams as usize,
            ),
            ("max_concurrent_calls", server.max_concurrent_calls),
        ] {
            if value == 0 {
                problems.push(format!("server.{key}: must be at least 1"));
            }
        }
        for (key, value) in [
            ("request_timeout", server.request_timeout),
            ("keepalive_interval", server.keepalive_interval),
            ("keepalive_timeout", server.keepalive_timeout),
            ("max_connection_age", server.max_connection_age),
        ] {
            if value.is_zero() {
                problems.push(format!("server.{key}: must be greater than zero"));
            }
        }
        let longest_login = self.http.timeout * 4;
        if !server.request_timeout.is_zero() && server.request_timeout < longest_login {
            problems.push(format!(
                "server.request_timeout: must be at least 4 × http.timeout ({}), what a \
                 CompleteLogin's provider calls may take; a login cut short cannot be retried",
                humantime_serde::re::humantime::format_duration(longest_login)
            ));
        }
        if server.max_header_list_size < 1024 {
            problems.push("server.max_header_list_size: must be at least 1024 (bytes)".into());
        }
        problems
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May call LoginService.
    Login,
    /// May call everything.
    Admin,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Total time for one outbound request, body included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Larger provider answers are refused.
    pub max_response_bytes: usize,
    pub user_agent: String,
    /// PEM file of one or more CA certificates trusted for provider HTTPS
    /// besides the roots below (a provider behind a private CA).
    pub ca_file: Option<PathBuf>,
    /// Trust the operating system's roots instead of the bundled Mozilla
    /// list (webpki-roots). Off by default: the bundled list is the same on
    /// every machine, including images without a CA bundle.
    pub system_roots: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            max_response_bytes: 1024 * 1024,
            user_agent: concat!("authbroker/", env!("CARGO_PKG_VERSION")).into(),
            ca_file: None,
            system_roots: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    /// Where the in-process sandbox provider listens (only when a provider of
    /// kind `sandbox` is configured). Port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// `[metrics]`: Prometheus text on a listener of its own, so that it can
/// stay off the network the gRPC port is on.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Where `/metrics` is served; absent, nothing is recorded or served.
    pub listen: Option<SocketAddr>,
}

/// `[tracing]`: spans exported over OTLP (HTTP, protobuf).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// The collector's OTLP/HTTP base URL (`/v1/traces` is added) or the
    /// full traces URL; absent, no span leaves the process.
    pub otlp_endpoint: Option<url::Url>,
    /// `service.name` on every exported span.
    pub service_name: String,
}

impl Default for TracingSettings {
    fn default() -> Self {
        TracingSettings {
            otlp_endpoint: None,
            service_name: "authbroker".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One `[providers.NAME]` table.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// A preset name (`github`, …) or `sandbox`.
    pub kind: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub client_id: String,
    #[serde(default, skip_serializing)]
    pub client_secret: Option<SecretString>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Exact redirect URIs BeginLogin accepts; the first is the default.
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// Scopes every login asks for; default: the preset's.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Extra scopes a BeginLogin call may add.
    #[serde(default)]
    pub allowed_scopes: Vec<String>,
    /// Overrides of the preset's URLs (`authorize_url`, `token_url`, …).
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// OIDC: the issuer URL; the same as `endpoints.issuer`, where it is
    /// also accepted.
    #[serde(default)]
    pub issuer: Option<String>,
    /// How the client authenticates to the token and revocation endpoints;
    /// default: the preset's, or for OIDC the first of Basic and post that
    /// discovery lists.
    #[serde(default)]
    pub token_auth: Option<TokenAuth>,
    /// `token_auth = "private_key_jwt"`: the client's PEM private key ...
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// ... its algorithm (`RS256` or `ES256`) ...
    #[serde(default)]
    pub private_key_alg: KeyAlg,
    /// ... and the `kid` the provider knows it by.
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// A provider that signs its answers (Alipay): its RSA public key, PEM
    /// or the bare base64 its console shows, inline (or from the
    /// environment, `AUTHBROKER__PROVIDERS__NAME__PROVIDER_PUBLIC_KEY`) ...
    #[serde(default)]
    pub provider_public_key: Option<String>,
    /// ... or from a file.
    #[serde(default)]
    pub provider_public_key_file: Option<PathBuf>,
    /// Fixed authorize parameters added to every login (`access_type`,
    /// `prompt` …); the login's own ones (state, client_id …) are refused.
    #[serde(default)]
    pub authorize_params: BTreeMap<String, String>,
    /// Ask for and report the provider's cross-app id (QQ `unionid`).
    #[serde(default)]
    pub union_id: bool,
    /// Settings a preset declares in its `[options]`, each with a default
    /// (microsoft's `tenant`, apple's `team_id`; docs/providers.md).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// OIDC: also call the userinfo endpoint and merge its claims.
    #[serde(default)]
    pub fetch_userinfo: bool,
    /// For `kind = "oauth2"`: the whole provider spec, in the schema of the
    /// preset files under `providers/`.
    #[serde(default)]
    pub spec: Option<toml::Table>,
    /// Overrides `login.policy` for this provider.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Overrides `login.link_by_union_id` for this provider.
    #[serde(default)]
    pub link_by_union_id: Option<bool>,
    /// Overrides `login.link_by_verified_email` for this provider.
    #[serde(default)]
    pub link_by_verified_email: Option<bool>,
    /// Providers with the same group share union ids (one developer
    /// account's QQ and WeChat apps).
    #[serde(default)]
    pub union_group: Option<String>,
    /// Keep the provider's tokens (encrypted) for `GetProviderToken`.
    #[serde(default)]
    pub store_tokens: bool,
    /// `serve` runs a `kind = "sandbox"` provider, which signs in anyone
    /// who types a name, with a verified email, only when this is set.
    #[serde(default)]
    pub allow_sandbox: bool,
    /// `serve` accepts `http://` URLs on hosts other than loopback (issuer
    /// and endpoints, configured or from OIDC discovery), which carry the
    /// client secret and tokens in clear, only when this is set.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

fn yes() -> bool {
    true
}

impl Default for ProviderConfig {
    /// An enabled provider of no kind: set at least `kind`, the client
    /// credentials and `redirect_uris`.
    fn default() -> Self {
        ProviderConfig {
            kind: String::new(),
            enabled: true,
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            redirect_uris: Vec::new(),
            scopes: None,
            allowed_scopes: Vec::new(),
            endpoints: BTreeMap::new(),
            issuer: None,
            token_auth: None,
            private_key_file: None,
            private_key_alg: KeyAlg::default(),
            private_key_id: None,
            provider_public_key: None,
            provider_public_key_file: None,
            authorize_params: BTreeMap::new(),
            union_id: false,
            options: BTreeMap::new(),
            fetch_userinfo: false,
            spec: None,
            policy: None,
            link_by_union_id: None,
            link_by_verified_email: None,
            union_group: None,
            store_tokens: false,
            allow_sandbox: false,
            allow_insecure_http: false,
        }
    }
}

impl Settings {
    fn validate_state(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let state = &self.state;
        match state.backend {
            StateBackend::Memory => {
                if state.url.is_some() {
                    problems.push(
                        "state.url: the memory backend takes no url (set state.backend = \
                         \"postgres\" or \"redis\" to share state between replicas)"
                            .into(),
                    );
                }
            }
            StateBackend::Redis => match state.url.as_deref() {
                None => problems.push(
                    "state.url: the redis backend needs a url, e.g. redis://127.0.0.1:6379/0"
                        .into(),
                ),
                Some(url) if url.starts_with("rediss://") => problems.push(
                    "state.url: rediss:// (TLS) is not supported yet; use redis:// on a \
                     trusted network"
                        .into(),
                ),
                Some(url) if !url.starts_with("redis://") => problems.push(format!(
                    "state.url: expected redis://HOST[:PORT][/DB], got {:?}",
                    redact_url(url)
                )),
                Some(_) => {}
            },
            StateBackend::Postgres => match self.state_url() {
                // Its parameters are `check`'s to judge.
                Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                }
                Some(url) => problems.push(format!(
                    "state.url: the postgres backend needs a postgres:// url (state.url, or \
                     database.url when unset), got {:?}",
                    redact_url(url)
                )),
                None => problems.push("state.url: the postgres backend needs a url".into()),
            },
        }
        if state.backend == StateBackend::Redis && state.key_prefix.is_empty() {
            problems.push("state.key_prefix: must not be empty".into());
        }
        if state.pool_size == 0 {
            problems.push("state.pool_size: must be at least 1".into());
        }
        problems
    }
}

/// Which command the settings are for; some rules differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Dev,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read configuration: {0}")]
pub struct LoadError(#[from] Box<figment::Error>);

impl Settings {
    /// Defaults (plus, for `dev`, the sandbox and a local SQLite file), then
    /// the file if given, then the environment. A `--config` file that does
    /// not exist is an error; no file at all is fine.
    pub fn load(file: Option<&std::path::Path>, mode: Mode) -> Result<Settings, LoadError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if mode == Mode::Dev {
            fig = fig.merge(Serialized::defaults(dev_defaults()));
        }
        if let Some(path) = file {
            if !path.exists() {
                return Err(LoadError(Box::new(figment::Error::from(format!(
                    "config file {} does not exist",
                    path.display()
                )))));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        let mut settings =
            Self::from_figment(fig.merge(Env::prefixed("AUTHBROKER__").split("__")))?;
        if mode == Mode::Dev {
            // dev implies the opt-ins serve asks for; the one checked after
            // start (OIDC discovery's endpoints) reads it from here.
            for p in settings.providers.values_mut() {
                p.allow_insecure_http = true;
            }
        }
        Ok(settings)
    }

    /// For tests and `dev`: start from given settings, then apply the environment.
    pub fn from_figment(fig: Figment) -> Result<Settings, LoadError> {
        fig.extract().map_err(|e| LoadError(Box::new(e)))
    }

    /// Every problem config can judge alone, at once. What needs another
    /// module (TLS files, Postgres URL parameters, provider URLs in clear)
    /// is added by `check::settings`; provider specs are checked by
    /// `provider::Registry::build`, which `check-config` also runs.
    pub fn validate(&self, mode: Mode) -> Vec<String> {
        let mut problems = Vec::new();
        let db = &self.database.url;
        if !(db.starts_with("postgres://")
            || db.starts_with("postgresql://")
            || db == "sqlite::memory:"
            || db.strip_prefix("sqlite://").is_some_and(|p| !p.is_empty()))
        {
            problems.push(format!(
                "database.url: expected postgres://…, sqlite://PATH or sqlite::memory:, got {:?}",
                redact_url(db)
            ));
        }
        if self.database.pool_size == 0 {
            problems.push("database.pool_size: must be at least 1".into());
        }
        if self.login.state_ttl.is_zero() {
            problems.push("login.state_ttl: must be greater than zero".into());
        }
        if self.login.max_pending == 0 {
            problems.push("login.max_pending: must be at least 1".into());
        }
        if self.login.retry_window.is_zero() {
            problems.push("login.retry_window: must be greater than zero".into());
        }
        problems.extend(self.validate_state());
        for origin in &self.login.return_to_origins {
            if let Err(why) = parse_origin(origin) {
                problems.push(format!("login.return_to_origins: {origin:?} {why}"));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            if key.name.trim().is_empty() {
                problems.push(format!("auth.api_keys[{i}].name: must not be empty"));
            } else if !names.insert(key.name.as_str()) {
                problems.push(format!(
                    "auth.api_keys[{i}].name: {:?} is used twice",
                    key.name
                ));
            }
            if key.sha256.len() != 64 || !key.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(format!(
                    "auth.api_keys[{i}].sha256: must be 64 hex characters (sha256sum of the key)"
                ));
            }
            if let Some(Err(why)) = key.rate.as_deref().map(Rate::parse) {
                problems.push(format!("auth.api_keys[{i}].rate: {why}"));
            }
        }
        problems.extend(self.validate_client_certs());
        problems.extend(self.validate_listener());
        problems.extend(self.validate_observability());
        if mode == Mode::Serve
            && self.auth.api_keys.is_empty()
            && self.auth.client_certs.is_empty()
            && !self.auth.allow_unauthenticated
        {
            problems.push(
                "auth.api_keys: serve needs at least one API key or client certificate \
                 (or set auth.allow_unauthenticated = true explicitly)"
                    .into(),
            );
        }
        if self.http.timeout.is_zero() || self.http.connect_timeout.is_zero() {
            problems.push("http.timeout and http.connect_timeout must be greater than zero".into());
        }
        if self.http.max_response_bytes < 1024 {
            problems.push("http.max_response_bytes: must be at least 1024".into());
        }
        if self.providers.is_empty() {
            problems.push("providers: no provider is configured".into());
        }
        if self.login.link_ticket_ttl.is_zero() {
            problems.push("login.link_ticket_ttl: must be greater than zero".into());
        }
        // With the global switch on, providers without a group simply take
        // no part; asking for it on one provider without a group is a slip.
        for (name, p) in &self.providers {
            if p.link_by_union_id == Some(true) && p.union_group.is_none() {
                problems.push(format!(
                    "providers.{name}.union_group: link_by_union_id needs the provider's union_group"
                ));
            }
        }
        if mode == Mode::Serve {
            problems.extend(self.unsafe_without_opt_in());
        }
        problems.extend(self.vault.validate());
        let stores_tokens: Vec<&str> = self
            .providers
            .iter()
            .filter(|(_, p)| p.store_tokens)
            .map(|(n, _)| n.as_str())
            .collect();
        if !stores_tokens.is_empty() && self.vault.keys.is_empty() {
            problems.push(format!(
                "vault.keys: store_tokens is on for {} but no vault key is configured",
                stores_tokens.join(", ")
            ));
        }
        problems
    }
}

impl Settings {
    fn validate_observability(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(listen) = self.metrics.listen
            && listen == self.server.listen
            && listen.port() != 0
        {
            problems.push(format!(
                "metrics.listen: {listen} is server.listen; /metrics needs a listener of its own"
            ));
        }
        if let Some(url) = &self.tracing.otlp_endpoint
            && !matches!(url.scheme(), "http" | "https")
        {
            problems.push(format!(
                "tracing.otlp_endpoint: must be an http:// or https:// URL (OTLP over HTTP), got {}",
                redact_url(url.as_str())
            ));
        }
        if self.tracing.service_name.trim().is_empty() {
            problems.push("tracing.service_name: must not be empty".into());
        }
        problems
    }

    /// What `serve` runs only when opted into by name (`dev` implies every
    /// opt-in): sandbox providers and open mode on an address other than
    /// loopback. (`http://` provider URLs off loopback are `check`'s.)
    fn unsafe_without_opt_in(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, p) in self.providers.iter().filter(|(_, p)| p.enabled) {
            let at = format!("providers.{name}");
            if p.kind == "sandbox" && !p.allow_sandbox {
                problems.push(format!(
                    "{at}.allow_sandbox: a sandbox provider signs in anyone who types a name, \
                     with a verified email; set {at}.allow_sandbox = true to serve it anyway"
                ));
            }
        }
        let auth = &self.auth;
        // Open mode as `grpc::auth` has it: the switch, and no credentials.
        if auth.allow_unauthenticated
            && auth.api_keys.is_empty()
            && auth.client_certs.is_empty()
            && !auth.allow_unauthenticated_remote
            && !self.server.listen.ip().is_loopback()
        {
            problems.push(format!(
                "auth.allow_unauthenticated_remote: open mode (no API keys or client \
                 certificates) on {}, which is not loopback, makes every caller on the network \
                 an admin; add API keys, listen on loopback, or set \
                 auth.allow_unauthenticated_remote = true",
                self.server.listen
            ));
        }
        problems
    }
}

impl ProviderConfig {
    /// Every URL this table sets, with its key: the issuer and endpoint
    /// overrides, and for `kind = "oauth2"` the spec's endpoints. (The
    /// presets' own URLs are all https; a test in `provider::spec` checks.)
    pub fn configured_urls(&self) -> Vec<(String, &str)> {
        let mut urls: Vec<(String, &str)> = self
            .endpoints
            .iter()
            .map(|(key, url)| (format!("endpoints.{key}"), url.as_str()))
            .collect();
        let spec_endpoints = self.spec.as_ref().and_then(|s| s.get("endpoints"));
        if let Some(toml::Value::Table(table)) = spec_endpoints {
            for (key, url) in table {
                if let Some(url) = url.as_str()
                    && !self.endpoints.contains_key(key)
                {
                    urls.push((format!("spec.endpoints.{key}"), url));
                }
            }
        }
        urls
    }
}

/// What `authbroker dev` adds under the file and environment: an embedded
/// database under `./.authbroker/` and the in-process sandbox provider.
fn dev_defaults() -> Settings {
    let mut s = Settings::default();
    s.database.url = "sqlite://.authbroker/dev.db".into();
    s.providers.insert(
        "sandbox".into(),
        ProviderConfig {
            kind: "sandbox".into(),
            enabled: true,
            client_id: "sandbox".into(),
            client_secret: None,
            client_secret_file: None,
            redirect_uris: vec!["http://127.0.0.1:8000/callback".into()],
            scopes: None,
            allowed_scopes: Vec::new(),
            endpoints: BTreeMap::new(),
            issuer: None,
            token_auth: None,
            private_key_file: None,
            private_key_alg: KeyAlg::default(),
            private_key_id: None,
            provider_public_key: None,
            provider_public_key_file: None,
            authorize_params: BTreeMap::new(),
            union_id: false,
            options: BTreeMap::new(),
            fetch_userinfo: false,
            spec: None,
            policy: None,
            link_by_union_id: None,
            link_by_verified_email: None,
            union_group: None,
            store_tokens: false,
            allow_sandbox: true,
            allow_insecure_http: false,
        },
    );
    s
}

/// Checks that `s` is exactly an origin: `scheme://host[:port]`, nothing else.
pub fn parse_origin(s: &str) -> Result<url::Origin, &'static str> {
    let url = url::Url::parse(s).map_err(|_| "is not a URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be http or https");
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err("must be an origin only (scheme://host[:port]), without path or query");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials");
    }
    Ok(url.origin())
}

/// Database URLs may carry a password; keep it out of messages.
pub fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("REDACTED"));
            u.to_string()
        }
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn from_toml(s: &str) -> Settings {
        Settings::from_figment(
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(s)),
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_durations() {
        let s = from_toml(
            r#"
            [login]
            state_ttl = "2m 30s"
            [providers.gh]
            kind = "github"
            client_id = "x"
            client_secret = "hunter2"
            redirect_uris = ["https://app.example/cb"]
            "#,
        );
        assert_eq!(s.login.state_ttl, Duration::from_secs(150));
        assert_eq!(s.login.max_pending, 1_000_000);
        assert_eq!(s.server.listen.port(), 50051);
        let p = &s.providers["gh"];
        assert_eq!(p.client_secret.as_ref().unwrap().expose_secret(), "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let r = Settings::from_figment(
            Figment::from(Serialized::defaults(Settings::default()))
                .merge(Toml::string("[login]\nstate_tll = \"1m\"")),
        );
        assert!(r.unwrap_err().to_string().contains("state_tll"));
    }

    #[test]
    fn validate_lists_every_problem() {
        let mut s = from_toml(
            r#"
            [database]
            url = "mysql://x"
            [login]
            return_to_origins = ["https://ok.example", "https://bad.example/path", "ftp://x"]
            [[auth.api_keys]]
            name = "web"
            sha256 = "nothex"
            role = "login"
            "#,
        );
        s.login.max_pending = 0;
        let problems = s.validate(Mode::Serve);
        assert!(problems.iter().any(|p| p.starts_with("database.url")));
        assert!(problems.iter().any(|p| p.contains("bad.example/path")));
        assert!(problems.iter().any(|p| p.contains("ftp://x")));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("auth.api_keys[0].sha256"))
        );
        assert!(problems.iter().any(|p| p.starts_with("login.max_pending")));
        assert!(problems.iter().any(|p| p.starts_with("providers")));
        assert_eq!(problems.len(), 6, "{problems:#?}");
    }

    #[test]
    fn the_state_section_is_validated() {
        let problems_with = |toml: &str| -> Vec<String> {
            from_toml(toml)
                .validate(Mode::Dev)
                .into_iter()
                .filter(|p| p.starts_with("state.") || p.starts_with("login.retry"))
                .collect()
        };
        // The default is memory, with nothing else to say.
        let s = from_toml("");
        assert_eq!(s.state.backend, StateBackend::Memory);
        assert_eq!(s.state_url(), None);
        assert!(problems_with("").is_empty());

        assert_eq!(
            problems_with("[state]\nbackend = \"redis\"")[0],
            "state.url: the redis backend needs a url, e.g. redis://127.0.0.1:6379/0"
        );
        assert!(
            problems_with("[state]\nbackend = \"redis\"\nurl = \"http://x\"")[0]
                .contains("expected redis://")
        );
        assert!(
            problems_with("[state]\nbackend = \"redis\"\nurl = \"rediss://x\"")[0]
                .contains("not supported")
        );
        assert!(
            problems_with(
                "[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1/0\"\nkey_prefix = \"\""
            )[0]
            .starts_with("state.key_prefix")
        );
        assert!(
            problems_with("[state]\nbackend = \"redis\"\nurl = \"redis://h:6379/2\"").is_empty()
        );

        // postgres falls back to the database's URL, which must be postgres.
        let problems = problems_with("[state]\nbackend = \"postgres\"");
        assert!(
            problems[0].contains("needs a postgres:// url"),
            "{problems:?}"
        );
        let s = from_toml(
            "[database]\nurl = \"postgres://u:secret@db/app\"\n[state]\nbackend = \"postgres\"",
        );
        assert_eq!(s.state_url(), Some("postgres://u:secret@db/app"));
        assert!(
            s.validate(Mode::Dev)
                .iter()
                .all(|p| !p.starts_with("state."))
        );
        let problems =
            problems_with("[state]\nbackend = \"postgres\"\nurl = \"mysql://u:secret@db/x\"");
        assert!(!problems[0].contains("secret"), "passwords are redacted");

        assert!(problems_with("[state]\nurl = \"redis://x\"")[0].contains("takes no url"));
        assert!(problems_with("[state]\npool_size = 0")[0].starts_with("state.pool_size"));
        assert!(
            problems_with("[login]\nretry_window = \"0s\"")[0].starts_with("login.retry_window")
        );
        let unknown = Settings::from_figment(
            Figment::from(Serialized::defaults(Settings::default()))
                .merge(Toml::string("[state]\nbackend = \"etcd\"")),
        );
        assert!(unknown.unwrap_err().to_string().contains("etcd"));
    }

    #[test]
    fn serve_needs_keys_unless_explicitly_open() {
        let mut s = Settings::default();
        assert!(
            s.validate(Mode::Serve)
                .iter()
                .any(|p| p.starts_with("auth.api_keys"))
        );
        assert!(
            !s.validate(Mode::Dev)
                .iter()
                .any(|p| p.starts_with("auth.api_keys"))
        );
        s.auth.allow_unauthenticated = true;
        assert!(
            !s.validate(Mode::Serve)
                .iter()
                .any(|p| p.starts_with("auth.api_keys"))
        );
    }

    #[test]
    fn dev_implies_the_opt_ins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.toml");
        std::fs::write(
            &path,
            "[providers.corp]\nkind = \"oidc\"\nclient_id = \"x\"\nclient_secret = \"y\"\n\
             redirect_uris = [\"http://127.0.0.1:8000/cb\"]\n\
             [providers.corp.endpoints]\nissuer = \"http://keycloak:8080/realms/dev\"",
        )
        .unwrap();
        let dev = Settings::load(Some(&path), Mode::Dev).unwrap();
        assert!(
            dev.providers["corp"].allow_insecure_http,
            "read by discovery"
        );
        assert!(dev.providers["sandbox"].allow_sandbox);
        let serve = Settings::load(Some(&path), Mode::Serve).unwrap();
        assert!(!serve.providers["corp"].allow_insecure_http);
    }

    #[test]
    fn dev_mode_brings_sandbox_and_sqlite() {
        let s = Settings::load(None, Mode::Dev).unwrap();
        assert_eq!(s.providers["sandbox"].kind, "sandbox");
        assert!(s.database.url.starts_with("sqlite://.authbroker/"));
        assert!(
            s.validate(Mode::Dev).is_empty(),
            "{:?}",
            s.validate(Mode::Dev)
        );
        let s = Settings::load(None, Mode::Serve).unwrap();
        assert!(s.providers.is_empty());
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let e = Settings::load(
            Some(std::path::Path::new("/nonexistent/x.toml")),
            Mode::Serve,
        );
        assert!(e.unwrap_err().to_string().contains("does not exist"));
    }

    /// `validate(Dev)`'s problems under `[server]` and `[auth]`.
    fn listener_problems(toml: &str) -> Vec<String> {
        from_toml(toml)
            .validate(Mode::Dev)
            .into_iter()
            .filter(|p| p.starts_with("server.") || p.starts_with("auth."))
            .collect()
    }

    #[test]
    fn every_listener_limit_is_validated() {
        let s = from_toml("");
        assert_eq!(s.server.max_concurrent_streams, 200);
        assert_eq!(s.server.request_timeout, Duration::from_secs(90));
        assert!(listener_problems("").is_empty());
        let problems = listener_problems(
            r#"
            [server]
            max_connections = 0
            max_concurrent_streams = 0
            max_concurrent_calls = 0
            request_timeout = "0s"
            keepalive_interval = "0s"
            keepalive_timeout = "0s"
            max_connection_age = "0s"
            max_header_list_size = 512
            "#,
        );
        for key in [
            "max_connections",
            "max_concurrent_streams",
            "max_concurrent_calls",
            "request_timeout",
            "keepalive_interval",
            "keepalive_timeout",
            "max_connection_age",
            "max_header_list_size",
        ] {
            let prefix = format!("server.{key}: ");
            assert!(
                problems.iter().any(|p| p.starts_with(&prefix)),
                "{key}: {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 8, "{problems:#?}");

        let problems = listener_problems("[server]\nrequest_timeout = \"59s\"");
        assert_eq!(
            problems,
            [
                "server.request_timeout: must be at least 4 × http.timeout (1m), what a \
              CompleteLogin's provider calls may take; a login cut short cannot be retried"
            ]
        );
        assert!(
            listener_problems("[server]\nrequest_timeout = \"40s\"\n[http]\ntimeout = \"10s\"")
                .is_empty()
        );
    }

    #[test]
    fn rates_are_parsed_and_validated() {
        let rate = Rate::parse("200/s").unwrap();
        assert_eq!((rate.calls.get(), rate.per), (200, Duration::from_secs(1)));
        assert_eq!(
            Rate::parse(" 30 / m ").unwrap().per,
            Duration::from_secs(60)
        );
        assert_eq!(Rate::parse("1000/h").unwrap().calls.get(), 1000);
        for bad in ["0/s", "-1/s", "5/d", "5", "/s", "fast", "4000000000/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        let problems = listener_problems(
            r#"
            [[auth.api_keys]]
            name = "web"
            sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
            role = "login"
            rate = "lots"
            "#,
        );
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].starts_with("auth.api_keys[0].rate: \"lots\" is not a rate"));
    }

    #[test]
    fn client_certs_need_mtls_and_distinct_names() {
        let problems = listener_problems(
            r#"
            [[auth.client_certs]]
            subject_cn = "web-frontend"
            name = "web"
            role = "login"
            [[auth.client_certs]]
            subject_cn = "web-frontend"
            name = " "
            role = "admin"
            rate = "1/x"
            "#,
        );
        assert!(problems[0].starts_with("auth.client_certs: needs server.tls.client_ca_file"));
        assert!(problems[1].starts_with("auth.client_certs[1].subject_cn: \"web-frontend\""));
        assert!(problems[2].starts_with("auth.client_certs[1].name: must not be empty"));
        assert!(problems[3].starts_with("auth.client_certs[1].rate"));
        assert_eq!(problems.len(), 4, "{problems:#?}");

        // A certificate mapping is a credential: serve starts with only those.
        let mut s =
            from_toml("[[auth.client_certs]]\nsubject_cn = \"a\"\nname = \"a\"\nrole = \"login\"");
        assert!(
            !s.validate(Mode::Serve)
                .iter()
                .any(|p| p.starts_with("auth.api_keys"))
        );
        s.auth.client_certs.clear();
        assert!(
            s.validate(Mode::Serve)
                .iter()
                .any(|p| p.starts_with("auth.api_keys"))
        );
    }

    #[test]
    fn redacts_database_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:REDACTED@h/db"
        );
    }
}
