//! The GitHub OAuth App emulator: github.com's
//! `/login/oauth/{authorize,access_token}` and api.github.com's
//! `/user{,/emails}` on one local port, answering in GitHub's exact wire
//! formats (token errors with HTTP 200, Accept-negotiated token bodies),
//! checking the shape of what it is sent, and injecting faults per endpoint
//! ([`Endpoint`]) or per contract step ([`Step`]). It implements the
//! [`Emulator`] contract for the conformance suite, and keeps GitHub's own
//! controls (accounts by login, a browser user who consents or denies,
//! tokens minted directly) for the GitHub-specific tests.

use std::{
    collections::HashMap,
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
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rand::{Rng, distr::Alphanumeric};
use serde::Serialize;
use sha2::{Digest, Sha256};
use url::{Url, form_urlencoded};

use super::wire::{Req, basic_credentials, header_str, provider_config, redacted, state_of};
use super::{
    Capabilities, Core, Emulator, ExpectedIdentity, Fault, Faults, SeenRequest, Step, lock, serve,
};

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
const BROWSER_DENIED_ERROR_URI: &str = "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-authorization-request-errors/#access-denied";
const JSON_UTF8: &str = "application/json; charset=utf-8";

/// The preset's default scopes, granted to tokens made by `issue_tokens`.
pub const DEFAULT_SCOPES: [&str; 2] = ["read:user", "user:email"];
/// docs/providers.md#github, from GitHub's troubleshooting docs (decoded):
/// what [`Emulator::deny`] hands the callback. The browser endpoint sends
/// the absolute `https://docs.github.com/…#access-denied` form seen live;
/// both exist.
pub const DENIED_ERROR_URI: &str = "/apps/building-integrations/setting-up-and-registering-oauth-apps/troubleshooting-authorization-request-errors/#access-denied";
pub const DENIED_DESCRIPTION: &str = "The user has denied your application access.";

/// The endpoints a fault can be armed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Authorize,
    Token,
    User,
    Emails,
}

impl Endpoint {
    /// The contract step an endpoint's calls are logged under.
    fn step(self) -> Step {
        match self {
            Endpoint::Authorize => Step::Authorize,
            Endpoint::Token => Step::Token,
            Endpoint::User | Endpoint::Emails => Step::Identity,
        }
    }
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
        let shared = Arc::new(Shared::default());
        let router = Router::new()
            .route(AUTHORIZE_PATH, any(browser_authorize))
            .route(TOKEN_PATH, any(access_token))
            .route(USER_PATH, any(user))
            .route(EMAILS_PATH, any(emails))
            .with_state(shared.clone());
        let (base_url, server) = serve(router).await;
        GithubEmulator {
            base_url,
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

    /// Registers (or replaces, by login) an account the emulator can log in.
    pub fn add_account(&self, user: GithubUser) {
        lock(&self.shared.users).insert(user.login.clone(), user);
    }

    /// Registers a hand-made account (say, without a verified email) under
    /// the contract's `seed`; returns what authbroker must report with the
    /// default scopes.
    pub fn add_github_user(&self, seed: &str, user: GithubUser) -> ExpectedIdentity {
        let expected = expected_identity(&user);
        self.add_account(user.clone());
        lock(&self.shared.seeds).insert(seed.into(), user);
        expected
    }

    /// The account registered under `seed`.
    pub fn user(&self, seed: &str) -> Option<GithubUser> {
        lock(&self.shared.seeds).get(seed).cloned()
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

    /// The browser step, logged as the page's answer would be: a redirect,
    /// or a 400 page.
    fn authorize_granting(
        &self,
        authorize_url: &str,
        login: &str,
        scopes: Option<Vec<String>>,
    ) -> Result<String, String> {
        let url = Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
        let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        let issued = self.consent(&url, &params, login, scopes);
        self.shared.core.record(SeenRequest {
            step: Step::Authorize,
            method: "GET".into(),
            path: url.path().to_owned(),
            params: redacted(params),
            content_type: None,
            accept: None,
            user_agent: None,
            authorization: None,
            status: if issued.is_ok() { 302 } else { 400 },
        });
        issued
    }

    /// Checks an authorize URL and issues a code for `login`.
    fn consent(
        &self,
        url: &Url,
        params: &[(String, String)],
        login: &str,
        scopes: Option<Vec<String>>,
    ) -> Result<String, String> {
        if url.path() != AUTHORIZE_PATH {
            return Err(format!("path is {}, expected {AUTHORIZE_PATH}", url.path()));
        }
        let request = AuthorizeRequest::parse(params).map_err(|e| e.message())?;
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

    /// Every request to `endpoint` gets `fault` until cleared.
    pub fn set_endpoint_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.shared.faults.set(endpoint, fault);
    }

    /// Only the next `times` requests to `endpoint` get `fault`.
    pub fn set_endpoint_fault_times(&self, endpoint: Endpoint, fault: Fault, times: u32) {
        self.shared.faults.set_times(endpoint, fault, times);
    }

    /// Forgets the request log and the violations in it.
    pub fn clear_requests(&self) {
        self.shared.core.clear_requests();
    }

    fn login_of(&self, seed: &str) -> Option<String> {
        lock(&self.shared.seeds).get(seed).map(|u| u.login.clone())
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

impl Emulator for GithubEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "github"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "github",
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("userinfo_url", self.url(USER_PATH)),
                ("emails_url", self.url(EMAILS_PATH)),
            ],
        )
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

    /// Like [`authorize`](GithubEmulator::authorize), unlogged as at every
    /// other emulator: the contract's log holds server-side calls only.
    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        if !authorize_url.starts_with(&format!("{}/", self.base_url)) {
            return Err(format!(
                "{authorize_url} does not point at {}",
                self.base_url
            ));
        }
        let login = self
            .login_of(seed)
            .ok_or_else(|| format!("no user registered for seed {seed:?}"))?;
        let url = Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
        let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        let code = self.consent(&url, &params, &login, None)?;
        Ok(vec![
            ("code".into(), code),
            ("state".into(), state_of(authorize_url)),
        ])
    }

