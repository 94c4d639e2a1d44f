//! The authorize request as an OpenID Connect provider checks it, for the
//! emulators of OIDC presets (microsoft, apple): the URL is the emulator's
//! authorize endpoint, the client and redirect URI are the registered
//! ones, `response_type=code`, a state, known scopes including `openid`,
//! a nonce, and a PKCE S256 challenge or none. Provider-specific rules
//! (Apple's `response_mode`) are checked by the caller on `params`.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{
    CodeGrant,
    wire::{check_origin, expect_param, scope_list, single, state_param},
};

/// Who the emulator is and what it registered.
pub struct Registered<'a> {
    pub base_url: &'a str,
    pub path: &'a str,
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub scopes: &'a [&'a str],
    /// The provider's name in messages.
    pub provider: &'a str,
    /// The error a real provider answers an unknown client with.
    pub unknown_client: &'a str,
}

/// A checked authorize request.
pub struct Authorize {
    pub params: Vec<(String, String)>,
    pub state: String,
    pub grant: CodeGrant,
}

/// Checks `authorize_url` as the provider would; `Err` says why it refuses.
pub fn check(r: &Registered, authorize_url: &str, seed: &str) -> Result<Authorize, String> {
    let url = url::Url::parse(authorize_url).map_err(|e| format!("not a URL: {e}"))?;
    check_origin(&url, r.base_url)?;
    if url.path() != r.path || url.fragment().is_some() {
        return Err(format!("{authorize_url} is not {}", r.path));
    }
    let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    expect_param(&params, "client_id", r.client_id, Some(r.unknown_client))?;
    expect_param(
        &params,
        "redirect_uri",
        r.redirect_uri,
        Some("invalid_request"),
    )?;
    expect_param(
        &params,
        "response_type",
        "code",
        Some("unsupported_response_type"),
    )?;
    let state = state_param(&params)?;
    let scopes = scope_list(&params, ' ', r.scopes, &[], r.provider)?;
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
    let mut grant = CodeGrant::redirected(seed, r.client_id, r.redirect_uri, scopes);
    grant.challenge = challenge;
    grant.nonce = Some(nonce.to_string());
    Ok(Authorize {
        params,
        state,
        grant,
    })
}
