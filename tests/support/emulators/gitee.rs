//! Gitee emulator (docs/providers.md#gitee): gitee.com's
//! `/oauth/{authorize,token}` and `/api/v5/{user,emails}`.
//!
//! Reproduced: the Doorkeeper-style token answer (`token_type` "bearer",
//! `expires_in` 86400, 64-hex refresh token, space-separated `scope`,
//! `created_at`), its 401 `invalid_grant` error in Gitee's Chinese wording,
//! parameters taken from the query or a form body, the refresh grant without
//! client credentials, the `/api/v5/user` object with its `*_url` fields,
//! the 401 `{"message":"401 Unauthorized: Access token does not exist"}`,
//! `/api/v5/emails` only with the `emails` scope, and 403 without a
//! `User-Agent` (reported, unverified).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use authbroker::config::ProviderConfig;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::Response,
    routing::any,
};
use serde_json::Value;

use super::{
    Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, Fault, HEX_LOWER, Step, lock,
    random_token, serve,
    wire::{
        Log, Req, answer, authorize_params, derive_u64, expect_param, hex_lower, obj,
        provider_config, scope_list, state_of, state_param,
    },
};

/// Real-looking Doorkeeper application credentials (64 lower-case hex each).
pub const CLIENT_ID: &str = "3f9c1a7e5b2d8f4062c4e8a1b3d5f7092e4c6a8b0d2f4e6a8c0b2d4f6e8a0c2e";
pub const CLIENT_SECRET: &str = "b7d2e9f4a1c6083e5b7d9f1a3c5e7092b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const AUTHORIZE_PATH: &str = "/oauth/authorize";
pub const TOKEN_PATH: &str = "/oauth/token";
pub const USER_PATH: &str = "/api/v5/user";
pub const EMAILS_PATH: &str = "/api/v5/emails";
/// "有效期为一天".
pub const EXPIRES_IN: i64 = 86_400;
pub const INVALID_GRANT: &str = "授权方式无效，或者登录回调地址无效、过期或已被撤销";
pub const BAD_TOKEN_BODY: &str = r#"{"message":"401 Unauthorized: Access token does not exist"}"#;
/// Doorkeeper's zh-CN texts for the other OAuth errors (unverified for Gitee).
const INVALID_CLIENT: &str = "由于未知、不支持的认证方式、或者其他原因，客户端认证失败。";
const INVALID_REQUEST: &str = "请求缺少必要的参数，或者参数值、格式不正确。";
const UNSUPPORTED_GRANT_TYPE: &str = "授权服务器不支持此授权类型。";
const JSON_UTF8: &str = "application/json; charset=utf-8";
const SCOPES: &[&str] = &[
    "user_info",
    "projects",
    "pull_requests",
    "issues",
    "notes",
    "keys",
    "hook",
    "groups",
    "gists",
    "enterprises",
    "emails",
];

/// A Gitee account.
#[derive(Clone, Debug)]
pub struct GiteeUser {
    pub seed: String,
    /// The stable numeric id.
    pub id: u64,
    /// The changeable user name.
    pub login: String,
    pub name: String,
    pub avatar_url: String,
    /// The public email of `/api/v5/user` (often null).
    pub email: Option<String>,
    /// `/api/v5/emails`: the primary, confirmed address.
    pub primary_email: String,
    /// `/api/v5/emails`: a second, unconfirmed address.
    pub other_email: String,
}

