#![allow(dead_code)]
//! The Google OIDC emulator over real HTTP: discovery, JWKS, ID tokens that
//! verify (or fail to, exactly as each tamper says) against the published
//! keys, single-use codes, PKCE, refresh, userinfo, revoke and faults. If
//! the emulator drifts from docs/providers.md#google, the provider suite lies.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::Url;

use crate::support::emulators::{
    Emulator, Step,
    google::{
        self, Alg, CLIENT_ID, CLIENT_SECRET, EMAIL_SCOPE_URL, GoogleEmulator, LEGACY_ISSUER,
        OTHER_CLIENT_ID, PROFILE_SCOPE_URL, REDIRECT_URI, Tamper, WRONG_ISSUER, WRONG_NONCE,
    },
};
use crate::support::faults::{Fault, GARBAGE_BODY};

const NONCE: &str = "n-0S6_WzA2Mj";
const STATE: &str = "af0ifjsldkj/+=&";
const FULL_SCOPE: &str = "openid https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/userinfo.profile";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("authbroker-emulator-tests")
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A PKCE pair: (verifier, S256 challenge).
fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// What authbroker would send to the browser; `extra` overrides or adds.
fn authorize_url(emu: &GoogleEmulator, challenge: Option<&str>, extra: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", CLIENT_ID),
        ("redirect_uri", REDIRECT_URI),
        ("scope", "openid email profile"),
        ("state", STATE),
        ("nonce", NONCE),
    ];
    if let Some(challenge) = challenge {
        pairs.push(("code_challenge", challenge));
        pairs.push(("code_challenge_method", "S256"));
    }
    for (k, v) in extra {
        pairs.retain(|(key, _)| key != k);
        if !v.is_empty() {
            pairs.push((k, v));
        }
    }
    let mut url = Url::parse(&emu.url(google::AUTHORIZE_PATH)).unwrap();
    url.query_pairs_mut().extend_pairs(pairs);
    url.to_string()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Browser step with PKCE; returns (code, verifier).
fn approve(emu: &GoogleEmulator, seed: &str, extra: &[(&str, &str)]) -> (String, String) {
    let (verifier, challenge) = pkce();
    let back = emu
        .approve(&authorize_url(emu, Some(&challenge), extra), seed)
        .expect("approved");
    (param(&back, "code").unwrap().to_owned(), verifier)
}

struct Answer {
    status: StatusCode,
    headers: header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
}

async fn read(response: reqwest::Response) -> Answer {
    Answer {
        status: response.status(),
        headers: response.headers().clone(),
        text: response.text().await.unwrap(),
    }
}