    /// docs/providers.md#github: GitHub redirects to the callback with these.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        Some(vec![
            ("error".into(), "access_denied".into()),
            ("error_description".into(), DENIED_DESCRIPTION.into()),
            ("error_uri".into(), DENIED_ERROR_URI.into()),
            ("state".into(), state_of(authorize_url)),
        ])
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let login = self.login_of(seed).unwrap_or_else(|| seed.to_owned());
        (self.issue_token(&login, &DEFAULT_SCOPES), None)
    }

    /// Token → the token endpoint; Identity → `/user` and `/user/emails`.
    /// GitHub OAuth Apps have no refresh or revoke endpoint, so faults on
    /// those steps arm nothing.
    fn set_fault(&self, step: Step, fault: Fault) {
        for endpoint in [
            Endpoint::Authorize,
            Endpoint::Token,
            Endpoint::User,
            Endpoint::Emails,
        ] {
            if endpoint.step() == step {
                self.set_endpoint_fault(endpoint, fault.clone());
            }
        }
    }

    fn clear_faults(&self) {
        self.shared.faults.clear_all();
    }

    /// A no-op: GitHub's REST API is strictly typed (`id` is always a JSON
    /// integer, OAuth App tokens have no `expires_in`), and what authbroker
    /// reads from it has no number a string could stand for.
    fn set_numbers_as_strings(&self, _on: bool) {}

    fn access_token_valid(&self, token: &str) -> bool {
        lock(&self.shared.tokens).contains_key(token)
    }
}

// ---------------------------------------------------------------------------
// State

