//! WeChat website (QR code) login emulator (docs/providers.md#wechat):
//! open.weixin.qq.com's `/connect/qrconnect` (checked by
//! [`Emulator::approve`]) and api.weixin.qq.com's
//! `/sns/oauth2/{access_token,refresh_token}` and `/sns/userinfo`.
//!
//! Reproduced: JSON labelled `text/plain`, errors as
//! `{"errcode":N,"errmsg":"…, rid: …"}` with HTTP 200, `expires_in` as a
//! number, success bodies free of the substring `errcode`, `headimgurl`
//! with `\/`-escaped slashes, the blanked sex/province/city/country fields
//! (since 2021-10-20), UTF-8 nicknames, and a refresh that keeps the refresh
//! token and returns the same access token while it is still valid.

use std::{
    collections::{HashMap, HashSet},
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
        Log, Req, answer, authorize_params, derive, expect_param, obj, provider_config, single,
        state_param,
    },
};

/// A real-looking website-app AppID (`wx` + 16 hex) and AppSecret (32 hex).
pub const APP_ID: &str = "wxd4c2a9b3e5f70861";
pub const APP_SECRET: &str = "5b0e8a7c3f9d1e2a4c6b8d0f1a3e5c7b";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const AUTHORIZE_PATH: &str = "/connect/qrconnect";
pub const TOKEN_PATH: &str = "/sns/oauth2/access_token";
pub const REFRESH_PATH: &str = "/sns/oauth2/refresh_token";
pub const USER_INFO_PATH: &str = "/sns/userinfo";
pub const EXPIRES_IN: i64 = 7200;
/// What api.weixin.qq.com labels its JSON with.
const CONTENT_TYPE: &str = "text/plain";
/// Characters of openids, unionids and tokens.
const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A WeChat user as this app sees them.
#[derive(Clone, Debug)]
pub struct WechatUser {
    pub seed: String,
    /// 28 characters, per AppID (`oH9d2v7N…`).
    pub openid: String,
    /// 28 characters, per Open Platform account.
    pub unionid: String,
    pub nickname: String,
    /// With plain slashes; the wire form escapes them as `\/`.
    pub headimgurl: String,
}

impl WechatUser {
    fn new(seed: &str) -> Self {
        WechatUser {
            seed: seed.into(),
            openid: format!(
                "oH9d2v{}",
                derive(&["wx-openid", APP_ID, seed], ID_CHARS, 22)
            ),
            unionid: format!("oxW9O{}", derive(&["wx-unionid", seed], ID_CHARS, 23)),
            nickname: format!("摇一摇-{seed}"),
            headimgurl: format!(
                "https://thirdwx.qlogo.cn/mmopen/vi_32/{}/132",
                derive(&["wx-head", seed], ALNUM, 64)
            ),
        }
    }

    fn expected(&self, with_unionid: bool) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.openid.clone(),
            union_id: if with_unionid {
                self.unionid.clone()
            } else {
                String::new()
            },
            username: String::new(),
            display_name: self.nickname.clone(),
            avatar_url: self.headimgurl.clone(),
            email: String::new(),
            email_verified: false,
        }
    }
}

/// A running WeChat emulator; the server stops when this is dropped.
pub struct WechatEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Wechat>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WechatEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Wechat {
    core: Core,
    users: Mutex<HashMap<String, WechatUser>>,
    /// Codes redeemed once: a second try is 40163, not 40029.
    used_codes: Mutex<HashSet<String>>,
    /// The access token a refresh token last produced.
    latest_access: Mutex<HashMap<String, String>>,
    /// Access tokens past their 7200 s: 42001.
    expired: Mutex<HashSet<String>>,
    /// The app is bound to an Open Platform account: `unionid` is sent.
    unionid: AtomicBool,
}

impl WechatEmulator {
    pub async fn start() -> Self {
        let shared = Arc::new(Wechat {
            core: Core::default(),
            users: Mutex::default(),
            used_codes: Mutex::default(),
            latest_access: Mutex::default(),
            expired: Mutex::default(),
            unionid: AtomicBool::new(true),
        });
        let router = Router::new()
            .route(TOKEN_PATH, any(token))
            .route(REFRESH_PATH, any(refresh))
            .route(USER_INFO_PATH, any(user_info))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        WechatEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn client_id(&self) -> &'static str {
        APP_ID
    }

