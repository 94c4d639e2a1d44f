//! Typed settings: a TOML file, then `AUTHBROKER__SECTION__KEY` environment
//! overrides (figment). `validate` reports every problem at once.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

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
    pub vault: crate::vault::VaultSettings,
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
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            shutdown_grace: Duration::from_secs(10),
        }
    }
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

    /// The limits every state backend applies.
    pub fn state_limits(&self) -> crate::state::StateLimits {
        crate::state::StateLimits {
            capacity: self.login.max_pending,
            // Entries outlive their TTL by one more TTL so a late callback
            // is told "expired" rather than "unknown".
            grace: self.login.state_ttl,
            lease: self.attempt_lease(),
            retry_window: self.login.retry_window,
        }
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
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Shown in audit events as the actor.
    pub name: String,
    /// Lower-case hex SHA-256 of the key; the key itself is never stored.
    pub sha256: String,
    pub role: Role,
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
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            max_response_bytes: 1024 * 1024,
            user_agent: concat!("authbroker/", env!("CARGO_PKG_VERSION")).into(),
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
    /// Ask for and report the provider's cross-app id (QQ `unionid`).
    #[serde(default)]
    pub union_id: bool,
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
            union_id: false,
            fetch_userinfo: false,
            spec: None,
            policy: None,
            link_by_union_id: None,
            link_by_verified_email: None,
            union_group: None,
            store_tokens: false,
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
        Self::from_figment(fig.merge(Env::prefixed("AUTHBROKER__").split("__")))
    }

    /// For tests and `dev`: start from given settings, then apply the environment.
    pub fn from_figment(fig: Figment) -> Result<Settings, LoadError> {
        fig.extract().map_err(|e| LoadError(Box::new(e)))
    }

    /// Every structural problem at once. Provider specs are checked by
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
        }
        if mode == Mode::Serve && self.auth.api_keys.is_empty() && !self.auth.allow_unauthenticated
        {
            problems.push(
                "auth.api_keys: serve needs at least one API key \
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
            union_id: false,
            fetch_userinfo: false,
            spec: None,
            policy: None,
            link_by_union_id: None,
            link_by_verified_email: None,
            union_group: None,
            store_tokens: false,
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

    #[test]
    fn redacts_database_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:REDACTED@h/db"
        );
    }
}
