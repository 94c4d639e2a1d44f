//! OpenID Connect: what data alone cannot say. Endpoints come from discovery
//! (`{issuer}/.well-known/openid-configuration`, cached); the ID token is
//! verified against the issuer's JWKS (cached for its `max-age`, refetched
//! once, rate-limited, on an unknown `kid`); the code exchange, userinfo and
//! refresh then run through the same spec engine as every other provider.
//! Wire format and known gaps: docs/providers.md#oidc.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};
use moka::{Expiry, future::Cache};
use reqwest::{Method, header};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use url::Url;

use super::{
    AuthorizeParams, CallbackParams, Provider, ProviderError, ProviderInfo, Refresh, Revoke,
    TokenSet, Unavailable, body,
    claims::ClaimMapping,
    client_auth::{ClientKey, TokenAuth},
    engine::{SpecParts, SpecProvider},
    signed_secret::{SignedSecret, SignedSecretSpec},
    spec::{
        AuthorizeSpec, ErrorSpec, FieldRef, IdentitySpec, Part, Paths, ProviderSpec, RequestAuth,
        RequestSpec, RevokeMethod, RevokeSpec, Template, TokenSpec,
    },
    tenant::TenantIssuer,
};
use crate::{
    domain::Identity,
    http::{HttpClient, in_clear_off_loopback},
    state::PendingLogin,
};

/// An OIDC preset file (`providers/google.toml`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSpec {
    pub display_name: String,
    pub issuer: String,
    /// Other `iss` values this issuer's tokens legitimately carry.
    #[serde(default)]
    pub issuer_aliases: Vec<String>,
    #[serde(default = "openid_scopes")]
    pub default_scopes: Vec<String>,
    /// Extra fixed authorize parameters.
    #[serde(default)]
    pub authorize_params: BTreeMap<String, String>,
    /// Settings config gives under `options`, with their defaults (`""`:
    /// config must set it); `{name}` in `issuer` is replaced by the value.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// One server, many tenant issuers (Entra): how discovery and ID
    /// tokens name the tenant.
    #[serde(default)]
    pub tenant_issuer: Option<TenantIssuer>,
    /// Where the identity comes from, where OIDC's defaults do not fit.
    #[serde(default)]
    pub claims: ClaimMapping,
    /// The client secret is a JWT the client signs with its key (Apple).
    #[serde(default)]
    pub client_secret_jwt: Option<SignedSecretSpec>,
    /// Callback `error` values that mean "the user said no", besides
    /// `access_denied` (Apple's `user_cancelled_authorize`).
    #[serde(default)]
    pub denied: Vec<String>,
}

fn openid_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}

/// Endpoint keys an OIDC provider accepts under `[providers.NAME.endpoints]`;
/// all but `issuer` override what discovery says.
pub const ENDPOINT_KEYS: &[&str] = &[
    "issuer",
    "authorize_url",
    "token_url",
    "userinfo_url",
    "jwks_uri",
    "revoke_url",
];

/// Clock skew tolerated on `exp` and `iat`.
const LEEWAY: Duration = Duration::from_secs(60);
/// How long discovery is trusted.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// JWKS lifetime bounds: honour `max-age`, within reason.
const JWKS_MIN_TTL: Duration = Duration::from_secs(60);
const JWKS_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
const JWKS_DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// An unknown `kid` forces a JWKS refetch at most this often, so forged
/// tokens cannot make us hammer the provider.
const KID_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
const ALGORITHMS: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// What one OIDC provider is configured with.
pub struct OidcConfig {
    pub info: ProviderInfo,
    pub issuer: String,
    pub issuer_aliases: Vec<String>,
    pub overrides: BTreeMap<String, Url>,
    pub authorize_params: BTreeMap<String, String>,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Config's `token_auth`; `None` follows discovery (Basic first).
    pub token_auth: Option<TokenAuth>,
    pub client_key: Option<ClientKey>,
    pub fetch_userinfo: bool,
    /// Accept `http://` endpoints off loopback from discovery.
    pub allow_insecure_http: bool,
    pub http: HttpClient,
    pub tenant_issuer: Option<TenantIssuer>,
    pub claims: ClaimMapping,
    /// Mints the client secret, instead of `client_secret`.
    pub signed_secret: Option<Arc<SignedSecret>>,
}

