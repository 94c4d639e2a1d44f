//! A Google OpenID Connect emulator (docs/providers.md#google): discovery,
//! JWKS, the browser step at `/o/oauth2/v2/auth`, `/token` (code and refresh
//! grants), `/v1/userinfo` and `/revoke`, all on one local port whose base
//! URL is also the issuer.
//!
//! ID tokens are real JWTs signed with the fixture keys under
//! `tests/support/keys/` (RS256 by default, ES256 and EdDSA on request), and
//! every validation rule a client owes an ID token has a knob to break it
//! ([`Tamper`]), plus key rotation ([`GoogleEmulator::sign_with_unknown_kid`])
//! and discovery lies ([`GoogleEmulator::set_discovery_issuer`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::any,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::{Url, form_urlencoded};

use super::https::{self, ServerCert};
use super::wire::{basic_credentials, header_str, provider_config, query_params, seen_with};
use super::{
    Capabilities, CodeGrant, Core, Emulator, ExpectedIdentity, Fault, SeenRequest, Step, lock,
    random_token,
};
use authbroker::config::ProviderConfig;

pub const CLIENT_ID: &str = "1234987819200-abc.apps.googleusercontent.com";
/// Google's secrets start with `GOCSPX-`.
pub const CLIENT_SECRET: &str = "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";
/// The one redirect URI registered for [`CLIENT_ID`].
pub const REDIRECT_URI: &str = super::wire::REDIRECT_URI;
/// Another application's client id: the audience of stolen tokens.
pub const OTHER_CLIENT_ID: &str = "407408718192-other.apps.googleusercontent.com";
/// The issuer Google's older ID tokens carry; valid next to the URL form.
pub const LEGACY_ISSUER: &str = "accounts.google.com";
/// What [`Tamper::WrongIssuer`] puts in `iss`.
pub const WRONG_ISSUER: &str = "https://accounts.example.com";
/// What [`Tamper::WrongNonce`] puts in `nonce` (from Google's doc sample).
pub const WRONG_NONCE: &str = "0394852-3190485-2490358";

pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const AUTHORIZE_PATH: &str = "/o/oauth2/v2/auth";
pub const TOKEN_PATH: &str = "/token";
pub const USERINFO_PATH: &str = "/v1/userinfo";
pub const REVOKE_PATH: &str = "/revoke";
pub const JWKS_PATH: &str = "/oauth2/v3/certs";

pub const EMAIL_SCOPE_URL: &str = "https://www.googleapis.com/auth/userinfo.email";
pub const PROFILE_SCOPE_URL: &str = "https://www.googleapis.com/auth/userinfo.profile";
/// Access tokens live an hour; Google says 3599 seconds.
pub const EXPIRES_IN: i64 = 3599;
/// ID tokens live an hour.
pub const ID_TOKEN_TTL: i64 = 3600;
pub const DEFAULT_JWKS_MAX_AGE: u64 = 3600;
/// `WWW-Authenticate` on a refused userinfo call.
pub const USERINFO_CHALLENGE: &str =
    r#"Bearer realm="https://accounts.google.com/", error="invalid_token""#;

const JSON_UTF8: &str = "application/json; charset=utf-8";
const TOKEN_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// What Google lets an authorize URL carry; anything else is refused with
/// "Parameter not allowed for this message type".
const AUTHORIZE_PARAMS: [&str; 19] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "access_type",
    "prompt",
    "login_hint",
    "hd",
    "include_granted_scopes",
    "code_challenge",
    "code_challenge_method",
    "display",
    "enable_granular_consent",
    "openid.realm",
    "response_mode",
    "max_age",
    "ui_locales",
];
/// The key family ID tokens are signed with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Alg {
    /// RSA 2048, what Google uses.
    #[default]
    Rs256,
    /// ECDSA P-256.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    pub const ALL: [Alg; 3] = [Alg::Rs256, Alg::Es256, Alg::EdDsa];

    pub fn algorithm(self) -> Algorithm {
        match self {
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
            Alg::EdDsa => Algorithm::EdDSA,
        }
    }

    /// The JOSE name: `RS256`, `ES256`, `EdDSA`.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One way to spoil the ID tokens the emulator issues (from `/token`, code
/// and refresh grants alike), each against one rule of OIDC Core §3.1.3.7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Tamper {
    #[default]
    None,
    /// `iss` = [`WRONG_ISSUER`].
    WrongIssuer,
    /// `iss` = [`LEGACY_ISSUER`]: still valid for the google preset.
    LegacyIssuer,
    /// Issued to another application: `aud` and `azp` = [`OTHER_CLIENT_ID`].
    WrongAudience,
    /// `aud` = [client id, [`OTHER_CLIENT_ID`]] and no `azp`.
    ExtraAudienceWithoutAzp,
    /// `aud` = [client id, [`OTHER_CLIENT_ID`]], `azp` = client id: valid.
    ExtraAudienceWithAzp,
    /// `aud` = client id, `azp` = [`OTHER_CLIENT_ID`].
    WrongAzp,
    /// `exp` = now − 600, `iat` = now − 4200.
    Expired,
    /// `iat` = now + 600, `exp` = now + 4200.
    IssuedInFuture,
    /// `nonce` = [`WRONG_NONCE`] (or that with an `x` in front, if it was the real one).
    WrongNonce,
    /// No `nonce` claim.
    MissingNonce,
    /// One bit of the signature flipped.
    BadSignature,
    /// Header `{"alg":"none","typ":"JWT"}` and an empty signature.
    AlgNone,
    /// `"email_verified":"true"`, as in Google's old doc sample: valid.
    EmailVerifiedString,
    /// `"email_verified":false` (in userinfo too): valid, but the email is
    /// not verified.
    EmailUnverified,
}

impl Tamper {
    pub const ALL: [Tamper; 15] = [
        Tamper::None,
        Tamper::WrongIssuer,
        Tamper::LegacyIssuer,
        Tamper::WrongAudience,
        Tamper::ExtraAudienceWithoutAzp,
        Tamper::ExtraAudienceWithAzp,
        Tamper::WrongAzp,
        Tamper::Expired,
        Tamper::IssuedInFuture,
        Tamper::WrongNonce,
        Tamper::MissingNonce,
        Tamper::BadSignature,
        Tamper::AlgNone,
        Tamper::EmailVerifiedString,
        Tamper::EmailUnverified,
    ];

