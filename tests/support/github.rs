//! A GitHub OAuth App emulator for integration tests: github.com's
//! `/login/oauth/{authorize,access_token}` and api.github.com's
//! `/user{,/emails}` on one local port, answering in GitHub's exact wire
//! formats (token errors with HTTP 200, Accept-negotiated token bodies),
//! recording what it was sent, and injecting faults per endpoint.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::any,
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rand::{Rng, distr::Alphanumeric};
use serde::Serialize;
use sha2::{Digest, Sha256};
use url::{Url, form_urlencoded};

use super::faults::{Fault, Faults};

pub const CLIENT_ID: &str = "Iv1.8a61f9b3a7aba766";
pub const CLIENT_SECRET: &str = "5f2c1e9a7b3d4c6e8f0a1b2c3d4e5f6a7b8c9d0e";
pub const AUTHORIZE_PATH: &str = "/login/oauth/authorize";
pub const TOKEN_PATH: &str = "/login/oauth/access_token";
pub const USER_PATH: &str = "/user";
pub const EMAILS_PATH: &str = "/user/emails";
/// GitHub's lifetime for authorization codes.
pub const CODE_TTL: Duration = Duration::from_secs(600);

/// GitHub's body for a REST call without a `User-Agent`, served with HTTP 403.
pub const NO_USER_AGENT_BODY: &str = "Request forbidden by administrative rules. Please make sure your request has a User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required). Check https://developer.github.com for other possible causes.";
pub const BAD_CREDENTIALS_BODY: &str =
    r#"{"message":"Bad credentials","documentation_url":"https://docs.github.com/rest"}"#;
pub const EMAILS_NOT_FOUND_BODY: &str = r#"{"message":"Not Found","documentation_url":"https://docs.github.com/rest/users/emails#list-email-addresses-for-the-authenticated-user"}"#;
const DENIED_ERROR_URI: &str = "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-authorization-request-errors/#access-denied";
const JSON_UTF8: &str = "application/json; charset=utf-8";

/// The endpoints a fault can be armed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Authorize,
    Token,
    User,
    Emails,
}

/// A GitHub account the emulator can log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GithubUser {
    /// Stable numeric id: what authbroker must use as the subject.
    pub id: u64,
    /// Mutable user name.
    pub login: String,
    pub name: Option<String>,
    /// Defaults to `https://avatars.githubusercontent.com/u/{id}?v=4`.
    pub avatar_url: Option<String>,
    /// The public email shown on `/user` (often null on real accounts).
    pub email: Option<String>,
    /// What `/user/emails` lists.
    pub emails: Vec<GithubEmail>,
}

impl GithubUser {
    /// A user with no name and no email addresses.
    pub fn new(id: u64, login: &str) -> Self {
        GithubUser {
            id,
            login: login.to_owned(),
            name: None,
            avatar_url: None,
            email: None,
            emails: Vec::new(),
        }
    }

    /// GitHub's documentation user: private primary verified email, no public one.
    pub fn octocat() -> Self {
        GithubUser::new(583231, "octocat")
            .name("The Octocat")
            .with_email(GithubEmail::primary("octocat@github.com"))
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    pub fn public_email(mut self, email: &str) -> Self {
        self.email = Some(email.to_owned());
        self
    }

    pub fn with_email(mut self, email: GithubEmail) -> Self {
        self.emails.push(email);
        self
    }

    fn avatar(&self) -> String {
        self.avatar_url
            .clone()
            .unwrap_or_else(|| format!("https://avatars.githubusercontent.com/u/{}?v=4", self.id))
    }
}

/// One entry of `/user/emails`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GithubEmail {
    pub email: String,
    pub primary: bool,
    pub verified: bool,
    /// `"public"`, `"private"`, or null (GitHub's value for non-primary addresses).
    pub visibility: Option<String>,
}

impl GithubEmail {
    pub fn new(email: &str, primary: bool, verified: bool, visibility: Option<&str>) -> Self {
        GithubEmail {
            email: email.to_owned(),
            primary,
            verified,
            visibility: visibility.map(str::to_owned),
        }
    }

    /// Primary, verified, private: the usual main address.
    pub fn primary(email: &str) -> Self {
        Self::new(email, true, true, Some("private"))
    }