pub struct OidcProvider {
    config: OidcConfig,
    discovery: Cache<(), Arc<Discovered>>,
    jwks: Cache<(), Arc<Jwks>>,
    last_forced_refetch: Mutex<Option<Instant>>,
}

/// Discovery's answer, turned into an engine.
struct Discovered {
    engine: SpecProvider,
    /// The issuer discovery names: ID tokens are checked against it.
    issuer: String,
    /// When the minted client secret the engine holds is half-way through
    /// its life, and the engine is rebuilt with a fresh one.
    secret_renew_at: Option<Instant>,
    jwks_uri: Url,
    /// RFC 9207: the issuer promises `iss` on every callback.
    iss_parameter: bool,
}

/// A fetched key set and how long it may be trusted.
struct Jwks {
    set: JwkSet,
    ttl: Duration,
}

struct JwksExpiry;

impl Expiry<(), Arc<Jwks>> for JwksExpiry {
    fn expire_after_create(&self, _: &(), v: &Arc<Jwks>, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }
}

#[derive(Deserialize)]
struct DiscoveryDoc {
    issuer: String,
    authorization_endpoint: Url,
    token_endpoint: Url,
    jwks_uri: Url,
    #[serde(default)]
    userinfo_endpoint: Option<Url>,
    #[serde(default)]
    revocation_endpoint: Option<Url>,
    #[serde(default)]
    code_challenge_methods_supported: Vec<String>,
    #[serde(default)]
    grant_types_supported: Option<Vec<String>>,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

/// Parses `doc:/pointer` literals of this module; each is checked by a test.
fn paths(items: &[&str]) -> Paths {
    Paths(items.iter().filter_map(|s| s.parse().ok()).collect())
}

/// `max-age=N` from a Cache-Control header.
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|d| {
        d.trim()
            .strip_prefix("max-age=")
            .and_then(|n| n.trim().parse().ok())
            .map(Duration::from_secs)
    })
}

/// Identity mapping for OIDC: claims from the verified ID token, with
/// userinfo (when fetched) taking precedence for profile fields.
fn identity_mapping() -> IdentitySpec {
    IdentitySpec {
        subject: paths(&["id_token:/sub"]),
        subject_by_option: BTreeMap::new(),
        union_id: Paths::default(),
        username: paths(&[
            "userinfo:/preferred_username",
            "id_token:/preferred_username",
        ]),
        display_name: paths(&["userinfo:/name", "id_token:/name"]),
        avatar_url: paths(&["userinfo:/picture", "id_token:/picture"]),
        email: paths(&["userinfo:/email", "id_token:/email"]),
        email_verified: paths(&["userinfo:/email_verified", "id_token:/email_verified"]),
        email_list: None,
    }
}

impl OidcProvider {
    pub fn new(config: OidcConfig) -> Self {
        OidcProvider {
            config,
            discovery: Cache::builder()
                .max_capacity(1)
                .time_to_live(DISCOVERY_TTL)
                .build(),
            jwks: Cache::builder()
                .max_capacity(1)
                .expire_after(JwksExpiry)
                .build(),
            last_forced_refetch: Mutex::new(None),
        }
    }

    fn name(&self) -> String {
        self.config.info.name.to_string()
    }

    fn bad(&self, step: &str, what: impl Into<String>) -> ProviderError {
        ProviderError::BadResponse {
            provider: self.name(),
            step: step.into(),
            what: what.into(),
        }
    }

    fn invalid(&self, why: impl Into<String>) -> ProviderError {
        ProviderError::InvalidIdToken {
            provider: self.name(),
            why: why.into(),
        }
    }

