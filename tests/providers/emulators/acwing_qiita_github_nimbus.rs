#![allow(dead_code)]
//! The AcWing, Qiita, GitHub-adapter and config-only ("Nimbus", `kind =
//! "oauth2"`) emulators themselves, over real HTTP: exact bodies and
//! statuses, single-use codes, refresh, revoke, shape violations, faults,
//! numbers as strings — and a login through authbroker's own provider
//! engine against each, so emulator and preset are checked to agree.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use authbroker::{
    config::{HttpSettings, ProviderConfig},
    domain::Identity,
    http::HttpClient,
    provider::{
        AuthorizeParams, CallbackParams, Provider, ProviderError, Registry, TokenSet,
        spec::ProviderSpec,
    },
    state::{PendingLogin, PkceVerifier, StateToken},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use reqwest::{StatusCode, header};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::support::{
    emulators::{
        Emulator, ExpectedIdentity, SeenRequest, Step, acwing, acwing::AcwingEmulator, custom,
        custom::CustomEmulator, github::GithubEmulator, qiita, qiita::QiitaEmulator,
    },
    faults::{Fault, GARBAGE_BODY},
};

// ---------------------------------------------------------------------------
// Helpers

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("authbroker-emulator-tests")
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn text(response: reqwest::Response) -> (StatusCode, Option<String>, String) {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    (status, content_type, response.text().await.unwrap())
}

async fn get(url: &str) -> (StatusCode, Option<String>, String) {
    text(client().get(url).send().await.unwrap()).await
}

