//! Feishu / Lark emulator (docs/providers.md#feishu, #lark): one API on two
//! domains (open.feishu.cn, open.larksuite.com), so one emulator serves
//! either preset. The browser step at `/open-apis/authen/v1/authorize`
//! (checked in [`Emulator::approve`]), the v2 token endpoint
//! `POST /open-apis/authen/v2/oauth/token` (code and refresh grants) and
//! `GET /open-apis/authen/v1/user_info`.
//!
//! Reproduced: the JSON token request with RFC 6749 names and
//! `Content-Type: application/json; charset=utf-8`; PKCE; the flat token
//! answer with `code: 0` (`refresh_token` and `refresh_token_expires_in`
//! only with `offline_access`); refusals as
//! `{"code":2xxxx,"error":"…","error_description":"…"}`; refresh tokens that
//! work once; and `user_info`'s `{"code":0,"msg":"success","data":{…}}`
//! with `open_id` (`ou_…`), `union_id` (`on_…`), names, avatars and emails.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
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
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::Value;

use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, HEX_LOWER, Step, lock,
    random_token, serve,
    wire::{
        Req, answer, check_origin, derive, expect_param, header_str, obj, param, provider_config,
        single, state_of, state_param,
    },
};

/// App ID (`cli_` + 16 hex) and App Secret (32 characters).
pub const CLIENT_ID: &str = "cli_a5ca35a685b0d26e";
pub const CLIENT_SECRET: &str = "baBqE5um9LbFGDy3X7LcfxQX1sqpXlwy";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const AUTHORIZE_PATH: &str = "/open-apis/authen/v1/authorize";
pub const TOKEN_PATH: &str = "/open-apis/authen/v2/oauth/token";
pub const USER_INFO_PATH: &str = "/open-apis/authen/v1/user_info";
pub const EXPIRES_IN: i64 = 7200;
pub const REFRESH_EXPIRES_IN: i64 = 604_800;
const JSON_UTF8: &str = "application/json; charset=utf-8";
/// Scopes the emulated app has been granted in the developer console.
const SCOPES: &[&str] = &[
    "offline_access",
    "contact:user.email:readonly",
    "contact:user.base:readonly",
    "auth:user.id:read",
];

/// A Feishu user as one app sees them.
#[derive(Clone, Debug)]
pub struct FeishuUser {
    pub open_id: String,
    pub union_id: String,
    pub name: String,
    pub en_name: String,
    pub avatar: String,
    pub email: Option<String>,
    pub enterprise_email: Option<String>,
}

impl FeishuUser {
    fn new(seed: &str) -> FeishuUser {
        let h = super::wire::derive_u64(&["feishu-flags", seed]);
        let avatar = format!(
            "https://s1-imfile.feishucdn.com/static-resource/v1/v2_{}~",
            derive(&["feishu-avatar", seed], HEX_LOWER, 32)
        );
        FeishuUser {
            open_id: format!(
                "ou_{}",
                derive(&["feishu-open", CLIENT_ID, seed], HEX_LOWER, 32)
            ),
            union_id: format!("on_{}", derive(&["feishu-union", seed], HEX_LOWER, 32)),
            name: format!("张{seed}"),
            en_name: seed.to_string(),
            avatar,
            email: h.is_multiple_of(2).then(|| format!("{seed}@example.cn")),
            enterprise_email: h
                .is_multiple_of(3)
                .then(|| format!("{seed}@corp.example.cn")),
        }
    }

    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.open_id.clone(),
            union_id: self.union_id.clone(),
            username: String::new(),
            display_name: self.name.clone(),
            avatar_url: format!("{}?image_size=640x640", self.avatar),
            email: self
                .email
                .clone()
                .or(self.enterprise_email.clone())
                .unwrap_or_default(),
            email_verified: false,
        }
    }
}

/// A running Feishu (or Lark) emulator; the server stops when dropped.
pub struct FeishuEmulator {
    pub base_url: String,
    kind: &'static str,
    shared: Arc<Feishu>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FeishuEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Feishu {
    core: Core,
    users: Mutex<HashMap<String, FeishuUser>>,
}

impl FeishuEmulator {
    /// Feishu, for the `feishu` preset.
    pub async fn start() -> FeishuEmulator {
        Self::start_as("feishu").await
    }

    /// The same API as Lark, for the `lark` preset.
    pub async fn start_lark() -> FeishuEmulator {
        Self::start_as("lark").await
    }