    /// Discovery, fetched once per TTL; concurrent first callers share one
    /// fetch (moka's `try_get_with` coalesces them).
    async fn discovered(&self) -> Result<Arc<Discovered>, ProviderError> {
        let found = self
            .discovery
            .try_get_with((), self.discover())
            .await
            .map_err(|e| (*e).clone())?;
        if found.secret_renew_at.is_some_and(|at| Instant::now() >= at) {
            self.discovery.invalidate(&()).await;
            return self
                .discovery
                .try_get_with((), self.discover())
                .await
                .map_err(|e| (*e).clone());
        }
        Ok(found)
    }

    /// The client secret for the engine: the configured one, or one minted
    /// now (and when it should be re-minted).
    fn client_secret(&self) -> Result<(SecretString, Option<Instant>), ProviderError> {
        match &self.config.signed_secret {
            None => Ok((self.config.client_secret.clone(), None)),
            Some(signer) => signer
                .current()
                .map(|(secret, renew_at)| (secret, Some(renew_at)))
                .map_err(|why| self.bad("token", format!("client secret: {why}"))),
        }
    }

    async fn fetch_json(
        &self,
        step: &str,
        url: Url,
    ) -> Result<(Value, Option<Duration>), ProviderError> {
        let name = &self.config.info.name;
        super::observe::request(name, step, self.fetch_json_untimed(step, url)).await
    }

    async fn fetch_json_untimed(
        &self,
        step: &str,
        url: Url,
    ) -> Result<(Value, Option<Duration>), ProviderError> {
        let answer = self
            .config
            .http
            .send(self.config.http.request(Method::GET, url))
            .await
            .map_err(|e| ProviderError::from_http(&self.config.info.name, step, e))?;
        if answer.status.is_server_error() {
            return Err(ProviderError::Unavailable {
                provider: self.name(),
                step: step.into(),
                cause: Unavailable::Status(answer.status.as_u16()),
            });
        }
        if !answer.status.is_success() {
            return Err(self.bad(step, format!("HTTP {}", answer.status.as_u16())));
        }
        let max_age = answer
            .headers
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let doc = body::parse(&answer.body).ok_or_else(|| self.bad(step, "answer is not JSON"))?;
        Ok((doc, max_age))
    }

    /// The discovery document, checked to name the issuer we asked.
    async fn discovery_doc(&self) -> Result<DiscoveryDoc, ProviderError> {
        let base = self.config.issuer.trim_end_matches('/');
        let url = Url::parse(&format!("{base}/.well-known/openid-configuration"))
            .map_err(|_| self.bad("discovery", "the issuer is not a URL"))?;
        let (doc, _) = self.fetch_json("discovery", url).await?;
        let doc: DiscoveryDoc = serde_json::from_value(doc)
            .map_err(|e| self.bad("discovery", format!("discovery document: {e}")))?;
        // OIDC Discovery §4.3: the document must name the issuer we asked
        // (or, for a multi-tenant issuer, that issuer's template).
        let tenant_ok = |t: &TenantIssuer| t.accepts_discovery(base, &doc.issuer);
        if doc.issuer.trim_end_matches('/') != base
            && !self.config.tenant_issuer.as_ref().is_some_and(tenant_ok)
        {
            return Err(self.bad(
                "discovery",
                "the discovery document names a different issuer",
            ));
        }
        Ok(doc)
    }

    /// The token endpoint authentication in force: config's, else the
    /// first of Basic, post (and private_key_jwt with a key) discovery
    /// lists.
    fn token_auth(&self, doc: &DiscoveryDoc) -> TokenAuth {
        self.config.token_auth.unwrap_or_else(|| {
            TokenAuth::from_discovery(
                doc.token_endpoint_auth_methods_supported.as_deref(),
                self.config.client_key.is_some(),
            )
        })
    }

