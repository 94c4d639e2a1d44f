//! Wire helpers shared by the emulators (most by QQ, WeChat, Weibo and
//! Gitee): the authorize-URL checks, request parsing and logging, JSON in a
//! fixed key order, ids derived from a user's seed, and the provider config
//! every emulator hands authbroker.

use authbroker::config::ProviderConfig;
use axum::{
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::{Url, form_urlencoded};

use super::{Core, SeenRequest, Step};

/// The callback every emulated app has registered.
pub const REDIRECT_URI: &str = "https://app.example.com/oauth/callback";

/// A `ProviderConfig` of `kind` with these credentials, the test redirect
/// URI, and `endpoints` overridden; everything else at its default.
pub(super) fn provider_config(
    kind: &str,
    client_id: &str,
    secret: &str,
    endpoints: &[(&str, String)],
) -> ProviderConfig {
    let endpoints: serde_json::Map<String, Value> = endpoints
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(v.as_str())))
        .collect();
    // Through serde, so fields added to ProviderConfig keep their defaults.
    serde_json::from_value(json!({
        "kind": kind,
        "client_id": client_id,
        "client_secret": secret,
        "redirect_uris": [REDIRECT_URI],
        "endpoints": endpoints,
    }))
    .expect("a valid provider config")
}

pub(super) fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The authorize URL must point at this emulator.
pub(super) fn check_origin(url: &Url, base_url: &str) -> Result<(), String> {
    let base = Url::parse(base_url).map_err(|e| e.to_string())?;
    if url.origin() != base.origin() {
        return Err(format!(
            "authorize URL points at {}, not the emulator",
            url.origin().ascii_serialization()
        ));
    }
    Ok(())
}

/// A parameter that must appear at most once.
pub(super) fn single<'a>(
    params: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, String> {
    let mut values = params.iter().filter(|(k, _)| k == name);
    let first = values.next().map(|(_, v)| v.as_str());
    if values.next().is_some() {
        return Err(format!("{name} appears more than once"));
    }
    Ok(first)
}

pub(super) fn no_pkce(params: &[(String, String)], provider: &str) -> Result<(), String> {
    for name in ["code_challenge", "code_challenge_method"] {
        if params.iter().any(|(k, _)| k == name) {
            return Err(format!("{name} sent, but {provider} does not support PKCE"));
        }
    }
    Ok(())
}

/// The query of an authorize URL, after the checks every emulated provider
/// makes of it: our origin, the documented path, the fragment it wants
/// (none, or WeChat's `#wechat_redirect`), and no PKCE, which none of them
/// supports.
pub(super) fn authorize_params(
    authorize_url: &str,
    base_url: &str,
    path: &str,
    fragment: Option<&str>,
    provider: &str,
) -> Result<Vec<(String, String)>, String> {
    let url = Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
    check_origin(&url, base_url)?;
    if url.path() != path {
        return Err(format!("path is {}, expected {path}", url.path()));
    }
    match fragment {
        None if url.fragment().is_some() => {
            return Err(format!("{provider}'s authorize URL takes no fragment"));
        }
        Some(f) if url.fragment() != Some(f) || !authorize_url.ends_with(&format!("#{f}")) => {
            return Err(format!("the URL must end with #{f}"));
        }
        _ => {}
    }
    let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    no_pkce(&params, provider)?;
    Ok(params)
}

/// A parameter that must appear once with exactly `expected`; `code` is the
/// provider's documented error for a mismatch, when it has one.
pub(super) fn expect_param(
    params: &[(String, String)],
    name: &str,
    expected: &str,
    code: Option<&str>,
) -> Result<(), String> {
    match single(params, name)? {
        Some(v) if v == expected => Ok(()),
        other => Err(format!(
            "{name} is {other:?}, expected {expected:?}{}",
            code.map(|c| format!(" ({c})")).unwrap_or_default()
        )),
    }
}

