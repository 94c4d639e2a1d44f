//! Provider emulators for the provider conformance suite. Each emulator is an
//! axum server on 127.0.0.1:0 reproducing one provider's wire format from
//! docs/providers.md, errors included, that checks the exact shape of what
//! authbroker sends and can inject faults. They all implement [`Emulator`],
//! so one suite (`tests/providers/conformance.rs`) runs the same scenarios against every
//! preset. [`Core`] holds what every OAuth2 server needs: single-use codes,
//! tokens, a request log and faults.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use authbroker::config::ProviderConfig;
use axum::response::Response;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::Rng;
use sha2::{Digest, Sha256};

pub use super::faults::{Fault, Faults};

/// Which of the provider's calls a fault or a logged request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// The browser's visit to the authorize page (only GitHub's emulator
    /// serves and logs it; the others check it in [`Emulator::approve`]).
    Authorize,
    /// The code-for-token exchange.
    Token,
    /// Every call made after the token exchange to learn who the user is
    /// (QQ `/me` and `get_user_info`, GitHub `/user` and `/user/emails`, …).
    Identity,
    /// Refresh-token grant.
    Refresh,
    /// Token revocation.
    Revoke,
    /// OIDC discovery and JWKS.
    Discovery,
}

/// What authbroker should report for a user after a successful login.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpectedIdentity {
    pub subject: String,
    pub union_id: String,
    pub username: String,
    pub display_name: String,
    pub avatar_url: String,
    pub email: String,
    pub email_verified: bool,
}

/// What the provider supports, so the suite knows which scenarios apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capabilities {
    pub pkce: bool,
    pub refresh: bool,
    /// Refresh tokens work once (QQ).
    pub refresh_single_use: bool,
    pub revoke: bool,
    /// A bad code is answered with HTTP 200 and an error body.
    pub errors_with_http_200: bool,
    /// The provider redirects to the callback when the user denies.
    pub deny_redirects: bool,
}

/// One request as an emulator saw it. Secret values (client secret, code,
/// verifier, tokens) are replaced by `<redacted>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub step: Step,
    pub method: String,
    pub path: String,
    /// Query parameters, then form or JSON body parameters, in order.
    pub params: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub user_agent: Option<String>,
    /// Only the scheme (`Bearer`, `token`, `Basic`), never the credential.
    pub authorization: Option<String>,
    /// The HTTP status the emulator answered with.
    pub status: u16,
}

impl SeenRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The contract the conformance suite drives. Methods are synchronous; each
/// emulator's own `async fn start()` builds it.
pub trait Emulator: Send + Sync {
    /// The shared machinery; the delegating methods below default to it.
    fn core(&self) -> &Core;
    /// The preset (or kind) authbroker should use: "qq", "wechat", …
    fn kind(&self) -> &'static str;
    /// A `[providers.NAME]` table pointing every endpoint at this emulator,
    /// with the emulator's client id and secret.
    fn provider_config(&self) -> ProviderConfig;
    fn capabilities(&self) -> Capabilities;
    /// Registers a user; `seed` is unique per user in a test. Returns what
    /// authbroker must report for them.
    fn add_user(&self, seed: &str) -> ExpectedIdentity;
    /// The browser step. Checks authbroker's authorize URL exactly as the
    /// provider would (parameter names, scope separator, PKCE, fragment …)
    /// and returns the query the provider redirects to the callback with
    /// (`code`, `state`, …), or why a real provider would refuse the URL.
    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String>;
    /// What the provider sends to the callback when the user denies, in the
    /// provider's own words; `None` when the provider does not redirect.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>>;
    /// Issues tokens for a registered user without the browser, for refresh
    /// and revoke tests: (access token, refresh token if supported).
    fn issue_tokens(&self, seed: &str) -> (String, Option<String>);

    /// Arms a fault on every endpoint of a step.
    fn set_fault(&self, step: Step, fault: Fault) {
        self.core().faults.set(step, fault);
    }

    fn clear_faults(&self) {
        self.core().faults.clear_all();
    }

    /// Sends numeric fields (ids, expires_in, error codes) as JSON strings,
    /// as real providers sometimes do.
    fn set_numbers_as_strings(&self, on: bool) {
        self.core().set_numbers_as_strings(on);
    }

    /// Whether an access token is (still) accepted by the provider.
    fn access_token_valid(&self, token: &str) -> bool {
        self.core().access_grant(token).is_some()
    }

    fn requests(&self) -> Vec<SeenRequest> {
        self.core().requests()
    }

