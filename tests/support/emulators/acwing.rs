//! AcWing's web third-party login (docs/providers.md#acwing) on one local port:
//! `www.acwing.com`'s token, refresh and getinfo endpoints at their real
//! paths, trailing slashes included, answering like the Django app behind
//! them: `JsonResponse` bodies (`", "` and `": "` separators, non-ASCII as
//! `\uXXXX`), errors with HTTP 200, and a 301 to the slashed URL when the
//! slash is missing.
//!
//! Reproduced from the docs: parameter names (`appid`, `secret`, no
//! `grant_type`), the success and error shapes, `expires_in` 7200, refresh
//! keeping the same access token while it is alive, getinfo's errcode as a
//! string. Unverified (and said so where it matters): the HTTP status of
//! errors, every error code except 40001/40004/40010, the token formats.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use authbroker::config::ProviderConfig;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::any,
};
use serde_json::Value;
use url::Url;

use super::wire::{digest, hex_lower, param, provider_config, query_params, seen};
use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, Step, lock, query_of,
    random_token, serve,
};

/// AcWing app ids are small integers.
pub const APPID: &str = "1234";
pub const SECRET: &str = "6c3f0a2e9b7d41f58a1e2c4b7d9f0a36";
pub const AUTHORIZE_PATH: &str = "/third_party/api/oauth2/web/authorize/";
pub const TOKEN_PATH: &str = "/third_party/api/oauth2/access_token/";
pub const REFRESH_PATH: &str = "/third_party/api/oauth2/refresh_token/";
pub const GETINFO_PATH: &str = "/third_party/api/meta/identity/getinfo/";
/// The one callback registered for the test app.
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
/// Access tokens live two hours (`"expires_in": 7200`).
pub const ACCESS_TTL: Duration = Duration::from_secs(7200);
/// The only scope AcWing has.
pub const SCOPE: &str = "userinfo";

/// Documented token-endpoint error (errcode an integer there).
pub const CODE_EXPIRED: (i64, &str) = (40001, "code expired");
/// Unverified: AcWing documents no error for a wrong appid or secret; this
/// one is shaped like the documented ones.
pub const BAD_CLIENT: (i64, &str) = (40002, "appid or secret error");
/// Unverified: refresh errors are undocumented; shaped like the others.
pub const REFRESH_EXPIRED: (i64, &str) = (40003, "refresh_token expired");
/// Documented getinfo error: `{"errcode": "40004", "errmsg": "access_token expired"}`,
/// the errcode a STRING, unlike the token endpoint's.
pub const TOKEN_EXPIRED: (&str, &str) = ("40004", "access_token expired");

/// An AcWing account as one app sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcwingUser {
    /// Per (user, app): the stable id, sent in the token answer.
    pub openid: String,
    pub username: String,
    pub photo: String,
}

impl AcwingUser {
    /// Deterministic from the seed.
    pub fn from_seed(seed: &str) -> Self {
        let d = digest(&["acwing", APPID, seed]);
        let n = 10_000 + u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % 900_000;
        AcwingUser {
            // AcWing's openid format is unverified: 32 hex characters here.
            openid: hex_lower(&d[8..24]),
            username: format!("yxc_{seed}"),
            photo: format!(
                "https://cdn.acwing.com/media/user/profile/photo/{n}_lg_{}.jpg",
                hex_lower(&d[24..29])
            ),
        }
    }

    pub fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.openid.clone(),
            username: self.username.clone(),
            display_name: self.username.clone(),
            avatar_url: self.photo.clone(),
            ..Default::default()
        }
    }
}

