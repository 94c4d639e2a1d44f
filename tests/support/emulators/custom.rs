//! "Nimbus ID", a made-up provider that exists only as configuration:
//! `kind = "oauth2"` with the whole [`SPEC`] in `[providers.NAME.spec]`. Its
//! wire format deliberately matches no preset, so it shows what the spec
//! schema (src/provider/spec.rs) can say without code:
//!
//! - authorize takes `app_key` (not `client_id`), `response_type=auth_code`,
//!   comma-separated scopes, a fixed `display=popup`, PKCE S256 (required);
//!   a refusal comes back as `error=user_cancelled`;
//! - the token call is a JSON POST with `appKey`/`appSecret`/`authCode` and
//!   `grantKind` instead of `grant_type`; the answer nests the credentials:
//!   `{"status":"ok","data":{"credentials":{"bearer":…,"lifetime":3600,"renewal":…,"grants":[…]}}}`;
//! - every error is HTTP 200 with a nested code:
//!   `{"status":"fail","failure":{"code":"E_AUTH_CODE","detail":…}}`
//!   (only a request of the wrong shape gets a 400, and a violation);
//! - the profile needs a Bearer token, an `X-Nimbus-Api` version header and
//!   `?app=<client id>`, and keeps the id three levels down:
//!   `{"status":"ok","result":{"account":{"uid":8812345,"handle":…,"names":{"display":…},…}}}`;
//! - renewal tokens (`renewalToken`, JSON POST) are single use;
//! - revocation is a form POST of `credential=<token>`.

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
    response::{IntoResponse, Response},
    routing::any,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::{Url, form_urlencoded};

use super::wire::{header_str, provider_config, seen, state_of};
use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, Step, lock, query_of,
    random_token, serve,
};

/// The provider, in the schema of the preset files under `providers/`.
/// Its URLs are the "real" ones; `provider_config` overrides every one.
pub const SPEC: &str = r#"# Nimbus ID: a provider defined only in config (kind = "oauth2").
display_name = "Nimbus ID"
pkce = true
scope_separator = ","
default_scopes = ["profile.basic", "profile.email"]
# Renewal tokens work once; every renewal answer carries the next one.
refresh_token_single_use = true

[endpoints]
authorize_url = "https://id.nimbus.example/connect/authorize"
token_url = "https://api.nimbus.example/v3/oauth/token.json"
refresh_url = "https://api.nimbus.example/v3/oauth/renew.json"
profile_url = "https://api.nimbus.example/v3/me"
revoke_url = "https://api.nimbus.example/v3/oauth/revoke.json"

[authorize]
client_id_param = "app_key"
response_type = "auth_code"
params = { display = "popup" }
denied = ["user_cancelled"]

[token]
method = "post_json"
client_id_param = "appKey"
client_secret_param = "appSecret"
code_param = "authCode"
grant_type = false
params = { grantKind = "auth_code" }
access_token = "/data/credentials/bearer"
refresh_token = "/data/credentials/renewal"
expires_in = "/data/credentials/lifetime"
scope = "/data/credentials/grants"
token_type = ""

[errors]
# Errors arrive with HTTP 200: {"status":"fail","failure":{"code":"E_AUTH_CODE"}}.
code = ["/failure/code"]

[refresh]
endpoint = "refresh_url"
method = "post_json"
client_id_param = "appKey"
client_secret_param = "appSecret"
refresh_token_param = "renewalToken"
grant_type = false
redirect_uri = false
params = { grantKind = "renewal" }

[revoke]
endpoint = "revoke_url"
method = "post_form"
params = { credential = "{token:/access_token}" }

[[requests]]
name = "profile"
endpoint = "profile_url"
auth = "bearer"
query = { app = "{client_id}" }
headers = { Accept = "application/vnd.nimbus+json", X-Nimbus-Api = "2024-05-01" }

[identity]
subject = "profile:/result/account/uid"
username = "profile:/result/account/handle"
display_name = ["profile:/result/account/names/display", "profile:/result/account/handle"]
avatar_url = "profile:/result/account/picture/href"
email = "profile:/result/account/contact/address"
email_verified = "profile:/result/account/contact/confirmed"
"#;

