//! The built-in `sandbox` provider: a small but real OAuth2 authorization
//! server (authorize page, code + PKCE S256 token exchange, userinfo) that
//! `authbroker dev` runs in-process so a login can finish with no external
//! provider. Anyone may sign in as any test user: it must never face the internet.

use std::{
    borrow::Cow,
    fmt::Write as _,
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    serve::ListenerExt,
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use moka::{future::Cache, policy::EvictionPolicy};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::{Url, form_urlencoded};

const CODE_TTL: Duration = Duration::from_secs(60);
const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(3600);
const REFRESH_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const CACHE_CAPACITY: u64 = 100_000;
const ACCESS_TOKEN_PREFIX: &str = "sbx_at_";
const REFRESH_TOKEN_PREFIX: &str = "sbx_rt_";
/// Longest value accepted for any authorize parameter; bounds what one code holds.
const MAX_PARAM_LEN: usize = 2048;
const TEST_USERS: [&str; 3] = ["alice", "bob", "carol"];
/// Requests served at once. The sandbox is for development, but `serve` runs
/// it when `allow_sandbox` is set, so its listener is bounded like the gRPC
/// one: past this a request is answered 503 at once instead of queueing.
const MAX_CONCURRENT_REQUESTS: usize = 256;
/// Longest a request may take; its handlers are in-memory steps.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running sandbox provider. The server task lives until the `shutdown`
/// future given to [`SandboxServer::start`] resolves.
#[derive(Debug, Clone)]
pub struct SandboxServer {
    base_url: Url,
}

impl SandboxServer {
    /// Serves on an already-bound listener until `shutdown` resolves.
    /// Must be called from within a Tokio runtime (an error otherwise).
    pub fn start(
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<SandboxServer> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let base_url = base_url_for(listener.local_addr()?)?;
        let app = router(Arc::new(Sandbox::new(&base_url)));
        // Small responses on keep-alive connections: without NODELAY, Nagle plus
        // delayed ACKs can add ~40 ms to a login under load.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::trace!(error = %e, "sandbox: could not set TCP_NODELAY");
            }
        });
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "sandbox provider server stopped");
            }
        });
        Ok(SandboxServer { base_url })
    }

    /// e.g. `http://127.0.0.1:PORT/`. `Url` always serializes an http URL with
    /// a `/` path; use `join("authorize")` or trim the slash before appending.
    pub fn base_url(&self) -> Url {
        self.base_url.clone()
    }
}

/// A wildcard bind address is not something a browser can open, so such
/// listeners are advertised on loopback.
fn base_url_for(mut addr: SocketAddr) -> io::Result<Url> {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Url::parse(&format!("http://{addr}")).map_err(io::Error::other)
}

fn router(sandbox: Arc<Sandbox>) -> Router {
    bounded(
        Router::new()
            .route("/authorize", get(authorize))
            .route("/token", axum::routing::post(token))
            .route("/userinfo", get(userinfo).post(userinfo))
            .route("/avatar/{file}", get(avatar))
            .with_state(sandbox),
        MAX_CONCURRENT_REQUESTS,
    )
}

/// `routes` with at most `slots` requests at once and `REQUEST_TIMEOUT`
/// each (axum's default body limit, 2 MB, already bounds what is read).
fn bounded(routes: Router, slots: usize) -> Router {
    let slots = Arc::new(tokio::sync::Semaphore::new(slots));
    routes.layer(middleware::from_fn_with_state(slots, limit))
}

async fn limit(
    State(slots): State<Arc<tokio::sync::Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_slot) = slots.try_acquire() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox: too many requests at once; try again",
        )
            .into_response();
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "sandbox: the request took too long",
        )
            .into_response(),
    }
}

/// Everything the server remembers. Entries carry their own deadline because
/// moka's TTL bounds memory but is not a promise about what `remove` returns.
struct Sandbox {
    /// `base_url` without the trailing slash, for building avatar URLs.
    origin: String,
    codes: Cache<[u8; 32], Arc<CodeGrant>>,
    access_tokens: Cache<[u8; 32], Arc<AccessGrant>>,
    refresh_tokens: Cache<[u8; 32], Arc<RefreshGrant>>,
}

