//! Sign in with Apple emulator (docs/providers.md#apple): discovery,
//! `/auth/authorize` (checked in [`Emulator::approve`]), `/auth/token`
//! (code and refresh grants), `/auth/keys` and `/auth/revoke`.
//!
//! Reproduced: the discovery document (`client_secret_post` only, no PKCE
//! listed, a revocation endpoint, no userinfo); the authorize rules
//! (`response_mode=form_post` whenever `name` or `email` is asked for); the
//! form POST to the redirect URI with `code`, `state` and, on a user's
//! first authorization only, `user` (JSON with the name and email); the
//! client secret, an ES256 JWT the emulator verifies against the team's
//! public key (`kid`, `iss` the team id, `sub` the client id, `aud`
//! Apple, at most six months between `iat` and `exp`); ID tokens (RS256,
//! `sub` in Apple's `000123.hex.1234` form, `email_verified` and
//! `is_private_email` as the strings "true"/"false", private-relay
//! addresses for some users, `nonce_supported`, `real_user_status`); the
//! token answer; errors as `{"error": …}` with HTTP 400; revocation that
//! answers 200 with an empty body; a cancel posted as
//! `error=user_cancelled_authorize`.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use authbroker::config::ProviderConfig;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::Response,
};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde_json::{Value, json};

use super::{
    ALNUM, Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, HEX_LOWER, Step,
    google::{Alg, Keys},
    lock,
    oidc_authorize::{self, Registered},
    random_token, serve,
    wire::{Req, answer, derive, derive_u64, obj, single, state_of},
};

/// A Services ID, which is the web client id.
pub const CLIENT_ID: &str = "com.example.web.signin";
pub const TEAM_ID: &str = "A1B2C3D4E5";
pub const KEY_ID: &str = "KEY9XYZ123";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const AUTHORIZE_PATH: &str = "/auth/authorize";
pub const TOKEN_PATH: &str = "/auth/token";
pub const JWKS_PATH: &str = "/auth/keys";
pub const REVOKE_PATH: &str = "/auth/revoke";
/// What the client secret's `aud` must be, wherever the emulator runs.
const AUDIENCE: &str = "https://appleid.apple.com";
/// Apple's limit on a client secret's life: six months.
const MAX_SECRET_LIFE: i64 = 15_777_000;
const EXPIRES_IN: i64 = 3600;
const ID_TOKEN_TTL: i64 = 600;
const JSON: &str = "application/json;charset=UTF-8";
const SCOPES: &[&str] = &["openid", "name", "email"];
const RELAY_DOMAIN: &str = "privaterelay.appleid.com";

fn key_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/keys/ec.pem").to_string()
}

/// The team key's public half, from the test keys' JWK file.
fn team_public_key() -> DecodingKey {
    let keys: Value = serde_json::from_str(include_str!("../keys/jwks.json")).expect("jwks.json");
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(keys["ec"].clone()).expect("the EC test key");
    DecodingKey::from_jwk(&jwk).expect("an EC public key")
}

/// An Apple Account.
#[derive(Clone, Debug)]
pub struct AppleUser {
    pub sub: String,
    pub first_name: String,
    pub last_name: String,
    /// The real address, or a private-relay one when the user hid theirs.
    pub email: String,
    pub private_email: bool,
}

impl AppleUser {
    fn new(seed: &str) -> AppleUser {
        let h = derive_u64(&["apple-flags", seed]);
        let private_email = h.is_multiple_of(2);
        let login: String = seed
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_lowercase();
        let email = if private_email {
            format!(
                "{}@{RELAY_DOMAIN}",
                derive(
                    &["relay", seed],
                    b"abcdefghijklmnopqrstuvwxyz0123456789",
                    10
                )
            )
        } else {
            format!("{login}@icloud.example")
        };
        AppleUser {
            sub: format!(
                "{:06}.{}.{:04}",
                h % 1_000_000,
                derive(&["apple-sub", seed], HEX_LOWER, 32),
                h % 10_000
            ),
            first_name: seed.to_string(),
            last_name: "Lovelace".into(),
            email,
            private_email,
        }
    }

    /// What a first login reports: the name from `user`, the email (relay
    /// or real) verified, no username or avatar.
    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.sub.clone(),
            union_id: String::new(),
            username: String::new(),
            display_name: format!("{} {}", self.first_name, self.last_name),
            avatar_url: String::new(),
            email: self.email.clone(),
            email_verified: true,
        }
    }
}