    /// Whether a correct client logs the user in with such a token.
    pub fn accepted(self) -> bool {
        matches!(
            self,
            Tamper::None
                | Tamper::LegacyIssuer
                | Tamper::ExtraAudienceWithAzp
                | Tamper::EmailVerifiedString
                | Tamper::EmailUnverified
        )
    }
}

/// A Google account, derived from a test's seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoogleUser {
    /// Numeric string, 21 digits: the stable subject.
    pub sub: String,
    pub name: String,
    pub given_name: String,
    pub family_name: String,
    /// `https://lh3.googleusercontent.com/a/…=s96-c`.
    pub picture: String,
    pub email: String,
}

impl GoogleUser {
    /// The same seed always gives the same account.
    pub fn from_seed(seed: &str) -> GoogleUser {
        let digest = Sha256::digest(seed.as_bytes());
        let number = u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"));
        let local: String = seed
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .collect::<String>()
            .to_ascii_lowercase();
        let local = if local.is_empty() {
            "user".into()
        } else {
            local
        };
        let mut given = local.clone();
        given[..1].make_ascii_uppercase();
        GoogleUser {
            sub: format!("1{:020}", number % 10u128.pow(20)),
            name: format!("{given} Tester"),
            given_name: given,
            family_name: "Tester".into(),
            picture: format!(
                "https://lh3.googleusercontent.com/a/ACg8oc{}=s96-c",
                &URL_SAFE_NO_PAD.encode(digest)[..38]
            ),
            email: format!("{local}@gmail.com"),
        }
    }

    pub fn expected(&self) -> ExpectedIdentity {
        ExpectedIdentity {
            subject: self.sub.clone(),
            union_id: String::new(),
            // Google sends no preferred_username.
            username: String::new(),
            display_name: self.name.clone(),
            avatar_url: self.picture.clone(),
            email: self.email.clone(),
            email_verified: true,
        }
    }
}

/// A running emulator; the server stops when this is dropped.
pub struct GoogleEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash; also the issuer.
    pub base_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for GoogleEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl GoogleEmulator {
    /// Serves on 127.0.0.1:0 on the current Tokio runtime.
    pub async fn start() -> GoogleEmulator {
        Self::start_with(None).await
    }

    /// Serves HTTPS on 127.0.0.1:0 with `cert` (`https://127.0.0.1:PORT`).
    pub async fn start_https(cert: &ServerCert) -> GoogleEmulator {
        Self::start_with(Some(cert)).await
    }

    async fn start_with(cert: Option<&ServerCert>) -> GoogleEmulator {
        let shared = Arc::new(Shared::new());
        let router = Router::new()
            .route(DISCOVERY_PATH, any(discovery))
            .route(JWKS_PATH, any(jwks))
            .route(TOKEN_PATH, any(token))
            .route(USERINFO_PATH, any(userinfo))
            .route(REVOKE_PATH, any(revoke))
            .with_state(shared.clone());
        let (base_url, server) = match cert {
            None => super::serve(router).await,
            Some(cert) => https::serve(router, cert).await,
        };
        // Set before anyone knows the port, so no request can miss it.
        let _ = shared.base_url.set(base_url.clone());
        GoogleEmulator {
            base_url,
            shared,
            server,
        }
    }

    /// The `iss` of the tokens: the base URL.
    pub fn issuer(&self) -> &str {
        &self.base_url
    }

    /// `{base_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// From now on behaves as an IdP that registered the client for
    /// exactly `methods` (`client_secret_basic`, `client_secret_post`,
    /// `private_key_jwt` with the fixture RSA key): discovery lists only
    /// them, and `/token` and `/revoke` refuse anything else with 401
    /// `invalid_client`.
    pub fn require_client_auth(&self, methods: &[&'static str]) {
        self.shared.knobs().auth_methods = Some(methods.to_vec());
    }

    /// RFC 9207: discovery advertises
    /// `authorization_response_iss_parameter_supported` and callbacks
    /// carry `iss`.
    pub fn send_iss_parameter(&self, on: bool) {
        self.shared.knobs().iss_parameter = on;
    }

    /// Signs ID tokens with this key family from now on.
    pub fn set_signing_alg(&self, alg: Alg) {
        self.shared.knobs().alg = alg;
    }

    /// Signs with a valid key of the current family whose `kid` is not in
    /// the JWKS until [`publish_rotated_key`](Self::publish_rotated_key).
    pub fn sign_with_unknown_kid(&self, on: bool) {
        self.shared.knobs().unknown_kid = on;
    }

    /// Passes every ID token a code exchange issues through `rewrite`
    /// (which may return anything at all); `None` stops it.
    pub fn set_id_token_rewrite(&self, rewrite: Option<IdTokenRewrite>) {
        *lock(&self.shared.id_token_rewrite) = rewrite;
    }

    /// Makes userinfo report `email` with no `email_verified` (the ID token
    /// keeps the account's own, verified); `None` restores the account's.
    pub fn set_userinfo_email(&self, email: Option<String>) {
        self.shared.knobs().userinfo_email = email;
    }

    /// Adds the rotated keys (all three families) to the JWKS, after the
    /// current ones.
    pub fn publish_rotated_key(&self) {
        self.shared.knobs().rotated_published = true;
    }

    /// The `kid` ID tokens carry now.
    pub fn signing_kid(&self) -> String {
        let knobs = self.shared.knobs().clone();
        self.shared
            .keys
            .pick(knobs.alg, knobs.unknown_kid)
            .kid
            .clone()
    }

    pub fn set_id_token_tamper(&self, tamper: Tamper) {
        self.shared.knobs().tamper = tamper;
    }

    /// The `max-age` of the JWKS `Cache-Control` (default 3600).
    pub fn set_jwks_max_age(&self, secs: u64) {
        self.shared.knobs().jwks_max_age = secs;
    }

    /// Whether discovery lists `code_challenge_methods_supported` (default
    /// yes). Without it, a PKCE challenge in the authorize URL or a verifier
    /// at `/token` is a violation (and ignored).
    pub fn set_pkce_advertised(&self, on: bool) {
        self.shared.knobs().pkce_advertised = on;
    }

    /// The `issuer` discovery claims; `None` (default): the base URL. Tokens
    /// keep the base URL as `iss`.
    pub fn set_discovery_issuer(&self, issuer: Option<String>) {
        self.shared.knobs().discovery_issuer = issuer;
    }

    /// Where discovery says the endpoints are (`{base}/token` …); `None`
    /// (default): the base URL. Nothing serves another base: for tests that
    /// stop at discovery.
    pub fn set_endpoints_base(&self, base: Option<String>) {
        self.shared.knobs().endpoints_base = base;
    }

    /// Requests to `/.well-known/openid-configuration` so far, faulted ones too.
    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Requests to `/oauth2/v3/certs` so far, faulted ones too.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Only the next `times` requests of `step` get `fault`.
    pub fn set_fault_times(&self, step: Step, fault: Fault, times: u32) {
        self.shared.core.faults.set_times(step, fault, times);
    }

    /// Every outstanding code is now older than ten minutes.
    pub fn expire_codes(&self) {
        self.shared.core.expire_codes();
    }

    /// The account behind `seed` (registered or not).
    pub fn user(&self, seed: &str) -> GoogleUser {
        self.shared.user(seed)
    }

    /// Changes a registered account (e.g. a new email, same `sub`); returns
    /// what authbroker must now report.
    pub fn update_user(
        &self,
        seed: &str,
        change: impl FnOnce(&mut GoogleUser),
    ) -> ExpectedIdentity {
        let mut users = lock(&self.shared.users);
        let user = users
            .entry(seed.to_owned())
            .or_insert_with(|| GoogleUser::from_seed(seed));
        change(user);
        user.expected()
    }

    /// An ID token as `/token` would issue it now, with every knob applied.
    pub fn id_token(&self, seed: &str, nonce: Option<&str>) -> String {
        self.shared.id_token(seed, nonce, None, &default_scopes())
    }
}

impl Emulator for GoogleEmulator {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    fn kind(&self) -> &'static str {
        "google"
    }

    fn provider_config(&self) -> ProviderConfig {
        provider_config(
            "google",
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
        let user = GoogleUser::from_seed(seed);
        let expected = user.expected();
        lock(&self.shared.users).insert(seed.to_owned(), user);
        expected
    }

    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let result = self.shared.approve(authorize_url, seed);
        if let Err(why) = &result {
            self.shared
                .core
                .violation(format!("GET {AUTHORIZE_PATH}: {why}"));
        }
        result
    }

    fn deny(&self, authorize_url: &str) -> Option<Vec<(String, String)>> {
        let mut back = vec![("error".to_owned(), "access_denied".to_owned())];
        if let Some((_, state)) = super::query_of(authorize_url)
            .into_iter()
            .find(|(k, _)| k == "state")
        {
            back.push(("state".into(), state));
        }
        Some(back)
    }

    fn set_numbers_as_strings(&self, on: bool) {
        self.shared.core.set_numbers_as_strings(on);
        self.shared.knobs().numbers_as_strings = on;
    }

    fn issue_tokens(&self, seed: &str) -> (String, Option<String>) {
        let (access, refresh) = self.shared.mint(seed, &default_scopes(), true);
        (access, refresh)
    }
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}