struct CodeGrant {
    user: Arc<str>,
    client_id: Arc<str>,
    redirect_uri: Box<str>,
    scope: Arc<str>,
    challenge: Option<Box<str>>,
    expires_at: Instant,
}

struct AccessGrant {
    user: Arc<str>,
    expires_at: Instant,
}

struct RefreshGrant {
    user: Arc<str>,
    client_id: Arc<str>,
    scope: Arc<str>,
    expires_at: Instant,
}

impl Sandbox {
    fn new(base_url: &Url) -> Self {
        Sandbox {
            origin: base_url.as_str().trim_end_matches('/').to_owned(),
            codes: bounded_cache(CODE_TTL),
            access_tokens: bounded_cache(ACCESS_TOKEN_TTL),
            refresh_tokens: bounded_cache(REFRESH_TOKEN_TTL),
        }
    }
}

/// LRU rather than moka's default TinyLFU: when a load test fills the cache,
/// TinyLFU may refuse to admit a brand-new token, which would fail the very
/// login that just received it. LRU always keeps the newest entries.
fn bounded_cache<V: Clone + Send + Sync + 'static>(ttl: Duration) -> Cache<[u8; 32], V> {
    Cache::builder()
        .max_capacity(CACHE_CAPACITY)
        .time_to_live(ttl)
        .eviction_policy(EvictionPolicy::lru())
        .build()
}

/// 32 bytes from the thread-local CSPRNG (ChaCha, seeded and reseeded from
/// the OS): as unguessable as `OsRng` and without a syscall per login.
fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Parses the text form of a key we issued (after its prefix, if any).
fn parse_key(text: &str) -> Option<[u8; 32]> {
    if text.len() != 43 {
        return None;
    }
    URL_SAFE_NO_PAD.decode(text).ok()?.try_into().ok()
}

// ---------------------------------------------------------------------------
// GET /authorize

/// A validated authorization request.
#[derive(Debug)]
struct AuthorizeRequest {
    client_id: String,
    redirect_uri: Url,
    state: String,
    scope: String,
    challenge: Option<String>,
    decision: Decision,
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// No decision in the URL yet: show the picker page.
    Ask,
    Approve(String),
    Deny,
}