pub struct AppleEmulator {
    /// `http://127.0.0.1:PORT`, also the issuer.
    pub base_url: String,
    shared: Arc<Apple>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AppleEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Apple {
    core: Core,
    base_url: OnceLock<String>,
    keys: Keys,
    team_key: DecodingKey,
    users: Mutex<HashMap<String, AppleUser>>,
    /// Users who have authorized the app once: no `user` field again.
    authorized: Mutex<HashSet<String>>,
    /// Client secrets seen (their `iat`), so a test can see re-signing.
    secrets: Mutex<Vec<i64>>,
}

impl AppleEmulator {
    pub async fn start() -> AppleEmulator {
        let shared = Arc::new(Apple {
            core: Core::default(),
            base_url: OnceLock::new(),
            keys: Keys::load(),
            team_key: team_public_key(),
            users: Mutex::default(),
            authorized: Mutex::default(),
            secrets: Mutex::default(),
        });
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        let _ = shared.base_url.set(base_url.clone());
        AppleEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn user(&self, seed: &str) -> Option<AppleUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// The `iat` of every client secret accepted, in order.
    pub fn secrets_seen(&self) -> Vec<i64> {
        lock(&self.shared.secrets).clone()
    }

    /// Apple's own rules on top of OIDC's: `response_mode=form_post`
    /// whenever `name` or `email` is asked for, and no PKCE.
    fn check_authorize(
        &self,
        authorize_url: &str,
        seed: &str,
    ) -> Result<(CodeGrant, String), String> {
        let registered = Registered {
            base_url: &self.base_url,
            path: AUTHORIZE_PATH,
            client_id: CLIENT_ID,
            redirect_uri: REDIRECT_URI,
            scopes: SCOPES,
            provider: "Apple",
            unknown_client: "invalid_client",
        };
        let checked = oidc_authorize::check(&registered, authorize_url, seed)?;
        let scopes = &checked.grant.scopes;
        if scopes.iter().any(|s| s == "name" || s == "email")
            && single(&checked.params, "response_mode")? != Some("form_post")
        {
            return Err(
                "response_mode must be form_post when name or email scope is requested \
                 (invalid_request)"
                    .into(),
            );
        }
        if checked.grant.challenge.is_some() {
            return Err("PKCE parameters Apple does not document (invalid_request)".into());
        }
        Ok((checked.grant, checked.state))
    }
}

impl Emulator for AppleEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "apple"
    }

    /// No client secret: the team id, key file and key id sign one.
    fn provider_config(&self) -> ProviderConfig {
        serde_json::from_value(json!({
            "kind": "apple",
            "client_id": CLIENT_ID,
            "redirect_uris": [REDIRECT_URI],
            "endpoints": { "issuer": self.base_url },
            "private_key_file": key_path(),
            "private_key_id": KEY_ID,
            "options": { "team_id": TEAM_ID },
        }))
        .expect("a valid provider config")
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: false,
            refresh: true,
            refresh_single_use: false,
            revoke: true,
            errors_with_http_200: false,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = AppleUser::new(seed);
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.into(), user);
        lock(&self.shared.authorized).remove(seed);
        expected
    }

    /// What Apple POSTs to the redirect URI: `code`, `state`, and the first
    /// time only, `user`.
    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let core = &self.shared.core;
        let (grant, state) = core.approvable(
            self.check_authorize(authorize_url, seed),
            &self.shared.users,
            seed,
        )?;
        let scopes = grant.scopes.clone();
        let code = format!(
            "c{}.0.{}.{}",
            random_token("", 32, HEX_LOWER),
            random_token("", 4, ALNUM).to_lowercase(),
            random_token("", 22, ALNUM)
        );
        let mut form = core.code_redirect(code, grant, state);
        let first = lock(&self.shared.authorized).insert(seed.to_string());
        if first {
            let u = self.user(seed).expect("registered");
            let mut user = serde_json::Map::new();
            if scopes.iter().any(|s| s == "name") {
                user.insert(
                    "name".into(),
                    json!({"firstName": u.first_name, "lastName": u.last_name}),
                );
            }
            if scopes.iter().any(|s| s == "email") {
                user.insert("email".into(), u.email.into());
            }
            if !user.is_empty() {
                form.push(("user".into(), Value::Object(user).to_string()));
            }
        }
        Ok(form)
    }

    /// The user pressed Cancel.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        Some(vec![
            ("state".into(), state_of(authorize_url)),
            ("error".into(), "user_cancelled_authorize".into()),
        ])
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let scopes: Vec<String> = SCOPES.iter().map(|s| s.to_string()).collect();
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

fn apple_error(error: &str) -> Response {
    answer(
        StatusCode::BAD_REQUEST,
        JSON,
        obj(&[("error", error.into())]),
    )
}

impl Apple {
    fn base_url(&self) -> &str {
        self.base_url.get().map(String::as_str).unwrap_or_default()
    }

