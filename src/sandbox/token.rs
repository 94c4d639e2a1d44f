//! `POST /token`: client authentication (`client_secret_post` or
//! `client_secret_basic`), the authorization-code grant with PKCE S256, and
//! the refresh-token grant with rotation.

use std::{borrow::Cow, sync::Arc, time::Instant};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    authorize::is_pkce_value,
    grants::{
        ACCESS_TOKEN_PREFIX, ACCESS_TOKEN_TTL, AccessGrant, REFRESH_TOKEN_PREFIX,
        REFRESH_TOKEN_TTL, RefreshGrant, Sandbox, parse_key, random_key,
    },
};

/// An RFC 6749 §5.2 error response.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: Cow<'static, str>,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<Cow<'static, str>>) -> Self {
        OAuthError {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
        }
    }
    fn invalid_grant(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new("invalid_grant", description)
    }
    fn invalid_request(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new("invalid_request", description)
    }
}

#[derive(Serialize)]
pub(super) struct ErrorBody<'a> {
    pub(super) error: &'a str,
    pub(super) error_description: &'a str,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            no_store(),
            Json(ErrorBody {
                error: self.error,
                error_description: &self.description,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sandbox\""),
            );
        }
        response
    }
}

/// RFC 6749 §5.1: token responses must not be cached.
fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

/// The form of a token request. serde rejects a repeated field, which is what
/// RFC 6749 §3.2 asks for.
#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    refresh_token: String,
    scope: &'a str,
}

pub(super) async fn token(
    State(sandbox): State<Arc<Sandbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match exchange(&sandbox, &headers, &body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn exchange(
    sandbox: &Sandbox,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, OAuthError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(OAuthError::invalid_request(
            "The body must be application/x-www-form-urlencoded.",
        ));
    }
    let form: TokenForm = serde_urlencoded::from_bytes(body)
        .map_err(|e| OAuthError::invalid_request(format!("The form could not be read: {e}.")))?;
    let client_id = authenticate_client(headers, &form)?;
    match form.grant_type.as_deref() {
        Some("authorization_code") => redeem_code(sandbox, &form, &client_id).await,
        Some("refresh_token") => redeem_refresh_token(sandbox, &form, &client_id).await,
        Some(_) => Err(OAuthError::new(
            "unsupported_grant_type",
            "Only `authorization_code` and `refresh_token` are supported.",
        )),
        None => Err(OAuthError::invalid_request("`grant_type` is missing.")),
    }
}

/// Accepts `client_secret_post` and `client_secret_basic` (but not both, per
/// RFC 6749 §2.3). Any non-empty secret is right: the sandbox has no registry
/// of clients, only a check that the client sent one.
fn authenticate_client(headers: &HeaderMap, form: &TokenForm) -> Result<String, OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, credentials)| credentials.trim());
    // RFC 6749 §5.2: 401 when the client tried the Authorization header.
    let status = if basic.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    let unauthorized = |description: &'static str| OAuthError {
        status,
        error: "invalid_client",
        description: description.into(),
    };
    let (id, secret) = match basic {
        Some(_) if form.client_secret.is_some() => {
            return Err(OAuthError::invalid_request(
                "Use one client authentication method: HTTP Basic or client_secret in the form, not both.",
            ));
        }
        Some(credentials) => {
            let decoded = STANDARD
                .decode(credentials)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| unauthorized("The Basic credentials are not valid base64 UTF-8."))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| unauthorized("The Basic credentials lack a `:`."))?;
            // RFC 6749 §2.3.1 form-encodes both halves before Basic.
            let id = form_decode(id)
                .ok_or_else(|| unauthorized("The Basic client id is badly encoded."))?;
            let secret = form_decode(secret)
                .ok_or_else(|| unauthorized("The Basic client secret is badly encoded."))?;
            if form.client_id.as_ref().is_some_and(|f| *f != id) {
                return Err(OAuthError::invalid_request(
                    "`client_id` in the form differs from the Basic credentials.",
                ));
            }
            (id, secret)
        }
        None => (
            form.client_id.clone().unwrap_or_default(),
            form.client_secret.clone().unwrap_or_default(),
        ),
    };
    if id.is_empty() {
        return Err(unauthorized("`client_id` is missing."));
    }
    if secret.is_empty() {
        return Err(unauthorized("`client_secret` is missing or empty."));
    }
    Ok(id)
}

/// `application/x-www-form-urlencoded` decoding of one value.
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