    /// The requests made to one path.
    fn requests_to(&self, path: &str) -> Vec<SeenRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Requests a real provider would refuse because of their shape.
    fn violations(&self) -> Vec<String> {
        self.core().violations()
    }
}

/// A code handed out at the browser step.
#[derive(Clone, Debug)]
pub struct CodeGrant {
    pub seed: String,
    pub client_id: String,
    pub redirect_uri: Option<String>,
    pub scopes: Vec<String>,
    /// PKCE S256 challenge, if one was sent.
    pub challenge: Option<String>,
    /// OIDC nonce, if one was sent.
    pub nonce: Option<String>,
    issued: Instant,
}

impl CodeGrant {
    pub fn new(seed: &str, client_id: &str) -> Self {
        CodeGrant {
            seed: seed.into(),
            client_id: client_id.into(),
            redirect_uri: None,
            scopes: Vec::new(),
            challenge: None,
            nonce: None,
            issued: Instant::now(),
        }
    }

    /// A grant for a code sent back to `redirect_uri`, as every provider
    /// that checks the redirect at the token step issues them.
    pub fn redirected(
        seed: &str,
        client_id: &str,
        redirect_uri: &str,
        scopes: Vec<String>,
    ) -> Self {
        CodeGrant {
            redirect_uri: Some(redirect_uri.into()),
            scopes,
            ..CodeGrant::new(seed, client_id)
        }
    }

    /// RFC 7636 S256 check; a verifier without a challenge is an error too.
    pub fn pkce_ok(&self, verifier: Option<&str>) -> bool {
        match (&self.challenge, verifier) {
            (None, None) => true,
            (Some(c), Some(v)) => URL_SAFE_NO_PAD.encode(Sha256::digest(v.as_bytes())) == *c,
            _ => false,
        }
    }
}

/// A token a provider issued.
#[derive(Clone, Debug)]
pub struct TokenGrant {
    pub seed: String,
    pub scopes: Vec<String>,
    issued: Instant,
}

/// Codes live ten minutes (GitHub, QQ, WeChat all say so).
pub const CODE_TTL: Duration = Duration::from_secs(600);

/// Shared machinery for one emulator.
#[derive(Default)]
pub struct Core {
    codes: Mutex<HashMap<String, CodeGrant>>,
    access: Mutex<HashMap<String, TokenGrant>>,
    refresh: Mutex<HashMap<String, TokenGrant>>,
    pub faults: Faults<Step>,
    seen: Mutex<Vec<SeenRequest>>,
    violations: Mutex<Vec<String>>,
    numbers_as_strings: AtomicBool,
}

/// Poisoning only follows a panic in another test thread; keep going.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Random text: `prefix` + `len` characters from `alphabet`.
pub fn random_token(prefix: &str, len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::rng();
    let mut s = String::from(prefix);
    for _ in 0..len {
        s.push(alphabet[rng.random_range(0..alphabet.len())] as char);
    }
    s
}

pub const HEX_UPPER: &[u8] = b"0123456789ABCDEF";
pub const HEX_LOWER: &[u8] = b"0123456789abcdef";
pub const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

impl Core {
    /// Stores a code for the browser step; returns it.
    pub fn issue_code(&self, code: String, grant: CodeGrant) -> String {
        lock(&self.codes).insert(code.clone(), grant);
        code
    }

    /// Takes a code: single use, expired after [`CODE_TTL`]. A code is gone
    /// after its first redemption attempt, even a failed one.
    /// The checks approving an authorize URL starts with at every
    /// emulated provider: a URL the provider would refuse is recorded as a
    /// violation, and the test user must have been added to `users`.
    pub fn approvable<T, U>(
        &self,
        checked: Result<T, String>,
        users: &Mutex<HashMap<String, U>>,
        seed: &str,
    ) -> Result<T, String> {
        let checked = checked.map_err(|why| {
            self.violation(format!("authorize: {why}"));
            why
        })?;
        if !lock(users).contains_key(seed) {
            return Err(format!("no user registered with seed {seed:?}"));
        }
        Ok(checked)
    }

    /// The callback parameters of an approval: `code`, issued for `grant`,
    /// and the `state`.
    pub fn code_redirect(
        &self,
        code: String,
        grant: CodeGrant,
        state: String,
    ) -> Vec<(String, String)> {
        let code = self.issue_code(code, grant);
        vec![("code".into(), code), ("state".into(), state)]
    }

    pub fn redeem_code(&self, code: &str) -> Option<CodeGrant> {
        lock(&self.codes)
            .remove(code)
            .filter(|g| g.issued.elapsed() < CODE_TTL)
    }

