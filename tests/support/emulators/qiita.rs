//! Qiita API v2's OAuth (docs/providers.md#qiita) on one local port:
//! `POST /api/v2/access_tokens` (JSON in, **201** out, the token in `token`),
//! `GET /api/v2/authenticated_user` (Bearer) and
//! `DELETE /api/v2/access_tokens/:token` (204), answering like the Rails app
//! behind them: compact JSON, `application/json; charset=utf-8`, errors as
//! `{"message":…,"type":…}` with a 4xx status.
//!
//! Reproduced from the docs: the authorize parameters (no `redirect_uri`, no
//! `response_type`: Qiita redirects to the registered URL), the JSON-only
//! token request, 201 and 204, the `authenticated_user` field set with
//! `permanent_id` an integer and `name` often `""`, 40-hex client ids,
//! codes and tokens. Unverified: the status and `type` of token-endpoint
//! errors, the `message` texts, the denial redirect.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use authbroker::config::ProviderConfig;
use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::any,
};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use super::wire::{header_str, provider_config, seen, state_of};
use super::{
    Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, HEX_LOWER, Step, lock, query_of,
    random_token, serve,
};

/// "ID identifying the registered API client, 40 hex digits".
pub const CLIENT_ID: &str = "a91f0396a0968ff593eafdd194e3d17d32c41b1d";
pub const CLIENT_SECRET: &str = "01fc7c3ba2d44e6f8b5a90d1e2c3f4a5b6c7d8e9";
pub const AUTHORIZE_PATH: &str = "/api/v2/oauth/authorize";
pub const TOKEN_PATH: &str = "/api/v2/access_tokens";
pub const USER_PATH: &str = "/api/v2/authenticated_user";
/// The callback URL registered with the application at qiita.com; Qiita
/// always redirects there.
pub const REGISTERED_REDIRECT: &str = super::wire::REDIRECT_URI;
pub const SCOPES: [&str; 4] = [
    "read_qiita",
    "write_qiita",
    "read_qiita_team",
    "write_qiita_team",
];
pub const DEFAULT_SCOPE: &str = "read_qiita";

pub const UNAUTHORIZED_BODY: &str = r#"{"message":"Unauthorized","type":"unauthorized"}"#;
pub const NOT_FOUND_BODY: &str = r#"{"message":"Not found","type":"not_found"}"#;
/// The message text is unverified; the `type` follows Qiita's pattern.
pub const BAD_REQUEST_BODY: &str = r#"{"message":"Bad request","type":"bad_request"}"#;
const JSON_UTF8: &str = "application/json; charset=utf-8";

/// A Qiita account. Fields beyond these are filled with plausible values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QiitaUser {
    /// The URL name (`https://qiita.com/<id>`): the username, not the key.
    pub id: String,
    /// The stable integer id: authbroker's subject.
    pub permanent_id: i64,
    /// Often `""` on real accounts.
    pub name: String,
    pub profile_image_url: String,
}

impl QiitaUser {
    /// Deterministic from the seed; a third of the users have `"name": ""`,
    /// another third a Japanese name.
    pub fn from_seed(seed: &str) -> Self {
        let d = Sha256::digest(format!("qiita\0{seed}").as_bytes());
        let h = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
        let url_name: String = seed
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let permanent_id = 1_000_000 + (h % 8_000_000) as i64;
        let name = match h % 3 {
            0 => String::new(),
            1 => format!("Taro {seed}"),
            _ => format!("キータ {seed}"),
        };
        let image: String = d[8..28].iter().map(|b| format!("{b:02x}")).collect();
        QiitaUser {
            id: format!("q_{url_name}"),
            permanent_id,
            name,
            profile_image_url: format!(
                "https://s3-ap-northeast-1.amazonaws.com/qiita-image-store/0/{permanent_id}/{image}/large.png?1575443439"
            ),
        }
    }

    pub fn expected(&self) -> ExpectedIdentity {
        let display = if self.name.trim().is_empty() {
            &self.id
        } else {
            &self.name
        };
        ExpectedIdentity {
            subject: self.permanent_id.to_string(),
            username: self.id.clone(),
            display_name: display.clone(),
            avatar_url: self.profile_image_url.clone(),
            ..Default::default()
        }
    }
}