    async fn start_as(kind: &'static str) -> FeishuEmulator {
        let shared = Arc::new(Feishu {
            core: Core::default(),
            users: Mutex::default(),
        });
        let router = Router::new()
            .route(TOKEN_PATH, any(handle))
            .route(USER_INFO_PATH, any(handle))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        FeishuEmulator {
            base_url,
            kind,
            shared,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The authorize page's checks; `Ok` carries the grant and state.
    fn check_authorize(
        &self,
        authorize_url: &str,
        seed: &str,
    ) -> Result<(CodeGrant, String), String> {
        let url = url::Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
        check_origin(&url, &self.base_url)?;
        if url.path() != AUTHORIZE_PATH || url.fragment().is_some() {
            return Err(format!("{authorize_url} is not {AUTHORIZE_PATH}"));
        }
        let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        // Error 20029 "redirect_uri 请求不合法" and friends.
        expect_param(&params, "client_id", CLIENT_ID, Some("20002"))?;
        expect_param(&params, "redirect_uri", REDIRECT_URI, Some("20029"))?;
        if let Some(rt) = single(&params, "response_type")?
            && rt != "code"
        {
            return Err(format!("response_type {rt:?}"));
        }
        let state = state_param(&params)?;
        let scopes: Vec<String> = single(&params, "scope")?
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
            return Err(format!("scope {bad:?} is not enabled for the app (20027)"));
        }
        let challenge = match (
            single(&params, "code_challenge")?,
            single(&params, "code_challenge_method")?,
        ) {
            (Some(c), Some("S256")) if c.len() == 43 && URL_SAFE_NO_PAD.decode(c).is_ok() => {
                Some(c.to_string())
            }
            (None, None) => None,
            other => return Err(format!("PKCE parameters {other:?}")),
        };
        let mut grant = CodeGrant::redirected(seed, CLIENT_ID, REDIRECT_URI, scopes);
        grant.challenge = challenge;
        Ok((grant, state))
    }
}

impl Emulator for FeishuEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            self.kind,
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("userinfo_url", self.url(USER_INFO_PATH)),
            ],
        )
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: true,
            refresh: true,
            refresh_single_use: true,
            revoke: false,
            errors_with_http_200: false,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = FeishuUser::new(seed);
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let core = &self.shared.core;
        let (grant, state) = core.approvable(
            self.check_authorize(authorize_url, seed),
            &self.shared.users,
            seed,
        )?;
        Ok(core.code_redirect(random_token("", 32, HEX_LOWER), grant, state))
    }

    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        Some(vec![
            ("error".into(), "access_denied".into()),
            ("state".into(), state_of(authorize_url)),
        ])
    }

    /// With `offline_access`, so a refresh token comes along.
    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let (access, refresh) = self.shared.mint(seed, &["offline_access".to_string()]);
        (access, refresh)
    }
}

// ---------------------------------------------------------------------------
// Endpoints

impl Feishu {
    /// Tokens are JWT-looking; the refresh token only with `offline_access`.
    fn mint(&self, seed: &str, scopes: &[String]) -> (String, Option<String>) {
        let jwtish = || format!("eyJhbGciOiJFUzI1NiIs{}", random_token("", 60, ALNUM));
        let access = jwtish();
        self.core.store_access(&access, seed, scopes);
        let refresh = scopes.iter().any(|s| s == "offline_access").then(|| {
            let refresh = jwtish();
            self.core.store_refresh(&refresh, seed, scopes);
            refresh
        });
        (access, refresh)
    }

    fn refusal(&self, status: StatusCode, code: i64, error: &str, description: &str) -> Response {
        answer(
            status,
            JSON_UTF8,
            obj(&[
                ("code", self.core.number(code)),
                ("error", error.into()),
                ("error_description", description.into()),
            ]),
        )
    }

    fn violation(&self, req: &Req, why: &str) {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
    }

    fn token(&self, req: &Req) -> Response {
        if req.method != Method::POST {
            self.violation(req, "the token endpoint takes POST");
        }
        if !req
            .content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/json"))
        {
            self.violation(req, "not application/json");
            return self.refusal(
                StatusCode::BAD_REQUEST,
                20001,
                "invalid_request",
                "The request is missing a required parameter or is malformed.",
            );
        }
        let get = |name: &str| param(&req.json, name);
        if get("client_id") != Some(CLIENT_ID) || get("client_secret") != Some(CLIENT_SECRET) {
            return self.refusal(
                StatusCode::BAD_REQUEST,
                20002,
                "invalid_client",
                "Client authentication failed.",
            );
        }
        match get("grant_type") {
            Some("authorization_code") => self.exchange(req),
            Some("refresh_token") => self.refresh(req),
            _ => self.refusal(
                StatusCode::BAD_REQUEST,
                20036,
                "unsupported_grant_type",
                "The grant type is not supported.",
            ),
        }
    }