// ---------------------------------------------------------------------------
// State

/// Settings the knobs change; cloned out of the lock before use.
#[derive(Clone, Debug)]
struct Knobs {
    alg: Alg,
    unknown_kid: bool,
    rotated_published: bool,
    tamper: Tamper,
    jwks_max_age: u64,
    pkce_advertised: bool,
    discovery_issuer: Option<String>,
    endpoints_base: Option<String>,
    numbers_as_strings: bool,
    /// Userinfo reports this email, without `email_verified`.
    userinfo_email: Option<String>,
    /// An IdP enforcing the method it registered for the client (not
    /// Google): discovery lists only these, and `/token` and `/revoke`
    /// (RFC 7009 §2.1) accept only them.
    auth_methods: Option<Vec<&'static str>>,
    /// RFC 9207: discovery advertises `iss` and every callback carries it.
    iss_parameter: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            alg: Alg::Rs256,
            unknown_kid: false,
            rotated_published: false,
            tamper: Tamper::None,
            jwks_max_age: DEFAULT_JWKS_MAX_AGE,
            pkce_advertised: true,
            discovery_issuer: None,
            endpoints_base: None,
            numbers_as_strings: false,
            userinfo_email: None,
            auth_methods: None,
            iss_parameter: false,
        }
    }
}

/// Tokens issued together: revoking any of them revokes all (Google: "if
/// the token is an access token which has a corresponding refresh token,
/// the refresh token will also be revoked").
#[derive(Default)]
struct Grants {
    next: u64,
    of: HashMap<String, u64>,
    tokens: HashMap<u64, Vec<String>>,
}

/// Std mutexes: each is held for a lookup or an update, never across an `.await`.
struct Shared {
    core: Core,
    base_url: OnceLock<String>,
    keys: Keys,
    knobs: Mutex<Knobs>,
    users: Mutex<HashMap<String, GoogleUser>>,
    /// Codes whose authorize request had `access_type=offline`.
    offline_codes: Mutex<HashSet<String>>,
    grants: Mutex<Grants>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
    /// Rewrites the ID token a code exchange answers with (property tests).
    id_token_rewrite: Mutex<Option<IdTokenRewrite>>,
}

/// See [`GoogleEmulator::set_id_token_rewrite`].
pub type IdTokenRewrite = Arc<dyn Fn(&str) -> String + Send + Sync>;

impl Shared {
    fn new() -> Shared {
        Shared {
            core: Core::default(),
            base_url: OnceLock::new(),
            keys: Keys::load(),
            knobs: Mutex::new(Knobs::default()),
            users: Mutex::new(HashMap::new()),
            offline_codes: Mutex::new(HashSet::new()),
            grants: Mutex::new(Grants::default()),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
            id_token_rewrite: Mutex::new(None),
        }
    }

    fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        lock(&self.knobs)
    }

    fn base_url(&self) -> &str {
        self.base_url.get().map(String::as_str).unwrap_or_default()
    }

    fn user(&self, seed: &str) -> GoogleUser {
        lock(&self.users)
            .get(seed)
            .cloned()
            .unwrap_or_else(|| GoogleUser::from_seed(seed))
    }

    /// Access token, plus a refresh token when `offline`, all one grant.
    fn mint(&self, seed: &str, scopes: &[String], offline: bool) -> (String, Option<String>) {
        let access = new_access_token();
        self.core.store_access(&access, seed, scopes);
        let mut tokens = vec![access.clone()];
        let refresh = offline.then(|| {
            let refresh = random_token("1//0g", 98, TOKEN_ALPHABET);
            self.core.store_refresh(&refresh, seed, scopes);
            tokens.push(refresh.clone());
            refresh
        });
        let mut grants = lock(&self.grants);
        grants.next += 1;
        let id = grants.next;
        for t in &tokens {
            grants.of.insert(t.clone(), id);
        }
        grants.tokens.insert(id, tokens);
        (access, refresh)
    }

    /// A new access token in the grant of `refresh`.
    fn mint_refreshed(&self, refresh: &str, seed: &str, scopes: &[String]) -> String {
        let access = new_access_token();
        self.core.store_access(&access, seed, scopes);
        let mut grants = lock(&self.grants);
        if let Some(id) = grants.of.get(refresh).copied() {
            grants.of.insert(access.clone(), id);
            grants.tokens.entry(id).or_default().push(access.clone());
        }
        access
    }

    /// Revokes the whole grant `token` belongs to; false if unknown.
    fn revoke(&self, token: &str) -> bool {
        let mut grants = lock(&self.grants);
        let Some(id) = grants.of.remove(token) else {
            return false;
        };
        for t in grants.tokens.remove(&id).unwrap_or_default() {
            grants.of.remove(&t);
            self.core.revoke_access(&t);
            self.core.use_refresh(&t, true);
        }
        true
    }

    // -- browser step --------------------------------------------------------

    fn approve(&self, authorize_url: &str, seed: &str) -> Result<Vec<(String, String)>, String> {
        let url = Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
        if url.origin().ascii_serialization() != self.base_url() || url.path() != AUTHORIZE_PATH {
            return Err(format!(
                "authorize URL {}{} is not {}{AUTHORIZE_PATH} (from discovery)",
                url.origin().ascii_serialization(),
                url.path(),
                self.base_url()
            ));
        }
        if url.fragment().is_some() {
            return Err("the authorize URL has a fragment".into());
        }
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        let mut params: HashMap<&str, &str> = HashMap::new();
        for (k, v) in &pairs {
            if params.insert(k, v).is_some() {
                return Err(format!(
                    "Error 400: invalid_request: parameter {k} given twice"
                ));
            }
            if !AUTHORIZE_PARAMS.contains(&k.as_str()) {
                return Err(format!(
                    "Error 400: invalid_request: Parameter not allowed for this message type: {k}"
                ));
            }
        }
        let get = |name: &str| params.get(name).copied().filter(|v| !v.is_empty());
        match get("client_id") {
            Some(CLIENT_ID) => {}
            other => {
                return Err(format!(
                    "Error 401: invalid_client: The OAuth client was not found (client_id {other:?})"
                ));
            }
        }
        if get("response_type") != Some("code") {
            return Err(format!(
                "Error 400: invalid_request: response_type must be code, got {:?}",
                get("response_type")
            ));
        }
        let redirect_uri = get("redirect_uri")
            .ok_or("Error 400: invalid_request: Missing required parameter: redirect_uri")?;
        if redirect_uri != REDIRECT_URI {
            return Err(format!(
                "Error 400: redirect_uri_mismatch: {redirect_uri:?} is not the registered {REDIRECT_URI:?}"
            ));
        }
        let scope =
            get("scope").ok_or("Error 400: invalid_request: Missing required parameter: scope")?;
        if scope.contains(',') {
            return Err(format!(
                "Error 400: invalid_scope: scopes are space-separated, got {scope:?}"
            ));
        }
        let scopes: Vec<String> = scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = scopes.iter().find(|s| {
            !matches!(s.as_str(), "openid" | "email" | "profile")
                && !s.starts_with("https://www.googleapis.com/auth/")
        }) {
            return Err(format!(
                "Error 400: invalid_scope: Some requested scopes were invalid: {bad}"
            ));
        }
        if !scopes.iter().any(|s| s == "openid") {
            return Err(format!(
                "scope {scope:?} lacks openid: this is not an OIDC login"
            ));
        }
        let state = get("state").ok_or("state is missing (authbroker must send one)")?;
        let nonce = get("nonce").ok_or("nonce is missing (authbroker must send one)")?;
        let offline = match get("access_type") {
            None | Some("online") => false,
            Some("offline") => true,
            Some(other) => {
                return Err(format!(
                    "Error 400: invalid_request: Invalid access_type: {other}"
                ));
            }
        };
        if let Some(prompt) = get("prompt") {
            let values: Vec<&str> = prompt.split(' ').collect();
            if values
                .iter()
                .any(|p| !matches!(*p, "none" | "consent" | "select_account"))
                || (values.contains(&"none") && values.len() > 1)
            {
                return Err(format!(
                    "Error 400: invalid_request: Invalid prompt: {prompt}"
                ));
            }
        }
        let pkce_advertised = self.knobs().pkce_advertised;
        let challenge = match (get("code_challenge"), get("code_challenge_method")) {
            (None, None) if pkce_advertised => {
                return Err("no code_challenge although discovery advertises PKCE (S256)".into());
            }
            (None, None) => None,
            (Some(_), _) | (None, Some(_)) if !pkce_advertised => {
                // A provider without PKCE ignores it; the client should not send it.
                self.core.violation(format!(
                    "GET {AUTHORIZE_PATH}: PKCE parameters sent although discovery does not advertise code_challenge_methods_supported"
                ));
                None
            }
            (Some(c), Some("S256")) if c.len() == 43 && URL_SAFE_NO_PAD.decode(c).is_ok() => {
                Some(c.to_owned())
            }
            (Some(_), Some("S256")) => {
                return Err("Error 400: invalid_request: code_challenge is not a base64url SHA-256 (43 characters)".into());
            }
            (c, m) => {
                return Err(format!(
                    "PKCE must be code_challenge + code_challenge_method=S256, got challenge {:?} method {m:?}",
                    c.is_some()
                ));
            }
        };
        if !lock(&self.users).contains_key(seed) {
            return Err(format!(
                "no registered user for seed {seed:?} (call add_user)"
            ));
        }
        let mut grant = CodeGrant::redirected(seed, CLIENT_ID, redirect_uri, scopes.clone());
        grant.challenge = challenge;
        grant.nonce = Some(nonce.to_owned());
        // Codes look like `4/0AVMBsJ…`; the `/` must be percent-decoded by the client.
        let code = self
            .core
            .issue_code(random_token("4/0A", 70, TOKEN_ALPHABET), grant);
        if offline {
            lock(&self.offline_codes).insert(code.clone());
        }
        let mut back = vec![
            ("code".into(), code),
            ("state".into(), state.to_owned()),
            ("scope".into(), callback_scope(&scopes)),
            ("authuser".into(), "0".into()),
            ("prompt".into(), "consent".into()),
        ];
        if self.knobs().iss_parameter {
            back.push(("iss".into(), self.base_url().to_owned()));
        }
        Ok(back)
    }

    // -- /token --------------------------------------------------------------

    /// With [`GoogleEmulator::require_client_auth`]: the refusal of a
    /// request that does not authenticate by one of the registered methods
    /// (`Some(None)` when a valid client assertion authenticated it).
    fn refuse_method(
        &self,
        form: &Params,
        basic: &Option<(String, String)>,
    ) -> Option<Option<Response>> {
        let methods = self.knobs().auth_methods.clone()?;
        let method = if basic.is_some() {
            "client_secret_basic"
        } else if form.get("client_assertion").is_some() {
            "private_key_jwt"
        } else if form.get("client_secret").is_some() {
            "client_secret_post"
        } else {
            "none"
        };
        if !methods.contains(&method) {
            return Some(Some(google_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                &format!("client authentication {method} is not the registered method"),
            )));
        }
        if method != "private_key_jwt" {
            return None;
        }
        // RFC 7523 §3: signed by the client's registered key, about the
        // client, for this server's token endpoint.
        let jwks: Value = serde_json::from_str(JWKS_JSON).expect("keys/jwks.json");
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["rsa"].clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        validation.set_audience(&[format!("{}{TOKEN_PATH}", self.base_url())]);
        validation.set_issuer(&[CLIENT_ID]);
        validation.sub = Some(CLIENT_ID.into());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let ok = form.get("client_assertion_type")
            == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            && jsonwebtoken::decode::<Value>(
                form.get("client_assertion").unwrap_or_default(),
                &key,
                &validation,
            )
            .is_ok_and(|t| t.claims["jti"].is_string());
        Some((!ok).then(|| {
            google_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "invalid client assertion",
            )
        }))
    }

    /// Google's refusal when the request does not authenticate as the client.
    fn refuse_client(&self, form: &Params, basic: Option<(String, String)>) -> Option<Response> {
        match self.refuse_method(form, &basic) {
            Some(Some(refused)) => return Some(refused),
            Some(None) => return None,
            None => {}
        }
        let (id, secret) = match basic {
            Some((id, secret)) => (Some(id), Some(secret)),
            None => (
                form.get("client_id").map(str::to_owned),
                form.get("client_secret").map(str::to_owned),
            ),
        };
        let Some(id) = id else {
            return Some(google_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Could not determine client ID from request.",
            ));
        };
        if id != CLIENT_ID || secret.as_deref() != Some(CLIENT_SECRET) {
            return Some(google_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "Unauthorized",
            ));
        }
        None
    }

    fn exchange_code(&self, form: &Params, basic: Option<(String, String)>) -> Response {
        if let Some(refused) = self.refuse_client(form, basic) {
            return refused;
        }
        let Some(code) = form.get("code") else {
            return google_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: code",
            );
        };
        let offline = lock(&self.offline_codes).remove(code);
        let Some(grant) = self.core.redeem_code(code) else {
            return google_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad Request");
        };
        if grant.redirect_uri.as_deref() != form.get("redirect_uri") {
            return google_error(
                StatusCode::BAD_REQUEST,
                "redirect_uri_mismatch",
                "Bad Request",
            );
        }
        let verifier = form.get("code_verifier");
        match (&grant.challenge, verifier) {
            (Some(_), None) => {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Missing code verifier.",
                );
            }
            (Some(_), Some(_)) if !grant.pkce_ok(verifier) => {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid code verifier.",
                );
            }
            (None, Some(_)) => self.core.violation(format!(
                "POST {TOKEN_PATH}: code_verifier sent for a code issued without code_challenge"
            )),
            _ => {}
        }
        let (access, refresh) = self.mint(&grant.seed, &grant.scopes, offline);
        let mut id_token = self.id_token(
            &grant.seed,
            grant.nonce.as_deref(),
            Some(&access),
            &grant.scopes,
        );
        if let Some(rewrite) = lock(&self.id_token_rewrite).clone() {
            id_token = rewrite(&id_token);
        }
        self.token_response(&access, refresh.as_deref(), &grant.scopes, Some(&id_token))
    }

    fn refresh(&self, form: &Params, basic: Option<(String, String)>) -> Response {
        if let Some(refused) = self.refuse_client(form, basic) {
            return refused;
        }
        let Some(refresh) = form.get("refresh_token") else {
            return google_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: refresh_token",
            );
        };
        let Some(grant) = self.core.use_refresh(refresh, false) else {
            return google_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad Request");
        };
        let access = self.mint_refreshed(refresh, &grant.seed, &grant.scopes);
        // Refreshed ID tokens carry no nonce (OIDC Core §12.2).
        let id_token = grant
            .scopes
            .iter()
            .any(|s| s == "openid")
            .then(|| self.id_token(&grant.seed, None, Some(&access), &grant.scopes));
        self.token_response(&access, None, &grant.scopes, id_token.as_deref())
    }

    /// Google's key order: access_token, expires_in, refresh_token, scope,
    /// token_type, id_token.
    fn token_response(
        &self,
        access: &str,
        refresh: Option<&str>,
        scopes: &[String],
        id_token: Option<&str>,
    ) -> Response {
        let mut fields = vec![
            ("access_token", Value::from(access)),
            ("expires_in", self.core.number(EXPIRES_IN)),
        ];
        if let Some(refresh) = refresh {
            fields.push(("refresh_token", Value::from(refresh)));
        }
        fields.push(("scope", Value::from(granted_scope(scopes))));
        fields.push(("token_type", Value::from("Bearer")));
        if let Some(id_token) = id_token {
            fields.push(("id_token", Value::from(id_token)));
        }
        json_response(StatusCode::OK, ordered(&fields))
    }

    // -- ID tokens -----------------------------------------------------------

    fn id_token(
        &self,
        seed: &str,
        nonce: Option<&str>,
        access_token: Option<&str>,
        scopes: &[String],
    ) -> String {
        let knobs = self.knobs().clone();
        let user = self.user(seed);
        let tamper = knobs.tamper;
        let now = unix_now();
        let (iat, exp) = match tamper {
            Tamper::Expired => (now - 600 - ID_TOKEN_TTL, now - 600),
            Tamper::IssuedInFuture => (now + 600, now + 600 + ID_TOKEN_TTL),
            _ => (now, now + ID_TOKEN_TTL),
        };
        let iss = match tamper {
            Tamper::WrongIssuer => WRONG_ISSUER,
            Tamper::LegacyIssuer => LEGACY_ISSUER,
            _ => self.base_url(),
        };
        let (aud, azp) = match tamper {
            Tamper::WrongAudience => (json!(OTHER_CLIENT_ID), Some(OTHER_CLIENT_ID)),
            Tamper::ExtraAudienceWithoutAzp => (json!([CLIENT_ID, OTHER_CLIENT_ID]), None),
            Tamper::ExtraAudienceWithAzp => (json!([CLIENT_ID, OTHER_CLIENT_ID]), Some(CLIENT_ID)),
            Tamper::WrongAzp => (json!(CLIENT_ID), Some(OTHER_CLIENT_ID)),
            _ => (json!(CLIENT_ID), Some(CLIENT_ID)),
        };
        let nonce = match tamper {
            Tamper::MissingNonce => None,
            Tamper::WrongNonce if nonce == Some(WRONG_NONCE) => Some(format!("x{WRONG_NONCE}")),
            Tamper::WrongNonce => Some(WRONG_NONCE.to_owned()),
            _ => nonce.map(str::to_owned),
        };
        let has = |short: &str, long: &str| scopes.iter().any(|s| s == short || s == long);
        let mut claims = serde_json::Map::new();
        claims.insert("iss".into(), iss.into());
        if let Some(azp) = azp {
            claims.insert("azp".into(), azp.into());
        }
        claims.insert("aud".into(), aud);
        claims.insert("sub".into(), user.sub.clone().into());
        if has("email", EMAIL_SCOPE_URL) {
            claims.insert("email".into(), user.email.clone().into());
            let verified = match tamper {
                Tamper::EmailUnverified => json!(false),
                Tamper::EmailVerifiedString => json!("true"),
                _ if knobs.numbers_as_strings => json!("true"),
                _ => json!(true),
            };
            claims.insert("email_verified".into(), verified);
        }
        // at_hash hashes with the signature's SHA-2; EdDSA has no agreed one, so none.
        if let Some(access) = access_token
            && knobs.alg != Alg::EdDsa
        {
            let digest = Sha256::digest(access.as_bytes());
            claims.insert(
                "at_hash".into(),
                URL_SAFE_NO_PAD.encode(&digest[..16]).into(),
            );
        }
        if let Some(nonce) = nonce {
            claims.insert("nonce".into(), nonce.into());
        }
        if has("profile", PROFILE_SCOPE_URL) {
            claims.insert("name".into(), user.name.clone().into());
            claims.insert("picture".into(), user.picture.clone().into());
            claims.insert("given_name".into(), user.given_name.clone().into());
            claims.insert("family_name".into(), user.family_name.clone().into());
        }
        claims.insert("iat".into(), iat.into());
        claims.insert("exp".into(), exp.into());

        if tamper == Tamper::AlgNone {
            let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
            let payload = URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string());
            return format!("{header}.{payload}.");
        }
        let key = self.keys.pick(knobs.alg, knobs.unknown_kid);
        let mut header = Header::new(key.algorithm);
        header.kid = Some(key.kid.clone());
        let jwt = jsonwebtoken::encode(&header, &claims, &key.key).expect("sign an ID token");
        if tamper == Tamper::BadSignature {
            flip_signature(&jwt)
        } else {
            jwt
        }
    }

    // -- discovery -----------------------------------------------------------

    fn discovery_document(&self) -> String {
        let knobs = self.knobs().clone();
        let base = self.base_url();
        let issuer = knobs.discovery_issuer.unwrap_or_else(|| base.to_owned());
        let base = knobs.endpoints_base.as_deref().unwrap_or(base);
        let mut fields = vec![
            ("issuer", json!(issuer)),
            (
                "authorization_endpoint",
                json!(format!("{base}{AUTHORIZE_PATH}")),
            ),
            (
                "device_authorization_endpoint",
                json!(format!("{base}/device/code")),
            ),
            ("token_endpoint", json!(format!("{base}{TOKEN_PATH}"))),
            ("userinfo_endpoint", json!(format!("{base}{USERINFO_PATH}"))),
            ("revocation_endpoint", json!(format!("{base}{REVOKE_PATH}"))),
            ("jwks_uri", json!(format!("{base}{JWKS_PATH}"))),
            (
                "response_types_supported",
                json!([
                    "code",
                    "token",
                    "id_token",
                    "code token",
                    "code id_token",
                    "token id_token",
                    "code token id_token",
                    "none"
                ]),
            ),
            ("subject_types_supported", json!(["public"])),
            // Google lists RS256 only; the emulator signs with all three.
            (
                "id_token_signing_alg_values_supported",
                json!(["RS256", "ES256", "EdDSA"]),
            ),
            ("scopes_supported", json!(["openid", "email", "profile"])),
            (
                "token_endpoint_auth_methods_supported",
                match &knobs.auth_methods {
                    Some(methods) => json!(methods),
                    None => json!(["client_secret_post", "client_secret_basic"]),
                },
            ),
            (
                "claims_supported",
                json!([
                    "aud",
                    "email",
                    "email_verified",
                    "exp",
                    "family_name",
                    "given_name",
                    "iat",
                    "iss",
                    "locale",
                    "name",
                    "picture",
                    "sub"
                ]),
            ),
        ];
        if knobs.pkce_advertised {
            fields.push(("code_challenge_methods_supported", json!(["plain", "S256"])));
        }
        if knobs.iss_parameter {
            fields.push((
                "authorization_response_iss_parameter_supported",
                json!(true),
            ));
        }
        fields.push((
            "grant_types_supported",
            json!([
                "authorization_code",
                "refresh_token",
                "urn:ietf:params:oauth:grant-type:device_code",
                "urn:ietf:params:oauth:grant-type:jwt-bearer"
            ]),
        ));
        ordered(&fields)
    }

    fn jwks_document(&self) -> (String, u64) {
        let knobs = self.knobs().clone();
        let mut keys: Vec<Value> = self.keys.current.iter().map(|k| k.jwk.clone()).collect();
        if knobs.rotated_published {
            keys.extend(self.keys.rotated.iter().map(|k| k.jwk.clone()));
        }
        let body = serde_json::to_string_pretty(&json!({ "keys": keys })).unwrap_or_default();
        (body, knobs.jwks_max_age)
    }
}

