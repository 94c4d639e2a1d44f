//! DingTalk emulator (docs/providers.md#dingtalk): the current OAuth2 API —
//! the browser step at `login.dingtalk.com/oauth2/auth` (checked in
//! [`Emulator::approve`]), `POST /v1.0/oauth2/userAccessToken` (code and
//! refresh grants) and `GET /v1.0/contact/users/me`, on one local port.
//!
//! Reproduced: the callback's `authCode` (not `code`); the camelCase JSON
//! token request (`clientId`, `clientSecret`, `code`, `refreshToken`,
//! `grantType`) and answer (`accessToken`, `refreshToken`, `expireIn`,
//! `corpId`); refusals as a 4xx with `{"code","message","requestid"}`
//! (the code strings are unverified); the user token read only from the
//! `x-acs-dingtalk-access-token` header; and the `users/me` object (`nick`,
//! `avatarUrl`, `mobile`, `openId`, `unionId`, `email`, `stateCode`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use authbroker::config::ProviderConfig;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::Response,
    routing::any,
};
use serde_json::Value;

use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, HEX_LOWER, Step, lock,
    random_token, serve,
    wire::{
        Req, answer, authorize_params, derive, expect_param, header_str, obj, param,
        provider_config, scope_list, state_of, state_param,
    },
};

/// An internal app's Client ID (AppKey, `ding…`) and Client Secret.
pub const CLIENT_ID: &str = "dingq3xkv7ne0lfz8wcm";
pub const CLIENT_SECRET: &str = "Xf3kPq9LmZ2vT7rWb1YcN5sHd8JgE4uA6oRiK0nB_VwQyMtSaCeD-lFhGjUx";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const AUTHORIZE_PATH: &str = "/oauth2/auth";
pub const TOKEN_PATH: &str = "/v1.0/oauth2/userAccessToken";
pub const ME_PATH: &str = "/v1.0/contact/users/me";
pub const TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";
pub const EXPIRES_IN: i64 = 7200;
/// The organisation the user picked (`openid corpid` scope); always sent here.
pub const CORP_ID: &str = "ding9f50b15bccd16741";
const JSON_UTF8: &str = "application/json;charset=utf-8";

/// A DingTalk account as one developer's apps see it.
#[derive(Clone, Debug)]
pub struct DingtalkUser {
    /// Per app.
    pub open_id: String,
    /// Per developer (every app of one organisation's developer account).
    pub union_id: String,
    pub nick: String,
    pub avatar_url: String,
    pub email: Option<String>,
    pub mobile: String,
}

impl DingtalkUser {
    fn new(seed: &str) -> DingtalkUser {
        let union_id = derive(&["dingtalk-union", seed], ALNUM, 22) + "iEiE";
        DingtalkUser {
            open_id: derive(&["dingtalk-open", CLIENT_ID, seed], ALNUM, 26) + "iE",
            nick: format!("钉钉用户{seed}"),
            avatar_url: format!(
                "https://static-legacy.dingtalk.com/media/lADPD{}_240_240.jpg",
                derive(&["dingtalk-avatar", seed], ALNUM, 16)
            ),
            email: union_id
                .len()
                .is_multiple_of(2)
                .then(|| format!("{seed}@example.cn")),
            mobile: format!("1{}", derive(&["dingtalk-mobile", seed], b"0123456789", 10)),
            union_id,
        }
    }

    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.open_id.clone(),
            union_id: self.union_id.clone(),
            username: String::new(),
            display_name: self.nick.clone(),
            avatar_url: self.avatar_url.clone(),
            email: self.email.clone().unwrap_or_default(),
            email_verified: false,
        }
    }
}

/// A running DingTalk emulator; the server stops when this is dropped.
pub struct DingtalkEmulator {
    pub base_url: String,
    shared: Arc<Dingtalk>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DingtalkEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Dingtalk {
    core: Core,
    users: Mutex<HashMap<String, DingtalkUser>>,
}

impl DingtalkEmulator {
    pub async fn start() -> DingtalkEmulator {
        let shared = Arc::new(Dingtalk {
            core: Core::default(),
            users: Mutex::default(),
        });
        let router = Router::new()
            .route(TOKEN_PATH, any(handle))
            .route(ME_PATH, any(handle))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        DingtalkEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn user(&self, seed: &str) -> Option<DingtalkUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// The checks the authorize page makes; `Ok` carries (state, scopes).
    fn check_authorize(&self, authorize_url: &str) -> Result<(String, Vec<String>), String> {
        let params = authorize_params(
            authorize_url,
            &self.base_url,
            AUTHORIZE_PATH,
            None,
            "DingTalk",
        )?;
        expect_param(&params, "client_id", CLIENT_ID, None)?;
        expect_param(&params, "redirect_uri", REDIRECT_URI, None)?;
        expect_param(&params, "response_type", "code", None)?;
        // Documented as required, with this value only.
        expect_param(&params, "prompt", "consent", None)?;
        let state = state_param(&params)?;
        let scopes = scope_list(&params, ' ', &["openid", "corpid"], &[], "DingTalk")?;
        // "openid" or "openid corpid", nothing else.
        if scopes.first().map(String::as_str) != Some("openid") {
            return Err(format!(
                "scope {scopes:?}: only openid or \"openid corpid\""
            ));
        }
        Ok((state, scopes))
    }
}

impl Emulator for DingtalkEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "dingtalk"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "dingtalk",
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("userinfo_url", self.url(ME_PATH)),
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
        let user = DingtalkUser::new(seed);
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    /// The redirect carries `authCode`, which the web app passes on as
    /// CompleteLogin's `code`.
    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let core = &self.shared.core;
        let (state, scopes) = core.approvable(
            self.check_authorize(authorize_url),
            &self.shared.users,
            seed,
        )?;
        let grant = CodeGrant::redirected(seed, CLIENT_ID, REDIRECT_URI, scopes);
        let code = core.issue_code(random_token("", 32, HEX_LOWER), grant);
        Ok(vec![("authCode".into(), code), ("state".into(), state)])
    }

