//! QQ Connect emulator (docs/providers.md#qq): graph.qq.com's
//! `/oauth2.0/{token,me}` and `/user/get_user_info` on one local port.
//!
//! Reproduced byte for byte: the form-encoded token answer
//! (`access_token=…&expires_in=7776000&refresh_token=…`), the `fmt=json`
//! variant with `expires_in` as a string, the JSONP `callback( {…} );\n`
//! of `/me` and of every error (HTTP 200, `Content-Type: text/html`), and
//! the `get_user_info` object with `ret`/`msg`. The browser step
//! (`/oauth2.0/authorize`) is checked by [`Emulator::approve`].
//!

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

use super::wire::{
    Log, Req, answer, authorize_params, derive, digest, expect_param, hex_upper, obj,
    provider_config, scope_list, single, state_param,
};
use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, Fault, HEX_UPPER, Step, lock,
    random_token, serve,
};

/// A real-looking QQ Connect appid (numeric) and appkey (32 lower-case hex).
pub const APP_ID: &str = "101518219";
pub const APP_KEY: &str = "8c5a2e3f71d94b06a9e4c7d2b1f0e385";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const AUTHORIZE_PATH: &str = "/oauth2.0/authorize";
pub const TOKEN_PATH: &str = "/oauth2.0/token";
pub const ME_PATH: &str = "/oauth2.0/me";
pub const USER_INFO_PATH: &str = "/user/get_user_info";
/// The lifetime in the documentation samples (the wiki now says 5184000).
pub const EXPIRES_IN: u64 = 7_776_000;
/// What graph.qq.com labels every answer with, JSON and JSONP alike
/// (real capture of `/me`; assumed for the other endpoints).
const CONTENT_TYPE: &str = "text/html";
/// The `t=` of the sample `figureurl_qq_*` URLs.
const QLOGO_T: &str = "1557635654";
/// The APIs a QQ Connect `scope` may name (wiki: API 列表).
const APIS: &[&str] = &[
    "get_user_info",
    "list_album",
    "upload_pic",
    "add_album",
    "list_photo",
    "get_vip_info",
    "get_vip_rich_info",
    "get_info",
    "add_t",
    "del_t",
    "add_pic_t",
    "get_repost_list",
    "get_other_info",
    "get_fanslist",
    "get_idollist",
    "add_idol",
    "del_idol",
    "get_tenpay_addr",
    "all",
];

/// Which `figureurl*` fields a user's `get_user_info` carries. Real answers
/// always have the Qzone sizes and `figureurl_qq_1` (40 px); the 100 px
/// `figureurl_qq_2` "may be absent", the 640 px `figureurl_qq` is newer.
/// Each variant makes authbroker take a different entry of its fallback list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QqAvatars {
    /// Everything: the avatar is `figureurl_qq` (640 px).
    Full,
    /// No `figureurl_qq`: the avatar is `figureurl_qq_2` (100 px).
    Without640,
    /// Neither `figureurl_qq` nor `figureurl_qq_2`: the avatar is the
    /// Qzone `figureurl_2` (100 px).
    QzoneOnly,
}

/// A QQ user as this app sees them.
#[derive(Clone, Debug)]
pub struct QqUser {
    pub seed: String,
    /// 32 upper-case hex, per app.
    pub openid: String,
    /// `UID_` + 32 upper-case hex, across the developer's apps.
    pub unionid: String,
    pub nickname: String,
    pub male: bool,
    pub avatars: QqAvatars,
    /// The `k=` of the `thirdqq.qlogo.cn` picture URLs.
    qlogo_key: String,
}

impl QqUser {
    fn new(seed: &str, avatars: Option<QqAvatars>) -> Self {
        let h = digest(&["qq-user", seed]);
        QqUser {
            seed: seed.into(),
            openid: hex_upper(&digest(&["qq-openid", APP_ID, seed])[..16]),
            unionid: format!("UID_{}", hex_upper(&digest(&["qq-unionid", seed])[..16])),
            nickname: format!("飞翔的企鹅-{seed}"),
            male: h[1].is_multiple_of(2),
            avatars: avatars.unwrap_or(match h[0] % 3 {
                0 => QqAvatars::Full,
                1 => QqAvatars::Without640,
                _ => QqAvatars::QzoneOnly,
            }),
            qlogo_key: derive(&["qq-qlogo", seed], ALNUM, 22),
        }
    }