fn param(pairs: &[(String, String)], name: &str) -> String {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {name} in {pairs:?}"))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A PKCE pair: (verifier, S256 challenge).
fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn assert_no_violations(emulator: &dyn Emulator) {
    let v = emulator.violations();
    assert!(v.is_empty(), "{}: {v:#?}", emulator.kind());
}

/// Every logged request kept the secrets out.
fn assert_redacted(emulator: &dyn Emulator, secrets: &[&str]) {
    for r in emulator.requests() {
        for (k, v) in &r.params {
            assert!(
                !secrets.contains(&v.as_str()),
                "{} {}: {k} not redacted",
                r.method,
                r.path
            );
        }
        assert!(!secrets.iter().any(|s| r.path.contains(s)), "{}", r.path);
    }
}

fn requests_for(emulator: &dyn Emulator, step: Step) -> Vec<SeenRequest> {
    emulator
        .requests()
        .into_iter()
        .filter(|r| r.step == step)
        .collect()
}

// ---------------------------------------------------------------------------
// Through authbroker's engine

/// The provider authbroker builds from the emulator's config, as `p`.
fn build_provider(config: ProviderConfig) -> Arc<dyn Provider> {
    let http = HttpClient::new(&HttpSettings::default()).unwrap();
    let configs = BTreeMap::from([("p".to_string(), config)]);
    let registry = Registry::build(&configs, &http, None).unwrap_or_else(|e| panic!("{e:#?}"));
    registry.get("p").unwrap().clone()
}

fn pending(provider: &dyn Provider) -> PendingLogin {
    let info = provider.info();
    let now = OffsetDateTime::now_utc();
    PendingLogin {
        state: StateToken::generate().unwrap(),
        provider: info.name.clone(),
        redirect_uri: info.redirect_uris[0].clone(),
        scopes: info.scopes.clone(),
        return_to: None,
        pkce: info.pkce.then(|| PkceVerifier::generate().unwrap()),
        nonce: None,
        created_at: now,
        expires_at: now + time::Duration::minutes(10),
    }
}

/// BeginLogin → the user approves at the emulator → CompleteLogin, using
/// the same engine calls authbroker makes.
async fn engine_login(
    emulator: &dyn Emulator,
    provider: &dyn Provider,
    seed: &str,
) -> (TokenSet, Identity) {
    let login = pending(provider);
    let url = provider
        .authorize_url(&login, &AuthorizeParams::default())
        .await
        .unwrap();
    let callback = emulator
        .approve(url.as_str(), seed)
        .unwrap_or_else(|e| panic!("{}: {e}", emulator.kind()));
    assert_eq!(param(&callback, "state"), login.state.as_str());
    let tokens = provider
        .exchange_code(
            &param(&callback, "code"),
            &login,
            &CallbackParams::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", emulator.kind()));
    let identity = provider
        .fetch_identity(&tokens, &login, &CallbackParams::default())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", emulator.kind()));
    (tokens, identity)
}

fn assert_identity(kind: &str, identity: &Identity, expected: &ExpectedIdentity) {
    let got = ExpectedIdentity {
        subject: identity.subject.clone(),
        union_id: identity.union_id.clone().unwrap_or_default(),
        username: identity.username.clone().unwrap_or_default(),
        display_name: identity.display_name.clone().unwrap_or_default(),
        avatar_url: identity.avatar_url.clone().unwrap_or_default(),
        email: identity.email.clone().unwrap_or_default(),
        email_verified: identity.email_verified,
    };
    assert_eq!(&got, expected, "{kind}");
}

async fn all_emulators() -> Vec<Box<dyn Emulator>> {
    vec![
        Box::new(AcwingEmulator::start().await),
        Box::new(QiitaEmulator::start().await),
        Box::new(GithubEmulator::start().await),
        Box::new(CustomEmulator::start().await),
    ]
}

const SEEDS: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

#[tokio::test]
async fn every_emulator_logs_in_through_the_engine() {
    for emulator in all_emulators().await {
        let emulator = emulator.as_ref();
        let provider = build_provider(emulator.provider_config());
        for seed in SEEDS {
            let expected = emulator.add_user(seed);
            let (tokens, identity) = engine_login(emulator, provider.as_ref(), seed).await;
            assert_identity(emulator.kind(), &identity, &expected);
            assert!(emulator.access_token_valid(tokens.access_token.expose_secret()));
        }
        assert_no_violations(emulator);
        let requests = emulator.requests();
        assert!(!requests.is_empty());
        for r in &requests {
            assert!((200..300).contains(&r.status), "{}: {r:?}", emulator.kind());
        }
        assert_eq!(requests_for(emulator, Step::Token).len(), SEEDS.len());
        let config = emulator.provider_config();
        let secret = config.client_secret.as_ref().unwrap().expose_secret();
        assert_redacted(emulator, &[secret]);
    }
}

#[tokio::test]
async fn every_emulator_copes_with_numbers_as_strings() {
    for emulator in all_emulators().await {
        let emulator = emulator.as_ref();
        emulator.set_numbers_as_strings(true);
        let provider = build_provider(emulator.provider_config());
        for seed in SEEDS {
            let expected = emulator.add_user(seed);
            let (_, identity) = engine_login(emulator, provider.as_ref(), seed).await;
            assert_identity(emulator.kind(), &identity, &expected);
        }
        assert_no_violations(emulator);
    }
}

#[tokio::test]
async fn provider_configs_override_every_endpoint() {
    for emulator in all_emulators().await {
        let config = emulator.provider_config();
        let spec = match &config.spec {
            Some(_) => ProviderSpec::parse(custom::SPEC).unwrap(),
            None => authbroker::provider::presets::preset(&config.kind)
                .unwrap()
                .unwrap(),
        };
        assert_eq!(config.kind, emulator.kind());
        assert_eq!(
            config.endpoints.keys().collect::<Vec<_>>(),
            spec.endpoints.keys().collect::<Vec<_>>(),
            "{}",
            config.kind
        );
        for url in config.endpoints.values() {
            assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        }
        assert_eq!(
            config.redirect_uris,
            ["https://app.example.com/oauth/callback"]
        );
        build_provider(config);
    }
}

#[tokio::test]
async fn refresh_and_revoke_through_the_engine() {
    // AcWing: the same access token comes back while it is alive; the
    // refresh token keeps working.
    let acwing = AcwingEmulator::start().await;
    acwing.add_user("r");
    let p = build_provider(acwing.provider_config());
    let (tokens, _) = engine_login(&acwing, p.as_ref(), "r").await;
    let refresh = tokens.refresh_token.clone().unwrap();
    let refresher = p.refresher().unwrap();
    let renewed = refresher.refresh(&refresh, &tokens.scopes).await.unwrap();
    assert_eq!(
        renewed.access_token.expose_secret(),
        tokens.access_token.expose_secret()
    );
    assert_eq!(renewed.expires_in, Some(Duration::from_secs(7200)));
    acwing.expire_access_tokens();
    let replaced = refresher.refresh(&refresh, &tokens.scopes).await.unwrap();
    assert_ne!(
        replaced.access_token.expose_secret(),
        tokens.access_token.expose_secret()
    );
    assert!(!acwing.access_token_valid(tokens.access_token.expose_secret()));
    assert!(acwing.access_token_valid(replaced.access_token.expose_secret()));
    assert!(p.revoker().is_none());
    assert_no_violations(&acwing);

    // Qiita: DELETE kills the token.
    let qiita = QiitaEmulator::start().await;
    qiita.add_user("r");
    let p = build_provider(qiita.provider_config());
    let (tokens, _) = engine_login(&qiita, p.as_ref(), "r").await;
    assert!(p.refresher().is_none());
    p.revoker()
        .unwrap()
        .revoke(&tokens.access_token)
        .await
        .unwrap();
    assert!(!qiita.access_token_valid(tokens.access_token.expose_secret()));
    let revokes = requests_for(&qiita, Step::Revoke);
    assert_eq!(revokes.len(), 1);
    assert_eq!(revokes[0].status, 204);
    assert_eq!(revokes[0].path, "/api/v2/access_tokens/<redacted>");
    assert_no_violations(&qiita);

    // Nimbus: single-use renewal tokens, then a form-POST revocation.
    let nimbus = CustomEmulator::start().await;
    nimbus.add_user("r");
    let p = build_provider(nimbus.provider_config());
    assert!(p.info().refresh_token_single_use);
    let (tokens, _) = engine_login(&nimbus, p.as_ref(), "r").await;
    assert_eq!(tokens.expires_in, Some(Duration::from_secs(3600)));
    assert_eq!(tokens.scopes, ["profile.basic", "profile.email"]);
    let first = tokens.refresh_token.clone().unwrap();
    let refresher = p.refresher().unwrap();
    let renewed = refresher.refresh(&first, &tokens.scopes).await.unwrap();
    let second = renewed.refresh_token.clone().unwrap();
    assert_ne!(second.expose_secret(), first.expose_secret());
    let again = refresher.refresh(&first, &tokens.scopes).await.unwrap_err();
    assert_eq!(again.provider_code(), Some("E_RENEWAL"), "{again}");
    p.revoker()
        .unwrap()
        .revoke(&renewed.access_token)
        .await
        .unwrap();
    assert!(!nimbus.access_token_valid(renewed.access_token.expose_secret()));
    assert!(nimbus.access_token_valid(tokens.access_token.expose_secret()));
    assert_no_violations(&nimbus);
}

#[tokio::test]
async fn engine_sees_errors_and_faults() {
    for emulator in all_emulators().await {
        let emulator = emulator.as_ref();
        let kind = emulator.kind();
        let p = build_provider(emulator.provider_config());
        emulator.add_user("f");
        // A code used twice is rejected with the provider's own code.
        let login = pending(p.as_ref());
        let url = p
            .authorize_url(&login, &AuthorizeParams::default())
            .await
            .unwrap();
        let code = param(&emulator.approve(url.as_str(), "f").unwrap(), "code");
        p.exchange_code(&code, &login, &CallbackParams::default())
            .await
            .unwrap();
        let reused = p
            .exchange_code(&code, &login, &CallbackParams::default())
            .await
            .unwrap_err();
        let want = match kind {
            "acwing" => "40001",
            "qiita" => "unauthorized",
            "github" => "bad_verification_code",
            _ => "E_AUTH_CODE",
        };
        assert_eq!(reused.provider_code(), Some(want), "{kind}: {reused}");
        let status = requests_for(emulator, Step::Token).last().unwrap().status;
        let http_200 = emulator.capabilities().errors_with_http_200;
        assert_eq!(status == 200, http_200, "{kind}: {status}");

        // A 503 on the token step is "unavailable".
        emulator.set_fault(Step::Token, Fault::Status503);
        let login = pending(p.as_ref());
        let url = p
            .authorize_url(&login, &AuthorizeParams::default())
            .await
            .unwrap();
        let code = param(&emulator.approve(url.as_str(), "f").unwrap(), "code");
        let err = p
            .exchange_code(&code, &login, &CallbackParams::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::Unavailable { .. }),
            "{kind}: {err}"
        );
        assert_eq!(
            requests_for(emulator, Step::Token).last().unwrap().status,
            503
        );

        // Garbage on the identity step is a malformed answer.
        emulator.clear_faults();
        emulator.set_fault(Step::Identity, Fault::Garbage);
        let login = pending(p.as_ref());
        let url = p
            .authorize_url(&login, &AuthorizeParams::default())
            .await
            .unwrap();
        let code = param(&emulator.approve(url.as_str(), "f").unwrap(), "code");
        let tokens = p
            .exchange_code(&code, &login, &CallbackParams::default())
            .await
            .unwrap();
        let err = p
            .fetch_identity(&tokens, &login, &CallbackParams::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::BadResponse { .. }),
            "{kind}: {err}"
        );
        emulator.clear_faults();
        p.fetch_identity(&tokens, &login, &CallbackParams::default())
            .await
            .unwrap();
        assert_no_violations(emulator);
    }
}