    /// A non-primary address.
    pub fn secondary(email: &str, verified: bool) -> Self {
        Self::new(email, false, verified, None)
    }
}

/// One request as the emulator saw it, for assertions. Secrets (client
/// secret, code, verifier, tokens) are replaced by `<redacted>`, so tests can
/// still see that they were sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub user_agent: Option<String>,
    /// Only the scheme (`Bearer`, `token`, `Basic`), never the credential.
    pub authorization: Option<String>,
    /// Query parameters, then body parameters, in order.
    pub params: Vec<(String, String)>,
    /// Why the request's shape is wrong for GitHub, if it is.
    pub violation: Option<String>,
}

impl SeenRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running emulator; the server stops when this is dropped.
pub struct GithubEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for GithubEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl GithubEmulator {
    /// Binds 127.0.0.1:0 and serves on the current Tokio runtime.
    pub async fn start() -> GithubEmulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the GitHub emulator");
        let port = listener.local_addr().expect("emulator address").port();
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route(AUTHORIZE_PATH, any(browser_authorize))
            .route(TOKEN_PATH, any(access_token))
            .route(USER_PATH, any(user))
            .route(EMAILS_PATH, any(emails))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            // Errors here only mean the test runtime is going away.
            let _ = axum::serve(listener, app).await;
        });
        GithubEmulator {
            base_url: format!("http://127.0.0.1:{port}"),
            shared,
            server,
        }
    }

    pub fn client_id(&self) -> &str {
        CLIENT_ID
    }

    pub fn client_secret(&self) -> &str {
        CLIENT_SECRET
    }

    /// `{base_url}{path}`, e.g. `url(TOKEN_PATH)`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Registers (or replaces, by login) a user the emulator can log in.
    pub fn add_user(&self, user: GithubUser) {
        lock(&self.shared.users).insert(user.login.clone(), user);
    }

    /// The browser step: what github.com would do once `login` consents to
    /// the authorize URL authbroker produced. Checks the URL, grants the
    /// requested scopes and returns the code GitHub would redirect with.
    pub fn authorize(&self, authorize_url: &str, login: &str) -> Result<String, String> {
        self.authorize_granting(authorize_url, login, None)
    }

    /// Like [`authorize`](Self::authorize), but the user grants exactly `scopes`.
    pub fn authorize_with_scopes(
        &self,
        authorize_url: &str,
        login: &str,
        scopes: &[&str],
    ) -> Result<String, String> {
        let scopes = scopes.iter().map(|s| s.to_string()).collect();
        self.authorize_granting(authorize_url, login, Some(scopes))
    }

    fn authorize_granting(
        &self,
        authorize_url: &str,
        login: &str,
        scopes: Option<Vec<String>>,
    ) -> Result<String, String> {
        let url = Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
        let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        self.shared.record(SeenRequest {
            method: "GET".into(),
            path: url.path().to_owned(),
            content_type: None,
            accept: None,
            user_agent: None,
            authorization: None,
            params: redact(&params),
            violation: None,
        });
        if url.path() != AUTHORIZE_PATH {
            return Err(format!("path is {}, expected {AUTHORIZE_PATH}", url.path()));
        }
        let request = AuthorizeRequest::parse(&params).map_err(|e| e.message())?;
        self.shared.issue_code(&request, login, scopes)
    }

    /// The user `GET /login/oauth/authorize` logs in when the URL has no
    /// `login=` hint (with exactly one registered user, that one is used).
    pub fn set_browser_user(&self, login: &str) {
        lock(&self.shared.browser).user = Some(login.to_owned());
    }

    /// Makes `GET /login/oauth/authorize` redirect with `error=access_denied`.
    pub fn set_user_denies(&self, denies: bool) {
        lock(&self.shared.browser).denies = denies;
    }

    /// Mints a token for `login` directly, skipping the OAuth dance.
    pub fn issue_token(&self, login: &str, scopes: &[&str]) -> String {
        let token = new_token();
        lock(&self.shared.tokens).insert(
            token.clone(),
            TokenGrant {
                login: login.to_owned(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            },
        );
        token
    }

    /// Every code issued so far is now older than 10 minutes.
    pub fn expire_codes(&self) {
        let now = Instant::now();
        for grant in lock(&self.shared.codes).values_mut() {
            grant.expires_at = now;
        }
    }

    /// Every token issued so far stops working (the user revoked the app).
    pub fn revoke_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }

    pub fn set_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.shared.faults.set(endpoint, fault);
    }

    /// Only the next `times` requests to `endpoint` get `fault`.
    pub fn set_fault_times(&self, endpoint: Endpoint, fault: Fault, times: u32) {
        self.shared.faults.set_times(endpoint, fault, times);
    }

    pub fn clear_faults(&self) {
        self.shared.faults.clear_all();
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    pub fn requests_to(&self, path: &str) -> Vec<SeenRequest> {
        lock(&self.shared.seen)
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// What was wrong with badly shaped requests; tests assert this is empty.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared.seen)
            .iter()
            .filter_map(|r| {
                r.violation
                    .as_ref()
                    .map(|v| format!("{} {}: {v}", r.method, r.path))
            })
            .collect()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.seen).clear();
    }
}

