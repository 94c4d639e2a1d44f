//! Alipay emulator (docs/providers.md#alipay): the user-information
//! authorization — the browser step at
//! `openauth.alipay.com/oauth2/publicAppAuthorize.htm` (checked in
//! [`Emulator::approve`]) and the open platform's gateway, `gateway.do`,
//! which serves `alipay.system.oauth.token` (code and refresh grants) and
//! `alipay.user.info.share` on one path, told apart by `method`.
//!
//! Reproduced: the callback's `auth_code` (with `app_id`, `source` and
//! `scope`); the common parameters every gateway call must carry (`app_id`,
//! `method`, `charset`, `sign_type=RSA2`, `timestamp` as
//! `yyyy-MM-dd HH:mm:ss` China time, `version=1.0`) and the RSA2 signature
//! over all of them, checked with the app's public key; answers whose
//! `sign` covers the exact text of the `<method>_response` member (or of
//! `error_response`), made with Alipay's own key; gateway and grant refusals
//! as `error_response` with `code`, `msg`, `sub_code`, `sub_msg`, and a
//! refused user call as its own member with a code other than `10000`; all
//! with HTTP 200.

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
use base64::{Engine, engine::general_purpose::STANDARD};
use rsa::{
    RsaPrivateKey, RsaPublicKey,
    pkcs1v15::{Signature, SigningKey, VerifyingKey},
    pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding},
    signature::{SignatureEncoding, Signer, Verifier},
};
use serde_json::Value;
use sha2::Sha256;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset, format_description::BorrowedFormatItem};

use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, HEX_LOWER, Step, lock,
    random_token, serve,
    wire::{
        Req, answer, authorize_params, derive, expect_param, obj, provider_config, scope_list,
        state_param,
    },
};

/// A web app's APPID.
pub const APP_ID: &str = "2021004123456789";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const AUTHORIZE_PATH: &str = "/oauth2/publicAppAuthorize.htm";
pub const GATEWAY_PATH: &str = "/gateway.do";
pub const TOKEN_METHOD: &str = "alipay.system.oauth.token";
pub const USER_METHOD: &str = "alipay.user.info.share";
/// Seconds an access token lives, and a refresh token.
pub const EXPIRES_IN: i64 = 1_296_000;
pub const RE_EXPIRES_IN: i64 = 2_592_000;
const JSON_UTF8: &str = "application/json;charset=utf-8";
/// The app's key pair (the app keeps the private half; the public half is
/// uploaded to the open platform) and Alipay's (its public half is shown
/// to the app).
const APP_KEY: &str = include_str!("../keys/rsa.pem");
const ALIPAY_KEY: &str = include_str!("../keys/rsa_rotated.pem");
/// How far a request's timestamp may be from the gateway's clock here.
const CLOCK_SKEW_SECS: i64 = 600;

/// An Alipay account as one app sees it.
#[derive(Clone, Debug)]
pub struct AlipayUser {
    /// `2088…`, the same for every app.
    pub user_id: String,
    /// Per app.
    pub open_id: String,
    pub nick_name: String,
    pub avatar: String,
}

impl AlipayUser {
    fn new(seed: &str) -> AlipayUser {
        AlipayUser {
            user_id: format!("2088{}", derive(&["alipay-user", seed], b"0123456789", 12)),
            open_id: format!("0{}", derive(&["alipay-open", APP_ID, seed], ALNUM, 45)),
            nick_name: format!("支付宝用户{seed}"),
            avatar: format!(
                "https://tfs.alipayobjects.com/images/partner/T1{}",
                derive(&["alipay-avatar", seed], ALNUM, 20)
            ),
        }
    }

    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.open_id.clone(),
            display_name: self.nick_name.clone(),
            avatar_url: self.avatar.clone(),
            ..Default::default()
        }
    }
}