    fn qzone_url(&self, size: u32) -> String {
        format!(
            "http://qzapp.qlogo.cn/qzapp/{APP_ID}/{}/{size}",
            self.openid
        )
    }

    fn qq_url(&self, size: u32) -> String {
        format!(
            "http://thirdqq.qlogo.cn/g?b=oidb&k={}&s={size}&t={QLOGO_T}",
            self.qlogo_key
        )
    }

    /// The largest picture `get_user_info` will carry.
    pub fn avatar_url(&self) -> String {
        match self.avatars {
            QqAvatars::Full => self.qq_url(640),
            QqAvatars::Without640 => self.qq_url(100),
            QqAvatars::QzoneOnly => self.qzone_url(100),
        }
    }

    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.openid.clone(),
            // provider_config() leaves `union_id` off, so authbroker never asks.
            union_id: String::new(),
            username: String::new(),
            display_name: self.nickname.clone(),
            avatar_url: self.avatar_url(),
            email: String::new(),
            email_verified: false,
        }
    }
}

/// A running QQ Connect emulator; the server stops when this is dropped.
pub struct QqEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Qq>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for QqEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Qq {
    core: Core,
    users: Mutex<HashMap<String, QqUser>>,
    /// Codes redeemed once: a second try is 100020, not 100019.
    used_codes: Mutex<HashSet<String>>,
    /// The app may ask for `unionid` (a "companyid" is set); else 100048.
    union_id_enabled: AtomicBool,
}

impl QqEmulator {
    pub async fn start() -> Self {
        let shared = Arc::new(Qq {
            core: Core::default(),
            users: Mutex::default(),
            used_codes: Mutex::default(),
            union_id_enabled: AtomicBool::new(true),
        });
        let router = Router::new()
            .route(TOKEN_PATH, any(token))
            .route(ME_PATH, any(me))
            .route(USER_INFO_PATH, any(user_info))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        QqEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn client_id(&self) -> &'static str {
        APP_ID
    }

    pub fn client_secret(&self) -> &'static str {
        APP_KEY
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Registers a user whose `get_user_info` carries exactly `avatars`.
    pub fn add_user_with(&self, seed: &str, avatars: QqAvatars) -> ExpectedIdentity {
        let user = QqUser::new(seed, Some(avatars));
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    /// The registered user for `seed`.
    pub fn user(&self, seed: &str) -> Option<QqUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// The `unionid` `/me?unionid=1` reports for `seed` (what authbroker must
    /// report as union id when configured with `union_id = true`).
    pub fn union_id_of(&self, seed: &str) -> String {
        QqUser::new(seed, None).unionid
    }

    /// Whether the app may ask for `unionid`. Off: `/me?unionid=1` answers
    /// 100048 (the real error when the app has no "companyid").
    pub fn set_union_id_enabled(&self, on: bool) {
        self.shared.union_id_enabled.store(on, Ordering::Relaxed);
    }

    /// Every outstanding code is older than ten minutes (100019 on use).
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

    /// The checks `/oauth2.0/authorize` makes; `Ok` carries (state, scopes).
    fn check_authorize(&self, authorize_url: &str) -> Result<(String, Vec<String>), String> {
        let params = authorize_params(authorize_url, &self.base_url, AUTHORIZE_PATH, None, "QQ")?;
        if single(&params, "appid")?.is_some() {
            return Err("`appid` sent: QQ names the app id `client_id`".into());
        }
        expect_param(&params, "response_type", "code", None)?;
        expect_param(&params, "client_id", APP_ID, None)?;
        expect_param(&params, "redirect_uri", REDIRECT_URI, None)?;
        // QQ documents the state as required.
        let state = state_param(&params)?;
        let scopes = scope_list(&params, ',', APIS, &["get_user_info"], "QQ")?;
        Ok((state, scopes))
    }
}

impl Emulator for QqEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "qq"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "qq",
            APP_ID,
            APP_KEY,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("openid_url", self.url(ME_PATH)),
                ("userinfo_url", self.url(USER_INFO_PATH)),
            ],
        )
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: false,
            refresh: true,
            refresh_single_use: true,
            revoke: false,
            errors_with_http_200: true,
            deny_redirects: false,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = QqUser::new(seed, None);
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
        let grant = CodeGrant::redirected(seed, APP_ID, REDIRECT_URI, scopes);
        // Sample: code=9A5F…06AF, 32 upper-case hex.
        Ok(core.code_redirect(random_token("", 32, HEX_UPPER), grant, state))
    }

    /// Cancelling closes the QQ login page; nothing reaches the callback.
    fn deny(&self, _authorize_url: &str) -> Option<Vec<(String, String)>> {
        None
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let (access, refresh) = self.shared.mint(seed, &["get_user_info".to_string()]);
        (access, Some(refresh))
    }
}