// ---------------------------------------------------------------------------
// State

/// Std mutexes: each is held for a map operation only, never across an `.await`.
#[derive(Default)]
struct Shared {
    users: Mutex<HashMap<String, GithubUser>>,
    codes: Mutex<HashMap<String, CodeGrant>>,
    tokens: Mutex<HashMap<String, TokenGrant>>,
    browser: Mutex<Browser>,
    faults: Faults<Endpoint>,
    seen: Mutex<Vec<SeenRequest>>,
}

#[derive(Default)]
struct Browser {
    user: Option<String>,
    denies: bool,
}

struct CodeGrant {
    login: String,
    scopes: Vec<String>,
    redirect_uri: Option<String>,
    challenge: Option<String>,
    expires_at: Instant,
}

#[derive(Clone)]
struct TokenGrant {
    login: String,
    scopes: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A failed assertion on one test thread must not poison the emulator.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn record(&self, request: SeenRequest) {
        lock(&self.seen).push(request);
    }

    fn issue_code(
        &self,
        request: &AuthorizeRequest,
        login: &str,
        scopes: Option<Vec<String>>,
    ) -> Result<String, String> {
        if !lock(&self.users).contains_key(login) {
            return Err(format!("no registered user with login {login:?}"));
        }
        let mut bytes = [0u8; 10];
        rand::rng().fill(&mut bytes);
        // Real codes are 20 lower-case hex characters.
        let code: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        lock(&self.codes).insert(
            code.clone(),
            CodeGrant {
                login: login.to_owned(),
                scopes: scopes.unwrap_or_else(|| request.scopes.clone()),
                redirect_uri: request.redirect_uri.as_ref().map(|u| u.to_string()),
                challenge: request.challenge.clone(),
                expires_at: Instant::now() + CODE_TTL,
            },
        );
        Ok(code)
    }

    /// The token-endpoint rules, in GitHub's order: client credentials, then
    /// the code (consumed by any attempt that gets this far), then its bindings.
    /// Returns the new token and the scopes it carries.
    fn exchange(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> Result<(String, Vec<String>), TokenError> {
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let (client_id, client_secret) = match &basic {
            Some((id, secret)) => (Some(id.as_str()), Some(secret.as_str())),
            None => (field("client_id"), field("client_secret")),
        };
        if client_id != Some(CLIENT_ID) || client_secret != Some(CLIENT_SECRET) {
            return Err(TokenError::IncorrectClientCredentials);
        }
        let grant = field("code")
            .and_then(|code| lock(&self.codes).remove(code))
            .filter(|g| g.expires_at > Instant::now())
            .ok_or(TokenError::BadVerificationCode)?;
        if let (Some(sent), Some(authorized)) = (field("redirect_uri"), &grant.redirect_uri)
            && sent != authorized
        {
            return Err(TokenError::RedirectUriMismatch);
        }
        // GitHub's exact answer to a PKCE mismatch is unknown; a verifier
        // without a challenge is refused too, as it means the client lost the
        // challenge from its authorize URL.
        match (&grant.challenge, field("code_verifier")) {
            (None, None) => {}
            (Some(challenge), Some(verifier))
                if URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)) == *challenge => {}
            _ => return Err(TokenError::BadVerificationCode),
        }
        let token = new_token();
        lock(&self.tokens).insert(
            token.clone(),
            TokenGrant {
                login: grant.login,
                scopes: grant.scopes.clone(),
            },
        );
        Ok((token, grant.scopes))
    }
}