/// Reads and checks the query. Errors are sentences shown to a developer.
fn parse_authorize(raw: &str) -> Result<AuthorizeRequest, String> {
    let mut response_type = None;
    let mut client_id = None;
    let mut redirect_uri = None;
    let mut state = None;
    let mut scope = None;
    let mut challenge = None;
    let mut method = None;
    let mut user = None;
    let mut deny = None;
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        let slot = match &*key {
            "response_type" => &mut response_type,
            "client_id" => &mut client_id,
            "redirect_uri" => &mut redirect_uri,
            "state" => &mut state,
            "scope" => &mut scope,
            "code_challenge" => &mut challenge,
            "code_challenge_method" => &mut method,
            "sandbox_user" => &mut user,
            "sandbox_deny" => &mut deny,
            // RFC 6749 §3.1: unknown parameters are ignored.
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("The parameter `{key}` is given more than once."));
        }
        if value.len() > MAX_PARAM_LEN {
            return Err(format!(
                "The parameter `{key}` is longer than {MAX_PARAM_LEN} bytes."
            ));
        }
        *slot = Some(value.into_owned());
    }

    match response_type.as_deref() {
        Some("code") => {}
        None => return Err("`response_type` is missing; it must be `code`.".into()),
        Some(other) => {
            return Err(format!(
                "`response_type` is `{other}`, but this provider only supports `code`."
            ));
        }
    }
    let client_id = client_id
        .filter(|c| !c.is_empty())
        .ok_or("`client_id` is missing or empty.")?;
    let redirect_uri = redirect_uri
        .filter(|r| !r.is_empty())
        .ok_or("`redirect_uri` is missing or empty.")?;
    let redirect_uri = Url::parse(&redirect_uri)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| {
            format!("`redirect_uri` ({redirect_uri}) is not an absolute http:// or https:// URL.")
        })?;
    if redirect_uri.fragment().is_some() {
        return Err("`redirect_uri` must not contain a fragment (RFC 6749 §3.1.2).".into());
    }
    let state = state
        .filter(|s| !s.is_empty())
        .ok_or("`state` is missing or empty; the sandbox insists on it (CSRF defence).")?;
    let challenge = match (challenge, method.as_deref()) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err("`code_challenge_method` is given without a `code_challenge`.".into());
        }
        (Some(c), Some("S256")) if is_pkce_value(&c) => Some(c),
        (Some(_), Some("S256")) => {
            return Err(
                "`code_challenge` must be 43-128 characters of [A-Za-z0-9-._~] (RFC 7636 §4.2)."
                    .into(),
            );
        }
        (Some(_), None | Some("plain")) => {
            return Err(
                "PKCE method `plain` is not accepted: send `code_challenge_method=S256`.".into(),
            );
        }
        (Some(_), Some(other)) => {
            return Err(format!(
                "`code_challenge_method` is `{other}`; only `S256` is supported."
            ));
        }
    };
    let decision = match (user, deny.as_deref()) {
        (None, None) => Decision::Ask,
        (None, Some("1")) => Decision::Deny,
        (None, Some(_)) => return Err("`sandbox_deny` must be `1`.".into()),
        (Some(_), Some(_)) => {
            return Err("Give either `sandbox_user` or `sandbox_deny`, not both.".into());
        }
        (Some(name), None) if is_user_name(&name) => Decision::Approve(name),
        (Some(_), None) => {
            return Err("`sandbox_user` must be 1-64 characters of [A-Za-z0-9_.-].".into());
        }
    };
    Ok(AuthorizeRequest {
        client_id,
        redirect_uri,
        state,
        scope: scope
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        challenge,
        decision,
    })
}