// ---------------------------------------------------------------------------
// Keys

pub(super) struct SigningKey {
    pub(super) kid: String,
    pub(super) algorithm: Algorithm,
    pub(super) key: EncodingKey,
    /// The public JWK, as published.
    pub(super) jwk: Value,
}

/// Indexed by [`Alg::index`]: the published keys and the rotated ones.
/// Other OIDC emulators (GitLab) sign with the same fixtures.
pub(super) struct Keys {
    current: [SigningKey; 3],
    rotated: [SigningKey; 3],
}

const JWKS_JSON: &str = include_str!("../keys/jwks.json");

impl Keys {
    pub(super) fn load() -> Keys {
        let jwks: Value = serde_json::from_str(JWKS_JSON).expect("keys/jwks.json");
        let key = |name: &str, pem: &str, alg: Alg| {
            let jwk = jwks[name].clone();
            let key = match alg {
                Alg::Rs256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
                Alg::Es256 => EncodingKey::from_ec_pem(pem.as_bytes()),
                Alg::EdDsa => EncodingKey::from_ed_pem(pem.as_bytes()),
            }
            .unwrap_or_else(|e| panic!("fixture key {name}: {e}"));
            SigningKey {
                kid: jwk["kid"].as_str().expect("a kid").to_owned(),
                algorithm: alg.algorithm(),
                key,
                jwk,
            }
        };
        Keys {
            current: [
                key("rsa", include_str!("../keys/rsa.pem"), Alg::Rs256),
                key("ec", include_str!("../keys/ec.pem"), Alg::Es256),
                key("ed25519", include_str!("../keys/ed25519.pem"), Alg::EdDsa),
            ],
            rotated: [
                key(
                    "rsa_rotated",
                    include_str!("../keys/rsa_rotated.pem"),
                    Alg::Rs256,
                ),
                key(
                    "ec_rotated",
                    include_str!("../keys/ec_rotated.pem"),
                    Alg::Es256,
                ),
                key(
                    "ed25519_rotated",
                    include_str!("../keys/ed25519_rotated.pem"),
                    Alg::EdDsa,
                ),
            ],
        }
    }