    pub fn client_secret(&self) -> &'static str {
        APP_SECRET
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn user(&self, seed: &str) -> Option<WechatUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// Whether the app is bound to an Open Platform account. Off: no
    /// `unionid` in the token answer nor in `/sns/userinfo` (users added
    /// afterwards expect an empty union id).
    pub fn set_unionid_enabled(&self, on: bool) {
        self.shared.unionid.store(on, Ordering::Relaxed);
    }

    /// The access token's 7200 s are over: `/sns/userinfo` answers 42001
    /// and a refresh mints a new access token.
    pub fn expire_access_token(&self, token: &str) {
        self.shared.core.revoke_access(token);
        lock(&self.shared.expired).insert(token.into());
    }

    /// Every outstanding code is older than ten minutes.
    pub fn expire_codes(&self) {
        self.shared.core.expire_codes();
    }

    /// Only the next `times` requests of `step` get `fault`.
    pub fn set_fault_times(&self, step: Step, fault: Fault, times: u32) {
        self.shared.core.faults.set_times(step, fault, times);
    }

    /// The checks `/connect/qrconnect` makes; `Ok` carries the state.
    fn check_authorize(&self, authorize_url: &str) -> Result<String, String> {
        let params = authorize_params(
            authorize_url,
            &self.base_url,
            AUTHORIZE_PATH,
            Some("wechat_redirect"),
            "WeChat",
        )?;
        if single(&params, "client_id")?.is_some() {
            return Err("`client_id` sent: WeChat names the app id `appid`".into());
        }
        // Real failures show an error page (该链接无法访问 / 10003 / 10005).
        expect_param(&params, "appid", APP_ID, None)?;
        expect_param(&params, "redirect_uri", REDIRECT_URI, Some("10003"))?;
        expect_param(&params, "response_type", "code", None)?;
        match single(&params, "scope")? {
            Some("snsapi_login") => {}
            other => {
                return Err(format!(
                    "scope is {other:?}; website apps take exactly \"snsapi_login\" (10005)"
                ));
            }
        }
        state_param(&params)
    }
}

impl Emulator for WechatEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "wechat"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "wechat",
            APP_ID,
            APP_SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("refresh_url", self.url(REFRESH_PATH)),
                ("userinfo_url", self.url(USER_INFO_PATH)),
            ],
        )
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: false,
            refresh: true,
            refresh_single_use: false,
            revoke: false,
            errors_with_http_200: true,
            deny_redirects: false,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = WechatUser::new(seed);
        let expected = user.expected(self.shared.unionid.load(Ordering::Relaxed));
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let core = &self.shared.core;
        let state = core.approvable(
            self.check_authorize(authorize_url),
            &self.shared.users,
            seed,
        )?;
        let grant = CodeGrant::redirected(seed, APP_ID, REDIRECT_URI, vec!["snsapi_login".into()]);
        // Real codes: 32 alphanumerics, usually starting with 0 (`081sSq00…`).
        Ok(core.code_redirect(random_token("0", 31, ALNUM), grant, state))
    }

    /// Current documentation: a denial does not redirect (the old one sent
    /// `?state=` without a code).
    fn deny(&self, _authorize_url: &str) -> Option<Vec<(String, String)>> {
        None
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let scopes = ["snsapi_login".to_string()];
        let access = self.shared.new_access(seed, &scopes);
        let refresh = self.shared.new_refresh(seed, &scopes, &access);
        (access, Some(refresh))
    }
}

// ---------------------------------------------------------------------------
// Endpoints

/// `78_` + opaque characters; never containing `errcode`, which casdoor
/// looks for as a substring of the whole body.
fn wx_token() -> String {
    loop {
        let t = random_token("78_", 86, ID_CHARS);
        if !t.contains("errcode") {
            return t;
        }
    }
}

/// The `, rid: …` WeChat appends to most error messages.
fn rid() -> String {
    format!(
        ", rid: {}-{}-{}",
        random_token("", 8, HEX_LOWER),
        random_token("", 8, HEX_LOWER),
        random_token("", 8, HEX_LOWER)
    )
}

impl Wechat {
    fn new_access(&self, seed: &str, scopes: &[String]) -> String {
        let access = wx_token();
        self.core.store_access(&access, seed, scopes);
        access
    }