impl GiteeUser {
    fn new(seed: &str) -> Self {
        let h = derive_u64(&["gitee-user", seed]);
        let id = 1_000_000 + derive_u64(&["gitee-id", seed]) % 9_000_000;
        let slug: String = seed
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .map(|c| c.to_ascii_lowercase())
            .take(24)
            .collect();
        let suffix = &hex_lower(&id.to_be_bytes())[12..];
        let login = if slug.is_empty() {
            format!("user-{suffix}")
        } else {
            format!("{slug}-{suffix}")
        };
        let avatar_url = if h.is_multiple_of(2) {
            format!(
                "https://foruda.gitee.com/avatar/1677036417342148905/{id}_{login}_1677036417.png"
            )
        } else {
            "https://gitee.com/assets/no_portrait.png".to_string()
        };
        GiteeUser {
            seed: seed.into(),
            id,
            name: format!("码云小蜜蜂-{seed}"),
            avatar_url,
            email: (h / 2)
                .is_multiple_of(2)
                .then(|| format!("{login}@example.cn")),
            primary_email: format!("{login}@example.cn"),
            other_email: format!("{login}.old@example.com"),
            login,
        }
    }

    /// With the default `user_info` scope: only `/api/v5/user`.
    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.id.to_string(),
            union_id: String::new(),
            username: self.login.clone(),
            display_name: self.name.clone(),
            avatar_url: self.avatar_url.clone(),
            email: self.email.clone().unwrap_or_default(),
            email_verified: false,
        }
    }
}

/// A running Gitee emulator; the server stops when this is dropped.
pub struct GiteeEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Gitee>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GiteeEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Gitee {
    core: Core,
    users: Mutex<HashMap<String, GiteeUser>>,
}

impl GiteeEmulator {
    pub async fn start() -> Self {
        let shared = Arc::new(Gitee {
            core: Core::default(),
            users: Mutex::default(),
        });
        let router = Router::new()
            .route(TOKEN_PATH, any(token))
            .route(USER_PATH, any(user))
            .route(EMAILS_PATH, any(emails))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        GiteeEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn client_id(&self) -> &'static str {
        CLIENT_ID
    }

    pub fn client_secret(&self) -> &'static str {
        CLIENT_SECRET
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn user(&self, seed: &str) -> Option<GiteeUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// What authbroker must report for `seed` when the login was granted the
    /// `emails` scope: the primary, confirmed address of `/api/v5/emails`.
    pub fn expected_with_emails(&self, seed: &str) -> ExpectedIdentity {
        let user = GiteeUser::new(seed);
        ExpectedIdentity {
            email: user.primary_email.clone(),
            email_verified: true,
            ..user.expected()
        }
    }

    /// Mints tokens carrying exactly `scopes`.
    pub fn issue_tokens_with_scopes(&self, seed: &str, scopes: &[&str]) -> (String, String) {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.shared.mint(seed, &scopes)
    }

    /// Every outstanding code is older than ten minutes.
    pub fn expire_codes(&self) {
        self.shared.core.expire_codes();
    }

    /// The user revoked the app: this access token stops working.
    pub fn revoke_access(&self, token: &str) -> bool {
        self.shared.core.revoke_access(token)
    }

    /// Only the next `times` requests of `step` get `fault`.
    pub fn set_fault_times(&self, step: Step, fault: Fault, times: u32) {
        self.shared.core.faults.set_times(step, fault, times);
    }

    /// The checks `/oauth/authorize` makes; `Ok` carries (state, scopes).
    fn check_authorize(&self, authorize_url: &str) -> Result<(String, Vec<String>), String> {
        let params =
            authorize_params(authorize_url, &self.base_url, AUTHORIZE_PATH, None, "Gitee")?;
        expect_param(&params, "client_id", CLIENT_ID, None)?;
        expect_param(&params, "redirect_uri", REDIRECT_URI, None)?;
        expect_param(&params, "response_type", "code", None)?;
        let state = state_param(&params)?;
        let scopes = scope_list(&params, ' ', SCOPES, &["user_info"], "Gitee")?;
        Ok((state, scopes))
    }
}