    pub(super) fn pick(&self, alg: Alg, rotated: bool) -> &SigningKey {
        if rotated {
            &self.rotated[alg.index()]
        } else {
            &self.current[alg.index()]
        }
    }
}

fn flip_signature(jwt: &str) -> String {
    let (signed, signature) = jwt.rsplit_once('.').expect("a JWS");
    let mut bytes = URL_SAFE_NO_PAD
        .decode(signature)
        .expect("base64url signature");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(bytes))
}

// ---------------------------------------------------------------------------
// Handlers

/// Query or body parameters, in order.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn duplicate(&self) -> Option<&str> {
        let mut seen = HashSet::new();
        self.0
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|k| !seen.insert(*k))
    }
}

/// Answers a request of `step`: a fault if one is armed, else `normal()`;
/// records the request with the status sent. A request that is never
/// answered (`Hang`, `CloseConnection`) is recorded on arrival, status 0.
async fn answer(
    shared: &Shared,
    step: Step,
    mut seen: SeenRequest,
    normal: impl FnOnce() -> Response,
) -> Response {
    let unanswered = matches!(
        shared.core.faults.get(step),
        Some(Fault::Hang | Fault::CloseConnection)
    );
    if unanswered {
        shared.core.record(seen.clone());
    }
    let response = match shared.core.faults.apply(step).await {
        Some(response) => response,
        None => normal(),
    };
    if !unanswered {
        seen.status = response.status().as_u16();
        shared.core.record(seen);
    }
    response
}

