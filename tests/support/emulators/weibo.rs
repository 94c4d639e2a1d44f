//! Sina Weibo emulator (docs/providers.md#weibo): api.weibo.com's
//! `/oauth2/{authorize,access_token}` and `/2/users/show.json`.
//!
//! Reproduced: the token answer with `uid` and `remind_in` as strings and
//! `expires_in` as a number, no refresh token (web apps), errors as HTTP 400
//! `{"error","error_code","request","error_uri","error_description"}` whose
//! description echoes the code back (`invalid authorization code:<code>`),
//! the 21323 answer to a JSON body, and the `users/show` object with `id` as
//! an int64 and `idstr` as a string.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
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
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, Fault, HEX_LOWER, Step, lock,
    random_token, serve,
    wire::{
        Log, Req, answer, authorize_params, derive, derive_u64, expect_param, obj, provider_config,
        scope_list, state_of, state_param,
    },
};

/// A real-looking AppKey (10 digits) and App Secret (32 lower-case hex).
pub const APP_KEY: &str = "2975304119";
pub const APP_SECRET: &str = "e4b1c9d07a3f58e2b6d0c4a8f2e6b9d3";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const AUTHORIZE_PATH: &str = "/oauth2/authorize";
pub const TOKEN_PATH: &str = "/oauth2/access_token";
pub const SHOW_PATH: &str = "/2/users/show.json";
/// The lifetime of the documentation sample (it varies by app level).
pub const EXPIRES_IN: i64 = 157_679_999;
/// The 2011 capture of the token endpoint (c9s/Plack-Middleware-OAuth#8).
const TOKEN_CONTENT_TYPE: &str = "text/plain;charset=UTF-8";
/// The REST API's label (unverified).
const API_CONTENT_TYPE: &str = "application/json;charset=UTF-8";
/// Scopes the authorize page knows.
const SCOPES: &[&str] = &[
    "all",
    "email",
    "direct_messages_read",
    "direct_messages_write",
    "friendships_groups_read",
    "friendships_groups_write",
    "statuses_to_me_read",
    "follow_app_official_microblog",
    "invitation_write",
];

/// A Weibo user.
#[derive(Clone, Debug)]
pub struct WeiboUser {
    pub seed: String,
    /// 10 digits; a JSON int64 in `users/show`, a string in the token answer.
    pub uid: u64,
    pub screen_name: String,
    /// The picture id of the avatar URLs.
    picture: String,
    pub male: bool,
}

impl WeiboUser {
    fn new(seed: &str) -> Self {
        WeiboUser {
            seed: seed.into(),
            uid: 1_000_000_000 + derive_u64(&["weibo-uid", seed]) % 6_000_000_000,
            screen_name: format!("晴天小猪_{seed}"),
            picture: format!(
                "006{}",
                derive(
                    &["weibo-pic", seed],
                    b"0123456789abcdefghijklmnopqrstuvwxyz",
                    29
                )
            ),
            male: derive_u64(&["weibo-gender", seed]).is_multiple_of(2),
        }
    }

    fn avatar(&self, size: u32) -> String {
        format!(
            "https://tvax1.sinaimg.cn/crop.0.0.1080.1080.{size}/{}.jpg",
            self.picture
        )
    }

    pub fn avatar_hd(&self) -> String {
        self.avatar(1024)
    }

    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.uid.to_string(),
            union_id: String::new(),
            username: self.screen_name.clone(),
            display_name: self.screen_name.clone(),
            avatar_url: self.avatar_hd(),
            email: String::new(),
            email_verified: false,
        }
    }
}

/// A running Weibo emulator; the server stops when this is dropped.
pub struct WeiboEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Weibo>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WeiboEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Weibo {
    core: Core,
    users: Mutex<HashMap<String, WeiboUser>>,
    /// `"uid":6397634785` instead of `"uid":"6397634785"` in the token answer.
    uid_as_number: AtomicBool,
}

impl WeiboEmulator {
    pub async fn start() -> Self {
        let shared = Arc::new(Weibo {
            core: Core::default(),
            users: Mutex::default(),
            uid_as_number: AtomicBool::new(false),
        });
        let router = Router::new()
            .route(TOKEN_PATH, any(token))
            .route(SHOW_PATH, any(show))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        WeiboEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn client_id(&self) -> &'static str {
        APP_KEY
    }