    fn exchange(&self, req: &Req) -> Response {
        let get = |name: &str| param(&req.json, name);
        let Some(grant) = get("code").and_then(|c| self.core.redeem_code(c)) else {
            return self.refusal(
                StatusCode::BAD_REQUEST,
                20003,
                "invalid_grant",
                "The authorization code is not found.",
            );
        };
        if get("redirect_uri").is_some_and(|r| Some(r) != grant.redirect_uri.as_deref()) {
            self.violation(req, "redirect_uri differs from the authorize request's");
            return self.refusal(
                StatusCode::BAD_REQUEST,
                20071,
                "invalid_grant",
                "The redirect_uri does not match.",
            );
        }
        if !grant.pkce_ok(get("code_verifier")) {
            return self.refusal(
                StatusCode::BAD_REQUEST,
                20049,
                "invalid_grant",
                "PKCE verification failed.",
            );
        }
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
        self.token_answer(&access, refresh.as_deref(), &grant.scopes)
    }

    /// Each refresh token works once.
    fn refresh(&self, req: &Req) -> Response {
        let token = param(&req.json, "refresh_token");
        let Some(grant) = token.and_then(|t| self.core.use_refresh(t, true)) else {
            return self.refusal(
                StatusCode::BAD_REQUEST,
                20064,
                "invalid_grant",
                "The refresh token has been revoked or used.",
            );
        };
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
        self.token_answer(&access, refresh.as_deref(), &grant.scopes)
    }

    fn token_answer(&self, access: &str, refresh: Option<&str>, scopes: &[String]) -> Response {
        let mut fields = vec![
            ("code", self.core.number(0)),
            ("access_token", Value::from(access)),
            ("expires_in", self.core.number(EXPIRES_IN)),
        ];
        if let Some(refresh) = refresh {
            fields.push(("refresh_token", refresh.into()));
            fields.push((
                "refresh_token_expires_in",
                self.core.number(REFRESH_EXPIRES_IN),
            ));
        }
        fields.push(("token_type", "Bearer".into()));
        fields.push(("scope", scopes.join(" ").into()));
        answer(StatusCode::OK, JSON_UTF8, obj(&fields))
    }

    fn user_info(&self, req: &Req, headers: &HeaderMap) -> Response {
        if req.method != Method::GET {
            self.violation(req, "user_info takes GET");
        }
        let grant = header_str(headers, header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| self.core.access_grant(t));
        let user = grant.and_then(|g| lock(&self.users).get(&g.seed).cloned());
        let Some(u) = user else {
            return answer(
                StatusCode::BAD_REQUEST,
                JSON_UTF8,
                obj(&[
                    ("code", self.core.number(99_991_668)),
                    (
                        "msg",
                        "Invalid access token for authorization. Please make a request with token attached."
                            .into(),
                    ),
                ]),
            );
        };
        let size = |s: &str| {
            format!(
                "{}?image_size={s}&cut_type=&quality=&format=png&sticker_format=.webp",
                u.avatar
            )
        };
        let mut data = vec![
            ("name", Value::from(u.name.clone())),
            ("en_name", u.en_name.clone().into()),
            ("avatar_url", size("72x72").into()),
            ("avatar_thumb", size("72x72").into()),
            ("avatar_middle", size("240x240").into()),
            (
                "avatar_big",
                format!("{}?image_size=640x640", u.avatar).into(),
            ),
            ("open_id", u.open_id.clone().into()),
            ("union_id", u.union_id.clone().into()),
        ];
        if let Some(email) = &u.email {
            data.push(("email", email.clone().into()));
        }
        if let Some(email) = &u.enterprise_email {
            data.push(("enterprise_email", email.clone().into()));
        }
        data.push(("tenant_key", "736588c9260f175d".into()));
        let body = format!(
            r#"{{"code":{},"msg":"success","data":{}}}"#,
            self.core.number(0),
            obj(&data)
        );
        answer(StatusCode::OK, JSON_UTF8, body)
    }
}

/// The one handler: each path is logged under its step, and an armed fault
/// answers before Feishu does.
async fn handle(
    State(f): State<Arc<Feishu>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let step = match uri.path() {
        USER_INFO_PATH => Step::Identity,
        _ if param(&req.json, "grant_type") == Some("refresh_token") => Step::Refresh,
        _ => Step::Token,
    };
    let seen = req.seen(step);
    f.core
        .answer(step, seen, || match step {
            Step::Identity => f.user_info(&req, &headers),
            _ => f.token(&req),
        })
        .await
}