    async fn discover(&self) -> Result<Arc<Discovered>, ProviderError> {
        let c = &self.config;
        let doc = self.discovery_doc().await?;
        let (client_secret, secret_renew_at) = self.client_secret()?;
        let issuer = doc.issuer.trim_end_matches('/').to_string();
        if let Some(refused) = self.endpoints_in_clear(&doc).into_iter().next() {
            return Err(self.bad("discovery", refused));
        }
        let token_auth = self.token_auth(&doc);
        let iss_parameter = doc.authorization_response_iss_parameter_supported;
        let pick = |key: &str, found: Url| c.overrides.get(key).cloned().unwrap_or(found);
        let pick_opt = |key: &str, found: Option<Url>| c.overrides.get(key).cloned().or(found);
        let mut endpoints = BTreeMap::from([
            (
                "authorize_url".to_string(),
                pick("authorize_url", doc.authorization_endpoint),
            ),
            (
                "token_url".to_string(),
                pick("token_url", doc.token_endpoint),
            ),
        ]);
        let userinfo = pick_opt("userinfo_url", doc.userinfo_endpoint);
        if c.fetch_userinfo && userinfo.is_none() {
            return Err(self.bad(
                "discovery",
                "fetch_userinfo is set but the provider has no userinfo endpoint",
            ));
        }
        if let Some(u) = userinfo {
            endpoints.insert("userinfo_url".to_string(), u);
        }
        let revoke = pick_opt("revoke_url", doc.revocation_endpoint);
        if let Some(u) = &revoke {
            endpoints.insert("revoke_url".to_string(), u.clone());
        }
        let jwks_uri = pick("jwks_uri", doc.jwks_uri);
        let pkce = doc
            .code_challenge_methods_supported
            .iter()
            .any(|m| m == "S256");
        let refresh = doc
            .grant_types_supported
            .as_ref()
            .is_none_or(|g| g.iter().any(|t| t == "refresh_token"));

        let spec = ProviderSpec {
            display_name: c.info.display_name.clone(),
            pkce,
            scope_separator: " ".into(),
            default_scopes: c.info.scopes.to_vec(),
            endpoints: endpoints
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            authorize: AuthorizeSpec {
                params: c.authorize_params.clone(),
                request_params: AuthorizeParams::NAMES
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
                ..AuthorizeSpec::default()
            },
            token: TokenSpec {
                auth: token_auth,
                ..TokenSpec::default()
            },
            errors: ErrorSpec::default(),
            requests: if c.fetch_userinfo {
                vec![RequestSpec {
                    name: "userinfo".into(),
                    endpoint: "userinfo_url".into(),
                    method: Default::default(),
                    auth: RequestAuth::Bearer,
                    query: BTreeMap::new(),
                    query_when: BTreeMap::new(),
                    headers: BTreeMap::new(),
                    when_scope: Vec::new(),
                    errors: None,
                }]
            } else {
                Vec::new()
            },
            identity: identity_mapping(),
            refresh: refresh.then(|| TokenSpec {
                redirect_uri: false,
                auth: token_auth,
                ..TokenSpec::default()
            }),
            refresh_token_single_use: false,
            signing: None,
            options: BTreeMap::new(),
            revoke: revoke.map(|_| RevokeSpec {
                endpoint: "revoke_url".into(),
                method: RevokeMethod::PostForm,
                token_in_path: false,
                params: BTreeMap::from([
                    (
                        "token".to_string(),
                        Template(vec![Part::Field(FieldRef {
                            doc: "token".into(),
                            pointer: "/access_token".into(),
                        })]),
                    ),
                    (
                        "token_type_hint".to_string(),
                        Template(vec![Part::Literal("access_token".into())]),
                    ),
                ]),
                auth: RequestAuth::None,
                // RFC 7009 §2.1: the same client authentication as /token.
                client_auth: true,
            }),
        };
        let mut info = c.info.clone();
        info.pkce = pkce;
        let engine = SpecProvider::new(SpecParts {
            info,
            spec,
            endpoints,
            client_id: c.client_id.clone(),
            client_secret,
            token_auth: Some(token_auth),
            client_key: c.client_key.clone(),
            options: Default::default(),
            http: c.http.clone(),
        });
        Ok(Arc::new(Discovered {
            engine,
            issuer,
            secret_renew_at,
            jwks_uri,
            iss_parameter,
        }))
    }