// ---------------------------------------------------------------------------
// AcWing over HTTP

/// The authorize URL as AcWing's docs build it (Python's quote keeps `/`).
fn acwing_authorize(emulator: &AcwingEmulator, state: &str) -> String {
    emulator.url(&format!(
        "{}?appid={}&redirect_uri=https%3A//app.example.com/oauth/callback&scope=userinfo&state={state}",
        acwing::AUTHORIZE_PATH,
        acwing::APPID
    ))
}

#[tokio::test]
async fn acwing_answers_like_django() {
    let acwing = AcwingEmulator::start().await;
    let expected = acwing.add_user("yxc");
    let callback = acwing
        .approve(&acwing_authorize(&acwing, "12345678"), "yxc")
        .unwrap();
    assert_eq!(param(&callback, "state"), "12345678");
    let code = param(&callback, "code");
    let token_url = acwing.url(&format!(
        "{}?appid={}&secret={}&code={code}",
        acwing::TOKEN_PATH,
        acwing::APPID,
        acwing::SECRET
    ));
    let (status, content_type, body) = get(&token_url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let v: Value = serde_json::from_str(&body).unwrap();
    let (access, refresh) = (
        v["access_token"].as_str().unwrap(),
        v["refresh_token"].as_str().unwrap(),
    );
    assert_eq!(
        body,
        format!(
            r#"{{"access_token": "{access}", "expires_in": 7200, "refresh_token": "{refresh}", "openid": "{}", "scope": "userinfo"}}"#,
            expected.subject
        )
    );
    assert!(!body.contains("errcode"));

    // The code works once.
    let (status, _, body) = get(&token_url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, r#"{"errcode": 40001, "errmsg": "code expired"}"#);

    let info = |token: &str, openid: &str| {
        acwing.url(&format!(
            "{}?access_token={token}&openid={openid}",
            acwing::GETINFO_PATH
        ))
    };
    let (status, _, body) = get(&info(access, &expected.subject)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        format!(
            r#"{{"username": "yxc_yxc", "photo": "{}"}}"#,
            expected.avatar_url
        )
    );
    assert!(
        expected
            .avatar_url
            .starts_with("https://cdn.acwing.com/media/user/profile/photo/")
    );
    assert!(expected.avatar_url.ends_with(".jpg"));
    assert_eq!(expected.display_name, "yxc_yxc");
    assert_eq!(expected.email, "");

    // getinfo's errcode is a string, as documented; the status still 200.
    for url in [
        info("nope", &expected.subject),
        info(access, "someone-else"),
    ] {
        let (status, _, body) = get(&url).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"errcode": "40004", "errmsg": "access_token expired"}"#
        );
    }
    assert_no_violations(&acwing);
    let steps: Vec<(Step, u16)> = acwing
        .requests()
        .iter()
        .map(|r| (r.step, r.status))
        .collect();
    assert_eq!(
        steps,
        [
            (Step::Token, 200),
            (Step::Token, 200),
            (Step::Identity, 200),
            (Step::Identity, 200),
            (Step::Identity, 200)
        ]
    );
    let first = &acwing.requests()[0];
    assert_eq!(first.param("secret"), Some("<redacted>"));
    assert_eq!(first.param("code"), Some("<redacted>"));
    assert_eq!(first.param("appid"), Some(acwing::APPID));
}