// ---------------------------------------------------------------------------
// Endpoints

impl Qq {
    /// A fresh access and refresh token (32 upper-case hex each, as in the samples).
    fn mint(&self, seed: &str, scopes: &[String]) -> (String, String) {
        let access = random_token("", 32, HEX_UPPER);
        let refresh = random_token("", 32, HEX_UPPER);
        self.core.store_access(&access, seed, scopes);
        self.core.store_refresh(&refresh, seed, scopes);
        (access, refresh)
    }

    fn user_by_token(&self, token: Option<&str>) -> Option<QqUser> {
        let grant = self.core.access_grant(token?)?;
        lock(&self.users).get(&grant.seed).cloned()
    }

    /// `callback( {"error":N,"error_description":"…"} );\n`, or the bare
    /// JSON with `fmt=json`; HTTP 200 either way.
    fn error(&self, fmt_json: bool, code: i64, description: &str) -> Response {
        let body = obj(&[
            ("error", self.core.number(code)),
            ("error_description", description.into()),
        ]);
        if fmt_json {
            qq_answer(body)
        } else {
            qq_answer(jsonp(&body))
        }
    }

    /// A shape problem: recorded, and answered with QQ's error.
    fn refuse(
        &self,
        req: &Req,
        fmt_json: bool,
        code: i64,
        why: &str,
        description: &str,
    ) -> Response {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
        self.error(fmt_json, code, description)
    }

    /// Violations any graph.qq.com call can have, whatever its parameters.
    fn transport_violations(&self, req: &Req, allow_post: bool) {
        let allowed = req.method == Method::GET || (allow_post && req.method == Method::POST);
        if !allowed {
            self.core
                .violation(format!("{} {}: QQ takes GET here", req.method, req.path));
        }
        if req.json_body {
            self.core.violation(format!(
                "{} {}: a JSON body (QQ reads the query or a form body only)",
                req.method, req.path
            ));
        }
        if req.authorization.is_some() {
            self.core.violation(format!(
                "{} {}: an Authorization header (QQ reads credentials from parameters only)",
                req.method, req.path
            ));
        }
        if req.has("code_verifier") {
            self.core.violation(format!(
                "{} {}: code_verifier sent (QQ has no PKCE)",
                req.method, req.path
            ));
        }
    }