async fn redeem_code(
    sandbox: &Sandbox,
    form: &TokenForm,
    client_id: &str,
) -> Result<Response, OAuthError> {
    let code = form
        .code
        .as_deref()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("`code` is missing."))?;
    let redirect_uri = form
        .redirect_uri
        .as_deref()
        .ok_or_else(|| OAuthError::invalid_request("`redirect_uri` is missing."))?;
    // Taken out on the first attempt, whatever its outcome: a code is single
    // use, and a failed attempt must not leave it open to guessing the verifier.
    let grant = match parse_key(code) {
        Some(key) => sandbox.codes.remove(&key).await,
        None => None,
    }
    .filter(|g| g.expires_at > Instant::now())
    .ok_or_else(|| {
        OAuthError::invalid_grant("The code is unknown, expired, or was already used.")
    })?;
    if *grant.client_id != *client_id {
        return Err(OAuthError::invalid_grant(
            "The code was issued to another client_id.",
        ));
    }
    if *grant.redirect_uri != *redirect_uri {
        return Err(OAuthError::invalid_grant(
            "`redirect_uri` differs from the one given at /authorize.",
        ));
    }
    match (&grant.challenge, form.code_verifier.as_deref()) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err(OAuthError::invalid_grant(
                "`code_verifier` was sent, but /authorize got no code_challenge.",
            ));
        }
        (Some(_), None) => {
            return Err(OAuthError::invalid_grant(
                "`code_verifier` is missing; /authorize got a code_challenge.",
            ));
        }
        (Some(challenge), Some(verifier)) => {
            if !pkce_s256_matches(verifier, challenge) {
                return Err(OAuthError::invalid_grant(
                    "`code_verifier` does not match the code_challenge.",
                ));
            }
        }
    }
    Ok(issue_tokens(sandbox, &grant.user, &grant.client_id, &grant.scope).await)
}

async fn redeem_refresh_token(
    sandbox: &Sandbox,
    form: &TokenForm,
    client_id: &str,
) -> Result<Response, OAuthError> {
    let presented = form
        .refresh_token
        .as_deref()
        .ok_or_else(|| OAuthError::invalid_request("`refresh_token` is missing."))?;
    // Rotation: the old refresh token dies with its first use.
    let grant = match presented
        .strip_prefix(REFRESH_TOKEN_PREFIX)
        .and_then(parse_key)
    {
        Some(key) => sandbox.refresh_tokens.remove(&key).await,
        None => None,
    }
    .filter(|g| g.expires_at > Instant::now())
    .ok_or_else(|| {
        OAuthError::invalid_grant("The refresh token is unknown, expired, or was already used.")
    })?;
    if *grant.client_id != *client_id {
        return Err(OAuthError::invalid_grant(
            "The refresh token was issued to another client_id.",
        ));
    }
    let scope: Arc<str> = match form.scope.as_deref() {
        None => grant.scope.clone(),
        Some(asked) => {
            // RFC 6749 §6: a refresh may narrow the scope, never widen it.
            let granted: Vec<&str> = grant.scope.split(' ').collect();
            let asked: Vec<&str> = asked.split_whitespace().collect();
            if let Some(extra) = asked.iter().find(|s| !granted.contains(s)) {
                return Err(OAuthError::new(
                    "invalid_scope",
                    format!("The scope `{extra}` was not granted originally."),
                ));
            }
            asked.join(" ").into()
        }
    };
    Ok(issue_tokens(sandbox, &grant.user, &grant.client_id, &scope).await)
}

async fn issue_tokens(
    sandbox: &Sandbox,
    user: &Arc<str>,
    client_id: &Arc<str>,
    scope: &Arc<str>,
) -> Response {
    let now = Instant::now();
    let access = random_key();
    let refresh = random_key();
    sandbox
        .access_tokens
        .insert(
            access,
            Arc::new(AccessGrant {
                user: user.clone(),
                expires_at: now + ACCESS_TOKEN_TTL,
            }),
        )
        .await;
    sandbox
        .refresh_tokens
        .insert(
            refresh,
            Arc::new(RefreshGrant {
                user: user.clone(),
                client_id: client_id.clone(),
                scope: scope.clone(),
                expires_at: now + REFRESH_TOKEN_TTL,
            }),
        )
        .await;
    let body = TokenResponse {
        access_token: format!("{ACCESS_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(access)),
        token_type: "bearer",
        expires_in: ACCESS_TOKEN_TTL.as_secs(),
        refresh_token: format!("{REFRESH_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(refresh)),
        scope,
    };
    (StatusCode::OK, no_store(), Json(body)).into_response()
}

/// RFC 7636 §4.6: BASE64URL-NOPAD(SHA256(verifier)) == challenge. A plain
/// comparison is fine: the code dies on the first attempt, so there is no
/// second guess to time.
fn pkce_s256_matches(verifier: &str, challenge: &str) -> bool {
    is_pkce_value(verifier) && URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)) == challenge
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert!(pkce_s256_matches(VERIFIER, CHALLENGE));
        assert!(!pkce_s256_matches(&VERIFIER.replace('d', "e"), CHALLENGE));
        assert!(!pkce_s256_matches("short", CHALLENGE));
    }

    #[test]
    fn form_decode_handles_plus_and_percent() {
        assert_eq!(form_decode("a+b%3A%2Fc").as_deref(), Some("a b:/c"));
        assert_eq!(form_decode("bad%2"), None);
        assert_eq!(form_decode("bad%zz"), None);
    }
}