/// A running Alipay emulator; the server stops when this is dropped.
pub struct AlipayEmulator {
    pub base_url: String,
    shared: Arc<Alipay>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AlipayEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Alipay {
    core: Core,
    users: Mutex<HashMap<String, AlipayUser>>,
    /// Checks the app's signatures.
    app_key: VerifyingKey<Sha256>,
    /// Signs the answers.
    alipay_key: SigningKey<Sha256>,
}

impl AlipayEmulator {
    pub async fn start() -> AlipayEmulator {
        let app = RsaPrivateKey::from_pkcs8_pem(APP_KEY).expect("the app's test key");
        let alipay = RsaPrivateKey::from_pkcs8_pem(ALIPAY_KEY).expect("Alipay's test key");
        let shared = Arc::new(Alipay {
            core: Core::default(),
            users: Mutex::default(),
            app_key: VerifyingKey::new(RsaPublicKey::from(&app)),
            alipay_key: SigningKey::new(alipay),
        });
        let router = Router::new()
            .route(GATEWAY_PATH, any(handle))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        AlipayEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn user(&self, seed: &str) -> Option<AlipayUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// The app's own public key: not the one that checks Alipay's answers.
    pub fn app_public_key() -> String {
        public_pem(APP_KEY)
    }

    /// The Alipay public key, as the open platform shows it to the app.
    pub fn alipay_public_key() -> String {
        public_pem(ALIPAY_KEY)
    }

    /// The checks the authorize page makes; `Ok` carries (state, scopes).
    fn check_authorize(&self, authorize_url: &str) -> Result<(String, Vec<String>), String> {
        let params = authorize_params(
            authorize_url,
            &self.base_url,
            AUTHORIZE_PATH,
            None,
            "Alipay",
        )?;
        expect_param(&params, "app_id", APP_ID, None)?;
        expect_param(&params, "redirect_uri", REDIRECT_URI, None)?;
        for foreign in ["client_id", "response_type"] {
            if params.iter().any(|(k, _)| k == foreign) {
                return Err(format!("{foreign}: Alipay's authorize page takes app_id"));
            }
        }
        let state = state_param(&params)?;
        let scopes = scope_list(&params, ',', &["auth_user", "auth_base"], &[], "Alipay")?;
        if scopes.is_empty() {
            return Err("no scope: auth_user or auth_base is required".into());
        }
        Ok((state, scopes))
    }
}

impl Emulator for AlipayEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "alipay"
    }

    /// The app's private key is its client secret.
    fn provider_config(&self) -> ProviderConfig {
        let mut config = provider_config(
            "alipay",
            APP_ID,
            APP_KEY,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(GATEWAY_PATH)),
            ],
        );
        config.provider_public_key = Some(Self::alipay_public_key());
        config
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
        let user = AlipayUser::new(seed);
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    /// The redirect carries `auth_code`, which the web app passes on as
    /// CompleteLogin's `code`.
    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let core = &self.shared.core;
        let (state, scopes) = core.approvable(
            self.check_authorize(authorize_url),
            &self.shared.users,
            seed,
        )?;
        let grant = CodeGrant::redirected(seed, APP_ID, REDIRECT_URI, scopes.clone());
        let code = core.issue_code(random_token("", 32, HEX_LOWER), grant);
        Ok(vec![
            ("app_id".into(), APP_ID.into()),
            ("source".into(), "alipay_wallet".into()),
            ("scope".into(), scopes.join(",")),
            ("auth_code".into(), code),
            ("state".into(), state),
        ])
    }

    /// The page has no "deny" that redirects: the user just leaves.
    fn deny(&self, _authorize_url: &str) -> Option<Vec<(String, String)>> {
        None
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let (access, refresh) = self.shared.mint(seed);
        (access, Some(refresh))
    }
}

// ---------------------------------------------------------------------------
// The gateway

/// A refusal: (member, code, msg, sub_code, sub_msg).
type Refusal = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

const MISSING: &str = "Missing Required Arguments";
const INVALID: &str = "Invalid Arguments";

impl Alipay {
    fn mint(&self, seed: &str) -> (String, String) {
        let access = format!("authusrB{}", random_token("", 32, HEX_LOWER));
        let refresh = format!("authusrB{}", random_token("", 32, HEX_LOWER));
        self.core.store_access(&access, seed, &[]);
        self.core.store_refresh(&refresh, seed, &[]);
        (access, refresh)
    }

    /// `{"<member>":<content>,"sign":"…"}`, the sign over `content` exactly.
    fn signed(&self, member: &str, content: String) -> Response {
        let sign = STANDARD.encode(self.alipay_key.sign(content.as_bytes()).to_bytes());
        answer(
            StatusCode::OK,
            JSON_UTF8,
            format!("{{{}:{content},\"sign\":\"{sign}\"}}", Value::from(member)),
        )
    }