pub const CLIENT_ID: &str = "nbk_live_4f9c2a7e";
pub const CLIENT_SECRET: &str = "nbs_8d1e6b3f0a9c4e7b2d5f8a1c";
pub const AUTHORIZE_PATH: &str = "/connect/authorize";
pub const TOKEN_PATH: &str = "/v3/oauth/token.json";
pub const REFRESH_PATH: &str = "/v3/oauth/renew.json";
pub const PROFILE_PATH: &str = "/v3/me";
pub const REVOKE_PATH: &str = "/v3/oauth/revoke.json";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const API_VERSION: &str = "2024-05-01";
pub const SCOPES: [&str; 3] = ["profile.basic", "profile.email", "profile.avatar"];
/// Seconds an access token lives.
pub const LIFETIME: i64 = 3600;

/// A Nimbus account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NimbusUser {
    pub uid: i64,
    pub handle: String,
    /// `None`: the profile has no `names.display` (the handle stands in).
    pub display: Option<String>,
    pub picture: String,
    /// The address and whether it is confirmed; `None`: no `contact`.
    pub contact: Option<(String, bool)>,
}

impl NimbusUser {
    /// Deterministic from the seed, with every optional part missing for
    /// some seeds.
    pub fn from_seed(seed: &str) -> Self {
        let d = Sha256::digest(format!("nimbus\0{seed}").as_bytes());
        let h = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
        let uid = 8_000_000 + (h % 90_000_000) as i64;
        let handle = format!("nb.{seed}");
        let display = (h % 3 != 0).then(|| format!("Nimbus {seed}"));
        let contact = match (h >> 8) % 4 {
            0 => None,
            1 => Some((format!("{seed}@mail.nimbus.example"), false)),
            _ => Some((format!("{seed}@mail.nimbus.example"), true)),
        };
        NimbusUser {
            uid,
            picture: format!("https://img.nimbus.example/u/{uid}/256.png"),
            handle,
            display,
            contact,
        }
    }

    /// With the default scopes (`profile.email` shows the contact).
    pub fn expected(&self) -> ExpectedIdentity {
        let (email, email_verified) = self.contact.clone().unwrap_or_default();
        ExpectedIdentity {
            subject: self.uid.to_string(),
            union_id: String::new(),
            username: self.handle.clone(),
            display_name: self.display.clone().unwrap_or_else(|| self.handle.clone()),
            avatar_url: self.picture.clone(),
            email,
            email_verified,
        }
    }
}

/// A running Nimbus emulator; the server stops when this is dropped.
pub struct CustomEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for CustomEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl CustomEmulator {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let router = Router::new()
            .route(TOKEN_PATH, any(token))
            .route(REFRESH_PATH, any(renew))
            .route(PROFILE_PATH, any(profile))
            .route(REVOKE_PATH, any(revoke))
            .with_state(shared.clone());
        let (base_url, server) = serve(router).await;
        CustomEmulator {
            base_url,
            shared,
            server,
        }
    }

    /// Issues tokens with this `lifetime` (seconds) from now on.
    pub fn set_lifetime(&self, secs: i64) {
        *lock(&self.shared.lifetime) = Some(secs);
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// [`SPEC`] as the `[providers.NAME.spec]` table.
    pub fn spec_table() -> toml::Table {
        SPEC.parse().expect("SPEC is valid TOML")
    }

    /// Registers a hand-made account under `seed`.
    pub fn add_nimbus_user(&self, seed: &str, user: NimbusUser) -> ExpectedIdentity {
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        expected
    }

    pub fn user(&self, seed: &str) -> Option<NimbusUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// Every outstanding code is now older than ten minutes.
    pub fn expire_codes(&self) {
        self.shared.core.expire_codes();
    }
}

