//! The GitHub preset under the [`Emulator`] contract: an adapter in front of
//! the existing [`GithubEmulator`] (tests/support/github.rs), which keeps
//! doing all the GitHub work (Accept-negotiated token answers with errors
//! on HTTP 200, `/user`, `/user/emails`, PKCE, its own shape checks).
//!
//! The adapter is a small HTTP relay on its own port, because the wrapped
//! emulator's request log has no step or status and its token store is
//! private. Relaying lets the adapter log every call in the contract's
//! shape with the status it got, apply faults per [`Step`] with the shared
//! [`Fault`] machinery, and see which access tokens the token endpoint
//! hands out (for [`Emulator::access_token_valid`]). What the relay
//! forwards is what authbroker sent: method, path, query, headers (but
//! `Host` and hop-by-hop ones), body.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use authbroker::config::ProviderConfig;
use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::form_urlencoded;

use super::super::github::{
    AUTHORIZE_PATH, CLIENT_ID, CLIENT_SECRET, EMAILS_PATH, GithubEmail, GithubEmulator, GithubUser,
    TOKEN_PATH, USER_PATH,
};
use super::{
    Capabilities, Core, Emulator, ExpectedIdentity, Fault, SeenRequest, Step, lock, query_of, serve,
};

pub const REDIRECT_URI: &str = "https://app.example.com/oauth/callback";
/// The preset's default scopes, granted to tokens made by `issue_tokens`.
pub const DEFAULT_SCOPES: [&str; 2] = ["read:user", "user:email"];
/// PROVIDERS.md §3.1, from GitHub's troubleshooting docs (decoded). The
/// wrapped emulator's own browser endpoint sends the absolute
/// `https://docs.github.com/…#access-denied` form seen live; both exist.
pub const DENIED_ERROR_URI: &str = "/apps/building-integrations/setting-up-and-registering-oauth-apps/troubleshooting-authorization-request-errors/#access-denied";
pub const DENIED_DESCRIPTION: &str = "The user has denied your application access.";