    fn new_refresh(&self, seed: &str, scopes: &[String], access: &str) -> String {
        let refresh = wx_token();
        self.core.store_refresh(&refresh, seed, scopes);
        lock(&self.latest_access).insert(refresh.clone(), access.into());
        refresh
    }

    fn with_unionid(&self) -> bool {
        self.unionid.load(Ordering::Relaxed)
    }

    /// `{"errcode":N,"errmsg":"…"}`, HTTP 200.
    fn error(&self, code: i64, message: &str) -> Response {
        wx_answer(obj(&[
            ("errcode", self.core.number(code)),
            ("errmsg", message.into()),
        ]))
    }

    /// A shape problem: recorded, and answered with WeChat's error.
    fn refuse(&self, req: &Req, why: &str, code: i64, message: &str) -> Response {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
        self.error(code, message)
    }

    fn transport_violations(&self, req: &Req, allow_post: bool) {
        let at = format!("{} {}", req.method, req.path);
        let allowed = req.method == Method::GET || (allow_post && req.method == Method::POST);
        if !allowed {
            self.core
                .violation(format!("{at}: WeChat documents GET here"));
        }
        if req.json_body {
            self.core
                .violation(format!("{at}: a JSON body (WeChat reads the query string)"));
        }
        if req.authorization.is_some() {
            self.core.violation(format!(
                "{at}: an Authorization header (WeChat reads parameters only)"
            ));
        }
        if req.has("code_verifier") {
            self.core
                .violation(format!("{at}: code_verifier sent (WeChat has no PKCE)"));
        }
    }

    /// The appid check every api.weixin.qq.com OAuth call makes: the
    /// answer refusing the request, if it fails.
    fn appid_refusal(&self, req: &Req) -> Option<Response> {
        match req.param("appid") {
            Some(APP_ID) => None,
            Some(_) => Some(self.error(40013, &format!("invalid appid{}", rid()))),
            None => {
                let why = if req.has("client_id") {
                    "client_id sent; WeChat names it appid"
                } else {
                    "no appid"
                };
                Some(self.refuse(req, why, 41002, &format!("appid missing{}", rid())))
            }
        }
    }

    fn token(&self, req: &Req) -> Response {
        self.transport_violations(req, true);
        if let Some(response) = self.appid_refusal(req) {
            return response;
        }
        match req.param("secret") {
            Some(APP_SECRET) => {}
            Some(_) => return self.error(40125, &format!("invalid appsecret{}", rid())),
            None => {
                let why = if req.has("client_secret") {
                    "client_secret sent; WeChat names it secret"
                } else {
                    "no secret"
                };
                return self.refuse(req, why, 41004, &format!("appsecret missing{}", rid()));
            }
        }
        let Some(code) = req.param("code") else {
            return self.refuse(req, "no code", 41008, &format!("missing code{}", rid()));
        };
        if req.param("grant_type") != Some("authorization_code") {
            let why = if req.param("grant_type") == Some("refresh_token") {
                "a refresh sent to the code endpoint; WeChat refreshes at /sns/oauth2/refresh_token"
            } else {
                "grant_type is not authorization_code"
            };
            return self.refuse(req, why, 40002, &format!("invalid grant_type{}", rid()));
        }
        let Some(grant) = self.core.redeem_code(code) else {
            return if lock(&self.used_codes).contains(code) {
                self.error(40163, &format!("code been used{}", rid()))
            } else {
                self.error(40029, &format!("invalid code{}", rid()))
            };
        };
        lock(&self.used_codes).insert(code.into());
        let Some(user) = lock(&self.users).get(&grant.seed).cloned() else {
            return self.error(40029, &format!("invalid code{}", rid()));
        };
        let access = self.new_access(&grant.seed, &grant.scopes);
        let refresh = self.new_refresh(&grant.seed, &grant.scopes, &access);
        let mut fields = vec![
            ("access_token", Value::from(access)),
            ("expires_in", self.core.number(EXPIRES_IN)),
            ("refresh_token", refresh.into()),
            ("openid", user.openid.into()),
            ("scope", grant.scopes.join(",").into()),
        ];
        if self.with_unionid() {
            fields.push(("unionid", user.unionid.into()));
        }
        wx_answer(obj(&fields))
    }

