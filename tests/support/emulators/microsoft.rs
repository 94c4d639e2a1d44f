//! Microsoft identity platform emulator (docs/providers.md#microsoft): the
//! v2.0 endpoints of `login.microsoftonline.com` for one tenant segment
//! (`common` unless a test asks for another), each under
//! `/{tenant}/…`: discovery at `/{tenant}/v2.0/.well-known/openid-configuration`,
//! `/{tenant}/oauth2/v2.0/authorize` (checked in [`Emulator::approve`]),
//! `/{tenant}/oauth2/v2.0/token` (code and refresh grants),
//! `/{tenant}/discovery/v2.0/keys`, and Graph's `/oidc/userinfo` on the
//! same host.
//!
//! Reproduced: the multi-tenant discovery document, whose `issuer` is the
//! template `…/{tenantid}/v2.0`; users in several tenants (two
//! organisations and the personal-account tenant `9188040d-…`), so one
//! login's ID token names another issuer than the next; v2.0 ID tokens
//! (RS256, `ver` "2.0", pairwise `sub`, `oid`, `tid`, `preferred_username`,
//! `email` with the `email` scope and never `email_verified`, `xms_edov`
//! only for users whose domain the tenant verified); the token answer
//! (`token_type` "Bearer", `expires_in` and `ext_expires_in`, the Graph
//! scopes granted); AADSTS errors (`error_codes`, `trace_id`,
//! `correlation_id`, `error_uri`), 400 for a bad grant and 401 for a bad
//! secret; no revocation endpoint. A test can make the ID token's `iss`
//! name another tenant than its `tid` ([`MicrosoftEmulator::set_foreign_issuer`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use authbroker::config::ProviderConfig;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::Response,
};
use jsonwebtoken::Header;
use serde_json::{Value, json};

use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, Step,
    google::{Alg, Keys},
    lock,
    oidc_authorize::{self, Registered},
    random_token, serve,
    wire::{Req, answer, basic_credentials, derive, derive_u64, obj, provider_config, state_of},
};

/// An application (client) id is a GUID; the secret is what the portal shows once.
pub const CLIENT_ID: &str = "6731de76-14a6-49ae-97bc-6eba6914391e";
pub const CLIENT_SECRET: &str = "Qx~8Q~3fJ9nV.Zk2rT4yWb_Hs7LmPc1dEaGu0oNi";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
/// The tenant segment authbroker is configured with (the preset's default).
pub const TENANT: &str = "common";
/// The tenant every personal Microsoft account belongs to.
pub const CONSUMERS_TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
/// Two organisations' tenants.
const ORG_TENANTS: [&str; 2] = [
    "72f988bf-86f1-41af-91ab-2d7cd011db47",
    "f8cdef31-a31e-4b4a-93e4-5f571e91255a",
];
pub const USERINFO_PATH: &str = "/oidc/userinfo";
const EXPIRES_IN: i64 = 3599;
const ID_TOKEN_TTL: i64 = 3600;
const JSON_UTF8: &str = "application/json; charset=utf-8";
const SCOPES: &[&str] = &["openid", "profile", "email", "offline_access", "User.Read"];

fn discovery_path() -> String {
    format!("/{TENANT}/v2.0/.well-known/openid-configuration")
}
fn authorize_path() -> String {
    format!("/{TENANT}/oauth2/v2.0/authorize")
}
fn token_path() -> String {
    format!("/{TENANT}/oauth2/v2.0/token")
}
fn jwks_path() -> String {
    format!("/{TENANT}/discovery/v2.0/keys")
}

/// A work, school or personal account.
#[derive(Clone, Debug)]
pub struct MicrosoftUser {
    pub tid: String,
    /// The user's object id in its tenant.
    pub oid: String,
    /// The pairwise subject: per user and application.
    pub sub: String,
    pub name: String,
    pub preferred_username: String,
    pub email: Option<String>,
    /// The tenant verified the email's domain; `xms_edov` says so.
    pub domain_verified: bool,
}