/// A running AcWing emulator; the server stops when this is dropped.
pub struct AcwingEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for AcwingEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl AcwingEmulator {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let mut router = Router::new()
            .route(TOKEN_PATH, any(access_token))
            .route(REFRESH_PATH, any(refresh_token))
            .route(GETINFO_PATH, any(getinfo));
        for path in [TOKEN_PATH, REFRESH_PATH, GETINFO_PATH] {
            router = router.route(path.trim_end_matches('/'), any(append_slash));
        }
        let (base_url, server) = serve(router.with_state(shared.clone())).await;
        AcwingEmulator {
            base_url,
            shared,
            server,
        }
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Registers a user with a chosen username (e.g. Chinese, to see
    /// Django's `\uXXXX` escaping); the rest still comes from the seed.
    pub fn add_user_named(&self, seed: &str, username: &str) -> ExpectedIdentity {
        let mut user = AcwingUser::from_seed(seed);
        user.username = username.into();
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    pub fn user(&self, seed: &str) -> Option<AcwingUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// Every outstanding code is now older than ten minutes.
    pub fn expire_codes(&self) {
        self.shared.core.expire_codes();
    }

    /// Every access token is now past its two hours (refresh then mints a
    /// new one instead of extending the old).
    pub fn expire_access_tokens(&self) {
        let past = Instant::now() - Duration::from_secs(1);
        for at in lock(&self.shared.expiry).values_mut() {
            *at = past;
        }
    }

    /// Seconds the access token has left, as refresh would report them.
    pub fn access_token_expires_in(&self, token: &str) -> Option<u64> {
        lock(&self.shared.expiry)
            .get(token)
            .map(|at| at.saturating_duration_since(Instant::now()).as_secs())
    }
}

impl Emulator for AcwingEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "acwing"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "acwing",
            APPID,
            SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("refresh_url", self.url(REFRESH_PATH)),
                ("userinfo_url", self.url(GETINFO_PATH)),
            ],
        )
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: false,
            refresh: true,
            refresh_single_use: false,
            revoke: false,
            // Assumed: AcWing's docs never show an error status, and the
            // student clients only call `.json()`.
            errors_with_http_200: true,
            deny_redirects: false,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = AcwingUser::from_seed(seed);
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let url = Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
        if !authorize_url.starts_with(&format!("{}/", self.base_url)) {
            return Err(format!(
                "{authorize_url} does not point at {}",
                self.base_url
            ));
        }
        let core = &self.shared.core;
        if url.path() == AUTHORIZE_PATH.trim_end_matches('/') {
            // A browser follows Django's 301, so the login still works.
            core.violation(format!(
                "authorize URL without the trailing slash: AcWing answers 301 to {AUTHORIZE_PATH}"
            ));
        } else if url.path() != AUTHORIZE_PATH {
            return Err(format!("path is {}, expected {AUTHORIZE_PATH}", url.path()));
        }
        let params = query_of(authorize_url);
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        for (k, _) in &params {
            if params.iter().filter(|(n, _)| n == k).count() > 1 {
                return Err(format!("parameter {k} given twice"));
            }
        }
        if get("client_id").is_some() {
            return Err("AcWing names the client id `appid`, not `client_id`".into());
        }
        if get("appid") != Some(APPID) {
            return Err(format!("appid is {:?}, expected {APPID}", get("appid")));
        }
        let redirect = get("redirect_uri").ok_or("redirect_uri is missing")?;
        Url::parse(redirect)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| format!("redirect_uri {redirect:?} is not an absolute http(s) URL"))?;
        // The docs ask for a URL-encoded redirect_uri; Python's quote()
        // leaves `/` alone (`https%3A//…`), the url crate escapes it (`%2F`).
        // Both are fine; a raw `:` means it was not encoded at all.
        let raw = url
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix("redirect_uri="))
            .unwrap_or_default();
        if raw.contains(':') {
            core.violation(format!(
                "redirect_uri is not URL-encoded ({raw:?}); AcWing's docs require quote()"
            ));
        }
        if get("scope") != Some(SCOPE) {
            return Err(format!(
                "scope is {:?}; AcWing's only scope is {SCOPE}",
                get("scope")
            ));
        }
        let state = get("state")
            .filter(|s| !s.is_empty())
            .ok_or("state is missing")?;
        for (k, _) in &params {
            if !["appid", "redirect_uri", "scope", "state"].contains(&k.as_str()) {
                core.violation(format!(
                    "authorize: AcWing takes appid, redirect_uri, scope and state only; \
                     {k} was sent (no response_type, no PKCE)"
                ));
            }
        }
        if !lock(&self.shared.users).contains_key(seed) {
            return Err(format!("no user registered for seed {seed:?}"));
        }
        let grant = CodeGrant::redirected(seed, APPID, redirect, vec![SCOPE.into()]);
        // The code format is unverified.
        Ok(core.code_redirect(random_token("", 32, ALNUM), grant, state.into()))
    }

    /// The web variant shows no redirect when the user declines (the AcApp
    /// variant's `errcode=40010&errmsg=user reject` does not apply).
    fn deny(&self, _authorize_url: &str) -> Option<Vec<(String, String)>> {
        None
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let (access, refresh) = self.shared.mint(seed);
        (access, Some(refresh))
    }

    fn access_token_valid(&self, token: &str) -> bool {
        self.shared.access_valid(token)
    }
}

