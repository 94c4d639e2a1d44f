//! OIDC specifics against the Google emulator: every way an ID token can be
//! wrong, each signing algorithm, key rotation, caching of discovery and
//! JWKS, PKCE only when advertised, an issuer behind a private CA (HTTPS),
//! and discovery naming clear-text endpoints.

use std::{collections::HashMap, sync::Arc};

use crate::support::{
    emulators::{
        Emulator,
        google::{self, Alg, GoogleEmulator, Tamper},
        https::TestCa,
    },
    *,
};
use authbroker::grpc::pb::{self, Outcome};
use tonic::Code;

async fn setup() -> (TestApp, Arc<GoogleEmulator>) {
    let emu = Arc::new(GoogleEmulator::start().await);
    let config = emu.provider_config();
    let app = spawn_app(|s| {
        s.providers.insert("google".into(), config);
    })
    .await;
    (app, emu)
}

async fn login(
    app: &TestApp,
    emu: &GoogleEmulator,
    seed: &str,
) -> Result<pb::CompleteLoginResponse, tonic::Status> {
    emu.add_user(seed);
    let begun = app.begin_with("google").await;
    let query: HashMap<String, String> = emu
        .approve(&begun.authorize_url, seed)
        .expect("the emulator accepts the authorize URL")
        .into_iter()
        .collect();
    app.complete(&begun.state, &query["code"]).await
}

#[tokio::test]
async fn every_id_token_tamper_is_caught_and_valid_variants_pass() {
    let (app, emu) = setup().await;
    for (i, tamper) in Tamper::ALL.into_iter().enumerate() {
        emu.set_id_token_tamper(tamper);
        let seed = format!("t{i}");
        let result = login(&app, &emu, &seed).await;
        if tamper.accepted() {
            let done = result.unwrap_or_else(|e| panic!("{tamper:?} must pass: {e:?}"));
            let identity = done.identity.unwrap();
            assert_eq!(
                identity.email_verified,
                tamper != Tamper::EmailUnverified,
                "{tamper:?}"
            );
        } else {
            let err = result.expect_err(&format!("{tamper:?} must be refused"));
            let msg = assert_error(&err, Code::FailedPrecondition, "ID_TOKEN_INVALID");
            assert!(msg.contains("ID token"), "{tamper:?}: {msg}");
        }
    }
    let refused = Tamper::ALL.iter().filter(|t| !t.accepted()).count() as u64;
    assert_eq!(
        app.store.count_users().await.unwrap(),
        Tamper::ALL.len() as u64 - refused,
        "refused logins persisted nothing"
    );
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn rs256_es256_and_eddsa_all_verify() {
    let (app, emu) = setup().await;
    for alg in Alg::ALL {
        emu.set_signing_alg(alg);
        let done = login(&app, &emu, alg.name())
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        assert_eq!(done.outcome(), Outcome::UserCreated);
    }
}

#[tokio::test]
async fn discovery_and_jwks_are_cached() {
    let (app, emu) = setup().await;
    for seed in ["a", "b", "c", "d"] {
        login(&app, &emu, seed).await.unwrap();
    }
    assert_eq!(emu.discovery_fetches(), 1, "discovery is fetched once");
    assert_eq!(
        emu.jwks_fetches(),
        1,
        "JWKS is fetched once within its max-age"
    );
}

#[tokio::test]
async fn an_unknown_kid_refetches_once_and_rate_limits_further_refetches() {
    let (app, emu) = setup().await;
    login(&app, &emu, "warm").await.unwrap();
    assert_eq!(emu.jwks_fetches(), 1);

    // The issuer rotated keys: tokens are signed with a key our cache lacks,
    // and the new JWKS already has it.
    emu.sign_with_unknown_kid(true);
    emu.publish_rotated_key();
    let done = login(&app, &emu, "rotated").await.unwrap();
    assert_eq!(done.outcome(), Outcome::UserCreated);
    assert_eq!(emu.jwks_fetches(), 2, "exactly one refetch");

    // A forged kid right after: no new fetch is allowed, the token is refused.
    let fresh = Arc::new(GoogleEmulator::start().await);
    let config = fresh.provider_config();
    let app2 = spawn_app(|s| {
        s.providers.insert("google".into(), config);
    })
    .await;
    login(&app2, &fresh, "warm").await.unwrap();
    fresh.sign_with_unknown_kid(true);
    let err = login(&app2, &fresh, "forged1").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "ID_TOKEN_INVALID");
    assert_eq!(fresh.jwks_fetches(), 2, "one refetch for the unknown kid");
    let err = login(&app2, &fresh, "forged2").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "ID_TOKEN_INVALID");
    assert_eq!(
        fresh.jwks_fetches(),
        2,
        "no second refetch within the interval"
    );
}