    /// Why discovery's endpoints cannot be used: each one that would be
    /// called (and is not overridden) and is `http://` off loopback, where
    /// the client secret, the code and the tokens would cross the network
    /// in clear.
    fn endpoints_in_clear(&self, doc: &DiscoveryDoc) -> Vec<String> {
        if self.config.allow_insecure_http {
            return Vec::new();
        }
        let userinfo = doc
            .userinfo_endpoint
            .as_ref()
            .filter(|_| self.config.fetch_userinfo);
        let called = [
            (
                "authorization_endpoint",
                "authorize_url",
                Some(&doc.authorization_endpoint),
            ),
            ("token_endpoint", "token_url", Some(&doc.token_endpoint)),
            ("jwks_uri", "jwks_uri", Some(&doc.jwks_uri)),
            ("userinfo_endpoint", "userinfo_url", userinfo),
            (
                "revocation_endpoint",
                "revoke_url",
                doc.revocation_endpoint.as_ref(),
            ),
        ];
        called
            .into_iter()
            .filter_map(|(field, key, url)| {
                url.filter(|u| !self.config.overrides.contains_key(key) && in_clear_off_loopback(u))
                    .map(|u| (field, u))
            })
            .map(|(field, url)| {
                format!(
                    "the discovery document puts {field} at {}, http:// on a host other than \
                     loopback; use https://, or set providers.{}.allow_insecure_http = true",
                    url.origin().ascii_serialization(),
                    self.config.info.name
                )
            })
            .collect()
    }

    /// `check-config --online`: fetches discovery and the JWKS as a login
    /// would and returns every problem found, one line each. Nothing is
    /// cached, so a later login fetches afresh.
    async fn check_online(&self) -> Vec<String> {
        let at = format!("providers.{}", self.config.info.name);
        let doc = match self.discovery_doc().await {
            Ok(doc) => doc,
            Err(e) => return vec![format!("{at}: discovery: {e}")],
        };
        let mut problems: Vec<String> = self
            .endpoints_in_clear(&doc)
            .into_iter()
            .map(|p| format!("{at}: {p}"))
            .collect();
        let method = self.token_auth(&doc);
        if let Some(listed) = &doc.token_endpoint_auth_methods_supported
            && !listed.is_empty()
            && !listed.iter().any(|m| m == method.as_str())
        {
            problems.push(format!(
                "{at}.token_auth: {} is not among the issuer's token_endpoint_auth_methods_supported ({})",
                method.as_str(),
                listed.join(", ")
            ));
        }
        if method == TokenAuth::PrivateKeyJwt && self.config.client_key.is_none() {
            problems.push(format!(
                "{at}.token_auth: private_key_jwt needs private_key_file"
            ));
        }
        let jwks_uri = self
            .config
            .overrides
            .get("jwks_uri")
            .cloned()
            .unwrap_or(doc.jwks_uri);
        match self.fetch_json("jwks", jwks_uri).await {
            Err(e) => problems.push(format!("{at}: jwks: {e}")),
            Ok((doc, _)) => match serde_json::from_value::<JwkSet>(doc) {
                Err(e) => problems.push(format!("{at}: jwks: not a JWK set ({e})")),
                Ok(set) => {
                    let usable = set
                        .keys
                        .iter()
                        .filter(|k| DecodingKey::from_jwk(k).is_ok())
                        .count();
                    if usable == 0 {
                        problems.push(format!(
                            "{at}: jwks: no key an ID token could be verified with"
                        ));
                    }
                }
            },
        }
        problems
    }

    /// RFC 9207 §2.4: an `iss` on the callback must be this issuer's; one
    /// missing where discovery promised it is refused too.
    fn check_callback_issuer(
        &self,
        discovered: &Discovered,
        callback: &CallbackParams,
    ) -> Result<(), ProviderError> {
        let why = match callback.get("iss") {
            Some(iss) => {
                let iss = iss.trim_end_matches('/');
                let ours = std::iter::once(&self.config.issuer)
                    .chain(&self.config.issuer_aliases)
                    .any(|i| i.trim_end_matches('/') == iss);
                // A multi-tenant issuer answers as the user's tenant.
                let tenant = |t: &TenantIssuer| t.accepts_discovery(&self.config.issuer, iss);
                if ours || self.config.tenant_issuer.as_ref().is_some_and(tenant) {
                    return Ok(());
                }
                "names another issuer"
            }
            None if discovered.iss_parameter => {
                "is missing, though the issuer sends it (authorization_response_iss_parameter_supported)"
            }
            None => return Ok(()),
        };
        Err(ProviderError::IssuerMismatch {
            provider: self.name(),
            why: why.into(),
        })
    }