// ---------------------------------------------------------------------------
// State

/// Std mutexes: each is held for one map operation, never across an `.await`.
#[derive(Default)]
struct Shared {
    core: Core,
    users: Mutex<HashMap<String, AcwingUser>>,
    /// When each access token dies. `Core` knows that a token exists; the
    /// refresh semantics (extend a live token, replace a dead one) need its age.
    expiry: Mutex<HashMap<String, Instant>>,
    /// The access token each refresh token currently stands for.
    current: Mutex<HashMap<String, String>>,
}

impl Shared {
    /// A new access and refresh token pair for the user.
    fn mint(&self, seed: &str) -> (String, String) {
        let scopes = [SCOPE.to_string()];
        let access = random_token("", 32, ALNUM);
        let refresh = random_token("", 32, ALNUM);
        self.core.store_access(&access, seed, &scopes);
        self.core.store_refresh(&refresh, seed, &scopes);
        lock(&self.expiry).insert(access.clone(), Instant::now() + ACCESS_TTL);
        lock(&self.current).insert(refresh.clone(), access.clone());
        (access, refresh)
    }

    fn access_valid(&self, token: &str) -> bool {
        self.core.access_grant(token).is_some()
            && lock(&self.expiry)
                .get(token)
                .is_some_and(|at| *at > Instant::now())
    }

    fn token_answer(&self, access: &str, refresh: &str, seed: &str) -> Response {
        let openid = lock(&self.users)
            .get(seed)
            .map(|u| u.openid.clone())
            .unwrap_or_default();
        // Always a fresh two hours: the token was just minted or extended.
        django_response(&[
            ("access_token", access.into()),
            ("expires_in", self.core.number(ACCESS_TTL.as_secs() as i64)),
            ("refresh_token", refresh.into()),
            ("openid", openid.into()),
            ("scope", SCOPE.into()),
        ])
    }

    fn error(&self, (code, message): (i64, &str)) -> Response {
        django_response(&[
            ("errcode", self.core.number(code)),
            ("errmsg", message.into()),
        ])
    }

    /// Django views read `request.GET`: a POST body is simply not seen.
    fn shape(&self, what: &str, method: &Method, body: &[u8], allowed: &[&str], query: &Params) {
        if method != Method::GET {
            self.core.violation(format!(
                "{what}: AcWing documents GET with the parameters in the query, not {method}"
            ));
        }
        if !body.is_empty() {
            self.core.violation(format!(
                "{what}: the request has a body; AcWing reads only the query string"
            ));
        }
        for (k, _) in query {
            if !allowed.contains(&k.as_str()) {
                self.core.violation(format!(
                    "{what}: unexpected parameter {k} (AcWing takes {})",
                    allowed.join(", ")
                ));
            }
        }
    }

    /// `GET /third_party/api/oauth2/access_token/?appid&secret&code`.
    fn exchange(&self, method: &Method, query: &Params, body: &[u8]) -> Response {
        self.shape(
            "access_token",
            method,
            body,
            &["appid", "secret", "code"],
            query,
        );
        if param(query, "appid") != Some(APPID) || param(query, "secret") != Some(SECRET) {
            return self.error(BAD_CLIENT);
        }
        let Some(grant) = param(query, "code")
            .and_then(|c| self.core.redeem_code(c))
            .filter(|g| g.client_id == APPID)
        else {
            return self.error(CODE_EXPIRED);
        };
        let (access, refresh) = self.mint(&grant.seed);
        self.token_answer(&access, &refresh, &grant.seed)
    }

    /// `GET /third_party/api/oauth2/refresh_token/?appid&refresh_token`: a
    /// live access token gets two more hours and is returned as is; a dead
    /// one is replaced. The refresh token itself keeps working (30 days).
    fn refresh(&self, method: &Method, query: &Params, body: &[u8]) -> Response {
        self.shape(
            "refresh_token",
            method,
            body,
            &["appid", "refresh_token"],
            query,
        );
        if param(query, "appid") != Some(APPID) {
            return self.error(BAD_CLIENT);
        }
        let Some(refresh) = param(query, "refresh_token") else {
            return self.error(REFRESH_EXPIRED);
        };
        let Some(grant) = self.core.use_refresh(refresh, false) else {
            return self.error(REFRESH_EXPIRED);
        };
        let previous = lock(&self.current).get(refresh).cloned();
        let access = match previous {
            Some(access) if self.access_valid(&access) => {
                lock(&self.expiry).insert(access.clone(), Instant::now() + ACCESS_TTL);
                access
            }
            previous => {
                if let Some(old) = previous {
                    self.core.revoke_access(&old);
                    lock(&self.expiry).remove(&old);
                }
                let access = random_token("", 32, ALNUM);
                self.core.store_access(&access, &grant.seed, &grant.scopes);
                lock(&self.expiry).insert(access.clone(), Instant::now() + ACCESS_TTL);
                lock(&self.current).insert(refresh.into(), access.clone());
                access
            }
        };
        self.token_answer(&access, refresh, &grant.seed)
    }

