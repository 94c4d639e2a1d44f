//! GitLab emulator (docs/providers.md#gitlab): an instance whose base URL is
//! its issuer, as gitlab.com or a self-managed one is. Doorkeeper and
//! doorkeeper-openid_connect serve its OAuth2 and OIDC endpoints:
//! discovery, `/oauth/discovery/keys`, `/oauth/authorize` (checked in
//! [`Emulator::approve`]), `/oauth/token` (code and refresh grants),
//! `/oauth/userinfo` and `/oauth/revoke`.
//!
//! Reproduced: the discovery document's shape; RS256 ID tokens with `sub`
//! the numeric user id as a string, `sub_legacy`, `auth_time`, the profile
//! claims and `email`/`email_verified` (the primary address with the
//! `email` scope, else the public one); Doorkeeper's token answer
//! (`token_type` "Bearer", `expires_in` 7200, `created_at`) and its error
//! bodies and statuses in English; client authentication by Basic or by
//! form parameters; and revocation, which Doorkeeper refuses (403
//! `unauthorized_client`) unless the confidential client that owns the
//! token authenticates.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
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
use jsonwebtoken::Header;
use serde_json::{Value, json};

use super::{
    Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, HEX_LOWER, Step,
    google::{Alg, Keys},
    lock, random_token, serve,
    wire::{
        Req, answer, basic_credentials, check_origin, derive_u64, expect_param, obj,
        provider_config, scope_list, single, state_of, state_param,
    },
};

/// Application ID and secret as GitLab shows them (64 hex; `gloas-` secret).
pub const CLIENT_ID: &str = "8d3f0b7c1e2a4f6d9b0c5e7a3f1d2c4b6a8e0f2d4c6b8a0e2f4d6c8b0a2e4f6d";
pub const CLIENT_SECRET: &str =
    "gloas-5c1e9a7b3d2f4e6a8c0b1d3f5e7a9c2b4d6f8e0a1c3e5b7d9f2a4c6e8b0d1f3a";
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const AUTHORIZE_PATH: &str = "/oauth/authorize";
pub const TOKEN_PATH: &str = "/oauth/token";
pub const USERINFO_PATH: &str = "/oauth/userinfo";
pub const REVOKE_PATH: &str = "/oauth/revoke";
pub const JWKS_PATH: &str = "/oauth/discovery/keys";
/// Access tokens live two hours (GitLab 15.0 and later).
pub const EXPIRES_IN: i64 = 7200;
const ID_TOKEN_TTL: i64 = 120;
/// Doorkeeper's English texts.
const INVALID_GRANT: &str = "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client.";
const INVALID_CLIENT: &str = "Client authentication failed due to unknown client, no client authentication included, or unsupported authentication method.";
const INVALID_REQUEST: &str = "The request is missing a required parameter, includes an unsupported parameter value, or is otherwise malformed.";
const UNSUPPORTED_GRANT: &str =
    "The authorization grant type is not supported by the authorization server.";
const CANNOT_REVOKE: &str = "You are not authorized to revoke this token";
const INVALID_TOKEN: &str = "The access token is invalid";
const JSON_UTF8: &str = "application/json; charset=utf-8";
/// The scopes an application may be given that matter here.
const SCOPES: &[&str] = &[
    "openid",
    "profile",
    "email",
    "read_user",
    "read_api",
    "api",
    "read_repository",
];

/// A GitLab account.
#[derive(Clone, Debug)]
pub struct GitlabUser {
    /// The numeric user id: the `sub`.
    pub id: u64,
    pub username: String,
    pub name: String,
    /// The primary email, verified for every other user.
    pub email: String,
    pub email_verified: bool,
    /// The public email shown on the profile, often empty.
    pub public_email: Option<String>,
    pub avatar: String,
}