async fn discovery(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let seen = seen_with(Step::Discovery, &method, uri.path(), &headers, Vec::new());
    if method != Method::GET {
        shared
            .core
            .violation(format!("{method} {DISCOVERY_PATH}: discovery takes GET"));
    }
    answer(&shared, Step::Discovery, seen, || {
        cacheable_json(shared.discovery_document(), "public, max-age=3600")
    })
    .await
}

async fn jwks(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let seen = seen_with(Step::Discovery, &method, uri.path(), &headers, Vec::new());
    if method != Method::GET {
        shared
            .core
            .violation(format!("{method} {JWKS_PATH}: the JWKS takes GET"));
    }
    answer(&shared, Step::Discovery, seen, || {
        let (body, max_age) = shared.jwks_document();
        cacheable_json(
            body,
            &format!("public, max-age={max_age}, must-revalidate, no-transform"),
        )
    })
    .await
}

async fn token(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header_str(&headers, header::CONTENT_TYPE).unwrap_or_default();
    let is_form = content_type.starts_with("application/x-www-form-urlencoded");
    let query = query_params(&uri);
    let form = Params(if is_form {
        form_urlencoded::parse(&body).into_owned().collect()
    } else {
        Vec::new()
    });
    let basic = basic_credentials(&headers);
    let refresh_grant = form.get("grant_type") == Some("refresh_token");
    let step = if refresh_grant {
        Step::Refresh
    } else {
        Step::Token
    };
    let seen = seen_with(
        step,
        &method,
        uri.path(),
        &headers,
        query.iter().chain(&form.0).cloned().collect(),
    );

    let refusal = if method != Method::POST {
        Some(format!("{TOKEN_PATH} takes POST, not {method}"))
    } else if !is_form {
        Some(format!(
            "{TOKEN_PATH} takes application/x-www-form-urlencoded, not {content_type:?}"
        ))
    } else if !query.is_empty() {
        Some("parameters (credentials!) sent in the query string".into())
    } else {
        form.duplicate()
            .map(|k| format!("parameter {k} sent twice"))
    };
    if let Some(why) = &refusal {
        shared
            .core
            .violation(format!("{method} {TOKEN_PATH}: {why}"));
    }
    if basic.is_some() && form.get("client_secret").is_some() {
        shared.core.violation(format!(
            "POST {TOKEN_PATH}: client authenticated twice (Basic and client_secret), RFC 6749 §2.3"
        ));
    }
    answer(&shared, step, seen, || {
        if refusal.is_some() {
            return google_error(StatusCode::BAD_REQUEST, "invalid_request", "Bad Request");
        }
        match form.get("grant_type") {
            Some("authorization_code") => shared.exchange_code(&form, basic),
            Some("refresh_token") => shared.refresh(&form, basic),
            other => google_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {}", other.unwrap_or_default()),
            ),
        }
    })
    .await
}