    /// `GET /third_party/api/meta/identity/getinfo/?access_token&openid`.
    fn getinfo(&self, method: &Method, query: &Params, headers: &HeaderMap) -> Response {
        self.shape("getinfo", method, &[], &["access_token", "openid"], query);
        if headers.contains_key(header::AUTHORIZATION) {
            self.core.violation(
                "getinfo: AcWing takes the token in the query; an Authorization header is not its shape",
            );
        }
        let user = param(query, "access_token")
            .filter(|t| self.access_valid(t))
            .and_then(|t| self.core.access_grant(t))
            .and_then(|g| lock(&self.users).get(&g.seed).cloned())
            // Unverified: the answer to a wrong openid; the documented token error here.
            .filter(|u| param(query, "openid") == Some(u.openid.as_str()));
        match user {
            Some(u) => {
                django_response(&[("username", u.username.into()), ("photo", u.photo.into())])
            }
            // Always a string here, as documented.
            None => django_response(&[
                ("errcode", TOKEN_EXPIRED.0.into()),
                ("errmsg", TOKEN_EXPIRED.1.into()),
            ]),
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers

type Params = Vec<(String, String)>;

async fn access_token(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query_params(&uri);
    let seen = seen(Step::Token, &method, &uri, &headers, &body);
    shared
        .core
        .answer(Step::Token, seen, || {
            shared.exchange(&method, &query, &body)
        })
        .await
}

async fn refresh_token(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query_params(&uri);
    let seen = seen(Step::Refresh, &method, &uri, &headers, &body);
    shared
        .core
        .answer(Step::Refresh, seen, || {
            shared.refresh(&method, &query, &body)
        })
        .await
}

async fn getinfo(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query_params(&uri);
    let seen = seen(Step::Identity, &method, &uri, &headers, &body);
    shared
        .core
        .answer(Step::Identity, seen, || {
            shared.getinfo(&method, &query, &headers)
        })
        .await
}

/// Django's `CommonMiddleware` (`APPEND_SLASH`): a permanent redirect to the
/// slashed path, query kept, empty body. It answers before any view, so no
/// fault applies.
async fn append_slash(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let step = if uri.path().starts_with(REFRESH_PATH.trim_end_matches('/')) {
        Step::Refresh
    } else if uri.path().starts_with(GETINFO_PATH.trim_end_matches('/')) {
        Step::Identity
    } else {
        Step::Token
    };
    let mut location = format!("{}/", uri.path());
    if let Some(q) = uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let mut seen = seen(step, &method, &uri, &headers, &body);
    seen.status = 301;
    shared.core.record(seen);
    shared.core.violation(format!(
        "{method} {} without its trailing slash: AcWing (Django) answers 301 to {}/",
        uri.path(),
        uri.path()
    ));
    (
        StatusCode::MOVED_PERMANENTLY,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::LOCATION, location.as_str()),
        ],
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Django's JsonResponse

/// Serialises like Django's `JsonResponse`, i.e. Python's `json.dumps` with
/// its defaults: keys in the given order, `", "` and `": "` separators,
/// everything outside printable ASCII escaped (`ensure_ascii`).
pub fn django_json(fields: &[(&str, Value)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        py_string(&mut out, k);
        out.push_str(": ");
        py_value(&mut out, v);
    }
    out.push('}');
    out
}

fn py_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => py_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_string(out, k);
                out.push_str(": ");
                py_value(out, item);
            }
            out.push('}');
        }
    }
}

/// Python's `ensure_ascii` string encoding: lower-case `\uXXXX`, UTF-16
/// surrogate pairs beyond the BMP, `/` left alone.
fn py_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// HTTP 200, `Content-Type: application/json` (JsonResponse's default).
fn django_response(fields: &[(&str, Value)]) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        django_json(fields),
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Recording