    async fn key_set(&self, uri: &Url) -> Result<Arc<Jwks>, ProviderError> {
        self.jwks
            .try_get_with((), async {
                let (doc, max_age) = self.fetch_json("jwks", uri.clone()).await?;
                let set: JwkSet = serde_json::from_value(doc)
                    .map_err(|e| self.bad("jwks", format!("JWK set: {e}")))?;
                let ttl = max_age
                    .unwrap_or(JWKS_DEFAULT_TTL)
                    .clamp(JWKS_MIN_TTL, JWKS_MAX_TTL);
                Ok::<_, ProviderError>(Arc::new(Jwks { set, ttl }))
            })
            .await
            .map_err(|e| (*e).clone())
    }

    /// Whether an unknown `kid` may force a refetch now (at most once per
    /// `KID_REFETCH_INTERVAL`).
    fn may_refetch(&self) -> bool {
        let mut last = self
            .last_forced_refetch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(at) if at.elapsed() < KID_REFETCH_INTERVAL => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }

    /// Verifies the ID token and returns its claims.
    async fn verify_id_token(
        &self,
        discovered: &Discovered,
        id_token: &str,
        nonce: Option<&str>,
    ) -> Result<Value, ProviderError> {
        let header = jsonwebtoken::decode_header(id_token)
            .map_err(|_| self.invalid("not a well-formed JWT"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(self.invalid(format!(
                "signed with {:?}; only RS256, ES256 and EdDSA are accepted",
                header.alg
            )));
        }
        let mut keys = self.key_set(&discovered.jwks_uri).await?;
        let mut jwk = find_key(&keys.set, header.kid.as_deref(), header.alg);
        if jwk.is_none() && self.may_refetch() {
            // Keys rotate: a new kid may simply be newer than our cache.
            self.jwks.invalidate(&()).await;
            keys = self.key_set(&discovered.jwks_uri).await?;
            jwk = find_key(&keys.set, header.kid.as_deref(), header.alg);
        }
        let jwk =
            jwk.ok_or_else(|| self.invalid("signed with a key the issuer does not publish"))?;
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|_| self.bad("jwks", "a published key cannot be used"))?;

        let c = &self.config;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY.as_secs();
        validation.set_audience(&[c.client_id.as_str()]);
        // A multi-tenant issuer is checked below, once the tenant claim is
        // known to be signed.
        if c.tenant_issuer.is_none() {
            let mut issuers = vec![c.issuer.clone()];
            issuers.extend(c.issuer_aliases.iter().cloned());
            validation.set_issuer(&issuers);
        }
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Value>(id_token, &key, &validation)
            .map_err(|e| self.invalid(describe_jwt_error(&e)))?
            .claims;
        if let Some(tenant) = &c.tenant_issuer {
            let expected = tenant
                .expected_issuer(&discovered.issuer, &claims)
                .ok_or_else(|| self.invalid("no tenant claim to check the issuer against"))?;
            let iss = claims
                .get("iss")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if iss.trim_end_matches('/') != expected {
                return Err(self.invalid("issued by another issuer (iss)"));
            }
        }

        let now = OffsetDateTime::now_utc().unix_timestamp();
        let iat = claims
            .get("iat")
            .and_then(Value::as_i64)
            .unwrap_or(i64::MAX);
        if iat > now + LEEWAY.as_secs() as i64 {
            return Err(self.invalid("issued in the future (iat)"));
        }
        // OIDC Core §3.1.3.7: several audiences need an azp naming us; an
        // azp, when present, must name us.
        let several_audiences = claims
            .get("aud")
            .and_then(Value::as_array)
            .is_some_and(|a| a.len() > 1);
        match claims.get("azp").and_then(Value::as_str) {
            Some(azp) if azp != c.client_id => {
                return Err(self.invalid("authorized party (azp) is another client"));
            }
            None if several_audiences => {
                return Err(self.invalid("several audiences but no authorized party (azp)"));
            }
            _ => {}
        }
        if let Some(expected) = nonce
            && claims.get("nonce").and_then(Value::as_str) != Some(expected)
        {
            return Err(self.invalid("nonce does not match this login"));
        }
        Ok(claims)
    }
}