#[tokio::test]
async fn pkce_only_when_advertised() {
    let emu = Arc::new(GoogleEmulator::start().await);
    emu.set_pkce_advertised(false);
    let config = emu.provider_config();
    let app = spawn_app(|s| {
        s.providers.insert("google".into(), config);
    })
    .await;
    let begun = app.begin_with("google").await;
    let q: HashMap<_, _> = url::Url::parse(&begun.authorize_url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert!(!q.contains_key("code_challenge"));
    assert_eq!(q["scope"], "openid email profile");
    assert_eq!(q["nonce"].len(), 43, "a nonce is always sent");
    login(&app, &emu, "nopkce").await.unwrap();
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn a_discovery_document_for_another_issuer_is_refused() {
    let emu = Arc::new(GoogleEmulator::start().await);
    emu.set_discovery_issuer(Some("https://evil.example".into()));
    let config = emu.provider_config();
    let app = spawn_app(|s| {
        s.providers.insert("google".into(), config);
    })
    .await;
    let err = app
        .begin(pb::BeginLoginRequest {
            provider: "google".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let msg = assert_error(&err, Code::Internal, "PROVIDER_BAD_RESPONSE");
    assert!(msg.contains("different issuer"), "{msg}");
}

#[tokio::test]
async fn a_generic_oidc_provider_needs_only_its_issuer() {
    let emu = Arc::new(GoogleEmulator::start().await);
    let mut config = emu.provider_config();
    config.kind = "oidc".into();
    let app = spawn_app(|s| {
        s.providers.insert("corp".into(), config);
    })
    .await;
    emu.add_user("kim");
    let begun = app.begin_with("corp").await;
    let query: HashMap<String, String> = emu
        .approve(&begun.authorize_url, "kim")
        .unwrap()
        .into_iter()
        .collect();
    let done = app.complete(&begun.state, &query["code"]).await.unwrap();
    assert_eq!(done.outcome(), Outcome::UserCreated);
    // Without the google preset, the legacy issuer is not accepted.
    emu.set_id_token_tamper(Tamper::LegacyIssuer);
    emu.add_user("lee");
    let begun = app.begin_with("corp").await;
    let query: HashMap<String, String> = emu
        .approve(&begun.authorize_url, "lee")
        .unwrap()
        .into_iter()
        .collect();
    let err = app
        .complete(&begun.state, &query["code"])
        .await
        .unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "ID_TOKEN_INVALID");
}

/// BeginLogin against `provider`, which must fail; the status.
async fn begin_fails(app: &TestApp, provider: &str) -> tonic::Status {
    app.begin(pb::BeginLoginRequest {
        provider: provider.into(),
        ..Default::default()
    })
    .await
    .expect_err("BeginLogin fails")
}

/// An app with `google` pointed at `emu`, trusting the CA file `ca_file`
/// for provider HTTPS if given.
async fn app_for(emu: &GoogleEmulator, ca_file: Option<std::path::PathBuf>) -> TestApp {
    let config = emu.provider_config();
    spawn_app_on(Backend::Sqlite, |s| {
        s.http.ca_file = ca_file;
        s.providers.insert("google".into(), config);
    })
    .await
}

#[tokio::test]
async fn an_issuer_behind_a_private_ca_is_trusted_through_http_ca_file() {
    let ca = TestCa::new();
    let emu = GoogleEmulator::start_https(&ca.server_cert(&["127.0.0.1"])).await;
    assert!(emu.base_url.starts_with("https://127.0.0.1:"));

    // Not an outage: its own reason, and what to do about it.
    let untrusting = app_for(&emu, None).await;
    let err = begin_fails(&untrusting, "google").await;
    let msg = assert_error(&err, Code::FailedPrecondition, "PROVIDER_TLS_ERROR");
    assert!(msg.contains("certificate not trusted"), "{msg}");
    assert!(msg.contains("http.ca_file"), "{msg}");
    assert!(msg.contains("discovery"), "{msg}");
    let info = tonic_types::StatusExt::get_details_error_info(&err).unwrap();
    assert_eq!(info.metadata["provider"], "google");
    assert_eq!(emu.discovery_fetches(), 0, "no request got through");

    // With the CA in http.ca_file: discovery, token and JWKS over HTTPS.
    let dir = tempfile::tempdir().unwrap();
    let trusting = app_for(&emu, Some(ca.write_pem(dir.path()))).await;
    let done = login(&trusting, &emu, "alice")
        .await
        .expect("login over HTTPS");
    assert_eq!(done.outcome(), Outcome::UserCreated);
    assert_eq!(emu.discovery_fetches(), 1);
    assert_eq!(emu.jwks_fetches(), 1);
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused_even_from_a_trusted_ca() {
    let ca = TestCa::new();
    let emu = GoogleEmulator::start_https(&ca.server_cert(&["idp.example"])).await;
    let dir = tempfile::tempdir().unwrap();
    let app = app_for(&emu, Some(ca.write_pem(dir.path()))).await;
    let err = begin_fails(&app, "google").await;
    let msg = assert_error(&err, Code::FailedPrecondition, "PROVIDER_TLS_ERROR");
    assert!(msg.contains("not valid for this host name"), "{msg}");
}

#[tokio::test]
async fn discovery_naming_clear_text_endpoints_off_loopback_is_refused() {
    let emu = GoogleEmulator::start().await;
    // Nothing listens there; discovery alone must stop the login.
    emu.set_endpoints_base(Some("http://idp.example:8080".into()));
    let app = app_for(&emu, None).await;
    let err = begin_fails(&app, "google").await;
    let msg = assert_error(&err, Code::Internal, "PROVIDER_BAD_RESPONSE");
    assert!(msg.contains("http://idp.example:8080"), "{msg}");
    assert!(
        msg.contains("providers.google.allow_insecure_http"),
        "{msg}"
    );

    // Opted in by name, the same document is used.
    let mut config = emu.provider_config();
    config.allow_insecure_http = true;
    let opted_in = spawn_app_on(Backend::Sqlite, |s| {
        s.providers.insert("google".into(), config);
    })
    .await;
    let begun = opted_in.begin_with("google").await;
    assert!(
        begun.authorize_url.starts_with("http://idp.example:8080/"),
        "{}",
        begun.authorize_url
    );

    // An override of every endpoint discovery gets wrong is enough too.
    let mut config = emu.provider_config();
    for (key, path) in [
        ("authorize_url", google::AUTHORIZE_PATH),
        ("token_url", google::TOKEN_PATH),
        ("jwks_uri", google::JWKS_PATH),
        ("revoke_url", google::REVOKE_PATH),
    ] {
        config.endpoints.insert(key.into(), emu.url(path));
    }
    let overridden = spawn_app_on(Backend::Sqlite, |s| {
        s.providers.insert("google".into(), config);
    })
    .await;
    overridden.begin_with("google").await;
}

/// `email` and `email_verified` come from one document: userinfo's address
/// without a verdict is not verified by the ID token's verdict on its own.
#[tokio::test]
async fn email_and_its_verification_come_from_one_document() {
    let emu = Arc::new(GoogleEmulator::start().await);
    let mut config = emu.provider_config();
    config.fetch_userinfo = true;
    let app = spawn_app(|s| {
        s.providers.insert("google".into(), config);
    })
    .await;
    let done = login(&app, &emu, "plain").await.unwrap();
    assert!(done.identity.unwrap().email_verified, "the setup is right");

    emu.set_userinfo_email(Some("someone.else@example.com".into()));
    let done = login(&app, &emu, "mixed").await.unwrap();
    let identity = done.identity.unwrap();
    assert_eq!(identity.email, "someone.else@example.com");
    assert!(
        !identity.email_verified,
        "the ID token's verdict is about another address"
    );
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}
