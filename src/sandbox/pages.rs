//! The sandbox's HTML: the consent picker and the error page, with the
//! headers that keep them from being cached, framed or sniffed.

use std::{borrow::Cow, fmt::Write as _};

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use url::{Url, form_urlencoded};

/// The users offered on the picker page; any other name may be typed in.
const TEST_USERS: [&str; 3] = ["alice", "bob", "carol"];

pub(super) fn html(status: StatusCode, body: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // No `form-action`: browsers apply it to the redirect that follows
            // the form, which leaves for the app's origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body.to_owned(),
    )
        .into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;background:#f4f5f7;color:#1f2328;margin:0}\
main{max-width:30rem;margin:3rem auto;background:#fff;border:1px solid #d0d7de;border-radius:12px;padding:1.5rem 2rem}\
h1{font-size:1.25rem;margin:0 0 1rem}h2{font-size:1rem;margin:1.5rem 0 .5rem}\
code{background:#eef1f4;border-radius:4px;padding:0 .3em;overflow-wrap:anywhere}\
ul{list-style:none;padding:0;margin:0}li{margin:.4rem 0}\
a.user{display:flex;align-items:center;gap:.6rem;padding:.5rem .75rem;border:1px solid #d0d7de;border-radius:8px;color:inherit;text-decoration:none}\
a.user:hover{background:#f6f8fa}img{width:28px;height:28px;border-radius:50%}\
form{display:flex;gap:.5rem;margin-top:.75rem}input{flex:1;padding:.4rem;border:1px solid #d0d7de;border-radius:6px}\
button{padding:.4rem .9rem;border:0;border-radius:6px;background:#1f6feb;color:#fff}\
a.deny{color:#cf222e}.note{color:#656d76;font-size:.85rem;margin-top:1.5rem}.error{color:#cf222e}";

fn page(body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>authbroker sandbox</title><style>{STYLE}</style></head>\
<body><main>{body}</main></body></html>\n"
    )
}

pub(super) fn error_page(problem: &str) -> String {
    page(&format!(
        "<h1>authbroker sandbox</h1><p class=\"error\"><strong>This authorization request is invalid.</strong></p>\
<p>{}</p><p class=\"note\">The sandbox does not redirect back on a bad request, \
so a misconfigured client cannot be used to bounce users elsewhere.</p>",
        escape(problem)
    ))
}

/// The consent page. Links reuse the query exactly as received plus one
/// parameter, so nothing the client sent is lost or re-encoded.
pub(super) fn picker_page(
    raw_query: &str,
    client_id: &str,
    scope: &str,
    redirect_uri: &Url,
) -> String {
    let mut body = String::with_capacity(4096);
    let _ = write!(
        body,
        "<h1>authbroker sandbox</h1><p><strong>{}</strong> asks you to sign in.</p>",
        escape(client_id)
    );
    body.push_str("<p>Scopes: ");
    if scope.is_empty() {
        body.push_str("<em>none</em>");
    }
    for one in scope.split(' ').filter(|s| !s.is_empty()) {
        let _ = write!(body, "<code>{}</code> ", escape(one));
    }
    let _ = write!(
        body,
        "</p><p>Returns to <code>{}</code></p><h2>Sign in as a test user</h2><ul>",
        escape(redirect_uri.as_str())
    );
    for user in TEST_USERS {
        let href = format!("?{raw_query}&sandbox_user={user}");
        let _ = write!(
            body,
            "<li><a class=\"user\" href=\"{}\"><img src=\"avatar/{user}.svg\" alt=\"\">{user}</a></li>",
            escape(&href)
        );
    }
    body.push_str("</ul><form method=\"get\">");
    for (key, value) in form_urlencoded::parse(raw_query.as_bytes()) {
        let _ = write!(
            body,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            escape(&key),
            escape(&value)
        );
    }
    let _ = write!(
        body,
        "<input name=\"sandbox_user\" placeholder=\"any name\" required maxlength=\"64\" \
pattern=\"[A-Za-z0-9_.\\-]{{1,64}}\" aria-label=\"user name\"><button>Sign in</button></form>\
<p><a class=\"deny\" href=\"{}\">Deny</a></p>\
<p class=\"note\">Development provider: anyone can sign in as anyone. \
Append <code>&amp;sandbox_user=NAME</code> to the authorize URL to skip this page.</p>",
        escape(&format!("?{raw_query}&sandbox_deny=1"))
    );
    page(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_html_metacharacters() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
    }
}