    fn token(&self, req: &Req, step: Step) -> Response {
        self.transport_violations(req, true);
        let fmt_json = req.param("fmt") == Some("json");
        let grant_type = req.param("grant_type");
        if !matches!(grant_type, Some("authorization_code" | "refresh_token")) {
            // The trailing space is QQ's.
            return self.refuse(
                req,
                fmt_json,
                100004,
                &format!("grant_type is {grant_type:?}"),
                "param grant_type is wrong or lost ",
            );
        }
        match req.param("client_id") {
            None => {
                return self.refuse(
                    req,
                    fmt_json,
                    100001,
                    "no client_id",
                    "param client_id is wrong or lost ",
                );
            }
            // Wording unverified (code table: "appid not exist").
            Some(id) if id != APP_ID => {
                return self.error(fmt_json, 100008, "client id is illegal");
            }
            Some(_) => {}
        }
        match req.param("client_secret") {
            None => {
                return self.refuse(
                    req,
                    fmt_json,
                    100002,
                    "no client_secret",
                    "param client_secret is wrong or lost ",
                );
            }
            Some(s) if s != APP_KEY => {
                return self.error(fmt_json, 100009, "client secret is illegal");
            }
            Some(_) => {}
        }
        let (access, refresh) = if step == Step::Refresh {
            let Some(token) = req.param("refresh_token") else {
                return self.refuse(
                    req,
                    fmt_json,
                    100006,
                    "no refresh_token",
                    "param refresh_token is wrong or lost ",
                );
            };
            // Single use: the answer carries the next refresh token.
            let Some(grant) = self.core.use_refresh(token, true) else {
                return self.error(fmt_json, 100021, "get token failed");
            };
            self.mint(&grant.seed, &grant.scopes)
        } else {
            let Some(code) = req.param("code") else {
                return self.refuse(
                    req,
                    fmt_json,
                    100005,
                    "no code",
                    "param code is wrong or lost ",
                );
            };
            let Some(redirect_uri) = req.param("redirect_uri") else {
                return self.refuse(
                    req,
                    fmt_json,
                    100010,
                    "no redirect_uri (QQ requires it in the token request)",
                    "redirect uri is illegal",
                );
            };
            let Some(grant) = self.core.redeem_code(code) else {
                return if lock(&self.used_codes).contains(code) {
                    self.error(fmt_json, 100020, "code is reused error")
                } else {
                    self.error(fmt_json, 100019, "code to access token error")
                };
            };
            lock(&self.used_codes).insert(code.to_string());
            if grant.redirect_uri.as_deref() != Some(redirect_uri) {
                return self.refuse(
                    req,
                    fmt_json,
                    100010,
                    "redirect_uri differs from the authorize request's",
                    "redirect uri is illegal",
                );
            }
            self.mint(&grant.seed, &grant.scopes)
        };
        let openid = (req.param("need_openid") == Some("1"))
            .then(|| {
                let seed = self.core.access_grant(&access)?.seed;
                lock(&self.users).get(&seed).map(|u| u.openid.clone())
            })
            .flatten();
        if fmt_json {
            // expires_in is a string in QQ's JSON answer, always.
            let mut fields = vec![
                ("access_token", Value::from(access)),
                ("expires_in", EXPIRES_IN.to_string().into()),
                ("refresh_token", refresh.into()),
            ];
            if let Some(openid) = openid {
                fields.push(("openid", openid.into()));
            }
            qq_answer(obj(&fields))
        } else {
            // The samples' order; access_token must not be last (casdoor's
            // regex `token=(.*?)&`).
            let mut body =
                format!("access_token={access}&expires_in={EXPIRES_IN}&refresh_token={refresh}");
            if let Some(openid) = openid {
                // need_openid=1: position in the body unverified.
                body.push_str(&format!("&openid={openid}"));
            }
            qq_answer(body)
        }
    }

    fn me(&self, req: &Req) -> Response {
        self.transport_violations(req, false);
        let fmt_json = req.param("fmt") == Some("json");
        if !req.has("access_token") {
            return self.refuse(
                req,
                fmt_json,
                100007,
                "no access_token",
                "param access token is wrong or lost ",
            );
        }
        let Some(user) = self.user_by_token(req.param("access_token")) else {
            return self.error(fmt_json, 100016, "access token check failed");
        };
        let mut fields = vec![
            ("client_id", Value::from(APP_ID)),
            ("openid", user.openid.clone().into()),
        ];
        if req.param("unionid") == Some("1") {
            if !self.union_id_enabled.load(Ordering::Relaxed) {
                // Wording unverified (code table: 100048 "companyid not set").
                return self.error(fmt_json, 100048, "companyid not set");
            }
            fields.push(("unionid", user.unionid.clone().into()));
        }
        let body = obj(&fields);
        qq_answer(if fmt_json { body } else { jsonp(&body) })
    }