fn guid(parts: &[&str]) -> String {
    let hex = derive(parts, super::HEX_LOWER, 32);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

impl MicrosoftUser {
    fn new(seed: &str) -> MicrosoftUser {
        let h = derive_u64(&["microsoft-flags", seed]);
        let personal = h.is_multiple_of(3);
        let tid = if personal {
            CONSUMERS_TENANT.to_string()
        } else {
            ORG_TENANTS[(h / 3 % 2) as usize].to_string()
        };
        let login: String = seed
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_lowercase();
        let preferred_username = if personal {
            format!("{login}@outlook.com")
        } else {
            format!("{login}@contoso{}.example", h % 7)
        };
        MicrosoftUser {
            oid: guid(&["oid", seed]),
            sub: derive(&["sub", seed, CLIENT_ID], ALNUM, 43),
            name: format!("{seed} Lovelace"),
            email: (!h.is_multiple_of(5)).then(|| preferred_username.clone()),
            domain_verified: !personal && h.is_multiple_of(2),
            preferred_username,
            tid,
        }
    }

    /// What the login reports: `tid:oid`, the email verified only where
    /// `xms_edov` vouches for it.
    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: format!("{}:{}", self.tid, self.oid),
            union_id: String::new(),
            username: self.preferred_username.clone(),
            display_name: self.name.clone(),
            avatar_url: String::new(),
            email: self.email.clone().unwrap_or_default(),
            email_verified: self.email.is_some() && self.domain_verified,
        }
    }
}

/// A running emulator; the server stops when this is dropped.
pub struct MicrosoftEmulator {
    /// `http://127.0.0.1:PORT`, standing for `https://login.microsoftonline.com`.
    pub base_url: String,
    shared: Arc<Microsoft>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MicrosoftEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Microsoft {
    core: Core,
    base_url: OnceLock<String>,
    keys: Keys,
    users: Mutex<HashMap<String, MicrosoftUser>>,
    /// ID tokens name another tenant in `iss` than in `tid`.
    foreign_issuer: AtomicBool,
}

impl MicrosoftEmulator {
    pub async fn start() -> MicrosoftEmulator {
        let shared = Arc::new(Microsoft {
            core: Core::default(),
            base_url: OnceLock::new(),
            keys: Keys::load(),
            users: Mutex::default(),
            foreign_issuer: AtomicBool::new(false),
        });
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        let _ = shared.base_url.set(base_url.clone());
        MicrosoftEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn user(&self, seed: &str) -> Option<MicrosoftUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// ID tokens from now on carry an `iss` of another tenant than their
    /// `tid` (correctly signed: any tenant's token is signed by the same keys).
    pub fn set_foreign_issuer(&self, on: bool) {
        self.shared.foreign_issuer.store(on, Ordering::Relaxed);
    }

    /// The v2.0 endpoint takes PKCE though discovery does not say so; an
    /// unknown client is AADSTS700016 (`unauthorized_client`).
    fn check_authorize(
        &self,
        authorize_url: &str,
        seed: &str,
    ) -> Result<(CodeGrant, String), String> {
        let registered = Registered {
            base_url: &self.base_url,
            path: &authorize_path(),
            client_id: CLIENT_ID,
            redirect_uri: REDIRECT_URI,
            scopes: SCOPES,
            provider: "Microsoft",
            unknown_client: "unauthorized_client",
        };
        let checked = oidc_authorize::check(&registered, authorize_url, seed)?;
        Ok((checked.grant, checked.state))
    }
}

impl Emulator for MicrosoftEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "microsoft"
    }

    /// The preset with its host moved; the `{tenant}` stays a template,
    /// filled from `options.tenant` (default `common`).
    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "microsoft",
            CLIENT_ID,
            CLIENT_SECRET,
            &[("issuer", format!("{}/{{tenant}}/v2.0", self.base_url))],
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
        let user = MicrosoftUser::new(seed);
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
        // Codes are long opaque strings starting `0.A`, `M.C` for personal accounts.
        let code = random_token("0.AX", 300, ALNUM);
        let mut query = core.code_redirect(code, grant, state);
        query.push(("session_state".into(), guid(&["session", seed])));
        Ok(query)
    }

    /// The redirect when the user declines consent.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        Some(vec![
            ("error".into(), "access_denied".into()),
            (
                "error_description".into(),
                "AADSTS65004: User declined to consent to access the app.".into(),
            ),
            ("state".into(), state_of(authorize_url)),
        ])
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let scopes: Vec<String> = ["openid", "profile", "email", "offline_access"]
            .map(String::from)
            .to_vec();
        let (access, refresh) = self.shared.mint(seed, &scopes);
        (access, Some(refresh))
    }
}

// ---------------------------------------------------------------------------
// Endpoints

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