    fn mint(&self, seed: &str, scopes: &[String]) -> (String, String) {
        let access = format!(
            "a{}.0.{}",
            random_token("", 32, HEX_LOWER),
            random_token("", 26, ALNUM)
        );
        let refresh = format!(
            "r{}.0.{}",
            random_token("", 32, HEX_LOWER),
            random_token("", 26, ALNUM)
        );
        self.core.store_access(&access, seed, scopes);
        self.core.store_refresh(&refresh, seed, scopes);
        (access, refresh)
    }

    fn user_of(&self, seed: &str) -> AppleUser {
        lock(&self.users)
            .get(seed)
            .cloned()
            .unwrap_or_else(|| AppleUser::new(seed))
    }

    fn violation(&self, req: &Req, why: &str) {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
    }

    /// The client: `client_id` and a client secret JWT Apple would accept.
    /// Apple documents only `client_secret_post`.
    fn client_ok(&self, req: &Req, headers: &HeaderMap) -> bool {
        if headers.contains_key(axum::http::header::AUTHORIZATION) {
            self.violation(
                req,
                "Basic credentials (Apple takes client_secret_post only)",
            );
            return false;
        }
        if req.param("client_id") != Some(CLIENT_ID) {
            return false;
        }
        let Some(secret) = req.param("client_secret") else {
            return false;
        };
        match self.check_secret(secret) {
            Ok(iat) => {
                lock(&self.secrets).push(iat);
                true
            }
            Err(why) => {
                self.violation(req, &format!("client secret: {why}"));
                false
            }
        }
    }