    /// `?error=…&state=…`; the error value is not documented.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        Some(vec![
            ("error".into(), "access_denied".into()),
            ("state".into(), state_of(authorize_url)),
        ])
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let (access, refresh) = self.shared.mint(seed);
        (access, Some(refresh))
    }
}

// ---------------------------------------------------------------------------
// Endpoints

impl Dingtalk {
    fn mint(&self, seed: &str) -> (String, String) {
        let access = random_token("", 32, HEX_LOWER);
        let refresh = random_token("", 32, HEX_LOWER);
        self.core.store_access(&access, seed, &[]);
        self.core.store_refresh(&refresh, seed, &[]);
        (access, refresh)
    }

    /// `{"code","message","requestid"}`, DingTalk's shape for every refusal.
    fn refusal(&self, status: StatusCode, code: &str, message: &str) -> Response {
        answer(
            status,
            JSON_UTF8,
            obj(&[
                ("code", code.into()),
                ("message", message.into()),
                ("requestid", random_token("", 8, b"0123456789ABCDEF").into()),
            ]),
        )
    }

    fn violation(&self, req: &Req, why: &str) {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
    }

    fn token(&self, req: &Req) -> Response {
        if req.method != Method::POST {
            self.violation(req, "userAccessToken takes POST");
            return self.refusal(
                StatusCode::NOT_FOUND,
                "InvalidAction.NotFound",
                "Specified api is not found, please check your url and method.",
            );
        }
        if !req.json_body {
            // What the SDKs hit with a form body.
            self.violation(req, "not a JSON body");
            return self.refusal(
                StatusCode::BAD_REQUEST,
                "MissingBody",
                "body is mandatory for this action.",
            );
        }
        let get = |name: &str| param(&req.json, name);
        for snake in ["client_id", "client_secret", "grant_type", "refresh_token"] {
            if get(snake).is_some() {
                self.violation(req, &format!("{snake}: DingTalk's names are camelCase"));
            }
        }
        if get("clientId") != Some(CLIENT_ID) || get("clientSecret") != Some(CLIENT_SECRET) {
            return self.refusal(
                StatusCode::BAD_REQUEST,
                "invalidClientSecret",
                "无效的clientSecret",
            );
        }
        let seed = match (get("grantType"), get("code"), get("refreshToken")) {
            (Some("authorization_code"), Some(code), _) => match self.core.redeem_code(code) {
                Some(grant) => grant.seed,
                None => {
                    return self.refusal(
                        StatusCode::BAD_REQUEST,
                        "invalidAuthCode",
                        "不合法的临时授权码",
                    );
                }
            },
            (Some("refresh_token"), _, Some(refresh)) => {
                match self.core.use_refresh(refresh, false) {
                    Some(grant) => grant.seed,
                    None => {
                        return self.refusal(
                            StatusCode::BAD_REQUEST,
                            "invalidRefreshToken",
                            "不合法的refreshToken",
                        );
                    }
                }
            }
            (grant_type, _, _) => {
                self.violation(req, &format!("grantType {grant_type:?} without its value"));
                return self.refusal(StatusCode::BAD_REQUEST, "MissingParameter", "参数缺失");
            }
        };
        let (access, refresh) = self.mint(&seed);
        answer(
            StatusCode::OK,
            JSON_UTF8,
            obj(&[
                ("accessToken", access.into()),
                ("refreshToken", refresh.into()),
                ("expireIn", self.core.number(EXPIRES_IN)),
                ("corpId", CORP_ID.into()),
            ]),
        )
    }

    fn me(&self, req: &Req, headers: &HeaderMap) -> Response {
        if req.method != Method::GET {
            self.violation(req, "users/me takes GET");
        }
        if req.authorization.is_some() {
            self.violation(
                req,
                "an Authorization header (DingTalk reads x-acs-dingtalk-access-token)",
            );
        }
        let grant = header_str(headers, TOKEN_HEADER).and_then(|t| self.core.access_grant(t));
        let Some(grant) = grant else {
            return self.refusal(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthentication",
                "不合法的access_token",
            );
        };
        let Some(u) = lock(&self.users).get(&grant.seed).cloned() else {
            return self.refusal(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthentication",
                "不合法的access_token",
            );
        };
        let mut fields = vec![
            ("nick", Value::from(u.nick)),
            ("avatarUrl", u.avatar_url.into()),
            ("mobile", u.mobile.into()),
            ("openId", u.open_id.into()),
            ("unionId", u.union_id.into()),
        ];
        if let Some(email) = u.email {
            fields.push(("email", email.into()));
        }
        fields.push(("stateCode", "86".into()));
        answer(StatusCode::OK, JSON_UTF8, obj(&fields))
    }
}

/// The one handler: each path is logged under its step, and an armed fault
/// answers before DingTalk does.
async fn handle(
    State(d): State<Arc<Dingtalk>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let step = match uri.path() {
        ME_PATH => Step::Identity,
        _ if param(&req.json, "grantType") == Some("refresh_token") => Step::Refresh,
        _ => Step::Token,
    };
    let seen = req.seen(step);
    d.core
        .answer(step, seen, || match step {
            Step::Identity => d.me(&req, &headers),
            _ => d.token(&req),
        })
        .await
}