impl Emulator for GiteeEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "gitee"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "gitee",
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
            pkce: false,
            refresh: true,
            refresh_single_use: false,
            revoke: false,
            errors_with_http_200: false,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = GiteeUser::new(seed);
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let core = &self.shared.core;
        let (state, scopes) = core.approvable(
            self.check_authorize(authorize_url),
            &self.shared.users,
            seed,
        )?;
        let grant = CodeGrant::redirected(seed, CLIENT_ID, REDIRECT_URI, scopes);
        Ok(core.code_redirect(random_token("", 64, HEX_LOWER), grant, state))
    }

    /// Standard OAuth2 (Gitee runs Doorkeeper); the exact redirect,
    /// description included, is unverified.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        let state = state_of(authorize_url);
        Some(vec![
            ("error".into(), "access_denied".into()),
            (
                "error_description".into(),
                "The resource owner or authorization server denied the request.".into(),
            ),
            ("state".into(), state),
        ])
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let (access, refresh) = self.shared.mint(seed, &["user_info".to_string()]);
        (access, Some(refresh))
    }
}

// ---------------------------------------------------------------------------
// Endpoints

impl Gitee {
    /// 32-hex access token, 64-hex refresh token, as in the sample.
    fn mint(&self, seed: &str, scopes: &[String]) -> (String, String) {
        let access = random_token("", 32, HEX_LOWER);
        let refresh = random_token("", 64, HEX_LOWER);
        self.core.store_access(&access, seed, scopes);
        self.core.store_refresh(&refresh, seed, scopes);
        (access, refresh)
    }

    fn oauth_error(&self, status: StatusCode, error: &str, description: &str) -> Response {
        answer(
            status,
            JSON_UTF8,
            obj(&[
                ("error", error.into()),
                ("error_description", description.into()),
            ]),
        )
    }

    fn refuse(
        &self,
        req: &Req,
        why: &str,
        status: StatusCode,
        error: &str,
        description: &str,
    ) -> Response {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
        self.oauth_error(status, error, description)
    }

    /// Gitee reportedly answers 403 to a request without a User-Agent
    /// (casdoor sets a browser one); the body is unverified.
    fn user_agent_refusal(&self, req: &Req) -> Option<Response> {
        if req.user_agent.as_deref().is_some_and(|ua| !ua.is_empty()) {
            return None;
        }
        self.core.violation(format!(
            "{} {}: no User-Agent (Gitee answers 403)",
            req.method, req.path
        ));
        Some(answer(
            StatusCode::FORBIDDEN,
            JSON_UTF8,
            r#"{"message":"403 Forbidden"}"#.into(),
        ))
    }