#[tokio::test]
async fn acwing_escapes_non_ascii_like_python() {
    let acwing = AcwingEmulator::start().await;
    let expected = acwing.add_user_named("zh", "闫学灿");
    let (access, _) = acwing.issue_tokens("zh");
    let (_, _, body) = get(&acwing.url(&format!(
        "{}?access_token={access}&openid={}",
        acwing::GETINFO_PATH,
        expected.subject
    )))
    .await;
    assert!(
        body.starts_with(r#"{"username": "\u95eb\u5b66\u707f", "photo": "#),
        "{body}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["username"], "闫学灿");
    assert_eq!(
        acwing::django_json(&[
            ("a", json!("😀 \"q\" \\ / \n\u{7f}")),
            ("b", json!([1, true, null]))
        ]),
        r#"{"a": "\ud83d\ude00 \"q\" \\ / \n\u007f", "b": [1, true, null]}"#
    );
}

#[tokio::test]
async fn acwing_without_the_trailing_slash_is_a_301_and_a_violation() {
    let acwing = AcwingEmulator::start().await;
    let path = acwing::TOKEN_PATH.trim_end_matches('/');
    let response = client()
        .get(acwing.url(&format!("{path}?appid=1234&code=x")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()[header::LOCATION],
        "/third_party/api/oauth2/access_token/?appid=1234&code=x"
    );
    assert_eq!(response.text().await.unwrap(), "");
    let violations = acwing.violations();
    assert_eq!(violations.len(), 1);
    assert!(violations[0].contains("trailing slash"), "{violations:?}");
    let seen = &acwing.requests()[0];
    assert_eq!((seen.step, seen.status), (Step::Token, 301));
    assert_eq!(seen.param("code"), Some("<redacted>"));

    let acwing = AcwingEmulator::start().await;
    acwing.add_user("s");
    let no_slash = acwing_authorize(&acwing, "1").replace("/authorize/?", "/authorize?");
    acwing.approve(&no_slash, "s").unwrap();
    assert_eq!(acwing.violations().len(), 1);
}

#[tokio::test]
async fn acwing_refresh_extends_then_replaces() {
    let acwing = AcwingEmulator::start().await;
    let expected = acwing.add_user("r");
    let (access, refresh) = acwing.issue_tokens("r");
    let refresh = refresh.unwrap();
    let url = |rt: &str| {
        acwing.url(&format!(
            "{}?appid={}&refresh_token={rt}",
            acwing::REFRESH_PATH,
            acwing::APPID
        ))
    };
    for _ in 0..2 {
        // Not single use, and the live access token is returned as is.
        let (status, _, body) = get(&url(&refresh)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!(
                r#"{{"access_token": "{access}", "expires_in": 7200, "refresh_token": "{refresh}", "openid": "{}", "scope": "userinfo"}}"#,
                expected.subject
            )
        );
    }
    assert!(acwing.access_token_expires_in(&access).unwrap() > 7100);
    acwing.expire_access_tokens();
    assert!(!acwing.access_token_valid(&access));
    let (_, _, body) = get(&url(&refresh)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let fresh = v["access_token"].as_str().unwrap();
    assert_ne!(fresh, access);
    assert!(acwing.access_token_valid(fresh));
    assert_eq!(v["refresh_token"], refresh.as_str());

    let (status, _, body) = get(&url("unknown")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"errcode": 40003, "errmsg": "refresh_token expired"}"#
    );
    assert_no_violations(&acwing);

    // AcWing's refresh takes no secret.
    get(&format!("{}&secret={}", url(&refresh), acwing::SECRET)).await;
    let violations = acwing.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("secret"));
    assert!(
        requests_for(&acwing, Step::Refresh)
            .iter()
            .all(|r| r.status == 200)
    );
}

#[tokio::test]
async fn acwing_checks_the_authorize_url() {
    let acwing = AcwingEmulator::start().await;
    acwing.add_user("a");
    let base = acwing.url(acwing::AUTHORIZE_PATH);
    // The url crate escapes `/` too: just as good.
    let ok = format!(
        "{base}?appid=1234&redirect_uri=https%3A%2F%2Fapp.example.com%2Foauth%2Fcallback&scope=userinfo&state=s1"
    );
    let callback = acwing.approve(&ok, "a").unwrap();
    assert_eq!(
        callback.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["code", "state"]
    );
    assert_no_violations(&acwing);

    for (url, why) in [
        (ok.replace("appid=", "client_id="), "appid"),
        (ok.replace("appid=1234", "appid=999"), "appid"),
        (ok.replace("scope=userinfo", "scope=profile"), "scope"),
        (ok.replace("&state=s1", ""), "state"),
        (ok.replace("&redirect_uri=", "&x="), "redirect_uri"),
    ] {
        let err = acwing.approve(&url, "a").unwrap_err();
        assert!(err.contains(why), "{url}: {err}");
    }
    assert!(acwing.approve(&ok, "nobody").is_err());

    for extra in [
        "&response_type=code",
        "&code_challenge=abc&code_challenge_method=S256",
    ] {
        let acwing = AcwingEmulator::start().await;
        acwing.add_user("a");
        let url = format!("{}{extra}", acwing_authorize(&acwing, "s"));
        acwing.approve(&url, "a").unwrap();
        assert!(!acwing.violations().is_empty(), "{extra}");
    }
    let acwing = AcwingEmulator::start().await;
    acwing.add_user("a");
    let raw = acwing_authorize(&acwing, "s").replace(
        "https%3A//app.example.com/oauth/callback",
        "https://app.example.com/oauth/callback",
    );
    acwing.approve(&raw, "a").unwrap();
    assert!(acwing.violations()[0].contains("URL-encoded"));
    assert_eq!(acwing.deny(&raw), None);
    assert!(!acwing.capabilities().deny_redirects);
}

#[tokio::test]
async fn acwing_numbers_as_strings_and_wrong_shapes() {
    let acwing = AcwingEmulator::start().await;
    acwing.add_user("n");
    acwing.set_numbers_as_strings(true);
    let code = param(
        &acwing
            .approve(&acwing_authorize(&acwing, "s"), "n")
            .unwrap(),
        "code",
    );
    let url = acwing.url(&format!(
        "{}?appid={}&secret={}&code={code}",
        acwing::TOKEN_PATH,
        acwing::APPID,
        acwing::SECRET
    ));
    let (_, _, body) = get(&url).await;
    assert!(body.contains(r#""expires_in": "7200""#), "{body}");
    let (_, _, body) = get(&url).await;
    assert_eq!(body, r#"{"errcode": "40001", "errmsg": "code expired"}"#);
    assert_no_violations(&acwing);

    // POST with a form body: Django's view reads only the query.
    let response = client()
        .post(acwing.url(acwing::TOKEN_PATH))
        .form(&[
            ("grant_type", "authorization_code"),
            ("appid", acwing::APPID),
            ("secret", acwing::SECRET),
            ("code", "c"),
        ])
        .send()
        .await
        .unwrap();
    let (status, _, body) = text(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"errcode": "40002", "errmsg": "appid or secret error"}"#
    );
    let violations = acwing.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    let seen = acwing.requests().pop().unwrap();
    assert_eq!(seen.param("secret"), Some("<redacted>"));
    assert_eq!(seen.param("grant_type"), Some("authorization_code"));

    // Extra parameters on the GET are violations too.
    get(&format!(
        "{url}&grant_type=authorization_code&redirect_uri=x"
    ))
    .await;
    assert_eq!(acwing.violations().len(), 4);
}

#[tokio::test]
async fn faults_come_first_and_are_logged() {
    let acwing = AcwingEmulator::start().await;
    let (access, _) = {
        acwing.add_user("f");
        acwing.issue_tokens("f")
    };
    let openid = acwing.user("f").unwrap().openid;
    let info = acwing.url(&format!(
        "{}?access_token={access}&openid={openid}",
        acwing::GETINFO_PATH
    ));
    acwing.set_fault(Step::Identity, Fault::Status500);
    let (status, content_type, _) = get(&info).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(content_type.unwrap().starts_with("text/html"));
    acwing.set_fault(Step::Identity, Fault::Garbage);
    assert_eq!(get(&info).await.2, GARBAGE_BODY);
    // A fault on one step leaves the others alone.
    let (status, _, body) = get(&acwing.url(acwing::TOKEN_PATH)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("errcode"));
    acwing.set_fault(Step::Identity, Fault::CloseConnection);
    assert!(client().get(&info).send().await.is_err());
    acwing.set_fault(Step::Identity, Fault::Hang);
    let hung = client()
        .get(&info)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    acwing.clear_faults();
    assert!(get(&info).await.2.contains("username"));
    let statuses: Vec<u16> = requests_for(&acwing, Step::Identity)
        .iter()
        .map(|r| r.status)
        .collect();
    // Faults that never answer are logged as status 0.
    assert_eq!(statuses, [500, 200, 0, 0, 200]);
}

// ---------------------------------------------------------------------------
// Qiita over HTTP

fn qiita_authorize(qiita: &QiitaEmulator, query: &str) -> String {
    qiita.url(&format!("{}?{query}", qiita::AUTHORIZE_PATH))
}

async fn qiita_code(qiita: &QiitaEmulator, seed: &str) -> String {
    let url = qiita_authorize(
        qiita,
        &format!("client_id={}&scope=read_qiita&state=xyz", qiita::CLIENT_ID),
    );
    let callback = qiita.approve(&url, seed).unwrap();
    assert_eq!(param(&callback, "state"), "xyz");
    param(&callback, "code")
}

async fn qiita_exchange(qiita: &QiitaEmulator, code: &str) -> (StatusCode, Option<String>, String) {
    let response = client()
        .post(qiita.url(qiita::TOKEN_PATH))
        .json(&json!({"client_id": qiita::CLIENT_ID, "client_secret": qiita::CLIENT_SECRET, "code": code}))
        .send()
        .await
        .unwrap();
    text(response).await
}

#[tokio::test]
async fn qiita_token_is_201_with_token_not_access_token() {
    let qiita = QiitaEmulator::start().await;
    qiita.add_user("q");
    let code = qiita_code(&qiita, "q").await;
    assert!(is_hex(&code, 40), "{code}");
    let (status, content_type, body) = qiita_exchange(&qiita, &code).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
    let token = serde_json::from_str::<Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(is_hex(&token, 40), "{token}");
    assert_eq!(
        body,
        format!(
            r#"{{"client_id":"{}","scopes":["read_qiita"],"token":"{token}"}}"#,
            qiita::CLIENT_ID
        )
    );
    assert!(qiita.access_token_valid(&token));

    // Used code (and any bad code): 401, unverified but plausible.
    let (status, _, body) = qiita_exchange(&qiita, &code).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, qiita::UNAUTHORIZED_BODY);
    assert_no_violations(&qiita);
    let statuses: Vec<u16> = qiita.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 401]);
    let seen = &qiita.requests()[0];
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    assert_eq!(seen.param("client_id"), Some(qiita::CLIENT_ID));
    assert_eq!(seen.param("client_secret"), Some("<redacted>"));
    assert_eq!(seen.param("code"), Some("<redacted>"));
}

#[tokio::test]
async fn qiita_refuses_form_bodies_and_oauth_extras() {
    let qiita = QiitaEmulator::start().await;
    qiita.add_user("q");
    let base = [
        ("client_id", qiita::CLIENT_ID),
        ("client_secret", qiita::CLIENT_SECRET),
    ];
    let code = qiita_code(&qiita, "q").await;
    let form = client()
        .post(qiita.url(qiita::TOKEN_PATH))
        .form(&[base[0], base[1], ("code", code.as_str())])
        .send()
        .await
        .unwrap();
    let (status, _, body) = text(form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, qiita::BAD_REQUEST_BODY);
    let extra = client()
        .post(qiita.url(qiita::TOKEN_PATH))
        .json(&json!({
            "grant_type": "authorization_code",
            "client_id": qiita::CLIENT_ID,
            "client_secret": qiita::CLIENT_SECRET,
            "code": code,
            "redirect_uri": "https://app.example.com/oauth/callback",
        }))
        .send()
        .await
        .unwrap();
    let (status, _, body) = text(extra).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, qiita::BAD_REQUEST_BODY);
    let violations = qiita.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations[0].contains("application/json"));
    assert!(violations[1].contains("grant_type") && violations[1].contains("redirect_uri"));
    // Neither attempt consumed the code.
    assert_eq!(qiita_exchange(&qiita, &code).await.0, StatusCode::CREATED);
}