/// The non-empty `state` every emulated provider requires.
pub(super) fn state_param(params: &[(String, String)]) -> Result<String, String> {
    match single(params, "state")? {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err("no state".into()),
    }
}

/// `scope` split on the provider's separator, each scope one it knows;
/// absent means `default`. The other common separator is refused, since
/// the provider would read the whole string as one unknown scope.
pub(super) fn scope_list(
    params: &[(String, String)],
    separator: char,
    known: &[&str],
    default: &[&str],
    provider: &str,
) -> Result<Vec<String>, String> {
    let (wrong, wrong_name) = if separator == ',' {
        (' ', "space")
    } else {
        (',', "comma")
    };
    match single(params, "scope")? {
        None => Ok(default.iter().map(|s| s.to_string()).collect()),
        Some(s) if s.contains(wrong) => Err(format!(
            "scope {s:?} is {wrong_name}-separated; {provider} separates with {separator:?}"
        )),
        Some(s) => {
            let scopes: Vec<String> = s.split(separator).map(str::to_string).collect();
            if let Some(bad) = scopes.iter().find(|s| !known.contains(&s.as_str())) {
                return Err(format!(
                    "scope names {bad:?}, which {provider} does not know"
                ));
            }
            Ok(scopes)
        }
    }
}

/// The `state` of an authorize URL, for a denial's redirect.
pub(super) fn state_of(authorize_url: &str) -> String {
    super::query_of(authorize_url)
        .into_iter()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// A JSON object with keys in the given order (serde_json's map sorts them).
pub(super) fn obj(fields: &[(&str, Value)]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::from(*k)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

pub(super) fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

pub(super) fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

pub(super) fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A number from the first eight bytes of `parts`' digest.
pub(super) fn derive_u64(parts: &[&str]) -> u64 {
    let d = digest(parts);
    u64::from_be_bytes(d[..8].try_into().expect("eight bytes"))
}

/// `len` characters of `alphabet` derived from `parts`, deterministically.
pub(super) fn derive(parts: &[&str], alphabet: &[u8], len: usize) -> String {
    let mut out = String::new();
    let mut block = 0u32;
    while out.len() < len {
        let n = block.to_string();
        let mut all = parts.to_vec();
        all.push(&n);
        for b in digest(&all) {
            if out.len() == len {
                break;
            }
            out.push(alphabet[b as usize % alphabet.len()] as char);
        }
        block += 1;
    }
    out
}

/// Parameters whose values never reach the request log, in every
/// provider's spelling (Qiita's `token`, Nimbus's camelCase ones …).
pub(super) const SECRET_PARAMS: &[&str] = &[
    "client_secret",
    "secret",
    "code",
    "code_verifier",
    "access_token",
    "refresh_token",
    "token",
    "appSecret",
    "authCode",
    "renewalToken",
    "credential",
    "clientSecret",
    "refreshToken",
    "auth_code",
    "auth_token",
];

/// `params` with the value of each [`SECRET_PARAMS`] one replaced by
/// `<redacted>`, so tests still see that it was sent.
pub(super) fn redacted(params: Vec<(String, String)>) -> Vec<(String, String)> {
    params
        .into_iter()
        .map(|(k, v)| {
            if SECRET_PARAMS.contains(&k.as_str()) {
                (k, "<redacted>".to_owned())
            } else {
                (k, v)
            }
        })
        .collect()
}

/// The log entry for a request whose parameters the caller parsed:
/// secrets redacted, status still 0 (see [`Log`]).
pub(super) fn seen_with(
    step: Step,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    params: Vec<(String, String)>,
) -> SeenRequest {
    SeenRequest {
        step,
        method: method.to_string(),
        path: path.to_owned(),
        params: redacted(params),
        content_type: header_str(headers, header::CONTENT_TYPE).map(str::to_owned),
        accept: header_str(headers, header::ACCEPT).map(str::to_owned),
        user_agent: header_str(headers, header::USER_AGENT).map(str::to_owned),
        // Only the scheme, never the credential.
        authorization: header_str(headers, header::AUTHORIZATION)
            .map(|v| v.split(' ').next().unwrap_or_default().to_owned()),
        status: 0,
    }
}

/// The log entry for a request: its query, then its form or JSON body.
pub(super) fn seen(
    step: Step,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> SeenRequest {
    Req::new(method.clone(), uri, headers, body).seen(step)
}

/// The query parameters of a request, in order.
pub(super) fn query_params(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The first value of a parameter.
pub(super) fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `Authorization: Basic` credentials, each form-decoded as RFC 6749
/// §2.3.1 asks (a no-op for the plain ids and secrets most clients send).
pub(super) fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let (scheme, credentials) = header_str(headers, header::AUTHORIZATION)?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(credentials.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

/// A header's value, when it is text.
pub(super) fn header_str<K: header::AsHeaderName>(headers: &HeaderMap, name: K) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// One request, parsed once: query, then a form body (JSON bodies are kept
/// for the log only: QQ does not read them).
pub(super) struct Req {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query: Vec<(String, String)>,
    pub(super) form: Vec<(String, String)>,
    pub(super) json: Vec<(String, String)>,
    pub(super) json_body: bool,
    pub(super) content_type: Option<String>,
    pub(super) accept: Option<String>,
    pub(super) user_agent: Option<String>,
    pub(super) authorization: Option<String>,
}

impl Req {
    pub(super) fn new(method: Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Req {
        let header = |name: header::HeaderName| header_str(headers, name).map(str::to_owned);
        let content_type = header(header::CONTENT_TYPE);
        let ct = content_type.as_deref().unwrap_or_default();
        let is_form = ct.starts_with("application/x-www-form-urlencoded");
        let json_body = ct.contains("json") || (!is_form && body.first() == Some(&b'{'));
        let form = if is_form {
            form_urlencoded::parse(body).into_owned().collect()
        } else {
            Vec::new()
        };
        let json = if json_body {
            json_params(body)
        } else {
            Vec::new()
        };
        Req {
            method,
            path: uri.path().to_owned(),
            query: uri
                .query()
                .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default(),
            form,
            json,
            json_body,
            content_type,
            accept: header(header::ACCEPT),
            user_agent: header(header::USER_AGENT),
            authorization: header(header::AUTHORIZATION)
                .map(|v| v.split(' ').next().unwrap_or_default().to_owned()),
        }
    }

    pub(super) fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .chain(&self.form)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    pub(super) fn seen(&self, step: Step) -> SeenRequest {
        SeenRequest {
            step,
            method: self.method.to_string(),
            path: self.path.clone(),
            params: redacted(
                self.query
                    .iter()
                    .chain(&self.form)
                    .chain(&self.json)
                    .cloned()
                    .collect(),
            ),
            content_type: self.content_type.clone(),
            accept: self.accept.clone(),
            user_agent: self.user_agent.clone(),
            authorization: self.authorization.clone(),
            status: 0,
        }
    }
}

pub(super) fn json_params(body: &[u8]) -> Vec<(String, String)> {
    match serde_json::from_slice::<serde_json::Map<String, Value>>(body) {
        Ok(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Records a request with the status it was answered with. A request never
/// answered (a hanging fault the client gave up on) is recorded with status
/// 0 when its handler is dropped.
pub(super) struct Log<'a> {
    core: &'a Core,
    seen: Option<SeenRequest>,
}

impl<'a> Log<'a> {
    pub(super) fn new(core: &'a Core, seen: SeenRequest) -> Self {
        Log {
            core,
            seen: Some(seen),
        }
    }

    pub(super) fn answer(mut self, response: Response) -> Response {
        if let Some(mut seen) = self.seen.take() {
            seen.status = response.status().as_u16();
            self.core.record(seen);
        }
        response
    }
}

impl Drop for Log<'_> {
    fn drop(&mut self) {
        if let Some(seen) = self.seen.take() {
            self.core.record(seen);
        }
    }
}