/// Std mutexes: each is held for a map operation only, never across an `.await`.
#[derive(Default)]
struct Shared {
    /// The request log and violations; GitHub's faults are per endpoint.
    core: Core,
    users: Mutex<HashMap<String, GithubUser>>,
    /// The contract's seeds, to the accounts registered for them.
    seeds: Mutex<HashMap<String, GithubUser>>,
    codes: Mutex<HashMap<String, CodeGrant>>,
    tokens: Mutex<HashMap<String, TokenGrant>>,
    browser: Mutex<Browser>,
    faults: Faults<Endpoint>,
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

impl Shared {
    /// Logs a request under its endpoint's step, with the shape violation
    /// a real GitHub would refuse it for; then the endpoint's armed fault,
    /// if any, answers instead of `normal`.
    async fn answer(
        &self,
        endpoint: Endpoint,
        req: &Req,
        violation: Option<&str>,
        normal: impl FnOnce() -> Response,
    ) -> Response {
        if let Some(why) = violation {
            self.core
                .violation(format!("{} {}: {why}", req.method, req.path));
        }
        let seen = req.seen(endpoint.step());
        self.core
            .answer_with(&self.faults, endpoint, seen, normal)
            .await
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
    let req = Req::new(method, &uri, &headers, &[]);
    shared
        .answer(Endpoint::Authorize, &req, None, || {
            shared.browser_consent(&req.query)
        })
        .await
}

impl Shared {
    fn browser_consent(&self, params: &[(String, String)]) -> Response {
        let request = match AuthorizeRequest::parse(params) {
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
            let browser = lock(&self.browser);
            (browser.user.clone(), browser.denies)
        };
        let only_user = {
            let users = lock(&self.users);
            (users.len() == 1)
                .then(|| users.keys().next().cloned())
                .flatten()
        };
        let user = request.login_hint.clone().or(chosen).or(only_user);
        if denies {
            target
                .query_pairs_mut()
                .append_pair("error", "access_denied")
                .append_pair("error_description", DENIED_DESCRIPTION)
                .append_pair("error_uri", BROWSER_DENIED_ERROR_URI)
                .append_pair("state", &request.state);
        } else {
            let Some(user) = user else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "no user selected: add login=NAME or call set_browser_user".into(),
                );
            };
            let code = match self.issue_code(&request, &user, None) {
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
    let req = Req::new(method, &uri, &headers, &body);
    let content_type = req.content_type.as_deref().unwrap_or_default();
    let violation = if req.method != Method::POST {
        Some(format!("the token endpoint takes POST, not {}", req.method))
    } else if !content_type.starts_with("application/x-www-form-urlencoded") {
        Some(format!(
            "the token request must be application/x-www-form-urlencoded, not {content_type:?}"
        ))
    } else if req.user_agent.is_none() {
        Some("the token request has no User-Agent header".into())
    } else if !req.query.is_empty() {
        Some("parameters (credentials!) were sent in the query string".into())
    } else {
        None
    };
    shared
        .answer(
            Endpoint::Token,
            &req,
            violation.as_deref(),
            || match &violation {
                Some(violation) => text(StatusCode::BAD_REQUEST, violation.clone()),
                None => shared.token_answer(&req.form, &headers),
            },
        )
        .await
}

impl Shared {
    fn token_answer(&self, form: &[(String, String)], headers: &HeaderMap) -> Response {
        let format = Format::negotiate(headers);
        match self.exchange(form, basic_credentials(headers)) {
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
    let req = Req::new(method, &uri, &headers, &[]);
    shared
        .answer(Endpoint::User, &req, violation.as_deref(), || {
            shared.user_answer(&headers)
        })
        .await
}

impl Shared {
    fn user_answer(&self, headers: &HeaderMap) -> Response {
        let caller = match api_caller(
            self,
            headers,
            "https://docs.github.com/rest/users/users#get-the-authenticated-user",
        ) {
            Ok(caller) => caller,
            Err(response) => return *response,
        };
        let Some(account) = lock(&self.users).get(&caller.login).cloned() else {
            return json(StatusCode::UNAUTHORIZED, BAD_CREDENTIALS_BODY.into(), None);
        };
        let body = serde_json::to_string(&UserJson::of(&account)).unwrap_or_default();
        json(StatusCode::OK, body, Some((&caller.scopes, "")))
    }
}

async fn emails(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let violation = api_violation(&method, &uri, &headers);
    let req = Req::new(method, &uri, &headers, &[]);
    shared
        .answer(Endpoint::Emails, &req, violation.as_deref(), || {
            shared.emails_answer(&headers)
        })
        .await
}

impl Shared {
    fn emails_answer(&self, headers: &HeaderMap) -> Response {
        let caller = match api_caller(
            self,
            headers,
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
        let Some(account) = lock(&self.users).get(&caller.login).cloned() else {
            return json(StatusCode::UNAUTHORIZED, BAD_CREDENTIALS_BODY.into(), None);
        };
        let body = serde_json::to_string(&account.emails).unwrap_or_default();
        json(StatusCode::OK, body, Some((&caller.scopes, accepted)))
    }
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