    fn check_secret(&self, secret: &str) -> Result<i64, String> {
        let header = jsonwebtoken::decode_header(secret).map_err(|_| "not a JWT".to_string())?;
        if header.alg != Algorithm::ES256 {
            return Err(format!("signed with {:?}, not ES256", header.alg));
        }
        if header.kid.as_deref() != Some(KEY_ID) {
            return Err(format!("kid {:?} is not the key's id", header.kid));
        }
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[AUDIENCE]);
        v.set_issuer(&[TEAM_ID]);
        v.set_required_spec_claims(&["iss", "aud", "exp", "sub"]);
        v.leeway = 0;
        let claims = jsonwebtoken::decode::<Value>(secret, &self.team_key, &v)
            .map_err(|e| format!("{e}"))?
            .claims;
        if claims["sub"] != CLIENT_ID {
            return Err("sub is not the client id".into());
        }
        let iat = claims["iat"].as_i64().ok_or("no iat")?;
        let exp = claims["exp"].as_i64().ok_or("no exp")?;
        if iat > unix_now() + 60 {
            return Err("iat in the future".into());
        }
        if exp - iat > MAX_SECRET_LIFE {
            return Err("exp more than six months after iat".into());
        }
        Ok(iat)
    }

    fn token(&self, req: &Req, headers: &HeaderMap) -> Response {
        if req.method != Method::POST {
            self.violation(req, "the token endpoint takes POST");
            return apple_error("invalid_request");
        }
        if req.json_body {
            self.violation(req, "a JSON body (Apple takes form data)");
            return apple_error("invalid_request");
        }
        if !self.client_ok(req, headers) {
            return apple_error("invalid_client");
        }
        match req.param("grant_type") {
            Some("authorization_code") => self.exchange(req),
            Some("refresh_token") => self.refresh(req),
            None => apple_error("invalid_request"),
            Some(_) => apple_error("unsupported_grant_type"),
        }
    }

    fn exchange(&self, req: &Req) -> Response {
        let Some(code) = req.param("code") else {
            self.violation(req, "no code");
            return apple_error("invalid_request");
        };
        let Some(grant) = self.core.redeem_code(code) else {
            return apple_error("invalid_grant");
        };
        if grant.redirect_uri.as_deref() != req.param("redirect_uri") {
            self.violation(req, "redirect_uri differs from the authorize request's");
            return apple_error("invalid_grant");
        }
        if req.has("code_verifier") {
            self.violation(req, "a code_verifier without a challenge");
            return apple_error("invalid_grant");
        }
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
        let id_token = self.id_token(&grant.seed, grant.nonce.as_deref(), &grant.scopes);
        answer(
            StatusCode::OK,
            JSON,
            obj(&[
                ("access_token", access.into()),
                ("token_type", "Bearer".into()),
                ("expires_in", self.core.number(EXPIRES_IN)),
                ("refresh_token", refresh.into()),
                ("id_token", id_token.into()),
            ]),
        )
    }

    /// A new access token; the refresh token stays (no new one is sent).
    fn refresh(&self, req: &Req) -> Response {
        let Some(token) = req.param("refresh_token") else {
            self.violation(req, "no refresh_token");
            return apple_error("invalid_request");
        };
        let Some(grant) = self.core.use_refresh(token, false) else {
            return apple_error("invalid_grant");
        };
        let (access, _) = self.mint(&grant.seed, &grant.scopes);
        let id_token = self.id_token(&grant.seed, None, &grant.scopes);
        answer(
            StatusCode::OK,
            JSON,
            obj(&[
                ("access_token", access.into()),
                ("token_type", "Bearer".into()),
                ("expires_in", self.core.number(EXPIRES_IN)),
                ("id_token", id_token.into()),
            ]),
        )
    }

    fn id_token(&self, seed: &str, nonce: Option<&str>, scopes: &[String]) -> String {
        let u = self.user_of(seed);
        let now = unix_now();
        let mut claims = serde_json::Map::new();
        claims.insert("iss".into(), self.base_url().into());
        claims.insert("aud".into(), CLIENT_ID.into());
        claims.insert("exp".into(), (now + ID_TOKEN_TTL).into());
        claims.insert("iat".into(), now.into());
        claims.insert("sub".into(), u.sub.clone().into());
        if let Some(nonce) = nonce {
            claims.insert("nonce".into(), nonce.into());
        }
        claims.insert("c_hash".into(), random_token("", 22, ALNUM).into());
        if scopes.iter().any(|s| s == "email") {
            claims.insert("email".into(), u.email.clone().into());
            claims.insert("email_verified".into(), "true".into());
            claims.insert(
                "is_private_email".into(),
                u.private_email.to_string().into(),
            );
        }
        claims.insert("auth_time".into(), (now - 5).into());
        claims.insert("nonce_supported".into(), true.into());
        claims.insert("real_user_status".into(), 2.into());
        let key = self.keys.pick(Alg::Rs256, false);
        let mut header = Header::new(key.algorithm);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.key).expect("sign an ID token")
    }

    /// 200 with an empty body, also for a token already gone.
    fn revoke(&self, req: &Req, headers: &HeaderMap) -> Response {
        if req.method != Method::POST {
            self.violation(req, "revocation takes POST");
            return apple_error("invalid_request");
        }
        if !self.client_ok(req, headers) {
            return apple_error("invalid_client");
        }
        let Some(token) = req.param("token") else {
            self.violation(req, "no token");
            return apple_error("invalid_request");
        };
        if !matches!(
            req.param("token_type_hint"),
            None | Some("access_token" | "refresh_token")
        ) {
            return apple_error("unsupported_token_type");
        }
        self.core.revoke_access(token);
        self.core.use_refresh(token, true);
        answer(StatusCode::OK, JSON, String::new())
    }

    fn discovery_document(&self) -> String {
        let base = self.base_url();
        obj(&[
            ("issuer", base.into()),
            (
                "authorization_endpoint",
                format!("{base}{AUTHORIZE_PATH}").into(),
            ),
            ("token_endpoint", format!("{base}{TOKEN_PATH}").into()),
            ("revocation_endpoint", format!("{base}{REVOKE_PATH}").into()),
            ("jwks_uri", format!("{base}{JWKS_PATH}").into()),
            ("response_types_supported", json!(["code"])),
            (
                "response_modes_supported",
                json!(["query", "fragment", "form_post"]),
            ),
            ("subject_types_supported", json!(["pairwise"])),
            ("id_token_signing_alg_values_supported", json!(["RS256"])),
            ("scopes_supported", json!(["openid", "email", "name"])),
            (
                "token_endpoint_auth_methods_supported",
                json!(["client_secret_post"]),
            ),
            (
                "claims_supported",
                json!([
                    "aud",
                    "email",
                    "email_verified",
                    "exp",
                    "iat",
                    "is_private_email",
                    "iss",
                    "nonce",
                    "nonce_supported",
                    "real_user_status",
                    "sub",
                    "transfer_sub"
                ]),
            ),
        ])
    }

    fn jwks_document(&self) -> String {
        let key = self.keys.pick(Alg::Rs256, false);
        json!({ "keys": [key.jwk] }).to_string()
    }
}

async fn handle(
    State(a): State<Arc<Apple>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, &uri, &headers, &body);
    let step = match uri.path() {
        DISCOVERY_PATH | JWKS_PATH => Step::Discovery,
        TOKEN_PATH if req.param("grant_type") == Some("refresh_token") => Step::Refresh,
        TOKEN_PATH => Step::Token,
        REVOKE_PATH => Step::Revoke,
        // Apple has no userinfo endpoint.
        _ => Step::Identity,
    };
    let seen = req.seen(step);
    a.core
        .answer(step, seen, || match uri.path() {
            DISCOVERY_PATH => answer(StatusCode::OK, JSON, a.discovery_document()),
            JWKS_PATH => answer(StatusCode::OK, JSON, a.jwks_document()),
            TOKEN_PATH => a.token(&req, &headers),
            REVOKE_PATH => a.revoke(&req, &headers),
            _ => {
                a.violation(&req, "no such endpoint");
                answer(StatusCode::NOT_FOUND, JSON, String::new())
            }
        })
        .await
}