fn is_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// RFC 7636 §4.1: verifiers and challenges are 43-128 unreserved characters.
fn is_pkce_value(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

async fn authorize(State(sandbox): State<Arc<Sandbox>>, RawQuery(raw): RawQuery) -> Response {
    let raw = raw.unwrap_or_default();
    let request = match parse_authorize(&raw) {
        Ok(request) => request,
        Err(problem) => return html(StatusCode::BAD_REQUEST, &error_page(&problem)),
    };
    let mut target = request.redirect_uri.clone();
    match &request.decision {
        Decision::Ask => return html(StatusCode::OK, &picker_page(&raw, &request)),
        Decision::Deny => {
            target
                .query_pairs_mut()
                .append_pair("error", "access_denied")
                .append_pair("error_description", "The user denied the request.")
                .append_pair("state", &request.state);
        }
        Decision::Approve(user) => {
            let code = random_key();
            let grant = CodeGrant {
                user: user.as_str().into(),
                client_id: request.client_id.as_str().into(),
                redirect_uri: request.redirect_uri.as_str().into(),
                scope: request.scope.as_str().into(),
                challenge: request.challenge.as_deref().map(Into::into),
                expires_at: Instant::now() + CODE_TTL,
            };
            sandbox.codes.insert(code, Arc::new(grant)).await;
            tracing::debug!(client_id = %request.client_id, user = %user, "sandbox: login approved");
            target
                .query_pairs_mut()
                .append_pair("code", &URL_SAFE_NO_PAD.encode(code))
                .append_pair("state", &request.state);
        }
    }
    redirect(&target)
}

fn redirect(target: &Url) -> Response {
    match HeaderValue::from_str(target.as_str()) {
        Ok(location) => (
            StatusCode::FOUND,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
        // Invariant: a serialized `Url` is ASCII without control characters.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn html(status: StatusCode, body: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // No `form-action`: browsers apply it to the redirect that follows
            // the form, which leaves for the app's origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body.to_owned(),
    )
        .into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;background:#f4f5f7;color:#1f2328;margin:0}\
main{max-width:30rem;margin:3rem auto;background:#fff;border:1px solid #d0d7de;border-radius:12px;padding:1.5rem 2rem}\
h1{font-size:1.25rem;margin:0 0 1rem}h2{font-size:1rem;margin:1.5rem 0 .5rem}\
code{background:#eef1f4;border-radius:4px;padding:0 .3em;word-break:break-all}\
ul{list-style:none;padding:0;margin:0}li{margin:.4rem 0}\
a.user{display:flex;align-items:center;gap:.6rem;padding:.5rem .75rem;border:1px solid #d0d7de;border-radius:8px;color:inherit;text-decoration:none}\
a.user:hover{background:#f6f8fa}img{width:28px;height:28px;border-radius:50%}\
form{display:flex;gap:.5rem;margin-top:.75rem}input{flex:1;padding:.4rem;border:1px solid #d0d7de;border-radius:6px}\
button{padding:.4rem .9rem;border:0;border-radius:6px;background:#1f6feb;color:#fff}\
a.deny{color:#cf222e}.note{color:#656d76;font-size:.85rem;margin-top:1.5rem}.error{color:#cf222e}";

fn page(body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>authbroker sandbox</title><style>{STYLE}</style></head>\
<body><main>{body}</main></body></html>\n"
    )
}

fn error_page(problem: &str) -> String {
    page(&format!(
        "<h1>authbroker sandbox</h1><p class=\"error\"><strong>This authorization request is invalid.</strong></p>\
<p>{}</p><p class=\"note\">The sandbox does not redirect back on a bad request, \
so a misconfigured client cannot be used to bounce users elsewhere.</p>",
        escape(problem)
    ))
}

/// The consent page. Links reuse the query exactly as received plus one
/// parameter, so nothing the client sent is lost or re-encoded.
fn picker_page(raw_query: &str, request: &AuthorizeRequest) -> String {
    let mut body = String::with_capacity(4096);
    let _ = write!(
        body,
        "<h1>authbroker sandbox</h1><p><strong>{}</strong> asks you to sign in.</p>",
        escape(&request.client_id)
    );
    body.push_str("<p>Scopes: ");
    if request.scope.is_empty() {
        body.push_str("<em>none</em>");
    }
    for scope in request.scope.split(' ').filter(|s| !s.is_empty()) {
        let _ = write!(body, "<code>{}</code> ", escape(scope));
    }
    let _ = write!(
        body,
        "</p><p>Returns to <code>{}</code></p><h2>Sign in as a test user</h2><ul>",
        escape(request.redirect_uri.as_str())
    );
    for user in TEST_USERS {
        let href = format!("?{raw_query}&sandbox_user={user}");
        let _ = write!(
            body,
            "<li><a class=\"user\" href=\"{}\"><img src=\"avatar/{user}.svg\" alt=\"\">{user}</a></li>",
            escape(&href)
        );
    }
    body.push_str("</ul><form method=\"get\">");
    for (key, value) in form_urlencoded::parse(raw_query.as_bytes()) {
        let _ = write!(
            body,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            escape(&key),
            escape(&value)
        );
    }
    let _ = write!(
        body,
        "<input name=\"sandbox_user\" placeholder=\"any name\" required maxlength=\"64\" \
pattern=\"[A-Za-z0-9_.\\-]{{1,64}}\" aria-label=\"user name\"><button>Sign in</button></form>\
<p><a class=\"deny\" href=\"{}\">Deny</a></p>\
<p class=\"note\">Development provider: anyone can sign in as anyone. \
Append <code>&amp;sandbox_user=NAME</code> to the authorize URL to skip this page.</p>",
        escape(&format!("?{raw_query}&sandbox_deny=1"))
    );
    page(&body)
}

// ---------------------------------------------------------------------------
// POST /token

/// An RFC 6749 §5.2 error response.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: Cow<'static, str>,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<Cow<'static, str>>) -> Self {
        OAuthError {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
        }
    }
    fn invalid_grant(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new("invalid_grant", description)
    }
    fn invalid_request(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new("invalid_request", description)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            no_store(),
            Json(ErrorBody {
                error: self.error,
                error_description: &self.description,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sandbox\""),
            );
        }
        response
    }
}

/// RFC 6749 §5.1: token responses must not be cached.
fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

/// The form of a token request. serde rejects a repeated field, which is what
/// RFC 6749 §3.2 asks for.
#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    refresh_token: String,
    scope: &'a str,
}

async fn token(State(sandbox): State<Arc<Sandbox>>, headers: HeaderMap, body: Bytes) -> Response {
    match exchange(&sandbox, &headers, &body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn exchange(
    sandbox: &Sandbox,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, OAuthError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(OAuthError::invalid_request(
            "The body must be application/x-www-form-urlencoded.",
        ));
    }
    let form: TokenForm = serde_urlencoded::from_bytes(body)
        .map_err(|e| OAuthError::invalid_request(format!("The form could not be read: {e}.")))?;
    let client_id = authenticate_client(headers, &form)?;
    match form.grant_type.as_deref() {
        Some("authorization_code") => redeem_code(sandbox, &form, &client_id).await,
        Some("refresh_token") => redeem_refresh_token(sandbox, &form, &client_id).await,
        Some(_) => Err(OAuthError::new(
            "unsupported_grant_type",
            "Only `authorization_code` and `refresh_token` are supported.",
        )),
        None => Err(OAuthError::invalid_request("`grant_type` is missing.")),
    }
}

/// Accepts `client_secret_post` and `client_secret_basic` (but not both, per
/// RFC 6749 §2.3). Any non-empty secret is right: the sandbox has no registry
/// of clients, only a check that the client sent one.
fn authenticate_client(headers: &HeaderMap, form: &TokenForm) -> Result<String, OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, credentials)| credentials.trim());
    // RFC 6749 §5.2: 401 when the client tried the Authorization header.
    let status = if basic.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    let unauthorized = |description: &'static str| OAuthError {
        status,
        error: "invalid_client",
        description: description.into(),
    };
    let (id, secret) = match basic {
        Some(_) if form.client_secret.is_some() => {
            return Err(OAuthError::invalid_request(
                "Use one client authentication method: HTTP Basic or client_secret in the form, not both.",
            ));
        }
        Some(credentials) => {
            let decoded = STANDARD
                .decode(credentials)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| unauthorized("The Basic credentials are not valid base64 UTF-8."))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| unauthorized("The Basic credentials lack a `:`."))?;
            // RFC 6749 §2.3.1 form-encodes both halves before Basic.
            let id = form_decode(id)
                .ok_or_else(|| unauthorized("The Basic client id is badly encoded."))?;
            let secret = form_decode(secret)
                .ok_or_else(|| unauthorized("The Basic client secret is badly encoded."))?;
            if form.client_id.as_ref().is_some_and(|f| *f != id) {
                return Err(OAuthError::invalid_request(
                    "`client_id` in the form differs from the Basic credentials.",
                ));
            }
            (id, secret)
        }
        None => (
            form.client_id.clone().unwrap_or_default(),
            form.client_secret.clone().unwrap_or_default(),
        ),
    };
    if id.is_empty() {
        return Err(unauthorized("`client_id` is missing."));
    }
    if secret.is_empty() {
        return Err(unauthorized("`client_secret` is missing or empty."));
    }
    Ok(id)
}