#[tokio::test]
async fn qiita_authenticated_user_and_revoke() {
    let qiita = QiitaEmulator::start().await;
    let expected = qiita.add_user_named("q", "");
    let user = qiita.user("q").unwrap();
    assert_eq!(expected.display_name, user.id);
    assert_eq!(expected.username, user.id);
    assert_eq!(expected.subject, user.permanent_id.to_string());
    let (token, refresh) = qiita.issue_tokens("q");
    assert_eq!(refresh, None);
    let me = || {
        client()
            .get(qiita.url(qiita::USER_PATH))
            .bearer_auth(&token)
            .send()
    };
    let (status, _, body) = text(me().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["permanent_id"].is_i64(), "{body}");
    assert_eq!(v["id"], user.id.as_str());
    assert_eq!(v["name"], "");
    assert_eq!(v["profile_image_url"], expected.avatar_url.as_str());
    assert!(v.get("email").is_none());
    assert!(body.starts_with(&format!(
        r#"{{"id":"{}","permanent_id":{},"name":"","#,
        user.id, user.permanent_id
    )));

    qiita.set_numbers_as_strings(true);
    let (_, _, body) = text(me().await.unwrap()).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["permanent_id"], user.permanent_id.to_string());
    // Only what authbroker reads turns into strings.
    assert!(v["items_count"].is_u64());

    let delete = || {
        client()
            .delete(qiita.url(&format!("{}/{token}", qiita::TOKEN_PATH)))
            .send()
    };
    let (status, _, body) = text(delete().await.unwrap()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(body, "");
    assert!(!qiita.access_token_valid(&token));
    let (status, _, body) = text(me().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, qiita::UNAUTHORIZED_BODY);
    let (status, _, body) = text(delete().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, qiita::NOT_FOUND_BODY);
    assert_no_violations(&qiita);
    let log: Vec<(Step, u16, String)> = qiita
        .requests()
        .into_iter()
        .map(|r| (r.step, r.status, r.authorization.unwrap_or_default()))
        .collect();
    assert_eq!(
        log,
        [
            (Step::Identity, 200, "Bearer".into()),
            (Step::Identity, 200, "Bearer".into()),
            (Step::Revoke, 204, String::new()),
            (Step::Identity, 401, "Bearer".into()),
            (Step::Revoke, 404, String::new()),
        ]
    );
    assert_redacted(&qiita, &[&token]);
}