    pub fn client_secret(&self) -> &'static str {
        APP_SECRET
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn user(&self, seed: &str) -> Option<WeiboUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// Sends the token answer's `uid` as a JSON number (the documented
    /// answer has a string; `get_token_info` and other libraries' types
    /// have numbers). `set_numbers_as_strings(true)` still wins.
    pub fn set_uid_as_number(&self, on: bool) {
        self.shared.uid_as_number.store(on, Ordering::Relaxed);
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

    /// The checks `/oauth2/authorize` makes; `Ok` carries (state, scopes).
    fn check_authorize(&self, authorize_url: &str) -> Result<(String, Vec<String>), String> {
        let params =
            authorize_params(authorize_url, &self.base_url, AUTHORIZE_PATH, None, "Weibo")?;
        expect_param(&params, "client_id", APP_KEY, None)?;
        expect_param(&params, "redirect_uri", REDIRECT_URI, Some("21322"))?;
        expect_param(&params, "response_type", "code", None)?;
        let state = state_param(&params)?;
        let scopes = scope_list(&params, ',', SCOPES, &[], "Weibo")?;
        Ok((state, scopes))
    }
}

impl Emulator for WeiboEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "weibo"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "weibo",
            APP_KEY,
            APP_SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("userinfo_url", self.url(SHOW_PATH)),
            ],
        )
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: false,
            refresh: false,
            refresh_single_use: false,
            revoke: false,
            errors_with_http_200: false,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = WeiboUser::new(seed);
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
        let grant = CodeGrant::redirected(seed, APP_KEY, REDIRECT_URI, scopes);
        // Sample: a2960248100209b778202fcdc565df1d.
        Ok(core.code_redirect(random_token("", 32, HEX_LOWER), grant, state))
    }

    /// `error_code` 21330 per Weibo's error table; the description text is
    /// unverified (the table's wording).
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        let state = state_of(authorize_url);
        Some(vec![
            ("error".into(), "access_denied".into()),
            ("error_code".into(), "21330".into()),
            (
                "error_description".into(),
                "用户或授权服务器拒绝授予数据访问权限".into(),
            ),
            ("state".into(), state),
        ])
    }

    /// Web apps get no refresh token.
    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        (self.shared.new_access(seed, &[]), None)
    }
}

// ---------------------------------------------------------------------------
// Endpoints

impl Weibo {
    /// `2.00` + 28 characters, like `2.00pDpxyGd3J5bEef6b98778e0ZKsu4`.
    fn new_access(&self, seed: &str, scopes: &[String]) -> String {
        let access = random_token("2.00", 28, ALNUM);
        self.core.store_access(&access, seed, scopes);
        access
    }

    /// The OAuth error shape of `/oauth2/access_token`, HTTP 400.
    fn oauth_error(&self, error: &str, code: i64, description: &str) -> Response {
        answer(
            StatusCode::BAD_REQUEST,
            TOKEN_CONTENT_TYPE,
            obj(&[
                ("error", error.into()),
                ("error_code", self.core.number(code)),
                ("request", TOKEN_PATH.into()),
                ("error_uri", TOKEN_PATH.into()),
                ("error_description", description.into()),
            ]),
        )
    }

    fn refuse(&self, req: &Req, why: &str, error: &str, code: i64, description: &str) -> Response {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
        self.oauth_error(error, code, description)
    }

    /// The REST API's error shape (`request` is the path), status unverified.
    fn api_error(&self, status: StatusCode, error: &str, code: i64) -> Response {
        answer(
            status,
            API_CONTENT_TYPE,
            obj(&[
                ("error", error.into()),
                ("error_code", self.core.number(code)),
                ("request", SHOW_PATH.into()),
            ]),
        )
    }

    fn token(&self, req: &Req) -> Response {
        let at = format!("{} {}", req.method, req.path);
        if req.method != Method::POST {
            self.core
                .violation(format!("{at}: the token endpoint takes POST"));
            // Weibo's own spelling; the exact answer to a GET is unverified.
            return answer(
                StatusCode::BAD_REQUEST,
                TOKEN_CONTENT_TYPE,
                obj(&[
                    (
                        "error",
                        "HTTP METHOD is not suported for this request!".into(),
                    ),
                    ("error_code", self.core.number(10021)),
                    ("request", TOKEN_PATH.into()),
                ]),
            );
        }
        if req.authorization.is_some() {
            self.core.violation(format!(
                "{at}: an Authorization header (Weibo reads client_id/client_secret parameters)"
            ));
        }
        if req.has("code_verifier") {
            self.core
                .violation(format!("{at}: code_verifier sent (Weibo has no PKCE)"));
        }
        if req.json_body {
            return self.refuse(
                req,
                "a JSON body (Weibo reads a form body or the query)",
                "invalid_request",
                21323,
                "miss client id or secret",
            );
        }
        let (Some(client_id), Some(secret)) = (req.param("client_id"), req.param("client_secret"))
        else {
            return self.refuse(
                req,
                "client_id or client_secret missing",
                "invalid_request",
                21323,
                "miss client id or secret",
            );
        };
        if client_id != APP_KEY {
            return self.oauth_error(
                "invalid_client",
                21324,
                &format!("unknow client id:{client_id}"),
            );
        }
        if secret != APP_SECRET {
            // Description unverified.
            return self.oauth_error("invalid_client", 21324, "invalid client secret");
        }
        match req.param("grant_type") {
            Some("authorization_code") => {}
            other => {
                // Web apps have no refresh grant; descriptions unverified.
                let why = format!("grant_type is {other:?}");
                return self.refuse(
                    req,
                    &why,
                    "unsupported_grant_type",
                    21328,
                    "unsupport grant type",
                );
            }
        }
        let Some(code) = req.param("code") else {
            return self.refuse(req, "no code", "invalid_request", 21323, "miss code");
        };
        let Some(redirect_uri) = req.param("redirect_uri") else {
            return self.refuse(
                req,
                "no redirect_uri",
                "redirect_uri_mismatch",
                21322,
                "redirect_uri_mismatch",
            );
        };
        let Some(grant) = self.core.redeem_code(code) else {
            // Echoes the code: clients must not surface descriptions.
            return self.oauth_error(
                "invalid_grant",
                21325,
                &format!("invalid authorization code:{code}"),
            );
        };
        if grant.redirect_uri.as_deref() != Some(redirect_uri) {
            return self.refuse(
                req,
                "redirect_uri differs from the authorize request's",
                "redirect_uri_mismatch",
                21322,
                "redirect_uri_mismatch",
            );
        }
        let Some(user) = lock(&self.users).get(&grant.seed).cloned() else {
            return self.oauth_error(
                "invalid_grant",
                21325,
                &format!("invalid authorization code:{code}"),
            );
        };
        let access = self.new_access(&grant.seed, &grant.scopes);
        let uid = if self.uid_as_number.load(Ordering::Relaxed) {
            self.core.number(user.uid as i64)
        } else {
            user.uid.to_string().into()
        };
        let mut fields = vec![
            ("access_token", Value::from(access)),
            ("remind_in", EXPIRES_IN.to_string().into()),
            ("expires_in", self.core.number(EXPIRES_IN)),
            ("uid", uid),
            ("isRealName", "true".into()),
        ];
        if !grant.scopes.is_empty() {
            fields.push(("scope", grant.scopes.join(",").into()));
        }
        answer(StatusCode::OK, TOKEN_CONTENT_TYPE, obj(&fields))
    }