    fn refresh(&self, req: &Req) -> Response {
        self.transport_violations(req, true);
        if req.has("secret") || req.has("client_secret") {
            self.core.violation(format!(
                "{} {}: a secret sent to the refresh endpoint, which takes none",
                req.method, req.path
            ));
        }
        if let Some(response) = self.appid_refusal(req) {
            return response;
        }
        if req.param("grant_type") != Some("refresh_token") {
            return self.refuse(
                req,
                "grant_type is not refresh_token",
                40002,
                &format!("invalid grant_type{}", rid()),
            );
        }
        let Some(token) = req.param("refresh_token") else {
            return self.refuse(
                req,
                "no refresh_token",
                41003,
                &format!("refresh_token missing{}", rid()),
            );
        };
        // Valid for 30 days and reusable; not renewed by refreshing.
        let Some(grant) = self.core.use_refresh(token, false) else {
            return self.error(40030, "invalid refresh_token");
        };
        let Some(user) = lock(&self.users).get(&grant.seed).cloned() else {
            return self.error(40030, "invalid refresh_token");
        };
        // A still-valid access token comes back with its expiry extended.
        let current = lock(&self.latest_access)
            .get(token)
            .filter(|t| self.core.access_grant(t).is_some())
            .cloned();
        let access = match current {
            Some(access) => access,
            None => {
                let access = self.new_access(&grant.seed, &grant.scopes);
                lock(&self.latest_access).insert(token.into(), access.clone());
                access
            }
        };
        wx_answer(obj(&[
            ("access_token", access.into()),
            ("expires_in", self.core.number(EXPIRES_IN)),
            ("refresh_token", token.into()),
            ("openid", user.openid.into()),
            ("scope", grant.scopes.join(",").into()),
        ]))
    }

    fn user_info(&self, req: &Req) -> Response {
        self.transport_violations(req, false);
        let Some(token) = req.param("access_token") else {
            return self.refuse(
                req,
                "no access_token",
                41001,
                &format!("access_token missing{}", rid()),
            );
        };
        if lock(&self.expired).contains(token) {
            return self.error(42001, "access_token expired");
        }
        let user = self
            .core
            .access_grant(token)
            .and_then(|g| lock(&self.users).get(&g.seed).cloned());
        let Some(user) = user else {
            return self.error(
                40001,
                &format!(
                    "invalid credential, access_token is invalid or not latest{}",
                    rid()
                ),
            );
        };
        if req.param("openid") != Some(user.openid.as_str()) {
            return self.refuse(
                req,
                "openid is not the token's user (take it from the token answer)",
                40003,
                "invalid openid",
            );
        }
        // `\/` as WeChat escapes it; the URL has no other characters to escape.
        let headimgurl = Value::from(user.headimgurl.as_str())
            .to_string()
            .replace('/', "\\/");
        let mut body = obj(&[
            ("openid", user.openid.into()),
            ("nickname", user.nickname.into()),
            // Blanked since 2021-10-20; the keys stay.
            ("sex", self.core.number(0)),
            ("language", "".into()),
            ("city", "".into()),
            ("province", "".into()),
            ("country", "".into()),
        ]);
        body.pop();
        body.push_str(&format!(",\"headimgurl\":{headimgurl},\"privilege\":[]"));
        if self.with_unionid() {
            body.push_str(&format!(",\"unionid\":{}", Value::from(user.unionid)));
        }
        body.push('}');
        wx_answer(body)
    }
}

fn wx_answer(body: String) -> Response {
    answer(StatusCode::OK, CONTENT_TYPE, body)
}

async fn token(
    State(wx): State<Arc<Wechat>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&wx.core, req.seen(Step::Token));
    if let Some(response) = wx.core.faults.apply(Step::Token).await {
        return log.answer(response);
    }
    log.answer(wx.token(&req))
}

async fn refresh(
    State(wx): State<Arc<Wechat>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&wx.core, req.seen(Step::Refresh));
    if let Some(response) = wx.core.faults.apply(Step::Refresh).await {
        return log.answer(response);
    }
    log.answer(wx.refresh(&req))
}

async fn user_info(
    State(wx): State<Arc<Wechat>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&wx.core, req.seen(Step::Identity));
    if let Some(response) = wx.core.faults.apply(Step::Identity).await {
        return log.answer(response);
    }
    log.answer(wx.user_info(&req))
}
