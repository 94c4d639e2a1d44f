//! What a certified OpenID provider showed (issue 11), against the Google
//! emulator made strict: client authentication enforced at `/token` and
//! `/revoke` by the registered method (Basic, post, private_key_jwt),
//! revocation refusals reported and the token kept, ListProviders' revoke
//! flag, authorize parameters (BeginLogin's and config's), and RFC 9207's
//! `iss` on the callback.

use std::{collections::HashMap, sync::Arc};

use crate::support::{
    emulators::{
        Emulator,
        google::{self, GoogleEmulator},
    },
    *,
};
use authbroker::{
    config::ProviderConfig,
    grpc::pb,
    provider::client_auth::{KeyAlg, TokenAuth},
};
use tonic::{Code, Request};

fn admin<T>(msg: T) -> Request<T> {
    authed(msg, ADMIN_KEY)
}

async fn setup(tweak: impl FnOnce(&mut ProviderConfig)) -> (TestApp, Arc<GoogleEmulator>) {
    let emu = Arc::new(GoogleEmulator::start().await);
    let mut config = emu.provider_config();
    config.store_tokens = true;
    tweak(&mut config);
    let app = spawn_app(|s| {
        with_vault(s);
        s.providers.insert("google".into(), config);
    })
    .await;
    (app, emu)
}