    /// Makes every outstanding code expired (for "expired code" tests).
    pub fn expire_codes(&self) {
        for g in lock(&self.codes).values_mut() {
            g.issued = Instant::now() - CODE_TTL - Duration::from_secs(1);
        }
    }

    pub fn store_access(&self, token: &str, seed: &str, scopes: &[String]) {
        lock(&self.access).insert(
            token.into(),
            TokenGrant {
                seed: seed.into(),
                scopes: scopes.to_vec(),
                issued: Instant::now(),
            },
        );
    }

    pub fn store_refresh(&self, token: &str, seed: &str, scopes: &[String]) {
        lock(&self.refresh).insert(
            token.into(),
            TokenGrant {
                seed: seed.into(),
                scopes: scopes.to_vec(),
                issued: Instant::now(),
            },
        );
    }

    pub fn access_grant(&self, token: &str) -> Option<TokenGrant> {
        lock(&self.access).get(token).cloned()
    }

    pub fn revoke_access(&self, token: &str) -> bool {
        lock(&self.access).remove(token).is_some()
    }

    /// Looks up a refresh token, removing it when `single_use`.
    pub fn use_refresh(&self, token: &str, single_use: bool) -> Option<TokenGrant> {
        let mut map = lock(&self.refresh);
        if single_use {
            map.remove(token)
        } else {
            map.get(token).cloned()
        }
    }

    /// Logs a request; returns where, for [`set_status`](Self::set_status).
    pub fn record(&self, request: SeenRequest) -> usize {
        let mut seen = lock(&self.seen);
        seen.push(request);
        seen.len() - 1
    }

    /// The status a logged request was answered with (a no-op once the log
    /// was cleared).
    pub fn set_status(&self, at: usize, status: u16) {
        if let Some(request) = lock(&self.seen).get_mut(at) {
            request.status = status;
        }
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.seen).clone()
    }

    /// Faults armed for `step` first (a fault answers instead of the
    /// provider), then `normal`; the request is logged with the status it
    /// got.
    pub async fn answer(
        &self,
        step: Step,
        seen: SeenRequest,
        normal: impl FnOnce() -> Response,
    ) -> Response {
        self.answer_with(&self.faults, step, seen, normal).await
    }

    /// [`answer`](Self::answer) with faults keyed by the emulator's own
    /// endpoints. The request is logged on arrival, so a test can see a call
    /// in progress, and gets its status once answered; a fault that never
    /// answers (hang, dropped connection) leaves it at 0.
    pub async fn answer_with<E: Copy + Eq + Hash>(
        &self,
        faults: &Faults<E>,
        key: E,
        seen: SeenRequest,
        normal: impl FnOnce() -> Response,
    ) -> Response {
        let silent = matches!(faults.get(key), Some(Fault::Hang | Fault::CloseConnection));
        let at = self.record(seen);
        let response = match faults.apply(key).await {
            Some(r) => r,
            None => normal(),
        };
        if !silent {
            self.set_status(at, response.status().as_u16());
        }
        response
    }

    /// Forgets the request log and the violations.
    pub fn clear_requests(&self) {
        lock(&self.seen).clear();
        lock(&self.violations).clear();
    }

    pub fn violation(&self, why: impl Into<String>) {
        lock(&self.violations).push(why.into());
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    pub fn set_numbers_as_strings(&self, on: bool) {
        self.numbers_as_strings.store(on, Ordering::Relaxed);
    }

    /// A JSON number, or the same digits as a string when asked to.
    pub fn number(&self, n: i64) -> serde_json::Value {
        if self.numbers_as_strings.load(Ordering::Relaxed) {
            serde_json::Value::String(n.to_string())
        } else {
            serde_json::Value::from(n)
        }
    }
}

/// Serves `router` on 127.0.0.1:0; returns `http://127.0.0.1:PORT` and the
/// task (abort it on drop).
pub async fn serve(router: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an emulator");
    let port = listener.local_addr().expect("emulator address").port();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://127.0.0.1:{port}"), task)
}

/// Query parameters of a URL, in order.
pub fn query_of(url: &str) -> Vec<(String, String)> {
    url::Url::parse(url)
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}
pub mod acwing;
pub mod alipay;
pub mod apple;
pub mod custom;
pub mod dingtalk;
pub mod feishu;
pub mod gitee;
pub mod github;
pub mod gitlab;
pub mod google;
pub mod https;
pub mod microsoft;
pub mod oidc_authorize;
pub mod qiita;
pub mod qq;
pub mod wechat;
pub mod weibo;
pub mod wire;
