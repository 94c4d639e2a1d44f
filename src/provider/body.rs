//! Tolerant parsing of provider answers into one JSON shape. Providers label
//! JSON as `text/plain` or `text/html` (WeChat, Weibo), wrap it in JSONP (QQ's
//! `callback( {...} );`), or answer form-encoded (QQ tokens, GitHub without
//! `Accept`), so the body is sniffed rather than trusted to its content type.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// Parses a provider answer. `None` means none of the known shapes fit.
pub fn parse(body: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(body).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return matches!(v, Value::Object(_) | Value::Array(_)).then_some(v);
    }
    if let Some(inner) = jsonp_inner(text) {
        return serde_json::from_str::<Value>(inner)
            .ok()
            .filter(Value::is_object);
    }
    parse_form(text)
}

/// `callback( {...} );` → `{...}`. Any callback name is accepted.
fn jsonp_inner(text: &str) -> Option<&str> {
    let open = text.find('(')?;
    let name = &text[..open];
    if name.is_empty()
        || !name
            .trim()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'$')
    {
        return None;
    }
    let rest = text[open + 1..].trim_end();
    let rest = rest.strip_suffix(';').unwrap_or(rest).trim_end();
    Some(rest.strip_suffix(')')?.trim())
}

/// `a=1&b=2` → `{"a":"1","b":"2"}`. Only bodies that look like a form (every
/// pair has a key, no spaces or markup) qualify, so an HTML error page is not
/// mistaken for one.
fn parse_form(text: &str) -> Option<Value> {
    if !text.contains('=') || text.contains(char::is_whitespace) || text.contains('<') {
        return None;
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(text).ok()?;
    if pairs.is_empty() || pairs.iter().any(|(k, _)| k.is_empty()) {
        return None;
    }
    let mut map = Map::new();
    for (k, v) in pairs {
        map.insert(k, Value::String(v));
    }
    Some(Value::Object(map))
}

/// A scalar as text: strings as they are, numbers and booleans printed.
/// Providers send ids and error codes either way (`"uid":"6397…"` vs `1404…`).
/// Borrowed when it is a string: most callers trim or copy it anyway.
pub fn scalar_string(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// A non-negative integer sent as a number or a string (`"expires_in":"7776000"`).
pub fn scalar_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The longest token lifetime believed: a hundred years. More is a broken
/// answer, and would overflow the arithmetic of expiry instants.
pub const MAX_LIFETIME_SECS: u64 = 100 * 365 * 24 * 3600;

/// A token's `expires_in`, in either form. A value that is not a
/// non-negative integer is ignored, as before (no known expiry); one above
/// `MAX_LIFETIME_SECS` is an error, for `PROVIDER_BAD_RESPONSE`.
pub fn lifetime(v: &Value) -> Result<Option<std::time::Duration>, &'static str> {
    match scalar_u64(v) {
        Some(secs) if secs > MAX_LIFETIME_SECS => {
            Err("expires_in is implausibly large (more than 100 years)")
        }
        secs => Ok(secs.map(std::time::Duration::from_secs)),
    }
}

/// `true`/`"true"` (OIDC `email_verified` arrives both ways).
pub fn scalar_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_even_when_mislabelled() {
        assert_eq!(
            parse(br#"{"errcode":40029,"errmsg":"invalid code"}"#),
            Some(json!({"errcode":40029,"errmsg":"invalid code"}))
        );
        assert_eq!(parse(b"[1]"), Some(json!([1])));
    }

    #[test]
    fn qq_jsonp_exact_bytes() {
        let body = b"callback( {\"client_id\":\"101364207\",\"openid\":\"805CFCB3AFEA40CA7CE4B6D8A8668793\"} );\n";
        assert_eq!(
            parse(body),
            Some(json!({"client_id":"101364207","openid":"805CFCB3AFEA40CA7CE4B6D8A8668793"}))
        );
        assert_eq!(
            parse(b"callback( {\"error\":100019,\"error_description\":\"code to access token error\"} );"),
            Some(json!({"error":100019,"error_description":"code to access token error"}))
        );
    }

    #[test]
    fn form_bodies() {
        assert_eq!(
            parse(b"access_token=gho_16C7e42F292c6912E7710c838347Ae178B4a&scope=repo%2Cgist&token_type=bearer"),
            Some(json!({"access_token":"gho_16C7e42F292c6912E7710c838347Ae178B4a","scope":"repo,gist","token_type":"bearer"}))
        );
        assert_eq!(
            parse(b"error=bad_verification_code"),
            Some(json!({"error":"bad_verification_code"}))
        );
    }

    #[test]
    fn garbage_is_none() {
        for body in [
            &b""[..],
            b"<html>not json",
            b"<html><body>a=b</body></html>",
            b"42",
            b"\xff\xfe",
            b"callback( not json );",
            b"=x",
        ] {
            assert_eq!(parse(body), None, "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn scalars_in_either_form() {
        assert_eq!(scalar_u64(&json!("7776000")), Some(7_776_000));
        assert_eq!(scalar_u64(&json!(7200)), Some(7200));
        assert_eq!(scalar_u64(&json!(-1)), None);
        assert_eq!(scalar_string(&json!(1404376560)), Some("1404376560".into()));
        assert_eq!(scalar_bool(&json!("true")), Some(true));
        assert_eq!(scalar_bool(&json!(false)), Some(false));
    }

    #[test]
    fn lifetimes_beyond_a_century_are_refused() {
        use std::time::Duration;
        assert_eq!(lifetime(&json!(7200)), Ok(Some(Duration::from_secs(7200))));
        assert_eq!(lifetime(&json!("-5")), Ok(None));
        assert_eq!(
            lifetime(&json!(MAX_LIFETIME_SECS)),
            Ok(Some(Duration::from_secs(MAX_LIFETIME_SECS)))
        );
        assert!(lifetime(&json!(99_999_999_999_999u64)).is_err());
        assert!(lifetime(&json!("99999999999999")).is_err());
        assert!(lifetime(&json!(u64::MAX)).is_err());
    }
}