/// A running Qiita emulator; the server stops when this is dropped.
pub struct QiitaEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for QiitaEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl QiitaEmulator {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let router = Router::new()
            .route(TOKEN_PATH, any(access_tokens))
            .route("/api/v2/access_tokens/{token}", any(revoke))
            .route(USER_PATH, any(authenticated_user))
            .with_state(shared.clone());
        let (base_url, server) = serve(router).await;
        QiitaEmulator {
            base_url,
            shared,
            server,
        }
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Registers a user with a chosen display name (`""` for none).
    pub fn add_user_named(&self, seed: &str, name: &str) -> ExpectedIdentity {
        let mut user = QiitaUser::from_seed(seed);
        user.name = name.into();
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    pub fn user(&self, seed: &str) -> Option<QiitaUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// Every outstanding code is now older than ten minutes.
    pub fn expire_codes(&self) {
        self.shared.core.expire_codes();
    }
}

impl Emulator for QiitaEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "qiita"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "qiita",
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("userinfo_url", self.url(USER_PATH)),
                ("revoke_url", self.url(TOKEN_PATH)),
            ],
        )
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: false,
            refresh: false,
            refresh_single_use: false,
            revoke: true,
            errors_with_http_200: false,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = QiitaUser::from_seed(seed);
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
        if url.path() != AUTHORIZE_PATH {
            return Err(format!("path is {}, expected {AUTHORIZE_PATH}", url.path()));
        }
        let params = query_of(authorize_url);
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if get("client_id") != Some(CLIENT_ID) {
            return Err(format!(
                "client_id is {:?}, expected {CLIENT_ID}",
                get("client_id")
            ));
        }
        // Space-separated (`%20` or `+`); Qiita's default is read_qiita.
        let scopes: Vec<String> = get("scope")
            .unwrap_or(DEFAULT_SCOPE)
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(unknown) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
            return Err(format!(
                "unknown scope {unknown:?} (Qiita's scopes are space-separated: {})",
                SCOPES.join(" ")
            ));
        }
        let state = get("state")
            .filter(|s| !s.is_empty())
            .ok_or("state is missing")?;
        let core = &self.shared.core;
        for (k, _) in &params {
            if !["client_id", "scope", "state"].contains(&k.as_str()) {
                // Qiita ignores it, but the preset should not send it.
                core.violation(format!(
                    "authorize: Qiita takes client_id, scope and state only; {k} was sent"
                ));
            }
        }
        if !lock(&self.shared.users).contains_key(seed) {
            return Err(format!("no user registered for seed {seed:?}"));
        }
        let mut grant = CodeGrant::new(seed, CLIENT_ID);
        grant.scopes = scopes;
        Ok(core.code_redirect(random_token("", 40, HEX_LOWER), grant, state.into()))
    }

    /// Unverified: Qiita's denial behaviour is undocumented; this is the
    /// RFC 6749 answer to the registered URL.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        let state = state_of(authorize_url);
        Some(vec![
            ("error".into(), "access_denied".into()),
            ("state".into(), state),
        ])
    }

    /// Qiita has no refresh tokens.
    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        (self.shared.mint(seed, &[DEFAULT_SCOPE.into()]), None)
    }
}

// ---------------------------------------------------------------------------
// State

/// Std mutexes: each is held for one map operation, never across an `.await`.
#[derive(Default)]
struct Shared {
    core: Core,
    users: Mutex<HashMap<String, QiitaUser>>,
}

/// The `authenticated_user` object, fields in the order of Qiita's docs.
#[derive(Serialize)]
struct UserJson<'a> {
    id: &'a str,
    permanent_id: Value,
    name: &'a str,
    description: &'static str,
    profile_image_url: &'a str,
    facebook_id: &'static str,
    github_login_name: Option<&'static str>,
    linkedin_id: &'static str,
    twitter_screen_name: Option<&'static str>,
    location: &'static str,
    organization: &'static str,
    website_url: &'static str,
    followees_count: u32,
    followers_count: u32,
    items_count: u32,
    team_only: bool,
    image_monthly_upload_limit: u64,
    image_monthly_upload_remaining: u64,
}

impl Shared {
    /// Tokens do not expire; 40 hex characters per the schema.
    fn mint(&self, seed: &str, scopes: &[String]) -> String {
        let token = random_token("", 40, HEX_LOWER);
        self.core.store_access(&token, seed, scopes);
        token
    }