    fn token(&self, req: &Req, step: Step) -> Response {
        if let Some(response) = self.user_agent_refusal(req) {
            return response;
        }
        let at = format!("{} {}", req.method, req.path);
        if req.method != Method::POST {
            // Doorkeeper routes only POST here; Rails' 404 body is unverified.
            self.core
                .violation(format!("{at}: the token endpoint takes POST"));
            return answer(
                StatusCode::NOT_FOUND,
                JSON_UTF8,
                r#"{"message":"Not Found"}"#.into(),
            );
        }
        if req.json_body {
            self.core.violation(format!(
                "{at}: a JSON body (Gitee documents the query or a form body)"
            ));
        }
        if req.authorization.is_some() {
            self.core.violation(format!(
                "{at}: an Authorization header (Gitee's documented clients send client_id/client_secret parameters)"
            ));
        }
        if req.has("code_verifier") {
            self.core
                .violation(format!("{at}: code_verifier sent (Gitee has no PKCE)"));
        }
        // Client credentials: required for the code, optional for a refresh
        // (documented without them), wrong ones always refused.
        let (id, secret) = (req.param("client_id"), req.param("client_secret"));
        let credentials_ok = id == Some(CLIENT_ID) && secret == Some(CLIENT_SECRET);
        match (step, id, secret) {
            (Step::Refresh, None, None) => {}
            (Step::Token, None, _) | (Step::Token, _, None) => {
                return self.refuse(
                    req,
                    "client_id or client_secret missing",
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    INVALID_CLIENT,
                );
            }
            _ if !credentials_ok => {
                return self.oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    INVALID_CLIENT,
                );
            }
            _ => {}
        }
        let (access, refresh, scopes) = match req.param("grant_type") {
            Some("refresh_token") => {
                let Some(token) = req.param("refresh_token") else {
                    return self.refuse(
                        req,
                        "no refresh_token",
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        INVALID_REQUEST,
                    );
                };
                // Reusable here (rotation unverified).
                let Some(grant) = self.core.use_refresh(token, false) else {
                    return self.oauth_error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_grant",
                        INVALID_GRANT,
                    );
                };
                let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
                (access, refresh, grant.scopes)
            }
            Some("authorization_code") => {
                let (Some(code), Some(redirect_uri)) =
                    (req.param("code"), req.param("redirect_uri"))
                else {
                    return self.refuse(
                        req,
                        "code or redirect_uri missing",
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        INVALID_REQUEST,
                    );
                };
                let Some(grant) = self.core.redeem_code(code) else {
                    return self.oauth_error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_grant",
                        INVALID_GRANT,
                    );
                };
                if grant.redirect_uri.as_deref() != Some(redirect_uri) {
                    return self.refuse(
                        req,
                        "redirect_uri differs from the authorize request's",
                        StatusCode::UNAUTHORIZED,
                        "invalid_grant",
                        INVALID_GRANT,
                    );
                }
                let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
                (access, refresh, grant.scopes)
            }
            None => {
                return self.refuse(
                    req,
                    "no grant_type",
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    INVALID_REQUEST,
                );
            }
            Some(other) => {
                let why = format!("grant_type {other:?}");
                return self.refuse(
                    req,
                    &why,
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    UNSUPPORTED_GRANT_TYPE,
                );
            }
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        answer(
            StatusCode::OK,
            JSON_UTF8,
            obj(&[
                ("access_token", access.into()),
                ("token_type", "bearer".into()),
                ("expires_in", self.core.number(EXPIRES_IN)),
                ("refresh_token", refresh.into()),
                ("scope", scopes.join(" ").into()),
                ("created_at", self.core.number(now)),
            ]),
        )
    }

    /// The API's caller: `access_token` in the query (what the clients
    /// send) or `Authorization: token …`/`Bearer …`.
    fn api_caller(
        &self,
        req: &Req,
        headers_token: Option<&str>,
    ) -> Result<(String, Vec<String>), Box<Response>> {
        if let Some(response) = self.user_agent_refusal(req) {
            return Err(Box::new(response));
        }
        if req.method != Method::GET {
            self.core.violation(format!(
                "{} {}: the API call takes GET",
                req.method, req.path
            ));
        }
        let token = req.param("access_token").or(headers_token);
        let Some(token) = token else {
            self.core
                .violation(format!("{} {}: no access token", req.method, req.path));
            return Err(Box::new(answer(
                StatusCode::UNAUTHORIZED,
                JSON_UTF8,
                BAD_TOKEN_BODY.into(),
            )));
        };
        self.core
            .access_grant(token)
            .map(|g| (g.seed, g.scopes))
            .ok_or_else(|| {
                Box::new(answer(
                    StatusCode::UNAUTHORIZED,
                    JSON_UTF8,
                    BAD_TOKEN_BODY.into(),
                ))
            })
    }

    fn user(&self, req: &Req, headers_token: Option<&str>) -> Response {
        let (seed, _) = match self.api_caller(req, headers_token) {
            Ok(caller) => caller,
            Err(response) => return *response,
        };
        let Some(u) = lock(&self.users).get(&seed).cloned() else {
            return answer(StatusCode::UNAUTHORIZED, JSON_UTF8, BAD_TOKEN_BODY.into());
        };
        answer(StatusCode::OK, JSON_UTF8, self.user_json(&u))
    }

    fn emails(&self, req: &Req, headers_token: Option<&str>) -> Response {
        let (seed, scopes) = match self.api_caller(req, headers_token) {
            Ok(caller) => caller,
            Err(response) => return *response,
        };
        if !scopes.iter().any(|s| s == "emails") {
            self.core.violation(format!(
                "{} {}: called without the emails scope",
                req.method, req.path
            ));
            // Status and body unverified.
            return answer(
                StatusCode::FORBIDDEN,
                JSON_UTF8,
                r#"{"message":"403 Forbidden: Insufficient scope"}"#.into(),
            );
        }
        let Some(u) = lock(&self.users).get(&seed).cloned() else {
            return answer(StatusCode::UNAUTHORIZED, JSON_UTF8, BAD_TOKEN_BODY.into());
        };
        let primary = obj(&[
            ("email", u.primary_email.into()),
            ("state", "confirmed".into()),
            ("scope", Value::from(vec!["primary", "notified"])),
        ]);
        let other = obj(&[
            ("email", u.other_email.into()),
            ("state", "unconfirmed".into()),
            ("scope", Value::from(vec!["notified"])),
        ]);
        answer(StatusCode::OK, JSON_UTF8, format!("[{primary},{other}]"))
    }

    /// The `/api/v5/user` object in casdoor's order, `*_url` fields included.
    fn user_json(&self, u: &GiteeUser) -> String {
        let n = |v: i64| self.core.number(v);
        let api = format!("https://gitee.com/api/v5/users/{}", u.login);
        obj(&[
            ("id", n(u.id as i64)),
            ("login", u.login.clone().into()),
            ("name", u.name.clone().into()),
            ("avatar_url", u.avatar_url.clone().into()),
            ("url", api.clone().into()),
            ("html_url", format!("https://gitee.com/{}", u.login).into()),
            ("remark", "".into()),
            ("followers_url", format!("{api}/followers").into()),
            (
                "following_url",
                format!("{api}/following_url{{/other_user}}").into(),
            ),
            ("gists_url", format!("{api}/gists{{/gist_id}}").into()),
            (
                "starred_url",
                format!("{api}/starred{{/owner}}{{/repo}}").into(),
            ),
            ("subscriptions_url", format!("{api}/subscriptions").into()),
            ("organizations_url", format!("{api}/orgs").into()),
            ("repos_url", format!("{api}/repos").into()),
            ("events_url", format!("{api}/events{{/privacy}}").into()),
            (
                "received_events_url",
                format!("{api}/received_events").into(),
            ),
            ("type", "User".into()),
            ("blog", Value::Null),
            ("weibo", Value::Null),
            ("bio", "".into()),
            ("public_repos", n(2)),
            ("public_gists", n(0)),
            ("followers", n(0)),
            ("following", n(0)),
            ("stared", n(0)),
            ("watched", n(2)),
            ("created_at", "2019-08-03T23:21:16+08:00".into()),
            ("updated_at", "2021-06-14T12:47:09+08:00".into()),
            ("email", u.email.clone().map_or(Value::Null, Value::from)),
        ])
    }
}

/// A token from `Authorization: token …` or `Bearer …`.
fn header_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer"))
        .then(|| token.trim().to_string())
}

async fn token(
    State(gitee): State<Arc<Gitee>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let step = if req.param("grant_type") == Some("refresh_token") {
        Step::Refresh
    } else {
        Step::Token
    };
    let log = Log::new(&gitee.core, req.seen(step));
    if let Some(response) = gitee.core.faults.apply(step).await {
        return log.answer(response);
    }
    log.answer(gitee.token(&req, step))
}

async fn user(
    State(gitee): State<Arc<Gitee>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&gitee.core, req.seen(Step::Identity));
    if let Some(response) = gitee.core.faults.apply(Step::Identity).await {
        return log.answer(response);
    }
    log.answer(gitee.user(&req, header_token(&headers).as_deref()))
}

async fn emails(
    State(gitee): State<Arc<Gitee>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&gitee.core, req.seen(Step::Identity));
    if let Some(response) = gitee.core.faults.apply(Step::Identity).await {
        return log.answer(response);
    }
    log.answer(gitee.emails(&req, header_token(&headers).as_deref()))
}