impl GitlabUser {
    fn new(seed: &str) -> GitlabUser {
        let id = 1_000_000 + derive_u64(&["gitlab-id", seed]) % 20_000_000;
        let username: String = seed
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_lowercase()
            + &format!("{}", id % 1000);
        let h = derive_u64(&["gitlab-flags", seed]);
        GitlabUser {
            id,
            name: format!("{} Lovelace", seed),
            email: format!("{username}@example.org"),
            email_verified: !h.is_multiple_of(3),
            public_email: h
                .is_multiple_of(2)
                .then(|| format!("{username}.public@example.net")),
            avatar: format!(
                "https://secure.gravatar.com/avatar/{}?s=80&d=identicon",
                super::wire::hex_lower(&super::wire::digest(&[seed])[..16])
            ),
            username,
        }
    }

    /// What the login reports with the preset's scopes (`email` granted).
    fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.id.to_string(),
            union_id: String::new(),
            username: self.username.clone(),
            display_name: self.name.clone(),
            avatar_url: self.avatar.clone(),
            email: self.email.clone(),
            email_verified: self.email_verified,
        }
    }
}

/// A running GitLab emulator; the server stops when this is dropped.
pub struct GitlabEmulator {
    /// `http://127.0.0.1:PORT`, also the issuer.
    pub base_url: String,
    shared: Arc<Gitlab>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitlabEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Gitlab {
    core: Core,
    base_url: OnceLock<String>,
    keys: Keys,
    users: Mutex<HashMap<String, GitlabUser>>,
}

impl GitlabEmulator {
    pub async fn start() -> GitlabEmulator {
        let shared = Arc::new(Gitlab {
            core: Core::default(),
            base_url: OnceLock::new(),
            keys: Keys::load(),
            users: Mutex::default(),
        });
        let router = Router::new()
            .route(DISCOVERY_PATH, any(handle))
            .route(JWKS_PATH, any(handle))
            .route(TOKEN_PATH, any(handle))
            .route(USERINFO_PATH, any(handle))
            .route(REVOKE_PATH, any(handle))
            .with_state(shared.clone());
        let (base_url, task) = serve(router).await;
        // Set before anyone knows the port, so no request can miss it.
        let _ = shared.base_url.set(base_url.clone());
        GitlabEmulator {
            base_url,
            shared,
            task,
        }
    }

    pub fn user(&self, seed: &str) -> Option<GitlabUser> {
        lock(&self.shared.users).get(seed).cloned()
    }

    /// The checks `/oauth/authorize` makes; `Ok` carries the grant and state.
    fn check_authorize(
        &self,
        authorize_url: &str,
        seed: &str,
    ) -> Result<(CodeGrant, String), String> {
        let url = url::Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
        check_origin(&url, &self.base_url)?;
        if url.path() != AUTHORIZE_PATH || url.fragment().is_some() {
            return Err(format!(
                "{authorize_url} is not {AUTHORIZE_PATH} (from discovery)"
            ));
        }
        let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        expect_param(&params, "client_id", CLIENT_ID, Some("invalid_client"))?;
        expect_param(
            &params,
            "redirect_uri",
            REDIRECT_URI,
            Some("invalid_redirect_uri"),
        )?;
        expect_param(
            &params,
            "response_type",
            "code",
            Some("unsupported_response_type"),
        )?;
        let state = state_param(&params)?;
        let scopes = scope_list(&params, ' ', SCOPES, &[], "GitLab")?;
        if !scopes.iter().any(|s| s == "openid") {
            return Err("no openid scope: no ID token would be issued".into());
        }
        let nonce = single(&params, "nonce")?.ok_or("no nonce (authbroker always sends one)")?;
        let challenge = match (
            single(&params, "code_challenge")?,
            single(&params, "code_challenge_method")?,
        ) {
            (Some(c), Some("S256")) if c.len() == 43 && URL_SAFE_NO_PAD.decode(c).is_ok() => {
                Some(c.to_string())
            }
            (None, None) => None,
            other => return Err(format!("PKCE parameters {other:?} (invalid_request)")),
        };
        let mut grant = CodeGrant::redirected(seed, CLIENT_ID, REDIRECT_URI, scopes);
        grant.challenge = challenge;
        grant.nonce = Some(nonce.to_string());
        Ok((grant, state))
    }
}

impl Emulator for GitlabEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "gitlab"
    }

    /// A self-managed instance: the preset with its issuer moved.
    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "gitlab",
            CLIENT_ID,
            CLIENT_SECRET,
            &[("issuer", self.base_url.clone())],
        )
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pkce: true,
            refresh: true,
            refresh_single_use: false,
            revoke: true,
            errors_with_http_200: false,
            deny_redirects: true,
        }
    }

    fn add_user(&self, seed: &str) -> ExpectedIdentity {
        let user = GitlabUser::new(seed);
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
        Ok(core.code_redirect(random_token("", 64, HEX_LOWER), grant, state))
    }

    /// Doorkeeper's redirect for a denial.
    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        Some(vec![
            ("error".into(), "access_denied".into()),
            (
                "error_description".into(),
                "The resource owner or authorization server denied the request.".into(),
            ),
            ("state".into(), state_of(authorize_url)),
        ])
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let scopes: Vec<String> = ["openid", "profile", "email"].map(String::from).to_vec();
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

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    answer(
        status,
        JSON_UTF8,
        obj(&[
            ("error", error.into()),
            ("error_description", description.into()),
        ]),
    )
}