/// A whole login with `extra` callback parameters; the callback's own are
/// passed on as `callback_params` the way a web app would.
async fn login_with(
    app: &TestApp,
    emu: &GoogleEmulator,
    seed: &str,
    edit_callback: impl FnOnce(&mut HashMap<String, String>),
) -> Result<pb::CompleteLoginResponse, tonic::Status> {
    emu.add_user(seed);
    let begun = app.begin_with("google").await;
    let mut back: HashMap<String, String> = emu
        .approve(&begun.authorize_url, seed)
        .expect("the emulator accepts the authorize URL")
        .into_iter()
        .collect();
    edit_callback(&mut back);
    let code = back.remove("code").unwrap();
    back.remove("state");
    app.client()
        .complete_login(authed(
            pb::CompleteLoginRequest {
                state: begun.state,
                code,
                callback_params: back,
                ..Default::default()
            },
            LOGIN_KEY,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn login(app: &TestApp, emu: &GoogleEmulator, seed: &str) -> String {
    login_with(app, emu, seed, |_| {})
        .await
        .unwrap_or_else(|e| panic!("login: {e:?}"))
        .binding
        .unwrap()
        .user_id
}

async fn access_token(app: &TestApp, user_id: &str) -> Result<String, tonic::Status> {
    app.admin()
        .get_provider_token(admin(pb::GetProviderTokenRequest {
            user_id: user_id.into(),
            provider: "google".into(),
        }))
        .await
        .map(|r| r.into_inner().access_token)
}

async fn revoke(app: &TestApp, user_id: &str) -> Result<bool, tonic::Status> {
    app.admin()
        .revoke_provider_token(admin(pb::RevokeProviderTokenRequest {
            user_id: user_id.into(),
            provider: "google".into(),
        }))
        .await
        .map(|r| r.into_inner().revoked_at_provider)
}

/// The method each request authenticated with, from the emulator's log.
fn methods_seen(emu: &GoogleEmulator, path: &str) -> Vec<&'static str> {
    emu.requests()
        .iter()
        .filter(|r| r.path == path)
        .map(|r| {
            if r.authorization.as_deref() == Some("Basic") {
                "client_secret_basic"
            } else if r.params.iter().any(|(k, _)| k == "client_assertion") {
                "private_key_jwt"
            } else if r.params.iter().any(|(k, _)| k == "client_secret") {
                "client_secret_post"
            } else {
                "none"
            }
        })
        .collect()
}

/// Each method, enforced by the IdP for both `/token` and `/revoke`: the
/// login and the revocation authenticate the same way and both work; the
/// token is dead at the provider afterwards.
#[tokio::test]
async fn token_and_revocation_authenticate_by_the_registered_method() {
    let cases: [(&[&'static str], Option<TokenAuth>, &str); 4] = [
        // Discovery lists both: Basic first.
        (
            &["client_secret_post", "client_secret_basic"],
            None,
            "client_secret_basic",
        ),
        (&["client_secret_post"], None, "client_secret_post"),
        (
            &["client_secret_basic"],
            Some(TokenAuth::ClientSecretBasic),
            "client_secret_basic",
        ),
        (
            &["private_key_jwt"],
            Some(TokenAuth::PrivateKeyJwt),
            "private_key_jwt",
        ),
    ];
    for (registered, configured, expected) in cases {
        let (app, emu) = setup(|c| {
            c.token_auth = configured;
            if configured == Some(TokenAuth::PrivateKeyJwt) {
                c.client_secret = None;
                c.private_key_file =
                    Some(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/keys/rsa.pem").into());
                c.private_key_alg = KeyAlg::RS256;
                c.private_key_id = Some("client-key-1".into());
            }
        })
        .await;
        emu.require_client_auth(registered);
        let user = login(&app, &emu, "ada").await;
        let token = access_token(&app, &user).await.unwrap();
        assert!(emu.access_token_valid(&token));
        assert!(revoke(&app, &user).await.unwrap(), "{expected}");
        assert!(!emu.access_token_valid(&token), "{expected}: revoked");
        assert_eq!(
            methods_seen(&emu, google::TOKEN_PATH),
            [expected],
            "{registered:?}"
        );
        assert_eq!(
            methods_seen(&emu, google::REVOKE_PATH),
            [expected],
            "{registered:?}"
        );
        assert!(emu.violations().is_empty(), "{:?}", emu.violations());
    }
}

/// A provider that refuses the revocation: an error with its reason, the
/// token kept (it still works, and the revocation can be retried), and
/// DeleteUser names the provider where revocation failed.
#[tokio::test]
async fn a_refused_revocation_is_an_error_and_keeps_the_token() {
    let (app, emu) = setup(|_| {}).await;
    let user = login(&app, &emu, "ada").await;
    let token = access_token(&app, &user).await.unwrap();
    // The IdP now wants another method than the one discovery chose.
    emu.require_client_auth(&["private_key_jwt"]);
    let err = revoke(&app, &user).await.unwrap_err();
    let msg = assert_error(&err, Code::FailedPrecondition, "REVOCATION_REFUSED");
    assert!(msg.contains("kept"), "{msg}");
    assert!(
        emu.access_token_valid(&token),
        "not revoked at the provider"
    );
    assert_eq!(access_token(&app, &user).await.unwrap(), token, "kept");

    let deleted = app
        .admin()
        .delete_user(admin(pb::DeleteUserRequest {
            user_id: user.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.revoked_at.is_empty());
    assert_eq!(deleted.revocation_failed_at, ["google"]);
    let events = app
        .admin()
        .list_audit_events(admin(pb::ListAuditEventsRequest {
            user_id: user.clone(),
            kind: "token_revoked".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.iter().any(|e| e.outcome == "REVOCATION_REFUSED"),
        "{events:?}"
    );
}

/// ListProviders says revoke only where it can work now: Google's
/// discovery names an endpoint; an issuer that cannot be discovered
/// cannot revoke.
#[tokio::test]
async fn list_providers_advertises_revoke_only_where_it_works() {
    let emu = GoogleEmulator::start().await;
    let mut down = emu.provider_config();
    down.kind = "oidc".into();
    down.issuer = Some("http://127.0.0.1:9".into());
    down.endpoints.clear();
    let app = spawn_app(|s| {
        s.providers.insert("google".into(), emu.provider_config());
        s.providers.insert("down".into(), down);
    })
    .await;
    let listed = app
        .admin()
        .list_providers(admin(pb::ListProvidersRequest {}))
        .await
        .unwrap()
        .into_inner()
        .providers;
    let revoke = |name: &str| listed.iter().find(|p| p.name == name).unwrap().revoke;
    assert!(revoke("google"));
    assert!(!revoke("down"));
}

/// BeginLogin's prompt, login_hint and max_age reach an OIDC authorize
/// URL; config's fixed authorize_params too; an OAuth2 preset that does
/// not take them leaves them out.
#[tokio::test]
async fn authorize_parameters_are_passed_on() {
    let emu = GoogleEmulator::start().await;
    let mut google_cfg = emu.provider_config();
    google_cfg
        .authorize_params
        .insert("access_type".into(), "offline".into());
    let app = spawn_app(|s| {
        s.providers.insert("google".into(), google_cfg);
        s.providers
            .insert("github".into(), provider("github", "Iv1.x", "secret"));
    })
    .await;
    let begin = |name: &str| {
        app.begin(pb::BeginLoginRequest {
            provider: name.into(),
            prompt: "consent".into(),
            login_hint: "ada@example.com".into(),
            max_age: Some(300),
            ..Default::default()
        })
    };
    let url = begin("google").await.unwrap().authorize_url;
    let query: HashMap<String, String> = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(query["prompt"], "consent");
    assert_eq!(query["login_hint"], "ada@example.com");
    assert_eq!(query["max_age"], "300");
    assert_eq!(query["access_type"], "offline");
    emu.add_user("ada");
    emu.approve(&url, "ada").expect("Google takes every one");

    let url = begin("github").await.unwrap().authorize_url;
    assert!(
        !url.contains("prompt=") && !url.contains("login_hint="),
        "{url}"
    );
}

#[tokio::test]
async fn reserved_authorize_params_are_a_config_error() {
    let mut cfg = provider("github", "Iv1.x", "secret");
    cfg.authorize_params.insert("state".into(), "x".into());
    cfg.authorize_params
        .insert("redirect_uri".into(), "https://evil.example".into());
    let mut settings = base_settings();
    settings.providers.insert("gh".into(), cfg);
    let http = authbroker::http::HttpClient::new(&settings.http).unwrap();
    let problems = authbroker::provider::Registry::build(&settings.providers, &http, None)
        .err()
        .expect("refused");
    for key in ["state", "redirect_uri"] {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("providers.gh.authorize_params.{key}:"))),
            "{problems:#?}"
        );
    }
}

/// RFC 9207: where discovery promises `iss`, a callback without it or
/// with another issuer's is refused before the code is sent anywhere.
#[tokio::test]
async fn the_callback_issuer_is_checked() {
    let (app, emu) = setup(|_| {}).await;
    emu.send_iss_parameter(true);
    login(&app, &emu, "ada").await;
    let before = methods_seen(&emu, google::TOKEN_PATH).len();

    let err = login_with(&app, &emu, "bob", |back| {
        back.remove("iss");
    })
    .await
    .unwrap_err();
    let msg = assert_error(&err, Code::FailedPrecondition, "CALLBACK_ISSUER_MISMATCH");
    assert!(msg.contains("missing"), "{msg}");

    let err = login_with(&app, &emu, "bob", |back| {
        back.insert("iss".into(), "https://attacker.example".into());
    })
    .await
    .unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "CALLBACK_ISSUER_MISMATCH");
    assert_eq!(
        methods_seen(&emu, google::TOKEN_PATH).len(),
        before,
        "no code was sent to the token endpoint"
    );
}
