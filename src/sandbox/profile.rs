//! `GET /userinfo` (RFC 6750 bearer) and the test users' avatars. A test
//! user's subject is derived from its name, so bindings survive restarts.

use std::{sync::Arc, time::Instant};

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{
    authorize::is_user_name,
    grants::{ACCESS_TOKEN_PREFIX, Sandbox, parse_key},
    token::ErrorBody,
};

#[derive(Serialize)]
struct UserInfo {
    sub: String,
    preferred_username: String,
    name: String,
    email: String,
    email_verified: bool,
    picture: String,
}

pub(super) async fn userinfo(State(sandbox): State<Arc<Sandbox>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(bearer) = bearer else {
        return invalid_token("No `Authorization: Bearer` access token was sent.");
    };
    let grant = match bearer.strip_prefix(ACCESS_TOKEN_PREFIX).and_then(parse_key) {
        Some(key) => sandbox.access_tokens.get(&key).await,
        None => None,
    }
    .filter(|g| g.expires_at > Instant::now());
    let Some(grant) = grant else {
        return invalid_token("The access token is unknown or expired.");
    };
    let name = &*grant.user;
    let info = UserInfo {
        sub: subject_for(name).to_string(),
        preferred_username: name.to_owned(),
        name: display_name(name),
        email: format!("{name}@sandbox.test"),
        email_verified: true,
        picture: format!("{}/avatar/{name}.svg", sandbox.origin),
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(info),
    )
        .into_response()
}

/// RFC 6750 §3: 401 with a `WWW-Authenticate: Bearer` challenge.
fn invalid_token(description: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"sandbox\", error=\"invalid_token\"",
        )],
        Json(ErrorBody {
            error: "invalid_token",
            error_description: description,
        }),
    )
        .into_response()
}

/// The stable subject of a test user: the first 8 bytes (big-endian) of
/// SHA-256("sandbox:" + name). Stable across restarts, so bindings survive.
fn subject_for(name: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"sandbox:")
        .chain_update(name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `alice` -> `Alice`.
fn display_name(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `GET /avatar/{name}.svg`: a coloured initial, so the picker has faces.
pub(super) async fn avatar(Path(file): Path<String>) -> Response {
    let Some(name) = file.strip_suffix(".svg").filter(|n| is_user_name(n)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    const COLOURS: [&str; 6] = [
        "#1f6feb", "#8250df", "#bf3989", "#cf222e", "#bc4c00", "#1a7f37",
    ];
    // Invariant: `is_user_name` guarantees a first ASCII character.
    let initial = name[..1].to_ascii_uppercase();
    let colour = COLOURS[(subject_for(name) % COLOURS.len() as u64) as usize];
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"64\" height=\"64\" viewBox=\"0 0 64 64\">\
<circle cx=\"32\" cy=\"32\" r=\"32\" fill=\"{colour}\"/>\
<text x=\"32\" y=\"43\" font-family=\"sans-serif\" font-size=\"30\" fill=\"#fff\" text-anchor=\"middle\">{initial}</text></svg>"
    );
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        svg,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_is_stable_and_distinct() {
        assert_eq!(subject_for("alice"), subject_for("alice"));
        assert_ne!(subject_for("alice"), subject_for("bob"));
        assert_ne!(subject_for("alice"), subject_for("Alice"));
        // Pinned: bindings made by earlier versions must keep resolving.
        assert_eq!(subject_for("alice"), 12617301175701908547);
        let digest = Sha256::digest(b"sandbox:alice");
        assert_eq!(
            subject_for("alice"),
            u64::from_be_bytes(digest[..8].try_into().unwrap())
        );
    }

    #[test]
    fn display_name_capitalises() {
        assert_eq!(display_name("alice"), "Alice");
        assert_eq!(display_name("9lives"), "9lives");
    }
}