impl Gitlab {
    fn base_url(&self) -> &str {
        self.base_url.get().map(String::as_str).unwrap_or_default()
    }

    fn mint(&self, seed: &str, scopes: &[String]) -> (String, String) {
        let access = random_token("", 64, HEX_LOWER);
        let refresh = random_token("", 64, HEX_LOWER);
        self.core.store_access(&access, seed, scopes);
        self.core.store_refresh(&refresh, seed, scopes);
        (access, refresh)
    }

    fn user_of(&self, seed: &str) -> GitlabUser {
        lock(&self.users)
            .get(seed)
            .cloned()
            .unwrap_or_else(|| GitlabUser::new(seed))
    }

    /// The client, from Basic or from form parameters (Doorkeeper takes
    /// either); `None` when it did not authenticate as the application.
    fn client(&self, req: &Req, headers: &HeaderMap) -> Option<()> {
        let (id, secret) = basic_credentials(headers).or_else(|| {
            Some((
                req.param("client_id")?.to_string(),
                req.param("client_secret")?.to_string(),
            ))
        })?;
        (id == CLIENT_ID && secret == CLIENT_SECRET).then_some(())
    }

    fn violation(&self, req: &Req, why: &str) {
        self.core
            .violation(format!("{} {}: {why}", req.method, req.path));
    }