/// `application/x-www-form-urlencoded` decoding of one value.
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

async fn redeem_code(
    sandbox: &Sandbox,
    form: &TokenForm,
    client_id: &str,
) -> Result<Response, OAuthError> {
    let code = form
        .code
        .as_deref()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("`code` is missing."))?;
    let redirect_uri = form
        .redirect_uri
        .as_deref()
        .ok_or_else(|| OAuthError::invalid_request("`redirect_uri` is missing."))?;
    // Taken out on the first attempt, whatever its outcome: a code is single
    // use, and a failed attempt must not leave it open to guessing the verifier.
    let grant = match parse_key(code) {
        Some(key) => sandbox.codes.remove(&key).await,
        None => None,
    }
    .filter(|g| g.expires_at > Instant::now())
    .ok_or_else(|| {
        OAuthError::invalid_grant("The code is unknown, expired, or was already used.")
    })?;
    if *grant.client_id != *client_id {
        return Err(OAuthError::invalid_grant(
            "The code was issued to another client_id.",
        ));
    }
    if *grant.redirect_uri != *redirect_uri {
        return Err(OAuthError::invalid_grant(
            "`redirect_uri` differs from the one given at /authorize.",
        ));
    }
    match (&grant.challenge, form.code_verifier.as_deref()) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err(OAuthError::invalid_grant(
                "`code_verifier` was sent, but /authorize got no code_challenge.",
            ));
        }
        (Some(_), None) => {
            return Err(OAuthError::invalid_grant(
                "`code_verifier` is missing; /authorize got a code_challenge.",
            ));
        }
        (Some(challenge), Some(verifier)) => {
            if !pkce_s256_matches(verifier, challenge) {
                return Err(OAuthError::invalid_grant(
                    "`code_verifier` does not match the code_challenge.",
                ));
            }
        }
    }
    Ok(issue_tokens(sandbox, &grant.user, &grant.client_id, &grant.scope).await)
}