    fn refuse(&self, (member, code, msg, sub_code, sub_msg): Refusal) -> Response {
        self.signed(
            member,
            obj(&[
                ("code", code.into()),
                ("msg", msg.into()),
                ("sub_code", sub_code.into()),
                ("sub_msg", sub_msg.into()),
            ]),
        )
    }

    fn violation(&self, req: &Req, why: &str) {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
    }

    /// What the gateway checks of every call before the method runs.
    fn common(&self, req: &Req, params: &[(String, String)]) -> Result<(), Refusal> {
        let get = |name: &str| super::wire::param(params, name);
        let missing = |sub: &'static str, what: &'static str| {
            Err(("error_response", "40001", MISSING, sub, what))
        };
        let invalid = |sub: &'static str, what: &'static str| {
            Err(("error_response", "40002", INVALID, sub, what))
        };
        let Some(app_id) = get("app_id") else {
            return missing("isv.missing-app-id", "缺少AppID参数");
        };
        if app_id != APP_ID {
            return invalid("isv.invalid-app-id", "无效的AppID参数");
        }
        if get("method").is_none() {
            return missing("isv.missing-method", "缺少方法名参数");
        }
        match get("charset") {
            Some("utf-8" | "UTF-8") => {}
            _ => {
                self.violation(req, "charset must be utf-8");
                return invalid("isv.invalid-charset", "字符集错误");
            }
        }
        match get("sign_type") {
            None => return missing("isv.missing-signature-type", "缺少签名类型参数"),
            Some("RSA2") => {}
            Some(_) => {
                self.violation(req, "sign_type must be RSA2");
                return invalid("isv.invalid-signature-type", "无效的签名类型参数");
            }
        }
        if get("version") != Some("1.0") {
            self.violation(req, "version must be 1.0");
            return missing("isv.missing-version", "缺少版本参数");
        }
        let Some(timestamp) = get("timestamp") else {
            return missing("isv.missing-timestamp", "缺少时间戳参数");
        };
        if !timestamp_ok(timestamp) {
            self.violation(
                req,
                &format!("timestamp {timestamp:?} is not yyyy-MM-dd HH:mm:ss China time, now"),
            );
            return invalid("isv.invalid-timestamp", "非法的时间戳参数");
        }
        let Some(sign) = get("sign") else {
            return missing("isv.missing-signature", "缺少签名参数");
        };
        let verified = STANDARD
            .decode(sign)
            .ok()
            .and_then(|bytes| Signature::try_from(bytes.as_slice()).ok())
            .is_some_and(|s| {
                self.app_key
                    .verify(sign_content(params).as_bytes(), &s)
                    .is_ok()
            });
        if !verified {
            self.violation(
                req,
                "the signature does not verify with the app's public key",
            );
            return invalid("isv.invalid-signature", "验签出错");
        }
        Ok(())
    }

    fn call(&self, req: &Req) -> Response {
        if req.method != Method::POST {
            self.violation(req, "the SDKs POST to the gateway");
        }
        if req.json_body {
            self.violation(req, "a JSON body: the gateway reads form parameters");
        }
        let params: Vec<(String, String)> = req.query.iter().chain(&req.form).cloned().collect();
        if let Err(refusal) = self.common(req, &params) {
            return self.refuse(refusal);
        }
        let get = |name: &str| super::wire::param(&params, name);
        match get("method") {
            Some(TOKEN_METHOD) => {
                self.token(req, get("grant_type"), get("code"), get("refresh_token"))
            }
            Some(USER_METHOD) => self.user(get("auth_token")),
            _ => self.refuse((
                "error_response",
                "40002",
                INVALID,
                "isv.invalid-method",
                "不存在的方法名",
            )),
        }
    }

