//! What the conformance suite does not ask of every preset but Microsoft
//! and Apple need: a multi-tenant ID token whose `iss` names another
//! tenant than its own `tid` is refused (docs/providers.md#microsoft);
//! Apple's name comes once, in the callback's `user`, and one signed client
//! secret serves many requests (docs/providers.md#apple).

use std::collections::HashMap;

use crate::support::{
    emulators::{Emulator, apple::AppleEmulator, microsoft::MicrosoftEmulator},
    *,
};
use authbroker::grpc::pb::{self, Outcome};
use tonic::Code;

const NAME: &str = "p";

/// BeginLogin, the browser step, and CompleteLogin with every callback
/// field but `code` and `state` in `callback_params`.
async fn login(
    app: &TestApp,
    emu: &dyn Emulator,
    seed: &str,
) -> Result<pb::CompleteLoginResponse, tonic::Status> {
    let begun = app.begin_with(NAME).await;
    let mut query: HashMap<String, String> = emu
        .approve(&begun.authorize_url, seed)
        .unwrap()
        .into_iter()
        .collect();
    let code = query.remove("code").unwrap();
    query.remove("state");
    app.client()
        .complete_login(authed(
            pb::CompleteLoginRequest {
                state: begun.state,
                code,
                callback_params: query,
                ..Default::default()
            },
            LOGIN_KEY,
        ))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn an_entra_token_whose_issuer_names_another_tenant_is_refused() {
    let emu = MicrosoftEmulator::start().await;
    let config = emu.provider_config();
    let app = spawn_app_on(Backend::Sqlite, |s| {
        s.providers.insert(NAME.into(), config);
    })
    .await;
    let expected = emu.add_user("ada");
    let done = login(&app, &emu, "ada").await.unwrap();
    assert_eq!(done.identity.unwrap().subject, expected.subject);
    assert!(expected.subject.contains(':'), "tid:oid");

    emu.set_foreign_issuer(true);
    emu.add_user("mallory");
    let err = login(&app, &emu, "mallory").await.unwrap_err();
    let msg = assert_error(&err, Code::FailedPrecondition, "ID_TOKEN_INVALID");
    assert!(msg.contains("iss"), "{msg}");
    assert_eq!(app.store.count_users().await.unwrap(), 1);
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn apple_s_name_comes_once_and_its_client_secret_is_signed_once() {
    let emu = AppleEmulator::start().await;
    let config = emu.provider_config();
    let app = spawn_app_on(Backend::Sqlite, |s| {
        s.providers.insert(NAME.into(), config);
    })
    .await;
    let expected = emu.add_user("ada");
    let first = login(&app, &emu, "ada").await.unwrap();
    assert_eq!(first.outcome(), Outcome::UserCreated);
    let identity = first.identity.unwrap();
    assert_eq!(identity.display_name, "ada Lovelace");
    assert_eq!(identity.email, expected.email);
    assert!(identity.email_verified, "\"true\" as a string is verified");

    let again = login(&app, &emu, "ada").await.unwrap();
    assert_eq!(again.outcome(), Outcome::SignedIn);
    assert_eq!(
        again.identity.unwrap().display_name,
        "",
        "no `user` field the second time"
    );

    // Two code exchanges, one secret (its iat twice).
    let seen = emu.secrets_seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], seen[1], "the secret is reused, not re-signed");
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn apple_needs_its_key_team_and_no_client_secret() {
    let emu = AppleEmulator::start().await;
    let mut config = emu.provider_config();
    config.options.clear();
    config.private_key_id = None;
    config.client_secret = Some("a-static-secret".to_string().into());
    let http = authbroker::http::HttpClient::new(&Default::default()).unwrap();
    let problems =
        authbroker::provider::Registry::build(&[(NAME.to_string(), config)].into(), &http, None)
            .err()
            .expect("refused");
    let all = problems.join("\n");
    assert!(all.contains("options.team_id: required"), "{all}");
    assert!(all.contains("private_key_id"), "{all}");
    assert!(all.contains("client_secret"), "{all}");
}

/// The README's Apple example (outside the tested preset blocks, for its
/// key file) builds once the key path points at a real key.
#[test]
fn the_readme_apple_example_builds() {
    let readme = include_str!("../../README.md");
    let start = readme.find("[providers.apple]").expect("an Apple example");
    let block = &readme[start..];
    let block = &block[..block.find("```").unwrap()];
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/keys/ec.pem");
    let block = block.replace("/run/secrets/AuthKey_KEY9XYZ123.p8", key);
    let settings: authbroker::config::Settings = authbroker::config::Settings::from_figment(
        figment::Figment::from(figment::providers::Serialized::defaults(
            authbroker::config::Settings::default(),
        ))
        .merge(<figment::providers::Toml as figment::providers::Format>::string(&block)),
    )
    .unwrap();
    let http = authbroker::http::HttpClient::new(&settings.http).unwrap();
    authbroker::provider::Registry::build(&settings.providers, &http, None)
        .unwrap_or_else(|p| panic!("README's Apple example: {p:#?}"));
}