impl Emulator for CustomEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "oauth2"
    }

    fn provider_config(&self) -> ProviderConfig {
        let mut config = provider_config(
            "oauth2",
            CLIENT_ID,
            CLIENT_SECRET,
            &[
                ("authorize_url", self.url(AUTHORIZE_PATH)),
                ("token_url", self.url(TOKEN_PATH)),
                ("refresh_url", self.url(REFRESH_PATH)),
                ("profile_url", self.url(PROFILE_PATH)),
                ("revoke_url", self.url(REVOKE_PATH)),
            ],
        );
        config.spec = Some(Self::spec_table());
        config
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: true,
            refresh: true,
            refresh_single_use: true,
            revoke: true,
            errors_with_http_200: true,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        self.add_nimbus_user(seed, NimbusUser::from_seed(seed))
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
        for (k, _) in &params {
            if params.iter().filter(|(n, _)| n == k).count() > 1 {
                return Err(format!("parameter {k} given twice"));
            }
        }
        if get("client_id").is_some() {
            return Err("Nimbus names the client `app_key`, not `client_id`".into());
        }
        if get("app_key") != Some(CLIENT_ID) {
            return Err(format!(
                "app_key is {:?}, expected {CLIENT_ID}",
                get("app_key")
            ));
        }
        if get("response_type") != Some("auth_code") {
            return Err(format!(
                "response_type is {:?}; Nimbus only knows auth_code",
                get("response_type")
            ));
        }
        let redirect = get("redirect_uri").ok_or("redirect_uri is missing")?;
        if redirect != REDIRECT_URI {
            return Err(format!("redirect_uri {redirect:?} is not registered"));
        }
        let scopes: Vec<String> = get("scope")
            .ok_or("scope is missing")?
            .split(',')
            .map(str::to_owned)
            .collect();
        if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
            return Err(format!(
                "unknown scope {bad:?} (Nimbus scopes are comma-separated: {})",
                SCOPES.join(",")
            ));
        }
        let state = get("state")
            .filter(|s| !s.is_empty())
            .ok_or("state is missing")?;
        let challenge = match (get("code_challenge"), get("code_challenge_method")) {
            (Some(c), Some("S256")) if c.len() == 43 => c.to_owned(),
            _ => return Err("Nimbus requires PKCE: code_challenge with method S256".into()),
        };
        let core = &self.shared.core;
        if get("display") != Some("popup") {
            core.violation(format!(
                "authorize: display is {:?}; the spec sends display=popup",
                get("display")
            ));
        }
        for (k, _) in &params {
            let known = [
                "app_key",
                "response_type",
                "redirect_uri",
                "scope",
                "state",
                "code_challenge",
                "code_challenge_method",
                "display",
            ];
            if !known.contains(&k.as_str()) {
                core.violation(format!("authorize: unexpected parameter {k}"));
            }
        }
        if !lock(&self.shared.users).contains_key(seed) {
            return Err(format!("no user registered for seed {seed:?}"));
        }
        let mut grant = CodeGrant::redirected(seed, CLIENT_ID, redirect, scopes);
        grant.challenge = Some(challenge);
        Ok(core.code_redirect(random_token("ac_", 24, ALNUM), grant, state.into()))
    }

    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        let state = state_of(authorize_url);
        Some(vec![
            ("error".into(), "user_cancelled".into()),
            (
                "error_description".into(),
                "The user cancelled the sign-in.".into(),
            ),
            ("state".into(), state),
        ])
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let scopes: Vec<String> = ["profile.basic", "profile.email"]
            .map(String::from)
            .to_vec();
        let (access, renewal) = self.shared.mint(seed, &scopes);
        (access, Some(renewal))
    }
}

// ---------------------------------------------------------------------------
// State

/// Std mutexes: each is held for one map operation, never across an `.await`.
#[derive(Default)]
struct Shared {
    core: Core,
    users: Mutex<HashMap<String, NimbusUser>>,
    /// `lifetime` of the tokens it issues; `None`: [`LIFETIME`].
    lifetime: Mutex<Option<i64>>,
}

/// Every Nimbus error code the emulator uses.
pub mod codes {
    /// Unknown, used or expired authorization code.
    pub const AUTH_CODE: &str = "E_AUTH_CODE";
    pub const CLIENT: &str = "E_CLIENT";
    pub const REDIRECT: &str = "E_REDIRECT";
    pub const PKCE: &str = "E_PKCE";
    pub const RENEWAL: &str = "E_RENEWAL";
    pub const TOKEN: &str = "E_TOKEN";
    pub const API_VERSION: &str = "E_API_VERSION";
    /// A request of the wrong shape (HTTP 400, the only non-200 error).
    pub const REQUEST: &str = "E_REQUEST";
}