/// `gho_` + 36 alphanumerics, like OAuth App user tokens.
fn new_token() -> String {
    let tail: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(36)
        .map(char::from)
        .collect();
    format!("gho_{tail}")
}

// ---------------------------------------------------------------------------
// Authorize

struct AuthorizeRequest {
    redirect_uri: Option<Url>,
    state: String,
    scopes: Vec<String>,
    challenge: Option<String>,
    login_hint: Option<String>,
}

enum AuthorizeError {
    /// GitHub shows a 404 page for an unknown application.
    UnknownClient,
    Invalid(String),
}

impl AuthorizeError {
    fn message(&self) -> String {
        match self {
            AuthorizeError::UnknownClient => format!("client_id is not {CLIENT_ID}"),
            AuthorizeError::Invalid(why) => why.clone(),
        }
    }
}

impl AuthorizeRequest {
    /// Stricter than GitHub where authbroker must be careful anyway: `state`
    /// is required, and a PKCE challenge must be a well-formed S256 one.
    fn parse(params: &[(String, String)]) -> Result<AuthorizeRequest, AuthorizeError> {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (k, v) in params {
            if seen.insert(k, v).is_some() {
                return Err(AuthorizeError::Invalid(format!(
                    "parameter {k} given twice"
                )));
            }
        }
        if seen.get("client_id") != Some(&CLIENT_ID) {
            return Err(AuthorizeError::UnknownClient);
        }
        let redirect_uri = match seen.get("redirect_uri") {
            None => None,
            Some(raw) => Some(
                Url::parse(raw)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| {
                        AuthorizeError::Invalid(format!(
                            "redirect_uri {raw:?} is not an absolute http(s) URL"
                        ))
                    })?,
            ),
        };
        let state = seen
            .get("state")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthorizeError::Invalid("state is missing".into()))?
            .to_string();
        // Space-delimited per the docs; commas work in practice.
        let scopes = seen
            .get("scope")
            .map(|s| {
                s.split([' ', ','])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let challenge = match (
            seen.get("code_challenge"),
            seen.get("code_challenge_method"),
        ) {
            (None, None) => None,
            (Some(c), Some(&"S256")) if c.len() == 43 && URL_SAFE_NO_PAD.decode(c).is_ok() => {
                Some(c.to_string())
            }
            (Some(_), Some(&"S256")) => {
                return Err(AuthorizeError::Invalid(
                    "code_challenge is not a base64url SHA-256 (43 chars)".into(),
                ));
            }
            _ => {
                return Err(AuthorizeError::Invalid(
                    "GitHub supports PKCE with code_challenge_method=S256 only, and both parameters together".into(),
                ));
            }
        };
        Ok(AuthorizeRequest {
            redirect_uri,
            state,
            scopes,
            challenge,
            login_hint: seen.get("login").map(|s| s.to_string()),
        })
    }
}