async fn userinfo(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let query = query_params(&uri);
    let seen = seen_with(Step::Identity, &method, uri.path(), &headers, query.clone());
    if method != Method::GET && method != Method::POST {
        shared
            .core
            .violation(format!("{method} {USERINFO_PATH}: userinfo takes GET"));
    }
    if query.iter().any(|(k, _)| k == "access_token") {
        shared.core.violation(format!(
            "{method} {USERINFO_PATH}: access_token in the query string; use Authorization: Bearer"
        ));
    }
    answer(&shared, Step::Identity, seen, || {
        let token = header_str(&headers, header::AUTHORIZATION)
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let Some(grant) = token.and_then(|t| shared.core.access_grant(t)) else {
            let mut response = google_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "Invalid Credentials",
            );
            set_header(&mut response, header::WWW_AUTHENTICATE, USERINFO_CHALLENGE);
            return response;
        };
        let user = shared.user(&grant.seed);
        let has = |short: &str, long: &str| grant.scopes.iter().any(|s| s == short || s == long);
        let mut fields = vec![("sub", json!(user.sub))];
        if has("profile", PROFILE_SCOPE_URL) {
            fields.push(("name", json!(user.name)));
            fields.push(("given_name", json!(user.given_name)));
            fields.push(("family_name", json!(user.family_name)));
            fields.push(("picture", json!(user.picture)));
        }
        let userinfo_email = shared.knobs().userinfo_email.clone();
        if has("email", EMAIL_SCOPE_URL) {
            if let Some(email) = userinfo_email {
                fields.push(("email", json!(email)));
            } else {
                fields.push(("email", json!(user.email)));
                let verified = shared.knobs().tamper != Tamper::EmailUnverified;
                fields.push(("email_verified", json!(verified)));
            }
        }
        if has("profile", PROFILE_SCOPE_URL) {
            fields.push(("locale", json!("en")));
        }
        json_response(StatusCode::OK, ordered(&fields))
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
    let content_type = header_str(&headers, header::CONTENT_TYPE).unwrap_or_default();
    let query = query_params(&uri);
    let mut params = query.clone();
    if content_type.starts_with("application/x-www-form-urlencoded") {
        params.extend(form_urlencoded::parse(&body).into_owned());
    } else if !body.is_empty() {
        shared.core.violation(format!(
            "{method} {REVOKE_PATH}: body is {content_type:?}, not a form"
        ));
    }
    let params = Params(params);
    let seen = seen_with(
        Step::Revoke,
        &method,
        uri.path(),
        &headers,
        params.0.clone(),
    );
    if method != Method::POST {
        shared
            .core
            .violation(format!("{method} {REVOKE_PATH}: revocation takes POST"));
    }
    let basic = basic_credentials(&headers);
    answer(&shared, Step::Revoke, seen, || {
        if shared.knobs().auth_methods.is_some()
            && let Some(refused) = shared.refuse_client(&params, basic)
        {
            return refused;
        }
        let Some(token) = params.get("token") else {
            return google_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: token",
            );
        };
        if shared.revoke(token) {
            json_response(StatusCode::OK, "{}".into())
        } else {
            google_error(
                StatusCode::BAD_REQUEST,
                "invalid_token",
                "Token expired or revoked",
            )
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Wire helpers

/// Google's answers are pretty-printed JSON with its own key order.
fn ordered(fields: &[(&str, Value)]) -> String {
    if fields.is_empty() {
        return "{}".into();
    }
    let lines: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("  {}: {v}", Value::from(*k)))
        .collect();
    format!("{{\n{}\n}}", lines.join(",\n"))
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, JSON_UTF8),
            (
                header::CACHE_CONTROL,
                "no-cache, no-store, max-age=0, must-revalidate",
            ),
            (header::PRAGMA, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn google_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        ordered(&[
            ("error", json!(error)),
            ("error_description", json!(description)),
        ]),
    )
}

fn set_header(response: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// A public, cacheable JSON document (discovery, JWKS).
fn cacheable_json(body: String, cache_control: &str) -> Response {
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, JSON_UTF8)], body).into_response();
    set_header(&mut response, header::CACHE_CONTROL, cache_control);
    response
}

/// The `scope` of a token answer: `openid`, then the URL forms of `email`
/// and `profile`, then anything else requested.
fn granted_scope(scopes: &[String]) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut push = |s: &'static str| {
        if !out.contains(&s) {
            out.push(s);
        }
    };
    let has = |name: &str| scopes.iter().any(|s| s == name);
    if has("openid") {
        push("openid");
    }
    if has("email") || has(EMAIL_SCOPE_URL) {
        push(EMAIL_SCOPE_URL);
    }
    if has("profile") || has(PROFILE_SCOPE_URL) {
        push(PROFILE_SCOPE_URL);
    }
    let mut out: Vec<String> = out.into_iter().map(str::to_owned).collect();
    for s in scopes {
        if !matches!(s.as_str(), "openid" | "email" | "profile")
            && s != EMAIL_SCOPE_URL
            && s != PROFILE_SCOPE_URL
            && !out.contains(s)
        {
            out.push(s.clone());
        }
    }
    out.join(" ")
}

/// The `scope` Google appends to the callback: short names, their URL
/// forms, other scopes, `openid` last.
fn callback_scope(scopes: &[String]) -> String {
    let has = |name: &str| scopes.iter().any(|s| s == name);
    let mut out: Vec<String> = Vec::new();
    let email = has("email") || has(EMAIL_SCOPE_URL);
    let profile = has("profile") || has(PROFILE_SCOPE_URL);
    if email {
        out.push("email".into());
    }
    if profile {
        out.push("profile".into());
        out.push(PROFILE_SCOPE_URL.into());
    }
    if email {
        out.push(EMAIL_SCOPE_URL.into());
    }
    for s in scopes {
        if !matches!(s.as_str(), "openid" | "email" | "profile")
            && s != EMAIL_SCOPE_URL
            && s != PROFILE_SCOPE_URL
            && !out.contains(s)
        {
            out.push(s.clone());
        }
    }
    out.push("openid".into());
    out.join(" ")
}

fn new_access_token() -> String {
    random_token("ya29.a0AfB_by", 150, TOKEN_ALPHABET)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