async fn redeem_refresh_token(
    sandbox: &Sandbox,
    form: &TokenForm,
    client_id: &str,
) -> Result<Response, OAuthError> {
    let presented = form
        .refresh_token
        .as_deref()
        .ok_or_else(|| OAuthError::invalid_request("`refresh_token` is missing."))?;
    // Rotation: the old refresh token dies with its first use.
    let grant = match presented
        .strip_prefix(REFRESH_TOKEN_PREFIX)
        .and_then(parse_key)
    {
        Some(key) => sandbox.refresh_tokens.remove(&key).await,
        None => None,
    }
    .filter(|g| g.expires_at > Instant::now())
    .ok_or_else(|| {
        OAuthError::invalid_grant("The refresh token is unknown, expired, or was already used.")
    })?;
    if *grant.client_id != *client_id {
        return Err(OAuthError::invalid_grant(
            "The refresh token was issued to another client_id.",
        ));
    }
    let scope: Arc<str> = match form.scope.as_deref() {
        None => grant.scope.clone(),
        Some(asked) => {
            // RFC 6749 §6: a refresh may narrow the scope, never widen it.
            let granted: Vec<&str> = grant.scope.split(' ').collect();
            let asked: Vec<&str> = asked.split_whitespace().collect();
            if let Some(extra) = asked.iter().find(|s| !granted.contains(s)) {
                return Err(OAuthError::new(
                    "invalid_scope",
                    format!("The scope `{extra}` was not granted originally."),
                ));
            }
            asked.join(" ").into()
        }
    };
    Ok(issue_tokens(sandbox, &grant.user, &grant.client_id, &scope).await)
}

