//! Preset details beyond the shared conformance suite: QQ's unionid option,
//! Weibo's uid as number or string, Gitee emails with the `emails` scope,
//! AcWing's own denial code, and config-only providers in `check-config`.

use std::collections::HashMap;

use crate::support::{
    emulators::{
        Emulator, custom::CustomEmulator, gitee::GiteeEmulator, qq::QqEmulator,
        wechat::WechatEmulator, weibo::WeiboEmulator,
    },
    *,
};
use authbroker::{
    config::ProviderConfig,
    grpc::pb::{self, Outcome},
};
use tonic::Code;

async fn app_with(config: ProviderConfig) -> TestApp {
    spawn_app(|s| {
        s.providers.insert("p".into(), config);
    })
    .await
}

async fn login(
    app: &TestApp,
    emu: &dyn Emulator,
    seed: &str,
) -> Result<pb::CompleteLoginResponse, tonic::Status> {
    let begun = app.begin_with("p").await;
    let q: HashMap<String, String> = emu
        .approve(&begun.authorize_url, seed)
        .unwrap()
        .into_iter()
        .collect();
    app.complete(&begun.state, &q["code"]).await
}

#[tokio::test]
async fn qq_reports_unionid_only_when_configured() {
    let emu = QqEmulator::start().await;
    let mut config = emu.provider_config();
    config.union_id = true;
    let app = app_with(config).await;
    emu.set_union_id_enabled(true);
    let expected = emu.add_user("mei");
    let done = login(&app, &emu, "mei").await.unwrap();
    let id = done.identity.unwrap();
    assert_eq!(id.subject, expected.subject, "the subject stays the openid");
    assert_eq!(id.union_id, emu.union_id_of("mei"));
    assert!(id.union_id.starts_with("UID_"));
    let me = emu
        .requests()
        .into_iter()
        .find(|r| r.path == "/oauth2.0/me")
        .unwrap();
    assert_eq!(me.param("unionid"), Some("1"));

    // The app has no unionid permission at QQ: error 100048, a rejection.
    emu.set_union_id_enabled(false);
    emu.add_user("wu");
    let err = login(&app, &emu, "wu").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "PROVIDER_REJECTED");
}

#[tokio::test]
async fn wechat_unionid_comes_from_the_token_answer() {
    let emu = WechatEmulator::start().await;
    emu.set_unionid_enabled(true);
    let app = app_with(emu.provider_config()).await;
    let expected = emu.add_user("zhao");
    assert!(!expected.union_id.is_empty());
    let done = login(&app, &emu, "zhao").await.unwrap();
    assert_eq!(done.identity.unwrap().union_id, expected.union_id);
    // The authorize URL keeps WeChat's fragment.
    let begun = app.begin_with("p").await;
    assert!(begun.authorize_url.ends_with("#wechat_redirect"));
}

#[tokio::test]
async fn weibo_uid_as_number_or_string_is_the_same_subject() {
    let emu = WeiboEmulator::start().await;
    let app = app_with(emu.provider_config()).await;
    let expected = emu.add_user("li");
    let as_string = login(&app, &emu, "li").await.unwrap();
    emu.set_uid_as_number(true);
    let as_number = login(&app, &emu, "li").await.unwrap();
    assert_eq!(as_number.outcome(), Outcome::SignedIn);
    assert_eq!(as_string.identity.unwrap().subject, expected.subject);
    assert_eq!(as_number.identity.unwrap().subject, expected.subject);
}

#[tokio::test]
async fn gitee_reads_the_primary_confirmed_email_when_granted() {
    let emu = GiteeEmulator::start().await;
    let mut config = emu.provider_config();
    config.scopes = Some(vec!["user_info".into(), "emails".into()]);
    let app = app_with(config).await;
    emu.add_user("qian");
    let done = login(&app, &emu, "qian").await.unwrap();
    let id = done.identity.unwrap();
    let expected = emu.expected_with_emails("qian");
    assert_eq!(id.email, expected.email);
    assert!(id.email_verified);
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn acwing_reports_refusal_as_errcode_40010() {
    use crate::support::emulators::acwing::AcwingEmulator;
    let emu = AcwingEmulator::start().await;
    let app = app_with(emu.provider_config()).await;
    let begun = app.begin_with("p").await;
    let err = app
        .client()
        .complete_login(authed(
            pb::CompleteLoginRequest {
                state: begun.state,
                error: "40010".into(),
                error_description: "user reject".into(),
                ..Default::default()
            },
            LOGIN_KEY,
        ))
        .await
        .unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "ACCESS_DENIED");
}

#[tokio::test]
async fn a_custom_provider_runs_from_config_alone() {
    let emu = CustomEmulator::start().await;
    let config = emu.provider_config();
    assert_eq!(config.kind, "oauth2");
    assert!(config.spec.is_some());
    let app = app_with(config).await;
    let expected = emu.add_user("nim");
    let done = login(&app, &emu, "nim").await.unwrap();
    assert_eq!(done.outcome(), Outcome::UserCreated);
    assert_eq!(done.identity.unwrap().subject, expected.subject);
}

#[test]
fn check_config_reports_broken_custom_specs() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        r#"
[[auth.api_keys]]
name = "web"
sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
role = "login"

[providers.nospec]
kind = "oauth2"
client_id = "x"
client_secret = "y"
redirect_uris = ["https://app.example.com/cb"]

[providers.broken]
kind = "oauth2"
client_id = "x"
client_secret = "y"
redirect_uris = ["https://app.example.com/cb"]
[providers.broken.spec]
display_name = "Broken"
[providers.broken.spec.endpoints]
authorize_url = "https://id.example.com/auth"
[[providers.broken.spec.requests]]
name = "profile"
endpoint = "profile_url"
[providers.broken.spec.identity]
subject = "profil:/id"

[providers.typo]
kind = "oauth2"
client_id = "x"
client_secret = "y"
redirect_uris = ["https://app.example.com/cb"]
[providers.typo.spec]
display_name = "Typo"
endpoints = { authorize_url = "https://a.example/a", token_url = "https://a.example/t" }
identity = { subjekt = "token:/id" }

[providers.qq]
kind = "qq"
client_id = "1"
client_secret = "s"
redirect_uris = ["https://app.example.com/cb"]
union_id = true
fetch_userinfo = true
spec = { display_name = "nope" }

[providers.corp]
kind = "oidc"
client_id = "x"
client_secret = "y"
redirect_uris = ["https://app.example.com/cb"]
scopes = ["email"]
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_authbroker"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("AUTHBROKER_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "providers.nospec.spec: kind \"oauth2\" needs a [providers.nospec.spec] table",
        "providers.broken.spec.endpoints.token_url is missing",
        "providers.broken.spec.requests.profile: endpoint \"profile_url\" is not in endpoints",
        "providers.broken.spec.identity.subject: profil:/id refers to an unknown document",
        "providers.typo.spec: unknown field `subjekt`",
        "providers.qq.fetch_userinfo: only OIDC providers take this option",
        "providers.qq.spec: only kind = \"oauth2\" takes a spec",
        "providers.corp.issuer: kind \"oidc\" needs the issuer URL",
        "providers.corp.scopes: OIDC needs the \"openid\" scope",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}