/// Whether `email` is verified, said by the document it was taken from:
/// OIDC's `email_verified` speaks of the `email` beside it, so one is never
/// read from userinfo and the other from the ID token. The documents are
/// tried in the identity mapping's order (userinfo, then the ID token); the
/// first whose `email` is this one answers, and without `email_verified`
/// there the email is unverified.
fn verified_beside<'a>(
    get: impl Fn(&str, &str) -> Option<&'a Value>,
    email: &str,
    claim: &str,
) -> bool {
    ["userinfo", "id_token"]
        .into_iter()
        .find(|doc| {
            get(doc, "/email")
                .and_then(body::scalar_string)
                .is_some_and(|e| e.trim() == email)
        })
        .and_then(|doc| get(doc, &format!("/{claim}")))
        .and_then(body::scalar_bool)
        == Some(true)
}

fn find_key<'a>(set: &'a JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<&'a Jwk> {
    match kid {
        Some(kid) => set.find(kid),
        // Without a kid, only an unambiguous key will do.
        None => {
            let mut usable = set.keys.iter().filter(|k| {
                DecodingKey::from_jwk(k).is_ok()
                    && k.common
                        .key_algorithm
                        .is_none_or(|a| a.to_string() == format!("{alg:?}"))
            });
            let first = usable.next();
            if usable.next().is_some() { None } else { first }
        }
    }
}

fn describe_jwt_error(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::ExpiredSignature => "expired (exp)",
        ErrorKind::InvalidIssuer => "issued by another issuer (iss)",
        ErrorKind::InvalidAudience => "meant for another client (aud)",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::ImmatureSignature => "not valid yet (nbf)",
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key",
        _ => "malformed",
    }
}

#[async_trait]
impl Provider for OidcProvider {
    fn info(&self) -> &ProviderInfo {
        &self.config.info
    }

    async fn authorize_url(
        &self,
        login: &PendingLogin,
        params: &AuthorizeParams,
    ) -> Result<String, ProviderError> {
        self.discovered()
            .await?
            .engine
            .authorize_url(login, params)
            .await
    }

    async fn exchange_code(
        &self,
        code: &str,
        login: &PendingLogin,
        callback: &CallbackParams,
    ) -> Result<TokenSet, ProviderError> {
        let discovered = self.discovered().await?;
        // Before the code goes anywhere: it may be another issuer's.
        self.check_callback_issuer(&discovered, callback)?;
        discovered.engine.exchange_code(code, login, callback).await
    }

    async fn fetch_identity(
        &self,
        tokens: &TokenSet,
        login: &PendingLogin,
        callback: &CallbackParams,
    ) -> Result<Identity, ProviderError> {
        let discovered = self.discovered().await?;
        let id_token = tokens
            .raw
            .get("id_token")
            .and_then(Value::as_str)
            .ok_or_else(|| self.bad("token", "no id_token in the answer (is openid in scope?)"))?;
        let nonce = login.nonce.as_ref().map(|n| n.verifier());
        let claims = self
            .verify_id_token(&discovered, id_token, nonce.as_deref())
            .await?;
        let docs = discovered
            .engine
            .fetch_docs(tokens, callback, vec![("id_token", claims)])
            .await?;
        // OIDC Core §5.3.4: userinfo must be about the ID token's subject.
        if let Some(info_sub) = docs.get("userinfo", "/sub")
            && Some(info_sub) != docs.get("id_token", "/sub")
        {
            return Err(self.invalid("userinfo is about another subject"));
        }
        let mut identity = discovered.engine.map_identity(&docs)?;
        let mapping = &self.config.claims;
        let get = |doc: &str, at: &str| docs.get(doc, at);
        if let Some(subject) = mapping.subject(get) {
            identity.subject = subject.map_err(|e| self.bad("identity", e.to_string()))?;
        }
        if identity.display_name.is_none() {
            identity.display_name = mapping.display_name(get);
        }
        identity.email_verified = identity
            .email
            .as_deref()
            .is_some_and(|email| verified_beside(get, email, &mapping.email_verified));
        Ok(identity)
    }

