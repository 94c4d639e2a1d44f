//! `GET /authorize`: checks the request, then shows the consent picker or
//! redirects back with a code (or `access_denied`).

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use url::{Url, form_urlencoded};

use super::{
    grants::{CODE_TTL, CodeGrant, Sandbox, random_key},
    pages::{error_page, html, picker_page},
};

/// Longest value accepted for any authorize parameter; bounds what one code holds.
const MAX_PARAM_LEN: usize = 2048;

/// A validated authorization request.
#[derive(Debug)]
struct AuthorizeRequest {
    client_id: String,
    redirect_uri: Url,
    state: String,
    scope: String,
    challenge: Option<String>,
    decision: Decision,
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// No decision in the URL yet: show the picker page.
    Ask,
    Approve(String),
    Deny,
}

/// Reads and checks the query. Errors are sentences shown to a developer.
fn parse_authorize(raw: &str) -> Result<AuthorizeRequest, String> {
    let mut response_type = None;
    let mut client_id = None;
    let mut redirect_uri = None;
    let mut state = None;
    let mut scope = None;
    let mut challenge = None;
    let mut method = None;
    let mut user = None;
    let mut deny = None;
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        let slot = match &*key {
            "response_type" => &mut response_type,
            "client_id" => &mut client_id,
            "redirect_uri" => &mut redirect_uri,
            "state" => &mut state,
            "scope" => &mut scope,
            "code_challenge" => &mut challenge,
            "code_challenge_method" => &mut method,
            "sandbox_user" => &mut user,
            "sandbox_deny" => &mut deny,
            // RFC 6749 §3.1: unknown parameters are ignored.
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("The parameter `{key}` is given more than once."));
        }
        if value.len() > MAX_PARAM_LEN {
            return Err(format!(
                "The parameter `{key}` is longer than {MAX_PARAM_LEN} bytes."
            ));
        }
        *slot = Some(value.into_owned());
    }

    match response_type.as_deref() {
        Some("code") => {}
        None => return Err("`response_type` is missing; it must be `code`.".into()),
        Some(other) => {
            return Err(format!(
                "`response_type` is `{other}`, but this provider only supports `code`."
            ));
        }
    }
    let client_id = client_id
        .filter(|c| !c.is_empty())
        .ok_or("`client_id` is missing or empty.")?;
    let redirect_uri = redirect_uri
        .filter(|r| !r.is_empty())
        .ok_or("`redirect_uri` is missing or empty.")?;
    let redirect_uri = Url::parse(&redirect_uri)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| {
            format!("`redirect_uri` ({redirect_uri}) is not an absolute http:// or https:// URL.")
        })?;
    if redirect_uri.fragment().is_some() {
        return Err("`redirect_uri` must not contain a fragment (RFC 6749 §3.1.2).".into());
    }
    let state = state
        .filter(|s| !s.is_empty())
        .ok_or("`state` is missing or empty; the sandbox insists on it (CSRF defence).")?;
    let challenge = match (challenge, method.as_deref()) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err("`code_challenge_method` is given without a `code_challenge`.".into());
        }
        (Some(c), Some("S256")) if is_pkce_value(&c) => Some(c),
        (Some(_), Some("S256")) => {
            return Err(
                "`code_challenge` must be 43-128 characters of [A-Za-z0-9-._~] (RFC 7636 §4.2)."
                    .into(),
            );
        }
        (Some(_), None | Some("plain")) => {
            return Err(
                "PKCE method `plain` is not accepted: send `code_challenge_method=S256`.".into(),
            );
        }
        (Some(_), Some(other)) => {
            return Err(format!(
                "`code_challenge_method` is `{other}`; only `S256` is supported."
            ));
        }
    };
    let decision = match (user, deny.as_deref()) {
        (None, None) => Decision::Ask,
        (None, Some("1")) => Decision::Deny,
        (None, Some(_)) => return Err("`sandbox_deny` must be `1`.".into()),
        (Some(_), Some(_)) => {
            return Err("Give either `sandbox_user` or `sandbox_deny`, not both.".into());
        }
        (Some(name), None) if is_user_name(&name) => Decision::Approve(name),
        (Some(_), None) => {
            return Err("`sandbox_user` must be 1-64 characters of [A-Za-z0-9_.-].".into());
        }
    };
    Ok(AuthorizeRequest {
        client_id,
        redirect_uri,
        state,
        scope: scope
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        challenge,
        decision,
    })
}