async fn issue_tokens(
    sandbox: &Sandbox,
    user: &Arc<str>,
    client_id: &Arc<str>,
    scope: &Arc<str>,
) -> Response {
    let now = Instant::now();
    let access = random_key();
    let refresh = random_key();
    sandbox
        .access_tokens
        .insert(
            access,
            Arc::new(AccessGrant {
                user: user.clone(),
                expires_at: now + ACCESS_TOKEN_TTL,
            }),
        )
        .await;
    sandbox
        .refresh_tokens
        .insert(
            refresh,
            Arc::new(RefreshGrant {
                user: user.clone(),
                client_id: client_id.clone(),
                scope: scope.clone(),
                expires_at: now + REFRESH_TOKEN_TTL,
            }),
        )
        .await;
    let body = TokenResponse {
        access_token: format!("{ACCESS_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(access)),
        token_type: "bearer",
        expires_in: ACCESS_TOKEN_TTL.as_secs(),
        refresh_token: format!("{REFRESH_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(refresh)),
        scope,
    };
    (StatusCode::OK, no_store(), Json(body)).into_response()
}

/// RFC 7636 §4.6: BASE64URL-NOPAD(SHA256(verifier)) == challenge. A plain
/// comparison is fine: the code dies on the first attempt, so there is no
/// second guess to time.
fn pkce_s256_matches(verifier: &str, challenge: &str) -> bool {
    is_pkce_value(verifier) && URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)) == challenge
}

// ---------------------------------------------------------------------------
// GET /userinfo

#[derive(Serialize)]
struct UserInfo {
    sub: String,
    preferred_username: String,
    name: String,
    email: String,
    email_verified: bool,
    picture: String,
}

async fn userinfo(State(sandbox): State<Arc<Sandbox>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(bearer) = bearer else {
        return invalid_token("No `Authorization: Bearer` access token was sent.");
    };
    let grant = match bearer.strip_prefix(ACCESS_TOKEN_PREFIX).and_then(parse_key) {
        Some(key) => sandbox.access_tokens.get(&key).await,
        None => None,
    }
    .filter(|g| g.expires_at > Instant::now());
    let Some(grant) = grant else {
        return invalid_token("The access token is unknown or expired.");
    };
    let name = &*grant.user;
    let info = UserInfo {
        sub: subject_for(name).to_string(),
        preferred_username: name.to_owned(),
        name: display_name(name),
        email: format!("{name}@sandbox.test"),
        email_verified: true,
        picture: format!("{}/avatar/{name}.svg", sandbox.origin),
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(info),
    )
        .into_response()
}

/// RFC 6750 §3: 401 with a `WWW-Authenticate: Bearer` challenge.
fn invalid_token(description: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"sandbox\", error=\"invalid_token\"",
        )],
        Json(ErrorBody {
            error: "invalid_token",
            error_description: description,
        }),
    )
        .into_response()
}