#[tokio::test]
async fn qiita_checks_the_authorize_url() {
    let qiita = QiitaEmulator::start().await;
    qiita.add_user("q");
    let id = qiita::CLIENT_ID;
    let ok = qiita_authorize(
        &qiita,
        &format!("client_id={id}&scope=read_qiita+write_qiita&state=s"),
    );
    qiita.approve(&ok, "q").unwrap();
    qiita
        .approve(
            &qiita_authorize(&qiita, &format!("client_id={id}&state=s")),
            "q",
        )
        .unwrap();
    assert_no_violations(&qiita);
    for (query, why) in [
        (
            format!("client_id={id}&scope=read_qiita,write_qiita&state=s"),
            "scope",
        ),
        (
            "client_id=abc&scope=read_qiita&state=s".to_string(),
            "client_id",
        ),
        (format!("client_id={id}&scope=read_qiita"), "state"),
    ] {
        let err = qiita
            .approve(&qiita_authorize(&qiita, &query), "q")
            .unwrap_err();
        assert!(err.contains(why), "{query}: {err}");
    }
    let extras = qiita_authorize(
        &qiita,
        &format!(
            "client_id={id}&redirect_uri=https%3A%2F%2Fapp.example.com%2Foauth%2Fcallback&response_type=code&scope=read_qiita&state=s"
        ),
    );
    qiita.approve(&extras, "q").unwrap();
    let violations = qiita.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations[0].contains("redirect_uri"));
    assert!(violations[1].contains("response_type"));
    assert_eq!(
        qiita.deny(&ok).unwrap(),
        [
            ("error".to_string(), "access_denied".to_string()),
            ("state".into(), "s".into())
        ]
    );
}

#[tokio::test]
async fn qiita_users_vary_their_names() {
    let qiita = QiitaEmulator::start().await;
    let users: Vec<ExpectedIdentity> = (0..30).map(|i| qiita.add_user(&format!("u{i}"))).collect();
    assert!(users.iter().any(|u| u.display_name == u.username));
    assert!(users.iter().any(|u| u.display_name.starts_with("キータ")));
    assert!(users.iter().any(|u| u.display_name.starts_with("Taro")));
    assert_eq!(qiita.add_user("u3"), users[3]);
}

// ---------------------------------------------------------------------------
// GitHub through the adapter