    /// `POST /api/v2/access_tokens` with `{"client_id","client_secret","code"}`.
    fn exchange(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
        let core = &self.core;
        if method != Method::POST {
            // Rails has no such route.
            core.violation(format!("access_tokens: Qiita takes POST, not {method}"));
            return rails(StatusCode::NOT_FOUND, NOT_FOUND_BODY);
        }
        if uri.query().is_some() {
            core.violation(
                "access_tokens: parameters (credentials!) in the query string; Qiita takes a JSON body",
            );
            return rails(StatusCode::BAD_REQUEST, BAD_REQUEST_BODY);
        }
        let content_type = header_str(headers, header::CONTENT_TYPE).unwrap_or_default();
        if !content_type.starts_with("application/json") {
            core.violation(format!(
                "access_tokens: the body must be application/json, not {content_type:?}"
            ));
            return rails(StatusCode::BAD_REQUEST, BAD_REQUEST_BODY);
        }
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            core.violation("access_tokens: the body is not a JSON object");
            return rails(StatusCode::BAD_REQUEST, BAD_REQUEST_BODY);
        };
        let extra: Vec<&str> = fields
            .keys()
            .map(String::as_str)
            .filter(|k| !["client_id", "client_secret", "code"].contains(k))
            .collect();
        if !extra.is_empty() {
            core.violation(format!(
                "access_tokens: Qiita takes client_id, client_secret and code only; got {}",
                extra.join(", ")
            ));
            return rails(StatusCode::BAD_REQUEST, BAD_REQUEST_BODY);
        }
        let field = |k: &str| fields.get(k).and_then(Value::as_str);
        if field("client_id").is_none()
            || field("client_secret").is_none()
            || field("code").is_none()
        {
            core.violation("access_tokens: client_id, client_secret and code must all be strings");
            return rails(StatusCode::BAD_REQUEST, BAD_REQUEST_BODY);
        }
        // Unverified: the status and type for bad credentials or a bad,
        // used or expired code (docs/providers.md#qiita: "likely 400 or 401/403").
        if field("client_id") != Some(CLIENT_ID) || field("client_secret") != Some(CLIENT_SECRET) {
            return rails(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY);
        }
        let Some(grant) = field("code")
            .and_then(|c| core.redeem_code(c))
            .filter(|g| g.client_id == CLIENT_ID)
        else {
            return rails(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY);
        };
        let token = self.mint(&grant.seed, &grant.scopes);
        #[derive(Serialize)]
        struct Created<'a> {
            client_id: &'a str,
            scopes: &'a [String],
            token: &'a str,
        }
        let body = rails_json(&Created {
            client_id: CLIENT_ID,
            scopes: &grant.scopes,
            token: &token,
        });
        (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, JSON_UTF8)],
            body,
        )
            .into_response()
    }

    /// `GET /api/v2/authenticated_user` with `Authorization: Bearer`.
    fn authenticated_user(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response {
        let core = &self.core;
        if method != Method::GET {
            core.violation(format!("authenticated_user: Qiita takes GET, not {method}"));
            return rails(StatusCode::NOT_FOUND, NOT_FOUND_BODY);
        }
        if uri.query().is_some_and(|q| q.contains("token")) {
            core.violation(
                "authenticated_user: the token goes in Authorization: Bearer, not the query",
            );
        }
        let token = header_str(headers, header::AUTHORIZATION)
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let user = token
            .and_then(|t| core.access_grant(t))
            .and_then(|g| lock(&self.users).get(&g.seed).cloned());
        let Some(user) = user else {
            return rails(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY);
        };
        let body = rails_json(&UserJson {
            id: &user.id,
            permanent_id: core.number(user.permanent_id),
            name: &user.name,
            description: "",
            profile_image_url: &user.profile_image_url,
            facebook_id: "",
            github_login_name: None,
            linkedin_id: "",
            twitter_screen_name: None,
            location: "",
            organization: "",
            website_url: "",
            followees_count: 3,
            followers_count: 12,
            items_count: 7,
            team_only: false,
            image_monthly_upload_limit: 104_857_600,
            image_monthly_upload_remaining: 104_857_600,
        });
        (StatusCode::OK, [(header::CONTENT_TYPE, JSON_UTF8)], body).into_response()
    }

    /// `DELETE /api/v2/access_tokens/:token`: 204 and the token is dead.
    fn revoke(&self, method: &Method, token: &str) -> Response {
        if method != Method::DELETE {
            self.core.violation(format!(
                "access_tokens/:token: Qiita takes DELETE, not {method}"
            ));
            return rails(StatusCode::NOT_FOUND, NOT_FOUND_BODY);
        }
        if self.core.revoke_access(token) {
            StatusCode::NO_CONTENT.into_response()
        } else {
            rails(StatusCode::NOT_FOUND, NOT_FOUND_BODY)
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers

async fn access_tokens(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = seen(Step::Token, &method, &uri, &headers, &body);
    shared
        .core
        .answer(Step::Token, seen, || {
            shared.exchange(&method, &uri, &headers, &body)
        })
        .await
}

async fn authenticated_user(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = seen(Step::Identity, &method, &uri, &headers, &body);
    shared
        .core
        .answer(Step::Identity, seen, || {
            shared.authenticated_user(&method, &uri, &headers)
        })
        .await
}

async fn revoke(
    State(shared): State<Arc<Shared>>,
    Path(token): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The token is in the path: log the path without it.
    let path = format!("{TOKEN_PATH}/<redacted>");
    let mut seen = seen(Step::Revoke, &method, &uri, &headers, &body);
    seen.path = path;
    shared
        .core
        .answer(Step::Revoke, seen, || shared.revoke(&method, &token))
        .await
}

// ---------------------------------------------------------------------------
// Rails' JSON

/// Compact, like Rails' `render json:`, which also escapes `<`, `>` and `&`
/// (`escape_html_entities_in_json`); those only occur inside strings.
fn rails_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value)
        .unwrap_or_default()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

fn rails(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, JSON_UTF8)], body).into_response()
}

// ---------------------------------------------------------------------------
// Recording