/// `{"status":"ok","<key>":<value>}`, `status` first.
fn ok(key: &str, value: &Value) -> Response {
    json_response(
        StatusCode::OK,
        format!(r#"{{"status":"ok",{}:{value}}}"#, Value::from(key)),
    )
}

/// `{"status":"fail","failure":{"code":…,"detail":…}}`.
fn fail(status: StatusCode, code: &str, detail: &str) -> Response {
    json_response(
        status,
        format!(
            r#"{{"status":"fail","failure":{{"code":{},"detail":{}}}}}"#,
            Value::from(code),
            Value::from(detail)
        ),
    )
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl Shared {
    fn mint(&self, seed: &str, scopes: &[String]) -> (String, String) {
        let access = random_token("nb1.", 40, ALNUM);
        let renewal = random_token("nbr.", 40, ALNUM);
        self.core.store_access(&access, seed, scopes);
        self.core.store_refresh(&renewal, seed, scopes);
        (access, renewal)
    }

    fn credentials(&self, access: &str, renewal: &str, scopes: &[String]) -> Response {
        // Built by hand so the key order is stable whatever serde_json's map is.
        let body = format!(
            r#"{{"status":"ok","data":{{"credentials":{{"bearer":{},"lifetime":{},"renewal":{},"grants":{}}}}}}}"#,
            Value::from(access),
            self.core.number(lock(&self.lifetime).unwrap_or(LIFETIME)),
            Value::from(renewal),
            Value::from(scopes.to_vec()),
        );
        json_response(StatusCode::OK, body)
    }

    /// A JSON POST whose keys are exactly `required` (all strings); `Err`
    /// is the HTTP 400 answer, with the violation recorded (boxed only to
    /// keep the `Result` small).
    fn json_body(
        &self,
        what: &str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        required: &[&str],
    ) -> Result<HashMap<String, String>, Box<Response>> {
        let bad = |why: String| {
            self.core.violation(format!("{what}: {why}"));
            Box::new(fail(StatusCode::BAD_REQUEST, codes::REQUEST, &why))
        };
        if method != Method::POST {
            return Err(bad(format!("takes POST, not {method}")));
        }
        if uri.query().is_some() {
            return Err(bad("parameters in the query string".into()));
        }
        let content_type = header_str(headers, header::CONTENT_TYPE).unwrap_or_default();
        if !content_type.starts_with("application/json") {
            return Err(bad(format!(
                "the body must be application/json, not {content_type:?}"
            )));
        }
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
            return Err(bad("the body is not a JSON object".into()));
        };
        let mut fields = HashMap::new();
        for (k, v) in map {
            if !required.contains(&k.as_str()) {
                return Err(bad(format!("unexpected key {k}")));
            }
            let Value::String(s) = v else {
                return Err(bad(format!("{k} is not a string")));
            };
            fields.insert(k, s);
        }
        if let Some(missing) = required.iter().find(|k| !fields.contains_key(**k)) {
            return Err(bad(format!("{missing} is missing")));
        }
        Ok(fields)
    }

    /// `POST /v3/oauth/token.json`, JSON
    /// `{authCode, redirect_uri, code_verifier, appKey, appSecret, grantKind}`.
    fn exchange(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
        let required = [
            "authCode",
            "redirect_uri",
            "code_verifier",
            "appKey",
            "appSecret",
            "grantKind",
        ];
        let f = match self.json_body("token", method, uri, headers, body, &required) {
            Ok(f) => f,
            Err(response) => return *response,
        };
        if f["grantKind"] != "auth_code" {
            self.core
                .violation(format!("token: grantKind is {:?}", f["grantKind"]));
            return fail(StatusCode::BAD_REQUEST, codes::REQUEST, "grantKind");
        }
        if f["appKey"] != CLIENT_ID || f["appSecret"] != CLIENT_SECRET {
            return fail(
                StatusCode::OK,
                codes::CLIENT,
                "unknown app key or wrong secret",
            );
        }
        let Some(grant) = self
            .core
            .redeem_code(&f["authCode"])
            .filter(|g| g.client_id == CLIENT_ID)
        else {
            return fail(
                StatusCode::OK,
                codes::AUTH_CODE,
                "authorization code is invalid, expired or used",
            );
        };
        if grant.redirect_uri.as_deref() != Some(f["redirect_uri"].as_str()) {
            return fail(StatusCode::OK, codes::REDIRECT, "redirect_uri differs");
        }
        if !grant.pkce_ok(Some(&f["code_verifier"])) {
            return fail(StatusCode::OK, codes::PKCE, "code_verifier does not match");
        }
        let (access, renewal) = self.mint(&grant.seed, &grant.scopes);
        self.credentials(&access, &renewal, &grant.scopes)
    }

    /// `POST /v3/oauth/renew.json`, JSON `{renewalToken, appKey, appSecret, grantKind}`;
    /// the renewal token works once.
    fn renew(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
        let required = ["renewalToken", "appKey", "appSecret", "grantKind"];
        let f = match self.json_body("renew", method, uri, headers, body, &required) {
            Ok(f) => f,
            Err(response) => return *response,
        };
        if f["grantKind"] != "renewal" {
            self.core
                .violation(format!("renew: grantKind is {:?}", f["grantKind"]));
            return fail(StatusCode::BAD_REQUEST, codes::REQUEST, "grantKind");
        }
        if f["appKey"] != CLIENT_ID || f["appSecret"] != CLIENT_SECRET {
            return fail(
                StatusCode::OK,
                codes::CLIENT,
                "unknown app key or wrong secret",
            );
        }
        let Some(grant) = self.core.use_refresh(&f["renewalToken"], true) else {
            return fail(
                StatusCode::OK,
                codes::RENEWAL,
                "renewal token is invalid or used",
            );
        };
        let (access, renewal) = self.mint(&grant.seed, &grant.scopes);
        self.credentials(&access, &renewal, &grant.scopes)
    }

    /// `GET /v3/me?app=<client id>`, Bearer, `X-Nimbus-Api`.
    fn profile(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response {
        let core = &self.core;
        if method != Method::GET {
            core.violation(format!("profile: takes GET, not {method}"));
            return fail(StatusCode::BAD_REQUEST, codes::REQUEST, "method");
        }
        if header_str(headers, "x-nimbus-api") != Some(API_VERSION) {
            core.violation(format!(
                "profile: X-Nimbus-Api is {:?}, expected {API_VERSION}",
                header_str(headers, "x-nimbus-api")
            ));
            return fail(
                StatusCode::BAD_REQUEST,
                codes::API_VERSION,
                "X-Nimbus-Api header required",
            );
        }
        let query: Vec<(String, String)> = uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        if query != [("app".to_string(), CLIENT_ID.to_string())] {
            core.violation(format!(
                "profile: the query must be exactly app={CLIENT_ID}, got {query:?}"
            ));
            return fail(StatusCode::BAD_REQUEST, codes::REQUEST, "query");
        }
        let token = header_str(headers, header::AUTHORIZATION)
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let Some((grant, user)) = token.and_then(|t| core.access_grant(t)).and_then(|g| {
            let user = lock(&self.users).get(&g.seed).cloned();
            user.map(|u| (g, u))
        }) else {
            return fail(StatusCode::OK, codes::TOKEN, "bearer token is invalid");
        };
        let mut names = serde_json::Map::new();
        if let Some(display) = &user.display {
            names.insert("display".into(), display.as_str().into());
        }
        names.insert("sort".into(), user.handle.as_str().into());
        let mut account = json!({
            "uid": core.number(user.uid),
            "handle": user.handle,
            "names": names,
            "picture": {"href": user.picture, "size": 256},
        });
        if let Some((address, confirmed)) = &user.contact
            && grant.scopes.iter().any(|s| s == "profile.email")
        {
            account["contact"] = json!({"address": address, "confirmed": confirmed});
        }
        ok("result", &json!({ "account": account }))
    }

    /// `POST /v3/oauth/revoke.json`, form `credential=<token>`: always
    /// `{"status":"ok"}` (revoking an unknown token changes nothing).
    fn revoke(&self, method: &Method, headers: &HeaderMap, body: &[u8]) -> Response {
        let core = &self.core;
        let content_type = header_str(headers, header::CONTENT_TYPE).unwrap_or_default();
        if method != Method::POST || !content_type.starts_with("application/x-www-form-urlencoded")
        {
            core.violation(format!(
                "revoke: takes a form POST, got {method} {content_type:?}"
            ));
            return fail(StatusCode::BAD_REQUEST, codes::REQUEST, "form POST");
        }
        let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        let [(key, token)] = form.as_slice() else {
            core.violation("revoke: the form must be exactly credential=<token>");
            return fail(StatusCode::BAD_REQUEST, codes::REQUEST, "credential");
        };
        if key != "credential" {
            core.violation(format!("revoke: unexpected key {key}"));
            return fail(StatusCode::BAD_REQUEST, codes::REQUEST, "credential");
        }
        core.revoke_access(token);
        ok("revoked", &Value::Bool(true))
    }
}

// ---------------------------------------------------------------------------
// Handlers

async fn token(
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

async fn renew(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = seen(Step::Refresh, &method, &uri, &headers, &body);
    shared
        .core
        .answer(Step::Refresh, seen, || {
            shared.renew(&method, &uri, &headers, &body)
        })
        .await
}

async fn profile(
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
            shared.profile(&method, &uri, &headers)
        })
        .await
}

async fn revoke(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = seen(Step::Revoke, &method, &uri, &headers, &body);
    shared
        .core
        .answer(Step::Revoke, seen, || {
            shared.revoke(&method, &headers, &body)
        })
        .await
}

// ---------------------------------------------------------------------------
// Recording