#[tokio::test]
async fn github_adapter_relays_logs_and_tracks_tokens() {
    let gh = GithubEmulator::start().await;
    let expected = gh.add_user("octo");
    assert_eq!(expected.email, "octo@example.com");
    assert!(expected.email_verified);
    let response = client()
        .post(gh.url("/login/oauth/access_token"))
        .header(header::ACCEPT, "application/json")
        .form(&[
            ("client_id", gh.client_id()),
            ("client_secret", gh.client_secret()),
            ("code", "0123456789abcdef0123"),
        ])
        .send()
        .await
        .unwrap();
    let (status, content_type, body) = text(response).await;
    // GitHub's bad code: HTTP 200 and an error body.
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "bad_verification_code"
    );
    let seen = gh.requests().pop().unwrap();
    assert_eq!((seen.step, seen.status), (Step::Token, 200));
    assert_eq!(seen.param("client_secret"), Some("<redacted>"));
    assert_eq!(seen.accept.as_deref(), Some("application/json"));

    let (token, refresh) = gh.issue_tokens("octo");
    assert_eq!(refresh, None);
    assert!(gh.access_token_valid(&token));
    assert!(!gh.access_token_valid("gho_unknown"));
    let user = client()
        .get(gh.url("/user"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (status, _, body) = text(user).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"].to_string(), expected.subject);
    assert_eq!(v["login"], "octo");
    assert_no_violations(&gh);

    // The wrapped emulator's own shape checks surface through the adapter.
    let bare = reqwest::Client::builder().no_proxy().build().unwrap();
    let (status, _, _) = text(
        bare.get(gh.url("/user"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(gh.violations()[0].contains("User-Agent"));
    assert_eq!(gh.requests().pop().unwrap().status, 403);

    gh.revoke_tokens();
    assert!(!gh.access_token_valid(&token));
}

#[tokio::test]
async fn github_adapter_faults_deny_and_numbers() {
    let gh = GithubEmulator::start().await;
    gh.add_user("octo");
    let (token, _) = gh.issue_tokens("octo");
    let user = || {
        client()
            .get(gh.url("/user/emails"))
            .bearer_auth(&token)
            .send()
    };
    gh.set_fault(Step::Identity, Fault::Status503);
    assert_eq!(
        user().await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    gh.set_fault(Step::Identity, Fault::CloseConnection);
    assert!(user().await.is_err());
    gh.clear_faults();
    let (status, _, body) = text(user().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let emails: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(emails[1]["primary"], true);
    assert_eq!(emails[0]["verified"], false);
    let statuses: Vec<u16> = gh.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 0, 200]);
    // Faults on steps GitHub does not have change nothing.
    gh.set_fault(Step::Refresh, Fault::Status500);
    assert_eq!(user().await.unwrap().status(), StatusCode::OK);
    gh.set_numbers_as_strings(true);
    assert!(
        text(
            client()
                .get(gh.url("/user"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
        )
        .await
        .2
        .contains(r#""id":"#)
    );

    let url = format!("{}?client_id=x&state=st", gh.url("/login/oauth/authorize"));
    let deny = gh.deny(&url).unwrap();
    assert_eq!(
        deny,
        [
            ("error".to_string(), "access_denied".to_string()),
            (
                "error_description".into(),
                "The user has denied your application access.".into()
            ),
            (
                "error_uri".into(),
                "/apps/building-integrations/setting-up-and-registering-oauth-apps/troubleshooting-authorization-request-errors/#access-denied".into()
            ),
            ("state".into(), "st".into()),
        ]
    );
    assert!(gh.approve(&url, "octo").is_err());
    assert!(gh.approve(&url, "nobody").is_err());
}

// ---------------------------------------------------------------------------
// Nimbus (kind = "oauth2") over HTTP

#[test]
fn nimbus_spec_parses_and_differs_from_every_preset() {
    let spec = ProviderSpec::parse(custom::SPEC).unwrap();
    assert_eq!(spec.authorize.client_id_param, "app_key");
    assert_eq!(spec.token.client_id_param, "appKey");
    assert_eq!(spec.token.client_secret_param, "appSecret");
    assert_eq!(spec.token.code_param, "authCode");
    assert_eq!(spec.token.access_token.0, "/data/credentials/bearer");
    assert_eq!(spec.errors.code[0].0, "/failure/code");
    assert_eq!(
        spec.identity.subject.0[0].to_string(),
        "profile:/result/account/uid"
    );
    let refresh = spec.refresh.as_ref().unwrap();
    assert_eq!(refresh.refresh_token_param, "renewalToken");
    assert!(spec.refresh_token_single_use && spec.pkce);
    assert_eq!(
        spec.requests[0].headers["X-Nimbus-Api"],
        custom::API_VERSION.parse().unwrap()
    );
    for (name, text) in authbroker::provider::presets::PRESETS {
        let preset = ProviderSpec::parse(text).unwrap();
        assert_ne!(
            preset.authorize.client_id_param, spec.authorize.client_id_param,
            "{name}"
        );
        assert_ne!(
            preset.token.client_id_param, spec.token.client_id_param,
            "{name}"
        );
        assert_ne!(preset.token.code_param, spec.token.code_param, "{name}");
        assert_ne!(preset.token.access_token, spec.token.access_token, "{name}");
        assert_ne!(preset.errors.code, spec.errors.code, "{name}");
        assert_ne!(preset.identity.subject, spec.identity.subject, "{name}");
    }
    // And through config, as `[providers.NAME.spec]`.
    let table = CustomEmulator::spec_table();
    assert_eq!(table["display_name"].as_str(), Some("Nimbus ID"));
}

async fn nimbus_code(nimbus: &CustomEmulator, seed: &str) -> (String, String) {
    let (verifier, challenge) = pkce();
    let url = format!(
        "{}?app_key={}&redirect_uri=https%3A%2F%2Fapp.example.com%2Foauth%2Fcallback&response_type=auth_code&scope=profile.basic%2Cprofile.email&state=s&code_challenge={challenge}&code_challenge_method=S256&display=popup",
        nimbus.url(custom::AUTHORIZE_PATH),
        custom::CLIENT_ID
    );
    let callback = nimbus.approve(&url, seed).unwrap();
    (param(&callback, "code"), verifier)
}

fn nimbus_token_body(code: &str, verifier: &str) -> Value {
    json!({
        "authCode": code,
        "redirect_uri": custom::REDIRECT_URI,
        "code_verifier": verifier,
        "appKey": custom::CLIENT_ID,
        "appSecret": custom::CLIENT_SECRET,
        "grantKind": "auth_code",
    })
}

async fn post_json(url: &str, body: &Value) -> (StatusCode, Option<String>, String) {
    text(client().post(url).json(body).send().await.unwrap()).await
}

#[tokio::test]
async fn nimbus_nests_tokens_and_errors() {
    let nimbus = CustomEmulator::start().await;
    nimbus.add_user("n");
    let (code, verifier) = nimbus_code(&nimbus, "n").await;
    let token_url = nimbus.url(custom::TOKEN_PATH);
    // A wrong verifier is refused (and uses up the code).
    let (status, _, body) = post_json(
        &token_url,
        &nimbus_token_body(&code, "x".repeat(43).as_str()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.starts_with(r#"{"status":"fail","failure":{"code":"E_PKCE","#),
        "{body}"
    );

    let (code, verifier2) = nimbus_code(&nimbus, "n").await;
    assert_ne!(verifier, verifier2);
    let (status, _, body) = post_json(&token_url, &nimbus_token_body(&code, &verifier2)).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    let creds = &v["data"]["credentials"];
    let (bearer, renewal) = (
        creds["bearer"].as_str().unwrap(),
        creds["renewal"].as_str().unwrap(),
    );
    assert_eq!(
        body,
        format!(
            r#"{{"status":"ok","data":{{"credentials":{{"bearer":"{bearer}","lifetime":3600,"renewal":"{renewal}","grants":["profile.basic","profile.email"]}}}}}}"#
        )
    );
    // Errors: HTTP 200 with the code three levels down.
    let (status, _, body) = post_json(&token_url, &nimbus_token_body(&code, &verifier2)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"status":"fail","failure":{"code":"E_AUTH_CODE","detail":"authorization code is invalid, expired or used"}}"#
    );
    assert_no_violations(&nimbus);

    // Shape errors are the only non-200 answers, and violations.
    let form = client()
        .post(&token_url)
        .form(&[("authCode", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), StatusCode::BAD_REQUEST);
    let mut standard = nimbus_token_body("c", "v");
    standard["grant_type"] = json!("authorization_code");
    assert_eq!(
        post_json(&token_url, &standard).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(nimbus.violations().len(), 2);
    let seen = requests_for(&nimbus, Step::Token);
    assert_eq!(
        seen.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 200, 200, 400, 400]
    );
    for key in ["appSecret", "authCode", "code_verifier"] {
        assert_eq!(seen[1].param(key), Some("<redacted>"), "{key}");
    }
    assert_eq!(seen[1].param("appKey"), Some(custom::CLIENT_ID));
}

#[tokio::test]
async fn nimbus_profile_renewal_and_numbers() {
    let nimbus = CustomEmulator::start().await;
    let expected = nimbus.add_nimbus_user(
        "p",
        custom::NimbusUser {
            uid: 8_812_345,
            handle: "nb.p".into(),
            display: None,
            picture: "https://img.nimbus.example/u/8812345/256.png".into(),
            contact: Some(("p@mail.nimbus.example".into(), true)),
        },
    );
    assert_eq!(expected.display_name, "nb.p");
    let (access, renewal) = nimbus.issue_tokens("p");
    let profile_url = nimbus.url(&format!(
        "{}?app={}",
        custom::PROFILE_PATH,
        custom::CLIENT_ID
    ));
    let profile = |version: Option<&str>| {
        let mut r = client().get(&profile_url).bearer_auth(&access);
        if let Some(v) = version {
            r = r.header("X-Nimbus-Api", v);
        }
        r.send()
    };
    let (status, _, body) = text(profile(Some(custom::API_VERSION)).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body.starts_with(r#"{"status":"ok","result":{"account":"#),
        "{body}"
    );
    assert_eq!(v.pointer("/result/account/uid"), Some(&json!(8_812_345)));
    assert!(v.pointer("/result/account/names/display").is_none());
    assert_eq!(
        v.pointer("/result/account/contact/confirmed"),
        Some(&json!(true))
    );
    assert_no_violations(&nimbus);

    let (status, _, body) = text(profile(None).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("E_API_VERSION"));
    assert_eq!(nimbus.violations().len(), 1);

    nimbus.set_numbers_as_strings(true);
    let (_, _, body) = text(profile(Some(custom::API_VERSION)).await.unwrap()).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.pointer("/result/account/uid"), Some(&json!("8812345")));

    let renew = |rt: &str| {
        json!({
            "renewalToken": rt,
            "appKey": custom::CLIENT_ID,
            "appSecret": custom::CLIENT_SECRET,
            "grantKind": "renewal",
        })
    };
    let renew_url = nimbus.url(custom::REFRESH_PATH);
    let (status, _, body) = post_json(&renew_url, &renew(renewal.as_deref().unwrap())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(r#""lifetime":"3600""#), "{body}");
    let (status, _, body) = post_json(&renew_url, &renew(renewal.as_deref().unwrap())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("E_RENEWAL"), "{body}");

    // A bad bearer token: HTTP 200 and E_TOKEN.
    let (status, _, body) = text(
        client()
            .get(&profile_url)
            .bearer_auth("nb1.nope")
            .header("X-Nimbus-Api", custom::API_VERSION)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(r#""code":"E_TOKEN""#));

    let deny = nimbus.deny("http://x/connect/authorize?state=abc").unwrap();
    assert_eq!(param(&deny, "error"), "user_cancelled");
    assert_eq!(param(&deny, "state"), "abc");
    let spec = ProviderSpec::parse(custom::SPEC).unwrap();
    assert!(spec.authorize.denied.contains(&param(&deny, "error")));
}

#[tokio::test]
async fn nimbus_checks_the_authorize_url() {
    let nimbus = CustomEmulator::start().await;
    nimbus.add_user("a");
    let (_, challenge) = pkce();
    let ok = format!(
        "{}?app_key={}&redirect_uri=https%3A%2F%2Fapp.example.com%2Foauth%2Fcallback&response_type=auth_code&scope=profile.basic&state=s&code_challenge={challenge}&code_challenge_method=S256&display=popup",
        nimbus.url(custom::AUTHORIZE_PATH),
        custom::CLIENT_ID
    );
    nimbus.approve(&ok, "a").unwrap();
    assert_no_violations(&nimbus);
    for (url, why) in [
        (ok.replace("app_key=", "client_id="), "app_key"),
        (ok.replace("auth_code", "code"), "response_type"),
        (
            ok.replace("scope=profile.basic", "scope=profile.basic+profile.email"),
            "scope",
        ),
        (ok.replace("&code_challenge_method=S256", ""), "PKCE"),
        (
            ok.replace("app.example.com", "evil.example"),
            "redirect_uri",
        ),
    ] {
        let err = nimbus.approve(&url, "a").unwrap_err();
        assert!(err.contains(why), "{url}: {err}");
    }
    nimbus
        .approve(&ok.replace("&display=popup", ""), "a")
        .unwrap();
    assert!(nimbus.violations()[0].contains("display"));
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let qiita = QiitaEmulator::start().await;
    qiita.add_user("s");
    let code = qiita_code(&qiita, "s").await;
    let (_, _, body) = qiita_exchange(&qiita, &code).await;
    let token = serde_json::from_str::<Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    client()
        .delete(qiita.url(&format!("{}/{token}", qiita::TOKEN_PATH)))
        .send()
        .await
        .unwrap();
    assert_redacted(&qiita, &[&code, &token, qiita::CLIENT_SECRET]);
}