impl Microsoft {
    fn base_url(&self) -> &str {
        self.base_url.get().map(String::as_str).unwrap_or_default()
    }

    fn mint(&self, seed: &str, scopes: &[String]) -> (String, String) {
        // Access tokens for Graph are JWTs to everyone but Graph; opaque here.
        let access = random_token("eyJ0eXAiOiJKV1QiLCJub25jZSI6", 200, ALNUM);
        let refresh = random_token("0.AX", 400, ALNUM);
        self.core.store_access(&access, seed, scopes);
        self.core.store_refresh(&refresh, seed, scopes);
        (access, refresh)
    }

    fn user_of(&self, seed: &str) -> MicrosoftUser {
        lock(&self.users)
            .get(seed)
            .cloned()
            .unwrap_or_else(|| MicrosoftUser::new(seed))
    }

    fn violation(&self, req: &Req, why: &str) {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
    }

    /// An AADSTS error as the token endpoint writes it.
    fn aadsts(&self, status: StatusCode, error: &str, code: u32, text: &str) -> Response {
        let trace = guid(&["trace", &random_token("", 8, ALNUM)]);
        let correlation = guid(&["correlation", &random_token("", 8, ALNUM)]);
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        answer(
            status,
            JSON_UTF8,
            obj(&[
                ("error", error.into()),
                (
                    "error_description",
                    format!(
                        "AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"
                    )
                    .into(),
                ),
                ("error_codes", json!([code])),
                ("timestamp", timestamp.clone().into()),
                ("trace_id", trace.into()),
                ("correlation_id", correlation.into()),
                (
                    "error_uri",
                    format!("{}/error?code={code}", self.base_url()).into(),
                ),
            ]),
        )
    }

    /// Basic or form credentials, whichever the client chose (not both).
    fn client_ok(&self, req: &Req, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let basic = basic_credentials(headers);
        let form = req.param("client_secret");
        let (id, secret) = match (basic, form) {
            (Some(_), Some(_)) => {
                self.violation(req, "client credentials both in Basic and in the body");
                return Err(Box::new(self.aadsts(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    90023,
                    "Multiple client authentication methods were used.",
                )));
            }
            (Some((id, secret)), None) => (id, secret),
            (None, Some(secret)) => (
                req.param("client_id").unwrap_or_default().to_string(),
                secret.to_string(),
            ),
            (None, None) => {
                return Err(Box::new(self.aadsts(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                )));
            }
        };
        if id != CLIENT_ID {
            return Err(Box::new(self.aadsts(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                700016,
                "Application with identifier was not found in the directory.",
            )));
        }
        if secret != CLIENT_SECRET {
            return Err(Box::new(self.aadsts(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            )));
        }
        Ok(())
    }