    /// Errors here are `{"ret":N,"msg":…}` with HTTP 200.
    fn ret(&self, ret: i64, msg: &str) -> Response {
        qq_answer(obj(&[("ret", self.core.number(ret)), ("msg", msg.into())]))
    }

    fn user_info(&self, req: &Req) -> Response {
        self.transport_violations(req, false);
        const INVALID: &str = "client request's parameters are invalid, invalid";
        let at = format!("{} {}", req.method, req.path);
        if req.param("oauth_consumer_key") != Some(APP_ID) {
            self.core.violation(format!(
                "{at}: oauth_consumer_key is {:?}, expected the appid {APP_ID:?}",
                req.param("oauth_consumer_key")
            ));
            // Wording unverified, modelled on the invalid-openid message.
            return self.ret(-1, &format!("{INVALID} oauth_consumer_key"));
        }
        if !req.has("access_token") {
            self.core.violation(format!("{at}: no access_token"));
        }
        let Some(user) = self.user_by_token(req.param("access_token")) else {
            return self.ret(1002, "请先登录");
        };
        if req.param("openid") != Some(user.openid.as_str()) {
            self.core.violation(format!(
                "{at}: openid is {:?}, not the token's user (take it from /me)",
                req.param("openid")
            ));
            return self.ret(-1, &format!("{INVALID} openid"));
        }
        qq_answer(self.user_json(&user))
    }

    /// The `get_user_info` object in the order of the documented example.
    fn user_json(&self, u: &QqUser) -> String {
        let n = |v: i64| self.core.number(v);
        let (gender, gender_type) = if u.male { ("男", 1) } else { ("女", 2) };
        let mut fields: Vec<(&str, Value)> = vec![
            ("ret", n(0)),
            ("msg", "".into()),
            ("is_lost", n(0)),
            ("nickname", u.nickname.clone().into()),
            ("gender", gender.into()),
            ("gender_type", n(gender_type)),
            ("province", "".into()),
            ("city", "".into()),
            ("year", "1968".into()),
            ("constellation", "".into()),
            ("figureurl", u.qzone_url(30).into()),
            ("figureurl_1", u.qzone_url(50).into()),
            ("figureurl_2", u.qzone_url(100).into()),
            ("figureurl_qq_1", u.qq_url(40).into()),
        ];
        if u.avatars != QqAvatars::QzoneOnly {
            fields.push(("figureurl_qq_2", u.qq_url(100).into()));
        }
        if u.avatars == QqAvatars::Full {
            fields.push(("figureurl_qq", u.qq_url(640).into()));
        }
        fields.extend([
            ("figureurl_type", "1".into()),
            ("is_yellow_vip", "0".into()),
            ("vip", "0".into()),
            ("yellow_vip_level", "0".into()),
            ("level", "0".into()),
            ("is_yellow_year_vip", "0".into()),
        ]);
        obj(&fields)
    }
}

async fn token(
    State(qq): State<Arc<Qq>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    // One URL for both grants; the fault is picked by grant_type.
    let step = if req.param("grant_type") == Some("refresh_token") {
        Step::Refresh
    } else {
        Step::Token
    };
    let log = Log::new(&qq.core, req.seen(step));
    if let Some(response) = qq.core.faults.apply(step).await {
        return log.answer(response);
    }
    log.answer(qq.token(&req, step))
}

async fn me(
    State(qq): State<Arc<Qq>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&qq.core, req.seen(Step::Identity));
    if let Some(response) = qq.core.faults.apply(Step::Identity).await {
        return log.answer(response);
    }
    log.answer(qq.me(&req))
}

async fn user_info(
    State(qq): State<Arc<Qq>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let log = Log::new(&qq.core, req.seen(Step::Identity));
    if let Some(response) = qq.core.faults.apply(Step::Identity).await {
        return log.answer(response);
    }
    log.answer(qq.user_info(&req))
}

fn qq_answer(body: String) -> Response {
    answer(StatusCode::OK, CONTENT_TYPE, body)
}

/// QQ's JSONP wrapper, exactly: `callback( ` + JSON + ` );` + newline.
fn jsonp(json: &str) -> String {
    format!("callback( {json} );\n")
}
