//! OIDC specifics against the Google emulator: every way an ID token can be
//! wrong, each signing algorithm, key rotation, caching of discovery and
//! JWKS, and PKCE only when advertised.

mod support;

use std::{collections::HashMap, sync::Arc};

use authbroker::grpc::pb::{self, Outcome};
use support::{
    emulators::{
        Emulator,
        google::{Alg, GoogleEmulator, Tamper},
    },
    *,
};
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