    fn token(&self, req: &Req, headers: &HeaderMap) -> Response {
        if req.method != Method::POST {
            self.violation(req, "the token endpoint takes POST");
            return self.aadsts(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                900561,
                "The endpoint only accepts POST requests.",
            );
        }
        if req.json_body {
            self.violation(req, "a JSON body (the endpoint takes a form)");
        }
        if let Err(refused) = self.client_ok(req, headers) {
            return *refused;
        }
        match req.param("grant_type") {
            Some("authorization_code") => self.exchange(req),
            Some("refresh_token") => self.refresh(req),
            None => self.aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            ),
            Some(_) => self.aadsts(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            ),
        }
    }

    fn exchange(&self, req: &Req) -> Response {
        let (Some(code), Some(redirect_uri)) = (req.param("code"), req.param("redirect_uri"))
        else {
            self.violation(req, "code or redirect_uri missing");
            return self.aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'code'.",
            );
        };
        let Some(grant) = self.core.redeem_code(code) else {
            return self.aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                9002313,
                "Invalid request. Request is malformed or invalid.",
            );
        };
        if grant.redirect_uri.as_deref() != Some(redirect_uri) {
            self.violation(req, "redirect_uri differs from the authorize request's");
            return self.aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                500112,
                "The reply address does not match the reply address provided when requesting Authorization code.",
            );
        }
        if !grant.pkce_ok(req.param("code_verifier")) {
            return self.aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                501481,
                "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
            );
        }
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
        let id_token = self.id_token(&grant.seed, grant.nonce.as_deref(), &grant.scopes);
        let refresh = grant
            .scopes
            .iter()
            .any(|s| s == "offline_access")
            .then_some(refresh);
        self.token_answer(&access, refresh.as_deref(), &grant.scopes, Some(id_token))
    }

    fn refresh(&self, req: &Req) -> Response {
        let Some(token) = req.param("refresh_token") else {
            self.violation(req, "no refresh_token");
            return self.aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'refresh_token'.",
            );
        };
        let Some(grant) = self.core.use_refresh(token, false) else {
            return self.aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                9002313,
                "Invalid request. Request is malformed or invalid.",
            );
        };
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
        let id_token = self.id_token(&grant.seed, None, &grant.scopes);
        self.token_answer(&access, Some(&refresh), &grant.scopes, Some(id_token))
    }

    /// The scopes come back as Graph names them, `User.Read` added.
    fn token_answer(
        &self,
        access: &str,
        refresh: Option<&str>,
        scopes: &[String],
        id_token: Option<String>,
    ) -> Response {
        let mut granted: Vec<String> = scopes
            .iter()
            .filter(|s| *s != "offline_access")
            .cloned()
            .collect();
        granted.push("https://graph.microsoft.com/User.Read".into());
        let mut fields = vec![
            ("token_type", Value::from("Bearer")),
            ("scope", granted.join(" ").into()),
            ("expires_in", self.core.number(EXPIRES_IN)),
            ("ext_expires_in", self.core.number(EXPIRES_IN)),
            ("access_token", access.into()),
        ];
        if let Some(refresh) = refresh {
            fields.push(("refresh_token", refresh.into()));
        }
        if let Some(id_token) = id_token {
            fields.push(("id_token", id_token.into()));
        }
        answer(StatusCode::OK, JSON_UTF8, obj(&fields))
    }

    fn id_token(&self, seed: &str, nonce: Option<&str>, scopes: &[String]) -> String {
        let u = self.user_of(seed);
        let now = unix_now();
        let issuing_tenant = if self.foreign_issuer.load(Ordering::Relaxed) {
            ORG_TENANTS
                .iter()
                .find(|t| **t != u.tid)
                .copied()
                .unwrap_or(CONSUMERS_TENANT)
                .to_string()
        } else {
            u.tid.clone()
        };
        let has = |s: &str| scopes.iter().any(|x| x == s);
        let mut claims = serde_json::Map::new();
        claims.insert("ver".into(), "2.0".into());
        claims.insert(
            "iss".into(),
            format!("{}/{issuing_tenant}/v2.0", self.base_url()).into(),
        );
        claims.insert("sub".into(), u.sub.clone().into());
        claims.insert("aud".into(), CLIENT_ID.into());
        claims.insert("exp".into(), (now + ID_TOKEN_TTL).into());
        claims.insert("iat".into(), now.into());
        claims.insert("nbf".into(), now.into());
        if has("profile") {
            claims.insert("name".into(), u.name.clone().into());
            claims.insert(
                "preferred_username".into(),
                u.preferred_username.clone().into(),
            );
            claims.insert("oid".into(), u.oid.clone().into());
        }
        if has("email")
            && let Some(email) = &u.email
        {
            claims.insert("email".into(), email.clone().into());
        }
        if u.domain_verified {
            claims.insert("xms_edov".into(), true.into());
        }
        claims.insert("tid".into(), u.tid.clone().into());
        if let Some(nonce) = nonce {
            claims.insert("nonce".into(), nonce.into());
        }
        claims.insert("aio".into(), random_token("", 40, ALNUM).into());
        claims.insert("rh".into(), random_token("0.A", 40, ALNUM).into());
        claims.insert("uti".into(), random_token("", 22, ALNUM).into());
        let key = self.keys.pick(Alg::Rs256, false);
        let mut header = Header::new(key.algorithm);
        header.typ = Some("JWT".into());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.key).expect("sign an ID token")
    }

    /// Graph's OIDC userinfo: `sub` and the profile, no `oid`.
    fn userinfo(&self, headers: &HeaderMap) -> Response {
        let token = super::wire::header_str(headers, header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(grant) = token.and_then(|t| self.core.access_grant(t)) else {
            return answer(
                StatusCode::UNAUTHORIZED,
                JSON_UTF8,
                obj(&[(
                    "error",
                    json!({
                        "code": "InvalidAuthenticationToken",
                        "message": "Access token validation failure. Invalid audience."
                    }),
                )]),
            );
        };
        let u = self.user_of(&grant.seed);
        let (given, family) = u.name.split_once(' ').unwrap_or((&u.name, ""));
        let mut fields = vec![
            ("sub", Value::from(u.sub.clone())),
            ("name", u.name.clone().into()),
            ("family_name", family.into()),
            ("given_name", given.into()),
            (
                "picture",
                "https://graph.microsoft.com/v1.0/me/photo/$value".into(),
            ),
        ];
        if grant.scopes.iter().any(|s| s == "email")
            && let Some(email) = &u.email
        {
            fields.push(("email", email.clone().into()));
        }
        answer(StatusCode::OK, JSON_UTF8, obj(&fields))
    }

    /// The multi-tenant document: the issuer is a template.
    fn discovery_document(&self) -> String {
        let base = self.base_url();
        let tenant = format!("{base}/{TENANT}");
        obj(&[
            ("token_endpoint", format!("{base}{}", token_path()).into()),
            (
                "token_endpoint_auth_methods_supported",
                json!([
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic"
                ]),
            ),
            ("jwks_uri", format!("{base}{}", jwks_path()).into()),
            (
                "response_modes_supported",
                json!(["query", "fragment", "form_post"]),
            ),
            ("subject_types_supported", json!(["pairwise"])),
            ("id_token_signing_alg_values_supported", json!(["RS256"])),
            (
                "response_types_supported",
                json!(["code", "id_token", "code id_token", "id_token token"]),
            ),
            (
                "scopes_supported",
                json!(["openid", "profile", "email", "offline_access"]),
            ),
            ("issuer", format!("{base}/{{tenantid}}/v2.0").into()),
            ("request_uri_parameter_supported", false.into()),
            ("userinfo_endpoint", format!("{base}{USERINFO_PATH}").into()),
            (
                "authorization_endpoint",
                format!("{base}{}", authorize_path()).into(),
            ),
            (
                "device_authorization_endpoint",
                format!("{tenant}/oauth2/v2.0/devicecode").into(),
            ),
            ("http_logout_supported", true.into()),
            ("frontchannel_logout_supported", true.into()),
            (
                "end_session_endpoint",
                format!("{tenant}/oauth2/v2.0/logout").into(),
            ),
            (
                "claims_supported",
                json!([
                    "sub",
                    "iss",
                    "cloud_instance_name",
                    "cloud_instance_host_name",
                    "cloud_graph_host_name",
                    "msgraph_host",
                    "aud",
                    "exp",
                    "iat",
                    "auth_time",
                    "acr",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "at_hash",
                    "c_hash",
                    "email"
                ]),
            ),
            ("kerberos_endpoint", format!("{tenant}/kerberos").into()),
            ("tenant_region_scope", Value::Null),
            ("cloud_instance_name", "microsoftonline.com".into()),
            ("cloud_graph_host_name", "graph.windows.net".into()),
            ("msgraph_host", "graph.microsoft.com".into()),
            ("rbac_url", "https://pas.windows.net".into()),
        ])
    }

    fn jwks_document(&self) -> String {
        let key = self.keys.pick(Alg::Rs256, false);
        json!({ "keys": [key.jwk] }).to_string()
    }
}

// ---------------------------------------------------------------------------
// The one handler: every path is logged under its step, and an armed
// fault answers before Microsoft does.

async fn handle(
    State(m): State<Arc<Microsoft>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let path = uri.path().to_string();
    let step = if path == discovery_path() || path == jwks_path() {
        Step::Discovery
    } else if path == token_path() && req.param("grant_type") == Some("refresh_token") {
        Step::Refresh
    } else if path == token_path() {
        Step::Token
    } else if path == USERINFO_PATH {
        Step::Identity
    } else {
        // Nothing else exists here (no revocation endpoint).
        Step::Revoke
    };
    let seen = req.seen(step);
    m.core
        .answer(step, seen, || {
            if path == discovery_path() {
                answer(StatusCode::OK, JSON_UTF8, m.discovery_document())
            } else if path == jwks_path() {
                answer(StatusCode::OK, JSON_UTF8, m.jwks_document())
            } else if path == token_path() {
                m.token(&req, &headers)
            } else if path == USERINFO_PATH {
                m.userinfo(&headers)
            } else {
                m.violation(&req, "no such endpoint");
                answer(StatusCode::NOT_FOUND, JSON_UTF8, "{}".into())
            }
        })
        .await
}