pub(super) fn is_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// RFC 7636 §4.1: verifiers and challenges are 43-128 unreserved characters.
pub(super) fn is_pkce_value(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

pub(super) async fn authorize(
    State(sandbox): State<Arc<Sandbox>>,
    RawQuery(raw): RawQuery,
) -> Response {
    let raw = raw.unwrap_or_default();
    let request = match parse_authorize(&raw) {
        Ok(request) => request,
        Err(problem) => return html(StatusCode::BAD_REQUEST, &error_page(&problem)),
    };
    let mut target = request.redirect_uri.clone();
    match &request.decision {
        Decision::Ask => {
            let page = picker_page(
                &raw,
                &request.client_id,
                &request.scope,
                &request.redirect_uri,
            );
            return html(StatusCode::OK, &page);
        }
        Decision::Deny => {
            target
                .query_pairs_mut()
                .append_pair("error", "access_denied")
                .append_pair("error_description", "The user denied the request.")
                .append_pair("state", &request.state);
        }
        Decision::Approve(user) => {
            let code = random_key();
            let grant = CodeGrant {
                user: user.as_str().into(),
                client_id: request.client_id.as_str().into(),
                redirect_uri: request.redirect_uri.as_str().into(),
                scope: request.scope.as_str().into(),
                challenge: request.challenge.as_deref().map(Into::into),
                expires_at: Instant::now() + CODE_TTL,
            };
            sandbox.codes.insert(code, Arc::new(grant)).await;
            tracing::debug!(client_id = %request.client_id, user = %user, "sandbox: login approved");
            target
                .query_pairs_mut()
                .append_pair("code", &URL_SAFE_NO_PAD.encode(code))
                .append_pair("state", &request.state);
        }
    }
    redirect(&target)
}

fn redirect(target: &Url) -> Response {
    match HeaderValue::from_str(target.as_str()) {
        Ok(location) => (
            StatusCode::FOUND,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
        // Invariant: a serialized `Url` is ASCII without control characters.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    fn query(extra: &str) -> String {
        format!(
            "response_type=code&client_id=app&redirect_uri=http%3A%2F%2Flocalhost%2Fcb%3Fx%3D1\
&state=st&scope=openid+profile&code_challenge={CHALLENGE}&code_challenge_method=S256{extra}"
        )
    }

    #[test]
    fn authorize_parses_a_good_request() {
        let r = parse_authorize(&query("&sandbox_user=bob")).unwrap();
        assert_eq!(r.client_id, "app");
        assert_eq!(r.redirect_uri.as_str(), "http://localhost/cb?x=1");
        assert_eq!(r.scope, "openid profile");
        assert_eq!(r.challenge.as_deref(), Some(CHALLENGE));
        assert_eq!(r.decision, Decision::Approve("bob".into()));
        assert_eq!(parse_authorize(&query("")).unwrap().decision, Decision::Ask);
        assert_eq!(
            parse_authorize(&query("&sandbox_deny=1")).unwrap().decision,
            Decision::Deny
        );
    }

    #[test]
    fn authorize_rejects_bad_requests() {
        let bad = [
            query("").replace("response_type=code", "response_type=token"),
            query("").replace("client_id=app", "client_id="),
            query("").replace("http%3A%2F%2Flocalhost", "ftp%3A%2F%2Flocalhost"),
            query("").replace("http%3A%2F%2Flocalhost%2Fcb", "%2Fcb"),
            query("").replace("state=st", "state="),
            query("").replace("S256", "plain"),
            query("").replace("&code_challenge_method=S256", ""),
            query("&state=again"),
            query("&sandbox_user=bad%20name"),
            query(&format!("&sandbox_user={}", "a".repeat(65))),
            query("&sandbox_user=bob&sandbox_deny=1"),
        ];
        for q in bad {
            assert!(parse_authorize(&q).is_err(), "accepted: {q}");
        }
    }

    #[test]
    fn picker_page_escapes_what_it_echoes() {
        let raw = query("").replace("client_id=app", "client_id=%3Cscript%3E");
        let r = parse_authorize(&raw).unwrap();
        let page = picker_page(&raw, &r.client_id, &r.scope, &r.redirect_uri);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("sandbox_user=alice"));
    }
}