/// The GitHub emulator behind a relay that speaks the [`Emulator`]
/// contract; both servers stop when this is dropped.
pub struct GithubAdapter {
    /// The relay's `http://127.0.0.1:PORT`: what authbroker is pointed at.
    pub base_url: String,
    github: GithubEmulator,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for GithubAdapter {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl GithubAdapter {
    pub async fn start() -> Self {
        let github = GithubEmulator::start().await;
        // No proxy from the environment, no redirects followed, and no
        // timeout: a hanging upstream is the client's timeout to notice.
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a reqwest client");
        let shared = Arc::new(Shared {
            core: Core::default(),
            upstream: github.base_url.clone(),
            client,
            tokens: Mutex::default(),
            users: Mutex::default(),
        });
        let router = Router::new().fallback(relay).with_state(shared.clone());
        let (base_url, server) = serve(router).await;
        GithubAdapter {
            base_url,
            github,
            shared,
            server,
        }
    }

    /// `{base_url}{path}` (the relay's address).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The wrapped emulator, for GitHub-specific controls (its own request
    /// log with violations, per-endpoint faults, `set_user_denies` …).
    pub fn github(&self) -> &GithubEmulator {
        &self.github
    }

    /// Registers a hand-made user (say, without a verified email) under
    /// `seed`; returns what authbroker must report with the default scopes.
    pub fn add_github_user(&self, seed: &str, user: GithubUser) -> ExpectedIdentity {
        let expected = expected_identity(&user);
        self.github.add_user(user.clone());
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    pub fn user(&self, seed: &str) -> Option<GithubUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// Every token stops working (the user revoked the app).
    pub fn revoke_tokens(&self) {
        self.github.revoke_tokens();
        lock(&self.shared.tokens).clear();
    }

    pub fn expire_codes(&self) {
        self.github.expire_codes();
    }

    fn login(&self, seed: &str) -> Option<String> {
        lock(&self.shared.users).get(seed).map(|u| u.login.clone())
    }
}

/// A deterministic user: numeric id and login from the seed, a third
/// without a display name, a non-primary unverified address listed before
/// the primary verified one (so the choice must be by flags, not order).
pub fn user_from_seed(seed: &str) -> GithubUser {
    let d = Sha256::digest(format!("github\0{seed}").as_bytes());
    let h = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    let clean: String = seed.chars().filter(char::is_ascii_alphanumeric).collect();
    let login = if !clean.is_empty() && clean == seed && seed.len() <= 30 {
        seed.to_owned()
    } else {
        // Logins are alphanumerics and single hyphens; keep seeds apart.
        format!("u{}-{:04x}", &clean[..clean.len().min(30)], h & 0xffff)
    };
    let id = 1_000_000 + h % 150_000_000;
    let mut user = GithubUser::new(id, &login)
        .with_email(GithubEmail::secondary(
            &format!("{login}@old.example.net"),
            false,
        ))
        .with_email(GithubEmail::primary(&format!("{login}@example.com")));
    if h % 3 != 0 {
        user = user.name(&format!("The {login} Octocat"));
    }
    user
}

/// What authbroker reports for `user` with the preset's default scopes: the
/// primary verified address from `/user/emails`, else the public one
/// (never trusted as verified), display name falling back to the login.
pub fn expected_identity(user: &GithubUser) -> ExpectedIdentity {
    let (email, email_verified) = match user.emails.iter().find(|e| e.primary && e.verified) {
        Some(e) => (e.email.clone(), true),
        None => (user.email.clone().unwrap_or_default(), false),
    };
    ExpectedIdentity {
        subject: user.id.to_string(),
        union_id: String::new(),
        username: user.login.clone(),
        display_name: user.name.clone().unwrap_or_else(|| user.login.clone()),
        avatar_url: user
            .avatar_url
            .clone()
            .unwrap_or_else(|| format!("https://avatars.githubusercontent.com/u/{}?v=4", user.id)),
        email,
        email_verified,
    }
}

impl Emulator for GithubAdapter {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "github"
    }

    fn provider_config(&self) -> ProviderConfig {
        ProviderConfig {
            kind: "github".into(),
            client_id: CLIENT_ID.into(),
            client_secret: Some(CLIENT_SECRET.into()),
            redirect_uris: vec![REDIRECT_URI.into()],
            endpoints: [
                ("authorize_url", AUTHORIZE_PATH),
                ("token_url", TOKEN_PATH),
                ("userinfo_url", USER_PATH),
                ("emails_url", EMAILS_PATH),
            ]
            .into_iter()
            .map(|(k, path)| (k.to_string(), self.url(path)))
            .collect(),
            ..Default::default()
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: true,
            refresh: false,
            refresh_single_use: false,
            revoke: false,
            errors_with_http_200: true,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        self.add_github_user(seed, user_from_seed(seed))
    }

    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        if !authorize_url.starts_with(&format!("{}/", self.base_url)) {
            return Err(format!(
                "{authorize_url} does not point at {}",
                self.base_url
            ));
        }
        let login = self
            .login(seed)
            .ok_or_else(|| format!("no user registered for seed {seed:?}"))?;
        let code = self.github.authorize(authorize_url, &login)?;
        let state = param(&query_of(authorize_url), "state").unwrap_or_default();
        Ok(vec![("code".into(), code), ("state".into(), state)])
    }

    /// PROVIDERS.md §3.1: GitHub redirects to the callback with these.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        let state = param(&query_of(authorize_url), "state").unwrap_or_default();
        Some(vec![
            ("error".into(), "access_denied".into()),
            ("error_description".into(), DENIED_DESCRIPTION.into()),
            ("error_uri".into(), DENIED_ERROR_URI.into()),
            ("state".into(), state),
        ])
    }

    /// Token → the token endpoint; Identity → `/user` and `/user/emails`.
    /// GitHub OAuth Apps have no refresh or revoke endpoint, so faults on
    /// those steps never fire.
    fn clear_faults(&self) {
        self.shared.core.faults.clear_all();
        self.github.clear_faults();
    }

    /// A no-op: GitHub's REST API is strictly typed (`id` is always a JSON
    /// integer, OAuth App tokens have no `expires_in`), and what authbroker
    /// reads from it has no number a string could stand for.
    fn set_numbers_as_strings(&self, _on: bool) {}

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let login = self.login(seed).unwrap_or_else(|| seed.to_owned());
        let token = self.github.issue_token(&login, &DEFAULT_SCOPES);
        lock(&self.shared.tokens).insert(token.clone());
        (token, None)
    }

    /// Tokens the adapter saw being issued, until `revoke_tokens`.
    fn access_token_valid(&self, token: &str) -> bool {
        lock(&self.shared.tokens).contains(token)
    }

    /// The wrapped emulator's shape checks, then the relay's own.
    fn violations(&self) -> Vec<String> {
        let mut all = self.github.violations();
        all.extend(self.shared.core.violations());
        all
    }
}

// ---------------------------------------------------------------------------
// The relay