    fn token(
        &self,
        req: &Req,
        grant_type: Option<&str>,
        code: Option<&str>,
        refresh: Option<&str>,
    ) -> Response {
        let refused = |sub: &'static str, what: &'static str| {
            self.refuse(("error_response", "40002", INVALID, sub, what))
        };
        let seed = match (grant_type, code, refresh) {
            (Some("authorization_code"), Some(code), None) => match self.core.redeem_code(code) {
                Some(grant) if grant.client_id == APP_ID => grant.seed,
                _ => return refused("isv.code-invalid", "授权码code无效"),
            },
            (Some("refresh_token"), None, Some(refresh)) => {
                match self.core.use_refresh(refresh, false) {
                    Some(grant) => grant.seed,
                    None => {
                        return refused("isv.refresh-token-invalid", "刷新令牌refresh_token无效");
                    }
                }
            }
            (grant_type, _, _) => {
                self.violation(
                    req,
                    &format!("grant_type {grant_type:?} with the wrong token"),
                );
                return refused("isv.grant-type-invalid", "grant_type参数不正确");
            }
        };
        let Some(user) = lock(&self.users).get(&seed).cloned() else {
            return refused("isv.code-invalid", "授权码code无效");
        };
        let (access, refresh) = self.mint(&seed);
        let now = OffsetDateTime::now_utc().to_offset(china());
        let auth_start = now.format(&time_format()).expect("a formatted time");
        self.signed(
            "alipay_system_oauth_token_response",
            obj(&[
                ("access_token", access.into()),
                // The older name of user_id, still sent.
                ("alipay_user_id", user.user_id.clone().into()),
                ("auth_start", auth_start.into()),
                ("expires_in", self.core.number(EXPIRES_IN)),
                ("re_expires_in", self.core.number(RE_EXPIRES_IN)),
                ("refresh_token", refresh.into()),
                ("user_id", user.user_id.into()),
                ("open_id", user.open_id.into()),
            ]),
        )
    }

    fn user(&self, auth_token: Option<&str>) -> Response {
        let user = auth_token
            .and_then(|t| self.core.access_grant(t))
            .and_then(|grant| lock(&self.users).get(&grant.seed).cloned());
        let Some(u) = user else {
            return self.refuse((
                "alipay_user_info_share_response",
                "20001",
                "Insufficient Token Permissions",
                "aop.invalid-auth-token",
                "无效的访问令牌",
            ));
        };
        self.signed(
            "alipay_user_info_share_response",
            obj(&[
                ("code", "10000".into()),
                ("msg", "Success".into()),
                ("user_id", u.user_id.into()),
                ("open_id", u.open_id.into()),
                ("avatar", u.avatar.into()),
                ("city", "杭州市".into()),
                ("nick_name", u.nick_name.into()),
                ("province", "浙江省".into()),
                ("gender", "F".into()),
            ]),
        )
    }
}

/// `yyyy-MM-dd HH:mm:ss`.
fn time_format() -> Vec<BorrowedFormatItem<'static>> {
    time::format_description::parse_borrowed::<2>("[year]-[month]-[day] [hour]:[minute]:[second]")
        .expect("a valid format description")
}

/// The public half of a test key, as PEM.
fn public_pem(private: &str) -> String {
    let key = RsaPrivateKey::from_pkcs8_pem(private).expect("a test key");
    RsaPublicKey::from(&key)
        .to_public_key_pem(LineEnding::LF)
        .expect("a PEM public key")
}

fn china() -> UtcOffset {
    UtcOffset::from_hms(8, 0, 0).expect("a valid offset")
}

/// `yyyy-MM-dd HH:mm:ss`, read as China time, near the gateway's clock.
fn timestamp_ok(text: &str) -> bool {
    PrimitiveDateTime::parse(text, &time_format()).is_ok_and(|t| {
        let skew = t.assume_offset(china()) - OffsetDateTime::now_utc();
        skew.whole_seconds().abs() <= CLOCK_SKEW_SECS
    })
}

/// What the app must have signed: every parameter but `sign` with a value,
/// sorted by name, `name=value` joined by `&`, not URL-encoded.
fn sign_content(params: &[(String, String)]) -> String {
    let mut signed: Vec<&(String, String)> = params
        .iter()
        .filter(|(k, v)| k != "sign" && !v.is_empty())
        .collect();
    signed.sort_by(|a, b| a.0.cmp(&b.0));
    let pairs: Vec<String> = signed.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join("&")
}

/// The one handler: the step is the call's `method` (and grant type), and
/// an armed fault answers before Alipay does.
async fn handle(
    State(a): State<Arc<Alipay>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let step = match (req.param("method"), req.param("grant_type")) {
        (Some(USER_METHOD), _) => Step::Identity,
        (_, Some("refresh_token")) => Step::Refresh,
        _ => Step::Token,
    };
    let seen = req.seen(step);
    a.core.answer(step, seen, || a.call(&req)).await
}