    fn refresher(&self) -> Option<&dyn Refresh> {
        Some(self)
    }

    fn revoker(&self) -> Option<&dyn Revoke> {
        Some(self)
    }

    async fn preflight(&self) -> Vec<String> {
        self.check_online().await
    }

    /// Only when discovery (or config) names a revocation endpoint; an
    /// issuer that cannot be discovered now cannot revoke now either.
    async fn can_revoke(&self) -> bool {
        match self.discovered().await {
            Ok(d) => d.engine.revoker().is_some(),
            Err(_) => false,
        }
    }
}

#[async_trait]
impl Refresh for OidcProvider {
    async fn refresh(
        &self,
        refresh_token: &SecretString,
        scopes: &[String],
    ) -> Result<TokenSet, ProviderError> {
        let discovered = self.discovered().await?;
        match discovered.engine.refresher() {
            Some(r) => r.refresh(refresh_token, scopes).await,
            None => Err(self.bad(
                "refresh",
                "the issuer does not offer the refresh_token grant",
            )),
        }
    }
}

#[async_trait]
impl Revoke for OidcProvider {
    async fn revoke(&self, access_token: &SecretString) -> Result<bool, ProviderError> {
        let discovered = self.discovered().await?;
        match discovered.engine.revoker() {
            Some(r) => r.revoke(access_token).await,
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_literals_parse() {
        let m = identity_mapping();
        for p in [
            &m.subject,
            &m.username,
            &m.display_name,
            &m.avatar_url,
            &m.email,
            &m.email_verified,
        ] {
            assert!(!p.0.is_empty());
        }
        assert_eq!(m.subject.0[0].doc, "id_token");
    }

    #[test]
    fn email_verified_comes_from_the_document_of_the_email() {
        let check = |userinfo: Value, id_token: Value, email: &str| {
            let docs = [("userinfo", userinfo), ("id_token", id_token)];
            verified_beside(
                |doc, at| {
                    docs.iter()
                        .find(|(name, _)| *name == doc)
                        .and_then(|(_, v)| v.pointer(at))
                },
                email,
                "email_verified",
            )
        };
        let verified = serde_json::json!({"email": "a@x.example", "email_verified": true});
        // Userinfo's email without a verdict is not verified by the ID
        // token's verdict on another (or the same) address.
        assert!(!check(
            serde_json::json!({"email": "b@x.example"}),
            verified.clone(),
            "b@x.example"
        ));
        assert!(!check(
            serde_json::json!({"email": "a@x.example"}),
            verified.clone(),
            "a@x.example"
        ));
        // Nor the other way round.
        assert!(!check(
            serde_json::json!({"email_verified": true}),
            serde_json::json!({"email": "a@x.example", "email_verified": false}),
            "a@x.example"
        ));
        assert!(!check(
            serde_json::json!({"email_verified": true}),
            serde_json::json!({"email": "a@x.example"}),
            "a@x.example"
        ));
        // Each document vouches for its own.
        assert!(check(
            serde_json::json!({}),
            verified.clone(),
            "a@x.example"
        ));
        assert!(check(
            verified.clone(),
            serde_json::json!({}),
            "a@x.example"
        ));
        assert!(check(
            serde_json::json!({"email": " a@x.example ", "email_verified": "true"}),
            serde_json::json!({"email": "a@x.example", "email_verified": false}),
            "a@x.example"
        ));
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            max_age("public, max-age=19204, must-revalidate, no-transform"),
            Some(Duration::from_secs(19204))
        );
        assert_eq!(max_age("no-cache"), None);
    }
}