    fn token(&self, req: &Req, headers: &HeaderMap) -> Response {
        if req.method != Method::POST {
            self.violation(req, "the token endpoint takes POST");
            return answer(
                StatusCode::NOT_FOUND,
                JSON_UTF8,
                r#"{"error":"404 Not Found"}"#.into(),
            );
        }
        if req.json_body {
            self.violation(req, "a JSON body (RFC 6749 asks for a form)");
        }
        if self.client(req, headers).is_none() {
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", INVALID_CLIENT);
        }
        match req.param("grant_type") {
            Some("authorization_code") => self.exchange(req),
            Some("refresh_token") => self.refresh(req),
            None => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", INVALID_REQUEST),
            Some(_) => oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                UNSUPPORTED_GRANT,
            ),
        }
    }

    fn exchange(&self, req: &Req) -> Response {
        let (Some(code), Some(redirect_uri)) = (req.param("code"), req.param("redirect_uri"))
        else {
            self.violation(req, "code or redirect_uri missing");
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", INVALID_REQUEST);
        };
        let Some(grant) = self.core.redeem_code(code) else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT);
        };
        if grant.redirect_uri.as_deref() != Some(redirect_uri) {
            self.violation(req, "redirect_uri differs from the authorize request's");
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT);
        }
        if !grant.pkce_ok(req.param("code_verifier")) {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT);
        }
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
        let id_token = self.id_token(&grant.seed, grant.nonce.as_deref(), &grant.scopes);
        self.token_answer(&access, &refresh, &grant.scopes, Some(id_token))
    }

    /// A new pair; the old refresh token keeps working here (see
    /// docs/providers.md#gitlab, uncertain).
    fn refresh(&self, req: &Req) -> Response {
        let Some(token) = req.param("refresh_token") else {
            self.violation(req, "no refresh_token");
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", INVALID_REQUEST);
        };
        let Some(grant) = self.core.use_refresh(token, false) else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT);
        };
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes);
        self.token_answer(&access, &refresh, &grant.scopes, None)
    }

    /// Doorkeeper's key order, then doorkeeper-openid_connect's `id_token`.
    fn token_answer(
        &self,
        access: &str,
        refresh: &str,
        scopes: &[String],
        id_token: Option<String>,
    ) -> Response {
        let mut fields = vec![
            ("access_token", Value::from(access)),
            ("token_type", "Bearer".into()),
            ("expires_in", self.core.number(EXPIRES_IN)),
            ("refresh_token", refresh.into()),
            ("scope", scopes.join(" ").into()),
            ("created_at", self.core.number(unix_now())),
        ];
        if let Some(id_token) = id_token {
            fields.push(("id_token", id_token.into()));
        }
        answer(StatusCode::OK, JSON_UTF8, obj(&fields))
    }

    /// The claims both the ID token and userinfo carry, as GitLab's
    /// doorkeeper-openid_connect configuration computes them.
    fn profile_claims(&self, u: &GitlabUser, scopes: &[String]) -> Vec<(&'static str, Value)> {
        let with_email = scopes.iter().any(|s| s == "email");
        let (email, verified) = if with_email {
            (Some(u.email.clone()), u.email_verified)
        } else {
            // Without `email`: the public address, verified if it is.
            (u.public_email.clone(), u.public_email.is_some())
        };
        let mut claims = vec![
            ("sub", Value::from(u.id.to_string())),
            (
                "sub_legacy",
                super::wire::derive(&["legacy", &u.id.to_string()], HEX_LOWER, 64).into(),
            ),
            ("name", u.name.clone().into()),
            ("nickname", u.username.clone().into()),
            ("preferred_username", u.username.clone().into()),
        ];
        if let Some(email) = email {
            claims.push(("email", email.into()));
        }
        claims.push(("email_verified", verified.into()));
        claims.push(("website", "".into()));
        claims.push((
            "profile",
            format!("{}/{}", self.base_url(), u.username).into(),
        ));
        claims.push(("picture", u.avatar.clone().into()));
        claims
    }

    fn id_token(&self, seed: &str, nonce: Option<&str>, scopes: &[String]) -> String {
        let u = self.user_of(seed);
        let now = unix_now();
        let mut claims = serde_json::Map::new();
        claims.insert("iss".into(), self.base_url().into());
        claims.insert("sub".into(), u.id.to_string().into());
        claims.insert("aud".into(), CLIENT_ID.into());
        claims.insert("exp".into(), (now + ID_TOKEN_TTL).into());
        claims.insert("iat".into(), now.into());
        claims.insert("auth_time".into(), (now - 30).into());
        if let Some(nonce) = nonce {
            claims.insert("nonce".into(), nonce.into());
        }
        for (k, v) in self.profile_claims(&u, scopes).into_iter().skip(1) {
            claims.insert(k.into(), v);
        }
        claims.insert("groups_direct".into(), json!([]));
        let key = self.keys.pick(Alg::Rs256, false);
        let mut header = Header::new(key.algorithm);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.key).expect("sign an ID token")
    }

    fn userinfo(&self, req: &Req, headers: &HeaderMap) -> Response {
        let token = super::wire::header_str(headers, header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .or(req.param("access_token"));
        let grant = token.and_then(|t| self.core.access_grant(t));
        let Some(grant) = grant else {
            let mut response =
                oauth_error(StatusCode::UNAUTHORIZED, "invalid_token", INVALID_TOKEN);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(
                    r#"Bearer realm="Doorkeeper", error="invalid_token", error_description="The access token is invalid""#,
                ),
            );
            return response;
        };
        let u = self.user_of(&grant.seed);
        let mut claims = self.profile_claims(&u, &grant.scopes);
        claims.retain(|(k, _)| *k != "sub_legacy");
        claims.push(("groups", json!([])));
        answer(StatusCode::OK, JSON_UTF8, obj(&claims))
    }

    /// RFC 7009 as Doorkeeper does it: 200 `{}` for an unknown token; a
    /// confidential client's token only when that client authenticates.
    fn revoke(&self, req: &Req, headers: &HeaderMap) -> Response {
        if req.method != Method::POST {
            self.violation(req, "revocation takes POST");
        }
        let Some(token) = req.param("token") else {
            self.violation(req, "no token");
            return answer(StatusCode::OK, JSON_UTF8, "{}".into());
        };
        if self.core.access_grant(token).is_none() && self.core.use_refresh(token, false).is_none()
        {
            return answer(StatusCode::OK, JSON_UTF8, "{}".into());
        }
        if self.client(req, headers).is_none() {
            self.violation(req, "the client did not authenticate (RFC 7009 §2.1)");
            return oauth_error(StatusCode::FORBIDDEN, "unauthorized_client", CANNOT_REVOKE);
        }
        self.core.revoke_access(token);
        self.core.use_refresh(token, true);
        answer(StatusCode::OK, JSON_UTF8, "{}".into())
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
            (
                "introspection_endpoint",
                format!("{base}/oauth/introspect").into(),
            ),
            ("userinfo_endpoint", format!("{base}{USERINFO_PATH}").into()),
            ("jwks_uri", format!("{base}{JWKS_PATH}").into()),
            ("scopes_supported", json!(SCOPES)),
            ("response_types_supported", json!(["code"])),
            (
                "response_modes_supported",
                json!(["query", "fragment", "form_post"]),
            ),
            (
                "grant_types_supported",
                json!([
                    "authorization_code",
                    "password",
                    "client_credentials",
                    "device_code",
                    "refresh_token"
                ]),
            ),
            (
                "token_endpoint_auth_methods_supported",
                json!(["client_secret_basic", "client_secret_post"]),
            ),
            ("subject_types_supported", json!(["public"])),
            ("id_token_signing_alg_values_supported", json!(["RS256"])),
            ("claim_types_supported", json!(["normal"])),
            (
                "claims_supported",
                json!([
                    "iss",
                    "sub",
                    "aud",
                    "exp",
                    "iat",
                    "sub_legacy",
                    "name",
                    "nickname",
                    "preferred_username",
                    "email",
                    "email_verified",
                    "website",
                    "profile",
                    "picture",
                    "groups",
                    "groups_direct"
                ]),
            ),
            ("code_challenge_methods_supported", json!(["plain", "S256"])),
        ])
    }

    fn jwks_document(&self) -> String {
        let key = self.keys.pick(Alg::Rs256, false);
        json!({ "keys": [key.jwk] }).to_string()
    }
}

// ---------------------------------------------------------------------------
// The one handler: every path is logged under its step, and an armed
// fault answers before GitLab does.

async fn handle(
    State(g): State<Arc<Gitlab>>,
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
        USERINFO_PATH => Step::Identity,
        _ => Step::Revoke,
    };
    let seen = req.seen(step);
    g.core
        .answer(step, seen, || match uri.path() {
            DISCOVERY_PATH => answer(StatusCode::OK, JSON_UTF8, g.discovery_document()),
            JWKS_PATH => answer(StatusCode::OK, JSON_UTF8, g.jwks_document()),
            TOKEN_PATH => g.token(&req, &headers),
            USERINFO_PATH => g.userinfo(&req, &headers),
            _ => g.revoke(&req, &headers),
        })
        .await
}