/// The stable subject of a test user: the first 8 bytes (big-endian) of
/// SHA-256("sandbox:" + name). Stable across restarts, so bindings survive.
fn subject_for(name: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"sandbox:")
        .chain_update(name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `alice` -> `Alice`.
fn display_name(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// GET /avatar/{name}.svg

async fn avatar(Path(file): Path<String>) -> Response {
    let Some(name) = file.strip_suffix(".svg").filter(|n| is_user_name(n)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    const COLOURS: [&str; 6] = [
        "#1f6feb", "#8250df", "#bf3989", "#cf222e", "#bc4c00", "#1a7f37",
    ];
    // Invariant: `is_user_name` guarantees a first ASCII character.
    let initial = name[..1].to_ascii_uppercase();
    let colour = COLOURS[(subject_for(name) % COLOURS.len() as u64) as usize];
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"64\" height=\"64\" viewBox=\"0 0 64 64\">\
<circle cx=\"32\" cy=\"32\" r=\"32\" fill=\"{colour}\"/>\
<text x=\"32\" y=\"43\" font-family=\"sans-serif\" font-size=\"30\" fill=\"#fff\" text-anchor=\"middle\">{initial}</text></svg>"
    );
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        svg,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request past the listener's bound is answered 503 at once, and
    /// the slot comes back when the request holding it finishes.
    #[tokio::test]
    async fn a_full_listener_answers_503_at_once() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let held = gate.clone();
        let routes = Router::new()
            .route(
                "/slow",
                get(move || {
                    let held = held.clone();
                    async move {
                        held.notified().await;
                        "done"
                    }
                }),
            )
            .route("/fast", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, bounded(routes, 1)).await });
        let client = reqwest::Client::new();
        let slow = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .get(format!("http://{addr}/slow"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        });
        let fast = format!("http://{addr}/fast");
        let mut refused = false;
        for _ in 0..100 {
            if client.get(&fast).send().await.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            refused,
            "the second request was not refused while the slot was held"
        );
        gate.notify_one();
        assert_eq!(slow.await.unwrap(), StatusCode::OK);
        assert_eq!(
            client.get(&fast).send().await.unwrap().status(),
            StatusCode::OK
        );
    }

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    #[test]
    fn subject_is_stable_and_distinct() {
        assert_eq!(subject_for("alice"), subject_for("alice"));
        assert_ne!(subject_for("alice"), subject_for("bob"));
        assert_ne!(subject_for("alice"), subject_for("Alice"));
        // Pinned: bindings made by earlier versions must keep resolving.
        assert_eq!(subject_for("alice"), 12617301175701908547);
        let digest = Sha256::digest(b"sandbox:alice");
        assert_eq!(
            subject_for("alice"),
            u64::from_be_bytes(digest[..8].try_into().unwrap())
        );
    }

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert!(pkce_s256_matches(VERIFIER, CHALLENGE));
        assert!(!pkce_s256_matches(&VERIFIER.replace('d', "e"), CHALLENGE));
        assert!(!pkce_s256_matches("short", CHALLENGE));
    }

    fn query(extra: &str) -> String {
        format!(
            "response_type=code&client_id=app&redirect_uri=http%3A%2F%2Flocalhost%2Fcb%3Fx%3D1\
&state=st&scope=openid+profile&code_challenge={CHALLENGE}&code_challenge_method=S256{extra}"
        )
    }

    #[test]
    fn authorize_parses_a_good_request() {
        let r = parse_authorize(&query("&sandbox_user=bob")).unwrap();
        assert_eq!(r.client_id, "app");
        assert_eq!(r.redirect_uri.as_str(), "http://localhost/cb?x=1");
        assert_eq!(r.scope, "openid profile");
        assert_eq!(r.challenge.as_deref(), Some(CHALLENGE));
        assert_eq!(r.decision, Decision::Approve("bob".into()));
        assert_eq!(parse_authorize(&query("")).unwrap().decision, Decision::Ask);
        assert_eq!(
            parse_authorize(&query("&sandbox_deny=1")).unwrap().decision,
            Decision::Deny
        );
    }

    #[test]
    fn authorize_rejects_bad_requests() {
        let bad = [
            query("").replace("response_type=code", "response_type=token"),
            query("").replace("client_id=app", "client_id="),
            query("").replace("http%3A%2F%2Flocalhost", "ftp%3A%2F%2Flocalhost"),
            query("").replace("http%3A%2F%2Flocalhost%2Fcb", "%2Fcb"),
            query("").replace("state=st", "state="),
            query("").replace("S256", "plain"),
            query("").replace("&code_challenge_method=S256", ""),
            query("&state=again"),
            query("&sandbox_user=bad%20name"),
            query(&format!("&sandbox_user={}", "a".repeat(65))),
            query("&sandbox_user=bob&sandbox_deny=1"),
        ];
        for q in bad {
            assert!(parse_authorize(&q).is_err(), "accepted: {q}");
        }
    }

    #[test]
    fn escape_covers_html_metacharacters() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn picker_page_escapes_what_it_echoes() {
        let raw = query("").replace("client_id=app", "client_id=%3Cscript%3E");
        let page = picker_page(&raw, &parse_authorize(&raw).unwrap());
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("sandbox_user=alice"));
    }

    #[test]
    fn form_decode_handles_plus_and_percent() {
        assert_eq!(form_decode("a+b%3A%2Fc").as_deref(), Some("a b:/c"));
        assert_eq!(form_decode("bad%2"), None);
        assert_eq!(form_decode("bad%zz"), None);
    }

    #[test]
    fn display_name_capitalises() {
        assert_eq!(display_name("alice"), "Alice");
        assert_eq!(display_name("9lives"), "9lives");
    }
}