/// `GET /login/oauth/authorize`, for browser-like tests: consents at once
/// for the hinted or pre-selected user, or denies when told to.
async fn browser_authorize(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let params = query_params(&uri);
    shared.record(seen(
        &method,
        &uri,
        &headers,
        params.clone(),
        Vec::new(),
        None,
    ));
    if let Some(response) = shared.faults.apply(Endpoint::Authorize).await {
        return response;
    }
    let request = match AuthorizeRequest::parse(&params) {
        Ok(r) => r,
        Err(AuthorizeError::UnknownClient) => {
            return (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                "<html><body>Not Found</body></html>",
            )
                .into_response();
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, e.message()),
    };
    let Some(mut target) = request.redirect_uri.clone() else {
        return text(
            StatusCode::BAD_REQUEST,
            "the emulator has no registered callback URL: send redirect_uri".into(),
        );
    };
    let (chosen, denies) = {
        let browser = lock(&shared.browser);
        (browser.user.clone(), browser.denies)
    };
    let only_user = {
        let users = lock(&shared.users);
        (users.len() == 1)
            .then(|| users.keys().next().cloned())
            .flatten()
    };
    let user = request.login_hint.clone().or(chosen).or(only_user);
    if denies {
        target
            .query_pairs_mut()
            .append_pair("error", "access_denied")
            .append_pair(
                "error_description",
                "The user has denied your application access.",
            )
            .append_pair("error_uri", DENIED_ERROR_URI)
            .append_pair("state", &request.state);
    } else {
        let Some(user) = user else {
            return text(
                StatusCode::BAD_REQUEST,
                "no user selected: add login=NAME or call set_browser_user".into(),
            );
        };
        let code = match shared.issue_code(&request, &user, None) {
            Ok(code) => code,
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
        };
        target
            .query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", &request.state);
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

// ---------------------------------------------------------------------------
// Token

#[derive(Clone, Copy)]
enum TokenError {
    BadVerificationCode,
    IncorrectClientCredentials,
    RedirectUriMismatch,
}

impl TokenError {
    fn fields(self) -> [(&'static str, &'static str); 3] {
        let (error, description, uri) = match self {
            TokenError::BadVerificationCode => (
                "bad_verification_code",
                "The code passed is incorrect or expired.",
                "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors/#bad-verification-code",
            ),
            TokenError::IncorrectClientCredentials => (
                "incorrect_client_credentials",
                "The client_id and/or client_secret passed are incorrect.",
                "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors/#incorrect-client-credentials",
            ),
            TokenError::RedirectUriMismatch => (
                "redirect_uri_mismatch",
                "The redirect_uri MUST match the registered callback URL for this application.",
                "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-authorization-request-errors/#redirect-uri-mismatch2",
            ),
        };
        [
            ("error", error),
            ("error_description", description),
            ("error_uri", uri),
        ]
    }
}

/// GitHub answers the token call in the format `Accept` asks for, defaulting to a form body.
#[derive(Clone, Copy)]
enum Format {
    Form,
    Json,
    Xml,
}

impl Format {
    fn negotiate(headers: &HeaderMap) -> Format {
        let accept = header_str(headers, header::ACCEPT).unwrap_or_default();
        if accept.contains("json") {
            Format::Json
        } else if accept.contains("application/xml") {
            Format::Xml
        } else {
            Format::Form
        }
    }

    /// Always HTTP 200, errors included: that is GitHub's behaviour.
    fn render(self, fields: &[(&str, &str)]) -> Response {
        let (content_type, body) = match self {
            Format::Json => {
                // By hand, because a serde_json map may reorder the keys.
                let parts: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{}:{}",
                            serde_json::Value::from(*k),
                            serde_json::Value::from(*v)
                        )
                    })
                    .collect();
                (JSON_UTF8, format!("{{{}}}", parts.join(",")))
            }
            Format::Form => (
                "application/x-www-form-urlencoded; charset=utf-8",
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(fields)
                    .finish(),
            ),
            Format::Xml => (
                "application/xml; charset=utf-8",
                format!(
                    "<OAuth>{}</OAuth>",
                    fields
                        .iter()
                        .map(|(k, v)| format!("<{k}>{}</{k}>", xml_escape(v)))
                        .collect::<String>()
                ),
            ),
        };
        (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn access_token(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header_str(&headers, header::CONTENT_TYPE).unwrap_or_default();
    let is_form = content_type.starts_with("application/x-www-form-urlencoded");
    let body_params: Vec<(String, String)> = if is_form {
        form_urlencoded::parse(&body).into_owned().collect()
    } else if content_type.contains("json") {
        json_params(&body)
    } else {
        Vec::new()
    };
    let query = query_params(&uri);
    let violation = if method != Method::POST {
        Some(format!("the token endpoint takes POST, not {method}"))
    } else if !is_form {
        Some(format!(
            "the token request must be application/x-www-form-urlencoded, not {content_type:?}"
        ))
    } else if !headers.contains_key(header::USER_AGENT) {
        Some("the token request has no User-Agent header".into())
    } else if !query.is_empty() {
        Some("parameters (credentials!) were sent in the query string".into())
    } else {
        None
    };
    shared.record(seen(
        &method,
        &uri,
        &headers,
        query,
        body_params.clone(),
        violation.clone(),
    ));
    if let Some(response) = shared.faults.apply(Endpoint::Token).await {
        return response;
    }
    if let Some(violation) = violation {
        return text(StatusCode::BAD_REQUEST, violation);
    }
    let format = Format::negotiate(&headers);
    match shared.exchange(&body_params, basic_credentials(&headers)) {
        Ok((token, scopes)) => {
            // Granted scopes come back comma-separated.
            let scope = scopes.join(",");
            let fields = match format {
                Format::Json => [
                    ("access_token", token.as_str()),
                    ("token_type", "bearer"),
                    ("scope", scope.as_str()),
                ],
                Format::Form | Format::Xml => [
                    ("access_token", token.as_str()),
                    ("scope", scope.as_str()),
                    ("token_type", "bearer"),
                ],
            };
            format.render(&fields)
        }
        Err(e) => format.render(&e.fields()),
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let (scheme, credentials) = header_str(headers, header::AUTHORIZATION)?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(credentials.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn json_params(body: &[u8]) -> Vec<(String, String)> {
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// REST API: /user and /user/emails

#[derive(Serialize)]
struct UserJson<'a> {
    login: &'a str,
    id: u64,
    node_id: String,
    avatar_url: String,
    gravatar_id: &'static str,
    url: String,
    html_url: String,
    followers_url: String,
    following_url: String,
    gists_url: String,
    starred_url: String,
    subscriptions_url: String,
    organizations_url: String,
    repos_url: String,
    events_url: String,
    received_events_url: String,
    #[serde(rename = "type")]
    kind: &'static str,
    site_admin: bool,
    name: Option<&'a str>,
    company: Option<&'static str>,
    blog: &'static str,
    location: Option<&'static str>,
    email: Option<&'a str>,
    hireable: Option<bool>,
    bio: Option<&'static str>,
    twitter_username: Option<&'static str>,
    public_repos: u32,
    public_gists: u32,
    followers: u32,
    following: u32,
    created_at: &'static str,
    updated_at: &'static str,
}

impl<'a> UserJson<'a> {
    fn of(user: &'a GithubUser) -> Self {
        let api = format!("https://api.github.com/users/{}", user.login);
        UserJson {
            login: &user.login,
            id: user.id,
            // GitHub's legacy global node id: base64("04:User" + id).
            node_id: STANDARD.encode(format!("04:User{}", user.id)),
            avatar_url: user.avatar(),
            gravatar_id: "",
            html_url: format!("https://github.com/{}", user.login),
            followers_url: format!("{api}/followers"),
            following_url: format!("{api}/following{{/other_user}}"),
            gists_url: format!("{api}/gists{{/gist_id}}"),
            starred_url: format!("{api}/starred{{/owner}}{{/repo}}"),
            subscriptions_url: format!("{api}/subscriptions"),
            organizations_url: format!("{api}/orgs"),
            repos_url: format!("{api}/repos"),
            events_url: format!("{api}/events{{/privacy}}"),
            received_events_url: format!("{api}/received_events"),
            url: api,
            kind: "User",
            site_admin: false,
            name: user.name.as_deref(),
            company: None,
            blog: "",
            location: None,
            email: user.email.as_deref(),
            hireable: None,
            bio: None,
            twitter_username: None,
            public_repos: 8,
            public_gists: 8,
            followers: 20,
            following: 0,
            created_at: "2011-01-25T18:44:36Z",
            updated_at: "2024-11-20T12:00:00Z",
        }
    }
}

/// GitHub's REST rules shared by both endpoints: a User-Agent, then a known
/// token as `Bearer` or legacy `token`.
/// The rejection is boxed only to keep the `Result` small.
fn api_caller(
    shared: &Shared,
    headers: &HeaderMap,
    doc_url: &str,
) -> Result<TokenGrant, Box<Response>> {
    if !headers.contains_key(header::USER_AGENT) {
        return Err(Box::new(text(
            StatusCode::FORBIDDEN,
            NO_USER_AGENT_BODY.into(),
        )));
    }
    let Some(authorization) = header_str(headers, header::AUTHORIZATION) else {
        return Err(Box::new(json(
            StatusCode::UNAUTHORIZED,
            format!(r#"{{"message":"Requires authentication","documentation_url":"{doc_url}"}}"#),
            None,
        )));
    };
    let token = authorization
        .split_once(' ')
        .filter(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")
        })
        .map(|(_, token)| token.trim());
    let grant = token.and_then(|t| lock(&shared.tokens).get(t).cloned());
    grant.ok_or_else(|| {
        Box::new(json(
            StatusCode::UNAUTHORIZED,
            BAD_CREDENTIALS_BODY.into(),
            None,
        ))
    })
}

fn api_violation(method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if method != Method::GET {
        Some(format!("the REST endpoint takes GET, not {method}"))
    } else if !headers.contains_key(header::USER_AGENT) {
        Some("no User-Agent header (api.github.com answers 403)".into())
    } else if uri.query().is_some_and(|q| q.contains("access_token")) {
        Some("access_token in the query string (removed by GitHub in 2021)".into())
    } else {
        None
    }
}

async fn user(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let violation = api_violation(&method, &uri, &headers);
    shared.record(seen(
        &method,
        &uri,
        &headers,
        query_params(&uri),
        Vec::new(),
        violation,
    ));
    if let Some(response) = shared.faults.apply(Endpoint::User).await {
        return response;
    }
    let caller = match api_caller(
        &shared,
        &headers,
        "https://docs.github.com/rest/users/users#get-the-authenticated-user",
    ) {
        Ok(caller) => caller,
        Err(response) => return *response,
    };
    let Some(account) = lock(&shared.users).get(&caller.login).cloned() else {
        return json(StatusCode::UNAUTHORIZED, BAD_CREDENTIALS_BODY.into(), None);
    };
    let body = serde_json::to_string(&UserJson::of(&account)).unwrap_or_default();
    json(StatusCode::OK, body, Some((&caller.scopes, "")))
}

async fn emails(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let violation = api_violation(&method, &uri, &headers);
    shared.record(seen(
        &method,
        &uri,
        &headers,
        query_params(&uri),
        Vec::new(),
        violation,
    ));
    if let Some(response) = shared.faults.apply(Endpoint::Emails).await {
        return response;
    }
    let caller = match api_caller(
        &shared,
        &headers,
        "https://docs.github.com/rest/users/emails#list-email-addresses-for-the-authenticated-user",
    ) {
        Ok(caller) => caller,
        Err(response) => return *response,
    };
    let accepted = "user, user:email";
    if !caller
        .scopes
        .iter()
        .any(|s| s == "user" || s == "user:email")
    {
        return json(
            StatusCode::NOT_FOUND,
            EMAILS_NOT_FOUND_BODY.into(),
            Some((&caller.scopes, accepted)),
        );
    }
    let Some(account) = lock(&shared.users).get(&caller.login).cloned() else {
        return json(StatusCode::UNAUTHORIZED, BAD_CREDENTIALS_BODY.into(), None);
    };
    let body = serde_json::to_string(&account.emails).unwrap_or_default();
    json(StatusCode::OK, body, Some((&caller.scopes, accepted)))
}

/// A REST answer, with GitHub's scope headers when the caller is known.
fn json(status: StatusCode, body: String, scopes: Option<(&[String], &str)>) -> Response {
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, JSON_UTF8),
            (
                header::HeaderName::from_static("x-github-media-type"),
                "github.v3; format=json",
            ),
        ],
        body,
    )
        .into_response();
    if let Some((granted, accepted)) = scopes {
        let headers = response.headers_mut();
        if let Ok(v) = granted.join(", ").parse() {
            headers.insert("x-oauth-scopes", v);
        }
        if let Ok(v) = accepted.parse() {
            headers.insert("x-accepted-oauth-scopes", v);
        }
    }
    response
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
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

fn redact(params: &[(String, String)]) -> Vec<(String, String)> {
    params
        .iter()
        .map(|(k, v)| {
            let v = if SECRET_PARAMS.contains(&k.as_str()) {
                "<redacted>".to_owned()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

fn seen(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    query: Vec<(String, String)>,
    body: Vec<(String, String)>,
    violation: Option<String>,
) -> SeenRequest {
    let mut params = redact(&query);
    params.extend(redact(&body));
    SeenRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        content_type: header_str(headers, header::CONTENT_TYPE).map(str::to_owned),
        accept: header_str(headers, header::ACCEPT).map(str::to_owned),
        user_agent: header_str(headers, header::USER_AGENT).map(str::to_owned),
        authorization: header_str(headers, header::AUTHORIZATION)
            .map(|v| v.split(' ').next().unwrap_or_default().to_owned()),
        params,
        violation,
    }
}

fn query_params(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