/// Std mutexes: each is held for one set or map operation, never across an `.await`.
struct Shared {
    core: Core,
    /// The wrapped emulator's base URL.
    upstream: String,
    client: reqwest::Client,
    /// Access tokens issued so far (by the token endpoint or `issue_tokens`).
    tokens: Mutex<HashSet<String>>,
    users: Mutex<HashMap<String, GithubUser>>,
}

fn step_of(path: &str) -> Option<Step> {
    match path {
        TOKEN_PATH => Some(Step::Token),
        USER_PATH | EMAILS_PATH => Some(Step::Identity),
        _ => None,
    }
}

/// Every request: faults for its step first, then the wrapped emulator's
/// answer. Browser-side paths (authorize) are relayed without logging: the
/// contract has no step for them.
async fn relay(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(step) = step_of(uri.path()) else {
        return shared.forward(&method, &uri, &headers, body).await;
    };
    let mut seen = seen(step, &method, &uri, &headers, &body);
    let core = &shared.core;
    // A fault that never answers (hang, dropped connection) is logged first, with status 0.
    let silent = matches!(
        core.faults.get(step),
        Some(Fault::Hang | Fault::CloseConnection)
    );
    if silent {
        core.record(seen.clone());
    }
    let response = match core.faults.apply(step).await {
        Some(r) => r,
        None => shared.forward(&method, &uri, &headers, body).await,
    };
    if !silent {
        seen.status = response.status().as_u16();
        core.record(seen);
    }
    response
}

/// Headers that belong to one connection, not to the request.
const HOP_BY_HOP: [header::HeaderName; 5] = [
    header::HOST,
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl Shared {
    async fn forward(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let target = format!(
            "{}{}",
            self.upstream,
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let mut request = self.client.request(method.clone(), target);
        for (name, value) in headers {
            if !HOP_BY_HOP.contains(name) {
                request = request.header(name, value);
            }
        }
        if !body.is_empty() {
            request = request.body(body);
        }
        let answer = match request.send().await {
            Ok(answer) => answer,
            Err(e) => {
                self.core.violation(format!(
                    "the adapter could not reach the GitHub emulator: {e}"
                ));
                return StatusCode::BAD_GATEWAY.into_response();
            }
        };
        let status = answer.status();
        let answer_headers = answer.headers().clone();
        let bytes = match answer.bytes().await {
            Ok(b) => b,
            Err(e) => {
                self.core
                    .violation(format!("the GitHub emulator's answer broke off: {e}"));
                return StatusCode::BAD_GATEWAY.into_response();
            }
        };
        if uri.path() == TOKEN_PATH
            && status == StatusCode::OK
            && let Some(token) = access_token_in(&bytes)
        {
            lock(&self.tokens).insert(token);
        }
        let mut response = Response::new(Body::from(bytes));
        *response.status_mut() = status;
        for (name, value) in &answer_headers {
            if !HOP_BY_HOP.contains(name) {
                response.headers_mut().append(name, value.clone());
            }
        }
        response
    }
}

/// The `access_token` of a token answer in any of GitHub's formats (JSON,
/// form; XML is never asked for by the preset).
fn access_token_in(body: &[u8]) -> Option<String> {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        return map
            .get("access_token")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

// ---------------------------------------------------------------------------
// Recording

const SECRET_PARAMS: [&str; 5] = [
    "client_secret",
    "code",
    "code_verifier",
    "access_token",
    "refresh_token",
];

fn seen(step: Step, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> SeenRequest {
    let content_type = header_str(headers, header::CONTENT_TYPE);
    let mut params: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if content_type.is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
        params.extend(form_urlencoded::parse(body).into_owned());
    } else if let Ok(Value::Object(map)) = serde_json::from_slice(body) {
        params.extend(map.into_iter().map(|(k, v)| match v {
            Value::String(s) => (k, s),
            other => (k, other.to_string()),
        }));
    }
    SeenRequest {
        step,
        method: method.to_string(),
        path: uri.path().into(),
        params: params
            .into_iter()
            .map(|(k, v)| {
                let v = if SECRET_PARAMS.contains(&k.as_str()) {
                    "<redacted>".into()
                } else {
                    v
                };
                (k, v)
            })
            .collect(),
        content_type: content_type.map(str::to_owned),
        accept: header_str(headers, header::ACCEPT).map(str::to_owned),
        user_agent: header_str(headers, header::USER_AGENT).map(str::to_owned),
        authorization: header_str(headers, header::AUTHORIZATION)
            .map(|v| v.split(' ').next().unwrap_or_default().to_owned()),
        status: 0,
    }
}

fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
