//! AdminService over gRPC: every RPC and its errors, the role check, the
//! token vault (nothing in plaintext at rest), GetProviderToken's refresh
//! with single flight and rejection, revocation, and rotate-keys.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::support::{
    emulators::{Emulator, Fault, Step, qiita::QiitaEmulator, qq::QqEmulator},
    *,
};
use authbroker::grpc::pb::{self, Outcome};
use tonic::Code;

fn admin<T>(msg: T) -> tonic::Request<T> {
    authed(msg, ADMIN_KEY)
}

async fn user_of(app: &TestApp, user_id: &str) -> Result<pb::User, tonic::Status> {
    app.admin()
        .get_user(admin(pb::GetUserRequest {
            user_id: user_id.into(),
        }))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn every_admin_rpc_and_its_errors() {
    let app = spawn_app(|s| {
        with_vault(s);
        s.providers.get_mut("sandbox").unwrap().store_tokens = true;
        let mut off = provider("github", "id", "gh-secret-value");
        off.enabled = false;
        s.providers.insert("off".into(), off);
    })
    .await;
    let mut a = app.admin();

    // ListProviders: capabilities, never a secret.
    let providers = a
        .list_providers(admin(pb::ListProvidersRequest {}))
        .await
        .unwrap()
        .into_inner()
        .providers;
    let sandbox = providers.iter().find(|p| p.name == "sandbox").unwrap();
    assert!(sandbox.enabled && sandbox.pkce && sandbox.refresh && sandbox.store_tokens);
    assert_eq!(sandbox.policy, "auto_create");
    let off = providers.iter().find(|p| p.name == "off").unwrap();
    assert!(!off.enabled);
    let dump = format!("{providers:?}");
    assert!(!dump.contains("gh-secret-value") && !dump.contains("sandbox-secret"));

    let alice = app.sandbox_login("alice").await.binding.unwrap();
    let bob = app.sandbox_login("bob").await.binding.unwrap();
    app.sandbox_login("carol").await;

    // GetUser / FindUserByIdentity.
    let user = user_of(&app, &alice.user_id).await.unwrap();
    assert_eq!(user.identities.len(), 1);
    let linked = &user.identities[0];
    assert!(linked.has_token && linked.token_usable);
    assert_eq!(linked.identity.as_ref().unwrap().username, "alice");
    let err = user_of(&app, "nobody").await.unwrap_err();
    assert_error(&err, Code::NotFound, "USER_NOT_FOUND");
    let err = user_of(&app, "").await.unwrap_err();
    assert_error(&err, Code::InvalidArgument, "MISSING_FIELD");
    let found = a
        .find_user_by_identity(admin(pb::FindUserByIdentityRequest {
            provider: "sandbox".into(),
            subject: alice.subject.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.user_id, alice.user_id);
    let err = a
        .find_user_by_identity(admin(pb::FindUserByIdentityRequest {
            provider: "sandbox".into(),
            subject: "0".into(),
        }))
        .await
        .unwrap_err();
    assert_error(&err, Code::NotFound, "IDENTITY_NOT_FOUND");

    // ListUsers: pages of two, no duplicates, filters.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = a
            .list_users(admin(pb::ListUsersRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 3);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "no user twice across pages");
    let none = a
        .list_users(admin(pb::ListUsersRequest {
            provider: "off".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(none.users.is_empty());
    let future = a
        .list_users(admin(pb::ListUsersRequest {
            created_after: Some(prost_types::Timestamp {
                seconds: time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
                nanos: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(future.users.is_empty());
    let err = a
        .list_users(admin(pb::ListUsersRequest {
            page_token: "bogus".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    let err = a
        .list_users(admin(pb::ListUsersRequest {
            page_size: 501,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_FIELD");

    // UnlinkIdentity: the last one needs force.
    let unlink = |user_id: &str, force: bool| pb::UnlinkIdentityRequest {
        user_id: user_id.into(),
        provider: "sandbox".into(),
        force,
    };
    let err = a
        .unlink_identity(admin(unlink(&alice.user_id, false)))
        .await
        .unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "LAST_IDENTITY");
    let after = a
        .unlink_identity(admin(unlink(&alice.user_id, true)))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(after.identities.is_empty());
    let err = a
        .unlink_identity(admin(unlink(&alice.user_id, true)))
        .await
        .unwrap_err();
    assert_error(&err, Code::NotFound, "IDENTITY_NOT_FOUND");
    let err = a
        .unlink_identity(admin(unlink("nobody", true)))
        .await
        .unwrap_err();
    assert_error(&err, Code::NotFound, "USER_NOT_FOUND");
    // alice can come back as a new user.
    assert_eq!(
        app.sandbox_login("alice").await.outcome(),
        Outcome::UserCreated
    );

    // DeleteUser cascades.
    let deleted = a
        .delete_user(admin(pb::DeleteUserRequest {
            user_id: bob.user_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.revoked_at.is_empty(), "the sandbox cannot revoke");
    assert_error(
        &user_of(&app, &bob.user_id).await.unwrap_err(),
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert!(
        app.store
            .find_binding("sandbox", &bob.subject)
            .await
            .unwrap()
            .is_none()
    );
    let err = a
        .delete_user(admin(pb::DeleteUserRequest {
            user_id: bob.user_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_error(&err, Code::NotFound, "USER_NOT_FOUND");

    // CancelLogin.
    let begun = app.begin_with("sandbox").await;
    let (code, state) = app.sandbox_authorize(&begun.authorize_url, "dave").await;
    a.cancel_login(admin(pb::CancelLoginRequest {
        state: state.clone(),
    }))
    .await
    .unwrap();
    let err = app.complete(&state, &code).await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "STATE_ALREADY_USED");
    let err = a
        .cancel_login(admin(pb::CancelLoginRequest { state: "x".into() }))
        .await
        .unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_FIELD");
    let err = a
        .cancel_login(admin(pb::CancelLoginRequest {
            state: "A".repeat(43),
        }))
        .await
        .unwrap_err();
    assert_error(&err, Code::NotFound, "STATE_UNKNOWN");

    // ListAuditEvents: every admin call is there with its actor and outcome.
    let events = a
        .list_audit_events(admin(pb::ListAuditEventsRequest {
            kind: "admin_call".into(),
            page_size: 500,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .all(|e| e.kind == "admin_call" && e.actor == "ops")
    );
    for rpc in [
        "ListProviders",
        "GetUser",
        "FindUserByIdentity",
        "ListUsers",
        "UnlinkIdentity",
        "DeleteUser",
        "CancelLogin",
    ] {
        assert!(events.iter().any(|e| e.detail == rpc), "{rpc} is audited");
    }
    assert!(
        events
            .iter()
            .any(|e| e.detail == "GetUser" && e.outcome == "USER_NOT_FOUND")
    );
    assert!(
        events
            .iter()
            .any(|e| e.detail == "GetUser" && e.outcome == "success")
    );
    let deletion = a
        .list_audit_events(admin(pb::ListAuditEventsRequest {
            user_id: bob.user_id.clone(),
            kind: "user_deleted".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(deletion.len(), 1);
    assert_eq!(deletion[0].actor, "ops");
    // Paging one at a time walks every event once, newest first.
    let mut ids = Vec::new();
    let mut token = String::new();
    for _ in 0..200 {
        let page = a
            .list_audit_events(admin(pb::ListAuditEventsRequest {
                kind: "login_succeeded".into(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.events.iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids.len(), 4, "alice, bob, carol, alice again");
    assert!(ids.windows(2).all(|w| w[0] > w[1]));
    let err = a
        .list_audit_events(admin(pb::ListAuditEventsRequest {
            kind: "nonsense".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_FIELD");

    // Only the admin role may call any of it.
    let err = a
        .list_providers(authed(pb::ListProvidersRequest {}, LOGIN_KEY))
        .await
        .unwrap_err();
    assert_error(&err, Code::PermissionDenied, "ROLE_NOT_ALLOWED");
    let err = a
        .list_providers(tonic::Request::new(pb::ListProvidersRequest {}))
        .await
        .unwrap_err();
    assert_error(&err, Code::Unauthenticated, "API_KEY_MISSING");
}

async fn qq_setup(backend: Backend) -> (TestApp, Arc<QqEmulator>) {
    let emu = Arc::new(QqEmulator::start().await);
    let mut config = emu.provider_config();
    config.store_tokens = true;
    let app = spawn_app_on(backend, |s| {
        with_vault(s);
        // QQ tokens live 90 days: a longer skew makes every call refresh.
        s.vault.refresh_skew = Duration::from_secs(100 * 86_400);
        s.providers.insert("qq".into(), config);
    })
    .await;
    (app, emu)
}

async fn qq_login(app: &TestApp, emu: &QqEmulator, seed: &str) -> pb::Binding {
    emu.add_user(seed);
    let begun = app.begin_with("qq").await;
    let q: HashMap<String, String> = emu
        .approve(&begun.authorize_url, seed)
        .unwrap()
        .into_iter()
        .collect();
    app.complete(&begun.state, &q["code"])
        .await
        .unwrap()
        .binding
        .unwrap()
}

async fn token(
    app: &TestApp,
    user_id: &str,
    provider: &str,
) -> Result<pb::ProviderToken, tonic::Status> {
    app.admin()
        .get_provider_token(admin(pb::GetProviderTokenRequest {
            user_id: user_id.into(),
            provider: provider.into(),
        }))
        .await
        .map(|r| r.into_inner())
}

fn refreshes(emu: &QqEmulator) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.step == Step::Refresh)
        .count()
}

/// Every table's rows as text, and (SQLite) the raw database files.
async fn everything_stored(app: &TestApp) -> String {
    let url = app.database_url();
    let mut all = String::new();
    if let Some(path) = url.strip_prefix("sqlite://") {
        for suffix in ["", "-wal"] {
            if let Ok(bytes) = std::fs::read(format!("{path}{suffix}")) {
                all.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        return all;
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tables = client
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap();
    for t in tables {
        let name: String = t.get(0);
        for row in client
            .query(&format!("SELECT t::text FROM \"{name}\" t"), &[])
            .await
            .unwrap()
        {
            all.push_str(row.get::<_, &str>(0));
            all.push('\n');
        }
    }
    all
}

async fn tokens_are_sealed_refreshed_and_replaced(backend: Backend) {
    let (app, emu) = qq_setup(backend).await;
    let binding = qq_login(&app, &emu, "hua").await;

    let first = token(&app, &binding.user_id, "qq").await.unwrap();
    assert!(first.refreshed, "within the skew: refreshed");
    assert!(emu.access_token_valid(&first.access_token));
    assert!(first.expires_at.is_some());
    // QQ's refresh token is single-use: the second refresh only works if the
    // first one's successor was stored.
    let second = token(&app, &binding.user_id, "qq").await.unwrap();
    assert!(second.refreshed);
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(refreshes(&emu), 2);

    // Nothing at rest holds a token in plaintext.
    let stored = everything_stored(&app).await;
    for t in [&first.access_token, &second.access_token] {
        assert!(
            !stored.contains(t.as_str()),
            "plaintext token in the database"
        );
        let hex: String = t.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(!stored.contains(&hex), "hex of a token in the database");
    }
    assert!(
        stored.contains("test-1"),
        "the scan does see the token rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_refreshed_and_replaced_on_postgres() {
    tokens_are_sealed_refreshed_and_replaced(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_refreshed_and_replaced_on_sqlite() {
    tokens_are_sealed_refreshed_and_replaced(Backend::Sqlite).await;
}

/// QQ's refresh tokens work once. Twenty concurrent callers with every token
/// "due" make twenty refreshes; without the per-identity lock two would
/// spend the same refresh token and one would be told the user must log in
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_never_spend_a_single_use_token_twice() {
    let (app, emu) = qq_setup(Backend::Postgres).await;
    let binding = qq_login(&app, &emu, "jun").await;
    let app = Arc::new(app);
    let before = refreshes(&emu);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (app, user) = (app.clone(), binding.user_id.clone());
            tokio::spawn(async move { token(&app, &user, "qq").await })
        })
        .collect();
    let mut tokens = Vec::new();
    for c in calls {
        tokens.push(
            c.await
                .unwrap()
                .expect("no caller hits a spent refresh token"),
        );
    }
    assert_eq!(refreshes(&emu) - before, 20);
    let last = token(&app, &binding.user_id, "qq").await.unwrap();
    assert!(emu.access_token_valid(&last.access_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refresh_for_many_callers_when_the_result_is_fresh() {
    // Sandbox tokens live 3600 s and expiry is stored in whole seconds. With
    // a 3595 s skew the stored token is due once it is over 6 s old, and a
    // freshly refreshed one stays fresh for the next 4 s or more.
    let app = Arc::new(
        spawn_app(|s| {
            with_vault(s);
            s.providers.get_mut("sandbox").unwrap().store_tokens = true;
            s.vault.refresh_skew = Duration::from_secs(3595);
        })
        .await,
    );
    let user = app.sandbox_login("kai").await.binding.unwrap().user_id;
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (app, user) = (app.clone(), user.clone());
            tokio::spawn(async move { token(&app, &user, "sandbox").await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for c in calls {
        got.push(c.await.unwrap());
    }
    let refreshed = got.iter().filter(|t| t.refreshed).count();
    assert_eq!(refreshed, 1, "exactly one caller refreshed");
    let first = &got[0].access_token;
    assert!(
        got.iter().all(|t| &t.access_token == first),
        "all share its result"
    );
}

#[tokio::test]
async fn a_rejected_refresh_marks_the_token_unusable_until_the_next_login() {
    let (app, emu) = qq_setup(Backend::Postgres).await;
    let binding = qq_login(&app, &emu, "lan").await;
    emu.set_fault(
        Step::Refresh,
        Fault::Respond(
            200,
            "text/html",
            "callback( {\"error\":100021,\"error_description\":\"get token failed\"} );\n".into(),
        ),
    );
    let err = token(&app, &binding.user_id, "qq").await.unwrap_err();
    let msg = assert_error(&err, Code::FailedPrecondition, "REFRESH_TOKEN_REJECTED");
    assert!(msg.contains("log in again"), "{msg}");
    emu.clear_faults();
    let before = refreshes(&emu);
    let err = token(&app, &binding.user_id, "qq").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "TOKEN_UNUSABLE");
    assert_eq!(refreshes(&emu), before, "an unusable token is not retried");
    let user = user_of(&app, &binding.user_id).await.unwrap();
    assert!(user.identities[0].has_token && !user.identities[0].token_usable);

    // A new login stores fresh tokens.
    qq_login(&app, &emu, "lan").await;
    assert!(token(&app, &binding.user_id, "qq").await.is_ok());
    let audit = app
        .admin()
        .list_audit_events(admin(pb::ListAuditEventsRequest {
            kind: "token_refreshed".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(audit.iter().any(|e| e.outcome == "REFRESH_TOKEN_REJECTED"));
    assert!(audit.iter().any(|e| e.outcome == "success"));
}

#[tokio::test]
async fn token_errors_are_clear() {
    let (app, emu) = qq_setup(Backend::Postgres).await;
    let binding = qq_login(&app, &emu, "mo").await;
    let sandbox_user = app.sandbox_login("nia").await.binding.unwrap().user_id;
    let err = token(&app, &sandbox_user, "sandbox").await.unwrap_err();
    assert_error(&err, Code::NotFound, "TOKEN_NOT_STORED");
    let err = token(&app, &binding.user_id, "sandbox").await.unwrap_err();
    assert_error(&err, Code::NotFound, "IDENTITY_NOT_FOUND");
    let err = token(&app, "nobody", "qq").await.unwrap_err();
    assert_error(&err, Code::NotFound, "USER_NOT_FOUND");
    let err = token(&app, &binding.user_id, "nope").await.unwrap_err();
    assert_error(&err, Code::InvalidArgument, "UNKNOWN_PROVIDER");
    emu.set_fault(Step::Refresh, Fault::Status503);
    let err = token(&app, &binding.user_id, "qq").await.unwrap_err();
    assert_error(&err, Code::Unavailable, "PROVIDER_UNAVAILABLE");
    emu.clear_faults();
    assert!(
        token(&app, &binding.user_id, "qq").await.is_ok(),
        "an outage does not spoil the token"
    );
}

#[tokio::test]
async fn revoke_and_delete_revoke_at_the_provider() {
    let emu = QiitaEmulator::start().await;
    let mut config = emu.provider_config();
    config.store_tokens = true;
    let app = spawn_app(|s| {
        with_vault(s);
        s.providers.insert("qiita".into(), config);
    })
    .await;
    let login = |seed: &'static str| {
        let (app, emu) = (&app, &emu);
        async move {
            emu.add_user(seed);
            let begun = app.begin_with("qiita").await;
            let q: HashMap<String, String> = emu
                .approve(&begun.authorize_url, seed)
                .unwrap()
                .into_iter()
                .collect();
            app.complete(&begun.state, &q["code"])
                .await
                .unwrap()
                .binding
                .unwrap()
        }
    };
    let binding = login("oda").await;
    let t = token(&app, &binding.user_id, "qiita").await.unwrap();
    assert!(
        !t.refreshed && t.expires_at.is_none(),
        "Qiita tokens do not expire"
    );
    let revoked = app
        .admin()
        .revoke_provider_token(admin(pb::RevokeProviderTokenRequest {
            user_id: binding.user_id.clone(),
            provider: "qiita".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at_provider);
    assert!(!emu.access_token_valid(&t.access_token));
    let err = token(&app, &binding.user_id, "qiita").await.unwrap_err();
    assert_error(&err, Code::NotFound, "TOKEN_NOT_STORED");

    // Log in again, then delete the user: the new token dies with them.
    login("oda").await;
    let t2 = token(&app, &binding.user_id, "qiita").await.unwrap();
    let deleted = app
        .admin()
        .delete_user(admin(pb::DeleteUserRequest {
            user_id: binding.user_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.revoked_at, ["qiita"]);
    assert!(!emu.access_token_valid(&t2.access_token));
}

#[tokio::test]
async fn store_tokens_without_a_vault_key_is_refused() {
    let mut settings = base_settings();
    settings.providers.get_mut("sandbox").unwrap().store_tokens = true;
    let problems = settings.validate(authbroker::config::Mode::Serve);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("vault.keys") && p.contains("sandbox")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn rotate_keys_re_encrypts_under_the_newest_key() {
    let (app, emu) = qq_setup(Backend::Sqlite).await;
    let binding = qq_login(&app, &emu, "pei").await;
    let url = app.database_url();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rotate.toml");
    let new_key = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n\n[[vault.keys]]\nid = \"test-1\"\nkey = \"{VAULT_KEY}\"\n\n[[vault.keys]]\nid = \"test-2\"\nkey = \"{new_key}\"\n"
        ),
    )
    .unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_authbroker"))
            .args(["rotate-keys", "--config"])
            .arg(&config)
            .env_remove("AUTHBROKER_CONFIG")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("re-encrypted 1 token(s)"), "{text}");
    assert!(text.contains("\"test-2\""), "{text}");
    let again = run();
    assert!(String::from_utf8_lossy(&again.stdout).contains("re-encrypted 0 token(s)"));
    let row = app
        .store
        .get_token("qq", &emu.user("pei").unwrap().openid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.key_id, "test-2");
    // The new key alone opens it; the running app, which only knows the old
    // key, says exactly what is missing.
    let new_only = authbroker::vault::Vault::from_settings(&authbroker::config::VaultSettings {
        keys: vec![authbroker::config::VaultKeyConfig {
            id: "test-2".into(),
            key: Some(new_key.into()),
            key_file: None,
            key_env: None,
        }],
        ..Default::default()
    })
    .unwrap()
    .unwrap();
    let openid = emu.user("pei").unwrap().openid;
    assert!(new_only.open("qq", &openid, &row).is_ok());
    let err = token(&app, &binding.user_id, "qq").await.unwrap_err();
    assert_error(&err, Code::Internal, "VAULT_KEY_MISSING");
}

#[tokio::test]
async fn a_store_outage_is_unavailable_for_admin_calls() {
    // Nothing listens on port 1: the store is down from the start.
    let app = spawn_app(|s| s.database.url = "postgres://postgres@127.0.0.1:1/none".into()).await;
    let err = user_of(&app, "someone").await.unwrap_err();
    let msg = assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
    assert!(
        !msg.contains("127.0.0.1:1"),
        "no connection details leak: {msg}"
    );
    let err = app
        .admin()
        .list_users(admin(pb::ListUsersRequest::default()))
        .await
        .unwrap_err();
    assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
    let err = token(&app, "someone", "sandbox").await.unwrap_err();
    assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
    let err = app.link(&"A".repeat(43), "someone").await.unwrap_err();
    // The ticket check comes first and needs no store.
    assert_error(&err, Code::NotFound, "LINK_TICKET_UNKNOWN");
}

/// What the probe of issue 9 sent: NUL characters in string fields and
/// timestamps out of a `Timestamp`'s range. Both stores answer alike:
/// INVALID_ARGUMENT with a `BadRequest` naming the field, and the call is
/// still audited.
async fn bad_input_is_invalid_argument_on_every_store(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let olga = app.sandbox_login("olga").await.binding.unwrap();
    let mut a = app.admin();
    let ts = |seconds: i64, nanos: i32| Some(prost_types::Timestamp { seconds, nanos });
    // Year -9999, year 10000, and nanos out of range.
    let year_minus_9999 = ts(-377_705_116_800, 0);
    let year_10000 = ts(253_402_300_800, 0);
    let bad_nanos = ts(0, -1);

    let check = |result: Result<(), tonic::Status>, field: &str| {
        let err = result.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(violation_field(&err), field, "{err:?}");
    };
    let find = |provider: &str, subject: &str| pb::FindUserByIdentityRequest {
        provider: provider.into(),
        subject: subject.into(),
    };
    check(
        a.find_user_by_identity(admin(find("sand\0box", &olga.subject)))
            .await
            .map(drop),
        "provider",
    );
    check(
        a.find_user_by_identity(admin(find("sandbox", "1\0")))
            .await
            .map(drop),
        "subject",
    );
    let users = |r: pb::ListUsersRequest| {
        let mut a = app.admin();
        async move { a.list_users(admin(r)).await.map(drop) }
    };
    check(
        users(pb::ListUsersRequest {
            provider: "\0".into(),
            ..Default::default()
        })
        .await,
        "provider",
    );
    for (field, bad) in [
        ("created_after", &year_minus_9999),
        ("created_after", &year_10000),
        ("created_before", &bad_nanos),
    ] {
        let mut r = pb::ListUsersRequest::default();
        match field {
            "created_after" => r.created_after = *bad,
            _ => r.created_before = *bad,
        }
        check(users(r).await, field);
    }
    let audits = |r: pb::ListAuditEventsRequest| {
        let mut a = app.admin();
        async move { a.list_audit_events(admin(r)).await.map(drop) }
    };
    for (field, r) in [
        (
            "user_id",
            pb::ListAuditEventsRequest {
                user_id: "a\0".into(),
                ..Default::default()
            },
        ),
        (
            "provider",
            pb::ListAuditEventsRequest {
                provider: "\0".into(),
                ..Default::default()
            },
        ),
        (
            "kind",
            pb::ListAuditEventsRequest {
                kind: "login_failed\0".into(),
                ..Default::default()
            },
        ),
        (
            "after",
            pb::ListAuditEventsRequest {
                after: year_minus_9999,
                ..Default::default()
            },
        ),
        (
            "before",
            pb::ListAuditEventsRequest {
                before: year_10000,
                ..Default::default()
            },
        ),
    ] {
        check(audits(r).await, field);
    }
    // The edges of the range are fine, and a bound is never dropped.
    let listed = a
        .list_users(admin(pb::ListUsersRequest {
            created_after: ts(253_402_300_799, 999_999_999),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.users.is_empty(), "nobody was created after 9999");
    let listed = a
        .list_users(admin(pb::ListUsersRequest {
            created_after: ts(-62_135_596_800, 0),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.users.len(), 1);

    // Every refused call is in the audit trail, with its reason.
    let refused = app
        .store
        .list_audit_events(&authbroker::store::AuditQuery {
            kind: Some(authbroker::domain::AuditKind::AdminCall),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| {
            (r.event.reason.as_deref() == Some("INVALID_FIELD")).then(|| r.event.detail.clone())
        })
        .collect::<Vec<_>>();
    assert_eq!(
        refused.len(),
        11,
        "every refused call was audited: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_on_postgres() {
    bad_input_is_invalid_argument_on_every_store(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_on_sqlite() {
    bad_input_is_invalid_argument_on_every_store(Backend::Sqlite).await;
}