    fn show(&self, req: &Req) -> Response {
        let at = format!("{} {}", req.method, req.path);
        if req.method != Method::GET {
            self.core.violation(format!("{at}: users/show takes GET"));
        }
        let Some(token) = req.param("access_token") else {
            self.core.violation(format!("{at}: no access_token"));
            return self.api_error(StatusCode::UNAUTHORIZED, "auth by Null spi!", 21301);
        };
        let Some(grant) = self.core.access_grant(token) else {
            return self.api_error(StatusCode::UNAUTHORIZED, "invalid_access_token", 21332);
        };
        let Some(uid) = req.param("uid") else {
            self.core.violation(format!("{at}: no uid"));
            return self.api_error(
                StatusCode::BAD_REQUEST,
                "miss required parameter (uid), see doc for more info.",
                10016,
            );
        };
        let users = lock(&self.users);
        let Some(user) = users.values().find(|u| u.uid.to_string() == uid).cloned() else {
            return self.api_error(StatusCode::BAD_REQUEST, "User does not exists!", 20003);
        };
        drop(users);
        if user.seed != grant.seed {
            // Weibo would show that other user's public profile.
            self.core.violation(format!(
                "{at}: uid is not the token's user (take it from the token answer)"
            ));
        }
        answer(StatusCode::OK, API_CONTENT_TYPE, self.user_json(&user))
    }

    /// The `users/show` object, in the order of the documented sample.
    fn user_json(&self, u: &WeiboUser) -> String {
        let n = |v: i64| self.core.number(v);
        let uid = u.uid.to_string();
        obj(&[
            ("id", n(u.uid as i64)),
            ("idstr", uid.clone().into()),
            ("class", n(1)),
            ("screen_name", u.screen_name.clone().into()),
            ("name", u.screen_name.clone().into()),
            ("province", "11".into()),
            ("city", "5".into()),
            ("location", "北京 朝阳区".into()),
            ("description", "".into()),
            ("url", "".into()),
            ("profile_image_url", u.avatar(50).into()),
            ("profile_url", format!("u/{uid}").into()),
            ("domain", "".into()),
            ("weihao", "".into()),
            ("gender", if u.male { "m" } else { "f" }.into()),
            ("followers_count", n(1204)),
            ("friends_count", n(183)),
            ("statuses_count", n(2150)),
            ("favourites_count", n(11)),
            ("created_at", "Fri Aug 28 00:00:00 +0800 2009".into()),
            ("following", false.into()),
            ("allow_all_act_msg", false.into()),
            ("geo_enabled", true.into()),
            ("verified", false.into()),
            ("verified_type", n(-1)),
            ("remark", "".into()),
            ("allow_all_comment", true.into()),
            ("avatar_large", u.avatar(180).into()),
            ("avatar_hd", u.avatar_hd().into()),
            ("verified_reason", "".into()),
            ("follow_me", false.into()),
            ("online_status", n(0)),
            ("bi_followers_count", n(97)),
            ("lang", "zh-cn".into()),
        ])
    }
}

async fn token(
    State(wb): State<Arc<Weibo>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&wb.core, req.seen(Step::Token));
    if let Some(response) = wb.core.faults.apply(Step::Token).await {
        return log.answer(response);
    }
    log.answer(wb.token(&req))
}

async fn show(
    State(wb): State<Arc<Weibo>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&wb.core, req.seen(Step::Identity));
    if let Some(response) = wb.core.faults.apply(Step::Identity).await {
        return log.answer(response);
    }
    log.answer(wb.show(&req))
}