async fn post_token(emu: &GoogleEmulator, form: &[(&str, &str)]) -> Answer {
    read(
        client()
            .post(emu.url(google::TOKEN_PATH))
            .form(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn redeem(emu: &GoogleEmulator, code: &str, verifier: Option<&str>) -> Answer {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("redirect_uri", REDIRECT_URI),
    ];
    if let Some(verifier) = verifier {
        form.push(("code_verifier", verifier));
    }
    post_token(emu, &form).await
}

async fn refresh(emu: &GoogleEmulator, token: &str) -> Answer {
    post_token(
        emu,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .await
}

/// A whole login for `seed` (registered here); returns the token answer.
async fn login(emu: &GoogleEmulator, seed: &str, extra: &[(&str, &str)]) -> Value {
    emu.add_user(seed);
    let (code, verifier) = approve(emu, seed, extra);
    let answer = redeem(emu, &code, Some(&verifier)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    answer.json()
}

async fn get(url: String) -> Answer {
    read(client().get(url).send().await.unwrap()).await
}

async fn jwk_set(emu: &GoogleEmulator) -> JwkSet {
    let answer = get(emu.url(google::JWKS_PATH)).await;
    assert_eq!(answer.status, StatusCode::OK);
    serde_json::from_str(&answer.text).unwrap()
}

async fn userinfo(emu: &GoogleEmulator, authorization: Option<&str>) -> Answer {
    let mut request = client().get(emu.url(google::USERINFO_PATH));
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    read(request.send().await.unwrap()).await
}

async fn revoke_form(emu: &GoogleEmulator, token: &str) -> Answer {
    read(
        client()
            .post(emu.url(google::REVOKE_PATH))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn segment(jwt: &str, index: usize) -> Value {
    let part = jwt.split('.').nth(index).expect("a JWT segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// The claims, unverified.
fn claims(jwt: &str) -> Value {
    segment(jwt, 1)
}

fn jwt_header(jwt: &str) -> Value {
    segment(jwt, 0)
}

/// What a careful relying party does with a Google ID token (OIDC Core
/// §3.1.3.7): signature by a JWKS key, `iss` (URL or legacy form), `aud`,
/// `azp` when several audiences, `exp`, `iat` not in the future, `nonce`.
fn validate(jwks: &JwkSet, issuer: &str, jwt: &str, nonce: Option<&str>) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(jwt).map_err(|e| format!("header: {e}"))?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk: &Jwk = jwks.find(&kid).ok_or(format!("unknown kid {kid}"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("jwk: {e}"))?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[issuer, LEGACY_ISSUER]);
    validation.set_audience(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .map_err(|e| format!("decode: {e}"))?;
    let claims = data.claims;
    let several = claims["aud"].as_array().is_some_and(|a| a.len() > 1);
    match claims.get("azp") {
        None if several => return Err("several audiences and no azp".into()),
        Some(azp) if azp != CLIENT_ID => return Err(format!("azp {azp}")),
        _ => {}
    }
    if claims["iat"].as_i64().ok_or("iat")? > now() + 60 {
        return Err("issued in the future".into());
    }
    if claims.get("nonce").and_then(Value::as_str) != nonce {
        return Err(format!("nonce {:?}", claims.get("nonce")));
    }
    match &claims["email_verified"] {
        Value::Bool(_) | Value::Null => {}
        Value::String(s) if s == "true" || s == "false" => {}
        other => return Err(format!("email_verified {other}")),
    }
    Ok(claims)
}

// ---------------------------------------------------------------------------
// Discovery and JWKS

#[tokio::test]
async fn discovery_points_everything_at_the_emulator() {
    let emu = GoogleEmulator::start().await;
    let base = emu.base_url.clone();
    assert!(base.starts_with("http://127.0.0.1:") && !base.ends_with('/'));
    assert_eq!(emu.issuer(), base);
    assert_eq!(emu.discovery_fetches(), 0);

    let answer = get(emu.url(google::DISCOVERY_PATH)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers[header::CONTENT_TYPE],
        "application/json; charset=utf-8"
    );
    assert_eq!(
        answer.headers[header::CACHE_CONTROL],
        "public, max-age=3600"
    );
    let doc = answer.json();
    assert_eq!(doc["issuer"], base);
    assert_eq!(
        doc["authorization_endpoint"],
        format!("{base}/o/oauth2/v2/auth")
    );
    assert_eq!(doc["token_endpoint"], format!("{base}/token"));
    assert_eq!(doc["userinfo_endpoint"], format!("{base}/v1/userinfo"));
    assert_eq!(doc["revocation_endpoint"], format!("{base}/revoke"));
    assert_eq!(doc["jwks_uri"], format!("{base}/oauth2/v3/certs"));
    assert_eq!(
        doc["code_challenge_methods_supported"],
        json!(["plain", "S256"])
    );
    assert_eq!(doc["subject_types_supported"], json!(["public"]));
    assert_eq!(
        doc["scopes_supported"],
        json!(["openid", "email", "profile"])
    );
    assert_eq!(
        doc["token_endpoint_auth_methods_supported"],
        json!(["client_secret_post", "client_secret_basic"])
    );
    for alg in ["RS256", "ES256", "EdDSA"] {
        assert!(
            doc["id_token_signing_alg_values_supported"]
                .as_array()
                .unwrap()
                .contains(&json!(alg))
        );
    }
    let grants = doc["grant_types_supported"].as_array().unwrap();
    assert!(grants.contains(&json!("authorization_code")));
    assert!(grants.contains(&json!("refresh_token")));
    assert!(
        doc["response_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("code"))
    );
    assert!(
        doc["claims_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("email_verified"))
    );
    // Every advertised endpoint the emulator serves answers on its own port.
    for key in [
        "token_endpoint",
        "userinfo_endpoint",
        "revocation_endpoint",
        "jwks_uri",
    ] {
        assert!(doc[key].as_str().unwrap().starts_with(&base), "{key}");
    }
    assert_eq!(emu.discovery_fetches(), 1);

    emu.set_pkce_advertised(false);
    emu.set_discovery_issuer(Some("https://accounts.google.com".into()));
    let doc = get(emu.url(google::DISCOVERY_PATH)).await.json();
    assert!(doc.get("code_challenge_methods_supported").is_none());
    assert_eq!(doc["issuer"], "https://accounts.google.com");
    assert_eq!(doc["token_endpoint"], format!("{base}/token"));
    emu.set_discovery_issuer(None);
    assert_eq!(
        get(emu.url(google::DISCOVERY_PATH)).await.json()["issuer"],
        base
    );
    assert_eq!(emu.discovery_fetches(), 3);
    assert_eq!(emu.jwks_fetches(), 0);

    let seen = emu.requests();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.step == Step::Discovery
        && r.method == "GET"
        && r.path == google::DISCOVERY_PATH
        && r.status == 200));
    assert!(emu.violations().is_empty());
}

#[tokio::test]
async fn jwks_publishes_three_key_families_with_cache_control() {
    let emu = GoogleEmulator::start().await;
    let answer = get(emu.url(google::JWKS_PATH)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers[header::CACHE_CONTROL],
        "public, max-age=3600, must-revalidate, no-transform"
    );
    assert!(
        answer.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc = answer.json();
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    let rsa = &keys[0];
    assert_eq!(rsa["kty"], "RSA");
    assert_eq!(rsa["alg"], "RS256");
    assert_eq!(rsa["use"], "sig");
    assert_eq!(rsa["e"], "AQAB");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(rsa["n"].as_str().unwrap())
            .unwrap()
            .len(),
        256
    );
    let ec = &keys[1];
    assert_eq!(
        (&ec["kty"], &ec["crv"], &ec["alg"]),
        (&json!("EC"), &json!("P-256"), &json!("ES256"))
    );
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(ec["x"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(ec["y"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );
    let ed = &keys[2];
    assert_eq!(
        (&ed["kty"], &ed["crv"], &ed["alg"]),
        (&json!("OKP"), &json!("Ed25519"), &json!("EdDSA"))
    );
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(ed["x"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );
    let kids: std::collections::HashSet<&str> =
        keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids.len(), 3);
    assert!(kids.iter().all(|k| k.len() == 40));
    // jsonwebtoken understands every key.
    let set: JwkSet = serde_json::from_value(doc.clone()).unwrap();
    for jwk in &set.keys {
        DecodingKey::from_jwk(jwk).unwrap();
    }

    emu.set_jwks_max_age(17);
    let answer = get(emu.url(google::JWKS_PATH)).await;
    assert_eq!(
        answer.headers[header::CACHE_CONTROL],
        "public, max-age=17, must-revalidate, no-transform"
    );
    assert_eq!(emu.jwks_fetches(), 2);
    assert_eq!(emu.discovery_fetches(), 0);
    assert!(
        emu.requests()
            .iter()
            .all(|r| r.step == Step::Discovery && r.path == google::JWKS_PATH)
    );
}

// ---------------------------------------------------------------------------
// The login itself

#[tokio::test]
async fn full_login_verifies_with_every_algorithm() {
    let emu = GoogleEmulator::start().await;
    let expected = emu.add_user("alice");
    let user = emu.user("alice");
    assert_eq!(expected.subject, user.sub);
    assert_eq!(user.sub.len(), 21);
    assert!(user.sub.chars().all(|c| c.is_ascii_digit()));
    assert_eq!(expected.username, "");
    assert_eq!(expected.display_name, "Alice Tester");
    assert!(
        expected
            .avatar_url
            .starts_with("https://lh3.googleusercontent.com/a/")
    );
    assert_eq!(expected.email, "alice@gmail.com");
    assert!(expected.email_verified);
    assert_eq!(expected.union_id, "");
    assert_eq!(
        GoogleEmulator::start().await.add_user("alice"),
        expected,
        "stable per seed"
    );

    for alg in Alg::ALL {
        emu.set_signing_alg(alg);
        let (verifier, challenge) = pkce();
        let back = emu
            .approve(&authorize_url(&emu, Some(&challenge), &[]), "alice")
            .unwrap();
        let names: Vec<&str> = back.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["code", "state", "scope", "authuser", "prompt"]);
        let code = param(&back, "code").unwrap();
        assert!(code.starts_with("4/0A"), "{code}");
        assert_eq!(param(&back, "state"), Some(STATE));
        assert_eq!(
            param(&back, "scope"),
            Some(
                "email profile https://www.googleapis.com/auth/userinfo.profile https://www.googleapis.com/auth/userinfo.email openid"
            )
        );
        assert_eq!(param(&back, "authuser"), Some("0"));
        assert_eq!(param(&back, "prompt"), Some("consent"));

        let answer = redeem(&emu, code, Some(&verifier)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(
            answer.headers[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
        let body = answer.json();
        let keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "access_token",
                "expires_in",
                "id_token",
                "scope",
                "token_type"
            ]
        );
        // Google's own key order on the wire.
        let at = |k: &str| answer.text.find(&format!("\"{k}\"")).unwrap();
        assert!(at("access_token") < at("expires_in") && at("expires_in") < at("scope"));
        assert!(at("scope") < at("token_type") && at("token_type") < at("id_token"));
        let access = body["access_token"].as_str().unwrap();
        assert!(access.starts_with("ya29."));
        assert_eq!(body["expires_in"], 3599);
        assert_eq!(body["scope"], FULL_SCOPE);
        assert_eq!(body["token_type"], "Bearer");

        let id_token = body["id_token"].as_str().unwrap();
        let header = jwt_header(id_token);
        assert_eq!(header["alg"], alg.name());
        assert_eq!(header["kid"], emu.signing_kid());
        let claims = validate(&jwk_set(&emu).await, &emu.base_url, id_token, Some(NONCE))
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(claims["iss"], emu.base_url);
        assert_eq!(claims["aud"], CLIENT_ID);
        assert_eq!(claims["azp"], CLIENT_ID);
        assert_eq!(claims["sub"], user.sub);
        assert_eq!(claims["email"], user.email);
        assert_eq!(claims["email_verified"], true);
        assert_eq!(claims["name"], user.name);
        assert_eq!(claims["given_name"], "Alice");
        assert_eq!(claims["family_name"], "Tester");
        assert_eq!(claims["picture"], user.picture);
        assert_eq!(claims["nonce"], NONCE);
        let iat = claims["iat"].as_i64().unwrap();
        assert!((iat - now()).abs() <= 5);
        assert_eq!(claims["exp"].as_i64().unwrap(), iat + 3600);
        if alg == Alg::EdDsa {
            assert!(claims.get("at_hash").is_none());
        } else {
            let digest = Sha256::digest(access.as_bytes());
            assert_eq!(claims["at_hash"], URL_SAFE_NO_PAD.encode(&digest[..16]));
        }
        assert!(emu.access_token_valid(access));
    }

    let token_calls: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.path == google::TOKEN_PATH)
        .collect();
    assert_eq!(token_calls.len(), 3);
    for r in &token_calls {
        assert_eq!(r.step, Step::Token);
        assert_eq!(r.method, "POST");
        assert_eq!(r.status, 200);
        assert_eq!(r.param("grant_type"), Some("authorization_code"));
        assert_eq!(r.param("client_id"), Some(CLIENT_ID));
        assert_eq!(r.param("redirect_uri"), Some(REDIRECT_URI));
        for secret in ["code", "client_secret", "code_verifier"] {
            assert_eq!(r.param(secret), Some("<redacted>"), "{secret}");
        }
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(r.user_agent.as_deref(), Some("authbroker-emulator-tests"));
    }
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn codes_are_single_use_and_expire() {
    let emu = GoogleEmulator::start().await;
    emu.add_user("bob");
    let (code, verifier) = approve(&emu, "bob", &[]);
    assert_eq!(
        redeem(&emu, &code, Some(&verifier)).await.status,
        StatusCode::OK
    );
    let again = redeem(&emu, &code, Some(&verifier)).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        again.json(),
        json!({"error": "invalid_grant", "error_description": "Bad Request"})
    );

    let bogus = redeem(&emu, "4/0Anot-a-code", Some(&verifier)).await;
    assert_eq!(bogus.status, StatusCode::BAD_REQUEST);
    assert_eq!(bogus.json()["error"], "invalid_grant");

    let (code, verifier) = approve(&emu, "bob", &[]);
    emu.expire_codes();
    let expired = redeem(&emu, &code, Some(&verifier)).await;
    assert_eq!(expired.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        expired.json(),
        json!({"error": "invalid_grant", "error_description": "Bad Request"})
    );

    // The redirect_uri must be the authorize one.
    let (code, verifier) = approve(&emu, "bob", &[]);
    let answer = post_token(
        &emu,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("redirect_uri", "https://app.example.com/other"),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "redirect_uri_mismatch");
}

#[tokio::test]
async fn pkce_is_checked_and_follows_discovery() {
    let emu = GoogleEmulator::start().await;
    emu.add_user("carol");

    let (code, _) = approve(&emu, "carol", &[]);
    let wrong = redeem(
        &emu,
        &code,
        Some("the-wrong-verifier-the-wrong-verifier-xxxxx"),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        wrong.json(),
        json!({"error": "invalid_grant", "error_description": "Invalid code verifier."})
    );
    let (code, _) = approve(&emu, "carol", &[]);
    let missing = redeem(&emu, &code, None).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.json(),
        json!({"error": "invalid_grant", "error_description": "Missing code verifier."})
    );
    // Advertised: a URL without a challenge is refused.
    assert!(
        emu.approve(&authorize_url(&emu, None, &[]), "carol")
            .is_err()
    );
    assert_eq!(emu.violations().len(), 1);

    let emu = GoogleEmulator::start().await;
    emu.add_user("carol");
    emu.set_pkce_advertised(false);
    let back = emu
        .approve(&authorize_url(&emu, None, &[]), "carol")
        .unwrap();
    let answer = redeem(&emu, param(&back, "code").unwrap(), None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert!(emu.violations().is_empty());
    // Not advertised, but sent anyway: a violation, and ignored.
    let (verifier, challenge) = pkce();
    let back = emu
        .approve(&authorize_url(&emu, Some(&challenge), &[]), "carol")
        .unwrap();
    let answer = redeem(&emu, param(&back, "code").unwrap(), Some(&verifier)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let violations = emu.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations[0].contains("PKCE"));
    assert!(violations[1].contains("code_verifier"));
}

#[tokio::test]
async fn authorize_urls_are_checked_like_google() {
    let emu = GoogleEmulator::start().await;
    emu.add_user("dave");
    let (_, challenge) = pkce();
    let url = |extra: &[(&str, &str)]| authorize_url(&emu, Some(&challenge), extra);
    assert!(emu.approve(&url(&[]), "dave").is_ok());
    assert!(
        emu.approve(
            &url(&[
                ("access_type", "offline"),
                ("prompt", "consent"),
                ("login_hint", "dave@gmail.com")
            ]),
            "dave"
        )
        .is_ok()
    );
    let refused: [&[(&str, &str)]; 14] = [
        &[("nonce", "")],
        &[("state", "")],
        &[("scope", "email profile")],
        &[("scope", "openid,email,profile")],
        &[("scope", "openid email bogus")],
        &[("response_type", "token")],
        &[("client_id", "someone-else.apps.googleusercontent.com")],
        &[("redirect_uri", "https://app.example.com/oauth/callback/")],
        &[("redirect_uri", "")],
        &[("code_challenge_method", "plain")],
        &[("code_challenge_method", "")],
        &[("code_challenge", "short")],
        &[("access_type", "forever")],
        &[("sandbox_user", "dave")],
    ];
    for extra in refused {
        let why = emu
            .approve(&url(extra), "dave")
            .expect_err(&format!("{extra:?}"));
        assert!(!why.is_empty());
    }
    assert_eq!(emu.violations().len(), refused.len());
    let wrong_path = url(&[]).replace("/o/oauth2/v2/auth", "/o/oauth2/auth");
    assert!(emu.approve(&wrong_path, "dave").is_err());
    let wrong_host = url(&[]).replace(&emu.base_url, "https://accounts.google.com");
    assert!(emu.approve(&wrong_host, "dave").is_err());
    let doubled = format!("{}&state=again", url(&[]));
    assert!(emu.approve(&doubled, "dave").is_err());
    assert!(
        emu.approve(&url(&[]), "nobody").is_err(),
        "unregistered user"
    );

    let denied = emu.deny(&url(&[])).unwrap();
    assert_eq!(
        denied,
        vec![
            ("error".to_owned(), "access_denied".to_owned()),
            ("state".to_owned(), STATE.to_owned())
        ]
    );
}

#[tokio::test]
async fn client_authentication_post_or_basic() {
    let emu = GoogleEmulator::start().await;
    emu.add_user("erin");
    let (code, verifier) = approve(&emu, "erin", &[]);
    let answer = read(
        client()
            .post(emu.url(google::TOKEN_PATH))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", REDIRECT_URI),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let seen = emu.requests().pop().unwrap();
    assert_eq!(seen.authorization.as_deref(), Some("Basic"));

    let (code, verifier) = approve(&emu, "erin", &[]);
    let answer = post_token(
        &emu,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", CLIENT_ID),
            ("client_secret", "GOCSPX-wrong"),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.json(),
        json!({"error": "invalid_client", "error_description": "Unauthorized"})
    );
    // A refused client does not burn the code.
    assert_eq!(
        redeem(&emu, &code, Some(&verifier)).await.status,
        StatusCode::OK
    );

    let answer = post_token(
        &emu,
        &[("grant_type", "authorization_code"), ("code", "4/0Ax")],
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "invalid_request");
    let answer = post_token(
        &emu,
        &[
            ("grant_type", "password"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json(),
        json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type: password"})
    );
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn badly_shaped_token_requests_are_violations() {
    let emu = GoogleEmulator::start().await;
    emu.add_user("fay");
    let (code, verifier) = approve(&emu, "fay", &[]);
    let json_body = read(
        client()
            .post(emu.url(google::TOKEN_PATH))
            .json(&json!({
                "grant_type": "authorization_code", "code": code, "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "redirect_uri": REDIRECT_URI, "code_verifier": verifier,
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(json_body.status, StatusCode::BAD_REQUEST);
    let in_query = read(
        client()
            .post(format!(
                "{}?client_secret={CLIENT_SECRET}",
                emu.url(google::TOKEN_PATH)
            ))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(in_query.status, StatusCode::BAD_REQUEST);
    let seen = emu.requests().pop().unwrap();
    assert_eq!(seen.param("client_secret"), Some("<redacted>"));
    assert_eq!(seen.status, 400);
    let violations = emu.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations[0].contains("x-www-form-urlencoded"));
    assert!(violations[1].contains("query"));
}

#[tokio::test]
async fn refresh_tokens_only_offline_and_reusable() {
    let emu = GoogleEmulator::start().await;
    let online = login(&emu, "gus", &[]).await;
    assert!(online.get("refresh_token").is_none());

    let offline = login(
        &emu,
        "gus",
        &[("access_type", "offline"), ("prompt", "consent")],
    )
    .await;
    let rt = offline["refresh_token"].as_str().unwrap().to_owned();
    assert!(rt.starts_with("1//"), "{rt}");
    let text_order = serde_json::to_string(&offline).unwrap();
    assert!(text_order.contains("refresh_token"));

    for _ in 0..2 {
        let answer = refresh(&emu, &rt).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        let body = answer.json();
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "access_token",
                "expires_in",
                "id_token",
                "scope",
                "token_type"
            ]
        );
        assert_eq!(body["expires_in"], 3599);
        assert_eq!(body["scope"], FULL_SCOPE);
        let access = body["access_token"].as_str().unwrap();
        assert!(emu.access_token_valid(access));
        let claims = validate(
            &jwk_set(&emu).await,
            &emu.base_url,
            body["id_token"].as_str().unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(claims["sub"], emu.user("gus").sub);
    }
    let bad = refresh(&emu, "1//0gnot-a-token").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.json(),
        json!({"error": "invalid_grant", "error_description": "Bad Request"})
    );
    let wrong_client = post_token(
        &emu,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", CLIENT_ID),
            ("client_secret", "nope"),
        ],
    )
    .await;
    assert_eq!(wrong_client.status, StatusCode::UNAUTHORIZED);

    let steps: Vec<Step> = emu
        .requests()
        .iter()
        .filter(|r| r.path == google::TOKEN_PATH)
        .map(|r| r.step)
        .collect();
    assert_eq!(
        steps,
        [
            Step::Token,
            Step::Token,
            Step::Refresh,
            Step::Refresh,
            Step::Refresh,
            Step::Refresh
        ]
    );
    assert_eq!(
        emu.requests().last().unwrap().param("refresh_token"),
        Some("<redacted>")
    );

    let (access, refresh_token) = emu.issue_tokens("gus");
    assert!(emu.access_token_valid(&access));
    assert_eq!(
        refresh(&emu, &refresh_token.unwrap()).await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------
// Attacks on the ID token

#[tokio::test]
async fn every_tamper_does_what_it_says() {
    let emu = GoogleEmulator::start().await;
    for tamper in Tamper::ALL {
        emu.set_id_token_tamper(tamper);
        let body = login(&emu, "hana", &[]).await;
        let jwt = body["id_token"].as_str().unwrap();
        let c = claims(jwt);
        let verdict = validate(&jwk_set(&emu).await, &emu.base_url, jwt, Some(NONCE));
        assert_eq!(
            verdict.is_ok(),
            tamper.accepted(),
            "{tamper:?}: {verdict:?} {c}"
        );
        match tamper {
            Tamper::None => assert_eq!(c["iss"], emu.base_url),
            Tamper::WrongIssuer => assert_eq!(c["iss"], WRONG_ISSUER),
            Tamper::LegacyIssuer => assert_eq!(c["iss"], "accounts.google.com"),
            Tamper::WrongAudience => {
                assert_eq!(c["aud"], OTHER_CLIENT_ID);
                assert_eq!(c["azp"], OTHER_CLIENT_ID);
            }
            Tamper::ExtraAudienceWithoutAzp => {
                assert_eq!(c["aud"], json!([CLIENT_ID, OTHER_CLIENT_ID]));
                assert!(c.get("azp").is_none());
            }
            Tamper::ExtraAudienceWithAzp => {
                assert_eq!(c["aud"], json!([CLIENT_ID, OTHER_CLIENT_ID]));
                assert_eq!(c["azp"], CLIENT_ID);
            }
            Tamper::WrongAzp => {
                assert_eq!(c["aud"], CLIENT_ID);
                assert_eq!(c["azp"], OTHER_CLIENT_ID);
            }
            Tamper::Expired => {
                assert!(c["exp"].as_i64().unwrap() <= now() - 590);
                assert!(c["iat"].as_i64().unwrap() < c["exp"].as_i64().unwrap());
            }
            Tamper::IssuedInFuture => {
                assert!(c["iat"].as_i64().unwrap() >= now() + 590);
                assert!(c["exp"].as_i64().unwrap() > c["iat"].as_i64().unwrap());
            }
            Tamper::WrongNonce => assert_eq!(c["nonce"], WRONG_NONCE),
            Tamper::MissingNonce => assert!(c.get("nonce").is_none()),
            Tamper::BadSignature => {
                let good = jwt_header(jwt);
                assert_eq!(good["alg"], "RS256");
                assert!(verdict.unwrap_err().contains("InvalidSignature"));
            }
            Tamper::AlgNone => {
                assert_eq!(jwt_header(jwt), json!({"alg": "none", "typ": "JWT"}));
                assert!(jwt.ends_with('.'));
                assert_eq!(c["iss"], emu.base_url);
            }
            Tamper::EmailVerifiedString => assert_eq!(c["email_verified"], "true"),
            Tamper::EmailUnverified => {
                assert_eq!(c["email_verified"], false);
                let access = body["access_token"].as_str().unwrap();
                let info = userinfo(&emu, Some(&format!("Bearer {access}")))
                    .await
                    .json();
                assert_eq!(info["email_verified"], false);
            }
        }
        // Everything else about the token is intact.
        assert_eq!(c["sub"], emu.user("hana").sub);
        if !matches!(tamper, Tamper::WrongNonce | Tamper::MissingNonce) {
            assert_eq!(c["nonce"], NONCE);
        }
    }
    // The same tamper applies to refreshed ID tokens.
    emu.set_id_token_tamper(Tamper::None);
    let (_, rt) = emu.issue_tokens("hana");
    emu.set_id_token_tamper(Tamper::WrongAudience);
    let body = refresh(&emu, &rt.unwrap()).await.json();
    assert_eq!(
        claims(body["id_token"].as_str().unwrap())["aud"],
        OTHER_CLIENT_ID
    );
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn unknown_kid_until_the_rotated_key_is_published() {
    let emu = GoogleEmulator::start().await;
    for alg in Alg::ALL {
        emu.set_signing_alg(alg);
        emu.sign_with_unknown_kid(true);
        let body = login(&emu, "ivan", &[]).await;
        let jwt = body["id_token"].as_str().unwrap();
        let kid = jwt_header(jwt)["kid"].as_str().unwrap().to_owned();
        assert_eq!(kid, emu.signing_kid());
        let before = jwk_set(&emu).await;
        assert!(before.find(&kid).is_none());
        assert!(
            validate(&before, &emu.base_url, jwt, Some(NONCE))
                .unwrap_err()
                .contains("unknown kid")
        );
        emu.sign_with_unknown_kid(false);
    }
    let fetches = emu.jwks_fetches();
    emu.publish_rotated_key();
    let after = jwk_set(&emu).await;
    assert_eq!(emu.jwks_fetches(), fetches + 1);
    assert_eq!(after.keys.len(), 6);
    for alg in Alg::ALL {
        emu.set_signing_alg(alg);
        emu.sign_with_unknown_kid(true);
        let jwt = emu.id_token("ivan", Some("n1"));
        let claims = validate(&after, &emu.base_url, &jwt, Some("n1")).unwrap();
        assert_eq!(claims["sub"], emu.user("ivan").sub);
        // The old keys still verify too.
        emu.sign_with_unknown_kid(false);
        let jwt = emu.id_token("ivan", Some("n1"));
        validate(&after, &emu.base_url, &jwt, Some("n1")).unwrap();
    }
}

#[tokio::test]
async fn numbers_as_strings() {
    let emu = GoogleEmulator::start().await;
    emu.set_numbers_as_strings(true);
    let body = login(&emu, "jun", &[]).await;
    assert_eq!(body["expires_in"], "3599");
    let jwt = body["id_token"].as_str().unwrap();
    let c = validate(&jwk_set(&emu).await, &emu.base_url, jwt, Some(NONCE)).unwrap();
    assert_eq!(c["email_verified"], "true");
    assert!(c["iat"].is_i64() && c["exp"].is_i64());
    let access = body["access_token"].as_str().unwrap();
    let info = userinfo(&emu, Some(&format!("Bearer {access}")))
        .await
        .json();
    assert_eq!(info["email_verified"], true);
    emu.set_numbers_as_strings(false);
    assert_eq!(login(&emu, "jun", &[]).await["expires_in"], 3599);
}

// ---------------------------------------------------------------------------
// Userinfo and revoke

#[tokio::test]
async fn userinfo_answers_bearer_tokens_only() {
    let emu = GoogleEmulator::start().await;
    let body = login(&emu, "kim", &[]).await;
    let access = body["access_token"].as_str().unwrap();
    let user = emu.user("kim");

    let answer = userinfo(&emu, Some(&format!("Bearer {access}"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers[header::CONTENT_TYPE],
        "application/json; charset=utf-8"
    );
    assert_eq!(
        answer.json(),
        json!({
            "sub": user.sub,
            "name": "Kim Tester",
            "given_name": "Kim",
            "family_name": "Tester",
            "picture": user.picture,
            "email": "kim@gmail.com",
            "email_verified": true,
            "locale": "en",
        })
    );
    for authorization in [
        None,
        Some("Bearer ya29.nope"),
        Some(&*format!("token {access}")),
    ] {
        let answer = userinfo(&emu, authorization).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{authorization:?}");
        assert_eq!(
            answer.json(),
            json!({"error": "invalid_request", "error_description": "Invalid Credentials"})
        );
        assert!(
            answer.headers[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Bearer ")
        );
    }
    let seen: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.step == Step::Identity)
        .collect();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer"));
    assert_eq!(seen[0].status, 200);
    assert_eq!(seen[1].status, 401);
    assert!(emu.violations().is_empty());

    let in_query = get(format!(
        "{}?access_token={access}",
        emu.url(google::USERINFO_PATH)
    ))
    .await;
    assert_eq!(in_query.status, StatusCode::UNAUTHORIZED);
    assert_eq!(emu.violations().len(), 1);
    assert_eq!(
        emu.requests().pop().unwrap().param("access_token"),
        Some("<redacted>")
    );
}

#[tokio::test]
async fn revoke_kills_the_whole_grant() {
    let emu = GoogleEmulator::start().await;
    let body = login(&emu, "lee", &[("access_type", "offline")]).await;
    let access = body["access_token"].as_str().unwrap();
    let rt = body["refresh_token"].as_str().unwrap();

    let answer = revoke_form(&emu, access).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text, "{}");
    assert!(!emu.access_token_valid(access));
    assert_eq!(
        userinfo(&emu, Some(&format!("Bearer {access}")))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        refresh(&emu, rt).await.status,
        StatusCode::BAD_REQUEST,
        "refresh token revoked too"
    );

    let again = revoke_form(&emu, access).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        again.json(),
        json!({"error": "invalid_token", "error_description": "Token expired or revoked"})
    );

    // Revoking the refresh token (in the query this time) kills its access tokens.
    let (access, rt) = emu.issue_tokens("lee");
    let rt = rt.unwrap();
    let refreshed = refresh(&emu, &rt).await.json();
    let access2 = refreshed["access_token"].as_str().unwrap();
    let answer = read(
        client()
            .post(format!(
                "{}?token={}",
                emu.url(google::REVOKE_PATH),
                urlencode(&rt)
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert!(!emu.access_token_valid(&access));
    assert!(!emu.access_token_valid(access2));

    let seen: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.step == Step::Revoke)
        .collect();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.param("token") == Some("<redacted>")));
    assert_eq!(
        seen.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 400, 200]
    );
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

// ---------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn faults_hit_their_step_only() {
    let emu = GoogleEmulator::start().await;
    emu.add_user("max");

    emu.set_fault(Step::Discovery, Fault::Status503);
    let d = get(emu.url(google::DISCOVERY_PATH)).await;
    let j = get(emu.url(google::JWKS_PATH)).await;
    assert_eq!(
        (d.status, j.status),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE
        )
    );
    assert!(
        d.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!((emu.discovery_fetches(), emu.jwks_fetches()), (1, 1));

    // A faulted token call does not consume the code.
    emu.set_fault(Step::Token, Fault::Status500);
    let (code, verifier) = approve(&emu, "max", &[("access_type", "offline")]);
    assert_eq!(
        redeem(&emu, &code, Some(&verifier)).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    emu.clear_faults();
    assert_eq!(
        get(emu.url(google::DISCOVERY_PATH)).await.status,
        StatusCode::OK
    );
    let body = redeem(&emu, &code, Some(&verifier)).await.json();
    let access = body["access_token"].as_str().unwrap().to_owned();
    let rt = body["refresh_token"].as_str().unwrap().to_owned();

    emu.set_fault(Step::Refresh, Fault::Garbage);
    let garbage = refresh(&emu, &rt).await;
    assert_eq!(garbage.status, StatusCode::OK);
    assert_eq!(garbage.text, GARBAGE_BODY);
    let (code, verifier) = approve(&emu, "max", &[]);
    assert_eq!(
        redeem(&emu, &code, Some(&verifier)).await.status,
        StatusCode::OK,
        "code grants unaffected"
    );
    emu.clear_faults();

    emu.set_fault(Step::Identity, Fault::Status500);
    assert_eq!(
        userinfo(&emu, Some(&format!("Bearer {access}")))
            .await
            .status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    emu.set_fault(Step::Revoke, Fault::Status503);
    assert_eq!(
        revoke_form(&emu, &access).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(
        emu.access_token_valid(&access),
        "a faulted revoke revokes nothing"
    );
    emu.clear_faults();

    emu.set_fault_times(Step::Token, Fault::Status503, 1);
    let (code, verifier) = approve(&emu, "max", &[]);
    assert_eq!(
        redeem(&emu, &code, Some(&verifier)).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        redeem(&emu, &code, Some(&verifier)).await.status,
        StatusCode::OK
    );

    emu.set_fault(Step::Token, Fault::CloseConnection);
    let (code, verifier) = approve(&emu, "max", &[]);
    let dropped = client()
        .post(emu.url(google::TOKEN_PATH))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("code_verifier", &verifier),
        ])
        .send()
        .await;
    assert!(dropped.is_err());
    emu.set_fault(Step::Token, Fault::Hang);
    let hung = client()
        .post(emu.url(google::TOKEN_PATH))
        .timeout(Duration::from_millis(300))
        .form(&[("grant_type", "authorization_code"), ("code", &code)])
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    let last: Vec<u16> = emu
        .requests()
        .iter()
        .rev()
        .take(2)
        .map(|r| r.status)
        .collect();
    assert_eq!(last, [0, 0], "unanswered requests are logged with status 0");

    let statuses: Vec<(Step, u16)> = emu.requests().iter().map(|r| (r.step, r.status)).collect();
    assert_eq!(
        &statuses[..4],
        [
            (Step::Discovery, 503),
            (Step::Discovery, 503),
            (Step::Token, 500),
            (Step::Discovery, 200)
        ]
    );
}

// ---------------------------------------------------------------------------
// The Emulator face

#[tokio::test]
async fn provider_config_and_capabilities() {
    let emu = GoogleEmulator::start().await;
    assert_eq!(emu.kind(), "google");
    let config = emu.provider_config();
    assert_eq!(config.kind, "google");
    assert_eq!(config.client_id, CLIENT_ID);
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(config.client_secret.as_ref().unwrap()),
        CLIENT_SECRET
    );
    assert_eq!(config.redirect_uris, vec![REDIRECT_URI.to_owned()]);
    assert_eq!(config.endpoints.len(), 1);
    assert_eq!(config.endpoints["issuer"], emu.base_url);
    assert!(config.enabled && !config.fetch_userinfo && !config.union_id);
    assert!(config.spec.is_none() && config.scopes.is_none() && config.allowed_scopes.is_empty());

    let caps = emu.capabilities();
    assert!(caps.pkce && caps.refresh && caps.revoke && caps.deny_redirects);
    assert!(!caps.refresh_single_use && !caps.errors_with_http_200);
    assert_eq!(
        Tamper::ALL.iter().filter(|t| t.accepted()).count(),
        5,
        "None, LegacyIssuer, ExtraAudienceWithAzp, EmailVerifiedString, EmailUnverified"
    );
    assert_eq!(
        EMAIL_SCOPE_URL,
        "https://www.googleapis.com/auth/userinfo.email"
    );
    assert_eq!(
        PROFILE_SCOPE_URL,
        "https://www.googleapis.com/auth/userinfo.profile"
    );

    let changed = emu.update_user("zoe", |u| u.email = "zoe@example.org".into());
    assert_eq!(changed.email, "zoe@example.org");
    let body = login_registered(&emu, "zoe").await;
    assert_eq!(
        claims(body["id_token"].as_str().unwrap())["email"],
        "zoe@example.org"
    );
}

/// A login for a user already registered (without resetting them).
async fn login_registered(emu: &GoogleEmulator, seed: &str) -> Value {
    let (code, verifier) = approve(emu, seed, &[]);
    redeem(emu, &code, Some(&verifier)).await.json()
}
